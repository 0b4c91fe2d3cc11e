//! Every Redis key and channel name the engine uses, in one place. A room's
//! keys and channel share its hash tag (`{room}`) so one Lua script can
//! touch them atomically on a Redis Cluster; a user's limiter key is tagged
//! by the user.

/// The sorted set of node heartbeats (node id → last beat, Redis time).
pub(crate) const NODES_KEY: &str = "flowgate:nodes";
/// The durable queue between the room bus and the event-log writers.
pub(crate) const QUEUE_KEY: &str = "flowgate:eventlog";
/// The consumer group of the writers (one consumer per node).
pub(crate) const QUEUE_GROUP: &str = "writers";
/// A queue entry unacknowledged this long (its writer died) is taken over.
pub(crate) const QUEUE_CLAIM_IDLE_MS: u64 = 30_000;
/// Bytes of events in the queue (kept by the queue's scripts, for its cap).
/// Every queue key shares the queue's hash tag.
pub(crate) const QUEUE_BYTES_KEY: &str = "{flowgate:eventlog}:bytes";
/// Entries that can never be written, with the reason.
pub(crate) const QUEUE_DEAD_KEY: &str = "{flowgate:eventlog}:dead";
/// Approximate number of dead letters kept.
pub(crate) const QUEUE_DEAD_LEN: u64 = 10_000;
/// A flow's queued entries (entry id → offset time), for its watermark.
pub(crate) fn queue_pending_key(flow_id: &str) -> String {
    format!("{{flowgate:eventlog}}:pending:{flow_id}")
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
}
