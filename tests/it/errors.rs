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
