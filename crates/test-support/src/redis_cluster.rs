//! A real Redis Cluster: six `redis-server` processes (three masters, three
//! replicas) joined by `redis-cli --cluster create`, with a short node
//! timeout so that a killed master's replica takes over in seconds.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::procs::{find_program, free_port, RedisServer};

/// Six cluster nodes on loopback.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes, in creation order (masters first, as `--cluster create`
    /// assigns them).
    pub nodes: Vec<RedisServer>,
}

/// `redis-cli -p port args…`, its trimmed output.
fn cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
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

impl RedisCluster {
    /// Starts six nodes, creates the cluster and waits until every node
    /// says `cluster_state:ok` and every master has a replica.
    pub fn start() -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_port()?;
            nodes.push(RedisServer::start_with(
                port,
                vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    "nodes.conf".into(),
                    "--cluster-node-timeout".into(),
                    "1000".into(),
                    // The bus port would be port + 10000, which may be
                    // taken or out of range: pick a free one.
                    "--cluster-port".into(),
                    free_port()?.to_string(),
                ],
            )?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(find_program("redis-cli")?)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .context("redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// `redis-cluster://first?node=second&node=…`: the contract's form.
    pub fn url(&self) -> String {
        let mut ports = self.nodes.iter().map(|n| n.port);
        let first = ports.next().unwrap_or_default();
        let rest: Vec<String> = ports.map(|p| format!("node=127.0.0.1:{p}")).collect();
        format!("redis-cluster://127.0.0.1:{first}?{}", rest.join("&"))
    }

    /// A live node's port (for `redis-cli`).
    fn any_port(&self) -> anyhow::Result<u16> {
        self.nodes
            .iter()
            .find(|n| std::net::TcpStream::connect(("127.0.0.1", n.port)).is_ok())
            .map(|n| n.port)
            .context("no live cluster node")
    }

    /// Waits until every live node reports `cluster_state:ok` and every
    /// live replica is in sync with its master.
    pub fn wait_ok(&self, wait: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            // A replica that never finished its first sync does not stand
            // for election (its data counts as infinitely old): a master
            // killed before that would stay down.
            let ok = self.nodes.iter().all(|n| {
                std::net::TcpStream::connect(("127.0.0.1", n.port)).is_err()
                    || (cli(n.port, &["cluster", "info"])
                        .map(|i| i.contains("cluster_state:ok"))
                        .unwrap_or(false)
                        && cli(n.port, &["info", "replication"])
                            .map(|i| {
                                i.contains("role:master") || i.contains("master_link_status:up")
                            })
                            .unwrap_or(false))
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster did not reach cluster_state:ok in {wait:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The port of the master serving `key`'s slot now.
    pub fn master_of(&self, key: &str) -> anyhow::Result<u16> {
        let any = self.any_port()?;
        let slot: u16 = cli(any, &["cluster", "keyslot", key])?.parse()?;
        // `CLUSTER NODES`: id addr flags master-id ping pong epoch link slots…
        for line in cli(any, &["cluster", "nodes"])?.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
            });
            if serves {
                let port = f[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .context("node address")?;
                return Ok(port.parse()?);
            }
        }
        bail!("no live master serves slot {slot}")
    }

    /// Kills the node on `port` (SIGKILL: a crash).
    pub fn kill(&mut self, port: u16) -> anyhow::Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .context("no such node")?;
        node.stop();
        Ok(())
    }

    /// Waits until a live master other than `old` serves `key`'s slot
    /// (the replica took over) and the cluster is ok again; returns it.
    pub fn wait_failover(&self, key: &str, old: u16, wait: Duration) -> anyhow::Result<u16> {
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(port) = self.master_of(key) {
                if port != old {
                    self.wait_ok(deadline.saturating_duration_since(Instant::now()))?;
                    return Ok(port);
                }
            }
            if Instant::now() > deadline {
                let nodes = self
                    .any_port()
                    .and_then(|p| cli(p, &["cluster", "nodes"]))
                    .unwrap_or_default();
                bail!("no replica took over {key}'s slot in {wait:?}:\n{nodes}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
