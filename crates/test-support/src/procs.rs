//! Real dependencies as child processes: `redis-server` (and, through the
//! same helpers, other daemons), on free loopback ports in temporary
//! directories, stopped when dropped. Nothing here touches a system-wide
//! instance or a fixed port.

use std::net::TcpListener as StdListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `flowgate-<what>-<pid>-<n>`.
    pub fn new(what: &str) -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "flowgate-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Finds a program on PATH or in the usual Debian places.
pub fn find_program(name: &str) -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} not found: run scripts/deps.sh to install the test dependencies")
        })
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, wait: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port} after {wait:?}")
}

/// A `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// More `redis-server` arguments (cluster mode, TLS, replication).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts Redis on a free port, without persistence.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(free_port()?, Vec::new())
    }

    /// Starts Redis with more arguments; `port` is where it is awaited
    /// (the TLS port when the arguments set `--port 0 --tls-port …`).
    pub fn start_with(port: u16, extra: Vec<String>) -> anyhow::Result<Self> {
        let mut r = RedisServer {
            port,
            dir: TempDir::new("redis")?,
            child: None,
            extra,
        };
        r.spawn()?;
        Ok(r)
    }

    /// Its working directory (for cluster and config files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = find_program("redis-server")?;
        let log = std::fs::File::create(self.dir.path().join("redis.log"))?;
        let child = Command::new(bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &self.dir.path().display().to_string(),
            ])
            .args(&self.extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10))
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data is gone: no persistence).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    /// Runs a command with `redis-cli` and returns its output.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(find_program("redis-cli")?)
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "redis-cli {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `flowgate` binary running as a child process (for signals and
/// `kill -9`), killed on drop if still running.
#[derive(Debug)]
pub struct NodeProcess {
    /// The child.
    pub child: Child,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
}

impl NodeProcess {
    /// Starts `bin serve` with a clean environment plus `envs` (HOST,
    /// PORT=0, JSON logs and the test secret are preset) and waits for its
    /// `listening` log line.
    pub fn start(bin: &Path, envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        use std::io::{BufRead, BufReader};
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .env_clear()
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("JWT_ACCESS_TOKEN_SECRET", crate::SECRET)
            .env("FLOWGATE_SERVICE_TOKEN", crate::SERVICE_TOKEN)
            .env("FLOWGATE_LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting flowgate")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("\"message\":\"listening\"") {
                    let addr = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| v["fields"]["addr"].as_str()?.parse().ok());
                    if let Some(addr) = addr {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(addr) => Ok(NodeProcess { child, addr }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("flowgate did not report listening")
            }
        }
    }

    /// `ws://…/socket.io/?EIO=4&transport=websocket`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/socket.io/?EIO=4&transport=websocket", self.addr)
    }

    /// Sends a signal by PID (`TERM`, `KILL`, …).
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{sig} failed");
        }
        Ok(())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy with the project's `deploy/haproxy.cfg` in front of three nodes.
#[derive(Debug)]
pub struct HaProxy {
    /// The load balancer's port on 127.0.0.1.
    pub port: u16,
    child: Child,
    _dir: TempDir,
}

impl HaProxy {
    /// Starts HAProxy balancing over the three node ports.
    pub fn start(nodes: [u16; 3]) -> anyhow::Result<Self> {
        Self::start_with(nodes, &[])
    }

    /// Starts HAProxy round-robin, every request to the next node, with no
    /// stickiness (`LB_ROUNDROBIN` in `deploy/haproxy.cfg`).
    pub fn round_robin(nodes: [u16; 3]) -> anyhow::Result<Self> {
        Self::start_with(nodes, &[("LB_ROUNDROBIN", "1")])
    }

    /// Starts HAProxy with extra variables for `deploy/haproxy.cfg`.
    pub fn start_with(nodes: [u16; 3], vars: &[(&str, &str)]) -> anyhow::Result<Self> {
        let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/haproxy.cfg");
        let dir = TempDir::new("haproxy")?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("haproxy.log"))?;
        let child = Command::new(find_program("haproxy")?)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .env("LB_PORT", port.to_string())
            .env("STATS_PORT", free_port()?.to_string())
            .env("NODE1_PORT", nodes[0].to_string())
            .env("NODE2_PORT", nodes[1].to_string())
            .env("NODE3_PORT", nodes[2].to_string())
            .envs(vars.iter().copied())
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting haproxy")?;
        wait_for_port(port, Duration::from_secs(10))?;
        Ok(HaProxy {
            port,
            child,
            _dir: dir,
        })
    }

    /// The load balancer's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The Engine.IO URL through the load balancer.
    pub fn ws_url(&self) -> String {
        format!(
            "ws://127.0.0.1:{}/socket.io/?EIO=4&transport=websocket",
            self.port
        )
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The uid and gid of the unprivileged `postgres` system user: PostgreSQL
/// and PgBouncer refuse to run as root.
fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        if !out.status.success() {
            bail!("no postgres system user: run scripts/deps.sh");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// A real PostgreSQL 15 (initdb in a temp dir) with a real PgBouncer in
/// transaction mode in front of it, configured from `deploy/pgbouncer.ini`.
#[derive(Debug)]
pub struct PgStack {
    /// Postgres' port.
    pub pg_port: u16,
    /// PgBouncer's port.
    pub bouncer_port: u16,
    dir: TempDir,
    postgres: Option<Child>,
    bouncer: Option<Child>,
}

impl PgStack {
    /// initdb, start Postgres, create the `flowgate` role and database,
    /// start PgBouncer.
    pub fn start() -> anyhow::Result<Self> {
        let (uid, gid) = postgres_ids()?;
        let dir = TempDir::new("pg")?;
        let chown = |p: &Path| -> anyhow::Result<()> {
            let ok = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(p)
                .status()?
                .success();
            if !ok {
                bail!("chown {}", p.display());
            }
            Ok(())
        };
        chown(dir.path())?;
        let data = dir.path().join("data");
        let out = Command::new(format!("{PG_BIN}/initdb"))
            .args([
                "-D",
                &data.display().to_string(),
                "-U",
                "postgres",
                "--auth-local=trust",
            ])
            .args(["--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8"])
            .uid(uid)
            .gid(gid)
            .output()
            .context("initdb (run scripts/deps.sh to install PostgreSQL 15)")?;
        if !out.status.success() {
            bail!("initdb: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut stack = PgStack {
            pg_port: free_port()?,
            bouncer_port: free_port()?,
            dir,
            postgres: None,
            bouncer: None,
        };
        stack.start_postgres()?;
        stack.psql("CREATE ROLE flowgate LOGIN PASSWORD 'flowgate'", "postgres")?;
        stack.psql("CREATE DATABASE flowgate OWNER flowgate", "postgres")?;
        let ini = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/pgbouncer.ini"),
        )?;
        let d = stack.dir.path().display().to_string();
        let ini: String = ini
            .lines()
            .map(|l| {
                let key = l.split('=').next().unwrap_or("").trim();
                match key {
                    "flowgate" => format!(
                        "flowgate = host=127.0.0.1 port={} dbname=flowgate",
                        stack.pg_port
                    ),
                    "listen_addr" => "listen_addr = 127.0.0.1".to_owned(),
                    "listen_port" => format!("listen_port = {}", stack.bouncer_port),
                    "auth_file" => format!("auth_file = {d}/userlist.txt"),
                    "logfile" => format!("logfile = {d}/pgbouncer.log"),
                    "pidfile" => format!("pidfile = {d}/pgbouncer.pid"),
                    "unix_socket_dir" => "unix_socket_dir =".to_owned(),
                    _ => l.to_owned(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(stack.dir.path().join("pgbouncer.ini"), ini)?;
        std::fs::write(
            stack.dir.path().join("userlist.txt"),
            "\"flowgate\" \"flowgate\"\n",
        )?;
        chown(stack.dir.path())?;
        stack.start_bouncer()?;
        Ok(stack)
    }

    /// Its directory (owned by `postgres`): data, PgBouncer's ini.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs SQL as the superuser over the Unix socket.
    pub fn psql(&self, sql: &str, db: &str) -> anyhow::Result<String> {
        let out = Command::new(format!("{PG_BIN}/psql"))
            .args(["-h", &self.dir.path().display().to_string()])
            .args(["-p", &self.pg_port.to_string(), "-U", "postgres", "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts (or restarts) Postgres on its port.
    pub fn start_postgres(&mut self) -> anyhow::Result<()> {
        let (uid, gid) = postgres_ids()?;
        let d = self.dir.path().display().to_string();
        let log = std::fs::File::create(self.dir.path().join("postgres.log"))?;
        let child = Command::new(format!("{PG_BIN}/postgres"))
            .args([
                "-D",
                &format!("{d}/data"),
                "-p",
                &self.pg_port.to_string(),
                "-k",
                &d,
            ])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=100"])
            .uid(uid)
            .gid(gid)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting postgres")?;
        self.postgres = Some(child);
        wait_for_port(self.pg_port, Duration::from_secs(20))?;
        // Accepting TCP is not accepting queries yet.
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.psql("SELECT 1", "postgres").is_err() {
            if Instant::now() > deadline {
                bail!("postgres does not answer");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts (or restarts) PgBouncer on its port.
    pub fn start_bouncer(&mut self) -> anyhow::Result<()> {
        let (uid, gid) = postgres_ids()?;
        let bin = find_program("pgbouncer")?;
        let ini = self.dir.path().join("pgbouncer.ini");
        // PgBouncer wants more open files than the default soft limit for
        // its max_client_conn; raise it up to the hard limit.
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 4096 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; exec {} {}",
                bin.display(),
                ini.display()
            ))
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pgbouncer")?;
        self.bouncer = Some(child);
        wait_for_port(self.bouncer_port, Duration::from_secs(10))
    }

    /// Stops PgBouncer (SIGKILL: an outage, not a shutdown).
    pub fn stop_bouncer(&mut self) {
        if let Some(mut c) = self.bouncer.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) PgBouncer: a stall, not a
    /// refusal — connections stay open and nothing answers.
    pub fn freeze_bouncer(&self, frozen: bool) {
        if let Some(c) = &self.bouncer {
            let sig = if frozen { "-STOP" } else { "-CONT" };
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// Stops Postgres (fast shutdown, as an operator would).
    pub fn stop_postgres(&mut self) {
        if let Some(mut c) = self.postgres.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Through PgBouncer: what a node's `DATABASE_URL` is.
    pub fn bouncer_url(&self) -> String {
        format!(
            "postgres://flowgate:flowgate@127.0.0.1:{}/flowgate",
            self.bouncer_port
        )
    }

    /// Straight to Postgres: what `flowgate migrate` uses.
    pub fn direct_url(&self) -> String {
        format!(
            "postgres://flowgate:flowgate@127.0.0.1:{}/flowgate",
            self.pg_port
        )
    }
}

impl Drop for PgStack {
    fn drop(&mut self) {
        self.stop_bouncer();
        self.stop_postgres();
    }
}
