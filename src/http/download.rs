//! Device downloads: `GET`/`HEAD` of an image with validators, conditional requests and
//! byte ranges (RFC 9110 §13–14), streamed from the blob store.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{stream, StreamExt, TryStreamExt};

use super::error::ApiError;
use super::extract::Path;
use super::range::{self, Ranges};
use super::{parse_name, AppState};
use crate::firmware::{FirmwareError, ImageBytes, Repository};
use crate::fota::Package;
use crate::meta::FirmwareRecord;
use crate::metrics::Metrics;

/// Validators of one image, and the header values every answer for it carries.
#[derive(Clone)]
struct Validators {
    /// `"<sha256 hex>"`, quotes included.
    etag: HeaderValue,
    last_modified: std::time::SystemTime,
    last_modified_value: HeaderValue,
    content_type: HeaderValue,
}

/// Which image a thread's [`Validators`] were last made for: its digest, creation time and
/// content type are all they depend on.
struct Made {
    sha256: String,
    created_at_ms: i64,
    content_type: String,
    validators: Validators,
}

thread_local! {
    /// The last image each runtime thread answered for. A fleet fetches one image in many
    /// small ranges: its header values are made once per thread, not formatted, validated
    /// and copied again for every 4 KiB.
    static LAST: std::cell::RefCell<Option<Made>> = const { std::cell::RefCell::new(None) };
}

impl Validators {
    fn of(record: &FirmwareRecord) -> Validators {
        LAST.with_borrow_mut(|last| {
            if let Some(m) = last.as_ref().filter(|m| {
                m.created_at_ms == record.created_at_ms
                    && m.sha256 == record.sha256
                    && m.content_type == record.content_type
            }) {
                return m.validators.clone();
            }
            let validators = Validators::make(record);
            *last = Some(Made {
                sha256: record.sha256.clone(),
                created_at_ms: record.created_at_ms,
                content_type: record.content_type.clone(),
                validators: validators.clone(),
            });
            validators
        })
    }

    fn make(record: &FirmwareRecord) -> Validators {
        // HTTP dates have one-second resolution; truncate so comparisons round-trip.
        let secs = (record.created_at_ms.max(0) / 1000) as u64;
        let last_modified = UNIX_EPOCH + Duration::from_secs(secs);
        let mut etag = BytesMut::with_capacity(record.sha256.len() + 2);
        etag.put_u8(b'"');
        etag.put_slice(record.sha256.as_bytes());
        etag.put_u8(b'"');
        Validators {
            etag: HeaderValue::from_maybe_shared(etag.freeze())
                .unwrap_or(HeaderValue::from_static("\"invalid\"")),
            last_modified,
            last_modified_value: HeaderValue::try_from(httpdate::fmt_http_date(last_modified))
                .expect("an HTTP date is ASCII"),
            content_type: HeaderValue::from_str(&record.content_type)
                .unwrap_or(HeaderValue::from_static("application/octet-stream")),
        }
    }

    fn etag(&self) -> &[u8] {
        self.etag.as_bytes()
    }

    /// `If-None-Match` uses the weak comparison: `W/"x"` matches `"x"`.
    fn none_match(&self, header: &str) -> bool {
        header
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t).as_bytes() == self.etag())
    }

    /// `If-Range` uses the strong comparison, or an exact date equal to Last-Modified.
    fn if_range_holds(&self, header: &str) -> bool {
        let header = header.trim();
        if header.starts_with('"') {
            return header.as_bytes() == self.etag();
        }
        if header.starts_with("W/") {
            return false;
        }
        httpdate::parse_http_date(header).is_ok_and(|t| t == self.last_modified)
    }

    fn not_modified_since(&self, header: &str) -> bool {
        httpdate::parse_http_date(header.trim()).is_ok_and(|t| self.last_modified <= t)
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Where served bytes are counted: the service total, and the FOTA task a package URI names.
#[derive(Clone)]
struct Tally {
    metrics: Arc<Metrics>,
    package: Option<Arc<Package>>,
}

impl Tally {
    fn add(&self, n: u64) {
        self.metrics.served(n);
        if let Some(p) = &self.package {
            p.served(n);
        }
    }
}

/// `GET`/`HEAD /fw/{name}` and `/v1/firmware/{name}/content`.
pub async fn content(
    State(app): State<AppState>,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    content_named(&app, &name, req.method(), req.headers()).await
}

/// [`content`] for a name already taken from the path (see `http::app`).
pub async fn content_named(
    app: &AppState,
    name: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let name = parse_name(name)?;
    let record = app.repo.resolve(&name).await?;
    let tally = Tally {
        metrics: Arc::clone(&app.metrics),
        package: None,
    };
    respond(app, record, method, headers, tally).await
}

/// `GET`/`HEAD /p/{fotaId}`: a FOTA task's package URI; bytes served count as its progress.
pub async fn package(
    State(app): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    serve_package(app, &id, None, req).await
}

/// `GET`/`HEAD /p/{fotaId}/{token}`: the package URI with its capability.
pub async fn package_with_token(
    State(app): State<AppState>,
    Path((id, token)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    serve_package(app, &id, Some(&token), req).await
}

async fn serve_package(
    app: AppState,
    id: &str,
    token: Option<&str>,
    req: Request,
) -> Result<Response, ApiError> {
    let package = app
        .engine
        .package(id, token, req.method() == Method::GET)
        .await?;
    let record = Arc::clone(&package.record);
    let tally = Tally {
        metrics: Arc::clone(&app.metrics),
        package: Some(package),
    };
    respond(&app, record, req.method(), req.headers(), tally).await
}

async fn respond(
    app: &AppState,
    record: Arc<FirmwareRecord>,
    method: &Method,
    headers: &HeaderMap,
    tally: Tally,
) -> Result<Response, ApiError> {
    let name = &record.name;
    let v = Validators::of(&record);
    // The answer is built in place: a HeaderMap beside it would be hashed into it again.
    // Room for its six headers at once, not grown as they come.
    let mut resp = Response::new(Body::empty());
    *resp.headers_mut() = HeaderMap::with_capacity(8);
    let base = resp.headers_mut();
    base.insert(header::ETAG, v.etag.clone());
    base.insert(header::LAST_MODIFIED, v.last_modified_value.clone());
    base.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));

    let not_modified = match header_str(headers, header::IF_NONE_MATCH) {
        Some(inm) => v.none_match(inm),
        None => {
            header_str(headers, header::IF_MODIFIED_SINCE).is_some_and(|s| v.not_modified_since(s))
        }
    };
    if not_modified {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(resp);
    }

    base.insert(header::CONTENT_TYPE, v.content_type.clone());
    let size = record.size;
    // Range applies to GET only (RFC 9110 §14.2); a failed If-Range means the whole image.
    let range_header = (method == Method::GET)
        .then(|| header_str(headers, header::RANGE))
        .flatten()
        .filter(|_| header_str(headers, header::IF_RANGE).is_none_or(|ir| v.if_range_holds(ir)));
    let head = method == Method::HEAD;
    match range::parse(range_header, size) {
        Ranges::Whole => {
            base.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            if !head {
                *resp.body_mut() = body_of(app, &record, 0..size, tally).await?;
            }
            Ok(resp)
        }
        Ranges::Unsatisfiable => {
            let mut resp = ApiError::new(
                crate::error::Kind::RangeNotSatisfiable,
                "range-not-satisfiable",
                format!("no requested range overlaps the {size} bytes of {name}"),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::CONTENT_RANGE, content_range_value(None, size));
            resp.headers_mut()
                .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            Ok(resp)
        }
        Ranges::Parts(parts) if parts.len() == 1 => {
            let r = parts[0].clone();
            base.insert(header::CONTENT_RANGE, content_range_value(Some(&r), size));
            base.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            *resp.body_mut() = body_of(app, &record, r, tally).await?;
            Ok(resp)
        }
        Ranges::Parts(parts) => {
            let headers = std::mem::take(resp.headers_mut());
            Ok(multipart(app, record, parts, headers, tally))
        }
    }
}

/// `Content-Range` of a part (`bytes 0-99/1000`), or of no part (`bytes */1000`), written
/// without the formatting machinery: one per ranged answer.
fn content_range_value(r: Option<&Range<u64>>, size: u64) -> HeaderValue {
    let mut b = BytesMut::with_capacity(6 + 3 * 20 + 2);
    b.put_slice(b"bytes ");
    match r {
        Some(r) => {
            put_decimal(&mut b, r.start);
            b.put_u8(b'-');
            put_decimal(&mut b, r.end - 1);
        }
        None => b.put_u8(b'*'),
    }
    b.put_u8(b'/');
    put_decimal(&mut b, size);
    HeaderValue::from_maybe_shared(b.freeze()).expect("digits and ASCII")
}

fn put_decimal(b: &mut BytesMut, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    b.put_slice(&digits[at..]);
}

/// One buffer when the cache holds the bytes (hyper then knows the body whole and writes it
/// with the head), a stream from the store otherwise. Bytes count as served once handed over.
async fn body_of(
    app: &AppState,
    record: &FirmwareRecord,
    r: Range<u64>,
    tally: Tally,
) -> Result<Body, FirmwareError> {
    Ok(match app.repo.read(record, r).await? {
        ImageBytes::Ready(b) => {
            tally.add(b.len() as u64);
            Body::from(b)
        }
        ImageBytes::Streamed(s) => Body::from_stream(counted(s, tally)),
    })
}

fn counted<S, E>(s: S, tally: Tally) -> impl futures_util::Stream<Item = Result<Bytes, E>>
where
    S: futures_util::Stream<Item = Result<Bytes, E>>,
{
    s.inspect_ok(move |b| tally.add(b.len() as u64))
}

/// `multipart/byteranges` (RFC 9110 §14.6): each part opened only when the previous is sent.
fn multipart(
    app: &AppState,
    record: Arc<FirmwareRecord>,
    parts: Vec<Range<u64>>,
    mut headers: HeaderMap,
    tally: Tally,
) -> Response {
    let mut id = [0u8; 12];
    getrandom::fill(&mut id).expect("system random source");
    let boundary = format!("fwrepo-{}", hex::encode(id));
    let part_heads: Vec<String> = parts
        .iter()
        .map(|r| {
            format!(
                "\r\n--{boundary}\r\nContent-Type: {}\r\nContent-Range: {}\r\n\r\n",
                record.content_type,
                content_range_value(Some(r), record.size)
                    .to_str()
                    .expect("digits and ASCII")
            )
        })
        .collect();
    let tail = format!("\r\n--{boundary}--\r\n");
    let length: u64 = part_heads.iter().map(|h| h.len() as u64).sum::<u64>()
        + parts.iter().map(|r| r.end - r.start).sum::<u64>()
        + tail.len() as u64;
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&format!("multipart/byteranges; boundary={boundary}"))
            .expect("ascii"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    let repo: Arc<Repository> = Arc::clone(&app.repo);
    let body = stream::iter(parts.into_iter().zip(part_heads))
        .then(move |(r, head)| {
            let (repo, record) = (Arc::clone(&repo), Arc::clone(&record));
            async move {
                let bytes = repo.read(&record, r).await?.into_stream();
                let head = stream::once(async move { Ok(Bytes::from(head)) });
                Ok::<_, FirmwareError>(head.chain(bytes.map_err(FirmwareError::from)))
            }
        })
        .try_flatten()
        .chain(stream::once(async move { Ok(Bytes::from(tail)) }));
    let body = Body::from_stream(counted(body, tally));
    (StatusCode::PARTIAL_CONTENT, headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_values_read_as_formatted() {
        for (r, size) in [
            (0..1, 1),
            (0..4096, 16 << 20),
            (10..100, 300_000),
            (u64::MAX - 10..u64::MAX, u64::MAX),
        ] {
            let formatted = format!("bytes {}-{}/{size}", r.start, r.end - 1);
            assert_eq!(content_range_value(Some(&r), size), formatted.as_str());
        }
        assert_eq!(content_range_value(None, 0), "bytes */0");
        assert_eq!(content_range_value(None, 300_000), "bytes */300000");
    }
}
