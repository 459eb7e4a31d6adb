//! The service on PostgreSQL metadata (a real server, started by scripts/test): uploads and a
//! FOTA task through a restart, and a second instance on the same database and blobs seeing
//! what the first one stored; bearer tokens shared by every instance on the database.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{client, fresh_postgres, image, sha256_hex, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_on_postgres_metadata() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shared = [
        format!("storage.metadata={url}"),
        format!("storage.blobs=file:{}", dir.path().join("blobs").display()),
        format!("keys.dir={}", dir.path().join("keys").display()),
    ];
    let sets: Vec<&str> = shared.iter().map(String::as_str).collect();
    let a_root = dir.path().join("a");
    let a = TestServer::start(&a_root, &sets).await;

    let data = image(200_000, 5);
    let r = a
        .put("/v1/firmware/pg-fw?retention=30d&version=2.0", data.clone())
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let stored: Value = r.json().await.unwrap();
    assert_eq!(
        a.put("/v1/firmware/pg-fw", data.clone()).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        a.put("/v1/firmware/pg-fw", b"other".to_vec())
            .await
            .status(),
        StatusCode::CONFLICT
    );

    // A second instance on the same database and blobs serves what the first stored.
    let b = TestServer::start(&dir.path().join("b"), &sets).await;
    let seen: Value = b.get("/v1/firmware/pg-fw").await.json().await.unwrap();
    assert_eq!(seen["sha256"], stored["sha256"]);
    assert_eq!(seen["signature"], stored["signature"]);
    let r = client()
        .get(b.url("/fw/pg-fw"))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap(), data[1000..2000]);
    let listed: Value = b.get("/v1/firmware?prefix=pg-").await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    b.stop().await;

    // A FOTA task on PostgreSQL: one active task per device, delivery, reports.
    let r = a
        .post(
            "/v1/devices/pg-dev/fota",
            &json!({"name": "pg-fw", "protocolType": "HTTP", "useQuota": true}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["fotaId"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = a
        .post("/v1/devices/pg-dev/fota", &json!({"name": "pg-fw"}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["fotaId"],
        id.as_str()
    );
    let work: Value = a.get("/v1/devices/pg-dev/fota").await.json().await.unwrap();
    let got = client()
        .get(work["packageUri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    let r = a
        .post(
            &format!("/v1/fota/{id}/report"),
            &json!({"state": 2, "result": 0}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    // Restart: the task resumes where it was, with its deadline and quota slot.
    let before: Value = a.get(&format!("/v1/fota/{id}")).await.json().await.unwrap();
    a.stop().await;
    let a = TestServer::start(&a_root, &sets).await;
    let after: Value = a.get(&format!("/v1/fota/{id}")).await.json().await.unwrap();
    assert_eq!(after["status"], "downloaded");
    assert_eq!(after["deadline"], before["deadline"]);
    assert_eq!(after["history"], before["history"]);
    for (state, result) in [(3, 0), (0, 1)] {
        let r = a
            .post(
                &format!("/v1/fota/{id}/report"),
                &json!({"state": state, "result": result}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let done: Value = a.get(&format!("/v1/fota/{id}")).await.json().await.unwrap();
    assert_eq!(done["status"], "succeeded");
    let listed: Value = a
        .get("/v1/fota?deviceId=pg-dev")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 1, "{listed}");
    a.stop().await;
}

/// `fwrepo token ...` against the PostgreSQL metadata: stdout and stderr, success asserted.
fn token_cli(url: &str, root: &std::path::Path, args: &[&str]) -> (String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fwrepo"))
        .arg("token")
        .args(args)
        .args(["--set", &format!("storage.metadata={url}"), "--storage"])
        .arg(root)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{args:?}: {stderr}");
    (stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_tokens_in_postgres() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The command line writes to the database, not to a file under either instance's root.
    let (admin, told) = token_cli(
        &url,
        &dir.path().join("cli"),
        &["create", "--role", "admin", "--name", "root"],
    );
    let admin = admin.trim().to_owned();
    assert!(told.contains("PostgreSQL"), "{told}");
    assert!(!dir.path().join("cli/tokens.json").exists());

    let shared = [
        format!("storage.metadata={url}"),
        format!("storage.blobs=file:{}", dir.path().join("blobs").display()),
        format!("keys.dir={}", dir.path().join("keys").display()),
    ];
    let sets: Vec<&str> = shared.iter().map(String::as_str).collect();
    let a = TestServer::start(&dir.path().join("a"), &sets).await;
    let b = TestServer::start(&dir.path().join("b"), &sets).await;
    let list = |srv: &TestServer, token: &str| {
        client()
            .get(srv.url("/v1/firmware"))
            .bearer_auth(token)
            .send()
    };
    // A token exists, so even on loopback both instances ask for one.
    for srv in [&a, &b] {
        assert_eq!(
            srv.get("/v1/firmware").await.status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(list(srv, &admin).await.unwrap().status(), StatusCode::OK);
    }

    // Made through one instance, accepted by the other at once.
    let r = client()
        .post(a.url("/v1/tokens"))
        .bearer_auth(&admin)
        .json(&json!({"name": "dashboard", "role": "reader"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let reader = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(list(&b, &reader).await.unwrap().status(), StatusCode::OK);
    let r = client()
        .put(b.url("/v1/firmware/by-reader"))
        .bearer_auth(&reader)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let (listed, _) = token_cli(&url, &dir.path().join("cli"), &["list"]);
    let names: Vec<&str> = listed
        .lines()
        .map(|l| l.split('\t').nth(1).unwrap())
        .collect();
    assert_eq!(names, ["root", "dashboard"]);
    assert!(!listed.contains(&reader) && !listed.contains(&admin));

    // Revoked through the other instance, refused by both at once.
    let r = client()
        .delete(b.url("/v1/tokens/dashboard"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    for srv in [&a, &b] {
        assert_eq!(
            list(srv, &reader).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // And from the command line, while both run (another admin stays, so the service does
    // not fall back to running open on loopback).
    let (ops, _) = token_cli(
        &url,
        &dir.path().join("cli"),
        &["create", "--role", "admin", "--name", "ops"],
    );
    token_cli(&url, &dir.path().join("cli"), &["revoke", "root"]);
    for srv in [&a, &b] {
        assert_eq!(
            list(srv, &admin).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            list(srv, ops.trim()).await.unwrap().status(),
            StatusCode::OK
        );
    }
    a.stop().await;
    b.stop().await;
}
