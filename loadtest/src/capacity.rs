//! The capacity model of `docs/capacity.md`: from unit costs measured by
//! `compare` (CPU per delivery, Redis CPU per published event, memory per
//! connection) and a workload, how many nodes and Redis shards a number of
//! concurrent users needs, and what Postgres and the network carry.
//!
//! Pure arithmetic, so that the table in the docs can be reproduced and
//! its assumptions changed from the command line.

use std::fmt::Write as _;

/// Measured unit costs and the hardware they are spread over.
#[derive(Debug, Clone, PartialEq)]
pub struct Costs {
    /// Gateway CPU per delivered frame (µs).
    pub node_us_per_delivery: f64,
    /// Redis CPU per published event (µs), the fan-out to nodes included.
    pub redis_us_per_event: f64,
    /// Gateway memory per connection (KiB).
    pub kib_per_connection: f64,
    /// Cores per node.
    pub cores_per_node: f64,
    /// Memory per node (GiB).
    pub gib_per_node: f64,
    /// Connections one node may hold (open files, kernel memory).
    pub connections_per_node: f64,
    /// Share of a node's CPU and memory planned for use (headroom for
    /// bursts and for a failed node's clients).
    pub utilisation: f64,
    /// Share of one core a Redis shard may spend (Redis runs commands on
    /// one thread).
    pub redis_core_budget: f64,
    /// Bytes on the wire per delivered frame (payload and framing).
    pub bytes_per_frame: f64,
}

/// What the users do.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Concurrent users (one connection each).
    pub users: f64,
    /// Members per flow room.
    pub room_size: f64,
    /// Non-volatile events per second per user.
    pub events_per_user: f64,
    /// Share of users moving their cursor at a time.
    pub active_share: f64,
    /// Cursor updates per second per active user (volatile).
    pub cursor_rate: f64,
    /// Share of non-volatile events the relay table persists to Postgres.
    pub persisted_share: f64,
}

/// The answer for one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub published_per_sec: f64,
    pub deliveries_per_sec: f64,
    pub nodes_by_cpu: u64,
    pub nodes_by_connections: u64,
    pub nodes_by_memory: u64,
    pub nodes: u64,
    pub redis_shards: u64,
    pub postgres_writes_per_sec: f64,
    pub egress_gbit_per_sec: f64,
}

fn ceil(x: f64) -> u64 {
    x.ceil().max(1.0) as u64
}

/// Sizes `w` on `c`.
pub fn plan(c: &Costs, w: &Workload) -> Plan {
    let per_user = w.events_per_user + w.active_share * w.cursor_rate;
    let published = w.users * per_user;
    // Every member but the sender gets each event.
    let deliveries = published * (w.room_size - 1.0).max(0.0);
    let cores = deliveries * c.node_us_per_delivery / 1e6;
    let nodes_by_cpu = ceil(cores / (c.cores_per_node * c.utilisation));
    let nodes_by_connections = ceil(w.users / (c.connections_per_node * c.utilisation));
    let gib = w.users * c.kib_per_connection / (1024.0 * 1024.0);
    let nodes_by_memory = ceil(gib / (c.gib_per_node * c.utilisation));
    let nodes = nodes_by_cpu.max(nodes_by_connections).max(nodes_by_memory);
    let redis_cores = published * c.redis_us_per_event / 1e6;
    Plan {
        published_per_sec: published,
        deliveries_per_sec: deliveries,
        nodes_by_cpu,
        nodes_by_connections,
        nodes_by_memory,
        nodes,
        redis_shards: ceil(redis_cores / c.redis_core_budget),
        postgres_writes_per_sec: w.users * w.events_per_user * w.persisted_share,
        egress_gbit_per_sec: deliveries * c.bytes_per_frame * 8.0 / 1e9,
    }
}

/// The markdown table of `docs/capacity.md`, one column per user count.
pub fn table(c: &Costs, w: &Workload, users: &[f64]) -> String {
    let plans: Vec<Plan> = users
        .iter()
        .map(|u| {
            plan(
                c,
                &Workload {
                    users: *u,
                    ..w.clone()
                },
            )
        })
        .collect();
    let mut out = String::from("| | ");
    out += &users
        .iter()
        .map(|u| format!("{} users", thousands(*u)))
        .collect::<Vec<_>>()
        .join(" | ");
    out += " |\n|---|";
    out += &"---:|".repeat(users.len());
    out.push('\n');
    let rows: [Row; 9] = [
        ("published events/s", |p| thousands(p.published_per_sec)),
        ("deliveries/s", |p| thousands(p.deliveries_per_sec)),
        ("nodes for CPU", |p| p.nodes_by_cpu.to_string()),
        ("nodes for connections", |p| {
            p.nodes_by_connections.to_string()
        }),
        ("nodes for memory", |p| p.nodes_by_memory.to_string()),
        ("**nodes**", |p| format!("**{}**", p.nodes)),
        ("**Redis shards** (CPU)", |p| {
            format!("**{}**", p.redis_shards)
        }),
        ("Postgres writes/s", |p| {
            thousands(p.postgres_writes_per_sec)
        }),
        ("egress Gbit/s", |p| format!("{:.2}", p.egress_gbit_per_sec)),
    ];
    for (name, f) in rows {
        let _ = writeln!(
            out,
            "| {name} | {} |",
            plans.iter().map(f).collect::<Vec<_>>().join(" | ")
        );
    }
    out
}

/// A table row: its name and how a plan gives its cell.
type Row = (&'static str, fn(&Plan) -> String);

fn thousands(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> Costs {
        Costs {
            node_us_per_delivery: 20.0,
            redis_us_per_event: 40.0,
            kib_per_connection: 16.0,
            cores_per_node: 4.0,
            gib_per_node: 8.0,
            connections_per_node: 50_000.0,
            utilisation: 0.5,
            redis_core_budget: 0.5,
            bytes_per_frame: 200.0,
        }
    }

    fn work(users: f64) -> Workload {
        Workload {
            users,
            room_size: 10.0,
            events_per_user: 2.0,
            active_share: 0.1,
            cursor_rate: 10.0,
            persisted_share: 0.5,
        }
    }

    #[test]
    fn deliveries_follow_users_and_rooms() {
        let p = plan(&costs(), &work(1000.0));
        // (2 + 0.1 × 10) events/s × 1000 users, each to 9 others.
        assert_eq!(p.published_per_sec, 3000.0);
        assert_eq!(p.deliveries_per_sec, 27_000.0);
        let p2 = plan(&costs(), &work(2000.0));
        assert_eq!(p2.deliveries_per_sec, 2.0 * p.deliveries_per_sec);
        assert_eq!(p.postgres_writes_per_sec, 1000.0);
    }

    #[test]
    fn nodes_are_the_largest_of_the_three_constraints() {
        let c = costs();
        let p = plan(&c, &work(100_000.0));
        // CPU: 2.7 M deliveries/s × 20 µs = 54 cores / (4 × 0.5) = 27.
        assert_eq!(p.nodes_by_cpu, 27);
        // Connections: 100 k / 25 k = 4; memory: 1.53 GiB / 4 GiB = 1.
        assert_eq!(p.nodes_by_connections, 4);
        assert_eq!(p.nodes_by_memory, 1);
        assert_eq!(p.nodes, 27);
        let lean = Costs {
            node_us_per_delivery: 0.1,
            ..c
        };
        assert_eq!(
            plan(&lean, &work(100_000.0)).nodes,
            4,
            "then connections decide"
        );
        // Redis: 300 k events/s × 40 µs = 12 cores / 0.5 = 24 shards.
        assert_eq!(p.redis_shards, 24);
    }

    #[test]
    fn the_table_has_a_column_per_user_count() {
        let t = table(&costs(), &work(0.0), &[100_000.0, 1_000_000.0]);
        assert!(
            t.starts_with("| | 100,000 users | 1,000,000 users |"),
            "{t}"
        );
        assert!(t.contains("| **nodes** | **27** | **270** |"), "{t}");
    }
}
