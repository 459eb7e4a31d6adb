//! The one place where a domain failure becomes a protocol status: every module's error
//! names a `Kind`, and the kind maps to an HTTP status here (and to a CoAP code later).

use axum::http::StatusCode;

/// What kind of failure a domain error is, independent of the protocol that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    Conflict,
    TooLarge,
    RangeNotSatisfiable,
    Unavailable,
    Internal,
}

impl Kind {
    pub fn http_status(self) -> StatusCode {
        match self {
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the message may reach the client; server-side failures are logged instead.
    pub fn is_client_error(self) -> bool {
        !matches!(self, Kind::Unavailable | Kind::Internal)
    }
}
