//! What clients see of tasks: the status document, the work answer (JSON or CBOR) and the
//! transition events.

use serde::{Deserialize, Serialize};

use super::cbor::{self, Item};
use super::task::FotaTask;
use crate::meta::FirmwareRecord;
use crate::name::format_duration;

pub fn rfc3339(ms: i64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// A task transition as published on `GET /v1/events` (and between instances).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskEvent {
    pub fota_id: String,
    pub device_id: String,
    pub firmware: String,
    pub status: String,
    pub reason: Option<String>,
    pub state: u8,
    pub update_result: u8,
    pub bytes_served: u64,
    pub at: String,
    /// The campaign that released the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
}

impl TaskEvent {
    pub fn of(t: &FotaTask, now_ms: i64) -> TaskEvent {
        TaskEvent {
            fota_id: t.id.clone(),
            device_id: t.device_id.clone(),
            firmware: t.firmware.clone(),
            status: t.status.as_str().to_owned(),
            reason: t.reason.clone(),
            state: t.state,
            update_result: t.update_result,
            bytes_served: t.bytes_served,
            at: rfc3339(now_ms),
            campaign: t.campaign.as_ref().map(|c| c.id.clone()),
        }
    }
}

/// The status document of `GET /v1/fota/{fotaId}`, also the answer to a report. A typed
/// document serializes straight to the response: a `json!` tree built a map per object and a
/// string per field on every request (6% of the server's CPU for FOTA reports).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskDoc<'a> {
    fota_id: &'a str,
    device_id: &'a str,
    name: &'a str,
    status: &'static str,
    reason: Option<&'a str>,
    note: Option<&'a str>,
    state: u8,
    update_result: u8,
    package_uri: &'a str,
    progress: Progress,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    deadline: Option<String>,
    next_check: Option<String>,
    timeout_remaining: Option<String>,
    options: OptionsDoc<'a>,
    campaign_id: Option<&'a str>,
    history: Vec<TransitionDoc<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Progress {
    bytes_served: u64,
    size: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OptionsDoc<'a> {
    firmware_url: Option<&'a str>,
    timeout: String,
    protocol_type: &'static str,
    retention_period: Option<String>,
    description: &'a str,
    use_quota: bool,
    use_cached_data: bool,
    resume_after_downlink_failure: bool,
    image_delivery_method: &'static str,
    upgrade_strategy: &'static str,
    schedule: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TransitionDoc<'a> {
    at: String,
    status: &'static str,
    reason: Option<&'a str>,
    state: u8,
    update_result: u8,
    detail: Option<&'a str>,
}

pub fn task_json(t: &FotaTask, bytes_served: u64) -> TaskDoc<'_> {
    let o = &t.options;
    let duration = |ms: i64| format_duration(std::time::Duration::from_millis(ms.max(0) as u64));
    TaskDoc {
        fota_id: &t.id,
        device_id: &t.device_id,
        name: &t.firmware,
        status: t.status.as_str(),
        reason: t.reason.as_deref(),
        note: t.note.as_deref(),
        state: t.state,
        update_result: t.update_result,
        package_uri: &t.package_uri,
        progress: Progress {
            bytes_served,
            size: t.size,
        },
        created_at: rfc3339(t.created_ms),
        started_at: t.started_ms.map(rfc3339),
        finished_at: t.finished_ms.map(rfc3339),
        deadline: t.deadline_ms.map(rfc3339),
        next_check: t.wake_ms.map(rfc3339),
        timeout_remaining: t.remaining_ms.map(duration),
        options: OptionsDoc {
            firmware_url: o.firmware_url.as_deref(),
            timeout: duration(o.timeout_ms),
            protocol_type: o.protocol.name(),
            retention_period: o
                .retention_secs
                .map(|s| format_duration(std::time::Duration::from_secs(s))),
            description: &o.description,
            use_quota: o.use_quota,
            use_cached_data: o.use_cached_data,
            resume_after_downlink_failure: o.resume_after_downlink_failure,
            image_delivery_method: "pull",
            upgrade_strategy: o.upgrade_strategy.name(),
            schedule: &o.schedule.name,
        },
        campaign_id: t.campaign.as_ref().map(|c| c.id.as_str()),
        history: t
            .history
            .iter()
            .map(|h| TransitionDoc {
                at: rfc3339(h.at_ms),
                status: h.status.as_str(),
                reason: h.reason.as_deref(),
                state: h.state,
                update_result: h.update_result,
                detail: h.detail.as_deref(),
            })
            .collect(),
    }
}

/// The work answer for a device (JSON; CBOR below has the same keys).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkDoc<'a> {
    fota_id: &'a str,
    package_uri: &'a str,
    name: &'a str,
    size: u64,
    sha256: &'a str,
    signature: &'a str,
    key_id: &'a str,
    upgrade_strategy: &'static str,
}

pub fn work_json<'a>(t: &'a FotaTask, r: &'a FirmwareRecord) -> WorkDoc<'a> {
    WorkDoc {
        fota_id: &t.id,
        package_uri: &t.package_uri,
        name: &r.name,
        size: r.size,
        sha256: &r.sha256,
        signature: &r.signature,
        key_id: &r.signature_key_id,
        upgrade_strategy: t.options.upgrade_strategy.name(),
    }
}

/// The work answer as CBOR (Content-Format 60), same keys as the JSON.
pub fn work_cbor(t: &FotaTask, r: &FirmwareRecord) -> Vec<u8> {
    cbor::map(&[
        ("fotaId", Item::Text(&t.id)),
        ("packageUri", Item::Text(&t.package_uri)),
        ("name", Item::Text(&r.name)),
        ("size", Item::Uint(r.size)),
        ("sha256", Item::Text(&r.sha256)),
        ("signature", Item::Text(&r.signature)),
        ("keyId", Item::Text(&r.signature_key_id)),
        (
            "upgradeStrategy",
            Item::Text(t.options.upgrade_strategy.name()),
        ),
    ])
}
