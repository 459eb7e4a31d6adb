//! FOTA engine load: creates N tasks (one device each) over HTTP, checks that the idle
//! server burns no CPU, then delivers every task and processes its reports. Prints times,
//! rates and the server's memory. Run through `bench/fota.sh`, which starts the server.
//! FOTA_BENCH_IDLE_SECS sets the idle check's length (default 10; 0 skips it).
//!
//! The load goes over `concurrency` kept-alive HTTP/1.1 connections driven by hyper's
//! connection API (the setup and the final check use reqwest): the generator shares the
//! server's cores, and a general-purpose client's per-request work (URL parsing, its pool,
//! JSON values built per request) would be measured as the server's. Every response's status
//! is checked, and each creation's `fotaId` is read back.
//!
//!   fota_bench <base-url> <server-pid> [tasks] [concurrency]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{status_kb, upload, Args};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// User plus system CPU time of the process, in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

type Conn = SendRequest<Full<Bytes>>;

/// One kept-alive connection to `host` (`127.0.0.1:port`).
async fn connect(host: &str) -> Conn {
    let stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// The request for item `i`: method, path and JSON body (empty: none).
type MakeRequest<'a> = &'a (dyn Fn(usize) -> (Method, String, Bytes) + Sync);

/// The connections and what every phase sends over them.
struct Load {
    conns: Vec<Conn>,
    /// `127.0.0.1:port`.
    host: String,
    /// The server's, for its memory.
    pid: String,
    /// Requests per phase.
    n: usize,
}

impl Load {
    /// Sends `n` requests over the connections, each expecting `want`; returns the bodies when
    /// `keep` (indexed by item).
    async fn phase(
        &mut self,
        label: &str,
        make: MakeRequest<'_>,
        want: u16,
        keep: bool,
    ) -> Vec<Bytes> {
        let (n, host, pid) = (self.n, self.host.as_str(), self.pid.as_str());
        let next = AtomicUsize::new(0);
        let start = Instant::now();
        let workers = self.conns.iter_mut().map(|conn| {
            let next = &next;
            async move {
                let mut bodies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return bodies;
                    }
                    let (method, path, body) = make(i);
                    let mut req = Request::builder()
                        .method(method)
                        .uri(path)
                        .header(hyper::header::HOST, host);
                    if !body.is_empty() {
                        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                    }
                    conn.ready().await.unwrap();
                    let resp = conn
                        .send_request(req.body(Full::new(body)).unwrap())
                        .await
                        .unwrap();
                    let status = resp.status().as_u16();
                    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(
                        status,
                        want,
                        "{label} {i}: {}",
                        String::from_utf8_lossy(&bytes)
                    );
                    if keep {
                        bodies.push((i, bytes));
                    }
                }
            }
        });
        let mut bodies: Vec<(usize, Bytes)> = futures_util::future::join_all(workers)
            .await
            .into_iter()
            .flatten()
            .collect();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{label:<34} {n:>7} in {secs:>7.2} s  {:>8.0}/s   server RSS {:>6} KiB (peak {} KiB)",
            n as f64 / secs,
            status_kb(pid, "VmRSS:"),
            status_kb(pid, "VmHWM:")
        );
        bodies.sort_by_key(|(i, _)| *i);
        bodies.into_iter().map(|(_, b)| b).collect()
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (base, pid, n, conc) = (args.base.clone(), args.pid.clone(), args.n, args.conc);
    let client = args.client();
    upload(&client, &base, "").await;
    println!("server RSS before: {} KiB", status_kb(&pid, "VmRSS:"));
    let host = base.trim_start_matches("http://").to_owned();
    let mut conns = Vec::new();
    for _ in 0..conc {
        conns.push(connect(&host).await);
    }
    let mut load = Load {
        conns,
        host,
        pid: pid.clone(),
        n,
    };

    let schedule =
        Bytes::from_static(br#"{"name": "bench-fw", "protocolType": "HTTP", "timeout": "1d"}"#);
    let create = |i: usize| {
        let path = format!("/v1/devices/bench-{i}/fota");
        (Method::POST, path, schedule.clone())
    };
    let created = load.phase("create tasks", &create, 201, true).await;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Created {
        fota_id: String,
    }
    let ids: Vec<String> = created
        .iter()
        .map(|b| serde_json::from_slice::<Created>(b).unwrap().fota_id)
        .collect();
    assert_eq!(ids.len(), n);

    let idle: u64 = std::env::var("FOTA_BENCH_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    if idle > 0 {
        let before = cpu_ticks(&pid);
        tokio::time::sleep(Duration::from_secs(idle)).await;
        println!(
            "idle {idle} s with {n} pending tasks: server used {} CPU ticks (1 tick = 10 ms)",
            cpu_ticks(&pid) - before
        );
    }

    let work = |i: usize| {
        (
            Method::GET,
            format!("/v1/devices/bench-{i}/fota"),
            Bytes::new(),
        )
    };
    let label = "device work requests (deliver)";
    load.phase(label, &work, 200, false).await;
    for (report, label) in [
        (&br#"{"state": 2, "result": 0}"#[..], "reports: downloaded"),
        (&br#"{"state": 3, "result": 0}"#[..], "reports: updating"),
        (&br#"{"state": 0, "result": 1}"#[..], "reports: success"),
    ] {
        let body = Bytes::from_static(report);
        let ids = &ids;
        let report = |i: usize| {
            let path = format!("/v1/fota/{}/report", ids[i]);
            (Method::POST, path, body.clone())
        };
        load.phase(label, &report, 200, false).await;
    }
    let v: serde_json::Value = client
        .get(format!("{base}/v1/fota?status=succeeded&limit=1000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["tasks"].as_array().unwrap().len(), n.min(1000));
    println!(
        "server RSS after: {} KiB, peak {} KiB",
        status_kb(&pid, "VmRSS:"),
        status_kb(&pid, "VmHWM:")
    );
}
