//! Probes, request ids, unknown routes and response headers.

use crate::helpers::*;

#[tokio::test]
async fn livez_and_readyz_answer_200() {
    let app = TestApp::init().start().await;
    for probe in ["livez", "readyz"] {
        let response = app
            .http
            .get(format!("{}/{probe}", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{probe}");
    }
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let app = TestApp::init().start().await;
    let echoed = app
        .http
        .get(format!("{}/livez", app.url))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "abc-123");

    let made = answer(
        app.http
            .get(format!("{}/v1/tokens/acme/production", app.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = made.header("x-request-id").expect("a request id");
    assert_eq!(made.body["request_id"], id);
}

#[tokio::test]
async fn unknown_paths_are_json_404s() {
    let app = TestApp::init().start().await;
    let answer = answer(
        app.http
            .get(format!("{}/v2/nothing", app.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.body["error"], "not_found");
}

#[tokio::test]
async fn a_token_answer_is_not_cacheable_and_says_hit_or_miss() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let miss = app.billing("acme/production").await;
    assert_eq!(miss.header("cache-control"), Some("no-store"));
    assert_eq!(miss.header("x-cache"), Some("miss"));
    assert!(
        miss.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(miss.body["token_type"], "Bearer");
    assert!(miss.body.get("scope").is_none());
    assert_eq!(
        app.billing("acme/production").await.header("x-cache"),
        Some("hit")
    );
}

#[tokio::test]
async fn on_shutdown_readiness_turns_503_while_the_listener_still_accepts() {
    let mut app = TestApp::init()
        .with_config("[server]\ndrain_delay = \"2s\"")
        .start()
        .await;
    app.begin_shutdown();
    eventually("readiness answers 503", async || {
        let ready = app.http.get(format!("{}/readyz", app.url)).send().await;
        ready.is_ok_and(|ready| ready.status() == 503)
    })
    .await;
    let ready = app
        .http
        .get(format!("{}/readyz", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let live = app
        .http
        .get(format!("{}/livez", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
}
