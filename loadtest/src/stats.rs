//! Measurement: latency histograms sharded so connection tasks on several
//! threads rarely contend, their summaries (percentiles and the points of
//! a percentile-distribution chart), and the resident memory of processes.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

const SHARDS: usize = 8;
/// Largest latency recorded, in microseconds (one minute); larger values
/// are clamped.
const MAX_MICROS: u64 = 60_000_000;

/// A latency histogram in microseconds, split into shards by connection.
#[derive(Debug)]
pub struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    /// Empty, 1 µs to 60 s, 3 significant figures.
    pub fn new() -> Self {
        Latencies {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(
                        Histogram::new_with_bounds(1, MAX_MICROS, 3)
                            .expect("valid histogram bounds"),
                    )
                })
                .collect(),
        }
    }

    /// Records one latency from connection `conn`.
    pub fn record(&self, conn: usize, micros: u64) {
        let mut h = self.shards[conn % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        h.saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds");
        for s in &self.shards {
            let h = s.lock().unwrap_or_else(|e| e.into_inner());
            all.add(&*h).expect("same bounds");
        }
        all
    }
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// (percentile, ms) points for a distribution chart, from 0 to 99.999.
    pub distribution: Vec<[f64; 2]>,
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

impl LatencySummary {
    /// Summarises a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        // Evenly spaced on the log(1/(1-p)) axis the chart uses.
        let mut distribution = Vec::new();
        let mut x = 0.0f64;
        while x <= 5.0 + 1e-9 {
            let q = 1.0 - 10f64.powf(-x);
            if h.len() as f64 * (1.0 - q) >= 0.5 || x == 0.0 {
                distribution.push([q * 100.0, ms(h.value_at_quantile(q))]);
            }
            x += 0.1;
        }
        LatencySummary {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            distribution,
        }
    }
}

/// VmRSS of a process in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system) of a process in clock ticks (1/100 s on
/// Linux), from /proc/PID/stat; all its threads included.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU used by groups of processes over an interval, in percent of one
/// core (200 = two cores busy).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CpuUse {
    /// The target processes together.
    pub targets_pct: f64,
    /// The extra processes (Redis) together.
    pub extra_pct: f64,
    /// The load generator.
    pub client_pct: f64,
}

/// A CPU-time reading of targets, extras and this process.
#[derive(Debug, Clone)]
pub struct CpuMark {
    at: std::time::Instant,
    targets: u64,
    extra: u64,
    client: u64,
}

fn ticks_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| cpu_ticks(*p)).sum()
}

impl CpuMark {
    /// Reads now.
    pub fn now(targets: &[u32], extra: &[u32]) -> Self {
        CpuMark {
            at: std::time::Instant::now(),
            targets: ticks_sum(targets),
            extra: ticks_sum(extra),
            client: cpu_ticks(std::process::id()).unwrap_or(0),
        }
    }

    /// CPU use from `self` to now.
    pub fn since(&self, targets: &[u32], extra: &[u32]) -> CpuUse {
        let now = CpuMark::now(targets, extra);
        let secs = now.at.duration_since(self.at).as_secs_f64().max(1e-3);
        // Ticks are 1/100 s: ticks / secs is already percent of a core.
        let pct = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        CpuUse {
            targets_pct: pct(now.targets, self.targets),
            extra_pct: pct(now.extra, self.extra),
            client_pct: pct(now.client, self.client),
        }
    }
}

/// This process's VmRSS in KiB.
pub fn self_rss_kib() -> u64 {
    rss_kib(std::process::id()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_values() {
        let l = Latencies::new();
        for i in 1..=1000u64 {
            l.record(i as usize, i * 1000);
        }
        let s = LatencySummary::of(&l.merged());
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 500.0).abs() < 1.0, "{}", s.p50_ms);
        assert!((s.p99_ms - 990.0).abs() < 2.0, "{}", s.p99_ms);
        assert!((s.max_ms - 1000.0).abs() < 1.0);
        assert!(s.distribution.len() > 20);
    }

    #[test]
    fn own_rss_and_cpu_are_readable() {
        assert!(self_rss_kib() > 0);
        assert!(cpu_ticks(std::process::id()).is_some());
        let mark = CpuMark::now(&[], &[]);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(mark.since(&[], &[]).client_pct >= 0.0);
    }
}
