//! The audit trail: every change (uploads, deletions, schedules, cancels, key and token
//! operations) as one JSON line naming the token that made it, appended to a file and logged
//! under the `audit` target.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// How long an opened trail is written before it is opened again by name. Opening it for
/// every line cost an open and a close per change (7% of a task creation's CPU); opening it
/// once for good would keep writing into a trail that logrotate has renamed away. Lines
/// written within this time after a rotation land at the end of the renamed file.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// Appends events to a file; an empty path logs only.
pub struct AuditLog {
    path: Option<PathBuf>,
    /// One writer at a time, so lines never interleave; the trail and when it was opened.
    file: Mutex<Option<(std::fs::File, Instant)>>,
    reopen_after: Duration,
}

impl AuditLog {
    pub fn open(path: Option<&Path>) -> AuditLog {
        AuditLog {
            path: path.map(Path::to_owned),
            file: Mutex::new(None),
            reopen_after: REOPEN_AFTER,
        }
    }

    /// Logs and appends `event`. A failed append is logged loudly but does not undo the
    /// change it records (which has already happened).
    pub fn record(&self, event: &AuditEvent) {
        let line = serde_json::to_string(event).unwrap_or_default();
        tracing::info!(target: "audit", actor = %event.actor, action = %event.action, target_path = %event.target, status = ?event.status, "audit");
        let Some(path) = &self.path else { return };
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if file
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= self.reopen_after)
        {
            *file = None;
            match OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
            {
                Ok(f) => *file = Some((f, Instant::now())),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "audit log append failed");
                    return;
                }
            }
        }
        let Some((f, _)) = file.as_mut() else { return };
        // One write of the whole line: O_APPEND keeps it whole beside other writers (the
        // command line appends to the same trail).
        if let Err(e) = f.write_all(format!("{line}\n").as_bytes()) {
            // Opened again by name for the next line.
            *file = None;
            tracing::error!(path = %path.display(), error = %e, "audit log append failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["target"].to_string())
            .collect()
    }

    #[test]
    fn lines_follow_a_rotation_once_the_trail_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let event = |t: &str| AuditEvent::now("ci", Some("admin"), "POST /x", t);
        // Reopened for every line: the line after a rotation starts a new trail.
        let mut log = AuditLog::open(Some(&path));
        log.reopen_after = Duration::ZERO;
        log.record(&event("a"));
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        log.record(&event("b"));
        assert_eq!(lines(&dir.path().join("audit.log.1")), ["\"a\""]);
        assert_eq!(lines(&path), ["\"b\""]);
        // Within the reopen interval, lines go on into the trail as it was opened.
        let mut held = AuditLog::open(Some(&path));
        held.reopen_after = Duration::from_secs(3600);
        held.record(&event("c"));
        std::fs::rename(&path, dir.path().join("audit.log.2")).unwrap();
        held.record(&event("d"));
        assert_eq!(
            lines(&dir.path().join("audit.log.2")),
            ["\"b\"", "\"c\"", "\"d\""]
        );
        assert!(!path.exists());
    }
}
