//! Device reports, as a plain JSON object or as the LwM2M SenML JSON pack (Content-Format
//! 110, RFC 8428) a device would Send: /5/0/3 State, /5/0/5 Update Result, /5/0/6 PkgName,
//! /5/0/7 PkgVersion, /5/0/8 Firmware Update Protocol Support (one record per instance) and
//! /3/0/3 Firmware Version; the last four go to the device registry. Other resources in a
//! pack are ignored.

use serde_json::Value;

use super::task::Report;

/// Longest accepted report body.
pub const MAX_REPORT: usize = 16 << 10;

/// Why a report is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    /// Not a report: bad JSON, wrong types, values out of range.
    #[error("{0}")]
    Malformed(String),
    /// A well-formed SenML pack without the State or Update Result.
    #[error("{0}")]
    Incomplete(String),
}

fn bad(m: impl Into<String>) -> ReportError {
    ReportError::Malformed(m.into())
}

fn small_int(field: &str, v: &Value, max: u8) -> Result<u8, ReportError> {
    let n = v
        .as_u64()
        .or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        })
        .ok_or_else(|| bad(format!("{field} must be an integer")))?;
    u8::try_from(n)
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| bad(format!("{field} must be 0 to {max}, not {n}")))
}

fn text(field: &str, v: &Value) -> Result<String, ReportError> {
    let s = v
        .as_str()
        .ok_or_else(|| bad(format!("{field} must be a string")))?;
    crate::firmware::check_text("pkg", s).map_err(|_| {
        bad(format!(
            "{field} must be at most {} characters, none of them control characters",
            crate::firmware::MAX_TEXT_LEN
        ))
    })?;
    Ok(s.to_owned())
}

fn protocol(field: &str, v: &Value) -> Result<u8, ReportError> {
    small_int(field, v, 5)
}

/// A report in plain JSON: `{"state", "result", "pkgName", "pkgVersion", "firmwareVersion",
/// "protocols"}`.
pub fn from_json(body: &[u8]) -> Result<Report, ReportError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    if v.is_array() {
        return from_senml_value(&v);
    }
    let Value::Object(map) = v else {
        return Err(bad("a report is a JSON object or a SenML pack"));
    };
    let mut report = Report::default();
    let (mut state, mut result) = (None, None);
    for (k, v) in &map {
        match k.as_str() {
            "state" => state = Some(small_int("state", v, 3)?),
            "result" => result = Some(small_int("result", v, 11)?),
            "pkgName" if !v.is_null() => report.pkg_name = Some(text("pkgName", v)?),
            "pkgVersion" if !v.is_null() => report.pkg_version = Some(text("pkgVersion", v)?),
            "firmwareVersion" if !v.is_null() => {
                report.firmware_version = Some(text("firmwareVersion", v)?)
            }
            "protocols" if !v.is_null() => {
                let list = v
                    .as_array()
                    .filter(|a| a.len() <= 8)
                    .ok_or_else(|| bad("protocols must be a list of up to 8 integers 0 to 5"))?;
                report.protocols = Some(
                    list.iter()
                        .map(|p| protocol("protocols", p))
                        .collect::<Result<_, _>>()?,
                );
            }
            "pkgName" | "pkgVersion" | "firmwareVersion" | "protocols" => {}
            other => return Err(bad(format!("unknown field {other:?}"))),
        }
    }
    report.state = state.ok_or_else(|| bad("state is required"))?;
    report.result = result.ok_or_else(|| bad("result is required"))?;
    Ok(report)
}

/// A report as an LwM2M SenML JSON pack.
pub fn from_senml(body: &[u8]) -> Result<Report, ReportError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("invalid SenML JSON: {e}")))?;
    from_senml_value(&v)
}

fn from_senml_value(v: &Value) -> Result<Report, ReportError> {
    let records = v
        .as_array()
        .ok_or_else(|| bad("a SenML pack is a JSON array"))?;
    let mut base = String::new();
    let mut report = Report::default();
    let (mut state, mut result) = (None, None);
    for (i, r) in records.iter().enumerate() {
        let r = r
            .as_object()
            .ok_or_else(|| bad(format!("record {i} is not an object")))?;
        if let Some(bn) = r.get("bn") {
            base = bn
                .as_str()
                .ok_or_else(|| bad(format!("record {i}: bn must be a string")))?
                .to_owned();
        }
        let n = match r.get("n") {
            None => "",
            Some(n) => n
                .as_str()
                .ok_or_else(|| bad(format!("record {i}: n must be a string")))?,
        };
        let name = format!("{base}{n}");
        let value = |key: &str| {
            r.get(key)
                .ok_or_else(|| bad(format!("record {i} ({name}) has no {key}")))
        };
        match name.as_str() {
            "/5/0/3" => state = Some(small_int("/5/0/3", value("v")?, 3)?),
            "/5/0/5" => result = Some(small_int("/5/0/5", value("v")?, 11)?),
            "/5/0/6" => report.pkg_name = Some(text("/5/0/6", value("vs")?)?),
            "/5/0/7" => report.pkg_version = Some(text("/5/0/7", value("vs")?)?),
            "/3/0/3" => report.firmware_version = Some(text("/3/0/3", value("vs")?)?),
            n if n == "/5/0/8"
                || n.strip_prefix("/5/0/8/")
                    .is_some_and(|i| i.parse::<u16>().is_ok()) =>
            {
                let list = report.protocols.get_or_insert_with(Vec::new);
                if list.len() >= 8 {
                    return Err(bad("at most 8 /5/0/8 instances"));
                }
                list.push(protocol(n, value("v")?)?);
            }
            _ => {}
        }
    }
    let missing = |m: &str| ReportError::Incomplete(m.to_owned());
    report.state = state.ok_or_else(|| missing("the pack has no /5/0/3 (State)"))?;
    report.result = result.ok_or_else(|| missing("the pack has no /5/0/5 (Update Result)"))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_json() {
        let r = from_json(br#"{"state":2,"result":0,"pkgName":"app","pkgVersion":"1.2"}"#).unwrap();
        assert_eq!((r.state, r.result), (2, 0));
        assert_eq!(r.pkg_name.as_deref(), Some("app"));
        assert!(from_json(br#"{"state":4,"result":0}"#).is_err());
        assert!(from_json(br#"{"state":1,"result":12}"#).is_err());
        assert!(from_json(br#"{"state":1}"#).is_err());
        assert!(from_json(br#"{"state":1,"result":0,"x":1}"#).is_err());
        assert!(from_json(b"not json").is_err());
        let r = from_json(br#"{"state":0,"result":0,"firmwareVersion":"1.2","protocols":[2,3]}"#)
            .unwrap();
        assert_eq!(
            (r.firmware_version.as_deref(), r.protocols),
            (Some("1.2"), Some(vec![2, 3]))
        );
        assert!(from_json(br#"{"state":0,"result":0,"protocols":[9]}"#).is_err());
    }

    #[test]
    fn senml_pack_with_base_name_and_other_objects() {
        let pack = br#"[
            {"bn":"/3/0/","n":"3","vs":"1.0.0"},
            {"bn":"/5/0/","n":"3","v":0},
            {"n":"5","v":1},
            {"n":"6","vs":"anjay"},
            {"n":"7","vs":"2.0"},
            {"n":"8","v":0}
        ]"#;
        let r = from_senml(pack).unwrap();
        assert_eq!((r.state, r.result), (0, 1));
        assert_eq!(r.pkg_version.as_deref(), Some("2.0"));
        assert_eq!(r.firmware_version.as_deref(), Some("1.0.0"));
        assert_eq!(r.protocols, Some(vec![0]));
        let r = from_senml(
            br#"[{"n":"/5/0/3","v":0},{"n":"/5/0/5","v":0},{"n":"/5/0/8/0","v":2},{"n":"/5/0/8/1","v":5}]"#,
        )
        .unwrap();
        assert_eq!(r.protocols, Some(vec![2, 5]));
        assert!(from_senml(
            br#"[{"n":"/5/0/3","v":0},{"n":"/5/0/5","v":0},{"n":"/5/0/8/0","v":6}]"#
        )
        .is_err());
        let r = from_senml(br#"[{"n":"/5/0/3","v":1.0},{"n":"/5/0/5","v":0}]"#).unwrap();
        assert_eq!((r.state, r.result), (1, 0));
        assert!(from_senml(br#"[{"n":"/5/0/3","v":1}]"#).is_err());
        assert!(from_senml(br#"[{"n":"/5/0/3","vs":"1"},{"n":"/5/0/5","v":0}]"#).is_err());
        assert!(from_senml(br#"{"n":"/5/0/3"}"#).is_err());
    }
}
