//! The HTTP service as each connection calls it: the router, and beside it one direct way
//! in for the request devices send most, `GET`/`HEAD /fw/{name}`.
//!
//! Through the router, a 4 KiB ranged read spent about a fifth of its user time in axum's
//! dispatch: route matching, URL parameters and the matched path put in the request's
//! extensions, a boxed clone of each route's service and a boxed future per layer. The
//! direct way answers exactly as the router would: the same envelope ([`super::answer`]:
//! access rules, panic guard, JSON errors, metrics, log) under the same route name, and the
//! same handler ([`download::content_named`]). Only the dispatch differs, and only for names
//! that need no percent-decoding; every other request goes through the router.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::future::Either;
use futures_util::FutureExt;
use tower::ServiceExt;

use super::serve::ListenerScheme;
use super::{access, answer, download, AppState};

/// The route the direct way serves, as the routes table names it (rules and metrics use it).
pub(super) const DOWNLOAD_ROUTE: &str = "/fw/{name}";

/// The complete HTTP service; cheap to clone.
#[derive(Clone)]
pub struct App(Arc<Inner>);

struct Inner {
    router: Router,
    state: AppState,
    rules: Arc<access::Rules>,
}

impl App {
    pub(super) fn new(router: Router, state: AppState, rules: Arc<access::Rules>) -> App {
        App(Arc::new(Inner {
            router,
            state,
            rules,
        }))
    }

    /// The answer to `req`, which came in on a `scheme` listener.
    pub fn handle(
        &self,
        mut req: Request,
        scheme: &'static str,
    ) -> impl std::future::Future<Output = Response> + Send + 'static {
        if direct_download(&req) {
            let app = self.clone();
            // Boxed: the answer's future holds the handler's whole state, several times the
            // size of a pointer, and hyper moves what it is given.
            return Either::Left(Box::pin(async move {
                let Inner { state, rules, .. } = &*app.0;
                // A Uri clone shares its bytes: the name borrows from it, not from `req`.
                let uri = req.uri().clone();
                let name = &uri.path()["/fw/".len()..];
                answer(state, rules, Some(DOWNLOAD_ROUTE), req, |req| async move {
                    download::content_named(state, name, req.method(), req.headers())
                        .await
                        .into_response()
                })
                .await
            }));
        }
        req.extensions_mut().insert(ListenerScheme(scheme));
        // The router's error type is Infallible.
        Either::Right(
            self.0
                .router
                .clone()
                .oneshot(req)
                .map(|r| r.unwrap_or_else(|never| match never {})),
        )
    }
}

/// Whether `req` is a `GET` or `HEAD` of `/fw/{name}` with a name that needs no decoding.
fn direct_download(req: &Request) -> bool {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return false;
    }
    req.uri()
        .path()
        .strip_prefix("/fw/")
        .is_some_and(|name| !name.is_empty() && !name.contains(['/', '%']))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, uri: &str) -> Request {
        let mut r = Request::new(axum::body::Body::empty());
        *r.method_mut() = method;
        *r.uri_mut() = uri.parse().unwrap();
        r
    }

    #[test]
    fn only_plain_downloads_take_the_direct_way() {
        assert!(direct_download(&req(Method::GET, "/fw/acme.com-7f3a9c")));
        assert!(direct_download(&req(Method::HEAD, "/fw/a")));
        assert!(direct_download(&req(Method::GET, "/fw/a?x=1")));
        for (m, uri) in [
            (Method::POST, "/fw/a"),
            (Method::PUT, "/fw/a"),
            (Method::GET, "/fw/"),
            (Method::GET, "/fw/a/b"),
            (Method::GET, "/fw/a%2Eb"),
            (Method::GET, "/fwx/a"),
            (Method::GET, "/v1/firmware/a/content"),
        ] {
            assert!(!direct_download(&req(m.clone(), uri)), "{m} {uri}");
        }
    }
}
