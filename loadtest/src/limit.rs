//! The `limit` scenario: one user with several connections spread over the
//! nodes sends `pod:move` with acks as fast as the server answers (a fixed
//! window of unanswered events per connection) and counts what was
//! accepted (`{"ok":true}`) and refused. A per-user limit shared by every
//! node caps the accepted rate at the configured budget whatever the number
//! of nodes; a per-process limit lets through the budget times the nodes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, now_micros, parse_ack, pod_move, Minter, Ws};
use crate::Common;

/// What to run.
#[derive(Debug, Clone)]
pub struct LimitConfig {
    /// Targets and connection settings.
    pub common: Common,
    /// Connections of the one user (spread round-robin over the targets).
    pub connections: usize,
    /// Unanswered events per connection.
    pub window: usize,
    /// How long to blast.
    pub duration: Duration,
    /// Pause after the joins so the budget they spent refills.
    pub warmup: Duration,
}

/// What came out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LimitReport {
    /// Connections asked for.
    pub connections: usize,
    /// Connections set up.
    pub connected: usize,
    /// First setup error.
    pub first_error: Option<String>,
    /// Seconds blasted.
    pub duration_secs: f64,
    /// Events sent.
    pub attempted: u64,
    /// Events acked `{"ok":true}` before the end.
    pub accepted: u64,
    /// Events refused before the end.
    pub refused: u64,
    /// Accepted per second over the whole run (includes the burst).
    pub accepted_per_sec: f64,
    /// Accepted per second after the first second (the steady rate).
    pub steady_accepted_per_sec: f64,
    /// Answered events (accepted or refused) per second.
    pub answered_per_sec: f64,
    /// Accepted per target, in target order.
    pub accepted_per_target: Vec<u64>,
}

#[derive(Debug, Default)]
struct Counters {
    attempted: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    steady: AtomicU64,
}

/// Runs the scenario.
pub async fn run(cfg: &LimitConfig) -> anyhow::Result<LimitReport> {
    anyhow::ensure!(cfg.connections > 0, "no connections");
    let common = Arc::new(cfg.common.clone());
    let minter = Minter::new(&common.secret, cfg.duration + Duration::from_secs(3600));
    let user = format!("{}-limit-user", common.run_id);
    let flow = format!("{}-limit", common.run_id);
    let counters = Arc::new(Counters::default());
    let per_target: Arc<Vec<AtomicU64>> =
        Arc::new(common.targets.iter().map(|_| AtomicU64::new(0)).collect());
    let (go_tx, go_rx) = watch::channel::<Option<(Instant, Instant)>>(None);
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let mut tasks = Vec::new();
    for i in 0..cfg.connections {
        // Sequential setup: each join spends budget of the one user.
        let r = client::establish(&common, &minter, i, &user, Some(&flow)).await;
        let (counters, per_target, go, tx) = (
            counters.clone(),
            per_target.clone(),
            go_rx.clone(),
            tx.clone(),
        );
        let window = cfg.window.max(1);
        let slot = i % common.targets.len();
        tasks.push(tokio::spawn(async move {
            match r {
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                }
                Ok(ws) => {
                    let _ = tx.send(Ok(()));
                    drop(tx);
                    blast(ws, window, &counters, &per_target[slot], go).await;
                }
            }
        }));
    }
    drop(tx);
    let mut report = LimitReport {
        connections: cfg.connections,
        duration_secs: cfg.duration.as_secs_f64(),
        ..Default::default()
    };
    while let Some(r) = rx.recv().await {
        match r {
            Ok(()) => report.connected += 1,
            Err(e) => {
                report.first_error.get_or_insert(e);
            }
        }
    }
    tokio::time::sleep(cfg.warmup).await;
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + cfg.duration;
    let _ = go_tx.send(Some((start, end)));
    for t in tasks {
        let _ = tokio::time::timeout(cfg.duration + Duration::from_secs(10), t).await;
    }
    let secs = cfg.duration.as_secs_f64();
    report.attempted = counters.attempted.load(Ordering::Relaxed);
    report.accepted = counters.accepted.load(Ordering::Relaxed);
    report.refused = counters.refused.load(Ordering::Relaxed);
    report.accepted_per_sec = report.accepted as f64 / secs;
    report.answered_per_sec = (report.accepted + report.refused) as f64 / secs;
    report.steady_accepted_per_sec = if secs > 1.0 {
        counters.steady.load(Ordering::Relaxed) as f64 / (secs - 1.0)
    } else {
        report.accepted_per_sec
    };
    report.accepted_per_target = per_target
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    Ok(report)
}

async fn blast(
    mut ws: Ws,
    window: usize,
    counters: &Counters,
    mine: &AtomicU64,
    mut go: watch::Receiver<Option<(Instant, Instant)>>,
) {
    // Wait for the start, answering pings.
    let (start, end) = loop {
        if let Some(w) = *go.borrow_and_update() {
            break w;
        }
        tokio::select! {
            r = go.changed() => if r.is_err() { return },
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                    let _ = ws.send(Message::text("3")).await;
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    };
    tokio::time::sleep_until(start).await;
    let steady_from = start + Duration::from_secs(1);
    // Ack ids 1 was the join; events use 2, 3, …
    let mut next_id = 2u64;
    let mut text = String::with_capacity(96);
    for _ in 0..window {
        pod_move(&mut text, Some(next_id), 0, now_micros());
        next_id += 1;
        if ws.feed(Message::text(text.clone())).await.is_err() {
            return;
        }
    }
    counters
        .attempted
        .fetch_add(window as u64, Ordering::Relaxed);
    if ws.flush().await.is_err() {
        return;
    }
    let deadline = tokio::time::sleep_until(end);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let s = t.as_str();
                    if s == "2" {
                        let _ = ws.send(Message::text("3")).await;
                    } else if let Some((_, ok)) = parse_ack(s) {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        if ok {
                            counters.accepted.fetch_add(1, Ordering::Relaxed);
                            mine.fetch_add(1, Ordering::Relaxed);
                            if now >= steady_from {
                                counters.steady.fetch_add(1, Ordering::Relaxed);
                            }
                        } else {
                            counters.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        pod_move(&mut text, Some(next_id), 0, now_micros());
                        next_id += 1;
                        counters.attempted.fetch_add(1, Ordering::Relaxed);
                        if ws.send(Message::text(text.clone())).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}
