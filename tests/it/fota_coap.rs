//! FOTA over CoAP with real peers: libcoap's coap-client asks for work (JSON and CBOR),
//! downloads the package URI block-wise over TCP and UDP, and reports in SenML JSON and JSON;
//! frame-level checks of the answers a client library would see.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use fwrepo::coap::msg::{code, codes, format, opt, Message};
use serde_json::{json, Value};

use crate::coap_protocol::{connect, get, recv};
use crate::common::{have_tool, image, sha256_hex, tool};
use crate::fota::Fota;

async fn coap_client(args: &[&str], out: Option<&Path>) -> Vec<u8> {
    let program = tool("coap-client-notls").unwrap();
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(["-B", "30"]).args(args).kill_on_drop(true);
    if let Some(o) = out {
        cmd.arg("-o").arg(o);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("coap-client finishes")
        .unwrap();
    assert!(
        output.status.success(),
        "coap-client {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    match out {
        Some(o) => std::fs::read(o).unwrap(),
        None => output.stdout,
    }
}

fn cbor_text(v: &ciborium::Value, key: &str) -> Option<String> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_text() == Some(key))
        .and_then(|(_, v)| v.as_text().map(str::to_owned))
}

#[tokio::test]
async fn libcoap_device_over_tcp_and_udp() {
    if !have_tool("coap-client-notls") {
        return;
    }
    let f = Fota::start(&[]).await;
    let data = image(100_000, 8);
    f.upload("fw", &data, "").await;
    let tcp = f.srv.coap_tcp.unwrap();
    let udp = f.srv.coap_udp.unwrap();

    let id = f
        .schedule("tcp-dev", json!({"name": "fw", "protocolType": "COAP_TCP"}))
        .await;
    let out = coap_client(
        &["-m", "get", &format!("coap+tcp://{tcp}/fota/tcp-dev")],
        None,
    )
    .await;
    let work: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(work["fotaId"], id.as_str());
    assert_eq!(work["sha256"], sha256_hex(&data));
    let uri = work["packageUri"].as_str().unwrap().to_owned();
    assert!(
        uri.starts_with(&format!("coap+tcp://{tcp}/p/{id}/")),
        "{uri}"
    );
    // The same answer in CBOR when asked with Accept 60.
    let out = coap_client(
        &[
            "-m",
            "get",
            "-A",
            "60",
            &format!("coap+tcp://{tcp}/fota/tcp-dev"),
        ],
        None,
    )
    .await;
    let cbor: ciborium::Value = ciborium::from_reader(out.as_slice()).unwrap();
    assert_eq!(
        cbor_text(&cbor, "packageUri").as_deref(),
        Some(uri.as_str())
    );
    assert_eq!(cbor_text(&cbor, "sha256"), Some(sha256_hex(&data)));

    let file = f.dir.path().join("tcp.out");
    let got = coap_client(&["-m", "get", "-b", "1024", &uri], Some(&file)).await;
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    let pack = r#"[{"bn":"/5/0/","n":"3","v":2},{"n":"5","v":0},{"n":"6","vs":"app"}]"#;
    coap_client(
        &[
            "-m",
            "post",
            "-t",
            "110",
            "-e",
            pack,
            &format!("coap+tcp://{tcp}/fota/{id}/report"),
        ],
        None,
    )
    .await;
    let v = f.status(&id).await;
    assert_eq!(v["status"], "downloaded");
    assert_eq!(v["progress"]["bytesServed"], data.len());

    // Over UDP with 1 KiB blocks, reporting in plain JSON.
    let id = f.schedule("udp-dev", json!({"name": "fw"})).await;
    let out = coap_client(&["-m", "get", &format!("coap://{udp}/fota/udp-dev")], None).await;
    let work: Value = serde_json::from_slice(&out).unwrap();
    let uri = work["packageUri"].as_str().unwrap().to_owned();
    assert!(uri.starts_with(&format!("coap://{udp}/p/{id}/")), "{uri}");
    let file = f.dir.path().join("udp.out");
    let got = coap_client(&["-m", "get", "-b", "1024", &uri], Some(&file)).await;
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    let report = format!("coap://{udp}/fota/{id}/report");
    for body in [
        r#"{"state":2,"result":0}"#,
        r#"{"state":3,"result":0}"#,
        r#"{"state":0,"result":1}"#,
    ] {
        coap_client(&["-m", "post", "-t", "50", "-e", body, &report], None).await;
    }
    assert_eq!(f.status(&id).await["status"], "succeeded");
    f.srv.stop().await;
}

#[tokio::test]
async fn coap_answers_frame_by_frame() {
    let f = Fota::start(&[]).await;
    f.upload("fw", b"firmware", "").await;
    let mut c = connect(&f.srv, 65536, false).await;

    // Nothing to do: 2.05 without payload, Max-Age says when to ask again.
    c.send(&get(b"n", "fota/idle-dev")).await.unwrap();
    let m = recv(&mut c).await;
    assert_eq!((m.code, m.payload.len()), (codes::CONTENT, 0));
    assert_eq!(m.uint_option(opt::MAX_AGE), Some(60));

    let id = f
        .schedule("dev", json!({"name": "fw", "schedule": "weekends"}))
        .await;
    c.send(&get(b"w", "fota/dev")).await.unwrap();
    let m = recv(&mut c).await;
    assert_eq!((m.code, m.payload.len()), (codes::CONTENT, 0));
    assert_eq!(
        m.uint_option(opt::MAX_AGE),
        Some(12 * 3600),
        "until Saturday 00:00"
    );

    let mut accept = get(b"a", "fota/dev");
    accept.push_uint(opt::ACCEPT, 42);
    c.send(&accept).await.unwrap();
    assert_eq!(recv(&mut c).await.code, codes::NOT_ACCEPTABLE);

    let report = |token: &'static [u8], cf: u16, body: &str| {
        let mut m = Message::new(codes::POST, Bytes::from_static(token));
        for seg in ["fota", id.as_str(), "report"] {
            m.push(opt::URI_PATH, Bytes::copy_from_slice(seg.as_bytes()));
        }
        m.push_uint(opt::CONTENT_FORMAT, cf as u64);
        m.payload = Bytes::copy_from_slice(body.as_bytes());
        m
    };
    // Not delivered yet: the state machine refuses with 4.09; a pack without the Update Result
    // is 4.22; other content formats 4.15; a package that is not being delivered is 4.04.
    c.send(&report(b"r1", format::JSON, r#"{"state":1,"result":0}"#))
        .await
        .unwrap();
    assert_eq!(recv(&mut c).await.code, codes::CONFLICT);
    c.send(&report(
        b"r2",
        format::SENML_JSON,
        r#"[{"n":"/5/0/3","v":1}]"#,
    ))
    .await
    .unwrap();
    assert_eq!(recv(&mut c).await.code, code(4, 22));
    c.send(&report(b"r3", format::CBOR, "")).await.unwrap();
    assert_eq!(recv(&mut c).await.code, codes::UNSUPPORTED_CONTENT_FORMAT);
    c.send(&get(b"p", &format!("p/{id}"))).await.unwrap();
    assert_eq!(recv(&mut c).await.code, code(4, 4));
    // Unknown tasks and devices with bad ids.
    c.send(&get(b"u", "fota/bad%id")).await.unwrap();
    assert_eq!(recv(&mut c).await.code, codes::BAD_REQUEST);
    // A device that gives up while pending ends the task.
    c.send(&report(b"r4", format::JSON, r#"{"state":0,"result":10}"#))
        .await
        .unwrap();
    assert_eq!(recv(&mut c).await.code, codes::CHANGED);
    assert_eq!(f.status(&id).await["status"], "cancelled");
    c.send(&report(b"r5", format::JSON, r#"{"state":0,"result":10}"#))
        .await
        .unwrap();
    assert_eq!(recv(&mut c).await.code, codes::CONFLICT);
    f.srv.stop().await;
}
