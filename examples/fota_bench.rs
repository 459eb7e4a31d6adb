//! FOTA engine load: creates N tasks (one device each) over HTTP, checks that the idle
//! server burns no CPU, then delivers every task and processes its reports. Prints times,
//! rates and the server's memory. Run through `bench/fota.sh`, which starts the server.
//! FOTA_BENCH_IDLE_SECS sets the idle check's length (default 10; 0 skips it).
//!
//!   fota_bench <base-url> <server-pid> [tasks] [concurrency]

mod common;

use std::time::{Duration, Instant};

use common::{status_kb, upload, Args};
use futures_util::{stream, StreamExt};
use serde_json::json;

/// User plus system CPU time of the process, in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

async fn run<F, Fut>(label: &str, n: usize, conc: usize, pid: &str, f: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let start = Instant::now();
    stream::iter(0..n)
        .map(f)
        .buffer_unordered(conc)
        .collect::<Vec<()>>()
        .await;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{label:<34} {n:>7} in {secs:>7.2} s  {:>8.0}/s   server RSS {:>6} KiB (peak {} KiB)",
        n as f64 / secs,
        status_kb(pid, "VmRSS:"),
        status_kb(pid, "VmHWM:")
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (base, pid, n, conc) = (args.base.clone(), args.pid.clone(), args.n, args.conc);
    let client = args.client();
    let c = &client;
    let base = &base;
    let ok = |r: reqwest::Response, want: u16| {
        assert_eq!(r.status().as_u16(), want, "{}", r.url());
    };
    upload(c, base, "").await;
    println!("server RSS before: {} KiB", status_kb(&pid, "VmRSS:"));

    let ids: Vec<String> = {
        let start = Instant::now();
        let ids = stream::iter(0..n)
            .map(|i| async move {
                let r = c
                    .post(format!("{base}/v1/devices/bench-{i}/fota"))
                    .json(&json!({"name": "bench-fw", "protocolType": "HTTP", "timeout": "1d"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
                let v: serde_json::Value = r.json().await.unwrap();
                (i, v["fotaId"].as_str().unwrap().to_owned())
            })
            .buffer_unordered(conc)
            .collect::<Vec<_>>()
            .await;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{:<34} {n:>7} in {secs:>7.2} s  {:>8.0}/s   server RSS {:>6} KiB (peak {} KiB)",
            "create tasks",
            n as f64 / secs,
            status_kb(&pid, "VmRSS:"),
            status_kb(&pid, "VmHWM:")
        );
        let mut ids = ids;
        ids.sort();
        ids.into_iter().map(|(_, id)| id).collect()
    };

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

    run(
        "device work requests (deliver)",
        n,
        conc,
        &pid,
        |i| async move {
            ok(
                c.get(format!("{base}/v1/devices/bench-{i}/fota"))
                    .send()
                    .await
                    .unwrap(),
                200,
            );
        },
    )
    .await;
    let ids = &ids;
    for (state, result, label) in [
        (2, 0, "reports: downloaded"),
        (3, 0, "reports: updating"),
        (0, 1, "reports: success"),
    ] {
        run(label, n, conc, &pid, |i| async move {
            let r = c
                .post(format!("{base}/v1/fota/{}/report", ids[i]))
                .json(&json!({"state": state, "result": result}))
                .send()
                .await
                .unwrap();
            ok(r, 200);
        })
        .await;
    }
    let v: serde_json::Value = c
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
