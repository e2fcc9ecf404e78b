//! Liveness and readiness probes for orchestrators.
//!
//! `/livez` answers 200 while the process serves HTTP at all; `/readyz` answers 503 once a
//! shutdown has begun, so load balancers stop sending new work while in-flight requests finish.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::json;

use crate::app::AppState;

/// `GET /livez`: 200 while the process serves HTTP.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "operations",
    responses((status = 200, description = "The process serves HTTP", body = Object, example = json!({"status": "ok"}))),
)]
pub async fn livez() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 while accepting work, 503 while draining.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Configured and accepting work", body = Object, example = json!({"status": "ready"})),
        (status = 503, description = "Draining on shutdown", body = Object, example = json!({"status": "draining"})),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    if state.is_ready() {
        (StatusCode::OK, Json(json!({ "status": "ready" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "draining" })),
        )
    }
}
