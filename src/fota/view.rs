//! What clients see of tasks: the status document, the work answer (JSON or CBOR) and the
//! transition events.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

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

/// The status document of `GET /v1/fota/{fotaId}`.
pub fn task_json(t: &FotaTask, bytes_served: u64) -> Value {
    let o = &t.options;
    json!({
        "fotaId": t.id,
        "deviceId": t.device_id,
        "name": t.firmware,
        "status": t.status.as_str(),
        "reason": t.reason,
        "note": t.note,
        "state": t.state,
        "updateResult": t.update_result,
        "packageUri": t.package_uri,
        "progress": {"bytesServed": bytes_served, "size": t.size},
        "createdAt": rfc3339(t.created_ms),
        "startedAt": t.started_ms.map(rfc3339),
        "finishedAt": t.finished_ms.map(rfc3339),
        "deadline": t.deadline_ms.map(rfc3339),
        "nextCheck": t.wake_ms.map(rfc3339),
        "timeoutRemaining": t.remaining_ms.map(|ms| format_duration(std::time::Duration::from_millis(ms as u64))),
        "options": {
            "firmwareUrl": o.firmware_url,
            "timeout": format_duration(std::time::Duration::from_millis(o.timeout_ms as u64)),
            "protocolType": o.protocol.name(),
            "retentionPeriod": o.retention_secs.map(|s| format_duration(std::time::Duration::from_secs(s))),
            "description": o.description,
            "useQuota": o.use_quota,
            "useCachedData": o.use_cached_data,
            "resumeAfterDownlinkFailure": o.resume_after_downlink_failure,
            "imageDeliveryMethod": "pull",
            "upgradeStrategy": o.upgrade_strategy.name(),
            "schedule": o.schedule.name,
        },
        "campaignId": t.campaign.as_ref().map(|c| &c.id),
        "history": t.history.iter().map(|h| json!({
            "at": rfc3339(h.at_ms),
            "status": h.status.as_str(),
            "reason": h.reason,
            "state": h.state,
            "updateResult": h.update_result,
            "detail": h.detail,
        })).collect::<Vec<_>>(),
    })
}

/// The work answer for a device, as JSON.
pub fn work_json(t: &FotaTask, r: &FirmwareRecord) -> Value {
    json!({
        "fotaId": t.id,
        "packageUri": t.package_uri,
        "name": r.name,
        "size": r.size,
        "sha256": r.sha256,
        "signature": r.signature,
        "keyId": r.signature_key_id,
        "upgradeStrategy": t.options.upgrade_strategy.name(),
    })
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
