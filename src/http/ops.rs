//! Operations routes: health, Prometheus metrics and the public keys.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::Path;
use super::AppState;
use crate::keys::PublicFormat;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyQuery {
    format: Option<String>,
}

/// One public key as PEM (default), SPKI DER or a C array.
pub async fn key(
    State(app): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<KeyQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let format: PublicFormat = q
        .format
        .as_deref()
        .unwrap_or("pem")
        .parse()
        .map_err(|e: String| ApiError::bad_request("invalid-parameter", e))?;
    let key = app.repo.keys().get(&id).ok_or_else(|| {
        ApiError::new(
            crate::error::Kind::NotFound,
            "key-not-found",
            format!("key {id:?} not found"),
        )
    })?;
    let (content_type, bytes) = key.export(format);
    Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response())
}

pub async fn keys(State(app): State<AppState>) -> Json<Value> {
    let ring = app.repo.keys();
    let active = ring.active().id.clone();
    let keys: Vec<Value> = ring
        .all()
        .iter()
        .map(|k| {
            json!({
                "keyId": k.id,
                "alg": "ed25519",
                "publicKey": B64.encode(k.public_raw()),
                "pem": k.spki_pem(),
                "active": k.id == active,
            })
        })
        .collect();
    Json(json!({ "keys": keys }))
}
