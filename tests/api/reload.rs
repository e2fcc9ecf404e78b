//! `POST /v1/admin/reload` and `SIGHUP`: new configuration without dropping valid tokens.

use wiremock::MockServer;

use crate::helpers::*;

async fn reload(app: &TestApp, key: Option<&str>) -> Answer {
    let mut request = app.http.post(format!("{}/v1/admin/reload", app.url));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    answer(request.send().await.unwrap()).await
}

#[tokio::test]
async fn a_rotated_secret_keeps_tokens_and_a_changed_client_drops_them() {
    let idp = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    let config = base_config(&idp.uri());
    std::fs::write(&file, &config).unwrap();
    let app = TestApp::init().with_idp(idp).with_file(&file).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    issue_tokens(&app.idp, "acme-staging", TokenIssuer::new(3600)).await;
    assert_eq!(app.billing("acme/production").await.token(), "token-1");
    assert_eq!(app.billing("acme/staging").await.token(), "token-1");

    let rotated = config
        .replace(ACME_PRODUCTION_SECRET, "rotated-production-secret")
        .replace("acme-staging-id", "acme-staging-new-id");
    std::fs::write(&file, rotated).unwrap();
    let report = reload(&app, Some(ADMIN_KEY)).await;
    assert_eq!(report.status, 200, "{}", report.body);
    assert_eq!(report.body["dropped"], serde_json::json!(["acme/staging"]));

    let kept = app.billing("acme/production").await;
    assert_eq!(
        (kept.token(), kept.header("x-cache")),
        ("token-1", Some("hit"))
    );
    assert_eq!(app.billing("acme/staging").await.token(), "token-2");
    assert_eq!(
        (
            app.idp_requests().await.to("acme").len(),
            app.idp_requests().await.to("acme-staging").len()
        ),
        (1, 2)
    );

    // The next production fetch uses the rotated secret.
    app.forget("acme/production", None).await;
    assert_eq!(app.billing("acme/production").await.token(), "token-2");
    let production = app.idp_requests().await.to("acme");
    let production_bodies: Vec<serde_json::Value> = production
        .requests()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    assert_eq!(
        production_bodies[1]["client_secret"],
        "rotated-production-secret"
    );
}

#[tokio::test]
async fn an_invalid_configuration_is_refused_with_its_problems_and_the_old_one_serves() {
    let idp = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    std::fs::write(&file, base_config(&idp.uri())).unwrap();
    let app = TestApp::init().with_idp(idp).with_file(&file).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    assert_eq!(app.billing("acme/production").await.status, 200);

    std::fs::write(
        &file,
        base_config("not a url").replace("acme-production-id", ""),
    )
    .unwrap();
    let refused = reload(&app, Some(ADMIN_KEY)).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.body["error"], "invalid_configuration");
    let problems = refused.body["problems"].as_array().unwrap();
    assert!(problems.len() >= 3, "{problems:?}");

    let still = app.billing("acme/production").await;
    assert_eq!((still.status, still.header("x-cache")), (200, Some("hit")));

    // Every attempt is counted by trigger and outcome.
    std::fs::write(&file, base_config(&app.idp.uri())).unwrap();
    assert_eq!(reload(&app, Some(ADMIN_KEY)).await.status, 200);
    let text = app.scrape().await;
    for (outcome, count) in [("refused", 1.0), ("applied", 1.0)] {
        assert_eq!(
            metric(
                &text,
                &format!(
                    r#"token_broker_config_reloads_total{{trigger="admin",outcome="{outcome}"}}"#
                )
            ),
            Some(count),
            "{text}"
        );
    }
}

#[tokio::test]
async fn reload_needs_the_admin_key() {
    let app = TestApp::init().start().await;
    assert_eq!(reload(&app, None).await.status, 401);
    assert_eq!(reload(&app, Some(BILLING_KEY)).await.status, 401);
    // Started without a file: nothing to re-read.
    let answer = reload(&app, Some(ADMIN_KEY)).await;
    assert_eq!(answer.status, 409, "{}", answer.body);
}

#[tokio::test]
async fn a_fetch_under_the_old_settings_is_never_served_after_a_reload_changed_them() {
    let idp = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    let config = base_config(&idp.uri());
    std::fs::write(&file, &config).unwrap();
    let app = TestApp::init().with_idp(idp).with_file(&file).start().await;
    let slow = TokenIssuer::new(3600).with_delay(std::time::Duration::from_millis(800));
    issue_tokens(&app.idp, "acme", slow).await;

    // A fetch under the old client id, whose caller gives up at once.
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(100))
        .build()
        .unwrap();
    let gave_up = impatient
        .get(format!("{}/v1/tokens/acme/production", app.url))
        .bearer_auth(BILLING_KEY)
        .send()
        .await;
    assert!(gave_up.is_err());
    std::fs::write(
        &file,
        config.replace("acme-production-id", "acme-production-new-id"),
    )
    .unwrap();
    let report = reload(&app, Some(ADMIN_KEY)).await;
    assert_eq!(
        report.body["dropped"],
        serde_json::json!(["acme/production"])
    );

    // Served only what the new client fetched, never the old fetch's token.
    let after = app.billing("acme/production").await;
    assert_eq!(after.token(), "token-2", "{}", after.body);
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    assert_eq!(app.billing("acme/production").await.token(), "token-2");
    assert_eq!(app.idp_requests().await.to("acme").len(), 2);
    let requests = app.idp_requests().await;
    let last: serde_json::Value = serde_json::from_slice(&requests.requests()[1].body).unwrap();
    assert_eq!(last["client_id"], "acme-production-new-id");
}

#[tokio::test]
async fn settings_that_need_a_restart_are_named_in_the_answer() {
    let idp = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    let config = base_config(&idp.uri());
    std::fs::write(&file, &config).unwrap();
    let app = TestApp::init().with_idp(idp).with_file(&file).start().await;

    let changed = config.replace(
        "shutdown_grace = \"2s\"",
        "shutdown_grace = \"3s\"\nrequest_timeout = \"40s\"",
    );
    std::fs::write(&file, format!("{changed}\n[users]\nmax_sessions = 7\n")).unwrap();
    let report = reload(&app, Some(ADMIN_KEY)).await;
    assert_eq!(report.status, 200, "{}", report.body);
    assert_eq!(
        report.body["restart_required"],
        serde_json::json!(["server.shutdown_grace", "server.request_timeout", "users"])
    );
    // Until a restart, every reload says so again; back to the original, nothing is pending.
    let again = reload(&app, Some(ADMIN_KEY)).await;
    assert_eq!(
        again.body["restart_required"],
        report.body["restart_required"]
    );
    std::fs::write(&file, &config).unwrap();
    let restored = reload(&app, Some(ADMIN_KEY)).await;
    assert_eq!(restored.body["restart_required"], serde_json::json!([]));
}

#[tokio::test]
async fn a_reload_lists_every_problem_even_for_syntax_and_type_errors() {
    let idp = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    let config = base_config(&idp.uri());
    std::fs::write(&file, &config).unwrap();
    let app = TestApp::init().with_idp(idp).with_file(&file).start().await;

    std::fs::write(&file, format!("{config}\n[oops\n")).unwrap();
    let syntax = reload(&app, Some(ADMIN_KEY)).await;
    assert_eq!(syntax.status, 400, "{}", syntax.body);
    assert_eq!(syntax.body["error"], "invalid_configuration");
    let problems = syntax.body["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0]
            .as_str()
            .unwrap()
            .contains("TOML syntax error at line")
    );

    let typed = config
        .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"soon\"")
        .replace(
            "[callers.reports]",
            "[callers.reports]\nrate_limit = \"fast\"",
        );
    std::fs::write(&file, typed).unwrap();
    let answer = reload(&app, Some(ADMIN_KEY)).await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    let problems: Vec<&str> = answer.body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("server.shutdown_grace")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("callers.reports.rate_limit")),
        "{problems:?}"
    );
    // The old configuration keeps serving.
    assert_eq!(app.get("/livez", None).await.status, 200);
}

#[tokio::test]
async fn a_changed_secret_file_is_picked_up_without_a_signal_and_a_bad_file_changes_nothing() {
    use std::time::Duration;
    use wiremock::matchers::{body_string_contains, method, path};
    use wiremock::{Mock, ResponseTemplate};

    let idp = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (secret_v1, secret_v2, secret) = (
        dir.path().join("v1"),
        dir.path().join("v2"),
        dir.path().join("secret"),
    );
    std::fs::write(&secret_v1, "the-first-secret").unwrap();
    std::fs::write(&secret_v2, "the-second-secret").unwrap();
    std::os::unix::fs::symlink(&secret_v1, &secret).unwrap();
    let file = dir.path().join("broker.toml");
    let config = base_config(&idp.uri()).replace(
        &format!("client_secret = \"{ACME_PRODUCTION_SECRET}\""),
        &format!("client_secret_file = \"{}\"", secret.display()),
    );
    std::fs::write(&file, &config).unwrap();
    let app = TestApp::init().with_idp(idp).with_file(&file).start().await;
    let accept_only = async |secret: &str| {
        app.idp.reset().await;
        Mock::given(method("POST"))
            .and(path("/acme/oauth/token"))
            .and(body_string_contains(secret))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "access_token": "accepted", "token_type": "Bearer", "expires_in": 3600,
            })))
            .mount(&app.idp)
            .await;
    };
    accept_only("the-first-secret").await;
    assert_eq!(app.billing("acme/production").await.status, 200);

    // The Secret is swapped under its mount, as Kubernetes does; no signal, no admin call.
    let swapped = dir.path().join("swapped");
    std::os::unix::fs::symlink(&secret_v2, &swapped).unwrap();
    std::fs::rename(&swapped, &secret).unwrap();
    let reloads = |outcome: &'static str| {
        let app = &app;
        async move {
            metric(
                &app.scrape().await,
                &format!(
                    r#"token_broker_config_reloads_total{{trigger="file",outcome="{outcome}"}}"#
                ),
            )
        }
    };
    // The watcher may not be asleep yet when the clock moves: move it on each look.
    eventually("the changed file is reloaded", async || {
        app.clock.advance(Duration::from_secs(10));
        reloads("applied").await == Some(1.0)
    })
    .await;
    accept_only("the-second-secret").await;
    let next = app.billing("acme/production?scope=new-key").await;
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(
        app.idp_requests().await.to("acme").len(),
        1,
        "no refused request"
    );

    // A configuration caught half-written changes nothing, and is refused once per change.
    std::fs::write(&file, &config[..config.len() / 2]).unwrap();
    eventually("the half-written file is refused", async || {
        app.clock.advance(Duration::from_secs(10));
        reloads("refused").await == Some(1.0)
    })
    .await;
    app.clock.advance(Duration::from_secs(10));
    let still = app.billing("acme/production").await;
    assert_eq!((still.status, still.header("x-cache")), (200, Some("hit")));
    assert_eq!(reloads("refused").await, Some(1.0));
    assert_eq!(reloads("applied").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_redis_password_file_reconnects_with_it_and_replicas_share_again() {
    const OLD: &str = "the-old-redis-password";
    const NEW: &str = "the-new-redis-password";
    let port = free_port();
    let client = redis::Client::open(format!("redis://:{OLD}@127.0.0.1:{port}")).unwrap();
    let port_arg = port.to_string();
    let redis =
        RedisServer::start_with(port, &["--port", &port_arg, "--requirepass", OLD], client).await;
    let mut admin = redis.connection().await;
    let idp = std::sync::Arc::new(MockServer::start().await);
    issue_tokens(&idp, "acme", TokenIssuer::new(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let (file, password) = (
        dir.path().join("broker.toml"),
        dir.path().join("redis-password"),
    );
    std::fs::write(&password, format!("{OLD}\n")).unwrap();
    let config = format!(
        "{}\n[shared_cache]\nurl = \"{}\"\nencryption_key_env = \"{CACHE_KEY_ENV}\"\npassword_file = \"{}\"\n",
        base_config(&idp.uri()),
        redis.url(),
        password.display()
    );
    std::fs::write(&file, config).unwrap();
    let fleet = TestApp::init()
        .with_idp(idp)
        .with_file(&file)
        .start_fleet(2)
        .await;
    for replica in &fleet {
        replica.wait_for_shared_cache(true).await;
        assert_eq!(replica.billing("acme/production").await.status, 200);
    }
    assert_eq!(
        fleet[0].idp_requests().await.len(),
        1,
        "shared through Redis"
    );

    // The password changes at Redis and its connections are cut: the level goes down, and
    // tokens are still served.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(NEW)
        .query_async(&mut admin)
        .await
        .unwrap();
    for kind in ["normal", "pubsub"] {
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg(kind)
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    for replica in &fleet {
        replica.wait_for_shared_cache(false).await;
        assert_eq!(replica.billing("acme/production").await.status, 200);
    }

    // The new password in the file: both replicas reload without a signal and reconnect.
    std::fs::write(&password, format!("{NEW}\n")).unwrap();
    fleet[0].clock.advance(std::time::Duration::from_secs(11));
    for replica in &fleet {
        replica.wait_for_shared_cache(true).await;
        let scraped = replica.scrape().await;
        assert_eq!(
            metric(
                &scraped,
                "token_broker_config_reloads_total{trigger=\"file\",outcome=\"applied\"}"
            ),
            Some(1.0),
            "{scraped}"
        );
    }
    for replica in &fleet {
        let answer = replica.billing("acme/production?scope=after").await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    assert_eq!(
        fleet[0].idp_requests().await.len(),
        2,
        "the new key is fetched once and shared again"
    );
    let report = reload(&fleet[0], Some(ADMIN_KEY)).await;
    assert_eq!(report.body["restart_required"], serde_json::json!([]));
}
