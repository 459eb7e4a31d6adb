//! Operations routes: health, Prometheus metrics and the public keys.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use super::AppState;

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
