//! The audit trail of the API (see [`crate::telemetry::audit`]): tokens handed to callers, forgets
//! on request and refusals, naming the caller, the key and the token's digest, never the token.

use std::sync::Arc;

use axum::http::StatusCode;

use crate::auth::Caller;
use crate::broker::Forgot;
use crate::telemetry::AUDIT;
use crate::telemetry::audit::{AuditTrail, Served, Subject, TokenName};
use crate::telemetry::request;
use crate::token::{CacheStatus, HandleId, Lease, TokenKey};

/// Records one token handed to `caller` for `key` (of the user session `session`, for a user
/// token): counted when it is a hit on a token the caller had before, else a line of its own.
pub fn handed_out(
    trail: &AuditTrail,
    caller: &Caller,
    key: &TokenKey,
    lease: &Lease,
    session: Option<&HandleId>,
) {
    let served = match lease.status {
        CacheStatus::Hit => Served::Hit,
        CacheStatus::Miss => Served::Miss,
    };
    trail.hand_out(
        lease.token.hand_outs(),
        caller.id,
        served,
        || TokenName::of(lease.token.access_token().expose()),
        |token| Subject {
            caller: Arc::clone(&caller.name),
            tenant: key.tenant.clone(),
            environment: key.environment.clone(),
            audience: key.audience.clone(),
            scope: key.scope.as_str().into(),
            organization: key.organization.clone(),
            session: session.map(session_name),
            token,
        },
    );
}

/// How the audit trail names a user session: the first 16 hex digits of its handle's SHA-256,
/// enough to follow one session through the trail, never the handle itself.
fn session_name(id: &HandleId) -> Box<str> {
    let hex = id.to_hex();
    hex.get(..16).unwrap_or(&hex).into()
}

/// Logs a user session `caller` created for `key` (a code exchanged for a handle).
pub fn session_created(caller: &Caller, key: &TokenKey, session: &HandleId) {
    tracing::info!(
        target: AUDIT,
        caller = %caller.name,
        tenant = %key.tenant,
        environment = %key.environment,
        audience = %key.audience,
        scope = key.scope.as_str(),
        session = &*session_name(session),
        "user session created"
    );
}

/// Logs a `DELETE` of a user session by `caller`, and whether there was one to forget.
pub fn session_forgotten(caller: &Caller, session: &HandleId, existed: bool) {
    tracing::info!(
        target: AUDIT,
        caller = %caller.name,
        session = &*session_name(session),
        outcome = if existed { "forgotten" } else { "nothing_held" },
        "user session forget requested"
    );
}

/// Logs a `DELETE` of `key`'s cached token by `caller` (`compare`: only if it was a given
/// token), with what it did.
pub fn forgotten(caller: &Caller, key: &TokenKey, compare: bool, outcome: Forgot) {
    tracing::info!(
        target: AUDIT,
        caller = %caller.name,
        tenant = %key.tenant,
        environment = %key.environment,
        audience = %key.audience,
        scope = key.scope.as_str(),
        organization = key.organization.as_deref(),
        compare,
        outcome = outcome.as_str(),
        "forget requested"
    );
}

/// Whether an answer refuses the caller for who it is or what it may do (401, 403, 429), which the
/// audit trail records.
pub fn is_refusal(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
    )
}

/// Logs a refused request with its status and why (the error's message, which names no secret);
/// the caller is named when it was authenticated.
pub fn refused(status: StatusCode, error: &dyn std::error::Error) {
    let caller = request::with_current(|log| log.caller().map(Arc::<str>::from)).flatten();
    tracing::info!(
        target: AUDIT,
        caller = caller.as_deref(),
        status = status.as_u16(),
        error = %error,
        "request refused"
    );
}
