//! Which token a caller may have: the validation and authorisation shared by `/v1/tokens`, the
//! OAuth2 facade and user tokens, so that every way in applies the same allow rules.
//!
//! The order is fixed: the caller is already authenticated (401); then the caller is authorised
//! for the tenant, environment and audience (403), and only then does configuration answer (404).
//! A caller never learns whether a tenant it may not use exists. Failures are an [`AccessError`],
//! which each API maps to its own error shape (docs/api.md, "Errors", or RFC 6749 §5.2).

use std::sync::Arc;
use std::time::Duration;

use crate::app::{AppState, Snapshot};
pub use crate::auth::Grant;
use crate::auth::{Caller, is_organization_id};
use crate::config::Settings;
use crate::idp::EnvironmentSettings;
use crate::token::{TokenKey, TokenMemo};

/// Longest accepted request value (audience, scope, min_ttl, code, state), in characters.
pub const MAX_VALUE_LEN: usize = 1024;

/// `/openapi.json`'s pattern of a tenant, environment or caller name (as `auth::is_valid_name`).
pub const NAME_PATTERN: &str = "^[a-z0-9_-]{1,64}$";
/// `/openapi.json`'s pattern of a request value: no control characters (as [`check_value`]).
pub const VALUE_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$";
/// [`VALUE_PATTERN`], and not only whitespace (an audience).
pub const NON_BLANK_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$";

/// Why a caller may not have the token it asked for.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// A malformed value, or no audience and no default.
    #[error("{0}")]
    InvalidRequest(String),
    /// The caller may not use this tenant / environment / audience.
    #[error("caller '{caller}' may not use {tenant}/{environment}")]
    Forbidden {
        /// The authenticated caller.
        caller: Arc<str>,
        /// The tenant asked for.
        tenant: String,
        /// The environment asked for.
        environment: String,
    },
    /// The caller may not name this organization (`[callers.NAME] organizations`).
    #[error(
        "caller '{caller}' may not use organization {organization} of tenant {tenant}: it is not in callers.{caller}.organizations"
    )]
    OrganizationForbidden {
        /// The authenticated caller.
        caller: Arc<str>,
        /// The tenant asked for.
        tenant: String,
        /// The organization asked for.
        organization: String,
    },
    /// The audience is the broker's own `auth.workload.audience`: a token for it, signed by an
    /// IdP that is also a workload issuer, would authenticate at the broker as a caller.
    #[error(
        "the audience '{0}' is this broker's own (auth.workload.audience), which no token is handed out for; ask for the audience of the API you call"
    )]
    OwnAudience(String),
    /// The environment's tokens can rotate client secrets (some `rotation.authorized_by` names
    /// it): they are the broker's own, whatever the allow rules say.
    #[error(
        "{tenant}/{environment} is the broker's own (a rotation.authorized_by names it): its tokens can rotate client secrets, so no caller receives them"
    )]
    BrokerOwn {
        /// The tenant asked for.
        tenant: String,
        /// The environment asked for.
        environment: String,
    },
    /// Allowed, but no such tenant / environment is configured.
    #[error("no environment {tenant}/{environment} is configured")]
    NotConfigured {
        /// The tenant asked for.
        tenant: String,
        /// The environment asked for.
        environment: String,
    },
}

/// What a caller asks for, parsed but not yet authorised.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TokenRequest {
    /// The audience named by the caller; `None` for the environment's default.
    pub audience: Option<String>,
    /// Space-separated scopes, not yet normalised.
    pub scope: String,
    /// Validity the caller needs left on the token.
    pub min_ttl: Option<Duration>,
    /// The organization the token is for, already checked by [`check_organization`].
    pub organization: Option<String>,
}

/// Refuses a value that is not an organization id (`org_` and letters or digits).
pub fn check_organization(value: &str) -> Result<(), AccessError> {
    if is_organization_id(value) {
        return Ok(());
    }
    Err(AccessError::InvalidRequest(
        "organization must be an organization id: org_ followed by letters and digits (at most 64 characters), as the IdP shows it".into(),
    ))
}

/// Authorises `caller` for `request` in `tenant`/`environment`, resolving the default audience.
pub fn authorise(
    state: &AppState,
    caller: &Caller,
    tenant: &str,
    environment: &str,
    request: TokenRequest,
) -> Result<Grant, AccessError> {
    authorise_in(&state.current(), caller, tenant, environment, request)
}

/// Lets `caller` keep `grant` for request target `target` (path and query), when `current`,
/// under which it was decided, is the caller's own configuration (see [`crate::auth::Grants`]).
pub fn keep_grant(current: &Snapshot, caller: &Caller, target: &str, grant: &Arc<Grant>) {
    if caller.registry() == current.callers.generation() {
        caller.grants.keep(target, grant);
    }
}

/// [`authorise`] under the configuration `current`.
pub fn authorise_in(
    current: &Snapshot,
    caller: &Caller,
    tenant: &str,
    environment: &str,
    request: TokenRequest,
) -> Result<Grant, AccessError> {
    let settings = current.settings.environment(tenant, environment).cloned();
    let default_audience = settings.as_ref().and_then(|s| s.audience.as_deref());
    let audience = request.audience.as_deref().or(default_audience);
    if !caller.may_use(tenant, environment, audience) {
        return Err(forbidden(caller, tenant, environment));
    }
    if let Some(organization) = &request.organization
        && !caller.may_use_organization(tenant, organization)
    {
        return Err(AccessError::OrganizationForbidden {
            caller: Arc::clone(&caller.name),
            tenant: tenant.to_owned(),
            organization: organization.clone(),
        });
    }
    let Some(audience) = audience else {
        if settings.is_none() {
            return Err(not_configured(tenant, environment));
        }
        return Err(AccessError::InvalidRequest(format!(
            "no audience: send audience=... or configure a default audience for {tenant}/{environment}"
        )));
    };
    let audience = match (&request.audience, settings.as_ref()) {
        // The configured default is shared with the key, not copied.
        (None, Some(settings)) => settings.audience.clone().unwrap_or_else(|| audience.into()),
        _ => Arc::from(audience),
    };
    let Some(settings) = settings else {
        return Err(not_configured(tenant, environment));
    };
    refuse_broker_own(&settings)?;
    refuse_own_audience(&current.settings, &audience)?;
    let key = TokenKey::shared(
        Arc::clone(&settings.tenant),
        Arc::clone(&settings.environment),
        audience,
        &request.scope,
    )
    .for_organization(request.organization.as_deref().map(Arc::from));
    Ok(Grant {
        environment: settings,
        key,
        min_ttl: request.min_ttl,
        memo: TokenMemo::default(),
    })
}

/// Authorises `caller` for `tenant`/`environment` whatever the audience (some rule names both),
/// then returns the environment's settings; for routes that name no audience yet.
pub fn authorise_environment(
    state: &AppState,
    caller: &Caller,
    tenant: &str,
    environment: &str,
) -> Result<Arc<EnvironmentSettings>, AccessError> {
    if !caller.may_use_environment(tenant, environment) {
        return Err(forbidden(caller, tenant, environment));
    }
    let settings = state
        .current()
        .settings
        .environment(tenant, environment)
        .cloned()
        .ok_or_else(|| not_configured(tenant, environment))?;
    refuse_broker_own(&settings)?;
    Ok(settings)
}

/// Authorises `caller` again for a token it was granted earlier (a user-token handle), so that
/// allow rules changed since then apply; returns the environment's current settings.
pub fn authorise_key(
    state: &AppState,
    caller: &Caller,
    key: &TokenKey,
) -> Result<Arc<EnvironmentSettings>, AccessError> {
    if !caller.may_use(&key.tenant, &key.environment, Some(&key.audience)) {
        return Err(forbidden(caller, &key.tenant, &key.environment));
    }
    let current = state.current();
    refuse_own_audience(&current.settings, &key.audience)?;
    let settings = current
        .settings
        .environment(&key.tenant, &key.environment)
        .cloned()
        .ok_or_else(|| not_configured(&key.tenant, &key.environment))?;
    refuse_broker_own(&settings)?;
    Ok(settings)
}

/// Refuses the tokens of an environment that authorises secret rotations, whoever asks.
fn refuse_broker_own(settings: &EnvironmentSettings) -> Result<(), AccessError> {
    if settings.rotation_authority {
        return Err(AccessError::BrokerOwn {
            tenant: settings.tenant.to_string(),
            environment: settings.environment.to_string(),
        });
    }
    Ok(())
}

/// Refuses a token for the broker's own workload audience, whoever asks and whatever the allow
/// rules say.
fn refuse_own_audience(settings: &Settings, audience: &str) -> Result<(), AccessError> {
    match settings.auth.workload.as_ref() {
        Some(workload) if workload.audience == audience => {
            Err(AccessError::OwnAudience(audience.to_owned()))
        }
        _ => Ok(()),
    }
}

/// Refuses an over-long value or one with control characters.
pub fn check_value(name: &str, value: &str) -> Result<(), AccessError> {
    if value.chars().nth(MAX_VALUE_LEN).is_some() {
        return Err(AccessError::InvalidRequest(format!(
            "'{name}' is longer than {MAX_VALUE_LEN} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(AccessError::InvalidRequest(format!(
            "'{name}' has non-printable characters"
        )));
    }
    Ok(())
}

/// A short, printable rendering of untrusted text for error messages.
pub fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(64).collect()
}

fn forbidden(caller: &Caller, tenant: &str, environment: &str) -> AccessError {
    AccessError::Forbidden {
        caller: Arc::clone(&caller.name),
        tenant: printable(tenant),
        environment: printable(environment),
    }
}

fn not_configured(tenant: &str, environment: &str) -> AccessError {
    AccessError::NotConfigured {
        tenant: printable(tenant),
        environment: printable(environment),
    }
}
