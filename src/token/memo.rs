//! A kept grant's memory of the token it was last handed, so that the same request again skips
//! the cache's lookup.
//!
//! The memory answers only within [`MEMO_WINDOW_MS`] of the last lookup that found the token in
//! the cache, and only while the cache still holds it: the broker retires every token the cache
//! lets go of (removed by a `DELETE` or an invalidation, replaced by a refresh, expired, evicted),
//! and does so before a removal or a replacement returns. So a hit through the memory hands out
//! what the lookup would have, and the cache still sees each token in use read at least once per
//! window, which is what its eviction order is made of.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::SystemTime;

use super::CachedToken;
use crate::clock::unix_millis;

/// How long, in milliseconds, a lookup in the cache vouches for the token it found.
pub const MEMO_WINDOW_MS: u64 = 1_000;

/// The token a kept grant was last handed, and when the cache last confirmed it.
#[derive(Default)]
pub struct TokenMemo {
    token: RwLock<Weak<CachedToken>>,
    /// Milliseconds since the Unix epoch of the lookup that found `token`; 0 when none did.
    looked_up_ms: AtomicU64,
}

impl TokenMemo {
    /// The token remembered, if a lookup found it within the window before `now` and the cache
    /// has not retired it since.
    pub fn recall(&self, now: SystemTime) -> Option<Arc<CachedToken>> {
        let looked_up = self.looked_up_ms.load(Ordering::Acquire);
        let elapsed = unix_millis(now).checked_sub(looked_up)?;
        if looked_up == 0 || elapsed >= MEMO_WINDOW_MS {
            return None;
        }
        let token = self
            .token
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade()?;
        (!token.is_retired()).then_some(token)
    }

    /// Remembers `token`, which a lookup in the cache found at `now`.
    pub fn remember(&self, token: &Arc<CachedToken>, now: SystemTime) {
        *self.token.write().unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(token);
        self.looked_up_ms
            .store(unix_millis(now).max(1), Ordering::Release);
    }
}

impl std::fmt::Debug for TokenMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMemo")
            .field("looked_up_ms", &self.looked_up_ms.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::idp::{AccessToken, IssuedToken};

    fn token(at: SystemTime) -> Arc<CachedToken> {
        let issued = IssuedToken {
            access_token: AccessToken::new("t"),
            token_type: "Bearer".to_owned(),
            lifetime: Duration::from_secs(3600),
            scope: None,
        };
        Arc::new(CachedToken::new(issued, at, 0.25, Duration::ZERO, 0.0))
    }

    #[test]
    fn answers_within_the_window_until_the_token_is_retired() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let memo = TokenMemo::default();
        assert!(memo.recall(at).is_none(), "nothing remembered yet");
        let cached = token(at);
        memo.remember(&cached, at);
        let within = at + Duration::from_millis(MEMO_WINDOW_MS - 1);
        assert!(
            memo.recall(within)
                .is_some_and(|t| Arc::ptr_eq(&t, &cached))
        );
        assert!(
            memo.recall(at + Duration::from_millis(MEMO_WINDOW_MS))
                .is_none()
        );
        assert!(
            memo.recall(at - Duration::from_millis(1)).is_none(),
            "clock went back"
        );
        cached.retire();
        assert!(memo.recall(within).is_none(), "retired by the cache");
        memo.remember(&token(at), at);
        assert!(
            memo.recall(within).is_none(),
            "dropped: only the cache keeps tokens alive"
        );
    }
}
