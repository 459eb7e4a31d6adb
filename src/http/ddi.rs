//! The hawkBit Direct Device Integration API, version 1 (`/{tenant}/controller/v1/...`), for
//! the update clients Linux and Zephyr devices already ship (SWUpdate's suricatta,
//! rauc-hawkbit-updater, Zephyr's hawkbit subsystem). Every action is a FOTA task; the
//! engine's `ddi` file maps one onto the other, and `fota/ddi.rs` has the mapping of
//! feedback.
//!
//! Devices authenticate with `Authorization: TargetToken <device token>` (their device
//! token), or a gateway with `GatewayToken <access token of role gateway>` for any device.
//! With neither, a device is admitted only while device credentials are not required
//! (`auth.device_credentials`) and it has none.
//!
//! Artifacts are downloaded from the task's package URI (with its capability, ranges served),
//! so a client that sends no credential with downloads (SWUpdate's default) still works.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{json_body, JsonBody, Path};
use super::serve::ListenerScheme;
use super::AppState;
use crate::auth::{AuthError, Role};
use crate::error::Kind;
use crate::fota::ddi::{action_id, Feedback};
use crate::fota::task::FotaTask;
use crate::fota::{Proof, Work};
use crate::meta::FirmwareRecord;

/// The chunk part every deployment names (hawkBit's software module type).
const PART: &str = "os";
/// Longest polling interval a client can read: `HH:MM:SS` with hours below 24.
const MAX_SLEEP_SECS: u64 = 24 * 3600 - 1;

/// Who the request says it is: the device's own token, a gateway, or nobody.
async fn proof<'h>(app: &AppState, headers: &'h HeaderMap) -> Result<Proof<'h>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(Proof::Token(None));
    };
    // Not the access layer's codes (`unauthenticated`, `invalid-token`, `forbidden`): the
    // route is a device route, and these refusals are the handler's.
    let unauthenticated =
        |m: &str| ApiError::new(Kind::Unauthorized, "device-unauthenticated", m.to_owned());
    let (scheme, credential) = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .map(|(s, c)| (s, c.trim()))
        .ok_or_else(|| {
            unauthenticated("Authorization: TargetToken <device token> or GatewayToken <token>")
        })?;
    if scheme.eq_ignore_ascii_case("TargetToken") || scheme.eq_ignore_ascii_case("Bearer") {
        return Ok(Proof::Token(Some(credential)));
    }
    if !scheme.eq_ignore_ascii_case("GatewayToken") {
        return Err(unauthenticated(
            "Authorization: TargetToken <device token> or GatewayToken <token>",
        ));
    }
    let info = match app.access.tokens.check(credential).await {
        Ok(info) => info,
        Err(AuthError::Unknown) => {
            return Err(ApiError::new(
                Kind::Unauthorized,
                "gateway-token-invalid",
                "the GatewayToken is not a valid token",
            ))
        }
        Err(e) => return Err(e.into()),
    };
    if !info.role.covers(Role::Gateway) {
        return Err(ApiError::new(
            Kind::Forbidden,
            "gateway-role-required",
            format!(
                "token {:?} has role {}; a GatewayToken needs role gateway (or admin)",
                info.name, info.role
            ),
        ));
    }
    Ok(Proof::Gateway)
}

/// The tenant in the path must be the configured one.
fn check_tenant(app: &AppState, tenant: &str) -> Result<(), ApiError> {
    if tenant.eq_ignore_ascii_case(app.engine.ddi_tenant()) {
        Ok(())
    } else {
        Err(ApiError::new(
            Kind::NotFound,
            "tenant-not-found",
            format!("no tenant {tenant:?} here"),
        ))
    }
}

/// What every route on one action checks first, in this order: the tenant, the action id,
/// and who is asking.
async fn action_request<'h>(
    app: &AppState,
    tenant: &str,
    action: &str,
    headers: &'h HeaderMap,
) -> Result<(u32, Proof<'h>), ApiError> {
    check_tenant(app, tenant)?;
    let action = parse_action(action)?;
    Ok((action, proof(app, headers).await?))
}

fn parse_action(s: &str) -> Result<u32, ApiError> {
    s.parse::<u32>()
        .ok()
        .filter(|n| *n >= 1 && *n <= i32::MAX as u32)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid-parameter",
                format!("action id {s:?}: a positive integer"),
            )
        })
}

/// `s` as one path segment.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:@!$&'()*+,;=".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where links point: the public base of the listener the request came in on.
struct Links {
    /// `/{tenant}/controller/v1/{controllerId}`
    path: String,
    /// The same under the listener's public base.
    root: String,
}

impl Links {
    fn new(app: &AppState, scheme: Option<&ListenerScheme>, tenant: &str, device: &str) -> Links {
        let scheme = scheme.map_or("http", |s| s.0);
        let base = app
            .engine
            .base_of(scheme)
            .or_else(|| app.engine.base_of("http"))
            .or_else(|| app.engine.base_of("https"))
            .unwrap_or_default();
        let path = format!("/{}/controller/v1/{}", segment(tenant), segment(device));
        Links {
            root: format!("{base}{path}"),
            path,
        }
    }

    fn href(&self, rest: &str) -> Value {
        json!({"href": format!("{}/{rest}", self.root)})
    }
}

fn sleep_text(d: std::time::Duration) -> String {
    let s = d.as_secs().clamp(1, MAX_SLEEP_SECS);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `GET /{tenant}/controller/v1/{controllerId}`: the polling interval and links to what the
/// device should do.
pub async fn base(
    State(app): State<AppState>,
    Path((tenant, device)): Path<(String, String)>,
    scheme: Option<Extension<ListenerScheme>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_tenant(&app, &tenant)?;
    let proof = proof(&app, &headers).await?;
    let c = app.engine.ddi_poll(&device, proof).await?;
    let links = Links::new(&app, scheme.as_deref(), &tenant, &device);
    let poll = app.engine.poll_interval();
    let mut l = serde_json::Map::new();
    let sleep = match &c.work {
        Work::Task { task, .. } => {
            l.insert(
                "deploymentBase".into(),
                links.href(&format!("deploymentBase/{}", action_id(&task.id))),
            );
            poll
        }
        Work::Nothing { retry_after } => (*retry_after).min(poll),
    };
    if let Some(t) = &c.cancel {
        l.insert(
            "cancelAction".into(),
            links.href(&format!("cancelAction/{}", action_id(&t.id))),
        );
    }
    if let Some(t) = &c.installed {
        l.insert(
            "installedBase".into(),
            links.href(&format!("installedBase/{}", action_id(&t.id))),
        );
    }
    if c.attributes_wanted {
        l.insert("configData".into(), links.href("configData"));
    }
    Ok(Json(json!({
        "config": {"polling": {"sleep": sleep_text(sleep)}},
        "_links": l,
    })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentQuery {
    /// How many of the action's history messages to add (`-1`: all).
    action_history: Option<i64>,
    /// hawkBit's cache-busting parameter; ignored.
    #[allow(dead_code)]
    c: Option<String>,
}

/// The artifact's file name: the firmware name (a `.swu` name for SWUpdate).
fn filename(record: &FirmwareRecord) -> &str {
    &record.name
}

/// An action as `deploymentBase` and `installedBase` show it.
fn deployment(
    app: &AppState,
    links: &Links,
    t: &FotaTask,
    record: &FirmwareRecord,
    history: Option<i64>,
) -> Value {
    let aid = action_id(&t.id);
    let file = filename(record);
    let md5sum = format!("softwaremodules/{aid}/artifacts/{}.MD5SUM", segment(file));
    let mut artifact_links = serde_json::Map::new();
    for (scheme, download, sum) in [
        ("http", "download-http", "md5sum-http"),
        ("https", "download", "md5sum"),
    ] {
        if let Some(uri) = app.engine.package_uri_on(t, scheme) {
            artifact_links.insert(download.into(), json!({ "href": uri }));
            if let Some(base) = app.engine.base_of(scheme) {
                let href = format!("{base}{}/{md5sum}", links.path);
                artifact_links.insert(sum.into(), json!({ "href": href }));
            }
        }
    }
    let mut d = json!({
        "download": "forced",
        "update": "forced",
        "chunks": [{
            "part": PART,
            "version": record.version.clone().unwrap_or_default(),
            "name": record.name,
            "artifacts": [{
                "filename": file,
                "hashes": {
                    "sha1": record.sha1,
                    "md5": record.md5,
                    "sha256": record.sha256,
                },
                "size": record.size,
                "_links": artifact_links,
            }],
        }],
    });
    // hawkBit names the field only for actions with a maintenance window. A task that was
    // handed over inside its window keeps going, as on every other protocol.
    if !t.options.schedule.windows.is_empty() {
        d["maintenanceWindow"] = "available".into();
    }
    let mut v = json!({"id": aid.to_string(), "deployment": d});
    if let Some(n) = history.filter(|n| *n != 0) {
        let messages: Vec<String> = t
            .history
            .iter()
            .rev()
            .take(if n < 0 { usize::MAX } else { n as usize })
            .map(|h| {
                let mut m = h.status.as_str().to_owned();
                if let Some(r) = &h.reason {
                    m.push_str(&format!(" ({r})"));
                }
                if let Some(d) = &h.detail {
                    m.push_str(&format!(": {d}"));
                }
                m
            })
            .collect();
        v["actionHistory"] = json!({"status": t.status.as_str(), "messages": messages});
    }
    v
}

/// `GET /{tenant}/controller/v1/{controllerId}/deploymentBase/{actionId}`
pub async fn deployment_base(
    State(app): State<AppState>,
    Path((tenant, device, action)): Path<(String, String, String)>,
    Query(q): Query<DeploymentQuery>,
    scheme: Option<Extension<ListenerScheme>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let at = At::new(&app, &tenant, &device, &action, scheme.as_deref())?;
    show(&app, at, q, &headers, false).await
}

/// `GET /{tenant}/controller/v1/{controllerId}/installedBase/{actionId}`
pub async fn installed_base(
    State(app): State<AppState>,
    Path((tenant, device, action)): Path<(String, String, String)>,
    Query(q): Query<DeploymentQuery>,
    scheme: Option<Extension<ListenerScheme>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let at = At::new(&app, &tenant, &device, &action, scheme.as_deref())?;
    show(&app, at, q, &headers, true).await
}

/// An action's place: its links, its device and its id, checked.
struct At<'a> {
    links: Links,
    device: &'a str,
    action: u32,
}

impl<'a> At<'a> {
    fn new(
        app: &AppState,
        tenant: &str,
        device: &'a str,
        action: &str,
        scheme: Option<&ListenerScheme>,
    ) -> Result<At<'a>, ApiError> {
        check_tenant(app, tenant)?;
        Ok(At {
            action: parse_action(action)?,
            links: Links::new(app, scheme, tenant, device),
            device,
        })
    }
}

/// A deployment, or with `installed` a succeeded one.
async fn show(
    app: &AppState,
    at: At<'_>,
    q: DeploymentQuery,
    headers: &HeaderMap,
    installed: bool,
) -> Result<Json<Value>, ApiError> {
    if q.action_history
        .is_some_and(|n| !(-1..=i32::MAX as i64).contains(&n))
    {
        return Err(ApiError::bad_request(
            "invalid-parameter",
            "actionHistory: -1 (all) or a count",
        ));
    }
    let proof = proof(app, headers).await?;
    let (t, record) = if installed {
        app.engine
            .ddi_installed(at.device, at.action, proof)
            .await?
    } else {
        app.engine
            .ddi_deployment(at.device, at.action, proof)
            .await?
    };
    Ok(Json(deployment(
        app,
        &at.links,
        &t,
        &record,
        q.action_history,
    )))
}

/// `POST /{tenant}/controller/v1/{controllerId}/deploymentBase/{actionId}/feedback`
pub async fn deployment_feedback(
    State(app): State<AppState>,
    Path((tenant, device, action)): Path<(String, String, String)>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    let (action, proof) = action_request(&app, &tenant, &action, &headers).await?;
    let feedback = Feedback::parse(&body).map_err(crate::fota::FotaError::from)?;
    app.engine
        .ddi_feedback(&device, action, &feedback, proof)
        .await?;
    Ok(StatusCode::OK)
}

/// `GET /{tenant}/controller/v1/{controllerId}/cancelAction/{actionId}`
pub async fn cancel_action(
    State(app): State<AppState>,
    Path((tenant, device, action)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (action, proof) = action_request(&app, &tenant, &action, &headers).await?;
    let t = app.engine.ddi_cancellation(&device, action, proof).await?;
    let aid = action_id(&t.id).to_string();
    Ok(Json(json!({"id": aid, "cancelAction": {"stopId": aid}})))
}

/// `POST /{tenant}/controller/v1/{controllerId}/cancelAction/{actionId}/feedback`
pub async fn cancel_feedback(
    State(app): State<AppState>,
    Path((tenant, device, action)): Path<(String, String, String)>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    let (action, proof) = action_request(&app, &tenant, &action, &headers).await?;
    let feedback = Feedback::parse(&body).map_err(crate::fota::FotaError::from)?;
    app.engine
        .ddi_cancel_feedback(&device, action, &feedback, proof)
        .await?;
    Ok(StatusCode::OK)
}

/// `PUT /{tenant}/controller/v1/{controllerId}/configData`: `{"mode": "merge" | "replace" |
/// "remove", "data": {key: value}}` into the device's attributes (merge when no mode).
pub async fn config_data(
    State(app): State<AppState>,
    Path((tenant, device)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    use crate::fota::ConfigMode;
    check_tenant(&app, &tenant)?;
    let proof = proof(&app, &headers).await?;
    let v = json_body(&body)?;
    let invalid = |m: &str| ApiError::bad_request("invalid-parameter", m.to_owned());
    let mode = match v.get("mode") {
        None | Some(Value::Null) => ConfigMode::Merge,
        Some(m) => m
            .as_str()
            .and_then(ConfigMode::parse)
            .ok_or_else(|| invalid("mode: merge, replace or remove"))?,
    };
    let data = v
        .get("data")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("data: an object of strings"))?;
    let data: BTreeMap<String, String> = data
        .iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|s| (k.clone(), s.to_owned()))
                .ok_or_else(|| invalid(&format!("data.{k} must be a string")))
        })
        .collect::<Result<_, _>>()?;
    app.engine
        .ddi_config_data(&device, mode, &data, proof)
        .await?;
    Ok(StatusCode::OK)
}

/// `GET /{tenant}/controller/v1/{controllerId}/softwaremodules/{moduleId}/artifacts/{file}`:
/// only `<file>.MD5SUM` (the artifact's MD5 as `md5sum` prints it); the bytes themselves are
/// at the `download` links, the task's package URI.
pub async fn artifact_md5sum(
    State(app): State<AppState>,
    Path((tenant, device, action, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (action, proof) = action_request(&app, &tenant, &action, &headers).await?;
    let (_, record) = app.engine.ddi_deployment(&device, action, proof).await?;
    let name = file.strip_suffix(".MD5SUM");
    if name != Some(filename(&record)) {
        return Err(ApiError::new(
            Kind::NotFound,
            "artifact-not-found",
            format!(
                "action {action} has {}.MD5SUM here; its bytes are at the deployment's download links",
                filename(&record)
            ),
        ));
    }
    let body = format!(
        "{}  {}\n",
        record.md5.as_deref().unwrap_or_default(),
        filename(&record)
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        body,
    )
        .into_response())
}
