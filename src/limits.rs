//! Rate limits and budgets: each caller's requests per second (checked by `auth` on every
//! authenticated request) and IdP requests per minute (spent by `broker` when a caller's request
//! starts one), with the keys a caller may create.
//!
//! The limiter is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): a
//! caller allowed `n` requests per second may send bursts of `n`, then one every `1/n` seconds.
//! The whole state is one `AtomicU64` updated with compare-and-swap, so the check costs a clock
//! read and an atomic operation and never waits: a mutex would queue every request of a busy
//! caller behind the others.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A token bucket of `rate` requests per period with a burst of `rate`.
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
        Self::per_period(rate, Duration::from_secs(1))
    }

    /// A limiter of `rate` requests per minute, starting full.
    pub fn per_minute(rate: NonZeroU32) -> Self {
        Self::per_period(rate, Duration::from_secs(60))
    }

    fn per_period(rate: NonZeroU32, period: Duration) -> Self {
        let period = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
        let interval = (period / u64::from(rate.get())).max(1);
        #[allow(
            clippy::disallowed_methods,
            reason = "only an origin: the limiter measures the instants it is given from it, and \
                      no clock reads earlier than real time"
        )]
        let origin = Instant::now();
        Self {
            origin,
            full_at: AtomicU64::new(0),
            interval,
            tolerance: interval.saturating_mul(u64::from(rate.get()) - 1),
        }
    }

    /// Gives back one request taken by [`RateLimiter::check`] that turned out not to be needed.
    pub fn refund(&self) {
        let mut full_at = self.full_at.load(Ordering::Relaxed);
        loop {
            match self.full_at.compare_exchange_weak(
                full_at,
                full_at.saturating_sub(self.interval),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(current) => full_at = current,
            }
        }
    }

    /// Takes one request at `now`, or says how long until one would be allowed.
    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        let now = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX);
        let mut full_at = self.full_at.load(Ordering::Relaxed);
        loop {
            let start = full_at.max(now);
            let ahead = start.saturating_sub(now);
            if ahead > self.tolerance {
                return Err(Duration::from_nanos(ahead.saturating_sub(self.tolerance)));
            }
            match self.full_at.compare_exchange_weak(
                full_at,
                start.saturating_add(self.interval),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => full_at = current,
            }
        }
    }
}

/// One caller's bounds on the work it can make the IdP do: IdP requests per minute
/// (`idp_requests_per_minute`) and keys created in the cache (`max_keys`). Charged only for the
/// IdP requests a caller's own requests start; joining another's fetch costs nothing.
#[derive(Debug)]
pub struct IdpBudget {
    caller: Arc<str>,
    requests: RateLimiter,
    per_minute: NonZeroU32,
    max_keys: usize,
    keys: AtomicUsize,
    counters: BudgetCounters,
}

/// The counters of one caller's budget.
#[derive(Debug, Clone)]
pub struct BudgetCounters {
    /// IdP requests charged.
    pub idp_requests: metrics::Counter,
    /// Requests refused for `idp_requests_per_minute`.
    pub refused_budget: metrics::Counter,
    /// Requests refused for `max_keys`.
    pub refused_keys: metrics::Counter,
}

impl BudgetCounters {
    /// Counters that count nowhere.
    pub fn noop() -> Self {
        Self {
            idp_requests: metrics::Counter::noop(),
            refused_budget: metrics::Counter::noop(),
            refused_keys: metrics::Counter::noop(),
        }
    }
}

impl IdpBudget {
    /// A full budget for `caller`, counting in `counters`.
    pub fn new(
        caller: Arc<str>,
        per_minute: NonZeroU32,
        max_keys: usize,
        counters: BudgetCounters,
    ) -> Self {
        Self {
            caller,
            requests: RateLimiter::per_minute(per_minute),
            per_minute,
            max_keys,
            keys: AtomicUsize::new(0),
            counters,
        }
    }

    /// The caller's name.
    pub fn caller(&self) -> &str {
        &self.caller
    }

    /// Spends one IdP request; `Err(wait)` when the minute's budget is spent.
    pub fn spend(&self, now: Instant) -> Result<(), Duration> {
        self.requests.check(now)
    }

    /// Gives back a request that was spent but made no IdP request after all (the shared level
    /// or a remembered answer served it).
    pub fn refund(&self) {
        self.requests.refund();
    }

    /// Counts one IdP request made for the caller, in `token_broker_caller_idp_requests_total`.
    pub fn record_idp_request(&self) {
        self.counters.idp_requests.increment(1);
    }

    /// Counts a request refused because the minute's budget is spent.
    pub fn record_refused_budget(&self) {
        self.counters.refused_budget.increment(1);
    }

    /// Counts a request refused because the caller has `max_keys` keys.
    pub fn record_refused_keys(&self) {
        self.counters.refused_keys.increment(1);
    }

    /// Takes one of the caller's `max_keys` key slots, given back when the slot is dropped;
    /// `None` when all are taken.
    pub fn key_slot(self: &Arc<Self>) -> Option<KeySlot> {
        self.take_key().then(|| KeySlot {
            budget: Arc::clone(self),
            held: AtomicBool::new(true),
        })
    }

    /// Takes one of the caller's `max_keys` key slots; false when all are taken.
    fn take_key(&self) -> bool {
        self.keys
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |keys| {
                (keys < self.max_keys).then_some(keys + 1)
            })
            .is_ok()
    }

    /// Gives back a key slot (the key left the cache, or was never created).
    fn release_key(&self) {
        let _ = self
            .keys
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |keys| {
                keys.checked_sub(1)
            });
    }

    /// The caller's `max_keys`.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// The configured limits: IdP requests per minute and `max_keys`.
    pub fn limits(&self) -> (NonZeroU32, usize) {
        (self.per_minute, self.max_keys)
    }

    /// Key slots in use.
    pub fn keys(&self) -> usize {
        self.keys.load(Ordering::Acquire)
    }
}

/// One of a caller's `max_keys` slots, held by the cached tokens of the key it created (each
/// token of the key shares it) and given back when the last of them is dropped, however the key
/// leaves the cache, or at once when the key is forgotten.
#[derive(Debug)]
pub struct KeySlot {
    budget: Arc<IdpBudget>,
    held: AtomicBool,
}

impl KeySlot {
    /// Gives the slot back now (the key was forgotten); later calls and the drop do nothing.
    pub fn release(&self) {
        if self.held.swap(false, Ordering::AcqRel) {
            self.budget.release_key();
        }
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        self.release();
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
    fn per_minute_budgets_refund_and_bound_keys() {
        let budget = IdpBudget::new(
            Arc::from("billing"),
            NonZeroU32::new(2).unwrap(),
            1,
            BudgetCounters::noop(),
        );
        let now = crate::clock::Clock::system().instant();
        assert!(budget.spend(now).is_ok() && budget.spend(now).is_ok());
        let wait = budget.spend(now).unwrap_err();
        assert!(
            wait > Duration::from_secs(29) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        budget.refund();
        assert!(budget.spend(now).is_ok());
        assert!(budget.take_key() && !budget.take_key());
        budget.release_key();
        budget.release_key();
        assert_eq!(budget.keys(), 0);
        let budget = Arc::new(budget);
        let slot = Arc::new(budget.key_slot().expect("a free slot"));
        assert!(budget.key_slot().is_none());
        let shared = Arc::clone(&slot);
        drop(slot);
        assert_eq!(budget.keys(), 1, "a successor still holds it");
        drop(shared);
        assert_eq!(budget.keys(), 0);
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
