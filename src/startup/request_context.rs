//! The outermost per-route middleware: a request id, the request's log context, panic safety,
//! the id on the answer, the request counter and the access-log line.
//!
//! It is a hand-written tower [`Layer`] rather than `axum::middleware::from_fn`, which clones and
//! boxes the inner service on every request; [`RequestContext`] calls the inner service directly
//! and finishes in its own future, without boxing. Made request ids are a per-process random
//! prefix and a counter, 32 hex digits, so making one costs an atomic increment. The request's
//! context is a task-local [`RequestLog`], not a span: it is read only by lines that are written.
//! A handler that panics is answered the documented 500 from inside that context (so its body
//! carries the request id); catching it here rather than in a layer of its own saves a layer's
//! future and a move of the request on every hit.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Response};
use axum::response::IntoResponse as _;
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Level;

use crate::api::ApiError;
use crate::api::error::X_REQUEST_ID;
use crate::telemetry::ACCESS;
use crate::telemetry::metrics::{HttpMetrics, RouteMemo};
use crate::telemetry::request::{self, RequestLog, Route};

/// Longest caller-supplied `x-request-id` that is kept; longer or odd ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The random half of made request ids, chosen once per process, as 16 hex digits.
static ID_PREFIX: LazyLock<[u8; 16]> = LazyLock::new(|| {
    let mut digits = [0u8; 16];
    // 8 bytes are 16 hex digits.
    let _ = hex::encode_to_slice(rand::random::<u64>().to_be_bytes(), &mut digits);
    digits
});
/// The counting half of made request ids.
static ID_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Wraps each route in [`RequestContext`].
#[derive(Clone)]
pub struct RequestContextLayer {
    metrics: Arc<HttpMetrics>,
    /// The route of every request, for a service recognised before the router.
    fixed_route: Option<&'static str>,
}

impl RequestContextLayer {
    /// Counts requests in `metrics`, by the route the router matched.
    pub fn new(metrics: Arc<HttpMetrics>) -> Self {
        Self {
            metrics,
            fixed_route: None,
        }
    }

    /// Counts requests in `metrics` as requests of `route`, for a service that serves one route
    /// and sits before the router.
    pub fn for_route(metrics: Arc<HttpMetrics>, route: &'static str) -> Self {
        Self {
            metrics,
            fixed_route: Some(route),
        }
    }
}

impl<S> Layer<S> for RequestContextLayer {
    type Service = RequestContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestContext {
            inner,
            metrics: Arc::clone(&self.metrics),
            fixed_route: self.fixed_route,
            route: Arc::default(),
        }
    }
}

/// Gives each request an id (the caller's own when it is sane), a log context, and the id on the answer;
/// counts it by route, method and status, and logs it once on the `access` target.
#[derive(Clone)]
pub struct RequestContext<S> {
    inner: S,
    metrics: Arc<HttpMetrics>,
    /// The route of every request, when not the router's.
    fixed_route: Option<&'static str>,
    /// The route this instance serves, once counted.
    route: Arc<RouteMemo>,
}

impl<S> Service<Request> for RequestContext<S>
where
    S: Service<Request, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RequestContextFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The clock is read only when the access line will be written.
        let started = tracing::enabled!(target: ACCESS, Level::DEBUG).then(Instant::now);
        let id = match request.headers().get(&X_REQUEST_ID).filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_LEN
                && v.as_bytes().iter().all(u8::is_ascii_graphic)
        }) {
            Some(id) => id.clone(),
            None => new_request_id(),
        };
        let route = match self.fixed_route {
            Some(route) => Some(Route::Fixed(route)),
            None => request
                .extensions()
                .get::<MatchedPath>()
                .cloned()
                .map(Route::Matched),
        };
        let method = request.method().clone();
        // Axum's services and the layers below do no work in `call`, only in the future, which
        // runs in the request's context.
        RequestContextFuture {
            inner: request::scope(
                RequestLog::new(id, method, route),
                Unwinding {
                    inner: self.inner.call(request),
                },
            ),
            finish: Some(Finish {
                started,
                metrics: Arc::clone(&self.metrics),
                route: Arc::clone(&self.route),
            }),
        }
    }
}

/// A made request id: the process prefix and the next count, as 32 hex digits.
fn new_request_id() -> HeaderValue {
    let count = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut digits = [0u8; 32];
    digits[..16].copy_from_slice(&*ID_PREFIX);
    hex::encode_to_slice(count.to_be_bytes(), &mut digits[16..]).expect("16 digits");
    HeaderValue::from_bytes(&digits).expect("hex digits are a valid header value")
}

/// What is left to do once the inner service has answered.
struct Finish {
    started: Option<Instant>,
    metrics: Arc<HttpMetrics>,
    route: Arc<RouteMemo>,
}

pin_project! {
    /// The answer of [`RequestContext`]: the inner answer inside the request's context, then
    /// the id header, the count and the access line.
    pub struct RequestContextFuture<F> {
        #[pin]
        inner: TaskLocalFuture<RequestLog, Unwinding<F>>,
        finish: Option<Finish>,
    }
}

pin_project! {
    /// The inner answer, or the documented 500 when the handler panics.
    pub struct Unwinding<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Future for Unwinding<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        // A panicked future is answered at once and never polled again, so what the panic left
        // half-done in it is not observed.
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                tracing::error!("a request handler panicked");
                Poll::Ready(Ok(ApiError::Internal.into_response()))
            }
        }
    }
}

impl<F> Future for RequestContextFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Ok(mut response) = ready!(this.inner.as_mut().poll(cx));
        let finish = this
            .finish
            .take()
            .expect("a request context future is not polled after it completed");
        let log = this
            .inner
            .take_value()
            .expect("the context is taken once, when the answer is ready");
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), log.id_header().clone());
        let status = response.status();
        finish
            .metrics
            .record(&finish.route, log.route(), log.method(), status);
        if let Some(started) = finish.started {
            request::sync_scope(log, || {
                tracing::debug!(
                    target: ACCESS,
                    status = status.as_u16(),
                    // Whole microseconds, so the line shows `0.412` rather than binary float
                    // noise.
                    took_ms = started.elapsed().as_micros() as f64 / 1000.0,
                    "request served"
                );
            });
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;

    #[tokio::test]
    async fn a_handler_that_panics_is_answered_the_documented_500_with_its_request_id() {
        let handler = tower::service_fn(|_: Request| async {
            if true {
                panic!("handler bug");
            }
            Ok::<Response<Body>, Infallible>(Response::new(Body::empty()))
        });
        let metrics = Arc::new(Metrics::new().http(["/"]));
        let mut service = RequestContextLayer::new(metrics).layer(handler);
        let request = Request::builder()
            .header("x-request-id", "req-42")
            .body(Body::empty())
            .unwrap();
        let Ok(response) = service.call(request).await;
        assert_eq!(response.status(), 500);
        assert_eq!(response.headers()[&X_REQUEST_ID], "req-42");
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "internal_error");
        assert_eq!(body["request_id"], "req-42");
    }

    #[test]
    fn made_ids_are_32_hex_digits_and_distinct() {
        let one = new_request_id();
        let other = new_request_id();
        let (one, other) = (one.to_str().unwrap(), other.to_str().unwrap());
        assert_eq!(one.len(), 32);
        assert!(one.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(one, other);
        assert_eq!(one[..16], other[..16]);
    }
}
