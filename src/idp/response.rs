//! Parsing of token endpoint answers: the token, its lifetime, error codes and rate-limit headers.
//!
//! IdPs disagree on details: `expires_in` may be a number or a numeric string, or missing (then
//! the JWT `exp` claim or the configured default decides). Error bodies are reduced to their
//! OAuth2 `error` code, sanitised, because descriptions may echo request fields.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::header::HeaderMap;
use secrecy::SecretString;
use serde::Deserialize;

use super::{AccessToken, IdpError};

/// Longest error code passed on to callers; longer ones are cut.
const MAX_ERROR_CODE: usize = 64;

/// Longest token lifetime believed (`expires_in`, JWT `exp`): a year. Longer answers are cut to
/// it, so no later time arithmetic can overflow and a broken IdP cannot pin a token forever.
pub const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Longest pause believed from a 429 (`Retry-After`, `x-ratelimit-reset`): an hour.
pub const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// A token as the IdP issued it, with its lifetime resolved.
#[derive(Debug)]
pub struct IssuedToken {
    /// The bearer token.
    pub access_token: AccessToken,
    /// Usually `Bearer`.
    pub token_type: String,
    /// Validity from the moment of issue.
    pub lifetime: Duration,
    /// The scopes granted, when the IdP said.
    pub scope: Option<String>,
}

/// Auth0-style rate-limit and quota headers of a token answer: `x-ratelimit-limit`,
/// `-remaining`, `-reset`, and the M2M token quotas `auth0-client-quota-limit` and
/// `auth0-organization-quota-limit`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// Requests allowed in the current window.
    pub limit: Option<u64>,
    /// Requests left in the current window.
    pub remaining: Option<u64>,
    /// Unix time (seconds) at which the window resets.
    pub reset: Option<u64>,
    /// Tokens this client may still obtain, per quota bucket.
    pub client_quota: QuotaRemaining,
    /// Tokens the organization may still obtain, per quota bucket.
    pub organization_quota: QuotaRemaining,
}

/// Tokens left in Auth0's hourly and daily M2M quota buckets.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QuotaRemaining {
    /// Left in the current UTC hour.
    pub per_hour: Option<u64>,
    /// Left in the current UTC day.
    pub per_day: Option<u64>,
}

impl QuotaRemaining {
    /// Parses `b=per_hour;q=10;r=7;t=3540,b=per_day;q=50;r=47;t=43200`.
    fn parse(value: &str) -> Self {
        let mut quota = Self::default();
        for bucket in value.split(',') {
            let (mut name, mut remaining) = (None, None);
            for pair in bucket.split(';') {
                match pair.trim().split_once('=') {
                    Some(("b", value)) => name = Some(value.trim()),
                    Some(("r", value)) => remaining = value.trim().parse().ok(),
                    _ => {}
                }
            }
            match name {
                Some("per_hour") => quota.per_hour = remaining,
                Some("per_day") => quota.per_day = remaining,
                _ => {}
            }
        }
        quota
    }
}

impl RateLimitHeaders {
    /// Reads the headers that are present and numeric.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
        let quota = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(QuotaRemaining::parse)
                .unwrap_or_default()
        };
        Self {
            limit: number("x-ratelimit-limit"),
            remaining: number("x-ratelimit-remaining"),
            reset: number("x-ratelimit-reset"),
            client_quota: quota("auth0-client-quota-limit"),
            organization_quota: quota("auth0-organization-quota-limit"),
        }
    }
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    scope: Option<String>,
    refresh_token: Option<SecretString>,
}

/// Parses a 2xx body into a token, resolving its lifetime (from `expires_in`, else from a
/// JWT's `exp` as seen at `now`), and the refresh token if any.
pub(super) fn parse_grant(
    body: &[u8],
    default_lifetime: Duration,
    now: SystemTime,
) -> Result<(IssuedToken, Option<SecretString>), IdpError> {
    let parsed: TokenBody =
        serde_json::from_slice(body).map_err(|_| IdpError::InvalidResponse("not a JSON object"))?;
    let access_token = parsed
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or(IdpError::InvalidResponse("no access_token"))?;
    if access_token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(IdpError::InvalidResponse(
            "access_token has characters a bearer token cannot have",
        ));
    }
    let lifetime = match parsed.expires_in {
        Some(value) => seconds(&value).ok_or(IdpError::InvalidResponse(
            "expires_in is neither a number nor a numeric string",
        ))?,
        None => jwt_lifetime(&access_token, now).unwrap_or(default_lifetime),
    };
    let token = IssuedToken {
        access_token: AccessToken::new(access_token),
        token_type: parsed
            .token_type
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "Bearer".to_owned()),
        lifetime,
        scope: parsed.scope.filter(|s| !s.is_empty()),
    };
    let refresh_token = parsed
        .refresh_token
        .filter(|t| !secrecy::ExposeSecret::expose_secret(t).is_empty());
    Ok((token, refresh_token))
}

/// `3599`, `3599.0` or `"3599"` as a duration, at most [`MAX_LIFETIME`]; negative or
/// non-numeric is `None`.
fn seconds(value: &serde_json::Value) -> Option<Duration> {
    let lifetime = match value {
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(secs) => Duration::from_secs(secs),
            None => {
                let secs = n.as_f64().filter(|f| f.is_finite() && *f >= 0.0)?;
                Duration::try_from_secs_f64(secs.min(MAX_LIFETIME.as_secs_f64())).ok()?
            }
        },
        serde_json::Value::String(s) => {
            let digits = s.trim();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Digits too many for a u64 are a lifetime far beyond the cap.
            digits
                .parse::<u64>()
                .map_or(MAX_LIFETIME, Duration::from_secs)
        }
        _ => return None,
    };
    Some(lifetime.min(MAX_LIFETIME))
}

/// Time left until the JWT's `exp` claim, when the token is a JWT with one (unverified: the
/// broker only needs to know when to stop handing it out).
fn jwt_lifetime(token: &str, now: SystemTime) -> Option<Duration> {
    let mut parts = token.split('.');
    let (_header, payload) = (parts.next()?, parts.next()?);
    parts.next()?;
    let payload = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    #[derive(Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let exp = serde_json::from_slice::<Claims>(&payload).ok()?.exp?;
    let lifetime = match UNIX_EPOCH.checked_add(Duration::from_secs(exp)) {
        Some(exp) => exp.duration_since(now).unwrap_or(Duration::ZERO),
        None => MAX_LIFETIME,
    };
    Some(lifetime.min(MAX_LIFETIME))
}

/// The OAuth2 `error` code of an error body, restricted to a safe alphabet and length.
pub(super) fn error_code(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: Option<String>,
    }
    let code = serde_json::from_slice::<ErrorBody>(body).ok()?.error?;
    let code: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .take(MAX_ERROR_CODE)
        .collect();
    (!code.is_empty()).then_some(code)
}

/// How long a 429 asks us to wait: `Retry-After` (seconds or HTTP date), else `x-ratelimit-reset`
/// (Unix seconds); at most [`MAX_PAUSE`].
pub(super) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let until = |at: Option<SystemTime>| {
        at.map_or(MAX_PAUSE, |at| {
            at.duration_since(now).unwrap_or(Duration::ZERO)
        })
    };
    let wait = 'wait: {
        if let Some(value) = text("retry-after") {
            if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
                break 'wait value.parse::<u64>().map_or(MAX_PAUSE, Duration::from_secs);
            }
            if let Ok(at) = httpdate::parse_http_date(value) {
                break 'wait until(Some(at));
            }
        }
        let reset = text("x-ratelimit-reset")?.parse::<u64>().ok()?;
        until(UNIX_EPOCH.checked_add(Duration::from_secs(reset)))
    };
    Some(wait.min(MAX_PAUSE))
}

#[cfg(test)]
mod tests {
    use proptest::strategy::Strategy as _;
    use reqwest::header::HeaderValue;

    use super::*;
    use crate::clock::Clock;

    const DEFAULT: Duration = Duration::from_secs(300);

    fn parse_token(body: &[u8], default_lifetime: Duration) -> Result<IssuedToken, IdpError> {
        parse_grant(body, default_lifetime, Clock::system().now()).map(|(token, _)| token)
    }

    #[test]
    fn refresh_tokens_are_read_when_present() {
        let body = br#"{"access_token":"t","expires_in":60,"refresh_token":"r-1"}"#;
        let (_, refresh) = parse_grant(body, DEFAULT, Clock::system().now()).unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&refresh.unwrap()),
            "r-1"
        );
        let body = br#"{"access_token":"t","refresh_token":""}"#;
        assert!(
            parse_grant(body, DEFAULT, Clock::system().now())
                .unwrap()
                .1
                .is_none()
        );
    }

    fn jwt_with_exp(exp: u64) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp}}}"#));
        format!("{header}.{claims}.sig")
    }

    #[test]
    fn expires_in_as_number_or_string() {
        let number = parse_token(br#"{"access_token":"t","expires_in":3600}"#, DEFAULT).unwrap();
        assert_eq!(number.lifetime, Duration::from_secs(3600));
        let string = parse_token(br#"{"access_token":"t","expires_in":"3599"}"#, DEFAULT).unwrap();
        assert_eq!(string.lifetime, Duration::from_secs(3599));
        assert_eq!(string.token_type, "Bearer");
    }

    #[test]
    fn lifetime_from_jwt_exp_then_default() {
        let now = Clock::system()
            .now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let body = format!(r#"{{"access_token":"{}"}}"#, jwt_with_exp(now + 1000));
        let token = parse_token(body.as_bytes(), DEFAULT).unwrap();
        assert!((998..=1000).contains(&token.lifetime.as_secs()));
        let opaque = parse_token(br#"{"access_token":"opaque"}"#, DEFAULT).unwrap();
        assert_eq!(opaque.lifetime, DEFAULT);
    }

    #[test]
    fn garbage_is_invalid() {
        for body in [
            &b"<html>"[..],
            br#"{"expires_in":5}"#,
            br#"{"access_token":"a b"}"#,
        ] {
            assert!(matches!(
                parse_token(body, DEFAULT),
                Err(IdpError::InvalidResponse(_))
            ));
        }
        assert!(parse_token(br#"{"access_token":"t","expires_in":"soon"}"#, DEFAULT).is_err());
    }

    #[test]
    fn error_codes_are_sanitised() {
        assert_eq!(
            error_code(br#"{"error":"access_denied","error_description":"secret=x"}"#).as_deref(),
            Some("access_denied")
        );
        assert_eq!(
            error_code(br#"{"error":"<b>x y</b>"}"#).as_deref(),
            Some("bxyb")
        );
        assert_eq!(error_code(b"not json"), None);
    }

    #[test]
    fn auth0_quota_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "auth0-client-quota-limit",
            HeaderValue::from_static("b=per_hour;q=10;r=7;t=3540,b=per_day;q=50;r=47;t=43200"),
        );
        headers.insert("x-ratelimit-remaining", HeaderValue::from_static("99"));
        let parsed = RateLimitHeaders::from_headers(&headers);
        assert_eq!(parsed.remaining, Some(99));
        assert_eq!(
            parsed.client_quota,
            QuotaRemaining {
                per_hour: Some(7),
                per_day: Some(47)
            }
        );
        assert_eq!(parsed.organization_quota, QuotaRemaining::default());
    }

    #[test]
    fn outlandish_lifetimes_and_pauses_are_capped() {
        for body in [
            &br#"{"access_token":"t","expires_in":1000000000000}"#[..],
            br#"{"access_token":"t","expires_in":1e300}"#,
            br#"{"access_token":"t","expires_in":"99999999999999999999999999"}"#,
            br#"{"access_token":"t","expires_in":18446744073709551615}"#,
        ] {
            assert_eq!(parse_token(body, DEFAULT).unwrap().lifetime, MAX_LIFETIME);
        }
        let body = format!(r#"{{"access_token":"{}"}}"#, jwt_with_exp(u64::MAX));
        assert_eq!(
            parse_token(body.as_bytes(), DEFAULT).unwrap().lifetime,
            MAX_LIFETIME
        );
        assert!(parse_token(br#"{"access_token":"t","expires_in":-5}"#, DEFAULT).is_err());

        let now = Clock::system().now();
        for (name, value) in [
            ("retry-after", "99999999999999999999999"),
            ("retry-after", "86400"),
            ("x-ratelimit-reset", "18446744073709551615"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            assert_eq!(
                retry_after(&headers, now),
                Some(MAX_PAUSE),
                "{name}: {value}"
            );
        }
    }

    #[test]
    fn retry_after_in_seconds_date_or_reset() {
        let now = Clock::system().now();
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));

        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        headers.insert("retry-after", HeaderValue::try_from(later).unwrap());
        let wait = retry_after(&headers, now).unwrap();
        assert!((29..=30).contains(&wait.as_secs()), "{wait:?}");

        let mut headers = HeaderMap::new();
        let reset = now.duration_since(UNIX_EPOCH).unwrap().as_secs() + 12;
        headers.insert("x-ratelimit-reset", HeaderValue::from(reset));
        let wait = retry_after(&headers, now).unwrap();
        assert!((11..=12).contains(&wait.as_secs()), "{wait:?}");
    }

    proptest::proptest! {
        /// Any body an IdP sends parses to a token with a capped lifetime, or to an error.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            if let Ok((token, _)) = parse_grant(&body, DEFAULT, Clock::system().now()) {
                proptest::prop_assert!(token.lifetime <= MAX_LIFETIME);
            }
            let _ = error_code(&body);
        }

        /// JSON token answers with any `expires_in` and any token text.
        #[test]
        fn arbitrary_token_answers_never_panic(
            token in "\\PC{0,64}",
            expires_in in proptest::prop_oneof![
                proptest::num::i64::ANY.prop_map(|n| serde_json::json!(n)),
                proptest::num::f64::ANY.prop_map(|f| serde_json::json!(f)),
                "\\PC{0,30}".prop_map(|s| serde_json::json!(s)),
            ],
        ) {
            let body = serde_json::json!({"access_token": token, "expires_in": expires_in});
            if let Ok((token, _)) = parse_grant(body.to_string().as_bytes(), DEFAULT, Clock::system().now()) {
                proptest::prop_assert!(token.lifetime <= MAX_LIFETIME);
            }
        }

        /// Any `Retry-After` or `x-ratelimit-reset` is a pause of at most an hour.
        #[test]
        fn arbitrary_pause_headers_are_capped(value in "[ -~]{0,40}", reset in "[0-9]{0,30}") {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert("retry-after", value);
            }
            if let Ok(reset) = HeaderValue::from_str(&reset) {
                headers.insert("x-ratelimit-reset", reset);
            }
            if let Some(wait) = retry_after(&headers, Clock::system().now()) {
                proptest::prop_assert!(wait <= MAX_PAUSE);
            }
            let _ = RateLimitHeaders::from_headers(&headers);
        }
    }
}
