//! Rotated client secrets in the shared level: `P secret:K` ([`SharedKey::for_secret`]) holds
//! the secret sealed with the shared level's key, without expiry, behind its fingerprint in
//! clear (`r1:<fingerprint>:`), so that a drop can compare without opening it. A store or a drop
//! and its announcement (`secret <origin> K`) run in one script, so every replica reads the
//! secret again.

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use std::time::{Duration, UNIX_EPOCH};

use super::Inner;
use crate::clock::unix_millis;
use crate::token::{RotatedSecret, SharedCacheError, SharedKey};

/// The clear fields before a sealed secret: version and fingerprint.
const SECRET_FIELDS_LEN: usize = "r1:".len() + 16 + 1;

/// Stores a secret without expiry and announces it. KEYS: secret key. ARGV: value, channel,
/// message.
pub(super) const SECRET_STORE_SCRIPT: &str = r"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
";

/// Deletes a secret if it still has the fingerprint `ARGV[1]` (the 16 characters after `r1:`),
/// and announces it either way. KEYS: secret key. ARGV: fingerprint, channel, message.
pub(super) const SECRET_DROP_SCRIPT: &str = r"
local old = redis.call('GET', KEYS[1])
local dropped = 0
if old and string.sub(old, 4, 19) == ARGV[1] then
  dropped = redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
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
        format!("{}secret:{}", self.prefix, key.to_hex())
    }

    /// The rotated secret under `key`; one that cannot be opened is none (and logged).
    pub(super) async fn load_secret(
        &self,
        key: &SharedKey,
    ) -> Result<Option<RotatedSecret>, SharedCacheError> {
        let redis_key = self.secret_key(key);
        let mut connection = self.connection()?;
        let value: Option<Vec<u8>> = self
            .call(
                redis::cmd("GET")
                    .arg(&redis_key)
                    .query_async(&mut connection),
            )
            .await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let opened = self
            .cipher
            .open_bytes(&redis_key, &value, SECRET_FIELDS_LEN)
            .map_err(|error| error.to_string())
            .and_then(|(fields, plaintext)| {
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
            });
        match opened {
            Ok(secret) => Ok(Some(secret)),
            Err(error) => {
                tracing::warn!(%error, "ignoring an unreadable rotated secret in the shared cache");
                Ok(None)
            }
        }
    }

    /// Stores `secret` under `key` without expiry and announces it.
    pub(super) async fn store_secret(
        &self,
        key: &SharedKey,
        secret: &RotatedSecret,
    ) -> Result<(), SharedCacheError> {
        let redis_key = self.secret_key(key);
        let sealed = serde_json::to_vec(&Sealed {
            secret: secret.secret.expose_secret().to_owned(),
            rotated_at_ms: unix_millis(secret.rotated_at),
        })
        .map_err(|_| SharedCacheError::Backend("cannot serialise a secret".to_owned()))?;
        let fields = format!("r1:{}:", secret.fingerprint());
        let value = self.cipher.seal_bytes(&redis_key, &fields, &sealed);
        let message = format!("secret {} {}", self.origin, key.to_hex());
        let mut connection = self.connection()?;
        let mut invocation = self.secret_store.key(&redis_key);
        invocation.arg(value).arg(&self.channel).arg(message);
        self.call(invocation.invoke_async::<i64>(&mut connection))
            .await
            .map(drop)
    }

    /// Forgets the secret under `key` if it is still the one of `fingerprint`, and announces it.
    pub(super) async fn drop_secret(
        &self,
        key: &SharedKey,
        fingerprint: &str,
    ) -> Result<(), SharedCacheError> {
        let message = format!("secret {} {}", self.origin, key.to_hex());
        let mut connection = self.connection()?;
        let mut invocation = self.secret_drop.key(self.secret_key(key));
        invocation.arg(fingerprint).arg(&self.channel).arg(message);
        self.call(invocation.invoke_async::<i64>(&mut connection))
            .await
            .map(drop)
    }
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
}
