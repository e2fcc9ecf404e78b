//! The token requests a caller was granted, kept with the caller, so that the same request again
//! skips parsing its query, checking the allow rules and building the cache key.
//!
//! A reload builds every caller anew, and the API keeps only a grant decided under the caller's
//! own configuration snapshot (it compares [`super::Caller::registry`]), so a kept grant is what
//! deciding again would give, until the caller is replaced. Refusals are never kept: they are
//! decided (and logged) each time. A caller keeps at most [`MAX_GRANTS`] grants, each for a
//! request target of at most [`MAX_TARGET_LEN`] bytes; other requests are decided each time, at
//! the cost they had before there was a memory.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::idp::EnvironmentSettings;
use crate::token::{TokenKey, TokenMemo};

/// Most grants a caller keeps: services ask for a handful of tokens each.
pub const MAX_GRANTS: usize = 32;
/// Longest request target (path and query) whose grant is kept.
pub const MAX_TARGET_LEN: usize = 512;

/// A token request that passed authentication, validation and authorisation.
///
/// Laid out in declaration order (`repr(C)`): what a hit through the memory reads comes first,
/// next to the reference counts (72 bytes with them); the key, read only when the cache is
/// looked up, after.
#[repr(C)]
pub struct Grant {
    /// The settings of the environment asked for.
    pub environment: Arc<EnvironmentSettings>,
    /// Validity the caller needs left on the token.
    pub min_ttl: Option<Duration>,
    /// The token this grant was last handed, while a kept grant is asked again.
    pub memo: TokenMemo,
    /// The token the caller may have.
    pub key: TokenKey,
}

/// A caller's grants by request target (`/v1/tokens/acme/production?scope=read`).
#[derive(Default)]
pub struct Grants {
    by_target: RwLock<HashMap<Box<str>, Arc<Grant>, foldhash::fast::RandomState>>,
}

impl Grants {
    /// The grant kept for `target`, if any.
    pub fn get(&self, target: &str) -> Option<Arc<Grant>> {
        self.by_target
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(target)
            .cloned()
    }

    /// Keeps `grant` for `target`, unless the target is too long or the caller keeps
    /// [`MAX_GRANTS`] already.
    pub fn keep(&self, target: &str, grant: &Arc<Grant>) {
        if target.len() > MAX_TARGET_LEN {
            return;
        }
        let mut by_target = self
            .by_target
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if by_target.len() < MAX_GRANTS {
            by_target.insert(target.into(), Arc::clone(grant));
        }
    }
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self
            .by_target
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("Grants").field("kept", &kept).finish()
    }
}
