//! The service on PostgreSQL metadata (a real server, started by scripts/test): uploads and a
//! FOTA task through a restart, and a second instance on the same database and blobs seeing
//! what the first one stored; bearer tokens shared by every instance on the database.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{
    client, fresh_postgres, image, poll, sha256_hex, sse_events, ServerProcess, TestServer,
};

/// Settings for instances sharing the database `url` and the blobs and keys under `dir`.
pub(crate) fn shared(url: &str, dir: &std::path::Path, more: &[&str]) -> Vec<String> {
    let mut sets = vec![
        format!("storage.metadata={url}"),
        format!("storage.blobs=file:{}", dir.join("blobs").display()),
        format!("keys.dir={}", dir.join("keys").display()),
    ];
    sets.extend(more.iter().map(|s| s.to_string()));
    sets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_on_postgres_metadata() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shared = shared(&url, dir.path(), &[]);
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

    let shared = shared(&url, dir.path(), &[]);
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

async fn fota_id(r: reqwest::Response) -> String {
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json::<Value>().await.unwrap()["fotaId"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn status(srv: &TestServer, id: &str) -> (String, Value) {
    let v: Value = srv
        .get(&format!("/v1/fota/{id}"))
        .await
        .json()
        .await
        .unwrap();
    (v["status"].as_str().unwrap().to_owned(), v)
}

/// Two instances serving FOTA traffic from one database: the quota counts across them,
/// concurrent changes to one task through both have exactly one winner, and a deadline set
/// through one is kept by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_the_fota_engine() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shared = shared(
        &url,
        dir.path(),
        &[
            "fota.quota=1",
            "fota.shared_timer_poll=1s",
            "fota.progress_save=1s",
        ],
    );
    let sets: Vec<&str> = shared.iter().map(String::as_str).collect();
    let a = TestServer::start(&dir.path().join("a"), &sets).await;
    let b = TestServer::start(&dir.path().join("b"), &sets).await;
    let r = a.put("/v1/firmware/fw?version=1", image(50_000, 3)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut events = b.get("/v1/events?deviceId=q1").await;
    assert_eq!(events.status(), StatusCode::OK);
    let report = |srv: &TestServer, id: &str, state: u8, result: u8| {
        client()
            .post(srv.url(&format!("/v1/fota/{id}/report")))
            .json(&json!({"state": state, "result": result}))
            .send()
    };

    // One quota slot for both instances.
    let quota = json!({"name": "fw", "protocolType": "HTTP", "useQuota": true});
    let q1 = fota_id(a.post("/v1/devices/q1/fota", &quota).await).await;
    let q2 = fota_id(b.post("/v1/devices/q2/fota", &quota).await).await;
    assert_eq!(a.get("/v1/devices/q1/fota").await.status(), StatusCode::OK);
    assert_eq!(
        b.get("/v1/devices/q2/fota").await.status(),
        StatusCode::NO_CONTENT
    );
    let (s, v) = status(&a, &q2).await;
    assert_eq!((s.as_str(), &v["reason"]), ("pending", &json!("quota")));
    for (state, result) in [(2, 0), (3, 0), (0, 1)] {
        let r = report(&b, &q1, state, result).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(status(&a, &q1).await.0, "succeeded");
    // B's event stream shows q1's transitions made through A as well as its own, once each
    // (those of another instance may come a moment late, so not in order).
    let mut seen: Vec<String> = sse_events(&mut events, 5)
        .await
        .iter()
        .map(|ev| {
            assert_eq!(ev["fotaId"], q1.as_str());
            ev["status"].as_str().unwrap().to_owned()
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            "delivering",
            "downloaded",
            "pending",
            "succeeded",
            "updating"
        ]
    );
    drop(events);
    let work = a.get("/v1/devices/q2/fota").await;
    assert_eq!(work.status(), StatusCode::OK);
    assert_eq!(status(&b, &q2).await.0, "delivering");

    // q2 was scheduled through B, so its package URI is on B: the bytes B serves show in
    // A's status once B stores its progress.
    let package = work.json::<Value>().await.unwrap()["packageUri"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(package.starts_with(&b.base), "{package}");
    let part = client()
        .get(&package)
        .header("range", "bytes=0-999")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.bytes().await.unwrap().len(), 1000);
    let progress = poll(
        async || status(&a, &q2).await.1["progress"].clone(),
        |p| p["bytesServed"] == 1000,
    )
    .await;
    assert_eq!(progress["bytesServed"], 1000, "{progress}");

    // Cancel through one instance while the device reports `updating` through the other:
    // exactly one of them wins, and the task shows the winner.
    let mut ids = Vec::new();
    for i in 0..12 {
        let dev = format!("race-{i}");
        let id = fota_id(
            a.post(
                &format!("/v1/devices/{dev}/fota"),
                &json!({"name": "fw", "protocolType": "HTTP"}),
            )
            .await,
        )
        .await;
        assert_eq!(
            a.get(&format!("/v1/devices/{dev}/fota")).await.status(),
            StatusCode::OK
        );
        let r = report(&a, &id, 2, 0).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        ids.push(id);
    }
    let races = ids.iter().map(|id| {
        let cancel = client()
            .post(a.url(&format!("/v1/fota/{id}/cancel")))
            .send();
        let updating = report(&b, id, 3, 0);
        async move {
            let (c, u) = tokio::join!(cancel, updating);
            (c.unwrap().status(), u.unwrap().status())
        }
    });
    let outcomes = futures_util::future::join_all(races).await;
    for (id, (cancel, updating)) in ids.iter().zip(outcomes) {
        let (s, v) = status(&b, id).await;
        let last = v["history"].as_array().unwrap().last().unwrap()["status"].clone();
        match (cancel, updating) {
            (StatusCode::OK, StatusCode::CONFLICT) => assert_eq!(s, "cancelled"),
            (StatusCode::CONFLICT, StatusCode::OK) => assert_eq!(s, "updating"),
            other => panic!("{id}: both or neither won: {other:?}, task {v}"),
        }
        assert_eq!(last, json!(s), "{v}");
    }

    // A deadline set through A is kept by B after A is gone.
    let t = fota_id(
        a.post(
            "/v1/devices/slow/fota",
            &json!({"name": "fw", "protocolType": "HTTP", "timeout": "2s"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        a.get("/v1/devices/slow/fota").await.status(),
        StatusCode::OK
    );
    a.stop().await;
    let seen = poll(async || status(&b, &t).await.0, |s| s != "delivering").await;
    let (s, v) = status(&b, &t).await;
    assert_eq!(
        (s.as_str(), &v["reason"]),
        ("failed", &json!("timeout")),
        "{seen}"
    );
    b.stop().await;
}

/// A firmware host whose first GET of `/fw.bin` sends part of the image and then stalls (an
/// import in progress); later ones send it whole. Counts the GETs.
async fn stalling_host(data: Vec<u8>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use axum::body::Body;
    use futures_util::StreamExt;
    let gets = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&gets);
    let app = axum::Router::new().route(
        "/fw.bin",
        axum::routing::get(move || {
            let (data, counted) = (data.clone(), Arc::clone(&counted));
            async move {
                if counted.fetch_add(1, Ordering::SeqCst) > 0 {
                    return Body::from(data);
                }
                let part = bytes::Bytes::copy_from_slice(&data[..1000]);
                let first = futures_util::stream::once(async { Ok::<_, std::io::Error>(part) });
                Body::from_stream(first.chain(futures_util::stream::pending()))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, gets)
}

/// An import is fetched by one instance at a time: a second instance leaves it to the one
/// that holds it, and takes it over once that one has crashed and its lease has run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_is_fetched_once_and_taken_over_after_a_crash() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = image(80_000, 9);
    let (host, gets) = stalling_host(data.clone()).await;
    let shared = shared(
        &url,
        dir.path(),
        &[
            "fota.import_lease=3s",
            "fota.shared_timer_poll=1s",
            "fota.import_allow_internal=true",
        ],
    );
    let sets: Vec<&str> = shared.iter().map(String::as_str).collect();
    let mut a = ServerProcess::start(&dir.path().join("a"), &sets);
    let r = client()
        .post(a.url("/v1/devices/imp/fota"))
        .json(&json!({"name": "imported", "firmwareUrl": format!("http://{host}/fw.bin")}))
        .send()
        .await
        .unwrap();
    let id = fota_id(r).await;
    let started = poll(async || gets.load(Ordering::SeqCst), |n| *n > 0).await;
    assert_eq!(started, 1, "A started the import");

    // B starts while A holds the import, and leaves it alone for longer than a lease.
    let b = TestServer::start(&dir.path().join("b"), &sets).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(gets.load(Ordering::SeqCst), 1, "only A fetches");
    let (s, v) = status(&b, &id).await;
    assert_eq!((s.as_str(), &v["reason"]), ("pending", &json!("import")));

    // A crashes mid-import: B takes it over when A's lease has run out.
    a.kill();
    let v = poll(
        async || status(&b, &id).await.1,
        |v| v["reason"] != "import",
    )
    .await;
    assert_eq!(
        (&v["status"], &v["reason"]),
        (&json!("pending"), &json!("device")),
        "{v}"
    );
    assert_eq!(gets.load(Ordering::SeqCst), 2);
    let work: Value = b.get("/v1/devices/imp/fota").await.json().await.unwrap();
    assert_eq!(work["sha256"], sha256_hex(&data));
    b.stop().await;
}

/// The hawkBit device API on PostgreSQL metadata, across two instances: one hands the
/// deployment over, the other takes the device's feedback and configuration data, and both
/// show the action installed.
#[tokio::test]
async fn ddi_across_instances_on_postgres() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shared = shared(&url, dir.path(), &[]);
    let sets: Vec<&str> = shared.iter().map(String::as_str).collect();
    let a = TestServer::start(&dir.path().join("a"), &sets).await;
    let b = TestServer::start(&dir.path().join("b"), &sets).await;
    let data = image(50_000, 6);
    assert_eq!(
        a.put("/v1/firmware/pg-ddi.swu", data.clone())
            .await
            .status(),
        StatusCode::CREATED
    );
    let r = a
        .post(
            "/v1/devices/pg-gw/fota",
            &json!({"name": "pg-ddi.swu", "protocolType": "HTTP"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["fotaId"]
        .as_str()
        .unwrap()
        .to_owned();
    let base: Value = a
        .get("/DEFAULT/controller/v1/pg-gw")
        .await
        .json()
        .await
        .unwrap();
    let href = base["_links"]["deploymentBase"]["href"].as_str().unwrap();
    let action = href.rsplit('/').next().unwrap().to_owned();
    let d: Value = b
        .get(&format!(
            "/DEFAULT/controller/v1/pg-gw/deploymentBase/{action}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        d["deployment"]["chunks"][0]["artifacts"][0]["hashes"]["sha256"],
        sha256_hex(&data)
    );
    let r = b
        .post(
            &format!("/DEFAULT/controller/v1/pg-gw/deploymentBase/{action}/feedback"),
            &json!({"status": {"execution": "closed", "result": {"finished": "success"}, "details": ["ok"]}}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = client()
        .put(b.url("/DEFAULT/controller/v1/pg-gw/configData"))
        .json(&json!({"data": {"board": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let t: Value = a.get(&format!("/v1/fota/{id}")).await.json().await.unwrap();
    assert_eq!(t["status"], "succeeded");
    assert_eq!(
        t["history"].as_array().unwrap().last().unwrap()["detail"],
        "closed: ok"
    );
    let dev: Value = a.get("/v1/devices/pg-gw").await.json().await.unwrap();
    assert_eq!(dev["attributes"]["board"], "x");
    for srv in [&a, &b] {
        let base: Value = srv
            .get("/DEFAULT/controller/v1/pg-gw")
            .await
            .json()
            .await
            .unwrap();
        assert!(base["_links"].get("deploymentBase").is_none(), "{base}");
        assert!(base["_links"].get("configData").is_none(), "{base}");
        assert!(base["_links"]["installedBase"]["href"]
            .as_str()
            .unwrap()
            .ends_with(&action));
    }
}
