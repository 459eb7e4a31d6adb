//! Just enough CBOR (RFC 8949) to answer constrained devices: a map of text keys to text or
//! unsigned integers, in definite lengths (deterministic encoding, §4.2).

/// A value in a work answer.
pub enum Item<'a> {
    Text(&'a str),
    Uint(u64),
}

fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

fn text(out: &mut Vec<u8>, s: &str) {
    head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Encodes `entries` as one map.
pub fn map(entries: &[(&str, Item<'_>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    head(&mut out, 5, entries.len() as u64);
    for (k, v) in entries {
        text(&mut out, k);
        match v {
            Item::Text(s) => text(&mut out, s),
            Item::Uint(n) => head(&mut out, 0, *n),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_bytes() {
        // RFC 8949 Appendix A: {"a": 1} is a1 61 61 01; 1000000 is 1a 000f4240.
        assert_eq!(map(&[("a", Item::Uint(1))]), [0xa1, 0x61, b'a', 0x01]);
        assert_eq!(
            map(&[("", Item::Uint(1_000_000))]),
            [0xa1, 0x60, 0x1a, 0x00, 0x0f, 0x42, 0x40]
        );
        let long = "x".repeat(300);
        let m = map(&[("k", Item::Text(&long)), ("n", Item::Uint(1 << 40))]);
        assert_eq!(&m[..5], &[0xa2, 0x61, b'k', 0x79, 0x01]);
        assert_eq!(&m[m.len() - 9..], &[0x1b, 0, 0, 1, 0, 0, 0, 0, 0]);
    }
}
