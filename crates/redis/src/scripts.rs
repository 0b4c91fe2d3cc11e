//! The Lua scripts of the Redis engine. Each touches only keys of one hash
//! tag (one room, or one user), so it runs atomically on a Redis Cluster
//! too. Time comes from Redis `TIME`, never from a node's clock.
//! [`Scripts`] holds them loaded, each with its SHA, so calls use
//! `EVALSHA` and send the source only when Redis does not know it.

use fred::types::scripts::Script;

/// The engine's scripts, built once at start.
pub(crate) struct Scripts {
    pub(crate) publish: Script,
    pub(crate) join: Script,
    pub(crate) members: Script,
    pub(crate) leave: Script,
    pub(crate) refresh: Script,
    pub(crate) heartbeat: Script,
    pub(crate) dead_nodes: Script,
    pub(crate) gcra: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            publish: Script::from_lua(PUBLISH),
            join: Script::from_lua(presence_join()),
            members: Script::from_lua(presence_members()),
            leave: Script::from_lua(PRESENCE_LEAVE),
            refresh: Script::from_lua(PRESENCE_REFRESH),
            heartbeat: Script::from_lua(HEARTBEAT),
            dead_nodes: Script::from_lua(DEAD_NODES),
            gcra: Script::from_lua(GCRA),
        }
    }
}

/// Appends a room event to the room's stream and publishes it on the
/// room's shard channel in one atomic step, so offsets and delivery order
/// agree. KEYS: stream, channel. ARGV: message JSON, MAXLEN, TTL (ms).
/// Returns the offset (the stream id).
pub(crate) const PUBLISH: &str = r#"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SPUBLISH', KEYS[2], id .. ' ' .. ARGV[1])
return id
"#;

/// Redis time in milliseconds, as `now`.
const NOW_MS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// Drops the sessions of KEYS[1]/KEYS[2] whose expiry passed (a leave that
/// failed, a node reaped while its set was lost) so they do not pile up,
/// then returns those whose expiry is after `now` (HMGET in chunks: Lua's
/// unpack has a small stack limit).
const LIVE_MEMBERS: &str = r#"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, 500)
for _, sid in ipairs(expired) do
  redis.call('HDEL', KEYS[1], sid)
  redis.call('ZREM', KEYS[2], sid)
end
local sids = redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')
local out = {}
for i = 1, #sids, 500 do
  local chunk = {}
  for j = i, math.min(i + 499, #sids) do chunk[#chunk + 1] = sids[j] end
  local vals = redis.call('HMGET', KEYS[1], unpack(chunk))
  for _, v in ipairs(vals) do if v then out[#out + 1] = v end end
end
return out
"#;

/// Adds (or re-adds) a session to a room's presence and, when ARGV[4] is
/// "1", returns the live sessions of the room.
/// KEYS: presence hash, expiry zset. ARGV: socket id, session JSON, TTL (ms),
/// want-members flag.
pub(crate) fn presence_join() -> String {
    format!(
        "{NOW_MS}{}{LIVE_MEMBERS}",
        r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
if ARGV[4] ~= '1' then return {} end
"#
    )
}

/// The live sessions of a room (those whose expiry is in the future).
/// KEYS: presence hash, expiry zset.
pub(crate) fn presence_members() -> String {
    format!("{NOW_MS}{LIVE_MEMBERS}")
}

/// Removes a session; returns its JSON, or nil if it was not there (so
/// exactly one caller emits `user:left` for it).
/// KEYS: presence hash, expiry zset. ARGV: socket id.
pub(crate) const PRESENCE_LEAVE: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return v
"#;

/// Extends the expiry of a node's sessions in one room; returns the socket
/// ids that are missing (lost in a Redis restart, or reaped while the node
/// was unreachable) so the node re-registers them.
/// KEYS: presence hash, expiry zset. ARGV: TTL (ms), socket ids…
pub(crate) const PRESENCE_REFRESH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local missing = {}
for i = 2, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
return missing
"#;

/// Records a node heartbeat at Redis time. KEYS: nodes zset. ARGV: node id.
pub(crate) const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
return now
"#;

/// Nodes whose last heartbeat is older than ARGV[1] ms. KEYS: nodes zset.
pub(crate) const DEAD_NODES: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])))
"#;

/// GCRA: one theoretical arrival time (µs) per user. Allows a burst of
/// ARGV[2] events, then one every ARGV[1] µs. Returns 1 if allowed.
/// KEYS: the user's limiter key.
pub(crate) const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > burst * interval then return 0 end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 1
"#;
