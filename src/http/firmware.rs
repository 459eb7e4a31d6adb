//! Management routes for firmware records: upload, resolve, list, change, delete, signature.

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::error::ApiError;
use super::extract::Path;
use super::{parse_name, AppState};
use crate::firmware::{Change, Ingested, UploadRequest};
use crate::mcuboot::{McubootInfo, RawOptions};
use crate::meta::FirmwareRecord;
use crate::name::{format_duration, parse_duration};

/// What clients see of a record.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareView {
    name: String,
    size: u64,
    sha256: String,
    /// SHA-1 and MD5 (hawkBit DDI clients check them); absent on records stored before
    /// fwrepo computed them, until a DDI client asks.
    #[serde(skip_serializing_if = "Option::is_none")]
    sha1: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    md5: Option<String>,
    content_type: String,
    description: Option<String>,
    version: Option<String>,
    created_at: String,
    expires_at: Option<String>,
    retention: Option<String>,
    signature: SignatureView,
    /// `raw`, or `mcuboot` when fwrepo built the MCUboot image.
    format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mcuboot: Option<McubootInfo>,
    /// One download URI per transport served.
    uris: std::collections::BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SignatureView {
    alg: &'static str,
    key_id: String,
    value: String,
}

fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

pub fn view(app: &AppState, r: &FirmwareRecord) -> FirmwareView {
    FirmwareView {
        name: r.name.clone(),
        size: r.size,
        sha256: r.sha256.clone(),
        sha1: r.sha1.clone(),
        md5: r.md5.clone(),
        content_type: r.content_type.clone(),
        description: r.description.clone(),
        version: r.version.clone(),
        created_at: rfc3339(r.created_at_ms),
        expires_at: r.expires_at_ms.map(rfc3339),
        retention: r
            .retention_secs
            .map(|s| format_duration(std::time::Duration::from_secs(s))),
        signature: SignatureView {
            alg: "ed25519",
            key_id: r.signature_key_id.clone(),
            value: r.signature.clone(),
        },
        format: if r.mcuboot.is_some() {
            "mcuboot"
        } else {
            "raw"
        },
        mcuboot: r.mcuboot.clone(),
        uris: app
            .uri_bases
            .iter()
            .map(|(scheme, base)| (*scheme, format!("{base}/fw/{}", r.name)))
            .collect(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct UploadQuery {
    retention: Option<String>,
    description: Option<String>,
    version: Option<String>,
    sha256: Option<String>,
    /// `raw` (default: stored as sent) or `mcuboot` (built and signed as `imgtool sign`).
    format: Option<String>,
    header_size: Option<String>,
    pad_header: Option<String>,
    align: Option<String>,
    slot_size: Option<String>,
    pad: Option<String>,
    confirm: Option<String>,
    security_counter: Option<String>,
    hash: Option<String>,
}

pub async fn upload(
    State(app): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<UploadQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let name = parse_name(&name)?;
    let Query(q) = query?;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => None,
        Some(v) => {
            let ct = v
                .to_str()
                .ok()
                .and_then(|s| s.parse::<mime::Mime>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid-content-type",
                        "Content-Type is not a media type",
                    )
                })?;
            // curl -d sends this by default; it never describes a firmware image.
            (ct != mime::APPLICATION_WWW_FORM_URLENCODED).then(|| ct.to_string())
        }
    };
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok());
    let plan = UploadPlan::parse(q, content_type, content_length)?;
    let ingested = plan.ingest(&app, &name, body.into_data_stream()).await?;
    Ok(created(&app, ingested))
}

/// The answer to a finished upload: 201 with the record, or 200 when the name held these
/// bytes already.
pub(super) fn created(app: &AppState, ingested: Ingested) -> Response {
    match ingested {
        Ingested::Created(r) => (
            StatusCode::CREATED,
            [(header::LOCATION, format!("/v1/firmware/{}", r.name))],
            Json(view(app, &r)),
        )
            .into_response(),
        Ingested::Existing(r) => (StatusCode::OK, Json(view(app, &r))).into_response(),
    }
}

/// An upload's parameters, checked: from a `PUT`'s query, or a resumable upload's metadata.
pub(super) struct UploadPlan {
    req: UploadRequest,
    mcuboot: Option<RawOptions>,
}

impl UploadPlan {
    pub(super) fn parse(
        q: UploadQuery,
        content_type: Option<String>,
        content_length: Option<u64>,
    ) -> Result<UploadPlan, ApiError> {
        let retention = q
            .retention
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| ApiError::bad_request(e.code(), e.to_string()))?;
        let expected_sha256 = q
            .sha256
            .as_deref()
            .map(|s| {
                let mut d = [0u8; 32];
                hex::decode_to_slice(s, &mut d).map(|_| d).map_err(|_| {
                    ApiError::bad_request(
                        "invalid-parameter",
                        "sha256: expected 64 hexadecimal digits",
                    )
                })
            })
            .transpose()?;
        for (field, v) in [("description", &q.description), ("version", &q.version)] {
            if let Some(v) = v {
                crate::firmware::check_text(field, v)?;
            }
        }
        let options = RawOptions {
            version: q.version.clone(),
            header_size: q.header_size,
            pad_header: q.pad_header,
            align: q.align,
            slot_size: q.slot_size,
            pad: q.pad,
            confirm: q.confirm,
            security_counter: q.security_counter,
            hash: q.hash,
        };
        let mcuboot = match q.format.as_deref().unwrap_or("raw") {
            "raw" => {
                if let Some(option) = options.any() {
                    // Each parameter is valid; together they contradict each other.
                    return Err(ApiError::new(
                        crate::error::Kind::Unprocessable,
                        "invalid-parameter",
                        format!("{option}: an MCUboot option; pass format=mcuboot"),
                    ));
                }
                None
            }
            "mcuboot" => Some(options),
            other => {
                return Err(ApiError::bad_request(
                    "invalid-parameter",
                    format!("format: {other:?}; raw or mcuboot"),
                ))
            }
        };
        Ok(UploadPlan {
            req: UploadRequest {
                retention,
                description: q.description,
                version: q.version,
                expected_sha256,
                content_type,
                content_length,
                mcuboot: None,
            },
            mcuboot,
        })
    }

    /// Hashes, stores and signs `body` under `name` (building the MCUboot image first when
    /// asked).
    pub(super) async fn ingest<S, E>(
        self,
        app: &AppState,
        name: &crate::name::FirmwareName,
        body: S,
    ) -> Result<Ingested, ApiError>
    where
        S: futures_util::Stream<Item = Result<axum::body::Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        Ok(match self.mcuboot {
            None => app.repo.ingest(name, self.req, body).await?,
            Some(options) => {
                app.repo
                    .ingest_mcuboot(name, self.req, &options, body)
                    .await?
            }
        })
    }
}

pub async fn resolve(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<FirmwareView>, ApiError> {
    let name = parse_name(&name)?;
    let record = app.repo.resolve(&name).await?;
    Ok(Json(view(&app, &record)))
}

pub async fn signature(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let name = parse_name(&name)?;
    let record = app.repo.resolve(&name).await?;
    let raw = B64.decode(&record.signature).map_err(|_| {
        ApiError::new(
            crate::error::Kind::Internal,
            "internal",
            "stored signature is corrupt",
        )
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::HeaderName::from_static("fwrepo-key-id"),
                record.signature_key_id.clone(),
            ),
        ],
        raw,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    prefix: String,
    limit: Option<usize>,
    cursor: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListView {
    items: Vec<FirmwareView>,
    next_cursor: Option<String>,
}

pub async fn list(
    State(app): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ListView>, ApiError> {
    let Query(q) = query?;
    let limit = super::page::limit(q.limit)?;
    let (items, next) = app.repo.list(&q.prefix, q.cursor.as_deref(), limit).await?;
    Ok(Json(ListView {
        items: items.iter().map(|r| view(&app, r)).collect(),
        next_cursor: next,
    }))
}

pub async fn change(
    State(app): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<Map<String, Value>>, JsonRejection>,
) -> Result<Json<FirmwareView>, ApiError> {
    let name = parse_name(&name)?;
    let Json(fields) = body?;
    let mut change = Change::default();
    for (key, value) in fields {
        let text = match &value {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid-body",
                    format!("{key}: expected a string or null"),
                ))
            }
        };
        match key.as_str() {
            "retention" => {
                let d = text
                    .as_deref()
                    .map(parse_duration)
                    .transpose()
                    .map_err(|e| ApiError::bad_request(e.code(), e.to_string()))?;
                change.retention = Some(d);
            }
            "description" => change.description = Some(text),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid-body",
                    format!("unknown field {key:?}; retention and description can change"),
                ))
            }
        }
    }
    let record = app.repo.change(&name, change).await?;
    Ok(Json(view(&app, &record)))
}

pub async fn delete(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let name = parse_name(&name)?;
    app.repo.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
