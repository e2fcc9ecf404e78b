//! The whole authorization-code round trip: authorization URL with PKCE, code exchange checked by
//! the fake IdP, refresh near expiry, a rotated refresh token used next, revoked consent.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use wiremock::matchers::{method, path};
use wiremock::{Mock, Request, ResponseTemplate};

use crate::helpers::*;

/// Matches the code exchange: exactly these fields, in this order, and a `code_verifier` whose
/// S256 is the challenge the authorization URL carried.
struct CodeExchange {
    code: &'static str,
    challenge: String,
}

impl wiremock::Match for CodeExchange {
    fn matches(&self, request: &Request) -> bool {
        let fields = form_fields(&request.body);
        let names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
        let expected_names = [
            "grant_type",
            "client_id",
            "client_secret",
            "code",
            "redirect_uri",
            "code_verifier",
        ];
        if names != expected_names {
            return false;
        }
        let value = |i: usize| fields[i].1.as_str();
        let verifier = value(5);
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        value(0) == "authorization_code"
            && value(1) == "acme-production-id"
            && value(2) == ACME_PRODUCTION_SECRET
            && value(3) == self.code
            && value(4) == REDIRECT_URI
            && verifier.len() >= 43
            && challenge == self.challenge
    }
}

fn refresh_form(refresh_token: &str) -> ExactForm {
    ExactForm::of(&[
        ("grant_type", "refresh_token"),
        ("client_id", "acme-production-id"),
        ("client_secret", ACME_PRODUCTION_SECRET),
        ("refresh_token", refresh_token),
    ])
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    let mut values = fields.iter().filter(|(n, _)| n == name);
    let (_, value) = values
        .next()
        .unwrap_or_else(|| panic!("no {name} in {fields:?}"));
    assert!(values.next().is_none(), "{name} is repeated");
    value
}

async fn mount_exchange(
    app: &TestApp,
    code: &'static str,
    challenge: &str,
    answer: ResponseTemplate,
) {
    Mock::given(method("POST"))
        .and(path("/acme/oauth/token"))
        .and(CodeExchange {
            code,
            challenge: challenge.to_owned(),
        })
        .respond_with(answer)
        .mount(&app.idp)
        .await;
}

#[tokio::test]
async fn authorization_code_round_trip_with_refresh_rotation_and_revoked_consent() {
    let app = TestApp::init().with_users().start().await;

    // 1. The authorization URL.
    let body = serde_json::json!({ "scope": "read:things openid offline_access" });
    let started = app.authorize("acme/production", BILLING_KEY, body).await;
    assert_eq!(started.status, 200, "{}", started.body);
    assert_eq!(started.body["expires_in"], 600);
    let url = started.body["authorization_url"].as_str().unwrap();
    let state = started.body["state"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with("https://login.acme.example/authorize?"),
        "{url}"
    );
    let fields = query_fields(url);
    let names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "connection",
            "response_type",
            "client_id",
            "redirect_uri",
            "scope",
            "audience",
            "state",
            "code_challenge",
            "code_challenge_method"
        ]
    );
    assert_eq!(field(&fields, "connection"), "corp");
    assert_eq!(field(&fields, "response_type"), "code");
    assert_eq!(field(&fields, "client_id"), "acme-production-id");
    assert_eq!(field(&fields, "redirect_uri"), REDIRECT_URI);
    assert_eq!(field(&fields, "scope"), "offline_access openid read:things");
    assert_eq!(field(&fields, "audience"), ACME_AUDIENCE);
    assert_eq!(field(&fields, "state"), state);
    assert_eq!(field(&fields, "code_challenge_method"), "S256");
    let challenge = field(&fields, "code_challenge").to_owned();
    assert_eq!(challenge.len(), 43);
    assert!(!url.contains("code_verifier"));

    // 2. A forged state is refused without asking the IdP.
    let forged = app
        .create_session("acme/production", BILLING_KEY, "code-1", "forged-state")
        .await;
    assert_eq!(
        (forged.status, forged.body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert!(app.idp_requests().await.is_empty());

    // 3. The code exchange, checked by the IdP (PKCE included).
    mount_exchange(
        &app,
        "code-1",
        &challenge,
        user_token_body("user-1", 30, Some("rt-1")),
    )
    .await;
    let created = app
        .create_session("acme/production", BILLING_KEY, "code-1", &state)
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.header("cache-control"), Some("no-store"));
    let handle = created.body["handle"].as_str().unwrap().to_owned();
    assert!(handle.starts_with("uth_") && handle.len() > 40, "{handle}");
    assert_eq!(
        app.idp_requests().await.grant("authorization_code").len(),
        1
    );
    let again = app
        .create_session("acme/production", BILLING_KEY, "code-1", &state)
        .await;
    assert_eq!(
        again.status, 400,
        "a state is redeemed once: {}",
        again.body
    );

    // 4. The exchanged token has less than cache.min_remaining (60 s) left: refresh it. The IdP
    //    rotates the refresh token.
    Mock::given(method("POST"))
        .and(refresh_form("rt-1"))
        .respond_with(user_token_body("user-2", 3600, Some("rt-2")))
        .mount(&app.idp)
        .await;
    let refreshed = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    assert_eq!(refreshed.token(), "user-2");
    assert_eq!(refreshed.header("x-cache"), Some("miss"));
    assert!(refreshed.body["expires_at"].is_string());
    let cached = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!(
        (cached.token(), cached.header("x-cache")),
        ("user-2", Some("hit"))
    );
    assert_eq!(
        app.idp_requests().await.grant("refresh_token").len(),
        1,
        "one refresh with rt-1"
    );

    // 5. Needing more validity than is left refreshes with the rotated token; an answer without
    //    a refresh token keeps it.
    Mock::given(method("POST"))
        .and(refresh_form("rt-2"))
        .respond_with(user_token_body("user-3", 3600, None))
        .up_to_n_times(1)
        .mount(&app.idp)
        .await;
    app.clock.advance(std::time::Duration::from_secs(200));
    let longer = app
        .user_token(&format!("{handle}?min_ttl=3500"), BILLING_KEY)
        .await;
    assert_eq!(
        (longer.status, longer.token()),
        (200, "user-3"),
        "{}",
        longer.body
    );
    assert_eq!(
        app.idp_requests().await.grant("refresh_token").len(),
        2,
        "one refresh with rt-2"
    );

    // 6. The user revokes consent: the IdP refuses rt-2, the caller gets a new authorization URL
    //    and the handle is gone.
    Mock::given(method("POST"))
        .and(refresh_form("rt-2"))
        .respond_with(ResponseTemplate::new(403).set_body_json(serde_json::json!({
            "error": "invalid_grant", "error_description": "Unknown or invalid refresh token.",
        })))
        .mount(&app.idp)
        .await;
    app.clock.advance(std::time::Duration::from_secs(200));
    let revoked = app
        .user_token(&format!("{handle}?min_ttl=3500"), BILLING_KEY)
        .await;
    assert_eq!(revoked.status, 401, "{}", revoked.body);
    assert_eq!(
        app.idp_requests().await.grant("refresh_token").len(),
        3,
        "one refused refresh with rt-2"
    );
    assert_eq!(revoked.body["error"], "reauthorization_required");
    let new_url = revoked.body["authorization_url"].as_str().unwrap();
    let new_state = revoked.body["state"].as_str().unwrap();
    assert_ne!(new_state, state);
    let new_fields = query_fields(new_url);
    assert_eq!(field(&new_fields, "state"), new_state);
    assert_eq!(
        field(&new_fields, "scope"),
        "offline_access openid read:things"
    );
    let gone = app.user_token(&handle, BILLING_KEY).await;
    assert_eq!(
        (gone.status, gone.body["error"].as_str()),
        (404, Some("not_found"))
    );

    // 7. The new URL starts a new session.
    let new_challenge = field(&new_fields, "code_challenge");
    mount_exchange(
        &app,
        "code-2",
        new_challenge,
        user_token_body("user-4", 3600, Some("rt-3")),
    )
    .await;
    let recreated = app
        .create_session("acme/production", BILLING_KEY, "code-2", new_state)
        .await;
    assert_eq!(recreated.status, 201, "{}", recreated.body);
    let new_handle = recreated.body["handle"].as_str().unwrap();
    assert_ne!(new_handle, handle);
    let answer = app.user_token(new_handle, BILLING_KEY).await;
    assert_eq!(
        (answer.token(), answer.header("x-cache")),
        ("user-4", Some("hit"))
    );
    assert_eq!(
        app.idp_requests().await.grant("authorization_code").len(),
        2
    );

    // Nothing secret leaked into any answer.
    for text in [started.body, created.body, refreshed.body, revoked.body] {
        let text = text.to_string();
        for secret in ["rt-1", "rt-2", ACME_PRODUCTION_SECRET, BILLING_KEY] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
}
