//! Every Redis key and channel name the engine uses, in one place. A room's
//! keys and channel share its hash tag (`{room}`) so one Lua script can
//! touch them atomically on a Redis Cluster; a user's limiter key is tagged
//! by the user.

/// The sorted set of node heartbeats (node id → last beat, Redis time).
pub(crate) const NODES_KEY: &str = "flowgate:nodes";
/// The consumer group of the event-log writers, on every queue stream (one
/// consumer per node).
pub(crate) const QUEUE_GROUP: &str = "writers";
/// A queue entry unacknowledged this long (its writer died) is taken over.
pub(crate) const QUEUE_CLAIM_IDLE_MS: u64 = 30_000;
/// Approximate number of dead letters kept, over all queue streams.
pub(crate) const QUEUE_DEAD_LEN: u64 = 10_000;
/// Every shard count a node has queued under (a set): writers drain the
/// shards of all of them and a flow's watermark looks at its shard under
/// each, so changing `FLOWGATE_EVENTLOG_SHARDS` strands nothing.
pub(crate) const QUEUE_SHARD_COUNTS_KEY: &str = "flowgate:eventlog:shard-counts";

/// One stream of the durable event-log queue with the keys that go with
/// it, all under one hash tag so that each queue script touches one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum QueueShard {
    /// The single stream `flowgate:eventlog` of the releases before the
    /// queue was sharded. Nothing queues into it any more, but the writers
    /// drain what an older node left (or still queues, during a rolling
    /// deploy). Its other keys are tagged `{flowgate:eventlog}`, the slot of
    /// the stream's whole name.
    Legacy,
    /// Shard `k`: `{flowgate:eventlog:k}` and its keys.
    Shard(u32),
}

impl QueueShard {
    /// The hash tag of the shard's keys (without the braces).
    fn tag(self) -> String {
        match self {
            QueueShard::Legacy => "flowgate:eventlog".to_owned(),
            QueueShard::Shard(k) => format!("flowgate:eventlog:{k}"),
        }
    }
    /// The stream of queued events.
    pub(crate) fn stream(self) -> String {
        match self {
            // The name the first releases used, which must not change.
            QueueShard::Legacy => self.tag(),
            QueueShard::Shard(_) => format!("{{{}}}", self.tag()),
        }
    }
    /// Bytes of events in the stream (kept by the scripts, for the cap).
    pub(crate) fn bytes(self) -> String {
        format!("{{{}}}:bytes", self.tag())
    }
    /// Entries that can never be written, with the reason.
    pub(crate) fn dead(self) -> String {
        format!("{{{}}}:dead", self.tag())
    }
    /// A flow's entries in the stream (entry id → offset time), for its
    /// watermark.
    pub(crate) fn pending(self, flow_id: &str) -> String {
        format!("{{{}}}:pending:{flow_id}", self.tag())
    }
    /// The id the queue hands out for the stream entry `id`: `k/id`, so
    /// that `ack` finds the shard; a legacy entry keeps its bare id.
    pub(crate) fn entry_id(self, id: &str) -> String {
        match self {
            QueueShard::Legacy => id.to_owned(),
            QueueShard::Shard(k) => format!("{k}/{id}"),
        }
    }
    /// The shard and stream id of an id from [`QueueShard::entry_id`].
    pub(crate) fn of_entry_id(id: &str) -> Option<(QueueShard, &str)> {
        match id.split_once('/') {
            None => Some((QueueShard::Legacy, id)),
            Some((k, id)) => Some((QueueShard::Shard(k.parse().ok()?), id)),
        }
    }
}

/// The shard of a flow among `count`: FNV-1a of its id, a hash fixed here
/// (not the standard library's, which may change between Rust releases)
/// because every node of every version must put a flow in the same shard.
pub(crate) fn queue_shard_of(flow_id: &str, count: u32) -> QueueShard {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in flow_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    QueueShard::Shard((h % u64::from(count.max(1))) as u32)
}

/// The set of a node's sessions (`room\nsocket id`), so a survivor can
/// find them when the node dies.
pub(crate) fn node_sessions_key(node: &str) -> String {
    format!("flowgate:node:{node}:sessions")
}
/// The lock a survivor holds while it reaps a dead node.
pub(crate) fn reap_lock_key(node: &str) -> String {
    format!("flowgate:reap:{node}")
}
/// A room's event stream: the recovery log, its ids are the offsets.
pub(crate) fn stream_key(room: &str) -> String {
    format!("{{{room}}}:log")
}
/// A room's shard channel.
pub(crate) fn channel(room: &str) -> String {
    format!("{{{room}}}:bus")
}
pub(crate) fn room_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix('{')?.strip_suffix("}:bus")
}
/// A room's presence hash (socket id → session JSON), expiry sorted set
/// (socket id → expiry) and owner hash (socket id → `node/connection`),
/// in the order the presence scripts take them.
pub(crate) fn presence_keys(room: &str) -> Vec<String> {
    vec![
        format!("{{{room}}}:presence"),
        format!("{{{room}}}:presence:exp"),
        format!("{{{room}}}:presence:owner"),
    ]
}
/// A room's pod locks, in the order the lock scripts take them: locks
/// (pod → `{u, t, h}`: user, lock time, holding sockets), holder owners
/// (socket id → `node/connection`), holder expiries (socket id → expiry,
/// Redis time), and the generation of the room's locks (a random id that
/// changes only when Redis lost them).
pub(crate) fn lock_keys(room: &str) -> Vec<String> {
    vec![
        format!("{{{room}}}:locks"),
        format!("{{{room}}}:locks:holders"),
        format!("{{{room}}}:locks:exp"),
        format!("{{{room}}}:locks:epoch"),
    ]
}
/// Rooms with lock holders, scored by the earliest time one may expire (a
/// score may be early, never late): what the lock sweep visits.
pub(crate) const LOCKS_DUE_KEY: &str = "flowgate:locks:due";
/// Held by the node sweeping locks, for one heartbeat.
pub(crate) const LOCKS_SWEEP_KEY: &str = "flowgate:locks:sweep";
/// A recoverable session's record, tagged by its pid.
pub(crate) fn session_key(pid: &str) -> String {
    format!("flowgate:session:{{{pid}}}")
}
/// A user's GCRA state (theoretical arrival time).
pub(crate) fn limit_key(user_id: &str) -> String {
    format!("flowgate:limit:{{{user_id}}}")
}
/// The cached access decision of a user in a flow.
pub(crate) fn access_key(flow_id: &str, user_id: &str) -> String {
    format!("flowgate:access:{{flow:{flow_id}}}:{user_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_room_hash_tag() {
        assert_eq!(stream_key("flow:1"), "{flow:1}:log");
        assert_eq!(channel("flow:1"), "{flow:1}:bus");
        assert_eq!(room_of_channel("{flow:1}:bus"), Some("flow:1"));
        assert_eq!(room_of_channel("other"), None);
        for k in presence_keys("flow:1")
            .into_iter()
            .chain(lock_keys("flow:1"))
        {
            assert!(k.starts_with("{flow:1}"));
        }
    }

    #[test]
    fn queue_keys_share_their_shard_tag() {
        // The legacy stream keeps its name; its keys hash on it.
        let legacy = QueueShard::Legacy;
        assert_eq!(legacy.stream(), "flowgate:eventlog");
        assert_eq!(legacy.bytes(), "{flowgate:eventlog}:bytes");
        assert_eq!(legacy.dead(), "{flowgate:eventlog}:dead");
        assert_eq!(legacy.pending("f"), "{flowgate:eventlog}:pending:f");
        let s = QueueShard::Shard(7);
        for k in [s.stream(), s.bytes(), s.dead(), s.pending("f")] {
            assert!(k.starts_with("{flowgate:eventlog:7}"), "{k}");
        }
        for (shard, id) in [(s, "1-0"), (legacy, "2-5")] {
            let full = shard.entry_id(id);
            assert_eq!(QueueShard::of_entry_id(&full), Some((shard, id)));
        }
        assert_eq!(s.entry_id("1-0"), "7/1-0");
        assert_eq!(QueueShard::of_entry_id("x/1-0"), None);
    }

    #[test]
    fn flows_spread_over_the_shards_stably() {
        // Fixed values: a change of the hash would move queued flows.
        assert_eq!(queue_shard_of("", 16), QueueShard::Shard(5));
        assert_eq!(queue_shard_of("a", 16), QueueShard::Shard(12));
        assert_eq!(queue_shard_of("flow:42", 16), QueueShard::Shard(11));
        assert_eq!(queue_shard_of("flow", 1), QueueShard::Shard(0));
        assert_eq!(queue_shard_of("flow", 0), QueueShard::Shard(0));
        let mut used = std::collections::BTreeSet::new();
        for i in 0..200 {
            let QueueShard::Shard(k) = queue_shard_of(&format!("f{i}"), 16) else {
                unreachable!()
            };
            assert!(k < 16);
            used.insert(k);
        }
        assert_eq!(used.len(), 16, "200 flows use every shard");
    }
}
