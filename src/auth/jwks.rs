//! The keys of one workload issuer: its JWKS, found by OIDC discovery, at a `jwks_uri` or in a
//! file, kept as the last good set.
//!
//! A fetch is single flight: callers queue on one lock; a caller that finds an attempt finished
//! while it waited takes that attempt's outcome, and fetches on demand (for an unknown `kid`)
//! are at most one per interval, whatever the background fetches do. A fetch runs in a task of
//! its own, so a caller that goes away cancels nothing. A failed fetch keeps the last good keys.
//! Keys come over HTTPS, or HTTP from a loopback address only, discovered URLs included. Only signature keys of the algorithms [`super::workload`] accepts are kept: RSA, EC
//! P-256 and P-384, and Ed25519; symmetric keys never are.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse, ThumbprintHash,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue};

use super::discovery::{self, DiscoveryProblem};
use super::settings::{IssuerSettings, KeySource};
use crate::clock::Clock;
use crate::telemetry::metrics::Metrics;

/// Largest discovery document or JWKS read.
const MAX_BODY_BYTES: usize = 512 * 1024;

/// Most keys kept of one JWKS.
const MAX_KEYS: usize = 100;

/// Bound on one discovery or JWKS request.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest `bearer_token_file` read (service-account tokens are about 1 KiB).
const MAX_BEARER_TOKEN_BYTES: usize = 64 * 1024;

/// Least `Retry-After` of a 503 for keys that cannot be fetched now.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Most keys tried for a token that names no `kid`.
const MAX_KIDLESS_CANDIDATES: usize = 8;

/// Why an issuer's keys could not be fetched. Never carries a body or the bearer token.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The request failed: connection, TLS (a wrong `ca_file`?) or timeout.
    #[error("cannot fetch {what} (check the address, and ca_file if it is HTTPS)")]
    Request {
        /// Discovery document or JWKS.
        what: &'static str,
        /// What reqwest reported.
        #[source]
        source: reqwest::Error,
    },
    /// The issuer answered with another status than 200.
    #[error("{what} answered HTTP {status}")]
    Status {
        /// Discovery document or JWKS.
        what: &'static str,
        /// The status.
        status: u16,
    },
    /// The body is over the bound.
    #[error("{what} is longer than {MAX_BODY_BYTES} bytes")]
    TooLarge {
        /// Discovery document or JWKS.
        what: &'static str,
    },
    /// The discovery document has no usable `jwks_uri`.
    #[error("the discovery document has no jwks_uri; set jwks_uri or jwks_file for this issuer")]
    NoJwksUri,
    /// The body is not a JWKS, or holds no key the broker can use.
    #[error("the JWKS is not usable: {0}")]
    Invalid(&'static str),
    /// `jwks_file` or `bearer_token_file` could not be read.
    #[error("cannot read {what}")]
    File {
        /// Which file.
        what: &'static str,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

/// A verification key of a JWKS and the algorithms it may verify.
#[derive(Debug)]
pub(super) struct VerifyingKey {
    /// The JWK's `kid`, when it has one.
    kid: Option<Arc<str>>,
    /// Its RFC 7638 thumbprint, which stays the same across fetches of the same key.
    pub(super) thumbprint: Arc<str>,
    algorithms: Vec<Algorithm>,
    /// The key, for `jsonwebtoken::decode`.
    pub(super) key: DecodingKey,
}

impl VerifyingKey {
    /// Reads one JWK; `None` for keys the broker does not verify with (encryption keys,
    /// symmetric keys, other curves, an `alg` outside the accepted list).
    fn from_jwk(jwk: &Jwk) -> Option<Self> {
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|usage| *usage != PublicKeyUse::Signature)
        {
            return None;
        }
        let family: &[Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => &[Algorithm::ES256],
                EllipticCurve::P384 => &[Algorithm::ES384],
                _ => return None,
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                &[Algorithm::EdDSA]
            }
            _ => return None,
        };
        let algorithms = match &jwk.common.key_algorithm {
            None => family.to_vec(),
            Some(declared) => {
                let declared = algorithm_of(declared)?;
                family.contains(&declared).then(|| vec![declared])?
            }
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        let thumbprint = jwk.thumbprint(ThumbprintHash::SHA256).ok()?;
        Some(Self {
            kid: jwk.common.key_id.as_deref().map(Arc::from),
            thumbprint: Arc::from(thumbprint),
            algorithms,
            key,
        })
    }

    /// Whether this key may verify a token signed with `algorithm`.
    pub(super) fn accepts(&self, algorithm: Algorithm) -> bool {
        self.algorithms.contains(&algorithm)
    }
}

/// The signature algorithm a JWK's `alg` names, when it is one that is accepted.
fn algorithm_of(declared: &KeyAlgorithm) -> Option<Algorithm> {
    Some(match declared {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The usable keys of one fetch of a JWKS.
#[derive(Debug)]
pub(super) struct KeySet {
    /// Several keys may share a `kid`; each is tried.
    by_kid: HashMap<Arc<str>, Vec<Arc<VerifyingKey>>>,
    all: Vec<Arc<VerifyingKey>>,
    thumbprints: HashSet<Arc<str>>,
}

impl KeySet {
    /// Reads a JWKS body, skipping keys that cannot verify (each JWK on its own, so one odd key
    /// does not hide the others); a set with no usable key is an error.
    pub(super) fn parse(body: &[u8]) -> Result<Self, JwksError> {
        #[derive(serde::Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        let set: Set = serde_json::from_slice(body)
            .map_err(|_| JwksError::Invalid("not a JSON object with a keys array"))?;
        let all: Vec<Arc<VerifyingKey>> = set
            .keys
            .into_iter()
            .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
            .filter_map(|jwk| VerifyingKey::from_jwk(&jwk))
            .take(MAX_KEYS)
            .map(Arc::new)
            .collect();
        if all.is_empty() {
            return Err(JwksError::Invalid(
                "no signature key of type RSA, EC P-256/P-384 or Ed25519",
            ));
        }
        let mut by_kid: HashMap<Arc<str>, Vec<Arc<VerifyingKey>>> = HashMap::new();
        for key in &all {
            if let Some(kid) = &key.kid {
                by_kid
                    .entry(Arc::clone(kid))
                    .or_default()
                    .push(Arc::clone(key));
            }
        }
        let thumbprints = all.iter().map(|key| Arc::clone(&key.thumbprint)).collect();
        Ok(Self {
            by_kid,
            all,
            thumbprints,
        })
    }

    /// The keys that may verify a token with this `kid` and algorithm: the keys of that id, or,
    /// for a token without `kid`, the first [`MAX_KIDLESS_CANDIDATES`] that accept the
    /// algorithm (so an unauthenticated token costs a bounded number of signature checks).
    pub(super) fn candidates(
        &self,
        kid: Option<&str>,
        algorithm: Algorithm,
    ) -> Vec<Arc<VerifyingKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned().unwrap_or_default(),
            None => self
                .all
                .iter()
                .filter(|key| key.accepts(algorithm))
                .take(MAX_KIDLESS_CANDIDATES)
                .cloned()
                .collect(),
        }
    }

    /// Whether the key of this thumbprint is still in the set.
    pub(super) fn has(&self, thumbprint: &str) -> bool {
        self.thumbprints.contains(thumbprint)
    }

    /// How many keys the set holds.
    pub(super) fn len(&self) -> usize {
        self.all.len()
    }
}

/// Keys are unavailable now (the cause is logged where the fetch failed).
#[derive(Debug, Clone, Copy)]
pub(super) struct Unavailable {
    /// When the next attempt may be made.
    pub(super) retry_after: Duration,
}

/// Why keys are fetched.
#[derive(Debug, Clone, Copy)]
pub(super) enum Refetch {
    /// On a period: always fetched, and counted against no limit.
    Background,
    /// A token names a key the set lacks: at most one such fetch per `interval`, and none when
    /// an attempt finished after the caller read `seen` ([`IssuerKeys::generation`]).
    OnDemand {
        /// Least time between two fetches on demand.
        interval: Duration,
        /// The generation the caller saw before it found the key missing.
        seen: u64,
    },
}

/// The attempts so far.
#[derive(Default)]
struct Attempts {
    /// How many attempts have finished.
    generation: u64,
    /// Whether the latest finished attempt failed.
    failed: bool,
    /// When the latest fetch on demand started.
    on_demand: Option<Instant>,
}

/// One issuer's keys, shared by the registries of successive reloads while its settings stay.
pub(super) struct IssuerKeys {
    settings: IssuerSettings,
    /// `None` when it could not be built (then every fetch fails, saying so).
    http: Option<reqwest::Client>,
    keys: ArcSwapOption<KeySet>,
    attempts: Mutex<Attempts>,
    /// Held for the duration of a fetch: the single flight.
    fetching: Arc<tokio::sync::Mutex<()>>,
    /// Modification time and length of `jwks_file` when last read and found good.
    file_stamp: Mutex<Option<(SystemTime, u64)>>,
    /// `token_broker_workload_key_fetches_total` of this issuer: ok, failed.
    fetches: [metrics::Counter; 2],
    /// What the on-demand refetch interval is measured with.
    clock: Clock,
    /// How often the background refresher fetches the keys (a reload may change it).
    refresh_period: Mutex<Duration>,
}

impl IssuerKeys {
    /// Prepares the issuer's HTTP client (its `ca_file` as the only root, when set); fetches
    /// nothing yet.
    pub(super) fn new(
        settings: IssuerSettings,
        metrics: &Metrics,
        clock: Clock,
        refresh_period: Duration,
    ) -> Self {
        let http = Self::client(&settings)
            .map_err(|error| {
                // `config` read the CA already, so this is not expected; the fetches then fail
                // and say so.
                tracing::warn!(issuer = %settings.issuer, %error, "cannot build the HTTP client of a workload issuer");
            })
            .ok();
        let fetches =
            ["ok", "failed"].map(|outcome| metrics.workload_key_fetches(&settings.issuer, outcome));
        Self {
            fetches,
            settings,
            http,
            keys: ArcSwapOption::empty(),
            attempts: Mutex::new(Attempts::default()),
            fetching: Arc::new(tokio::sync::Mutex::new(())),
            file_stamp: Mutex::new(None),
            clock,
            refresh_period: Mutex::new(refresh_period),
        }
    }

    fn client(settings: &IssuerSettings) -> Result<reqwest::Client, reqwest::Error> {
        let mut http = crate::idp::http_client().timeout(FETCH_TIMEOUT);
        if let Some(pem) = &settings.ca_pem {
            http = http.tls_certs_only(reqwest::Certificate::from_pem_bundle(pem)?);
        }
        http.build()
    }

    /// The settings these keys were built from.
    pub(super) fn settings(&self) -> &IssuerSettings {
        &self.settings
    }

    /// The last good key set, if any fetch succeeded.
    pub(super) fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    /// How many fetch attempts have finished; read before looking for a key, and given to
    /// [`Refetch::OnDemand`], so that a caller that queued behind a fetch takes its outcome.
    pub(super) fn generation(&self) -> u64 {
        self.lock_attempts().generation
    }

    /// Whether the key of `thumbprint` is in the last good set: a remembered token whose key
    /// left the JWKS is no longer served.
    pub(super) fn still_has(&self, thumbprint: &str) -> bool {
        self.keys
            .load()
            .as_ref()
            .is_some_and(|set| set.has(thumbprint))
    }

    fn lock_attempts(&self) -> std::sync::MutexGuard<'_, Attempts> {
        self.attempts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How often the background refresher fetches the keys.
    pub(super) fn refresh_period(&self) -> Duration {
        *self
            .refresh_period
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets how often the background refresher fetches the keys (from its next round on).
    pub(super) fn set_refresh_period(&self, period: Duration) {
        *self
            .refresh_period
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = period;
    }

    /// Fetches the keys, unless [`Refetch::OnDemand`] finds that another attempt answers it
    /// already; then that attempt's outcome is the answer. Waits for a fetch in flight first.
    pub(super) async fn refetch(
        self: &Arc<Self>,
        why: Refetch,
    ) -> Result<Arc<KeySet>, Unavailable> {
        let guard = Arc::clone(&self.fetching).lock_owned().await;
        if let Refetch::OnDemand { interval, seen } = why {
            let now = self.clock.instant();
            let mut attempts = self.lock_attempts();
            let next = attempts.on_demand.and_then(|at| at.checked_add(interval));
            let answered = attempts.generation != seen;
            if answered || next.is_some_and(|next| now < next) {
                let retry_after = next
                    .map_or(Duration::ZERO, |next| next.saturating_duration_since(now))
                    .max(MIN_RETRY_AFTER);
                return match (attempts.failed, self.current()) {
                    (false, Some(set)) => Ok(set),
                    _ => Err(Unavailable { retry_after }),
                };
            }
            attempts.on_demand = Some(now);
        }
        let keys = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _single_flight = guard;
            keys.fetch_and_store().await
        });
        let retry_after = match why {
            Refetch::OnDemand { interval, .. } => interval.max(MIN_RETRY_AFTER),
            Refetch::Background => MIN_RETRY_AFTER,
        };
        match task.await {
            Ok(Some(set)) => Ok(set),
            Ok(None) | Err(_) => Err(Unavailable { retry_after }),
        }
    }

    /// One fetch: keeps the new set when it is good, logs a failure (the last good keys stay),
    /// and counts the attempt. The set now in force, unless the fetch failed.
    async fn fetch_and_store(&self) -> Option<Arc<KeySet>> {
        let outcome = self.fetch().await;
        let kept = match outcome {
            Ok(Some(set)) => {
                self.keys.store(Some(Arc::clone(&set)));
                tracing::info!(
                    issuer = %self.settings.issuer,
                    keys = set.len(),
                    "workload issuer keys loaded"
                );
                Some(set)
            }
            Ok(None) => self.current(),
            Err(error) => {
                let cause = crate::telemetry::error_chain(&error);
                tracing::warn!(
                    issuer = %self.settings.issuer,
                    error = %error,
                    %cause,
                    kept = self.current().is_some(),
                    "cannot fetch the keys of a workload issuer"
                );
                None
            }
        };
        self.fetches[usize::from(kept.is_none())].increment(1);
        let mut attempts = self.lock_attempts();
        attempts.generation = attempts.generation.wrapping_add(1);
        attempts.failed = kept.is_none();
        kept
    }

    /// Reads the JWKS from its source; `Ok(None)` when the file has not changed since it was
    /// last read and found good.
    async fn fetch(&self) -> Result<Option<Arc<KeySet>>, JwksError> {
        let body = match &self.settings.keys {
            KeySource::File(path) => return self.read_file(path).await,
            KeySource::Uri(uri) => self.get(uri, "the JWKS", true).await?,
            KeySource::Discovery => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    self.settings.issuer.trim_end_matches('/')
                );
                let document = self.get(&discovery, "the discovery document", true).await?;
                let discovered =
                    discovery::jwks_of(&document, &self.settings.issuer).map_err(|problem| {
                        match problem {
                            DiscoveryProblem::NotJson => {
                                JwksError::Invalid("the discovery document is not JSON")
                            }
                            DiscoveryProblem::OtherIssuer => JwksError::Invalid(
                                "the discovery document names another issuer (OIDC Discovery §4.3)",
                            ),
                            DiscoveryProblem::NoIssuer => JwksError::Invalid(
                                "the discovery document names no issuer (OIDC Discovery §4.3)",
                            ),
                            DiscoveryProblem::NoJwksUri => JwksError::NoJwksUri,
                        }
                    })?;
                // The bearer token goes only to the issuer's own origin.
                self.get(&discovered.jwks_uri, "the JWKS", discovered.same_origin)
                    .await?
            }
        };
        KeySet::parse(&body).map(|set| Some(Arc::new(set)))
    }

    /// The keys of `jwks_file`, or `None` when its modification time and length are those of
    /// the last good read.
    async fn read_file(&self, path: &Path) -> Result<Option<Arc<KeySet>>, JwksError> {
        let unreadable = |source| JwksError::File {
            what: "jwks_file",
            source,
        };
        let metadata = tokio::fs::metadata(path).await.map_err(unreadable)?;
        let stamp = (
            metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            metadata.len(),
        );
        let unchanged = *self
            .file_stamp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            == Some(stamp)
            && self.current().is_some();
        if unchanged {
            return Ok(None);
        }
        let body = read_bounded(path, MAX_BODY_BYTES)
            .await
            .map_err(unreadable)?
            .ok_or(JwksError::TooLarge { what: "jwks_file" })?;
        let set = KeySet::parse(&body)?;
        *self
            .file_stamp
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(stamp);
        Ok(Some(Arc::new(set)))
    }

    /// GETs a JSON document, with the bearer token when one is configured and `with_bearer`
    /// (the URL is the issuer's or configured), reading at most [`MAX_BODY_BYTES`].
    async fn get(
        &self,
        url: &str,
        what: &'static str,
        with_bearer: bool,
    ) -> Result<Vec<u8>, JwksError> {
        let failed = |source| JwksError::Request { what, source };
        let http = self.http.as_ref().ok_or(JwksError::Invalid(
            "the HTTP client could not be built; check ca_file",
        ))?;
        let mut request = http
            .get(url)
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(path) = self
            .settings
            .bearer_token_file
            .as_ref()
            .filter(|_| with_bearer)
        {
            let unreadable = |source| JwksError::File {
                what: "bearer_token_file",
                source,
            };
            let token = read_bounded(path, MAX_BEARER_TOKEN_BYTES)
                .await
                .map_err(unreadable)?
                .ok_or(JwksError::Invalid("bearer_token_file is over 64 KiB"))?;
            let token = String::from_utf8(token)
                .map_err(|_| JwksError::Invalid("bearer_token_file holds no usable token"))?;
            let mut value = HeaderValue::try_from(format!("Bearer {}", token.trim()))
                .map_err(|_| JwksError::Invalid("bearer_token_file holds no usable token"))?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        let mut response = request.send().await.map_err(failed)?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(JwksError::Status { what, status });
        }
        crate::idp::read_bounded(&mut response, MAX_BODY_BYTES)
            .await
            .map_err(failed)?
            .ok_or(JwksError::TooLarge { what })
    }
}

/// A file's bytes, or `None` when it holds more than `limit` (never more than that is read).
async fn read_bounded(path: &Path, limit: usize) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read as _;
    let path = path.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        let mut body = Vec::new();
        let bound = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
        std::fs::File::open(path)?
            .take(bound)
            .read_to_end(&mut body)?;
        Ok((body.len() <= limit).then_some(body))
    });
    read.await
        .unwrap_or_else(|_| Err(std::io::Error::other("the read task failed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_signature_keys_of_accepted_types_are_kept() {
        let body = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0","kid":"hmac"},
            {"kty":"EC","crv":"P-521","x":"AA","y":"AA","kid":"p521"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"ed","use":"sig"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"enc","use":"enc"},
            {"kty":"weird"}
        ]}"#;
        let set = KeySet::parse(body).unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(set.candidates(Some("ed"), Algorithm::EdDSA).len(), 1);
        assert!(set.candidates(Some("hmac"), Algorithm::HS256).is_empty());
        assert!(set.candidates(None, Algorithm::RS256).is_empty());
        assert!(KeySet::parse(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).is_err());
        assert!(KeySet::parse(b"[]").is_err());
    }
}
