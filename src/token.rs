//! The token core: what machine tokens (`broker`), user tokens (`user_tokens`) and the shared
//! level (`shared_cache`) all build on, so that none of them reaches into another's insides.
//!
//! - [`TokenKey`] and [`ScopeSet`]: which token a request is for, normalised before keying.
//! - [`CachedToken`]: a token with its timing and pre-built response body; [`Lease`] hands one out;
//!   [`TokenMemo`] lets a kept grant find its token again without a lookup.
//! - [`Sha256Id`] and its kinds ([`SharedKey`], [`TokenDigest`], [`HandleId`], [`PendingId`]):
//!   the one digest type of everything named by hash.
//! - The shared level's vocabulary ([`SharedToken`], [`Invalidation`], [`SharedEntry`],
//!   [`LockToken`], [`SharedCacheError`]).
//! - [`refresh_backoff`]: the one backoff of failed refreshes, machine or user.

mod cached;
mod id;
mod key;
mod memo;
mod shared;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use cached::CachedToken;
pub use id::{
    HandleId, HandleIdKind, IdKind, PendingId, PendingIdKind, Sha256Id, SharedKey, SharedKeyKind,
    TokenDigest, TokenDigestKind,
};
pub use key::{ScopeSet, TokenKey};
pub use memo::{MEMO_WINDOW_MS, TokenMemo};
pub use shared::{
    Invalidation, LockToken, RotatedSecret, SharedCacheError, SharedCacheStatus, SharedEntry,
    SharedFuture, SharedSecret, SharedToken, fingerprint,
};

/// First wait before a failed refresh is tried again; doubled per failure, before jitter.
const REFRESH_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest wait between two refresh attempts.
const REFRESH_BACKOFF_CAP: Duration = Duration::from_secs(60);

/// The wait before the next refresh after `failures_before` earlier failures in a row and one
/// more: 1 s, doubled per failure, at most a minute.
pub fn refresh_backoff(failures_before: u32) -> Duration {
    REFRESH_BACKOFF_BASE
        .saturating_mul(1 << failures_before.min(16))
        .min(REFRESH_BACKOFF_CAP)
}

/// Whether a request was answered from cache or waited on the IdP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from cache without waiting.
    Hit,
    /// Waited on an IdP request (its own or another's).
    Miss,
}

impl CacheStatus {
    /// `hit` or `miss`, as in the `x-cache` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
        }
    }
}

/// A token handed to a caller, and how it was found.
#[derive(Debug)]
pub struct Lease {
    /// The token.
    pub token: Arc<CachedToken>,
    /// Hit or miss.
    pub status: CacheStatus,
    /// When the broker found the token good for the caller: the instant its answer's
    /// `expires_in` counts from (read once per request).
    pub at: SystemTime,
}
