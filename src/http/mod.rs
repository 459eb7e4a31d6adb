//! The HTTP API: routes, shared state, request metrics and JSON fallbacks.

mod download;
pub mod error;
mod events;
mod firmware;
mod fota;
mod ops;
pub mod range;

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::firmware::Repository;
use crate::fota::Engine;
use crate::metrics::Metrics;
use crate::name::FirmwareName;
use error::ApiError;

/// Largest JSON request body (PATCH and friends); uploads stream and have their own limit.
const JSON_BODY_LIMIT: usize = 64 << 10;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub repo: Arc<Repository>,
    pub metrics: Arc<Metrics>,
    /// Public base of device URIs per transport (`http`, `coap+tcp`, ...), no trailing slash.
    pub uri_bases: Arc<Vec<(&'static str, String)>>,
    pub engine: Arc<Engine>,
    /// Fires at shutdown; long-lived responses (event streams) end with it.
    pub cancel: tokio_util::sync::CancellationToken,
}

/// The router and the list of (method, path) it serves, kept in one place so the OpenAPI
/// document can be checked against it.
pub struct Routes {
    router: Router<AppState>,
    table: Vec<(Method, &'static str)>,
}

impl Routes {
    fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Routes
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("standard method");
        self.router = self.router.route(path, on(filter, handler));
        self.table.push((method, path));
        self
    }

    /// Every (method, path) pair served, with axum's `{param}` syntax.
    pub fn table(&self) -> &[(Method, &'static str)] {
        &self.table
    }
}

pub fn routes() -> Routes {
    use Method as M;
    Routes {
        router: Router::new(),
        table: Vec::new(),
    }
    .add(M::GET, "/healthz", ops::healthz)
    .add(M::GET, "/metrics", ops::metrics)
    .add(M::GET, "/v1/keys", ops::keys)
    .add(M::GET, "/v1/keys/{keyId}", ops::key)
    .add(M::GET, "/v1/firmware", firmware::list)
    .add(M::PUT, "/v1/firmware/{name}", firmware::upload)
    .add(M::GET, "/v1/firmware/{name}", firmware::resolve)
    .add(M::PATCH, "/v1/firmware/{name}", firmware::change)
    .add(M::DELETE, "/v1/firmware/{name}", firmware::delete)
    .add(M::GET, "/v1/firmware/{name}/signature", firmware::signature)
    .add(M::GET, "/v1/firmware/{name}/content", download::content)
    .add(M::HEAD, "/v1/firmware/{name}/content", download::content)
    .add(M::GET, "/fw/{name}", download::content)
    .add(M::HEAD, "/fw/{name}", download::content)
    .add(M::GET, "/p/{fotaId}", download::package)
    .add(M::HEAD, "/p/{fotaId}", download::package)
    .add(M::POST, "/v1/imports", fota::import)
    .add(M::POST, "/v1/devices/{deviceId}/fota", fota::schedule)
    .add(M::GET, "/v1/devices/{deviceId}/fota", fota::work)
    .add(
        M::POST,
        "/v1/devices/{deviceId}/methods/{method}",
        fota::method,
    )
    .add(M::GET, "/v1/fota", fota::list)
    .add(M::GET, "/v1/fota/{fotaId}", fota::status)
    .add(M::POST, "/v1/fota/{fotaId}/report", fota::report)
    .add(M::POST, "/v1/fota/{fotaId}/cancel", fota::cancel)
    .add(M::GET, "/v1/schedules", fota::schedules)
    .add(M::GET, "/v1/schedules/{name}", fota::get_schedule)
    .add(M::PUT, "/v1/schedules/{name}", fota::put_schedule)
    .add(M::DELETE, "/v1/schedules/{name}", fota::delete_schedule)
    .add(M::GET, "/v1/events", events::events)
}

/// The complete service with its middleware.
pub fn router(state: AppState) -> Router {
    let routes = routes();
    routes
        .router
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                crate::error::Kind::MethodNotAllowed,
                "method-not-allowed",
                "method not allowed on this resource",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(crate::error::Kind::Internal, "internal", "internal error")
                .into_response()
        }))
        .with_state(state)
}

async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // MatchedPath is an Arc<str> inside: cloning it does not copy the route.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let resp = next.run(req).await;
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    state.metrics.request(route, resp.status().as_u16());
    resp
}

pub(crate) fn parse_name(s: &str) -> Result<FirmwareName, ApiError> {
    FirmwareName::parse(s).map_err(|e| ApiError::bad_request(e.code(), e.to_string()))
}
