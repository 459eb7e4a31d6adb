//! Resumable uploads (tus 1.0) against a real server: an upload cut mid-body resumes from the
//! offset the server confirms and no byte is received twice; the record appears only with
//! the last byte; a digest that does not match stores nothing; abandoned uploads expire;
//! and the protocol's refusals.

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{client, image, poll, sha256_hex, TestServer};

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn metadata(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k} {}", b64(v)))
        .collect::<Vec<_>>()
        .join(",")
}

async fn create(srv: &TestServer, length: u64, meta: &str) -> reqwest::Response {
    client()
        .post(srv.url("/v1/uploads"))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", length.to_string())
        .header("Upload-Metadata", meta)
        .send()
        .await
        .unwrap()
}

/// Starts an upload and returns its URL.
async fn start(srv: &TestServer, length: u64, meta: &str) -> String {
    let r = create(srv, length, meta).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["tus-resumable"], "1.0.0");
    assert!(r.headers().contains_key("upload-expires"));
    srv.url(r.headers()["location"].to_str().unwrap())
}

async fn offset(url: &str) -> Option<u64> {
    let r = client()
        .head(url)
        .header("Tus-Resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    if r.status() == StatusCode::NOT_FOUND {
        return None;
    }
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    Some(
        r.headers()["upload-offset"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap(),
    )
}

async fn patch(
    url: &str,
    at: u64,
    body: impl Into<reqwest::Body>,
) -> Result<reqwest::Response, reqwest::Error> {
    client()
        .patch(url)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", at.to_string())
        .header("Content-Type", "application/offset+octet-stream")
        .body(body)
        .send()
        .await
}

async fn received(srv: &TestServer) -> u64 {
    let text = srv.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("fwrepo_resumable_upload_bytes_total "))
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn an_upload_cut_midway_resumes_and_no_byte_is_sent_twice() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let r = client()
        .request(reqwest::Method::OPTIONS, srv.url("/v1/uploads"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["tus-version"], "1.0.0");
    assert!(r.headers()["tus-extension"]
        .to_str()
        .unwrap()
        .contains("termination"));

    let data = image(6 << 20, 9);
    let meta = metadata(&[
        ("name", "big-1.0.bin"),
        ("version", "1.0"),
        ("sha256", &sha256_hex(&data)),
        ("filename", "big.bin"),
    ]);
    let url = start(&srv, data.len() as u64, &meta).await;
    assert_eq!(offset(&url).await, Some(0));

    // The first PATCH sends half of the image, then the connection breaks.
    let half = data.len() / 2;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = data[..half]
        .chunks(64 << 10)
        .map(|c| Ok(c.to_vec()))
        .chain(std::iter::once(Err(std::io::Error::other("link down"))))
        .collect();
    let cut = patch(
        &url,
        0,
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)),
    )
    .await;
    assert!(cut.is_err() || cut.unwrap().status().is_client_error());
    // The server keeps what arrived, durably, and says where to go on.
    let at = poll(async || offset(&url).await.unwrap(), |at| *at > 0).await;
    assert!(at > 0 && at <= half as u64, "offset {at}");
    assert_eq!(
        srv.get("/v1/firmware/big-1.0.bin").await.status(),
        StatusCode::NOT_FOUND,
        "no record before the last byte"
    );
    // A PATCH at another offset is refused.
    let r = patch(&url, at + 1, vec![0u8; 10]).await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upload-offset-mismatch");

    // The rest, in one PATCH: the record appears.
    let r = patch(&url, at, data[at as usize..].to_vec()).await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "{:?}", r.text().await);
    let rec: Value = srv
        .get("/v1/firmware/big-1.0.bin")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rec["sha256"], sha256_hex(&data));
    assert_eq!(rec["size"], data.len());
    assert_eq!(rec["version"], "1.0");
    let got = srv
        .get("/v1/firmware/big-1.0.bin/content")
        .await
        .bytes()
        .await
        .unwrap();
    assert!(got[..] == data[..], "the stored image is the one sent");
    // Each byte reached the server once.
    assert_eq!(received(&srv).await, data.len() as u64);
    // The partial upload is gone.
    assert_eq!(offset(&url).await, None);
    assert_eq!(
        std::fs::read_dir(dir.path().join("storage/uploads"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn a_resumed_upload_with_other_bytes_than_claimed_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let data = image(300_000, 3);
    let claimed = sha256_hex(&image(300_000, 4));
    let url = start(
        &srv,
        data.len() as u64,
        &metadata(&[("name", "liar.bin"), ("sha256", &claimed)]),
    )
    .await;
    let r = patch(&url, 0, data[..100_000].to_vec()).await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["upload-offset"], "100000");
    let r = patch(&url, 100_000, data[100_000..].to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "digest-mismatch");
    assert_eq!(
        srv.get("/v1/firmware/liar.bin").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(offset(&url).await, None, "the upload goes with the refusal");
    assert!(
        srv.blob_files().is_empty(),
        "no blob kept: {:?}",
        srv.blob_files()
    );
}

#[tokio::test]
async fn refusals_termination_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(
        dir.path(),
        &["http.upload_expiry=1s", "http.max_upload_size=1000000"],
    )
    .await;
    // Without the protocol version: 400; another version: 412, naming the one served.
    let r = client()
        .post(srv.url("/v1/uploads"))
        .header("Upload-Length", "10")
        .header("Upload-Metadata", metadata(&[("name", "a.bin")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = client()
        .post(srv.url("/v1/uploads"))
        .header("Tus-Resumable", "0.2.2")
        .header("Upload-Length", "10")
        .header("Upload-Metadata", metadata(&[("name", "a.bin")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(r.headers()["tus-version"], "1.0.0");
    // Metadata is checked at creation, not after the last byte.
    for (meta, code) in [
        (String::new(), "invalid-upload-metadata"),
        (metadata(&[("name", "a b")]), "invalid-name"),
        (
            metadata(&[("name", "a.bin"), ("retention", "soon")]),
            "invalid-duration",
        ),
        (
            metadata(&[("name", "a.bin"), ("colour", "red")]),
            "invalid-upload-metadata",
        ),
        ("name !!".to_owned(), "invalid-upload-metadata"),
    ] {
        let r = create(&srv, 10, &meta).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{meta}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], code, "{meta}");
    }
    let r = create(&srv, 2_000_000, &metadata(&[("name", "a.bin")])).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let url = start(&srv, 10, &metadata(&[("name", "a.bin")])).await;
    let r = client()
        .patch(&url)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", "0")
        .body("0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = patch(&url, 0, vec![1u8; 11]).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Termination.
    let r = client()
        .delete(&url)
        .header("Tus-Resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(offset(&url).await, None);

    // An upload nobody touches expires, its bytes with it.
    let url = start(&srv, 10, &metadata(&[("name", "b.bin")])).await;
    let r = patch(&url, 0, b"01234".to_vec()).await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let gone = poll(async || offset(&url).await, Option::is_none).await;
    assert_eq!(gone, None, "expired");
    let files = async || {
        std::fs::read_dir(dir.path().join("storage/uploads"))
            .unwrap()
            .count()
    };
    let left = poll(files, |n| *n == 0).await;
    assert_eq!(left, 0, "the sweeper removed its files");
}
