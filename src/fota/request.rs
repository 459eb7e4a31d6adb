//! The `scheduleFirmwareUpdate` payload of the seed, parsed field by field so every refusal
//! names its field, with the seed's defaults.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::name::{parse_duration, FirmwareName};

/// Default task timeout of the seed (`"1200s"`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1200);

/// Why a payload is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// Well-formed, but naming nothing or asking for nothing (an unknown schedule, a zero
    /// timeout): 422.
    #[error("{field}: {message}")]
    Meaningless {
        field: &'static str,
        message: String,
    },
    #[error("unknown field {0:?}")]
    UnknownField(String),
    #[error("imageDeliveryMethod \"push\" is not supported: this service delivers firmware by pull (the device downloads the package URI it is given)")]
    Push,
}

pub use crate::model::protocol::{Protocol, UpgradeStrategy};

/// A parsed schedule request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleRequest {
    pub name: FirmwareName,
    pub firmware_url: Option<url::Url>,
    pub timeout: Duration,
    pub protocol: Protocol,
    pub retention: Option<Duration>,
    pub description: String,
    pub use_quota: bool,
    pub use_cached_data: bool,
    pub resume_after_downlink_failure: bool,
    pub upgrade_strategy: UpgradeStrategy,
    pub schedule: String,
    /// Not in the seed's payload: make the device's token along with the task.
    pub issue_device_token: bool,
}

fn invalid(field: &'static str, message: impl Into<String>) -> RequestError {
    RequestError::Invalid {
        field,
        message: message.into(),
    }
}

/// Field access that names the field in every refusal.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// A string, absent or null as `None`.
    fn string(&self, field: &'static str) -> Result<Option<&str>, RequestError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(invalid(field, "must be a string")),
        }
    }

    fn bool(&self, field: &'static str) -> Result<bool, RequestError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(invalid(field, "must be true or false")),
        }
    }

    fn duration(&self, field: &'static str) -> Result<Option<Duration>, RequestError> {
        self.string(field)?
            .map(|s| {
                parse_duration(s).map_err(|e| {
                    invalid(
                        field,
                        format!("{e} (a duration such as \"1200s\" or \"2h\")"),
                    )
                })
            })
            .transpose()
    }
}

/// Checks a firmware URL: absolute http(s), no credentials.
pub fn parse_url(field: &'static str, s: &str) -> Result<url::Url, RequestError> {
    let url = url::Url::parse(s).map_err(|e| invalid(field, format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(field, "must be an http or https URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(field, "must not carry credentials"));
    }
    Ok(url)
}

const FIELDS: [&str; 13] = [
    "name",
    "firmwareUrl",
    "timeout",
    "protocolType",
    "retentionPeriod",
    "description",
    "useQuota",
    "useCachedData",
    "resumeAfterDownlinkFailure",
    "imageDeliveryMethod",
    "upgradeStrategy",
    "schedule",
    "issueDeviceToken",
];

impl ScheduleRequest {
    pub fn parse(body: &Value) -> Result<ScheduleRequest, RequestError> {
        let Value::Object(map) = body else {
            return Err(invalid("body", "must be a JSON object"));
        };
        if let Some(k) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(RequestError::UnknownField(k.clone()));
        }
        let f = Fields(map);
        let name = f
            .string("name")?
            .ok_or_else(|| invalid("name", "is required"))?;
        let name = FirmwareName::parse(name).map_err(|e| invalid("name", e.to_string()))?;
        let firmware_url = f
            .string("firmwareUrl")?
            .map(|s| parse_url("firmwareUrl", s))
            .transpose()?;
        let timeout = f.duration("timeout")?.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(RequestError::Meaningless {
                field: "timeout",
                message: "must be longer than zero".into(),
            });
        }
        let protocol = match f.string("protocolType")? {
            None => Protocol::Coap,
            Some(s) => Protocol::parse(s).ok_or_else(|| {
                invalid(
                    "protocolType",
                    format!("{s:?} is not one of COAP, COAPS, COAP_TCP, COAPS_TCP, HTTP, HTTPS"),
                )
            })?,
        };
        let description = f.string("description")?.unwrap_or_default().to_owned();
        crate::firmware::check_text("description", &description)
            .map_err(|e| invalid("description", e.to_string()))?;
        match f.string("imageDeliveryMethod")? {
            None => {}
            Some(s) if s.eq_ignore_ascii_case("pull") => {}
            Some(s) if s.eq_ignore_ascii_case("push") => return Err(RequestError::Push),
            Some(s) => {
                return Err(invalid(
                    "imageDeliveryMethod",
                    format!("{s:?} is not pull or push"),
                ))
            }
        }
        let upgrade_strategy = match f.string("upgradeStrategy")? {
            None => UpgradeStrategy::WithoutObservations,
            Some(s) => UpgradeStrategy::ALL
                .iter()
                .find(|(_, n)| n.eq_ignore_ascii_case(s))
                .map(|(u, _)| *u)
                .ok_or_else(|| {
                    invalid(
                        "upgradeStrategy",
                        format!("{s:?} is not one of WithoutObservations, ObservationTrigger, ObservationBased, SendBased"),
                    )
                })?,
        };
        let schedule = f.string("schedule")?.unwrap_or("always").to_owned();
        super::schedule::check_name(&schedule).map_err(|e| invalid("schedule", e.to_string()))?;
        Ok(ScheduleRequest {
            name,
            firmware_url,
            timeout,
            protocol,
            retention: f.duration("retentionPeriod")?,
            description,
            use_quota: f.bool("useQuota")?,
            use_cached_data: f.bool("useCachedData")?,
            resume_after_downlink_failure: f.bool("resumeAfterDownlinkFailure")?,
            upgrade_strategy,
            schedule,
            issue_device_token: f.bool("issueDeviceToken")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seed_payload_with_defaults() {
        let r = ScheduleRequest::parse(&json!({
            "name": "anjay-firmware",
            "firmwareUrl": "https://example.repository.com/artifactory/gitlfs/demo.fw-pkg",
        }))
        .unwrap();
        assert_eq!(r.timeout, DEFAULT_TIMEOUT);
        assert_eq!(r.protocol, Protocol::Coap);
        assert_eq!(r.retention, None);
        assert_eq!(r.schedule, "always");
        assert_eq!(r.upgrade_strategy, UpgradeStrategy::WithoutObservations);
        assert!(!r.use_quota && !r.use_cached_data && !r.resume_after_downlink_failure);

        let r = ScheduleRequest::parse(&json!({
            "name": "anjay-firmware", "timeout": "30m", "protocolType": "coaps_tcp",
            "retentionPeriod": "300s", "description": "demo", "useQuota": true,
            "imageDeliveryMethod": "PULL", "upgradeStrategy": "SendBased", "schedule": "weekends",
        }))
        .unwrap();
        assert_eq!(r.protocol, Protocol::CoapsTcp);
        assert_eq!(r.retention, Some(Duration::from_secs(300)));
        assert_eq!(r.timeout, Duration::from_secs(1800));
    }

    #[test]
    fn refusals_name_the_field() {
        let field = |v: Value| match ScheduleRequest::parse(&v) {
            Err(RequestError::Invalid { field, .. }) => field.to_owned(),
            Err(RequestError::Meaningless { field, .. }) => field.to_owned(),
            Err(RequestError::UnknownField(f)) => format!("unknown:{f}"),
            Err(RequestError::Push) => "push".into(),
            Ok(_) => "ok".into(),
        };
        assert_eq!(field(json!({})), "name");
        assert_eq!(field(json!({"name": "a", "timeout": "soon"})), "timeout");
        assert_eq!(field(json!({"name": "a", "timeout": "0s"})), "timeout");
        assert_eq!(
            field(json!({"name": "a", "retentionPeriod": 5})),
            "retentionPeriod"
        );
        assert_eq!(
            field(json!({"name": "a", "protocolType": "FTP"})),
            "protocolType"
        );
        assert_eq!(
            field(json!({"name": "a", "upgradeStrategy": "Magic"})),
            "upgradeStrategy"
        );
        assert_eq!(field(json!({"name": "a", "useQuota": "yes"})), "useQuota");
        assert_eq!(
            field(json!({"name": "a", "firmwareUrl": "ftp://x/y"})),
            "firmwareUrl"
        );
        assert_eq!(
            field(json!({"name": "a", "imageDeliveryMethod": "push"})),
            "push"
        );
        assert_eq!(
            field(json!({"name": "a", "retension": "1d"})),
            "unknown:retension"
        );
        assert_eq!(field(json!({"name": "a/b"})), "name");
        assert_eq!(field(json!({"name": "a", "schedule": "x y"})), "schedule");
    }
}
