//! The development IdP as a workload issuer: OIDC discovery, and workload tokens signed with
//! its key as a cluster signs a pod's service-account token.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use serde::Serialize;

use super::{DevIdp, DevIdpError, DevIdpHandle};

impl DevIdpHandle {
    /// Signs a workload token, as a cluster's service-account issuer gives a pod: `sub`, `aud`,
    /// `iat`, `nbf` and `exp` (`lifetime` from now), with the same key as every other token.
    pub fn workload_token(
        &self,
        subject: &str,
        audience: &str,
        lifetime: Duration,
    ) -> Result<String, DevIdpError> {
        #[derive(Serialize)]
        struct WorkloadClaims<'a> {
            iss: &'a str,
            sub: &'a str,
            aud: &'a str,
            iat: u64,
            nbf: u64,
            exp: u64,
            jti: String,
        }
        let iat = jsonwebtoken::get_current_timestamp();
        let claims = WorkloadClaims {
            iss: &self.idp.issuer,
            sub: subject,
            aud: audience,
            iat,
            nbf: iat,
            exp: iat.saturating_add(lifetime.as_secs()),
            jti: format!("{:032x}", rand::random::<u128>()),
        };
        Ok(jsonwebtoken::encode(
            &self.idp.header,
            &claims,
            &self.idp.signing_key,
        )?)
    }
}

/// OIDC discovery, so the IdP can be configured as a workload issuer by its `issuer` alone.
pub(super) async fn discovery(
    State(idp): State<Arc<DevIdp>>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let issuer = idp.issuer_for(&headers);
    let base = issuer.trim_end_matches('/');
    Json(serde_json::json!({
        "issuer": issuer,
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "token_endpoint": format!("{base}/oauth/token"),
        "authorization_endpoint": format!("{base}/authorize"),
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}
