//! The audit trail: one line on the `audit` target per token handed to a caller and per forget
//! on request, naming the caller and the key, never the token.

use crate::auth::Caller;
use crate::broker::{CacheStatus, Forgot, TokenKey};
use crate::telemetry::AUDIT;

/// Logs one token handed to `caller` for `key`.
pub fn handed_out(caller: &Caller, key: &TokenKey, status: CacheStatus) {
    tracing::info!(
        target: AUDIT,
        caller = %caller.name,
        tenant = %key.tenant,
        environment = %key.environment,
        audience = %key.audience,
        scope = key.scope.as_str(),
        cache = status.as_str(),
        "token handed out"
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
        compare,
        outcome = outcome.as_str(),
        "forget requested"
    );
}
