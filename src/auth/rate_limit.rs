//! Per-caller request rate limits, checked on every authenticated request.
//!
//! The limiter is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): a
//! caller allowed `n` requests per second may send bursts of `n`, then one every `1/n` seconds.
//! The whole state is one `AtomicU64` updated with compare-and-swap, so the check costs a clock
//! read and an atomic operation and never waits: a mutex would queue every request of a busy
//! caller behind the others.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A token bucket of `rate` requests per second with a burst of `rate`.
#[derive(Debug)]
pub struct RateLimiter {
    /// The zero of the nanosecond clock below.
    origin: Instant,
    /// The theoretical arrival time: nanoseconds after `origin` at which the bucket is full again.
    full_at: AtomicU64,
    /// Nanoseconds one request uses up.
    interval: u64,
    /// How far ahead of now `full_at` may run: the burst beyond one request, in nanoseconds.
    tolerance: u64,
}

impl RateLimiter {
    /// A limiter of `rate` requests per second, starting full.
    pub fn per_second(rate: NonZeroU32) -> Self {
        let interval = 1_000_000_000 / u64::from(rate.get());
        Self {
            origin: Instant::now(),
            full_at: AtomicU64::new(0),
            interval,
            tolerance: interval * (u64::from(rate.get()) - 1),
        }
    }

    /// Takes one request at `now`, or says how long until one would be allowed.
    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        let now = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX);
        let mut full_at = self.full_at.load(Ordering::Relaxed);
        loop {
            let start = full_at.max(now);
            let ahead = start - now;
            if ahead > self.tolerance {
                return Err(Duration::from_nanos(ahead - self.tolerance));
            }
            match self.full_at.compare_exchange_weak(
                full_at,
                start + self.interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => full_at = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: u32) -> RateLimiter {
        RateLimiter::per_second(NonZeroU32::new(rate).unwrap())
    }

    #[test]
    fn a_burst_of_rate_then_one_per_interval() {
        let limiter = limiter(4);
        let start = limiter.origin;
        for _ in 0..4 {
            assert_eq!(limiter.check(start), Ok(()));
        }
        assert_eq!(limiter.check(start), Err(Duration::from_millis(250)));
        let later = start + Duration::from_millis(250);
        assert_eq!(limiter.check(later), Ok(()));
        assert!(limiter.check(later).is_err());
        let idle = start + Duration::from_secs(10);
        for _ in 0..4 {
            assert_eq!(limiter.check(idle), Ok(()));
        }
        assert!(limiter.check(idle).is_err());
    }

    #[test]
    fn one_per_second_waits_a_second() {
        let limiter = limiter(1);
        let start = limiter.origin;
        assert_eq!(limiter.check(start), Ok(()));
        let wait = limiter
            .check(start + Duration::from_millis(100))
            .unwrap_err();
        assert_eq!(wait, Duration::from_millis(900));
    }

    #[test]
    fn concurrent_requests_never_exceed_the_burst() {
        let limiter = std::sync::Arc::new(limiter(50));
        let now = limiter.origin;
        let admitted: usize = (0..4)
            .map(|_| {
                let limiter = std::sync::Arc::clone(&limiter);
                std::thread::spawn(move || (0..100).filter(|_| limiter.check(now).is_ok()).count())
            })
            .map(|thread| thread.join().unwrap())
            .sum();
        assert_eq!(admitted, 50);
    }
}
