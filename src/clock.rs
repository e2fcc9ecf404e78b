//! The one clock: every decision that depends on time (refresh ahead, expiry, backoff, 429
//! pauses, remembered rejections, idle timeouts, rate-limit windows, JWKS refreshes) reads it
//! here, so that tests can move time instead of waiting for it.
//!
//! [`Clock::system`] is the real clock. [`Clock::manual`] runs with real time and can be moved
//! ahead by [`Clock::advance`]: real time still passes, so network timeouts behave as in
//! production, while minutes of token life pass at once. Its [`Clock::sleep`] wakes when the
//! clock is moved past its deadline. Timers that are about the network itself (connection
//! retries, probes, accept pauses) use tokio's timers directly. `clippy.toml` bans
//! `Instant::now` and `SystemTime::now` everywhere else. A manual clock is for real time: under
//! tokio's paused test clock its sleeps would never see the time they wait for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// Where the time comes from; cheap to clone (a pointer at most).
#[derive(Clone, Default)]
pub struct Clock {
    /// `None` for the system clock; a manual clock's distance ahead of it otherwise.
    ahead: Option<Arc<Ahead>>,
}

/// How far a manual clock runs ahead of real time.
struct Ahead {
    /// Nanoseconds ahead (a `u64` covers 584 years).
    nanos: AtomicU64,
    /// Told each time the clock moves, so that sleepers look at their deadline again.
    moved: watch::Sender<()>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.ahead {
            None => f.write_str("Clock::system"),
            Some(ahead) => write!(
                f,
                "Clock::manual(+{:?})",
                Duration::from_nanos(ahead.nanos.load(Ordering::Relaxed))
            ),
        }
    }
}

impl Clock {
    /// The real clock.
    pub fn system() -> Self {
        Self { ahead: None }
    }

    /// A clock that follows real time and that [`Clock::advance`] moves ahead of it.
    pub fn manual() -> Self {
        Self {
            ahead: Some(Arc::new(Ahead {
                nanos: AtomicU64::new(0),
                moved: watch::Sender::new(()),
            })),
        }
    }

    /// Moves a manual clock `by` ahead, waking the sleepers whose deadline has come; the system
    /// clock cannot be moved and ignores it.
    pub fn advance(&self, by: Duration) {
        if let Some(ahead) = &self.ahead {
            let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            let _ = ahead
                .nanos
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |nanos| {
                    Some(nanos.saturating_add(by))
                });
            ahead.moved.send_replace(());
        }
    }

    /// How far this clock is ahead of real time.
    fn offset(&self) -> Duration {
        match &self.ahead {
            None => Duration::ZERO,
            Some(ahead) => Duration::from_nanos(ahead.nanos.load(Ordering::Acquire)),
        }
    }

    /// The wall-clock time now: what tokens' `expires_at` and Unix timestamps are compared with.
    #[allow(
        clippy::disallowed_methods,
        reason = "the one reader of the system clock"
    )]
    pub fn now(&self) -> SystemTime {
        let now = SystemTime::now();
        match &self.ahead {
            None => now,
            Some(_) => now.checked_add(self.offset()).unwrap_or(now),
        }
    }

    /// A monotonic instant now: what deadlines and pauses are measured with.
    #[allow(
        clippy::disallowed_methods,
        reason = "the one reader of the system clock"
    )]
    pub fn instant(&self) -> Instant {
        let now = Instant::now();
        match &self.ahead {
            None => now,
            Some(_) => now.checked_add(self.offset()).unwrap_or(now),
        }
    }

    /// Seconds since the Unix epoch now, with a fraction (0 before 1970).
    pub fn unix_seconds(&self) -> f64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64())
    }

    /// Waits `duration` of this clock's time.
    pub async fn sleep(&self, duration: Duration) {
        let deadline = self.instant().checked_add(duration);
        match deadline {
            Some(deadline) => self.sleep_until(deadline).await,
            // Further than the clock can count: never in practice, but never spin either.
            None => std::future::pending().await,
        }
    }

    /// Waits until this clock reads `deadline` (at once when it has passed).
    pub async fn sleep_until(&self, deadline: Instant) {
        let Some(ahead) = &self.ahead else {
            tokio::time::sleep_until(deadline.into()).await;
            return;
        };
        let mut moved = ahead.moved.subscribe();
        loop {
            let now = self.instant();
            if now >= deadline {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(deadline - now) => {}
                changed = moved.changed() => {
                    if changed.is_err() {
                        // The clock is gone with its last owner; real time still runs.
                        tokio::time::sleep(deadline.saturating_duration_since(self.instant())).await;
                        return;
                    }
                }
            }
        }
    }
}

/// Milliseconds from the Unix epoch to `at` (0 before it), as Redis values and timestamps keep
/// them.
pub fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}

/// Whole milliseconds of `duration`, at least 1 (Redis refuses a TTL of 0), as Redis TTLs take
/// them.
pub fn ttl_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_moves_and_wakes_its_sleepers() {
        let clock = Clock::manual();
        let (wall, instant) = (clock.now(), clock.instant());
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep(Duration::from_secs(3600)).await }
        });
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(3600));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("the sleeper woke when the clock moved")
            .expect("the sleeper did not panic");
        assert!(clock.now().duration_since(wall).unwrap() >= Duration::from_secs(3600));
        assert!(clock.instant() - instant >= Duration::from_secs(3600));
    }

    #[test]
    fn the_system_clock_ignores_advance() {
        let clock = Clock::system();
        let before = clock.now();
        clock.advance(Duration::from_secs(3600));
        assert!(clock.now().duration_since(before).unwrap() < Duration::from_secs(60));
    }

    #[test]
    fn conversions_saturate() {
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(unix_millis(UNIX_EPOCH + Duration::from_millis(1500)), 1500);
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::MAX), u64::MAX);
    }
}
