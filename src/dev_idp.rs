//! The built-in development IdP: a small Auth0-style `POST /oauth/token` endpoint for the
//! client-credentials grant that signs real RS256 JWTs and publishes its key at
//! `GET /.well-known/jwks.json`, and the authorization-code flow with PKCE and refresh-token
//! rotation ([`authorization`]: `GET /authorize`, `GET /callback`).
//!
//! It backs `token-broker dev`, docker-compose and the integration tests, so the broker talks
//! to a real HTTP IdP whose tokens callers can verify. It is deliberately strict about the
//! request (content type, grant type, one client authentication method, an audience) so that a
//! broker sending the wrong request fails here rather than against Auth0. The signing key is
//! generated per process and never leaves memory.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HOST};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::idp::pkcs1_from_pkcs8;

mod authorization;
mod management;
mod workload;

pub use management::ROTATE_SCOPE;

/// Token request bodies are a few hundred bytes; anything far larger is a mistake.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// A client the dev IdP accepts; `Debug` shows the secret as `[REDACTED]`.
#[derive(Clone, Debug)]
pub struct DevClient {
    /// The OAuth2 client id.
    pub client_id: String,
    /// The client secret, compared in constant time.
    pub client_secret: SecretString,
}

/// What the dev IdP issues and to whom.
#[derive(Clone, Debug)]
pub struct DevIdpSettings {
    /// The `iss` claim; empty means the served base URL followed by `/`, as Auth0 does.
    pub issuer: String,
    /// Lifetime of every token (`expires_in` and `exp - iat`).
    pub token_lifetime: Duration,
    /// The clients allowed to ask for tokens.
    pub clients: Vec<DevClient>,
}

/// The dev IdP's state: signing key, published JWKS, clients and a request counter.
pub struct DevIdp {
    issuer: String,
    signing_key: EncodingKey,
    header: Header,
    jwks: Bytes,
    /// Client secrets by client id; the management API rotates them.
    clients: std::sync::RwLock<HashMap<String, SecretString>>,
    /// Verifies the management API's bearer tokens (its own).
    decoding_key: DecodingKey,
    lifetime: Duration,
    token_requests: AtomicU64,
    /// Secrets rotated through the management API.
    rotations: AtomicU64,
    grants: authorization::Grants,
    /// The broker's `POST …/sessions` URL, for the `/callback` page's redeem line.
    sessions_url: std::sync::OnceLock<String>,
}

/// A running dev IdP; the server stops when the handle is dropped.
pub struct DevIdpHandle {
    base_url: String,
    idp: Arc<DevIdp>,
    task: JoinHandle<()>,
}

/// Why the dev IdP could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevIdpError {
    /// The settings are unusable.
    #[error("invalid dev IdP settings: {0}")]
    Settings(&'static str),
    /// aws-lc-rs could not generate or export the RSA key.
    #[error("could not generate the dev IdP's RSA signing key")]
    KeyGeneration,
    /// jsonwebtoken could not derive the JWK from the key.
    #[error("could not build the dev IdP's JWKS")]
    Jwk(#[from] jsonwebtoken::errors::Error),
    /// The listener's address could not be read.
    #[error("could not read the dev IdP listener address")]
    Io(#[from] std::io::Error),
}

impl DevIdp {
    /// Validates the settings and generates a fresh RSA-2048 signing key.
    pub fn new(settings: DevIdpSettings) -> Result<Self, DevIdpError> {
        if settings.token_lifetime < Duration::from_secs(1) {
            return Err(DevIdpError::Settings("token_lifetime is under one second"));
        }
        let count = settings.clients.len();
        let clients: HashMap<_, _> = settings
            .clients
            .into_iter()
            .map(|client| (client.client_id, client.client_secret))
            .collect();
        if clients.len() != count {
            return Err(DevIdpError::Settings("client ids are not unique"));
        }

        let pkcs8 = KeyPair::generate(KeySize::Rsa2048)
            .and_then(|key| key.as_der())
            .map_err(|_| DevIdpError::KeyGeneration)?;
        let pkcs1 = pkcs1_from_pkcs8(pkcs8.as_ref()).ok_or(DevIdpError::KeyGeneration)?;
        let signing_key = EncodingKey::from_rsa_der(pkcs1);

        let mut jwk = Jwk::from_encoding_key(&signing_key, Algorithm::RS256)?;
        let decoding_key = DecodingKey::from_jwk(&jwk)?;
        let kid = jwk.thumbprint(ThumbprintHash::SHA256)?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        let jwks = serde_json::to_vec(&JwkSet { keys: vec![jwk] });
        let jwks = jwks.expect("a JWK set always serialises").into();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid);

        Ok(Self {
            issuer: settings.issuer,
            signing_key,
            header,
            jwks,
            clients: std::sync::RwLock::new(clients),
            decoding_key,
            lifetime: settings.token_lifetime,
            token_requests: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            grants: authorization::Grants::default(),
            sessions_url: std::sync::OnceLock::new(),
        })
    }

    /// The routes `POST /oauth/token`, `GET /authorize`, `GET /callback`,
    /// `GET /.well-known/jwks.json`, `GET /.well-known/openid-configuration` and
    /// `POST /api/v2/clients/{client_id}/rotate-secret`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/oauth/token", post(token))
            .route("/authorize", get(authorization::authorize))
            .route("/callback", get(authorization::callback))
            .route("/.well-known/jwks.json", get(jwks))
            .route(
                "/api/v2/clients/{client_id}/rotate-secret",
                post(management::rotate_secret),
            )
            .route(
                "/.well-known/openid-configuration",
                get(workload::discovery),
            )
            .with_state(self)
    }

    /// How many token requests it has answered, whatever the outcome.
    pub fn token_requests(&self) -> u64 {
        self.token_requests.load(Ordering::Relaxed)
    }

    /// How many client secrets it has rotated.
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    /// Serves the router on `listener` in a background task.
    pub async fn serve(mut self, listener: TcpListener) -> Result<DevIdpHandle, DevIdpError> {
        let addr = listener.local_addr()?;
        // A wildcard bind is reachable on loopback; `0.0.0.0` is no address to connect to.
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let base_url = format!("http://{}", SocketAddr::new(ip, addr.port()));
        if self.issuer.is_empty() {
            self.issuer = format!("{base_url}/");
        }
        let idp = Arc::new(self);
        let router = Arc::clone(&idp).router();
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::debug!(%error, "dev IdP server stopped");
            }
        });
        tracing::debug!(%base_url, "dev IdP listening");
        Ok(DevIdpHandle {
            base_url,
            idp,
            task,
        })
    }

    /// The `iss` of its tokens: the configured issuer, else the served base URL and `/` (from
    /// the request's `Host` when the router is not `serve`d).
    fn issuer_for(&self, headers: &HeaderMap) -> String {
        match self.issuer.as_str() {
            "" => {
                let host = headers.get(HOST).and_then(|host| host.to_str().ok());
                format!("http://{}/", host.unwrap_or("localhost"))
            }
            issuer => issuer.to_owned(),
        }
    }

    /// Whether `id` is a known client.
    fn knows(&self, id: &str) -> bool {
        self.clients
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(id)
    }

    fn authenticate(&self, (id, secret): &(String, SecretString)) -> bool {
        let clients = self
            .clients
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients.get(id).is_some_and(|known| {
            let given = secret.expose_secret().as_bytes();
            known.expose_secret().as_bytes().ct_eq(given).into()
        })
    }

    fn issue(&self, headers: &HeaderMap, body: &[u8]) -> Result<TokenResponse, OAuthError> {
        let request = TokenRequest::parse(headers, body)?;
        let basic = basic_credentials(headers)?;
        let grant_type = request.grant_type.clone();
        if !matches!(
            grant_type.as_deref(),
            Some("client_credentials" | "authorization_code" | "refresh_token")
        ) {
            let description =
                "grant_type must be client_credentials, authorization_code or refresh_token";
            let error = "unsupported_grant_type";
            return Err(OAuthError::new(StatusCode::BAD_REQUEST, error, description));
        }
        let candidates = match (basic, request.client_id, request.client_secret) {
            (Some(basic), None, None) => basic,
            (None, id, secret) => id.zip(secret).into_iter().collect(),
            _ => return Err(OAuthError::invalid("use HTTP Basic or the body, not both")),
        };
        let client_id = candidates
            .into_iter()
            .find(|candidate| self.authenticate(candidate))
            .map(|(id, _)| id)
            .ok_or_else(OAuthError::denied)?;
        let granted = match grant_type.as_deref() {
            Some("authorization_code") => {
                let code = request
                    .code
                    .as_deref()
                    .ok_or_else(|| OAuthError::invalid("code is required"))?;
                Some(self.grants.redeem(
                    &client_id,
                    code,
                    request.redirect_uri.as_deref(),
                    request.code_verifier.as_deref(),
                )?)
            }
            Some("refresh_token") => {
                let refresh_token = request
                    .refresh_token
                    .as_ref()
                    .ok_or_else(|| OAuthError::invalid("refresh_token is required"))?;
                Some(
                    self.grants
                        .rotate(&client_id, refresh_token.expose_secret())?,
                )
            }
            _ => None,
        };
        if let Some(granted) = granted {
            let authorization::Granted {
                audience,
                scope,
                refresh_token,
            } = granted;
            let mut token = self.sign(
                headers,
                "dev-user",
                &audience,
                &client_id,
                scope,
                "authorization_code",
            )?;
            token.refresh_token = Some(refresh_token);
            return Ok(token);
        }
        if request.audience.is_some() && request.resource.is_some() {
            return Err(OAuthError::invalid("send audience or resource, not both"));
        }
        let audience = request
            .audience
            .or(request.resource)
            .filter(|audience| !audience.is_empty())
            .ok_or_else(|| OAuthError::invalid("audience is required"))?;
        let scope = request
            .scope
            .as_deref()
            .map(|scope| scope.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|scope| !scope.is_empty());

        self.sign(
            headers,
            &format!("{client_id}@clients"),
            &audience,
            &client_id,
            scope,
            "client-credentials",
        )
    }

    /// Signs an access token for `subject` and wraps it in a token answer.
    fn sign(
        &self,
        headers: &HeaderMap,
        subject: &str,
        audience: &str,
        client_id: &str,
        scope: Option<String>,
        grant: &'static str,
    ) -> Result<TokenResponse, OAuthError> {
        let issuer = self.issuer_for(headers);
        let iat = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            iss: &issuer,
            sub: subject.to_owned(),
            aud: audience,
            iat,
            exp: iat + self.lifetime.as_secs(),
            jti: format!("{:032x}", rand::random::<u128>()),
            gty: grant,
            azp: client_id,
            scope: scope.as_deref(),
        };
        let access_token =
            jsonwebtoken::encode(&self.header, &claims, &self.signing_key).map_err(|error| {
                tracing::debug!(%error, "dev IdP could not sign a token");
                OAuthError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal error",
                )
            })?;
        tracing::debug!(%client_id, %audience, ?scope, grant, "dev IdP issued a token");
        let expires_in = self.lifetime.as_secs();
        Ok(TokenResponse {
            access_token,
            token_type: "Bearer",
            expires_in,
            scope,
            refresh_token: None,
        })
    }
}

impl DevIdpHandle {
    /// The server's base URL, `http://ip:port` without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The token endpoint, `{base_url}/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.base_url)
    }

    /// The key set, `{base_url}/.well-known/jwks.json`.
    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.base_url)
    }

    /// How many token requests the server has answered, whatever the outcome.
    pub fn token_requests(&self) -> u64 {
        self.idp.token_requests()
    }

    /// How many client secrets it has rotated.
    pub fn rotations(&self) -> u64 {
        self.idp.rotations()
    }

    /// The broker URL that `/callback` shows for redeeming a code (known once the broker is up).
    pub fn set_sessions_url(&self, url: String) {
        let _ = self.idp.sessions_url.set(url);
    }

    /// The `iss` of its tokens, workload tokens included.
    pub fn issuer(&self) -> &str {
        &self.idp.issuer
    }

    /// The authorization endpoint, `{base_url}/authorize`.
    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.base_url)
    }

    /// The page the authorization endpoint redirects browsers to, `{base_url}/callback`.
    pub fn callback_url(&self) -> String {
        format!("{}/callback", self.base_url)
    }
}

impl Drop for DevIdpHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn token(State(idp): State<Arc<DevIdp>>, request: Request) -> Response {
    // Counted before the body is read so that every answer counts, even a 400 for a huge body.
    idp.token_requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    let outcome = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(body) => idp.issue(&parts.headers, &body),
        Err(_) => Err(OAuthError::invalid("body is too large or unreadable")),
    };
    let mut response = match outcome {
        Ok(token) => Json(token).into_response(),
        Err(error) => {
            let (code, description) = (error.error, error.description);
            tracing::debug!(code, description, "dev IdP refused a token request");
            error.into_response()
        }
    };
    // RFC 6749 §5.1: token responses must not be cached.
    let no_store = HeaderValue::from_static("no-store");
    response.headers_mut().insert(CACHE_CONTROL, no_store);
    response
}

async fn jwks(State(idp): State<Arc<DevIdp>>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], idp.jwks.clone())
}

/// The token request fields the dev IdP reads; others are ignored, as Auth0 does.
#[derive(Deserialize)]
struct TokenRequest {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<SecretString>,
    audience: Option<String>,
    resource: Option<String>,
    scope: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    refresh_token: Option<SecretString>,
}

impl TokenRequest {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Self, OAuthError> {
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let media_type = content_type
            .and_then(|v| v.split(';').next())
            .map(str::trim);
        // serde's message could quote a secret of the wrong type, so it is not passed on.
        let malformed = |_| OAuthError::invalid("malformed body");
        match media_type {
            Some(json) if json.eq_ignore_ascii_case("application/json") => {
                serde_json::from_slice(body).map_err(malformed)
            }
            Some(form) if form.eq_ignore_ascii_case("application/x-www-form-urlencoded") => {
                let mut fields = serde_json::Map::new();
                for (name, value) in form_urlencoded::parse(body) {
                    // RFC 6749 §3.2: parameters must not be included more than once.
                    if fields.insert(name.into_owned(), value.into()).is_some() {
                        return Err(OAuthError::invalid("a parameter is repeated"));
                    }
                }
                serde_json::from_value(Value::Object(fields)).map_err(malformed)
            }
            _ => Err(OAuthError::invalid("unsupported Content-Type")),
        }
    }
}

/// Reads `Authorization: Basic`. RFC 6749 §2.3.1 form-urlencodes id and secret first, but many
/// clients do not, so both readings are returned as (id, secret) candidates.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<Candidates>, OAuthError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || OAuthError::invalid("malformed Authorization header, expected Basic");
    let value = value.to_str().map_err(|_| malformed())?;
    let encoded = match value.split_once(' ') {
        Some((scheme, encoded)) if scheme.eq_ignore_ascii_case("basic") => encoded.trim(),
        _ => return Err(malformed()),
    };
    let decoded = STANDARD.decode(encoded).map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(malformed)?;
    let url_decoded = form_decode(id).zip(form_decode(secret));
    let raw = Some((id.to_owned(), secret.to_owned()));
    let candidates = url_decoded.into_iter().chain(raw);
    Ok(Some(
        candidates.map(|(id, secret)| (id, secret.into())).collect(),
    ))
}

/// Client (id, secret) pairs to try in turn.
type Candidates = Vec<(String, SecretString)>;

/// Undoes the form-urlencoding of one value; `None` when `value` holds a raw `=` or `&`, which
/// encoding would have escaped.
fn form_decode(value: &str) -> Option<String> {
    let maybe_encoded = !value.contains(['=', '&']);
    maybe_encoded.then(|| {
        form_urlencoded::parse(value.as_bytes())
            .map(|(name, _)| name)
            .collect()
    })
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: String,
    aud: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
    gty: &'static str,
    azp: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

#[derive(Serialize)]
struct TokenResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
}

/// An RFC 6749 §5.2 error response.
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: &'static str,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: &'static str) -> Self {
        Self {
            status,
            error,
            description,
        }
    }

    fn invalid(description: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// Auth0's exact answer to an unknown client or a wrong secret.
    fn denied() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "access_denied", "Unauthorized")
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body =
            serde_json::json!({ "error": self.error, "error_description": self.description });
        (self.status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{DecodingKey, Validation};
    use serde_json::json;
    use tower::ServiceExt;

    const ID: &str = "svc";
    // `:`, `+` and `é` make the form-urlencoding of HTTP Basic matter.
    const SECRET: &str = "p@ss:w+rd/é";
    const JSON: &str = "application/json";
    const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";

    fn settings(issuer: &str) -> DevIdpSettings {
        let client = DevClient {
            client_id: ID.into(),
            client_secret: SECRET.into(),
        };
        let token_lifetime = Duration::from_secs(3600);
        DevIdpSettings {
            issuer: issuer.into(),
            token_lifetime,
            clients: vec![client],
        }
    }

    /// A JSON token request for `api.test` with `extra` fields.
    fn body(extra: Value) -> String {
        let mut body = json!({ "grant_type": "client_credentials", "audience": "api.test" });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body.to_string()
    }

    /// Sends a token request through the router; checks what every answer must satisfy.
    async fn post(idp: &Arc<DevIdp>, kind: &str, basic: Option<&str>, body: &str) -> (u16, Value) {
        let mut request = Request::post("/oauth/token").header(CONTENT_TYPE, kind);
        if let Some(basic) = basic {
            request = request.header(AUTHORIZATION, format!("Basic {}", STANDARD.encode(basic)));
        }
        let request = request.body(Body::from(body.to_owned())).unwrap();
        let response = Arc::clone(idp).router().oneshot(request).await.unwrap();
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await;
        let json: Value = serde_json::from_slice(&body.unwrap()).unwrap();
        assert!(!json.to_string().contains(SECRET));
        (status, json)
    }

    /// `GET path` through the router: status and `Location`.
    async fn get(idp: &Arc<DevIdp>, path: &str) -> (u16, Option<String>) {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = Arc::clone(idp).router().oneshot(request).await.unwrap();
        let location = response
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_owned());
        (response.status().as_u16(), location)
    }

    #[tokio::test]
    async fn the_code_flow_rotates_refresh_tokens_and_a_reused_one_revokes_the_grant() {
        let idp = Arc::new(DevIdp::new(settings("https://idp.test/")).unwrap());
        let verifier = "a-verifier-of-at-least-43-characters-aaaaaaaaaaa";
        let challenge = URL_SAFE_NO_PAD.encode(<sha2::Sha256 as sha2::Digest>::digest(verifier));
        let authorize = format!(
            "/authorize?response_type=code&client_id={ID}&redirect_uri=https%3A%2F%2Fapp.test%2Fcb&audience=api.test&scope=offline_access&state=s1&code_challenge={challenge}&code_challenge_method=S256"
        );
        for bad in [
            authorize.replace("S256", "plain"),
            authorize.replace("client_id=svc", "client_id=nobody"),
            authorize.replace("&state=s1", ""),
        ] {
            assert_eq!(get(&idp, &bad).await.0, 400, "{bad}");
        }
        let (status, location) = get(&idp, &authorize).await;
        assert_eq!(status, 302);
        let location = reqwest::Url::parse(&location.unwrap()).unwrap();
        assert_eq!(location.host_str(), Some("app.test"));
        let query: HashMap<String, String> = location.query_pairs().into_owned().collect();
        assert_eq!(query["state"], "s1");
        let code = &query["code"];

        let secret: String = form_urlencoded::byte_serialize(SECRET.as_bytes()).collect();
        let client = format!("client_id={ID}&client_secret={secret}");
        let redeem = |verifier: &str| {
            format!(
                "grant_type=authorization_code&{client}&code={code}&redirect_uri=https%3A%2F%2Fapp.test%2Fcb&code_verifier={verifier}"
            )
        };
        let (status, json) = post(&idp, FORM, None, &redeem("wrong-verifier")).await;
        assert_eq!(
            (status, json["error"].as_str()),
            (400, Some("invalid_grant"))
        );
        // The failed attempt used the code up, as a real IdP does: start again.
        let (_, location) = get(&idp, &authorize).await;
        let location = reqwest::Url::parse(&location.unwrap()).unwrap();
        let query: HashMap<String, String> = location.query_pairs().into_owned().collect();
        let code = &query["code"];
        let redeem = format!(
            "grant_type=authorization_code&{client}&code={code}&redirect_uri=https%3A%2F%2Fapp.test%2Fcb&code_verifier={verifier}"
        );
        let (status, json) = post(&idp, FORM, None, &redeem).await;
        assert_eq!(status, 200, "{json}");
        let first = json["refresh_token"].as_str().unwrap().to_owned();
        assert!(json["access_token"].as_str().is_some());
        let (status, _) = post(&idp, FORM, None, &redeem).await;
        assert_eq!(status, 400, "a code is redeemed once");

        let refresh =
            |token: &str| format!("grant_type=refresh_token&{client}&refresh_token={token}");
        let (status, json) = post(&idp, FORM, None, &refresh(&first)).await;
        assert_eq!(status, 200, "{json}");
        let second = json["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(second, first);
        // The rotated token again: refused, and the grant is revoked, so the new one fails too.
        let (status, json) = post(&idp, FORM, None, &refresh(&first)).await;
        assert_eq!(
            (status, json["error"].as_str()),
            (400, Some("invalid_grant"))
        );
        let (status, json) = post(&idp, FORM, None, &refresh(&second)).await;
        assert_eq!(
            (status, json["error"].as_str()),
            (400, Some("invalid_grant"))
        );
    }

    #[tokio::test]
    async fn json_form_and_basic_requests_get_tokens() {
        let idp = Arc::new(DevIdp::new(settings("https://idp.test/")).unwrap());
        let json_body = body(json!({ "client_id": ID, "client_secret": SECRET }));
        let (status, json) = post(&idp, JSON, None, &json_body).await;
        assert_eq!(status, 200);
        assert_eq!(json["token_type"], "Bearer");
        assert_eq!(json["expires_in"], 3600);
        assert_eq!(json.get("scope"), None);

        let secret: String = form_urlencoded::byte_serialize(SECRET.as_bytes()).collect();
        let form = format!("grant_type=client_credentials&client_id={ID}&client_secret={secret}");
        let form = format!("{form}&resource=api.test&scope=read%20write");
        let (status, json) = post(&idp, FORM, None, &form).await;
        assert_eq!((status, json["scope"].as_str()), (200, Some("read write")));

        for basic in [format!("{ID}:{secret}"), format!("{ID}:{SECRET}")] {
            let (status, json) = post(&idp, JSON, Some(&basic), &body(json!({}))).await;
            assert_eq!(status, 200, "{json}");
        }
    }

    #[tokio::test]
    async fn bad_requests_get_oauth_errors() {
        let idp = Arc::new(DevIdp::new(settings("https://idp.test/")).unwrap());
        let wrong_secret = body(json!({ "client_id": ID, "client_secret": "x" }));
        let (status, json) = post(&idp, JSON, None, &wrong_secret).await;
        let unauthorized = json!({ "error": "access_denied", "error_description": "Unauthorized" });
        assert_eq!((status, json), (401, unauthorized));

        let unknown = body(json!({ "client_id": "x", "client_secret": SECRET }));
        assert_eq!(post(&idp, JSON, None, &unknown).await.0, 401);

        let good = body(json!({ "client_id": ID, "client_secret": SECRET }));
        let basic = format!("{ID}:{SECRET}");
        let mut no_audience: Value = serde_json::from_str(&good).unwrap();
        no_audience.as_object_mut().unwrap().remove("audience");
        let twice = r#"{"grant_type":"client_credentials","audience":"a","audience":"b"}"#;
        let number = body(json!({ "client_id": ID, "client_secret": 12345 }));
        let repeated = "grant_type=client_credentials&scope=a&scope=b".to_owned();
        let cases = [
            (JSON, Some(basic.as_str()), good.clone()),
            ("text/plain", None, good),
            (JSON, None, no_audience.to_string()),
            (JSON, None, twice.to_owned()),
            (JSON, None, number),
            (FORM, None, repeated),
        ];
        for (kind, basic, body) in cases {
            let (status, json) = post(&idp, kind, basic, &body).await;
            let error = json["error"].as_str();
            assert_eq!((status, error), (400, Some("invalid_request")), "{body}");
            assert!(!json.to_string().contains("12345"));
        }
        let (status, json) = post(&idp, FORM, None, "grant_type=password").await;
        assert_eq!(
            (status, json["error"].as_str()),
            (400, Some("unsupported_grant_type"))
        );
        assert_eq!(idp.token_requests(), 9);
    }

    #[tokio::test]
    async fn served_tokens_verify_against_the_published_jwks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idp = DevIdp::new(settings("")).unwrap();
        let handle = idp.serve(listener).await.unwrap();
        let client = reqwest::Client::new();
        let mut tokens = Vec::new();
        for _ in 0..2 {
            let body = body(json!({ "client_id": ID, "client_secret": SECRET, "scope": "read" }));
            let request = client.post(handle.token_url()).header(CONTENT_TYPE, JSON);
            let response = request.body(body).send().await.unwrap();
            let json: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            tokens.push(json["access_token"].as_str().unwrap().to_owned());
        }
        assert_ne!(tokens[0], tokens[1]);
        assert_eq!(handle.token_requests(), 2);

        let response = client.get(handle.jwks_url()).send().await.unwrap();
        let jwks: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        let key = &jwks["keys"][0];
        assert_eq!(
            (&key["kty"], &key["alg"], &key["use"]),
            (&json!("RSA"), &json!("RS256"), &json!("sig"))
        );
        let jwks: JwkSet = serde_json::from_value(jwks).unwrap();
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&["api.test"]);
        validation.set_issuer(&[format!("{}/", handle.base_url())]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        for token in &tokens {
            let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
            let key = DecodingKey::from_jwk(jwks.find(&kid).unwrap()).unwrap();
            let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
                .unwrap()
                .claims;
            assert_eq!(claims["sub"], "svc@clients");
            assert_eq!(claims["azp"], ID);
            assert_eq!(claims["gty"], "client-credentials");
            assert_eq!(claims["scope"], "read");
            let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
            assert_eq!(lifetime, 3600);
        }
    }

    #[test]
    fn debug_output_redacts_the_secret() {
        assert!(!format!("{:?}", settings("")).contains(SECRET));
    }
}
