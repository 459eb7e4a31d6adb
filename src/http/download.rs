//! Device downloads: `GET`/`HEAD` of an image with validators, conditional requests and
//! byte ranges (RFC 9110 §13–14), streamed from the blob store.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{stream, StreamExt, TryStreamExt};

use super::error::ApiError;
use super::extract::Path;
use super::range::{self, Ranges};
use super::{parse_name, AppState};
use crate::firmware::{FirmwareError, Repository};
use crate::fota::Package;
use crate::meta::FirmwareRecord;
use crate::metrics::Metrics;

/// Validators of one image.
struct Validators {
    etag: String,
    last_modified: std::time::SystemTime,
}

impl Validators {
    fn of(record: &FirmwareRecord) -> Validators {
        // HTTP dates have one-second resolution; truncate so comparisons round-trip.
        let secs = (record.created_at_ms.max(0) / 1000) as u64;
        Validators {
            etag: format!("\"{}\"", record.sha256),
            last_modified: UNIX_EPOCH + Duration::from_secs(secs),
        }
    }

    fn last_modified_text(&self) -> String {
        httpdate::fmt_http_date(self.last_modified)
    }

    /// `If-None-Match` uses the weak comparison: `W/"x"` matches `"x"`.
    fn none_match(&self, header: &str) -> bool {
        header
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == self.etag)
    }

    /// `If-Range` uses the strong comparison, or an exact date equal to Last-Modified.
    fn if_range_holds(&self, header: &str) -> bool {
        let header = header.trim();
        if header.starts_with('"') {
            return header == self.etag;
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
    let name = parse_name(&name)?;
    let record = app.repo.resolve(&name).await?;
    let tally = Tally {
        metrics: Arc::clone(&app.metrics),
        package: None,
    };
    respond(&app, record, req.method(), req.headers(), tally).await
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
    let mut base = HeaderMap::new();
    let hv = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("invalid"));
    base.insert(header::ETAG, hv(&v.etag));
    base.insert(header::LAST_MODIFIED, hv(&v.last_modified_text()));
    base.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));

    let not_modified = match header_str(headers, header::IF_NONE_MATCH) {
        Some(inm) => v.none_match(inm),
        None => {
            header_str(headers, header::IF_MODIFIED_SINCE).is_some_and(|s| v.not_modified_since(s))
        }
    };
    if not_modified {
        return Ok((StatusCode::NOT_MODIFIED, base).into_response());
    }

    base.insert(header::CONTENT_TYPE, hv(&record.content_type));
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
            let body = if head {
                Body::empty()
            } else {
                body_of(app, &record, 0..size, tally).await?
            };
            Ok((StatusCode::OK, base, body).into_response())
        }
        Ranges::Unsatisfiable => {
            let mut resp = ApiError::new(
                crate::error::Kind::RangeNotSatisfiable,
                "range-not-satisfiable",
                format!("no requested range overlaps the {size} bytes of {name}"),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::CONTENT_RANGE, hv(&format!("bytes */{size}")));
            resp.headers_mut()
                .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            Ok(resp)
        }
        Ranges::Parts(parts) if parts.len() == 1 => {
            let r = parts[0].clone();
            base.insert(header::CONTENT_RANGE, hv(&content_range(&r, size)));
            base.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
            let body = body_of(app, &record, r, tally).await?;
            Ok((StatusCode::PARTIAL_CONTENT, base, body).into_response())
        }
        Ranges::Parts(parts) => Ok(multipart(app, record, parts, base, tally)),
    }
}

fn content_range(r: &Range<u64>, size: u64) -> String {
    format!("bytes {}-{}/{size}", r.start, r.end - 1)
}

async fn body_of(
    app: &AppState,
    record: &FirmwareRecord,
    r: Range<u64>,
    tally: Tally,
) -> Result<Body, FirmwareError> {
    let s = app.repo.read(record, r).await?;
    Ok(Body::from_stream(counted(s, tally)))
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
                content_range(r, record.size)
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
                let bytes = repo.read(&record, r).await?;
                let head = stream::once(async move { Ok(Bytes::from(head)) });
                Ok::<_, FirmwareError>(head.chain(bytes.map_err(FirmwareError::from)))
            }
        })
        .try_flatten()
        .chain(stream::once(async move { Ok(Bytes::from(tail)) }));
    let body = Body::from_stream(counted(body, tally));
    (StatusCode::PARTIAL_CONTENT, headers, body).into_response()
}
