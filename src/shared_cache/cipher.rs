//! Encryption of tokens at rest in the shared cache: AES-256-GCM, a random 96-bit nonce per
//! value, and the id of the key beside it so keys can rotate without a flag day.
//!
//! A stored value is one line of ASCII:
//!
//! ```text
//! v1:<SHA-256 of the token, 64 hex>:<fetched_at, 16-digit Unix ms>:<key id, 8 hex>:<base64(nonce | ciphertext | tag)>
//! ```
//!
//! The fields before the ciphertext are in clear and fixed-width because the Lua scripts read
//! them: compare-and-delete compares the token digest, a store keeps the newer of two tokens by
//! `fetched_at`. They, and the Redis key, are the associated data of the encryption, so a value
//! moved to another key or with an edited header does not decrypt. The ciphertext holds the
//! token, its type and scope, `fetched_at` and `expires_at`.
//!
//! User sessions and pending authorizations ([`super::sessions`]) are sealed the same way
//! ([`TokenCipher::seal_bytes`]) behind clear fields of their own.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead as _, KeyInit as _, Payload};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore as _;
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::EncryptionKey;
use crate::clock::unix_millis;
use crate::idp::{AccessToken, IssuedToken, MAX_LIFETIME};
use crate::token::{CachedToken, SharedToken, TokenDigest};

/// Version tag at the start of every value.
const VERSION: &str = "v1";
/// Byte range of the token digest in a value (Lua: `string.sub(value, 4, 67)`).
pub const DIGEST_RANGE: std::ops::Range<usize> = 3..67;
/// Byte range of `fetched_at` in a value (Lua: `string.sub(value, 69, 84)`).
pub const FETCHED_AT_RANGE: std::ops::Range<usize> = 68..84;
/// Length of a token value's clear fields before the key id, separators included.
const TOKEN_FIELDS_LEN: usize = 85;
/// Length of a key id: 8 hex digits.
const KEY_ID_LEN: usize = 8;
/// AES-GCM nonce length: 96 bits.
const NONCE_LEN: usize = 12;

/// Why a stored value could not be read; none of these carries the value.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Not a value this version writes.
    #[error("the stored value is not in the expected format")]
    Malformed,
    /// Encrypted with a key this replica does not have (a rotation not rolled out everywhere).
    #[error("the stored value is encrypted with key id {0}, which this replica does not have")]
    UnknownKey(String),
    /// The ciphertext, its header or its Redis key was altered, or the key id collided.
    #[error("the stored value does not decrypt (altered, or encrypted with another key)")]
    Inauthentic,
}

/// Fixed-width `fetched_at` as it appears in a value.
pub fn fetched_at_field(fetched_at: SystemTime) -> String {
    format!("{:016}", unix_millis(fetched_at))
}

/// Encrypts tokens for the shared cache and decrypts them with the current or previous key.
pub struct TokenCipher {
    current: KeyedCipher,
    previous: Option<KeyedCipher>,
}

struct KeyedCipher {
    id: String,
    cipher: Aes256Gcm,
}

impl KeyedCipher {
    fn new(key: &EncryptionKey) -> Self {
        let bytes = key.expose_secret();
        // A short hash of the key names it; it reveals nothing usable about a 256-bit key.
        let mut hash = Sha256::new();
        hash.update(b"token-broker key id v1");
        hash.update(bytes);
        let id = hex::encode(&hash.finalize()[..4]);
        Self {
            id,
            cipher: Aes256Gcm::new_from_slice(bytes).expect("an AES-256 key is 32 bytes"),
        }
    }
}

impl fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCipher")
            .field("current_key_id", &self.current.id)
            .field("previous_key_id", &self.previous.as_ref().map(|k| &k.id))
            .finish()
    }
}

/// The encrypted part of a value. No `Debug`: it holds the token.
#[derive(Serialize, Deserialize)]
struct Sealed {
    access_token: String,
    token_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    fetched_at_ms: u64,
    expires_at_ms: u64,
}

impl TokenCipher {
    /// A cipher that writes with `current` and also reads values written with `previous`.
    pub fn new(current: &EncryptionKey, previous: Option<&EncryptionKey>) -> Self {
        Self {
            current: KeyedCipher::new(current),
            previous: previous.map(KeyedCipher::new),
        }
    }

    /// The id of the key new values are written with.
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// Whether `value`, whose key id follows `fields_len` bytes of fields, was sealed with the
    /// previous key (which values are read with but no longer written with), so that it is due
    /// to be sealed again with the current one.
    pub fn sealed_with_previous(&self, value: &[u8], fields_len: usize) -> bool {
        let Some(previous) = &self.previous else {
            return false;
        };
        value.get(fields_len..fields_len.saturating_add(KEY_ID_LEN)) == Some(previous.id.as_bytes())
    }

    /// The value that stores `token` under the Redis key `redis_key`.
    pub fn seal(&self, redis_key: &str, token: &CachedToken) -> String {
        let header = format!(
            "{VERSION}:{}:{}:",
            token.digest().to_hex(),
            fetched_at_field(token.fetched_at),
        );
        debug_assert_eq!(header.len(), TOKEN_FIELDS_LEN);
        let plaintext = serde_json::to_vec(&Sealed {
            access_token: token.access_token().expose().to_owned(),
            token_type: token.token_type().to_owned(),
            scope: token.scope().map(str::to_owned),
            fetched_at_ms: unix_millis(token.fetched_at),
            expires_at_ms: unix_millis(token.expires_at),
        })
        .expect("a token serialises");
        self.seal_bytes(redis_key, &header, &plaintext)
    }

    /// Encrypts `plaintext` for the Redis key `redis_key` behind `fields`, the clear fields the
    /// scripts read (ending with `:`): the value is `fields`, the key id, `:`, and
    /// `base64(nonce | ciphertext | tag)`, and everything before the ciphertext is authenticated
    /// with the key.
    pub fn seal_bytes(&self, redis_key: &str, fields: &str, plaintext: &[u8]) -> String {
        let header = format!("{fields}{}:", self.current.id);
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = associated_data(redis_key, &header);
        let ciphertext = self
            .current
            .cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encrypts any message under 64 GiB");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        let mut value = header;
        STANDARD.encode_string(&sealed, &mut value);
        value
    }

    /// The clear fields (the first `fields_len` bytes) and the plaintext of a value that
    /// [`TokenCipher::seal_bytes`] wrote under `redis_key`.
    pub fn open_bytes<'v>(
        &self,
        redis_key: &str,
        value: &'v [u8],
        fields_len: usize,
    ) -> Result<(&'v str, Vec<u8>), OpenError> {
        let value = std::str::from_utf8(value).map_err(|_| OpenError::Malformed)?;
        let header_len = fields_len + KEY_ID_LEN + 1;
        // ASCII, so that every fixed field is sliced on character boundaries.
        if value.len() <= header_len || !value.is_ascii() {
            return Err(OpenError::Malformed);
        }
        let (header, body) = value.split_at(header_len);
        let (fields, key_id) = header.split_at(fields_len);
        let Some(key_id) = key_id.strip_suffix(':') else {
            return Err(OpenError::Malformed);
        };
        let keyed = [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id == key_id)
            .ok_or_else(|| OpenError::UnknownKey(key_id.to_owned()))?;
        let sealed = STANDARD.decode(body).map_err(|_| OpenError::Malformed)?;
        if sealed.len() <= NONCE_LEN {
            return Err(OpenError::Malformed);
        }
        let Some((nonce, ciphertext)) = sealed.split_first_chunk::<NONCE_LEN>() else {
            return Err(OpenError::Malformed);
        };
        let nonce = *nonce;
        let aad = associated_data(redis_key, header);
        let plaintext = keyed
            .cipher
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| OpenError::Inauthentic)?;
        Ok((fields, plaintext))
    }

    /// Reads a value stored under `redis_key`.
    pub fn open(&self, redis_key: &str, value: &[u8]) -> Result<SharedToken, OpenError> {
        if !value.starts_with(VERSION.as_bytes()) {
            return Err(OpenError::Malformed);
        }
        let (header, plaintext) = self.open_bytes(redis_key, value, TOKEN_FIELDS_LEN)?;
        let sealed: Sealed =
            serde_json::from_slice(&plaintext).map_err(|_| OpenError::Malformed)?;
        let (fetched_at, lifetime) = times(sealed.fetched_at_ms, sealed.expires_at_ms)?;
        // The scripts act on the clear fields: they must describe the sealed token.
        if header.get(DIGEST_RANGE) != Some(TokenDigest::of(&sealed.access_token).to_hex().as_str())
            || header.get(FETCHED_AT_RANGE) != Some(fetched_at_field(fetched_at).as_str())
        {
            return Err(OpenError::Malformed);
        }
        Ok(SharedToken {
            issued: IssuedToken {
                access_token: AccessToken::new(sealed.access_token),
                token_type: sealed.token_type,
                lifetime,
                scope: sealed.scope,
            },
            fetched_at,
        })
    }
}

/// `fetched_at` and the lifetime of a sealed token from its two times, refused when they are
/// out of range or the lifetime is longer than the IdP client accepts.
pub fn times(fetched_at_ms: u64, expires_at_ms: u64) -> Result<(SystemTime, Duration), OpenError> {
    let at = |ms: u64| UNIX_EPOCH.checked_add(Duration::from_millis(ms));
    let (Some(fetched_at), Some(expires_at)) = (at(fetched_at_ms), at(expires_at_ms)) else {
        return Err(OpenError::Malformed);
    };
    let lifetime = expires_at
        .duration_since(fetched_at)
        .unwrap_or(Duration::ZERO);
    if lifetime > MAX_LIFETIME {
        return Err(OpenError::Malformed);
    }
    Ok((fetched_at, lifetime))
}

/// What the encryption authenticates besides the plaintext: the Redis key and the clear header.
fn associated_data(redis_key: &str, header: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(redis_key.len() + 1 + header.len());
    aad.extend_from_slice(redis_key.as_bytes());
    aad.push(b'\n');
    aad.extend_from_slice(header.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use secrecy::SecretBox;

    use super::*;

    fn key(byte: u8) -> EncryptionKey {
        SecretBox::new(Box::new([byte; 32]))
    }

    fn token(value: &str) -> CachedToken {
        let issued = IssuedToken {
            access_token: AccessToken::new(value),
            token_type: "Bearer".to_owned(),
            lifetime: Duration::from_secs(3600),
            scope: Some("read write".to_owned()),
        };
        let fetched = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        CachedToken::new(issued, fetched, 0.25, Duration::ZERO, 0.0)
    }

    #[test]
    fn a_sealed_token_opens_with_its_fields_and_hides_the_value() {
        let cipher = TokenCipher::new(&key(1), None);
        let value = cipher.seal("p:token:k", &token("eyJ.secret.sig"));
        assert!(!value.contains("eyJ.secret.sig") && !value.contains("read write"));
        assert_eq!(
            &value[DIGEST_RANGE],
            TokenDigest::of("eyJ.secret.sig").to_hex()
        );
        assert_eq!(&value[FETCHED_AT_RANGE], "0001800000000123");
        assert_eq!(
            &value[TOKEN_FIELDS_LEN..TOKEN_FIELDS_LEN + KEY_ID_LEN],
            cipher.key_id()
        );

        let opened = cipher.open("p:token:k", value.as_bytes()).unwrap();
        assert_eq!(opened.issued.access_token.expose(), "eyJ.secret.sig");
        assert_eq!(opened.issued.token_type, "Bearer");
        assert_eq!(opened.issued.scope.as_deref(), Some("read write"));
        assert_eq!(opened.issued.lifetime, Duration::from_secs(3600));
        assert_eq!(
            opened.fetched_at,
            UNIX_EPOCH + Duration::from_millis(1_800_000_000_123)
        );
        // Random nonces: the same token never seals to the same value twice.
        assert_ne!(value, cipher.seal("p:token:k", &token("eyJ.secret.sig")));
    }

    #[test]
    fn a_rotated_key_reads_old_values_and_writes_new_ones() {
        let old = TokenCipher::new(&key(1), None);
        let rotated = TokenCipher::new(&key(2), Some(&key(1)));
        let written_before = old.seal("k", &token("t1"));
        assert_eq!(
            rotated
                .open("k", written_before.as_bytes())
                .unwrap()
                .issued
                .access_token
                .expose(),
            "t1"
        );
        let written_after = rotated.seal("k", &token("t2"));
        assert_eq!(
            &written_after[TOKEN_FIELDS_LEN..TOKEN_FIELDS_LEN + KEY_ID_LEN],
            rotated.key_id()
        );
        assert_ne!(rotated.key_id(), old.key_id());
        assert!(matches!(
            old.open("k", written_after.as_bytes()),
            Err(OpenError::UnknownKey(_))
        ));
    }

    #[test]
    fn altered_values_and_moved_values_do_not_open() {
        let cipher = TokenCipher::new(&key(1), None);
        let value = cipher.seal("k1", &token("t1"));
        assert!(matches!(
            cipher.open("k2", value.as_bytes()),
            Err(OpenError::Inauthentic)
        ));
        let mut edited = value.clone().into_bytes();
        edited[FETCHED_AT_RANGE.start] = b'9';
        assert!(matches!(
            cipher.open("k1", &edited),
            Err(OpenError::Inauthentic)
        ));
        assert!(matches!(
            cipher.open("k1", b"v1:short"),
            Err(OpenError::Malformed)
        ));
        assert!(format!("{cipher:?}").contains(cipher.key_id()));
    }

    proptest::proptest! {
        /// Whatever bytes Redis holds under a key, opening them is an error or a token, never a
        /// panic: truncated, edited or crafted values are a miss.
        #[test]
        fn arbitrary_values_never_panic(value in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let cipher = TokenCipher::new(&key(1), None);
            let _ = cipher.open("k", &value);
        }

        /// A sealed value cut short, or with one byte changed, does not open.
        #[test]
        fn truncated_or_edited_values_do_not_open(cut in 0usize..300, at in 0usize..300, byte in proptest::num::u8::ANY) {
            let cipher = TokenCipher::new(&key(1), None);
            let value = cipher.seal("k", &token("t1")).into_bytes();
            let cut = cut.min(value.len() - 1);
            proptest::prop_assert!(cipher.open("k", &value[..cut]).is_err());
            let mut edited = value.clone();
            let at = at % edited.len();
            if edited[at] != byte {
                edited[at] = byte;
                proptest::prop_assert!(cipher.open("k", &edited).is_err());
            }
        }
    }
}
