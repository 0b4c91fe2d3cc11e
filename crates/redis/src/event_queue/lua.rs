//! The Lua of the durable queue. Each script works on one stream of the
//! queue — a shard, `{flowgate:eventlog:k}`, or the legacy
//! `flowgate:eventlog` — and every key it is given carries that stream's
//! hash tag (the legacy stream is its own tag: a key without braces hashes
//! on its whole name), so each script runs atomically on one slot of a
//! Redis Cluster. Caps passed in are the stream's share of the queue's.

/// Queues an event unless the shard is at its share of the cap or the
/// event's offset is older than the grace, and indexes the entry under its
/// flow by offset time (the flow's watermark reads that index).
/// KEYS: the shard's stream, byte counter, the flow's pending index.
/// ARGV: event JSON, flow id, offset, offset ms, the shard's max entries
/// and max bytes, grace (ms). Returns the entry id, `full` or `stale`.
pub(crate) const PUSH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(ARGV[4]) < now - tonumber(ARGV[7]) then return 'stale' end
local bytes = tonumber(redis.call('GET', KEYS[2]) or '0')
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[5])
   or bytes + #ARGV[1] > tonumber(ARGV[6]) then
  return 'full'
end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1], 'f', ARGV[2], 'o', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], id)
redis.call('INCRBY', KEYS[2], #ARGV[1])
return id
"#;

/// A shard's fill: its length and its bytes. KEYS: queue, byte counter.
/// Read before an event is published (`admit`).
pub(crate) const FILL: &str = r#"
return {redis.call('XLEN', KEYS[1]), tonumber(redis.call('GET', KEYS[2]) or '0')}
"#;

/// Removes entries from the queue (acknowledged, deleted, unindexed, their
/// bytes released); an entry given a reason is first copied to the
/// dead-letter stream with it.
/// KEYS: queue, byte counter, dead-letter stream, then the pending index
/// of each entry's flow. ARGV: group, dead-letter MAXLEN, then for each
/// entry its id and reason (empty: written).
pub(crate) const REMOVE: &str = r#"
local freed = 0
local n = (#ARGV - 2) / 2
for i = 1, n do
  local id = ARGV[1 + 2 * i]
  local reason = ARGV[2 + 2 * i]
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if found[1] then
    local fields = found[1][2]
    for j = 1, #fields, 2 do
      if fields[j] == 'e' then freed = freed + #fields[j + 1] end
    end
    if reason ~= '' then
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'id', id, 'reason', reason, unpack(fields))
    end
  elseif reason ~= '' then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'id', id, 'reason', reason)
  end
  redis.call('XACK', KEYS[1], ARGV[1], id)
  redis.call('XDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[3 + i], id)
end
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
elseif freed > 0 and redis.call('DECRBY', KEYS[2], freed) < 0 then
  redis.call('DEL', KEYS[2])
end
return n
"#;

/// The flow's watermark (ms): the lowest offset time still queued for the
/// flow, or now minus the grace, whichever is lower. Index entries whose
/// queue entry is gone (deleted by hand) are dropped on the way, at most
/// a bounded number per call, so a stray one cannot hold the flow back.
/// KEYS: queue, the flow's pending index. ARGV: grace (ms).
pub(crate) const WATERMARK: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = now - tonumber(ARGV[1])
for _ = 1, 100 do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if not first[1] then return w end
  if redis.call('XRANGE', KEYS[1], first[1], first[1])[1] then
    return math.min(w, tonumber(first[2]))
  end
  redis.call('ZREM', KEYS[2], first[1])
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if first[2] then return math.min(w, tonumber(first[2])) end
return w
"#;
