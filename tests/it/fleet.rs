//! Fleets over real HTTP and CoAP: a registry filled by NDJSON import, a dynamic group, and
//! campaigns over 1,000 simulated devices that poll, download and report like real ones: waves with a
//! pause, devices already on the version, a late joiner, retry-failed, a restart in the middle
//! of a wave, and an error threshold that aborts the rollout.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{client, image, poll, TestServer};
use crate::fota::Fota;

/// Devices polled at once.
const PARALLEL: usize = 64;

/// What one device did when it polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    Nothing,
    Updated,
    Failed,
}

/// One poll of a device: takes its task if offered, downloads the package and reports
/// success (saying it now runs `version`) or an integrity failure.
pub async fn device_polls(srv: &TestServer, device: &str, fail: bool, version: &str) -> Polled {
    let r = srv.get(&format!("/v1/devices/{device}/fota")).await;
    if r.status() == StatusCode::NO_CONTENT {
        return Polled::Nothing;
    }
    assert_eq!(r.status(), StatusCode::OK, "{device}");
    let w: Value = r.json().await.unwrap();
    let id = w["fotaId"].as_str().unwrap().to_owned();
    let body = client()
        .get(w["packageUri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len() as u64, w["size"].as_u64().unwrap());
    let report = async |v: Value| {
        let r = srv.post(&format!("/v1/fota/{id}/report"), &v).await;
        assert_eq!(r.status(), StatusCode::OK, "{device}: {v}");
    };
    if fail {
        report(json!({"state": 1, "result": 5})).await;
        return Polled::Failed;
    }
    report(json!({"state": 2, "result": 0})).await;
    report(json!({"state": 3, "result": 0})).await;
    report(json!({"state": 0, "result": 1, "pkgName": "meter", "pkgVersion": version})).await;
    Polled::Updated
}

/// The same device over CoAP/TCP: work request and reports (SenML, with /3/0/3 and /5/0/8)
/// over CoAP, the download from the package URI the task names.
async fn coap_device_polls(srv: &TestServer, device: &str, fail: bool, version: &str) -> Polled {
    use bytes::Bytes;
    use futures_util::SinkExt;
    use fwrepo::coap::msg::{codes, format, opt, Message};
    let mut c = crate::coap_protocol::connect(srv, 65536, true).await;
    let request = |code, token: &[u8], path: &str| {
        let mut m = Message::new(code, Bytes::copy_from_slice(token));
        for seg in path.split('/') {
            m.push(opt::URI_PATH, Bytes::copy_from_slice(seg.as_bytes()));
        }
        m
    };
    let mut ask = request(codes::GET, b"w", &format!("fota/{device}"));
    ask.push_uint(opt::ACCEPT, format::JSON as u64);
    c.send(&ask).await.unwrap();
    let r = crate::coap_protocol::recv(&mut c).await;
    assert_eq!(r.code, codes::CONTENT, "{device}");
    if r.payload.is_empty() {
        return Polled::Nothing;
    }
    let w: Value = serde_json::from_slice(&r.payload).unwrap();
    let id = w["fotaId"].as_str().unwrap().to_owned();
    let body = client()
        .get(w["packageUri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len() as u64, w["size"].as_u64().unwrap());
    let mut n = 0u8;
    let mut report = async |pack: String| {
        n += 1;
        let mut m = request(codes::POST, &[b'r', n], &format!("fota/{id}/report"));
        m.push_uint(opt::CONTENT_FORMAT, format::SENML_JSON as u64);
        m.payload = Bytes::from(pack);
        c.send(&m).await.unwrap();
        let r = crate::coap_protocol::recv(&mut c).await;
        assert_eq!(r.code, codes::CHANGED, "{device}");
    };
    let pack = |state: u8, result: u8| {
        format!(
            r#"[{{"bn":"/5/0/","n":"3","v":{state}}},{{"n":"5","v":{result}}},{{"n":"8/0","v":2}},{{"n":"8/1","v":4}}]"#
        )
    };
    if fail {
        report(pack(1, 5)).await;
        return Polled::Failed;
    }
    report(pack(2, 0)).await;
    report(pack(3, 0)).await;
    report(format!(
        r#"[{{"n":"/3/0/3","vs":"{version}"}},{{"bn":"/5/0/","n":"3","v":0}},{{"n":"5","v":1}},{{"n":"7","vs":"{version}"}}]"#
    ))
    .await;
    Polled::Updated
}

/// Every device in `devices` polls once, each always through the same one of `servers`
/// and over the same protocol (CoAP/TCP for every fourth meter by number, HTTP for the
/// others), whichever list it is polled in; which of them updated or failed.
async fn round(
    servers: &[&TestServer],
    devices: &[String],
    failing: &BTreeSet<String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let results: Vec<(String, Polled)> =
        futures_util::stream::iter(devices.iter().cloned().enumerate())
            .map(|(i, d)| async move {
                // By the meter's number: a wave's list is in no fixed order.
                let n = d
                    .rsplit('-')
                    .next()
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(i);
                let srv = servers[n % servers.len()];
                let fail = failing.contains(&d);
                let p = if n % 4 == 3 {
                    coap_device_polls(srv, &d, fail, "2.1.0").await
                } else {
                    device_polls(srv, &d, fail, "2.1.0").await
                };
                (d, p)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
    let pick = |want| {
        results
            .iter()
            .filter(|(_, p)| *p == want)
            .map(|(d, _)| d.clone())
            .collect::<BTreeSet<_>>()
    };
    (pick(Polled::Updated), pick(Polled::Failed))
}

async fn campaign(srv: &TestServer, id: &str) -> Value {
    srv.get(&format!("/v1/campaigns/{id}"))
        .await
        .json()
        .await
        .unwrap()
}

async fn act(srv: &TestServer, id: &str, action: &str) -> (StatusCode, Value) {
    let r = srv
        .post(&format!("/v1/campaigns/{id}/{action}"), &json!({}))
        .await;
    (r.status(), r.json().await.unwrap())
}

async fn wait_state(srv: &TestServer, id: &str, state: &str) -> Value {
    let v = poll(async || campaign(srv, id).await, |v| v["state"] == state).await;
    assert_eq!(v["state"], state, "campaign never became {state}: {v}");
    v
}

async fn import(srv: &TestServer, lines: &str) -> Value {
    let r = client()
        .post(srv.url("/v1/devices:import"))
        .header("content-type", "application/x-ndjson")
        .body(lines.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

fn meter(i: usize) -> String {
    format!("meter-{i:04}")
}

#[tokio::test]
async fn a_rollout_in_waves_pauses_skips_the_updated_takes_a_late_joiner_and_survives_a_restart() {
    let f = Fota::start(&[]).await;
    f.upload("acme.com-meter-2.1", &image(2048, 7), "?version=2.1.0")
        .await;

    // 1,000 meters in the EU and 50 elsewhere, imported in one request; two bad lines are
    // refused alone.
    let mut lines = String::new();
    for i in 0..1050 {
        let region = if i < 1000 { "eu" } else { "us" };
        lines.push_str(&format!(
            "{{\"deviceId\":\"{}\",\"tags\":{{\"region\":\"{region}\"}},\"attributes\":{{\"hw\":\"rev{}\"}}}}\n",
            meter(i),
            i % 3
        ));
        if i == 500 {
            lines.push_str("{\"deviceId\":\"bad id\"}\nnot json\n");
        }
    }
    let report = import(&f.srv, &lines).await;
    assert_eq!(report["imported"], 1050, "{report}");
    assert_eq!(report["failed"], 2);
    let errors: Vec<u64> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(errors, [502, 503]);

    // Five meters run 2.1.0 already (they reported it on an earlier task).
    let updated_before: Vec<String> = (0..5).map(|i| meter(i * 100)).collect();
    for d in &updated_before {
        f.schedule(
            d,
            json!({"name": "acme.com-meter-2.1", "protocolType": "HTTP"}),
        )
        .await;
        assert_eq!(
            device_polls(&f.srv, d, false, "2.1.0").await,
            Polled::Updated
        );
    }

    let r = f.srv.post("/v1/devices/meter-0001", &json!({})).await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let r = client()
        .put(f.srv.url("/v1/groups/eu-meters"))
        .json(&json!({"filter": "tag.region = eu and (firmware.version < \"2.1.0\" or not firmware.version exists)"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let bad = client()
        .put(f.srv.url("/v1/groups/broken"))
        .json(&json!({"filter": "tag.region = eu and"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["error"]["code"], "invalid-filter");
    assert_eq!(bad["error"]["position"], 19);
    let group: Value = f
        .srv
        .get("/v1/groups/eu-meters/devices?limit=1000")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(group["devices"].as_array().unwrap().len(), 995);
    // The campaign targets every EU meter; those on 2.1.0 finish as up to date.
    let r = f
        .srv
        .post(
            "/v1/campaigns",
            &json!({
                "name": "EU meters to 2.1.0",
                "firmware": "acme.com-meter-2.1",
                "target": {"filter": "tag.region = eu"},
                "options": {"timeout": "1h", "protocolType": "HTTP"},
                "waves": [
                    {"percent": 1},
                    {"percent": 10, "successShare": 0.9, "pause": true},
                    {}
                ],
                "errorThreshold": {"share": 0.5, "minFinished": 20},
                "includeLateJoiners": true
            }),
        )
        .await;
    let status = r.status();
    let c: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{c}");
    assert_eq!(c["state"], "draft");
    let id = c["campaignId"].as_str().unwrap().to_owned();
    let everyone: Vec<String> = (0..1000).map(meter).collect();
    // Nothing is offered before the start.
    let (up, _) = round(&[&f.srv], &everyone[..50], &BTreeSet::new()).await;
    assert!(up.is_empty());

    let (code, c) = act(&f.srv, &id, "start").await;
    assert_eq!(code, StatusCode::OK, "{c}");
    assert_eq!(c["devices"], 1000);
    let sizes: Vec<u64> = c["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [10, 100, 890]);

    // Wave 1: only its 10 devices get the image (those on 2.1.0 are up to date). Every
    // member is listed as soon as the start answers (a small campaign's roster is written
    // within the start).
    let c = poll(
        async || campaign(&f.srv, &id).await,
        |c| c["waves"][0]["counts"]["waiting"].is_null(),
    )
    .await;
    let first = c["waves"][0]["counts"].clone();
    let members: Value = f
        .srv
        .get(&format!("/v1/campaigns/{id}/devices?limit=1000"))
        .await
        .json()
        .await
        .unwrap();
    let members = members["devices"].as_array().unwrap();
    assert_eq!(members.len(), 1000);
    let of_wave = |first: bool| -> Vec<String> {
        members
            .iter()
            .filter(|m| (m["wave"] == 0) == first)
            .map(|m| m["deviceId"].as_str().unwrap().to_owned())
            .collect()
    };
    let (wave1, others) = (of_wave(true), of_wave(false));
    let (up, _) = round(&[&f.srv], &others, &BTreeSet::new()).await;
    assert!(up.is_empty(), "outside wave 1: {up:?}");
    let (up, _) = round(&[&f.srv], &wave1, &BTreeSet::new()).await;
    let up_to_date = first["up-to-date"].as_u64().unwrap_or(0) as usize;
    assert_eq!(up.len() + up_to_date, 10, "{first}");
    let mut all_up = up.clone();

    // Wave 2 follows, then the campaign pauses for a person.
    let c = poll(
        async || campaign(&f.srv, &id).await,
        |c| c["currentWave"] == 2 && c["waves"][1]["counts"]["waiting"].is_null(),
    )
    .await;
    assert_eq!(c["currentWave"], 2, "{c}");
    let (up, _) = round(&[&f.srv], &everyone, &BTreeSet::new()).await;
    all_up.extend(up.iter().cloned());
    let c = wait_state(&f.srv, &id, "paused").await;
    assert!(c["reason"].as_str().unwrap().contains("wave 2 done"), "{c}");
    assert_eq!(c["waves"][1]["succeeded"], 100);
    // While paused, no device of wave 3 is offered anything; a restart changes nothing.
    let f = f.restart(&[]).await;
    let (up, failed) = round(&[&f.srv], &everyone, &BTreeSet::new()).await;
    assert!(up.is_empty() && failed.is_empty(), "{up:?}");
    assert_eq!(campaign(&f.srv, &id).await["state"], "paused");

    // A late joiner: a new EU meter shows up while the campaign runs.
    let (code, _) = act(&f.srv, &id, "resume").await;
    assert_eq!(code, StatusCode::OK);
    let r = client()
        .put(f.srv.url("/v1/devices/meter-late"))
        .json(&json!({"tags": {"region": "eu"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // Wave 3, over several polls (the late joiner waits behind the wave), with a restart
    // after the first.
    let mut fleet = everyone.clone();
    fleet.push("meter-late".into());
    let (up, failed) = round(&[&f.srv], &fleet, &BTreeSet::new()).await;
    assert!(failed.is_empty() && !up.is_empty());
    all_up.extend(up);
    // Released tasks carry package URIs with the public address, so it stays the same.
    let listen = format!("http.listen={}", f.srv.base.trim_start_matches("http://"));
    let f = f.restart(&[&listen]).await;
    for _ in 0..10 {
        let (up, failed) = round(&[&f.srv], &fleet, &BTreeSet::new()).await;
        assert!(failed.is_empty());
        all_up.extend(up);
        if campaign(&f.srv, &id).await["state"] == "finished" {
            break;
        }
    }
    let c = wait_state(&f.srv, &id, "finished").await;
    assert_eq!(c["devices"], 1001, "the late joiner is a member: {c}");
    assert_eq!(c["counts"]["succeeded"], 996, "{c}");
    assert_eq!(
        c["counts"]["up-to-date"].as_u64().unwrap_or(0),
        5,
        "the five on 2.1.0: {c}"
    );
    assert!(all_up.contains("meter-late"));
    // Nobody updated twice, and the US meters never got anything.
    assert_eq!(all_up.len(), 996);
    assert!(all_up
        .iter()
        .all(|d| d.as_str() < "meter-1000" || d == "meter-late"));
    let d: Value = f
        .srv
        .get("/v1/devices/meter-0100")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d["firmware"]["pkgVersion"], "2.1.0");
    assert_eq!(d["tags"]["region"], "eu");
    // meter-0003 polls over CoAP: its SenML report filled /3/0/3 and /5/0/8 in.
    let d: Value = f
        .srv
        .get("/v1/devices/meter-0003")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d["firmware"]["firmwareVersion"], "2.1.0", "{d}");
    assert_eq!(d["firmware"]["protocols"], json!(["HTTP", "COAP_TCP"]));
    assert!(d["lastSeen"].is_string());
    assert!(d["tasks"][0]["campaignId"].is_string());
    f.srv.stop().await;
}

#[tokio::test]
async fn failures_above_the_threshold_abort_and_retry_failed_runs_them_again() {
    let f = Fota::start(&[]).await;
    f.upload("acme.com-gw-3", &image(1024, 3), "?version=3.0.0")
        .await;
    let devices: Vec<String> = (0..200).map(|i| format!("gw-{i:03}")).collect();
    let r = f
        .srv
        .post(
            "/v1/campaigns",
            &json!({
                "firmware": "acme.com-gw-3",
                "options": {"protocolType": "HTTP"},
                "target": {"devices": devices},
                "waves": [{"count": 40, "successShare": 0.5}, {}],
                "errorThreshold": {"share": 0.3, "minFinished": 10},
                "requireApproval": true
            }),
        )
        .await;
    let c: Value = r.json().await.unwrap();
    let id = c["campaignId"].as_str().unwrap().to_owned();
    // Approval is required, and not by the token that created the campaign.
    let (code, v) = act(&f.srv, &id, "start").await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "approval-required");
    let (code, v) = act(&f.srv, &id, "approve").await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["code"], "self-approval");
    let (code, _) = act(&f.srv, &id, "stop").await;
    assert_eq!(code, StatusCode::OK);

    let r = f
        .srv
        .post(
            "/v1/campaigns",
            &json!({
                "firmware": "acme.com-gw-3",
                "options": {"protocolType": "HTTP"},
                "target": {"devices": devices},
                "waves": [{"count": 40, "successShare": 0.5}, {}],
                "errorThreshold": {"share": 0.3, "minFinished": 10}
            }),
        )
        .await;
    let c: Value = r.json().await.unwrap();
    let id = c["campaignId"].as_str().unwrap().to_owned();
    let (code, _) = act(&f.srv, &id, "start").await;
    assert_eq!(code, StatusCode::OK);
    let mut events = client()
        .get(f.srv.url(&format!("/v1/events?campaignId={id}")))
        .send()
        .await
        .unwrap();

    // Half of every wave fails: the threshold (30% of at least 10) stops the rollout.
    let failing: BTreeSet<String> = devices.iter().step_by(2).cloned().collect();
    let mut offered = BTreeSet::new();
    for _ in 0..5 {
        let (up, failed) = round(&[&f.srv], &devices, &failing).await;
        offered.extend(up);
        offered.extend(failed);
        if campaign(&f.srv, &id).await["state"] == "aborted" {
            break;
        }
    }
    let c = wait_state(&f.srv, &id, "aborted").await;
    let reason = c["reason"].as_str().unwrap();
    assert!(reason.contains("error threshold reached"), "{reason}");
    assert_eq!(c["decision"]["aborted"], true);
    assert!(c["decision"]["failedShare"].as_f64().unwrap() >= 0.3);
    assert_eq!(
        c["failureReasons"]["integrity-check-failure"],
        c["counts"]["failed"]
    );
    // No device outside wave 1 was ever offered the image, and none is now.
    assert!(offered.len() <= 40, "{}", offered.len());
    let wave1: BTreeSet<String> = {
        let v: Value = f
            .srv
            .get(&format!("/v1/campaigns/{id}/devices?limit=1000"))
            .await
            .json()
            .await
            .unwrap();
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["wave"] == 0)
            .map(|m| m["deviceId"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(offered.is_subset(&wave1));
    let (up, failed) = round(&[&f.srv], &devices, &BTreeSet::new()).await;
    assert!(
        up.is_empty() && failed.is_empty(),
        "{up:?} {failed:?} {}",
        campaign(&f.srv, &id).await
    );
    let failed_list: Value = f
        .srv
        .get(&format!("/v1/campaigns/{id}/devices?status=failed"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        failed_list["devices"].as_array().unwrap().len() as u64,
        c["counts"]["failed"].as_u64().unwrap()
    );
    // An aborted campaign does not retry; the event stream saw it start and abort.
    let (code, _) = act(&f.srv, &id, "retry-failed").await;
    assert_eq!(code, StatusCode::CONFLICT);
    let mut aborted = None;
    for _ in 0..5000 {
        let e = crate::common::sse_events(&mut events, 1).await.remove(0);
        if e["state"] == "aborted" {
            aborted = Some(e);
            break;
        }
    }
    let aborted = aborted.expect("the abort is on the event stream");
    assert_eq!(aborted["campaignId"], id.as_str());
    assert_eq!(aborted["actor"], "fwrepo");

    // A rollout that finishes with failures runs them again on retry-failed.
    let small: Vec<String> = (0..20).map(|i| format!("gw-x{i:02}")).collect();
    let r = f
        .srv
        .post(
            "/v1/campaigns",
            &json!({
                "firmware": "acme.com-gw-3",
                "options": {"protocolType": "HTTP"},
                "target": {"devices": small},
                "waves": [{"successShare": 0}]
            }),
        )
        .await;
    let c: Value = r.json().await.unwrap();
    let id = c["campaignId"].as_str().unwrap().to_owned();
    assert_eq!(act(&f.srv, &id, "start").await.0, StatusCode::OK);
    poll(
        async || campaign(&f.srv, &id).await,
        |c| c["counts"]["pending"] == 20,
    )
    .await;
    let failing: BTreeSet<String> = small.iter().take(5).cloned().collect();
    let (up, failed) = round(&[&f.srv], &small, &failing).await;
    assert_eq!((up.len(), failed.len()), (15, 5));
    let c = wait_state(&f.srv, &id, "finished").await;
    assert_eq!(c["counts"]["failed"], 5);
    let (code, v) = act(&f.srv, &id, "retry-failed").await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["retried"], 5);
    assert_eq!(v["state"], "running");
    poll(
        async || campaign(&f.srv, &id).await,
        |c| c["counts"]["pending"] == 5,
    )
    .await;
    let (up, _) = poll(
        async || round(&[&f.srv], &small, &BTreeSet::new()).await,
        |(up, _)| !up.is_empty(),
    )
    .await;
    assert_eq!(up, failing);
    let c = wait_state(&f.srv, &id, "finished").await;
    assert_eq!(
        (
            c["counts"]["succeeded"].as_u64(),
            c["counts"]["failed"].as_u64()
        ),
        (Some(20), None)
    );
    f.srv.stop().await;
}

/// The states of the campaign events on an event stream, until `aborted`.
async fn campaign_states_until_aborted(mut stream: reqwest::Response) -> Vec<String> {
    let (mut states, mut pending) = (Vec::new(), String::new());
    while states.last().map(String::as_str) != Some("aborted") {
        let chunk = stream
            .chunk()
            .await
            .unwrap()
            .expect("the stream stays open");
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let e: Value = serde_json::from_str(data.trim()).unwrap();
            if e.get("currentWave").is_some() {
                states.push(e["state"].as_str().unwrap().to_owned());
            }
        }
    }
    states
}

/// Two instances on one PostgreSQL drive one campaign, with devices polling both: no device
/// is started twice, no wave is released twice, the counts are exact, and the error
/// threshold stops the campaign on whichever instance sees the deciding report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_race_on_one_campaign() {
    let Some(url) = crate::common::fresh_postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shared = crate::postgres::shared(&url, dir.path(), &[]);
    let sets: Vec<&str> = shared.iter().map(String::as_str).collect();
    let a = TestServer::start(&dir.path().join("a"), &sets).await;
    let b = TestServer::start(&dir.path().join("b"), &sets).await;
    let r = a
        .put("/v1/firmware/acme.com-pg-2?version=2.1.0", image(1500, 9))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let devices: Vec<String> = (0..300).map(|i| format!("pg-{i:03}")).collect();
    let lines: String = devices
        .iter()
        .map(|d| format!("{{\"deviceId\":\"{d}\",\"tags\":{{\"site\":\"plant\"}}}}\n"))
        .collect();
    assert_eq!(import(&b, &lines).await["imported"], 300);
    let r = a
        .post(
            "/v1/campaigns",
            &json!({
                "firmware": "acme.com-pg-2",
                "options": {"protocolType": "HTTP"},
                "target": {"filter": "tag.site = plant"},
                "waves": [{"count": 30}, {"percent": 45}, {}],
                "errorThreshold": {"share": 0.2, "minFinished": 40}
            }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["campaignId"]
        .as_str()
        .unwrap()
        .to_owned();
    // Both instances' event streams show every campaign change, wherever it was made; each
    // is read as it comes, so neither falls behind.
    let mut streams = Vec::new();
    for srv in [&a, &b] {
        let r = client()
            .get(srv.url(&format!("/v1/events?campaignId={id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        streams.push(tokio::spawn(campaign_states_until_aborted(r)));
    }
    // Started through B; both instances' drivers release from then on.
    let (code, c) = act(&b, &id, "start").await;
    assert_eq!(code, StatusCode::OK, "{c}");
    assert_eq!(c["waves"][1]["size"], 135);

    // Wave 1 succeeds; in wave 2 every third device fails, which crosses 20% once enough
    // have finished.
    let members = |v: Value| -> Vec<(String, u64)> {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["deviceId"].as_str().unwrap().to_owned(),
                    m["wave"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let all: Vec<(String, u64)> = members(
        a.get(&format!("/v1/campaigns/{id}/devices?limit=1000"))
            .await
            .json()
            .await
            .unwrap(),
    );
    assert_eq!(all.len(), 300);
    let wave2: BTreeSet<String> = all
        .iter()
        .filter(|(_, w)| *w == 1)
        .map(|(d, _)| d.clone())
        .collect();
    let wave3: BTreeSet<String> = all
        .iter()
        .filter(|(_, w)| *w == 2)
        .map(|(d, _)| d.clone())
        .collect();
    let failing: BTreeSet<String> = wave2.iter().step_by(3).cloned().collect();
    let (mut updated, mut failed) = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..20 {
        let (up, down) = round(&[&a, &b], &devices, &failing).await;
        assert!(updated.is_disjoint(&up), "a device updated twice");
        updated.extend(up);
        failed.extend(down);
        if campaign(&a, &id).await["state"] == "aborted" {
            break;
        }
    }
    let c = wait_state(&b, &id, "aborted").await;
    assert!(c["reason"]
        .as_str()
        .unwrap()
        .contains("error threshold reached"));
    // Wave 3 never started, and nothing is offered any more.
    assert!(updated.is_disjoint(&wave3) && failed.is_disjoint(&wave3));
    let (up, down) = round(&[&a, &b], &devices, &BTreeSet::new()).await;
    assert!(up.is_empty() && down.is_empty(), "{up:?} {down:?}");
    // The counts are exact: as many successes and failures as devices saw, every member
    // counted once.
    let c = campaign(&a, &id).await;
    assert_eq!(c["devices"], 300);
    assert_eq!(c["counts"]["succeeded"], updated.len() as u64, "{c}");
    assert_eq!(c["counts"]["failed"], failed.len() as u64, "{c}");
    assert_eq!(c["counts"]["waiting"], 135, "{c}");
    // One task per started device, whichever instance created it.
    let mut tasks = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/fota?limit=1000&cursor={c}"),
            None => "/v1/fota?limit=1000".to_owned(),
        };
        let v: Value = b.get(&path).await.json().await.unwrap();
        tasks.extend(v["tasks"].as_array().unwrap().iter().cloned());
        match v["next"].as_str() {
            Some(n) => cursor = Some(n.to_owned()),
            None => break,
        }
    }
    let per_device: BTreeSet<&str> = tasks
        .iter()
        .map(|t| t["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(per_device.len(), tasks.len(), "a device had two tasks");
    // Each stream saw the start (made on B) and the abort (made on either), in that order.
    for (name, stream) in ["a", "b"].into_iter().zip(streams) {
        let states = tokio::time::timeout(Duration::from_secs(30), stream)
            .await
            .expect("the abort reaches every instance's stream")
            .unwrap();
        assert_eq!(states, ["running", "aborted"], "instance {name}");
    }
    a.stop().await;
    b.stop().await;
}
