//! A real Redis Cluster: six `redis-server` processes (three masters, three
//! replicas) joined by `redis-cli --cluster create`, with a short node
//! timeout so that a killed master's replica takes over in seconds; in
//! plaintext, or TLS-only (client connections, replication and the cluster
//! bus), as ElastiCache runs with in-transit encryption.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::procs::{find_program, free_port, RedisServer};
use crate::tls::TestCerts;

/// Six cluster nodes on loopback.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes, in creation order (masters first, as `--cluster create`
    /// assigns them).
    pub nodes: Vec<RedisServer>,
    /// `redis-cli`'s connection options (`--tls --cacert …` for TLS).
    cli_opts: Vec<String>,
    tls: bool,
}

/// `redis-cli OPTS -p port args…`, its trimmed output.
fn cli_with(opts: &[String], port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(find_program("redis-cli")?)
        .args(opts)
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
        Self::start_inner(None)
    }

    /// The same, TLS only: no plaintext port, TLS on the cluster bus and
    /// for replication, server certificates from `certs` (clients are not
    /// asked for one).
    pub fn start_tls(certs: &TestCerts) -> anyhow::Result<Self> {
        Self::start_inner(Some(certs))
    }

    fn start_inner(certs: Option<&TestCerts>) -> anyhow::Result<Self> {
        let cli_opts: Vec<String> = match certs {
            Some(c) => vec![
                "--tls".into(),
                "--cacert".into(),
                c.ca().display().to_string(),
            ],
            None => Vec::new(),
        };
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_port()?;
            let mut args = match certs {
                Some(c) => {
                    let mut a = c.redis_args(port, false);
                    a.extend(
                        ["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from),
                    );
                    // The cluster bus and replication are mutual TLS: a
                    // node dialling another presents a certificate for
                    // client authentication (the server one is for
                    // servers only, and the bus would never join).
                    a.extend([
                        "--tls-client-cert-file".into(),
                        c.client_cert().display().to_string(),
                        "--tls-client-key-file".into(),
                        c.client_key().display().to_string(),
                    ]);
                    a
                }
                None => Vec::new(),
            };
            args.extend([
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
            ]);
            nodes.push(RedisServer::start_with(port, args)?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        // `--cluster create` waits for the nodes to meet with no deadline
        // of its own (forever, when their bus cannot connect): coreutils'
        // timeout gives it one.
        let out = Command::new("timeout")
            .arg("60")
            .arg(find_program("redis-cli")?)
            .args(&cli_opts)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .context("redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cluster = RedisCluster {
            nodes,
            cli_opts,
            tls: certs.is_some(),
        };
        cluster.wait_ok(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// `redis-cluster://first?node=second&node=…`: the contract's form
    /// (`rediss-cluster://` for a TLS cluster).
    pub fn url(&self) -> String {
        let mut ports = self.nodes.iter().map(|n| n.port);
        let first = ports.next().unwrap_or_default();
        let rest: Vec<String> = ports.map(|p| format!("node=127.0.0.1:{p}")).collect();
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}-cluster://127.0.0.1:{first}?{}", rest.join("&"))
    }

    /// `redis-cli -p port args…` against this cluster's node on `port`.
    pub fn cli(&self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        cli_with(&self.cli_opts, port, args)
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
                    || (self
                        .cli(n.port, &["cluster", "info"])
                        .map(|i| i.contains("cluster_state:ok"))
                        .unwrap_or(false)
                        && self
                            .cli(n.port, &["info", "replication"])
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
        let slot: u16 = self.cli(any, &["cluster", "keyslot", key])?.parse()?;
        // `CLUSTER NODES`: id addr flags master-id ping pong epoch link slots…
        for line in self.cli(any, &["cluster", "nodes"])?.lines() {
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
                    .and_then(|p| self.cli(p, &["cluster", "nodes"]))
                    .unwrap_or_default();
                bail!("no replica took over {key}'s slot in {wait:?}:\n{nodes}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
