//! `GET /metrics`: names and labels after traffic, bounded labels, one registry per application.

use std::time::Duration;

use serde_json::json;
use token_broker::auth::KeyHash;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

/// Tokens of 2 s with a refresh window from about 0.2 s on, so one test sees a refresh quickly.
const QUICK_REFRESH: &str = r#"
    [cache]
    min_remaining = "1s"
    refresh_ahead = 0.9
"#;

const TOKENS: &str = "/v1/tokens/{tenant}/{environment}";

fn labels(tenant: &str, environment: &str) -> String {
    format!(r#"tenant="{tenant}",environment="{environment}""#)
}

#[tokio::test]
async fn hits_misses_refreshes_and_idp_outcomes_are_counted_by_environment() {
    let app = TestApp::init().with_config(QUICK_REFRESH).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(2)).await;
    Mock::given(method("POST"))
        .and(path("/acme-staging/oauth/token"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": "access_denied"})))
        .mount(&app.idp)
        .await;
    Mock::given(method("POST"))
        .and(path("/globex/oauth/token"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&app.idp)
        .await;

    assert_eq!(
        app.billing("acme/production").await.header("x-cache"),
        Some("miss")
    );
    assert_eq!(
        app.billing("acme/production").await.header("x-cache"),
        Some("hit")
    );
    app.clock.advance(Duration::from_millis(600));
    assert_eq!(
        app.billing("acme/production").await.header("x-cache"),
        Some("hit")
    );
    eventually("the refresh reaches the IdP", async || {
        app.idp_requests().await.to("acme").len() >= 2
    })
    .await;
    assert_eq!(
        app.idp_requests().await.to("acme").len(),
        2,
        "the hit in the refresh window refreshed"
    );
    assert_eq!(app.billing("acme/staging").await.status, 502);
    assert_eq!(
        app.billing("globex/production?audience=https://api.globex.example")
            .await
            .status,
        503
    );

    let text = app.scrape().await;
    let acme = labels("acme", "production");
    let value = |line: &str| metric(&text, line).unwrap_or_else(|| panic!("no {line} in\n{text}"));
    assert_eq!(
        value(&format!("token_broker_cache_hits_total{{{acme}}}")),
        2.0
    );
    assert_eq!(
        value(&format!("token_broker_cache_misses_total{{{acme}}}")),
        1.0
    );
    assert_eq!(
        value(&format!("token_broker_cache_refreshes_total{{{acme}}}")),
        1.0
    );
    assert_eq!(
        value(&format!(
            r#"token_broker_idp_requests_total{{{acme},outcome="ok"}}"#
        )),
        2.0
    );
    assert_eq!(
        value(&format!(
            r#"token_broker_idp_request_duration_seconds_count{{{acme}}}"#
        )),
        2.0
    );
    assert_eq!(
        value(&format!(
            r#"token_broker_idp_requests_total{{{},outcome="rejected"}}"#,
            labels("acme", "staging")
        )),
        1.0
    );
    assert!(
        value(&format!(
            r#"token_broker_idp_requests_total{{{},outcome="server_error"}}"#,
            labels("globex", "production")
        )) >= 1.0
    );
    assert_eq!(
        value(&format!(
            r#"token_broker_http_requests_total{{route="{TOKENS}",method="GET",status="200"}}"#
        )),
        3.0
    );
    for status in ["502", "503"] {
        assert_eq!(
            value(&format!(
                r#"token_broker_http_requests_total{{route="{TOKENS}",method="GET",status="{status}"}}"#
            )),
            1.0
        );
    }
    assert_eq!(
        value("token_broker_cache_entries"),
        1.0,
        "only acme/production is cached"
    );
    for declaration in [
        "# TYPE token_broker_http_requests_total counter",
        "# TYPE token_broker_idp_request_duration_seconds histogram",
        "# TYPE token_broker_cache_entries gauge",
        "# HELP token_broker_cache_hits_total ",
    ] {
        assert!(text.contains(declaration), "{declaration} not in\n{text}");
    }
}

#[tokio::test]
async fn every_configured_environment_and_outcome_shows_from_the_start() {
    let app = TestApp::init().start().await;
    let text = app.scrape().await;
    for (tenant, environment) in [
        ("acme", "production"),
        ("acme", "staging"),
        ("globex", "production"),
    ] {
        let labels = labels(tenant, environment);
        for outcome in [
            "ok",
            "rejected",
            "rate_limited",
            "timeout",
            "connect",
            "server_error",
            "invalid_response",
            "quota_exhausted",
        ] {
            let line =
                format!(r#"token_broker_idp_requests_total{{{labels},outcome="{outcome}"}}"#);
            assert_eq!(metric(&text, &line), Some(0.0), "{line} in\n{text}");
        }
        assert_eq!(
            metric(&text, &format!("token_broker_cache_hits_total{{{labels}}}")),
            Some(0.0)
        );
    }
    assert!(
        text.contains(r#"token_broker_build_info{version=""#),
        "{text}"
    );
}

#[tokio::test]
async fn the_idp_rate_limit_and_auth0_quota_remaining_and_the_quota_guard_are_exported() {
    let app = TestApp::init()
        .with_config(
            r#"
        [tenants.globex.environments.production]
        max_fetches_per_hour = 1
        "#,
        )
        .start()
        .await;
    Mock::given(method("POST"))
        .and(path("/globex/oauth/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-ratelimit-limit", "50")
                .insert_header("x-ratelimit-remaining", "41")
                .insert_header(
                    "auth0-client-quota-limit",
                    "b=per_hour;q=10;r=7;t=3540,b=per_day;q=50;r=47;t=43200",
                )
                .set_body_json(json!({"access_token": "globex-token", "expires_in": 3600})),
        )
        .mount(&app.idp)
        .await;
    let audience = "globex/production?audience=https://api.globex.example";
    assert_eq!(app.billing(audience).await.status, 200);
    app.forget(audience, None).await;
    assert_eq!(
        app.billing(audience).await.status,
        503,
        "the quota is spent"
    );

    let text = app.scrape().await;
    let globex = labels("globex", "production");
    assert_eq!(
        metric(
            &text,
            &format!("token_broker_idp_rate_limit_remaining{{{globex}}}")
        ),
        Some(41.0),
        "{text}"
    );
    for (bucket, left) in [("per_hour", 7.0), ("per_day", 47.0)] {
        let name = format!(
            r#"token_broker_idp_quota_remaining{{{globex},entity="client",bucket="{bucket}"}}"#
        );
        assert_eq!(metric(&text, &name), Some(left), "{name} in {text}");
    }
    assert_eq!(
        metric(
            &text,
            &format!(r#"token_broker_idp_requests_total{{{globex},outcome="quota_exhausted"}}"#)
        ),
        Some(1.0)
    );
    assert!(
        !text.contains(r#"token_broker_idp_rate_limit_remaining{tenant="acme""#),
        "no gauge for an IdP that never said"
    );
}

#[tokio::test]
async fn labels_never_carry_audiences_scopes_raw_paths_or_odd_methods() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let answer = app
        .billing("acme/production?audience=https://private-audience.example&scope=odd:scope")
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        app.get("/v2/raw/path/nobody/configured", None).await.status,
        404
    );
    let brew = app
        .http
        .request(
            reqwest::Method::from_bytes(b"BREW").unwrap(),
            format!("{}/livez", app.url),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(brew.status(), 405);

    let text = app.scrape().await;
    for leak in [
        "private-audience",
        "odd:scope",
        "/v2/raw",
        "BREW",
        ACME_AUDIENCE,
    ] {
        assert!(!text.contains(leak), "{leak} in\n{text}");
    }
    assert_eq!(
        metric(
            &text,
            r#"token_broker_http_requests_total{route="unmatched",method="GET",status="404"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"token_broker_http_requests_total{route="/livez",method="other",status="405"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn each_application_counts_only_its_own_traffic() {
    let busy = TestApp::init().start().await;
    let idle = TestApp::init().start().await;
    issue_tokens(&busy.idp, "acme", TokenIssuer::new(3600)).await;
    for _ in 0..3 {
        assert_eq!(busy.billing("acme/production").await.status, 200);
    }
    let acme = labels("acme", "production");
    let hits = format!("token_broker_cache_hits_total{{{acme}}}");
    assert_eq!(metric(&busy.scrape().await, &hits), Some(2.0));
    assert_eq!(metric(&idle.scrape().await, &hits), Some(0.0));
}

#[tokio::test]
async fn a_metrics_key_closes_the_scrape_to_others() {
    const METRICS_KEY: &str = "tbk_test-metrics-key";
    let app = TestApp::init()
        .with_config(format!(
            "[auth]\nmetrics_key_sha256 = \"{}\"\n",
            KeyHash::of(METRICS_KEY).to_hex()
        ))
        .start()
        .await;
    let open = app.get("/metrics", None).await;
    assert_eq!(open.status, 401);
    assert_eq!(open.body["error"], "unauthorized");
    assert_eq!(app.get("/metrics", Some(BILLING_KEY)).await.status, 401);
    assert_eq!(app.get("/metrics", Some(ADMIN_KEY)).await.status, 401);
    let scraped = app.get("/metrics", Some(METRICS_KEY)).await;
    assert_eq!(scraped.status, 200);
    assert!(
        scraped
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
}
