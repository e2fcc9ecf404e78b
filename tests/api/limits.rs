//! Request limits: header size (431), body size (413) and the request timeout.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn a_request_head_over_max_header_bytes_gets_431() {
    let app = TestApp::init()
        .with_config("[server]\nmax_header_bytes = 8192\n")
        .start()
        .await;
    let fits = app
        .http
        .get(format!("{}/livez", app.url))
        .header("x-padding", "a".repeat(4000))
        .send()
        .await
        .unwrap();
    assert_eq!(fits.status(), 200);
    let too_large = app
        .http
        .get(format!("{}/livez", app.url))
        .header("x-padding", "a".repeat(9000))
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 431);
}

#[tokio::test]
async fn a_body_over_max_body_bytes_gets_413() {
    let app = TestApp::init()
        .with_config("[server]\nmax_body_bytes = 64\n")
        .start()
        .await;
    let answer = answer(
        app.http
            .delete(format!("{}/v1/tokens/acme/production", app.url))
            .bearer_auth(BILLING_KEY)
            .header("content-type", "application/json")
            .body(format!(r#"{{"access_token": "{}"}}"#, "t".repeat(100)))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert_eq!(answer.body["error"], "payload_too_large");
}

#[tokio::test]
async fn a_request_over_the_timeout_gets_503() {
    let app = TestApp::init()
        .with_config("[server]\nrequest_timeout = \"300ms\"\n")
        .start()
        .await;
    issue_tokens(
        &app.idp,
        "acme",
        TokenIssuer::new(3600).with_delay(Duration::from_secs(2)),
    )
    .await;
    let answer = app.billing("acme/production").await;
    assert_eq!(answer.status, 503);
    assert_eq!(
        answer.body["error"], "upstream_unavailable",
        "{}",
        answer.body
    );
    let description = answer.body["error_description"].as_str().unwrap();
    assert!(
        description.contains("server.request_timeout"),
        "{description}"
    );
    assert!(
        answer.body["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.header("cache-control"), Some("no-store"));

    // The facade answers in its own shape, with the same headers and Pragma.
    let facade = app
        .http
        .post(format!("{}/t/acme/production/oauth/token", app.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=client_credentials&client_id=billing&client_secret={BILLING_KEY}&scope=slow"
        ))
        .send()
        .await
        .unwrap();
    let facade = crate::helpers::answer(facade).await;
    assert_eq!(
        (facade.status, facade.header("retry-after")),
        (503, Some("1"))
    );
    assert_eq!(facade.body["error"], "upstream_unavailable");
    assert_eq!(facade.header("pragma"), Some("no-cache"));

    // The fetch the timed-out requests waited on went on: its token is cached.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let cached = app.billing("acme/production").await;
    assert_eq!(
        (cached.status, cached.header("x-cache")),
        (200, Some("hit"))
    );
}

#[test]
fn max_header_bytes_below_what_the_server_accepts_is_refused() {
    let error = token_broker::config::Settings::from_toml_layers(
        &[
            &base_config("http://127.0.0.1:9"),
            "[server]\nmax_header_bytes = 1024\n",
        ],
        &|_| None,
    )
    .err()
    .expect("refused");
    assert!(
        error.to_string().contains("server.max_header_bytes"),
        "{error}"
    );
}
