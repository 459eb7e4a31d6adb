//! FOTA routes: schedule, work requests, reports, status, list, cancel, the seed's direct
//! methods, schedules and imports.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{json_body, JsonBody, Path};
use super::firmware::view;
use super::{parse_name, AppState};
use crate::firmware::Ingested;
use crate::fota::report::{self, MAX_REPORT};
use crate::fota::request::{parse_url, ScheduleRequest};
use crate::fota::schedule::Schedule;
use crate::fota::task::{FotaTask, Status};
use crate::fota::view::{task_json, work_json};
use crate::fota::{FotaError, Proof, Work};
use crate::name::parse_duration;

fn task_view(app: &AppState, t: &FotaTask) -> Response {
    Json(task_json(t, app.engine.bytes_served(t))).into_response()
}

/// `POST /v1/devices/{deviceId}/fota`
pub async fn schedule(
    State(app): State<AppState>,
    Path(device): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let body = json_body(&body)?;
    crate::fota::check_device(&device)?;
    let req = ScheduleRequest::parse(&body).map_err(FotaError::from)?;
    let (t, answer) = scheduled(&app, &device, req).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/fota/{}", t.id))],
        Json(answer),
    )
        .into_response())
}

/// Schedules a task; the answer is `{"fotaId"}`, with the device's new token as
/// `deviceToken` when the request asked for one.
async fn scheduled(
    app: &AppState,
    device: &str,
    req: ScheduleRequest,
) -> Result<(FotaTask, Value), ApiError> {
    let issue = req.issue_device_token;
    let t = app.engine.schedule(device, req).await?;
    let mut answer = json!({"fotaId": t.id});
    if issue {
        let (token, _) = app.engine.issue_device_token(device).await.map_err(|e| {
            let mut err = ApiError::from(e);
            err.detail = Some(("fotaId", t.id.clone().into()));
            err
        })?;
        answer["deviceToken"] = token.into();
    }
    Ok((t, answer))
}

/// `POST /v1/devices/{deviceId}/token`: a new device token (the old one stops working); the
/// token is in this answer only.
pub async fn issue_token(
    State(app): State<AppState>,
    Path(device): Path<String>,
) -> Result<Response, ApiError> {
    let (token, credential) = app.engine.issue_device_token(&device).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "deviceId": credential.device_id,
            "token": token,
            "createdAt": credential.created_at,
        })),
    )
        .into_response())
}

/// `PUT /v1/devices/{deviceId}/psk`: the device's pre-shared key for DTLS, under a PSK
/// identity no other device has; the key is never answered back.
pub async fn put_psk(
    State(app): State<AppState>,
    Path(device): Path<String>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let v = json_body(&body.0)?;
    let field = |name: &str| v.get(name).and_then(Value::as_str).map(str::to_owned);
    let invalid = |what: &str| ApiError::bad_request("invalid-parameter", what.to_owned());
    let identity = field("identity")
        .filter(|i| {
            (1..=MAX_PSK_IDENTITY).contains(&i.len())
                && i.bytes().all(|b| (b' '..=b'~').contains(&b))
        })
        .ok_or_else(|| invalid("identity: 1 to 128 printable ASCII characters"))?;
    let key = field("key")
        .filter(|k| hex::decode(k).is_ok_and(|b| (MIN_PSK..=MAX_PSK).contains(&b.len())))
        .ok_or_else(|| invalid("key: 16 to 64 bytes in hex"))?;
    if v.as_object()
        .is_some_and(|o| o.keys().any(|k| k != "identity" && k != "key"))
    {
        return Err(invalid("only identity and key"));
    }
    let psk = app.engine.set_device_psk(&device, &identity, &key).await?;
    let Some(psk) = psk else {
        return Err(ApiError::new(
            crate::error::Kind::Conflict,
            "psk-identity-taken",
            format!("another device has PSK identity {identity:?}"),
        ));
    };
    Ok(Json(json!({
        "deviceId": psk.device_id,
        "identity": psk.identity,
        "createdAt": psk.created_at,
    }))
    .into_response())
}

/// `DELETE /v1/devices/{deviceId}/psk`
pub async fn remove_psk(
    State(app): State<AppState>,
    Path(device): Path<String>,
) -> Result<StatusCode, ApiError> {
    if app.engine.remove_device_psk(&device).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            crate::error::Kind::NotFound,
            "device-psk-not-found",
            format!("device {device:?} has no pre-shared key"),
        ))
    }
}

/// Longest PSK identity (RFC 4279 allows 2^16 − 1 bytes, OpenSSL takes 256; devices use short
/// printable ones).
const MAX_PSK_IDENTITY: usize = 128;
/// Key sizes accepted: 128 to 512 bits.
const MIN_PSK: usize = 16;
const MAX_PSK: usize = 64;

/// `DELETE /v1/devices/{deviceId}/token`
pub async fn revoke_token(
    State(app): State<AppState>,
    Path(device): Path<String>,
) -> Result<StatusCode, ApiError> {
    if app.engine.revoke_device_token(&device).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            crate::error::Kind::NotFound,
            "device-token-not-found",
            format!("device {device:?} has no device token"),
        ))
    }
}

/// `GET /v1/devices/{deviceId}/fota`: the device's work, or 204 with a Retry-After hint.
pub async fn work(
    State(app): State<AppState>,
    Path(device): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    Ok(
        match app
            .engine
            .work(&device, Proof::Token(super::access::bearer(&headers)))
            .await?
        {
            Work::Task { task, record } => Json(work_json(&task, &record)).into_response(),
            Work::Nothing { retry_after } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                (
                    StatusCode::NO_CONTENT,
                    [(header::RETRY_AFTER, secs.to_string())],
                )
                    .into_response()
            }
        },
    )
}

/// `POST /v1/fota/{fotaId}/report`: plain JSON, or a SenML pack as `application/senml+json`.
pub async fn report(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    if body.len() > MAX_REPORT {
        return Err(ApiError::new(
            crate::error::Kind::TooLarge,
            "too-large",
            format!("a report is at most {MAX_REPORT} bytes"),
        ));
    }
    let senml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/senml+json"));
    let parsed = if senml {
        report::from_senml(&body)
    } else {
        report::from_json(&body)
    };
    let t = app
        .engine
        .report(
            &id,
            &parsed.map_err(FotaError::from)?,
            Proof::Token(super::access::bearer(&headers)),
        )
        .await?;
    Ok(task_view(&app, &t))
}

/// `GET /v1/fota/{fotaId}`
pub async fn status(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let t = app.engine.task(&id).await?;
    Ok(task_view(&app, &t))
}

/// `POST /v1/fota/{fotaId}/cancel`
pub async fn cancel(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let t = app.engine.cancel(&id).await?;
    Ok(task_view(&app, &t))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListQuery {
    device_id: Option<String>,
    status: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/fota?deviceId=&status=&cursor=&limit=`
pub async fn list(
    State(app): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            Status::parse(s).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid-parameter",
                    format!("status: {s:?} is not a task status"),
                )
            })
        })
        .transpose()?;
    let limit = super::page::limit(q.limit)?;
    let (tasks, next) = app
        .engine
        .list(q.device_id.as_deref(), status, q.cursor.as_deref(), limit)
        .await?;
    let tasks: Vec<_> = tasks
        .iter()
        .map(|t| task_json(t, app.engine.bytes_served(t)))
        .collect();
    Ok(Json(json!({"tasks": tasks, "next": next})))
}

/// The status document as a value, for answers that wrap it (LwM2M method results).
fn task_value(app: &AppState, t: &FotaTask) -> Value {
    serde_json::to_value(task_json(t, app.engine.bytes_served(t))).unwrap_or_default()
}

/// The `fotaId` of a check or cancel payload, which must belong to `device`.
async fn task_of(app: &AppState, device: &str, payload: &Value) -> Result<FotaTask, ApiError> {
    let id = payload
        .get("fotaId")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("invalid-parameter", "fotaId: is required"))?;
    let t = app.engine.task(id).await?;
    if t.device_id != device {
        return Err(FotaError::NotFound(id.to_owned()).into());
    }
    Ok(t)
}

/// `POST /v1/devices/{deviceId}/methods/{method}`: the seed's direct methods, answered as a
/// direct method result `{"status", "payload"}` so a bridge can forward it unchanged.
pub async fn method(
    State(app): State<AppState>,
    Path((device, method)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let known = [
        "scheduleFirmwareUpdate",
        "checkFirmwareUpdateStatus",
        "cancelFirmwareUpdate",
    ];
    if !known.contains(&method.as_str()) {
        return Err(ApiError::new(
            crate::error::Kind::NotFound,
            "unknown-method",
            format!("unknown method {method:?}; known: {}", known.join(", ")),
        ));
    }
    // A body that is not a JSON object never reached a method: refused as a request, not
    // answered as a method result.
    let payload = json_body(&body)?;
    if !payload.is_object() {
        return Err(ApiError::bad_request(
            "invalid-body",
            "a method payload is a JSON object",
        ));
    }
    crate::fota::check_device(&device).map_err(ApiError::from)?;
    let result: Result<Value, ApiError> = async {
        match method.as_str() {
            "scheduleFirmwareUpdate" => {
                let req = ScheduleRequest::parse(&payload).map_err(FotaError::from)?;
                Ok(scheduled(&app, &device, req).await?.1)
            }
            "checkFirmwareUpdateStatus" => {
                let t = task_of(&app, &device, &payload).await?;
                Ok(task_value(&app, &t))
            }
            _ => {
                let t = task_of(&app, &device, &payload).await?;
                let t = app.engine.cancel(&t.id).await?;
                Ok(task_value(&app, &t))
            }
        }
    }
    .await;
    Ok(Json(match result {
        Ok(payload) => json!({"status": 200, "payload": payload}),
        Err(e) => {
            let status = e.status.as_u16();
            let body = e.into_response();
            let payload = axum::body::to_bytes(body.into_body(), 64 << 10)
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .unwrap_or(Value::Null);
            json!({"status": status, "payload": payload})
        }
    }))
}

/// `GET /v1/schedules`
pub async fn schedules(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"schedules": app.engine.schedules().await?})))
}

/// `GET /v1/schedules/{name}`
pub async fn get_schedule(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Schedule>, ApiError> {
    Ok(Json(app.engine.get_schedule(&name).await?))
}

/// `PUT /v1/schedules/{name}`
pub async fn put_schedule(
    State(app): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Schedule>, ApiError> {
    let s: Schedule = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid-schedule", e.to_string()))?;
    Ok(Json(app.engine.put_schedule(&name, s).await?))
}

/// `DELETE /v1/schedules/{name}`
pub async fn delete_schedule(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.engine.delete_schedule(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ImportBody {
    name: String,
    url: String,
    retention_period: Option<String>,
    description: Option<String>,
    version: Option<String>,
}

/// `POST /v1/imports`: fetches a URL into the repository under a name.
pub async fn import(
    State(app): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let b: ImportBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid-parameter", e.to_string()))?;
    let name = parse_name(&b.name)?;
    let url = parse_url("url", &b.url).map_err(FotaError::from)?;
    let retention = b
        .retention_period
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid-parameter", format!("retentionPeriod: {e}")))?;
    for (field, v) in [("description", &b.description), ("version", &b.version)] {
        if let Some(v) = v {
            crate::firmware::check_text(field, v)?;
        }
    }
    let ingested = app
        .engine
        .import(&name, &url, retention, b.description, b.version)
        .await?;
    Ok(match ingested {
        Ingested::Created(r) => (
            StatusCode::CREATED,
            [(header::LOCATION, format!("/v1/firmware/{}", r.name))],
            Json(view(&app, &r)),
        )
            .into_response(),
        Ingested::Existing(r) => (StatusCode::OK, Json(view(&app, &r))).into_response(),
    })
}
