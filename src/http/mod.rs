//! The HTTP API: routes, shared state, request metrics and JSON fallbacks.

pub mod access;
mod app;
pub use app::App;
mod campaigns;
mod console;
mod ddi;
mod devices;
mod download;
pub mod error;
mod events;
mod extract;
mod firmware;
mod fota;
mod ops;
mod page;
pub mod range;
pub mod serve;
pub mod threads;
pub mod tls;
mod tokens;
mod uploads;

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;

use crate::auth::{Role, Rule};
use crate::firmware::Repository;
use crate::fota::Engine;
use crate::metrics::Metrics;
use crate::name::FirmwareName;
use error::ApiError;

/// Largest JSON request body (PATCH and friends); uploads stream and have their own limit.
const JSON_BODY_LIMIT: usize = 64 << 10;

/// What every handler shares, behind one reference count: each request clones the state
/// for every middleware and extractor that takes it, so a clone must cost one atomic
/// increment rather than one per service (and a lock for the cancellation token's).
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> AppState {
        AppState(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The services behind [`AppState`].
pub struct Services {
    pub repo: Arc<Repository>,
    pub metrics: Arc<Metrics>,
    /// Public base of device URIs per transport (`http`, `coap+tcp`, ...), no trailing slash.
    pub uri_bases: Arc<Vec<(&'static str, String)>>,
    pub engine: Arc<Engine>,
    pub fleet: Arc<crate::fleet::Fleet>,
    /// Fires at shutdown; long-lived responses (event streams) end with it.
    pub cancel: tokio_util::sync::CancellationToken,
    pub access: Arc<access::Access>,
    /// Resumable uploads in progress.
    pub uploads: Arc<crate::uploads::Uploads>,
}

/// The router and the list of (method, path) it serves, kept in one place so the OpenAPI
/// document can be checked against it.
pub struct Routes {
    router: Router<AppState>,
    table: Vec<(Method, &'static str, Rule)>,
}

impl Routes {
    /// Serves `handler` at `method path` under `rule`: no route without an access rule.
    fn add<H, T>(mut self, method: Method, path: &'static str, rule: Rule, handler: H) -> Routes
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("standard method");
        self.router = self.router.route(path, on(filter, handler));
        self.table.push((method, path, rule));
        self
    }

    /// Every (method, path, rule) served, with axum's `{param}` syntax.
    pub fn table(&self) -> &[(Method, &'static str, Rule)] {
        &self.table
    }
}

pub fn routes() -> Routes {
    use Method as M;
    use Role::{Admin, Operator, Publisher, Reader};
    use Rule::{Device, DeviceByName, Public};
    let role = Rule::Role;
    Routes {
        router: Router::new(),
        table: Vec::new(),
    }
    .add(M::GET, "/healthz", Public, ops::healthz)
    // The web console: its files are public, what it shows comes through the API below.
    .add(M::GET, "/ui", Public, console::root)
    .add(M::GET, "/ui/", Public, console::index)
    .add(M::GET, "/ui/{asset}", Public, console::file_named)
    .add(M::GET, "/ui/session", Public, console::whoami)
    .add(M::POST, "/ui/session", Public, console::sign_in)
    .add(M::DELETE, "/ui/session", Public, console::sign_out)
    .add(M::GET, "/metrics", role(Reader), ops::metrics)
    .add(M::GET, "/v1/keys", role(Reader), ops::keys)
    .add(M::GET, "/v1/keys/{keyId}", role(Reader), ops::key)
    .add(M::GET, "/v1/tokens", role(Admin), tokens::list)
    .add(M::POST, "/v1/tokens", role(Admin), tokens::create)
    .add(M::DELETE, "/v1/tokens/{token}", role(Admin), tokens::revoke)
    .add(M::GET, "/v1/firmware", role(Reader), firmware::list)
    .add(
        M::PUT,
        "/v1/firmware/{name}",
        role(Publisher),
        firmware::upload,
    )
    .add(
        M::GET,
        "/v1/firmware/{name}",
        role(Reader),
        firmware::resolve,
    )
    .add(
        M::PATCH,
        "/v1/firmware/{name}",
        role(Publisher),
        firmware::change,
    )
    .add(
        M::DELETE,
        "/v1/firmware/{name}",
        role(Admin),
        firmware::delete,
    )
    .add(
        M::GET,
        "/v1/firmware/{name}/signature",
        role(Reader),
        firmware::signature,
    )
    .add(
        M::GET,
        "/v1/firmware/{name}/content",
        role(Reader),
        download::content,
    )
    .add(
        M::HEAD,
        "/v1/firmware/{name}/content",
        role(Reader),
        download::content,
    )
    .add(M::GET, app::DOWNLOAD_ROUTE, DeviceByName, download::content)
    .add(
        M::HEAD,
        app::DOWNLOAD_ROUTE,
        DeviceByName,
        download::content,
    )
    .add(M::GET, "/p/{fotaId}", Device, download::package)
    .add(M::HEAD, "/p/{fotaId}", Device, download::package)
    .add(
        M::GET,
        "/p/{fotaId}/{token}",
        Device,
        download::package_with_token,
    )
    .add(
        M::HEAD,
        "/p/{fotaId}/{token}",
        Device,
        download::package_with_token,
    )
    .add(M::OPTIONS, "/v1/uploads", Public, uploads::options)
    .add(M::POST, "/v1/uploads", role(Publisher), uploads::create)
    .add(
        M::HEAD,
        "/v1/uploads/{uploadId}",
        role(Publisher),
        uploads::offset,
    )
    .add(
        M::PATCH,
        "/v1/uploads/{uploadId}",
        role(Publisher),
        uploads::append,
    )
    .add(
        M::DELETE,
        "/v1/uploads/{uploadId}",
        role(Publisher),
        uploads::terminate,
    )
    .add(M::POST, "/v1/imports", role(Publisher), fota::import)
    .add(
        M::POST,
        "/v1/devices/{deviceId}/fota",
        role(Operator),
        fota::schedule,
    )
    .add(M::GET, "/v1/devices/{deviceId}/fota", Device, fota::work)
    .add(
        M::POST,
        "/v1/devices/{deviceId}/token",
        role(Operator),
        fota::issue_token,
    )
    .add(
        M::DELETE,
        "/v1/devices/{deviceId}/token",
        role(Operator),
        fota::revoke_token,
    )
    .add(
        M::PUT,
        "/v1/devices/{deviceId}/psk",
        role(Operator),
        fota::put_psk,
    )
    .add(
        M::DELETE,
        "/v1/devices/{deviceId}/psk",
        role(Operator),
        fota::remove_psk,
    )
    .add(
        M::POST,
        "/v1/devices/{deviceId}/methods/{method}",
        role(Operator),
        fota::method,
    )
    .add(M::GET, "/v1/fota", role(Reader), fota::list)
    .add(M::GET, "/v1/fota/{fotaId}", role(Reader), fota::status)
    .add(M::POST, "/v1/fota/{fotaId}/report", Device, fota::report)
    .add(
        M::POST,
        "/v1/fota/{fotaId}/cancel",
        role(Operator),
        fota::cancel,
    )
    .add(M::GET, "/v1/schedules", role(Reader), fota::schedules)
    .add(
        M::GET,
        "/v1/schedules/{name}",
        role(Reader),
        fota::get_schedule,
    )
    .add(
        M::PUT,
        "/v1/schedules/{name}",
        role(Operator),
        fota::put_schedule,
    )
    .add(
        M::DELETE,
        "/v1/schedules/{name}",
        role(Operator),
        fota::delete_schedule,
    )
    .add(M::GET, "/v1/devices", role(Reader), devices::list)
    .add(
        M::POST,
        "/v1/devices:import",
        role(Operator),
        devices::import,
    )
    .add(M::GET, "/v1/devices/{deviceId}", role(Reader), devices::get)
    .add(
        M::PUT,
        "/v1/devices/{deviceId}",
        role(Operator),
        devices::put,
    )
    .add(
        M::PATCH,
        "/v1/devices/{deviceId}",
        role(Operator),
        devices::patch,
    )
    .add(
        M::DELETE,
        "/v1/devices/{deviceId}",
        role(Operator),
        devices::delete,
    )
    .add(M::GET, "/v1/groups", role(Reader), devices::groups)
    .add(M::GET, "/v1/groups/{name}", role(Reader), devices::group)
    .add(
        M::PUT,
        "/v1/groups/{name}",
        role(Operator),
        devices::put_group,
    )
    .add(
        M::DELETE,
        "/v1/groups/{name}",
        role(Operator),
        devices::delete_group,
    )
    .add(
        M::GET,
        "/v1/groups/{name}/devices",
        role(Reader),
        devices::group_devices,
    )
    .add(M::GET, "/v1/campaigns", role(Reader), campaigns::list)
    .add(M::POST, "/v1/campaigns", role(Operator), campaigns::create)
    .add(
        M::GET,
        "/v1/campaigns/{campaignId}",
        role(Reader),
        campaigns::status,
    )
    .add(
        M::GET,
        "/v1/campaigns/{campaignId}/devices",
        role(Reader),
        campaigns::devices,
    )
    .add(
        M::POST,
        "/v1/campaigns/{campaignId}/approve",
        role(Admin),
        campaigns::approve,
    )
    .add(
        M::POST,
        "/v1/campaigns/{campaignId}/start",
        role(Operator),
        campaigns::start,
    )
    .add(
        M::POST,
        "/v1/campaigns/{campaignId}/pause",
        role(Operator),
        campaigns::pause,
    )
    .add(
        M::POST,
        "/v1/campaigns/{campaignId}/resume",
        role(Operator),
        campaigns::resume,
    )
    .add(
        M::POST,
        "/v1/campaigns/{campaignId}/stop",
        role(Operator),
        campaigns::stop,
    )
    .add(
        M::POST,
        "/v1/campaigns/{campaignId}/retry-failed",
        role(Operator),
        campaigns::retry_failed,
    )
    .add(M::GET, "/v1/events", role(Reader), events::events)
    // The hawkBit device API (DDI); devices and gateways authenticate in the handlers.
    .add(
        M::GET,
        "/{tenant}/controller/v1/{controllerId}",
        Device,
        ddi::base,
    )
    .add(
        M::GET,
        "/{tenant}/controller/v1/{controllerId}/deploymentBase/{actionId}",
        Device,
        ddi::deployment_base,
    )
    .add(
        M::POST,
        "/{tenant}/controller/v1/{controllerId}/deploymentBase/{actionId}/feedback",
        Device,
        ddi::deployment_feedback,
    )
    .add(
        M::GET,
        "/{tenant}/controller/v1/{controllerId}/installedBase/{actionId}",
        Device,
        ddi::installed_base,
    )
    .add(
        M::GET,
        "/{tenant}/controller/v1/{controllerId}/cancelAction/{actionId}",
        Device,
        ddi::cancel_action,
    )
    .add(
        M::POST,
        "/{tenant}/controller/v1/{controllerId}/cancelAction/{actionId}/feedback",
        Device,
        ddi::cancel_feedback,
    )
    .add(
        M::PUT,
        "/{tenant}/controller/v1/{controllerId}/configData",
        Device,
        ddi::config_data,
    )
    .add(
        M::GET,
        "/{tenant}/controller/v1/{controllerId}/softwaremodules/{moduleId}/artifacts/{fileName}",
        Device,
        ddi::artifact_md5sum,
    )
}

/// The complete service: the router with its middleware, and the direct way in for device
/// downloads beside it (`http::app`).
pub fn router(state: AppState) -> App {
    let routes = routes();
    let mut rules: access::Rules = std::collections::HashMap::new();
    for (method, path, rule) in &routes.table {
        rules
            .entry(*path)
            .or_default()
            .push((method.clone(), *rule));
    }
    let rules = Arc::new(rules);
    let router = routes
        .router
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::extract::DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            (state.clone(), Arc::clone(&rules)),
            envelope,
        ))
        .with_state(state.clone());
    app::App::new(router, state, rules)
}

/// Every answer's envelope, in one layer: each layer costs a clone of the inner service, an
/// allocation and a boxed future per request, and a 4 KiB ranged read takes a few
/// microseconds in all. Access is decided before the handler (`access::enforce`), a panic
/// becomes a JSON 500, a non-JSON error becomes JSON, and the answer is counted by route
/// and status and logged (at debug; server errors at error).
async fn envelope(
    State((state, rules)): State<(AppState, Arc<access::Rules>)>,
    req: Request,
    next: Next,
) -> Response {
    // MatchedPath is an Arc<str> inside: cloning it does not copy the route.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map(MatchedPath::as_str);
    answer(&state, &rules, route, req, |req| next.run(req)).await
}

/// The envelope's work on a request whose route is known (`None`: none matched), with
/// `next` running its handler.
pub(crate) async fn answer<F, Fut>(
    state: &AppState,
    rules: &access::Rules,
    route: Option<&str>,
    req: Request,
    next: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let method = req.method().clone();
    // The elapsed time is taken only when debug is on.
    let started = tracing::enabled!(tracing::Level::DEBUG).then(std::time::Instant::now);
    let resp = error::as_json(caught(access::enforce(state, rules, route, req, next)).await);
    let route = route.unwrap_or("unmatched");
    let status = resp.status().as_u16();
    state.metrics.request(route, status);
    if status >= 500 {
        tracing::error!(%method, route, status, "server error");
    } else {
        tracing::debug!(
            %method,
            route,
            status,
            micros = started.map_or(0, |t| t.elapsed().as_micros() as u64),
            "answered"
        );
    }
    resp
}

/// The answer of `handling`, or a JSON 500 if it panics: one handler's bug costs its own
/// request, not the connection and every request queued on it.
async fn caught(handling: impl std::future::Future<Output = Response>) -> Response {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(handling).catch_unwind().await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(crate::error::Kind::Internal, "internal", "internal error")
            .into_response(),
    }
}

pub(crate) fn parse_name(s: &str) -> Result<FirmwareName, ApiError> {
    FirmwareName::parse(s).map_err(|e| ApiError::bad_request(e.code(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_a_json_500() {
        let fine = caught(async { axum::http::StatusCode::NO_CONTENT.into_response() }).await;
        assert_eq!(fine.status(), 204);
        let resp = caught(async {
            if fine.status() == 204 {
                panic!("a handler's bug");
            }
            fine
        })
        .await;
        assert_eq!(resp.status(), 500);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 10)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "internal");
    }
}
