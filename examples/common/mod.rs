//! What the benchmark load generators share: their arguments, the HTTP client, the bench image
//! and the server's memory read from /proc.

/// `<base-url> <server-pid> [count] [concurrency]`.
pub struct Args {
    pub base: String,
    pub pid: String,
    pub n: usize,
    pub conc: usize,
}

impl Args {
    pub fn parse() -> Args {
        let args: Vec<String> = std::env::args().collect();
        Args {
            base: args
                .get(1)
                .expect("base URL")
                .trim_end_matches('/')
                .to_owned(),
            pid: args.get(2).expect("server pid").clone(),
            n: args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100_000),
            conc: args.get(4).and_then(|s| s.parse().ok()).unwrap_or(64),
        }
    }

    /// A client keeping `conc` connections to the server.
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .pool_max_idle_per_host(self.conc)
            .build()
            .unwrap()
    }
}

/// Stores the 4 KiB image `bench-fw` (`query`: its version, if any).
pub async fn upload(c: &reqwest::Client, base: &str, query: &str) {
    let r = c
        .put(format!("{base}/v1/firmware/bench-fw{query}"))
        .body(vec![7u8; 4096])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

/// A `/proc/<pid>/status` figure in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kb(pid: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
