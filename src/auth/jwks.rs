//! The keys of one workload issuer: its JWKS, found by OIDC discovery, at a `jwks_uri` or in a
//! file, kept as the last good set.
//!
//! A fetch is single flight: callers queue on one lock, and the one that finds no attempt within
//! the interval it was given starts the fetch in a task of its own (so a caller that goes away
//! cancels nothing); the others take that attempt's outcome. A failed fetch keeps the last good
//! keys. Only signature keys of the algorithms [`super::workload`] accepts are kept: RSA, EC
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

use super::settings::{IssuerSettings, KeySource};

/// Largest discovery document or JWKS read.
const MAX_BODY_BYTES: usize = 512 * 1024;

/// Most keys kept of one JWKS.
const MAX_KEYS: usize = 100;

/// Bound on one discovery or JWKS request.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

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
    by_kid: HashMap<Arc<str>, Arc<VerifyingKey>>,
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
        let by_kid = all
            .iter()
            .filter_map(|key| Some((Arc::clone(key.kid.as_ref()?), Arc::clone(key))))
            .collect();
        let thumbprints = all.iter().map(|key| Arc::clone(&key.thumbprint)).collect();
        Ok(Self {
            by_kid,
            all,
            thumbprints,
        })
    }

    /// The keys that may verify a token with this `kid` and algorithm: the key of that id, or,
    /// for a token without `kid`, every key that accepts the algorithm.
    pub(super) fn candidates(
        &self,
        kid: Option<&str>,
        algorithm: Algorithm,
    ) -> Vec<Arc<VerifyingKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).into_iter().cloned().collect(),
            None => self
                .all
                .iter()
                .filter(|key| key.accepts(algorithm))
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

/// The last fetch attempt.
struct Attempt {
    at: Instant,
    failure: Option<Arc<JwksError>>,
}

/// One issuer's keys, shared by the registries of successive reloads while its settings stay.
pub(super) struct IssuerKeys {
    settings: IssuerSettings,
    /// `None` when it could not be built (then every fetch fails, saying so).
    http: Option<reqwest::Client>,
    keys: ArcSwapOption<KeySet>,
    last: Mutex<Option<Attempt>>,
    /// Held for the duration of a fetch: the single flight.
    fetching: Arc<tokio::sync::Mutex<()>>,
    /// Modification time and length of `jwks_file` when last read.
    file_stamp: Mutex<Option<(SystemTime, u64)>>,
}

impl IssuerKeys {
    /// Prepares the issuer's HTTP client (its `ca_file` as the only root, when set); fetches
    /// nothing yet.
    pub(super) fn new(settings: IssuerSettings) -> Self {
        let http = Self::client(&settings)
            .map_err(|error| {
                // `config` read the CA already, so this is not expected; the fetches then fail
                // and say so.
                tracing::warn!(issuer = %settings.issuer, %error, "cannot build the HTTP client of a workload issuer");
            })
            .ok();
        Self {
            settings,
            http,
            keys: ArcSwapOption::empty(),
            last: Mutex::new(None),
            fetching: Arc::new(tokio::sync::Mutex::new(())),
            file_stamp: Mutex::new(None),
        }
    }

    fn client(settings: &IssuerSettings) -> Result<reqwest::Client, reqwest::Error> {
        let mut http = reqwest::Client::builder()
            .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(FETCH_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
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

    /// Whether the key of `thumbprint` is in the last good set: a remembered token whose key
    /// left the JWKS is no longer served.
    pub(super) fn still_has(&self, thumbprint: &str) -> bool {
        self.keys
            .load()
            .as_ref()
            .is_some_and(|set| set.has(thumbprint))
    }

    /// Fetches the keys again unless an attempt was made less than `interval` ago, in which case
    /// that attempt's outcome is the answer. Waits for a fetch in flight first.
    pub(super) async fn refetch(
        self: &Arc<Self>,
        interval: Duration,
    ) -> Result<Arc<KeySet>, Unavailable> {
        let guard = Arc::clone(&self.fetching).lock_owned().await;
        let now = Instant::now();
        if let Some(outcome) = self.recent_outcome(now, interval) {
            return outcome;
        }
        let keys = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _single_flight = guard;
            keys.fetch_and_store().await
        });
        match task.await {
            Ok(Ok(set)) => Ok(set),
            Ok(Err(_)) | Err(_) => Err(Unavailable {
                retry_after: interval,
            }),
        }
    }

    /// The outcome of an attempt made less than `interval` before `now`, if there is one.
    fn recent_outcome(
        &self,
        now: Instant,
        interval: Duration,
    ) -> Option<Result<Arc<KeySet>, Unavailable>> {
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let attempt = last.as_ref()?;
        let next = attempt.at.checked_add(interval)?;
        if now >= next {
            return None;
        }
        Some(match (&attempt.failure, self.current()) {
            (None, Some(set)) => Ok(set),
            _ => Err(Unavailable {
                retry_after: next.saturating_duration_since(now),
            }),
        })
    }

    /// One fetch: records the attempt, keeps the new set when it is good, and logs a failure
    /// (the last good keys stay).
    async fn fetch_and_store(&self) -> Result<Arc<KeySet>, Arc<JwksError>> {
        let at = Instant::now();
        let outcome = self.fetch().await.map_err(Arc::new);
        let failure = match &outcome {
            Ok(set) => {
                let set = match set {
                    Some(set) => Arc::clone(set),
                    None => self.current().ok_or_else(|| {
                        Arc::new(JwksError::Invalid(
                            "the file is unchanged but was never read",
                        ))
                    })?,
                };
                let old = self.keys.swap(Some(Arc::clone(&set)));
                if old.as_ref().is_none_or(|old| !Arc::ptr_eq(old, &set)) {
                    tracing::info!(
                        issuer = %self.settings.issuer,
                        keys = set.len(),
                        "workload issuer keys loaded"
                    );
                }
                None
            }
            Err(error) => {
                let cause = crate::telemetry::error_chain(error.as_ref());
                tracing::warn!(
                    issuer = %self.settings.issuer,
                    error = %error,
                    %cause,
                    kept = self.current().is_some(),
                    "cannot fetch the keys of a workload issuer"
                );
                Some(Arc::clone(error))
            }
        };
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(Attempt {
            at,
            failure: failure.clone(),
        });
        match failure {
            None => self
                .current()
                .ok_or_else(|| Arc::new(JwksError::Invalid("no keys"))),
            Some(error) => Err(error),
        }
    }

    /// Reads the JWKS from its source; `Ok(None)` when the file has not changed since it was
    /// last read.
    async fn fetch(&self) -> Result<Option<Arc<KeySet>>, JwksError> {
        let body = match &self.settings.keys {
            KeySource::File(path) => match self.read_file(path).await? {
                Some(body) => body,
                None => return Ok(None),
            },
            KeySource::Uri(uri) => self.get(uri, "the JWKS").await?,
            KeySource::Discovery => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    self.settings.issuer.trim_end_matches('/')
                );
                let document = self.get(&discovery, "the discovery document").await?;
                #[derive(serde::Deserialize)]
                struct Discovery {
                    jwks_uri: Option<String>,
                }
                let jwks_uri = serde_json::from_slice::<Discovery>(&document)
                    .ok()
                    .and_then(|document| document.jwks_uri)
                    .filter(|uri| uri.starts_with("https://") || uri.starts_with("http://"))
                    .ok_or(JwksError::NoJwksUri)?;
                self.get(&jwks_uri, "the JWKS").await?
            }
        };
        KeySet::parse(&body).map(|set| Some(Arc::new(set)))
    }

    /// The file's bytes, or `None` when its modification time and length are those of the last
    /// read and a set is loaded.
    async fn read_file(&self, path: &Path) -> Result<Option<Vec<u8>>, JwksError> {
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
        if metadata.len() > MAX_BODY_BYTES as u64 {
            return Err(JwksError::TooLarge { what: "jwks_file" });
        }
        let body = tokio::fs::read(path).await.map_err(unreadable)?;
        *self
            .file_stamp
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(stamp);
        Ok(Some(body))
    }

    /// GETs a JSON document, with the bearer token when one is configured, reading at most
    /// [`MAX_BODY_BYTES`].
    async fn get(&self, url: &str, what: &'static str) -> Result<Vec<u8>, JwksError> {
        let failed = |source| JwksError::Request { what, source };
        let http = self.http.as_ref().ok_or(JwksError::Invalid(
            "the HTTP client could not be built; check ca_file",
        ))?;
        let mut request = http
            .get(url)
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(path) = &self.settings.bearer_token_file {
            let token =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| JwksError::File {
                        what: "bearer_token_file",
                        source,
                    })?;
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
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if body.len().saturating_add(chunk.len()) > MAX_BODY_BYTES {
                return Err(JwksError::TooLarge { what });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
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
