//! The CoAP message model shared by UDP (RFC 7252) and TCP (RFC 8323): code, token, options
//! and payload, with the option delta encoding of RFC 7252 §3.1.

use bytes::{BufMut, Bytes, BytesMut};

/// Option numbers used here (RFC 7252 §12.2, RFC 7959 §6).
pub mod opt {
    pub const IF_MATCH: u16 = 1;
    pub const URI_HOST: u16 = 3;
    pub const ETAG: u16 = 4;
    pub const IF_NONE_MATCH: u16 = 5;
    pub const OBSERVE: u16 = 6;
    pub const URI_PORT: u16 = 7;
    pub const URI_PATH: u16 = 11;
    pub const CONTENT_FORMAT: u16 = 12;
    pub const MAX_AGE: u16 = 14;
    pub const URI_QUERY: u16 = 15;
    pub const ACCEPT: u16 = 17;
    pub const BLOCK2: u16 = 23;
    pub const BLOCK1: u16 = 27;
    pub const SIZE2: u16 = 28;
    pub const SIZE1: u16 = 60;
    pub const NO_RESPONSE: u16 = 258;
}

/// Content-Format numbers (RFC 7252 §12.3).
pub mod format {
    pub const LINK_FORMAT: u16 = 40;
    pub const OCTET_STREAM: u16 = 42;
    pub const JSON: u16 = 50;
    pub const CBOR: u16 = 60;
    pub const SENML_JSON: u16 = 110;
}

/// A code as class.detail, e.g. `code(2, 5)` for 2.05 Content.
pub const fn code(class: u8, detail: u8) -> u8 {
    (class << 5) | detail
}

pub mod codes {
    use super::code;
    pub const EMPTY: u8 = 0;
    pub const GET: u8 = code(0, 1);
    pub const POST: u8 = code(0, 2);
    pub const CHANGED: u8 = code(2, 4);
    pub const CONTENT: u8 = code(2, 5);
    pub const BAD_REQUEST: u8 = code(4, 0);
    pub const UNAUTHORIZED: u8 = code(4, 1);
    pub const BAD_OPTION: u8 = code(4, 2);
    pub const NOT_FOUND: u8 = code(4, 4);
    pub const METHOD_NOT_ALLOWED: u8 = code(4, 5);
    pub const NOT_ACCEPTABLE: u8 = code(4, 6);
    pub const REQUEST_ENTITY_INCOMPLETE: u8 = code(4, 8);
    pub const CONFLICT: u8 = code(4, 9);
    pub const REQUEST_ENTITY_TOO_LARGE: u8 = code(4, 13);
    pub const UNSUPPORTED_CONTENT_FORMAT: u8 = code(4, 15);
    pub const INTERNAL_SERVER_ERROR: u8 = code(5, 0);
    pub const SERVICE_UNAVAILABLE: u8 = code(5, 3);
    pub const CSM: u8 = code(7, 1);
    pub const PING: u8 = code(7, 2);
    pub const PONG: u8 = code(7, 3);
    pub const RELEASE: u8 = code(7, 4);
    pub const ABORT: u8 = code(7, 5);
}

/// Why bytes are not a CoAP message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("message truncated")]
    Truncated,
    #[error("token length {0} is reserved")]
    BadTokenLength(u8),
    #[error("option with reserved nibble 15")]
    ReservedOptionNibble,
    #[error("payload marker without payload")]
    EmptyPayload,
    #[error("option number overflows")]
    OptionOverflow,
    #[error("unsupported CoAP version {0}")]
    BadVersion(u8),
    #[error("message of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: u64, limit: usize },
}

/// One CoAP message without its transport header fields (type and message id are UDP's).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub code: u8,
    pub token: Bytes,
    /// Options in ascending number order; repeated numbers keep their order.
    pub options: Vec<(u16, Bytes)>,
    pub payload: Bytes,
}

impl Message {
    pub fn new(code: u8, token: Bytes) -> Message {
        Message {
            code,
            token,
            ..Default::default()
        }
    }

    /// Adds an option, keeping numbers in order.
    pub fn push(&mut self, number: u16, value: impl Into<Bytes>) {
        let at = self.options.partition_point(|(n, _)| *n <= number);
        self.options.insert(at, (number, value.into()));
    }

    pub fn push_uint(&mut self, number: u16, value: u64) {
        self.push(number, encode_uint(value));
    }

    pub fn option(&self, number: u16) -> Option<&Bytes> {
        self.options
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, v)| v)
    }

    pub fn uint_option(&self, number: u16) -> Option<u64> {
        self.option(number).map(|v| decode_uint(v))
    }

    /// Uri-Path segments.
    pub fn segments(&self) -> Vec<&[u8]> {
        self.options
            .iter()
            .filter(|(n, _)| *n == opt::URI_PATH)
            .map(|(_, v)| v.as_ref())
            .collect()
    }

    /// Uri-Path segments joined with '/', without a leading slash.
    pub fn path(&self) -> String {
        let segs: Vec<String> = self
            .options
            .iter()
            .filter(|(n, _)| *n == opt::URI_PATH)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect();
        segs.join("/")
    }

    /// Bytes of options, payload marker and payload: the part TCP's Len field counts.
    pub fn body_len(&self) -> usize {
        let mut prev = 0u16;
        let mut len = 0;
        for (n, v) in &self.options {
            len += 1 + ext_len((n - prev) as usize) + ext_len(v.len()) + v.len();
            prev = *n;
        }
        if !self.payload.is_empty() {
            len += 1 + self.payload.len();
        }
        len
    }

    /// Writes options, payload marker and payload.
    pub fn encode_body(&self, dst: &mut BytesMut) {
        self.encode_options(dst);
        dst.put_slice(&self.payload);
    }

    /// The options and, when there is a payload, its marker: everything of the body but the
    /// payload bytes, which a sender can then write from where they are without copying.
    pub fn encode_options(&self, dst: &mut BytesMut) {
        let mut prev = 0u16;
        for (n, v) in &self.options {
            let delta = (n - prev) as usize;
            let (dn, dext) = nibble(delta);
            let (ln, lext) = nibble(v.len());
            dst.put_u8((dn << 4) | ln);
            put_ext(dst, dext, delta);
            put_ext(dst, lext, v.len());
            dst.put_slice(v);
            prev = *n;
        }
        if !self.payload.is_empty() {
            dst.put_u8(0xff);
        }
    }

    /// Parses options and payload from `src` (everything after the token).
    pub fn decode_body(code: u8, token: Bytes, src: Bytes) -> Result<Message, FormatError> {
        let mut options = Vec::new();
        let mut i = 0;
        let mut number: u32 = 0;
        let b = &src[..];
        while i < b.len() {
            if b[i] == 0xff {
                if i + 1 == b.len() {
                    return Err(FormatError::EmptyPayload);
                }
                return Ok(Message {
                    code,
                    token,
                    options,
                    payload: src.slice(i + 1..),
                });
            }
            let (dn, ln) = (b[i] >> 4, b[i] & 0x0f);
            i += 1;
            let delta = read_ext(b, &mut i, dn)?;
            let len = read_ext(b, &mut i, ln)?;
            number += delta as u32;
            if number > u16::MAX as u32 {
                return Err(FormatError::OptionOverflow);
            }
            let end = i
                .checked_add(len)
                .filter(|e| *e <= b.len())
                .ok_or(FormatError::Truncated)?;
            options.push((number as u16, src.slice(i..end)));
            i = end;
        }
        Ok(Message {
            code,
            token,
            options,
            payload: Bytes::new(),
        })
    }
}

fn nibble(v: usize) -> (u8, u8) {
    match v {
        0..=12 => (v as u8, 0),
        13..=268 => (13, 1),
        _ => (14, 2),
    }
}

fn ext_len(v: usize) -> usize {
    nibble(v).1 as usize
}

fn put_ext(dst: &mut BytesMut, ext: u8, v: usize) {
    match ext {
        1 => dst.put_u8((v - 13) as u8),
        2 => dst.put_u16((v - 269) as u16),
        _ => {}
    }
}

fn read_ext(b: &[u8], i: &mut usize, n: u8) -> Result<usize, FormatError> {
    match n {
        0..=12 => Ok(n as usize),
        13 => {
            let v = *b.get(*i).ok_or(FormatError::Truncated)?;
            *i += 1;
            Ok(v as usize + 13)
        }
        14 => {
            let s = b.get(*i..*i + 2).ok_or(FormatError::Truncated)?;
            *i += 2;
            Ok(u16::from_be_bytes([s[0], s[1]]) as usize + 269)
        }
        _ => Err(FormatError::ReservedOptionNibble),
    }
}

/// Minimal big-endian unsigned encoding (RFC 7252 §3.2: no leading zero bytes).
pub fn encode_uint(v: u64) -> Bytes {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    Bytes::copy_from_slice(&bytes[skip..])
}

pub fn decode_uint(v: &[u8]) -> u64 {
    v.iter()
        .rev()
        .take(8)
        .rev()
        .fold(0, |acc, b| (acc << 8) | *b as u64)
}

/// Whether an option number is critical (RFC 7252 §5.4.6: odd numbers).
pub fn is_critical(number: u16) -> bool {
    number & 1 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint_is_minimal() {
        assert_eq!(&encode_uint(0)[..], b"");
        assert_eq!(&encode_uint(0x2a)[..], &[0x2a]);
        assert_eq!(&encode_uint(0x0100)[..], &[1, 0]);
        assert_eq!(decode_uint(&[1, 0]), 256);
        assert_eq!(decode_uint(&[]), 0);
    }

    #[test]
    fn option_deltas_golden() {
        let mut m = Message::new(codes::GET, Bytes::new());
        m.push(opt::URI_PATH, &b"fw"[..]);
        m.push(opt::URI_PATH, &b"x"[..]);
        m.push_uint(opt::BLOCK2, 0x16);
        m.push(opt::NO_RESPONSE, &b"\x02"[..]);
        let mut b = BytesMut::new();
        m.encode_body(&mut b);
        // 11 "fw": delta 11 len 2; 11 "x": delta 0 len 1; 23: delta 12 len 1; 258: delta 235
        // = 13 + 222, len 1.
        assert_eq!(
            &b[..],
            &[0xb2, b'f', b'w', 0x01, b'x', 0xc1, 0x16, 0xd1, 222, 0x02][..]
        );
        assert_eq!(m.body_len(), b.len());
        let back = Message::decode_body(m.code, Bytes::new(), b.freeze()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.path(), "fw/x");
    }

    #[test]
    fn malformed_bodies() {
        let d = |b: &[u8]| Message::decode_body(1, Bytes::new(), Bytes::copy_from_slice(b));
        assert_eq!(d(&[0xff]), Err(FormatError::EmptyPayload));
        assert_eq!(d(&[0xf1, 0]), Err(FormatError::ReservedOptionNibble));
        assert_eq!(d(&[0x13, 1]), Err(FormatError::Truncated));
        assert_eq!(d(&[0xd0]), Err(FormatError::Truncated));
        assert_eq!(
            d(&[0xe0, 0xff, 0xff, 0xe0, 0xff, 0xff]),
            Err(FormatError::OptionOverflow)
        );
    }
}
