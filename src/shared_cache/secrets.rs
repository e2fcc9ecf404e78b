//! Rotated client secrets in the shared level: `P secret:K` ([`SharedKey::for_secret`]) holds
//! the secret sealed with the shared level's key, without expiry, behind its fingerprint in
//! clear (`r1:<fingerprint>:`), so that a drop can compare without opening it; a dropped secret
//! leaves a tombstone `d1:<fingerprint>:<unix ms>` in its place. A store or a drop and its
//! announcement (`secret <origin> K`) run in one script, so every replica reads the key again.
//! A secret sealed with the previous encryption key is sealed again with the current one when
//! read, so that the previous key can be retired.

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Inner;
use crate::clock::unix_millis;
use crate::token::{RotatedSecret, SharedCacheError, SharedKey, SharedSecret};

/// The clear fields before a sealed secret: version and fingerprint.
const SECRET_FIELDS_LEN: usize = "r1:".len() + 16 + 1;

/// Stores a secret without expiry and announces it. KEYS: secret key. ARGV: value, channel,
/// message.
pub(super) const SECRET_STORE_SCRIPT: &str = r"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
";

/// Stores a secret again only where nothing is (the level lost its data), and announces it.
/// KEYS: secret key. ARGV: value, channel, message.
pub(super) const SECRET_RESTORE_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
";

/// Replaces a value with the same secret sealed with the current key, unless it changed since
/// it was read (another replica rotated meanwhile). KEYS: secret key. ARGV: value read, new
/// value.
pub(super) const SECRET_RESEAL_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Replaces a secret that still has the fingerprint `ARGV[1]` (the 16 characters after `r1:`)
/// with the tombstone `ARGV[2]`, and announces it either way. KEYS: secret key. ARGV:
/// fingerprint, tombstone, channel, message.
pub(super) const SECRET_DROP_SCRIPT: &str = r"
local old = redis.call('GET', KEYS[1])
local dropped = 0
if old and string.sub(old, 1, 3) == 'r1:' and string.sub(old, 4, 19) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  dropped = 1
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return dropped
";

/// What is sealed.
#[derive(Serialize, Deserialize)]
struct Sealed {
    secret: String,
    rotated_at_ms: u64,
}

impl Inner {
    fn secret_key(&self, key: &SharedKey) -> String {
        self.key("secret", &key.to_hex(), None)
    }

    /// What is under `key`: a secret, a tombstone, or nothing (a secret that cannot be opened
    /// is nothing, and logged). A secret sealed with the previous key is sealed again.
    pub(super) async fn load_secret(
        &self,
        key: &SharedKey,
    ) -> Result<SharedSecret, SharedCacheError> {
        let redis_key = self.secret_key(key);
        let value = self.get(&redis_key).await?;
        let Some(value) = value else {
            return Ok(SharedSecret::Absent);
        };
        if let Some(tombstone) = value.strip_prefix(b"d1:") {
            return Ok(tombstone_of(tombstone).unwrap_or(SharedSecret::Absent));
        }
        match self.open_secret(&redis_key, &value) {
            Ok(secret) => {
                if self.cipher.sealed_with_previous(&value, SECRET_FIELDS_LEN) {
                    let _ = self.reseal_secret(&redis_key, &value, &secret).await;
                }
                Ok(SharedSecret::Stored(secret))
            }
            Err(error) => {
                tracing::warn!(%error, "leaving alone a rotated secret in the shared cache that this replica cannot read");
                Ok(SharedSecret::Unreadable)
            }
        }
    }

    /// Seals `secret` (read as `value`) again with the current key, unless the value changed.
    async fn reseal_secret(
        &self,
        redis_key: &str,
        value: &[u8],
        secret: &RotatedSecret,
    ) -> Result<(), SharedCacheError> {
        let resealed = self.seal_secret(redis_key, secret)?;
        let mut connection = self.connection()?;
        let mut invocation = self.secret_reseal.key(redis_key);
        invocation.arg(value).arg(resealed);
        self.call(invocation.invoke_async::<i64>(&mut connection))
            .await
            .map(drop)
    }

    /// `secret` sealed for `redis_key` behind its clear fingerprint.
    fn seal_secret(
        &self,
        redis_key: &str,
        secret: &RotatedSecret,
    ) -> Result<String, SharedCacheError> {
        let sealed = serde_json::to_vec(&Sealed {
            secret: secret.secret.expose_secret().to_owned(),
            rotated_at_ms: unix_millis(secret.rotated_at),
        })
        .map_err(|_| SharedCacheError::Backend("cannot serialise a secret".to_owned()))?;
        let fields = format!("r1:{}:", secret.fingerprint());
        Ok(self.cipher.seal_bytes(redis_key, &fields, &sealed))
    }

    /// The secret sealed in `value`, checked against its clear fingerprint.
    fn open_secret(&self, redis_key: &str, value: &[u8]) -> Result<RotatedSecret, String> {
        let (fields, plaintext) = self
            .cipher
            .open_bytes(redis_key, value, SECRET_FIELDS_LEN)
            .map_err(|error| error.to_string())?;
        let sealed: Sealed = serde_json::from_slice(&plaintext)
            .map_err(|_| "the sealed secret is malformed".to_owned())?;
        let rotated_at = UNIX_EPOCH
            .checked_add(Duration::from_millis(sealed.rotated_at_ms))
            .ok_or_else(|| "the sealed secret's time is out of range".to_owned())?;
        let secret = RotatedSecret {
            secret: SecretString::from(sealed.secret),
            rotated_at,
        };
        // The drop script compares the clear fingerprint: it must be the secret's.
        if fields != format!("r1:{}:", secret.fingerprint()) {
            return Err("the sealed secret's fingerprint does not match".to_owned());
        }
        Ok(secret)
    }

    /// Stores `secret` under `key` without expiry and announces it.
    pub(super) async fn store_secret(
        &self,
        key: &SharedKey,
        secret: &RotatedSecret,
    ) -> Result<(), SharedCacheError> {
        self.write_secret(&self.secret_store, key, secret).await
    }

    /// Stores `secret` under `key` only where nothing is, and announces it.
    pub(super) async fn restore_secret(
        &self,
        key: &SharedKey,
        secret: &RotatedSecret,
    ) -> Result<(), SharedCacheError> {
        self.write_secret(&self.secret_restore, key, secret).await
    }

    /// Runs `script` (store or restore) with `secret` sealed and its announcement.
    async fn write_secret(
        &self,
        script: &redis::Script,
        key: &SharedKey,
        secret: &RotatedSecret,
    ) -> Result<(), SharedCacheError> {
        let redis_key = self.secret_key(key);
        let value = self.seal_secret(&redis_key, secret)?;
        let message = format!("secret {} {}", self.origin, key.to_hex());
        let mut connection = self.connection()?;
        let mut invocation = script.key(&redis_key);
        invocation.arg(value).arg(&self.channel).arg(message);
        self.call(invocation.invoke_async::<i64>(&mut connection))
            .await
            .map(drop)
    }

    /// Replaces the secret under `key`, if it is still the one of `fingerprint`, with a
    /// tombstone dated `at`, and announces it.
    pub(super) async fn drop_secret(
        &self,
        key: &SharedKey,
        fingerprint: &str,
        at: SystemTime,
    ) -> Result<(), SharedCacheError> {
        let message = format!("secret {} {}", self.origin, key.to_hex());
        let tombstone = format!("d1:{fingerprint}:{}", unix_millis(at));
        let mut connection = self.connection()?;
        let mut invocation = self.secret_drop.key(self.secret_key(key));
        invocation
            .arg(fingerprint)
            .arg(tombstone)
            .arg(&self.channel)
            .arg(message);
        self.call(invocation.invoke_async::<i64>(&mut connection))
            .await
            .map(drop)
    }
}

/// The tombstone after `d1:`: `<fingerprint>:<unix ms>`; `None` when malformed.
fn tombstone_of(tombstone: &[u8]) -> Option<SharedSecret> {
    let text = std::str::from_utf8(tombstone).ok()?;
    let (fingerprint, at) = text.split_once(':')?;
    if fingerprint.len() != 16 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let at = UNIX_EPOCH.checked_add(Duration::from_millis(at.parse().ok()?))?;
    Some(SharedSecret::Dropped {
        fingerprint: fingerprint.to_owned(),
        at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::fingerprint;

    #[test]
    fn the_drop_script_reads_the_fingerprint_where_it_is_written() {
        let field = format!("r1:{}:", fingerprint("s"));
        assert_eq!(field.len(), SECRET_FIELDS_LEN);
        // Lua's string.sub is 1-based and inclusive: characters 4 to 19 are the fingerprint.
        assert_eq!(field.get(3..19), Some(fingerprint("s").as_str()));
        assert!(SECRET_DROP_SCRIPT.contains("string.sub(old, 4, 19)"));
    }

    #[test]
    fn tombstones_read_back_and_malformed_ones_are_nothing() {
        let dropped = tombstone_of(b"0123456789abcdef:1700000000000");
        assert!(matches!(
            dropped,
            Some(SharedSecret::Dropped { ref fingerprint, .. }) if fingerprint == "0123456789abcdef"
        ));
        for bad in [
            &b"short:1"[..],
            b"0123456789abcdef:x",
            b"0123456789abcdeg:1",
            b"",
        ] {
            assert!(tombstone_of(bad).is_none(), "{bad:?}");
        }
    }
}
