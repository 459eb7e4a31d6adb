//! Imports aimed at internal addresses, end to end. Each form the guard must refuse is sent
//! from inside a network namespace that has only loopback (`unshare -n`), so if the guard
//! missed one, the fetch could not leave the machine: the test re-runs itself there.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::TestServer;

/// Set in the re-run inside the namespace.
const INSIDE: &str = "FWREPO_TEST_IN_NETNS";

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

/// Whether this process sees no network interface but loopback.
fn loopback_only() -> bool {
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .all(|name| name.trim() == "lo")
}

#[test]
fn internal_import_forms_are_refused_inside_a_loopback_only_namespace() {
    let exe = std::env::current_exe().unwrap();
    let name = "ssrf::refused_forms_in_namespace";
    let script = r#"ip link set lo up && exec "$0" --exact "$1" --ignored --nocapture"#;
    let out = std::process::Command::new("unshare")
        .args(["-n", "sh", "-c", script])
        .arg(&exe)
        .arg(name)
        .env(INSIDE, "1")
        .output()
        .expect("unshare (util-linux) runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The inner test ran (libtest says so), it did not just filter everything out.
    assert!(stdout.contains("1 passed"), "{stdout}\n{stderr}");
}

#[tokio::test]
#[ignore = "run by internal_import_forms_are_refused_inside_a_loopback_only_namespace"]
async fn refused_forms_in_namespace() {
    assert_eq!(
        std::env::var(INSIDE).as_deref(),
        Ok("1"),
        "only inside the namespace"
    );
    assert!(loopback_only(), "the namespace must hold loopback only");
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
