//! Device filters, the language of dynamic groups and campaign targets:
//!
//! ```text
//! filter     = or
//! or         = and { "or" and }
//! and        = unary { "and" unary }
//! unary      = "not" unary | "(" or ")" | comparison
//! comparison = field ( op value | "in" "(" value { "," value } ")" | "exists" )
//! field      = "id" | "tag." key | "attr." key
//!            | "firmware.name" | "firmware.version" | "firmware.current"
//! op         = "=" | "!=" | "<" | "<=" | ">" | ">="
//! value      = '"' characters with \" and \\ escapes '"' | bare word of [A-Za-z0-9._:+-]
//! ```
//!
//! Keywords are case-insensitive. `firmware.name` is /5/0/6, `firmware.version` /5/0/7 (or
//! /3/0/3 when no package version was reported), `firmware.current` /3/0/3. Values compare
//! as semantic versions when both sides parse as one (`2.1` is `2.1.0`, a pre-release sorts
//! before its release), as integers when both are integers, and as strings otherwise. A
//! comparison with a field the device does not have is false; `exists` asks for presence.

use std::cmp::Ordering;

use super::device::Device;

/// Longest filter text accepted.
pub const MAX_FILTER: usize = 4096;
/// Deepest nesting of parentheses and `not`.
const MAX_DEPTH: usize = 32;

/// Why a filter does not parse; `position` is the byte offset (0-based) where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter does not parse at position {position}: {message}")]
pub struct FilterError {
    pub position: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Id,
    Tag(String),
    Attr(String),
    FirmwareName,
    FirmwareVersion,
    FirmwareCurrent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A parsed filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    Compare(Field, Op, String),
    In(Field, Vec<String>),
    Exists(Field),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Op(Op),
    Open,
    Close,
    Comma,
}

fn lex(text: &str) -> Result<Vec<(usize, Token)>, FilterError> {
    let err = |position, message: &str| FilterError {
        position,
        message: message.to_owned(),
    };
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push((i, Token::Open));
                i += 1
            }
            b')' => {
                out.push((i, Token::Close));
                i += 1
            }
            b',' => {
                out.push((i, Token::Comma));
                i += 1
            }
            b'=' => {
                out.push((i, Token::Op(Op::Eq)));
                i += if b.get(i + 1) == Some(&b'=') { 2 } else { 1 }
            }
            b'!' if b.get(i + 1) == Some(&b'=') => {
                out.push((i, Token::Op(Op::Ne)));
                i += 2
            }
            b'<' | b'>' => {
                let eq = b.get(i + 1) == Some(&b'=');
                let op = match (c, eq) {
                    (b'<', false) => Op::Lt,
                    (b'<', true) => Op::Le,
                    (_, false) => Op::Gt,
                    (_, true) => Op::Ge,
                };
                out.push((i, Token::Op(op)));
                i += if eq { 2 } else { 1 }
            }
            b'"' => {
                let mut s = String::new();
                i += 1;
                let mut chars = text[i..].char_indices();
                loop {
                    match chars.next() {
                        None => return Err(err(start, "unterminated string")),
                        Some((k, '"')) => {
                            i += k + 1;
                            break;
                        }
                        Some((k, '\\')) => match chars.next() {
                            Some((_, e @ ('"' | '\\'))) => s.push(e),
                            _ => return Err(err(i + k, "only \\\" and \\\\ are escapes")),
                        },
                        Some((_, ch)) => s.push(ch),
                    }
                }
                out.push((start, Token::Str(s)));
            }
            c if c.is_ascii_alphanumeric() || b"._:+-".contains(&c) => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b"._:+-".contains(&b[i])) {
                    i += 1;
                }
                out.push((start, Token::Word(text[start..i].to_owned())));
            }
            _ => return Err(err(i, "unexpected character")),
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    at: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(_, t)| t)
    }

    fn position(&self) -> usize {
        self.tokens.get(self.at).map_or(self.end, |(p, _)| *p)
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, FilterError> {
        Err(FilterError {
            position: self.position(),
            message: message.into(),
        })
    }

    fn keyword(&mut self, k: &str) -> bool {
        if matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(k)) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut f = self.and(depth)?;
        while self.keyword("or") {
            f = Filter::Or(Box::new(f), Box::new(self.and(depth)?));
        }
        Ok(f)
    }

    fn and(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut f = self.unary(depth)?;
        while self.keyword("and") {
            f = Filter::And(Box::new(f), Box::new(self.unary(depth)?));
        }
        Ok(f)
    }

    fn unary(&mut self, depth: usize) -> Result<Filter, FilterError> {
        if depth > MAX_DEPTH {
            return self.fail(format!("nested deeper than {MAX_DEPTH}"));
        }
        if self.keyword("not") {
            return Ok(Filter::Not(Box::new(self.unary(depth + 1)?)));
        }
        if self.peek() == Some(&Token::Open) {
            self.at += 1;
            let f = self.or(depth + 1)?;
            if self.peek() != Some(&Token::Close) {
                return self.fail("expected )");
            }
            self.at += 1;
            return Ok(f);
        }
        self.comparison()
    }

    fn field(&mut self) -> Result<Field, FilterError> {
        let Some(Token::Word(w)) = self.peek() else {
            return self.fail("expected a field (id, tag.<key>, attr.<key>, firmware.name, firmware.version, firmware.current)");
        };
        let lower = w.to_ascii_lowercase();
        let field = match lower.as_str() {
            "id" => Field::Id,
            "firmware.name" => Field::FirmwareName,
            "firmware.version" => Field::FirmwareVersion,
            "firmware.current" => Field::FirmwareCurrent,
            _ => match w.split_once('.') {
                Some((kind, key)) if !key.is_empty() && kind.eq_ignore_ascii_case("tag") => {
                    Field::Tag(key.to_owned())
                }
                Some((kind, key))
                    if !key.is_empty()
                        && (kind.eq_ignore_ascii_case("attr")
                            || kind.eq_ignore_ascii_case("attribute")) =>
                {
                    Field::Attr(key.to_owned())
                }
                _ => return self.fail(format!("unknown field {w:?}")),
            },
        };
        self.at += 1;
        Ok(field)
    }

    fn value(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Some(Token::Str(s) | Token::Word(s)) => {
                let s = s.clone();
                self.at += 1;
                Ok(s)
            }
            _ => self.fail("expected a value (a \"string\" or a bare word)"),
        }
    }

    fn comparison(&mut self) -> Result<Filter, FilterError> {
        let field = self.field()?;
        if self.keyword("exists") {
            return Ok(Filter::Exists(field));
        }
        if self.keyword("in") {
            if self.peek() != Some(&Token::Open) {
                return self.fail("expected ( after in");
            }
            self.at += 1;
            let mut values = vec![self.value()?];
            while self.peek() == Some(&Token::Comma) {
                self.at += 1;
                values.push(self.value()?);
            }
            if self.peek() != Some(&Token::Close) {
                return self.fail("expected , or )");
            }
            self.at += 1;
            return Ok(Filter::In(field, values));
        }
        let Some(Token::Op(op)) = self.peek() else {
            return self.fail("expected =, !=, <, <=, >, >=, in or exists");
        };
        let op = *op;
        self.at += 1;
        Ok(Filter::Compare(field, op, self.value()?))
    }
}

impl Filter {
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        if text.len() > MAX_FILTER {
            return Err(FilterError {
                position: MAX_FILTER,
                message: format!("longer than {MAX_FILTER} bytes"),
            });
        }
        let mut p = Parser {
            tokens: lex(text)?,
            at: 0,
            end: text.len(),
        };
        let f = p.or(0)?;
        if p.at < p.tokens.len() {
            return p.fail("expected and, or, or the end");
        }
        Ok(f)
    }

    pub fn matches(&self, d: &Device) -> bool {
        match self {
            Filter::And(a, b) => a.matches(d) && b.matches(d),
            Filter::Or(a, b) => a.matches(d) || b.matches(d),
            Filter::Not(a) => !a.matches(d),
            Filter::Exists(f) => value_of(f, d).is_some(),
            Filter::In(f, values) => {
                value_of(f, d).is_some_and(|v| values.iter().any(|x| compare(v, x).is_eq()))
            }
            Filter::Compare(f, op, x) => value_of(f, d).is_some_and(|v| {
                let o = compare(v, x);
                match op {
                    Op::Eq => o.is_eq(),
                    Op::Ne => o.is_ne(),
                    Op::Lt => o.is_lt(),
                    Op::Le => o.is_le(),
                    Op::Gt => o.is_gt(),
                    Op::Ge => o.is_ge(),
                }
            }),
        }
    }
}

fn value_of<'a>(f: &Field, d: &'a Device) -> Option<&'a str> {
    match f {
        Field::Id => Some(&d.device_id),
        Field::Tag(k) => d.tags.get(k).map(String::as_str),
        Field::Attr(k) => d.attributes.get(k).map(String::as_str),
        Field::FirmwareName => d.pkg_name.as_deref(),
        Field::FirmwareVersion => d.version(),
        Field::FirmwareCurrent => d.firmware_version.as_deref(),
    }
}

/// A semantic version: up to three numeric parts (missing ones are 0), an optional
/// pre-release, build metadata ignored.
#[derive(Debug, PartialEq, Eq)]
struct Version<'a> {
    core: [u64; 3],
    pre: Option<&'a str>,
}

fn version(s: &str) -> Option<Version<'_>> {
    let s = s.strip_prefix('v').unwrap_or(s);
    let s = s.split_once('+').map_or(s, |(a, _)| a);
    let (core, pre) = match s.split_once('-') {
        Some((c, p)) if !p.is_empty() => (c, Some(p)),
        Some(_) => return None,
        None => (s, None),
    };
    let mut parts = [0u64; 3];
    for (n, p) in core.split('.').enumerate() {
        if n == 3 || p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        parts[n] = p.parse().ok()?;
    }
    Some(Version { core: parts, pre })
}

/// Pre-release precedence (SemVer 2.0.0 §11): identifiers left to right, numeric ones
/// numerically and below alphanumeric ones, a shorter list first when all else is equal.
fn pre_cmp(a: &str, b: &str) -> Ordering {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(p), Some(q)) => {
                let o = match (p.parse::<u64>(), q.parse::<u64>()) {
                    (Ok(m), Ok(n)) => m.cmp(&n),
                    (Ok(_), Err(_)) => Ordering::Less,
                    (Err(_), Ok(_)) => Ordering::Greater,
                    (Err(_), Err(_)) => p.cmp(q),
                };
                if o.is_ne() {
                    return o;
                }
            }
        }
    }
}

/// Compares a device's value with a filter's.
pub fn compare(a: &str, b: &str) -> Ordering {
    if let (Some(x), Some(y)) = (version(a), version(b)) {
        return x.core.cmp(&y.core).then_with(|| match (x.pre, y.pre) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(p), Some(q)) => pre_cmp(p, q),
        });
    }
    a.cmp(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(region: &str, version: Option<&str>) -> Device {
        let mut d = Device::new("dev-1", 0);
        d.tags.insert("region".into(), region.into());
        d.pkg_version = version.map(str::to_owned);
        d
    }

    #[test]
    fn the_issue_example_compares_versions_as_semver() {
        let f = Filter::parse(r#"tag.region = "eu" and firmware.version < "2.1.0""#).unwrap();
        assert!(f.matches(&device("eu", Some("2.0.9"))));
        assert!(f.matches(&device("eu", Some("2.1.0-rc.1"))));
        assert!(!f.matches(&device("eu", Some("2.1"))));
        assert!(
            !f.matches(&device("eu", Some("2.10.0"))),
            "10 > 1 numerically"
        );
        assert!(!f.matches(&device("us", Some("1.0.0"))));
        assert!(!f.matches(&device("eu", None)), "a missing field is false");
    }

    #[test]
    fn precedence_not_in_exists_and_case() {
        let f = Filter::parse("NOT tag.region in (eu, us) OR tag.x exists and id = dev-1").unwrap();
        assert!(f.matches(&device("asia", None)));
        assert!(!f.matches(&device("eu", None)));
        let mut d = device("eu", None);
        d.tags.insert("x".into(), "".into());
        assert!(f.matches(&d));
        let g = Filter::parse("(tag.region = eu or tag.region = us) and not firmware.name exists")
            .unwrap();
        assert!(g.matches(&device("us", None)));
    }

    #[test]
    fn semver_ordering() {
        let ordered = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.2",
            "1.10.0",
        ];
        for w in ordered.windows(2) {
            assert_eq!(compare(w[0], w[1]), Ordering::Less, "{} < {}", w[0], w[1]);
        }
        assert_eq!(compare("2.1", "2.1.0+build.5"), Ordering::Equal);
        assert_eq!(compare("abc", "abd"), Ordering::Less, "strings otherwise");
    }

    #[test]
    fn errors_name_the_position() {
        let cases = [
            ("tag.region =", 12, "expected a value"),
            ("tag.region = eu and", 19, "expected a field"),
            ("speed > 3", 0, "unknown field"),
            ("tag.a = \"x", 8, "unterminated"),
            ("tag.a = b c", 10, "expected and, or"),
            ("(tag.a = b", 10, "expected )"),
            ("tag.a ~ b", 6, "unexpected character"),
            ("tag.a b", 6, "expected =, !="),
            ("", 0, "expected a field"),
        ];
        for (text, position, message) in cases {
            let e = Filter::parse(text).unwrap_err();
            assert_eq!(e.position, position, "{text}: {e}");
            assert!(e.message.contains(message), "{text}: {e}");
        }
        let deep = format!("{}tag.a = b{}", "(".repeat(40), ")".repeat(40));
        assert!(Filter::parse(&deep).is_err());
    }
}
