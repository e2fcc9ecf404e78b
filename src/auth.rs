//! Callers: their keys, their allow rules, and the extractor that authenticates a request.
//!
//! A caller presents `Authorization: Bearer <key>`, or, at the OAuth2 facade, its name and key as
//! client id and secret; configuration holds only the SHA-256 of each key. A key seen before is
//! found in the verified keys (a keyed fast hash, then the whole key compared in constant time:
//! [`verified`]); a new one is hashed with SHA-256 and looked up by its digest, so the cost of
//! authentication does not grow with the number of callers and its timing reveals nothing about
//! how close a wrong key came.
//! A caller may instead present a workload token (a JWT from a configured issuer: [`workload`]),
//! which is verified once and then remembered until it expires.
//! Authentication (401) comes first, then authorisation against `tenant/environment[/audience]`
//! rules (403), and only then does a request reach the broker. An authenticated caller with a
//! `rate_limit` is then held to it ([`crate::limits`]), before any other work is done for it.
//! A caller keeps the token requests it was granted ([`grants`]) until a reload builds the
//! callers anew, so that asking again costs a lookup.

mod discovery;
mod grants;
mod jwks;
mod remembered;
mod settings;
mod verified;
mod workload;

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::Clock;
use crate::limits::{BudgetCounters, IdpBudget, RateLimiter};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::request::CallerName;

pub use grants::{Grant, Grants};
pub use settings::{
    AllowRule, AuthSettings, CallerSettings, DEFAULT_JWKS_REFRESH_INTERVAL, DEFAULT_LEEWAY,
    DEFAULT_MAX_KEYS, DEFAULT_MAX_REMEMBERED, IssuerSettings, KeySource, OrganizationRule,
    SubjectPattern, WorkloadRule, WorkloadSettings, is_fetchable_url, is_organization_id,
};
pub use workload::WorkloadRejection;

/// The name of the caller served when `auth.allow_anonymous` is on.
const ANONYMOUS: &str = "anonymous";

/// Prefix of generated caller keys, so a leaked key is recognisable in a secret scanner.
const KEY_PREFIX: &str = "tbk_";

/// A number no earlier call in this process returned: a new [`Caller::id`] or
/// [`CallerRegistry::generation`].
fn next_unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The caller of admin requests, as the logs name it.
struct AdminCaller;

impl CallerName for AdminCaller {
    fn caller_name(&self) -> &str {
        "admin"
    }
}

/// The caller of every admin request, in the logs.
static ADMIN_CALLER: std::sync::LazyLock<Arc<AdminCaller>> =
    std::sync::LazyLock::new(|| Arc::new(AdminCaller));

/// The SHA-256 of a caller or admin key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Hashes a presented key.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses 64 hex digits, as written in configuration.
    pub fn from_hex(hex: &str) -> Result<Self, &'static str> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex.trim(), &mut bytes).map_err(
            |_| "not a SHA-256 in hex (64 digits); make one with `token-broker hash-key`",
        )?;
        Ok(Self(bytes))
    }

    /// The 32 bytes of the hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The hash as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Equality in constant time.
    fn matches(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

/// Whether `name` is a valid tenant, environment or caller name: lower-case `[a-z0-9_-]`, 1-64 long.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A new random caller key and the hash to configure for it.
pub fn generate_key() -> (String, KeyHash) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = KeyHash::of(&key);
    (key, hash)
}

/// An authenticated calling service.
///
/// Laid out in declaration order (`repr(C)`): what a cache hit reads (the id for the audit
/// trail, the grants, whether there is a rate limit) comes first, with the reference counts in
/// 128 bytes, two cache lines' worth.
#[derive(Debug)]
#[repr(C)]
pub struct Caller {
    /// A number no other caller of this process has, for the audit trail's counters (kept by
    /// name across reloads).
    pub id: u64,
    /// The token requests granted to this caller under its registry's configuration.
    pub grants: Grants,
    /// Boxed: most callers have none, and a hit reads only whether there is one.
    rate_limit: Option<Box<RateLimiter>>,
    /// The caller's configured name (`anonymous` when anonymous access is on).
    pub name: Arc<str>,
    /// The IdP requests and cache keys this caller's requests may cost.
    pub idp_budget: Arc<IdpBudget>,
    /// The [`CallerRegistry::generation`] this caller belongs to.
    registry: u64,
    /// What `rate_limit` measures with.
    clock: Clock,
    /// Requests refused for `rate_limit`.
    refused_rate: metrics::Counter,
    allow: Vec<AllowRule>,
    organizations: Vec<OrganizationRule>,
}

impl CallerName for Caller {
    fn caller_name(&self) -> &str {
        &self.name
    }
}

impl Caller {
    /// The [`CallerRegistry::generation`] this caller belongs to: a grant is kept only when it
    /// was decided under that registry's configuration.
    pub fn registry(&self) -> u64 {
        self.registry
    }

    /// Counts one request against the caller's `rate_limit`; `Err(wait)` when it is over. Reads
    /// the clock only for a caller that has a limit.
    pub fn admit(&self) -> Result<(), Duration> {
        match &self.rate_limit {
            Some(limiter) => limiter.check(self.clock.instant()),
            None => Ok(()),
        }
    }

    /// Whether some rule lets the caller use this tenant and environment, for some audience.
    pub fn may_use_environment(&self, tenant: &str, environment: &str) -> bool {
        self.allow
            .iter()
            .any(|rule| rule.allows_environment(tenant, environment))
    }

    /// Whether the caller may name organization `id` for a token of `tenant` (it may use the
    /// tenant already).
    pub fn may_use_organization(&self, tenant: &str, id: &str) -> bool {
        self.organizations
            .iter()
            .any(|rule| rule.allows(tenant, id))
    }

    /// Whether the caller may receive tokens of this tenant, environment and audience.
    pub fn may_use(&self, tenant: &str, environment: &str, audience: Option<&str>) -> bool {
        self.allow
            .iter()
            .any(|rule| rule.allows(tenant, environment, audience))
    }
}

/// Why a request was turned away before any work was done for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("no caller key: send Authorization: Bearer <key>")]
    MissingKey,
    /// A key that matches no caller.
    #[error("the key is not valid")]
    InvalidKey,
    /// No `Authorization: Bearer` header on an admin request.
    #[error("no admin key: send Authorization: Bearer <admin key>")]
    MissingAdminKey,
    /// No `Authorization: Bearer` header on a scrape when `auth.metrics_key_sha256` is set.
    #[error("no metrics key: send Authorization: Bearer <metrics key>")]
    MissingMetricsKey,
    /// No admin key is configured, so the admin API is closed.
    #[error("the admin API is disabled: set auth.admin_key_sha256 (from `token-broker hash-key`)")]
    AdminDisabled,
    /// The caller is over its `rate_limit`.
    #[error("this caller is over its request rate; retry later")]
    RateLimited {
        /// How long until the caller's next request is allowed.
        retry_after: Duration,
    },
    /// A workload token failed a check; the message says which.
    #[error(transparent)]
    Workload(#[from] WorkloadRejection),
    /// The keys of the workload token's issuer were never fetched, or cannot be fetched now.
    #[error(
        "the keys of the workload token's issuer cannot be fetched now; retry after the seconds in Retry-After (the broker's log has the cause)"
    )]
    WorkloadKeysUnavailable {
        /// When the broker will try to fetch them again.
        retry_after: Duration,
    },
}

/// The configured callers, ready to authenticate requests.
pub struct CallerRegistry {
    /// A number no other registry of this process has; its callers carry it.
    generation: u64,
    /// The callers by the SHA-256 of their key: one lookup, whatever their number.
    by_hash: std::collections::HashMap<[u8; 32], Arc<Caller>, foldhash::quality::RandomState>,
    /// Keys that verified already: a hit looks here first.
    verified: verified::VerifiedKeys,
    /// Workload token verification, when `[auth.workload]` is configured.
    workload: Option<Arc<workload::WorkloadVerifier>>,
    /// Every caller (the anonymous one included) by name, for the next reload to carry over
    /// its IdP budget and its [`Caller::id`] (so the audit trail keeps counting where it was).
    by_name: std::collections::HashMap<Arc<str>, Arc<Caller>>,
    anonymous: Option<Arc<Caller>>,
    admin: Option<KeyHash>,
    metrics: Option<KeyHash>,
}

impl CallerRegistry {
    /// Builds the registry from validated `[auth]` and `[callers]` settings. A caller of
    /// `previous` (the registry before a reload) with the same IdP limits keeps its budget, so a
    /// reload neither refills it nor forgets the keys it created.
    pub fn from_settings(
        auth: &AuthSettings,
        callers: &BTreeMap<String, CallerSettings>,
        metrics: &Metrics,
        previous: Option<&CallerRegistry>,
        clock: &Clock,
    ) -> Self {
        let generation = next_unique();
        let budget = |name: &str, per_minute: NonZeroU32, max_keys: usize| {
            let kept = previous
                .and_then(|registry| registry.by_name.get(name))
                .map(|caller| &caller.idp_budget)
                .filter(|budget| budget.limits() == (per_minute, max_keys));
            match kept {
                Some(budget) => Arc::clone(budget),
                None => Arc::new(IdpBudget::new(
                    Arc::from(name),
                    per_minute,
                    max_keys,
                    BudgetCounters {
                        idp_requests: metrics.caller_idp_requests(name),
                        refused_budget: metrics.caller_refusals(name, "idp_budget"),
                        refused_keys: metrics.caller_refusals(name, "max_keys"),
                    },
                )),
            }
        };
        let id_of = |name: &str| {
            previous
                .and_then(|registry| registry.by_name.get(name))
                .map(|caller| caller.id)
                .unwrap_or_else(next_unique)
        };
        let callers: Vec<(&CallerSettings, Arc<Caller>)> = callers
            .iter()
            .map(|(name, settings)| {
                let caller = Caller {
                    name: Arc::from(name.as_str()),
                    id: id_of(name),
                    allow: settings.allow.clone(),
                    organizations: settings.organizations.clone(),
                    rate_limit: settings
                        .rate_limit
                        .and_then(NonZeroU32::new)
                        .map(|rate| Box::new(RateLimiter::per_second(rate))),
                    idp_budget: budget(name, settings.idp_requests_per_minute, settings.max_keys),
                    refused_rate: metrics.caller_refusals(name, "rate_limit"),
                    clock: clock.clone(),
                    grants: Grants::default(),
                    registry: generation,
                };
                (settings, Arc::new(caller))
            })
            .collect();
        let anonymous = auth.allow_anonymous.then(|| {
            Arc::new(Caller {
                name: Arc::from(ANONYMOUS),
                id: id_of(ANONYMOUS),
                allow: vec![AllowRule::any()],
                organizations: vec![OrganizationRule::Any],
                rate_limit: None,
                idp_budget: budget(
                    ANONYMOUS,
                    auth.default_idp_requests_per_minute,
                    DEFAULT_MAX_KEYS,
                ),
                refused_rate: metrics::Counter::noop(),
                clock: clock.clone(),
                grants: Grants::default(),
                registry: generation,
            })
        });
        let by_name = callers
            .iter()
            .map(|(_, caller)| caller)
            .chain(&anonymous)
            .map(|caller| (Arc::clone(&caller.name), Arc::clone(caller)))
            .collect();
        let by_hash = callers
            .iter()
            .filter_map(|(settings, caller)| Some((settings.key_sha256?.0, Arc::clone(caller))))
            .collect();
        let workload = auth.workload.as_ref().map(|workload| {
            let rules: Vec<_> = callers
                .iter()
                .flat_map(|(settings, caller)| {
                    settings
                        .workload
                        .iter()
                        .map(move |rule| (rule.clone(), Arc::clone(caller)))
                })
                .collect();
            Arc::new(workload::WorkloadVerifier::new(
                workload,
                |issuer| {
                    workload::issuer_keys(
                        issuer,
                        previous.and_then(|registry| registry.workload.as_deref()),
                        metrics,
                        clock,
                        workload.jwks_refresh_interval,
                    )
                },
                &rules,
                metrics,
                clock,
            ))
        });
        Self {
            generation,
            by_hash,
            verified: verified::VerifiedKeys::default(),
            workload,
            anonymous,
            by_name,
            admin: auth.admin_key_sha256,
            metrics: auth.metrics_key_sha256,
        }
    }

    /// A number no other registry of this process has (see [`Caller::registry`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Authenticates the value of an `Authorization` header: a caller key, or a workload token
    /// when `[auth.workload]` is configured. Only a workload token that is not remembered yet
    /// waits (on its signature check, and on its issuer's keys when they must be fetched).
    pub async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
    ) -> Result<Arc<Caller>, AuthError> {
        let Some(key) = authorization.and_then(bearer_key) else {
            return match (&self.anonymous, authorization) {
                (Some(anonymous), None) => Ok(Arc::clone(anonymous)),
                _ => Err(AuthError::MissingKey),
            };
        };
        let workload = self.workload_for(key);
        if let Some(caller) = workload.and_then(|workload| workload.remembered(key)) {
            return Ok(caller);
        }
        if let Some(caller) = self.key_caller(key) {
            return Ok(caller);
        }
        match workload {
            // Boxed, so that the future of a request with a known key stays small.
            Some(workload) => Box::pin(workload.verify(key)).await,
            None => Err(AuthError::InvalidKey),
        }
    }

    /// The caller `key` proves: from the keys verified before, else by one lookup by its
    /// SHA-256 (and then remembered).
    fn key_caller(&self, key: &str) -> Option<Arc<Caller>> {
        if let Some(caller) = self.verified.get(key) {
            return Some(caller);
        }
        let caller = self.by_key(key)?;
        self.verified.insert(key, &caller);
        Some(caller)
    }

    /// The workload verifier, when one is configured and `value` has the shape of a JWT.
    fn workload_for(&self, value: &str) -> Option<&workload::WorkloadVerifier> {
        self.workload
            .as_deref()
            .filter(|_| workload::looks_like_jwt(value))
    }

    /// Authenticates an RFC 7523 client assertion at the OAuth2 facade: a workload token,
    /// verified exactly as a bearer one.
    pub async fn authenticate_assertion(&self, assertion: &str) -> Result<Arc<Caller>, AuthError> {
        match self.workload.as_deref() {
            Some(workload) => workload.authenticate(assertion).await,
            None => Err(AuthError::Workload(WorkloadRejection::NotEnabled)),
        }
    }

    /// The caller whose key hash is that of `key`: one map lookup by the SHA-256 of the
    /// presented key, whatever the number of callers. Its timing depends on the digest only,
    /// which says nothing usable about how close a wrong key came to a right one.
    fn by_key(&self, key: &str) -> Option<Arc<Caller>> {
        self.by_hash.get(&KeyHash::of(key).0).cloned()
    }

    /// Authenticates a caller by name and key (OAuth2 client id and secret). The key is looked
    /// up first and the name compared only then, so timing does not reveal whether a name
    /// exists; a right key under another caller's name fails.
    pub fn authenticate_client(&self, name: &str, key: &str) -> Result<Arc<Caller>, AuthError> {
        let caller = self.key_caller(key).ok_or(AuthError::InvalidKey)?;
        if *caller.name == *name {
            Ok(caller)
        } else {
            Err(AuthError::InvalidKey)
        }
    }

    /// The anonymous caller, when `auth.allow_anonymous` is on.
    pub fn anonymous(&self) -> Option<Arc<Caller>> {
        self.anonymous.clone()
    }

    /// Authenticates an admin request; without a configured admin key every admin request fails.
    pub fn authenticate_admin(&self, authorization: Option<&[u8]>) -> Result<(), AuthError> {
        let Some(admin) = &self.admin else {
            return Err(AuthError::AdminDisabled);
        };
        let key = authorization
            .and_then(bearer_key)
            .ok_or(AuthError::MissingAdminKey)?;
        if bool::from(admin.matches(&KeyHash::of(key))) {
            Ok(())
        } else {
            Err(AuthError::InvalidKey)
        }
    }

    /// Authenticates a metrics scrape; open when no metrics key is configured.
    pub fn authenticate_metrics(&self, authorization: Option<&[u8]>) -> Result<(), AuthError> {
        let Some(expected) = &self.metrics else {
            return Ok(());
        };
        let key = authorization
            .and_then(bearer_key)
            .ok_or(AuthError::MissingMetricsKey)?;
        if bool::from(expected.matches(&KeyHash::of(key))) {
            Ok(())
        } else {
            Err(AuthError::InvalidKey)
        }
    }
}

/// The key of `Bearer <key>` (scheme case-insensitive), when well formed.
fn bearer_key(header: &[u8]) -> Option<&str> {
    let space = header.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = header.split_at(space);
    let key = rest.trim_ascii();
    if !scheme.eq_ignore_ascii_case(b"bearer") || key.is_empty() {
        return None;
    }
    std::str::from_utf8(key).ok()
}

/// Where extractors find the current caller registry (it changes on reload).
pub trait CallerSource {
    /// The registry in force now.
    fn caller_registry(&self) -> Arc<CallerRegistry>;
}

/// Admits an authenticated caller: names it in the request's log context, then holds it to its
/// `rate_limit` (429). Every way in (the extractor, the OAuth2 facade) ends here.
pub fn admit(caller: Arc<Caller>) -> Result<Arc<Caller>, AuthError> {
    crate::telemetry::request::set_caller(Arc::clone(&caller) as Arc<dyn CallerName>);
    if let Err(retry_after) = caller.admit() {
        caller.refused_rate.increment(1);
        return Err(AuthError::RateLimited { retry_after });
    }
    Ok(caller)
}

/// Extracts the authenticated [`Caller`] of a request, or rejects it with 401, or with 429 when
/// the caller is over its rate limit. Names the caller in the request's log context.
pub struct Authenticated(pub Arc<Caller>);

impl<S> FromRequestParts<S> for Authenticated
where
    S: CallerSource + Send + Sync,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Self::from_headers(&parts.headers, state).await
    }
}

impl Authenticated {
    /// The extractor's work on a request's headers, for a route served before the router.
    pub async fn from_headers<S: CallerSource + Sync>(
        headers: &HeaderMap,
        state: &S,
    ) -> Result<Self, AuthError> {
        let header = headers.get(AUTHORIZATION).map(|v| v.as_bytes());
        let caller = state.caller_registry().authenticate(header).await?;
        admit(caller).map(Authenticated)
    }
}

/// Admits a request that carries the admin key, or rejects it with 401.
pub struct Admin;

impl<S> FromRequestParts<S> for Admin
where
    S: CallerSource + Send + Sync,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes());
        state.caller_registry().authenticate_admin(header)?;
        crate::telemetry::request::set_caller(Arc::clone(&*ADMIN_CALLER) as Arc<dyn CallerName>);
        Ok(Admin)
    }
}

/// Admits a metrics scrape: always without `auth.metrics_key_sha256`, else with that key.
pub struct MetricsReader;

impl<S> FromRequestParts<S> for MetricsReader
where
    S: CallerSource + Send + Sync,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes());
        state
            .caller_registry()
            .authenticate_metrics(header)
            .map(|()| MetricsReader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_hit_reads_of_a_caller_fits_in_two_cache_lines() {
        let arc_counts = 2 * std::mem::size_of::<usize>();
        let end = arc_counts
            + std::mem::offset_of!(Caller, rate_limit)
            + std::mem::size_of::<Option<Box<RateLimiter>>>();
        assert!(end <= 128, "the hot fields end at byte {end}");
    }

    /// A caller with `key`, allowed `acme/*`.
    fn key_caller(key: &str) -> CallerSettings {
        CallerSettings {
            key_sha256: Some(KeyHash::of(key)),
            workload: Vec::new(),
            allow: vec!["acme/*".parse().unwrap()],
            organizations: Vec::new(),
            rate_limit: None,
            idp_requests_per_minute: NonZeroU32::new(60).unwrap(),
            max_keys: DEFAULT_MAX_KEYS,
        }
    }

    /// `[auth]` with no admin or metrics key, anonymous access or workload issuers.
    fn keys_only() -> AuthSettings {
        AuthSettings {
            admin_key_sha256: None,
            metrics_key_sha256: None,
            allow_anonymous: false,
            default_idp_requests_per_minute: NonZeroU32::new(60).unwrap(),
            workload: None,
        }
    }

    #[test]
    fn rules_match_whole_parts_and_url_audiences() {
        let rule: AllowRule = "acme/production/https://api.example/v1".parse().unwrap();
        assert!(rule.allows("acme", "production", Some("https://api.example/v1")));
        assert!(!rule.allows("acme", "production", Some("https://api.example")));
        assert!(!rule.allows("acme", "production", None));
        let wildcard: AllowRule = "globex/*".parse().unwrap();
        assert!(wildcard.allows("globex", "staging", Some("anything")));
        assert!(!wildcard.allows("globexx", "staging", None));
        assert!("acme".parse::<AllowRule>().is_err());
        assert!("acme//x".parse::<AllowRule>().is_err());
        assert!("Acme/prod".parse::<AllowRule>().is_err());
    }

    #[test]
    fn organization_rules() {
        let any: OrganizationRule = "*".parse().unwrap();
        let id: OrganizationRule = "org_abc".parse().unwrap();
        let in_acme: OrganizationRule = "acme/org_def".parse().unwrap();
        assert!(any.allows("globex", "org_x"));
        assert!(id.allows("acme", "org_abc") && id.allows("globex", "org_abc"));
        assert!(!id.allows("acme", "org_ABC"));
        assert!(in_acme.allows("acme", "org_def") && !in_acme.allows("globex", "org_def"));
        for bad in [
            "",
            "org_",
            "ORG_abc",
            "org-abc",
            "acme/",
            "Acme/org_a",
            "a/b/org_c",
            "acme/*",
        ] {
            assert!(bad.parse::<OrganizationRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_keys_hash_to_what_configuration_holds() {
        let (key, hash) = generate_key();
        assert!(key.starts_with(KEY_PREFIX));
        assert_eq!(
            KeyHash::from_hex(&hash.to_hex()).unwrap(),
            KeyHash::of(&key)
        );
        assert_eq!(format!("{hash:?}"), "KeyHash(..)");
    }

    /// A registry of `callers` with keys only, on the system clock.
    fn key_registry(callers: &BTreeMap<String, CallerSettings>) -> CallerRegistry {
        CallerRegistry::from_settings(
            &keys_only(),
            callers,
            &Metrics::new(),
            None,
            &Clock::system(),
        )
    }

    #[test]
    fn clients_authenticate_by_name_and_key_together() {
        let callers = BTreeMap::from([
            ("billing".to_owned(), key_caller("billing-key")),
            ("reports".to_owned(), key_caller("reports-key")),
        ]);
        let registry = key_registry(&callers);
        let caller = registry
            .authenticate_client("billing", "billing-key")
            .unwrap();
        assert_eq!(&*caller.name, "billing");
        for (name, key) in [
            ("billing", "reports-key"),
            ("reports", "billing-key"),
            ("nobody", "billing-key"),
            ("billing", ""),
        ] {
            assert_eq!(
                registry.authenticate_client(name, key).unwrap_err(),
                AuthError::InvalidKey
            );
        }
        assert!(registry.anonymous().is_none());
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_key(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer_key(b"bearer  abc "), Some("abc"));
        assert_eq!(bearer_key(b"Basic abc"), None);
        assert_eq!(bearer_key(b"Bearer "), None);
    }

    #[tokio::test]
    async fn keys_are_found_among_many_callers_and_remembered_only_when_right() {
        let callers: BTreeMap<String, CallerSettings> = (0..1000)
            .map(|i| (format!("c{i}"), key_caller(&format!("tbk_key-{i}"))))
            .collect();
        let registry = key_registry(&callers);
        let header = |key: &str| format!("Bearer {key}");
        for _ in 0..2 {
            let caller = registry
                .authenticate(Some(header("tbk_key-737").as_bytes()))
                .await
                .unwrap();
            assert_eq!(&*caller.name, "c737");
        }
        for wrong in [
            "tbk_key-737x",
            "tbk_key-7370",
            "xtbk_key-737",
            "tbk_key-1000",
        ] {
            assert_eq!(
                registry
                    .authenticate(Some(header(wrong).as_bytes()))
                    .await
                    .unwrap_err(),
                AuthError::InvalidKey,
                "{wrong}"
            );
        }
        assert_eq!(
            &*registry
                .authenticate_client("c5", "tbk_key-5")
                .unwrap()
                .name,
            "c5"
        );
        assert!(registry.authenticate_client("c6", "tbk_key-5").is_err());
    }
}
