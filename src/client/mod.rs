//! `fwrepo push` and `fwrepo pull`: the command line for build systems and people who move
//! images in and out of a running service. Both stream (constant memory at any size), show
//! a progress bar on a terminal and none elsewhere, check the digest and, when asked (always
//! for a pull), the signature.

mod progress;
pub mod pull;
pub mod push;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::Value;

/// Where the service is and how to reach it.
#[derive(clap::Args, Debug, Clone)]
pub struct Remote {
    /// The service's base URL.
    #[arg(long, env = "FWREPO_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Access token (publisher to push, reader to pull); FWREPO_TOKEN by default.
    #[arg(long, env = "FWREPO_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signs the service's HTTPS certificate (added to the system's).
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// The signing key to check signatures against (SPKI PEM, as `fwrepo keys export` writes
    /// it), instead of the key the service publishes.
    #[arg(long)]
    pub public_key: Option<PathBuf>,
    /// Print the record as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// A failure, as printed: the server's stable code when it gave one.
#[derive(Debug)]
pub struct Failure {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

pub(crate) fn fail(code: &str, message: impl Into<String>) -> Failure {
    Failure {
        code: code.to_owned(),
        message: message.into(),
    }
}

fn network(e: reqwest::Error) -> Failure {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    fail("network", msg)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| fail("io", format!("{}: {e}", path.display()))
}

/// A connection to the service.
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    pub(crate) fn new(remote: &Remote) -> Result<Api, Failure> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("fwrepo-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &remote.cacert {
            let pem = std::fs::read(path).map_err(io(path))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| fail("invalid-cacert", format!("{}: {e}", path.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(Api {
            http: builder.build().map_err(network)?,
            base: remote.server.trim_end_matches('/').to_owned(),
            token: remote.token.clone().filter(|t| !t.is_empty()),
        })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub(crate) async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Failure> {
        req.send().await.map_err(network)
    }

    /// A JSON answer, or the server's error.
    pub(crate) async fn json(&self, resp: reqwest::Response) -> Result<Value, Failure> {
        let ok = resp.status().is_success();
        let status = resp.status();
        let body = resp.bytes().await.map_err(network)?;
        if !ok {
            return Err(refusal(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| fail("invalid-answer", e.to_string()))
    }

    /// The record of `name`, or `None` when there is none.
    pub(crate) async fn record(&self, name: &str) -> Result<Option<Value>, Failure> {
        let resp = self
            .send(self.request(reqwest::Method::GET, &format!("/v1/firmware/{name}")))
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.json(resp).await.map(Some)
    }

    /// The public key that signed `key_id`: the pinned one, or the one the service publishes.
    pub(crate) async fn verifying_key(
        &self,
        pinned: Option<&Path>,
        key_id: &str,
    ) -> Result<ed25519_dalek::VerifyingKey, Failure> {
        let raw: Vec<u8> = match pinned {
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(io(path))?;
                spki_pem_key(&pem).ok_or_else(|| {
                    fail(
                        "invalid-public-key",
                        format!("{}: not an Ed25519 SPKI PEM key", path.display()),
                    )
                })?
            }
            None => {
                let keys = self
                    .send(self.request(reqwest::Method::GET, "/v1/keys"))
                    .await?;
                let keys = self.json(keys).await?;
                let key = keys["keys"]
                    .as_array()
                    .and_then(|ks| ks.iter().find(|k| k["keyId"] == key_id))
                    .ok_or_else(|| {
                        fail(
                            "key-not-found",
                            format!("the service publishes no key {key_id}"),
                        )
                    })?;
                key["publicKey"]
                    .as_str()
                    .and_then(|k| B64.decode(k).ok())
                    .ok_or_else(|| fail("invalid-answer", "publicKey is not base64"))?
            }
        };
        let raw: [u8; 32] = raw
            .try_into()
            .map_err(|_| fail("invalid-public-key", "an Ed25519 key is 32 bytes"))?;
        ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|e| fail("invalid-public-key", e.to_string()))
    }
}

/// The server's `{"error": {"code", "message"}}`, or the status when it is not that.
fn refusal(status: reqwest::StatusCode, body: &[u8]) -> Failure {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    match v.as_ref().map(|v| &v["error"]) {
        Some(e) if e["code"].is_string() => fail(
            e["code"].as_str().unwrap_or_default(),
            e["message"].as_str().unwrap_or_default(),
        ),
        _ => fail("http-status", format!("the service answered {status}")),
    }
}

/// The 32 key bytes of an Ed25519 SubjectPublicKeyInfo in PEM.
fn spki_pem_key(pem: &str) -> Option<Vec<u8>> {
    const PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    let der = B64.decode(body).ok()?;
    (der.len() == 44 && der[..12] == PREFIX).then(|| der[12..].to_vec())
}

/// Checks the record's signature (Ed25519 over the SHA-256 digest) with `key`.
pub(crate) fn check_signature(
    record: &Value,
    key: &ed25519_dalek::VerifyingKey,
) -> Result<(), Failure> {
    let digest: [u8; 32] = record["sha256"]
        .as_str()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|d| d.try_into().ok())
        .ok_or_else(|| fail("invalid-answer", "the record has no sha256"))?;
    let sig: [u8; 64] = record["signature"]["value"]
        .as_str()
        .and_then(|s| B64.decode(s).ok())
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| fail("invalid-answer", "the record has no signature"))?;
    key.verify_strict(&digest, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| {
            fail(
                "signature-mismatch",
                format!(
                    "the signature of {} does not verify with key {}",
                    record["name"].as_str().unwrap_or("?"),
                    record["signature"]["keyId"].as_str().unwrap_or("?")
                ),
            )
        })
}

/// Prints the record: JSON on stdout with `--json`, else one line for people.
pub(crate) fn report(remote: &Remote, record: &Value, what: &str) {
    if remote.json {
        println!("{record}");
    } else {
        println!(
            "{what} {}: {} bytes, sha256 {}, signed by key {}",
            record["name"].as_str().unwrap_or("?"),
            record["size"],
            record["sha256"].as_str().unwrap_or("?"),
            record["signature"]["keyId"].as_str().unwrap_or("?"),
        );
    }
}

/// SHA-256 of a file, streamed.
pub(crate) async fn file_sha256(
    path: &Path,
    progress: &progress::Progress,
) -> Result<[u8; 32], Failure> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await.map_err(io(path))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await.map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.add(n as u64);
    }
    Ok(hasher.finalize().into())
}

/// Runs a client command on a small runtime; the exit code is 1 on any failure.
pub fn run<F: std::future::Future<Output = Result<(), Failure>>>(f: F) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(f).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_pem_keys_are_read() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let mut der = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        der.extend_from_slice(key.verifying_key().as_bytes());
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            B64.encode(&der)
        );
        assert_eq!(spki_pem_key(&pem).unwrap(), key.verifying_key().as_bytes());
        assert!(
            spki_pem_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_none()
        );
    }

    #[test]
    fn refusals_keep_the_servers_code() {
        let f = refusal(
            reqwest::StatusCode::CONFLICT,
            br#"{"error":{"code":"name-taken","message":"held"}}"#,
        );
        assert_eq!(
            (f.code.as_str(), f.message.as_str()),
            ("name-taken", "held")
        );
        assert_eq!(
            refusal(reqwest::StatusCode::BAD_GATEWAY, b"<html>").code,
            "http-status"
        );
    }
}
