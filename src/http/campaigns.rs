//! Campaign routes: create, list, status, members by status, and the lifecycle actions. The
//! acting token's name goes into the campaign's history (and decides self-approval).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{JsonBody, Path};
use super::page::PageQuery;
use super::AppState;
use crate::auth::Caller;
use crate::fleet::{CampaignRequest, StopRequest};
use crate::model::campaign::member;

/// An action's body: optional, so an empty one is `{}`.
fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    super::extract::json_body(body)
}

/// `POST /v1/campaigns`: a draft; 201 with its status document.
pub async fn create(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let req = CampaignRequest::parse(&json_body(&body)?, caller.name(), app.engine.now_ms())?;
    let c = app.fleet.create_campaign(req).await?;
    let status = app.fleet.status(&c.id).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/campaigns/{}", c.id))],
        Json(status),
    )
        .into_response())
}

/// `GET /v1/campaigns`
pub async fn list(
    State(app): State<AppState>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let limit = super::page::limit(q.limit)?;
    let (page, next) = app.fleet.campaigns(q.cursor.as_deref(), limit).await?;
    let campaigns: Vec<Value> = page
        .iter()
        .map(|c| {
            json!({
                "campaignId": c.id,
                "name": c.name,
                "firmware": c.firmware,
                "state": c.state.as_str(),
                "reason": c.reason,
                "createdAt": crate::fota::view::rfc3339(c.created_ms),
            })
        })
        .collect();
    Ok(Json(json!({"campaigns": campaigns, "next": next})))
}

/// `GET /v1/campaigns/{campaignId}`
pub async fn status(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(app.fleet.status(&id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersQuery {
    status: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

const MEMBER_STATUSES: [&str; 11] = [
    member::WAITING,
    member::SKIPPED,
    member::UP_TO_DATE,
    "pending",
    "delivering",
    "downloading",
    "downloaded",
    "updating",
    member::SUCCEEDED,
    member::FAILED,
    member::CANCELLED,
];

/// `GET /v1/campaigns/{campaignId}/devices`
pub async fn devices(
    State(app): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<MembersQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    if let Some(s) = q.status.as_deref() {
        if !MEMBER_STATUSES.contains(&s) {
            return Err(ApiError::bad_request(
                "invalid-parameter",
                format!("status: one of {}", MEMBER_STATUSES.join(", ")),
            ));
        }
    }
    let limit = super::page::limit(q.limit)?;
    let (page, next) = app
        .fleet
        .members(&id, q.status.as_deref(), q.cursor.as_deref(), limit)
        .await?;
    Ok(Json(json!({"devices": page, "next": next})))
}

async fn answer(app: &AppState, id: &str) -> Result<Json<Value>, ApiError> {
    Ok(Json(app.fleet.status(id).await?))
}

/// `POST /v1/campaigns/{campaignId}/approve` (admins other than the creator)
pub async fn approve(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    app.fleet.approve(&id, caller.name()).await?;
    answer(&app, &id).await
}

/// `POST /v1/campaigns/{campaignId}/start`
pub async fn start(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    app.fleet.start(&id, caller.name()).await?;
    answer(&app, &id).await
}

/// `POST /v1/campaigns/{campaignId}/pause`
pub async fn pause(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    app.fleet.pause(&id, caller.name()).await?;
    answer(&app, &id).await
}

/// `POST /v1/campaigns/{campaignId}/resume`
pub async fn resume(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    app.fleet.resume(&id, caller.name()).await?;
    answer(&app, &id).await
}

/// `POST /v1/campaigns/{campaignId}/stop` with `{"pending": "cancel"|"finish"}`
pub async fn stop(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let req = StopRequest::parse(&json_body(&body)?)?;
    app.fleet.stop(&id, req, caller.name()).await?;
    answer(&app, &id).await
}

/// `POST /v1/campaigns/{campaignId}/retry-failed`
pub async fn retry_failed(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (_, n) = app.fleet.retry_failed(&id, caller.name()).await?;
    let mut status = app.fleet.status(&id).await?;
    status["retried"] = n.into();
    Ok(Json(status))
}
