//! CoAP downloads with real peers: libcoap's coap-client (notls and openssl builds) and
//! aiocoap-client, over TCP (block sizes, -X limits, BERT), TLS and UDP. Each run checks the
//! SHA-256 of what arrived, for a 1 MiB and a 16 MiB image. aiocoap over UDP fetches only the
//! 1 MiB one: it is Python stepping through 1024-byte blocks one round trip at a time, and
//! 16,384 of those on a shared CI machine take minutes without testing anything new.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;

use crate::common::{have_tool, image, sha256_hex, test_certificate, tool, TestServer};

const SIZES: [(&str, usize); 2] = [("one-mib.bin", 1 << 20), ("sixteen-mib.bin", 16 << 20)];

struct Setup {
    _dir: tempfile::TempDir,
    srv: TestServer,
    digests: Vec<(String, String)>,
    cert: std::path::PathBuf,
}

/// A server with both images and a test certificate for coaps+tcp made here.
async fn setup(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(dir.path());
    let sets = [
        format!("coap.tls_cert={}", cert.display()),
        format!("coap.tls_key={}", key.display()),
    ];
    let mut sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    sets.extend_from_slice(extra);
    let srv = TestServer::start(dir.path(), &sets).await;
    let mut digests = Vec::new();
    for (i, (name, size)) in SIZES.iter().enumerate() {
        let data = image(*size, i as u8 + 40);
        let r = srv.put(&format!("/v1/firmware/{name}"), data.clone()).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        digests.push((name.to_string(), sha256_hex(&data)));
    }
    Setup {
        _dir: dir,
        srv,
        digests,
        cert,
    }
}

/// Runs a peer with a time limit; returns what it wrote to `out` (or stdout).
async fn fetch(
    program: &Path,
    args: &[String],
    out: Option<&Path>,
    env: &[(&str, &Path)],
) -> Vec<u8> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} timed out", program.display()))
        .unwrap();
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}",
        program.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    match out {
        Some(p) => std::fs::read(p).unwrap_or_default(),
        None => output.stdout,
    }
}

async fn libcoap(peer: &str, scheme: &str, extra: &[&str]) {
    if !have_tool(peer) {
        return;
    }
    // Over UDP, libcoap proves its address with the Echo value of the first answer (4.01,
    // RFC 9175) and repeats the request: verification stays on.
    let s = setup(&[]).await;
    let addr = match scheme {
        "coap+tcp" => s.srv.coap_tcp,
        "coaps+tcp" => s.srv.coap_tls,
        _ => s.srv.coap_udp,
    }
    .expect("listener on");
    let program = tool(peer).unwrap();
    for (name, digest) in &s.digests {
        let out = s._dir.path().join(format!("{name}.{peer}.out"));
        let mut args: Vec<String> = vec!["-m".into(), "get".into(), "-B".into(), "100".into()];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend([
            "-o".into(),
            out.display().to_string(),
            format!("{scheme}://{addr}/fw/{name}"),
        ]);
        let got = fetch(&program, &args, Some(&out), &[]).await;
        assert_eq!(
            got.len(),
            SIZES.iter().find(|(n, _)| n == name).unwrap().1,
            "{peer} {extra:?} {name}"
        );
        assert_eq!(&sha256_hex(&got), digest, "{peer} {extra:?} {name}");
    }
    s.srv.stop().await;
}

async fn aiocoap(scheme: &str, max_size: usize) {
    if !have_tool("aiocoap-client") {
        return;
    }
    // aiocoap's client (0.4.17) repeats a request with an Echo value only inside OSCORE; over
    // plain UDP it stops at the 4.01, so this peer runs as on a trusted network.
    let s = setup(&["coap.udp_verify_peers=false"]).await;
    let addr = match scheme {
        "coap+tcp" => s.srv.coap_tcp,
        "coaps+tcp" => s.srv.coap_tls,
        _ => s.srv.coap_udp,
    }
    .expect("listener on");
    let program = tool("aiocoap-client").unwrap();
    for (name, digest) in &s.digests {
        let size = SIZES.iter().find(|(n, _)| n == name).unwrap().1;
        if size > max_size {
            continue;
        }
        let args = vec![format!("{scheme}://{addr}/fw/{name}")];
        // Python's ssl default context trusts SSL_CERT_FILE: the test certificate.
        let got = fetch(&program, &args, None, &[("SSL_CERT_FILE", &s.cert)]).await;
        assert_eq!(&sha256_hex(&got), digest, "aiocoap {scheme} {name}");
    }
    s.srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_tcp_1024_byte_blocks() {
    libcoap("coap-client-notls", "coap+tcp", &["-b", "1024"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_tcp_max_message_1152() {
    libcoap("coap-client-notls", "coap+tcp", &["-X", "1152"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_tcp_defaults_bert() {
    libcoap("coap-client-notls", "coap+tcp", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_tcp_max_message_65536() {
    libcoap("coap-client-notls", "coap+tcp", &["-X", "65536"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_udp_1024_byte_blocks() {
    libcoap("coap-client-notls", "coap", &["-b", "1024"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_openssl_tls() {
    libcoap("coap-client-openssl", "coaps+tcp", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiocoap_tcp_bert() {
    aiocoap("coap+tcp", usize::MAX).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiocoap_udp() {
    aiocoap("coap", 1 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiocoap_tls() {
    aiocoap("coaps+tcp", usize::MAX).await;
}
