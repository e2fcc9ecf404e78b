//! Per-IdP state shared by every key that uses the same token endpoint and client.
//!
//! The IdP's limits apply to a client at an endpoint, not to one cache key, so this state is
//! keyed by (token URL, client id): a 429 blocks every key of that client until the IdP's
//! `Retry-After`; the quota guard counts that client's requests in a sliding hour; a semaphore
//! bounds concurrent requests so a hung IdP cannot pile up connections. Locks here are std
//! mutexes held for a few instructions, never across an await.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::lock;
use crate::idp::RateLimitHeaders;

/// The window of the quota guard.
const QUOTA_WINDOW: Duration = Duration::from_secs(3600);

/// State of one (token URL, client id).
pub struct Upstream {
    /// Bounds concurrent requests.
    pub permits: Arc<Semaphore>,
    blocked_until: Mutex<Option<Instant>>,
    recent_fetches: Mutex<VecDeque<Instant>>,
    rate_limit: Mutex<RateLimitHeaders>,
}

impl Upstream {
    /// State for a client that allows `max_concurrent` requests in flight.
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            blocked_until: Mutex::new(None),
            recent_fetches: Mutex::new(VecDeque::new()),
            rate_limit: Mutex::new(RateLimitHeaders::default()),
        }
    }

    /// How long requests must still wait after a 429, if they must.
    pub fn blocked_for(&self, now: Instant) -> Option<Duration> {
        lock(&self.blocked_until)
            .and_then(|until| until.checked_duration_since(now))
            .filter(|wait| !wait.is_zero())
    }

    /// Blocks every request to this client for `wait` (a longer block already in place stays).
    pub fn block(&self, now: Instant, wait: Duration) {
        let until = now + wait;
        let mut blocked = lock(&self.blocked_until);
        if blocked.is_none_or(|current| current < until) {
            *blocked = Some(until);
        }
    }

    /// Lifts a block (the client's settings changed, so the IdP's answer may differ).
    pub fn unblock(&self) {
        *lock(&self.blocked_until) = None;
    }

    /// Counts one request against `max_per_hour`; `Err(wait)` when the quota is spent, with the
    /// time until the oldest counted request leaves the window.
    pub fn take_quota(&self, now: Instant, max_per_hour: Option<u32>) -> Result<(), Duration> {
        let Some(max) = max_per_hour else {
            return Ok(());
        };
        let mut recent = lock(&self.recent_fetches);
        while recent
            .front()
            .is_some_and(|at| now.duration_since(*at) >= QUOTA_WINDOW)
        {
            recent.pop_front();
        }
        if recent.len() >= usize::try_from(max).unwrap_or(usize::MAX) {
            // The oldest counted request leaves the window first (none: a limit of 0, which
            // configuration refuses, waits the whole window).
            let counted = recent
                .front()
                .map_or(Duration::ZERO, |oldest| now.duration_since(*oldest));
            return Err(QUOTA_WINDOW.saturating_sub(counted));
        }
        recent.push_back(now);
        Ok(())
    }

    /// Keeps the rate-limit headers of the latest answer that carried any.
    pub fn record_rate_limit(&self, headers: RateLimitHeaders) {
        if headers != RateLimitHeaders::default() {
            *lock(&self.rate_limit) = headers;
        }
    }

    /// The rate-limit headers of the latest answer that carried any.
    pub fn rate_limit(&self) -> RateLimitHeaders {
        *lock(&self.rate_limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_counts_a_sliding_hour() {
        let upstream = Upstream::new(8);
        let start = crate::clock::Clock::system().instant();
        assert!(upstream.take_quota(start, Some(2)).is_ok());
        assert!(
            upstream
                .take_quota(start + Duration::from_secs(10), Some(2))
                .is_ok()
        );
        let wait = upstream
            .take_quota(start + Duration::from_secs(20), Some(2))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(3580));
        assert!(upstream.take_quota(start + QUOTA_WINDOW, Some(2)).is_ok());
        assert!(upstream.take_quota(start, None).is_ok());
    }

    #[test]
    fn a_block_lasts_until_its_end_and_never_shrinks() {
        let upstream = Upstream::new(8);
        let now = crate::clock::Clock::system().instant();
        upstream.block(now, Duration::from_secs(30));
        upstream.block(now, Duration::from_secs(5));
        assert_eq!(upstream.blocked_for(now), Some(Duration::from_secs(30)));
        assert_eq!(upstream.blocked_for(now + Duration::from_secs(31)), None);
    }
}
