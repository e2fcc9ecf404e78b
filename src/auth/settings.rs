//! `[auth]` and `[callers.NAME]`: the admin and metrics keys, anonymous access, and each caller's
//! key hash, allow rules and limits, as `config` validated them.

use std::num::NonZeroU32;
use std::str::FromStr;

use super::{KeyHash, is_valid_name};

/// Longest organization id accepted (Auth0's are `org_` and 16 characters).
const MAX_ORGANIZATION_LEN: usize = 64;

/// Whether `id` is an organization id: `org_` followed by ASCII letters and digits (case
/// matters), so that one organization cannot be named two ways and make two cache keys.
pub fn is_organization_id(id: &str) -> bool {
    id.len() <= MAX_ORGANIZATION_LEN
        && id
            .strip_prefix("org_")
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// One entry of `[callers.NAME] organizations`: `*` (any), `org_…` (that organization in any
/// tenant the caller may use) or `tenant/org_…` (in that tenant only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrganizationRule {
    /// `*`.
    Any,
    /// `org_…`, in any tenant.
    Id(Box<str>),
    /// `tenant/org_…`.
    InTenant {
        /// The tenant.
        tenant: Box<str>,
        /// The organization id.
        id: Box<str>,
    },
}

impl FromStr for OrganizationRule {
    type Err = &'static str;

    fn from_str(rule: &str) -> Result<Self, Self::Err> {
        const SHAPE: &str =
            "expected *, an organization id (org_ and letters or digits) or tenant/org_…";
        if rule == "*" {
            return Ok(Self::Any);
        }
        match rule.split_once('/') {
            None if is_organization_id(rule) => Ok(Self::Id(rule.into())),
            Some((tenant, id)) if is_valid_name(tenant) && is_organization_id(id) => {
                Ok(Self::InTenant {
                    tenant: tenant.into(),
                    id: id.into(),
                })
            }
            _ => Err(SHAPE),
        }
    }
}

impl OrganizationRule {
    /// Whether the rule lets a caller name organization `id` in `tenant`.
    pub fn allows(&self, tenant: &str, id: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Id(allowed) => **allowed == *id,
            Self::InTenant {
                tenant: allowed_tenant,
                id: allowed,
            } => **allowed_tenant == *tenant && **allowed == *id,
        }
    }
}

/// `[auth]`: the admin key and whether anonymous callers are served.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Hash of the key that guards `/v1/admin`; admin routes are closed without one.
    pub admin_key_sha256: Option<KeyHash>,
    /// Hash of the key that `/metrics` requires, when set; without one `/metrics` is open.
    pub metrics_key_sha256: Option<KeyHash>,
    /// Serve requests that carry no caller key (a sidecar on localhost).
    pub allow_anonymous: bool,
    /// IdP requests per minute a caller's requests may start, unless the caller sets its own.
    pub default_idp_requests_per_minute: NonZeroU32,
    /// `[auth.workload]`, when callers may present workload tokens.
    pub workload: Option<WorkloadSettings>,
}

/// `[callers.NAME]`: one calling service.
#[derive(Debug, Clone)]
pub struct CallerSettings {
    /// Hash of the caller's key (none: the caller presents a workload token only).
    pub key_sha256: Option<KeyHash>,
    /// The workload identities that prove this caller.
    pub workload: Vec<WorkloadRule>,
    /// What the caller may ask for.
    pub allow: Vec<AllowRule>,
    /// The organizations the caller may name (none: only tenant-wide tokens).
    pub organizations: Vec<OrganizationRule>,
    /// Requests per second the caller may make, when limited.
    pub rate_limit: Option<u32>,
    /// IdP requests per minute the caller's requests may start (misses on new keys, forced
    /// refetches, too-short tokens).
    pub idp_requests_per_minute: NonZeroU32,
    /// Most keys the caller's requests may create in the cache.
    pub max_keys: usize,
}

/// Keys a caller may create unless it sets `max_keys`.
pub const DEFAULT_MAX_KEYS: usize = 1000;

/// `[auth.workload]`: how workload tokens (JWTs from the platform's issuers) are verified.
#[derive(Debug, Clone)]
pub struct WorkloadSettings {
    /// The `aud` every workload token must carry.
    pub audience: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: std::time::Duration,
    /// Least time between two refetches of an issuer's keys caused by an unknown `kid`.
    pub jwks_refresh_interval: std::time::Duration,
    /// Most verified tokens remembered, so that a hit pays no signature check.
    pub max_remembered: usize,
    /// The trusted issuers.
    pub issuers: Vec<IssuerSettings>,
}

/// Default of `auth.workload.leeway`.
pub const DEFAULT_LEEWAY: std::time::Duration = std::time::Duration::from_secs(30);
/// Default of `auth.workload.jwks_refresh_interval`.
pub const DEFAULT_JWKS_REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// Default of `auth.workload.max_remembered`.
pub const DEFAULT_MAX_REMEMBERED: usize = 10_000;

/// One `[[auth.workload.issuers]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerSettings {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// Where its keys are.
    pub keys: KeySource,
    /// The CA of the issuer's HTTPS, in place of the system roots (`ca_file`, read and checked
    /// at load).
    pub ca_pem: Option<Vec<u8>>,
    /// A file whose content is sent as `Authorization: Bearer` to discovery and JWKS (read at
    /// every fetch: the kubelet rotates it).
    pub bearer_token_file: Option<std::path::PathBuf>,
}

/// Where an issuer's JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// OIDC discovery: `{issuer}/.well-known/openid-configuration` names the `jwks_uri`.
    Discovery,
    /// `jwks_uri`.
    Uri(String),
    /// `jwks_file`: a JWKS on disk, read again when it changes.
    File(std::path::PathBuf),
}

/// One entry of `[callers.NAME] workload`: the issuer and the subjects it proves this caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadRule {
    /// The issuer, as configured in `[[auth.workload.issuers]]`.
    pub issuer: String,
    /// The `sub` the token must carry.
    pub subject: SubjectPattern,
}

/// A `subject`: exact, or a prefix when it ends in one `*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubjectPattern {
    /// The whole subject.
    Exact(String),
    /// A subject starting with this (the `*` removed).
    Prefix(String),
}

impl FromStr for SubjectPattern {
    type Err = &'static str;

    fn from_str(subject: &str) -> Result<Self, Self::Err> {
        if subject.is_empty() || subject == "*" {
            return Err("empty, or only *: name the subject, or a prefix of it followed by *");
        }
        match subject.strip_suffix('*') {
            Some(prefix) if prefix.contains('*') => {
                Err("a * may only end the subject (a prefix), once")
            }
            Some(prefix) => Ok(Self::Prefix(prefix.to_owned())),
            None if subject.contains('*') => Err("a * may only end the subject (a prefix), once"),
            None => Ok(Self::Exact(subject.to_owned())),
        }
    }
}

/// One part of an allow rule: a name, or `*` for any.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
}

impl Pattern {
    fn parse(part: &str) -> Self {
        if part == "*" {
            Self::Any
        } else {
            Self::Exact(part.to_owned())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(expected) => expected == value,
        }
    }
}

/// `tenant/environment` or `tenant/environment/audience`, where `*` matches a whole part and the
/// audience is everything after the second `/` (audiences are often URLs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    tenant: Pattern,
    environment: Pattern,
    audience: Option<Pattern>,
}

impl FromStr for AllowRule {
    type Err = &'static str;

    fn from_str(rule: &str) -> Result<Self, Self::Err> {
        let mut parts = rule.splitn(3, '/');
        let tenant = parts.next().unwrap_or_default();
        let Some(environment) = parts.next() else {
            return Err("expected tenant/environment or tenant/environment/audience");
        };
        let audience = parts.next();
        if tenant.is_empty() || environment.is_empty() || audience == Some("") {
            return Err("a part is empty; use * to match anything");
        }
        for part in [tenant, environment] {
            if part != "*" && !is_valid_name(part) {
                return Err("tenant and environment are lower-case [a-z0-9_-] names or *");
            }
        }
        Ok(Self {
            tenant: Pattern::parse(tenant),
            environment: Pattern::parse(environment),
            audience: audience.map(Pattern::parse),
        })
    }
}

impl AllowRule {
    /// `*/*`: everything.
    pub(super) fn any() -> Self {
        Self {
            tenant: Pattern::Any,
            environment: Pattern::Any,
            audience: None,
        }
    }

    /// Whether the rule allows this tenant and environment, for some audience.
    pub(super) fn allows_environment(&self, tenant: &str, environment: &str) -> bool {
        self.tenant.matches(tenant) && self.environment.matches(environment)
    }

    /// Whether the rule allows this tenant, environment and audience (`None`: not yet known).
    pub fn allows(&self, tenant: &str, environment: &str, audience: Option<&str>) -> bool {
        self.tenant.matches(tenant)
            && self.environment.matches(environment)
            && match (&self.audience, audience) {
                (None, _) | (Some(Pattern::Any), _) => true,
                (Some(pattern), Some(audience)) => pattern.matches(audience),
                (Some(_), None) => false,
            }
    }
}

/// Whether the broker may fetch keys from `url`: https, or http to a loopback address only
/// (a test or the development IdP), since keys over plain HTTP could be swapped on the way.
pub fn is_fetchable_url(url: &str) -> Result<(), &'static str> {
    let url = reqwest::Url::parse(url).map_err(|_| "not an absolute URL")?;
    let loopback = match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err("must be an https URL (http only to a loopback address)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fetched_over_https_or_from_loopback() {
        assert!(is_fetchable_url("https://kubernetes.default.svc").is_ok());
        assert!(is_fetchable_url("http://127.0.0.1:8080/jwks").is_ok());
        assert!(is_fetchable_url("http://localhost/jwks").is_ok());
        assert!(is_fetchable_url("http://issuer.example/jwks").is_err());
        assert!(is_fetchable_url("spiffe://example.org").is_err());
        assert!(is_fetchable_url("not a url").is_err());
    }
}
