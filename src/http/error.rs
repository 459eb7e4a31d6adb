//! JSON errors at the HTTP edge: `{"error": {"code", "message"}}`. Server-side failures are
//! logged in full and answered with a generic message.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::Kind;
use crate::firmware::FirmwareError;
use crate::fota::FotaError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// One more member of the error object, such as the `fotaId` a conflict is about.
    pub detail: Option<(&'static str, serde_json::Value)>,
}

impl ApiError {
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: kind.http_status(),
            code,
            message: message.into(),
            detail: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(Kind::BadRequest, code, message)
    }

    pub fn not_found() -> ApiError {
        ApiError::new(Kind::NotFound, "not-found", "no such resource")
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            Kind::MethodNotAllowed,
            "method-not-allowed",
            "method not allowed on this resource",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        if let Some((k, v)) = self.detail {
            body["error"][k] = v;
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<FirmwareError> for ApiError {
    fn from(e: FirmwareError) -> ApiError {
        let (code, kind) = e.code();
        ApiError::domain(code, kind, &e)
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> ApiError {
        let (code, kind) = e.code();
        ApiError::domain(code, kind, &e)
    }
}

impl From<crate::uploads::UploadError> for ApiError {
    fn from(e: crate::uploads::UploadError) -> ApiError {
        let (code, kind) = e.code();
        ApiError::domain(code, kind, &e)
    }
}

impl From<FotaError> for ApiError {
    fn from(e: FotaError) -> ApiError {
        let (code, kind) = e.code();
        let mut err = ApiError::domain(code, kind, &e);
        if let FotaError::DeviceBusy { fota_id, .. } = e {
            err.detail = Some(("fotaId", fota_id.into()));
        }
        err
    }
}

impl From<crate::fleet::FleetError> for ApiError {
    fn from(e: crate::fleet::FleetError) -> ApiError {
        let (code, kind) = e.code();
        let mut err = ApiError::domain(code, kind, &e);
        if let crate::fleet::FleetError::Filter(f) = &e {
            err.detail = Some(("position", f.position.into()));
        }
        err
    }
}

impl ApiError {
    /// A domain error: its message when the client caused it, a generic one otherwise.
    fn domain(code: &'static str, kind: Kind, e: &dyn std::fmt::Display) -> ApiError {
        if kind.is_client_error() {
            ApiError::new(kind, code, e.to_string())
        } else {
            tracing::error!(error = %e, code, "request failed");
            let message = match kind {
                Kind::Unavailable => "storage is unavailable; try again later",
                _ => "internal error",
            };
            ApiError::new(kind, code, message)
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> ApiError {
        ApiError::bad_request("invalid-parameter", e.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        // axum answers 422 for JSON of the wrong shape; here every unreadable body is 400, as
        // on the routes that parse JSON themselves.
        let (status, code) = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type")
            }
            s if s.is_server_error() => (s, "internal"),
            _ => (StatusCode::BAD_REQUEST, "invalid-body"),
        };
        ApiError {
            status,
            code,
            message: e.body_text(),
            detail: None,
        }
    }
}

/// The last line of the JSON-errors rule: an error answer that is not JSON (a rejection that
/// escaped a handler's own extractors, say) is replaced by the documented shape, with a code
/// for its status. Successes and JSON answers pass as they are.
pub fn as_json(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        s if s.is_client_error() => "bad-request",
        _ => "internal",
    };
    tracing::debug!(%status, code, "non-JSON error answer replaced");
    let message = status.canonical_reason().unwrap_or("error").to_lowercase();
    let (mut parts, _) = resp.into_parts();
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}
