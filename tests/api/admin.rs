//! `GET /v1/admin/tenants` and `GET /v1/admin/cache`: the admin key, and what they show.

use crate::helpers::*;

/// A tenant whose configuration holds credentials in places other than `client_secret`.
const INITECH: &str = r#"
    [tenants.initech.environments.production]
    token_url = "https://initech-user:initech-url-password@idp.initech.example/oauth/token"
    client_id = "initech-id"
    client_secret = "initech-client-secret"
    request_format = "form"
    client_auth = "basic"
    audience_param = "resource"
    extra_params = { api_key = "initech-extra-param-value" }
    max_fetches_per_hour = 60
"#;

#[tokio::test]
async fn admin_routes_need_the_admin_key() {
    let app = TestApp::init().start().await;
    for path in ["/v1/admin/tenants", "/v1/admin/cache"] {
        for key in [None, Some("tbk_not-a-key"), Some(BILLING_KEY)] {
            let answer = app.get(path, key).await;
            assert_eq!(answer.status, 401, "{path} with {key:?}");
            assert_eq!(answer.body["error"], "unauthorized");
            assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
        }
        assert_eq!(app.get(path, Some(ADMIN_KEY)).await.status, 200, "{path}");
    }
}

#[tokio::test]
async fn without_an_admin_key_configured_the_admin_api_is_closed() {
    let idp = wiremock::MockServer::start().await;
    let config = base_config(&idp.uri()).replace("admin_key_sha256", "# admin_key_sha256");
    let app = TestApp::init()
        .with_idp(idp)
        .with_toml(config)
        .start()
        .await;
    let answer = app.get("/v1/admin/tenants", Some(ADMIN_KEY)).await;
    assert_eq!(answer.status, 401);
    assert!(
        answer.body["error_description"]
            .as_str()
            .unwrap()
            .contains("admin_key_sha256"),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn tenants_shows_how_each_environment_asks_its_idp_and_no_secret() {
    let app = TestApp::init().with_config(INITECH).start().await;
    let answer = app.get("/v1/admin/tenants", Some(ADMIN_KEY)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let tenants = answer.body["tenants"].as_array().unwrap();
    let names: Vec<&str> = tenants
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme", "globex", "initech"]);

    let acme = &tenants[0]["environments"];
    assert_eq!(acme[0]["name"], "production");
    assert_eq!(acme[0]["client_id"], "acme-production-id");
    assert_eq!(acme[0]["audience"], ACME_AUDIENCE);
    assert_eq!(acme[0]["request_format"], "json");
    assert!(
        acme[0]["token_url"]
            .as_str()
            .unwrap()
            .ends_with("/acme/oauth/token")
    );
    assert_eq!(acme[1]["name"], "staging");
    assert_eq!(acme[1]["client_auth"], "basic");

    let initech = &tenants[2]["environments"][0];
    assert_eq!(
        initech["token_url"],
        "https://idp.initech.example/oauth/token"
    );
    assert_eq!(initech["audience_param"], "resource");
    assert_eq!(initech["extra_params"], serde_json::json!(["api_key"]));
    assert_eq!(initech["max_fetches_per_hour"], 60);

    let text = answer.body.to_string();
    for secret in [
        ACME_PRODUCTION_SECRET,
        ACME_STAGING_SECRET,
        GLOBEX_SECRET,
        "initech-client-secret",
        "initech-url-password",
        "initech-user",
        "initech-extra-param-value",
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

#[tokio::test]
async fn cache_lists_keys_timing_and_hits_but_no_token() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    for _ in 0..3 {
        assert_eq!(app.billing("acme/production?scope=b+a").await.status, 200);
    }
    assert_eq!(app.billing("acme/production").await.status, 200);

    let answer = app.get("/v1/admin/cache", Some(ADMIN_KEY)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let entries = answer.body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{}", answer.body);
    let (plain, scoped) = (&entries[0], &entries[1]);
    assert_eq!(plain["scope"], "");
    assert_eq!(scoped["scope"], "a b");
    assert_eq!(scoped["tenant"], "acme");
    assert_eq!(scoped["environment"], "production");
    assert_eq!(scoped["audience"], ACME_AUDIENCE);
    assert_eq!(scoped["hits"], 3);
    assert_eq!(plain["hits"], 1);
    let expires_in = scoped["expires_in"].as_u64().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    for field in ["fetched_at", "expires_at", "refresh_at"] {
        let at = scoped[field].as_str().unwrap();
        assert!(humantime::parse_rfc3339(at).is_ok(), "{field}: {at}");
    }
    let text = answer.body.to_string();
    assert!(
        !text.contains("token-1") && !text.contains("token-2"),
        "{text}"
    );
}

#[tokio::test]
async fn a_missing_admin_or_metrics_key_is_named_as_such() {
    let app = TestApp::init()
        .with_config(format!(
            "[auth]\nmetrics_key_sha256 = \"{}\"\n",
            token_broker::auth::KeyHash::of("tbk_metrics").to_hex()
        ))
        .start()
        .await;
    let admin = app.get("/v1/admin/tenants", None).await;
    assert_eq!(admin.status, 401);
    let description = admin.body["error_description"].as_str().unwrap();
    assert!(description.starts_with("no admin key"), "{description}");
    let metrics = app.get("/metrics", None).await;
    assert_eq!(metrics.status, 401);
    let description = metrics.body["error_description"].as_str().unwrap();
    assert!(description.starts_with("no metrics key"), "{description}");
    assert_eq!(app.get("/metrics", Some("tbk_metrics")).await.status, 200);
}
