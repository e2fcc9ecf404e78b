//! Workload tokens that verified, so that the next request with one is a hash and a lookup
//! instead of a signature check: kept by SHA-256 (32 bytes each, whatever the token's length)
//! under a keyed hash, compared in constant time, at most `auth.workload.max_remembered`.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::Caller;

/// How often a full set of remembered tokens is swept for expired ones, at most.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// A token that verified and what it proved.
struct RememberedToken {
    /// SHA-256 of the token: 32 bytes per entry, whatever the token's length.
    digest: [u8; 32],
    caller: Arc<Caller>,
    /// Unix seconds after which it is no longer accepted (`exp` plus the leeway).
    until: f64,
    issuer: usize,
    thumbprint: Arc<str>,
}

/// The tokens, and when expired ones were last swept out.
struct RememberedTokens {
    by_slot: HashMap<u64, RememberedToken, foldhash::quality::RandomState>,
    swept: Option<f64>,
}

/// Tokens that verified, by keyed hash (as [`super::verified`] keeps keys), each checked by
/// its SHA-256 in constant time: at most `max`.
pub(super) struct Remembered {
    seed: foldhash::quality::RandomState,
    tokens: RwLock<RememberedTokens>,
    max: usize,
}

impl Remembered {
    pub(super) fn new(max: usize) -> Self {
        Self {
            seed: foldhash::quality::RandomState::default(),
            tokens: RwLock::new(RememberedTokens {
                by_slot: HashMap::default(),
                swept: None,
            }),
            max,
        }
    }

    /// The caller `token` proved, while it is valid at `now` and `published(issuer,
    /// thumbprint)` says its key is still in the JWKS; a stale entry is dropped.
    pub(super) fn get(
        &self,
        token: &str,
        now: f64,
        published: impl Fn(usize, &str) -> bool,
    ) -> Option<Arc<Caller>> {
        let slot = self.seed.hash_one(token.as_bytes());
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        {
            let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
            let entry = tokens.by_slot.get(&slot)?;
            if !bool::from(entry.digest.ct_eq(&digest)) {
                return None;
            }
            if now <= entry.until && published(entry.issuer, &entry.thumbprint) {
                return Some(Arc::clone(&entry.caller));
            }
        }
        let mut tokens = self.tokens.write().unwrap_or_else(PoisonError::into_inner);
        let stale = tokens.by_slot.get(&slot).is_some_and(|entry| {
            bool::from(entry.digest.ct_eq(&digest))
                && !(now <= entry.until && published(entry.issuer, &entry.thumbprint))
        });
        if stale {
            tokens.by_slot.remove(&slot);
        }
        None
    }

    /// Remembers a verified token; when full, expired tokens make room (looked for at most
    /// every [`SWEEP_INTERVAL`]), else it is not kept and is verified again next time.
    pub(super) fn insert(
        &self,
        token: &str,
        caller: Arc<Caller>,
        until: f64,
        issuer: usize,
        thumbprint: Arc<str>,
        now: f64,
    ) {
        let slot = self.seed.hash_one(token.as_bytes());
        let mut tokens = self.tokens.write().unwrap_or_else(PoisonError::into_inner);
        if tokens.by_slot.len() >= self.max && !tokens.by_slot.contains_key(&slot) {
            let due = tokens
                .swept
                .is_none_or(|swept| now - swept >= SWEEP_INTERVAL.as_secs_f64());
            if due {
                tokens.by_slot.retain(|_, entry| entry.until >= now);
                tokens.swept = Some(now);
            }
            if tokens.by_slot.len() >= self.max {
                return;
            }
        }
        tokens.by_slot.insert(
            slot,
            RememberedToken {
                digest: Sha256::digest(token.as_bytes()).into(),
                caller,
                until,
                issuer,
                thumbprint,
            },
        );
    }
}
