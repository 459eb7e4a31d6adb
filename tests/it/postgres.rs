//! The service on PostgreSQL metadata (a real server, started by scripts/test): uploads and a
//! FOTA task through a restart, and a second instance on the same database and blobs seeing
//! what the first one stored.

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
