//! The one place where a domain failure becomes a protocol status: every module's error
//! names a `Kind`, and the kind maps to an HTTP status and to a CoAP code here.

use axum::http::StatusCode;

/// What kind of failure a domain error is, independent of the protocol that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BadRequest,
    /// No credentials, or credentials not recognised.
    Unauthorized,
    /// Credentials recognised but not enough for this.
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    /// Well-formed but not doable here (a transport not served, push delivery).
    Unprocessable,
    TooLarge,
    RangeNotSatisfiable,
    Unavailable,
    Internal,
}

impl Kind {
    pub fn http_status(self) -> StatusCode {
        match self {
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::Unauthorized => StatusCode::UNAUTHORIZED,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The CoAP response code (RFC 7252 §12.1.2) as class.detail in one byte.
    pub fn coap_code(self) -> u8 {
        use crate::coap::msg::code;
        match self {
            Kind::BadRequest => code(4, 0),
            Kind::Unauthorized => code(4, 1),
            Kind::Forbidden => code(4, 3),
            Kind::NotFound => code(4, 4),
            Kind::MethodNotAllowed => code(4, 5),
            Kind::Conflict => code(4, 9),
            // 4.22 Unprocessable Entity (RFC 8132 §5.2).
            Kind::Unprocessable => code(4, 22),
            Kind::TooLarge => code(4, 13),
            Kind::RangeNotSatisfiable => code(4, 2),
            Kind::Unavailable => code(5, 3),
            Kind::Internal => code(5, 0),
        }
    }

    /// Whether the message may reach the client; server-side failures are logged instead.
    pub fn is_client_error(self) -> bool {
        !matches!(self, Kind::Unavailable | Kind::Internal)
    }
}
