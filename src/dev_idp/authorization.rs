//! The development IdP's authorization-code flow: `GET /authorize` with PKCE (S256) answers at
//! once with a 302 to the `redirect_uri` (no login page: the user is always "dev-user"),
//! `GET /callback` shows the code and state with the request that redeems them, and the grants
//! behind the `authorization_code` and `refresh_token` grant types, with refresh-token rotation:
//! presenting a refresh token that was already rotated revokes the whole grant, as Auth0,
//! Keycloak and oidc-provider do.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};
use std::sync::Arc;

use super::{DevIdp, OAuthError};
use crate::clock::Clock;

/// How long an authorization code can be redeemed.
const CODE_LIFETIME: Duration = Duration::from_secs(300);
/// Most codes and refresh tokens kept; beyond, the oldest codes are refused (a dev IdP).
const MAX_ENTRIES: usize = 10_000;

/// A code waiting to be redeemed.
struct Code {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    audience: String,
    scope: Option<String>,
    expires: Instant,
}

/// A refresh token: the grant it belongs to, and whether it was rotated already.
struct Refresh {
    grant: u64,
    client_id: String,
    audience: String,
    scope: Option<String>,
    used: bool,
}

/// What a redeemed code or refresh token grants.
pub(super) struct Granted {
    /// The grant's audience.
    pub audience: String,
    /// The grant's scopes.
    pub scope: Option<String>,
    /// The refresh token to hand out with the access token.
    pub refresh_token: String,
}

/// Codes, refresh tokens and revoked grants.
#[derive(Default)]
pub(super) struct Grants {
    state: Mutex<GrantState>,
}

#[derive(Default)]
struct GrantState {
    codes: HashMap<String, Code>,
    refresh: HashMap<String, Refresh>,
    revoked: HashSet<u64>,
    next_grant: u64,
}

fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

impl Grants {
    fn state(&self) -> std::sync::MutexGuard<'_, GrantState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Redeems `code` for `client_id` with the PKCE `verifier`: a new grant and its first
    /// refresh token.
    pub(super) fn redeem(
        &self,
        client_id: &str,
        code: &str,
        redirect_uri: Option<&str>,
        verifier: Option<&str>,
    ) -> Result<Granted, OAuthError> {
        let invalid =
            |description| OAuthError::new(StatusCode::BAD_REQUEST, "invalid_grant", description);
        let mut state = self.state();
        let pending = state
            .codes
            .remove(code)
            .ok_or_else(|| invalid("unknown or already used authorization code"))?;
        if pending.expires < Clock::system().instant() {
            return Err(invalid("the authorization code expired"));
        }
        if pending.client_id != client_id || redirect_uri != Some(pending.redirect_uri.as_str()) {
            return Err(invalid(
                "the code was issued to another client or redirect_uri",
            ));
        }
        let verifier = verifier.ok_or_else(|| OAuthError::invalid("code_verifier is required"))?;
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        if challenge != pending.challenge {
            return Err(invalid("code_verifier does not match the code_challenge"));
        }
        let grant = state.next_grant;
        state.next_grant += 1;
        let refresh_token = random_token();
        if state.refresh.len() < MAX_ENTRIES {
            state.refresh.insert(
                refresh_token.clone(),
                Refresh {
                    grant,
                    client_id: client_id.to_owned(),
                    audience: pending.audience.clone(),
                    scope: pending.scope.clone(),
                    used: false,
                },
            );
        }
        Ok(Granted {
            audience: pending.audience,
            scope: pending.scope,
            refresh_token,
        })
    }

    /// Rotates `refresh_token`: a new one for the same grant. A token presented a second time
    /// revokes its grant, so every token of it stops working.
    pub(super) fn rotate(
        &self,
        client_id: &str,
        refresh_token: &str,
    ) -> Result<Granted, OAuthError> {
        let invalid =
            |description| OAuthError::new(StatusCode::BAD_REQUEST, "invalid_grant", description);
        let mut state = self.state();
        let Some(current) = state.refresh.get_mut(refresh_token) else {
            return Err(invalid("unknown refresh token"));
        };
        if current.client_id != client_id {
            return Err(invalid("the refresh token was issued to another client"));
        }
        let grant = current.grant;
        if current.used {
            state.revoked.insert(grant);
            tracing::debug!(
                grant,
                "dev IdP revoked a grant: a rotated refresh token was reused"
            );
            return Err(invalid("refresh token reused: the grant is revoked"));
        }
        current.used = true;
        let (audience, scope) = (current.audience.clone(), current.scope.clone());
        if state.revoked.contains(&grant) {
            return Err(invalid("the grant is revoked"));
        }
        let next = random_token();
        state.refresh.insert(
            next.clone(),
            Refresh {
                grant,
                client_id: client_id.to_owned(),
                audience: audience.clone(),
                scope: scope.clone(),
                used: false,
            },
        );
        Ok(Granted {
            audience,
            scope,
            refresh_token: next,
        })
    }
}

/// `GET /authorize`: checks the request and redirects at once with a code.
pub(super) async fn authorize(
    State(idp): State<Arc<DevIdp>>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut fields: HashMap<String, String> = HashMap::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        fields.insert(name.into_owned(), value.into_owned());
    }
    let field = |name: &str| {
        fields
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let refuse = |message: &'static str| (StatusCode::BAD_REQUEST, message).into_response();
    if field("response_type") != Some("code") {
        return refuse("response_type must be code");
    }
    let Some(client_id) = field("client_id").filter(|id| idp.knows(id)) else {
        return refuse("unknown client_id");
    };
    let Some(redirect_uri) = field("redirect_uri").and_then(|uri| reqwest::Url::parse(uri).ok())
    else {
        return refuse("redirect_uri must be an absolute URL");
    };
    let (Some(challenge), Some("S256")) = (field("code_challenge"), field("code_challenge_method"))
    else {
        return refuse("PKCE is required: code_challenge with code_challenge_method=S256");
    };
    let Some(state) = field("state") else {
        return refuse("state is required");
    };
    let Some(audience) = field("audience").or(field("resource")) else {
        return refuse("audience is required");
    };
    let code = random_token();
    {
        let mut grants = idp.grants.state();
        let now = Clock::system().instant();
        grants.codes.retain(|_, code| code.expires >= now);
        if grants.codes.len() >= MAX_ENTRIES {
            return refuse("too many codes pending");
        }
        grants.codes.insert(
            code.clone(),
            Code {
                client_id: client_id.to_owned(),
                redirect_uri: redirect_uri.as_str().to_owned(),
                challenge: challenge.to_owned(),
                audience: audience.to_owned(),
                scope: field("scope").map(str::to_owned),
                expires: now + CODE_LIFETIME,
            },
        );
    }
    let mut location = redirect_uri;
    location
        .query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", state);
    match HeaderValue::from_str(location.as_str()) {
        Ok(location) => (StatusCode::FOUND, [(LOCATION, location)]).into_response(),
        Err(_) => refuse("redirect_uri cannot be a Location header"),
    }
}

/// `GET /callback`: the page a browser lands on, with the code, the state and the request that
/// redeems them at the broker.
pub(super) async fn callback(
    State(idp): State<Arc<DevIdp>>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut code = String::new();
    let mut state = String::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "code" => code = value.into_owned(),
            "state" => state = value.into_owned(),
            _ => {}
        }
    }
    let sessions = idp.sessions_url.get().map_or(
        "http://BROKER/v1/users/TENANT/ENVIRONMENT/sessions",
        String::as_str,
    );
    let body = serde_json::json!({ "state": state, "code": code }).to_string();
    // Double quotes around the header, so the shell expands $CALLER_KEY when the line is
    // pasted; everything that came from the query is single-quoted.
    let curl = format!(
        "curl -s -X POST -H \"Authorization: Bearer $CALLER_KEY\" -H 'Content-Type: application/json' -d {} {}",
        shell_quote(&body),
        shell_quote(sessions)
    );
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>token-broker dev IdP</title></head>\
         <body><h1>Signed in as dev-user</h1><p>code: <code>{}</code></p><p>state: <code>{}</code></p>\
         <p>Redeem them for a handle (set CALLER_KEY to the caller key):</p><pre>{}</pre></body></html>",
        escape(&code),
        escape(&state),
        escape(&curl)
    );
    (
        [
            (
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        page,
    )
        .into_response()
}

/// HTML-escapes `text`.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// `text` as one single-quoted shell word (a `'` inside closes, escapes and reopens the quotes).
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
