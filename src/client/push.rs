//! `fwrepo push FILE NAME`: uploads an image, safe to re-run.
//!
//! The file's SHA-256 is computed first: a name that already holds these bytes is reported
//! and the command succeeds without sending them again; the upload carries the digest, so
//! the server refuses bytes that changed on the way. Files from `--resumable-from` up go
//! over tus (`/v1/uploads`): a broken connection resumes from the offset the server
//! confirms, and a re-run after an interrupted push resumes the same upload (its URL is kept
//! under `$XDG_STATE_HOME/fwrepo/uploads`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::progress::Progress;
use super::{check_signature, fail, file_sha256, io, report, Api, Failure, Remote};

/// Times a broken upload is resumed within one run.
const RETRIES: u32 = 8;

#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// The image file.
    pub file: PathBuf,
    /// Its global name (e.g. acme.com-7f3a9c).
    pub name: String,
    #[arg(long)]
    pub version: Option<String>,
    /// How long to keep it (30d, 12h, ...); forever when absent.
    #[arg(long)]
    pub retention: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// raw (stored as sent) or mcuboot (built and signed by the service as `imgtool sign`).
    #[arg(long, default_value = "raw")]
    pub format: String,
    /// MCUboot: header size in bytes (format mcuboot).
    #[arg(long)]
    pub header_size: Option<String>,
    /// MCUboot: pad the header (--pad-header true).
    #[arg(long)]
    pub pad_header: Option<String>,
    /// MCUboot: flash write alignment.
    #[arg(long)]
    pub align: Option<String>,
    /// MCUboot: slot size in bytes.
    #[arg(long)]
    pub slot_size: Option<String>,
    /// MCUboot: pad to the slot size with the trailer.
    #[arg(long)]
    pub pad: Option<String>,
    /// MCUboot: mark the image confirmed.
    #[arg(long)]
    pub confirm: Option<String>,
    /// MCUboot: security counter.
    #[arg(long)]
    pub security_counter: Option<String>,
    /// MCUboot: image hash (sha256, sha512, pure).
    #[arg(long)]
    pub hash: Option<String>,
    /// Check the stored image's signature (against the service's published key, or
    /// --public-key).
    #[arg(long)]
    pub verify: bool,
    /// Files at least this many bytes go over resumable uploads.
    #[arg(long, default_value_t = 8 << 20)]
    pub resumable_from: u64,
    #[command(flatten)]
    pub remote: Remote,
}

impl PushArgs {
    /// The upload parameters, as the PUT query or the tus metadata names them.
    fn params(&self, sha256: &str) -> Vec<(&'static str, String)> {
        let mut p = vec![("sha256", sha256.to_owned())];
        let optional = [
            ("version", &self.version),
            ("retention", &self.retention),
            ("description", &self.description),
            ("headerSize", &self.header_size),
            ("padHeader", &self.pad_header),
            ("align", &self.align),
            ("slotSize", &self.slot_size),
            ("pad", &self.pad),
            ("confirm", &self.confirm),
            ("securityCounter", &self.security_counter),
            ("hash", &self.hash),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                p.push((k, v.clone()));
            }
        }
        if self.format != "raw" {
            p.push(("format", self.format.clone()));
        }
        p
    }
}

pub async fn push(args: PushArgs) -> Result<(), Failure> {
    let api = Api::new(&args.remote)?;
    let size = tokio::fs::metadata(&args.file)
        .await
        .map_err(io(&args.file))?
        .len();
    let hashing = Progress::new("hashing  ", size);
    let digest = hex::encode(file_sha256(&args.file, &hashing).await?);
    hashing.finish();
    drop(hashing);
    let raw = args.format == "raw";

    // Safe to re-run: the same bytes under the name are success, other bytes a conflict.
    if let Some(record) = api.record(&args.name).await? {
        if raw && record["sha256"] == digest.as_str() {
            eprintln!("{} already holds these bytes; nothing sent", args.name);
            return finish(&api, &args, &record, &digest, "unchanged").await;
        }
        if raw {
            return Err(fail(
                "name-taken",
                format!(
                    "{} already holds other bytes (sha256 {}, this file {digest}); a name maps to one content forever",
                    args.name,
                    record["sha256"].as_str().unwrap_or("?")
                ),
            ));
        }
    }
    let (record, what) = if size >= args.resumable_from {
        (resumable(&api, &args, size, &digest).await?, "stored")
    } else {
        plain(&api, &args, size, &digest).await?
    };
    finish(&api, &args, &record, &digest, what).await
}

/// Checks what the service stored against the file, then prints it.
async fn finish(
    api: &Api,
    args: &PushArgs,
    record: &Value,
    digest: &str,
    what: &str,
) -> Result<(), Failure> {
    // An MCUboot image is built by the service: its digest is not the file's (the upload
    // carried the file's, which the service checked).
    if args.format == "raw" && record["sha256"] != digest {
        return Err(fail(
            "digest-mismatch",
            format!(
                "the service stored sha256 {}, the file has {digest}",
                record["sha256"].as_str().unwrap_or("?")
            ),
        ));
    }
    if args.verify {
        let key_id = record["signature"]["keyId"].as_str().unwrap_or_default();
        let key = api
            .verifying_key(args.remote.public_key.as_deref(), key_id)
            .await?;
        check_signature(record, &key)?;
        if !args.remote.json {
            eprintln!("signature verified with key {key_id}");
        }
    }
    report(&args.remote, record, what);
    Ok(())
}

/// The file from `offset` as a request body that counts what it sends.
async fn body(path: &Path, offset: u64, progress: &Progress) -> Result<reqwest::Body, Failure> {
    use tokio::io::AsyncSeekExt;
    let mut f = tokio::fs::File::open(path).await.map_err(io(path))?;
    f.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(io(path))?;
    let count = progress.counter();
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).map(move |chunk| {
        if let Ok(c) = &chunk {
            count(c.len() as u64);
        }
        chunk
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

/// One `PUT`, for small files; "unchanged" when the name held the image already (an MCUboot
/// image built the same again).
async fn plain(
    api: &Api,
    args: &PushArgs,
    size: u64,
    digest: &str,
) -> Result<(Value, &'static str), Failure> {
    let progress = Progress::new("uploading", size);
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(args.params(digest))
        .finish();
    let req = api
        .request(Method::PUT, &format!("/v1/firmware/{}?{query}", args.name))
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(body(&args.file, 0, &progress).await?);
    let resp = api.send(req).await?;
    let what = if resp.status() == StatusCode::OK {
        "unchanged"
    } else {
        "stored"
    };
    let record = api.json(resp).await;
    progress.finish();
    Ok((record?, what))
}

/// Where the URL of an interrupted upload of this file is kept between runs.
fn state_file(api: &Api, name: &str, digest: &str) -> Option<PathBuf> {
    use sha2::Digest;
    let dir = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    let key = sha2::Sha256::digest(format!("{}\n{name}\n{digest}", api.url("")));
    Some(dir.join("fwrepo/uploads").join(hex::encode(&key[..16])))
}

/// The upload to go on with: the one a previous run left, if the service still has it.
async fn resume_or_create(
    api: &Api,
    args: &PushArgs,
    size: u64,
    digest: &str,
    state: Option<&Path>,
) -> Result<(String, u64), Failure> {
    if let Some(url) = state.and_then(|p| std::fs::read_to_string(p).ok()) {
        let url = url.trim().to_owned();
        if let Some(at) = offset(api, &url).await? {
            eprintln!("resuming the upload left at byte {at}");
            return Ok((url, at));
        }
    }
    let metadata: Vec<String> = std::iter::once(("name", args.name.clone()))
        .chain(args.params(digest))
        .map(|(k, v)| format!("{k} {}", B64.encode(v)))
        .collect();
    let resp = api
        .send(
            api.request(Method::POST, "/v1/uploads")
                .header("Tus-Resumable", "1.0.0")
                .header("Upload-Length", size)
                .header("Upload-Metadata", metadata.join(",")),
        )
        .await?;
    if resp.status() != StatusCode::CREATED {
        return Err(api
            .json(resp)
            .await
            .err()
            .unwrap_or_else(|| fail("invalid-answer", "the service did not create the upload")));
    }
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| fail("invalid-answer", "no Location for the upload"))?;
    let url = reqwest::Url::parse(&api.url(""))
        .and_then(|base| base.join(location))
        .map_err(|e| fail("invalid-answer", e.to_string()))?
        .to_string();
    if let Some(p) = state {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(p, &url);
    }
    Ok((url, 0))
}

/// The offset the service confirms, or `None` when the upload is gone.
async fn offset(api: &Api, url: &str) -> Result<Option<u64>, Failure> {
    let resp = api
        .send(
            api.request(Method::HEAD, url)
                .header("Tus-Resumable", "1.0.0"),
        )
        .await?;
    match resp.status() {
        StatusCode::OK => resp
            .headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or_else(|| fail("invalid-answer", "no Upload-Offset")),
        StatusCode::NOT_FOUND | StatusCode::GONE => Ok(None),
        _ => Err(api
            .json(resp)
            .await
            .err()
            .unwrap_or_else(|| fail("invalid-answer", "unexpected answer to HEAD"))),
    }
}

/// A tus upload, resumed from the confirmed offset after each break.
async fn resumable(api: &Api, args: &PushArgs, size: u64, digest: &str) -> Result<Value, Failure> {
    let state = state_file(api, &args.name, digest);
    let (url, mut at) = resume_or_create(api, args, size, digest, state.as_deref()).await?;
    let progress = Progress::new("uploading", size);
    progress.set(at);
    let mut attempt = 0;
    loop {
        let req = api
            .request(Method::PATCH, &url)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Offset", at)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/offset+octet-stream",
            )
            .header(reqwest::header::CONTENT_LENGTH, size - at)
            .body(body(&args.file, at, &progress).await?);
        let failure = match req.send().await {
            Ok(resp) if resp.status() == StatusCode::NO_CONTENT => {
                let confirmed: Option<u64> = resp
                    .headers()
                    .get("upload-offset")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                if confirmed == Some(size) {
                    break;
                }
                None
            }
            Ok(resp) if resp.status().is_client_error() => {
                let refusal = api
                    .json(resp)
                    .await
                    .err()
                    .unwrap_or_else(|| fail("invalid-answer", "unexpected answer to PATCH"));
                // Someone else's append, or an offset out of step: ask again and go on.
                if matches!(
                    refusal.code.as_str(),
                    "upload-offset-mismatch" | "upload-busy"
                ) {
                    Some(refusal)
                } else {
                    // Refused for good (a digest that does not match, the name taken): the
                    // service removed the upload.
                    if let Some(p) = &state {
                        let _ = std::fs::remove_file(p);
                    }
                    progress.finish();
                    return Err(refusal);
                }
            }
            Ok(resp) => api.json(resp).await.err(),
            Err(e) => Some(super::network(e)),
        };
        attempt += 1;
        if attempt > RETRIES {
            progress.finish();
            return Err(failure.unwrap_or_else(|| fail("upload-incomplete", "gave up resuming")));
        }
        if let Some(f) = &failure {
            if !args.remote.json {
                eprintln!("\nupload broke off ({f}); resuming");
            }
            tokio::time::sleep(Duration::from_millis(250 << attempt.min(5))).await;
        }
        at = offset(api, &url)
            .await?
            .ok_or_else(|| fail("upload-not-found", "the service no longer has the upload"))?;
        progress.set(at);
    }
    progress.finish();
    if let Some(p) = &state {
        let _ = std::fs::remove_file(p);
    }
    api.record(&args.name).await?.ok_or_else(|| {
        fail(
            "invalid-answer",
            "the upload finished but the record is not there",
        )
    })
}
