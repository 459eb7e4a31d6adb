//! Records over time: resolve, list, change, delete, expiry, restart, signatures, operations.

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{client, have_tool, image, sha256_hex, Fetch, TestServer};

#[tokio::test]
async fn short_retention_expires_record_and_blob() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let c = client();
    let resp = c
        .put(srv.url("/v1/firmware/short?retention=1s"))
        .body(image(10_000, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let rec: Value = resp.json().await.unwrap();
    assert_eq!(rec["retention"], "1s");
    let created = time::OffsetDateTime::parse(
        rec["createdAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let expires = time::OffsetDateTime::parse(
        rec["expiresAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(expires - created, time::Duration::seconds(1));
    c.put(srv.url("/v1/firmware/long?retention=1d"))
        .body("keep")
        .send()
        .await
        .unwrap();
    assert_eq!(srv.blob_files().len(), 2);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let gone = c
            .get(srv.url("/v1/firmware/short"))
            .send()
            .await
            .unwrap()
            .status()
            == StatusCode::NOT_FOUND;
        if gone && srv.blob_files().len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired firmware still present: {:?}",
            srv.blob_files()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        c.get(srv.url("/fw/short")).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get(srv.url("/fw/long")).send().await.unwrap().status(),
        StatusCode::OK
    );
    // The name is free again after expiry.
    let resp = c
        .put(srv.url("/v1/firmware/short"))
        .body("new content")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    srv.stop().await;
}

#[tokio::test]
async fn expired_is_404_before_the_sweeper_runs() {
    let dir = tempfile::tempdir().unwrap();
    // A sweeper that would not wake for an hour: only the read-time check can hide it.
    let srv = TestServer::start(dir.path(), &[]).await;
    let c = client();
    c.put(srv.url("/v1/firmware/x"))
        .body("abc")
        .send()
        .await
        .unwrap();
    let r = c
        .patch(srv.url("/v1/firmware/x"))
        .json(&json!({"retention": "1s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // createdAt + 1s has passed once we sleep a little over a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        c.get(srv.url("/fw/x")).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    srv.stop().await;
}

#[tokio::test]
async fn expiry_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    client()
        .put(srv.url("/v1/firmware/soon?retention=2s"))
        .body("abc")
        .send()
        .await
        .unwrap();
    srv.stop().await;
    let srv = TestServer::start(dir.path(), &[]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !srv.blob_files().is_empty() {
        assert!(Instant::now() < deadline, "not swept after restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn list_change_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let c = client();
    for n in ["a-1", "a-2", "a-3", "b-1"] {
        c.put(srv.url(&format!("/v1/firmware/{n}")))
            .body(n.to_owned())
            .send()
            .await
            .unwrap();
    }
    let page: Value = c
        .get(srv.url("/v1/firmware?prefix=a-&limit=2"))
        .value()
        .await;
    let names: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a-1", "a-2"]);
    let cursor = page["nextCursor"].as_str().unwrap();
    let page: Value = c
        .get(srv.url(&format!("/v1/firmware?prefix=a-&limit=2&cursor={cursor}")))
        .value()
        .await;
    let names: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a-3"]);
    assert_eq!(page["nextCursor"], Value::Null);
    let all: Value = c.get(srv.url("/v1/firmware")).value().await;
    assert_eq!(all["items"].as_array().unwrap().len(), 4);
    assert_eq!(
        c.get(srv.url("/v1/firmware?limit=0"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );

    let r: Value = c
        .patch(srv.url("/v1/firmware/a-1"))
        .json(&json!({"retention": "30d", "description": "nightly"}))
        .value()
        .await;
    assert_eq!(r["retention"], "30d");
    assert_eq!(r["description"], "nightly");
    assert!(r["expiresAt"].is_string());
    let r: Value = c
        .patch(srv.url("/v1/firmware/a-1"))
        .json(&json!({"retention": null}))
        .value()
        .await;
    assert_eq!(r["expiresAt"], Value::Null);
    assert_eq!(r["description"], "nightly");
    for (body, code) in [
        (json!({"size": 1}), "invalid-body"),
        (json!({"retention": 5}), "invalid-body"),
        (json!({"retention": "5 days"}), "invalid-duration"),
    ] {
        let resp = c
            .patch(srv.url("/v1/firmware/a-1"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["error"]["code"], code);
    }
    let resp = c
        .patch(srv.url("/v1/firmware/a-1"))
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = c
        .patch(srv.url("/v1/firmware/a-1"))
        .header("content-type", "application/json")
        .body(format!("{{\"description\": \"{}\"}}", "x".repeat(100_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let resp = c
        .patch(srv.url("/v1/firmware/zzz"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    assert_eq!(srv.blob_files().len(), 4);
    // Warm the record and image caches; deleting must make both forget at once.
    assert_eq!(
        c.get(srv.url("/fw/a-2"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "a-2"
    );
    assert_eq!(
        c.delete(srv.url("/v1/firmware/a-2"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        c.get(srv.url("/v1/firmware/a-2"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get(srv.url("/fw/a-2")).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.delete(srv.url("/v1/firmware/a-2"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(srv.blob_files().len(), 3);
    // The freed name takes new content, and devices get the new bytes.
    let r = c
        .put(srv.url("/v1/firmware/a-2"))
        .body("second")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        c.get(srv.url("/fw/a-2"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "second"
    );
    srv.stop().await;
}

/// A PATCH reads the record, changes its fields and writes it back: two at once, each
/// changing another field, must both land.
#[tokio::test]
async fn concurrent_changes_of_different_fields_both_land() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let c = client();
    for round in 0..40 {
        let name = format!("c-{round}");
        c.put(srv.url(&format!("/v1/firmware/{name}")))
            .body(name.clone())
            .send()
            .await
            .unwrap();
        let url = srv.url(&format!("/v1/firmware/{name}"));
        let patch = |body: Value| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let r = c.patch(&url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), StatusCode::OK);
            })
        };
        let a = patch(json!({"description": format!("round {round}")}));
        let b = patch(json!({"retention": "30d"}));
        a.await.unwrap();
        b.await.unwrap();
        let r: Value = c.get(url).value().await;
        assert_eq!(r["description"], format!("round {round}"), "{r}");
        assert_eq!(r["retention"], "30d", "{r}");
    }
    srv.stop().await;
}

#[tokio::test]
async fn restart_keeps_firmware_keys_and_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let data = image(200_000, 9);
    let srv = TestServer::start(dir.path(), &[]).await;
    let c = client();
    let before: Value = c
        .put(srv.url("/v1/firmware/keep"))
        .body(data.clone())
        .value()
        .await;
    let keys_before: Value = c.get(srv.url("/v1/keys")).value().await;
    srv.stop().await;

    let srv = TestServer::start(dir.path(), &[]).await;
    let after: Value = c.get(srv.url("/v1/firmware/keep")).value().await;
    for field in ["sha256", "size", "createdAt", "signature"] {
        assert_eq!(after[field], before[field], "{field}");
    }
    let keys_after: Value = c.get(srv.url("/v1/keys")).value().await;
    assert_eq!(keys_after, keys_before);
    let got = c
        .get(srv.url("/fw/keep"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    srv.stop().await;
}

#[tokio::test]
async fn signature_verifies_with_openssl() {
    if !have_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let c = client();
    let data = image(70_000, 4);
    let rec: Value = c
        .put(srv.url("/v1/firmware/signed"))
        .body(data.clone())
        .value()
        .await;
    let keys: Value = c.get(srv.url("/v1/keys")).value().await;
    let key = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["keyId"] == rec["signature"]["keyId"])
        .expect("signing key listed");
    assert_eq!(key["alg"], "ed25519");
    assert_eq!(key["active"], true);
    let raw_sig = c
        .get(srv.url("/v1/firmware/signed/signature"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        raw_sig.headers()["fwrepo-key-id"],
        key["keyId"].as_str().unwrap()
    );
    let raw_sig = raw_sig.bytes().await.unwrap();
    assert_eq!(raw_sig.len(), 64);
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(
        b64.encode(&raw_sig),
        rec["signature"]["value"].as_str().unwrap()
    );
    let raw_pub = b64.decode(key["publicKey"].as_str().unwrap()).unwrap();
    assert_eq!(raw_pub.len(), 32);

    let work = tempfile::tempdir().unwrap();
    let p = |n: &str| work.path().join(n);
    std::fs::write(p("pub.pem"), key["pem"].as_str().unwrap()).unwrap();
    std::fs::write(p("sig.bin"), &raw_sig).unwrap();
    use sha2::Digest;
    std::fs::write(p("digest.bin"), sha2::Sha256::digest(&data)).unwrap();
    let verify = |digest: &std::path::Path| {
        Command::new("openssl")
            .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
            .arg(p("pub.pem"))
            .arg("-rawin")
            .arg("-in")
            .arg(digest)
            .arg("-sigfile")
            .arg(p("sig.bin"))
            .output()
            .unwrap()
    };
    let ok = verify(&p("digest.bin"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::write(p("other.bin"), sha2::Sha256::digest(b"tampered")).unwrap();
    assert!(
        !verify(&p("other.bin")).status.success(),
        "a wrong digest verified"
    );

    // The private key on disk is a PKCS#8 file OpenSSL reads, with the same public key.
    let pem = std::fs::read_dir(dir.path().join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pem"))
        .unwrap();
    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        key["pem"].as_str().unwrap()
    );
    srv.stop().await;
}

#[tokio::test]
async fn keygen_adds_a_key_and_retired_keys_stay_listed() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let c = client();
    let old: Value = c.put(srv.url("/v1/firmware/old")).body("old").value().await;
    srv.stop().await;
    let out = Command::new(env!("CARGO_BIN_EXE_fwrepo"))
        .arg("keygen")
        .arg("--keys")
        .arg(dir.path().join("keys"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(new_id.len(), 16);
    let set = format!("keys.active={new_id}");
    let srv = TestServer::start(dir.path(), &[&set]).await;
    let new: Value = c.put(srv.url("/v1/firmware/new")).body("new").value().await;
    assert_eq!(new["signature"]["keyId"], new_id.as_str());
    let keys: Value = c.get(srv.url("/v1/keys")).value().await;
    let ids: Vec<&str> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["keyId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&old["signature"]["keyId"].as_str().unwrap()));
    let still: Value = c.get(srv.url("/v1/firmware/old")).value().await;
    assert_eq!(still["signature"], old["signature"]);
    srv.stop().await;
}

#[tokio::test]
async fn operations_and_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let c = client();
    let h: Value = c.get(srv.url("/healthz")).value().await;
    assert_eq!(h["status"], "ok");
    c.put(srv.url("/v1/firmware/m1"))
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap();
    c.get(srv.url("/fw/m1"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    c.get(srv.url("/fw/m1"))
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let m = c
        .get(srv.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("fwrepo_http_requests_total{route=\"/fw/{name}\",status=\"200\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("fwrepo_http_requests_total{route=\"/fw/{name}\",status=\"206\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("fwrepo_http_requests_total{route=\"/v1/firmware/{name}\",status=\"201\"} 1"),
        "{m}"
    );
    assert!(m.contains("\nfwrepo_bytes_served_total 1100\n"), "{m}");
    assert!(m.contains("\nfwrepo_uploads_total 1\n"), "{m}");
    assert!(m.contains("\nfwrepo_firmware_count 1\n"), "{m}");
    assert!(m.contains("\nfwrepo_firmware_bytes 1000\n"), "{m}");

    let r = c.get(srv.url("/no/such/route")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "not-found"
    );
    let r = c.post(srv.url("/v1/firmware/m1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "method-not-allowed"
    );
    srv.stop().await;
}
