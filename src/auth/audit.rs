//! The audit trail: every change (uploads, deletions, schedules, cancels, key and token
//! operations) as one JSON line naming the token that made it, appended to a file and logged
//! under the `audit` target.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// One change.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    pub at: String,
    /// The token's name, `anonymous` in open mode, `cli:<user>` from the command line.
    pub actor: String,
    pub role: Option<String>,
    /// What was done: `PUT /v1/firmware/{name}`, `token create`, ...
    pub action: String,
    /// The resource: the request path, or the token's name.
    pub target: String,
    /// HTTP status of the answer; absent for command-line changes.
    pub status: Option<u16>,
}

impl AuditEvent {
    pub fn now(actor: &str, role: Option<&str>, action: &str, target: &str) -> AuditEvent {
        AuditEvent {
            at: jiff::Timestamp::now().to_string(),
            actor: actor.to_owned(),
            role: role.map(str::to_owned),
            action: action.to_owned(),
            target: target.to_owned(),
            status: None,
        }
    }
}

/// Appends events to a file; an empty path logs only.
pub struct AuditLog {
    path: Option<PathBuf>,
    /// One writer at a time, so lines never interleave.
    file: Mutex<()>,
}

impl AuditLog {
    pub fn open(path: Option<&Path>) -> AuditLog {
        AuditLog {
            path: path.map(Path::to_owned),
            file: Mutex::new(()),
        }
    }

    /// Logs and appends `event`. A failed append is logged loudly but does not undo the
    /// change it records (which has already happened).
    pub fn record(&self, event: &AuditEvent) {
        let line = serde_json::to_string(event).unwrap_or_default();
        tracing::info!(target: "audit", actor = %event.actor, action = %event.action, target_path = %event.target, status = ?event.status, "audit");
        let Some(path) = &self.path else { return };
        let _one = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let appended = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = appended {
            tracing::error!(path = %path.display(), error = %e, "audit log append failed");
        }
    }
}
