//! The audit trail: who was handed which token, and when, at the cost of a counter per hit.
//!
//! Lines go to the [`AUDIT`] target at INFO. A miss, a refusal and the first
//! hand-out of each token to each caller are each a line of their own. Later hand-outs of that
//! token to that caller add one to a counter held with the token ([`HandOuts`]), and every
//! `telemetry.audit_interval` [`AuditTrail::flush`] writes one summary line per counter that
//! moved, with the count; shutdown flushes once more, so no hand-out vanishes from the trail.
//!
//! A token is named by `token_sha256` (the first 16 hex digits of the SHA-256 of its value) and,
//! when it is a JWT with one, by its `jti`; never by its value. At most `capacity` counters are
//! kept (about 200 bytes each, see docs/guides/operating.md, "The audit trail"); a hand-out that finds the trail full is written
//! as a line of its own instead of being counted, so the bound costs log volume, never entries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::AUDIT;
use crate::clock::Clock;

/// An audit line about a [`Subject`]: who, which key, which token, then `$fields`.
macro_rules! subject_line {
    ($subject:expr, $message:literal, $($fields:tt)*) => {{
        let subject: &Subject = $subject;
        tracing::info!(
            target: AUDIT,
            caller = &*subject.caller,
            tenant = &*subject.tenant,
            environment = &*subject.environment,
            audience = &*subject.audience,
            scope = &*subject.scope,
            organization = subject.organization.as_deref(),
            session = subject.session.as_deref(),
            token_sha256 = subject.token.sha256(),
            jti = subject.token.jti(),
            $($fields)*
            $message
        )
    }};
}

/// Most (caller, token) counters that may be configured (about 200 MB of counters).
pub const MAX_COUNTERS: usize = 1_000_000;
/// Longest `jti` written; a longer one is left out rather than logged at any length.
const MAX_JTI_LEN: usize = 128;
/// Longest JWT payload decoded for its `jti`.
const MAX_PAYLOAD_LEN: usize = 16 * 1024;

/// `[telemetry]`: the audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// How often the counted hand-outs of each (caller, token) are written as a summary line.
    #[serde(with = "humantime_serde")]
    pub audit_interval: Duration,
    /// Most (caller, token) counters kept at once; beyond, hand-outs are written one by one.
    pub audit_max_counters: usize,
}

/// How an audit line names a token.
#[derive(Debug)]
pub struct TokenName {
    /// The first 16 hex digits of the SHA-256 of the token's value.
    sha256: [u8; 16],
    /// The token's `jti` claim, when it is a JWT with one.
    jti: Option<Box<str>>,
}

impl TokenName {
    /// Names `access_token`: the start of its SHA-256 and, for a JWT, its `jti`.
    pub fn of(access_token: &str) -> Self {
        let digest = Sha256::digest(access_token.as_bytes());
        let mut sha256 = [0u8; 16];
        // 8 bytes are 16 hex digits, which always fit.
        let _ = hex::encode_to_slice(digest.get(..8).unwrap_or_default(), &mut sha256);
        Self {
            sha256,
            jti: jwt_id(access_token),
        }
    }

    /// `token_sha256`: 16 lower-case hex digits.
    pub fn sha256(&self) -> &str {
        std::str::from_utf8(&self.sha256).unwrap_or_default()
    }

    /// The token's `jti`, when it has one.
    pub fn jti(&self) -> Option<&str> {
        self.jti.as_deref()
    }
}

/// The `jti` of a JWT's payload, when `token` is a JWT and has one of sane length.
fn jwt_id(token: &str) -> Option<Box<str>> {
    #[derive(Deserialize)]
    struct Claims {
        jti: Option<String>,
    }
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > MAX_PAYLOAD_LEN {
        return None;
    }
    let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let jti = serde_json::from_slice::<Claims>(&json).ok()?.jti?;
    (!jti.is_empty() && jti.len() <= MAX_JTI_LEN && !jti.chars().any(char::is_control))
        .then(|| jti.into_boxed_str())
}

/// Who was handed which token: what an audit line says besides its counts.
#[derive(Debug)]
pub struct Subject {
    /// The caller's configured name.
    pub caller: Arc<str>,
    /// The token's tenant.
    pub tenant: Arc<str>,
    /// The token's environment.
    pub environment: Arc<str>,
    /// The token's audience.
    pub audience: Arc<str>,
    /// The token's scopes, canonical.
    pub scope: Box<str>,
    /// The organization the token is for, if any.
    pub organization: Option<Arc<str>>,
    /// For a user token, the session it belongs to, named by the start of its handle's
    /// SHA-256 (never the handle).
    pub session: Option<Box<str>>,
    /// The token.
    pub token: Arc<TokenName>,
}

/// Hand-outs of one token to one caller since the last summary. What a hit reads comes first
/// (`repr(C)`), in one cache line.
#[derive(Debug)]
#[repr(C)]
struct Counter {
    /// The caller it counts for.
    caller_id: u64,
    count: AtomicU64,
    subject: Subject,
}

/// The audit state a cached token carries: its name, once needed, and a counter per caller it
/// was handed to. Caller ids are the broker's own numbers, so a fixed hash is enough.
///
/// Most tokens go to one caller: the token points to its counter from its first field
/// (`repr(C)`), which a hit reads without a lock or a map; other callers' counters are in a map
/// made for the second caller.
#[derive(Default)]
#[repr(C)]
pub struct HandOuts {
    first: OnceLock<Arc<Counter>>,
    name: OnceLock<Arc<TokenName>>,
    /// Counters are added under its write lock, `first` included.
    by_caller: RwLock<Option<Box<CounterMap>>>,
}

/// The counters of a token's callers after the first.
type CounterMap = HashMap<u64, Arc<Counter>, foldhash::fast::FixedState>;

impl std::fmt::Debug for HandOuts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandOuts").finish_non_exhaustive()
    }
}

impl HandOuts {
    /// The counter of the first caller, if it is `caller_id`.
    fn first_of(&self, caller_id: u64) -> Option<&Arc<Counter>> {
        self.first
            .get()
            .filter(|counter| counter.caller_id == caller_id)
    }

    /// `caller_id`'s counter, the first caller's or in `others` (`by_caller`, locked).
    fn counter_of<'a>(
        &'a self,
        others: &'a Option<Box<CounterMap>>,
        caller_id: u64,
    ) -> Option<&'a Arc<Counter>> {
        self.first_of(caller_id)
            .or_else(|| others.as_ref()?.get(&caller_id))
    }

    /// The token's name, computed (by `name`) the first time.
    fn name(&self, name: impl FnOnce() -> TokenName) -> Arc<TokenName> {
        Arc::clone(self.name.get_or_init(|| Arc::new(name())))
    }
}

/// How a caller came by a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// From the cache.
    Hit,
    /// After waiting on the IdP.
    Miss,
}

impl Served {
    fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
        }
    }
}

/// The counters of the trail and when their period began.
pub struct AuditTrail {
    counters: Mutex<Vec<Arc<Counter>>>,
    capacity: usize,
    /// When the counts being gathered began (the last flush).
    since: Mutex<SystemTime>,
    /// Hand-outs written one by one because the trail was full, since the last flush.
    unaggregated: AtomicU64,
    /// What summaries are dated by.
    clock: Clock,
}

impl AuditTrail {
    /// An empty trail keeping at most `capacity` counters, its summaries dated by `clock`.
    pub fn new(capacity: usize, clock: Clock) -> Self {
        Self {
            counters: Mutex::new(Vec::new()),
            capacity,
            since: Mutex::new(clock.now()),
            clock,
            unaggregated: AtomicU64::new(0),
        }
    }

    /// Records that the token whose audit state is `hand_outs` and whose name `name` gives
    /// ([`TokenName::of`] its value) was handed to caller `caller_id`: a counter added to when
    /// that caller had it before from the cache, else a line of its own. `name` and `subject`
    /// are called only for a line, so a counted hit reads neither.
    pub fn hand_out(
        &self,
        hand_outs: &HandOuts,
        caller_id: u64,
        served: Served,
        name: impl FnOnce() -> TokenName,
        subject: impl FnOnce(Arc<TokenName>) -> Subject,
    ) {
        if served == Served::Hit && count(hand_outs, caller_id) {
            return;
        }
        let subject = subject(hand_outs.name(name));
        let mut by_caller = hand_outs
            .by_caller
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        // Counters are added under the map's write lock, so this sees every counter there is.
        let aggregated = match hand_outs.counter_of(&by_caller, caller_id) {
            // Another request of this caller was first.
            Some(counter) if served == Served::Hit => {
                counter.count.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // A miss is always a line of its own; later hits are counted already.
            Some(_) => true,
            None => {
                let counter = Arc::new(Counter {
                    caller_id,
                    count: AtomicU64::new(0),
                    subject,
                });
                let registered = self.register(&counter);
                if registered && let Err(counter) = hand_outs.first.set(Arc::clone(&counter)) {
                    by_caller.get_or_insert_default().insert(caller_id, counter);
                }
                drop(by_caller);
                if !registered {
                    self.unaggregated.fetch_add(1, Ordering::Relaxed);
                }
                log_hand_out(&counter.subject, served, registered);
                return;
            }
        };
        drop(by_caller);
        log_hand_out(&subject, served, aggregated);
    }

    /// Adds `counter` to the trail; false when the trail is full.
    fn register(&self, counter: &Arc<Counter>) -> bool {
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        if counters.len() >= self.capacity {
            return false;
        }
        counters.push(Arc::clone(counter));
        true
    }

    /// Writes a summary line for every counter that moved since the last flush, and forgets the
    /// counters of tokens no longer cached. Called every `audit_interval` and at shutdown.
    pub fn flush(&self) {
        let now = self.clock.now();
        let since = std::mem::replace(
            &mut *self.since.lock().unwrap_or_else(PoisonError::into_inner),
            now,
        );
        let mut moved = Vec::new();
        {
            let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
            counters.retain(|counter| {
                // Read before the count: once the token is gone nothing can add to it, so the
                // count taken next is its last. The fence orders the two reads (the count could
                // otherwise be read first, and a last hit missed) and pairs with the release of
                // the token's drop.
                let token_gone = Arc::strong_count(counter) == 1;
                std::sync::atomic::fence(Ordering::Acquire);
                let count = counter.count.swap(0, Ordering::Relaxed);
                if count > 0 {
                    moved.push((Arc::clone(counter), count));
                }
                !token_gone
            });
        }
        let since = humantime::format_rfc3339_seconds(since).to_string();
        for (counter, count) in moved {
            subject_line!(
                &counter.subject,
                "tokens handed out from the cache",
                count,
                since = since.as_str(),
            );
        }
        let unaggregated = self.unaggregated.swap(0, Ordering::Relaxed);
        if unaggregated > 0 {
            tracing::warn!(
                unaggregated,
                capacity = self.capacity,
                "the audit trail was full: hand-outs were written one line each; raise \
                 telemetry.audit_max_counters"
            );
        }
    }

    /// Counters kept now, for tests and the figures of docs/guides/operating.md.
    pub fn counters(&self) -> usize {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for AuditTrail {
    /// Writes what is still counted: hits served after the shutdown flush (connections that
    /// outlived the grace period) are not lost either.
    fn drop(&mut self) {
        self.flush();
    }
}

/// Adds one to `caller_id`'s counter of a token; false when it has none yet.
fn count(hand_outs: &HandOuts, caller_id: u64) -> bool {
    if let Some(counter) = hand_outs.first_of(caller_id) {
        counter.count.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    let by_caller = hand_outs
        .by_caller
        .read()
        .unwrap_or_else(PoisonError::into_inner);
    match hand_outs.counter_of(&by_caller, caller_id) {
        Some(counter) => {
            counter.count.fetch_add(1, Ordering::Relaxed);
            true
        }
        None => false,
    }
}

/// The line of one hand-out; `aggregated`: whether later hits from the cache are counted
/// rather than written.
fn log_hand_out(subject: &Subject, served: Served, aggregated: bool) {
    subject_line!(
        subject,
        "token handed out",
        cache = served.as_str(),
        aggregated,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(name: Arc<TokenName>) -> Subject {
        Subject {
            caller: Arc::from("billing"),
            tenant: Arc::from("acme"),
            environment: Arc::from("production"),
            audience: Arc::from("https://api"),
            scope: "".into(),
            organization: None,
            session: None,
            token: name,
        }
    }

    #[test]
    fn tokens_are_named_by_digest_and_jti() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"jti":"abc-123","sub":"x"}"#);
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln");
        let name = TokenName::of(&jwt);
        assert_eq!(name.jti(), Some("abc-123"));
        assert_eq!(name.sha256().len(), 16);
        assert!(name.sha256().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            name.sha256(),
            &hex::encode(Sha256::digest(jwt.as_bytes()))[..16]
        );
        for opaque in ["opaque", "a.b.c", "a.b", "a.e30.c.d", ""] {
            assert_eq!(TokenName::of(opaque).jti(), None, "{opaque}");
        }
        let long = URL_SAFE_NO_PAD.encode(format!(r#"{{"jti":"{}"}}"#, "j".repeat(200)));
        assert_eq!(TokenName::of(&format!("h.{long}.s")).jti(), None);
    }

    /// What `caller`'s counter of `token` holds, if it has one.
    fn counted(token: &HandOuts, caller: u64) -> Option<u64> {
        let by_caller = token.by_caller.read().unwrap();
        let counter = token.counter_of(&by_caller, caller)?;
        Some(counter.count.load(Ordering::Relaxed))
    }

    #[test]
    fn concurrent_first_hand_outs_leave_one_counter_per_caller_and_lose_no_hit() {
        let trail = AuditTrail::new(100, Clock::system());
        let token = HandOuts::default();
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let (trail, token) = (&trail, &token);
                // Two callers race for the inline counter; the other one's goes in the map.
                let caller = 7 + thread % 2;
                scope.spawn(move || {
                    for _ in 0..1000 {
                        trail.hand_out(token, caller, Served::Hit, || TokenName::of("t"), subject);
                    }
                });
            }
        });
        // Each caller's first hand-out is a line, every other one is counted.
        assert_eq!(counted(&token, 7), Some(3999));
        assert_eq!(counted(&token, 8), Some(3999));
        assert_eq!(token.by_caller.read().unwrap().as_ref().unwrap().len(), 1);
        assert_eq!(trail.counters(), 2);
    }

    #[test]
    fn hits_are_counted_after_the_first_and_a_full_trail_counts_nothing() {
        let trail = AuditTrail::new(1, Clock::system());
        let token = HandOuts::default();
        trail.hand_out(&token, 1, Served::Miss, || TokenName::of("t"), subject);
        for _ in 0..5 {
            trail.hand_out(&token, 1, Served::Hit, || TokenName::of("t"), subject);
        }
        assert_eq!(trail.counters(), 1);
        assert_eq!(counted(&token, 1), Some(5));
        // Full: a second caller's hand-outs are lines, not counters.
        trail.hand_out(&token, 2, Served::Hit, || TokenName::of("t"), subject);
        assert_eq!(counted(&token, 2), None);
        trail.flush();
        assert_eq!(counted(&token, 1), Some(0));
        assert_eq!(trail.counters(), 1);
        // The token leaves the cache: its counter goes at the next flush.
        drop(token);
        trail.flush();
        assert_eq!(trail.counters(), 0);
    }
}
