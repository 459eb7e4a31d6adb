//! Interruptions: a client cut off mid-upload, the process killed mid-upload, and SIGTERM
//! during a download. Nothing half-stored may become visible; committed firmware survives.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::common::{blob_files, client, image, sha256_hex, ServerProcess, TestServer};

fn host_port(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

fn send_partial_upload(base: &str, name: &str, declared: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(host_port(base)).unwrap();
    write!(
        s,
        "PUT /v1/firmware/{name} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    let mut left = sent;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    s.flush().unwrap();
    s
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn upload_cut_off_half_way_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let base = srv.base.clone();
    let s =
        tokio::task::spawn_blocking(move || send_partial_upload(&base, "cut", 12 << 20, 6 << 20))
            .await
            .unwrap();
    // The server is holding a staged upload; then the link drops.
    wait_until("a staged upload", || !srv.blob_files().is_empty()).await;
    drop(s);
    wait_until("the staged upload to be removed", || {
        srv.blob_files().is_empty()
    })
    .await;
    let r = srv.get("/v1/firmware/cut").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // The name is still free for a complete upload.
    let r = srv.put("/v1/firmware/cut", "whole").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    srv.stop().await;
}

#[tokio::test]
async fn killed_mid_upload_keeps_committed_and_sweeps_partial() {
    let dir = tempfile::tempdir().unwrap();
    let data = image(3 << 20, 5);
    let mut p = ServerProcess::start(dir.path(), &[]);
    let c = client();
    let r = c
        .put(p.url("/v1/firmware/committed"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let base = p.base.clone();
    let s = tokio::task::spawn_blocking(move || {
        send_partial_upload(&base, "partial", 40 << 20, 12 << 20)
    })
    .await
    .unwrap();
    let root = dir.path().to_owned();
    wait_until("a staged upload beside the committed blob", || {
        blob_files(&root).len() >= 2
    })
    .await;
    p.kill(); // SIGKILL: no cleanup code runs.
    drop(s);
    assert!(
        blob_files(dir.path()).len() >= 2,
        "the crash left a staged file behind"
    );

    let p = ServerProcess::start(dir.path(), &[]);
    assert_eq!(
        blob_files(dir.path()).len(),
        1,
        "{:?}",
        blob_files(dir.path())
    );
    assert_eq!(
        c.get(p.url("/v1/firmware/partial"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    let got = c
        .get(p.url("/fw/committed"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
}

#[tokio::test]
async fn sigterm_finishes_an_in_flight_download() {
    let dir = tempfile::tempdir().unwrap();
    let data = image(8 << 20, 6);
    let mut p = ServerProcess::start(dir.path(), &[]);
    let r = client()
        .put(p.url("/v1/firmware/big"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let base = p.base.clone();
    let expect = sha256_hex(&data);
    let mut s = TcpStream::connect(host_port(&base)).unwrap();
    write!(
        s,
        "GET /fw/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 4096];
    let n = s.read(&mut first).unwrap();
    assert!(n > 0);
    let status = {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(p.child.id().to_string())
            .status();
        // Keep reading after the signal: the response must complete.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        let mut all = first[..n].to_vec();
        all.extend(rest);
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(
            sha256_hex(&all[split..]),
            expect,
            "download cut short by shutdown"
        );
        p.child.wait().unwrap()
    };
    assert!(status.success(), "exit status {status}");
}

/// Tasks created and cancelled by many clients at once while the process is killed: every
/// change that was answered is there after the restart, and the indexes the engine works from
/// (each device's active task) agree with the stored tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_task_changes_keeps_every_answered_one() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let mut p = ServerProcess::start(dir.path(), &[]);
    let c = client();
    let r = c
        .put(p.url("/v1/firmware/kill-fw"))
        .body(image(4096, 3))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // device → (task id, whether its cancel was answered), for answered creations.
    let answered: Arc<Mutex<Vec<(String, String, bool)>>> = Arc::default();
    // Told by the client whose answer is the quarter's: the kill follows at once. (Polling
    // for it let a fast machine answer all of them before the kill.)
    let quarter = Arc::new(tokio::sync::Notify::new());
    let devices = 400;
    let mut clients = Vec::new();
    for i in 0..devices {
        let (c, base, answered) = (c.clone(), p.base.clone(), answered.clone());
        let quarter = Arc::clone(&quarter);
        clients.push(tokio::spawn(async move {
            let device = format!("kd-{i}");
            let Ok(r) = c
                .post(format!("{base}/v1/devices/{device}/fota"))
                .json(&serde_json::json!({"name": "kill-fw", "protocolType": "HTTP", "timeout": "1d"}))
                .send()
                .await
            else {
                return;
            };
            if r.status() != StatusCode::CREATED {
                return;
            }
            let Ok(v) = r.json::<serde_json::Value>().await else {
                return;
            };
            let id = v["fotaId"].as_str().unwrap().to_owned();
            let slot = {
                let mut a = answered.lock().unwrap();
                a.push((device, id.clone(), false));
                if a.len() == devices / 4 {
                    quarter.notify_one();
                }
                a.len() - 1
            };
            // Every other task is cancelled as soon as it exists: a change of a stored task.
            if i % 2 == 0 {
                let cancelled = c
                    .post(format!("{base}/v1/fota/{id}/cancel"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == StatusCode::OK);
                answered.lock().unwrap()[slot].2 = cancelled;
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(15), quarter.notified())
        .await
        .expect("a quarter of the creations answered within 15 s");
    p.kill(); // SIGKILL, with changes in flight.
    for h in clients {
        h.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() < devices,
        "the kill came before every creation was answered"
    );

    let p = ServerProcess::start(dir.path(), &[]);
    for (device, id, cancelled) in &answered {
        let r = c
            .get(p.url(&format!("/v1/fota/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "task {id} of {device} was answered"
        );
        let task: serde_json::Value = r.json().await.unwrap();
        let status = task["status"].as_str().unwrap().to_owned();
        if *cancelled {
            assert_eq!(status, "cancelled", "{id}'s cancel was answered");
        }
        // The device's active task is this one exactly while it is not cancelled.
        let again = c
            .post(p.url(&format!("/v1/devices/{device}/fota")))
            .json(&serde_json::json!({"name": "kill-fw", "protocolType": "HTTP", "timeout": "1d"}))
            .send()
            .await
            .unwrap();
        if status == "cancelled" {
            assert_eq!(
                again.status(),
                StatusCode::CREATED,
                "{device} is free again"
            );
        } else {
            assert_eq!(
                again.status(),
                StatusCode::CONFLICT,
                "{device} still has {id}"
            );
            let e: serde_json::Value = again.json().await.unwrap();
            assert!(e.to_string().contains(id.as_str()), "{e}");
        }
    }
}
