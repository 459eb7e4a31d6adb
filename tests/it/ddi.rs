//! The hawkBit device API (DDI) as a contract, driven by a simulated device over HTTP: the
//! base resource and its links, a deployment with its hashes and a ranged download, feedback
//! mapped onto the task (in order, out of order, after the end), cancellations acknowledged
//! and refused, configuration data, maintenance windows on an injected clock, and device and
//! gateway tokens.

use md5::Digest as _;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{client, image, sha256_hex};
use crate::fota::{ms, Fota};

const ROOT: &str = "/DEFAULT/controller/v1";

/// A device's view of the DDI routes, with the credential it presents.
struct Device<'a> {
    f: &'a Fota,
    id: &'a str,
    auth: Option<String>,
}

impl Device<'_> {
    fn url(&self, rest: &str) -> String {
        self.f.srv.url(&format!("{ROOT}/{}{rest}", self.id))
    }

    fn with(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some(a) => req.header("Authorization", a),
            None => req,
        }
    }

    async fn get(&self, rest: &str) -> (StatusCode, Value) {
        let r = self
            .with(client().get(self.url(rest)))
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The base resource, which must answer.
    async fn base(&self) -> Value {
        let (status, v) = self.get("").await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    async fn send(&self, method: reqwest::Method, rest: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .with(client().request(method, self.url(rest)))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn feedback(
        &self,
        action: &str,
        execution: &str,
        finished: &str,
        details: &[&str],
    ) -> (StatusCode, Value) {
        let body = json!({
            "id": action, "time": "20261120T120000",
            "status": {"execution": execution, "result": {"finished": finished}, "details": details},
        });
        self.send(
            reqwest::Method::POST,
            &format!("/deploymentBase/{action}/feedback"),
            &body,
        )
        .await
    }
}

/// The href of `_links.<name>`, if there.
fn link(base: &Value, name: &str) -> Option<String> {
    base["_links"][name]["href"].as_str().map(str::to_owned)
}

/// The last path segment of a link: the action id.
fn action_of(href: &str) -> String {
    href.rsplit('/').next().unwrap().to_owned()
}

fn history(task: &Value) -> Vec<(String, Option<String>, Option<String>)> {
    task["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["status"].as_str().unwrap().to_owned(),
                h["reason"].as_str().map(str::to_owned),
                h["detail"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_deployment_from_poll_to_success() {
    let f = Fota::start(&[]).await;
    let data = image(300_000, 41);
    f.upload("gw-2.1.swu", &data, "?version=2.1").await;
    let dev = Device {
        f: &f,
        id: "gw-1",
        auth: None,
    };
    // Nothing to do: the configured polling interval, and a request for attributes.
    let base = dev.base().await;
    assert_eq!(base["config"]["polling"]["sleep"], "00:01:00");
    assert!(link(&base, "deploymentBase").is_none());
    assert!(link(&base, "configData").is_some());

    let id = f
        .schedule(
            "gw-1",
            json!({"name": "gw-2.1.swu", "protocolType": "HTTP"}),
        )
        .await;
    let base = dev.base().await;
    let href = link(&base, "deploymentBase").expect("a deployment is offered");
    assert!(
        href.starts_with(&f.srv.url(&format!("{ROOT}/gw-1/deploymentBase/"))),
        "{href}"
    );
    let action = action_of(&href);
    assert_eq!(f.status(&id).await["status"], "delivering");

    // The deployment: the artifact with the three hashes computed at ingest.
    let r = client().get(&href).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let d: Value = r.json().await.unwrap();
    assert_eq!(d["id"], action.as_str());
    assert_eq!(d["deployment"]["download"], "forced");
    assert!(
        d["deployment"].get("maintenanceWindow").is_none(),
        "no window: {d}"
    );
    let chunk = &d["deployment"]["chunks"][0];
    assert_eq!(chunk["version"], "2.1");
    let a = &chunk["artifacts"][0];
    assert_eq!(a["filename"], "gw-2.1.swu");
    assert_eq!(a["size"], data.len());
    assert_eq!(a["hashes"]["sha256"], sha256_hex(&data));
    assert_eq!(a["hashes"]["sha1"], hex::encode(sha1::Sha1::digest(&data)));
    assert_eq!(a["hashes"]["md5"], hex::encode(md5::Md5::digest(&data)));
    // The record shows them too.
    let rec: Value = f
        .srv
        .get("/v1/firmware/gw-2.1.swu")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rec["sha1"], a["hashes"]["sha1"]);
    assert_eq!(rec["md5"], a["hashes"]["md5"]);

    // The MD5SUM file, and a download resumed with a range.
    let sum = client()
        .get(a["_links"]["md5sum-http"]["href"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(sum.status(), StatusCode::OK);
    assert_eq!(
        sum.text().await.unwrap(),
        format!("{}  gw-2.1.swu\n", a["hashes"]["md5"].as_str().unwrap())
    );
    let download = a["_links"]["download-http"]["href"].as_str().unwrap();
    let r = client()
        .get(download)
        .header("Range", "bytes=100000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.bytes().await.unwrap()[..], &data[100_000..]);
    assert_eq!(f.status(&id).await["status"], "downloading");

    // Feedback: progress keeps the status and its details; downloaded moves on.
    let (s, _) = dev
        .feedback(
            &action,
            "proceeding",
            "none",
            &["Installing Update Chunk Artifacts."],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let t = f.status(&id).await;
    assert_eq!(t["status"], "downloading");
    let last = history(&t).pop().unwrap();
    assert_eq!(last.1.as_deref(), Some("proceeding"));
    assert_eq!(
        last.2.as_deref(),
        Some("proceeding: Installing Update Chunk Artifacts.")
    );
    let (s, _) = dev.feedback(&action, "downloaded", "none", &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(f.status(&id).await["status"], "downloaded");
    // Out of order: back to downloading is refused, and nothing changes.
    let before = f.status(&id).await;
    let (s, e) = dev.feedback(&action, "downloading", "none", &[]).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("transition-not-allowed"))
    );
    assert_eq!(f.status(&id).await["history"], before["history"]);
    // closed without an outcome is not feedback.
    let (s, e) = dev.feedback(&action, "closed", "none", &[]).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid-feedback"))
    );

    let (s, _) = dev
        .feedback(&action, "closed", "success", &["Update Installed."])
        .await;
    assert_eq!(s, StatusCode::OK);
    let t = f.status(&id).await;
    assert_eq!(t["status"], "succeeded");
    let last = history(&t).pop().unwrap();
    assert_eq!(last.0, "succeeded");
    assert_eq!(last.2.as_deref(), Some("closed: Update Installed."));
    // After the end: refused as finished.
    let (s, e) = dev.feedback(&action, "closed", "failure", &[]).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("task-finished"))
    );

    // The base resource now links the installed action, and no deployment.
    let base = dev.base().await;
    assert!(link(&base, "deploymentBase").is_none());
    let installed = link(&base, "installedBase").expect("installedBase");
    assert_eq!(action_of(&installed), action);
    let r = client()
        .get(format!("{installed}?actionHistory=-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["actionHistory"]["status"], "succeeded");
    assert!(v["actionHistory"]["messages"][0]
        .as_str()
        .unwrap()
        .contains("Update Installed."));

    // Unknown and malformed action ids; another tenant.
    let other = if action == "1" { "2" } else { "1" };
    let (s, e) = dev.get(&format!("/deploymentBase/{other}")).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("action-not-found"))
    );
    let (s, e) = dev.feedback(other, "closed", "success", &[]).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("action-not-found"))
    );
    let (s, e) = dev.get("/deploymentBase/x1").await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid-parameter"))
    );
    let r = client()
        .get(f.srv.url("/acme/controller/v1/gw-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // The tenant is compared without regard to case.
    let r = client()
        .get(f.srv.url("/default/controller/v1/gw-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn failure_rejection_and_cancellations() {
    let f = Fota::start(&["fota.deferred_retry=10m"]).await;
    f.upload("a.swu", &image(1000, 1), "").await;
    let dev = Device {
        f: &f,
        id: "gw-2",
        auth: None,
    };

    // closed + failure fails the task as update-failed.
    let id = f
        .schedule("gw-2", json!({"name": "a.swu", "protocolType": "HTTP"}))
        .await;
    let action = action_of(&link(&dev.base().await, "deploymentBase").unwrap());
    let (s, _) = dev
        .feedback(&action, "closed", "failure", &["ERROR: no space"])
        .await;
    assert_eq!(s, StatusCode::OK);
    let t = f.status(&id).await;
    assert_eq!(
        (t["status"].as_str(), t["reason"].as_str()),
        (Some("failed"), Some("update-failed"))
    );

    // rejected defers: the task waits and the device is not offered it until the retry.
    let id = f
        .schedule("gw-2", json!({"name": "a.swu", "protocolType": "HTTP"}))
        .await;
    let action = action_of(&link(&dev.base().await, "deploymentBase").unwrap());
    let (s, _) = dev.feedback(&action, "rejected", "none", &["busy"]).await;
    assert_eq!(s, StatusCode::OK);
    let t = f.status(&id).await;
    assert_eq!(
        (t["status"].as_str(), t["reason"].as_str()),
        (Some("pending"), Some("deferred"))
    );
    let base = dev.base().await;
    assert!(link(&base, "deploymentBase").is_none());
    f.clock.advance(std::time::Duration::from_secs(601));
    assert!(
        link(&dev.base().await, "deploymentBase").is_some(),
        "offered again"
    );
    let r = f
        .srv
        .post(&format!("/v1/fota/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    // The operator cancelled a task the device was handed: it is told until it answers.
    let base = dev.base().await;
    let t = f.status(&id).await;
    let cancel = link(&base, "cancelAction").unwrap_or_else(|| panic!("cancelAction: {base} {t}"));
    assert_eq!(action_of(&cancel), action);
    assert!(link(&base, "deploymentBase").is_none());
    let (s, v) = dev.get(&format!("/cancelAction/{action}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["cancelAction"]["stopId"], action.as_str());
    // The device refuses: the refusal stays in the history, the task stays cancelled.
    let (s, _) = dev
        .send(
            reqwest::Method::POST,
            &format!("/cancelAction/{action}/feedback"),
            &json!({"status": {"execution": "rejected", "result": {"finished": "none"}, "details": ["installing"]}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let t = f.status(&id).await;
    assert_eq!(t["status"], "cancelled");
    let last = history(&t).pop().unwrap();
    assert_eq!(
        (last.1.as_deref(), last.2.as_deref()),
        (Some("cancel-refused"), Some("rejected: installing"))
    );
    assert!(
        link(&dev.base().await, "cancelAction").is_none(),
        "answered"
    );
    let (s, e) = dev.get(&format!("/cancelAction/{action}")).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("action-not-found"))
    );
    let (s, e) = dev
        .send(
            reqwest::Method::POST,
            &format!("/cancelAction/{action}/feedback"),
            &json!({"status": {"execution": "closed", "result": {"finished": "success"}}}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("transition-not-allowed"))
    );

    // A task cancelled before it was handed over was never the device's business.
    let id = f
        .schedule("gw-2", json!({"name": "a.swu", "protocolType": "HTTP"}))
        .await;
    f.srv
        .post(&format!("/v1/fota/{id}/cancel"), &json!({}))
        .await;
    assert!(link(&dev.base().await, "cancelAction").is_none());
}

#[tokio::test]
async fn configuration_data_into_the_registry() {
    let f = Fota::start(&[]).await;
    let dev = Device {
        f: &f,
        id: "gw-3",
        auth: None,
    };
    let href = link(&dev.base().await, "configData").expect("asked for attributes");
    assert_eq!(href, f.srv.url(&format!("{ROOT}/gw-3/configData")));
    let dev = &dev;
    let put = async |body: Value| dev.send(reqwest::Method::PUT, "/configData", &body).await;
    let attributes = async || -> Value {
        f.srv
            .get("/v1/devices/gw-3")
            .await
            .json::<Value>()
            .await
            .unwrap()["attributes"]
            .clone()
    };
    let (s, _) = put(json!({"mode": "merge", "data": {"hwRevision": "2", "board": "x"}})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(attributes().await, json!({"hwRevision": "2", "board": "x"}));
    assert!(
        link(&dev.base().await, "configData").is_none(),
        "has attributes now"
    );
    let (s, _) = put(json!({"data": {"board": "y"}})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(attributes().await, json!({"hwRevision": "2", "board": "y"}));
    let (s, _) = put(json!({"mode": "remove", "data": {"board": ""}})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(attributes().await, json!({"hwRevision": "2"}));
    let (s, _) = put(json!({"mode": "replace", "data": {"serial": "123"}})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(attributes().await, json!({"serial": "123"}));
    for bad in [
        json!({"data": {"a": 1}}),
        json!({"mode": "upsert", "data": {}}),
        json!({"data": ["x"]}),
        json!({"data": {"a": "x".repeat(300)}}),
    ] {
        let (s, e) = put(bad.clone()).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid-parameter")),
            "{bad}"
        );
    }
    assert_eq!(
        attributes().await,
        json!({"serial": "123"}),
        "nothing half-stored"
    );
}

#[tokio::test]
async fn polling_shortens_before_a_window_opens() {
    // Friday noon; nights-home opens at 01:00 UTC, thirteen hours later.
    let f = Fota::start(&["fota.poll_interval=1d"]).await;
    f.upload("n.swu", &image(100, 2), "").await;
    let dev = Device {
        f: &f,
        id: "gw-4",
        auth: None,
    };
    assert_eq!(dev.base().await["config"]["polling"]["sleep"], "23:59:59");
    let id = f
        .schedule(
            "gw-4",
            json!({"name": "n.swu", "protocolType": "HTTP", "schedule": "nights-home"}),
        )
        .await;
    let base = dev.base().await;
    assert_eq!(base["config"]["polling"]["sleep"], "13:00:00");
    assert!(link(&base, "deploymentBase").is_none());
    assert_eq!(f.status(&id).await["reason"], "window");
    f.clock.set(ms("2026-11-21T01:00:00Z"));
    let base = dev.base().await;
    let href = link(&base, "deploymentBase").expect("offered inside the window");
    let d: Value = client()
        .get(&href)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d["deployment"]["maintenanceWindow"], "available");
}

#[tokio::test]
async fn target_and_gateway_tokens() {
    let f = Fota::start(&["auth.device_credentials=true"]).await;
    f.upload("t.swu", &image(100, 3), "").await;
    let r = f
        .srv
        .post(
            "/v1/devices/gw-5/fota",
            &json!({"name": "t.swu", "protocolType": "HTTP", "issueDeviceToken": true}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let device_token = r.json::<Value>().await.unwrap()["deviceToken"]
        .as_str()
        .unwrap()
        .to_owned();
    // The first token may be made open (loopback); later ones need it.
    let r = f
        .srv
        .post("/v1/tokens", &json!({"name": "root", "role": "admin"}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let admin = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let make = async |role: &str, name: &str| -> String {
        let r = client()
            .post(f.srv.url("/v1/tokens"))
            .bearer_auth(&admin)
            .json(&json!({"name": name, "role": role}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let gateway = make("gateway", "edge-gw").await;
    let reader = make("reader", "dash").await;

    let as_dev = |auth: Option<String>| Device {
        f: &f,
        id: "gw-5",
        auth,
    };
    let (s, e) = as_dev(None).get("").await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("device-unauthenticated"))
    );
    let (s, e) = as_dev(Some("TargetToken fwd_wrong".into())).get("").await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("device-unauthenticated"))
    );
    let (s, e) = as_dev(Some(format!("GatewayToken {reader}"))).get("").await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("gateway-role-required"))
    );
    let (s, e) = as_dev(Some("GatewayToken fwr_nope".into())).get("").await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("gateway-token-invalid"))
    );
    let (s, e) = as_dev(Some(format!("Basic {device_token}"))).get("").await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("device-unauthenticated"))
    );
    // Refused requests changed nothing: the task was not handed over.
    let r = client()
        .get(f.srv.url("/v1/fota?deviceId=gw-5"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    let list: Value = r.json().await.unwrap();
    assert_eq!(list["tasks"][0]["status"], "pending", "{list}");

    let dev = as_dev(Some(format!("TargetToken {device_token}")));
    let action = action_of(&link(&dev.base().await, "deploymentBase").unwrap());
    let gw = as_dev(Some(format!("GatewayToken {gateway}")));
    let (s, _) = gw.get(&format!("/deploymentBase/{action}")).await;
    assert_eq!(s, StatusCode::OK);
    // A gateway may act for a device it has no token of, too.
    let other = Device {
        f: &f,
        id: "gw-6",
        auth: Some(format!("GatewayToken {gateway}")),
    };
    assert!(other.base().await["_links"].is_object());
    // The gateway token is for the device API only.
    let r = client()
        .get(f.srv.url("/v1/firmware"))
        .bearer_auth(&gateway)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Feedback needs the credential like everything else.
    let (s, _) = as_dev(None)
        .feedback(&action, "closed", "success", &[])
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = dev.feedback(&action, "closed", "success", &[]).await;
    assert_eq!(s, StatusCode::OK);
}
