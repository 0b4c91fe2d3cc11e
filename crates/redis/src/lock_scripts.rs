//! The Lua of pod locks (see `locks.rs`), apart from `scripts.rs` to keep
//! each file small. Every script but `due` touches only the keys of one
//! room (`keys::lock_keys`), so it is atomic on a Redis Cluster too; time
//! is Redis `TIME`.

use fred::types::scripts::Script;

/// The pod-lock scripts (see `locks.rs`). Each takes the room's
/// `keys::lock_keys`, except `due`.
pub(crate) struct LockScripts {
    pub(crate) acquire: Script,
    pub(crate) unlock: Script,
    pub(crate) remove: Script,
    pub(crate) release_session: Script,
    pub(crate) release_user: Script,
    pub(crate) suspend: Script,
    pub(crate) adopt: Script,
    pub(crate) refresh: Script,
    pub(crate) list: Script,
    pub(crate) sweep: Script,
    pub(crate) due: Script,
}

impl LockScripts {
    pub(crate) fn new() -> Self {
        LockScripts {
            acquire: lock_script(LOCK_ACQUIRE),
            unlock: lock_script(LOCK_UNLOCK),
            remove: lock_script(LOCK_REMOVE),
            release_session: lock_script(LOCK_RELEASE_SESSION),
            release_user: lock_script(LOCK_RELEASE_USER),
            suspend: lock_script(LOCK_SUSPEND),
            adopt: lock_script(LOCK_ADOPT),
            refresh: lock_script(LOCK_REFRESH),
            list: lock_script(LOCK_LIST),
            sweep: lock_script(LOCK_SWEEP),
            due: Script::from_lua(LOCKS_DUE),
        }
    }
}

fn lock_script(body: &str) -> Script {
    Script::from_lua(format!("{LOCK_LIB}{body}"))
}

/// Shared by the lock scripts. KEYS: locks hash (pod → `{u, t, h}`),
/// holder owners, holder expiries, epoch. A lock exists only while it has
/// a holder; a holder entry exists only while it holds a lock.
const LOCK_LIB: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function num(n) return string.format('%.0f', n) end
local function owns(o, cur)
  if string.sub(o, -1) == '/' then return string.sub(cur, 1, #o) == o end
  return o == cur
end
local function get(pod)
  local v = redis.call('HGET', KEYS[1], pod)
  if v then return cjson.decode(v) end
  return nil
end
local function put(pod, l) redis.call('HSET', KEYS[1], pod, cjson.encode(l)) end
local function info(pod, l) return cjson.encode({podId = pod, userId = l.u, lockedAt = l.t}) end
local function has(l, sid)
  for _, h in ipairs(l.h) do if h == sid then return true end end
  return false
end
local function forget(sid)
  redis.call('HDEL', KEYS[2], sid)
  redis.call('ZREM', KEYS[3], sid)
end
-- Forgets the holders in `candidates` that hold no lock any more: one
-- pass over the room's locks, whatever the number of candidates.
local function forget_idle(candidates)
  local busy = {}
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
    for _, h in ipairs(cjson.decode(v).h) do busy[h] = true end
  end
  for _, h in ipairs(candidates) do
    if not busy[h] then forget(h) end
  end
end
local function remove(pod, l)
  redis.call('HDEL', KEYS[1], pod)
  forget_idle(l.h)
end
local function drop_holder(sid, freed)
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local l = cjson.decode(all[i + 1])
    if has(l, sid) then
      local keep = {}
      for _, h in ipairs(l.h) do if h ~= sid then keep[#keep + 1] = h end end
      if #keep == 0 then
        redis.call('HDEL', KEYS[1], all[i])
        freed[#freed + 1] = info(all[i], l)
      else
        l.h = keep
        put(all[i], l)
      end
    end
  end
  forget(sid)
  return freed
end
local function epoch(fresh, ttl)
  local e = redis.call('GET', KEYS[4])
  if not e then
    e = fresh
    redis.call('SET', KEYS[4], e)
  end
  redis.call('PEXPIRE', KEYS[4], ttl)
  return e
end
local function hold(sid, owner, ttl)
  local exp = now + tonumber(ttl)
  redis.call('HSET', KEYS[2], sid, owner)
  redis.call('ZADD', KEYS[3], exp, sid)
  return num(exp)
end
"#;

/// ARGV: pod, user, socket, owner, lock time, TTL (ms), fresh epoch,
/// epoch TTL (ms). Returns `{"locked", user}` or `{"taken"|"held", epoch,
/// lock time, holder expiry}`.
const LOCK_ACQUIRE: &str = r#"
local l = get(ARGV[1])
if l and l.u ~= ARGV[2] then return {'locked', l.u} end
local e = epoch(ARGV[7], ARGV[8])
local status = 'held'
if not l then
  l = {u = ARGV[2], t = ARGV[5], h = {ARGV[3]}}
  put(ARGV[1], l)
  status = 'taken'
elseif not has(l, ARGV[3]) then
  l.h[#l.h + 1] = ARGV[3]
  put(ARGV[1], l)
end
return {status, e, l.t, hold(ARGV[3], ARGV[4], ARGV[6])}
"#;

/// ARGV: pod, user. Returns "free", "notowner" or "released".
const LOCK_UNLOCK: &str = r#"
local l = get(ARGV[1])
if not l then return 'free' end
if l.u ~= ARGV[2] then return 'notowner' end
remove(ARGV[1], l)
return 'released'
"#;

/// ARGV: pod. Returns the lock's info JSON, or nil.
const LOCK_REMOVE: &str = r#"
local l = get(ARGV[1])
if not l then return nil end
remove(ARGV[1], l)
return info(ARGV[1], l)
"#;

/// ARGV: socket, owner (or `node/`). Returns the freed locks' JSON.
const LOCK_RELEASE_SESSION: &str = r#"
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur or not owns(ARGV[2], cur) then return {} end
return drop_holder(ARGV[1], {})
"#;

/// ARGV: user. Returns the freed locks' JSON.
const LOCK_RELEASE_USER: &str = r#"
local freed, holders = {}, {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local l = cjson.decode(all[i + 1])
  if l.u == ARGV[1] then
    redis.call('HDEL', KEYS[1], all[i])
    freed[#freed + 1] = info(all[i], l)
    for _, h in ipairs(l.h) do holders[#holders + 1] = h end
  end
end
forget_idle(holders)
return freed
"#;

/// ARGV: socket, owner (or `node/`), window (ms). Returns the new expiry,
/// or nil when the socket holds nothing or another connection owns it.
const LOCK_SUSPEND: &str = r#"
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur or not owns(ARGV[2], cur) then return nil end
local exp = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[3], exp, ARGV[1])
return num(exp)
"#;

/// ARGV: socket, new owner, TTL (ms). Returns `{epoch, expiry, pod, lock
/// time, pod, lock time, …}`, or `{}` when the socket holds nothing.
const LOCK_ADOPT: &str = r#"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return {} end
local out = {redis.call('GET', KEYS[4]) or '', hold(ARGV[1], ARGV[2], ARGV[3])}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local l = cjson.decode(all[i + 1])
  if has(l, ARGV[1]) then
    out[#out + 1] = all[i]
    out[#out + 1] = l.t
  end
end
return out
"#;

/// A live holder's refresh. ARGV: socket, owner, user, epoch it saw, TTL
/// (ms), fresh epoch, epoch TTL (ms), then pod, lock time pairs. When the
/// epoch changed (Redis lost the locks) free pods are locked again;
/// otherwise a pod that is gone was released and is dropped. Returns
/// `{epoch, expiry or "", dropped count, dropped…, restored…}`.
const LOCK_REFRESH: &str = r#"
local cur = redis.call('HGET', KEYS[2], ARGV[1])
local seen = redis.call('GET', KEYS[4])
local lost = seen ~= ARGV[4]
local e = epoch(ARGV[6], ARGV[7])
local dropped, restored, kept = {}, {}, 0
local replaced = cur and not owns(ARGV[2], cur)
for i = 8, #ARGV, 2 do
  local pod = ARGV[i]
  local l = get(pod)
  if replaced then
    dropped[#dropped + 1] = pod
  elseif l and l.u == ARGV[3] and has(l, ARGV[1]) then
    kept = kept + 1
  elseif lost and not l then
    put(pod, {u = ARGV[3], t = ARGV[i + 1], h = {ARGV[1]}})
    restored[#restored + 1] = pod
    kept = kept + 1
  elseif lost and l.u == ARGV[3] then
    l.h[#l.h + 1] = ARGV[1]
    put(pod, l)
    kept = kept + 1
  else
    dropped[#dropped + 1] = pod
  end
end
local exp = ''
if kept > 0 then exp = hold(ARGV[1], ARGV[2], ARGV[5]) end
local out = {e, exp, tostring(#dropped)}
for _, p in ipairs(dropped) do out[#out + 1] = p end
for _, p in ipairs(restored) do out[#out + 1] = p end
return out
"#;

/// Every lock's info JSON.
const LOCK_LIST: &str = r#"
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do out[#out + 1] = info(all[i], cjson.decode(all[i + 1])) end
return out
"#;

/// Releases the holders whose expiry passed. Returns `{earliest expiry
/// left or "", freed lock JSON…}`.
const LOCK_SWEEP: &str = r#"
local freed = {}
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  drop_holder(sid, freed)
end
local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
table.insert(freed, 1, first[2] or '')
return freed
"#;

/// Rooms whose earliest holder expiry may have passed. KEYS: the due
/// set. ARGV: how many at most.
const LOCKS_DUE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
"#;
