//! The `flowgate` binary: `serve` (default), `migrate`, `check-config`.
//! Configuration comes from environment variables (see the README).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flowgate_gateway::config::{Config, LogFormat};
use flowgate_gateway::App;

#[derive(Debug, Parser)]
#[command(
    name = "flowgate",
    version,
    about = "Horizontally scalable real-time collaboration gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a gateway node (the default).
    Serve,
    /// Apply the database migrations over DATABASE_DIRECT_URL.
    Migrate,
    /// Validate the configuration and exit.
    CheckConfig,
}

/// jemalloc gives the pages a burst freed back to the system (within its
/// 10 s decay), even between live allocations; glibc's malloc keeps them
/// once a connection allocated after the burst sits above them, so a burst
/// of large messages stayed in the RSS of every node for good
/// (`flowgate-loadtest idle --activity-bytes`, `docs/benchmarks.md`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Lets jemalloc return freed pages from a background thread of its own.
/// Without one it decays them only when the same arena allocates again, so
/// a node gone quiet after a burst kept the burst's pages (one node, 5,000
/// joined connections, 20 s after a 16 KiB event per room: 10.6 KiB of RSS
/// per connection without, 8.4 with, 7.6 before the burst; the command is
/// in `docs/benchmarks.md`).
fn purge_in_background() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "jemalloc background purging not enabled");
    }
}

/// Exit status for a configuration error (sysexits EX_CONFIG).
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Some(Command::Migrate)) {
        return migrate();
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flowgate: configuration error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    init_tracing(config.log_format);
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => match check(config.clone()) {
            Ok(_) => {
                println!(
                    "configuration ok: listen {}, node {}, engine {}, access {:?}",
                    config.listen,
                    config.node_id,
                    if config.redis_url.is_some() {
                        "redis"
                    } else {
                        "memory"
                    },
                    config.access
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("flowgate: configuration error: {e:#}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Migrate => unreachable!("handled before the configuration is read"),
        Command::Serve => {
            purge_in_background();
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = config.worker_threads {
                builder.worker_threads(n);
            }
            let rt = match runtime(builder) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "flowgate stopped on an error");
                    eprintln!("flowgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("flowgate: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

/// `flowgate migrate`: needs only `DATABASE_DIRECT_URL` (Postgres itself,
/// never PgBouncer).
fn migrate() -> ExitCode {
    // The node's log format, so a migration job's lines reach the same
    // log pipeline; anything but `json` is text here (migrate reads no
    // other configuration, so it does not refuse what serve would).
    let format = match std::env::var("FLOWGATE_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    };
    init_tracing(format);
    let Some(url) = std::env::var("DATABASE_DIRECT_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("flowgate: configuration error: DATABASE_DIRECT_URL: not set (migrations run on a direct connection, not through PgBouncer)");
        return ExitCode::from(EX_CONFIG);
    };
    let rt = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(flowgate_store::migrate(&url)) {
        Ok(applied) if applied.is_empty() => {
            println!(
                "schema is up to date (version {})",
                flowgate_store::latest_migration()
            );
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            println!("applied migrations {applied:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flowgate: migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the node's relay table and keys without starting it.
fn check(config: Config) -> anyhow::Result<()> {
    let mut config = config;
    // Reachability of Redis and Postgres is a runtime matter, not a
    // configuration one.
    config.redis_url = None;
    config.database_url = None;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(App::new(config, None)).map(|_| ())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let app = App::new(config, None).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    flowgate_gateway::serve(app, listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}
