//! A real Sentinel setup: a master, a replica of it, and three sentinels
//! (`redis-server --sentinel`) watching the master as `main` with a quorum
//! of two and a one-second down-after, so a killed master is replaced in
//! a few seconds.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::procs::{find_program, free_port, wait_for_port, RedisServer, TempDir};

/// The name of the master set the sentinels watch.
pub const SERVICE: &str = "main";

/// One `redis-server --sentinel` process.
#[derive(Debug)]
struct Sentinel {
    port: u16,
    child: Child,
    _dir: TempDir,
}

impl Sentinel {
    fn start(master_port: u16) -> anyhow::Result<Self> {
        let dir = TempDir::new("sentinel")?;
        let port = free_port()?;
        let conf = dir.path().join("sentinel.conf");
        // Sentinel rewrites its configuration file: it must be its own.
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {SERVICE} 1000\n\
                 sentinel failover-timeout {SERVICE} 5000\n\
                 sentinel parallel-syncs {SERVICE} 1\n",
                dir.path().display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("sentinel.log"))?;
        let child = Command::new(find_program("redis-server")?)
            .arg(&conf)
            .arg("--sentinel")
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting redis-server --sentinel")?;
        wait_for_port(port, Duration::from_secs(10))?;
        Ok(Sentinel {
            port,
            child,
            _dir: dir,
        })
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Master, replica and three sentinels.
#[derive(Debug)]
pub struct SentinelSetup {
    /// The first master.
    pub master: RedisServer,
    /// Its replica, the one promoted when the master dies.
    pub replica: RedisServer,
    sentinels: Vec<Sentinel>,
}

impl SentinelSetup {
    /// Starts everything and waits until the replica is in sync and the
    /// sentinels know it and each other (a failover needs all three).
    pub fn start() -> anyhow::Result<Self> {
        let master = RedisServer::start()?;
        let replica = RedisServer::start_with(
            free_port()?,
            vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.port.to_string(),
            ],
        )?;
        let sentinels = (0..3)
            .map(|_| Sentinel::start(master.port))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let setup = SentinelSetup {
            master,
            replica,
            sentinels,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = setup.sentinels.iter().all(|s| {
                setup
                    .ask(s.port, &["sentinel", "master", SERVICE])
                    .map(|m| {
                        let v: Vec<&str> = m.lines().collect();
                        let field = |k: &str| {
                            v.iter()
                                .position(|l| *l == k)
                                .and_then(|i| v.get(i + 1))
                                .and_then(|x| x.parse::<u32>().ok())
                                .unwrap_or(0)
                        };
                        field("num-slaves") >= 1 && field("num-other-sentinels") >= 2
                    })
                    .unwrap_or(false)
            });
            // A replica that never finished its first sync is not one the
            // sentinels would promote.
            let synced = setup
                .replica
                .cli(&["info", "replication"])
                .map(|i| i.contains("master_link_status:up"))
                .unwrap_or(false);
            if ready && synced {
                return Ok(setup);
            }
            if Instant::now() > deadline {
                bail!("the sentinels did not discover the replica and each other");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ask(&self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(find_program("redis-cli")?)
            .args(["-p", &port.to_string()])
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

    /// `redis-sentinel://first?sentinelServiceName=main&node=…`.
    pub fn url(&self) -> String {
        let mut ports = self.sentinels.iter().map(|s| s.port);
        let first = ports.next().unwrap_or_default();
        let nodes: String = ports.map(|p| format!("&node=127.0.0.1:{p}")).collect();
        format!("redis-sentinel://127.0.0.1:{first}?sentinelServiceName={SERVICE}{nodes}")
    }

    /// The master's port according to the first live sentinel.
    pub fn master_port(&self) -> anyhow::Result<u16> {
        for s in &self.sentinels {
            if let Ok(out) = self.ask(s.port, &["sentinel", "get-master-addr-by-name", SERVICE]) {
                if let Some(p) = out.lines().nth(1) {
                    return Ok(p.trim().parse()?);
                }
            }
        }
        bail!("no sentinel answers")
    }

    /// Waits until the sentinels name the replica as the master and it
    /// accepts writes.
    pub fn wait_failover(&self, wait: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            if self.master_port().ok() == Some(self.replica.port)
                && self
                    .replica
                    .cli(&["role"])
                    .map(|r| r.starts_with("master"))
                    .unwrap_or(false)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the sentinels did not promote the replica in {wait:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
