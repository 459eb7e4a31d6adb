//! Debian's SWUpdate (suricatta, its hawkBit client) as a real device on the DDI API: it polls,
//! is offered a deployment, downloads a CMS-signed `.swu` (checking the sha1 it was given and
//! the image's own sha256), installs it with the `rawfile` handler into a temporary directory,
//! and confirms after a "reboot"; a second device acknowledges a cancellation.
//!
//! Debian's build keeps the update state with the `none` bootloader, in memory: after an
//! install it reports "Update Installed, Testing Pending" and waits for a restart. The test
//! restarts it with `-c 2` (the confirmation a real device's next boot makes), which reports
//! the success.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{client, have_tool, image, poll, tool};
use crate::fota::Fota;

/// A signer for `.swu` images: a self-signed certificate with extended key usage
/// emailProtection, which SWUpdate requires by default.
fn signer(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("signer.pem"), dir.join("signer.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=fwrepo-test-signer"])
        .args(["-addext", "extendedKeyUsage=emailProtection"])
        .args(["-addext", "keyUsage=digitalSignature"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A `.swu` that writes `payload` to `target` with the rawfile handler: sw-description (JSON,
/// with the hardware compatibility SWUpdate insists on), its CMS signature, then the payload,
/// in a `cpio -H crc` archive.
fn swu(dir: &Path, payload: &[u8], target: &Path, signer: &(PathBuf, PathBuf)) -> Vec<u8> {
    let work = dir.join("swu");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("payload.bin"), payload).unwrap();
    let description = json!({"software": {
        "version": "2.1.0",
        "description": "fwrepo DDI test",
        "hardware-compatibility": ["1.0"],
        "files": [{
            "filename": "payload.bin",
            "path": target,
            "sha256": crate::common::sha256_hex(payload),
        }],
    }});
    std::fs::write(work.join("sw-description"), description.to_string()).unwrap();
    let out = std::process::Command::new("openssl")
        .args([
            "cms",
            "-sign",
            "-in",
            "sw-description",
            "-out",
            "sw-description.sig",
        ])
        .arg("-signer")
        .arg(&signer.0)
        .arg("-inkey")
        .arg(&signer.1)
        .args(["-outform", "DER", "-nosmimecap", "-binary"])
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cpio = std::process::Command::new(tool("cpio").unwrap())
        .args(["-o", "-H", "crc", "--quiet"])
        .current_dir(&work)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    cpio.stdin
        .take()
        .unwrap()
        .write_all(b"sw-description\nsw-description.sig\npayload.bin\n")
        .unwrap();
    let out = cpio.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// SWUpdate's suricatta polling `f` as device `id`, with its own socket directory so tests
/// run side by side; killed when dropped. `extra` goes into suricatta's arguments.
fn suricatta(f: &Fota, dir: &Path, id: &str, extra: &str, cert: &Path) -> tokio::process::Child {
    let run = dir.join(format!("run-{id}"));
    std::fs::create_dir_all(&run).unwrap();
    let log = std::fs::File::create(dir.join(format!("swupdate-{id}.log"))).unwrap();
    tokio::process::Command::new(tool("swupdate").unwrap())
        .arg("-v")
        .arg("-k")
        .arg(cert)
        .args(["-H", "board:1.0"])
        .arg("-u")
        .arg(format!("-t DEFAULT -u {} -i {id} -p 1 {extra}", f.srv.base))
        .env("TMPDIR", &run)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn details(task: &Value) -> Vec<String> {
    task["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["detail"].as_str().map(str::to_owned))
        .collect()
}

fn log_of(dir: &Path, id: &str) -> String {
    std::fs::read_to_string(dir.join(format!("swupdate-{id}.log"))).unwrap_or_default()
}

#[tokio::test]
async fn swupdate_installs_a_deployment_and_confirms_it() {
    if !have_tool("swupdate") || !have_tool("cpio") {
        return;
    }
    let f = Fota::start(&["fota.poll_interval=2s", "auth.device_credentials=true"]).await;
    let dir = f.dir.path().to_owned();
    let signer = signer(&dir);
    let payload = image(300_000, 77);
    let target = dir.join("installed/app.img");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let image = swu(&dir, &payload, &target, &signer);
    f.upload("gw-2.1.0.swu", &image, "?version=2.1.0").await;
    let r = f
        .srv
        .post(
            "/v1/devices/gw-1/fota",
            &json!({"name": "gw-2.1.0.swu", "protocolType": "HTTP", "issueDeviceToken": true}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    let id = v["fotaId"].as_str().unwrap().to_owned();
    let token = v["deviceToken"].as_str().unwrap().to_owned();

    // The device polls with its TargetToken, downloads, checks and installs.
    let mut device = suricatta(&f, &dir, "gw-1", &format!("-k {token}"), &signer.0);
    let t = poll(
        async || f.status(&id).await,
        |t| {
            details(t)
                .iter()
                .any(|d| d.contains("All Chunks Installed"))
        },
    )
    .await;
    assert!(
        details(&t)
            .iter()
            .any(|d| d.contains("All Chunks Installed")),
        "{t}\n{}",
        log_of(&dir, "gw-1")
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        payload,
        "installed as sent"
    );
    assert_eq!(t["status"], "downloading", "installed, not yet confirmed");
    assert_eq!(t["progress"]["bytesServed"], image.len());
    device.kill().await.unwrap();

    // The "reboot": the new image confirms itself, and the task ends succeeded.
    let _device = suricatta(&f, &dir, "gw-1", &format!("-k {token} -c 2"), &signer.0);
    let t = f.wait_status(&id, "succeeded").await;
    let last = t["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["detail"], "closed 0/0: Update Installed.", "{t}");
    assert_eq!(t["updateResult"], 1);
}

#[tokio::test]
async fn swupdate_acknowledges_a_cancellation() {
    if !have_tool("swupdate") || !have_tool("cpio") {
        return;
    }
    let f = Fota::start(&["fota.poll_interval=2s"]).await;
    let dir = f.dir.path().to_owned();
    let signer = signer(&dir);
    let target = dir.join("never/app.img");
    let image = swu(&dir, &image(1000, 5), &target, &signer);
    f.upload("gw-2.2.0.swu", &image, "").await;
    let id = f
        .schedule(
            "gw-2",
            json!({"name": "gw-2.2.0.swu", "protocolType": "HTTP"}),
        )
        .await;
    // The device's poll hands the deployment over (as a first poll of suricatta's would);
    // the operator cancels before anything is downloaded.
    let r = client()
        .get(f.srv.url("/DEFAULT/controller/v1/gw-2"))
        .send()
        .await
        .unwrap();
    let base: Value = r.json().await.unwrap();
    assert!(base["_links"]["deploymentBase"].is_object(), "{base}");
    let r = f
        .srv
        .post(&format!("/v1/fota/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    let _device = suricatta(&f, &dir, "gw-2", "", &signer.0);
    let acknowledged = |t: &Value| {
        t["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["reason"] == "cancel-acknowledged")
    };
    let t = poll(async || f.status(&id).await, acknowledged).await;
    assert!(acknowledged(&t), "{t}\n{}", log_of(&dir, "gw-2"));
    let last = t["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["detail"], "closed: cancellation acknowledged.");
    assert_eq!(t["status"], "cancelled");
    assert_eq!(t["progress"]["bytesServed"], 0);
    // Once answered, the device is no longer told to cancel.
    let base: Value = client()
        .get(f.srv.url("/DEFAULT/controller/v1/gw-2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(base["_links"].get("cancelAction").is_none(), "{base}");
    assert!(!target.exists());
}
