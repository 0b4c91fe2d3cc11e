//! The Lua scripts of the Redis engine. Each touches only keys of one hash
//! tag (one room, or one user), so it runs atomically on a Redis Cluster
//! too. Time comes from Redis `TIME`, never from a node's clock.
//! [`Scripts`] holds them loaded, each with its SHA, so calls use
//! `EVALSHA` and send the source only when Redis does not know it.

use fred::types::scripts::Script;

use crate::lock_scripts::LockScripts;

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
    pub(crate) read_after: Script,
    pub(crate) node_alive: Script,
    pub(crate) session_save: Script,
    pub(crate) session_release: Script,
    pub(crate) locks: LockScripts,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            publish: Script::from_lua(publish()),
            join: Script::from_lua(presence_join()),
            members: Script::from_lua(presence_members()),
            leave: Script::from_lua(PRESENCE_LEAVE),
            refresh: Script::from_lua(PRESENCE_REFRESH),
            heartbeat: Script::from_lua(HEARTBEAT),
            dead_nodes: Script::from_lua(DEAD_NODES),
            gcra: Script::from_lua(GCRA),
            read_after: Script::from_lua(READ_AFTER),
            node_alive: Script::from_lua(NODE_ALIVE),
            session_save: Script::from_lua(SESSION_SAVE),
            session_release: Script::from_lua(SESSION_RELEASE),
            locks: LockScripts::new(),
        }
    }
}

/// Appends room events to their rooms' streams and publishes each on its
/// room's shard channel, in order, in one atomic step, so offsets and
/// delivery order agree; nothing happens past the deadline (all or
/// nothing). KEYS: stream and channel of each event, in turn (one room's,
/// or on one server any rooms'). ARGV: deadline (Redis ms), MAXLEN, TTL
/// (ms), format (`1`: the binary format, to which the channel's copy gets
/// `,"<offset>"]` appended — the end of the frame the publisher built;
/// `0`: `<offset> <json>`), then for each event its kind (`l`: logged;
/// `v`: volatile, only published, as is) and its message. Returns the
/// offsets (stream ids; empty for a volatile event), in order; if an append fails (Redis out of
/// memory), the offsets of the events before it and then `!<error>`: those
/// were published, that one and the rest were not. See `batches.rs`.
pub(crate) fn publish() -> String {
    PUBLISH.to_owned()
}

const PUBLISH: &str = r#"
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[1]) then
  return redis.error_reply('EXPIRED command arrived after its deadline')
end
local maxlen, ttl, binary = ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local ids, renewed = {}, {}
for i = 1, #KEYS / 2 do
  local stream, chan = KEYS[2 * i - 1], KEYS[2 * i]
  local kind, msg = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  if kind == 'v' then
    redis.call('SPUBLISH', chan, msg)
    ids[i] = ''
  else
    local id = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'm', msg)
    if type(id) == 'table' then
      ids[i] = '!' .. tostring(id.err)
      return ids
    end
    -- The idle expiry is renewed once half of it has run, not on every
    -- event: PTTL is a read, PEXPIRE a write that every replica and the
    -- AOF repeat. Once per stream and call.
    if not renewed[stream] then
      renewed[stream] = true
      if redis.call('PTTL', stream) < ttl / 2 then
        redis.call('PEXPIRE', stream, ttl)
      end
    end
    if binary then
      redis.call('SPUBLISH', chan, msg .. ',"' .. id .. '"]')
    else
      redis.call('SPUBLISH', chan, id .. ' ' .. msg)
    end
    ids[i] = id
  end
end
return ids
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
  redis.call('HDEL', KEYS[3], sid)
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

/// Adds (or takes over) a session in a room's presence, owned by ARGV[5],
/// and, when ARGV[4] is "1", returns the live sessions of the room. The
/// first element of the reply is "1" when the session was not listed.
/// KEYS: presence hash, expiry zset, owner hash. ARGV: socket id, session
/// JSON, TTL (ms), want-members flag, owner.
pub(crate) fn presence_join() -> String {
    format!(
        "{NOW_MS}{}{LIVE_MEMBERS}",
        r#"
local fresh = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
if ARGV[4] ~= '1' then return {tostring(fresh)} end
"#
    )
    .replace(
        "return out",
        "table.insert(out, 1, tostring(fresh))\nreturn out",
    )
}

/// The live sessions of a room (those whose expiry is in the future).
/// KEYS: presence hash, expiry zset.
pub(crate) fn presence_members() -> String {
    format!("{NOW_MS}{LIVE_MEMBERS}")
}

/// Removes a session if ARGV[2] owns it (an owner ending in `/` matches
/// every connection of that node); returns its JSON, or nil if it was not
/// there or is owned by another connection (so exactly one caller emits
/// `user:left` for it, and a replaced connection emits nothing).
/// KEYS: presence hash, expiry zset, owner hash. ARGV: socket id, owner.
pub(crate) const PRESENCE_LEAVE: &str = r#"
local cur = redis.call('HGET', KEYS[3], ARGV[1])
if cur then
  local o = ARGV[2]
  if string.sub(o, -1) == '/' then
    if string.sub(cur, 1, #o) ~= o then return nil end
  elseif cur ~= o then
    return nil
  end
end
local v = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return v
"#;

/// Renews the backstop expiry of a node's sessions in one room; returns
/// the socket ids that are missing (lost in a Redis restart, or reaped
/// while the node was unreachable) so the node re-registers them.
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

/// Records a node heartbeat at Redis time; returns 1 when the node was not
/// listed (new, reaped, or lost by Redis), else 0. KEYS: nodes zset. ARGV:
/// node id.
pub(crate) const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], now, ARGV[1])
"#;

/// Nodes whose last heartbeat is older than ARGV[1] ms. KEYS: nodes zset.
pub(crate) const DEAD_NODES: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])))
"#;

/// GCRA: one theoretical arrival time (µs) per user. Allows a burst of
/// ARGV[2] events, then one every ARGV[1] µs. Grants up to ARGV[3] events
/// at once (a node's lease) — as many as the budget holds right now, each
/// charged as if it had arrived — and returns how many; refused, minus the
/// µs until the budget holds one again. KEYS: the user's limiter key.
pub(crate) const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local n = math.floor((now + burst * interval - tat) / interval)
if n > tonumber(ARGV[3]) then n = tonumber(ARGV[3]) end
if n < 1 then
  local wait = tat - (burst - 1) * interval - now
  if wait < 1 then wait = 1 end
  return -wait
end
local new_tat = tat + n * interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return n
"#;

/// The room log after an offset, and what may be missing before it.
/// KEYS: stream. ARGV: offset (exclusive), count. Returns
/// `{max-deleted-entry-id, entries, trimmed-first}`; `{"0-0", {}}` when
/// the stream does not exist. `trimmed-first` is the id of the oldest
/// entry left when the stream has lost entries from its head, else empty:
/// trimming (`XADD … MAXLEN`) removes the oldest entries without moving
/// `max-deleted-entry-id` (only `XDEL` does), so an offset before the
/// oldest entry left may have lost what followed it. Without
/// `entries-added` (Redis before 7.0) any offset before the oldest entry
/// counts as possibly trimmed.
pub(crate) const READ_AFTER: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'0-0', {}} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local maxdel, added, len, first = '0-0', nil, 0, nil
for i = 1, #info, 2 do
  local k, v = info[i], info[i + 1]
  if k == 'max-deleted-entry-id' then maxdel = v
  elseif k == 'entries-added' then added = v
  elseif k == 'length' then len = v
  elseif k == 'first-entry' and type(v) == 'table' then first = v[1]
  end
end
local trimmed = ''
if first and (added == nil or added > len) then trimmed = first end
return {maxdel, redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2]), trimmed}
"#;

/// Writes a session record owned by a connection. KEYS: record hash.
/// ARGV: record JSON, owner, TTL (ms).
pub(crate) const SESSION_SAVE: &str = r#"
redis.call('HSET', KEYS[1], 'r', ARGV[1], 'c', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// Sets the record's TTL to ARGV[2] if ARGV[1] still owns it. KEYS: record
/// hash. Returns 1 when it did.
pub(crate) const SESSION_RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'c') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// 1 if node ARGV[1] heartbeated less than ARGV[2] ms ago. KEYS: nodes zset.
pub(crate) const NODE_ALIVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if beat and now - tonumber(beat) < tonumber(ARGV[2]) then return 1 end
return 0
"#;
