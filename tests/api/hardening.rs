//! Operational hardening: operators' routes on a port of their own, a bound on open connections,
//! and a bound on one caller's pending user authorizations.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// The paths of an `/openapi.json` document.
async fn documented_paths(http: &reqwest::Client, base: &str) -> Vec<String> {
    let body = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let document: Value = serde_json::from_slice(&body).unwrap();
    document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

async fn status(http: &reqwest::Client, url: &str, key: Option<&str>) -> u16 {
    let mut request = http.get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn with_an_admin_listener_metrics_and_admin_routes_live_there_only() {
    let app = TestApp::init()
        .with_config("[server]\nadmin_listen = \"127.0.0.1:0\"")
        .start()
        .await;
    let admin = app.admin_url.clone().expect("an admin listener");
    let http = &app.http;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    assert_eq!(
        status(http, &format!("{}/metrics", app.url), None).await,
        404
    );
    let tenants = "/v1/admin/tenants";
    assert_eq!(
        status(http, &format!("{}{tenants}", app.url), Some(ADMIN_KEY)).await,
        404
    );
    assert_eq!(app.billing("acme/production").await.status, 200);

    assert_eq!(status(http, &format!("{admin}/metrics"), None).await, 200);
    assert_eq!(
        status(http, &format!("{admin}{tenants}"), Some(ADMIN_KEY)).await,
        200
    );
    let token = format!("{admin}/v1/tokens/acme/production");
    assert_eq!(status(http, &token, Some(BILLING_KEY)).await, 404);

    for base in [&app.url, &admin] {
        assert_eq!(status(http, &format!("{base}/livez"), None).await, 200);
        assert_eq!(status(http, &format!("{base}/readyz"), None).await, 200);
    }
    let main_paths = documented_paths(http, &app.url).await;
    assert!(main_paths.iter().any(|p| p.starts_with("/v1/tokens")));
    assert!(
        !main_paths
            .iter()
            .any(|p| p == "/metrics" || p.starts_with("/v1/admin"))
    );
    let admin_paths = documented_paths(http, &admin).await;
    assert!(admin_paths.iter().any(|p| p == "/metrics"));
    assert!(admin_paths.iter().any(|p| p.starts_with("/v1/admin")));
    assert!(!admin_paths.iter().any(|p| p.starts_with("/v1/tokens")));
    assert!(admin_paths.iter().any(|p| p == "/livez"));
}

#[tokio::test]
async fn without_an_admin_listener_one_port_serves_everything() {
    let app = TestApp::init().start().await;
    assert!(app.admin_url.is_none());
    assert_eq!(app.get("/metrics", None).await.status, 200);
    let paths = documented_paths(&app.http, &app.url).await;
    assert!(
        paths.iter().any(|p| p == "/metrics") && paths.iter().any(|p| p.starts_with("/v1/tokens"))
    );
}

#[tokio::test]
async fn connections_over_max_connections_wait_until_one_closes() {
    let app = TestApp::init()
        .with_config("[server]\nmax_connections = 1")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    // One client holds the only connection open (keep-alive).
    let holder = reqwest::Client::new();
    let first = holder
        .get(format!("{}/livez", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);

    let patient = |timeout: Duration| {
        reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let waited = patient(Duration::from_millis(300))
        .get(format!("{}/livez", app.url))
        .send()
        .await;
    assert!(
        waited.is_err(),
        "a second connection is not served while the first is open"
    );

    drop(holder);
    let served = patient(Duration::from_secs(5))
        .get(format!("{}/livez", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
}

#[tokio::test]
async fn one_caller_cannot_hold_more_than_max_pending_per_caller_authorizations() {
    let app = TestApp::init()
        .with_config(format!(
            r#"
        [users]
        max_pending_per_caller = 2
        [tenants.acme.environments.production]
        authorize_url = "{AUTHORIZE_URL}"
        redirect_uri = "{REDIRECT_URI}"
        "#
        ))
        .start()
        .await;
    for _ in 0..2 {
        let started = app
            .authorize("acme/production", BILLING_KEY, json!({}))
            .await;
        assert_eq!(started.status, 200, "{}", started.body);
    }
    let refused = app
        .authorize("acme/production", BILLING_KEY, json!({}))
        .await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.body["error"], "rate_limited");
    assert!(refused.header("retry-after").is_some());
    // Another caller's logins are untouched.
    let other = app
        .authorize("acme/production", REPORTS_KEY, json!({}))
        .await;
    assert_eq!(other.status, 200, "{}", other.body);
}
