//! Reports: the JSON shape of one scenario run and of a comparison, the
//! plain-text tables printed on stdout, and the Markdown tables of the
//! comparison.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::idle::IdleReport;
use crate::limit::LimitReport;
use crate::relay::RelayReport;

/// The result of one scenario, whatever it was.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Outcome {
    /// `idle`.
    Idle(IdleReport),
    /// `rooms`, `broadcast`, `ramp`.
    Relay(RelayReport),
    /// `limit`.
    Limit(LimitReport),
}

/// One scenario run against one system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// What was measured (`flowgate`, `baseline`, or a free label).
    pub system: String,
    /// `idle`, `rooms`, `broadcast`, `ramp` or `limit`.
    pub scenario: String,
    /// When the run started (RFC 3339, UTC).
    pub started_at: String,
    /// The target addresses.
    pub targets: Vec<String>,
    /// The figures.
    pub outcome: Outcome,
}

/// The current time as RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// A plain-text table of one run.
pub fn table(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "== {} on {} ({} targets) ==",
        r.scenario,
        r.system,
        r.targets.len()
    );
    match &r.outcome {
        Outcome::Idle(i) => {
            let _ = writeln!(
                s,
                "connections        {} of {} ({} failed, {} workers)",
                i.connected, i.connections, i.failed, i.workers
            );
            let _ = writeln!(
                s,
                "connect time       {:.2} s  ({:.0} connections/s)",
                i.connect_secs, i.connects_per_sec
            );
            let _ = writeln!(s, "alive at the end   {}", i.alive_at_end);
            for p in &i.targets {
                let _ = writeln!(
                    s,
                    "target pid {:<7} RSS {} KiB -> {} KiB",
                    p.pid, p.before_kib, p.after_kib
                );
            }
            for p in &i.extra {
                let _ = writeln!(
                    s,
                    "extra  pid {:<7} RSS {} KiB -> {} KiB",
                    p.pid, p.before_kib, p.after_kib
                );
            }
            let _ = writeln!(
                s,
                "targets RSS/conn   {} KiB",
                opt(i.target_rss_per_conn_kib, 2)
            );
            let _ = writeln!(
                s,
                "extra RSS/conn     {} KiB",
                opt(i.extra_rss_per_conn_kib, 2)
            );
            if i.activity_bytes > 0 {
                let _ = writeln!(
                    s,
                    "targets RSS/conn after a {} B pod:update per room: {} KiB",
                    i.activity_bytes,
                    opt(i.target_rss_per_conn_after_activity_kib, 2)
                );
            }
            let _ = writeln!(s, "client RSS/conn    {:.2} KiB", i.client_rss_per_conn_kib);
            if let Some(e) = &i.first_error {
                let _ = writeln!(s, "first error        {e}");
            }
        }
        Outcome::Relay(x) => {
            let _ = writeln!(
                s,
                "{} rooms x {} members, {} senders; {} connected, {} failed (setup {:.1} s); {} disconnects",
                x.rooms, x.members, x.senders, x.connected, x.failed, x.setup_secs, x.disconnects
            );
            let _ = writeln!(
                s,
                "{:>9} {:>10} {:>10} {:>11} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9}  verdict",
                "rate/snd",
                "offered/s",
                "sent/s",
                "deliv/s",
                "lost",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "errors"
            );
            for st in &x.steps {
                let _ = writeln!(
                    s,
                    "{:>9.2} {:>10.0} {:>10.0} {:>11.0} {:>9} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>9} {:>17}  {}",
                    st.rate_per_sender,
                    st.offered_deliveries_per_sec,
                    st.sends_per_sec,
                    st.deliveries_per_sec,
                    st.lost,
                    st.latency.p50_ms,
                    st.latency.p90_ms,
                    st.latency.p99_ms,
                    st.latency.max_ms,
                    st.errors,
                    format!(
                        "{:.0}/{:.0}/{:.0}",
                        st.cpu.targets_pct, st.cpu.extra_pct, st.cpu.client_pct
                    ),
                    st.reason.as_deref().unwrap_or("sustained")
                );
            }
            let _ = writeln!(
                s,
                "max sustained      {} deliveries/s (p99 <= {} ms, no loss)",
                opt(x.max_sustained_deliveries_per_sec, 0),
                x.p99_limit_ms
            );
            if let Some(e) = &x.first_error {
                let _ = writeln!(s, "first setup error  {e}");
            }
            if let Some(e) = &x.first_event_error {
                let _ = writeln!(s, "first error event  {e}");
            }
        }
        Outcome::Limit(l) => {
            let _ = writeln!(
                s,
                "connections        {} of {} (one user)",
                l.connected, l.connections
            );
            let _ = writeln!(
                s,
                "attempted          {} in {:.1} s",
                l.attempted, l.duration_secs
            );
            let _ = writeln!(
                s,
                "accepted           {} ({:.1}/s overall, {:.1}/s after the first second)",
                l.accepted, l.accepted_per_sec, l.steady_accepted_per_sec
            );
            let _ = writeln!(s, "refused            {}", l.refused);
            let _ = writeln!(s, "answered/s         {:.0}", l.answered_per_sec);
            let _ = writeln!(s, "accepted per node  {:?}", l.accepted_per_target);
            if let Some(e) = &l.first_error {
                let _ = writeln!(s, "first setup error  {e}");
            }
        }
    }
    s
}

/// Which way is better for a compared metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Higher is better.
    Higher,
    /// Lower is better.
    Lower,
    /// Neither: informative.
    Info,
}

/// One line of a comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Scenario.
    pub scenario: String,
    /// Metric name with unit.
    pub metric: String,
    /// flowgate's figure.
    pub flowgate: Option<f64>,
    /// The baseline's figure.
    pub baseline: Option<f64>,
    /// flowgate ÷ baseline.
    pub ratio: Option<f64>,
    /// Which way is better.
    pub better: Better,
}

fn relay_rows(scenario: &str, f: &RelayReport, b: &RelayReport, rows: &mut Vec<Row>) {
    let mut add = |metric: &str, fv: Option<f64>, bv: Option<f64>, better| {
        rows.push(Row {
            scenario: scenario.into(),
            metric: metric.into(),
            flowgate: fv,
            baseline: bv,
            ratio: match (fv, bv) {
                (Some(f), Some(b)) if b != 0.0 => Some(f / b),
                _ => None,
            },
            better,
        })
    };
    if scenario == "ramp" {
        add(
            "max sustained deliveries/s (p99 <= 100 ms, no loss)",
            f.max_sustained_deliveries_per_sec,
            b.max_sustained_deliveries_per_sec,
            Better::Higher,
        );
        add(
            "steps run",
            Some(f.steps.len() as f64),
            Some(b.steps.len() as f64),
            Better::Info,
        );
        return;
    }
    let (Some(fs), Some(bs)) = (f.steps.first(), b.steps.first()) else {
        return;
    };
    add(
        "offered deliveries/s",
        Some(fs.offered_deliveries_per_sec),
        Some(bs.offered_deliveries_per_sec),
        Better::Info,
    );
    add(
        "deliveries/s",
        Some(fs.deliveries_per_sec),
        Some(bs.deliveries_per_sec),
        Better::Higher,
    );
    add(
        "lost deliveries",
        Some(fs.lost as f64),
        Some(bs.lost as f64),
        Better::Lower,
    );
    add(
        "latency p50 ms",
        Some(fs.latency.p50_ms),
        Some(bs.latency.p50_ms),
        Better::Lower,
    );
    add(
        "latency p90 ms",
        Some(fs.latency.p90_ms),
        Some(bs.latency.p90_ms),
        Better::Lower,
    );
    add(
        "latency p99 ms",
        Some(fs.latency.p99_ms),
        Some(bs.latency.p99_ms),
        Better::Lower,
    );
    add(
        "latency max ms",
        Some(fs.latency.max_ms),
        Some(bs.latency.max_ms),
        Better::Lower,
    );
    add(
        "CPU % of the nodes (100 = one core)",
        Some(fs.cpu.targets_pct),
        Some(bs.cpu.targets_pct),
        Better::Lower,
    );
    add(
        "CPU % of Redis",
        Some(fs.cpu.extra_pct),
        Some(bs.cpu.extra_pct),
        Better::Lower,
    );
    add(
        "CPU % of the load generator",
        Some(fs.cpu.client_pct),
        Some(bs.cpu.client_pct),
        Better::Info,
    );
    add(
        "node CPU µs per delivery",
        fs.node_us_per_delivery,
        bs.node_us_per_delivery,
        Better::Lower,
    );
    add(
        "Redis CPU µs per published event",
        fs.redis_us_per_event,
        bs.redis_us_per_event,
        Better::Lower,
    );
    add(
        "Redis commands per published event",
        fs.redis_calls_per_event,
        bs.redis_calls_per_event,
        Better::Lower,
    );
    add(
        "load generator CPU µs per delivery",
        fs.client_us_per_delivery,
        bs.client_us_per_delivery,
        Better::Info,
    );
}

/// The comparison lines of one scenario.
pub fn rows(flowgate: &RunReport, baseline: &RunReport) -> Vec<Row> {
    let mut rows = Vec::new();
    let scenario = flowgate.scenario.as_str();
    let mut push = |metric: &str, f: Option<f64>, b: Option<f64>, better| {
        rows.push(Row {
            scenario: scenario.into(),
            metric: metric.into(),
            flowgate: f,
            baseline: b,
            ratio: match (f, b) {
                (Some(f), Some(b)) if b != 0.0 => Some(f / b),
                _ => None,
            },
            better,
        })
    };
    match (&flowgate.outcome, &baseline.outcome) {
        (Outcome::Idle(f), Outcome::Idle(b)) => {
            push(
                "connections held",
                Some(f.alive_at_end as f64),
                Some(b.alive_at_end as f64),
                Better::Higher,
            );
            push(
                "connections/s while connecting",
                Some(f.connects_per_sec),
                Some(b.connects_per_sec),
                Better::Higher,
            );
            push(
                "gateway RSS per connection KiB",
                f.target_rss_per_conn_kib,
                b.target_rss_per_conn_kib,
                Better::Lower,
            );
            if f.activity_bytes > 0 {
                push(
                    "gateway RSS per connection after activity KiB",
                    f.target_rss_per_conn_after_activity_kib,
                    b.target_rss_per_conn_after_activity_kib,
                    Better::Lower,
                );
            }
            push(
                "Redis RSS per connection KiB",
                f.extra_rss_per_conn_kib,
                b.extra_rss_per_conn_kib,
                Better::Info,
            );
        }
        (Outcome::Relay(f), Outcome::Relay(b)) => relay_rows(scenario, f, b, &mut rows),
        (Outcome::Limit(f), Outcome::Limit(b)) => {
            push(
                "accepted events/s after 1 s (one user, all nodes)",
                Some(f.steady_accepted_per_sec),
                Some(b.steady_accepted_per_sec),
                Better::Info,
            );
            push(
                "accepted events/s overall",
                Some(f.accepted_per_sec),
                Some(b.accepted_per_sec),
                Better::Info,
            );
            push(
                "answered events/s (accepted + refused)",
                Some(f.answered_per_sec),
                Some(b.answered_per_sec),
                Better::Higher,
            );
        }
        _ => {}
    }
    rows
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn ratio_text(r: &Row) -> String {
    match r.ratio {
        None => "-".into(),
        Some(x) => {
            let hint = match r.better {
                Better::Higher if x >= 1.0 => " (better)",
                Better::Higher => " (worse)",
                Better::Lower if x <= 1.0 => " (better)",
                Better::Lower => " (worse)",
                Better::Info => "",
            };
            format!("{x:.2}x{hint}")
        }
    }
}

/// The comparison as a plain-text table.
pub fn rows_text(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<10} {:<52} {:>12} {:>12} {:>18}",
        "scenario", "metric", "flowgate", "baseline", "flowgate/baseline"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<10} {:<52} {:>12} {:>12} {:>18}",
            r.scenario,
            r.metric,
            num(r.flowgate),
            num(r.baseline),
            ratio_text(r)
        );
    }
    s
}

/// The comparison as a Markdown table.
pub fn rows_markdown(rows: &[Row]) -> String {
    let mut s = String::from("| scenario | metric | flowgate | baseline | flowgate ÷ baseline |\n|---|---|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.scenario,
            r.metric,
            num(r.flowgate),
            num(r.baseline),
            ratio_text(r)
        );
    }
    s
}

/// The steps of a ramp as a Markdown table.
pub fn ramp_markdown(system: &str, r: &RelayReport) -> String {
    let mut s = format!(
        "{system}: {} rooms × {} members, {} s per step\n\n| rate/sender | offered deliveries/s | sent/s | delivered/s | lost | p50 ms | p99 ms | max ms | CPU % nodes / Redis / client | verdict |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        r.rooms, r.members, r.step_secs
    );
    for st in &r.steps {
        let _ = writeln!(
            s,
            "| {:.2} | {:.0} | {:.0} | {:.0} | {} | {:.2} | {:.2} | {:.1} | {:.0} / {:.0} / {:.0} | {} |",
            st.rate_per_sender,
            st.offered_deliveries_per_sec,
            st.sends_per_sec,
            st.deliveries_per_sec,
            st.lost,
            st.latency.p50_ms,
            st.latency.p99_ms,
            st.latency.max_ms,
            st.cpu.targets_pct,
            st.cpu.extra_pct,
            st.cpu.client_pct,
            st.reason.as_deref().unwrap_or("sustained")
        );
    }
    s
}
