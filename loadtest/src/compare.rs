//! The side-by-side comparison: for each scenario, start Redis and three
//! flowgate nodes, run it, stop them; start Redis and three baseline
//! processes, run the same scenario, stop them; then the next scenario
//! (flowgate, baseline, flowgate, baseline, …). Writes every run's JSON,
//! `comparison.json`, `comparison.md` and the SVG charts into the output
//! directory and prints the ratios.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::idle::{self, IdleConfig};
use crate::limit::{self, LimitConfig};
use crate::procs::{Cluster, System};
use crate::relay::{self, RelayConfig};
use crate::report::{self, Outcome, Row, RunReport};
use crate::svg;
use crate::Common;

/// Scenario sizes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sizes {
    /// `idle`: connections in total.
    pub idle_connections: usize,
    /// `idle`: members per room.
    pub idle_room_size: usize,
    /// `idle`: seconds between the last connection and the RSS reading.
    pub idle_settle_secs: u64,
    /// `idle`: seconds held after the reading.
    pub idle_hold_secs: u64,
    /// `idle`: the activity phase's `pod:update` size (0: none).
    #[serde(default)]
    pub idle_activity_bytes: usize,
    /// `rooms`: rooms.
    pub rooms: usize,
    /// `rooms`: members per room.
    pub room_members: usize,
    /// `rooms`: events/s per member.
    pub room_rate: f64,
    /// `rooms` and `broadcast`: seconds of traffic.
    pub duration_secs: u64,
    /// `broadcast`: members of the one room.
    pub broadcast_members: usize,
    /// `broadcast`: events/s of the one sender.
    pub broadcast_rate: f64,
    /// `ramp`: rooms.
    pub ramp_rooms: usize,
    /// `ramp`: members per room.
    pub ramp_members: usize,
    /// `ramp`: first per-sender rate.
    pub ramp_start: f64,
    /// `ramp`: rate multiplier per step.
    pub ramp_factor: f64,
    /// `ramp`: most steps.
    pub ramp_steps: usize,
    /// `ramp`: seconds per step.
    pub ramp_step_secs: u64,
    /// `limit`: connections of the one user.
    pub limit_connections: usize,
    /// `limit`: seconds.
    pub limit_secs: u64,
}

impl Sizes {
    /// Modest sizes that finish in a few minutes on two cores.
    pub fn modest() -> Self {
        Sizes {
            idle_connections: 6_000,
            idle_room_size: 10,
            idle_settle_secs: 5,
            idle_hold_secs: 5,
            idle_activity_bytes: 16 * 1024,
            rooms: 100,
            room_members: 10,
            room_rate: 2.0,
            duration_secs: 10,
            broadcast_members: 500,
            broadcast_rate: 10.0,
            ramp_rooms: 100,
            ramp_members: 10,
            ramp_start: 1.0,
            ramp_factor: 1.3,
            ramp_steps: 12,
            ramp_step_secs: 4,
            limit_connections: 6,
            limit_secs: 5,
        }
    }

    /// The targets: 100,000 idle connections and 50,000
    /// deliveries/s in `rooms`.
    pub fn full() -> Self {
        Sizes {
            idle_connections: 100_000,
            idle_settle_secs: 10,
            idle_hold_secs: 10,
            idle_activity_bytes: 16 * 1024,
            rooms: 250,
            room_members: 10,
            room_rate: 2.25,
            duration_secs: 20,
            broadcast_members: 1_000,
            broadcast_rate: 20.0,
            ramp_rooms: 250,
            ramp_steps: 16,
            ramp_start: 0.5,
            ramp_factor: 1.25,
            ramp_step_secs: 5,
            limit_secs: 10,
            ..Self::modest()
        }
    }
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Output directory.
    pub out_dir: PathBuf,
    /// flowgate.
    pub flowgate: System,
    /// The Node baseline.
    pub baseline: System,
    /// `redis-server`.
    pub redis_bin: PathBuf,
    /// Nodes per system.
    pub nodes: usize,
    /// Source addresses for the client.
    pub source_ips: Vec<IpAddr>,
    /// Scenarios, in order.
    pub scenarios: Vec<String>,
    /// HS256 secret.
    pub secret: String,
    /// Sizes.
    pub sizes: Sizes,
    /// Connections set up at once.
    pub connect_concurrency: usize,
    /// The command line, for the report.
    pub command: String,
}

/// The machine the comparison ran on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs.
    pub nproc: usize,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// MemTotal in GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// Open-files limit of the processes (soft, after raising).
    pub nofile: u64,
}

impl Machine {
    /// Reads /proc.
    pub fn read(nofile: u64) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
                .unwrap_or_default(),
            memory_gib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kib| kib / 1024.0 / 1024.0)
                .unwrap_or(0.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            nofile,
        }
    }
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// When it started.
    pub date: String,
    /// The command.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// Sizes used.
    pub sizes: Sizes,
    /// Notes (e.g. sizes capped by limits).
    pub notes: Vec<String>,
    /// Every run, in the order run.
    pub runs: Vec<RunReport>,
    /// The ratios.
    pub rows: Vec<Row>,
}

/// The per-user rate the nodes get: high for throughput scenarios, the
/// contract's 20/s for `limit`.
fn rate_for(scenario: &str) -> u64 {
    if scenario == "limit" {
        20
    } else {
        1_000_000
    }
}

/// The processes a scenario measures.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    /// The nodes (CPU, RSS).
    pub pids: Vec<u32>,
    /// Redis (CPU, RSS).
    pub extra_pids: Vec<u32>,
    /// Redis' port on 127.0.0.1, for `INFO commandstats`.
    pub redis_port: Option<u16>,
}

/// Runs one scenario against running targets and wraps the outcome.
pub async fn run_scenario(
    cfg: &CompareConfig,
    scenario: &str,
    system: &str,
    common: Common,
    watched: Watched,
    notes: &mut Vec<String>,
) -> anyhow::Result<RunReport> {
    let Watched {
        pids,
        extra_pids,
        redis_port,
    } = watched;
    let s = &cfg.sizes;
    let started_at = report::now_rfc3339();
    let targets = common.targets.iter().map(|t| t.to_string()).collect();
    let outcome = match scenario {
        "idle" => {
            let nofile = crate::raise_nofile() as usize;
            let per_proc = nofile.saturating_sub(300).max(100);
            let cap = per_proc * cfg.nodes;
            let mut n = s.idle_connections;
            if n > cap {
                notes.push(format!(
                    "idle: {n} connections asked for, capped to {cap}: the open-files limit is {nofile} per process here (hard limit; each of the {} nodes can hold about {per_proc})",
                    cfg.nodes
                ));
                n = cap;
            }
            let workers = n.div_ceil(per_proc).max(1);
            Outcome::Idle(
                idle::run(&IdleConfig {
                    common,
                    connections: n,
                    room_size: s.idle_room_size,
                    settle: Duration::from_secs(s.idle_settle_secs),
                    hold: Duration::from_secs(s.idle_hold_secs),
                    pids,
                    extra_pids,
                    workers,
                    worker_exe: None,
                    activity_bytes: s.idle_activity_bytes,
                })
                .await?,
            )
        }
        "rooms" | "broadcast" | "ramp" => {
            let mut rc = match scenario {
                "rooms" => RelayConfig::rooms(
                    common,
                    s.rooms,
                    s.room_members,
                    s.room_rate,
                    Duration::from_secs(s.duration_secs),
                ),
                "broadcast" => RelayConfig::broadcast(
                    common,
                    s.broadcast_members,
                    s.broadcast_rate,
                    Duration::from_secs(s.duration_secs),
                ),
                _ => RelayConfig::ramp(
                    common,
                    s.ramp_rooms,
                    s.ramp_members,
                    s.ramp_start,
                    s.ramp_factor,
                    s.ramp_steps,
                    Duration::from_secs(s.ramp_step_secs),
                ),
            };
            rc.pids = pids;
            rc.extra_pids = extra_pids;
            rc.redis_port = redis_port;
            Outcome::Relay(relay::run(&rc).await?)
        }
        "limit" => Outcome::Limit(
            limit::run(&LimitConfig {
                common,
                connections: s.limit_connections,
                window: 16,
                duration: Duration::from_secs(s.limit_secs),
                warmup: Duration::from_millis(1500),
            })
            .await?,
        ),
        other => anyhow::bail!("unknown scenario {other:?}"),
    };
    Ok(RunReport {
        system: system.into(),
        scenario: scenario.into(),
        started_at,
        targets,
        outcome,
    })
}

async fn one(
    cfg: &CompareConfig,
    system: &System,
    scenario: &str,
    round: usize,
    notes: &mut Vec<String>,
) -> anyhow::Result<RunReport> {
    let label = system.label();
    let dir = cfg.out_dir.join(format!("{round:02}-{scenario}-{label}"));
    eprintln!(
        "-- {scenario} on {label}: starting Redis and {} nodes",
        cfg.nodes
    );
    let cluster = {
        let (system, redis, nodes, secret, dir) = (
            system.clone(),
            cfg.redis_bin.clone(),
            cfg.nodes,
            cfg.secret.clone(),
            dir.clone(),
        );
        let rate = rate_for(scenario);
        tokio::task::spawn_blocking(move || {
            Cluster::start(&system, &redis, nodes, &secret, rate, &dir)
        })
        .await??
    };
    let mut common = Common::new(cluster.addrs.clone(), &cfg.secret);
    common.source_ips = cfg.source_ips.clone();
    common.connect_concurrency = cfg.connect_concurrency;
    common.run_id = format!("{scenario}{round}");
    let result = run_scenario(
        cfg,
        scenario,
        label,
        common,
        Watched {
            pids: cluster.node_pids(),
            extra_pids: vec![cluster.redis.pid()],
            redis_port: Some(cluster.redis_port),
        },
        notes,
    )
    .await;
    tokio::task::spawn_blocking(move || cluster.stop()).await?;
    let r = result.with_context(|| format!("{scenario} on {label}"))?;
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&r)?)?;
    println!("{}", report::table(&r));
    Ok(r)
}

/// Runs the comparison.
pub async fn run(cfg: &CompareConfig) -> anyhow::Result<Comparison> {
    std::fs::create_dir_all(&cfg.out_dir)?;
    let nofile = crate::raise_nofile();
    let mut cmp = Comparison {
        date: report::now_rfc3339(),
        command: cfg.command.clone(),
        machine: Machine::read(nofile),
        sizes: cfg.sizes.clone(),
        notes: Vec::new(),
        runs: Vec::new(),
        rows: Vec::new(),
    };
    for (round, scenario) in cfg.scenarios.iter().enumerate() {
        let mut notes = Vec::new();
        let f = one(cfg, &cfg.flowgate, scenario, round, &mut notes).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = one(cfg, &cfg.baseline, scenario, round, &mut notes).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        notes.dedup();
        cmp.notes.extend(notes);
        cmp.rows.extend(report::rows(&f, &b));
        cmp.runs.push(f);
        cmp.runs.push(b);
        // Write as we go, so a later failure keeps what was measured.
        write_outputs(&cfg.out_dir, &cmp)?;
    }
    println!("== flowgate vs baseline ==");
    print!("{}", report::rows_text(&cmp.rows));
    for n in &cmp.notes {
        println!("note: {n}");
    }
    Ok(cmp)
}

/// Writes `comparison.json`, `comparison.md` and the charts.
pub fn write_outputs(dir: &Path, cmp: &Comparison) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("comparison.json"),
        serde_json::to_string_pretty(cmp)?,
    )?;
    let mut md = format!(
        "# flowgate vs Node Socket.IO + Redis adapter\n\n- date: {}\n- command: `{}`\n- machine: {} CPUs ({}), {:.1} GiB, kernel {}, open files {}\n\n",
        cmp.date,
        cmp.command,
        cmp.machine.nproc,
        cmp.machine.cpu_model,
        cmp.machine.memory_gib,
        cmp.machine.kernel,
        cmp.machine.nofile
    );
    md.push_str(&report::rows_markdown(&cmp.rows));
    for r in &cmp.runs {
        if let Outcome::Relay(x) = &r.outcome {
            if x.scenario == "ramp" {
                md.push('\n');
                md.push_str(&report::ramp_markdown(&r.system, x));
            }
        }
    }
    for scenario in ["rooms", "broadcast"] {
        let steps: Vec<(&str, &crate::relay::StepReport)> = cmp
            .runs
            .iter()
            .filter(|r| r.scenario == scenario)
            .filter_map(|r| match &r.outcome {
                Outcome::Relay(x) => x.steps.first().map(|st| (r.system.as_str(), st)),
                _ => None,
            })
            .collect();
        md.push_str(&crate::redis_stats::redis_commands_markdown(
            scenario, &steps,
        ));
    }
    for n in &cmp.notes {
        md.push_str(&format!("\nnote: {n}\n"));
    }
    std::fs::write(dir.join("comparison.md"), md)?;
    for (name, svg) in charts(cmp) {
        std::fs::write(dir.join(name), svg)?;
    }
    Ok(())
}

fn color(system: &str) -> String {
    if system == "flowgate" {
        svg::FLOWGATE.into()
    } else {
        svg::BASELINE.into()
    }
}

/// The SVG charts of a comparison: `(file name, document)`.
pub fn charts(cmp: &Comparison) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for scenario in ["rooms", "broadcast"] {
        let runs: Vec<(String, String, Vec<[f64; 2]>)> = cmp
            .runs
            .iter()
            .filter(|r| r.scenario == scenario)
            .filter_map(|r| match &r.outcome {
                Outcome::Relay(x) => x.steps.first().map(|st| {
                    (
                        format!(
                            "{} ({:.0} deliveries/s, p99 {:.2} ms)",
                            r.system, st.deliveries_per_sec, st.latency.p99_ms
                        ),
                        color(&r.system),
                        st.latency.distribution.clone(),
                    )
                }),
                _ => None,
            })
            .collect();
        if !runs.is_empty() {
            out.push((
                format!("latency-{scenario}.svg"),
                svg::latency_chart(
                    &format!("{scenario}: end-to-end latency by percentile"),
                    &runs,
                ),
            ));
        }
    }
    let ramps: Vec<&RunReport> = cmp.runs.iter().filter(|r| r.scenario == "ramp").collect();
    if !ramps.is_empty() {
        let series = |f: &dyn Fn(&crate::relay::StepReport) -> (f64, f64)| -> Vec<svg::Series> {
            ramps
                .iter()
                .filter_map(|r| match &r.outcome {
                    Outcome::Relay(x) => Some(svg::Series {
                        label: r.system.clone(),
                        color: color(&r.system),
                        points: x.steps.iter().map(f).collect(),
                        markers: true,
                    }),
                    _ => None,
                })
                .collect()
        };
        out.push((
            "ramp-p99.svg".into(),
            svg::line_chart(
                "ramp: p99 latency vs delivered rate",
                &svg::Axis::linear("delivered deliveries/s"),
                &svg::Axis::log("p99 end-to-end latency (ms)"),
                &series(&|s| (s.deliveries_per_sec, s.latency.p99_ms.max(0.001))),
                Some((100.0, "100 ms")),
            ),
        ));
        out.push((
            "ramp-throughput.svg".into(),
            svg::line_chart(
                "ramp: delivered vs offered",
                &svg::Axis::linear("offered deliveries/s"),
                &svg::Axis::linear("delivered deliveries/s"),
                &series(&|s| (s.offered_deliveries_per_sec, s.deliveries_per_sec)),
                None,
            ),
        ));
    }
    out
}
