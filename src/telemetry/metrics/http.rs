//! Request counters by route, method and status, ready per slot so that counting a request is
//! an index and an increment.

use std::sync::OnceLock;

use axum::http::{Method, StatusCode};
use foldhash::HashMap;
use metrics::{Counter, Key, Label, Recorder as _};

use super::{HTTP_REQUESTS, METADATA, Metrics};

/// Methods that get their own `method` label value; any other is `other`.
const METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// Statuses whose request counters are kept ready; others are registered when they occur.
const STATUSES: [u16; 17] = [
    200, 204, 400, 401, 403, 404, 405, 408, 413, 415, 422, 429, 431, 500, 502, 503, 504,
];

/// The `route` label of requests that matched no route.
const UNMATCHED: &str = "unmatched";

impl Metrics {
    /// Request counters for a router with these route templates.
    pub fn http<'a>(&self, routes: impl IntoIterator<Item = &'a str>) -> HttpMetrics {
        let mut names: Vec<Box<str>> = routes.into_iter().map(Box::from).collect();
        names.sort();
        names.dedup();
        names.push(Box::from(UNMATCHED));
        let routes = names
            .iter()
            .enumerate()
            .map(|(index, name)| (name.clone(), index))
            .collect();
        let slots = names.len() * (METHODS.len() + 1) * STATUSES.len();
        HttpMetrics {
            metrics: self.clone(),
            routes,
            names,
            counters: (0..slots).map(|_| OnceLock::new()).collect(),
        }
    }
}

/// Request counters of one router: a ready slot per (route, method, status) in the lists above.
pub struct HttpMetrics {
    metrics: Metrics,
    /// Route template → index; foldhash, as it is looked up on every request.
    routes: HashMap<Box<str>, usize>,
    names: Vec<Box<str>>,
    counters: Box<[OnceLock<Counter>]>,
}

/// Remembers which route a middleware instance counts. Axum gives each route its own instance,
/// whose requests all carry the same template (one shared string), so after the first request
/// the count needs no lookup by name: the string's address and length identify it.
#[derive(Default)]
pub struct RouteMemo(OnceLock<(usize, usize, usize)>);

impl HttpMetrics {
    /// Counts one answered request; `route` is the matched template, `None` when none matched,
    /// found through `memo` when it saw it before.
    pub fn record(
        &self,
        memo: &RouteMemo,
        route: Option<&str>,
        method: &Method,
        status: StatusCode,
    ) {
        let route = match route {
            None => self.names.len() - 1,
            Some(route) => {
                let identity = (route.as_ptr() as usize, route.len());
                match memo.0.get() {
                    Some(&(at, len, index)) if (at, len) == identity => index,
                    _ => {
                        let index = self
                            .routes
                            .get(route)
                            .copied()
                            .unwrap_or(self.names.len() - 1);
                        let _ = memo.0.set((identity.0, identity.1, index));
                        index
                    }
                }
            }
        };
        let method = METHODS
            .iter()
            .position(|known| known == method)
            .unwrap_or(METHODS.len());
        let Some(status_slot) = STATUSES.iter().position(|s| *s == status.as_u16()) else {
            self.register(route, method, status).increment(1);
            return;
        };
        let slot = (route * (METHODS.len() + 1) + method) * STATUSES.len() + status_slot;
        self.counters[slot]
            .get_or_init(|| self.register(route, method, status))
            .increment(1);
    }

    fn register(&self, route: usize, method: usize, status: StatusCode) -> Counter {
        let method = METHODS.get(method).map_or("other", Method::as_str);
        let labels = vec![
            Label::new("route", self.names[route].to_string()),
            Label::new("method", method.to_owned()),
            Label::new("status", status.as_str().to_owned()),
        ];
        self.metrics
            .inner
            .recorder
            .register_counter(&Key::from_parts(HTTP_REQUESTS, labels), &METADATA)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_route_is_counted_as_itself() {
        let http = Metrics::new().http(["/a/{x}", "/b/{y}"]);
        let memo = RouteMemo::default();
        let a = String::from("/a/{x}");
        for _ in 0..2 {
            http.record(&memo, Some(&a), &Method::GET, StatusCode::OK);
        }
        // Another string (another route) through the same memo is looked up, not taken for it.
        http.record(&memo, Some("/b/{y}"), &Method::GET, StatusCode::OK);
        let text = http.metrics.render();
        assert!(
            text.contains(r#"route="/a/{x}",method="GET",status="200"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"route="/b/{y}",method="GET",status="200"} 1"#),
            "{text}"
        );
    }
}
