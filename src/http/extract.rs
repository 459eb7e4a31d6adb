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

/// A whole (small) request body, as `Bytes`: over the route's limit is 413 `too-large`.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Body, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e| body_error(&e))
    }
}

pub(crate) fn body_error(e: &BytesRejection) -> ApiError {
    match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "too-large",
            message: "the request body is larger than this route accepts".into(),
            detail: None,
        },
        status if status.is_client_error() => ApiError {
            status,
            code: "invalid-body",
            message: e.body_text(),
            detail: None,
        },
        _ => ApiError::new(crate::error::Kind::Internal, "internal", "internal error"),
    }
}
