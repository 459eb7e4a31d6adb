//! The device registry and groups: listing with a filter, a device's page (what it reported,
//! its current task and history), operators' tags and attributes, bulk import, and groups
//! resolved to devices.

use serde_json::{json, Map, Value};

use super::{invalid, Fleet, FleetError};
use crate::fota::check_device;
use crate::fota::task::FotaTask;
use crate::fota::view::rfc3339;
use crate::model::device::{labels, patch_labels, Device};
use crate::model::filter::Filter;
use crate::model::group::{Group, Members, Selector, MAX_STATIC};

/// Devices read per store call while a filter scans the registry.
const SCAN_BATCH: usize = 1000;
/// Most devices one listing request examines; past it the answer has fewer devices than asked
/// and a cursor to go on from.
const SCAN_LIMIT: usize = 50_000;
/// Tasks shown on a device's page.
const HISTORY: usize = 20;

/// LwM2M /5/0/8 values by name.
fn protocol_name(p: u8) -> &'static str {
    match p {
        0 => "COAP",
        1 => "COAPS",
        2 => "HTTP",
        3 => "HTTPS",
        4 => "COAP_TCP",
        5 => "COAP_TLS",
        _ => "unknown",
    }
}

/// A device as the API shows it.
pub fn device_json(d: &Device, current: Option<&FotaTask>, history: &[FotaTask]) -> Value {
    let task = |t: &FotaTask| {
        json!({
            "fotaId": t.id,
            "name": t.firmware,
            "status": t.status.as_str(),
            "reason": t.reason,
            "campaignId": t.campaign.as_ref().map(|c| &c.id),
            "createdAt": rfc3339(t.created_ms),
            "finishedAt": t.finished_ms.map(rfc3339),
        })
    };
    json!({
        "deviceId": d.device_id,
        "tags": d.tags,
        "attributes": d.attributes,
        "firmware": {
            "pkgName": d.pkg_name,
            "pkgVersion": d.pkg_version,
            "firmwareVersion": d.firmware_version,
            "protocols": d.protocols.iter().map(|p| protocol_name(*p)).collect::<Vec<_>>(),
            "reportedAt": d.reported_ms.map(rfc3339),
        },
        "createdAt": rfc3339(d.created_ms),
        "lastSeen": d.last_seen_ms.map(rfc3339),
        "currentTask": current.map(task),
        "tasks": history.iter().map(task).collect::<Vec<_>>(),
    })
}

/// What a bulk import did.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportReport {
    pub imported: u64,
    pub failed: u64,
    /// The refused lines (1-based) with why; the others were applied.
    pub errors: Vec<Value>,
}

/// Most refused lines an import report lists (the count covers them all).
const MAX_REPORTED_ERRORS: usize = 1000;

fn check_group_name(name: &str) -> Result<(), FleetError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            "a group name is 1-64 letters, digits, '.', '_' or '-'",
        ))
    }
}

/// The tags and attributes of a PUT or import line, checked.
fn profile(body: &Map<String, Value>, allow_id: bool) -> Result<Map<String, Value>, FleetError> {
    let mut patch = Map::new();
    for (k, v) in body {
        match k.as_str() {
            "tags" | "attributes" => {
                let field = if k == "tags" { "tags" } else { "attributes" };
                let checked = labels(field, v).map_err(|m| invalid(field, m))?;
                patch.insert(k.clone(), json!(checked));
            }
            "deviceId" if allow_id => {}
            other => {
                return Err(invalid(
                    "body",
                    format!("unknown field {other:?} (tags and attributes can be set)"),
                ))
            }
        }
    }
    Ok(patch)
}

impl Fleet {
    /// A page of devices in id order, optionally only those `filter` selects, and the cursor
    /// to go on from.
    pub async fn list_devices(
        &self,
        filter: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Device>, Option<String>), FleetError> {
        let filter = filter.map(Filter::parse).transpose()?;
        let mut out = Vec::new();
        let mut cursor = after.map(str::to_owned);
        let mut examined = 0;
        loop {
            let batch = match &filter {
                None => limit - out.len(),
                Some(_) => SCAN_BATCH,
            };
            let page = self.store.list_devices(cursor.as_deref(), batch).await?;
            let full = page.len() == batch;
            for d in page {
                examined += 1;
                cursor = Some(d.device_id.clone());
                if filter.as_ref().is_none_or(|f| f.matches(&d)) {
                    out.push(d);
                    if out.len() == limit {
                        return Ok((out, cursor));
                    }
                }
            }
            if !full {
                return Ok((out, None));
            }
            if examined >= SCAN_LIMIT {
                return Ok((out, cursor));
            }
        }
    }

    /// A device's page: its record, current task and latest tasks, and its PSK identity.
    pub async fn device(&self, id: &str) -> Result<Value, FleetError> {
        check_device(id)?;
        let d = self
            .store
            .get_device(id)
            .await?
            .ok_or_else(|| FleetError::NoDevice(id.to_owned()))?;
        let current = match self.store.active_task(id).await? {
            Some(t) => self.store.get_task(&t).await?,
            None => None,
        };
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        // Newest last in id order; keep the last few.
        loop {
            let page = self
                .store
                .list_tasks(Some(id), after.as_deref(), 500)
                .await?;
            let more = page.len() == 500;
            after = page.last().map(|t| t.id.clone());
            all.extend(page);
            if all.len() > HISTORY {
                all.drain(..all.len() - HISTORY);
            }
            if !more {
                break;
            }
        }
        all.reverse();
        let mut page = device_json(&d, current.as_ref(), &all);
        // Which DTLS identity it has, never the key.
        if let Some(p) = self.store.device_psk(id).await? {
            page["psk"] = json!({"identity": p.identity, "createdAt": p.created_at});
        }
        Ok(page)
    }

    /// `PUT`: the device's tags and attributes become these (absent ones empty); registers
    /// the device if it is new. Whether it was created.
    pub async fn put_device(&self, id: &str, body: &Value) -> Result<(Device, bool), FleetError> {
        check_device(id)?;
        let Value::Object(body) = body else {
            return Err(invalid("body", "must be a JSON object"));
        };
        let mut patch = profile(body, false)?;
        patch.entry("tags").or_insert_with(|| json!({}));
        patch.entry("attributes").or_insert_with(|| json!({}));
        let existed = self.store.get_device(id).await?.is_some();
        let d = self.store.merge_device(id, &patch, self.now_ms()).await?;
        self.wake.notify_one();
        Ok((d, !existed))
    }

    /// `PATCH`: a JSON merge patch (RFC 7396) of the tags and attributes.
    pub async fn patch_device(&self, id: &str, body: &Value) -> Result<Device, FleetError> {
        check_device(id)?;
        let Value::Object(body) = body else {
            return Err(invalid("body", "must be a JSON object"));
        };
        let d = self
            .store
            .get_device(id)
            .await?
            .ok_or_else(|| FleetError::NoDevice(id.to_owned()))?;
        let mut patch = Map::new();
        for (k, v) in body {
            let merged = match k.as_str() {
                "tags" => patch_labels("tags", &d.tags, v).map_err(|m| invalid("tags", m))?,
                "attributes" => patch_labels("attributes", &d.attributes, v)
                    .map_err(|m| invalid("attributes", m))?,
                other => {
                    return Err(invalid(
                        "body",
                        format!("unknown field {other:?} (tags and attributes can be changed)"),
                    ))
                }
            };
            patch.insert(k.clone(), json!(merged));
        }
        Ok(self.store.merge_device(id, &patch, self.now_ms()).await?)
    }

    pub async fn delete_device(&self, id: &str) -> Result<(), FleetError> {
        check_device(id)?;
        if self.store.delete_device(id).await? {
            Ok(())
        } else {
            Err(FleetError::NoDevice(id.to_owned()))
        }
    }

    /// Applies a batch of NDJSON lines (`(line number, text)`): each line is one device
    /// (`{"deviceId", "tags", "attributes"}`), applied whole or refused whole.
    pub async fn import(
        &self,
        lines: &[(u64, String)],
        report: &mut ImportReport,
    ) -> Result<(), FleetError> {
        let mut patches = Vec::with_capacity(lines.len());
        for (n, text) in lines {
            let parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| invalid("line", format!("invalid JSON: {e}")))
                .and_then(|v| {
                    let Value::Object(m) = v else {
                        return Err(invalid("line", "must be a JSON object"));
                    };
                    let id = m
                        .get("deviceId")
                        .and_then(Value::as_str)
                        .ok_or_else(|| invalid("deviceId", "is required"))?
                        .to_owned();
                    check_device(&id)?;
                    Ok((id, profile(&m, true)?))
                });
            match parsed {
                Ok(p) => patches.push(p),
                Err(e) => {
                    report.failed += 1;
                    if report.errors.len() < MAX_REPORTED_ERRORS {
                        report.errors.push(json!({
                            "line": n,
                            "code": e.code().0,
                            "message": e.to_string(),
                        }));
                    }
                }
            }
        }
        self.store.merge_devices(&patches, self.now_ms()).await?;
        report.imported += patches.len() as u64;
        self.wake.notify_one();
        Ok(())
    }

    pub async fn put_group(&self, name: &str, body: &Value) -> Result<(Group, bool), FleetError> {
        check_group_name(name)?;
        let Value::Object(body) = body else {
            return Err(invalid("body", "must be a JSON object"));
        };
        if let Some(k) = body
            .keys()
            .find(|k| !["devices", "filter", "description"].contains(&k.as_str()))
        {
            return Err(invalid("body", format!("unknown field {k:?}")));
        }
        let members = match (body.get("devices"), body.get("filter")) {
            (Some(d), None) => {
                let ids: Vec<String> = serde_json::from_value(d.clone())
                    .map_err(|_| invalid("devices", "must be a list of device ids"))?;
                if ids.len() > MAX_STATIC {
                    return Err(invalid("devices", format!("at most {MAX_STATIC} ids")));
                }
                for id in &ids {
                    check_device(id)?;
                }
                Members::Devices(ids)
            }
            (None, Some(Value::String(f))) => {
                Filter::parse(f)?;
                Members::Filter(f.clone())
            }
            (None, Some(_)) => return Err(invalid("filter", "must be a string")),
            _ => return Err(invalid(
                "body",
                "give either devices (a list of ids) or filter (see the README's filter grammar)",
            )),
        };
        let description = match body.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                crate::firmware::check_text("description", s)
                    .map_err(|e| invalid("description", e.to_string()))?;
                Some(s.clone())
            }
            Some(_) => return Err(invalid("description", "must be a string")),
        };
        let existed = self.store.get_group(name).await?.is_some();
        let g = Group {
            name: name.to_owned(),
            members,
            description,
            updated_ms: self.now_ms(),
        };
        self.store.put_group(&g).await?;
        self.wake.notify_one();
        Ok((g, !existed))
    }

    pub async fn group(&self, name: &str) -> Result<Group, FleetError> {
        self.store
            .get_group(name)
            .await?
            .ok_or_else(|| FleetError::NoGroup(name.to_owned()))
    }

    pub async fn groups(&self) -> Result<Vec<Group>, FleetError> {
        Ok(self.store.list_groups().await?)
    }

    pub async fn delete_group(&self, name: &str) -> Result<(), FleetError> {
        if self.store.delete_group(name).await? {
            Ok(())
        } else {
            Err(FleetError::NoGroup(name.to_owned()))
        }
    }

    /// A page of a group's devices: a static group's ids (whether registered or not), or the
    /// registered devices its filter selects.
    pub async fn group_devices(
        &self,
        name: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), FleetError> {
        match self.group(name).await?.members {
            Members::Devices(mut ids) => {
                ids.sort();
                ids.dedup();
                let from = after.map_or(0, |a| ids.partition_point(|x| x.as_str() <= a));
                let page: Vec<String> = ids.iter().skip(from).take(limit).cloned().collect();
                let next = (from + page.len() < ids.len())
                    .then(|| page.last().cloned())
                    .flatten();
                Ok((page, next))
            }
            Members::Filter(f) => {
                let (devices, next) = self.list_devices(Some(&f), after, limit).await?;
                Ok((devices.into_iter().map(|d| d.device_id).collect(), next))
            }
        }
    }

    /// Every device a selector holds: static ids as given, a filter over the whole registry.
    pub(super) async fn resolve(&self, s: &Selector) -> Result<Vec<String>, FleetError> {
        match s {
            Selector::Devices(ids) => Ok(ids.clone()),
            Selector::Filter(f) => {
                let mut out = Vec::new();
                let mut after: Option<String> = None;
                loop {
                    let page = self
                        .store
                        .list_devices(after.as_deref(), SCAN_BATCH * 10)
                        .await?;
                    let more = page.len() == SCAN_BATCH * 10;
                    after = page.last().map(|d| d.device_id.clone());
                    out.extend(
                        page.into_iter()
                            .filter(|d| f.matches(d))
                            .map(|d| d.device_id),
                    );
                    if !more {
                        return Ok(out);
                    }
                }
            }
        }
    }
}
