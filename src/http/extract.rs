//! Extractors whose refusals are JSON errors with stable codes, so no route answers a bad
//! path parameter or an oversized body with axum's plain-text rejection.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Path parameters, as `axum::extract::Path`: a parameter that is not UTF-8 (`%ff`) or does
/// not fit its type is 400 `invalid-parameter`.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Path<T>, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(path_error(&e)),
        }
    }
}

fn path_error(e: &PathRejection) -> ApiError {
    if e.status().is_server_error() {
        tracing::error!(error = %e.body_text(), "path parameters");
        return ApiError::new(crate::error::Kind::Internal, "internal", "internal error");
    }
    ApiError::bad_request("invalid-parameter", e.body_text())
}

/// A whole (small) JSON request body, as bytes: a Content-Type other than JSON
/// (`application/json`, `application/<something>+json`) is 415 `unsupported-media-type`
/// (none at all is taken as JSON, for devices' minimal clients); over the route's limit is
/// 413 `too-large`.
pub struct JsonBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<JsonBody, ApiError> {
        if let Some(ct) = req.headers().get(axum::http::header::CONTENT_TYPE) {
            let json = ct
                .to_str()
                .ok()
                .and_then(|v| v.parse::<mime::Mime>().ok())
                .is_some_and(|m| {
                    m.type_() == mime::APPLICATION
                        && (m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON))
                });
            if !json {
                return Err(ApiError {
                    status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    code: "unsupported-media-type",
                    message: "the body must be JSON (Content-Type: application/json)".into(),
                    detail: None,
                });
            }
        }
        Bytes::from_request(req, state)
            .await
            .map(JsonBody)
            .map_err(|e| body_error(&e))
    }
}

fn body_error(e: &BytesRejection) -> ApiError {
    match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            crate::error::Kind::TooLarge,
            "too-large",
            "the request body is larger than this route accepts",
        ),
        status if status.is_client_error() => ApiError {
            status,
            code: "invalid-body",
            message: e.body_text(),
            detail: None,
        },
        _ => ApiError::new(crate::error::Kind::Internal, "internal", "internal error"),
    }
}

/// A JSON body read by a handler that takes the raw bytes, refused as 400 `invalid-body`.
pub fn json_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid-body", format!("invalid JSON: {e}")))
}
