//! The relay scenarios: `rooms` (R rooms × M members, every member sends
//! `pod:move` at a rate), `broadcast` (one room, one sender) and `ramp`
//! (rooms, with the per-sender rate raised step by step until the p99
//! latency passes a limit or deliveries are lost).
//!
//! Every `pod:move` carries its step and send time (µs on this process's
//! clock) in its `podId`; every receiver finds them in the relayed
//! `pod:moved` with a substring search and records the end-to-end latency.
//! A step sends for its duration, then stays quiet for the drain time so
//! in-flight deliveries land, and is then judged: losses are the deliveries
//! expected (each send × the other live members of the sender's room) that
//! were not received.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, moved_stamp, now_micros, pod_move, Minter, Ws, ERROR_PREFIX};
use crate::redis_stats::{self, CommandUse};
use crate::stats::{CpuMark, CpuUse, Latencies, LatencySummary};
use crate::Common;

/// What to run.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Targets and connection settings.
    pub common: Common,
    /// Scenario name, used in flow ids and the report.
    pub name: String,
    /// Rooms.
    pub rooms: usize,
    /// Members per room; consecutive members go to consecutive targets.
    pub members: usize,
    /// Members of each room that send (the first ones).
    pub senders_per_room: usize,
    /// Per-sender rate (events/s) of each step; one step unless ramping.
    pub rates: Vec<f64>,
    /// How long each step sends.
    pub step: Duration,
    /// Quiet time after each step before it is judged.
    pub drain: Duration,
    /// A step whose p99 exceeds this is not sustained (ms).
    pub p99_limit_ms: f64,
    /// Stop at the first step that is not sustained (the ramp).
    pub stop_when_unsustained: bool,
    /// Target processes whose CPU use is reported per step (may be empty).
    pub pids: Vec<u32>,
    /// Other processes (Redis) whose CPU use is reported per step.
    pub extra_pids: Vec<u32>,
    /// Redis on 127.0.0.1, whose `INFO commandstats` each step reports.
    pub redis_port: Option<u16>,
}

impl RelayConfig {
    /// `rooms` with one step at `rate` for `duration`.
    pub fn rooms(
        common: Common,
        rooms: usize,
        members: usize,
        rate: f64,
        duration: Duration,
    ) -> Self {
        RelayConfig {
            common,
            name: "rooms".into(),
            rooms,
            members,
            senders_per_room: members,
            rates: vec![rate],
            step: duration,
            drain: Duration::from_secs(2),
            p99_limit_ms: 100.0,
            stop_when_unsustained: false,
            pids: Vec::new(),
            extra_pids: Vec::new(),
            redis_port: None,
        }
    }

    /// `broadcast`: one room of `members`, one sender at `rate`.
    pub fn broadcast(common: Common, members: usize, rate: f64, duration: Duration) -> Self {
        RelayConfig {
            name: "broadcast".into(),
            senders_per_room: 1,
            ..Self::rooms(common, 1, members, rate, duration)
        }
    }

    /// `ramp`: rooms whose per-sender rate starts at `start` and is
    /// multiplied by `factor` each step, at most `max_steps` steps of
    /// `step` each.
    pub fn ramp(
        common: Common,
        rooms: usize,
        members: usize,
        start: f64,
        factor: f64,
        max_steps: usize,
        step: Duration,
    ) -> Self {
        let rates = (0..max_steps.max(1))
            .map(|k| start * factor.powi(k as i32))
            .collect();
        RelayConfig {
            name: "ramp".into(),
            rates,
            stop_when_unsustained: true,
            ..Self::rooms(common, rooms, members, start, step)
        }
    }

    fn senders(&self) -> usize {
        self.rooms * self.senders_per_room.min(self.members)
    }
}

/// One step's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepReport {
    /// Events per second per sender asked for.
    pub rate_per_sender: f64,
    /// Deliveries per second the offered rate implies.
    pub offered_deliveries_per_sec: f64,
    /// Events sent.
    pub sent: u64,
    /// Events sent per second.
    pub sends_per_sec: f64,
    /// Deliveries expected.
    pub expected: u64,
    /// Deliveries received (by the end of the drain).
    pub received: u64,
    /// Expected but not received.
    pub lost: u64,
    /// Received beyond the expected (duplicates).
    pub excess: u64,
    /// Received deliveries per second of the step.
    pub deliveries_per_sec: f64,
    /// `error` events received (e.g. RATE_LIMIT).
    pub errors: u64,
    /// End-to-end latency of the deliveries.
    pub latency: LatencySummary,
    /// p99 within the limit, nothing lost, the client kept up.
    pub sustained: bool,
    /// Why not, when not.
    pub reason: Option<String>,
    /// CPU used while the step sent.
    pub cpu: CpuUse,
    /// The nodes' CPU time per delivered frame (µs).
    #[serde(default)]
    pub node_us_per_delivery: Option<f64>,
    /// Redis' CPU time per event sent (µs), its fan-out to the nodes
    /// included.
    #[serde(default)]
    pub redis_us_per_event: Option<f64>,
    /// The load generator's own CPU time per delivered frame (µs).
    #[serde(default)]
    pub client_us_per_delivery: Option<f64>,
    /// Redis commands run per event sent (commands run by scripts count
    /// too, as `INFO commandstats` counts them).
    #[serde(default)]
    pub redis_calls_per_event: Option<f64>,
    /// What Redis ran while the step sent, costliest first.
    #[serde(default)]
    pub redis_commands: Vec<CommandUse>,
}

impl StepReport {
    /// Fills the per-delivery and per-event figures from `cpu` and the
    /// Redis commands.
    fn per_unit(&mut self, secs: f64) {
        let per = |pct: f64, n: f64| (n > 0.0).then(|| pct / 100.0 * secs * 1e6 / n);
        let delivered = self.deliveries_per_sec * secs;
        let sent = self.sent as f64;
        self.node_us_per_delivery = per(self.cpu.targets_pct, delivered);
        self.redis_us_per_event = per(self.cpu.extra_pct, sent);
        self.client_us_per_delivery = per(self.cpu.client_pct, delivered);
        if !self.redis_commands.is_empty() && sent > 0.0 {
            let calls: u64 = self.redis_commands.iter().map(|c| c.calls).sum();
            self.redis_calls_per_event = Some(calls as f64 / sent);
        }
    }
}

/// What came out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RelayReport {
    /// `rooms`, `broadcast` or `ramp`.
    pub scenario: String,
    /// Rooms.
    pub rooms: usize,
    /// Members per room.
    pub members: usize,
    /// Senders in total.
    pub senders: usize,
    /// Connections set up.
    pub connected: usize,
    /// Connections that failed to set up.
    pub failed: usize,
    /// The first setup error.
    pub first_error: Option<String>,
    /// Seconds to set up every connection.
    pub setup_secs: f64,
    /// Connections that ended during the run.
    pub disconnects: u64,
    /// The first `error` event text, if any.
    pub first_event_error: Option<String>,
    /// Seconds each step sent.
    pub step_secs: f64,
    /// The p99 limit used to judge steps (ms).
    pub p99_limit_ms: f64,
    /// Every step run.
    pub steps: Vec<StepReport>,
    /// The highest delivery rate among sustained steps.
    pub max_sustained_deliveries_per_sec: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Wait,
    Send {
        step: usize,
        rate: f64,
        start: Instant,
        end: Instant,
    },
    Stop,
}

#[derive(Debug, Default)]
struct StepStats {
    sent: AtomicU64,
    expected: AtomicU64,
    errors: AtomicU64,
    latencies: Latencies,
}

#[derive(Debug)]
struct Shared {
    steps: Vec<StepStats>,
    room_live: Vec<AtomicUsize>,
    current: AtomicUsize,
    disconnects: AtomicU64,
    first_event_error: Mutex<Option<String>>,
}

/// Runs the scenario.
pub async fn run(cfg: &RelayConfig) -> anyhow::Result<RelayReport> {
    anyhow::ensure!(
        cfg.rooms > 0 && cfg.members > 1,
        "need rooms with at least two members"
    );
    anyhow::ensure!(!cfg.rates.is_empty(), "no rate given");
    let common = Arc::new(cfg.common.clone());
    let total_secs = (cfg.step + cfg.drain).as_secs() * cfg.rates.len() as u64 + 3600;
    let minter = Arc::new(Minter::new(&common.secret, Duration::from_secs(total_secs)));
    let shared = Arc::new(Shared {
        steps: cfg.rates.iter().map(|_| StepStats::default()).collect(),
        room_live: (0..cfg.rooms).map(|_| AtomicUsize::new(0)).collect(),
        current: AtomicUsize::new(0),
        disconnects: AtomicU64::new(0),
        first_event_error: Mutex::new(None),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Wait);
    let sem = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let started = Instant::now();
    let mut tasks = Vec::new();
    let senders_per_room = cfg.senders_per_room.min(cfg.members);
    for i in 0..cfg.rooms * cfg.members {
        let room = i / cfg.members;
        let sender = i % cfg.members < senders_per_room;
        let (common, minter, sem, shared, tx, phase) = (
            common.clone(),
            minter.clone(),
            sem.clone(),
            shared.clone(),
            tx.clone(),
            phase_rx.clone(),
        );
        let flow = format!("{}-{}-{room}", common.run_id, cfg.name);
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let user = format!("{}-{}-u{i}", common.run_id, "r");
            let r = client::establish(&common, &minter, i, &user, Some(&flow)).await;
            drop(permit);
            match r {
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                }
                Ok(ws) => {
                    shared.room_live[room].fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Ok(()));
                    drop(tx);
                    member(ws, i, room, sender, &shared, phase).await;
                }
            }
        }));
    }
    drop(tx);
    let mut report = RelayReport {
        scenario: cfg.name.clone(),
        rooms: cfg.rooms,
        members: cfg.members,
        senders: cfg.senders(),
        step_secs: cfg.step.as_secs_f64(),
        p99_limit_ms: cfg.p99_limit_ms,
        ..Default::default()
    };
    while let Some(r) = rx.recv().await {
        match r {
            Ok(()) => report.connected += 1,
            Err(e) => {
                report.failed += 1;
                report.first_error.get_or_insert(e);
            }
        }
    }
    report.setup_secs = started.elapsed().as_secs_f64();
    // Let the join announcements (user:joined) settle.
    tokio::time::sleep(Duration::from_millis(500)).await;

    for (k, &rate) in cfg.rates.iter().enumerate() {
        let start = Instant::now() + Duration::from_millis(50);
        let end = start + cfg.step;
        shared.current.store(k, Ordering::Relaxed);
        let _ = phase_tx.send(Phase::Send {
            step: k,
            rate,
            start,
            end,
        });
        tokio::time::sleep_until(start).await;
        let mark = CpuMark::now(&cfg.pids, &cfg.extra_pids);
        let redis_before = cfg.redis_port.and_then(|p| redis_stats::snapshot(p).ok());
        tokio::time::sleep_until(end).await;
        let cpu = mark.since(&cfg.pids, &cfg.extra_pids);
        let redis_after = cfg.redis_port.and_then(|p| redis_stats::snapshot(p).ok());
        tokio::time::sleep_until(end + cfg.drain).await;
        let _ = phase_tx.send(Phase::Wait);
        let mut step = judge(cfg, &shared, k, rate);
        step.cpu = cpu;
        if let (Some(b), Some(a)) = (&redis_before, &redis_after) {
            step.redis_commands = redis_stats::between(b, a);
        }
        step.per_unit(cfg.step.as_secs_f64());
        let stop = cfg.stop_when_unsustained && !step.sustained;
        report.steps.push(step);
        if stop {
            break;
        }
    }
    let _ = phase_tx.send(Phase::Stop);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    report.disconnects = shared.disconnects.load(Ordering::Relaxed);
    report.first_event_error = shared
        .first_event_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    report.max_sustained_deliveries_per_sec = report
        .steps
        .iter()
        .filter(|s| s.sustained)
        .map(|s| s.deliveries_per_sec)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    Ok(report)
}

fn judge(cfg: &RelayConfig, shared: &Shared, k: usize, rate: f64) -> StepReport {
    let s = &shared.steps[k];
    let secs = cfg.step.as_secs_f64();
    let sent = s.sent.load(Ordering::Relaxed);
    let expected = s.expected.load(Ordering::Relaxed);
    let hist = s.latencies.merged();
    let received = hist.len();
    let latency = LatencySummary::of(&hist);
    let offered_sends = cfg.senders() as f64 * rate;
    let mut step = StepReport {
        rate_per_sender: rate,
        offered_deliveries_per_sec: offered_sends * (cfg.members - 1) as f64,
        sent,
        sends_per_sec: sent as f64 / secs,
        expected,
        received,
        lost: expected.saturating_sub(received),
        excess: received.saturating_sub(expected),
        deliveries_per_sec: received as f64 / secs,
        errors: s.errors.load(Ordering::Relaxed),
        latency,
        sustained: false,
        reason: None,
        cpu: CpuUse::default(),
        ..StepReport::default()
    };
    step.reason = if received == 0 {
        Some("nothing delivered".into())
    } else if step.lost > 0 {
        Some(format!("{} deliveries lost", step.lost))
    } else if step.latency.p99_ms > cfg.p99_limit_ms {
        Some(format!(
            "p99 {:.1} ms > {} ms",
            step.latency.p99_ms, cfg.p99_limit_ms
        ))
    } else if step.sends_per_sec < 0.9 * offered_sends {
        Some(format!(
            "the load generator sent {:.0}/s of {:.0}/s offered",
            step.sends_per_sec, offered_sends
        ))
    } else {
        None
    };
    step.sustained = step.reason.is_none();
    step
}

/// One member's task: answers pings, records deliveries and, when it is a
/// sender, sends on the schedule of the current phase.
async fn member(
    mut ws: Ws,
    idx: usize,
    room: usize,
    sender: bool,
    shared: &Shared,
    mut phase: watch::Receiver<Phase>,
) {
    // Spread senders' first sends over one period (golden-ratio offsets).
    let offset = (idx as f64 * 0.618_033_988_75).fract();
    struct Schedule {
        step: usize,
        start: Instant,
        period: Duration,
        end: Instant,
        n: u64,
        others: u64,
    }
    let mut sched: Option<Schedule> = None;
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let sleep = tokio::time::sleep_until(far);
    tokio::pin!(sleep);
    let due = |s: &Schedule| s.start + s.period.mul_f64(s.n as f64 + offset);
    loop {
        tokio::select! {
            r = phase.changed() => {
                if r.is_err() {
                    break;
                }
                let p = *phase.borrow_and_update();
                match p {
                    Phase::Stop => break,
                    Phase::Wait => sched = None,
                    Phase::Send { step, rate, start, end } => {
                        if sender && rate > 0.0 {
                            let others = shared.room_live[room].load(Ordering::Relaxed).saturating_sub(1) as u64;
                            let s = Schedule {
                                step,
                                start,
                                period: Duration::from_secs_f64(1.0 / rate),
                                end,
                                n: 0,
                                others,
                            };
                            sleep.as_mut().reset(due(&s));
                            sched = Some(s);
                        }
                    }
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let s = t.as_str();
                    if s == "2" {
                        if ws.send(Message::text("3")).await.is_err() {
                            shared.disconnects.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    } else if let Some((step, ts)) = moved_stamp(s) {
                        let lat = now_micros().saturating_sub(ts);
                        if let Some(st) = shared.steps.get(step) {
                            st.latencies.record(idx, lat);
                        }
                    } else if s.starts_with(ERROR_PREFIX) {
                        let k = shared.current.load(Ordering::Relaxed);
                        shared.steps[k].errors.fetch_add(1, Ordering::Relaxed);
                        let mut first = shared.first_event_error.lock().unwrap_or_else(|e| e.into_inner());
                        first.get_or_insert_with(|| s.to_owned());
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    shared.disconnects.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = &mut sleep, if sched.is_some() => {
                let Some(s) = sched.as_mut() else { continue };
                let now = Instant::now();
                let mut batch = 0u64;
                while batch < 256 && due(s) <= now && due(s) < s.end {
                    let mut text = String::with_capacity(96);
                    pod_move(&mut text, None, s.step, now_micros());
                    if ws.feed(Message::text(text)).await.is_err() {
                        shared.disconnects.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    s.n += 1;
                    batch += 1;
                }
                if batch > 0 {
                    let st = &shared.steps[s.step];
                    st.sent.fetch_add(batch, Ordering::Relaxed);
                    st.expected.fetch_add(batch * s.others, Ordering::Relaxed);
                    if ws.flush().await.is_err() {
                        shared.disconnects.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                let next = due(s);
                if next >= s.end {
                    sched = None;
                } else {
                    sleep.as_mut().reset(next);
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}
