//! `GET /metrics`: the Prometheus scrape.
//!
//! Gauges that describe state rather than events (cached entries, the IdPs' rate-limit remaining)
//! are read at scrape time, so nothing on the request path keeps them up to date. Open unless
//! `auth.metrics_key_sha256` is set; the text holds names and counts, never secrets or tokens.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::api::error::ErrorBody;
use crate::app::AppState;
use crate::auth::MetricsReader;

/// The content type of the Prometheus text exposition format.
static PROMETHEUS_TEXT: HeaderValue =
    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");

/// `GET /metrics`: every metric in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Metrics in the Prometheus text format", body = String,
            content_type = "text/plain; version=0.0.4"),
        (status = 401, description = "`unauthorized`: auth.metrics_key_sha256 is set and the key is missing or wrong", body = ErrorBody),
    ),
    security((), ("metrics_key" = [])),
)]
pub async fn metrics(State(state): State<AppState>, _: MetricsReader) -> Response {
    let metrics = &state.metrics;
    metrics.set_cache_entries(state.broker.entries().len());
    let (held, unwritten) = state.user_tokens.session_counts();
    metrics.set_user_sessions(held, unwritten);
    metrics.set_ready(state.is_ready());
    if let Some(shared) = state.broker.shared_cache_status() {
        metrics.set_shared_cache(shared);
    }
    for (tenant, name, environment) in state.current().settings.environments() {
        let seen = state.broker.rate_limit(environment);
        if let Some(remaining) = seen.remaining {
            metrics.set_idp_rate_limit_remaining(tenant, name, remaining);
        }
        for (entity, quota) in [
            ("client", seen.client_quota),
            ("organization", seen.organization_quota),
        ] {
            for (bucket, remaining) in [("per_hour", quota.per_hour), ("per_day", quota.per_day)] {
                if let Some(remaining) = remaining {
                    metrics.set_idp_quota_remaining(tenant, name, entity, bucket, remaining);
                }
            }
        }
    }
    (
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT.clone())],
        metrics.render(),
    )
        .into_response()
}
