//! A real headless Chromium driven through W3C WebDriver (Debian's `chromium` and
//! `chromium-driver`). The protocol is JSON over HTTP; the few commands the console's tests
//! use are written here over reqwest rather than adding a WebDriver crate and its tree.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use base64::Engine as _;
use serde_json::{json, Value};

use super::common::{client, poll, tool};

/// The W3C identifier of an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver and one browser session; both end on drop.
pub struct Browser {
    driver: Child,
    /// chromedriver's log, kept when the test fails.
    log: PathBuf,
    base: String,
    session: String,
    http: reqwest::Client,
}

/// An element found on the page.
#[derive(Clone)]
pub struct Element(String);

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Where screenshots and chromedriver's logs go: `target/tmp/console/`.
pub fn log_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Browser {
    /// Starts chromedriver on a free port and a headless browser with a `width`×`height` window.
    pub async fn start(width: u32, height: u32) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = log_dir().join(format!("chromedriver-{port}.log"));
        let driver = Command::new(tool("chromedriver").expect("chromedriver"))
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so the browsers it starts go with it.
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = client();
        let ready = poll(
            async || {
                let r = http.get(format!("{base}/status")).send().await.ok()?;
                r.json::<Value>().await.ok()
            },
            |v| v.as_ref().is_some_and(|v| v["value"]["ready"] == true),
        )
        .await;
        assert!(ready.is_some(), "chromedriver did not become ready");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium().unwrap(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", format!("--window-size={width},{height}")],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
            "unhandledPromptBehavior": "ignore",
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {r}"))
            .to_owned();
        Browser {
            driver,
            log,
            base,
            session,
            http,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        // A command that hangs fails the test instead of holding it until nextest's timeout.
        let mut req = self
            .http
            .request(method, url)
            .timeout(std::time::Duration::from_secs(60));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        v["value"].clone()
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let v = self.call(reqwest::Method::POST, path, Some(body)).await;
        assert!(v.get("error").is_none(), "WebDriver {path} failed: {v}");
        v
    }

    pub async fn goto(&self, url: &str) {
        self.command("/url", json!({ "url": url })).await;
    }

    pub async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn run(&self, script: &str, args: Value) -> Value {
        self.command("/execute/sync", json!({"script": script, "args": args}))
            .await
    }

    /// The first element matching `css`, if there is one now.
    pub async fn find_now(&self, css: &str) -> Option<Element> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().map(|id| Element(id.to_owned()))
    }

    /// Waits for an element matching `css` to be on the page.
    pub async fn find(&self, css: &str) -> Element {
        let found = poll(async || self.find_now(css).await, Option::is_some).await;
        match found {
            Some(e) => e,
            None => panic!(
                "no element {css} on {}; the page: {}; the browser's console: {:#?}",
                self.url().await,
                self.run("return document.body.outerHTML", json!([])).await,
                self.console().await
            ),
        }
    }

    /// Waits until `script` (returning a value) gives something for which `done` holds.
    pub async fn wait_for(&self, script: &str, done: impl Fn(&Value) -> bool) -> Value {
        let got = poll(async || self.run(script, json!([])).await, &done).await;
        assert!(done(&got), "still {got} from `{script}`");
        got
    }

    /// The text of the first element matching `css` (waits for it).
    pub async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.element_text(&e).await
    }

    pub async fn element_text(&self, e: &Element) -> String {
        self.call(
            reqwest::Method::GET,
            &format!("/element/{}/text", e.0),
            None,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.command(&format!("/element/{}/click", e.0), json!({}))
            .await;
    }

    /// Types `text` into the field matching `css` (a file input takes a path).
    /// Empties the field matching `css` once it is on the page (W3C Element Clear).
    pub async fn clear(&self, css: &str) {
        let e = self.find(css).await;
        self.command(&format!("/element/{}/clear", e.0), json!({}))
            .await;
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.command(&format!("/element/{}/value", e.0), json!({ "text": text }))
            .await;
    }

    /// Chooses the option `value` of the select matching `css`.
    pub async fn select(&self, css: &str, value: &str) {
        self.run(
            "const s = document.querySelector(arguments[0]); s.value = arguments[1]; \
             s.dispatchEvent(new Event('change', {bubbles: true}));",
            json!([css, value]),
        )
        .await;
    }

    /// Accepts the confirm dialog that is open (waits for it).
    pub async fn accept_dialog(&self) {
        let accepted = poll(
            async || {
                let v = self
                    .call(reqwest::Method::POST, "/alert/accept", Some(json!({})))
                    .await;
                v.get("error").is_none()
            },
            |ok| *ok,
        )
        .await;
        assert!(accepted, "no dialog to accept");
    }

    /// The browser's cookies, HttpOnly ones included (the driver sees them; pages do not).
    pub async fn cookies(&self) -> Vec<Value> {
        self.call(reqwest::Method::GET, "/cookie", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Saves a PNG of the window under the test build's temporary directory.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("screenshot"))
            .unwrap();
        let path = log_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// The browser console's entries since the last call.
    pub async fn console(&self) -> Vec<Value> {
        self.call(
            reqwest::Method::POST,
            "/se/log",
            Some(json!({"type": "browser"})),
        )
        .await
        .as_array()
        .cloned()
        .unwrap_or_default()
    }

    /// Fails on any error the browser's console shows (scripts, CSP, failed requests).
    pub async fn assert_no_console_errors(&self) {
        let errors: Vec<Value> = self
            .console()
            .await
            .into_iter()
            .filter(|e| e["level"] == "SEVERE")
            .collect();
        assert!(errors.is_empty(), "browser console errors: {errors:#?}");
    }

    pub async fn quit(self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = self.http.delete(url).send().await;
    }
}

impl Drop for Browser {
    /// chromedriver and every browser process it started (a failed test included). Its log
    /// stays only when the test failed: a log per passing run would pile up.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
