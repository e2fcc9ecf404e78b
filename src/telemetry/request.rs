//! The request a log line belongs to, at no cost to requests that log nothing.
//!
//! A `tracing` span per request would have its fields formatted into a string on every request,
//! logged or not: on a cache hit that was a third of the work. Instead each request runs inside a
//! task-local [`RequestLog`] (an id, the method, the matched route and, once authenticated, the
//! caller), and the log formatters of [`super::format`] read it when, and only when, a line is
//! written. Lines keep the shape a span gave them: `request{method=… route=… request_id=…
//! caller=…}:` in text, a `span` object in JSON.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use axum::extract::MatchedPath;
use axum::http::{HeaderValue, Method};
use tokio::task::futures::TaskLocalFuture;

tokio::task_local! {
    static CURRENT: RequestLog;
}

/// The route template a request matched.
#[derive(Clone)]
pub enum Route {
    /// Matched by the router.
    Matched(MatchedPath),
    /// Recognised before the router (`GET /v1/tokens/{tenant}/{environment}`, see
    /// `startup::routes`).
    Fixed(&'static str),
}

impl Route {
    /// The template, such as `/v1/tokens/{tenant}/{environment}`.
    pub fn as_str(&self) -> &str {
        match self {
            Route::Matched(route) => route.as_str(),
            Route::Fixed(route) => route,
        }
    }
}

/// Who made a request, as its log lines name it. The request keeps the caller itself and reads
/// the name only when a line is written, so that naming the caller costs a hit no more than a
/// reference count.
pub trait CallerName: Send + Sync {
    /// The name log lines give the caller.
    fn caller_name(&self) -> &str;
}

/// What a log line says about the request it was written in.
pub struct RequestLog {
    id: HeaderValue,
    method: Method,
    route: Option<Route>,
    caller: OnceLock<Arc<dyn CallerName>>,
}

impl RequestLog {
    /// A request with this id (a valid header value of visible ASCII), method and matched route.
    pub fn new(id: HeaderValue, method: Method, route: Option<Route>) -> Self {
        Self {
            id,
            method,
            route,
            caller: OnceLock::new(),
        }
    }

    /// The request id as sent on the answer's `x-request-id`.
    pub fn id_header(&self) -> &HeaderValue {
        &self.id
    }

    /// The request id (empty if it were not text, which the constructor's caller rules out).
    pub fn id(&self) -> &str {
        self.id.to_str().unwrap_or_default()
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The matched route template, never the raw path.
    pub fn route(&self) -> Option<&str> {
        self.route.as_ref().map(Route::as_str)
    }

    /// The authenticated caller's name, once known.
    pub fn caller(&self) -> Option<&str> {
        self.caller.get().map(|caller| caller.caller_name())
    }
}

/// Runs `future` with `log` as its request.
pub fn scope<F: Future>(log: RequestLog, future: F) -> TaskLocalFuture<RequestLog, F> {
    CURRENT.scope(log, future)
}

/// Runs `f` with `log` as its request.
pub fn sync_scope<R>(log: RequestLog, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(log, f)
}

/// Calls `f` with the current request, when there is one.
pub fn with_current<R>(f: impl FnOnce(&RequestLog) -> R) -> Option<R> {
    CURRENT.try_with(f).ok()
}

/// Names the caller of the current request (the first caller given sticks).
pub fn set_caller(caller: Arc<dyn CallerName>) {
    let _ = CURRENT.try_with(|log| log.caller.set(caller));
}

/// The current request's id, or an empty string outside a request.
pub fn current_id() -> Arc<str> {
    with_current(|log| Arc::from(log.id())).unwrap_or_else(|| Arc::from(""))
}
