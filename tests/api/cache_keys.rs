//! What makes two requests share a token, and what does not.

use crate::helpers::*;

#[tokio::test]
async fn audience_scope_environment_and_tenant_each_get_their_own_token() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    issue_tokens(&app.idp, "acme-staging", TokenIssuer::new(3600)).await;
    issue_tokens(&app.idp, "globex", TokenIssuer::new(3600)).await;

    let base = app.billing("acme/production").await.token().to_owned();
    let other_audience = app.billing("acme/production?audience=urn:other").await;
    let other_scope = app.billing("acme/production?scope=read").await;
    let other_env = app.billing("acme/staging").await;
    let other_tenant = app.billing("globex/production?audience=urn:globex").await;

    let tokens = [
        base.as_str(),
        other_audience.token(),
        other_scope.token(),
        other_env.token(),
        other_tenant.token(),
    ];
    assert_eq!(app.idp_requests().await.to("acme").len(), 3);
    assert_eq!(app.idp_requests().await.to("acme-staging").len(), 1);
    assert_eq!(app.idp_requests().await.to("globex").len(), 1);
    assert_eq!(tokens[0], "token-1");
    assert_ne!(tokens[1], tokens[0]);
    assert_ne!(tokens[2], tokens[1]);

    // Asking again for each is a hit.
    assert_eq!(
        app.billing("acme/production?audience=urn:other")
            .await
            .token(),
        tokens[1]
    );
    assert_eq!(app.idp_requests().await.to("acme").len(), 3);
}

#[tokio::test]
async fn scope_order_and_duplicates_do_not_matter() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;

    let first = app.billing("acme/production?scope=b%20a%20a").await;
    let second = app.billing("acme/production?scope=a+b").await;
    assert_eq!(first.token(), second.token());
    assert_eq!(second.header("x-cache"), Some("hit"));
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
    let sent = app.idp_requests().await;
    let body: serde_json::Value = serde_json::from_slice(&sent.requests()[0].body).unwrap();
    assert_eq!(body["scope"], "a b");
}

#[tokio::test]
async fn explicit_default_audience_is_the_same_token_as_none() {
    let app = TestApp::init().start().await;
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    let implicit = app.billing("acme/production").await;
    let explicit = app
        .billing("acme/production?audience=https%3A%2F%2Fapi.acme.example")
        .await;
    assert_eq!(implicit.token(), explicit.token());
    assert_eq!(app.idp_requests().await.to("acme").len(), 1);
}
