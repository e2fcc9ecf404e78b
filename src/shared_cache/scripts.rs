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

/// Deletes a value (only if it holds the token with digest ARGV[1], when not empty), leaves a
/// tombstone naming what was deleted (the token's digest, or `*` for whatever a replica holds
/// when Redis held nothing), which lives as long as the deleted value would have (else
/// ARGV[4] ms), and announces the deletion either way. KEYS: token key, tombstone key. ARGV:
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
