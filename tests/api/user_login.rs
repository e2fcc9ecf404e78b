//! Starting and completing a user authorization: configuration, allow rules and the `state`
//! check, which binds a state to its caller, tenant and environment.

use serde_json::json;
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

async fn start(app: &TestApp) -> String {
    let answer = app
        .authorize("acme/production", BILLING_KEY, json!({}))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body["state"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_state_only_works_for_its_caller_tenant_and_environment() {
    let app = TestApp::init().with_users().start().await;
    let state = start(&app).await;
    // reports may use acme/production with the default audience, but did not start this one.
    // acme/staging has no authorize_url: 404, as for authorize, before the state is looked at.
    let misuses = [
        (
            "acme/production",
            REPORTS_KEY,
            state.as_str(),
            400,
            "invalid_request",
        ),
        (
            "acme/staging",
            BILLING_KEY,
            state.as_str(),
            404,
            "not_found",
        ),
        (
            "acme/production",
            BILLING_KEY,
            &state[..state.len() - 1],
            400,
            "invalid_request",
        ),
        (
            "globex/staging",
            BILLING_KEY,
            state.as_str(),
            403,
            "forbidden",
        ),
    ];
    for (tenant_environment, key, state, status, error) in misuses {
        let answer = app
            .create_session(tenant_environment, key, "code", state)
            .await;
        assert_eq!(
            answer.status, status,
            "{tenant_environment}: {}",
            answer.body
        );
        assert_eq!(answer.body["error"], error);
    }
    assert!(app.idp_requests().await.is_empty());

    // None of those burned the state for its owner.
    Mock::given(method("POST"))
        .and(body_string_contains("grant_type=authorization_code"))
        .respond_with(user_token_body("user-1", 3600, Some("rt-1")))
        .mount(&app.idp)
        .await;
    let answer = app
        .create_session("acme/production", BILLING_KEY, "code", &state)
        .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert_eq!(
        app.idp_requests().await.grant("authorization_code").len(),
        1
    );
}

#[tokio::test]
async fn a_code_the_idp_refuses_is_invalid_grant() {
    let app = TestApp::init().with_users().start().await;
    let state = start(&app).await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error": "invalid_grant", "error_description": "Invalid authorization code",
        })))
        .mount(&app.idp)
        .await;
    let answer = app
        .create_session("acme/production", BILLING_KEY, "stale", &state)
        .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.body["error"], "invalid_grant");
    assert_eq!(app.idp_requests().await.len(), 1);
}

#[tokio::test]
async fn user_tokens_need_configuration_allow_rules_and_a_key() {
    let app = TestApp::init().with_users().start().await;
    let not_configured = app.authorize("acme/staging", BILLING_KEY, json!({})).await;
    assert_eq!(not_configured.status, 404, "{}", not_configured.body);
    assert!(
        not_configured.body["error_description"]
            .as_str()
            .unwrap()
            .contains("authorize_url")
    );

    let other_audience = json!({ "audience": "urn:other" });
    for (tenant_environment, body) in [
        ("acme/staging", json!({})),
        ("nosuch/production", json!({})),
        ("acme/production", other_audience),
    ] {
        let answer = app.authorize(tenant_environment, REPORTS_KEY, body).await;
        assert_eq!(answer.status, 403, "{tenant_environment}: {}", answer.body);
    }

    let answer = app
        .authorize("acme/production", "tbk_wrong", json!({}))
        .await;
    assert_eq!(answer.status, 401);
    let answer = app
        .authorize("acme/production", BILLING_KEY, json!({ "scopes": "x" }))
        .await;
    assert_eq!(
        answer.status, 400,
        "unknown fields are refused: {}",
        answer.body
    );
}

#[tokio::test]
async fn a_state_lapses_after_the_authorization_timeout_without_an_idp_request() {
    let app = TestApp::init()
        .with_users()
        .with_config("[users]\nauthorization_timeout = \"10m\"\n")
        .start()
        .await;
    let state = start(&app).await;
    app.clock.advance(std::time::Duration::from_secs(601));
    let answer = app
        .create_session("acme/production", BILLING_KEY, "code", &state)
        .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.body["error"], "invalid_request");
    assert!(app.idp_requests().await.is_empty());
}

#[tokio::test]
async fn a_session_unused_for_the_idle_timeout_is_forgotten_and_one_in_use_is_kept() {
    let app = TestApp::init()
        .with_users()
        .with_config("[users]\nidle_timeout = \"1h\"\n")
        .start()
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("grant_type=authorization_code"))
        .respond_with(user_token_body("user-1", 86_400, Some("rt-1")))
        .mount(&app.idp)
        .await;
    let mut handles = Vec::new();
    for _ in 0..2 {
        let state = start(&app).await;
        let answer = app
            .create_session("acme/production", BILLING_KEY, "code", &state)
            .await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        handles.push(answer.body["handle"].as_str().unwrap().to_owned());
    }
    let (used, idle) = (&handles[0], &handles[1]);
    // `used` is asked for every 40 minutes, `idle` never: after 80 minutes only `used` is left.
    for _ in 0..2 {
        app.clock.advance(std::time::Duration::from_secs(40 * 60));
        let answer = app.user_token(used, BILLING_KEY).await;
        assert_eq!((answer.status, answer.token()), (200, "user-1"));
    }
    let forgotten = app.user_token(idle, BILLING_KEY).await;
    assert_eq!(forgotten.status, 404, "{}", forgotten.body);
    assert_eq!(
        app.idp_requests().await.grant("refresh_token").len(),
        0,
        "neither session needed a refresh"
    );
}

#[tokio::test]
async fn a_deleted_sessions_refresh_token_is_revoked_at_the_idp() {
    let idp = wiremock::MockServer::start().await;
    let app = TestApp::init()
        .with_users()
        .with_config(format!(
            "[tenants.acme.environments.production]\nrevocation_url = \"{}/acme/oauth/revoke\"\n",
            idp.uri()
        ))
        .with_idp(idp)
        .start()
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("grant_type=authorization_code"))
        .respond_with(user_token_body("user-1", 3600, Some("rt-1")))
        .mount(&app.idp)
        .await;
    Mock::given(method("POST"))
        .and(wiremock::matchers::path("/acme/oauth/revoke"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&app.idp)
        .await;
    let state = start(&app).await;
    let created = app
        .create_session("acme/production", BILLING_KEY, "code", &state)
        .await;
    let handle = created.body["handle"].as_str().unwrap().to_owned();
    assert_eq!(app.forget_user(&handle, BILLING_KEY).await.status, 204);
    eventually("the refresh token is revoked", async || {
        app.idp_requests()
            .await
            .requests()
            .iter()
            .any(|request| request.url.path() == "/acme/oauth/revoke")
    })
    .await;
    let requests = app.idp_requests().await;
    let revocations: Vec<_> = requests
        .requests()
        .iter()
        .filter(|request| request.url.path() == "/acme/oauth/revoke")
        .collect();
    assert_eq!(revocations.len(), 1);
    let form = form_fields(&revocations[0].body);
    for (name, value) in [
        ("token", "rt-1"),
        ("token_type_hint", "refresh_token"),
        ("client_id", "acme-production-id"),
    ] {
        assert!(
            form.iter().any(|(n, v)| n == name && v == value),
            "{name}={value} missing in {form:?}"
        );
    }
    assert!(!form.iter().any(|(name, _)| name == "grant_type"));
    eventually("the revocation is counted", async || {
        metric(
            &app.scrape().await,
            r#"token_broker_user_idp_requests_total{tenant="acme",environment="production",grant="revocation",outcome="ok"}"#,
        ) == Some(1.0)
    })
    .await;
}
