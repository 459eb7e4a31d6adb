//! Test harness: a real fwrepo on 127.0.0.1 with an ephemeral port, in-process or as the
//! built binary, over a temporary data directory.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fwrepo::config::Config;
use fwrepo::server::{self, Running};
use tokio_util::sync::CancellationToken;

/// Probes every 25 ms, for up to 20 s, until `done` holds of the result; returns the last
/// result, for the caller to assert on.
pub async fn poll<T>(mut probe: impl AsyncFnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = probe().await;
        if done(&got) || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An in-process server.
pub struct TestServer {
    pub base: String,
    pub coap_tcp: Option<std::net::SocketAddr>,
    pub coap_udp: Option<std::net::SocketAddr>,
    pub coap_tls: Option<std::net::SocketAddr>,
    pub coap_dtls: Option<std::net::SocketAddr>,
    pub root: PathBuf,
    running: Option<Running>,
}

pub fn config(root: &Path, sets: &[&str]) -> Config {
    let mut all = vec![
        format!("storage.root={}", root.join("storage").display()),
        format!("keys.dir={}", root.join("keys").display()),
        "http.listen=127.0.0.1:0".to_owned(),
        "coap.tcp_listen=127.0.0.1:0".to_owned(),
        "coap.udp_listen=127.0.0.1:0".to_owned(),
        "coap.tls_listen=127.0.0.1:0".to_owned(),
        "coap.dtls_listen=127.0.0.1:0".to_owned(),
        "http.shutdown_grace=5s".to_owned(),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    Config::load(None, Vec::new(), &all).expect("test config")
}

impl TestServer {
    pub async fn start(root: &Path, sets: &[&str]) -> TestServer {
        let clock = std::sync::Arc::new(fwrepo::fota::SystemClock);
        TestServer::start_with_clock(root, sets, clock).await
    }

    /// A server whose FOTA engine runs on `clock`.
    pub async fn start_with_clock(
        root: &Path,
        sets: &[&str],
        clock: std::sync::Arc<dyn fwrepo::fota::Clock>,
    ) -> TestServer {
        let running =
            server::start_with_clock(&config(root, sets), CancellationToken::new(), clock)
                .await
                .expect("server starts");
        TestServer {
            base: format!("http://{}", running.http_addr.expect("HTTP on")),
            coap_tcp: running.coap_tcp_addr,
            coap_udp: running.coap_udp_addr,
            coap_tls: running.coap_tls_addr,
            coap_dtls: running.coap_dtls_addr,
            root: root.to_owned(),
            running: Some(running),
        }
    }

    /// PUT `body` at `path` with the shared client.
    pub async fn put(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        client()
            .put(self.url(path))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// POST a JSON `body` at `path` with the shared client.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        client()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// GET `path` with the shared client.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        client().get(self.url(path)).send().await.unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn stop(mut self) {
        let running = self.running.take().expect("running");
        running.shutdown();
        running.wait().await;
    }

    /// Files under the blob store (published objects and staged uploads).
    pub fn blob_files(&self) -> Vec<PathBuf> {
        blob_files(&self.root)
    }
}

pub fn blob_files(root: &Path) -> Vec<PathBuf> {
    files_under(&root.join("storage/blobs"))
}

/// Every file under `dir`, at any depth.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// The fwrepo binary running as a child process; killed on drop.
pub struct ServerProcess {
    pub child: Child,
    pub base: String,
}

impl ServerProcess {
    pub fn start(root: &Path, sets: &[&str]) -> ServerProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fwrepo"));
        cmd.arg("serve")
            .arg("--storage")
            .arg(root.join("storage"))
            .arg("--keys")
            .arg(root.join("keys"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args([
                "--set",
                "coap.tcp_listen=127.0.0.1:0",
                "--set",
                "coap.udp_listen=127.0.0.1:0",
                "--set",
                "coap.dtls_listen=127.0.0.1:0",
            ])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        let mut child = cmd.spawn().expect("spawn fwrepo");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(i) = line.find("http_addr=") {
                        let addr = line[i + 10..].split_whitespace().next().unwrap().to_owned();
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("fwrepo announced its address");
        ServerProcess {
            child,
            base: format!("http://{addr}"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends a request that must succeed at the transport level and answer JSON.
pub trait Fetch {
    async fn value(self) -> serde_json::Value;
}

impl Fetch for reqwest::RequestBuilder {
    async fn value(self) -> serde_json::Value {
        self.send().await.unwrap().json().await.unwrap()
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn image(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ seed as u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Where a peer tool is: on PATH, or in the project's `.venv` that scripts/test fills.
pub fn tool(name: &str) -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/bin")
        .join(name);
    if venv.is_file() {
        return Some(venv);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Whether a tool is available; under CI a missing tool is a failure, locally a loud skip.
pub fn have_tool(name: &str) -> bool {
    let found = tool(name).is_some();
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{name} is required under CI=true but is not installed");
        }
        eprintln!("SKIPPED: {name} is not installed; install it to run this test");
    }
    found
}

/// A self-signed P-256 certificate for 127.0.0.1 and localhost, made with openssl in `dir`:
/// (certificate, key) PEM paths. An end-entity certificate (CA:FALSE), as rustls clients
/// require of the certificate a server presents.
pub fn test_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A new, empty database on the PostgreSQL that scripts/test starts (`TEST_POSTGRES_URL`);
/// `None` (a loud skip) without one, a failure under CI.
pub async fn fresh_postgres() -> Option<String> {
    let Ok(admin) = std::env::var("TEST_POSTGRES_URL") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("TEST_POSTGRES_URL is required under CI=true (scripts/test sets it)");
        }
        eprintln!("SKIPPED: TEST_POSTGRES_URL is not set; scripts/test starts PostgreSQL");
        return None;
    };
    let (db, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("the test PostgreSQL answers");
    tokio::spawn(conn);
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).unwrap();
    let name = format!("it_{}", hex::encode(id));
    db.batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    Some(format!("{}/{name}", admin.rsplit_once('/').unwrap().0))
}

/// The next `n` events of a server-sent event stream, as JSON (lines split across chunks are
/// put back together); each must come within 10 s.
pub async fn sse_events(stream: &mut reqwest::Response, n: usize) -> Vec<serde_json::Value> {
    let (mut events, mut pending) = (Vec::new(), String::new());
    while events.len() < n {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), stream.chunk())
            .await
            .expect("events arrive")
            .unwrap()
            .expect("the stream stays open");
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                events.push(serde_json::from_str(data.trim()).unwrap());
            }
        }
    }
    events
}

/// Set in a test re-run inside a loopback-only network namespace.
pub const IN_NETNS: &str = "FWREPO_TEST_IN_NETNS";

/// Runs the ignored test `name` of this binary again inside a new network namespace that has
/// only loopback (`unshare -n`), for tests that could send packets off the machine if the code
/// were wrong (import URLs, a fuzzer's requests). Returns its output once it passed.
pub fn run_in_loopback_namespace(name: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let script = r#"ip link set lo up && exec "$0" --exact "$1" --ignored --nocapture"#;
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", script])
        .arg(&exe)
        .arg(name)
        .env(IN_NETNS, "1")
        .output()
        .expect("unshare (util-linux) runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The inner test ran (libtest says so); a filter that matched nothing would pass too.
    assert!(stdout.contains("1 passed"), "{stdout}\n{stderr}");
    format!("{stdout}{stderr}")
}

/// Asserts this process is the re-run inside a loopback-only namespace.
pub fn assert_in_loopback_namespace() {
    assert_eq!(
        std::env::var(IN_NETNS).as_deref(),
        Ok("1"),
        "only inside the namespace"
    );
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    let only_lo = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .all(|name| name.trim() == "lo");
    assert!(only_lo, "the namespace must hold loopback only: {dev}");
}
