//! The fake IdP's side: a token issuer to mount on wiremock, user-token answers, a form matcher,
//! and the one way tests count the token requests an IdP received ([`idp_requests`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::form_fields;

/// Answers token requests with a new token each time: `token-1`, `token-2`, ... (count the
/// requests with [`idp_requests`]).
#[derive(Clone)]
pub struct TokenIssuer {
    issued: Arc<AtomicU64>,
    expires_in: Value,
    delay: Duration,
}

impl TokenIssuer {
    /// Tokens that live `expires_in` seconds.
    pub fn new(expires_in: u64) -> Self {
        Self {
            issued: Arc::new(AtomicU64::new(0)),
            expires_in: json!(expires_in),
            delay: Duration::ZERO,
        }
    }

    /// Answers only after `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

impl Respond for TokenIssuer {
    fn respond(&self, _request: &Request) -> ResponseTemplate {
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        ResponseTemplate::new(200)
            .set_body_json(json!({
                "access_token": format!("token-{n}"),
                "token_type": "Bearer",
                "expires_in": self.expires_in,
            }))
            .set_delay(self.delay)
    }
}

/// Mounts a [`TokenIssuer`] on `POST /{tenant_path}/oauth/token`.
pub async fn issue_tokens(idp: &MockServer, tenant_path: &str, issuer: TokenIssuer) {
    Mock::given(method("POST"))
        .and(path(format!("/{tenant_path}/oauth/token")))
        .respond_with(issuer)
        .mount(idp)
        .await;
}

/// The token requests (every `POST`) an IdP received, in order of arrival: how tests count
/// what reached the IdP. Narrow them with [`IdpRequests::to`] and [`IdpRequests::grant`].
pub struct IdpRequests(Vec<Request>);

/// The token requests `idp` has received so far.
pub async fn idp_requests(idp: &MockServer) -> IdpRequests {
    let received = idp
        .received_requests()
        .await
        .expect("the mock IdP records requests");
    IdpRequests(
        received
            .into_iter()
            .filter(|request| request.method == wiremock::http::Method::POST)
            .collect(),
    )
}

impl IdpRequests {
    /// Only those to `/{tenant_path}/oauth/token` (the path [`issue_tokens`] mounts on).
    pub fn to(self, tenant_path: &str) -> Self {
        let wanted = format!("/{tenant_path}/oauth/token");
        Self(
            self.0
                .into_iter()
                .filter(|request| request.url.path() == wanted)
                .collect(),
        )
    }

    /// Only those of `grant_type` (read from a form or a JSON body).
    pub fn grant(self, grant_type: &str) -> Self {
        Self(
            self.0
                .into_iter()
                .filter(|request| grant_of(request).as_deref() == Some(grant_type))
                .collect(),
        )
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The requests themselves, to look at their bodies and headers.
    pub fn requests(&self) -> &[Request] {
        &self.0
    }
}

/// The `grant_type` of a token request's form or JSON body.
fn grant_of(request: &Request) -> Option<String> {
    if let Ok(body) = serde_json::from_slice::<Value>(&request.body) {
        return body["grant_type"].as_str().map(str::to_owned);
    }
    form_fields(&request.body)
        .into_iter()
        .find_map(|(name, value)| (name == "grant_type").then_some(value))
}

/// Matches a form-encoded token request whose fields are exactly `expected`, in order.
pub struct ExactForm(pub Vec<(String, String)>);

impl ExactForm {
    /// Builds the matcher from string pairs.
    pub fn of(fields: &[(&str, &str)]) -> Self {
        Self(
            fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }
}

impl wiremock::Match for ExactForm {
    fn matches(&self, request: &Request) -> bool {
        let form = request
            .headers
            .get("content-type")
            .is_some_and(|v| v == "application/x-www-form-urlencoded");
        form && form_fields(&request.body) == self.0
    }
}

/// A token answer with an optional refresh token.
pub fn user_token_body(
    access_token: &str,
    expires_in: u64,
    refresh_token: Option<&str>,
) -> ResponseTemplate {
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": expires_in,
    });
    if let Some(refresh_token) = refresh_token {
        body["refresh_token"] = json!(refresh_token);
    }
    ResponseTemplate::new(200).set_body_json(body)
}
