//! Fleets over real HTTP: a registry filled by NDJSON import, a dynamic group, and campaigns
//! over 1,000 simulated devices that poll, download and report like real ones: waves with a
//! pause, devices already on the version, a late joiner, retry-failed, a restart in the middle
//! of a wave, and an error threshold that aborts the rollout.

use std::collections::BTreeSet;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{client, image, poll};
use crate::fota::Fota;

/// Devices polled at once.
const PARALLEL: usize = 64;

/// What one device did when it polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Polled {
    Nothing,
    Updated,
    Failed,
}

/// One poll of a device: takes its task if offered, downloads the package and reports
/// success (saying it now runs `version`) or an integrity failure.
async fn device_polls(f: &Fota, device: &str, fail: bool, version: &str) -> Polled {
    let r = f.work(device).await;
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
        let r = f.srv.post(&format!("/v1/fota/{id}/report"), &v).await;
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

/// Every device in `devices` polls once; which of them updated or failed.
async fn round(
    f: &Fota,
    devices: &[String],
    failing: &BTreeSet<String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let results: Vec<(String, Polled)> = futures_util::stream::iter(devices.iter().cloned())
        .map(|d| async move {
            let p = device_polls(f, &d, failing.contains(&d), "2.1.0").await;
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

async fn campaign(f: &Fota, id: &str) -> Value {
    f.srv
        .get(&format!("/v1/campaigns/{id}"))
        .await
        .json()
        .await
        .unwrap()
}

async fn act(f: &Fota, id: &str, action: &str) -> (StatusCode, Value) {
    let r = f
        .srv
        .post(&format!("/v1/campaigns/{id}/{action}"), &json!({}))
        .await;
    (r.status(), r.json().await.unwrap())
}

async fn wait_state(f: &Fota, id: &str, state: &str) -> Value {
    let v = poll(async || campaign(f, id).await, |v| v["state"] == state).await;
    assert_eq!(v["state"], state, "campaign never became {state}: {v}");
    v
}

async fn import(f: &Fota, lines: &str) -> Value {
    let r = client()
        .post(f.srv.url("/v1/devices:import"))
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
    let report = import(&f, &lines).await;
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
        assert_eq!(device_polls(&f, d, false, "2.1.0").await, Polled::Updated);
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
    let (up, _) = round(&f, &everyone[..50], &BTreeSet::new()).await;
    assert!(up.is_empty());

    let (code, c) = act(&f, &id, "start").await;
    assert_eq!(code, StatusCode::OK, "{c}");
    assert_eq!(c["devices"], 1000);
    let sizes: Vec<u64> = c["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [10, 100, 890]);

    // Wave 1: at most its 10 devices get the image (those on 2.1.0 are up to date).
    let c = poll(
        async || campaign(&f, &id).await,
        |c| c["waves"][0]["counts"]["waiting"].is_null(),
    )
    .await;
    let first = c["waves"][0]["counts"].clone();
    let (up, _) = round(&f, &everyone, &BTreeSet::new()).await;
    let up_to_date = first["up-to-date"].as_u64().unwrap_or(0) as usize;
    assert_eq!(up.len() + up_to_date, 10, "{first}");
    let mut all_up = up.clone();

    // Wave 2 follows, then the campaign pauses for a person.
    let c = poll(
        async || campaign(&f, &id).await,
        |c| c["currentWave"] == 2 && c["waves"][1]["counts"]["waiting"].is_null(),
    )
    .await;
    assert_eq!(c["currentWave"], 2, "{c}");
    let (up, _) = round(&f, &everyone, &BTreeSet::new()).await;
    all_up.extend(up.iter().cloned());
    let c = wait_state(&f, &id, "paused").await;
    assert!(c["reason"].as_str().unwrap().contains("wave 2 done"), "{c}");
    assert_eq!(c["waves"][1]["succeeded"], 100);
    // While paused, no device of wave 3 is offered anything; a restart changes nothing.
    let f = f.restart(&[]).await;
    let (up, failed) = round(&f, &everyone, &BTreeSet::new()).await;
    assert!(up.is_empty() && failed.is_empty(), "{up:?}");
    assert_eq!(campaign(&f, &id).await["state"], "paused");

    // A late joiner: a new EU meter shows up while the campaign runs.
    let (code, _) = act(&f, &id, "resume").await;
    assert_eq!(code, StatusCode::OK);
    let r = client()
        .put(f.srv.url("/v1/devices/meter-late"))
        .json(&json!({"tags": {"region": "eu"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // Wave 3, over several polls (the late joiner waits behind the wave).
    let mut fleet = everyone.clone();
    fleet.push("meter-late".into());
    for _ in 0..10 {
        let (up, failed) = round(&f, &fleet, &BTreeSet::new()).await;
        assert!(failed.is_empty());
        all_up.extend(up);
        if campaign(&f, &id).await["state"] == "finished" {
            break;
        }
    }
    let c = wait_state(&f, &id, "finished").await;
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
    let (code, v) = act(&f, &id, "start").await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "approval-required");
    let (code, v) = act(&f, &id, "approve").await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["code"], "self-approval");
    let (code, _) = act(&f, &id, "stop").await;
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
    let (code, _) = act(&f, &id, "start").await;
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
        let (up, failed) = round(&f, &devices, &failing).await;
        offered.extend(up);
        offered.extend(failed);
        if campaign(&f, &id).await["state"] == "aborted" {
            break;
        }
    }
    let c = wait_state(&f, &id, "aborted").await;
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
    let (up, failed) = round(&f, &devices, &BTreeSet::new()).await;
    assert!(
        up.is_empty() && failed.is_empty(),
        "{up:?} {failed:?} {}",
        campaign(&f, &id).await
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
    let (code, _) = act(&f, &id, "retry-failed").await;
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
    assert_eq!(act(&f, &id, "start").await.0, StatusCode::OK);
    poll(
        async || campaign(&f, &id).await,
        |c| c["counts"]["pending"] == 20,
    )
    .await;
    let failing: BTreeSet<String> = small.iter().take(5).cloned().collect();
    let (up, failed) = round(&f, &small, &failing).await;
    assert_eq!((up.len(), failed.len()), (15, 5));
    let c = wait_state(&f, &id, "finished").await;
    assert_eq!(c["counts"]["failed"], 5);
    let (code, v) = act(&f, &id, "retry-failed").await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["retried"], 5);
    assert_eq!(v["state"], "running");
    poll(
        async || campaign(&f, &id).await,
        |c| c["counts"]["pending"] == 5,
    )
    .await;
    let (up, _) = poll(
        async || round(&f, &small, &BTreeSet::new()).await,
        |(up, _)| !up.is_empty(),
    )
    .await;
    assert_eq!(up, failing);
    let c = wait_state(&f, &id, "finished").await;
    assert_eq!(
        (
            c["counts"]["succeeded"].as_u64(),
            c["counts"]["failed"].as_u64()
        ),
        (Some(20), None)
    );
    f.srv.stop().await;
}
