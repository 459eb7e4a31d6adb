//! Upload semantics: create, idempotent re-upload, conflicts, digests, limits, bad input.

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{client, image, sha256_hex, Fetch, TestServer};

async fn error_code(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.expect("JSON error body");
    body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_owned()
}

#[tokio::test]
async fn upload_then_same_bytes_then_different_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let c = client();
    let data = image(100_000, 1);
    let url = srv.url("/v1/firmware/acme.com-7f3a9c.bin?version=1.2.3&description=first");

    let resp = c.put(&url).body(data.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        resp.headers()["location"],
        "/v1/firmware/acme.com-7f3a9c.bin"
    );
    let rec: Value = resp.json().await.unwrap();
    assert_eq!(rec["name"], "acme.com-7f3a9c.bin");
    assert_eq!(rec["size"], 100_000);
    assert_eq!(rec["sha256"], sha256_hex(&data));
    assert_eq!(rec["version"], "1.2.3");
    assert_eq!(rec["description"], "first");
    assert_eq!(rec["contentType"], "application/octet-stream");
    assert_eq!(rec["expiresAt"], Value::Null);
    assert_eq!(rec["signature"]["alg"], "ed25519");
    assert_eq!(rec["uris"]["http"], srv.url("/fw/acme.com-7f3a9c.bin"));

    let again = c.put(&url).body(data.clone()).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["createdAt"], rec["createdAt"]);
    assert_eq!(again["signature"], rec["signature"]);

    let other = image(100_000, 2);
    let resp = c.put(&url).body(other.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "name-taken");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&sha256_hex(&data)) && msg.contains(&sha256_hex(&other)),
        "{msg}"
    );

    // The stored bytes are still the first ones, and only one blob exists.
    let got = srv
        .get("/fw/acme.com-7f3a9c.bin")
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    assert_eq!(srv.blob_files().len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn content_type_from_header_or_extension() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let c = client();
    let r: Value = c
        .put(srv.url("/v1/firmware/img.zip"))
        .body("x")
        .value()
        .await;
    assert_eq!(r["contentType"], "application/zip");
    let r: Value = c
        .put(srv.url("/v1/firmware/img2"))
        .header("content-type", "application/x-firmware")
        .body("x")
        .value()
        .await;
    assert_eq!(r["contentType"], "application/x-firmware");
    let resp = srv.get("/fw/img2").await;
    assert_eq!(resp.headers()["content-type"], "application/x-firmware");
    srv.stop().await;
}

#[tokio::test]
async fn digest_mismatch_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let data = image(50_000, 3);
    let wrong = sha256_hex(b"something else");
    let resp = srv
        .put(&format!("/v1/firmware/fw1?sha256={wrong}"), data.clone())
        .await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(resp).await, "digest-mismatch");
    let resp = srv.get("/v1/firmware/fw1").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "firmware-not-found");
    assert!(srv.blob_files().is_empty(), "{:?}", srv.blob_files());

    // The right digest is accepted.
    let right = sha256_hex(&data);
    let resp = srv
        .put(
            &format!("/v1/firmware/fw1?sha256={}", right.to_uppercase()),
            data,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    srv.stop().await;
}

#[tokio::test]
async fn size_limit_gives_413_declared_or_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &["http.max_upload_size=1000"]).await;
    let resp = srv.put("/v1/firmware/big", vec![0u8; 1001]).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(resp).await, "too-large");
    // Chunked, so the limit can only be found while streaming.
    let chunks =
        futures_util::stream::iter((0..3).map(|_| Ok::<_, std::io::Error>(vec![0u8; 400])));
    let resp = srv
        .put("/v1/firmware/big", reqwest::Body::wrap_stream(chunks))
        .await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        srv.get("/v1/firmware/big").await.status(),
        StatusCode::NOT_FOUND
    );
    assert!(srv.blob_files().is_empty());
    let resp = srv.put("/v1/firmware/small", vec![0u8; 1000]).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    srv.stop().await;
}

#[tokio::test]
async fn bad_names_durations_and_parameters_give_400() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let c = client();
    let long = "n".repeat(129);
    for (path, code) in [
        ("/v1/firmware/a%20b", "invalid-name"),
        ("/v1/firmware/a@b", "invalid-name"),
        ("/v1/firmware/a%2Fb", "invalid-name"),
        (&format!("/v1/firmware/{long}"), "invalid-name"),
        ("/v1/firmware/ok?retention=10", "invalid-duration"),
        ("/v1/firmware/ok?retention=1y", "invalid-duration"),
        ("/v1/firmware/ok?retention=-1s", "invalid-duration"),
        ("/v1/firmware/ok?retention=99999999999w", "invalid-duration"),
        ("/v1/firmware/ok?sha256=xyz", "invalid-parameter"),
        ("/v1/firmware/ok?retension=1d", "invalid-parameter"),
    ] {
        let resp = srv.put(path, "data").await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    // URL libraries collapse dot segments, so these go over a raw socket.
    for path in [
        "/v1/firmware/%2E%2E",
        "/v1/firmware/%2e",
        "/v1/firmware/%2E%2E/signature",
    ] {
        let method = if path.ends_with("/signature") {
            "GET"
        } else {
            "PUT"
        };
        let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx");
        let (status, body) = raw_request(&srv.base, &request).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("\"invalid-name\""), "{path}: {body}");
    }
    let resp = c
        .put(srv.url("/v1/firmware/ok"))
        .header("content-type", "not a type")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(srv.blob_files().is_empty());
    // 128 characters is fine.
    let ok = "n".repeat(128);
    let resp = srv.put(&format!("/v1/firmware/{ok}"), "x").await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let rec: Value = resp.json().await.unwrap();
    assert!(rec["uris"]["http"].as_str().unwrap().len() <= 255);
    srv.stop().await;
}

async fn raw_request(base: &str, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, out)
}

/// A small image is answered with all three digests; a large one with SHA-256, and its SHA-1
/// and MD5 follow once the upload is answered, without undoing a change made meanwhile.
#[tokio::test]
async fn large_images_get_sha1_and_md5_after_the_upload() {
    use md5::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let small = image(100_000, 3);
    let rec: Value = srv
        .put("/v1/firmware/small.bin", small.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rec["sha1"], hex::encode(sha1::Sha1::digest(&small)));
    assert_eq!(rec["md5"], hex::encode(md5::Md5::digest(&small)));

    let large = image(9 << 20, 4);
    let r = srv.put("/v1/firmware/large.bin", large.clone()).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let rec: Value = r.json().await.unwrap();
    assert_eq!(rec["sha256"], sha256_hex(&large));
    assert!(rec.get("md5").is_none(), "{rec}");
    let changed = client()
        .patch(srv.url("/v1/firmware/large.bin"))
        .json(&serde_json::json!({"description": "kept"}))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    let rec = crate::common::poll(
        async || -> Value {
            srv.get("/v1/firmware/large.bin")
                .await
                .json()
                .await
                .unwrap()
        },
        |rec| rec.get("md5").is_some(),
    )
    .await;
    assert_eq!(rec["sha1"], hex::encode(sha1::Sha1::digest(&large)));
    assert_eq!(rec["md5"], hex::encode(md5::Md5::digest(&large)));
    assert_eq!(rec["description"], "kept");
    srv.stop().await;
}
