//! Firmware names (global identifiers) and retention periods, parsed once at the edge.

use std::fmt;
use std::time::Duration;

/// Longest firmware name. With the short device path `/fw/` this keeps download URIs inside
/// the 255 characters of the LwM2M Package URI resource (/5/0/1) for base URLs up to 123.
pub const MAX_NAME_LEN: usize = 128;

/// Why a name or a duration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("firmware name must not be empty")]
    Empty,
    #[error("firmware name is {0} characters long; the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error("firmware name contains {0:?}; allowed are A-Z a-z 0-9 . _ ~ -")]
    BadChar(char),
    #[error("firmware name must not be \".\" or \"..\"")]
    DotName,
    #[error(
        "invalid duration {0:?}: expected <integer><unit> with unit s, m, h, d or w (e.g. 30d)"
    )]
    BadDuration(String),
    #[error(
        "duration {0:?} has too many digits: at most 9 for s, 7 for m, 6 for h, 5 for d, 4 for w"
    )]
    DurationTooLong(String),
}

impl NameError {
    /// Stable error code for API clients.
    pub fn code(&self) -> &'static str {
        match self {
            NameError::BadDuration(_) | NameError::DurationTooLong(_) => "invalid-duration",
            _ => "invalid-name",
        }
    }
}

/// A validated global identifier such as `acme.com-7f3a9c`: 1 to 128 characters of the URI
/// unreserved set, so it is safe as a path segment in URLs and in object-store keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FirmwareName(String);

impl FirmwareName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if let Some(c) = s.chars().find(|c| !is_name_char(*c)) {
            return Err(NameError::BadChar(c));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(s.len()));
        }
        if s == "." || s == ".." {
            return Err(NameError::DotName);
        }
        Ok(FirmwareName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// RFC 3986 unreserved characters: they never need percent-encoding.
pub fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-')
}

impl fmt::Display for FirmwareName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses `<integer><unit>` with unit `s`, `m`, `h`, `d` or `w`.
pub fn parse_duration(s: &str) -> Result<Duration, NameError> {
    let bad = || NameError::BadDuration(s.to_owned());
    let unit = s.chars().last().ok_or_else(bad)?;
    let digits = &s[..s.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let (mult, max_digits) = match unit {
        's' => (1, 9),
        'm' => (60, 7),
        'h' => (3600, 6),
        'd' => (86_400, 5),
        'w' => (7 * 86_400, 4),
        _ => return Err(bad()),
    };
    if digits.len() > max_digits {
        return Err(NameError::DurationTooLong(s.to_owned()));
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(Duration::from_secs(n * mult))
}

/// Formats a duration in the largest unit that divides it exactly (`604800s` → `1w`).
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    for (unit, mult) in [('w', 604_800), ('d', 86_400), ('h', 3600), ('m', 60)] {
        if secs != 0 && secs.is_multiple_of(mult) {
            return format!("{}{unit}", secs / mult);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(FirmwareName::parse("acme.com-7f3a9c").is_ok());
        assert!(FirmwareName::parse("a~b_c").is_ok());
        assert_eq!(FirmwareName::parse(""), Err(NameError::Empty));
        assert_eq!(FirmwareName::parse("."), Err(NameError::DotName));
        assert_eq!(FirmwareName::parse(".."), Err(NameError::DotName));
        assert!(FirmwareName::parse("...").is_ok());
        assert_eq!(FirmwareName::parse("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(FirmwareName::parse("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(FirmwareName::parse("é"), Err(NameError::BadChar('é')));
        assert!(FirmwareName::parse(&"x".repeat(128)).is_ok());
        assert_eq!(
            FirmwareName::parse(&"x".repeat(129)),
            Err(NameError::TooLong(129))
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(1_209_600)
        );
        for bad in ["", "s", "10", "1x", "-1s", "1.5h", " 1s", "1sec", "1é"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            parse_duration("99999999999999999999s"),
            Err(NameError::DurationTooLong(_))
        ));
        assert!(matches!(
            parse_duration("10000w"),
            Err(NameError::DurationTooLong(_))
        ));
        // The bound is the digits per unit, as openapi.yaml's Duration pattern says.
        assert_eq!(
            parse_duration("9999w").unwrap(),
            Duration::from_secs(9999 * 604_800)
        );
        assert!(parse_duration("999999999s").is_ok());
        assert!(parse_duration("1000000000s").is_err());
        assert_eq!(format_duration(Duration::from_secs(604_800)), "1w");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(0)), "0s");
    }
}
