//! Imports aimed at internal addresses, end to end. Each form the guard must refuse is sent
//! from inside a network namespace that has only loopback (`unshare -n`), so if the guard
//! missed one, the fetch could not leave the machine: the test re-runs itself there.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{assert_in_loopback_namespace, run_in_loopback_namespace, TestServer};

/// URL hosts that name internal addresses in forms the guard once missed, and plain ones.
const REFUSED: &[&str] = &[
    "127.0.0.1",
    "[::1]",
    "[::127.0.0.1]",
    "[::ffff:127.0.0.1]",
    "[fec0::1]",
    "[fe80::1]",
    "[fd00::1]",
    "[64:ff9b::7f00:1]",
    "[64:ff9b::a9fe:a9fe]",
    "[2002:7f00:1::]",
    "[2002:a9fe:a9fe::]",
    "198.18.0.1",
    "240.0.0.1",
    "192.0.0.8",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "localhost",
];

#[test]
fn internal_import_forms_are_refused_inside_a_loopback_only_namespace() {
    run_in_loopback_namespace("ssrf::refused_forms_in_namespace");
}

#[tokio::test]
#[ignore = "run by internal_import_forms_are_refused_inside_a_loopback_only_namespace"]
async fn refused_forms_in_namespace() {
    assert_in_loopback_namespace();
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    for host in REFUSED {
        let url = format!("http://{host}:9/fw.bin");
        let r = srv
            .post("/v1/imports", &json!({"name": "internal", "url": url}))
            .await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {v}");
        assert_eq!(v["error"]["code"], "import-refused", "{url}: {v}");
    }
    // A URL with credentials is refused directly.
    let r = srv
        .post(
            "/v1/imports",
            &json!({"name": "creds", "url": "http://user:pw@example.com/fw.bin"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    srv.stop().await;
}
