//! MCUboot-signed images: the options a build system passes (those of `imgtool sign`), checked
//! once at the edge, and the image layout built from them in `image`.

mod image;

use serde::{Deserialize, Serialize};

pub use image::{plan, Plan};

/// Smallest header: the 32-byte `image_header` itself.
const MIN_HEADER_SIZE: u64 = 32;
/// Write sizes imgtool accepts for `--align`.
const ALIGNS: [u64; 6] = [1, 2, 4, 8, 16, 32];

/// Why an MCUboot image could not be made. Nothing is stored when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum McubootError {
    #[error("{field}: {message}")]
    InvalidOption {
        field: &'static str,
        message: String,
    },
    #[error("the first {header_size} bytes of the body are not zero, so the header would overwrite code; pass padHeader=true to prepend the header instead")]
    HeaderOverlap { header_size: u64 },
    #[error("image ({image} bytes) plus trailer ({trailer} bytes) exceeds slotSize {slot}")]
    SlotTooSmall { image: u64, trailer: u64, slot: u64 },
    #[error("image body of {0} bytes exceeds the 32-bit size field of the MCUboot header")]
    BodyTooLarge(u64),
    #[error("reading the spooled upload: {0}")]
    Io(#[from] std::io::Error),
}

impl McubootError {
    pub fn code(&self) -> (&'static str, crate::error::Kind) {
        use crate::error::Kind;
        match self {
            // Each option and the body are well-formed; what they ask for together cannot be
            // built: 422.
            McubootError::InvalidOption { .. } => ("invalid-mcuboot-option", Kind::Unprocessable),
            McubootError::HeaderOverlap { .. } => ("mcuboot-header-overlap", Kind::Unprocessable),
            McubootError::SlotTooSmall { .. } => ("mcuboot-slot-too-small", Kind::Unprocessable),
            McubootError::BodyTooLarge(_) => ("too-large", Kind::TooLarge),
            McubootError::Io(_) => ("storage-unavailable", Kind::Unavailable),
        }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> McubootError {
    McubootError::InvalidOption {
        field,
        message: message.into(),
    }
}

/// How the image is hashed and what the Ed25519 signature covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashMode {
    /// SHA-256 TLV; the signature covers the digest (`imgtool sign`).
    Sha256,
    /// SHA-512 TLV; the signature covers the digest (`imgtool sign --sha 512`).
    Sha512,
    /// SHA-512 TLV plus SIG_PURE; the signature covers the image itself (`imgtool sign --pure`).
    Pure,
}

/// `major.minor.revision+build` as the header stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageVersion {
    pub major: u8,
    pub minor: u8,
    pub revision: u16,
    pub build: u32,
}

impl ImageVersion {
    /// imgtool's grammar: `maj[.min[.rev[+build]]]`, decimal without leading zeros.
    pub fn parse(text: &str) -> Result<ImageVersion, McubootError> {
        let bad = || {
            invalid(
                "version",
                format!("{text:?}: expected major.minor.revision+build, later parts optional"),
            )
        };
        let (core, build) = match text.split_once('+') {
            Some((core, build)) => (core, Some(build)),
            None => (text, None),
        };
        let parts: Vec<&str> = core.split('.').collect();
        if parts.len() > 3 || (build.is_some() && parts.len() != 3) {
            return Err(bad());
        }
        let number = |s: &str| -> Result<u64, McubootError> {
            let canonical = !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && (s == "0" || !s.starts_with('0'));
            if !canonical {
                return Err(bad());
            }
            s.parse::<u64>().map_err(|_| bad())
        };
        let part = |i: usize| parts.get(i).map(|s| number(s)).unwrap_or(Ok(0));
        let range = |what: &str, v: u64, max: u64| {
            if v > max {
                Err(invalid(
                    "version",
                    format!("{text:?}: {what} {v} is out of range (0 to {max})"),
                ))
            } else {
                Ok(v)
            }
        };
        Ok(ImageVersion {
            major: range("major", part(0)?, u8::MAX.into())? as u8,
            minor: range("minor", part(1)?, u8::MAX.into())? as u8,
            revision: range("revision", part(2)?, u16::MAX.into())? as u16,
            build: range(
                "build",
                build.map(number).unwrap_or(Ok(0))?,
                u32::MAX.into(),
            )? as u32,
        })
    }

    /// imgtool's `--security-counter auto`: major, minor and revision packed.
    pub fn security_counter(&self) -> u32 {
        ((self.major as u32) << 24) + ((self.minor as u32) << 16) + self.revision as u32
    }
}

/// The options as stored with the record (and shown by resolve).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct McubootOptions {
    pub version: String,
    pub header_size: u64,
    pub pad_header: bool,
    pub align: u64,
    pub slot_size: Option<u64>,
    pub pad: bool,
    pub confirm: bool,
    /// The SEC_CNT value (`auto` already resolved from the version).
    pub security_counter: Option<u32>,
    pub hash: HashMode,
}

/// What the record keeps of an MCUboot image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct McubootInfo {
    #[serde(flatten)]
    pub options: McubootOptions,
    /// The key whose Ed25519 signature and KEYHASH are in the TLV area.
    pub key_id: String,
    /// The hash TLV's value (SHA-256 or SHA-512 over header, body and protected TLVs), hex.
    pub image_hash: String,
}

/// Options as they arrive (query parameters), all text.
#[derive(Debug, Default, Clone)]
pub struct RawOptions {
    pub version: Option<String>,
    pub header_size: Option<String>,
    pub pad_header: Option<String>,
    pub align: Option<String>,
    pub slot_size: Option<String>,
    pub pad: Option<String>,
    pub confirm: Option<String>,
    pub security_counter: Option<String>,
    pub hash: Option<String>,
}

impl RawOptions {
    /// True when any MCUboot option was given (they need `format=mcuboot`).
    pub fn any(&self) -> Option<&'static str> {
        [
            ("headerSize", &self.header_size),
            ("padHeader", &self.pad_header),
            ("align", &self.align),
            ("slotSize", &self.slot_size),
            ("pad", &self.pad),
            ("confirm", &self.confirm),
            ("securityCounter", &self.security_counter),
            ("hash", &self.hash),
        ]
        .into_iter()
        .find(|(_, v)| v.is_some())
        .map(|(k, _)| k)
    }

    /// Checks every option; defaults are imgtool's except `headerSize` 0x200, `padHeader`
    /// true and `align` 4, the values of a typical Zephyr build.
    pub fn parse(&self) -> Result<(McubootOptions, ImageVersion), McubootError> {
        let text = self
            .version
            .as_deref()
            .ok_or_else(|| invalid("version", "required for format=mcuboot, e.g. 1.2.3+42"))?;
        let version = ImageVersion::parse(text)?;
        let header_size = match &self.header_size {
            None => 0x200,
            Some(s) => integer("headerSize", s)?,
        };
        if !(MIN_HEADER_SIZE..=u16::MAX as u64).contains(&header_size) {
            return Err(invalid(
                "headerSize",
                format!("{header_size} is out of range ({MIN_HEADER_SIZE} to 65535)"),
            ));
        }
        let align = match &self.align {
            None => 4,
            Some(s) => integer("align", s)?,
        };
        if !ALIGNS.contains(&align) {
            return Err(invalid("align", "one of 1, 2, 4, 8, 16, 32"));
        }
        let slot_size = self
            .slot_size
            .as_deref()
            .map(|s| integer("slotSize", s))
            .transpose()?;
        let confirm = boolean("confirm", self.confirm.as_deref(), false)?;
        // As in imgtool, a confirmed image needs the trailer that padding writes.
        let pad = boolean("pad", self.pad.as_deref(), false)? || confirm;
        if pad && slot_size.is_none_or(|s| s == 0) {
            return Err(invalid("slotSize", "pad and confirm need a slotSize"));
        }
        let security_counter = match self.security_counter.as_deref() {
            None => None,
            Some(s) if s.eq_ignore_ascii_case("auto") => Some(version.security_counter()),
            Some(s) => {
                let v = integer("securityCounter", s)?;
                Some(u32::try_from(v).map_err(|_| {
                    invalid("securityCounter", format!("{v} does not fit in 32 bits"))
                })?)
            }
        };
        let hash = match self.hash.as_deref().unwrap_or("sha256") {
            "sha256" => HashMode::Sha256,
            "sha512" => HashMode::Sha512,
            "pure" => HashMode::Pure,
            other => {
                return Err(invalid(
                    "hash",
                    format!("{other:?}: one of sha256, sha512, pure"),
                ))
            }
        };
        Ok((
            McubootOptions {
                version: text.to_owned(),
                header_size,
                pad_header: boolean("padHeader", self.pad_header.as_deref(), true)?,
                align,
                slot_size,
                pad,
                confirm,
                security_counter,
                hash,
            },
            version,
        ))
    }
}

/// An integer as imgtool reads one: decimal, or with a 0x, 0o or 0b prefix.
fn integer(field: &'static str, s: &str) -> Result<u64, McubootError> {
    let lower = s.to_ascii_lowercase();
    let (digits, radix) = match lower.get(..2) {
        Some("0x") => (&lower[2..], 16),
        Some("0o") => (&lower[2..], 8),
        Some("0b") => (&lower[2..], 2),
        _ => (lower.as_str(), 10),
    };
    u64::from_str_radix(digits, radix).map_err(|_| {
        invalid(
            field,
            format!("{s:?} is not an integer (decimal or 0x, 0o, 0b)"),
        )
    })
}

fn boolean(field: &'static str, s: Option<&str>, default: bool) -> Result<bool, McubootError> {
    match s {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(invalid(field, format!("{other:?}: expected true or false"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_imgtool() {
        let v = ImageVersion::parse("1.2.3+42").unwrap();
        assert_eq!((v.major, v.minor, v.revision, v.build), (1, 2, 3, 42));
        assert_eq!(ImageVersion::parse("7").unwrap().minor, 0);
        assert_eq!(v.security_counter(), 0x0102_0003);
        for bad in [
            "",
            "1.2.3.4",
            "01.2",
            "1.2+3",
            "a",
            "1..2",
            "256.0.0",
            "1.0.65536",
        ] {
            assert!(ImageVersion::parse(bad).is_err(), "{bad}");
        }
        assert!(ImageVersion::parse("255.255.65535+4294967295").is_ok());
    }

    #[test]
    fn options_default_and_check() {
        let raw = RawOptions {
            version: Some("1.0.0".into()),
            ..Default::default()
        };
        let (o, _) = raw.parse().unwrap();
        assert_eq!((o.header_size, o.pad_header, o.align), (0x200, true, 4));
        assert_eq!(o.hash, HashMode::Sha256);
        let bad = |f: fn(&mut RawOptions)| {
            let mut r = raw.clone();
            f(&mut r);
            r.parse().unwrap_err()
        };
        assert!(matches!(
            bad(|r| r.version = None),
            McubootError::InvalidOption {
                field: "version",
                ..
            }
        ));
        assert!(matches!(
            bad(|r| r.header_size = Some("16".into())),
            McubootError::InvalidOption {
                field: "headerSize",
                ..
            }
        ));
        assert!(matches!(
            bad(|r| r.align = Some("3".into())),
            McubootError::InvalidOption { field: "align", .. }
        ));
        assert!(matches!(
            bad(|r| r.confirm = Some("true".into())),
            McubootError::InvalidOption {
                field: "slotSize",
                ..
            }
        ));
        assert!(matches!(
            bad(|r| r.security_counter = Some("0x100000000".into())),
            McubootError::InvalidOption {
                field: "securityCounter",
                ..
            }
        ));
        assert!(matches!(
            bad(|r| r.hash = Some("md5".into())),
            McubootError::InvalidOption { field: "hash", .. }
        ));
        let mut r = raw.clone();
        r.security_counter = Some("AUTO".into());
        r.header_size = Some("0x400".into());
        let (o, _) = r.parse().unwrap();
        assert_eq!(
            (o.security_counter, o.header_size),
            (Some(0x0100_0000), 0x400)
        );
    }
}
