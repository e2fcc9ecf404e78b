//! `/v1/admin`: operator routes behind the admin key.
//!
//! `POST /v1/admin/reload` re-reads the configuration (as `SIGHUP` does): rotated secrets and new
//! tenants and callers take effect without dropping valid cached tokens.

use axum::Json;
use axum::extract::State;

use crate::api::ApiError;
use crate::auth::Admin;
use crate::startup::{AppState, ReloadReport};

/// `POST /v1/admin/reload`: re-read the configuration, or refuse it with every problem listed.
pub async fn reload(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<ReloadReport>, ApiError> {
    Ok(Json(state.reload()?))
}
