//! The FOTA engine driven by simulated devices over HTTP: success with a real download,
//! every failure result, timeout, cancel, deferral, resume with ranges, quota, windows on an
//! injected clock, cached data, restart, direct methods and the event stream.

use std::sync::Arc;
use std::time::Duration;

use fwrepo::fota::ManualClock;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{client, image, poll, sha256_hex, sse_events, Fetch, TestServer};

/// Friday 2026-11-20 12:00 UTC.
pub const FRIDAY_NOON: &str = "2026-11-20T12:00:00Z";

pub fn ms(s: &str) -> i64 {
    s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

pub struct Fota {
    pub dir: tempfile::TempDir,
    pub srv: TestServer,
    pub clock: Arc<ManualClock>,
}

impl Fota {
    pub async fn start(sets: &[&str]) -> Fota {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(ms(FRIDAY_NOON)));
        let srv = TestServer::start_with_clock(dir.path(), sets, clock.clone()).await;
        Fota { dir, srv, clock }
    }

    /// Stops and starts again on the same data, keeping the clock.
    pub async fn restart(self, sets: &[&str]) -> Fota {
        let Fota { dir, srv, clock } = self;
        srv.stop().await;
        let srv = TestServer::start_with_clock(dir.path(), sets, clock.clone()).await;
        Fota { dir, srv, clock }
    }

    pub async fn upload(&self, name: &str, data: &[u8], query: &str) {
        let r = self
            .srv
            .put(&format!("/v1/firmware/{name}{query}"), data.to_vec())
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }

    pub async fn schedule(&self, device: &str, body: Value) -> String {
        let r = self
            .srv
            .post(&format!("/v1/devices/{device}/fota"), &body)
            .await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v["fotaId"].as_str().unwrap().to_owned()
    }

    pub async fn work(&self, device: &str) -> reqwest::Response {
        self.srv.get(&format!("/v1/devices/{device}/fota")).await
    }

    /// The device asks for work and must get its task.
    pub async fn deliver(&self, device: &str) -> Value {
        let r = self.work(device).await;
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    pub async fn report(&self, id: &str, state: u8, result: u8) -> (StatusCode, Value) {
        let r = self
            .srv
            .post(
                &format!("/v1/fota/{id}/report"),
                &json!({"state": state, "result": result}),
            )
            .await;
        (r.status(), r.json().await.unwrap())
    }

    pub async fn status(&self, id: &str) -> Value {
        self.srv
            .get(&format!("/v1/fota/{id}"))
            .await
            .json()
            .await
            .unwrap()
    }

    /// Waits until the task shows `status` (timers run in the background).
    pub async fn wait_status(&self, id: &str, status: &str) -> Value {
        let v = poll(async || self.status(id).await, |v| v["status"] == status).await;
        assert_eq!(v["status"], status, "task {id} never became {status}: {v}");
        v
    }

    /// Waits until the task's reason is `reason`.
    pub async fn wait_reason(&self, id: &str, reason: &str) -> Value {
        let v = poll(async || self.status(id).await, |v| v["reason"] == reason).await;
        assert_eq!(
            v["reason"], reason,
            "task {id} never had reason {reason}: {v}"
        );
        v
    }
}

fn statuses(v: &Value) -> Vec<String> {
    v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap().to_owned())
        .collect()
}

async fn download(url: &str, range: Option<&str>) -> (StatusCode, Vec<u8>) {
    let mut req = client().get(url);
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let resp = req.send().await.unwrap();
    (resp.status(), resp.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn full_success_path_with_a_real_download() {
    let f = Fota::start(&[]).await;
    let data = image(300_000, 1);
    f.upload("acme.com-1a2b", &data, "?description=app&version=2.0")
        .await;
    let id = f
        .schedule(
            "urn:imei:490154203237518",
            json!({"name": "acme.com-1a2b", "protocolType": "http", "upgradeStrategy": "SendBased"}),
        )
        .await;
    assert_eq!(id.len(), 32);
    let v = f.status(&id).await;
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("pending"), Some("device"))
    );
    assert_eq!(
        v["deadline"],
        Value::Null,
        "the timeout starts at the first delivery"
    );

    let work = f.deliver("urn:imei:490154203237518").await;
    assert_eq!(work["fotaId"], id.as_str());
    assert_eq!(work["sha256"], sha256_hex(&data));
    assert_eq!(work["size"], data.len());
    assert_eq!(work["upgradeStrategy"], "SendBased");
    assert!(work["signature"].as_str().unwrap().len() > 80);
    let uri = work["packageUri"].as_str().unwrap();
    assert!(
        uri.starts_with(&format!("{}/p/{id}/", f.srv.base)) && uri.len() <= 255,
        "{uri}"
    );
    let v = f.status(&id).await;
    assert_eq!(v["status"], "delivering");
    assert_eq!(v["deadline"].as_str().unwrap(), "2026-11-20T12:20:00Z");
    // Asking again gives the same task.
    assert_eq!(
        f.deliver("urn:imei:490154203237518").await["fotaId"],
        id.as_str()
    );

    let (status, got) = download(uri, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    let v = f.status(&id).await;
    assert_eq!(v["status"], "downloading");
    assert_eq!(v["progress"]["bytesServed"], data.len());
    assert_eq!(v["progress"]["size"], data.len());

    for (state, expect) in [(1, "downloading"), (2, "downloaded"), (3, "updating")] {
        let (code, v) = f.report(&id, state, 0).await;
        assert_eq!(code, StatusCode::OK, "{v}");
        assert_eq!(v["status"], expect);
    }
    let (code, v) = f.report(&id, 0, 1).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["updateResult"], 1);
    assert!(v["finishedAt"].is_string());
    assert_eq!(
        statuses(&v),
        [
            "pending",
            "delivering",
            "downloading",
            "downloaded",
            "updating",
            "succeeded"
        ]
    );
    // A finished task takes no more reports and its package is gone.
    let (code, v) = f.report(&id, 0, 1).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "task-finished");
    let (status, _) = download(uri, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let r = f.work("urn:imei:490154203237518").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["retry-after"], "60");
    f.srv.stop().await;
}

#[tokio::test]
async fn each_failure_result_ends_the_task_with_its_meaning() {
    let f = Fota::start(&[]).await;
    f.upload("fw", b"firmware", "").await;
    let reasons = [
        "not-enough-flash",
        "out-of-ram",
        "connection-lost",
        "integrity-check-failure",
        "unsupported-package-type",
        "invalid-uri",
        "update-failed",
        "unsupported-protocol",
    ];
    for (result, reason) in (2u8..=9).zip(reasons) {
        let device = format!("dev-{result}");
        let id = f.schedule(&device, json!({"name": "fw"})).await;
        f.deliver(&device).await;
        let (code, v) = f.report(&id, 1, result).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            (v["status"].as_str(), v["reason"].as_str()),
            (Some("failed"), Some(reason))
        );
        assert_eq!(v["updateResult"], result);
        // The device is free for a new task.
        assert_eq!(f.work(&device).await.status(), StatusCode::NO_CONTENT);
    }
    // Result 10 from the device is a cancellation; a transition the machine does not allow
    // changes nothing.
    let id = f.schedule("dev-10", json!({"name": "fw"})).await;
    f.deliver("dev-10").await;
    let (code, v) = f.report(&id, 3, 0).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "transition-not-allowed");
    assert_eq!(f.status(&id).await["status"], "delivering");
    let (code, v) = f.report(&id, 0, 10).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("cancelled"), Some("cancelled-by-device"))
    );
    // Malformed reports are 400.
    let r = f
        .srv
        .post(
            &format!("/v1/fota/{id}/report"),
            &json!({"state": 9, "result": 0}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = f
        .srv
        .post("/v1/fota/ffff/report", &json!({"state": 1, "result": 0}))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    f.srv.stop().await;
}

#[tokio::test]
async fn timeout_runs_from_the_first_delivery() {
    let f = Fota::start(&[]).await;
    f.upload("fw", b"firmware", "").await;
    let id = f
        .schedule("d1", json!({"name": "fw", "timeout": "10m"}))
        .await;
    // An hour before the device asks does not count.
    f.clock.advance(Duration::from_secs(3600));
    f.deliver("d1").await;
    f.clock.advance(Duration::from_secs(9 * 60));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.status(&id).await["status"], "delivering");
    f.clock.advance(Duration::from_secs(61));
    let v = f.wait_status(&id, "failed").await;
    assert_eq!(v["reason"], "timeout");
    assert_eq!(v["finishedAt"].as_str().unwrap(), "2026-11-20T13:10:01Z");
    let (code, _) = f.report(&id, 1, 0).await;
    assert_eq!(code, StatusCode::CONFLICT);
    f.srv.stop().await;
}

/// The timer sleeps until the earliest deadline it knows; a later task whose deadline comes
/// sooner must wake it.
#[tokio::test]
async fn a_sooner_deadline_wakes_the_timer() {
    let f = Fota::start(&[]).await;
    f.upload("fw", b"firmware", "").await;
    let long = f
        .schedule("d1", json!({"name": "fw", "timeout": "1h"}))
        .await;
    f.deliver("d1").await;
    let short = f
        .schedule("d2", json!({"name": "fw", "timeout": "10m"}))
        .await;
    f.deliver("d2").await;
    f.clock.advance(Duration::from_secs(10 * 60 + 1));
    let v = f.wait_status(&short, "failed").await;
    assert_eq!(v["reason"], "timeout");
    assert_eq!(f.status(&long).await["status"], "delivering");
    f.srv.stop().await;
}

#[tokio::test]
async fn cancel_before_and_after_download() {
    let f = Fota::start(&[]).await;
    f.upload("fw", &image(10_000, 2), "").await;
    let id = f
        .schedule("d1", json!({"name": "fw", "protocolType": "HTTP"}))
        .await;
    let r = f
        .srv
        .post(&format!("/v1/fota/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["status"].as_str(), v["updateResult"].as_u64()),
        (Some("cancelled"), Some(10))
    );
    let r = f
        .srv
        .post(&format!("/v1/fota/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(f.work("d1").await.status(), StatusCode::NO_CONTENT);

    let id = f
        .schedule("d1", json!({"name": "fw", "protocolType": "HTTP"}))
        .await;
    let uri = f.deliver("d1").await["packageUri"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(download(&uri, None).await.0, StatusCode::OK);
    f.report(&id, 2, 0).await;
    let r = f
        .srv
        .post(&format!("/v1/fota/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(download(&uri, None).await.0, StatusCode::NOT_FOUND);

    // Once updating, it is too late.
    let id = f.schedule("d1", json!({"name": "fw"})).await;
    f.deliver("d1").await;
    f.report(&id, 2, 0).await;
    f.report(&id, 3, 0).await;
    let r = f
        .srv
        .post(&format!("/v1/fota/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(f.status(&id).await["status"], "updating");
    f.srv.stop().await;
}

#[tokio::test]
async fn deferred_then_offered_again() {
    let f = Fota::start(&[]).await;
    f.upload("fw", b"firmware", "").await;
    let id = f.schedule("d1", json!({"name": "fw"})).await;
    f.deliver("d1").await;
    f.report(&id, 2, 0).await;
    let (code, v) = f.report(&id, 2, 11).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("pending"), Some("deferred"))
    );
    let r = f.work("d1").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["retry-after"], "300");
    f.clock.advance(Duration::from_secs(301));
    f.wait_reason(&id, "device").await;
    assert_eq!(f.deliver("d1").await["fotaId"], id.as_str());
    f.report(&id, 2, 0).await;
    f.report(&id, 3, 0).await;
    let (_, v) = f.report(&id, 0, 1).await;
    assert_eq!(v["status"], "succeeded");
    assert_eq!(
        statuses(&v),
        [
            "pending",
            "delivering",
            "downloaded",
            "pending",
            "pending",
            "delivering",
            "downloaded",
            "updating",
            "succeeded"
        ]
    );
    f.srv.stop().await;
}

#[tokio::test]
async fn resume_after_connection_lost_with_a_range() {
    let f = Fota::start(&[]).await;
    let data = image(200_000, 3);
    f.upload("fw", &data, "").await;
    let id = f
        .schedule(
            "d1",
            json!({"name": "fw", "protocolType": "HTTP", "resumeAfterDownlinkFailure": true}),
        )
        .await;
    let uri = f.deliver("d1").await["packageUri"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, first) = download(&uri, Some("bytes=0-79999")).await;
    assert_eq!(code, StatusCode::PARTIAL_CONTENT);
    f.report(&id, 1, 0).await;
    let (_, v) = f.report(&id, 1, 4).await;
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("pending"), Some("resume"))
    );
    // Offered again at the next request; the device resumes where it stopped.
    assert_eq!(f.deliver("d1").await["packageUri"], uri.as_str());
    let (code, rest) = download(&uri, Some("bytes=80000-")).await;
    assert_eq!(code, StatusCode::PARTIAL_CONTENT);
    let whole = [first, rest].concat();
    assert_eq!(sha256_hex(&whole), sha256_hex(&data));
    let v = f.status(&id).await;
    assert_eq!(v["progress"]["bytesServed"], data.len());
    f.report(&id, 2, 0).await;
    f.report(&id, 3, 0).await;
    assert_eq!(f.report(&id, 0, 1).await.1["status"], "succeeded");
    f.srv.stop().await;
}

#[tokio::test]
async fn quota_holds_tasks_back_and_releases_them() {
    let f = Fota::start(&["fota.quota=1"]).await;
    f.upload("fw", b"firmware", "").await;
    let a = f
        .schedule("a", json!({"name": "fw", "useQuota": true}))
        .await;
    let b = f
        .schedule("b", json!({"name": "fw", "useQuota": true}))
        .await;
    let c = f.schedule("c", json!({"name": "fw"})).await;
    f.deliver("a").await;
    assert_eq!(f.work("b").await.status(), StatusCode::NO_CONTENT);
    let v = f.status(&b).await;
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("pending"), Some("quota"))
    );
    // A task without useQuota is not held back.
    assert_eq!(f.deliver("c").await["fotaId"], c.as_str());
    f.report(&a, 2, 0).await;
    f.report(&a, 3, 0).await;
    assert_eq!(f.work("b").await.status(), StatusCode::NO_CONTENT);
    f.report(&a, 0, 1).await;
    assert_eq!(f.deliver("b").await["fotaId"], b.as_str());
    f.srv.stop().await;
}

#[tokio::test]
async fn schedule_window_closed_then_opening() {
    let f = Fota::start(&[]).await;
    f.upload("fw", b"firmware", "").await;
    let mut events = f.srv.get("/v1/events?deviceId=d1").await;
    assert_eq!(events.status(), StatusCode::OK);
    let id = f
        .schedule(
            "d1",
            json!({"name": "fw", "schedule": "weekends", "timeout": "1h"}),
        )
        .await;
    let v = f.status(&id).await;
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("pending"), Some("window"))
    );
    assert_eq!(v["nextCheck"], "2026-11-21T00:00:00Z");
    let r = f.work("d1").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["retry-after"], (12 * 3600).to_string());
    // Midnight: the window opens and the engine notices without a device request.
    f.clock.set(ms("2026-11-21T00:00:00Z"));
    f.wait_reason(&id, "device").await;
    f.deliver("d1").await;
    let v = f.status(&id).await;
    assert_eq!(v["deadline"], "2026-11-21T01:00:00Z");

    // The event stream saw the window open and the delivery.
    let seen: Vec<String> = sse_events(&mut events, 3)
        .await
        .iter()
        .map(|ev| {
            assert_eq!(ev["fotaId"], id.as_str());
            format!(
                "{}/{}",
                ev["status"].as_str().unwrap(),
                ev["reason"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(seen, ["pending/window", "pending/device", "delivering/-"]);

    // A user-defined schedule in a time zone: Saturdays 22:00-02:00 in Berlin (UTC+1).
    let r = client()
        .put(f.srv.url("/v1/schedules/berlin-nights"))
        .json(&json!({"timeZone": "Europe/Berlin", "windows": [{"days": ["sat"], "start": "22:00", "end": "02:00"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let list = client().get(f.srv.url("/v1/schedules")).value().await;
    let names: Vec<&str> = list["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "always",
            "weekends",
            "nights-home",
            "nights-enterprise",
            "nights-enterprise-weekends",
            "berlin-nights"
        ]
    );
    let id2 = f
        .schedule("d2", json!({"name": "fw", "schedule": "berlin-nights"}))
        .await;
    assert_eq!(f.status(&id2).await["nextCheck"], "2026-11-21T21:00:00Z");
    f.clock.set(ms("2026-11-21T21:00:00Z"));
    f.wait_reason(&id2, "device").await;
    f.deliver("d2").await;
    // Bad definitions and built-in names are refused.
    let r = client()
        .put(f.srv.url("/v1/schedules/bad"))
        .json(&json!({"timeZone": "Nowhere/City", "windows": [{"days": ["sat"], "start": "22:00", "end": "02:00"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = client()
        .put(f.srv.url("/v1/schedules/weekends"))
        .json(&json!({"windows": [{"days": ["sat"], "start": "22:00", "end": "02:00"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = f
        .srv
        .post(
            "/v1/devices/d3/fota",
            &json!({"name": "fw", "schedule": "nope"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    f.srv.stop().await;
}

#[tokio::test]
async fn cached_data_skips_the_download() {
    let f = Fota::start(&[]).await;
    f.upload("fw-2.0", b"two", "?description=app&version=2.0")
        .await;
    // Without reports nothing is known of the device: a normal task.
    let id = f
        .schedule("d1", json!({"name": "fw-2.0", "useCachedData": true}))
        .await;
    f.deliver("d1").await;
    f.report(&id, 2, 0).await;
    f.report(&id, 3, 0).await;
    let r = f
        .srv
        .post(
            &format!("/v1/fota/{id}/report"),
            &json!({"state": 0, "result": 1, "pkgName": "app", "pkgVersion": "2.0"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // Now the device runs app 2.0: a new task with useCachedData succeeds at once.
    let id = f
        .schedule("d1", json!({"name": "fw-2.0", "useCachedData": true}))
        .await;
    let v = f.status(&id).await;
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("succeeded"), Some("cached-data"))
    );
    assert!(v["note"].as_str().unwrap().contains("app 2.0"), "{v}");
    assert_eq!(v["progress"]["bytesServed"], 0);
    // Without useCachedData the update is delivered anyway.
    let id = f.schedule("d1", json!({"name": "fw-2.0"})).await;
    assert_eq!(f.deliver("d1").await["fotaId"], id.as_str());
    f.srv.stop().await;
}

#[tokio::test]
async fn restart_in_the_middle_of_a_task() {
    let sets = ["fota.quota=1"];
    let f = Fota::start(&sets).await;
    let data = image(50_000, 4);
    f.upload("fw", &data, "").await;
    let a = f
        .schedule(
            "a",
            json!({"name": "fw", "protocolType": "HTTP", "useQuota": true, "timeout": "30m"}),
        )
        .await;
    let b = f
        .schedule("b", json!({"name": "fw", "useQuota": true}))
        .await;
    let uri = f.deliver("a").await["packageUri"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(download(&uri, None).await.0, StatusCode::OK);
    f.report(&a, 1, 0).await;
    let before = f.status(&a).await;
    let f = f.restart(&sets).await;
    let after = f.status(&a).await;
    assert_eq!(after["status"], "downloading");
    assert_eq!(after["deadline"], before["deadline"]);
    assert_eq!(after["progress"]["bytesServed"], data.len());
    // Bytes served and not yet reported are stored when the service stops. (The package
    // URI names the port of the first start.)
    let package = f.srv.url(&uri[uri.find("/p/").unwrap()..]);
    let (code, part) = download(&package, Some("bytes=0-999")).await;
    assert_eq!((code, part.len()), (StatusCode::PARTIAL_CONTENT, 1000));
    let f = f.restart(&sets).await;
    let after = f.status(&a).await;
    assert_eq!(after["progress"]["bytesServed"], data.len() + 1000);
    // The quota slot is still taken by a.
    assert_eq!(f.work("b").await.status(), StatusCode::NO_CONTENT);
    assert_eq!(f.status(&b).await["reason"], "quota");
    // The deadline timer survived too.
    f.clock.advance(Duration::from_secs(31 * 60));
    assert_eq!(f.wait_status(&a, "failed").await["reason"], "timeout");
    assert_eq!(f.deliver("b").await["fotaId"], b.as_str());
    f.srv.stop().await;
}

#[tokio::test]
async fn direct_methods_answer_like_iot_hub() {
    let f = Fota::start(&[]).await;
    f.upload("anjay-firmware", b"fw", "").await;
    let call = |method: &str, payload: Value| {
        let url = f.srv.url(&format!("/v1/devices/dev1/methods/{method}"));
        async move {
            let r = client().post(url).json(&payload).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (code, v) = call(
        "scheduleFirmwareUpdate",
        json!({"name": "anjay-firmware", "timeout": "1200s", "protocolType": "COAP"}),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v["status"], 200);
    let payload = v["payload"].clone();
    let id = payload["fotaId"].as_str().unwrap().to_owned();
    let (_, v) = call("checkFirmwareUpdateStatus", payload.clone()).await;
    assert_eq!(v["status"], 200);
    assert_eq!(v["payload"]["status"], "pending");
    assert_eq!(v["payload"]["fotaId"], id.as_str());
    let (_, v) = call("scheduleFirmwareUpdate", json!({"name": "anjay-firmware"})).await;
    assert_eq!(v["status"], 409);
    assert_eq!(v["payload"]["error"]["fotaId"], id.as_str());
    let (_, v) = call("cancelFirmwareUpdate", payload.clone()).await;
    assert_eq!(
        (v["status"].as_u64(), v["payload"]["status"].as_str()),
        (Some(200), Some("cancelled"))
    );
    let (_, v) = call("cancelFirmwareUpdate", payload.clone()).await;
    assert_eq!(v["status"], 409);
    let (_, v) = call("checkFirmwareUpdateStatus", json!({})).await;
    assert_eq!(v["status"], 400);
    // Another device's task is not found through this device.
    let r = client()
        .post(
            f.srv
                .url("/v1/devices/dev2/methods/checkFirmwareUpdateStatus"),
        )
        .json(&payload)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["status"], 404);
    let (code, v) = call("rebootDevice", json!({})).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "unknown-method");
    f.srv.stop().await;
}

#[tokio::test]
async fn bad_schedules_name_the_field() {
    let f = Fota::start(&["coap.tcp_listen=", "coap.dtls_listen="]).await;
    f.upload("fw", b"fw", "").await;
    let cases = [
        (
            json!({"name": "fw", "timeout": "soon"}),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            json!({"name": "fw", "retentionPeriod": "5x"}),
            StatusCode::BAD_REQUEST,
            "retentionPeriod",
        ),
        (
            json!({"name": "fw", "upgradeStrategy": "Magic"}),
            StatusCode::BAD_REQUEST,
            "upgradeStrategy",
        ),
        (
            json!({"name": "fw", "protocolType": "FTP"}),
            StatusCode::BAD_REQUEST,
            "protocolType",
        ),
        (
            json!({"name": "fw", "useQuota": "yes"}),
            StatusCode::BAD_REQUEST,
            "useQuota",
        ),
        (
            json!({"name": "fw", "colour": "red"}),
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            json!({"firmwareUrl": "http://x/y"}),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            json!({"name": "fw", "imageDeliveryMethod": "push"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "pull",
        ),
        // Not served here: HTTPS, and the DTLS and TCP listeners this server turned off.
        (
            json!({"name": "fw", "protocolType": "COAPS"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "it serves HTTP, COAP",
        ),
        (
            json!({"name": "fw", "protocolType": "COAP_TCP"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "it serves HTTP, COAP",
        ),
        (
            json!({"name": "unknown"}),
            StatusCode::NOT_FOUND,
            "firmwareUrl",
        ),
    ];
    for (body, status, needle) in cases {
        let r = f.srv.post("/v1/devices/d1/fota", &body).await;
        assert_eq!(r.status(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {v}"
        );
    }
    let r = f
        .srv
        .post("/v1/devices/bad%20id/fota", &json!({"name": "fw"}))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let id = f.schedule("d1", json!({"name": "fw"})).await;
    let r = f
        .srv
        .post("/v1/devices/d1/fota", &json!({"name": "fw"}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["error"]["code"].as_str(), v["error"]["fotaId"].as_str()),
        (Some("device-busy"), Some(id.as_str()))
    );
    // Listing by device and status.
    let list = client()
        .get(f.srv.url("/v1/fota?deviceId=d1&status=pending"))
        .value()
        .await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1);
    let list = client()
        .get(f.srv.url("/v1/fota?status=succeeded"))
        .value()
        .await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 0);
    let r = f.srv.get("/v1/fota?status=nonsense").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    f.srv.stop().await;
}

/// A firmware host started by the test: `/fw.bin`, a redirect to it, a redirect loop, a
/// redirect to a URL with credentials and a 404.
async fn firmware_host(data: Vec<u8>) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::response::Redirect;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let with_credentials = format!("http://user:secret@{addr}/fw.bin");
    let app = axum::Router::new()
        .route("/fw.bin", get(move || async move { data.clone() }))
        .route("/moved", get(|| async { Redirect::temporary("/fw.bin") }))
        .route("/loop", get(|| async { Redirect::temporary("/loop") }))
        .route(
            "/to-credentials",
            get(move || async move { Redirect::temporary(&with_credentials) }),
        );
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, task)
}

#[tokio::test]
async fn import_from_an_http_server() {
    let data = image(123_456, 5);
    let (host, task) = firmware_host(data.clone()).await;
    let f = Fota::start(&["fota.import_allow_internal=true"]).await;

    // A task for firmware the repository does not hold imports it first.
    let id = f
        .schedule(
            "d1",
            json!({"name": "acme.com-imported", "firmwareUrl": format!("http://{host}/moved"),
                   "retentionPeriod": "30d", "description": "imported"}),
        )
        .await;
    let v = f.wait_reason(&id, "device").await;
    assert_eq!(v["progress"]["size"], data.len());
    let rec = client()
        .get(f.srv.url("/v1/firmware/acme.com-imported"))
        .value()
        .await;
    assert_eq!(rec["sha256"], sha256_hex(&data));
    assert_eq!(rec["retention"], "30d");
    assert_eq!(rec["description"], "imported");
    assert_eq!(f.deliver("d1").await["sha256"], sha256_hex(&data));

    // The same import alone; a stored name is not fetched again.
    let body = json!({"name": "direct", "url": format!("http://{host}/fw.bin"), "version": "1.0"});
    let r = f.srv.post("/v1/imports", &body).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = f.srv.post("/v1/imports", &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    for (path, code) in [
        ("/missing", "import-failed"),
        ("/loop", "import-failed"),
        ("/to-credentials", "import-refused"),
    ] {
        let r = f
            .srv
            .post(
                "/v1/imports",
                &json!({"name": "x", "url": format!("http://{host}{path}")}),
            )
            .await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{path}: {v}");
        assert!(status.is_client_error() || status.is_server_error());
    }
    assert_eq!(
        f.srv.get("/v1/firmware/x").await.status(),
        StatusCode::NOT_FOUND
    );
    // A failing import fails its task with the reason.
    let id = f
        .schedule(
            "d2",
            json!({"name": "gone", "firmwareUrl": format!("http://{host}/missing")}),
        )
        .await;
    let v = f.wait_status(&id, "failed").await;
    assert_eq!(v["reason"], "import-failed");
    assert!(v["note"].as_str().unwrap().contains("404"), "{v}");
    f.srv.stop().await;

    // By default, internal addresses are refused: literal, and by name after resolution.
    let f = Fota::start(&[]).await;
    for url in [
        format!("http://{host}/fw.bin"),
        format!("http://localhost:{}/fw.bin", host.port()),
    ] {
        let r = f
            .srv
            .post("/v1/imports", &json!({"name": "internal", "url": url}))
            .await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{url}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "import-refused");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("internal"),
            "{v}"
        );
    }
    let id = f
        .schedule(
            "d1",
            json!({"name": "internal", "firmwareUrl": format!("http://{host}/fw.bin")}),
        )
        .await;
    let v = f.wait_status(&id, "failed").await;
    assert!(
        v["note"].as_str().unwrap().contains("internal address"),
        "{v}"
    );
    assert_eq!(
        f.srv.get("/v1/firmware/internal").await.status(),
        StatusCode::NOT_FOUND
    );
    f.srv.stop().await;
    task.abort();
}

#[tokio::test]
async fn retention_waits_for_the_active_task() {
    let f = Fota::start(&[]).await;
    let data = image(5000, 6);
    f.upload("short-lived", &data, "?retention=1s").await;
    let id = f
        .schedule("d1", json!({"name": "short-lived", "protocolType": "HTTP"}))
        .await;
    let uri = f.deliver("d1").await["packageUri"]
        .as_str()
        .unwrap()
        .to_owned();
    // Past its retention the image is gone for everyone but the task.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        f.srv.get("/v1/firmware/short-lived").await.status(),
        StatusCode::NOT_FOUND
    );
    let (code, got) = download(&uri, None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(got, data);
    assert_eq!(f.srv.blob_files().len(), 1);
    f.report(&id, 2, 0).await;
    f.report(&id, 3, 0).await;
    f.report(&id, 0, 1).await;
    // The task has ended: the sweeper removes the image.
    let left = poll(async || f.srv.blob_files(), Vec::is_empty).await;
    assert!(left.is_empty(), "{left:?}");
    f.srv.stop().await;
}
