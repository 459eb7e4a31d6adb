//! Fleet load: imports N devices in one NDJSON request, starts a campaign over all of them,
//! waits until every device has its task, then drives every device through its download and
//! success reports over HTTP. Prints the import rate, the start time, the status query latency
//! at 100 and at N devices (median of 50), the rollout rate and the server's peak memory. Run
//! through `bench/fleet.sh`, which starts the server.
//!
//!   fleet_bench <base-url> <server-pid> [devices] [concurrency]

mod common;

use std::time::{Duration, Instant};

use common::{status_kb, upload, Args};
use futures_util::{stream, StreamExt};
use serde_json::{json, Value};

async fn post(c: &reqwest::Client, url: String, body: Value) -> Value {
    let r = c.post(&url).json(&body).send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert!(status.is_success(), "{url}: {status} {v}");
    v
}

/// Creates and starts a campaign over `target`; returns its id and the start request's time.
async fn campaign(c: &reqwest::Client, base: &str, target: Value) -> (String, Duration) {
    let v = post(
        c,
        format!("{base}/v1/campaigns"),
        json!({"firmware": "bench-fw", "target": target, "options": {"protocolType": "HTTP", "timeout": "1d"}}),
    )
    .await;
    let id = v["campaignId"].as_str().unwrap().to_owned();
    let t = Instant::now();
    post(c, format!("{base}/v1/campaigns/{id}/start"), json!({})).await;
    (id, t.elapsed())
}

/// Median time of 50 status queries.
async fn status_latency(c: &reqwest::Client, base: &str, id: &str) -> Duration {
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let r = c
            .get(format!("{base}/v1/campaigns/{id}"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        r.bytes().await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

async fn status(c: &reqwest::Client, base: &str, id: &str) -> Value {
    c.get(format!("{base}/v1/campaigns/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (base, pid, n, conc) = (args.base.clone(), args.pid.clone(), args.n, args.conc);
    let client = args.client();
    let c = &client;
    let base = &base;
    upload(c, base, "?version=2.0.0").await;

    // A small campaign first, for the status latency at 100 devices.
    let small: Vec<String> = (0..100).map(|i| format!("small-{i}")).collect();
    let (small_id, _) = campaign(c, base, json!({"devices": small})).await;
    let at_100 = status_latency(c, base, &small_id).await;

    let mut body = String::with_capacity(n * 60);
    for i in 0..n {
        body.push_str(&format!(
            "{{\"deviceId\":\"bench-{i:06}\",\"tags\":{{\"fleet\":\"bench\",\"ring\":\"{}\"}}}}\n",
            i % 10
        ));
    }
    let t = Instant::now();
    let r = c
        .post(format!("{base}/v1/devices:import"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(v["imported"], n, "{v}");
    println!(
        "import {n} devices (NDJSON)          {secs:>7.2} s  {:>8.0} devices/s",
        n as f64 / secs
    );

    let (id, start) = campaign(c, base, json!({"filter": "tag.fleet = bench"})).await;
    println!(
        "campaign start over {n} devices      {:>7.3} s",
        start.as_secs_f64()
    );
    let t = Instant::now();
    loop {
        let s = status(c, base, &id).await;
        if s["counts"]["waiting"].is_null() && s["counts"]["skipped"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "every device released (tasks made)   {secs:>7.2} s  {:>8.0} tasks/s",
        n as f64 / secs
    );
    let at_n = status_latency(c, base, &id).await;
    println!(
        "status query, median of 50           {:>7.2} ms at 100 devices, {:.2} ms at {n}",
        at_100.as_secs_f64() * 1e3,
        at_n.as_secs_f64() * 1e3
    );

    if std::env::var("FLEET_BENCH_NO_ROLLOUT").is_ok() {
        println!(
            "server RSS {} KiB, peak {} KiB",
            status_kb(&pid, "VmRSS:"),
            status_kb(&pid, "VmHWM:")
        );
        return;
    }
    // Every device: work request, download, three reports.
    let t = Instant::now();
    stream::iter(0..n)
        .map(|i| async move {
            let r = c
                .get(format!("{base}/v1/devices/bench-{i:06}/fota"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let w: Value = r.json().await.unwrap();
            let bytes = c
                .get(w["packageUri"].as_str().unwrap())
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(bytes.len(), 4096);
            let id = w["fotaId"].as_str().unwrap();
            for (state, result) in [(2, 0), (3, 0), (0, 1)] {
                let r = c
                    .post(format!("{base}/v1/fota/{id}/report"))
                    .json(&json!({"state": state, "result": result, "pkgVersion": "2.0.0"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
            }
        })
        .buffer_unordered(conc)
        .collect::<Vec<()>>()
        .await;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "rollout: work + download + 3 reports {secs:>7.2} s  {:>8.0} devices/s",
        n as f64 / secs
    );
    let mut s = status(c, base, &id).await;
    for _ in 0..100 {
        if s["state"] == "finished" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = status(c, base, &id).await;
    }
    assert_eq!(s["counts"]["succeeded"], n, "{s}");
    println!(
        "campaign {}; server RSS {} KiB, peak {} KiB",
        s["state"].as_str().unwrap_or("?"),
        status_kb(&pid, "VmRSS:"),
        status_kb(&pid, "VmHWM:")
    );
}
