//! Every error answer is the documented JSON shape, `{"error": {"code", "message"}}`, with a
//! stable code: bad path parameters, oversized bodies, unknown paths and methods.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::common::{client, TestServer};

async fn error_of(
    srv: &TestServer,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let r = client()
        .request(method.clone(), srv.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let ct = r.headers().get("content-type").cloned();
    let text = r.text().await.unwrap();
    assert!(
        ct.as_ref()
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json")),
        "{method} {path}: {status} {ct:?} {text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["error"]["message"].is_string(), "{method} {path}: {v}");
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_error_is_json_with_a_code() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    // Path parameters that are not UTF-8.
    for (method, path) in [
        (Method::PUT, "/v1/firmware/a%ffb"),
        (Method::GET, "/v1/firmware/a%ffb"),
        (Method::GET, "/fw/a%ffb"),
        (Method::GET, "/v1/devices/%ff/fota"),
        (Method::POST, "/v1/devices/%ff/fota"),
        (Method::PUT, "/v1/schedules/%ff"),
        (Method::GET, "/v1/fota/%ff"),
        (Method::POST, "/v1/fota/%ff/report"),
        (Method::DELETE, "/v1/tokens/%ff"),
    ] {
        let (status, v) = error_of(&srv, method.clone(), path, b"{}".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "invalid-parameter", "{method} {path}");
    }
    // Bodies over the JSON limit on every route that reads one whole.
    let big = vec![b' '; 100 << 10];
    for (method, path) in [
        (Method::POST, "/v1/devices/dev-1/fota"),
        (Method::POST, "/v1/imports"),
        (
            Method::POST,
            "/v1/fota/0123456789abcdef0123456789abcdef/report",
        ),
        (Method::PUT, "/v1/schedules/nights"),
        (
            Method::POST,
            "/v1/devices/dev-1/methods/scheduleFirmwareUpdate",
        ),
        (Method::PATCH, "/v1/firmware/some-name"),
        (Method::POST, "/v1/tokens"),
    ] {
        let (status, v) = error_of(&srv, method.clone(), path, big.clone()).await;
        assert_eq!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{method} {path}: {v}"
        );
        assert_eq!(v["error"]["code"], "too-large", "{method} {path}");
    }
    // One paging rule for every list: 1 to 1000, refused outside.
    for path in ["/v1/firmware", "/v1/fota"] {
        for limit in ["0", "1001"] {
            let url = format!("{path}?limit={limit}");
            let (status, v) = error_of(&srv, Method::GET, &url, Vec::new()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {v}");
            assert_eq!(v["error"]["code"], "invalid-parameter", "{url}");
        }
        let r = srv.get(&format!("{path}?limit=1000")).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    // No such path, no such method.
    let (status, v) = error_of(&srv, Method::GET, "/nowhere", Vec::new()).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not-found"))
    );
    let (status, v) = error_of(&srv, Method::OPTIONS, "/v1/firmware", Vec::new()).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method-not-allowed"))
    );
    srv.stop().await;
}

/// Sends `raw` on a fresh connection and reads the answer until the server closes it.
async fn raw_exchange(srv: &TestServer, raw: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = srv.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut got));
    read.await.expect("the server closes").unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    for head in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "transfer-encoding: chunked\r\ncontent-length: 5",
    ] {
        let raw = format!(
            "PUT /v1/firmware/smuggled HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let answer = raw_exchange(&srv, raw.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("invalid-framing"), "{answer}");
        // The second request on a kept-alive connection is checked too.
        let raw = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nPUT /v1/firmware/smuggled HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let answer = raw_exchange(&srv, raw.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("invalid-framing"), "{answer}");
    }
    assert_eq!(
        srv.get("/v1/firmware/smuggled").await.status(),
        StatusCode::NOT_FOUND
    );
    // Either alone is served.
    let ok = raw_exchange(
        &srv,
        b"PUT /v1/firmware/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 201"), "{ok}");
    srv.stop().await;
}
