//! `GET /openapi.json`: the OpenAPI 3 description of every route, generated from the code.
//!
//! The handlers carry `#[utoipa::path]` annotations and [`crate::api::routes()`] registers each
//! with its description, so the router and this document come from one list and cannot drift.
//! Each listener's document describes its own routes (see [`Surface`]); each is built once, on
//! first request.

use std::sync::LazyLock;

use axum::Extension;
use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::Surface;

/// The parts of the document that are not on a handler: title, tags and security schemes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "token-broker",
        description = "Fetches, caches and serves OAuth2 machine-to-machine tokens for many tenants."
    ),
    tags(
        (name = "tokens", description = "Tokens for callers (docs/api.md, Tokens for callers)"),
        (name = "operations", description = "Probes, metrics and this document (docs/api.md, Operations)"),
        (name = "admin", description = "Operator routes behind the admin key (docs/api.md, Admin API)"),
    ),
    modifiers(&SecuritySchemes),
)]
pub struct ApiDoc;

/// Declares the three bearer keys: callers', the admin's and the optional metrics key.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "client_basic",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(
                        "The caller name and key as OAuth2 client id and secret (RFC 6749 §2.3.1)",
                    ))
                    .build(),
            ),
        );
        for (name, description) in [
            (
                "caller_key",
                "A caller key from `token-broker hash-key`, or a workload token (a JWT of an issuer in [auth.workload])",
            ),
            ("admin_key", "The key whose hash is auth.admin_key_sha256"),
            (
                "metrics_key",
                "The key whose hash is auth.metrics_key_sha256, when set",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(description))
                        .build(),
                ),
            );
        }
    }
}

/// The document of each [`Surface`], in its declaration order.
static DOCUMENTS: LazyLock<[Bytes; 3]> = LazyLock::new(|| {
    [Surface::All, Surface::Main, Surface::Admin].map(|surface| {
        let document = crate::api::routes_for(surface).into_openapi();
        Bytes::from(serde_json::to_vec(&document).expect("an OpenAPI document serialises"))
    })
});

/// `GET /openapi.json`: this service's OpenAPI 3 document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI 3 document of every route", content_type = "application/json"),
    ),
)]
pub async fn openapi_json(Extension(surface): Extension<Surface>) -> Response {
    let document = &DOCUMENTS[surface as usize];
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document.clone(),
    )
        .into_response()
}
