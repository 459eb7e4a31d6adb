//! A device in the registry: what operators say of it (tags, attributes) and what it says of
//! itself (the firmware it reports, the protocols it supports, when it was last seen).
//!
//! The two halves are written by different people at different times, so the stores merge a
//! change into the record field by field (a report never undoes a tag change made meanwhile).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Most tags or attributes one device may carry.
pub const MAX_LABELS: usize = 64;
/// Longest tag or attribute key, and value.
pub const MAX_LABEL_KEY: usize = 64;
pub const MAX_LABEL_VALUE: usize = 256;

/// One device. Every field but the id has a default, so records written before the registry
/// (a report's package name and version) read as devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub device_id: String,
    /// Set by operators: `region = eu`.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Set by operators or reported by the device's client (configuration data).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// /5/0/6 PkgName last reported.
    #[serde(default)]
    pub pkg_name: Option<String>,
    /// /5/0/7 PkgVersion last reported.
    #[serde(default)]
    pub pkg_version: Option<String>,
    /// /3/0/3 Firmware Version last reported.
    #[serde(default)]
    pub firmware_version: Option<String>,
    /// /5/0/8 Firmware Update Protocol Support last reported (0 CoAP, 1 CoAPS, 2 HTTP,
    /// 3 HTTPS, 4 CoAP/TCP, 5 CoAP/TLS).
    #[serde(default)]
    pub protocols: Vec<u8>,
    /// When the device last reported its firmware.
    #[serde(default)]
    pub reported_ms: Option<i64>,
    /// When the device entered the registry.
    #[serde(default)]
    pub created_ms: i64,
    /// Its last work request or report (kept to a granularity, so polling costs no write).
    #[serde(default)]
    pub last_seen_ms: Option<i64>,
}

impl Device {
    pub fn new(device_id: &str, now_ms: i64) -> Device {
        Device {
            device_id: device_id.to_owned(),
            created_ms: now_ms,
            ..Device::default()
        }
    }

    /// The version a campaign compares with its firmware's: /5/0/7 when reported, else /3/0/3.
    pub fn version(&self) -> Option<&str> {
        self.pkg_version
            .as_deref()
            .or(self.firmware_version.as_deref())
    }

    /// Whether the device reports running `version` (as /5/0/7 or /3/0/3).
    pub fn runs(&self, version: &str) -> bool {
        self.pkg_version.as_deref() == Some(version)
            || self.firmware_version.as_deref() == Some(version)
    }

    /// `self` with the top-level fields of `patch` replaced (the merge every store applies);
    /// the id and creation time never change.
    pub fn merged(&self, patch: &Map<String, Value>) -> Result<Device, serde_json::Error> {
        let mut whole = match serde_json::to_value(self)? {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        for (k, v) in patch {
            if k != "deviceId" && k != "createdMs" {
                whole.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(Value::Object(whole))
    }
}

/// Checks operator-supplied labels (tags or attributes): a JSON object of strings within the
/// limits. `field` names the member in the refusal.
pub fn labels(field: &str, v: &Value) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(m) = v else {
        return Err(format!("{field} must be an object of strings"));
    };
    if m.len() > MAX_LABELS {
        return Err(format!("{field}: at most {MAX_LABELS} entries"));
    }
    let mut out = BTreeMap::new();
    for (k, v) in m {
        check_key(field, k)?;
        let Value::String(s) = v else {
            return Err(format!("{field}.{k} must be a string"));
        };
        if s.len() > MAX_LABEL_VALUE || s.chars().any(char::is_control) {
            return Err(format!(
                "{field}.{k}: at most {MAX_LABEL_VALUE} bytes, no control characters"
            ));
        }
        out.insert(k.clone(), s.clone());
    }
    Ok(out)
}

fn check_key(field: &str, k: &str) -> Result<(), String> {
    let ok = !k.is_empty()
        && k.len() <= MAX_LABEL_KEY
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field}: key {k:?} must be 1-{MAX_LABEL_KEY} characters of letters, digits, _ - . :"
        ))
    }
}

/// RFC 7396 merge of a patch into labels: a string sets, `null` removes.
pub fn patch_labels(
    field: &str,
    current: &BTreeMap<String, String>,
    patch: &Value,
) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(m) = patch else {
        return Err(format!("{field} must be an object"));
    };
    let mut out = current.clone();
    let mut sets = Map::new();
    for (k, v) in m {
        if v.is_null() {
            check_key(field, k)?;
            out.remove(k);
        } else {
            sets.insert(k.clone(), v.clone());
        }
    }
    out.extend(labels(field, &Value::Object(sets))?);
    if out.len() > MAX_LABELS {
        return Err(format!("{field}: at most {MAX_LABELS} entries"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_from_before_the_registry_read_as_devices() {
        let old = json!({"deviceId": "d", "pkgName": "app", "pkgVersion": "1.0", "reportedMs": 5});
        let d: Device = serde_json::from_value(old).unwrap();
        assert_eq!(d.version(), Some("1.0"));
        assert_eq!(d.reported_ms, Some(5));
        assert!(d.tags.is_empty());
    }

    #[test]
    fn a_merge_replaces_only_the_fields_it_names() {
        let mut d = Device::new("d", 1);
        d.tags.insert("region".into(), "eu".into());
        let patch = json!({"pkgVersion": "2.0", "deviceId": "other", "createdMs": 9});
        let m = d.merged(patch.as_object().unwrap()).unwrap();
        assert_eq!(m.tags, d.tags);
        assert_eq!(m.pkg_version.as_deref(), Some("2.0"));
        assert_eq!((m.device_id.as_str(), m.created_ms), ("d", 1));
    }

    #[test]
    fn labels_are_checked_and_patched() {
        assert!(labels("tags", &json!({"a": 1})).is_err());
        assert!(labels("tags", &json!({"a b": "x"})).is_err());
        assert!(labels("tags", &json!(["x"])).is_err());
        let cur = labels("tags", &json!({"a": "1", "b": "2"})).unwrap();
        let out = patch_labels("tags", &cur, &json!({"a": null, "c": "3"})).unwrap();
        assert!(patch_labels("tags", &cur, &json!({"": null})).is_err());
        assert_eq!(out, labels("tags", &json!({"b": "2", "c": "3"})).unwrap());
    }
}
