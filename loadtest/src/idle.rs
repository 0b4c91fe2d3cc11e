//! The `idle` scenario: N connections, each joined to a flow (rooms of
//! `room_size`), held open and answering pings for a while. Reports the
//! connection rate while connecting and the resident memory the target
//! processes gained per connection once settled.
//!
//! One process holds at most as many sockets as its open-files limit
//! allows, so the scenario can split the connections over worker processes
//! (this same binary, `idle-worker`), each connecting every `shards`-th
//! connection and reporting over its stdout; the parent reads the RSS.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Minter, Ws};
use crate::stats::{rss_kib, self_rss_kib};
use crate::Common;

/// What to run.
#[derive(Debug, Clone)]
pub struct IdleConfig {
    /// Targets and connection settings.
    pub common: Common,
    /// Connections in total.
    pub connections: usize,
    /// Members per flow room.
    pub room_size: usize,
    /// Wait after the last connection before reading RSS.
    pub settle: Duration,
    /// How long the connections are held after the RSS reading.
    pub hold: Duration,
    /// Target processes whose RSS is measured (the gateway nodes).
    pub pids: Vec<u32>,
    /// Other processes measured and reported separately (e.g. Redis).
    pub extra_pids: Vec<u32>,
    /// Worker processes (0 or 1: connect from this process).
    pub workers: usize,
    /// The binary to run workers with (default: this executable).
    pub worker_exe: Option<PathBuf>,
    /// After the idle reading: the first member of every room sends a
    /// `pod:update` of this many bytes (the others receive it), and RSS is
    /// read again once settled — memory after activity, not only idle.
    /// 0: no activity phase.
    pub activity_bytes: usize,
}

/// RSS of one process before connecting and once settled.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcRss {
    /// Process id.
    pub pid: u32,
    /// VmRSS before the first connection, KiB.
    pub before_kib: u64,
    /// VmRSS once settled, KiB.
    pub after_kib: u64,
}

/// What came out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleReport {
    /// Connections asked for.
    pub connections: usize,
    /// Connections that completed CONNECT and `flow:join`.
    pub connected: usize,
    /// Connections that failed to set up.
    pub failed: usize,
    /// The first setup error, if any.
    pub first_error: Option<String>,
    /// Seconds from the first connect to the last join ack.
    pub connect_secs: f64,
    /// Connections (with their join) completed per second.
    pub connects_per_sec: f64,
    /// Connections still open at the end of the hold.
    pub alive_at_end: usize,
    /// RSS of the target processes.
    pub targets: Vec<ProcRss>,
    /// RSS of the extra processes.
    pub extra: Vec<ProcRss>,
    /// Sum of the targets' RSS growth divided by `connected`, KiB.
    pub target_rss_per_conn_kib: Option<f64>,
    /// Sum of the extra processes' RSS growth divided by `connected`, KiB.
    pub extra_rss_per_conn_kib: Option<f64>,
    /// The load generator's own RSS per connection, KiB.
    pub client_rss_per_conn_kib: f64,
    /// Worker processes used.
    pub workers: usize,
    /// The `pod:update` size of the activity phase (0: none).
    #[serde(default)]
    pub activity_bytes: usize,
    /// The targets' RSS growth per connection once settled after the
    /// activity phase, against the reading before connecting, KiB.
    #[serde(default)]
    pub target_rss_per_conn_after_activity_kib: Option<f64>,
}

/// Setup outcome of one shard, as a worker reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardStats {
    /// Connected and joined.
    pub connected: usize,
    /// Failed.
    pub failed: usize,
    /// First error.
    pub first_error: Option<String>,
    /// Seconds to set up the shard.
    pub connect_secs: f64,
}

/// A set of held connections.
#[derive(Debug)]
pub struct Fleet {
    /// How setting up went.
    pub stats: ShardStats,
    alive: Arc<AtomicUsize>,
    stop: CancellationToken,
    activity: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// The `pod:update` a room's first member sends in the activity phase.
fn activity_message(i: usize, bytes: usize) -> String {
    let mut m =
        format!("42/flows,[\"pod:update\",{{\"podId\":\"idle-{i}\",\"updates\":{{\"note\":\"");
    m.extend(std::iter::repeat_n('x', bytes));
    m.push_str("\"}}]");
    m
}

/// User id of connection `i`.
pub fn user_of(common: &Common, i: usize) -> String {
    format!("{}-u{i}", common.run_id)
}

impl Fleet {
    /// Connects every `shards`-th connection starting at `shard`, joins
    /// each to its room, and returns once all have succeeded or failed.
    pub async fn connect(cfg: &IdleConfig, shard: usize, shards: usize) -> Fleet {
        let common = Arc::new(cfg.common.clone());
        let minter = Arc::new(Minter::new(
            &common.secret,
            cfg.settle + cfg.hold + Duration::from_secs(3600),
        ));
        let sem = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
        let alive = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let activity = CancellationToken::new();
        let (tx, mut rx) = mpsc::unbounded_channel::<Result<(), String>>();
        let started = Instant::now();
        let mut tasks = Vec::new();
        let room_size = cfg.room_size.max(1);
        for i in (shard..cfg.connections).step_by(shards.max(1)) {
            let (common, minter, sem, alive, stop, activity, tx) = (
                common.clone(),
                minter.clone(),
                sem.clone(),
                alive.clone(),
                stop.clone(),
                activity.clone(),
                tx.clone(),
            );
            let burst = (cfg.activity_bytes > 0 && i % room_size == 0)
                .then(|| activity_message(i, cfg.activity_bytes));
            tasks.push(tokio::spawn(async move {
                let permit = sem.acquire_owned().await;
                let user = user_of(&common, i);
                let flow = format!("{}-idle-{}", common.run_id, i / room_size);
                let r = client::establish(&common, &minter, i, &user, Some(&flow)).await;
                drop(permit);
                match r {
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                    }
                    Ok(ws) => {
                        alive.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.send(Ok(()));
                        drop(tx);
                        hold(ws, &stop, &activity, burst).await;
                        alive.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        drop(tx);
        let mut stats = ShardStats::default();
        while let Some(r) = rx.recv().await {
            match r {
                Ok(()) => stats.connected += 1,
                Err(e) => {
                    stats.failed += 1;
                    stats.first_error.get_or_insert(e);
                }
            }
        }
        stats.connect_secs = started.elapsed().as_secs_f64();
        Fleet {
            stats,
            alive,
            stop,
            activity,
            tasks,
        }
    }

    /// Starts the activity phase: each room's first member sends its
    /// `pod:update`.
    pub fn act(&self) {
        self.activity.cancel();
    }

    /// Connections still open.
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::Relaxed)
    }

    /// Closes every connection and waits for the tasks.
    pub async fn close(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Reads and discards frames, answering pings, until `stop` or the end of
/// the connection; sends `burst` once `activity` starts.
async fn hold(
    mut ws: Ws,
    stop: &CancellationToken,
    activity: &CancellationToken,
    mut burst: Option<String>,
) {
    loop {
        tokio::select! {
            _ = activity.cancelled(), if burst.is_some() => {
                let m = burst.take().unwrap_or_default();
                if ws.send(Message::text(m)).await.is_err() {
                    return;
                }
            }
            _ = stop.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return;
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                    if ws.send(Message::text("3")).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    }
}

fn rss_all(pids: &[u32]) -> Vec<u64> {
    pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect()
}

fn per_conn(before: &[u64], after: &[u64], n: usize) -> Option<f64> {
    if before.is_empty() || n == 0 {
        return None;
    }
    let grown: i64 = after
        .iter()
        .zip(before)
        .map(|(a, b)| *a as i64 - *b as i64)
        .sum();
    Some(grown as f64 / n as f64)
}

fn procs(pids: &[u32], before: &[u64], after: &[u64]) -> Vec<ProcRss> {
    pids.iter()
        .zip(before.iter().zip(after))
        .map(|(pid, (b, a))| ProcRss {
            pid: *pid,
            before_kib: *b,
            after_kib: *a,
        })
        .collect()
}

/// Runs the scenario.
pub async fn run(cfg: &IdleConfig) -> anyhow::Result<IdleReport> {
    if cfg.workers > 1 {
        return run_with_workers(cfg).await;
    }
    let before = rss_all(&cfg.pids);
    let before_extra = rss_all(&cfg.extra_pids);
    let client_before = self_rss_kib();
    let fleet = Fleet::connect(cfg, 0, 1).await;
    tokio::time::sleep(cfg.settle).await;
    let after = rss_all(&cfg.pids);
    let after_extra = rss_all(&cfg.extra_pids);
    let client_after = self_rss_kib();
    let mut after_activity = None;
    if cfg.activity_bytes > 0 {
        fleet.act();
        tokio::time::sleep(cfg.settle).await;
        after_activity = Some(rss_all(&cfg.pids));
    }
    tokio::time::sleep(cfg.hold).await;
    let alive = fleet.alive();
    let stats = fleet.stats.clone();
    fleet.close().await;
    let mut r = finish(
        cfg,
        &stats,
        alive,
        (&before, &after),
        (&before_extra, &after_extra),
        client_after.saturating_sub(client_before),
        1,
    );
    r.target_rss_per_conn_after_activity_kib =
        after_activity.and_then(|a| per_conn(&before, &a, stats.connected));
    Ok(r)
}

fn finish(
    cfg: &IdleConfig,
    stats: &ShardStats,
    alive: usize,
    targets: (&[u64], &[u64]),
    extra: (&[u64], &[u64]),
    client_grown_kib: u64,
    workers: usize,
) -> IdleReport {
    let n = stats.connected;
    IdleReport {
        connections: cfg.connections,
        connected: n,
        failed: stats.failed,
        first_error: stats.first_error.clone(),
        connect_secs: stats.connect_secs,
        connects_per_sec: if stats.connect_secs > 0.0 {
            n as f64 / stats.connect_secs
        } else {
            0.0
        },
        alive_at_end: alive,
        targets: procs(&cfg.pids, targets.0, targets.1),
        extra: procs(&cfg.extra_pids, extra.0, extra.1),
        target_rss_per_conn_kib: per_conn(targets.0, targets.1, n),
        extra_rss_per_conn_kib: per_conn(extra.0, extra.1, n),
        client_rss_per_conn_kib: if n > 0 {
            client_grown_kib as f64 / n as f64
        } else {
            0.0
        },
        workers,
        activity_bytes: cfg.activity_bytes,
        target_rss_per_conn_after_activity_kib: None,
    }
}

/// The command-line arguments of worker `shard` of `shards`.
pub fn worker_args(cfg: &IdleConfig, shard: usize, shards: usize) -> Vec<String> {
    let c = &cfg.common;
    let mut a = vec!["idle-worker".to_owned()];
    let mut push = |k: &str, v: String| {
        a.push(k.to_owned());
        a.push(v);
    };
    push("--shard", shard.to_string());
    push("--shards", shards.to_string());
    push("--connections", cfg.connections.to_string());
    push("--room-size", cfg.room_size.to_string());
    push("--activity-bytes", cfg.activity_bytes.to_string());
    push("--secret", c.secret.clone());
    push("--run-id", c.run_id.clone());
    push(
        "--connect-concurrency",
        c.connect_concurrency.div_ceil(shards).max(1).to_string(),
    );
    push(
        "--connect-timeout-secs",
        c.connect_timeout.as_secs().to_string(),
    );
    push(
        "--max-secs",
        (cfg.settle + cfg.hold + c.connect_timeout)
            .as_secs()
            .saturating_add(600)
            .to_string(),
    );
    for t in &c.targets {
        push("--target", t.to_string());
    }
    if !c.source_ips.is_empty() {
        push(
            "--source-ips",
            c.source_ips
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    a
}

/// The body of an `idle-worker` process: connects its shard, prints
/// `READY <ShardStats JSON>`, starts the activity phase on an `ACT` line,
/// holds until stdin closes (or `max` passes), prints `DONE <alive>` and
/// returns.
pub async fn worker_main(cfg: &IdleConfig, shard: usize, shards: usize, max: Duration) {
    let fleet = Fleet::connect(cfg, shard, shards).await;
    println!(
        "READY {}",
        serde_json::to_string(&fleet.stats).unwrap_or_default()
    );
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let _ = tokio::time::timeout(max, async {
        while let Ok(Some(l)) = stdin.next_line().await {
            if l.trim() == "ACT" {
                fleet.act();
            }
        }
    })
    .await;
    println!("DONE {}", fleet.alive());
    fleet.close().await;
}

struct Worker {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Worker {
    async fn line(&mut self, prefix: &str, wait: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let l = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .map_err(|_| anyhow!("worker silent for {wait:?}"))??
                .ok_or_else(|| anyhow!("worker exited"))?;
            if let Some(rest) = l.strip_prefix(prefix) {
                return Ok(rest.trim().to_owned());
            }
        }
    }
}

async fn run_with_workers(cfg: &IdleConfig) -> anyhow::Result<IdleReport> {
    let exe = match &cfg.worker_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this executable")?,
    };
    let shards = cfg.workers;
    let before = rss_all(&cfg.pids);
    let before_extra = rss_all(&cfg.extra_pids);
    let started = Instant::now();
    let mut workers = Vec::new();
    for shard in 0..shards {
        let mut child = tokio::process::Command::new(&exe)
            .args(worker_args(cfg, shard, shards))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {}", exe.display()))?;
        let out = child.stdout.take().context("worker stdout")?;
        workers.push(Worker {
            child,
            lines: BufReader::new(out).lines(),
        });
    }
    let client_before: u64 = workers
        .iter()
        .filter_map(|w| w.child.id().and_then(rss_kib))
        .sum();
    let wait = cfg.common.connect_timeout
        + Duration::from_secs(
            (cfg.connections / cfg.common.connect_concurrency.max(1)) as u64 * 2 + 120,
        );
    let mut stats = ShardStats::default();
    for w in &mut workers {
        let s: ShardStats = serde_json::from_str(&w.line("READY", wait).await?)?;
        stats.connected += s.connected;
        stats.failed += s.failed;
        if stats.first_error.is_none() {
            stats.first_error = s.first_error;
        }
    }
    stats.connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(cfg.settle).await;
    let after = rss_all(&cfg.pids);
    let after_extra = rss_all(&cfg.extra_pids);
    let client_after: u64 = workers
        .iter()
        .filter_map(|w| w.child.id().and_then(rss_kib))
        .sum();
    let mut after_activity = None;
    if cfg.activity_bytes > 0 {
        for w in &mut workers {
            if let Some(stdin) = w.child.stdin.as_mut() {
                stdin.write_all(b"ACT\n").await?;
                stdin.flush().await?;
            }
        }
        tokio::time::sleep(cfg.settle).await;
        after_activity = Some(rss_all(&cfg.pids));
    }
    tokio::time::sleep(cfg.hold).await;
    let mut alive = 0;
    for w in &mut workers {
        drop(w.child.stdin.take());
    }
    for w in &mut workers {
        match w.line("DONE", Duration::from_secs(30)).await {
            Ok(n) => alive += n.parse::<usize>().unwrap_or(0),
            Err(e) => bail!("idle worker: {e}"),
        }
    }
    for w in &mut workers {
        let _ = tokio::time::timeout(Duration::from_secs(30), w.child.wait()).await;
    }
    let mut r = finish(
        cfg,
        &stats,
        alive,
        (&before, &after),
        (&before_extra, &after_extra),
        client_after.saturating_sub(client_before),
        shards,
    );
    r.target_rss_per_conn_after_activity_kib =
        after_activity.and_then(|a| per_conn(&before, &a, stats.connected));
    Ok(r)
}
