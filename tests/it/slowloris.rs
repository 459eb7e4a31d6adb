//! Connection limits against clients that hold connections: trickled headers (slowloris),
//! idle keep-alive, a stalled upload and a client that stops reading. Short limits are set so
//! the test takes seconds; each wait is for the server to close, bounded.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{client, image, TestServer};

const LIMITS: [&str; 4] = [
    "http.header_read_timeout=1s",
    "http.idle_timeout=2s",
    "http.body_timeout=1s",
    "http.max_connections=100",
];

fn addr(srv: &TestServer) -> String {
    srv.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection (EOF or reset); what it sent, and when.
async fn until_closed(stream: &mut TcpStream, bound: Duration) -> Option<(Vec<u8>, Instant)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(end, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((got, Instant::now())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_clients_are_closed_and_others_served() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &LIMITS).await;
    let target = addr(&srv);
    // 300 connections, three times the cap, each sending one header byte every 200 ms and
    // never finishing.
    let opened = 300;
    let mut attackers = Vec::new();
    for _ in 0..opened {
        let target = target.clone();
        attackers.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut s = TcpStream::connect(&target).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
            let (mut rd, mut wr) = s.into_split();
            let trickle = tokio::spawn(async move {
                while wr.write_all(b"a").await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            let mut buf = [0u8; 256];
            let closed = tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await
            .is_ok();
            trickle.abort();
            (closed, start.elapsed())
        }));
    }
    // Meanwhile an ordinary client is served.
    let served_at = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(15), srv.get("/healthz"))
        .await
        .expect("served while the attack runs");
    assert_eq!(r.status(), StatusCode::OK);
    let waited = served_at.elapsed();
    let mut longest = Duration::ZERO;
    for a in attackers {
        let (closed, lived) = a.await.unwrap();
        assert!(closed, "a trickling connection stayed open");
        longest = longest.max(lived);
    }
    // Closed by the header deadline (1 s each, 100 at a time, the rest waiting to be accepted).
    assert!(longest < Duration::from_secs(10), "{longest:?}");
    eprintln!(
        "slowloris: {opened} connections, all closed, longest lived {longest:?}; another client served after {waited:?}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_is_closed_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &LIMITS).await;
    let mut s = TcpStream::connect(addr(&srv)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let answered = Instant::now();
    let (_, closed) = until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("an idle connection is closed");
    let idle = closed - answered;
    assert!(
        idle >= Duration::from_millis(1900),
        "closed after {idle:?}, before the idle timeout"
    );
    // A connection that sends nothing at all gets the header deadline.
    let mut s = TcpStream::connect(addr(&srv)).await.unwrap();
    let start = Instant::now();
    until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("a silent connection is closed");
    assert!(start.elapsed() >= Duration::from_millis(900));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_cut_and_nothing_stored() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &LIMITS).await;
    let mut s = TcpStream::connect(addr(&srv)).await.unwrap();
    s.write_all(b"PUT /v1/firmware/stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[7u8; 5000]).await.unwrap();
    // Then nothing: the server gives up on the body.
    let (answer, _) = until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("a stalled upload is cut");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.contains("upload-interrupted"),
        "{text}"
    );
    assert_eq!(
        srv.get("/v1/firmware/stalled").await.status(),
        StatusCode::NOT_FOUND
    );
    let left = crate::common::poll(async || srv.blob_files(), Vec::is_empty).await;
    assert!(left.is_empty(), "{left:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &LIMITS).await;
    // Larger than what the socket buffers on both ends hold.
    let data = image(48 << 20, 3);
    let r = client()
        .put(srv.url("/v1/firmware/big"))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut s = TcpStream::connect(addr(&srv)).await.unwrap();
    s.write_all(b"GET /fw/big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Read a little, then stop; the server's writes block and it closes the connection.
    let mut head = [0u8; 1024];
    s.read_exact(&mut head).await.unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"));
    let status = || async {
        let m = srv.get("/metrics").await.text().await.unwrap();
        m.contains("fwrepo_http_connections_cut_total{reason=\"write-stalled\"} 1")
    };
    let cut = crate::common::poll(status, |c| *c).await;
    assert!(cut, "the stalled response was not cut");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_connections_are_closed_and_others_served() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::common::test_certificate(dir.path());
    let mut sets: Vec<String> = LIMITS.iter().map(|s| s.to_string()).collect();
    sets.extend([
        "https.listen=127.0.0.1:0".to_owned(),
        format!("https.cert={}", cert.display()),
        format!("https.key={}", key.display()),
    ]);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let running = fwrepo::server::start(
        &crate::common::config(dir.path(), &sets),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("starts with HTTPS");
    let addr = running.https_addr.unwrap();
    // 150 connections that never start the handshake (more than the cap of 100).
    let mut silent = Vec::new();
    for _ in 0..150 {
        silent.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut s = TcpStream::connect(addr).await.unwrap();
            let closed = until_closed(&mut s, Duration::from_secs(20))
                .await
                .is_some();
            (closed, start.elapsed())
        }));
    }
    let pem = std::fs::read(&cert).unwrap();
    let tls = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .build()
        .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        tls.get(format!("https://{addr}/healthz")).send(),
    )
    .await
    .expect("served while silent connections are open")
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for s in silent {
        let (closed, lived) = s.await.unwrap();
        assert!(closed, "a silent TLS connection stayed open");
        assert!(lived < Duration::from_secs(10), "{lived:?}");
    }
    running.shutdown();
    running.wait().await;
}

/// The cap on connections is the listener's, not each serving thread's: with three threads
/// and a cap of two, a third connection waits for one of the two to close, whichever thread
/// the kernel gave it to. Each thread's share of the cap would have served it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_across_serving_threads() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(
        dir.path(),
        &[
            "http.threads=3",
            "http.max_connections=2",
            "http.idle_timeout=1m",
        ],
    )
    .await;
    let target = addr(&srv);
    let ask = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    async fn answered(s: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1024];
        matches!(s.read(&mut buf).await, Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
    }
    // Two kept-alive connections, each answered once, hold both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&target).await.unwrap();
        s.write_all(ask).await.unwrap();
        assert!(answered(&mut s).await);
        held.push(s);
    }
    // More connections, so at least one lands on a thread that holds neither: none of them
    // is answered while both slots are held.
    let mut waiting = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(&target).await.unwrap();
        s.write_all(ask).await.unwrap();
        waiting.push(s);
    }
    for s in &mut waiting {
        let early = tokio::time::timeout(Duration::from_millis(300), answered(s)).await;
        assert!(early.is_err(), "a connection beyond the cap was served");
    }
    // Each closed connection lets one waiting one in.
    drop(held);
    let mut answers = tokio::task::JoinSet::new();
    for mut s in waiting {
        answers.spawn(async move { answered(&mut s).await.then_some(s) });
    }
    let mut served = Vec::new();
    while served.len() < 2 {
        let next = tokio::time::timeout(Duration::from_secs(10), answers.join_next()).await;
        match next {
            Ok(Some(Ok(Some(s)))) => served.push(s),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break,
        }
    }
    let served = served.len();
    assert_eq!(served, 2, "the freed slots went to waiting connections");
    srv.stop().await;
}
