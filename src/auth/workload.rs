//! Workload tokens: JWTs that the platform gives each workload (a Kubernetes service-account
//! token, a SPIFFE JWT-SVID, a CI job's OIDC token), accepted in place of a caller key.
//!
//! A token is checked in this order: its shape and algorithm (RS, PS, ES256/384 and EdDSA only:
//! never `none`, never an HMAC), its issuer (`iss`, one of `[[auth.workload.issuers]]`), its
//! times (`exp` required; `nbf` and `iat` when present; each within `leeway`) and audience
//! (`aud`, a string or an array holding `auth.workload.audience`), its signature against the
//! issuer's keys ([`super::jwks`]; an unknown `kid` fetches them again, at most once per
//! `jwks_refresh_interval`), and last its subject (`sub`), which names the caller: an exact
//! subject beats a prefix, and a longer prefix a shorter one. A token that verified is
//! remembered until its `exp` (with the leeway) in [`super::remembered`], by its SHA-256, so the next
//! request with it is a hash and a lookup; it is forgotten on reload and when its key leaves the
//! issuer's JWKS.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Validation};

use super::jwks::{IssuerKeys, KeySet, Refetch, VerifyingKey};
use super::remembered::Remembered;
use super::settings::{IssuerSettings, KeySource, SubjectPattern, WorkloadRule, WorkloadSettings};
use super::{AuthError, Caller};
use crate::clock::Clock;
use crate::telemetry::metrics::Metrics;

/// Longest workload token read.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// How often a request may try again to fetch the keys of an issuer that has none yet.
const NO_KEYS_RETRY: Duration = Duration::from_secs(1);

/// How often keys from a URL are fetched in the background, so a key that leaves the JWKS
/// stops verifying even when no unknown `kid` arrives (the last good keys stay in use while
/// fetches fail). Files are looked at every `jwks_refresh_interval`.
const JWKS_BACKGROUND_REFRESH: Duration = Duration::from_secs(300);

/// Which check a workload token failed: the `error_description` of its 401. None of them quotes
/// the token, the configured issuers, audience or subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadRejection {
    /// No `[auth.workload]` is configured, so no workload token is accepted.
    #[error(
        "workload tokens are not accepted here: the broker has no [auth.workload]; use a caller key"
    )]
    NotEnabled,
    /// Not three base64url parts with a JSON header and JSON claims, or too long.
    #[error(
        "the workload token is not a well-formed JWT (three base64url parts, a JSON header and JSON claims of the registered types, at most 16384 bytes)"
    )]
    Malformed,
    /// `alg` is `none`, an HMAC, or another algorithm that is not accepted.
    #[error(
        "the workload token's algorithm (alg) is not accepted; use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"
    )]
    Algorithm,
    /// `iss` is missing or not a configured issuer.
    #[error("the workload token's issuer (iss) is not a configured workload issuer")]
    UnknownIssuer,
    /// `exp` is missing.
    #[error("the workload token has no expiry (exp); workload tokens must expire")]
    NoExpiry,
    /// `exp` is past, beyond the leeway.
    #[error("the workload token has expired (exp), beyond the allowed clock skew; get a fresh one")]
    Expired,
    /// `nbf` is ahead, beyond the leeway.
    #[error("the workload token is not valid yet (nbf), beyond the allowed clock skew")]
    NotYetValid,
    /// `iat` is ahead, beyond the leeway.
    #[error("the workload token was issued in the future (iat), beyond the allowed clock skew")]
    IssuedInFuture,
    /// `aud` does not hold `auth.workload.audience`.
    #[error(
        "the workload token's audience (aud) does not include the broker's (auth.workload.audience); set that audience where the token is made"
    )]
    Audience,
    /// The `kid` is not among the issuer's keys, fetched again on demand at most once per
    /// `jwks_refresh_interval`.
    #[error(
        "the workload token's key id (kid) is not among its issuer's keys (fetched again for unknown key ids at most once per auth.workload.jwks_refresh_interval)"
    )]
    UnknownKey,
    /// The key named by `kid` (or, without `kid`, every key) is of another type than `alg` needs.
    #[error(
        "the workload token's algorithm (alg) does not fit the type of the key it names (kid), or of any of its issuer's keys when it names none"
    )]
    KeyMismatch,
    /// The header lists critical extensions (`crit`), which the broker does not implement.
    #[error(
        "the workload token has critical header parameters (crit) that the broker does not understand (RFC 7515 §4.1.11)"
    )]
    Critical,
    /// The signature does not verify.
    #[error("the workload token's signature does not verify with its issuer's keys")]
    Signature,
    /// No caller is configured for `sub` (or `sub` is missing).
    #[error("no caller is configured for the workload token's subject (sub)")]
    UnknownSubject,
}

impl WorkloadRejection {
    /// The `check` label of `token_broker_workload_rejections_total`.
    pub fn check(self) -> &'static str {
        match self {
            Self::NotEnabled => "not_enabled",
            Self::Malformed => "malformed",
            Self::Algorithm => "algorithm",
            Self::UnknownIssuer => "issuer",
            Self::NoExpiry => "no_expiry",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IssuedInFuture => "issued_in_future",
            Self::Audience => "audience",
            Self::UnknownKey => "unknown_key",
            Self::KeyMismatch => "key_mismatch",
            Self::Critical => "critical_header",
            Self::Signature => "signature",
            Self::UnknownSubject => "subject",
        }
    }
}

/// A token's header, as far as it matters here.
#[derive(serde::Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    crit: Option<serde::de::IgnoredAny>,
}

/// `aud`: one audience or several.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The registered claims that are checked.
#[derive(serde::Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iat: Option<f64>,
}

/// The accepted algorithm named `alg`.
fn accepted_algorithm(alg: &str) -> Option<Algorithm> {
    Some(match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Whether a bearer value has the shape of a JWT (`eyJ…` and two dots), so that it is worth
/// verifying as a workload token.
pub(super) fn looks_like_jwt(value: &str) -> bool {
    value.starts_with("eyJ") && value.bytes().filter(|&b| b == b'.').count() == 2
}

/// One trusted issuer: its keys and the callers its subjects name.
struct Issuer {
    keys: Arc<IssuerKeys>,
    exact: HashMap<String, Arc<Caller>>,
    /// Longest prefix first.
    prefixes: Vec<(String, Arc<Caller>)>,
}

impl Issuer {
    /// The caller `subject` names: exact first, then the longest prefix.
    fn caller(&self, subject: &str) -> Option<&Arc<Caller>> {
        self.exact.get(subject).or_else(|| {
            self.prefixes
                .iter()
                .find(|(prefix, _)| subject.starts_with(prefix.as_str()))
                .map(|(_, caller)| caller)
        })
    }
}

/// Verifies workload tokens for one caller registry.
pub(super) struct WorkloadVerifier {
    audience: String,
    leeway: f64,
    refresh_interval: Duration,
    issuers: Vec<Issuer>,
    by_issuer: HashMap<String, usize>,
    remembered: Remembered,
    /// For `token_broker_workload_rejections_total`.
    metrics: Metrics,
    /// What expiry, remembered tokens and the key refreshes read.
    clock: Clock,
}

impl WorkloadVerifier {
    /// Builds the verifier; `keys_of` gives each issuer's keys (kept from the registry before a
    /// reload when its settings are the same), `callers` each caller's workload rules.
    pub(super) fn new(
        settings: &WorkloadSettings,
        keys_of: impl Fn(&super::settings::IssuerSettings) -> Arc<IssuerKeys>,
        callers: &[(WorkloadRule, Arc<Caller>)],
        metrics: &Metrics,
        clock: &Clock,
    ) -> Self {
        let mut issuers: Vec<Issuer> = settings
            .issuers
            .iter()
            .map(|issuer| Issuer {
                keys: keys_of(issuer),
                exact: HashMap::new(),
                prefixes: Vec::new(),
            })
            .collect();
        let by_issuer: HashMap<String, usize> = settings
            .issuers
            .iter()
            .enumerate()
            .map(|(index, issuer)| (issuer.issuer.clone(), index))
            .collect();
        for (rule, caller) in callers {
            let Some(issuer) = by_issuer
                .get(&rule.issuer)
                .and_then(|&i| issuers.get_mut(i))
            else {
                continue;
            };
            match &rule.subject {
                SubjectPattern::Exact(exact) => {
                    issuer.exact.insert(exact.clone(), Arc::clone(caller));
                }
                SubjectPattern::Prefix(prefix) => {
                    issuer.prefixes.push((prefix.clone(), Arc::clone(caller)));
                }
            }
        }
        for issuer in &mut issuers {
            issuer
                .prefixes
                .sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        }
        Self {
            audience: settings.audience.clone(),
            leeway: settings.leeway.as_secs_f64(),
            refresh_interval: settings.jwks_refresh_interval,
            issuers,
            by_issuer,
            remembered: Remembered::new(settings.max_remembered),
            metrics: metrics.clone(),
            clock: clock.clone(),
        }
    }

    /// Every issuer's keys, for the next reload to keep and the background refresh to fetch.
    pub(super) fn keys(&self) -> impl Iterator<Item = &Arc<IssuerKeys>> {
        self.issuers.iter().map(|issuer| &issuer.keys)
    }

    /// The caller a remembered token proved, while it is valid and its key is still published.
    pub(super) fn remembered(&self, token: &str) -> Option<Arc<Caller>> {
        self.remembered
            .get(token, self.clock.unix_seconds(), |issuer, thumbprint| {
                self.issuers
                    .get(issuer)
                    .is_some_and(|issuer| issuer.keys.still_has(thumbprint))
            })
    }

    /// The caller a workload token proves: remembered, else verified (and then remembered).
    pub(super) async fn authenticate(&self, token: &str) -> Result<Arc<Caller>, AuthError> {
        match self.remembered(token) {
            Some(caller) => Ok(caller),
            None => self.verify(token).await,
        }
    }

    /// Verifies a token that is not remembered, and remembers it when it verifies; a refusal
    /// is counted by the check it failed.
    pub(super) async fn verify(&self, token: &str) -> Result<Arc<Caller>, AuthError> {
        let verified = self.check(token).await;
        if let Err(AuthError::Workload(rejection)) = &verified {
            self.metrics
                .workload_rejections(rejection.check())
                .increment(1);
        }
        verified
    }

    /// [`WorkloadVerifier::verify`] without the counting.
    async fn check(&self, token: &str) -> Result<Arc<Caller>, AuthError> {
        let reject = AuthError::Workload;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(reject(WorkloadRejection::Malformed));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(reject(WorkloadRejection::Malformed));
        };
        // Canonical base64url only (no stray trailing bits), so one signature has one spelling.
        if URL_SAFE_NO_PAD.decode(signature).is_err() {
            return Err(reject(WorkloadRejection::Malformed));
        }
        let header: Header = decode_part(header).ok_or(reject(WorkloadRejection::Malformed))?;
        if header.crit.is_some() {
            return Err(reject(WorkloadRejection::Critical));
        }
        let algorithm =
            accepted_algorithm(&header.alg).ok_or(reject(WorkloadRejection::Algorithm))?;
        let claims: Claims = decode_part(payload).ok_or(reject(WorkloadRejection::Malformed))?;
        let issuer_index = claims
            .iss
            .as_deref()
            .and_then(|iss| self.by_issuer.get(iss))
            .copied()
            .ok_or(reject(WorkloadRejection::UnknownIssuer))?;
        let issuer = self
            .issuers
            .get(issuer_index)
            .ok_or(reject(WorkloadRejection::UnknownIssuer))?;
        let expires = self
            .check_claims(&claims, self.clock.unix_seconds())
            .map_err(reject)?;

        let key = self
            .verified_key(token, &issuer.keys, header.kid.as_deref(), algorithm)
            .await?;

        let caller = claims
            .sub
            .as_deref()
            .and_then(|subject| issuer.caller(subject))
            .ok_or(reject(WorkloadRejection::UnknownSubject))?;
        self.remembered.insert(
            token,
            Arc::clone(caller),
            expires,
            issuer_index,
            Arc::clone(&key.thumbprint),
            self.clock.unix_seconds(),
        );
        Ok(Arc::clone(caller))
    }

    /// Checks `exp`, `nbf`, `iat` and `aud`; the instant (Unix seconds) until which the token
    /// may be remembered.
    fn check_claims(&self, claims: &Claims, now: f64) -> Result<f64, WorkloadRejection> {
        let finite = |value: Option<f64>| match value {
            Some(value) if !value.is_finite() => Err(WorkloadRejection::Malformed),
            other => Ok(other),
        };
        let exp = finite(claims.exp)?.ok_or(WorkloadRejection::NoExpiry)?;
        if exp + self.leeway < now {
            return Err(WorkloadRejection::Expired);
        }
        if finite(claims.nbf)?.is_some_and(|nbf| nbf > now + self.leeway) {
            return Err(WorkloadRejection::NotYetValid);
        }
        if finite(claims.iat)?.is_some_and(|iat| iat > now + self.leeway) {
            return Err(WorkloadRejection::IssuedInFuture);
        }
        let audience_matches = match &claims.aud {
            Some(Audience::One(audience)) => *audience == self.audience,
            Some(Audience::Many(audiences)) => audiences.contains(&self.audience),
            None => false,
        };
        if !audience_matches {
            return Err(WorkloadRejection::Audience);
        }
        Ok(exp + self.leeway)
    }

    /// The key whose signature over `token` verifies: from the last good set, else after one
    /// fetch on demand (an unknown `kid`, no keys yet, or a token without `kid` that none of the
    /// known keys verifies, which may be of a key published since).
    async fn verified_key(
        &self,
        token: &str,
        keys: &Arc<IssuerKeys>,
        kid: Option<&str>,
        algorithm: Algorithm,
    ) -> Result<Arc<VerifyingKey>, AuthError> {
        let seen = keys.generation();
        let current = keys.current();
        // The set a token without a kid failed against: not worth a second pass.
        let mut tried = None;
        if let Some(set) = &current {
            let found = set.candidates(kid, algorithm);
            if !found.is_empty() {
                match verify_signature(token, algorithm, &found) {
                    Ok(key) => return Ok(key),
                    Err(WorkloadRejection::Signature) if kid.is_none() => tried = Some(set),
                    Err(rejection) => return Err(rejection.into()),
                }
            }
        }
        let interval = match current {
            Some(_) => self.refresh_interval,
            None => NO_KEYS_RETRY,
        };
        let set: Arc<KeySet> = keys
            .refetch(Refetch::OnDemand { interval, seen })
            .await
            .map_err(|unavailable| AuthError::WorkloadKeysUnavailable {
                retry_after: unavailable.retry_after,
            })?;
        if tried.is_some_and(|tried| Arc::ptr_eq(tried, &set)) {
            return Err(WorkloadRejection::Signature.into());
        }
        let found = set.candidates(kid, algorithm);
        if found.is_empty() {
            return Err(AuthError::Workload(match kid {
                Some(_) => WorkloadRejection::UnknownKey,
                None => WorkloadRejection::KeyMismatch,
            }));
        }
        verify_signature(token, algorithm, &found).map_err(AuthError::from)
    }
}

/// A base64url part decoded and read as JSON.
fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The key among `candidates` whose signature over `token` verifies.
fn verify_signature(
    token: &str,
    algorithm: Algorithm,
    candidates: &[Arc<VerifyingKey>],
) -> Result<Arc<VerifyingKey>, WorkloadRejection> {
    let mut validation = Validation::new(algorithm);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let mut fitting = false;
    for key in candidates.iter().filter(|key| key.accepts(algorithm)) {
        fitting = true;
        if jsonwebtoken::decode::<serde::de::IgnoredAny>(token, &key.key, &validation).is_ok() {
            return Ok(Arc::clone(key));
        }
    }
    Err(if fitting {
        WorkloadRejection::Signature
    } else {
        WorkloadRejection::KeyMismatch
    })
}

/// The keys of `issuer`: those of the registry before the reload when its settings are the same
/// (so a reload neither forgets nor refetches them, and their one refresher goes on), else new
/// ones with a refresher of their own. URLs are fetched every [`JWKS_BACKGROUND_REFRESH`], files
/// every `file_period` (`jwks_refresh_interval`).
pub(super) fn issuer_keys(
    issuer: &IssuerSettings,
    previous: Option<&WorkloadVerifier>,
    metrics: &Metrics,
    clock: &Clock,
    file_period: Duration,
) -> Arc<IssuerKeys> {
    let period = match issuer.keys {
        KeySource::File(_) => file_period,
        KeySource::Uri(_) | KeySource::Discovery => JWKS_BACKGROUND_REFRESH,
    };
    let kept = previous.and_then(|workload| {
        workload
            .keys()
            .find(|keys| keys.settings() == issuer)
            .cloned()
    });
    if let Some(keys) = kept {
        keys.set_refresh_period(period);
        return keys;
    }
    let keys = Arc::new(IssuerKeys::new(
        issuer.clone(),
        metrics,
        clock.clone(),
        period,
    ));
    refresh_in_background(&keys, clock.clone());
    keys
}

/// Fetches `keys` now and then every refresh period, for as long as a verifier holds them: one
/// refresher per issuer's keys, which lives across the reloads that keep them (a refresher per
/// registry, restarted by each reload, never reached its first period under frequent reloads).
/// Without a runtime (unit tests) nothing is started and keys are fetched on first use.
fn refresh_in_background(keys: &Arc<IssuerKeys>, clock: Clock) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let keys = Arc::downgrade(keys);
    runtime.spawn(async move {
        loop {
            let period = {
                let Some(keys) = keys.upgrade() else {
                    break;
                };
                // A failure is logged there, and the last good keys stay.
                let _ = keys.refetch(Refetch::Background).await;
                keys.refresh_period()
            };
            clock.sleep(period).await;
        }
    });
}
