//! Helpers of the load benchmark (`bench/run.sh`, `bench/instructions.sh`): a fake IdP with a
//! fixed delay, the floor the broker is measured against (a bare axum handler: the same route,
//! a fixed body of the same size with the same headers, behind a constant-time comparison of the
//! bearer key with one fixed key), the former ceiling (the same with a SHA-256 of the key, as the
//! broker checked keys at `dff437e`), and a cold-fill client. The load itself comes from `wrk`.
//!
//! ```text
//! bench idp --listen 127.0.0.1:9100 --delay-ms 50 --lifetime 3600
//! bench bare --listen 127.0.0.1:9200 --key KEY
//! bench sha256-ceiling --listen 127.0.0.1:9201 --key-sha256 HEX
//! bench fill --url http://127.0.0.1:8080/v1/tokens/bench/production --key KEY --from 0 --to 10000
//! bench fill --url http://127.0.0.1:8080/v1/tokens/bench/production --callers 1000 --from 0 --to 1000
//! ```
//!
//! With `--callers N`, key `i` is fetched by caller `i % N + 1` (key `tbk_bench-caller-{i % N +
//! 1}`), the pairing `bench/wrk.lua` and `bench/count.lua` load, so that each caller is the first
//! its token was handed to, as when services fetch their own tokens.

#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark times real requests on the real clock"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt as _;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use token_broker::auth::KeyHash;

/// The same allocator as the broker binary, so the ceiling differs only in what it does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn required(name: &str) -> String {
    arg(name).unwrap_or_else(|| panic!("missing {name}"))
}

#[tokio::main]
async fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("idp") => idp().await,
        Some("bare") => bare().await,
        Some("sha256-ceiling") => ceiling().await,
        Some("fill") => fill().await,
        _ => eprintln!("usage: bench idp|bare|sha256-ceiling|fill [options] (see bench/run.sh)"),
    }
}

/// A JWT-sized random token (about 830 bytes, like an Auth0 RS256 M2M access token).
fn jwt_sized_token(lifetime: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT","kid":"bench"}"#);
    let mut filler = [0u8; 100];
    rand::rng().fill_bytes(&mut filler);
    let claims = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"iss":"https://bench.example/","sub":"bench@clients","aud":"urn:bench","iat":{now},"exp":{},"gty":"client-credentials","x":"{}"}}"#,
        now + lifetime,
        URL_SAFE_NO_PAD.encode(filler)
    ));
    let mut signature = [0u8; 256];
    rand::rng().fill_bytes(&mut signature);
    format!("{header}.{claims}.{}", URL_SAFE_NO_PAD.encode(signature))
}

struct Idp {
    delay: Duration,
    lifetime: u64,
    requests: AtomicU64,
}

async fn idp() {
    let state = Arc::new(Idp {
        delay: Duration::from_millis(arg("--delay-ms").map_or(50, |d| d.parse().unwrap())),
        lifetime: arg("--lifetime").map_or(3600, |l| l.parse().unwrap()),
        requests: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/oauth/token", post(issue))
        .route("/count", get(count))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(required("--listen"))
        .await
        .unwrap();
    axum::serve(listener, app).await.unwrap();
}

async fn issue(State(idp): State<Arc<Idp>>) -> Response {
    idp.requests.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(idp.delay).await;
    let body = format!(
        r#"{{"access_token":"{}","token_type":"Bearer","expires_in":{}}}"#,
        jwt_sized_token(idp.lifetime),
        idp.lifetime
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn count(State(idp): State<Arc<Idp>>) -> String {
    idp.requests.load(Ordering::Relaxed).to_string()
}

/// The body of a hit: a JWT-sized token in the broker's answer (843 bytes, as the broker's).
fn hit_body() -> axum::body::Bytes {
    axum::body::Bytes::from(format!(
        r#"{{"access_token":"{}","token_type":"Bearer","expires_in":3599,"expires_at":"2030-01-01T00:00:00Z"}}"#,
        jwt_sized_token(3600)
    ))
}

/// The floor: what any server that hands out a fixed token behind a bearer key must do. The
/// route of the broker's, the bearer key compared in constant time with one fixed key, and the
/// broker's answer to a hit: the same body size and the same headers (`content-type`,
/// `cache-control`, `x-cache`, an `x-request-id` of the same length).
async fn bare() {
    let key = required("--key").into_bytes();
    let body = hit_body();
    let app = Router::new().route(
        "/v1/tokens/{tenant}/{environment}",
        get(move |headers: HeaderMap| {
            let (key, body) = (key.clone(), body.clone());
            async move {
                let presented = headers
                    .get(header::AUTHORIZATION)
                    .map(|value| value.as_bytes())
                    .and_then(|value| value.strip_prefix(b"Bearer "));
                if !presented.is_some_and(|presented| bool::from(presented.ct_eq(&key))) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                (
                    StatusCode::OK,
                    [
                        (
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json; charset=utf-8"),
                        ),
                        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                        (
                            header::HeaderName::from_static("x-cache"),
                            HeaderValue::from_static("hit"),
                        ),
                        (
                            header::HeaderName::from_static("x-request-id"),
                            HeaderValue::from_static("e2a8e98e6ef84fc70000000000000001"),
                        ),
                    ],
                    body,
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(required("--listen"))
        .await
        .unwrap();
    axum::serve(listener, app).await.unwrap();
}

/// The former ceiling, measured beside the floor for one last round: a bare handler behind the
/// broker's key check as it was at `dff437e` (a SHA-256 of the presented key).
async fn ceiling() {
    // The bearer check of the broker at `dff437e`, kept as it was so that the ceiling stays one
    // reference: the presented key's SHA-256, compared in constant time with the configured one.
    let expected = KeyHash::from_hex(&required("--key-sha256")).expect("a SHA-256 in hex");
    let check = move |authorization: Option<&[u8]>| {
        let key = authorization
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim());
        key.is_some_and(|key| {
            let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            bool::from(presented.ct_eq(expected.as_bytes()))
        })
    };
    let body = hit_body();
    let app = Router::new().route(
        "/v1/tokens/{tenant}/{environment}",
        get(move |headers: HeaderMap| {
            let body = body.clone();
            async move {
                let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
                match check(authorization) {
                    true => (
                        StatusCode::OK,
                        [
                            (
                                header::CONTENT_TYPE,
                                HeaderValue::from_static("application/json"),
                            ),
                            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                        ],
                        body,
                    )
                        .into_response(),
                    false => StatusCode::UNAUTHORIZED.into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(required("--listen"))
        .await
        .unwrap();
    axum::serve(listener, app).await.unwrap();
}

async fn fill() {
    let url = required("--url");
    let callers: Option<u64> = arg("--callers").map(|n| n.parse().unwrap());
    assert_ne!(callers, Some(0), "--callers must be at least 1");
    let key = match callers {
        Some(_) => String::new(),
        None => required("--key"),
    };
    let from: u64 = required("--from").parse().unwrap();
    let to: u64 = required("--to").parse().unwrap();
    let concurrency: usize = arg("--concurrency").map_or(256, |c| c.parse().unwrap());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let started = Instant::now();
    let failures = futures::stream::iter(from..to)
        .map(|i| {
            let key = match callers {
                Some(callers) => format!("tbk_bench-caller-{}", i % callers + 1),
                None => key.clone(),
            };
            let request = http
                .get(format!("{url}?audience=urn:bench:{i}"))
                .bearer_auth(key);
            async move {
                match request.send().await {
                    Ok(response) if response.status().is_success() => {
                        response.bytes().await.is_err()
                    }
                    _ => true,
                }
            }
        })
        .buffer_unordered(concurrency)
        .filter(|failed| std::future::ready(*failed))
        .count()
        .await;
    println!(
        "FILL keys={} seconds={:.2} failures={failures}",
        to - from,
        started.elapsed().as_secs_f64()
    );
}
