//! Keys already verified, so that a hit neither hashes the presented key with SHA-256 nor looks
//! at every configured caller.
//!
//! A presented key is looked up by a keyed fast hash (foldhash, seeded at random per registry,
//! so nobody can aim keys at one slot); the slot holds the whole key, compared with the presented
//! one in constant time, and the caller it proved. Only keys that verified are kept, at most
//! [`MAX_VERIFIED`]; a registry is rebuilt on every reload, so removed or re-keyed callers leave
//! with it. The keys are secrets: zeroed on drop, never printed.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::{Arc, PoisonError, RwLock};

use secrecy::{ExposeSecret as _, SecretSlice};
use subtle::ConstantTimeEq as _;

use super::Caller;

/// Most keys remembered; beyond it new keys are verified the slow way every time.
const MAX_VERIFIED: usize = 16_384;

/// A verified key and the caller it proves.
struct Verified {
    key: SecretSlice<u8>,
    caller: Arc<Caller>,
}

/// Keys already verified, by keyed hash.
pub(super) struct VerifiedKeys {
    seed: foldhash::quality::RandomState,
    keys: RwLock<HashMap<u64, Verified, foldhash::quality::RandomState>>,
}

impl Default for VerifiedKeys {
    fn default() -> Self {
        Self {
            seed: foldhash::quality::RandomState::default(),
            keys: RwLock::new(HashMap::default()),
        }
    }
}

impl VerifiedKeys {
    /// The caller `key` proved before, if it did.
    pub(super) fn get(&self, key: &str) -> Option<Arc<Caller>> {
        let slot = self.seed.hash_one(key.as_bytes());
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let verified = keys.get(&slot)?;
        let same: bool = verified.key.expose_secret().ct_eq(key.as_bytes()).into();
        same.then(|| Arc::clone(&verified.caller))
    }

    /// Remembers that `key` proves `caller` (unless the set is full).
    pub(super) fn insert(&self, key: &str, caller: &Arc<Caller>) {
        let slot = self.seed.hash_one(key.as_bytes());
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if keys.len() < MAX_VERIFIED || keys.contains_key(&slot) {
            let key = SecretSlice::from(key.as_bytes().to_vec());
            keys.insert(
                slot,
                Verified {
                    key,
                    caller: Arc::clone(caller),
                },
            );
        }
    }
}
