//! `fwrepo push` and `fwrepo pull`, the real binary against a real server: a gigabyte in
//! constant memory, a re-run, a conflict, wrong tokens, a push cut at half by the network
//! and resumed with each byte received once, a pull cut and resumed with a range, and HTTPS
//! with a custom CA.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{image, sha256_hex, test_certificate, TestServer};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the fwrepo binary with `args` against `server`, with `token` as FWREPO_TOKEN.
async fn fwrepo(server: &str, token: Option<&str>, state: &Path, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fwrepo"));
    cmd.args(args)
        .env("FWREPO_SERVER", server)
        .env("XDG_STATE_HOME", state)
        .env_remove("FWREPO_TOKEN");
    if let Some(t) = token {
        cmd.env("FWREPO_TOKEN", t);
    }
    let out = cmd.output().await.unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the fwrepo binary under GNU time: the run and its peak RSS in KiB.
async fn fwrepo_rss(server: &str, state: &Path, args: &[&str]) -> (Run, u64) {
    std::fs::create_dir_all(state).unwrap();
    let report = state.join("rss");
    let out = tokio::process::Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&report)
        .arg(env!("CARGO_BIN_EXE_fwrepo"))
        .args(args)
        .env("FWREPO_SERVER", server)
        .env("XDG_STATE_HOME", state)
        .output()
        .await
        .unwrap();
    let rss = std::fs::read_to_string(&report)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    (run, rss)
}

fn write(path: &Path, data: &[u8]) -> PathBuf {
    std::fs::write(path, data).unwrap();
    path.to_owned()
}

async fn metric(srv: &TestServer, name: &str) -> u64 {
    let text = srv.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap()
        .parse()
        .unwrap()
}

/// A TCP proxy to `target` that, once, closes the connection that carries the byte at
/// `cut_at` of the traffic in `direction` (true: client to server).
async fn cutting_proxy(
    target: std::net::SocketAddr,
    cut_at: u64,
    upstream: bool,
) -> (String, Arc<AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counted = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let was_cut = Arc::clone(&cut);
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let server = tokio::net::TcpStream::connect(target).await.unwrap();
            let (counted, cut) = (Arc::clone(&counted), Arc::clone(&cut));
            tokio::spawn(async move {
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                            mut to: tokio::net::tcp::OwnedWriteHalf,
                            watched: bool| {
                    let (counted, cut) = (Arc::clone(&counted), Arc::clone(&cut));
                    async move {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if watched && !cut.load(Ordering::SeqCst) {
                                let before = counted.fetch_add(n as u64, Ordering::SeqCst);
                                if before + n as u64 >= cut_at {
                                    let keep = (cut_at - before) as usize;
                                    let _ = to.write_all(&buf[..keep]).await;
                                    cut.store(true, Ordering::SeqCst);
                                    return;
                                }
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                };
                let up = pump(cr, sw, upstream);
                let down = pump(sr, cw, !upstream);
                // Either side ending (or the cut) ends the connection.
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    (format!("http://{addr}"), was_cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_rerun_conflict_and_wrong_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let state = dir.path().join("state");
    let a = write(&dir.path().join("a.bin"), &image(100_000, 1));
    let b = write(&dir.path().join("b.bin"), &image(100_000, 2));
    let a_path = a.to_str().unwrap();

    let r = fwrepo(
        &srv.base,
        None,
        &state,
        &[
            "push",
            a_path,
            "app-1.0",
            "--version",
            "1.0",
            "--json",
            "--verify",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rec: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(rec["sha256"], sha256_hex(&image(100_000, 1)));
    assert_eq!(rec["version"], "1.0");
    assert!(
        !r.stderr.contains('\r'),
        "no progress bar off a terminal: {:?}",
        r.stderr
    );

    // A re-run: success, nothing sent.
    let uploads = metric(&srv, "fwrepo_uploads_total").await;
    let r = fwrepo(
        &srv.base,
        None,
        &state,
        &["push", a_path, "app-1.0", "--verify"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("signature verified"), "{}", r.stderr);
    assert!(
        r.stderr.contains("already holds these bytes"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.starts_with("unchanged app-1.0"), "{}", r.stdout);
    assert_eq!(metric(&srv, "fwrepo_uploads_total").await, uploads);

    // Other bytes under the name: refused with the server's code.
    let r = fwrepo(
        &srv.base,
        None,
        &state,
        &["push", b.to_str().unwrap(), "app-1.0"],
    )
    .await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("name-taken"), "{}", r.stderr);

    // Tokens: once one exists, a wrong one and a reader's are refused.
    let r = srv
        .post(
            "/v1/tokens",
            &serde_json::json!({"name": "ci", "role": "publisher"}),
        )
        .await;
    let publisher = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = fwrepo(
        &srv.base,
        Some("fwr_wrong"),
        &state,
        &["push", b.to_str().unwrap(), "app-2.0"],
    )
    .await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("invalid-token"), "{}", r.stderr);
    let r = fwrepo(
        &srv.base,
        None,
        &state,
        &["push", b.to_str().unwrap(), "app-2.0"],
    )
    .await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("unauthenticated"), "{}", r.stderr);
    let r = fwrepo(
        &srv.base,
        Some(&publisher),
        &state,
        &["push", b.to_str().unwrap(), "app-2.0"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("stored app-2.0"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_cut_at_half_resumes_and_each_byte_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let state = dir.path().join("state");
    let data = image(24 << 20, 7);
    let file = write(&dir.path().join("img.bin"), &data);
    let target: std::net::SocketAddr = srv.base.trim_start_matches("http://").parse().unwrap();
    let (via, was_cut) = cutting_proxy(target, data.len() as u64 / 2, true).await;
    let r = fwrepo(
        &via,
        None,
        &state,
        &["push", file.to_str().unwrap(), "img-1.0"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(was_cut.load(Ordering::SeqCst), "the proxy cut the upload");
    assert!(r.stderr.contains("resuming"), "{}", r.stderr);
    let rec: Value = srv.get("/v1/firmware/img-1.0").await.json().await.unwrap();
    assert_eq!(rec["sha256"], sha256_hex(&data));
    // The server received each byte once.
    assert_eq!(
        metric(&srv, "fwrepo_resumable_upload_bytes_total").await,
        data.len() as u64
    );

    // A push killed at the cut: the next run resumes the same upload.
    let other = image(24 << 20, 17);
    let file = write(&dir.path().join("img2.bin"), &other);
    let (via, was_cut) = cutting_proxy(target, other.len() as u64 / 2, true).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fwrepo"))
        .args(["push", file.to_str().unwrap(), "img-2.0"])
        .env("FWREPO_SERVER", &via)
        .env("XDG_STATE_HOME", &state)
        .env_remove("FWREPO_TOKEN")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let cut = crate::common::poll(async || was_cut.load(Ordering::SeqCst), |c| *c).await;
    assert!(cut);
    child.kill().await.unwrap();
    // Through the same URL (the proxy cuts only once): the upload is found by it.
    let r = fwrepo(
        &via,
        None,
        &state,
        &["push", file.to_str().unwrap(), "img-2.0"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("resuming the upload left at byte"),
        "{}",
        r.stderr
    );
    let rec: Value = srv.get("/v1/firmware/img-2.0").await.json().await.unwrap();
    assert_eq!(rec["sha256"], sha256_hex(&other));
    assert_eq!(
        metric(&srv, "fwrepo_resumable_upload_bytes_total").await,
        (data.len() + other.len()) as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_cut_midway_resumes_with_a_range() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let state = dir.path().join("state");
    let data = image(12 << 20, 8);
    srv.put("/v1/firmware/dl-1.0", data.clone()).await;
    let out = dir.path().join("dl.bin");
    let target: std::net::SocketAddr = srv.base.trim_start_matches("http://").parse().unwrap();
    let (via, was_cut) = cutting_proxy(target, data.len() as u64 / 2, false).await;
    let r = fwrepo(
        &via,
        None,
        &state,
        &["pull", "dl-1.0", "-o", out.to_str().unwrap()],
    )
    .await;
    assert!(was_cut.load(Ordering::SeqCst));
    assert_eq!(r.code, 1, "the cut pull fails: {}", r.stderr);
    assert!(!out.exists(), "no file under its name before it is whole");
    let part = dir.path().join("dl.bin.part");
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 0 && kept < data.len() as u64, "{kept}");
    let r = fwrepo(
        &srv.base,
        None,
        &state,
        &["pull", "dl-1.0", "-o", out.to_str().unwrap()],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("resuming at byte {kept}")),
        "{}",
        r.stderr
    );
    assert!(std::fs::read(&out).unwrap() == data);
    assert!(!part.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_both_ways_in_constant_memory() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let state = dir.path().join("state");
    let file = dir.path().join("giga.bin");
    // Random-looking bytes, written in pieces.
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        for i in 0..64u8 {
            std::io::Write::write_all(&mut f, &image(16 << 20, i)).unwrap();
        }
    }
    let (r, push_rss) = fwrepo_rss(
        &srv.base,
        &state,
        &["push", file.to_str().unwrap(), "giga-1.0", "--json"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rec: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(rec["size"], 1u64 << 30);
    let out = dir.path().join("giga.out");
    let (r, pull_rss) = fwrepo_rss(
        &srv.base,
        &state,
        &["pull", "giga-1.0", "-o", out.to_str().unwrap()],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 1 << 30);
    eprintln!("fwrepo push 1 GiB: peak RSS {push_rss} KiB; pull: {pull_rss} KiB");
    assert!(push_rss < 64 << 10, "push peak RSS {push_rss} KiB");
    assert!(pull_rss < 64 << 10, "pull peak RSS {pull_rss} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_custom_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(dir.path());
    let srv = TestServer::start(
        dir.path(),
        &[
            &format!("https.cert={}", cert.display()),
            &format!("https.key={}", key.display()),
            "https.listen=127.0.0.1:0",
        ],
    )
    .await;
    let rec: Value = srv.get("/v1/keys").await.json().await.unwrap();
    let pem = rec["keys"][0]["pem"].as_str().unwrap().to_owned();
    let pinned = write(&dir.path().join("key.pem"), pem.as_bytes());
    let base = {
        let r: Value = srv
            .put("/v1/firmware/probe", b"x".to_vec())
            .await
            .json()
            .await
            .unwrap();
        r["uris"]["https"]
            .as_str()
            .unwrap()
            .trim_end_matches("/fw/probe")
            .to_owned()
    };
    let state = dir.path().join("state");
    let file = write(&dir.path().join("s.bin"), &image(50_000, 3));
    let cacert = cert.to_str().unwrap();
    // Without the CA the certificate is refused.
    let r = fwrepo(
        &base,
        None,
        &state,
        &["push", file.to_str().unwrap(), "secure-1"],
    )
    .await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    let r = fwrepo(
        &base,
        None,
        &state,
        &[
            "push",
            file.to_str().unwrap(),
            "secure-1",
            "--cacert",
            cacert,
            "--verify",
            "--public-key",
            pinned.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = dir.path().join("s.out");
    let r = fwrepo(
        &base,
        None,
        &state,
        &[
            "pull",
            "secure-1",
            "-o",
            out.to_str().unwrap(),
            "--cacert",
            cacert,
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), image(50_000, 3));
}
