//! `server.request_timeout`: a request that takes longer is answered 503 with the documented
//! error body and `Retry-After`, in the shape of its API (`/v1` or the OAuth2 facade).
//!
//! tower-http's `TimeoutLayer` answers with an empty body, which callers cannot tell from a
//! broken proxy. Dropping the handler's future cancels nothing others wait on: an IdP request it
//! waited for belongs to the broker, goes on, and its token is cached.
//!
//! The timer starts when the handler first has to wait: a cache hit answers in its first poll
//! and so never reads the clock nor makes a timer (what it ran before that first wait is
//! microseconds of CPU, which the timeout does not need to count).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::Response;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::api;

/// Bounds each request by `server.request_timeout`.
#[derive(Clone, Copy)]
pub struct RequestTimeoutLayer {
    timeout: Duration,
}

impl RequestTimeoutLayer {
    /// Requests longer than `timeout` are answered 503.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// See [`RequestTimeoutLayer`].
#[derive(Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Service<Request> for RequestTimeout<S>
where
    S: Service<Request, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RequestTimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let facade = request
            .extensions()
            .get::<MatchedPath>()
            .is_some_and(|route| api::is_oauth_facade(route.as_str()));
        RequestTimeoutFuture {
            inner: self.inner.call(request),
            sleep: None,
            timeout: self.timeout,
            facade,
        }
    }
}

pin_project! {
    /// The inner answer, or the timeout's.
    pub struct RequestTimeoutFuture<F> {
        #[pin]
        inner: F,
        sleep: Option<Pin<Box<Sleep>>>,
        timeout: Duration,
        facade: bool,
    }
}

impl<F> Future for RequestTimeoutFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(answer) = this.inner.poll(cx) {
            return Poll::Ready(answer);
        }
        let timeout = *this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Ok(api::timed_out(*this.facade, timeout))),
            Poll::Pending => Poll::Pending,
        }
    }
}
