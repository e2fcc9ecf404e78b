//! `POST /t/{tenant}/{environment}/oauth/token`: the OAuth2-compatible facade (docs/api.md, "OAuth2-compatible token endpoint").
//!
//! A service that points an OAuth2 or Auth0 client library at an IdP switches to the broker by
//! changing only the token URL: its broker caller name and key are the client id and secret, in
//! the body or with HTTP Basic (RFC 6749 §2.3.1), the grant is `client_credentials`, and
//! `audience` (or `resource`) and `scope` mean what they mean for `GET /v1/tokens`. The request
//! goes through the same authorisation ([`token_request`]) and the same broker call, so both routes share
//! cached tokens. Answers are RFC 6749 §5.1 bodies; failures are [`OAuthError`]s, turned into
//! §5.2 bodies in one place here.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

mod error;

pub use error::OAuthError;

use crate::api::error::BodyError;
use crate::api::token_request::{self, TokenRequest, check_organization, check_value, printable};
use crate::api::{audit, response};
use crate::app::AppState;
use crate::auth::{self, AuthError, Caller, CallerRegistry, CallerSource as _};

/// `POST /t/{tenant}/{environment}/oauth/token`: a client-credentials token for an OAuth2 client.
#[utoipa::path(
    post,
    path = "/t/{tenant}/{environment}/oauth/token",
    tag = "oauth",
    summary = "OAuth2 / Auth0-compatible client-credentials token endpoint (caller name and key as client id and secret)",
    params(
        ("tenant" = String, Path, description = "Configured tenant name", pattern = "^[a-z0-9_-]{1,64}$"),
        ("environment" = String, Path, description = "Configured environment name", pattern = "^[a-z0-9_-]{1,64}$"),
    ),
    request_body(
        content(
            (OAuthTokenRequest = "application/x-www-form-urlencoded"),
            (OAuthTokenRequest = "application/json"),
        ),
        description = "The client id and secret go in the body or in HTTP Basic (one of them), or a workload token goes in client_assertion"
    ),
    responses(
        (status = 200, description = "RFC 6749 §5.1: access_token, token_type, expires_in, scope"),
        (status = 400, description = "RFC 6749 §5.2: invalid_request, unauthorized_client, unsupported_grant_type, invalid_scope, invalid_target (RFC 8707: the broker's own workload audience)"),
        (status = 401, description = "invalid_client; with WWW-Authenticate: Basic"),
        (status = 404, description = "not_found: no such environment configured"),
        (status = 413, description = "invalid_request: the body is over server.max_body_bytes"),
        (status = 429, description = "rate_limited (the caller's rate, idp_requests_per_minute or max_keys); with Retry-After"),
        (status = 500, description = "internal_error: an unforeseen failure of the fetch (logged)"),
        (status = 502, description = "upstream_rejected"),
        (status = 503, description = "upstream_unavailable; with Retry-After"),
    ),
    security((), ("client_basic" = [])),
)]
pub async fn token(
    State(state): State<AppState>,
    Path((tenant, environment)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OAuthError> {
    let body = body.map_err(BodyError::from)?;
    let params = Params::parse(&headers, &body)?;
    let caller = authenticate(&state.caller_registry(), &headers, &params).await?;
    let caller = auth::admit(caller).map_err(|error| match error {
        AuthError::RateLimited { retry_after } => OAuthError::RateLimited(retry_after),
        _ => OAuthError::InvalidClient(WRONG_CLIENT),
    })?;
    let params = params.checked()?;
    match params.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(other) => return Err(OAuthError::UnsupportedGrantType(printable(other))),
        None => {
            return Err(OAuthError::InvalidRequest(
                "grant_type is missing; use client_credentials".into(),
            ));
        }
    }
    let audience = match (params.audience, params.resource) {
        (Some(audience), Some(resource)) if audience != resource => {
            return Err(OAuthError::InvalidRequest(
                "audience and resource differ; send one of them".into(),
            ));
        }
        (audience, resource) => audience.or(resource),
    };
    let request = TokenRequest {
        audience,
        scope: params.scope.unwrap_or_default(),
        min_ttl: None,
        organization: params.organization,
    };
    let authorised = token_request::authorise(&state, &caller, &tenant, &environment, request)?;
    let lease = state
        .broker
        .get(
            &authorised.environment,
            &authorised.key,
            None,
            &caller.idp_budget,
            None,
        )
        .await?;
    audit::handed_out(&state.audit, &caller, &authorised.key, &lease, None);
    Ok(response::oauth_token(&lease))
}

/// The body of a facade token request, for the OpenAPI document (the handler reads
/// [`Params`] itself, to refuse repeated parameters and keep the secret secret).
#[derive(utoipa::ToSchema)]
pub struct OAuthTokenRequest {
    /// Only `client_credentials`.
    #[schema(pattern = "^client_credentials$")]
    pub grant_type: String,
    /// The caller's name, unless HTTP Basic carries it.
    #[schema(pattern = "^[a-z0-9_-]{1,64}$")]
    pub client_id: Option<String>,
    /// The caller's key, unless HTTP Basic carries it.
    #[schema(max_length = 1024)]
    pub client_secret: Option<String>,
    /// With `client_assertion`: `urn:ietf:params:oauth:client-assertion-type:jwt-bearer`.
    #[schema(pattern = "^urn:ietf:params:oauth:client-assertion-type:jwt-bearer$")]
    pub client_assertion_type: Option<String>,
    /// A workload token (JWT) from an issuer of `[auth.workload]`, in place of a client secret
    /// (a JWT: base64url parts and dots; the whole body is bounded by `server.max_body_bytes`).
    #[schema(max_length = 4096, pattern = "^[A-Za-z0-9_.-]*$")]
    pub client_assertion: Option<String>,
    /// The API the token is for; defaults to the environment's `audience`.
    #[schema(max_length = 1024, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub audience: Option<String>,
    /// RFC 8707's name for the audience; the same value as `audience` when both are sent.
    #[schema(max_length = 1024, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub resource: Option<String>,
    /// Space-separated scopes (RFC 6749 §3.3).
    #[schema(max_length = 1024, pattern = "^[\\x20\\x21\\x23-\\x5B\\x5D-\\x7E]*$")]
    pub scope: Option<String>,
    /// An Auth0 Organization id (`org_…`): a token for that organization, sent to the IdP as
    /// `organization`; the caller's `organizations` must list it.
    #[schema(max_length = 64, pattern = "^org_[A-Za-z0-9]{1,60}$")]
    pub organization: Option<String>,
}

/// The parameters the facade reads; others are ignored (RFC 6749 §3.2), and an empty value is
/// the same as none.
#[derive(Default, Deserialize)]
struct Params {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<SecretString>,
    client_assertion_type: Option<String>,
    client_assertion: Option<SecretString>,
    audience: Option<String>,
    resource: Option<String>,
    scope: Option<String>,
    organization: Option<String>,
}

impl Params {
    /// Reads a JSON (Auth0 style) or form (RFC 6749) body; a parameter given twice is refused.
    /// Values are bounded by [`Params::checked`] once the client is authenticated.
    fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Self, OAuthError> {
        let media_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::trim);
        let params = match media_type {
            Some(json) if json.eq_ignore_ascii_case("application/json") => {
                // serde's message could quote a secret of the wrong type, so it is not passed on.
                serde_json::from_slice::<Self>(body).map_err(|_| {
                    OAuthError::InvalidRequest(
                        "the body is not a JSON object of string parameters, each given once"
                            .into(),
                    )
                })?
            }
            Some(form) if form.eq_ignore_ascii_case("application/x-www-form-urlencoded") => {
                Self::from_form(body)?
            }
            _ => {
                return Err(OAuthError::InvalidRequest(
                    "Content-Type must be application/x-www-form-urlencoded or application/json"
                        .into(),
                ));
            }
        };
        Ok(params.without_empty_values())
    }

    fn from_form(body: &[u8]) -> Result<Self, OAuthError> {
        let mut params = Self::default();
        for (name, value) in form_urlencoded::parse(body) {
            let slot = match name.as_ref() {
                "grant_type" => &mut params.grant_type,
                "client_id" => &mut params.client_id,
                "audience" => &mut params.audience,
                "resource" => &mut params.resource,
                "scope" => &mut params.scope,
                "organization" => &mut params.organization,
                "client_assertion_type" => &mut params.client_assertion_type,
                "client_secret" | "client_assertion" => {
                    let slot = if name == "client_secret" {
                        &mut params.client_secret
                    } else {
                        &mut params.client_assertion
                    };
                    if slot.is_some() {
                        return Err(repeated(&name));
                    }
                    *slot = Some(SecretString::from(value.into_owned()));
                    continue;
                }
                _ => continue,
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(repeated(&name));
            }
        }
        Ok(params)
    }

    fn without_empty_values(mut self) -> Self {
        for value in [
            &mut self.grant_type,
            &mut self.client_id,
            &mut self.client_assertion_type,
            &mut self.audience,
            &mut self.resource,
            &mut self.scope,
            &mut self.organization,
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *value = None;
            }
        }
        for secret in [&mut self.client_secret, &mut self.client_assertion] {
            if secret
                .as_ref()
                .is_some_and(|secret| secret.expose_secret().is_empty())
            {
                *secret = None;
            }
        }
        self
    }

    /// Refuses over-long or non-printable values, and scopes outside RFC 6749 §3.3.
    fn checked(self) -> Result<Self, OAuthError> {
        let values = [
            ("grant_type", &self.grant_type),
            ("client_id", &self.client_id),
            ("audience", &self.audience),
            ("resource", &self.resource),
        ];
        for (name, value) in values {
            if let Some(value) = value {
                check_value(name, value)?;
            }
        }
        if let Some(scope) = &self.scope {
            check_scope(scope)?;
        }
        if let Some(organization) = &self.organization {
            check_organization(organization)?;
        }
        Ok(self)
    }
}

fn repeated(name: &str) -> OAuthError {
    OAuthError::InvalidRequest(format!(
        "parameter '{}' is given more than once",
        printable(name)
    ))
}

/// RFC 6749 §3.3: space-separated tokens of printable ASCII other than `"` and `\`.
fn check_scope(scope: &str) -> Result<(), OAuthError> {
    if scope.len() > token_request::MAX_VALUE_LEN {
        return Err(OAuthError::InvalidScope(format!(
            "scope is longer than {} bytes",
            token_request::MAX_VALUE_LEN
        )));
    }
    let valid = |b: u8| b == b' ' || (b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if !scope.bytes().all(valid) {
        return Err(OAuthError::InvalidScope(
            "scope has characters RFC 6749 §3.3 does not allow (control characters, quotes, backslashes or non-ASCII)".into(),
        ));
    }
    Ok(())
}

/// What a failed client authentication says.
const WRONG_CLIENT: &str = "client authentication failed: use the caller name as client_id and the caller key as client_secret";

/// RFC 7523's `client_assertion_type` of a JWT client assertion.
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Authenticates the caller from a client assertion (a workload token), HTTP Basic or body
/// credentials, one of them only; with anonymous access on, a request with none is the
/// anonymous caller.
async fn authenticate(
    registry: &CallerRegistry,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Arc<Caller>, OAuthError> {
    match (&params.client_assertion, &params.client_assertion_type) {
        (None, None) => {}
        (Some(assertion), Some(kind)) if kind == JWT_BEARER => {
            if headers.contains_key(AUTHORIZATION) || params.client_secret.is_some() {
                // Which of the two should authenticate is unknowable, so neither does.
                return Err(OAuthError::InvalidClient(
                    "a client assertion and a client secret are both given; authenticate with one of them (RFC 6749 §2.3)",
                ));
            }
            let caller = registry
                .authenticate_assertion(assertion.expose_secret())
                .await
                .map_err(|error| match error {
                    AuthError::Workload(rejection) => OAuthError::InvalidAssertion(rejection),
                    AuthError::WorkloadKeysUnavailable { retry_after } => {
                        OAuthError::IssuerUnavailable(retry_after)
                    }
                    _ => OAuthError::InvalidClient(WRONG_CLIENT),
                })?;
            return match &params.client_id {
                Some(id) if *id != *caller.name => Err(OAuthError::InvalidClient(
                    "client_id is not the caller that the client assertion proves; leave it out or send that caller's name",
                )),
                _ => Ok(caller),
            };
        }
        _ => {
            return Err(OAuthError::InvalidClient(
                "client authentication failed: a client assertion needs both client_assertion and client_assertion_type = urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ));
        }
    }
    let wrong = |_: AuthError| OAuthError::InvalidClient(WRONG_CLIENT);
    let basic = match headers.get(AUTHORIZATION) {
        Some(value) => Some(basic_credentials(value)?),
        None => None,
    };
    match (basic, &params.client_id, &params.client_secret) {
        (Some(_), _, Some(_)) => Err(OAuthError::InvalidRequest(
            "client credentials are both in the Authorization header and in the body; use one method (RFC 6749 §2.3)".into(),
        )),
        (Some(basic), Some(body_id), None) if *body_id != basic.decoded_id => {
            Err(OAuthError::InvalidRequest(
                "client_id in the body differs from the one in the Authorization header".into(),
            ))
        }
        (Some(basic), _, None) => basic
            .candidates()
            .find_map(|(id, key)| registry.authenticate_client(id, key).ok())
            .ok_or(OAuthError::InvalidClient(WRONG_CLIENT)),
        (None, Some(id), Some(secret)) => registry
            .authenticate_client(id, secret.expose_secret())
            .map_err(wrong),
        (None, None, None) => registry.anonymous().ok_or(OAuthError::InvalidClient(
            "client authentication required: send client_id and client_secret, in the body or with HTTP Basic",
        )),
        (None, _, _) => Err(OAuthError::InvalidClient(
            "send both client_id (caller name) and client_secret (caller key)",
        )),
    }
}

/// Client credentials from `Authorization: Basic`.
struct BasicCredentials {
    raw_id: String,
    raw_secret: SecretString,
    decoded_id: String,
    decoded_secret: SecretString,
}

impl BasicCredentials {
    /// RFC 6749 §2.3.1 form-urlencodes id and secret before Base64, but many clients do not;
    /// the decoded reading comes first, the raw one second when it differs.
    fn candidates(&self) -> impl Iterator<Item = (&str, &str)> {
        let decoded = (
            self.decoded_id.as_str(),
            self.decoded_secret.expose_secret(),
        );
        let raw = (self.raw_id.as_str(), self.raw_secret.expose_secret());
        std::iter::once(decoded).chain((raw != decoded).then_some(raw))
    }
}

fn basic_credentials(header: &HeaderValue) -> Result<BasicCredentials, OAuthError> {
    const MALFORMED: &str =
        "malformed Authorization header: expected Basic base64(client_id:client_secret)";
    let malformed = || OAuthError::InvalidClient(MALFORMED);
    let header = header.to_str().map_err(|_| malformed())?;
    let encoded = match header.split_once(' ') {
        Some((scheme, encoded)) if scheme.eq_ignore_ascii_case("basic") => encoded.trim(),
        _ => return Err(malformed()),
    };
    let decoded = STANDARD.decode(encoded).map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(malformed)?;
    Ok(BasicCredentials {
        raw_id: id.to_owned(),
        raw_secret: SecretString::from(secret.to_owned()),
        decoded_id: form_decode(id),
        decoded_secret: SecretString::from(form_decode(secret)),
    })
}

/// Undoes `application/x-www-form-urlencoded` encoding of one value (`+` is a space); a literal
/// `&` or `=` is kept by escaping it before the value is parsed as one parameter name.
fn form_decode(value: &str) -> String {
    let escaped = value.replace('&', "%26").replace('=', "%3D");
    form_urlencoded::parse(escaped.as_bytes())
        .map(|(name, _)| name.into_owned())
        .next()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(credentials: &str) -> HeaderValue {
        HeaderValue::try_from(format!("Basic {}", STANDARD.encode(credentials))).unwrap()
    }

    #[test]
    fn basic_credentials_are_read_encoded_and_raw() {
        let credentials = basic_credentials(&basic("billing:a%2Bb+c")).unwrap();
        let candidates: Vec<_> = credentials.candidates().collect();
        assert_eq!(candidates, [("billing", "a+b c"), ("billing", "a%2Bb+c")]);
        let plain = basic_credentials(&basic("billing:tbk_abc-DEF_1")).unwrap();
        assert_eq!(plain.candidates().count(), 1);
        for bad in ["Bearer x", "Basic !!!", "Basic"] {
            let header = HeaderValue::from_static(bad);
            assert!(matches!(
                basic_credentials(&header),
                Err(OAuthError::InvalidClient(_))
            ));
        }
        assert!(basic_credentials(&basic("no-colon")).is_err());
    }

    #[test]
    fn form_decoding_keeps_literal_separators() {
        assert_eq!(form_decode("a%26b%3Dc"), "a&b=c");
        assert_eq!(form_decode("a&b=c"), "a&b=c");
    }

    #[test]
    fn scopes_follow_rfc6749() {
        assert!(check_scope("read:things write:things").is_ok());
        for bad in ["a\"b", "a\\b", "caf\u{e9}", "a\tb"] {
            assert!(
                matches!(check_scope(bad), Err(OAuthError::InvalidScope(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn forms_refuse_repeats_and_ignore_unknown_parameters() {
        let params = Params::from_form(b"grant_type=client_credentials&foo=1&foo=2").unwrap();
        assert_eq!(params.grant_type.as_deref(), Some("client_credentials"));
        assert!(Params::from_form(b"scope=a&scope=b").is_err());
        assert!(Params::from_form(b"client_secret=a&client_secret=b").is_err());
    }
}
