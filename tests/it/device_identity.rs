//! Device identity: a device token made with a task or through the device API, required on
//! the device's work requests and reports over HTTP and CoAP, so a stranger who knows a
//! device id cannot take its package URI or fail its task, and a device cannot report on
//! another's task.

use bytes::Bytes;
use futures_util::SinkExt;
use fwrepo::coap::msg::{codes, opt};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::coap_protocol::{connect, get, recv};
use crate::common::client;

/// `POST /v1/devices/{device}/token`: the new token.
async fn issue_token(f: &Fota, device: &str) -> String {
    let r = client()
        .post(f.srv.url(&format!("/v1/devices/{device}/token")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `DELETE /v1/devices/{device}/token`: the status.
async fn revoke_token(f: &Fota, device: &str) -> StatusCode {
    let r = client()
        .delete(f.srv.url(&format!("/v1/devices/{device}/token")))
        .send()
        .await
        .unwrap();
    r.status()
}
use crate::fota::Fota;

async fn schedule_with_token(f: &Fota, device: &str) -> (String, String) {
    let r = f
        .srv
        .post(
            &format!("/v1/devices/{device}/fota"),
            &json!({"name": "fw", "protocolType": "HTTP", "issueDeviceToken": true}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    (
        v["fotaId"].as_str().unwrap().to_owned(),
        v["deviceToken"].as_str().unwrap().to_owned(),
    )
}

async fn work(f: &Fota, device: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = client().get(f.srv.url(&format!("/v1/devices/{device}/fota")));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

async fn report(f: &Fota, id: &str, body: Value, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = client()
        .post(f.srv.url(&format!("/v1/fota/{id}/report")))
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_a_token_must_present_it_and_acts_only_for_itself() {
    let f = Fota::start(&[]).await;
    f.upload("fw", b"firmware", "").await;
    let (id, token) = schedule_with_token(&f, "meter-1").await;
    assert!(token.starts_with("fwd_"));
    let (other_id, other_token) = schedule_with_token(&f, "meter-2").await;

    // Without its token, or with another device's, no work and no package URI.
    for (who, t) in [("nobody", None), ("meter-2", Some(other_token.as_str()))] {
        let (status, v) = work(&f, "meter-1", t).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{who}: {v}");
        assert_eq!(v["error"]["code"], "device-unauthenticated");
        assert!(!v.to_string().contains("/p/"), "{v}");
    }
    let (status, v) = work(&f, "meter-1", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["fotaId"], id);

    // A stranger cannot fail the task; nor can another device, with its own valid token.
    let fail = json!({"state": 0, "result": 5});
    for t in [None, Some(other_token.as_str()), Some("fwd_forged")] {
        let (status, v) = report(&f, &id, fail.clone(), t).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{t:?}: {v}");
        assert_eq!(v["error"]["code"], "device-unauthenticated");
    }
    assert_eq!(f.status(&id).await["status"], "delivering");
    let (status, _) = report(&f, &id, json!({"state": 2, "result": 0}), Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(f.status(&id).await["status"], "downloaded");

    // A device without a token acts as before while device_credentials is off.
    f.upload("fw-open", b"open", "").await;
    let open = f
        .schedule(
            "meter-3",
            json!({"name": "fw-open", "protocolType": "HTTP"}),
        )
        .await;
    assert_eq!(work(&f, "meter-3", None).await.0, StatusCode::OK);
    let (status, _) = report(&f, &open, json!({"state": 2, "result": 0}), None).await;
    assert_eq!(status, StatusCode::OK);

    // A new token replaces the old one; revoking leaves the device without.
    let fresh = issue_token(&f, "meter-2").await;
    assert_eq!(
        work(&f, "meter-2", Some(&other_token)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(work(&f, "meter-2", Some(&fresh)).await.0, StatusCode::OK);
    assert_eq!(revoke_token(&f, "meter-2").await, StatusCode::NO_CONTENT);
    assert_eq!(revoke_token(&f, "meter-2").await, StatusCode::NOT_FOUND);
    let (status, _) = report(&f, &other_id, json!({"state": 2, "result": 0}), None).await;
    assert_eq!(status, StatusCode::OK);
    // Tokens are stored hashed only.
    let mut stored = Vec::new();
    for entry in crate::common::files_under(f.dir.path()) {
        stored.extend(std::fs::read(entry).unwrap_or_default());
    }
    let stored = String::from_utf8_lossy(&stored);
    assert!(!stored.contains(&token[4..]) && !stored.contains(&fresh[4..]));
    f.srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_device_credentials_on_every_device_needs_its_token_over_http_and_coap() {
    let f = Fota::start(&["auth.device_credentials=true"]).await;
    f.upload("fw", b"firmware", "").await;
    let id = f
        .schedule("tracker", json!({"name": "fw", "protocolType": "COAP_TCP"}))
        .await;
    let (status, v) = work(&f, "tracker", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    let (status, _) = report(&f, &id, json!({"state": 0, "result": 5}), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let token = issue_token(&f, "tracker").await;

    // CoAP: the token as Uri-Query token=...
    let mut c = connect(&f.srv, 8192, false).await;
    c.send(&get(b"\x01", "fota/tracker")).await.unwrap();
    assert_eq!(recv(&mut c).await.code, codes::UNAUTHORIZED);
    let mut with = get(b"\x02", "fota/tracker");
    with.push(opt::URI_QUERY, Bytes::from(format!("token={token}")));
    c.send(&with).await.unwrap();
    let answer = recv(&mut c).await;
    assert_eq!(answer.code, codes::CONTENT);
    let v: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(v["fotaId"], id);

    let mut bare = fwrepo::coap::msg::Message::new(codes::POST, Bytes::from_static(b"\x03"));
    for seg in ["fota", &id, "report"] {
        bare.push(opt::URI_PATH, Bytes::copy_from_slice(seg.as_bytes()));
    }
    bare.push_uint(opt::CONTENT_FORMAT, 50);
    bare.payload = Bytes::from_static(br#"{"state": 2, "result": 0}"#);
    c.send(&bare).await.unwrap();
    assert_eq!(recv(&mut c).await.code, codes::UNAUTHORIZED);
    let mut signed = bare.clone();
    signed.token = Bytes::from_static(b"\x04");
    signed.options.retain(|(n, _)| *n != opt::CONTENT_FORMAT);
    signed.push(opt::URI_QUERY, Bytes::from(format!("token={token}")));
    signed.push_uint(opt::CONTENT_FORMAT, 50);
    c.send(&signed).await.unwrap();
    assert_eq!(recv(&mut c).await.code, codes::CHANGED);
    assert_eq!(f.status(&id).await["status"], "downloaded");
    f.srv.stop().await;
}
