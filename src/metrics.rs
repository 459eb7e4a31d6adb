//! Prometheus counters and gauges, rendered by hand in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Process-wide metrics.
#[derive(Default)]
pub struct Metrics {
    /// route → status → count; nested so a known route is found without allocating.
    requests: Mutex<BTreeMap<String, BTreeMap<u16, u64>>>,
    bytes_served: AtomicU64,
    uploads: AtomicU64,
    firmware_count: AtomicU64,
    firmware_bytes: AtomicU64,
    /// HTTP connections closed by a limit, by [`Cut`].
    cuts: [AtomicU64; Cut::ALL.len()],
    dtls_sessions: AtomicU64,
    dtls_handshakes: AtomicU64,
    resumable_bytes: AtomicU64,
}

/// Why the server closed an HTTP connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// No complete request headers in `http.header_read_timeout`.
    HeaderTimeout,
    /// Kept alive with no next request for `http.idle_timeout`.
    Idle,
    /// The client took no bytes of the response for `http.body_timeout`.
    WriteStalled,
}

impl Cut {
    const ALL: [Cut; 3] = [Cut::HeaderTimeout, Cut::Idle, Cut::WriteStalled];

    pub fn as_str(self) -> &'static str {
        match self {
            Cut::HeaderTimeout => "header-timeout",
            Cut::Idle => "idle",
            Cut::WriteStalled => "write-stalled",
        }
    }
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let by_status = match map.get_mut(route) {
            Some(s) => s,
            None => map.entry(route.to_owned()).or_default(),
        };
        *by_status.entry(status).or_default() += 1;
    }

    pub fn cut(&self, why: Cut) {
        self.cuts[why as usize].fetch_add(1, Relaxed);
    }

    /// DTLS sessions held, and how many of them are still shaking hands.
    pub fn set_dtls(&self, sessions: u64, handshaking: u64) {
        self.dtls_sessions.store(sessions, Relaxed);
        self.dtls_handshakes.store(handshaking, Relaxed);
    }

    /// Bytes a resumable upload's PATCH added (a byte sent twice counts twice).
    pub fn resumable_received(&self, bytes: u64) {
        self.resumable_bytes.fetch_add(bytes, Relaxed);
    }

    pub fn served(&self, bytes: u64) {
        self.bytes_served.fetch_add(bytes, Relaxed);
    }

    pub fn set_stored(&self, count: u64, bytes: u64) {
        self.firmware_count.store(count, Relaxed);
        self.firmware_bytes.store(bytes, Relaxed);
    }

    pub fn firmware_added(&self, size: u64) {
        self.uploads.fetch_add(1, Relaxed);
        self.firmware_count.fetch_add(1, Relaxed);
        self.firmware_bytes.fetch_add(size, Relaxed);
    }

    pub fn firmware_removed(&self, size: u64) {
        let _ = self
            .firmware_count
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
        let _ = self
            .firmware_bytes
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(size)));
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP fwrepo_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE fwrepo_http_requests_total counter\n");
        let map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        for (route, by_status) in map.iter() {
            let route = route.replace('\\', "\\\\").replace('"', "\\\"");
            for (status, n) in by_status {
                let _ = writeln!(
                    out,
                    "fwrepo_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        drop(map);
        out.push_str("# HELP fwrepo_http_connections_cut_total HTTP connections closed by a limit, by reason.\n");
        out.push_str("# TYPE fwrepo_http_connections_cut_total counter\n");
        for why in Cut::ALL {
            let n = self.cuts[why as usize].load(Relaxed);
            let _ = writeln!(
                out,
                "fwrepo_http_connections_cut_total{{reason=\"{}\"}} {n}",
                why.as_str()
            );
        }
        let gauges = [
            (
                "fwrepo_bytes_served_total",
                "counter",
                "Firmware bytes sent to clients.",
                &self.bytes_served,
            ),
            (
                "fwrepo_uploads_total",
                "counter",
                "Firmware images stored.",
                &self.uploads,
            ),
            (
                "fwrepo_firmware_count",
                "gauge",
                "Firmware images held.",
                &self.firmware_count,
            ),
            (
                "fwrepo_firmware_bytes",
                "gauge",
                "Bytes of firmware held.",
                &self.firmware_bytes,
            ),
            (
                "fwrepo_resumable_upload_bytes_total",
                "counter",
                "Bytes received by resumable uploads (PATCH bodies kept).",
                &self.resumable_bytes,
            ),
            (
                "fwrepo_dtls_sessions",
                "gauge",
                "DTLS sessions held (established or shaking hands).",
                &self.dtls_sessions,
            ),
            (
                "fwrepo_dtls_handshakes",
                "gauge",
                "DTLS handshakes in progress.",
                &self.dtls_handshakes,
            ),
        ];
        for (name, kind, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        }
        out
    }
}
