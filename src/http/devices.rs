//! Device registry and group routes: list and filter devices, a device's page, operators'
//! tags and attributes, NDJSON bulk import, and groups with their resolved devices.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{json_body, JsonBody, Path};
use super::page::PageQuery;
use super::AppState;
use crate::fleet::{device_json, ImportReport};
use crate::fota::view::rfc3339;
use crate::model::group::{Group, Members};

/// Largest NDJSON import body (a million short lines).
const IMPORT_LIMIT: usize = 256 << 20;
/// Longest import line.
const MAX_LINE: usize = 64 << 10;
/// Lines applied per store call.
const IMPORT_BATCH: usize = 5000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesQuery {
    filter: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/devices`
pub async fn list(
    State(app): State<AppState>,
    query: Result<Query<DevicesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let limit = super::page::limit(q.limit)?;
    let (devices, next) = app
        .fleet
        .list_devices(q.filter.as_deref(), q.cursor.as_deref(), limit)
        .await?;
    let devices: Vec<Value> = devices.iter().map(|d| device_json(d, None, &[])).collect();
    Ok(Json(json!({"devices": devices, "next": next})))
}

/// `GET /v1/devices/{deviceId}`
pub async fn get(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(app.fleet.device(&id).await?))
}

/// `PUT /v1/devices/{deviceId}`: 201 when the device is new.
pub async fn put(
    State(app): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let (d, created) = app.fleet.put_device(&id, &json_body(&body)?).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(device_json(&d, None, &[]))).into_response())
}

/// `PATCH /v1/devices/{deviceId}`
pub async fn patch(
    State(app): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let d = app.fleet.patch_device(&id, &json_body(&body)?).await?;
    Ok(Json(device_json(&d, None, &[])))
}

/// `DELETE /v1/devices/{deviceId}`
pub async fn delete(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.fleet.delete_device(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/devices:import`: NDJSON, one device per line, streamed and applied in batches;
/// each line is applied whole or refused whole, and the answer lists the refused lines.
pub async fn import(
    State(app): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Json<ImportReport>, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !matches!(
        essence,
        "application/x-ndjson" | "application/jsonl" | "text/plain"
    ) {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported-media-type",
            message: "send NDJSON (application/x-ndjson): one JSON object per line".into(),
            detail: None,
        });
    }
    let mut report = ImportReport::default();
    let mut stream = body.into_data_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut batch: Vec<(u64, String)> = Vec::new();
    let mut line_no = 0u64;
    let mut total = 0usize;
    let mut ended = false;
    while !ended {
        match stream.next().await {
            Some(Ok(chunk)) => {
                total += chunk.len();
                if total > IMPORT_LIMIT {
                    return Err(ApiError::new(
                        crate::error::Kind::TooLarge,
                        "too-large",
                        format!("an import is at most {IMPORT_LIMIT} bytes; split it"),
                    ));
                }
                pending.extend_from_slice(&chunk);
            }
            Some(Err(e)) => {
                return Err(ApiError::bad_request(
                    "invalid-body",
                    format!("the body broke off: {e}"),
                ))
            }
            None => ended = true,
        }
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|b| *b == b'\n') {
            line_no += 1;
            push_line(
                &pending[start..start + nl],
                line_no,
                &mut batch,
                &mut report,
            );
            start += nl + 1;
        }
        pending.drain(..start);
        if ended && !pending.is_empty() {
            line_no += 1;
            let rest = std::mem::take(&mut pending);
            push_line(&rest, line_no, &mut batch, &mut report);
        }
        if pending.len() > MAX_LINE {
            return Err(ApiError::bad_request(
                "invalid-body",
                format!("line {} is longer than {MAX_LINE} bytes", line_no + 1),
            ));
        }
        if batch.len() >= IMPORT_BATCH || (ended && !batch.is_empty()) {
            app.fleet.import(&batch, &mut report).await?;
            batch.clear();
        }
    }
    Ok(Json(report))
}

fn push_line(raw: &[u8], n: u64, batch: &mut Vec<(u64, String)>, report: &mut ImportReport) {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    if raw.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    match std::str::from_utf8(raw) {
        Ok(text) => batch.push((n, text.to_owned())),
        Err(_) => {
            report.failed += 1;
            report.errors.push(json!({
                "line": n,
                "code": "invalid-body",
                "message": "not UTF-8",
            }));
        }
    }
}

fn group_json(g: &Group) -> Value {
    let (devices, filter) = match &g.members {
        Members::Devices(ids) => (Some(ids), None),
        Members::Filter(f) => (None, Some(f)),
    };
    json!({
        "name": g.name,
        "devices": devices,
        "filter": filter,
        "description": g.description,
        "updatedAt": rfc3339(g.updated_ms),
    })
}

/// `GET /v1/groups`
pub async fn groups(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let groups: Vec<Value> = app.fleet.groups().await?.iter().map(group_json).collect();
    Ok(Json(json!({"groups": groups})))
}

/// `GET /v1/groups/{name}`
pub async fn group(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(group_json(&app.fleet.group(&name).await?)))
}

/// `PUT /v1/groups/{name}`
pub async fn put_group(
    State(app): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let (g, created) = app.fleet.put_group(&name, &json_body(&body)?).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(group_json(&g))).into_response())
}

/// `DELETE /v1/groups/{name}`
pub async fn delete_group(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.fleet.delete_group(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/groups/{name}/devices`
pub async fn group_devices(
    State(app): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let limit = super::page::limit(q.limit)?;
    let (devices, next) = app
        .fleet
        .group_devices(&name, q.cursor.as_deref(), limit)
        .await?;
    Ok(Json(json!({"devices": devices, "next": next})))
}
