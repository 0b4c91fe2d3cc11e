//! Real dependencies as child processes: `redis-server` (and, through the
//! same helpers, other daemons), on free loopback ports in temporary
//! directories, stopped when dropped. Nothing here touches a system-wide
//! instance or a fixed port.

use std::net::TcpListener as StdListener;
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
}

impl RedisServer {
    /// Starts Redis on a free port, without persistence.
    pub fn start() -> anyhow::Result<Self> {
        let mut r = RedisServer {
            port: free_port()?,
            dir: TempDir::new("redis")?,
            child: None,
        };
        r.spawn()?;
        Ok(r)
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
