//! `/v1/admin`: operator routes behind the admin key.
//!
//! `GET /v1/admin/tenants` shows how each environment talks to its IdP and `GET /v1/admin/cache`
//! what is cached, so an operator can answer "which client id does acme/staging use" or "why did
//! this token not refresh" without reading configuration files or logs. Neither ever shows a
//! client secret or a token value: the reports are built field by field from settings and cache
//! entries, never by serialising those types whole. `POST /v1/admin/reload` re-reads the
//! configuration (as `SIGHUP` does): rotated secrets and new tenants and callers take effect
//! without dropping valid cached tokens. `POST .../rotate-secret` has the broker rotate an
//! environment's client secret at its IdP now.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::ApiError;
use crate::api::error::ErrorBody;
use crate::api::token_request::printable;
use crate::app::{AppState, ReloadReport, ReloadTrigger};
use crate::auth::Admin;
use crate::broker::RotationError;
use crate::idp::{AudienceParam, ClientAuth, EnvironmentSettings, RateLimitHeaders, RequestFormat};

/// `GET /v1/admin/tenants`: every configured tenant and environment.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantsReport {
    /// Tenants by name, in name order.
    pub tenants: Vec<TenantReport>,
}

/// One tenant.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantReport {
    /// The configured name.
    pub name: String,
    /// Its environments, in name order.
    pub environments: Vec<EnvironmentReport>,
}

/// How one environment asks its IdP for tokens; never the client secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvironmentReport {
    /// The configured name.
    pub name: String,
    /// The IdP's token endpoint, without any user name or password in it.
    pub token_url: String,
    /// The OAuth2 client id.
    pub client_id: String,
    /// The default audience, when configured.
    pub audience: Option<String>,
    /// `json` or `form`.
    pub request_format: &'static str,
    /// `post`, `basic` or `private_key_jwt`.
    pub client_auth: &'static str,
    /// `audience` or `resource`.
    pub audience_param: &'static str,
    /// Names of the extra fields sent with each request (their values are not shown, in case one
    /// is a credential).
    pub extra_params: Vec<String>,
    /// Bound on one token fetch, retries included, in seconds.
    pub timeout_s: f64,
    /// Lifetime assumed when the IdP gives none, in seconds.
    pub default_lifetime_s: u64,
    /// The quota guard, when set.
    pub max_fetches_per_hour: Option<u32>,
    /// The IdP's `x-ratelimit-*` headers on its latest answer, when it sent any.
    pub idp_rate_limit: Option<IdpRateLimit>,
    /// How the broker rotates this environment's client secret, when it does.
    pub rotation: Option<RotationSummary>,
    /// Some `rotation.authorized_by` names it: its tokens are the broker's own and no caller
    /// receives them.
    pub broker_own: bool,
}

/// An environment's `rotation` table and the secret it put in force; never the secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct RotationSummary {
    /// The rotation endpoint, without any user name or password in it.
    pub endpoint: String,
    /// `tenant/environment` whose token authorises the rotation.
    pub authorized_by: String,
    /// `rotation.every` in seconds; `None`: only on demand.
    pub every_s: Option<u64>,
    /// When the secret in force was rotated by the broker (RFC 3339 UTC); `None`: the
    /// configured secret is in force.
    pub rotated_at: Option<String>,
    /// 16 hex digits of the SHA-256 of the rotated secret in force.
    pub fingerprint: Option<String>,
}

/// Auth0-style rate-limit headers of the IdP's latest answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct IdpRateLimit {
    /// `x-ratelimit-limit`.
    pub limit: Option<u64>,
    /// `x-ratelimit-remaining`.
    pub remaining: Option<u64>,
    /// `x-ratelimit-reset`, Unix seconds.
    pub reset: Option<u64>,
}

/// `GET /v1/admin/cache`: the cached tokens, without their values.
#[derive(Debug, Serialize, ToSchema)]
pub struct CacheReport {
    /// Cached keys, ordered by tenant, environment, audience and scope.
    pub entries: Vec<CacheEntryReport>,
}

/// One cached key and the timing of its token.
#[derive(Debug, Serialize, ToSchema)]
pub struct CacheEntryReport {
    /// Tenant name.
    pub tenant: String,
    /// Environment name.
    pub environment: String,
    /// The audience of the token.
    pub audience: String,
    /// The normalised scope set (sorted, space-separated; empty for none).
    pub scope: String,
    /// When the broker received the token, RFC 3339 UTC.
    pub fetched_at: String,
    /// When the token expires, RFC 3339 UTC.
    pub expires_at: String,
    /// When a background refresh may start, RFC 3339 UTC.
    pub refresh_at: String,
    /// Whole seconds of validity left now.
    pub expires_in: u64,
    /// Callers served from this entry.
    pub hits: u64,
}

/// `GET /v1/admin/tenants`: configured tenants and how their IdPs are asked; never secrets.
#[utoipa::path(
    get,
    path = "/v1/admin/tenants",
    tag = "admin",
    responses(
        (status = 200, description = "Every tenant and environment", body = TenantsReport),
        (status = 401, description = "`unauthorized`: no admin key, a wrong one, or no admin key configured", body = ErrorBody),
    ),
    security(("admin_key" = [])),
)]
pub async fn tenants(State(state): State<AppState>, _: Admin) -> Json<TenantsReport> {
    let current = state.current_full();
    let mut tenants = Vec::with_capacity(current.settings.tenants.len());
    for (name, tenant) in &current.settings.tenants {
        let mut environments = Vec::with_capacity(tenant.environments.len());
        for (name, environment) in &tenant.environments {
            let mut report =
                environment_report(name, environment, state.broker.rate_limit(environment));
            if let Some(rotation) = &environment.rotation {
                let rotated = state.broker.rotated_secret(environment).await;
                let (tenant, authority) = &rotation.authorized_by;
                report.rotation = Some(RotationSummary {
                    endpoint: without_userinfo(&rotation.endpoint),
                    authorized_by: format!("{tenant}/{authority}"),
                    every_s: rotation.every.map(|every| every.as_secs()),
                    rotated_at: rotated
                        .as_ref()
                        .map(|r| humantime::format_rfc3339_seconds(r.rotated_at).to_string()),
                    fingerprint: rotated.as_ref().map(|r| r.fingerprint()),
                });
            }
            environments.push(report);
        }
        tenants.push(TenantReport {
            name: name.clone(),
            environments,
        });
    }
    Json(TenantsReport { tenants })
}

fn environment_report(
    name: &str,
    environment: &EnvironmentSettings,
    rate_limit: RateLimitHeaders,
) -> EnvironmentReport {
    EnvironmentReport {
        name: name.to_owned(),
        token_url: without_userinfo(&environment.token_url),
        client_id: environment.client_id.clone(),
        audience: environment.audience.as_deref().map(str::to_owned),
        request_format: match environment.request_format {
            RequestFormat::Json => "json",
            RequestFormat::Form => "form",
        },
        client_auth: match environment.client_auth {
            ClientAuth::Post => "post",
            ClientAuth::Basic => "basic",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
        },
        audience_param: match environment.audience_param {
            AudienceParam::Audience => "audience",
            AudienceParam::Resource => "resource",
        },
        extra_params: environment.extra_params.keys().cloned().collect(),
        timeout_s: environment.timeout.as_secs_f64(),
        default_lifetime_s: environment.default_lifetime.as_secs(),
        max_fetches_per_hour: environment.max_fetches_per_hour,
        idp_rate_limit: (rate_limit != RateLimitHeaders::default()).then_some(IdpRateLimit {
            limit: rate_limit.limit,
            remaining: rate_limit.remaining,
            reset: rate_limit.reset,
        }),
        rotation: None,
        broker_own: environment.rotation_authority,
    }
}

/// `url` without any user name or password in it.
fn without_userinfo(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    // Both only fail for URLs that cannot carry credentials, which then have none to remove.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.into()
}

/// `GET /v1/admin/cache`: cached keys with their timing and hit counts; never token values.
#[utoipa::path(
    get,
    path = "/v1/admin/cache",
    tag = "admin",
    responses(
        (status = 200, description = "Every cached key", body = CacheReport),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ),
    security(("admin_key" = [])),
)]
pub async fn cache(State(state): State<AppState>, _: Admin) -> Json<CacheReport> {
    let now = state.clock.now();
    let time = |at: SystemTime| humantime::format_rfc3339_seconds(at).to_string();
    let mut entries: Vec<CacheEntryReport> = state
        .broker
        .entries()
        .into_iter()
        .map(|(key, token)| CacheEntryReport {
            tenant: key.tenant.to_string(),
            environment: key.environment.to_string(),
            audience: key.audience.to_string(),
            scope: key.scope.as_str().to_owned(),
            fetched_at: time(token.fetched_at),
            expires_at: time(token.expires_at),
            refresh_at: time(token.refresh_at),
            expires_in: token.remaining(now).as_secs(),
            hits: token.hits(),
        })
        .collect();
    entries.sort_by(|a, b| {
        (&a.tenant, &a.environment, &a.audience, &a.scope).cmp(&(
            &b.tenant,
            &b.environment,
            &b.audience,
            &b.scope,
        ))
    });
    Json(CacheReport { entries })
}

/// `POST /v1/admin/reload`: re-read the configuration, or refuse it with every problem listed.
#[utoipa::path(
    post,
    path = "/v1/admin/reload",
    tag = "admin",
    responses(
        (status = 200, description = "Reloaded; what changed", body = ReloadReport),
        (status = 400, description = "`invalid_configuration`, with every problem in `problems`; the old configuration keeps serving", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 409, description = "`not_reloadable`: started without a configuration file (dev mode)", body = ErrorBody),
        (status = 500, description = "`internal_error`: the reload failed unexpectedly (logged)", body = ErrorBody),
    ),
    security(("admin_key" = [])),
)]
pub async fn reload(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<ReloadReport>, ApiError> {
    // Reading files blocks: not on a runtime worker thread.
    let reloading = state.clone();
    let report = tokio::task::spawn_blocking(move || reloading.reload(ReloadTrigger::Admin))
        .await
        .map_err(|_| ApiError::Internal)??;
    Ok(Json(report))
}

/// `POST /v1/admin/tenants/{tenant}/environments/{environment}/rotate-secret`: the secret in
/// force after the rotation, by fingerprint (never the secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct RotationReport {
    /// When the secret now in force was rotated, RFC 3339 UTC (another replica's rotation, when
    /// one was under way).
    pub rotated_at: String,
    /// 16 hex digits of the SHA-256 of the new secret, to tell secrets apart.
    pub fingerprint: String,
}

/// `POST /v1/admin/tenants/{tenant}/environments/{environment}/rotate-secret`: rotates the
/// environment's client secret now, through its `rotation` table.
#[utoipa::path(
    post,
    path = "/v1/admin/tenants/{tenant}/environments/{environment}/rotate-secret",
    tag = "admin",
    params(
        ("tenant" = String, Path, description = "Configured tenant name", pattern = "^[a-z0-9_-]{1,64}$"),
        ("environment" = String, Path, description = "Configured environment name", pattern = "^[a-z0-9_-]{1,64}$"),
    ),
    responses(
        (status = 200, description = "Rotated (or another request's rotation, under way at the same time, finished); new tokens are fetched with the new secret", body = RotationReport),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such environment", body = ErrorBody),
        (status = 409, description = "`rotation_not_configured`: the environment has no `rotation` table", body = ErrorBody),
        (status = 429, description = "`rate_limited`: the broker's own budget of IdP requests for authorising tokens is spent; retry after `Retry-After`", body = ErrorBody),
        (status = 500, description = "`internal_error`: the rotation failed unexpectedly (logged); the old secret stays in use", body = ErrorBody),
        (status = 502, description = "`upstream_rejected`: the rotation endpoint (or the IdP, for the authorising token) refused, or answered no secret; the old secret stays in use", body = ErrorBody),
        (status = 503, description = "`upstream_unavailable`: the endpoint, the shared cache or the replica rotating could not be reached in time; the old secret stays in use", body = ErrorBody),
    ),
    security(("admin_key" = [])),
)]
pub async fn rotate_secret(
    State(state): State<AppState>,
    _: Admin,
    Path((tenant, environment)): Path<(String, String)>,
) -> Result<Json<RotationReport>, ApiError> {
    let (settings, authority) = {
        let current = state.current();
        let settings = current
            .settings
            .environment(&tenant, &environment)
            .cloned()
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no environment {}/{} is configured",
                    printable(&tenant),
                    printable(&environment)
                ))
            })?;
        let authority = settings.rotation.as_ref().and_then(|rotation| {
            let (tenant, environment) = &rotation.authorized_by;
            current.settings.environment(tenant, environment).cloned()
        });
        (settings, authority)
    };
    let rotated = match authority {
        Some(authority) => state.broker.rotate_secret(&settings, &authority).await,
        // No rotation table (configuration checks that `authorized_by` exists).
        None => Err(Arc::new(RotationError::NotConfigured {
            tenant: settings.tenant.to_string(),
            environment: settings.environment.to_string(),
        })),
    }
    .map_err(ApiError::Rotation)?;
    Ok(Json(RotationReport {
        rotated_at: humantime::format_rfc3339_seconds(rotated.rotated_at).to_string(),
        fingerprint: rotated.fingerprint(),
    }))
}
