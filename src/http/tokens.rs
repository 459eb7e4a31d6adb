//! `/v1/tokens`: create (the secret is in this answer only), list and revoke bearer tokens.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::access::AuditDetail;
use super::error::ApiError;
use super::extract::Path;
use super::AppState;
use crate::auth::Role;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    name: String,
    role: String,
}

pub async fn create(
    State(app): State<AppState>,
    body: Result<Json<CreateToken>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let role: Role = req.role.parse()?;
    let made = app.access.tokens.create(&req.name, role).await?;
    let detail = AuditDetail(format!("token {} ({})", made.info.name, made.info.role));
    let mut resp = (StatusCode::CREATED, Json(made)).into_response();
    resp.extensions_mut().insert(detail);
    Ok(resp)
}

pub async fn list(State(app): State<AppState>) -> Result<Response, ApiError> {
    let tokens = app.access.tokens.list().await?;
    Ok(Json(json!({ "tokens": tokens })).into_response())
}

pub async fn revoke(
    State(app): State<AppState>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    let gone = app.access.tokens.revoke(&token, false).await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.extensions_mut()
        .insert(AuditDetail(format!("token {} ({})", gone.name, gone.role)));
    Ok(resp)
}
