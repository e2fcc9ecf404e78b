//! The service a listener serves: the router, with `GET /v1/tokens/{tenant}/{environment}`
//! recognised before it.
//!
//! Nearly every request a broker serves is that one, and nearly all are cache hits. Through the
//! router a hit paid for matching, for storing both path parameters in the request (two counted
//! strings in a new extension map), for decoding and copying them again into the handler's
//! arguments, and for a boxed service per layer: about a sixth of a hit's instructions
//! (docs/performance.md). Here the path is split in place, and the handler runs under the same
//! middleware as every route (request id, log context, counters, access line, panic safety,
//! timeout), with the same extractors in the same order. A path whose segments the router would
//! percent-decode, and every other method and route, go to the router.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, Response};
use axum::routing::future::RouteFuture;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::request_context::{RequestContext, RequestContextFuture, RequestContextLayer};
use super::request_timeout::{RequestTimeout, RequestTimeoutFuture, RequestTimeoutLayer};
use crate::api::tokens::{self, TOKENS_ROUTE};
use crate::app::AppState;
use crate::telemetry::metrics::HttpMetrics;

/// The handler of `GET /v1/tokens/{tenant}/{environment}` ([`tokens::get_token_unrouted`]),
/// named by a type parameter so that its future is held inline: hyper keeps a connection's
/// request future in one allocation for the connection's life, where a boxed future would be a
/// new allocation, and a 1.7 KB copy into cold memory, on every hit.
pub trait TokenHandler: Clone + Send + Sync + 'static {
    /// The handler's answer.
    type Future: Future<Output = Response<Body>> + Send + 'static;

    /// Answers `request`.
    fn answer(&self, state: AppState, request: Request) -> Self::Future;
}

impl<H, F> TokenHandler for H
where
    H: Fn(AppState, Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    type Future = F;

    fn answer(&self, state: AppState, request: Request) -> F {
        self(state, request)
    }
}

/// The token handler of every listener.
pub fn token_handler() -> impl TokenHandler {
    tokens::get_token_unrouted
}

/// The routes of one listener: `GET /v1/tokens/{tenant}/{environment}` first, when the listener
/// serves callers, then the router.
#[derive(Clone)]
pub struct Routes<H> {
    router: Router,
    tokens: Option<RequestContext<RequestTimeout<GetToken<H>>>>,
}

impl<H: TokenHandler> Routes<H> {
    /// `router` alone, for a listener without the callers' routes.
    pub fn router_only(router: Router) -> Self {
        Self {
            router,
            tokens: None,
        }
    }

    /// `router`, with token requests answered by `handler` before it, under the same
    /// middleware: counted in `metrics` and bounded by `timeout`, as `router`'s routes are.
    pub fn with_tokens(
        router: Router,
        state: AppState,
        handler: H,
        metrics: Arc<HttpMetrics>,
        timeout: std::time::Duration,
    ) -> Self {
        let tokens = RequestContextLayer::for_route(metrics, TOKENS_ROUTE)
            .layer(RequestTimeoutLayer::new(timeout).layer(GetToken { state, handler }));
        Self {
            router,
            tokens: Some(tokens),
        }
    }
}

impl<H, B> Service<axum::http::Request<B>> for Routes<H>
where
    H: TokenHandler,
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RoutesFuture<H::Future>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The router is always ready, and so is the token stack: neither holds back requests.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        match &mut self.tokens {
            Some(tokens)
                if request.method() == Method::GET
                    && tokens::plain_token_path(request.uri().path()).is_some() =>
            {
                // The handler reads no body (through the router, its extractors drop it before
                // it runs), so the body is dropped here rather than boxed.
                RoutesFuture::Token {
                    inner: tokens.call(request.map(|_| Body::empty())),
                }
            }
            _ => RoutesFuture::Router {
                inner: self.router.call(request.map(Body::new)),
            },
        }
    }
}

pin_project! {
    /// The answer of [`Routes`]: the token route's or the router's.
    #[project = RoutesProjection]
    pub enum RoutesFuture<F> {
        /// `GET /v1/tokens/{tenant}/{environment}`.
        Token {
            #[pin]
            inner: RequestContextFuture<RequestTimeoutFuture<GetTokenFuture<F>>>,
        },
        /// Any other request.
        Router {
            #[pin]
            inner: RouteFuture<Infallible>,
        },
    }
}

impl<F: Future<Output = Response<Body>>> Future for RoutesFuture<F> {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RoutesProjection::Token { inner } => inner.poll(cx),
            RoutesProjection::Router { inner } => inner.poll(cx),
        }
    }
}

/// The handler of `GET /v1/tokens/{tenant}/{environment}` as a service.
#[derive(Clone)]
pub struct GetToken<H> {
    state: AppState,
    handler: H,
}

impl<H: TokenHandler> Service<Request> for GetToken<H> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = GetTokenFuture<H::Future>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        GetTokenFuture {
            inner: self.handler.answer(self.state.clone(), request),
        }
    }
}

pin_project! {
    /// The handler's answer, as a service's.
    pub struct GetTokenFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future<Output = Response<Body>>> Future for GetTokenFuture<F> {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(ready!(self.project().inner.poll(cx))))
    }
}
