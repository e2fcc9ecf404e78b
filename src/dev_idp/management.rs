//! Auth0's Management API verb that rotates a client's secret,
//! `POST /api/v2/clients/{client_id}/rotate-secret`: a bearer token the dev IdP signed, for the
//! management audience (its issuer followed by `api/v2/`) with the scope `update:client_keys`,
//! replaces the client's secret with a new random one, which the answer carries. The old secret
//! stops working at once, as at Auth0.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, Validation};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;

use super::DevIdp;

/// The scope that allows rotating a client's secret, as Auth0 names it.
pub const ROTATE_SCOPE: &str = "update:client_keys";

/// The claims checked on a management token.
#[derive(Deserialize)]
struct ManagementClaims {
    #[serde(default)]
    scope: String,
}

/// Auth0's error shape of the Management API.
fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({
        "statusCode": status.as_u16(),
        "error": status.canonical_reason().unwrap_or_default(),
        "message": message,
    });
    (status, Json(body)).into_response()
}

/// `POST /api/v2/clients/{client_id}/rotate-secret`.
pub(super) async fn rotate_secret(
    State(idp): State<Arc<DevIdp>>,
    Path(client_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(bearer) = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    else {
        return error(StatusCode::UNAUTHORIZED, "Missing authentication");
    };
    let audience = format!("{}api/v2/", idp.issuer_for(&headers));
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[idp.issuer_for(&headers)]);
    let Ok(token) =
        jsonwebtoken::decode::<ManagementClaims>(bearer, &idp.decoding_key, &validation)
    else {
        return error(StatusCode::UNAUTHORIZED, "Invalid token");
    };
    if !token
        .claims
        .scope
        .split(' ')
        .any(|scope| scope == ROTATE_SCOPE)
    {
        return error(
            StatusCode::FORBIDDEN,
            "Insufficient scope, expected any of: update:client_keys",
        );
    }
    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    {
        let mut clients = idp
            .clients
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(known) = clients.get_mut(&client_id) else {
            return error(StatusCode::NOT_FOUND, "The client does not exist");
        };
        *known = SecretString::from(secret.clone());
    }
    idp.rotations.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%client_id, "dev IdP rotated a client secret; the old one no longer works");
    Json(json!({ "client_id": client_id, "client_secret": secret })).into_response()
}
