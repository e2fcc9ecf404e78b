//! `GET /v1/tokens/{tenant}/{environment}` is recognised before the router, and a path the
//! router would percent-decode goes through the router: both answer alike, to the header.

use std::time::Duration;

use crate::helpers::*;

/// The status, the headers but the per-request `x-request-id` and `date`, and the body without
/// its `request_id`.
fn comparable(answer: &Answer) -> (u16, Vec<(String, String)>, serde_json::Value) {
    let headers = answer
        .headers
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "x-request-id" | "date"))
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
        .collect();
    let mut body = answer.body.clone();
    if let Some(object) = body.as_object_mut() {
        object.remove("request_id");
    }
    (answer.status, headers, body)
}

/// `tenant/environment?query` with the tenant's first letter percent-encoded, which only the
/// router decodes.
fn encoded(path_and_query: &str) -> String {
    let first = path_and_query.as_bytes()[0];
    format!("%{first:02X}{}", &path_and_query[1..])
}

#[tokio::test]
async fn token_requests_answer_alike_before_and_through_the_router() {
    let app = TestApp::init()
        .with_config("[callers.reports]\nrate_limit = 1\n")
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    // Misses first, so that both ways then compare hits.
    for warm in ["acme/production", "acme/production?scope=read"] {
        assert_eq!(app.billing(warm).await.status, 200);
    }

    let wrong = "tbk_not-a-caller";
    let cases: [(&str, Option<&str>, u16); 9] = [
        ("acme/production", Some(BILLING_KEY), 200),
        (
            "acme/production?scope=read&min_ttl=60",
            Some(BILLING_KEY),
            200,
        ),
        ("acme/production", None, 401),
        ("acme/production", Some(wrong), 401),
        ("globex/production", Some(REPORTS_KEY), 403),
        ("acme/nowhere", Some(BILLING_KEY), 404),
        ("acme/production?min_ttl=soon", Some(BILLING_KEY), 400),
        ("acme/production?colour=blue", Some(BILLING_KEY), 400),
        ("acme/production", Some(REPORTS_KEY), 429),
    ];
    for (path, key, status) in cases {
        // The reports caller may make one request a second: each of its requests gets a second
        // of its own, and the 429 case spends it first (on a hit).
        let mut answers = Vec::new();
        for path in [path.to_owned(), encoded(path)] {
            if key == Some(REPORTS_KEY) {
                app.clock.advance(Duration::from_secs(1));
                if status == 429 {
                    assert_eq!(app.get_token("acme/production", key).await.status, 200);
                }
            }
            answers.push(app.get_token(&path, key).await);
        }
        let [before, through] = <[Answer; 2]>::try_from(answers).ok().unwrap();
        assert_eq!(before.status, status, "{path}: {}", before.body);
        assert_eq!(comparable(&before), comparable(&through), "{path}");
        assert_eq!(
            before.header("x-request-id").map(str::len),
            Some(32),
            "{path}: a made request id"
        );
        if status != 200 {
            assert_eq!(
                before.body["request_id"].as_str(),
                before.header("x-request-id"),
                "{path}"
            );
        }
    }

    // Both ways count under the route's template, and the IdP saw each key once.
    let metrics = app.scrape().await;
    let served = |status: &str| {
        metric(
            &metrics,
            &format!(
                r#"token_broker_http_requests_total{{route="/v1/tokens/{{tenant}}/{{environment}}",method="GET",status="{status}"}}"#
            ),
        )
    };
    assert_eq!(served("200"), Some(8.0));
    assert_eq!(served("401"), Some(4.0));
    assert_eq!(served("429"), Some(2.0));
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);
}

#[tokio::test]
async fn other_shapes_of_the_path_are_the_routers() {
    let app = TestApp::init().start().await;
    for path in [
        "/v1/tokens/acme",
        "/v1/tokens/acme/production/",
        "/v1/tokens/acme/production/extra",
    ] {
        let answer = app.get(path, Some(BILLING_KEY)).await;
        assert_eq!(answer.status, 404, "{path}: {}", answer.body);
        assert_eq!(answer.body["error_description"], "no such route", "{path}");
    }
    let head = app
        .http
        .head(format!("{}/v1/tokens/acme/nowhere", app.url))
        .bearer_auth(BILLING_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404, "HEAD is the router's GET route");
    assert_eq!(app.idp_requests().await.len(), 0);
}

#[tokio::test]
async fn a_grant_kept_by_a_caller_is_decided_again_after_a_reload() {
    let idp = wiremock::MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    let config = base_config(&idp.uri());
    std::fs::write(&file, &config).unwrap();
    let app = TestApp::init().with_idp(idp).with_file(&file).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    issue_tokens(&app.idp, "acme-staging", TokenIssuer::new(3600)).await;
    for _ in 0..3 {
        assert_eq!(app.billing("acme/production").await.status, 200);
        assert_eq!(app.billing("acme/staging").await.status, 200);
    }

    // billing loses acme/production, and acme/staging gets another default audience.
    let staging = config.find("[tenants.acme.environments.staging]").unwrap();
    let (before, after) = config.split_at(staging);
    let changed = format!(
        "{}{}",
        before.replace(
            r#"allow = ["acme/*", "globex/production", "initech/*"]"#,
            r#"allow = ["acme/staging", "globex/production", "initech/*"]"#,
        ),
        after.replacen(ACME_AUDIENCE, "https://new.acme.example", 1),
    );
    std::fs::write(&file, changed).unwrap();
    let report = app.reload().await;
    assert_eq!(report.status, 200, "{}", report.body);

    let refused = app.billing("acme/production").await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let staging = app.billing("acme/staging").await;
    assert_eq!(staging.status, 200, "{}", staging.body);
    let requests = app.idp_requests().await.to("acme-staging");
    assert_eq!(requests.len(), 2, "a new key for the new default audience");
    let fields = form_fields(&requests.requests()[1].body);
    assert!(
        fields.contains(&("audience".into(), "https://new.acme.example".into())),
        "{fields:?}"
    );
}

/// A kept grant remembers its token for a second, but never past the cache: a `DELETE`, a
/// `DELETE` within the refetch interval and a new token each reach the next request at once.
#[tokio::test]
async fn a_kept_grant_never_hands_out_a_token_the_cache_let_go_of() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let tokens = async |count: usize| {
        let mut seen = Vec::new();
        for _ in 0..count {
            let answer = app.billing("acme/production").await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            seen.push(answer.token().to_owned());
        }
        seen
    };
    // A miss, a lookup that the grant remembers, then hits from the memory (the clock stands).
    assert_eq!(tokens(4).await, ["token-1"; 4]);

    // Within min_refetch_interval a DELETE marks the token: the next request fetches anew.
    assert_eq!(app.forget("acme/production", None).await.status, 204);
    app.clock.advance(Duration::from_secs(6));
    assert_eq!(
        tokens(4).await,
        ["token-2", "token-2", "token-2", "token-2"]
    );

    // Past it, a DELETE forgets the token: the next request is a miss, not the memory.
    app.clock.advance(Duration::from_secs(6));
    assert_eq!(tokens(3).await, ["token-2"; 3]);
    assert_eq!(app.forget("acme/production", None).await.status, 204);
    let after = app.billing("acme/production").await;
    assert_eq!(
        (after.token(), after.header("x-cache")),
        ("token-3", Some("miss"))
    );
    assert_eq!(tokens(3).await, ["token-3"; 3]);
    assert_eq!(app.idp_requests().await.to("acme").len(), 3);
}
