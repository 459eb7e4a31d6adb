//! Access control through real requests: every role against every route (the table below
//! must list every route the router serves), token revocation taking effect at once, the
//! audit trail, refusal to run open beyond loopback, package URI capabilities, and HTTPS.

use std::path::Path;

use futures_util::SinkExt;
use fwrepo::auth::{Role, TokenStore};
use fwrepo::coap::msg::codes;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::coap_protocol::{connect, get, recv};
use crate::common::{
    client, config, have_tool, image, sha256_hex, test_certificate, tool, TestServer,
};

/// Every route and who may use it. A route the router serves that is missing here fails
/// `every_role_against_every_route`, so no route goes without a decided rule.
const TABLE: &[(&str, &str, &str)] = &[
    ("GET", "/healthz", "public"),
    ("GET", "/ui", "public"),
    ("GET", "/ui/", "public"),
    ("GET", "/ui/{asset}", "public"),
    ("GET", "/ui/session", "public"),
    ("POST", "/ui/session", "public"),
    ("DELETE", "/ui/session", "public"),
    ("GET", "/metrics", "reader"),
    ("GET", "/v1/keys", "reader"),
    ("GET", "/v1/keys/{keyId}", "reader"),
    ("GET", "/v1/tokens", "admin"),
    ("POST", "/v1/tokens", "admin"),
    ("DELETE", "/v1/tokens/{token}", "admin"),
    ("GET", "/v1/firmware", "reader"),
    ("PUT", "/v1/firmware/{name}", "publisher"),
    ("GET", "/v1/firmware/{name}", "reader"),
    ("PATCH", "/v1/firmware/{name}", "publisher"),
    ("DELETE", "/v1/firmware/{name}", "admin"),
    ("GET", "/v1/firmware/{name}/signature", "reader"),
    ("GET", "/v1/firmware/{name}/content", "reader"),
    ("HEAD", "/v1/firmware/{name}/content", "reader"),
    ("GET", "/fw/{name}", "device"),
    ("HEAD", "/fw/{name}", "device"),
    ("GET", "/p/{fotaId}", "device"),
    ("HEAD", "/p/{fotaId}", "device"),
    ("GET", "/p/{fotaId}/{token}", "device"),
    ("HEAD", "/p/{fotaId}/{token}", "device"),
    ("POST", "/v1/imports", "publisher"),
    ("POST", "/v1/devices/{deviceId}/fota", "operator"),
    ("GET", "/v1/devices/{deviceId}/fota", "device"),
    ("POST", "/v1/devices/{deviceId}/token", "operator"),
    ("DELETE", "/v1/devices/{deviceId}/token", "operator"),
    ("PUT", "/v1/devices/{deviceId}/psk", "operator"),
    ("DELETE", "/v1/devices/{deviceId}/psk", "operator"),
    (
        "POST",
        "/v1/devices/{deviceId}/methods/{method}",
        "operator",
    ),
    ("GET", "/v1/fota", "reader"),
    ("GET", "/v1/fota/{fotaId}", "reader"),
    ("POST", "/v1/fota/{fotaId}/report", "device"),
    ("POST", "/v1/fota/{fotaId}/cancel", "operator"),
    ("GET", "/v1/schedules", "reader"),
    ("GET", "/v1/schedules/{name}", "reader"),
    ("PUT", "/v1/schedules/{name}", "operator"),
    ("DELETE", "/v1/schedules/{name}", "operator"),
    ("GET", "/v1/devices", "reader"),
    ("POST", "/v1/devices:import", "operator"),
    ("GET", "/v1/devices/{deviceId}", "reader"),
    ("PUT", "/v1/devices/{deviceId}", "operator"),
    ("PATCH", "/v1/devices/{deviceId}", "operator"),
    ("DELETE", "/v1/devices/{deviceId}", "operator"),
    ("GET", "/v1/groups", "reader"),
    ("GET", "/v1/groups/{name}", "reader"),
    ("PUT", "/v1/groups/{name}", "operator"),
    ("DELETE", "/v1/groups/{name}", "operator"),
    ("GET", "/v1/groups/{name}/devices", "reader"),
    ("GET", "/v1/campaigns", "reader"),
    ("POST", "/v1/campaigns", "operator"),
    ("GET", "/v1/campaigns/{campaignId}", "reader"),
    ("GET", "/v1/campaigns/{campaignId}/devices", "reader"),
    ("POST", "/v1/campaigns/{campaignId}/approve", "admin"),
    ("POST", "/v1/campaigns/{campaignId}/start", "operator"),
    ("POST", "/v1/campaigns/{campaignId}/pause", "operator"),
    ("POST", "/v1/campaigns/{campaignId}/resume", "operator"),
    ("POST", "/v1/campaigns/{campaignId}/stop", "operator"),
    (
        "POST",
        "/v1/campaigns/{campaignId}/retry-failed",
        "operator",
    ),
    ("GET", "/v1/events", "reader"),
    ("OPTIONS", "/v1/uploads", "public"),
    ("POST", "/v1/uploads", "publisher"),
    ("HEAD", "/v1/uploads/{uploadId}", "publisher"),
    ("PATCH", "/v1/uploads/{uploadId}", "publisher"),
    ("DELETE", "/v1/uploads/{uploadId}", "publisher"),
    ("GET", "/{tenant}/controller/v1/{controllerId}", "device"),
    (
        "GET",
        "/{tenant}/controller/v1/{controllerId}/deploymentBase/{actionId}",
        "device",
    ),
    (
        "POST",
        "/{tenant}/controller/v1/{controllerId}/deploymentBase/{actionId}/feedback",
        "device",
    ),
    (
        "GET",
        "/{tenant}/controller/v1/{controllerId}/installedBase/{actionId}",
        "device",
    ),
    (
        "GET",
        "/{tenant}/controller/v1/{controllerId}/cancelAction/{actionId}",
        "device",
    ),
    (
        "POST",
        "/{tenant}/controller/v1/{controllerId}/cancelAction/{actionId}/feedback",
        "device",
    ),
    (
        "PUT",
        "/{tenant}/controller/v1/{controllerId}/configData",
        "device",
    ),
    (
        "GET",
        "/{tenant}/controller/v1/{controllerId}/softwaremodules/{moduleId}/artifacts/{fileName}",
        "device",
    ),
];

/// The codes the access layer answers with; handlers never use them.
const DENIALS: [&str; 3] = ["unauthenticated", "invalid-token", "forbidden"];

struct Tokens {
    admin: String,
    publisher: String,
    operator: String,
    reader: String,
}

/// Tokens written to the data root before the server starts, as `fwrepo token create` does.
async fn make_tokens(root: &Path) -> Tokens {
    let store = TokenStore::file(&root.join("storage/tokens.json"));
    let make = async |name: &str, role| store.create(name, role).await.unwrap().token;
    Tokens {
        admin: make("root", Role::Admin).await,
        publisher: make("ci", Role::Publisher).await,
        operator: make("lwm2m-server", Role::Operator).await,
        reader: make("dashboard", Role::Reader).await,
    }
}

async fn send(
    srv: &TestServer,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (StatusCode, Option<Value>) {
    let mut req = client().request(method, srv.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let is_json = r
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !is_json {
        return (status, None);
    }
    (status, r.json().await.ok())
}

fn denial(body: &Option<Value>) -> Option<String> {
    body.as_ref()
        .and_then(|b| b["error"]["code"].as_str())
        .filter(|c| DENIALS.contains(c))
        .map(str::to_owned)
}

/// Every method a client may send; the matrix tries each on every path.
const METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// The rule `TABLE` gives `method` on `path`: its own, or for HEAD the GET rule.
fn table_rule(method: &Method, path: &str) -> Option<&'static str> {
    let find = |m: &str| {
        TABLE
            .iter()
            .find(|(tm, tp, _)| *tm == m && *tp == path)
            .map(|(_, _, r)| *r)
    };
    find(method.as_str()).or_else(|| (*method == Method::HEAD).then(|| find("GET")).flatten())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_route() {
    let served: Vec<(String, String, String)> = fwrepo::http::routes()
        .table()
        .iter()
        .map(|(m, p, r)| {
            let rule = match r {
                fwrepo::auth::Rule::Public => "public".to_owned(),
                fwrepo::auth::Rule::Device | fwrepo::auth::Rule::DeviceByName => {
                    "device".to_owned()
                }
                fwrepo::auth::Rule::Role(role) => role.to_string(),
            };
            (m.to_string(), p.to_string(), rule)
        })
        .collect();
    let table: Vec<(String, String, String)> = TABLE
        .iter()
        .map(|(m, p, r)| (m.to_string(), p.to_string(), r.to_string()))
        .collect();
    for route in &served {
        assert!(
            table.contains(route),
            "route without a rule in TABLE: {route:?}"
        );
    }
    for route in &table {
        assert!(
            served.contains(route),
            "TABLE lists a route not served: {route:?}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let t = make_tokens(dir.path()).await;
    let store = TokenStore::file(&dir.path().join("storage/tokens.json"));
    let revoked = store.create("gone", Role::Admin).await.unwrap().token;
    store.revoke("gone", false).await.unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    // Something for every parameter to point at.
    let (s, _) = send(
        &srv,
        Method::PUT,
        "/v1/firmware/acl-fw",
        Some(&t.publisher),
        Some(b"image".to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let r = client()
        .post(srv.url("/v1/devices/acl-dev/fota"))
        .bearer_auth(&t.operator)
        .json(&json!({"name": "acl-fw"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let fota_id = r.json::<Value>().await.unwrap()["fotaId"]
        .as_str()
        .unwrap()
        .to_owned();
    let keys: Value = client()
        .get(srv.url("/v1/keys"))
        .bearer_auth(&t.reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key_id = keys["keys"][0]["keyId"].as_str().unwrap().to_owned();

    // (who, Authorization header, role): `malformed` is not a bearer credential at all.
    let callers: [(&str, Option<String>, Option<Role>); 7] = [
        ("no token", None, None),
        ("malformed", Some("Basic Zm9vOmJhcg==".into()), None),
        ("revoked", Some(format!("Bearer {revoked}")), None),
        (
            "reader",
            Some(format!("Bearer {}", t.reader)),
            Some(Role::Reader),
        ),
        (
            "operator",
            Some(format!("Bearer {}", t.operator)),
            Some(Role::Operator),
        ),
        (
            "publisher",
            Some(format!("Bearer {}", t.publisher)),
            Some(Role::Publisher),
        ),
        (
            "admin",
            Some(format!("Bearer {}", t.admin)),
            Some(Role::Admin),
        ),
    ];
    let mut paths: Vec<&str> = Vec::new();
    for (_, p, _) in TABLE {
        if !paths.contains(p) {
            paths.push(p);
        }
    }
    let mut cases = 0;
    for &path in &paths {
        let concrete = path
            .replace(
                "{name}",
                if path.starts_with("/v1/schedules") {
                    "acl-sched"
                } else {
                    "acl-fw"
                },
            )
            .replace("{fotaId}", &fota_id)
            .replace("{deviceId}", "acl-dev")
            .replace("{method}", "checkFirmwareUpdateStatus")
            .replace("{keyId}", &key_id)
            .replace("{token}", "nobody")
            .replace("{uploadId}", "0123456789abcdef0123456789abcdef")
            .replace("{tenant}", "DEFAULT")
            .replace("{controllerId}", "acl-dev")
            .replace("{actionId}", "1")
            .replace("{moduleId}", "1")
            .replace("{fileName}", "acl-fw.MD5SUM");
        // DELETE comes last, so the resource is there for every other method.
        for method in METHODS {
            let rule = table_rule(&method, path);
            let body = matches!(method, Method::POST | Method::PUT | Method::PATCH)
                .then(|| b"{}".to_vec());
            for (who, auth, role) in &callers {
                cases += 1;
                let mut req = client().request(method.clone(), srv.url(&concrete));
                if let Some(a) = auth {
                    req = req.header("authorization", a);
                }
                if let Some(b) = body.clone() {
                    req = req.header("content-type", "application/json").body(b);
                }
                let r = req.send().await.unwrap();
                let status = r.status();
                let allow = r.headers().get("allow").cloned();
                let key_header = r.headers().get("fwrepo-key-id").is_some();
                let is_json = r
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
                // Only JSON is read: the event stream does not end.
                let answer: Option<Value> = if is_json { r.json().await.ok() } else { None };
                let what = format!("{who}: {method} {concrete}: {status} {answer:?}");
                let Some(rule) = rule else {
                    // No rule names it: refused before any handler, whoever asks.
                    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{what}");
                    assert!(allow.is_some(), "{what}: no Allow");
                    if method != Method::HEAD {
                        assert_eq!(
                            answer.as_ref().unwrap()["error"]["code"],
                            "method-not-allowed",
                            "{what}"
                        );
                    }
                    continue;
                };
                let need: Option<Role> = match rule {
                    "public" | "device" => None,
                    r => Some(r.parse().unwrap()),
                };
                let want = match (need, auth, role) {
                    (None, _, _) => None,
                    (Some(_), None, _) => Some((StatusCode::UNAUTHORIZED, "unauthenticated")),
                    (Some(_), Some(_), None) if *who == "malformed" => {
                        Some((StatusCode::UNAUTHORIZED, "unauthenticated"))
                    }
                    (Some(_), Some(_), None) => Some((StatusCode::UNAUTHORIZED, "invalid-token")),
                    (Some(need), Some(_), Some(have)) if !have.covers(need) => {
                        Some((StatusCode::FORBIDDEN, "forbidden"))
                    }
                    _ => None,
                };
                match want {
                    Some((code, denial_code)) => {
                        assert_eq!(status, code, "{what}");
                        assert!(!key_header, "{what}: a refusal names the key");
                        if method != Method::HEAD {
                            assert_eq!(denial(&answer).as_deref(), Some(denial_code), "{what}");
                        }
                    }
                    None => assert!(
                        denial(&answer).is_none()
                            && status != StatusCode::FORBIDDEN
                            && status != StatusCode::METHOD_NOT_ALLOWED,
                        "refused: {what}"
                    ),
                }
            }
        }
    }
    eprintln!("{cases} role cases");
    // Refusals are audited, HEAD ones included.
    let audit = std::fs::read_to_string(dir.path().join("storage/audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"HEAD /v1/tokens\"") && l.contains("\"status\":401")),
        "{audit}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_do_not_reveal_whether_firmware_exists() {
    let dir = tempfile::tempdir().unwrap();
    let t = make_tokens(dir.path()).await;
    let srv = TestServer::start(dir.path(), &[]).await;
    let (s, _) = send(
        &srv,
        Method::PUT,
        "/v1/firmware/there",
        Some(&t.publisher),
        Some(b"x".to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    for (method, token) in [
        (Method::GET, None),
        (Method::GET, Some("fwr_bogus")),
        (Method::DELETE, Some(t.reader.as_str())),
    ] {
        let a = send(&srv, method.clone(), "/v1/firmware/there", token, None).await;
        let b = send(&srv, method.clone(), "/v1/firmware/not-there", token, None).await;
        assert!(
            a.0 == StatusCode::UNAUTHORIZED || a.0 == StatusCode::FORBIDDEN,
            "{a:?}"
        );
        assert_eq!(a, b, "{method} with {token:?}");
    }
    let r = client()
        .get(srv.url("/v1/firmware/there"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"fwrepo\"");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_takes_effect_at_once_and_changes_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let t = make_tokens(dir.path()).await;
    let srv = TestServer::start(dir.path(), &[]).await;

    // Over HTTP: create, use, revoke, refused.
    let r = client()
        .post(srv.url("/v1/tokens"))
        .bearer_auth(&t.admin)
        .json(&json!({"name": "nightly", "role": "publisher"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let made: Value = r.json().await.unwrap();
    let nightly = made["token"].as_str().unwrap().to_owned();
    let (s, _) = send(
        &srv,
        Method::PUT,
        "/v1/firmware/by-nightly",
        Some(&nightly),
        Some(b"1".to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let listed: Value = client()
        .get(srv.url("/v1/tokens"))
        .bearer_auth(&t.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["root", "ci", "lwm2m-server", "dashboard", "nightly"]
    );
    assert!(
        !listed.to_string().contains(&nightly),
        "secrets are never listed"
    );
    let (s, _) = send(
        &srv,
        Method::DELETE,
        "/v1/tokens/nightly",
        Some(&t.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, body) = send(
        &srv,
        Method::PUT,
        "/v1/firmware/by-nightly-2",
        Some(&nightly),
        Some(b"2".to_vec()),
    )
    .await;
    assert_eq!(
        (s, denial(&body).as_deref()),
        (StatusCode::UNAUTHORIZED, Some("invalid-token"))
    );

    // From the command line, as another process, while the server runs.
    let exe = env!("CARGO_BIN_EXE_fwrepo");
    let storage = dir.path().join("storage");
    let (s, _) = send(&srv, Method::GET, "/v1/firmware", Some(&t.reader), None).await;
    assert_eq!(s, StatusCode::OK);
    let out = std::process::Command::new(exe)
        .args(["token", "revoke", "dashboard", "--storage"])
        .arg(&storage)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, _) = send(&srv, Method::GET, "/v1/firmware", Some(&t.reader), None).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "revoked by the CLI, refused at once"
    );
    let out = std::process::Command::new(exe)
        .args([
            "token",
            "create",
            "--role",
            "reader",
            "--name",
            "grafana",
            "--storage",
        ])
        .arg(&storage)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grafana = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (s, _) = send(&srv, Method::GET, "/v1/firmware", Some(&grafana), None).await;
    assert_eq!(s, StatusCode::OK, "created by the CLI, accepted at once");
    let out = std::process::Command::new(exe)
        .args(["token", "list", "--storage"])
        .arg(&storage)
        .output()
        .unwrap();
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(
        listing.contains("grafana\treader") && !listing.contains("dashboard"),
        "{listing}"
    );
    assert!(!std::fs::read_to_string(storage.join("tokens.json"))
        .unwrap()
        .contains(&grafana));

    // The audit trail names the token behind each change; reads are not changes.
    let (s, _) = send(
        &srv,
        Method::DELETE,
        "/v1/firmware/by-nightly",
        Some(&t.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let r = client()
        .post(srv.url("/v1/devices/audited/fota"))
        .bearer_auth(&t.operator)
        .json(&json!({"name": "by-nightly"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let audit: Vec<Value> = std::fs::read_to_string(storage.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |actor: &str, action: &str| {
        audit
            .iter()
            .find(|e| e["actor"] == actor && e["action"] == action)
            .unwrap_or_else(|| panic!("no audit event {actor} {action}: {audit:#?}"))
    };
    assert_eq!(
        find("root", "POST /v1/tokens")["target"],
        "/v1/tokens (token nightly (publisher))"
    );
    assert_eq!(
        find("nightly", "PUT /v1/firmware/{name}")["target"],
        "/v1/firmware/by-nightly"
    );
    assert_eq!(find("nightly", "PUT /v1/firmware/{name}")["status"], 201);
    assert_eq!(
        find("root", "DELETE /v1/tokens/{token}")["target"],
        "/v1/tokens/nightly (token nightly (publisher))"
    );
    assert_eq!(find("root", "DELETE /v1/firmware/{name}")["status"], 204);
    assert_eq!(
        find("lwm2m-server", "POST /v1/devices/{deviceId}/fota")["status"],
        404
    );
    assert_eq!(
        find("nightly", "PUT /v1/firmware/{name}")["role"],
        "publisher"
    );
    assert!(find(
        &format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        ),
        "token revoke"
    )["target"]
        .as_str()
        .unwrap()
        .contains("dashboard"));
    // Successful reads are not changes; refused ones are in the trail.
    for e in &audit {
        if e["action"].as_str().unwrap().starts_with("GET") {
            assert!(e["status"] == 401 || e["status"] == 403, "{e}");
        }
    }
    assert_eq!(find("invalid-token", "GET /v1/firmware")["status"], 401);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_admin_token_is_revoked_only_by_force() {
    let dir = tempfile::tempdir().unwrap();
    let t = make_tokens(dir.path()).await;
    let srv = TestServer::start(dir.path(), &[]).await;
    // The API refuses to revoke the only admin token: the service would run open on loopback.
    let (s, answer) = send(
        &srv,
        Method::DELETE,
        "/v1/tokens/root",
        Some(&t.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{answer:?}");
    assert_eq!(answer.unwrap()["error"]["code"], "last-admin-token");
    let (s, _) = send(&srv, Method::GET, "/v1/tokens", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "still closed");
    // The other roles' tokens go as before.
    let (s, _) = send(
        &srv,
        Method::DELETE,
        "/v1/tokens/dashboard",
        Some(&t.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // The command line refuses too, unless forced.
    let exe = env!("CARGO_BIN_EXE_fwrepo");
    let storage = dir.path().join("storage");
    let revoke = |force: bool| {
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["token", "revoke", "root", "--storage"])
            .arg(&storage);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let out = revoke(false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("last admin token"));
    let out = revoke(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, _) = send(&srv, Method::GET, "/v1/firmware", Some(&t.admin), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_run_open_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    // The check comes before anything is bound, so no socket beyond loopback is opened here.
    let c = config(dir.path(), &["http.listen=0.0.0.0:0"]);
    let err = match fwrepo::server::start(&c, tokio_util::sync::CancellationToken::new()).await {
        Ok(_) => panic!("started open on 0.0.0.0"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("0.0.0.0:0") && err.contains("fwrepo token create"),
        "{err}"
    );
    let c = config(dir.path(), &["coap.udp_listen=[::]:0"]);
    assert!(
        fwrepo::server::start(&c, tokio_util::sync::CancellationToken::new())
            .await
            .is_err()
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fwrepo"))
        .args(["serve", "--listen", "0.0.0.0:0", "--storage"])
        .arg(dir.path().join("storage"))
        .arg("--keys")
        .arg(dir.path().join("keys"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("fwrepo token create --role admin") && said.contains("--insecure"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn package_tokens_guard_device_downloads() {
    let dir = tempfile::tempdir().unwrap();
    let t = make_tokens(dir.path()).await;
    let srv = TestServer::start(dir.path(), &["auth.package_tokens=true"]).await;
    let data = image(5000, 9);
    let (s, _) = send(
        &srv,
        Method::PUT,
        "/v1/firmware/guarded",
        Some(&t.publisher),
        Some(data.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let r = client()
        .post(srv.url("/v1/devices/dev-1/fota"))
        .bearer_auth(&t.operator)
        .json(&json!({"name": "guarded", "protocolType": "HTTP"}))
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["fotaId"]
        .as_str()
        .unwrap()
        .to_owned();
    // The device asks for its work without a token and gets the URI with the capability.
    let work: Value = client()
        .get(srv.url("/v1/devices/dev-1/fota"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uri = work["packageUri"].as_str().unwrap().to_owned();
    let r = client()
        .get(&uri)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap(), data[100..200]);
    for path in [
        format!("/p/{id}"),
        format!("/p/{id}/AAAAAAAAAAAAAAAAAAAAAA"),
        format!("/p/{id}/x"),
    ] {
        let (s, body) = send(&srv, Method::GET, &path, None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(body.unwrap()["error"]["code"], "package-token-invalid");
    }
    // By name: a reader token over HTTP, refused over CoAP.
    let (s, _) = send(&srv, Method::GET, "/fw/guarded", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = send(&srv, Method::GET, "/fw/guarded", Some(&t.reader), None).await;
    assert_eq!(s, StatusCode::OK);
    let mut c = connect(&srv, 1152, false).await;
    c.send(&get(b"n", "fw/guarded")).await.unwrap();
    assert_eq!(recv(&mut c).await.code, fwrepo::coap::msg::code(4, 1));
    let coap_uri = format!("p/{id}/{}", uri.rsplit('/').next().unwrap());
    c.send(&get(b"p", &coap_uri)).await.unwrap();
    assert_eq!(recv(&mut c).await.code, codes::CONTENT);
    c.send(&get(b"q", &format!("p/{id}"))).await.unwrap();
    assert_eq!(recv(&mut c).await.code, fwrepo::coap::msg::code(4, 1));
    // The capability ends with the task.
    let r = client()
        .post(srv.url(&format!("/v1/fota/{id}/cancel")))
        .bearer_auth(&t.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client().get(&uri).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_downloads_with_ranges_and_plain_http_off() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(dir.path());
    let sets = [
        "http.listen=".to_owned(),
        "https.listen=127.0.0.1:0".to_owned(),
        format!("https.cert={}", cert.display()),
        format!("https.key={}", key.display()),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let running = fwrepo::server::start(
        &config(dir.path(), &sets),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("starts with HTTPS only");
    assert!(running.http_addr.is_none());
    let base = format!("https://{}", running.https_addr.unwrap());
    let pem = std::fs::read(&cert).unwrap();
    let tls = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .build()
        .unwrap();
    let data = image(300_000, 4);
    let r = tls
        .put(format!("{base}/v1/firmware/secure.bin"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let record: Value = r.json().await.unwrap();
    let uri = record["uris"]["https"].as_str().unwrap().to_owned();
    assert_eq!(uri, format!("{base}/fw/secure.bin"));
    assert!(record["uris"].get("http").is_none(), "{record}");
    let r = tls
        .get(&uri)
        .header("range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap(), data[1000..]);
    // HTTPS is now a transport tasks can use.
    let r = tls
        .post(format!("{base}/v1/devices/tls-dev/fota"))
        .json(&json!({"name": "secure.bin", "protocolType": "https"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let work: Value = tls
        .get(format!("{base}/v1/devices/tls-dev/fota"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(work["packageUri"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{base}/p/")));

    // curl, resuming a download the way a device on a flaky link would.
    if have_tool("curl") {
        let out = dir.path().join("part.bin");
        std::fs::write(&out, &data[..123_456]).unwrap();
        let done = tokio::process::Command::new(tool("curl").unwrap())
            .args(["-sSf", "--cacert"])
            .arg(&cert)
            .args(["-C", "-", "-o"])
            .arg(&out)
            .arg(&uri)
            .output()
            .await
            .unwrap();
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        assert_eq!(sha256_hex(&std::fs::read(&out).unwrap()), sha256_hex(&data));
    }
    running.shutdown();
    running.wait().await;
}
