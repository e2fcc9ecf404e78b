//! The cache key: which token a request is for.
//!
//! Two requests share a token exactly when tenant, environment, audience and the *set* of scopes
//! are equal; scopes are normalised (split on whitespace, sorted, deduplicated) before they become
//! part of the key, so `b a a` and `a b` are one entry and one IdP request.

use std::fmt;
use std::sync::Arc;

/// A normalised set of OAuth2 scopes, stored as its canonical space-separated form.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet(Box<str>);

impl ScopeSet {
    /// Parses a space-separated scope string; order and duplicates do not matter.
    pub fn parse(raw: &str) -> Self {
        let mut scopes: Vec<&str> = raw.split_ascii_whitespace().collect();
        scopes.sort_unstable();
        scopes.dedup();
        Self(scopes.join(" ").into_boxed_str())
    }

    /// The canonical form: sorted, deduplicated, single spaces; empty when no scope.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether no scope was asked for.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Identifies one cached token: tenant, environment, audience, scope set and, for Auth0
/// Organizations, the organization (whose tokens carry its `org_id`, so they never share an entry
/// with the tenant-wide token).
///
/// The names are shared (`Arc<str>`) so that a key built for a request from the configured
/// names costs reference counts rather than allocations, and the keys of the cache share one
/// copy of each name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// Configured tenant name.
    pub tenant: Arc<str>,
    /// Configured environment name.
    pub environment: Arc<str>,
    /// The API the token is for.
    pub audience: Arc<str>,
    /// The scopes asked for.
    pub scope: ScopeSet,
    /// The organization the token is for (`org_…`), sent to the IdP as `organization`.
    pub organization: Option<Arc<str>>,
}

impl TokenKey {
    /// Builds a key; `scope` is normalised here.
    pub fn new(tenant: &str, environment: &str, audience: &str, scope: &str) -> Self {
        Self::shared(tenant.into(), environment.into(), audience.into(), scope)
    }

    /// Builds a key from names already shared (the configured ones); `scope` is normalised here.
    pub fn shared(
        tenant: Arc<str>,
        environment: Arc<str>,
        audience: Arc<str>,
        scope: &str,
    ) -> Self {
        Self {
            tenant,
            environment,
            audience,
            scope: ScopeSet::parse(scope),
            organization: None,
        }
    }

    /// The same key for `organization`'s token.
    pub fn for_organization(mut self, organization: Option<Arc<str>>) -> Self {
        self.organization = organization;
        self
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} audience={:?} scope={:?}",
            self.tenant,
            self.environment,
            self.audience,
            self.scope.as_str()
        )?;
        match &self.organization {
            Some(organization) => write!(f, " organization={organization:?}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_order_and_duplicates_do_not_matter() {
        assert_eq!(ScopeSet::parse("b a a"), ScopeSet::parse("a  b"));
        assert_eq!(ScopeSet::parse("b a a").as_str(), "a b");
        assert!(ScopeSet::parse("  ").is_empty());
        assert_eq!(
            TokenKey::new("t", "e", "aud", "x y"),
            TokenKey::new("t", "e", "aud", "y x x")
        );
        assert_ne!(
            TokenKey::new("t", "e", "aud", "x"),
            TokenKey::new("t", "e", "aud", "x y")
        );
    }
}
