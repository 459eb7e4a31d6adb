//! `fwrepo pull NAME -o FILE`: downloads an image into `FILE.part`, resuming a part left by
//! an interrupted run with a range (`If-Range` on the image's digest, so a part of other
//! bytes starts over), then checks the digest and the signature before the file takes its
//! name.

use std::path::PathBuf;

use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::progress::Progress;
use super::{check_signature, fail, io, network, report, Api, Failure, Remote};

#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// The image's name.
    pub name: String,
    /// Where to write it.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub remote: Remote,
}

pub async fn pull(args: PullArgs) -> Result<(), Failure> {
    let api = Api::new(&args.remote)?;
    let record = api
        .record(&args.name)
        .await?
        .ok_or_else(|| fail("firmware-not-found", format!("no firmware {:?}", args.name)))?;
    let size = record["size"]
        .as_u64()
        .ok_or_else(|| fail("invalid-answer", "the record has no size"))?;
    let sha256 = record["sha256"].as_str().unwrap_or_default().to_owned();
    // The key first: a pull that cannot verify should not download gigabytes.
    let key_id = record["signature"]["keyId"].as_str().unwrap_or_default();
    let key = api
        .verifying_key(args.remote.public_key.as_deref(), key_id)
        .await?;
    check_signature(&record, &key)?;

    let mut part = args.output.clone().into_os_string();
    part.push(".part");
    let part = PathBuf::from(part);
    let progress = Progress::new("downloading", size);
    // What a previous run left, hashed again so the digest covers the whole file.
    let mut hasher = sha2::Sha256::new();
    let mut have = 0u64;
    if let Ok(mut f) = tokio::fs::File::open(&part).await {
        let len = f.metadata().await.map_err(io(&part))?.len();
        if len < size {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).await.map_err(io(&part))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                have += n as u64;
            }
        }
    }
    let mut req = api.request(Method::GET, &format!("/v1/firmware/{}/content", args.name));
    if have > 0 {
        req = req
            .header(reqwest::header::RANGE, format!("bytes={have}-"))
            .header(reqwest::header::IF_RANGE, format!("\"{sha256}\""));
    }
    let resp = api.send(req).await?;
    let mut file =
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                if !args.remote.json {
                    eprintln!("resuming at byte {have}");
                }
                tokio::fs::OpenOptions::new()
                    .append(true)
                    .open(&part)
                    .await
                    .map_err(io(&part))?
            }
            StatusCode::OK => {
                hasher = sha2::Sha256::new();
                have = 0;
                tokio::fs::File::create(&part).await.map_err(io(&part))?
            }
            _ => {
                return Err(api.json(resp).await.err().unwrap_or_else(|| {
                    fail("invalid-answer", "unexpected answer to the download")
                }))
            }
        };
    progress.set(have);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(network)?;
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io(&part))?;
        progress.add(chunk.len() as u64);
    }
    file.flush().await.map_err(io(&part))?;
    file.sync_all().await.map_err(io(&part))?;
    drop(file);
    progress.finish();
    let got = hex::encode(hasher.finalize());
    if got != sha256 {
        // A part of other bytes would fail every resume: start over next time.
        let _ = tokio::fs::remove_file(&part).await;
        return Err(fail(
            "digest-mismatch",
            format!("downloaded sha256 {got}, the record says {sha256}; run again"),
        ));
    }
    tokio::fs::rename(&part, &args.output)
        .await
        .map_err(io(&args.output))?;
    if !args.remote.json {
        eprintln!("sha256 and signature (key {key_id}) verified");
    }
    report(&args.remote, &record, "pulled");
    Ok(())
}
