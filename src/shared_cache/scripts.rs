//! The Lua scripts that change the shared level atomically: each change and its announcement
//! in one script, and the lock released only by its holder. They read the fields of a value
//! where [`super::cipher`] writes them (a unit test of the module above checks the offsets).

/// Stores a value unless a newer token (by the `fetched_at` field of the value) is there, with
/// its expiry, and announces it. KEYS: token key. ARGV: value, fetched_at field, ttl ms, channel,
/// message.
pub(super) const STORE_SCRIPT: &str = r"
local old = redis.call('GET', KEYS[1])
if old and string.sub(old, 69, 84) > ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

/// Deletes a value (only if it holds the token with digest `ARGV[1]`, when not empty), leaves a
/// tombstone naming what was deleted (the token's digest, or `*` for whatever a replica holds
/// when Redis held nothing), which lives as long as the deleted value would have (else
/// `ARGV[4]` ms), and announces the deletion either way. KEYS: token key, tombstone key. ARGV:
/// digest or '', channel, message, tombstone ttl ms.
pub(super) const DELETE_SCRIPT: &str = r"
local deleted = 0
local old = redis.call('GET', KEYS[1])
if old and (ARGV[1] == '' or string.sub(old, 4, 67) == ARGV[1]) then
  local ttl = redis.call('PTTL', KEYS[1])
  deleted = redis.call('DEL', KEYS[1])
  if ttl > 0 then
    redis.call('SET', KEYS[2], string.sub(old, 4, 67), 'PX', ttl)
  end
elseif not old then
  local named = ARGV[1]
  if named == '' then named = '*' end
  redis.call('SET', KEYS[2], named, 'PX', ARGV[4])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return deleted
";

/// Releases a lock if it still holds the holder's value. KEYS: lock key. ARGV: lock value.
pub(super) const UNLOCK_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Stores a session unless its tombstone is there (then -1) or the same or a higher generation
/// (the 16 digits after `s1:`; then 0), for the idle timeout. KEYS: session key. ARGV: value,
/// generation field, ttl ms.
pub(super) const SESSION_STORE_SCRIPT: &str = r"
local old = redis.call('GET', KEYS[1])
if old == 'deleted' then
  return -1
end
if old and string.sub(old, 4, 19) >= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
";

/// Keeps a pending authorization unless its owner has `ARGV[3]` pending already (0). The owner's
/// sorted set scores each of its authorizations by expiry (Redis' own clock, so replicas'
/// clocks do not matter) and lives as long as the last of them. KEYS: pending key, owner's
/// set. ARGV: value, ttl ms, most pending, member.
pub(super) const PENDING_START_SCRIPT: &str = r"
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ms + tonumber(ARGV[2]), ARGV[4])
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], last[2])
return 1
";

/// Takes a pending authorization: returns its value and deletes it, and frees its owner's slot.
/// KEYS: pending key, owner's set. ARGV: member.
pub(super) const PENDING_TAKE_SCRIPT: &str = r"
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('DEL', KEYS[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
return value
";
