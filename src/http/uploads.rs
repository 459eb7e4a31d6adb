//! Resumable uploads with tus 1.0 (<https://tus.io/protocols/resumable-upload>), next to the
//! plain `PUT /v1/firmware/{name}`: creation, termination and expiration extensions.
//!
//! Why tus and not the IETF's resumable uploads draft: tus 1.0 has been stable since 2016 and
//! has maintained clients in every language CI jobs are written in (tus-js-client,
//! tus-py-client, tus-java-client, go-tus, ...); the draft still changes its headers between
//! revisions (Upload-Draft-Interop-Version 3 to 7), and curl and browsers ship it only
//! behind flags.
//!
//! `POST /v1/uploads` with `Upload-Length` and `Upload-Metadata` (`name`, and the `PUT`
//! query's parameters: `version`, `description`, `retention`, `sha256`, `format` and the
//! MCUboot options, values in base64) starts an upload; `PATCH` appends at the offset the
//! server confirmed (`HEAD` tells it); when the last byte is in, the image is hashed,
//! stored, signed and its record made exactly as a `PUT` does, and the partial upload goes.
//! A refusal then (a digest that does not match, a name holding other bytes) stores nothing.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::error::ApiError;
use super::extract::Path;
use super::firmware::{UploadPlan, UploadQuery};
use super::{parse_name, AppState};
use crate::error::Kind;
use crate::uploads::Upload;

const TUS_VERSION: &str = "1.0.0";
const TUS_EXTENSIONS: &str = "creation,termination,expiration";
/// Metadata keys tus clients add on their own; not parameters of the image.
const CLIENT_KEYS: [&str; 2] = ["filename", "filetype"];

fn h(name: &'static str) -> HeaderName {
    HeaderName::from_static(name)
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Adds what every tus answer carries.
fn tus(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(h("tus-resumable"), HeaderValue::from_static(TUS_VERSION));
    resp
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The refusal of a request without `Tus-Resumable: 1.0.0`: 400 when the header is missing,
/// 412 for another version (as tus says); both name the version served.
fn wrong_version(headers: &HeaderMap) -> Option<Response> {
    let sent = header_str(headers, "tus-resumable");
    if sent == Some(TUS_VERSION) {
        return None;
    }
    let mut resp = match sent {
        None => ApiError::bad_request(
            "invalid-parameter",
            format!("Tus-Resumable: {TUS_VERSION} is required"),
        ),
        Some(other) => ApiError {
            status: StatusCode::PRECONDITION_FAILED,
            code: "tus-version-unsupported",
            message: format!("Tus-Resumable {other:?}: this server speaks {TUS_VERSION}"),
            detail: None,
        },
    }
    .into_response();
    resp.headers_mut()
        .insert(h("tus-version"), HeaderValue::from_static(TUS_VERSION));
    Some(tus(resp))
}

fn expires(app: &AppState, u: &Upload) -> HeaderValue {
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u.expires_ms(app.uploads.expiry).max(0) as u64);
    value(&httpdate::fmt_http_date(at))
}

/// `Upload-Metadata`: `key base64,key base64,key`.
fn parse_metadata(raw: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid-upload-metadata", m);
    let mut out = BTreeMap::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, encoded) = pair.split_once(' ').unwrap_or((pair, ""));
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(format!("metadata key {key:?}")));
        }
        let decoded = B64
            .decode(encoded.trim())
            .ok()
            .and_then(|v| String::from_utf8(v).ok())
            .ok_or_else(|| bad(format!("metadata {key}: the value is not base64 of UTF-8")))?;
        if out.insert(key.to_owned(), decoded).is_some() {
            return Err(bad(format!("metadata {key} given twice")));
        }
    }
    Ok(out)
}

/// The image's name and its upload parameters, from the metadata.
fn plan(
    metadata: &BTreeMap<String, String>,
    length: u64,
) -> Result<(String, UploadPlan), ApiError> {
    let name = metadata.get("name").ok_or_else(|| {
        ApiError::bad_request(
            "invalid-upload-metadata",
            "Upload-Metadata must name the image: name <base64>",
        )
    })?;
    let name = parse_name(name)?.to_string();
    let params: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "name" && !CLIENT_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    let q: UploadQuery = serde_json::from_value(params.into())
        .map_err(|e| ApiError::bad_request("invalid-upload-metadata", e.to_string()))?;
    let content_type = metadata
        .get("filetype")
        .filter(|t| t.parse::<mime::Mime>().is_ok())
        .cloned();
    Ok((name, UploadPlan::parse(q, content_type, Some(length))?))
}

/// `OPTIONS /v1/uploads`: what is served.
pub async fn options(State(app): State<AppState>) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let hs = resp.headers_mut();
    hs.insert(h("tus-version"), HeaderValue::from_static(TUS_VERSION));
    hs.insert(h("tus-extension"), HeaderValue::from_static(TUS_EXTENSIONS));
    hs.insert(h("tus-max-size"), value(&app.repo.max_size().to_string()));
    tus(resp)
}

/// `POST /v1/uploads`: starts an upload.
pub async fn create(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(refusal) = wrong_version(&headers) {
        return refusal;
    }
    tus(match create_upload(&app, &headers).await {
        Ok(u) => {
            let mut resp = (
                StatusCode::CREATED,
                [(header::LOCATION, format!("/v1/uploads/{}", u.id))],
            )
                .into_response();
            resp.headers_mut()
                .insert(h("upload-expires"), expires(&app, &u));
            resp.headers_mut().insert(h("upload-offset"), value("0"));
            resp
        }
        Err(e) => e.into_response(),
    })
}

async fn create_upload(app: &AppState, headers: &HeaderMap) -> Result<Upload, ApiError> {
    if headers.contains_key("upload-defer-length") {
        return Err(ApiError::bad_request(
            "invalid-parameter",
            "Upload-Defer-Length is not supported: send Upload-Length",
        ));
    }
    let length = header_str(headers, "upload-length")
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid-parameter",
                "Upload-Length: the image's length in bytes is required",
            )
        })?;
    if length > app.repo.max_size() {
        return Err(ApiError::new(
            Kind::TooLarge,
            "too-large",
            format!(
                "the largest image accepted is {} bytes",
                app.repo.max_size()
            ),
        ));
    }
    let metadata = parse_metadata(header_str(headers, "upload-metadata").unwrap_or(""))?;
    // Refused now rather than after the last byte.
    plan(&metadata, length)?;
    Ok(app.uploads.create(length, metadata).await?)
}

/// `HEAD /v1/uploads/{uploadId}`: where to resume.
pub async fn offset(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = wrong_version(&headers) {
        return refusal;
    }
    tus(match app.uploads.get(&id).await {
        Ok(u) => {
            let mut resp = StatusCode::OK.into_response();
            let hs = resp.headers_mut();
            hs.insert(h("upload-offset"), value(&u.offset.to_string()));
            hs.insert(h("upload-length"), value(&u.length.to_string()));
            hs.insert(h("upload-expires"), expires(&app, &u));
            hs.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(e) => ApiError::from(e).into_response(),
    })
}

/// `PATCH /v1/uploads/{uploadId}`: appends at `Upload-Offset`; the last byte makes the
/// firmware record.
pub async fn append(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(refusal) = wrong_version(&headers) {
        return refusal;
    }
    tus(match append_body(&app, &id, &headers, body).await {
        Ok(u) => {
            let mut resp = StatusCode::NO_CONTENT.into_response();
            resp.headers_mut()
                .insert(h("upload-offset"), value(&u.offset.to_string()));
            resp.headers_mut()
                .insert(h("upload-expires"), expires(&app, &u));
            resp
        }
        Err(e) => e.into_response(),
    })
}

async fn append_body(
    app: &AppState,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Upload, ApiError> {
    if header_str(headers, "content-type") != Some("application/offset+octet-stream") {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported-media-type",
            message: "a PATCH body is Content-Type: application/offset+octet-stream".into(),
            detail: None,
        });
    }
    let offset = header_str(headers, "upload-offset")
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid-parameter",
                "Upload-Offset: a byte offset is required",
            )
        })?;
    let (u, ended) = app
        .uploads
        .append(id, offset, body.into_data_stream())
        .await?;
    app.metrics.resumable_received(u.offset - offset);
    if let Err(e) = ended {
        return Err(ApiError::bad_request(
            "upload-interrupted",
            format!(
                "the body broke off at offset {} ({e}); resume from there",
                u.offset
            ),
        ));
    }
    if u.is_complete() {
        complete(app, id).await?;
    }
    Ok(u)
}

/// Ingests a complete upload as a `PUT` would. The partial upload goes once the record is
/// made, or when the upload is refused for good; a storage failure keeps it, and a `PATCH`
/// with no bytes at its full length tries again.
async fn complete(app: &AppState, id: &str) -> Result<(), ApiError> {
    let (u, file, claim) = app.uploads.read_complete(id).await?;
    let (name, plan) = plan(&u.metadata, u.length)?;
    let name = parse_name(&name)?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
    let result = plan.ingest(app, &name, stream).await;
    drop(claim);
    match result {
        Ok(_) => {
            app.uploads.remove(id).await?;
            Ok(())
        }
        Err(e) if e.status.is_client_error() => {
            app.uploads.remove(id).await?;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// `DELETE /v1/uploads/{uploadId}`: abandons an upload (tus termination).
pub async fn terminate(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = wrong_version(&headers) {
        return refusal;
    }
    tus(match app.uploads.remove(&id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => ApiError::from(crate::uploads::UploadError::NotFound(id)).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_as_tus_clients_send_it() {
        let m =
            parse_metadata("name Z3ctMi4xLmJpbg==,version Mi4x, filename YS5iaW4=,empty").unwrap();
        assert_eq!(m["name"], "gw-2.1.bin");
        assert_eq!(m["version"], "2.1");
        assert_eq!(m["empty"], "");
        assert!(parse_metadata("name !!!").is_err());
        assert!(parse_metadata("name YQ==,name Yg==").is_err());
        let (name, _) = plan(&m.into_iter().filter(|(k, _)| k != "empty").collect(), 10).unwrap();
        assert_eq!(name, "gw-2.1.bin");
        let bad: BTreeMap<String, String> =
            [("name".into(), "a".into()), ("colour".into(), "red".into())].into();
        assert!(plan(&bad, 1).is_err());
        let bad: BTreeMap<String, String> = [
            ("name".into(), "a".into()),
            ("retention".into(), "soon".into()),
        ]
        .into();
        assert!(plan(&bad, 1).is_err());
    }
}
