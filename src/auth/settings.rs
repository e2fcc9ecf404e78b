//! `[auth]` and `[callers.NAME]`: the admin and metrics keys, anonymous access, and each caller's
//! key hash, allow rules and limits, as `config` validated them.

use std::num::NonZeroU32;
use std::str::FromStr;

use super::{AllowRule, KeyHash, is_valid_name};

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
}

/// `[callers.NAME]`: one calling service.
#[derive(Debug, Clone)]
pub struct CallerSettings {
    /// Hash of the caller's key.
    pub key_sha256: KeyHash,
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
