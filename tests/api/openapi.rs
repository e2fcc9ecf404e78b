//! `GET /openapi.json`: an OpenAPI 3 document that lists every route, and only real ones.

use serde_json::Value;

use crate::helpers::*;

/// Every route of docs/api.md, as (method, path). The OAuth2 facade
/// (`post /t/{tenant}/{environment}/oauth/token`) joins this list when its route is registered.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/tokens/{tenant}/{environment}"),
    ("delete", "/v1/tokens/{tenant}/{environment}"),
    ("get", "/livez"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/v1/admin/tenants"),
    ("get", "/v1/admin/cache"),
    ("post", "/v1/admin/reload"),
    (
        "post",
        "/v1/admin/tenants/{tenant}/environments/{environment}/rotate-secret",
    ),
    ("post", "/t/{tenant}/{environment}/oauth/token"),
    ("post", "/v1/users/{tenant}/{environment}/authorize"),
    ("post", "/v1/users/{tenant}/{environment}/sessions"),
    ("get", "/v1/users/handles/{handle}"),
    ("delete", "/v1/users/handles/{handle}"),
];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

async fn document(app: &TestApp) -> Value {
    let answer = app.get("/openapi.json", None).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    answer.body
}

#[tokio::test]
async fn the_document_is_openapi_3_and_lists_every_route_of_the_contract() {
    let app = TestApp::init().start().await;
    let document = document(&app).await;
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        document["openapi"]
    );
    assert_eq!(document["info"]["title"], "token-broker");
    for (method, path) in ROUTES {
        let operation = &document["paths"][path][method];
        assert!(
            operation.is_object(),
            "{method} {path} is not in the document"
        );
        assert!(operation["responses"].is_object(), "{method} {path}");
    }
    let listed: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| METHODS.iter().filter(|m| item.get(**m).is_some()).count())
        .sum();
    assert_eq!(
        listed,
        ROUTES.len(),
        "unexpected operations in the document"
    );

    let schemes = &document["components"]["securitySchemes"];
    for scheme in ["caller_key", "admin_key", "metrics_key"] {
        assert_eq!(schemes[scheme]["scheme"], "bearer", "{scheme}");
    }
    let get_token = &document["paths"]["/v1/tokens/{tenant}/{environment}"]["get"];
    assert_eq!(
        get_token["security"][0]["caller_key"],
        serde_json::json!([])
    );
    let parameters: Vec<&str> = get_token["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in ["tenant", "environment", "audience", "scope", "min_ttl"] {
        assert!(parameters.contains(&name), "{name} not in {parameters:?}");
    }
    for schema in ["TokenResponse", "ErrorBody", "TenantsReport", "CacheReport"] {
        assert!(
            document["components"]["schemas"][schema].is_object(),
            "no schema {schema}"
        );
    }
}

#[tokio::test]
async fn every_documented_operation_is_served() {
    let app = TestApp::init().start().await;
    let document = document(&app).await;
    for (path, item) in document["paths"].as_object().unwrap() {
        let url = format!(
            "{}{}",
            app.url,
            path.replace("{tenant}", "acme")
                .replace("{environment}", "production")
        );
        for method in METHODS.iter().filter(|m| item.get(**m).is_some()) {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let answer = answer(app.http.request(method.clone(), &url).send().await.unwrap()).await;
            assert!(
                answer.status != 404 && answer.status != 405,
                "{method} {path} is documented but answers {} {}",
                answer.status,
                answer.body
            );
        }
    }
}

#[tokio::test]
async fn the_documented_patterns_are_the_ones_the_server_applies() {
    use token_broker::api::token_request::{NAME_PATTERN, NON_BLANK_PATTERN, VALUE_PATTERN};

    let app = TestApp::init().start().await;
    let document = document(&app).await;
    let parameters = document["paths"]["/v1/tokens/{tenant}/{environment}"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .clone();
    let schema_of = |name: &str| {
        parameters
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no parameter {name}"))["schema"]
            .clone()
    };
    assert_eq!(schema_of("tenant")["pattern"], NAME_PATTERN);
    assert_eq!(schema_of("environment")["pattern"], NAME_PATTERN);
    assert_eq!(schema_of("audience")["pattern"], NON_BLANK_PATTERN);
    assert_eq!(schema_of("scope")["pattern"], VALUE_PATTERN);
    assert_eq!(schema_of("min_ttl")["maximum"], 31_536_000);

    // What the patterns refuse, the server refuses; what they allow, it serves.
    issue_tokens(&app.idp, "acme", TokenIssuer::new(3600)).await;
    for refused in [
        "audience=%20",
        "audience=a%07b",
        "min_ttl=31536001",
        "scope=a%0Ab",
    ] {
        let answer = app.billing(&format!("acme/production?{refused}")).await;
        assert_eq!(answer.status, 400, "{refused}: {}", answer.body);
    }
    for served in ["audience=%C3%A9%20x", "min_ttl=60", "scope=%E2%80%A8"] {
        let answer = app.billing(&format!("acme/production?{served}")).await;
        assert_eq!(answer.status, 200, "{served}: {}", answer.body);
    }
}
