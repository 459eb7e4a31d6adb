//! The web console in a real headless Chromium (WebDriver): signing in, uploading through the
//! form, scheduling and following an update while a simulated device downloads and reports,
//! cancelling, and a role refused its buttons (and the server refusing the forged request).
//! Each test saves a screenshot and fails on any browser console error. Without a browser,
//! the session cookie's rules are checked over plain HTTP too.

use std::path::Path;

use fwrepo::auth::{Role, TokenStore};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{client, have_tool, image, sha256_hex, Fetch, TestServer};
use crate::webdriver::Browser;

async fn token(root: &Path, name: &str, role: Role) -> String {
    TokenStore::file(&root.join("storage/tokens.json"))
        .create(name, role)
        .await
        .unwrap()
        .token
}

/// A server with tokens (so the console asks to sign in) and its admin token.
async fn server(root: &Path) -> (TestServer, String) {
    let admin = token(root, "root", Role::Admin).await;
    (TestServer::start(root, &[]).await, admin)
}

fn browser_here() -> bool {
    have_tool("chromedriver") && have_tool("chromium")
}

/// Stores an image with the admin token, through the API (what the test is about is elsewhere).
async fn publish(srv: &TestServer, admin: &str, path: &str, body: impl Into<reqwest::Body>) {
    let r = client()
        .put(srv.url(path))
        .bearer_auth(admin)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{path}");
}

/// Opens the console and signs in with `token` through the form.
async fn sign_in(b: &Browser, srv: &TestServer, token: &str) {
    b.goto(&srv.url("/ui/")).await;
    b.find("#signin").await;
    b.type_into("#token", token).await;
    b.click("#signin button[type=submit]").await;
    b.find("#firmware").await;
}

#[tokio::test]
async fn console_signs_in_and_uploads_through_the_form() {
    if !browser_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, admin) = server(dir.path()).await;
    let b = Browser::start(1280, 900).await;

    // Signed out, every page leads to the sign-in form; a wrong token is told so.
    b.goto(&srv.url("/ui/#/firmware")).await;
    b.find("#signin").await;
    b.type_into("#token", "fwr_not-a-token").await;
    b.click("#signin button[type=submit]").await;
    let refused = b.text("#signin [role=alert]").await;
    assert!(refused.contains("not valid"), "{refused}");
    b.screenshot("console-signin").await;
    // The console asked /ui/session and was refused a sign-in: the browser logged the 401.
    b.console().await;

    // With the keyboard: the field has focus, Enter submits.
    b.goto(&srv.url("/ui/")).await;
    b.find("#signin").await;
    assert_eq!(
        b.run("return document.activeElement.id", json!([])).await,
        "token"
    );
    b.type_into("#token", &format!("{admin}\u{E007}")).await;
    b.find("#firmware").await;
    assert!(b.text("#who").await.contains("root (admin)"));
    // The cookie: HttpOnly, SameSite=Strict, expiring; the page cannot read it.
    let cookies = b.cookies().await;
    let session = cookies
        .iter()
        .find(|c| c["name"] == "fwrepo_session")
        .unwrap();
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["sameSite"], "Strict");
    assert!(session["expiry"].as_u64().is_some());
    assert_eq!(b.run("return document.cookie", json!([])).await, "");

    // Upload a file through the form, with a version and a description.
    let data = image(300_000, 7);
    let file = dir.path().join("app-v2.bin");
    std::fs::write(&file, &data).unwrap();
    b.click("nav a[href='#/upload']").await;
    b.type_into("#file", file.to_str().unwrap()).await;
    b.clear("#name").await;
    b.type_into("#name", "acme.com-console1").await;
    b.type_into("#version", "2.0.0").await;
    b.type_into("#description", "from the browser").await;
    b.type_into("#retention", "30d").await;
    b.click("#upload button[type=submit]").await;
    // The record's page shows the digest the server computed: the file's own.
    assert_eq!(b.text("#sha256").await, sha256_hex(&data));
    let record = client()
        .get(srv.url("/v1/firmware/acme.com-console1"))
        .bearer_auth(&admin)
        .value()
        .await;
    assert_eq!(record["version"], "2.0.0");
    assert_eq!(record["description"], "from the browser");
    assert_eq!(
        b.text("#signature").await,
        record["signature"]["value"].as_str().unwrap()
    );
    b.screenshot("console-firmware-detail").await;

    // And in the list, found by its prefix, with its version.
    b.click("nav a[href='#/firmware']").await;
    b.type_into("#prefix", "acme.com-cons").await;
    let row = b
        .wait_for(
            "return [...document.querySelectorAll('#firmware tbody tr')].map(r => r.innerText)",
            |v| v.as_array().is_some_and(|rows| rows.len() == 1),
        )
        .await;
    let row = row[0].as_str().unwrap();
    assert!(
        row.contains("acme.com-console1") && row.contains("2.0.0"),
        "{row}"
    );
    b.screenshot("console-firmware").await;

    // An MCUboot image: built and signed here with the options of the form.
    b.click("nav a[href='#/upload']").await;
    b.type_into("#file", file.to_str().unwrap()).await;
    b.clear("#name").await;
    b.type_into("#name", "acme.com-console-mcuboot").await;
    b.type_into("#version", "1.2.3+42").await;
    b.select("#format", "mcuboot").await;
    b.type_into("#securityCounter", "auto").await;
    b.click("#upload button[type=submit]").await;
    b.find("#sha256").await;
    let built = client()
        .get(srv.url("/v1/firmware/acme.com-console-mcuboot"))
        .bearer_auth(&admin)
        .value()
        .await;
    assert_eq!(built["format"], "mcuboot", "{built}");
    assert_eq!(built["mcuboot"]["version"], "1.2.3+42");
    assert!(b.text("#main").await.contains("MCUboot"));
    b.click("nav a[href='#/firmware']").await;

    // Change the description on the record's page, then delete it after confirming.
    b.click("#firmware a[href='#/firmware/acme.com-console1']")
        .await;
    b.clear("#description").await;
    b.type_into("#description", "tested on the bench").await;
    b.click("#change button[type=submit]").await;
    // The page is drawn again from the stored record once the change is answered; the
    // input's own value says nothing about that (it held the typed text at once).
    b.wait_for(
        "return [...document.querySelectorAll('dl.facts dt')].filter(t => t.innerText === 'Description').map(t => t.nextElementSibling.innerText)[0] || null",
        |v| v == "tested on the bench",
    )
    .await;
    let record = client()
        .get(srv.url("/v1/firmware/acme.com-console1"))
        .bearer_auth(&admin)
        .value()
        .await;
    assert_eq!(record["description"], "tested on the bench");
    b.click("#delete").await;
    b.accept_dialog().await;
    b.find("#firmware").await;
    let r = client()
        .get(srv.url("/v1/firmware/acme.com-console1"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    b.assert_no_console_errors().await;

    // Signing out clears the session: the API refuses the old cookie's absence.
    b.click("#signout").await;
    b.find("#signin").await;
    assert!(b
        .cookies()
        .await
        .iter()
        .all(|c| c["name"] != "fwrepo_session"));
    b.quit().await;
    srv.stop().await;
}

/// Reads an element's progress value and the status badge of the task page.
const TASK_STATE: &str = "const p = document.querySelector('#main progress'); \
    const s = document.querySelector('#task-status [data-status]'); \
    const h = [...document.querySelectorAll('#history [data-status]')].map(e => e.dataset.status); \
    return {value: p ? p.value : null, max: p ? p.max : null, status: s ? s.dataset.status : null, history: h}";

#[tokio::test]
async fn console_schedules_an_update_and_follows_the_device() {
    if !browser_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, admin) = server(dir.path()).await;
    let data = image(1 << 20, 3);
    publish(&srv, &admin, "/v1/firmware/acme.com-fleet2", data.clone()).await;
    let b = Browser::start(1280, 900).await;
    sign_in(&b, &srv, &admin).await;

    // Schedule through the form, over HTTP, with options from the seed payload.
    b.click("nav a[href='#/updates']").await;
    b.click("#schedule-link").await;
    b.type_into("#deviceId", "dev-7").await;
    b.type_into("#fw-name", "acme.com-fleet2").await;
    b.select("#protocolType", "HTTP").await;
    b.select("#upgradeStrategy", "SendBased").await;
    b.type_into("#timeout", "30m").await;
    b.type_into("#task-description", "console test").await;
    b.click("#resumeAfterDownlinkFailure").await;
    b.click("#schedule-form button[type=submit]").await;
    b.find("#history").await;
    let tasks = client()
        .get(srv.url("/v1/fota?deviceId=dev-7"))
        .bearer_auth(&admin)
        .value()
        .await;
    let task = &tasks["tasks"][0];
    let id = task["fotaId"].as_str().unwrap().to_owned();
    assert_eq!(task["options"]["upgradeStrategy"], "SendBased");
    assert_eq!(task["options"]["resumeAfterDownlinkFailure"], true);
    assert_eq!(task["options"]["description"], "console test");
    assert!(b.url().await.ends_with(&format!("#/updates/{id}")));
    b.wait_for(TASK_STATE, |v| v["status"] == "pending").await;

    // The device asks for work, reports downloading and fetches half of the image.
    let work = client()
        .get(srv.url("/v1/devices/dev-7/fota"))
        .value()
        .await;
    let uri = work["packageUri"].as_str().unwrap().to_owned();
    let report = async |state: u8, result: u8| {
        let r = client()
            .post(srv.url(&format!("/v1/fota/{id}/report")))
            .json(&json!({"state": state, "result": result}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    };
    report(1, 0).await;
    let half = client()
        .get(&uri)
        .header("range", format!("bytes=0-{}", data.len() / 2 - 1))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(half.len(), data.len() / 2);
    let seen = b
        .wait_for(TASK_STATE, |v| {
            v["status"] == "downloading" && v["value"].as_f64() == Some((data.len() / 2) as f64)
        })
        .await;
    assert_eq!(seen["max"].as_f64(), Some(data.len() as f64));
    b.screenshot("console-task-downloading").await;

    // The list shows the same task and its bar, filtered by device and status.
    b.goto(&srv.url("/ui/#/updates?deviceId=dev-7&status=downloading"))
        .await;
    let row = b
        .wait_for(
            "return [...document.querySelectorAll('#tasks tbody tr')].map(r => [r.dataset.fotaId, r.querySelector('progress').value])",
            |v| v.as_array().is_some_and(|r| r.len() == 1),
        )
        .await;
    assert_eq!(row[0][0], id.as_str());
    assert_eq!(row[0][1].as_f64(), Some((data.len() / 2) as f64));

    // The rest, then downloaded, updating and success: the list row follows the events.
    let rest = client()
        .get(&uri)
        .header("range", format!("bytes={}-", data.len() / 2))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(rest.len(), data.len() - data.len() / 2);
    b.wait_for(
        "return document.querySelector('#tasks tbody progress').value",
        |v| v.as_f64() == Some(data.len() as f64),
    )
    .await;
    report(2, 0).await;
    report(3, 0).await;
    report(0, 1).await;
    b.wait_for(
        "return document.querySelector('#tasks tbody [data-status]').dataset.status",
        |v| v == "succeeded",
    )
    .await;
    b.screenshot("console-updates").await;

    // The task's page draws the whole history as a timeline.
    b.click(&format!("#tasks a[href='#/updates/{id}']")).await;
    let page = b.wait_for(TASK_STATE, |v| v["status"] == "succeeded").await;
    let history: Vec<&str> = page["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for step in [
        "pending",
        "delivering",
        "downloading",
        "downloaded",
        "updating",
        "succeeded",
    ] {
        assert!(history.contains(&step), "{step} missing from {history:?}");
    }
    assert!(
        b.find_now("[data-cancel]").await.is_none(),
        "a finished task has no cancel"
    );
    b.screenshot("console-task").await;
    // An admin makes a token; it is shown once and works.
    b.goto(&srv.url("/ui/#/tokens")).await;
    b.type_into("#token-name", "ci-bot").await;
    b.select("#token-role", "publisher").await;
    b.click("#token-form button[type=submit]").await;
    let made = b.text("#new-token").await;
    assert!(made.starts_with("fwr_"), "{made}");
    let r = client()
        .get(srv.url("/v1/firmware"))
        .bearer_auth(&made)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(b.text("#tokens").await.contains("ci-bot"));
    b.assert_no_console_errors().await;
    b.quit().await;
    srv.stop().await;
}

#[tokio::test]
async fn console_health_charts_downloads_and_bytes_from_the_counters() {
    if !browser_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, admin) = server(dir.path()).await;
    let data = image(100_000, 5);
    publish(&srv, &admin, "/v1/firmware/fw-h", data.clone()).await;
    let b = Browser::start(1280, 900).await;
    sign_in(&b, &srv, &admin).await;
    b.goto(&srv.url("/ui/#/health")).await;
    assert_eq!(b.text("#fig-downloads strong").await, "0");
    for _ in 0..3 {
        let got = client()
            .get(srv.url("/fw/fw-h"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(got.len(), data.len());
    }
    // The next samples count the downloads and draw them.
    let seen = b
        .wait_for(
            "return {downloads: document.querySelector('#fig-downloads strong').textContent, \
                     bytes: document.querySelector('#fig-bytes strong').textContent, \
                     line: !!document.querySelector('#downloads-chart path'), \
                     peak: document.querySelector('#downloads-chart text').textContent}",
            |v| v["downloads"] == "3" && v["line"] == true,
        )
        .await;
    assert_eq!(seen["bytes"], "293.0 KiB", "3 × 100,000 bytes");
    assert_eq!(seen["peak"], "downloads, peak 3");
    b.screenshot("console-health").await;
    b.assert_no_console_errors().await;
    b.quit().await;
    srv.stop().await;
}

#[tokio::test]
async fn console_cancels_a_task() {
    if !browser_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, admin) = server(dir.path()).await;
    publish(&srv, &admin, "/v1/firmware/fw-c", image(4096, 1)).await;
    let made = client()
        .post(srv.url("/v1/devices/dev-c/fota"))
        .bearer_auth(&admin)
        .json(&json!({"name": "fw-c", "protocolType": "HTTP"}))
        .value()
        .await;
    let id = made["fotaId"].as_str().unwrap().to_owned();
    let b = Browser::start(1280, 900).await;
    sign_in(&b, &srv, &admin).await;
    b.click("nav a[href='#/updates']").await;
    b.click(&format!("[data-cancel='{id}']")).await;
    b.accept_dialog().await;
    b.wait_for(
        "return document.querySelector('#tasks tbody [data-status]').dataset.status",
        |v| v == "cancelled",
    )
    .await;
    let task = client()
        .get(srv.url(&format!("/v1/fota/{id}")))
        .bearer_auth(&admin)
        .value()
        .await;
    assert_eq!(task["status"], "cancelled");
    b.screenshot("console-cancelled").await;
    b.assert_no_console_errors().await;
    b.quit().await;
    srv.stop().await;
}

#[tokio::test]
async fn console_refuses_a_reader_its_buttons_and_the_server_refuses_forgeries() {
    if !browser_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reader = token(dir.path(), "dashboard", Role::Reader).await;
    let (srv, admin) = server(dir.path()).await;
    publish(&srv, &admin, "/v1/firmware/fw-r", image(4096, 2)).await;
    client()
        .post(srv.url("/v1/devices/dev-r/fota"))
        .bearer_auth(&admin)
        .json(&json!({"name": "fw-r", "protocolType": "HTTP"}))
        .value()
        .await;
    // A narrow window: the console still works at phone width.
    let b = Browser::start(400, 800).await;
    sign_in(&b, &srv, &reader).await;
    let visible = "return [...document.querySelectorAll('nav a')].filter(a => !a.hidden).map(a => a.getAttribute('href'))";
    assert_eq!(
        b.run(visible, json!([])).await,
        json!([
            "#/firmware",
            "#/updates",
            "#/devices",
            "#/groups",
            "#/campaigns",
            "#/schedules",
            "#/health"
        ]),
        "no Upload and no Tokens for a reader"
    );
    b.click("#firmware a[href='#/firmware/fw-r']").await;
    b.find("#sha256").await;
    assert!(
        b.find_now("#change").await.is_none(),
        "a reader may not change"
    );
    assert!(
        b.find_now("#delete").await.is_none(),
        "a reader may not delete"
    );
    b.screenshot("console-reader-firmware").await;
    b.click("nav a[href='#/updates']").await;
    b.find("#tasks tbody tr").await;
    assert!(b.find_now("#schedule-link").await.is_none());
    assert!(b.find_now("[data-cancel]").await.is_none());
    // A campaign's dashboard: the figures, and no actions.
    let c = client()
        .post(srv.url("/v1/campaigns"))
        .bearer_auth(&admin)
        .json(&json!({"firmware": "fw-r", "target": {"devices": ["dev-r2"]}}))
        .value()
        .await;
    let campaign = c["campaignId"].as_str().unwrap().to_owned();
    b.goto(&srv.url(&format!("/ui/#/campaigns/{campaign}")))
        .await;
    b.find("#campaign-chart svg").await;
    b.find("h1 [data-state=draft]").await;
    assert!(b
        .find_now("#campaign-actions [data-action]")
        .await
        .is_none());
    assert!(b.find_now("#new-campaign").await.is_none());
    b.assert_no_console_errors().await;

    // The same requests forged with the reader's session: the server refuses them.
    let cookie = b
        .cookies()
        .await
        .into_iter()
        .find(|c| c["name"] == "fwrepo_session")
        .unwrap();
    let jar = format!("fwrepo_session={}", cookie["value"].as_str().unwrap());
    let whoami = client()
        .get(srv.url("/ui/session"))
        .header("cookie", &jar)
        .value()
        .await;
    assert_eq!(whoami["role"], "reader");
    let csrf = whoami["csrf"].as_str().unwrap();
    let r = client()
        .delete(srv.url("/v1/firmware/fw-r"))
        .header("cookie", &jar)
        .header("x-fwrepo-csrf", csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "forbidden"
    );
    b.quit().await;
    srv.stop().await;
}

/// The session's rules over plain HTTP: the cookie's attributes, CSRF on changes, sign-out,
/// a forged or revoked session, and the console's headers.
#[tokio::test]
async fn console_sessions_need_csrf_and_end_with_their_token() {
    let dir = tempfile::tempdir().unwrap();
    let publisher = token(dir.path(), "ci", Role::Publisher).await;
    let (srv, admin) = server(dir.path()).await;

    let r = client()
        .post(srv.url("/ui/session"))
        .json(&json!({"token": "fwr_wrong"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("set-cookie").is_none());

    let r = client()
        .post(srv.url("/ui/session"))
        .json(&json!({ "token": publisher }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(set.contains(attr), "{attr} missing: {set}");
    }
    assert!(
        !set.contains("Secure"),
        "plain HTTP: a Secure cookie would not come back"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["role"], "publisher");
    let csrf = body["csrf"].as_str().unwrap().to_owned();
    let jar = set.split(';').next().unwrap().to_owned();

    // Reads need only the cookie; changes need the CSRF value as well.
    let r = client()
        .get(srv.url("/v1/firmware"))
        .header("cookie", &jar)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let put = async |csrf: Option<&str>, name: &str| {
        let mut req = client()
            .put(srv.url(&format!("/v1/firmware/{name}")))
            .header("cookie", &jar);
        if let Some(c) = csrf {
            req = req.header("x-fwrepo-csrf", c);
        }
        req.body(image(512, 9)).send().await.unwrap()
    };
    for (sent, name) in [(None, "fw-x"), (Some("forged"), "fw-y")] {
        let r = put(sent, name).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"]["code"],
            "csrf-check-failed"
        );
    }
    let stored = client()
        .get(srv.url("/v1/firmware"))
        .bearer_auth(&admin)
        .value()
        .await;
    assert_eq!(
        stored["items"],
        json!([]),
        "nothing stored by a refused change"
    );
    assert_eq!(put(Some(&csrf), "fw-z").await.status(), StatusCode::CREATED);
    // The role still rules: a publisher's session may not delete.
    let r = client()
        .delete(srv.url("/v1/firmware/fw-z"))
        .header("cookie", &jar)
        .header("x-fwrepo-csrf", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // A cookie with another expiry or token id is not genuine.
    let value = jar.trim_start_matches("fwrepo_session=");
    let (body_part, mac) = value.rsplit_once('.').unwrap();
    let (id, _) = body_part.split_once('.').unwrap();
    let forged = format!("fwrepo_session={id}.99999999999.{mac}");
    let r = client()
        .get(srv.url("/v1/firmware"))
        .header("cookie", &forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Sign-out clears the cookie; revoking the token ends its sessions at once.
    let r = client()
        .delete(srv.url("/ui/session"))
        .header("cookie", &jar)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let r = client()
        .delete(srv.url("/v1/tokens/ci"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = client()
        .get(srv.url("/v1/firmware"))
        .header("cookie", &jar)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let who = client()
        .get(srv.url("/ui/session"))
        .header("cookie", &jar)
        .value()
        .await;
    assert_eq!(who["signedIn"], false);

    // The console's files: a strict policy, no framing, revalidated by ETag.
    let r = client().get(srv.url("/ui/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let etag = r.headers()["etag"].clone();
    let r = client()
        .get(srv.url("/ui/"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = client()
        .get(srv.url("/ui/nothing.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = client().get(srv.url("/ui")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "followed to /ui/");
    srv.stop().await;
}

/// Open loopback mode (no tokens): the console needs no sign-in.
#[tokio::test]
async fn console_runs_open_on_loopback_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let who = client().get(srv.url("/ui/session")).value().await;
    assert_eq!(who["open"], true);
    assert_eq!(who["role"], "admin");
    let r = client().get(srv.url("/v1/firmware")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    if browser_here() {
        let b = Browser::start(1280, 900).await;
        b.goto(&srv.url("/ui/")).await;
        b.find("#firmware").await;
        assert!(b.text("#who").await.contains("open mode"));
        assert!(b.find_now("#signin").await.is_none());
        assert!(b.find_now("#signout:not([hidden])").await.is_none());
        b.assert_no_console_errors().await;
        b.quit().await;
    }
    srv.stop().await;
}

/// Under HTTPS the session cookie is Secure.
#[tokio::test]
async fn console_cookie_is_secure_under_https() {
    let dir = tempfile::tempdir().unwrap();
    let admin = token(dir.path(), "root", Role::Admin).await;
    let (cert, key) = crate::common::test_certificate(dir.path());
    let sets = [
        "http.listen=".to_owned(),
        "https.listen=127.0.0.1:0".to_owned(),
        format!("https.cert={}", cert.display()),
        format!("https.key={}", key.display()),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let running = fwrepo::server::start(
        &crate::common::config(dir.path(), &sets),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let base = format!("https://{}", running.https_addr.unwrap());
    let tls = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap()])
        .build()
        .unwrap();
    let r = tls
        .post(format!("{base}/ui/session"))
        .json(&json!({ "token": admin }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let set = r.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set.contains("; Secure") && set.contains("HttpOnly"),
        "{set}"
    );
    running.shutdown();
    running.wait().await;
}

/// A thousand tasks: the list loads a page at a time, never all of them.
#[tokio::test]
async fn console_pages_a_thousand_tasks() {
    if !browser_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, admin) = server(dir.path()).await;
    publish(&srv, &admin, "/v1/firmware/fw-many", image(1024, 6)).await;
    let http = client();
    for chunk in (0..1000).collect::<Vec<_>>().chunks(50) {
        let made = chunk.iter().map(|i| {
            http.post(srv.url(&format!("/v1/devices/d-{i:04}/fota")))
                .bearer_auth(&admin)
                .json(&json!({"name": "fw-many", "protocolType": "HTTP"}))
                .send()
        });
        for r in futures_util::future::join_all(made).await {
            assert_eq!(r.unwrap().status(), StatusCode::CREATED);
        }
    }
    let b = Browser::start(1280, 900).await;
    sign_in(&b, &srv, &admin).await;
    b.click("nav a[href='#/updates']").await;
    let rows = "return document.querySelectorAll('#tasks tbody tr').length";
    b.wait_for(rows, |v| v == 100).await;
    b.click("#more").await;
    b.wait_for(rows, |v| v == 200).await;
    // A filter by device finds its one task without loading the rest.
    b.type_into("#device-filter", "d-0999").await;
    b.wait_for(rows, |v| v == 1).await;
    b.screenshot("console-many-tasks").await;
    b.assert_no_console_errors().await;
    b.quit().await;
    srv.stop().await;
}

/// A simulated device over HTTP (the fleet tests' own): takes its task if offered, downloads
/// it and reports success.
async fn device_updates(srv: &TestServer, device: &str) -> bool {
    crate::fleet::device_polls(srv, device, false, "4.0.0").await == crate::fleet::Polled::Updated
}

/// The dashboard's figures: succeeded per the overall bar and per wave, and the state.
const DASHBOARD: &str = "const n = (sel) => [...document.querySelectorAll(sel)].map(r => Number(r.dataset.count)); \
    const s = document.querySelector('h1 [data-state]'); \
    return {state: s ? s.dataset.state : null, \
            succeeded: n('#campaign-chart rect[data-status=succeeded]')[0] || 0, \
            waves: [...document.querySelectorAll('#campaign-waves [data-row]')].map(g => { \
                const r = g.querySelector('rect[data-status=succeeded]'); return r ? Number(r.dataset.count) : 0; }), \
            actions: [...document.querySelectorAll('#campaign-actions [data-action]')].map(b => b.dataset.action)}";

#[tokio::test]
async fn console_campaign_wizard_and_a_dashboard_that_moves_with_the_devices() {
    if !browser_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, admin) = server(dir.path()).await;
    publish(
        &srv,
        &admin,
        "/v1/firmware/acme.com-meter-4?version=4.0.0",
        image(64 << 10, 4),
    )
    .await;
    let devices: Vec<String> = (0..12).map(|i| format!("meter-{i:02}")).collect();
    let b = Browser::start(1280, 900).await;
    sign_in(&b, &srv, &admin).await;

    // The wizard, step by step.
    b.click("nav a[href='#/campaigns']").await;
    b.click("#new-campaign").await;
    b.type_into("#c-name", "meters to 4.0").await;
    b.type_into("#c-firmware", "acme.com-meter-4").await;
    b.select("#c-target-kind", "devices").await;
    b.type_into("#c-target", &devices.join(" ")).await;
    b.click("#c-next").await;
    b.clear("#c-waves").await;
    b.type_into("#c-waves", "4, 100%").await;
    b.click("#c-pause").await;
    b.click("#c-next").await;
    b.type_into("#c-share", "0.5").await;
    b.select("#c-protocol", "HTTP").await;
    b.click("#c-next").await;
    let review: Value = serde_json::from_str(&b.text("#c-review").await).unwrap();
    assert_eq!(
        review["waves"],
        json!([{"count": 4, "pause": true}, {"percent": 100}])
    );
    assert_eq!(review["target"]["devices"].as_array().unwrap().len(), 12);
    b.click("#c-create").await;
    let drawn = b.wait_for(DASHBOARD, |v| v["state"] == "draft").await;
    assert!(drawn["actions"]
        .as_array()
        .unwrap()
        .contains(&json!("start")));
    let id = b.url().await.rsplit('/').next().unwrap().to_owned();

    b.click("[data-action=start]").await;
    b.wait_for(DASHBOARD, |v| v["state"] == "running").await;
    // The first wave's devices update one by one; the chart follows each.
    let mut updated = 0;
    for d in &devices {
        if device_updates(&srv, d).await {
            updated += 1;
            b.wait_for(DASHBOARD, |v| v["succeeded"] == updated).await;
        }
    }
    assert_eq!(updated, 4, "only the first wave is offered work");
    let first = b.wait_for(DASHBOARD, |v| v["waves"][0] == 4).await;
    assert_eq!(first["waves"][1], 0);
    b.screenshot("console-campaign").await;
    // The first wave done, the campaign waits for a person: resume from the dashboard.
    b.wait_for(DASHBOARD, |v| v["state"] == "paused").await;
    b.click("[data-action=resume]").await;
    b.wait_for(DASHBOARD, |v| v["state"] == "running").await;
    // The second wave: every remaining device, until the campaign finishes.
    let status = crate::common::poll(
        async || {
            for d in &devices {
                device_updates(&srv, d).await;
            }
            client()
                .get(srv.url(&format!("/v1/campaigns/{id}")))
                .bearer_auth(&admin)
                .value()
                .await
        },
        |c| c["state"] == "finished",
    )
    .await;
    assert_eq!(status["state"], "finished", "{status}");
    let last = b
        .wait_for(DASHBOARD, |v| {
            v["state"] == "finished" && v["succeeded"] == 12
        })
        .await;
    assert_eq!(last["waves"], json!([4, 8]));
    b.screenshot("console-campaign-finished").await;
    b.assert_no_console_errors().await;
    b.quit().await;
    srv.stop().await;
}

#[tokio::test]
async fn console_every_page_opens_labelled_and_without_errors() {
    if !browser_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, admin) = server(dir.path()).await;
    let r = client()
        .post(srv.url("/v1/devices:import"))
        .bearer_auth(&admin)
        .header("content-type", "application/x-ndjson")
        .body("{\"deviceId\":\"meter-1\",\"tags\":{\"site\":\"berlin\"}}\n{\"deviceId\":\"meter-2\"}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client()
        .put(srv.url("/v1/groups/berlin"))
        .bearer_auth(&admin)
        .json(&json!({"filter": "tag.site == \"berlin\""}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    // A task for the device, which its page lists.
    publish(&srv, &admin, "/v1/firmware/meter-fw-2", image(3000, 7)).await;
    let r = client()
        .post(srv.url("/v1/devices/meter-1/fota"))
        .bearer_auth(&admin)
        .json(&json!({"name": "meter-fw-2"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let fota_id = r.json::<Value>().await.unwrap()["fotaId"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = Browser::start(1280, 900).await;
    sign_in(&b, &srv, &admin).await;
    // Every form control is labelled, on every page.
    const UNLABELLED: &str = "return [...document.querySelectorAll('#main input, #main select, #main textarea')] \
        .filter(el => !(el.id && document.querySelector(`label[for='${el.id}']`)) && !el.getAttribute('aria-label')) \
        .map(el => el.outerHTML)";
    for (page, ready, shot) in [
        ("#/devices", "#devices tbody tr", "devices"),
        ("#/devices/meter-1", "#device-tasks tbody tr", "device"),
        ("#/groups", "#groups tbody tr", "groups"),
        ("#/groups/berlin", "#group-devices tbody tr", "group"),
        ("#/campaigns", "#campaigns", "campaigns"),
        ("#/campaigns/new", "#campaign-form", "campaign-wizard"),
        ("#/schedules", "table.week", "schedules"),
        ("#/health", "#fig-firmware", "health"),
        ("#/tokens", "#tokens tbody tr", "tokens"),
        ("#/upload", "#upload", "upload"),
        ("#/updates/new", "#schedule-form", "schedule"),
    ] {
        b.goto(&srv.url(&format!("/ui/{page}"))).await;
        b.find(ready).await;
        assert_eq!(b.run(UNLABELLED, json!([])).await, json!([]), "{page}");
        b.screenshot(&format!("console-{shot}")).await;
    }
    // The device's page lists its task, linked to the task's page.
    b.goto(&srv.url("/ui/#/devices/meter-1")).await;
    let text = b.text("#device-tasks tbody tr").await;
    assert!(
        text.contains("meter-fw-2") && text.contains("pending"),
        "{text}"
    );
    let href = b
        .run(
            "return document.querySelector('#device-tasks tbody tr a').getAttribute('href')",
            json!([]),
        )
        .await;
    assert_eq!(href, json!(format!("#/updates/{fota_id}")));
    assert_eq!(
        b.run(
            "return document.querySelector('#device-no-tasks') === null",
            json!([])
        )
        .await,
        json!(true)
    );
    // A device without tasks says so instead of showing an empty table.
    b.goto(&srv.url("/ui/#/devices/meter-2")).await;
    let none = b.text("#device-no-tasks").await;
    assert!(none.contains("No updates"), "{none}");
    b.screenshot("console-device-no-updates").await;
    // The group resolves its filter to the device; the schedules show their grids.
    // The page renders its table before the resolved devices arrive: wait for them.
    b.goto(&srv.url("/ui/#/groups/berlin")).await;
    b.wait_for(
        "const t = document.querySelector('#group-devices'); return t ? t.innerText : ''",
        |v| v.as_str().is_some_and(|t| t.contains("meter-1")),
    )
    .await;
    // The hash route renders after its fetch: wait for the grid, then count.
    b.goto(&srv.url("/ui/#/schedules")).await;
    b.find("table.week[data-schedule=always]").await;
    b.wait_for(
        "return document.querySelectorAll('table.week[data-schedule=always] td.open').length",
        |v| v == &json!(7 * 24),
    )
    .await;
    b.assert_no_console_errors().await;
    b.quit().await;
    srv.stop().await;
}
