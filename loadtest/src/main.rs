//! The `flowgate-loadtest` command line: one subcommand per scenario
//! (`idle`, `rooms`, `broadcast`, `ramp`, `limit`) against running
//! Socket.IO servers, `compare` (flowgate vs the Node baseline, starting
//! and stopping both), `render` (charts and tables again from a
//! `comparison.json`), `capacity` (the sizing model of docs/capacity.md),
//! and the hidden `idle-worker` the idle scenario runs
//! when one process cannot hold every socket.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flowgate_loadtest::compare::{self, CompareConfig, Comparison, Sizes};
use flowgate_loadtest::idle::{self, IdleConfig};
use flowgate_loadtest::limit::{self, LimitConfig};
use flowgate_loadtest::procs::System;
use flowgate_loadtest::relay::{self, RelayConfig};
use flowgate_loadtest::report::{self, Outcome, RunReport};
use flowgate_loadtest::Common;

#[derive(Debug, Parser)]
#[command(
    name = "flowgate-loadtest",
    version,
    about = "Socket.IO load generator and flowgate-vs-baseline benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Args, Clone)]
struct Target {
    /// A Socket.IO server, host:port (repeat or comma-separate; connections
    /// are spread round-robin).
    #[arg(long = "target", required = true, value_delimiter = ',')]
    targets: Vec<SocketAddr>,
    /// Source addresses bound round-robin before connecting, e.g.
    /// 127.0.0.1,127.0.0.2 (each gives ~28k ports per target).
    #[arg(long, value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    /// HS256 secret the servers check tokens with.
    #[arg(long, env = "JWT_ACCESS_TOKEN_SECRET")]
    secret: String,
    /// Connections set up at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Seconds one connection may take to connect and join.
    #[arg(long, default_value_t = 30)]
    connect_timeout_secs: u64,
    /// Prefix of flow and user ids (default: lt<pid>).
    #[arg(long)]
    run_id: Option<String>,
}

impl Target {
    fn common(&self) -> Common {
        let mut c = Common::new(self.targets.clone(), &self.secret);
        c.source_ips = self.source_ips.clone();
        c.connect_concurrency = self.connect_concurrency;
        c.connect_timeout = Duration::from_secs(self.connect_timeout_secs);
        if let Some(id) = &self.run_id {
            c.run_id = id.clone();
        }
        c
    }
}

#[derive(Debug, Args, Clone)]
struct Output {
    /// Write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write SVG charts into this directory.
    #[arg(long)]
    svg_dir: Option<PathBuf>,
    /// Label of the system under test in the report.
    #[arg(long, default_value = "target")]
    system: String,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// N connections joined to flows, held; connection rate and RSS per connection.
    Idle {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: Output,
        /// Connections.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Members per flow room.
        #[arg(long, default_value_t = 10)]
        room_size: usize,
        /// Seconds to wait after connecting before reading RSS.
        #[arg(long, default_value_t = 5)]
        settle_secs: u64,
        /// Seconds to hold the connections after the reading (the `--duration`).
        #[arg(long, alias = "duration", default_value_t = 5)]
        hold_secs: u64,
        /// PIDs of the target processes whose RSS is measured.
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
        /// Other PIDs measured separately (e.g. Redis).
        #[arg(long, value_delimiter = ',')]
        extra_pids: Vec<u32>,
        /// Worker processes (0: as many as the open-files limit needs).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// After the idle reading, each room's first member sends a
        /// `pod:update` of this many bytes and RSS is read again (0: no).
        #[arg(long, default_value_t = 0)]
        activity_bytes: usize,
    },
    /// R rooms × M members, every member sends pod:move at a rate.
    Rooms {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: Output,
        #[arg(long, default_value_t = 50)]
        rooms: usize,
        #[arg(long, default_value_t = 10)]
        members: usize,
        /// Events per second per member.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        /// Seconds of traffic.
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// One room of M members, one sender at a rate.
    Broadcast {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: Output,
        #[arg(long, default_value_t = 500)]
        members: usize,
        /// Events per second of the sender.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Seconds of traffic.
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// Rooms with the per-sender rate raised each step until p99 > limit or losses.
    Ramp {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: Output,
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        #[arg(long, default_value_t = 10)]
        members: usize,
        /// First per-sender rate.
        #[arg(long, default_value_t = 1.0)]
        start_rate: f64,
        /// Rate multiplier per step.
        #[arg(long, default_value_t = 1.3)]
        factor: f64,
        /// Most steps.
        #[arg(long, default_value_t = 12)]
        max_steps: usize,
        /// Seconds per step.
        #[arg(long, alias = "duration", default_value_t = 5)]
        step_secs: u64,
        /// p99 limit of a sustained step (ms).
        #[arg(long, default_value_t = 100.0)]
        p99_limit_ms: f64,
    },
    /// One user on several nodes blasting acked events: accepted events/s.
    Limit {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: Output,
        /// Connections of the one user.
        #[arg(long, default_value_t = 6)]
        connections: usize,
        /// Unanswered events per connection.
        #[arg(long, default_value_t = 16)]
        window: usize,
        /// Seconds.
        #[arg(long, default_value_t = 5)]
        duration: u64,
    },
    /// flowgate vs the Node baseline, alternating per scenario.
    Compare(Box<CompareArgs>),
    /// Tables and charts again from a comparison.json.
    Render {
        /// The comparison.json.
        comparison: PathBuf,
        /// Where to write comparison.md and the SVGs (default: beside it).
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Nodes, Redis shards, Postgres writes and egress for a number of
    /// users, from measured unit costs (defaults: docs/benchmarks.md, e9, e7).
    Capacity(CapacityArgs),
    /// (internal) One shard of the idle scenario.
    #[command(hide = true)]
    IdleWorker {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        shard: usize,
        #[arg(long)]
        shards: usize,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        room_size: usize,
        #[arg(long, default_value_t = 0)]
        activity_bytes: usize,
        #[arg(long)]
        max_secs: u64,
    },
}

#[derive(Debug, Args)]
struct CapacityArgs {
    /// Concurrent users, one column each.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    users: Vec<f64>,
    /// Gateway CPU per delivered frame, µs (e9, rooms at 50,625
    /// deliveries/s: 17.1; s9: 21.9).
    #[arg(long, default_value_t = 17.1)]
    node_us_per_delivery: f64,
    /// Redis CPU per published event, µs (e9, the same load: 27.6; c3:
    /// 29.9).
    #[arg(long, default_value_t = 27.6)]
    redis_us_per_event: f64,
    /// Gateway memory per connection, KiB (f2, 120,000 connections: 4.50
    /// after activity, 4.28 idle; e7: 9.25 after activity).
    #[arg(long, default_value_t = 4.5)]
    kib_per_connection: f64,
    #[arg(long, default_value_t = 4.0)]
    cores_per_node: f64,
    #[arg(long, default_value_t = 8.0)]
    gib_per_node: f64,
    /// Connections one node may hold (its `nofile` limit, raised).
    #[arg(long, default_value_t = 50_000.0)]
    connections_per_node: f64,
    /// Share of a node planned for use.
    #[arg(long, default_value_t = 0.6)]
    utilisation: f64,
    /// Share of its one command thread a Redis shard may spend.
    #[arg(long, default_value_t = 0.6)]
    redis_core_budget: f64,
    #[arg(long, default_value_t = 180.0)]
    bytes_per_frame: f64,
    #[arg(long, default_value_t = 10.0)]
    room_size: f64,
    /// Non-volatile events per second per user.
    #[arg(long, default_value_t = 2.0)]
    events_per_user: f64,
    /// Share of users moving a cursor at any time.
    #[arg(long, default_value_t = 0.2)]
    active_share: f64,
    /// Cursor updates per second per active user.
    #[arg(long, default_value_t = 10.0)]
    cursor_rate: f64,
    /// Share of non-volatile events persisted to Postgres.
    #[arg(long, default_value_t = 0.25)]
    persisted_share: f64,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// The targets: 100,000 idle connections (capped by the
    /// open-files limit), 50,000 deliveries/s in rooms, a longer ramp.
    #[arg(long)]
    full: bool,
    /// Scenarios in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,rooms,broadcast,ramp,limit"
    )]
    scenarios: Vec<String>,
    /// Output directory (default: loadtest/results/<date>).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// The flowgate binary.
    #[arg(long, default_value = "target/release/flowgate")]
    flowgate_bin: PathBuf,
    /// The baseline directory (with node_modules installed).
    #[arg(long, default_value = "loadtest/baseline")]
    baseline_dir: PathBuf,
    /// The node program.
    #[arg(long, default_value = "node")]
    node: String,
    /// redis-server.
    #[arg(long, default_value = "/usr/bin/redis-server")]
    redis_server: PathBuf,
    /// Nodes per system.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Client source addresses.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6"
    )]
    source_ips: Vec<IpAddr>,
    /// HS256 secret given to both systems.
    #[arg(long, default_value = "loadtest-secret")]
    secret: String,
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    #[arg(long)]
    idle_connections: Option<usize>,
    #[arg(long)]
    idle_room_size: Option<usize>,
    #[arg(long)]
    idle_settle_secs: Option<u64>,
    #[arg(long)]
    idle_hold_secs: Option<u64>,
    #[arg(long)]
    idle_activity_bytes: Option<usize>,
    #[arg(long)]
    rooms: Option<usize>,
    #[arg(long)]
    room_members: Option<usize>,
    #[arg(long)]
    room_rate: Option<f64>,
    /// Seconds of traffic in rooms and broadcast.
    #[arg(long)]
    duration: Option<u64>,
    #[arg(long)]
    broadcast_members: Option<usize>,
    #[arg(long)]
    broadcast_rate: Option<f64>,
    #[arg(long)]
    ramp_rooms: Option<usize>,
    #[arg(long)]
    ramp_members: Option<usize>,
    #[arg(long)]
    ramp_start: Option<f64>,
    #[arg(long)]
    ramp_factor: Option<f64>,
    #[arg(long)]
    ramp_steps: Option<usize>,
    #[arg(long)]
    ramp_step_secs: Option<u64>,
    #[arg(long)]
    limit_connections: Option<usize>,
    #[arg(long)]
    limit_secs: Option<u64>,
}

impl CompareArgs {
    fn sizes(&self) -> Sizes {
        let mut s = if self.full {
            Sizes::full()
        } else {
            Sizes::modest()
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { s.$f = v; } )* };
        }
        over!(
            idle_connections,
            idle_room_size,
            idle_settle_secs,
            idle_hold_secs,
            idle_activity_bytes,
            rooms,
            room_members,
            room_rate,
            broadcast_members,
            broadcast_rate,
            ramp_rooms,
            ramp_members,
            ramp_start,
            ramp_factor,
            ramp_steps,
            ramp_step_secs,
            limit_connections,
            limit_secs
        );
        if let Some(d) = self.duration {
            s.duration_secs = d;
        }
        s
    }
}

fn finish(run: RunReport, output: &Output) -> anyhow::Result<()> {
    println!("{}", report::table(&run));
    if let Some(p) = &output.out {
        std::fs::write(p, serde_json::to_string_pretty(&run)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(dir) = &output.svg_dir {
        std::fs::create_dir_all(dir)?;
        let one = Comparison {
            date: run.started_at.clone(),
            command: String::new(),
            machine: Default::default(),
            sizes: Sizes::modest(),
            notes: Vec::new(),
            runs: vec![run],
            rows: Vec::new(),
        };
        for (name, svg) in compare::charts(&one) {
            std::fs::write(dir.join(name), svg)?;
        }
    }
    Ok(())
}

fn wrap(output: &Output, scenario: &str, common: &Common, outcome: Outcome) -> RunReport {
    RunReport {
        system: output.system.clone(),
        scenario: scenario.into(),
        started_at: report::now_rfc3339(),
        targets: common.targets.iter().map(|t| t.to_string()).collect(),
        outcome,
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let nofile = flowgate_loadtest::raise_nofile();
    match cli.command {
        Cmd::Idle {
            target,
            output,
            connections,
            room_size,
            settle_secs,
            hold_secs,
            pids,
            extra_pids,
            workers,
            activity_bytes,
        } => {
            let common = target.common();
            let per_proc = (nofile as usize).saturating_sub(300).max(100);
            let workers = if workers == 0 {
                connections.div_ceil(per_proc).max(1)
            } else {
                workers
            };
            let r = idle::run(&IdleConfig {
                common: common.clone(),
                connections,
                room_size,
                settle: Duration::from_secs(settle_secs),
                hold: Duration::from_secs(hold_secs),
                pids,
                extra_pids,
                workers,
                worker_exe: None,
                activity_bytes,
            })
            .await?;
            finish(wrap(&output, "idle", &common, Outcome::Idle(r)), &output)
        }
        Cmd::Rooms {
            target,
            output,
            rooms,
            members,
            rate,
            duration,
        } => {
            let common = target.common();
            let cfg = RelayConfig::rooms(
                common.clone(),
                rooms,
                members,
                rate,
                Duration::from_secs(duration),
            );
            let r = relay::run(&cfg).await?;
            finish(wrap(&output, "rooms", &common, Outcome::Relay(r)), &output)
        }
        Cmd::Broadcast {
            target,
            output,
            members,
            rate,
            duration,
        } => {
            let common = target.common();
            let cfg = RelayConfig::broadcast(
                common.clone(),
                members,
                rate,
                Duration::from_secs(duration),
            );
            let r = relay::run(&cfg).await?;
            finish(
                wrap(&output, "broadcast", &common, Outcome::Relay(r)),
                &output,
            )
        }
        Cmd::Ramp {
            target,
            output,
            rooms,
            members,
            start_rate,
            factor,
            max_steps,
            step_secs,
            p99_limit_ms,
        } => {
            let common = target.common();
            let mut cfg = RelayConfig::ramp(
                common.clone(),
                rooms,
                members,
                start_rate,
                factor,
                max_steps,
                Duration::from_secs(step_secs),
            );
            cfg.p99_limit_ms = p99_limit_ms;
            let r = relay::run(&cfg).await?;
            finish(wrap(&output, "ramp", &common, Outcome::Relay(r)), &output)
        }
        Cmd::Limit {
            target,
            output,
            connections,
            window,
            duration,
        } => {
            let common = target.common();
            let r = limit::run(&LimitConfig {
                common: common.clone(),
                connections,
                window,
                duration: Duration::from_secs(duration),
                warmup: Duration::from_millis(1500),
            })
            .await?;
            finish(wrap(&output, "limit", &common, Outcome::Limit(r)), &output)
        }
        Cmd::Compare(args) => {
            let out_dir = args.out_dir.clone().unwrap_or_else(|| {
                let stamp = report::now_rfc3339().replace([':', '-'], "");
                PathBuf::from("loadtest/results").join(stamp.get(..15).unwrap_or(&stamp))
            });
            let cfg = CompareConfig {
                out_dir: out_dir.clone(),
                flowgate: System::Flowgate {
                    bin: std::fs::canonicalize(&args.flowgate_bin).with_context(|| {
                        format!(
                            "{} (build it with cargo build --release -p flowgate-gateway)",
                            args.flowgate_bin.display()
                        )
                    })?,
                },
                baseline: System::Baseline {
                    dir: std::fs::canonicalize(&args.baseline_dir)
                        .with_context(|| args.baseline_dir.display().to_string())?,
                    node: args.node.clone(),
                },
                redis_bin: args.redis_server.clone(),
                nodes: args.nodes,
                source_ips: args.source_ips.clone(),
                scenarios: args.scenarios.clone(),
                secret: args.secret.clone(),
                sizes: args.sizes(),
                connect_concurrency: args.connect_concurrency,
                command: std::env::args().collect::<Vec<_>>().join(" "),
            };
            eprintln!("results go to {}", out_dir.display());
            tokio::select! {
                r = compare::run(&cfg) => { r?; }
                _ = shutdown_signal() => anyhow::bail!("interrupted; stopping every process started"),
            }
            eprintln!("results in {}", out_dir.display());
            Ok(())
        }
        Cmd::Render {
            comparison,
            out_dir,
        } => {
            let cmp: Comparison = serde_json::from_str(&std::fs::read_to_string(&comparison)?)?;
            let dir = out_dir.unwrap_or_else(|| {
                comparison
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."))
            });
            std::fs::create_dir_all(&dir)?;
            compare::write_outputs(&dir, &cmp)?;
            print!("{}", report::rows_text(&cmp.rows));
            Ok(())
        }
        Cmd::Capacity(a) => {
            use flowgate_loadtest::capacity::{table, Costs, Workload};
            let costs = Costs {
                node_us_per_delivery: a.node_us_per_delivery,
                redis_us_per_event: a.redis_us_per_event,
                kib_per_connection: a.kib_per_connection,
                cores_per_node: a.cores_per_node,
                gib_per_node: a.gib_per_node,
                connections_per_node: a.connections_per_node,
                utilisation: a.utilisation,
                redis_core_budget: a.redis_core_budget,
                bytes_per_frame: a.bytes_per_frame,
            };
            let work = Workload {
                users: 0.0,
                room_size: a.room_size,
                events_per_user: a.events_per_user,
                active_share: a.active_share,
                cursor_rate: a.cursor_rate,
                persisted_share: a.persisted_share,
            };
            print!("{}", table(&costs, &work, &a.users));
            Ok(())
        }
        Cmd::IdleWorker {
            target,
            shard,
            shards,
            connections,
            room_size,
            activity_bytes,
            max_secs,
        } => {
            let cfg = IdleConfig {
                common: target.common(),
                connections,
                room_size,
                settle: Duration::ZERO,
                hold: Duration::ZERO,
                pids: Vec::new(),
                extra_pids: Vec::new(),
                workers: 1,
                worker_exe: None,
                activity_bytes,
            };
            idle::worker_main(&cfg, shard, shards, Duration::from_secs(max_secs)).await;
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flowgate-loadtest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowgate-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
