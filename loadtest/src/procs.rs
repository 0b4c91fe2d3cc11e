//! Child processes for the comparison: one `redis-server`, and three
//! flowgate nodes or three Node baseline processes, each on a free
//! loopback port, logging into the run directory. Every process is stopped
//! by its own PID (SIGTERM, then SIGKILL after a grace period) when its
//! guard is dropped, and the PIDs alive are listed in `<dir>/pids` so a
//! wrapper script's EXIT trap can stop them if this process is killed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

static PIDS: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());

fn write_pidfile() {
    let pids = PIDS.lock().unwrap_or_else(|e| e.into_inner());
    let mut by_file: std::collections::BTreeMap<&Path, String> = Default::default();
    for (pid, file) in pids.iter() {
        by_file
            .entry(file.as_path())
            .or_default()
            .push_str(&format!("{pid}\n"));
    }
    for (file, text) in by_file {
        let _ = std::fs::write(file, text);
    }
}

/// A child process stopped on drop.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Option<Child>,
    pid: u32,
    pidfile: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr to `<dir>/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        let pidfile = dir.join("pids");
        PIDS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((pid, pidfile.clone()));
        write_pidfile();
        Ok(Proc {
            name: name.into(),
            child: Some(child),
            pid,
            pidfile,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fails if it has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(c) = &mut self.child {
            if let Some(st) = c.try_wait()? {
                bail!("{} exited: {st}", self.name);
            }
        }
        Ok(())
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        PIDS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(p, f)| !(*p == self.pid && *f == self.pidfile));
        write_pidfile();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// Waits until `port` accepts TCP connections.
pub fn wait_port(proc: &mut Proc, port: u16, wait: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        proc.check_running()?;
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!(
        "{} does not listen on port {port} after {wait:?}",
        proc.name
    )
}

/// Status of `GET path` (HTTP/1.1, `Connection: close`).
pub fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP response from {addr}"))
}

/// Which server the nodes run.
#[derive(Debug, Clone)]
pub enum System {
    /// The flowgate binary.
    Flowgate {
        /// Path of `flowgate`.
        bin: PathBuf,
    },
    /// `node server.mjs` in the baseline directory.
    Baseline {
        /// `loadtest/baseline`.
        dir: PathBuf,
        /// The `node` program.
        node: String,
    },
}

impl System {
    /// `flowgate` or `baseline`.
    pub fn label(&self) -> &'static str {
        match self {
            System::Flowgate { .. } => "flowgate",
            System::Baseline { .. } => "baseline",
        }
    }
}

/// Redis plus N nodes of one system.
#[derive(Debug)]
pub struct Cluster {
    /// Where the nodes listen.
    pub addrs: Vec<SocketAddr>,
    /// The nodes (stopped first on drop).
    pub nodes: Vec<Proc>,
    /// Redis.
    pub redis: Proc,
    /// Redis' port on 127.0.0.1.
    pub redis_port: u16,
}

impl Cluster {
    /// Starts `redis-server` and `n` nodes of `system` with
    /// `per_user_rate` events/s (and burst) per user, logging into `dir`.
    pub fn start(
        system: &System,
        redis_bin: &Path,
        n: usize,
        secret: &str,
        per_user_rate: u64,
        dir: &Path,
    ) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(dir)?;
        let redis_port = free_port()?;
        let mut cmd = Command::new(redis_bin);
        cmd.args([
            "--port",
            &redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxclients",
            "10000",
            "--dir",
            &dir.display().to_string(),
        ]);
        let mut redis = Proc::spawn("redis", cmd, dir)?;
        wait_port(&mut redis, redis_port, Duration::from_secs(10))?;
        let redis_url = format!("redis://127.0.0.1:{redis_port}");
        let rate = per_user_rate.to_string();
        // The nodes split the machine's cores, as the baseline's
        // single-threaded Node processes do: n multi-threaded runtimes on
        // fewer cores spend their time waking each other's idle workers.
        // FLOWGATE_WORKER_THREADS in the environment overrides it.
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let threads = std::env::var("FLOWGATE_WORKER_THREADS")
            .unwrap_or_else(|_| (cores / n.max(1)).max(1).to_string());
        let mut nodes = Vec::new();
        let mut addrs = Vec::new();
        for k in 1..=n {
            let port = free_port()?;
            let name = format!("{}-{k}", system.label());
            let mut cmd = match system {
                System::Flowgate { bin } => {
                    let mut c = Command::new(bin);
                    c.env("FLOWGATE_NODE_ID", format!("node{k}"))
                        .env("FLOWGATE_RATE_LIMIT_PER_SEC", &rate)
                        .env("FLOWGATE_RATE_LIMIT_BURST", &rate)
                        .env("FLOWGATE_LOG_FORMAT", "json")
                        .env("FLOWGATE_DRAIN_NOTICE_MS", "0")
                        .env("FLOWGATE_DRAIN_WINDOW_MS", "200")
                        .env("FLOWGATE_SHUTDOWN_DEADLINE_MS", "3000")
                        .env("FLOWGATE_MAX_CONNECTIONS", "200000")
                        .env("FLOWGATE_WORKER_THREADS", &threads)
                        .env("RUST_LOG", "warn");
                    c
                }
                System::Baseline { dir: bdir, node } => {
                    let mut c = Command::new(node);
                    c.arg("server.mjs")
                        .current_dir(bdir)
                        .env("RATE_LIMIT_PER_SEC", &rate)
                        .env("RATE_LIMIT_BURST", &rate)
                        .env("NODE_ENV", "production");
                    c
                }
            };
            cmd.env("HOST", "127.0.0.1")
                .env("PORT", port.to_string())
                .env("JWT_ACCESS_TOKEN_SECRET", secret)
                .env("REDIS_URL", &redis_url);
            let mut p = Proc::spawn(&name, cmd, dir)?;
            wait_port(&mut p, port, Duration::from_secs(30))?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + Duration::from_secs(15);
            while http_status(addr, "/health").unwrap_or(0) != 200 {
                p.check_running()?;
                if Instant::now() > deadline {
                    bail!("{name} is not healthy after 15 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            nodes.push(p);
            addrs.push(addr);
        }
        Ok(Cluster {
            addrs,
            nodes,
            redis,
            redis_port,
        })
    }

    /// PIDs of the nodes.
    pub fn node_pids(&self) -> Vec<u32> {
        self.nodes.iter().map(Proc::pid).collect()
    }

    /// Stops the nodes, then Redis.
    pub fn stop(mut self) {
        for n in &mut self.nodes {
            n.stop(Duration::from_secs(5));
        }
        self.redis.stop(Duration::from_secs(3));
    }
}
