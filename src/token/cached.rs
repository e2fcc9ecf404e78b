//! A cached token and its pre-serialised response body.
//!
//! The hot path hands out the same token many times a second, so the caller's JSON body is
//! serialised when the token arrives and kept whole. Only `expires_in` changes, from one second to
//! the next: the first hit of a new second renders the body again with the new number, and every
//! other hit clones the body as it is (a reference count, no copy).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::{BufMut as _, Bytes, BytesMut};
use subtle::ConstantTimeEq as _;

use super::id::{SharedKey, TokenDigest};
use super::refresh_backoff;
use crate::clock::unix_millis;
use crate::idp::{AccessToken, IssuedToken};
use crate::limits::KeySlot;
use crate::telemetry::audit::HandOuts;
use crate::telemetry::format::push_json_str;

/// A token in the cache, with its timing and its response body.
///
/// Laid out in declaration order (`repr(C)`): what a hit reads and writes comes first, together
/// with the reference counts before it in 128 bytes, two cache lines' worth (two or three lines,
/// as the allocation happens to be aligned).
#[repr(C)]
pub struct CachedToken {
    /// When the token stops being valid.
    pub expires_at: SystemTime,
    /// When a background refresh should start (with jitter).
    pub refresh_at: SystemTime,
    hits: AtomicU64,
    /// The cache let go of the token: a [`super::TokenMemo`] must look it up again.
    retired: AtomicBool,
    /// A `DELETE` asked for a new token within `min_refetch_interval` of this one's fetch.
    refetch_requested: AtomicBool,
    refreshing: AtomicBool,
    /// The response body as a hit last saw it.
    rendered: Mutex<Rendered>,
    /// Who was handed this token, for the audit trail (the first caller's counter first).
    hand_outs: HandOuts,
    /// Failed refreshes in a row, for the backoff.
    refresh_failures: AtomicU32,
    /// Where the `expires_in` number starts in the body.
    expires_in_at: usize,
    /// Milliseconds since the Unix epoch before which no refresh starts (after a failed one).
    refresh_not_before_ms: AtomicU64,
    /// When the broker received the token.
    pub fetched_at: SystemTime,
    /// The token's value, kept apart when JSON had to escape it in the body; else the body
    /// holds it verbatim at [`TOKEN_OFFSET`], and it is not stored twice.
    token_apart: Option<AccessToken>,
    /// The token's length in bytes.
    token_len: usize,
    token_type: Box<str>,
    scope: Option<Box<str>>,
    /// The `max_keys` slot of the caller whose request created the key, shared by the key's
    /// later tokens.
    owner: OnceLock<Arc<KeySlot>>,
    /// Where the token lives in the shared level, when there is one (so that an invalidation
    /// from another replica finds it).
    shared_key: Option<SharedKey>,
}

/// The whole response body for one value of `expires_in`. It holds the token: no `Debug`.
#[derive(Clone)]
struct Rendered {
    body: Bytes,
    /// Whole seconds of validity the body says are left.
    expires_in: u64,
}

impl CachedToken {
    /// Wraps a freshly issued token. Of its servable life (`lifetime - min_remaining`), the last
    /// `refresh_ahead` fraction is when a background refresh may start:
    /// `fetched_at + (1 - refresh_ahead) × (expires_at - min_remaining - fetched_at)`, and
    /// `jitter` (0..1) spreads refreshes of tokens fetched together over the first tenth of that
    /// window.
    pub fn new(
        issued: IssuedToken,
        fetched_at: SystemTime,
        refresh_ahead: f64,
        min_remaining: Duration,
        jitter: f64,
    ) -> Self {
        // The IdP client clamps lifetimes to a year, so these sums cannot overflow; saturate
        // anyway rather than trust that from here.
        let expires_at = fetched_at
            .checked_add(issued.lifetime)
            .unwrap_or(fetched_at);
        let servable = issued.lifetime.saturating_sub(min_remaining);
        let ahead = servable.mul_f64(refresh_ahead.clamp(0.0, 1.0));
        let start = servable.saturating_sub(ahead) + ahead.mul_f64(0.1 * jitter.clamp(0.0, 1.0));
        let refresh_at = fetched_at.checked_add(start).unwrap_or(expires_at);
        let expires_in = issued.lifetime.as_secs();
        let (body, expires_in_at) = render_body(&issued, expires_at, expires_in);
        // The body holds the token verbatim unless JSON had to escape it.
        let raw = issued.access_token.expose();
        let token_len = raw.len();
        let verbatim = body.get(TOKEN_OFFSET..TOKEN_OFFSET + token_len) == Some(raw.as_bytes());
        let token_apart = (!verbatim).then_some(issued.access_token);
        Self {
            token_apart,
            token_len,
            token_type: issued.token_type.into_boxed_str(),
            scope: issued.scope.map(String::into_boxed_str),
            fetched_at,
            expires_at,
            refresh_at,
            rendered: Mutex::new(Rendered { body, expires_in }),
            expires_in_at,
            hits: AtomicU64::new(0),
            refreshing: AtomicBool::new(false),
            refresh_failures: AtomicU32::new(0),
            refresh_not_before_ms: AtomicU64::new(0),
            refetch_requested: AtomicBool::new(false),
            owner: OnceLock::new(),
            shared_key: None,
            hand_outs: HandOuts::default(),
            retired: AtomicBool::new(false),
        }
    }

    /// Records where the token lives in the shared level.
    pub fn with_shared_key(mut self, key: SharedKey) -> Self {
        self.shared_key = Some(key);
        self
    }

    /// Who was handed this token, for the audit trail.
    pub fn hand_outs(&self) -> &HandOuts {
        &self.hand_outs
    }

    /// Where the token lives in the shared level, when there is one.
    pub fn shared_key(&self) -> Option<&SharedKey> {
        self.shared_key.as_ref()
    }

    /// SHA-256 of the token value, for compare-and-delete across replicas.
    pub fn digest(&self) -> TokenDigest {
        TokenDigest::of(self.access_token().expose())
    }

    /// Whether the token serves a request for `required` validity that started at `started`:
    /// it has that much left at `now`, or it was fetched since the request started and lives
    /// that long (a fetch the request waited for is as good as its own).
    pub fn serves(&self, now: SystemTime, required: Duration, started: SystemTime) -> bool {
        self.remaining(now) >= required
            || (self.fetched_at >= started && self.lifetime() >= required)
    }

    /// Validity left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }

    /// The whole validity the IdP granted.
    pub fn lifetime(&self) -> Duration {
        self.expires_at
            .duration_since(self.fetched_at)
            .unwrap_or(Duration::ZERO)
    }

    /// The token value: shared with the body unless JSON had to escape it.
    pub fn access_token(&self) -> AccessToken {
        match &self.token_apart {
            Some(token) => token.clone(),
            None => {
                let body = self.lock_rendered().body.clone();
                AccessToken::from_shared(body.slice(TOKEN_OFFSET..TOKEN_OFFSET + self.token_len))
            }
        }
    }

    /// The token type the IdP gave, usually `Bearer`.
    pub fn token_type(&self) -> &str {
        &self.token_type
    }

    /// The scopes the IdP granted, when it said.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// Whether `candidate` is this token (constant time, for compare-and-delete).
    pub fn is(&self, candidate: &str) -> bool {
        self.access_token()
            .expose()
            .as_bytes()
            .ct_eq(candidate.as_bytes())
            .into()
    }

    /// Counts one caller served from this entry.
    pub fn record_hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// How many callers were served from this entry.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Claims the one background refresh of this entry; true for the first caller only.
    pub fn claim_refresh(&self) -> bool {
        !self.refreshing.swap(true, Ordering::AcqRel)
    }

    /// Releases the refresh claim without a failure (another flight of the key is under way).
    pub fn release_refresh(&self) {
        self.refreshing.store(false, Ordering::Release);
    }

    /// Whether a refresh may start at `now`: not before the backoff of a failed one has passed.
    pub fn refresh_allowed(&self, now: SystemTime) -> bool {
        let not_before = self.refresh_not_before_ms.load(Ordering::Relaxed);
        not_before == 0 || unix_millis(now) >= not_before
    }

    /// Records a failed refresh: releases the claim, so a later request may try again, but not
    /// before a backoff (exponential in the failures in a row, with `jitter` in 0..1 spreading it
    /// over its upper half).
    pub fn refresh_failed(&self, now: SystemTime, jitter: f64) {
        let failures = self.refresh_failures.fetch_add(1, Ordering::Relaxed);
        let wait = refresh_backoff(failures).mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        let not_before = now.checked_add(wait).unwrap_or(now);
        self.refresh_not_before_ms
            .store(unix_millis(not_before).max(1), Ordering::Relaxed);
        self.refreshing.store(false, Ordering::Release);
    }

    /// Records that the cache let go of the token (removed, replaced, expired or evicted).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Whether the cache let go of the token.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Marks the token for a new fetch once `min_refetch_interval` after its own has passed.
    pub fn request_refetch(&self) {
        self.refetch_requested.store(true, Ordering::Relaxed);
    }

    /// Whether a `DELETE` asked for a new token and, at `now`, the interval has passed.
    pub fn refetch_due(&self, now: SystemTime, min_refetch_interval: Duration) -> bool {
        self.refetch_requested.load(Ordering::Relaxed)
            && self
                .fetched_at
                .checked_add(min_refetch_interval)
                .is_none_or(|due| now >= due)
    }

    /// Whether a new token fetched now would be fetched within `min_refetch_interval` of this one.
    pub fn within_refetch_interval(&self, now: SystemTime, min_refetch_interval: Duration) -> bool {
        self.fetched_at
            .checked_add(min_refetch_interval)
            .is_some_and(|due| now < due)
    }

    /// The `max_keys` slot this key holds, when a caller's request created it.
    pub fn owner(&self) -> Option<&Arc<KeySlot>> {
        self.owner.get()
    }

    /// Records the `max_keys` slot the key holds (once).
    pub fn set_owner(&self, owner: Arc<KeySlot>) {
        let _ = self.owner.set(owner);
    }

    /// The caller-facing JSON body (docs/api.md, `GET /v1/tokens/{tenant}/{environment}`) with
    /// `expires_in` computed for `now`: the body kept when it says that number, else the body
    /// rendered with it, outside the lock, and kept if time has moved on (so a request that read
    /// the clock just before a second boundary does not undo the next second's body).
    pub fn body(&self, now: SystemTime) -> Bytes {
        let expires_in = self.remaining(now).as_secs();
        let kept = {
            let rendered = self.lock_rendered();
            if rendered.expires_in == expires_in {
                return rendered.body.clone();
            }
            Rendered::clone(&rendered)
        };
        let body = self.render(&kept, expires_in);
        let mut rendered = self.lock_rendered();
        if expires_in < rendered.expires_in {
            *rendered = Rendered {
                body: body.clone(),
                expires_in,
            };
        }
        body
    }

    /// `kept`'s body with `expires_in` in place of its number.
    fn render(&self, kept: &Rendered, expires_in: u64) -> Bytes {
        let mut digits = [0u8; 20];
        let old = decimal(kept.expires_in, &mut digits).len();
        let (head, rest) = kept.body.split_at(self.expires_in_at);
        debug_assert!(rest.len() >= old, "the number is where it was put");
        let tail = rest.get(old..).unwrap_or_default();
        let number = decimal(expires_in, &mut digits);
        let mut body = BytesMut::with_capacity(head.len() + number.len() + tail.len());
        body.put_slice(head);
        body.put_slice(number);
        body.put_slice(tail);
        body.freeze()
    }

    /// The body as last kept. The lock is held for a comparison and a clone (a reference
    /// count), or to replace the body, never while one is rendered.
    fn lock_rendered(&self) -> std::sync::MutexGuard<'_, Rendered> {
        self.rendered.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `n` in decimal, written at the end of `digits` (20 digits hold any `u64`); cheaper than the
/// formatting machinery on the hot path.
fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut start = digits.len();
    for slot in digits.iter_mut().rev() {
        // `n % 10` is below 10, so the cast is exact.
        *slot = b'0' + (n % 10) as u8;
        start -= 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    digits.get(start..).unwrap_or_default()
}

impl fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedToken")
            .field("access_token", &format_args!("[redacted]"))
            .field(
                "expires_at",
                &humantime::format_rfc3339_seconds(self.expires_at),
            )
            .field("hits", &self.hits())
            .finish_non_exhaustive()
    }
}

/// Where the token starts in the rendered body: after `{"access_token":"`.
const TOKEN_OFFSET: usize = r#"{"access_token":""#.len();

/// The body saying `expires_in`, and the offset where that number starts.
fn render_body(issued: &IssuedToken, expires_at: SystemTime, expires_in: u64) -> (Bytes, usize) {
    let mut body = String::from(r#"{"access_token":"#);
    push_json_str(&mut body, issued.access_token.expose());
    body.push_str(r#","token_type":"#);
    push_json_str(&mut body, &issued.token_type);
    body.push_str(r#","expires_in":"#);
    let expires_in_at = body.len();
    body.push_str(&expires_in.to_string());
    body.push_str(r#","expires_at":""#);
    body.push_str(&humantime::format_rfc3339_seconds(expires_at).to_string());
    body.push('"');
    if let Some(scope) = &issued.scope {
        body.push_str(r#","scope":"#);
        push_json_str(&mut body, scope);
    }
    body.push('}');
    // Kept for the token's lifetime: do not keep the spare capacity `format!` grew.
    body.shrink_to_fit();
    (Bytes::from(body), expires_in_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of reference counts `Arc` puts before its value.
    const ARC_COUNTS: usize = 2 * std::mem::size_of::<usize>();

    #[test]
    fn what_a_hit_reads_fits_in_two_cache_lines() {
        // The pointer to the first caller's audit counter is the first field of `hand_outs`.
        let inline_counter = std::mem::size_of::<OnceLock<Arc<()>>>();
        let end = ARC_COUNTS + std::mem::offset_of!(CachedToken, hand_outs) + inline_counter;
        assert!(end <= 128, "the hot fields end at byte {end}");
    }

    #[test]
    fn decimals() {
        let mut digits = [0u8; 20];
        for n in [0, 7, 10, 3599, 31_536_000, u64::MAX] {
            assert_eq!(decimal(n, &mut digits), n.to_string().as_bytes());
        }
    }

    #[test]
    fn body_is_the_documented_json_with_live_expires_in() {
        let issued = IssuedToken {
            access_token: AccessToken::new("abc\"def"),
            token_type: "Bearer".to_owned(),
            lifetime: Duration::from_secs(3600),
            scope: Some("a b".to_owned()),
        };
        let fetched = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let token = CachedToken::new(issued, fetched, 0.25, Duration::ZERO, 0.0);
        let body = token.body(fetched + Duration::from_millis(58_500));
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["access_token"], "abc\"def");
        assert_eq!(value["token_type"], "Bearer");
        assert_eq!(value["expires_in"], 3541);
        assert_eq!(value["expires_at"], "2027-01-15T09:00:00Z");
        assert_eq!(value["scope"], "a b");
        assert_eq!(token.refresh_at, fetched + Duration::from_secs(2700));
        assert!(token.is("abc\"def") && !token.is("abc"));
        assert!(!format!("{token:?}").contains("abc"));
    }

    #[test]
    fn hits_in_one_second_share_a_body_and_a_new_second_renders_its_number() {
        let fetched = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for value in ["plain.jwt.value", "needs\"escaping"] {
            let issued = IssuedToken {
                access_token: AccessToken::new(value),
                token_type: "Bearer".to_owned(),
                lifetime: Duration::from_secs(10),
                scope: None,
            };
            let token = CachedToken::new(issued, fetched, 0.25, Duration::ZERO, 0.0);
            let expires_in = |body: &Bytes| {
                let json: serde_json::Value = serde_json::from_slice(body).unwrap();
                assert_eq!(json["access_token"], value);
                json["expires_in"].as_u64().unwrap()
            };
            let first = token.body(fetched + Duration::from_millis(200));
            let again = token.body(fetched + Duration::from_millis(900));
            assert_eq!(expires_in(&first), 9);
            assert_eq!(first.as_ptr(), again.as_ptr(), "one second, one body");
            // 9 -> 10 -> 1 -> 0: the number's width changes both ways. A request that read the
            // clock before the kept body's second gets its own number and leaves the body kept.
            for (after_ms, left) in [(0, 10), (9_000, 1), (10_000, 0), (200, 9)] {
                let body = token.body(fetched + Duration::from_millis(after_ms));
                assert_eq!(expires_in(&body), left, "{value} at {after_ms} ms");
                assert_eq!(token.access_token().expose(), value);
            }
            let last = token.body(fetched + Duration::from_millis(10_500));
            assert_eq!(expires_in(&last), 0);
            assert_eq!(
                last.as_ptr(),
                token.body(fetched + Duration::from_millis(10_000)).as_ptr(),
                "the earlier request did not replace the body"
            );
            assert!(token.is(value));
        }
    }

    fn issued(lifetime: Duration) -> IssuedToken {
        IssuedToken {
            access_token: AccessToken::new("t"),
            token_type: "Bearer".to_owned(),
            lifetime,
            scope: None,
        }
    }

    #[test]
    fn refresh_starts_inside_the_servable_window() {
        let fetched = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // 120 s token, 60 s min_remaining: servable for 60 s, refresh in its last quarter.
        let token = CachedToken::new(
            issued(Duration::from_secs(120)),
            fetched,
            0.25,
            Duration::from_secs(60),
            0.0,
        );
        assert_eq!(token.refresh_at, fetched + Duration::from_secs(45));
        let jittered = CachedToken::new(
            issued(Duration::from_secs(120)),
            fetched,
            0.25,
            Duration::from_secs(60),
            1.0,
        );
        assert_eq!(jittered.refresh_at, fetched + Duration::from_millis(46_500));
        // A lifetime below min_remaining is never servable; nothing overflows.
        let short = CachedToken::new(
            issued(Duration::from_secs(30)),
            fetched,
            0.25,
            Duration::from_secs(60),
            0.5,
        );
        assert_eq!(short.refresh_at, fetched);
    }

    #[test]
    fn failed_refreshes_back_off_and_refetches_wait_for_the_interval() {
        let fetched = crate::clock::Clock::system().now();
        let token = CachedToken::new(
            issued(Duration::from_secs(3600)),
            fetched,
            0.25,
            Duration::from_secs(60),
            0.0,
        );
        assert!(token.refresh_allowed(fetched) && token.claim_refresh() && !token.claim_refresh());
        token.refresh_failed(fetched, 1.0);
        assert!(!token.refresh_allowed(fetched + Duration::from_millis(500)));
        assert!(token.refresh_allowed(fetched + Duration::from_millis(1001)));
        assert!(token.claim_refresh(), "the claim is released");
        token.refresh_failed(fetched, 1.0);
        assert!(
            !token.refresh_allowed(fetched + Duration::from_millis(1500)),
            "the second wait is longer"
        );

        let interval = Duration::from_secs(5);
        assert!(!token.refetch_due(fetched + Duration::from_secs(10), interval));
        token.request_refetch();
        assert!(!token.refetch_due(fetched + Duration::from_secs(1), interval));
        assert!(token.refetch_due(fetched + Duration::from_secs(5), interval));
    }
}
