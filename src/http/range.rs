//! `Range: bytes=...` parsing (RFC 9110 §14): single and multiple ranges, suffixes, and the
//! rule that a malformed header is ignored while a well-formed unsatisfiable one is a 416.

use std::ops::Range;

/// More ranges than this in one request are ignored (the whole image is sent instead), so a
/// client cannot make one request into thousands of tiny reads.
pub const MAX_RANGES: usize = 16;

#[derive(Debug, PartialEq, Eq)]
pub enum Ranges {
    /// No usable header: send the whole representation.
    Whole,
    /// One or more satisfiable ranges, in request order.
    Parts(Vec<Range<u64>>),
    /// Well formed, but nothing in it overlaps the representation.
    Unsatisfiable,
}

pub fn parse(header: Option<&str>, size: u64) -> Ranges {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ranges::Whole;
    };
    let mut parts = Vec::new();
    for item in spec.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let Some((first, last)) = item.split_once('-') else {
            return Ranges::Whole;
        };
        let (first, last) = (first.trim(), last.trim());
        let range = if first.is_empty() {
            let Some(n) = number(last) else {
                return Ranges::Whole;
            };
            (n > 0 && size > 0).then(|| size.saturating_sub(n)..size)
        } else {
            let Some(a) = number(first) else {
                return Ranges::Whole;
            };
            let end = if last.is_empty() {
                size
            } else {
                match number(last) {
                    Some(b) if b >= a => b.saturating_add(1).min(size),
                    _ => return Ranges::Whole,
                }
            };
            (a < size).then_some(a..end)
        };
        parts.extend(range);
        if parts.len() > MAX_RANGES {
            return Ranges::Whole;
        }
    }
    if parts.is_empty() {
        return Ranges::Unsatisfiable;
    }
    if parts.len() == 1 {
        return Ranges::Parts(parts);
    }
    // Ranges that together ask for more than the image (sixteen `0-`, say) would multiply
    // what one request sends: the image goes once, whole, instead (as nginx and Apache do).
    let asked: u64 = parts.iter().map(|r| r.end - r.start).sum();
    if parts.len() > 1 && asked > size {
        return Ranges::Whole;
    }
    Ranges::Parts(coalesce(parts))
}

/// Overlapping or adjacent ranges merged (RFC 9110 §14.3 allows it); ranges that touch
/// nothing keep the order the client asked for.
fn coalesce(mut parts: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut sorted = parts.clone();
    sorted.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    if merged.len() < parts.len() {
        return merged;
    }
    parts.shrink_to_fit();
    parts
}

fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let p = |h: &str| parse(Some(h), 1000);
        assert_eq!(p("bytes=0-99"), Ranges::Parts(vec![0..100]));
        assert_eq!(p("bytes=900-"), Ranges::Parts(vec![900..1000]));
        assert_eq!(p("bytes=-100"), Ranges::Parts(vec![900..1000]));
        assert_eq!(p("bytes=-5000"), Ranges::Parts(vec![0..1000]));
        assert_eq!(p("bytes=990-2000"), Ranges::Parts(vec![990..1000]));
        assert_eq!(p("bytes=0-0, 10-19"), Ranges::Parts(vec![0..1, 10..20]));
        assert_eq!(p("bytes=1000-"), Ranges::Unsatisfiable);
        assert_eq!(p("bytes=-0"), Ranges::Unsatisfiable);
        assert_eq!(p("bytes=2000-3000, 1000-"), Ranges::Unsatisfiable);
        assert_eq!(p("bytes=2000-3000, 5-9"), Ranges::Parts(vec![5..10]));
        for bad in [
            "bytes=5-1",
            "bytes=a-b",
            "items=0-1",
            "bytes=1",
            "bytes=--1",
            "bytes=+1-2",
        ] {
            assert_eq!(p(bad), Ranges::Whole, "{bad}");
        }
        assert_eq!(parse(None, 10), Ranges::Whole);
        assert_eq!(parse(Some("bytes=0-"), 0), Ranges::Unsatisfiable);
        let many = format!(
            "bytes={}",
            (0..17)
                .map(|i| format!("{i}-{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(p(&many), Ranges::Whole);
        assert_eq!(
            p("bytes=18446744073709551615-18446744073709551615"),
            Ranges::Unsatisfiable
        );
    }

    #[test]
    fn overlapping_ranges_coalesce_and_never_add_up_to_more_than_the_image() {
        let p = |h: &str| parse(Some(h), 1000);
        let sixteen = format!("bytes={}", ["0-"; 16].join(","));
        assert_eq!(p(&sixteen), Ranges::Whole);
        assert_eq!(p("bytes=0-499,400-999,-1"), Ranges::Whole);
        assert_eq!(p("bytes=0-99,50-149"), Ranges::Parts(vec![0..150]));
        assert_eq!(p("bytes=100-199,0-99"), Ranges::Parts(vec![0..200]));
        assert_eq!(
            p("bytes=500-599,0-9,5-19"),
            Ranges::Parts(vec![0..20, 500..600])
        );
        // Disjoint ranges stay as asked, in the client's order.
        assert_eq!(p("bytes=500-599,0-9"), Ranges::Parts(vec![500..600, 0..10]));
        // One range may be the whole image.
        assert_eq!(p("bytes=0-"), Ranges::Parts(vec![0..1000]));
    }
}
