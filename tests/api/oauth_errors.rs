//! Every way a facade request can fail is an RFC 6749 §5.2 error body (or a docs/api.md upstream
//! status), and none of the local ones reaches the IdP.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded";

/// A request to `/t/{tenant_environment}/oauth/token`.
struct Attempt<'a> {
    tenant_environment: &'a str,
    content_type: &'a str,
    basic: Option<String>,
    body: String,
}

impl<'a> Attempt<'a> {
    fn json(body: serde_json::Value) -> Self {
        Self {
            tenant_environment: "acme/production",
            content_type: JSON,
            basic: None,
            body: body.to_string(),
        }
    }

    fn form(body: &str) -> Self {
        Self {
            tenant_environment: "acme/production",
            content_type: FORM,
            basic: None,
            body: body.to_owned(),
        }
    }

    fn at(mut self, tenant_environment: &'a str) -> Self {
        self.tenant_environment = tenant_environment;
        self
    }

    fn basic(mut self, credentials: &str) -> Self {
        self.basic = Some(credentials.to_owned());
        self
    }

    async fn send(&self, app: &TestApp) -> Answer {
        let url = format!("{}/t/{}/oauth/token", app.url, self.tenant_environment);
        let mut request = app
            .http
            .post(url)
            .header("content-type", self.content_type)
            .body(self.body.clone());
        if let Some(credentials) = &self.basic {
            let value = format!("Basic {}", STANDARD.encode(credentials));
            request = request.header("authorization", value);
        }
        answer(request.send().await.expect("request")).await
    }
}

fn billing_form(rest: &str) -> String {
    format!("client_id=billing&client_secret={BILLING_KEY}&{rest}")
}

async fn assert_error(app: &TestApp, attempt: &Attempt<'_>, status: u16, error: &str) -> Answer {
    let answer = attempt.send(app).await;
    assert_eq!(
        (answer.status, answer.body["error"].as_str()),
        (status, Some(error)),
        "{} {}",
        attempt.body,
        answer.body
    );
    let description = answer.body["error_description"].as_str().unwrap();
    assert!(!description.is_empty());
    assert!(!answer.body.to_string().contains(BILLING_KEY));
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    answer
}

#[tokio::test]
async fn invalid_request() {
    let app = TestApp::init().start().await;
    let attempts = [
        Attempt::form(&billing_form("audience=x")),
        Attempt::form(&billing_form(
            "grant_type=client_credentials&scope=a&scope=b",
        )),
        Attempt::form(&billing_form(
            "grant_type=client_credentials&audience=https://a&resource=https://b",
        )),
        Attempt::form("grant_type=client_credentials&client_secret=x")
            .basic(&format!("billing:{BILLING_KEY}")),
        Attempt::form("grant_type=client_credentials&client_id=reports")
            .basic(&format!("billing:{BILLING_KEY}")),
        Attempt::json(json!({ "grant_type": "client_credentials", "client_secret": 12345 })),
        Attempt {
            content_type: "text/plain",
            ..Attempt::form(&billing_form("grant_type=client_credentials"))
        },
        Attempt::form(&billing_form("grant_type=client_credentials")).at("globex/production"),
    ];
    for attempt in &attempts {
        let answer = assert_error(&app, attempt, 400, "invalid_request").await;
        assert!(!answer.body.to_string().contains("12345"));
    }
    assert!(app.idp_requests().await.is_empty());
}

#[tokio::test]
async fn invalid_client_is_a_401_with_a_basic_challenge() {
    let app = TestApp::init().start().await;
    let attempts = [
        Attempt::form("grant_type=client_credentials"),
        Attempt::form("grant_type=client_credentials&client_id=billing&client_secret=tbk_wrong"),
        Attempt::form(&format!(
            "grant_type=client_credentials&client_id=reports&client_secret={BILLING_KEY}"
        )),
        Attempt::form("grant_type=client_credentials&client_id=billing"),
        Attempt::form("grant_type=client_credentials").basic("billing:tbk_wrong"),
        Attempt::form("grant_type=client_credentials").basic("no-colon"),
        Attempt::json(json!({
            "grant_type": "client_credentials", "client_id": "nobody", "client_secret": BILLING_KEY,
        })),
    ];
    for attempt in &attempts {
        let answer = assert_error(&app, attempt, 401, "invalid_client").await;
        assert_eq!(
            answer.header("www-authenticate"),
            Some(r#"Basic realm="token-broker""#)
        );
    }
    assert!(app.idp_requests().await.is_empty());
}

#[tokio::test]
async fn unauthorized_client_whether_or_not_the_tenant_exists() {
    let app = TestApp::init().start().await;
    let reports = |rest: &str| format!("client_id=reports&client_secret={REPORTS_KEY}&{rest}");
    let attempts = [
        Attempt::form(&reports("grant_type=client_credentials")).at("acme/staging"),
        Attempt::form(&reports("grant_type=client_credentials")).at("nosuch/production"),
        Attempt::form(&reports("grant_type=client_credentials&audience=urn:other")),
    ];
    for attempt in &attempts {
        let answer = assert_error(&app, attempt, 400, "unauthorized_client").await;
        let description = answer.body["error_description"].as_str().unwrap();
        assert!(
            description.starts_with("caller 'reports' may not use"),
            "{description}"
        );
    }
    assert!(app.idp_requests().await.is_empty());
}

#[tokio::test]
async fn unsupported_grant_type() {
    let app = TestApp::init().start().await;
    for grant in ["password", "authorization_code", "refresh_token"] {
        let attempt = Attempt::form(&billing_form(&format!("grant_type={grant}")));
        assert_error(&app, &attempt, 400, "unsupported_grant_type").await;
    }
    assert!(app.idp_requests().await.is_empty());
}

#[tokio::test]
async fn invalid_scope_when_malformed_or_refused_by_the_idp() {
    let app = TestApp::init().start().await;
    let malformed = Attempt::form(&billing_form("grant_type=client_credentials&scope=a%22b"));
    assert_error(&app, &malformed, 400, "invalid_scope").await;
    assert!(app.idp_requests().await.is_empty());

    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error": "invalid_scope", "error_description": "no such scope: admin",
        })))
        .mount(&app.idp)
        .await;
    let refused = Attempt::form(&billing_form("grant_type=client_credentials&scope=admin"));
    let answer = assert_error(&app, &refused, 400, "invalid_scope").await;
    assert!(!answer.body.to_string().contains("no such scope"));
    assert_eq!(app.idp_requests().await.len(), 1);
}

#[tokio::test]
async fn an_allowed_but_unconfigured_environment_is_a_404() {
    let app = TestApp::init().start().await;
    let attempt = Attempt::form(&billing_form("grant_type=client_credentials")).at("acme/qa");
    assert_error(&app, &attempt, 404, "not_found").await;
}

#[tokio::test]
async fn upstream_failures_keep_their_api_statuses() {
    let app = TestApp::init().start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({ "error": "access_denied" })))
        .up_to_n_times(1)
        .mount(&app.idp)
        .await;
    let attempt = Attempt::form(&billing_form("grant_type=client_credentials"));
    let answer = assert_error(&app, &attempt, 502, "upstream_rejected").await;
    assert!(
        answer.body["error_description"]
            .as_str()
            .unwrap()
            .contains("access_denied")
    );

    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&app.idp)
        .await;
    let staging = Attempt::form(&billing_form("grant_type=client_credentials")).at("acme/staging");
    let answer = assert_error(&app, &staging, 503, "upstream_unavailable").await;
    let retry_after: u64 = answer.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
}
