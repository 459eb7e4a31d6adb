//! Who may do what: bearer tokens with roles, the rule each route follows, the decision to
//! run open (no tokens, loopback only), and the audit trail of changes.

mod audit;
pub mod device;
pub mod mac;
mod tokens;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use audit::{AuditEvent, AuditLog};
#[cfg(test)]
pub(crate) use tokens::tests as tokens_tests;
pub use tokens::{pick, NewToken, StoredToken, TokenInfo, TokenStore, TokenTable};

/// Why an access decision or a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this route needs a bearer token (Authorization: Bearer <token>)")]
    Missing,
    #[error("the bearer token is not valid")]
    Unknown,
    #[error("a change made with a console session needs its X-Fwrepo-Csrf header")]
    Csrf,
    #[error("role {have} may not {action}; it needs {need}")]
    Forbidden {
        /// The token's name, for the audit trail.
        name: String,
        have: Role,
        need: Role,
        action: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("a token named {0:?} already exists")]
    NameTaken(String),
    #[error("no token named or numbered {0:?}")]
    NotFound(String),
    #[error("{0:?} is the last admin token: revoking it would leave nobody able to manage tokens (create another admin token first, or force it with `fwrepo token revoke --force`)")]
    LastAdmin(String),
    #[error("token store {path}: {message}")]
    Store { path: String, message: String },
}

impl AuthError {
    pub fn code(&self) -> (&'static str, crate::error::Kind) {
        use crate::error::Kind;
        match self {
            AuthError::Missing => ("unauthenticated", Kind::Unauthorized),
            AuthError::Unknown => ("invalid-token", Kind::Unauthorized),
            AuthError::Csrf => ("csrf-check-failed", Kind::Forbidden),
            AuthError::Forbidden { .. } => ("forbidden", Kind::Forbidden),
            AuthError::Invalid(_) => ("invalid-parameter", Kind::BadRequest),
            AuthError::NameTaken(_) => ("token-name-taken", Kind::Conflict),
            AuthError::NotFound(_) => ("token-not-found", Kind::NotFound),
            AuthError::LastAdmin(_) => ("last-admin-token", Kind::Conflict),
            AuthError::Store { .. } => ("token-store-unavailable", Kind::Unavailable),
        }
    }
}

/// What a token may do. `admin` covers everything; `publisher` and `operator` each add
/// their changes to what `reader` may do. `gateway` is a device-side role: it may act as any
/// device on the hawkBit device API (`Authorization: GatewayToken ...`) and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Publisher,
    Operator,
    Reader,
    Gateway,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Publisher,
        Role::Operator,
        Role::Reader,
        Role::Gateway,
    ];

    /// Whether a holder of `self` may use a route that needs `need`.
    pub fn covers(self, need: Role) -> bool {
        match self {
            Role::Admin => true,
            Role::Publisher => matches!(need, Role::Publisher | Role::Reader),
            Role::Operator => matches!(need, Role::Operator | Role::Reader),
            Role::Reader => need == Role::Reader,
            Role::Gateway => need == Role::Gateway,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Publisher => "publisher",
            Role::Operator => "operator",
            Role::Reader => "reader",
            Role::Gateway => "gateway",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Role, AuthError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                AuthError::Invalid(format!(
                    "role {s:?}: one of admin, publisher, operator, reader, gateway"
                ))
            })
    }
}

/// The rule a route follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Anyone, always (health).
    Public,
    /// Devices: downloads, work requests, reports. Open; package downloads can require the
    /// task's capability (`auth.package_tokens`).
    Device,
    /// Firmware downloads by name: open like `Device`, but with `auth.package_tokens` on a
    /// `reader` token is needed, so devices go through their task's package URI.
    DeviceByName,
    /// A token with a role covering this one.
    Role(Role),
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Open mode, or a route that needs no token.
    Anonymous,
    Token {
        name: String,
        role: Role,
    },
}

impl Caller {
    /// The name audit events carry.
    pub fn name(&self) -> &str {
        match self {
            Caller::Anonymous => "anonymous",
            Caller::Token { name, .. } => name,
        }
    }
}

/// Whether the service may run without tokens: only while every listener is on loopback,
/// unless the operator said `--insecure`.
pub fn open_allowed(listeners: &[SocketAddr], insecure: bool) -> bool {
    insecure || listeners.iter().all(|a| a.ip().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_cover_as_documented() {
        use Role::*;
        let table = [
            (Admin, [true, true, true, true, true]),
            (Publisher, [false, true, false, true, false]),
            (Operator, [false, false, true, true, false]),
            (Reader, [false, false, false, true, false]),
            (Gateway, [false, false, false, false, true]),
        ];
        for (have, row) in table {
            for (need, want) in Role::ALL.into_iter().zip(row) {
                assert_eq!(have.covers(need), want, "{have} covers {need}");
            }
        }
        assert!("auditor".parse::<Role>().is_err());
    }

    #[test]
    fn open_only_on_loopback() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let lo6: SocketAddr = "[::1]:1".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert!(open_allowed(&[lo, lo6], false));
        assert!(!open_allowed(&[lo, any], false));
        assert!(open_allowed(&[lo, any], true));
    }
}
