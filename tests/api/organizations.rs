//! Auth0 Organizations: `organization` is part of the cache key and sent to the IdP, callers may
//! only name the organizations their configuration lists, and only organization ids are accepted.

use serde_json::Value;

use crate::helpers::*;

/// billing may name org_abc anywhere it may go and org_def in acme only; reports names none.
const ORGANIZATIONS: &str = r#"
[callers.billing]
organizations = ["org_abc", "acme/org_def"]
"#;

/// The `organization` field of each token request the IdP received, in order.
async fn organizations_sent(app: &TestApp) -> Vec<Option<String>> {
    app.idp_requests()
        .await
        .requests()
        .iter()
        .map(|request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            body.get("organization")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn one_organization_shares_a_token_and_two_make_two_idp_requests() {
    let app = TestApp::init().with_config(ORGANIZATIONS).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    let first = app.billing("acme/production?organization=org_abc").await;
    let again = app.billing("acme/production?organization=org_abc").await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(again.token(), first.token());
    assert_eq!(again.header("x-cache"), Some("hit"));

    let other = app.billing("acme/production?organization=org_def").await;
    let tenant_wide = app.billing("acme/production").await;
    assert_ne!(other.token(), first.token());
    assert_ne!(tenant_wide.token(), first.token());
    assert_ne!(tenant_wide.token(), other.token());

    assert_eq!(app.idp_requests().await.to("acme").len(), 3);
    assert_eq!(
        organizations_sent(&app).await,
        [Some("org_abc".to_owned()), Some("org_def".to_owned()), None]
    );
}

#[tokio::test]
async fn an_organization_the_caller_may_not_name_is_403_without_an_idp_request() {
    let app = TestApp::init().with_config(ORGANIZATIONS).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    issue_tokens(&app.idp, "globex", TokenIssuer::new(3600)).await;

    for (path, key) in [
        // Not listed for billing.
        ("acme/production?organization=org_xyz", BILLING_KEY),
        // Listed for acme only.
        (
            "globex/production?audience=urn:globex&organization=org_def",
            BILLING_KEY,
        ),
        // reports lists no organization at all.
        ("acme/production?organization=org_abc", REPORTS_KEY),
    ] {
        let answer = app.get_token(path, Some(key)).await;
        assert_eq!(answer.status, 403, "{path}: {}", answer.body);
        assert_eq!(answer.body["error"], "forbidden");
        assert!(
            answer.body["error_description"]
                .as_str()
                .unwrap()
                .contains("organizations"),
            "{}",
            answer.body
        );
    }
    assert_eq!(app.idp_requests().await.to("acme").len(), 0);
    assert!(organizations_sent(&app).await.is_empty());
}

#[tokio::test]
async fn only_organization_ids_are_accepted() {
    let app = TestApp::init()
        .with_config(
            r#"[callers.billing]
organizations = ["*"]"#,
        )
        .start()
        .await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let long = format!("org_{}", "a".repeat(61));
    for bad in [
        "ORG_abc",
        "org_",
        "org_ab-c",
        "org_ab%20c",
        "abc",
        "org_abc%C3%A9",
        long.as_str(),
    ] {
        let answer = app
            .billing(&format!("acme/production?organization={bad}"))
            .await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
        assert_eq!(answer.body["error"], "invalid_request");
    }
    let twice = app
        .billing("acme/production?organization=org_a&organization=org_b")
        .await;
    assert_eq!(twice.status, 400);
    assert_eq!(app.idp_requests().await.to("acme").len(), 0);
    // Case matters: org_ABC and org_abc are two organizations.
    let upper = app.billing("acme/production?organization=org_ABC").await;
    let lower = app.billing("acme/production?organization=org_abc").await;
    assert_ne!(upper.token(), lower.token());
}

#[tokio::test]
async fn delete_forgets_the_organization_token_only() {
    let app = TestApp::init().with_config(ORGANIZATIONS).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let organization = app.billing("acme/production?organization=org_abc").await;
    let tenant_wide = app.billing("acme/production").await;
    let forgot = app
        .forget("acme/production?organization=org_abc", None)
        .await;
    assert_eq!(forgot.status, 204);
    assert_eq!(
        app.billing("acme/production").await.token(),
        tenant_wide.token()
    );
    let renewed = app.billing("acme/production?organization=org_abc").await;
    assert_ne!(renewed.token(), organization.token());
    assert_eq!(app.idp_requests().await.to("acme").len(), 3);
}

#[tokio::test]
async fn the_facade_takes_organization_in_the_body() {
    let app = TestApp::init().with_config(ORGANIZATIONS).start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let post = |organization: &str| {
        app.http
            .post(format!("{}/t/acme/production/oauth/token", app.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type=client_credentials&client_id=billing&client_secret={BILLING_KEY}&organization={organization}"
            ))
            .send()
    };
    let allowed = answer(post("org_abc").await.unwrap()).await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    let refused = answer(post("org_xyz").await.unwrap()).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.body["error"], "unauthorized_client");
    let malformed = answer(post("org-abc").await.unwrap()).await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.body["error"], "invalid_request");
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
    assert_eq!(organizations_sent(&app).await, [Some("org_abc".to_owned())]);
}

#[tokio::test]
async fn organization_is_not_an_extra_param_and_rules_are_checked() {
    let idp = wiremock::MockServer::start().await;
    let base = base_config(&idp.uri());
    let layers = [
        base.as_str(),
        "[tenants.acme.environments.production]\nextra_params = { organization = \"org_abc\" }\n[callers.billing]\norganizations = [\"acme/org-x\", \"Acme/org_a\", \"org_b\"]\n",
    ];
    let Err(token_broker::config::ConfigError::Invalid(problems)) =
        token_broker::config::Settings::from_toml_layers(&layers, &|_| None)
    else {
        panic!("expected problems");
    };
    let problems = problems.join("\n");
    assert!(problems.contains("extra_params.organization"), "{problems}");
    assert!(
        problems.contains("callers.billing.organizations[0]"),
        "{problems}"
    );
    assert!(
        problems.contains("callers.billing.organizations[1]"),
        "{problems}"
    );
    assert!(!problems.contains("organizations[2]"), "{problems}");
}
