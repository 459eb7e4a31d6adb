//! Device downloads over HTTP: every range form, multipart, 416, If-Range, If-None-Match.

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{client, image, TestServer};

const SIZE: usize = 300_000;

async fn setup() -> (tempfile::TempDir, TestServer, Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let data = image(SIZE, 7);
    let resp = srv.put("/v1/firmware/dev.bin", data.clone()).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let rec: Value = resp.json().await.unwrap();
    let etag = format!("\"{}\"", rec["sha256"].as_str().unwrap());
    (dir, srv, data, etag)
}

#[tokio::test]
async fn whole_and_head_with_validators() {
    let (_d, srv, data, etag) = setup().await;
    let c = client();
    for path in ["/fw/dev.bin", "/v1/firmware/dev.bin/content"] {
        let resp = srv.get(path).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers().clone();
        assert_eq!(h["content-length"], SIZE.to_string().as_str());
        assert_eq!(h["etag"], etag.as_str());
        assert_eq!(h["accept-ranges"], "bytes");
        assert_eq!(h["content-type"], "application/octet-stream");
        assert!(httpdate::parse_http_date(h["last-modified"].to_str().unwrap()).is_ok());
        assert_eq!(resp.bytes().await.unwrap(), data);

        let resp = c.head(srv.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-length"], SIZE.to_string().as_str());
        assert_eq!(resp.headers()["etag"], etag.as_str());
    }
    srv.stop().await;
}

#[tokio::test]
async fn single_ranges() {
    let (_d, srv, data, _) = setup().await;
    let c = client();
    let n = SIZE as u64;
    for (spec, start, end) in [
        ("bytes=0-99", 0, 100),
        ("bytes=1000-1999", 1000, 2000),
        ("bytes=299000-", 299_000, n),
        ("bytes=-500", n - 500, n),
        ("bytes=299990-400000", 299_990, n),
    ] {
        let resp = c
            .get(srv.url("/fw/dev.bin"))
            .header("range", spec)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{spec}");
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes {start}-{}/{n}", end - 1).as_str(),
            "{spec}"
        );
        assert_eq!(
            resp.headers()["content-length"],
            (end - start).to_string().as_str()
        );
        assert_eq!(
            resp.bytes().await.unwrap(),
            data[start as usize..end as usize],
            "{spec}"
        );
    }
    srv.stop().await;
}

/// An image larger than `cache.max_image` is not held whole: a range of up to one read-ahead
/// chunk (1 MiB) is cut from cached chunks, and longer ranges and the whole image are
/// streamed from the store. Each path answers the right bytes: within a chunk, across a
/// chunk boundary, over three chunks, the short tail, and a range read again.
#[tokio::test]
async fn ranges_of_an_image_beyond_the_hot_cache() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &["cache.max_image=65536"]).await;
    let size = 3 * (1 << 20) + 12_345;
    let data = image(size, 11);
    let resp = srv.put("/v1/firmware/big.bin", data.clone()).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let c = client();
    let mib = 1u64 << 20;
    for (start, end) in [
        (0, 4096),
        (mib - 100, mib + 100),
        (2 * mib + 5, 3 * mib + 5),
        (mib - 1, 2 * mib + 1),
        (3 * mib, size as u64),
        (0, 4096),
    ] {
        let spec = format!("bytes={start}-{}", end - 1);
        let resp = c
            .get(srv.url("/fw/big.bin"))
            .header("range", &spec)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{spec}");
        assert_eq!(
            resp.bytes().await.unwrap(),
            data[start as usize..end as usize],
            "{spec}"
        );
    }
    let whole = c.get(srv.url("/fw/big.bin")).send().await.unwrap();
    assert_eq!(whole.bytes().await.unwrap(), data);
    srv.stop().await;
}

#[tokio::test]
async fn resume_after_a_dropped_link() {
    let (_d, srv, data, etag) = setup().await;
    let c = client();
    // The first attempt got 123457 bytes before the link dropped; the device resumes.
    let resp = c
        .get(srv.url("/fw/dev.bin"))
        .header("range", "bytes=123457-")
        .header("if-range", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    let mut got = data[..123_457].to_vec();
    got.extend_from_slice(&resp.bytes().await.unwrap());
    assert_eq!(got, data);
    srv.stop().await;
}

#[tokio::test]
async fn multiple_ranges_are_multipart_byteranges() {
    let (_d, srv, data, _) = setup().await;
    let resp = client()
        .get(srv.url("/fw/dev.bin"))
        .header("range", "bytes=0-9, 100-199, -5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .expect(&ct)
        .to_owned();
    let declared: usize = resp.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), declared);
    // Parse the parts back.
    let delim = format!("\r\n--{boundary}");
    let text = body.as_ref();
    let mut parts = Vec::new();
    let mut rest = text;
    loop {
        let at = find(rest, delim.as_bytes()).expect("delimiter");
        rest = &rest[at + delim.len()..];
        if rest.starts_with(b"--") {
            assert_eq!(&rest[2..], b"\r\n");
            break;
        }
        let head_end = find(rest, b"\r\n\r\n").unwrap();
        let head = std::str::from_utf8(&rest[..head_end]).unwrap().to_owned();
        rest = &rest[head_end + 4..];
        let next = find(rest, delim.as_bytes()).unwrap();
        parts.push((head, rest[..next].to_vec()));
        rest = &rest[next..];
    }
    let expect = [(0usize, 10usize), (100, 200), (SIZE - 5, SIZE)];
    assert_eq!(parts.len(), 3);
    for ((head, bytes), (a, b)) in parts.iter().zip(expect) {
        assert!(
            head.contains("Content-Type: application/octet-stream"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Range: bytes {a}-{}/{SIZE}", b - 1)),
            "{head}"
        );
        assert_eq!(bytes, &data[a..b]);
    }
    srv.stop().await;
}

#[tokio::test]
async fn overlapping_ranges_never_multiply_the_image() {
    let (_d, srv, data, _) = setup().await;
    // Sixteen `0-` ranges: the image once, whole, not sixteen copies.
    let sixteen = format!("bytes={}", ["0-"; 16].join(","));
    let resp = client()
        .get(srv.url("/fw/dev.bin"))
        .header("range", sixteen)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap(), data);
    // Overlapping and adjacent ranges are merged into one.
    let resp = client()
        .get(srv.url("/fw/dev.bin"))
        .header("range", "bytes=100-199,0-99,150-299")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 0-299/{SIZE}").as_str()
    );
    assert_eq!(resp.bytes().await.unwrap(), &data[..300]);
    srv.stop().await;
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test]
async fn unsatisfiable_range_is_416_and_malformed_is_ignored() {
    let (_d, srv, data, _) = setup().await;
    let c = client();
    for spec in ["bytes=300000-", "bytes=400000-500000", "bytes=-0"] {
        let resp = c
            .get(srv.url("/fw/dev.bin"))
            .header("range", spec)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{spec}");
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes */{SIZE}").as_str()
        );
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "range-not-satisfiable");
    }
    for spec in ["bytes=9-1", "lines=0-1", "bytes=x-"] {
        let resp = c
            .get(srv.url("/fw/dev.bin"))
            .header("range", spec)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{spec}");
        assert_eq!(resp.bytes().await.unwrap().len(), data.len());
    }
    srv.stop().await;
}

#[tokio::test]
async fn if_range_and_if_none_match() {
    let (_d, srv, _data, etag) = setup().await;
    let c = client();
    let get = |h: Vec<(&'static str, String)>| {
        let mut rb = c.get(srv.url("/fw/dev.bin"));
        for (k, v) in h {
            rb = rb.header(k, v);
        }
        rb.send()
    };
    let r = get(vec![
        ("range", "bytes=0-9".into()),
        ("if-range", etag.clone()),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let stale = format!("\"{}\"", "0".repeat(64));
    let r = get(vec![("range", "bytes=0-9".into()), ("if-range", stale)])
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().len(), SIZE);
    // A weak validator never satisfies If-Range.
    let r = get(vec![
        ("range", "bytes=0-9".into()),
        ("if-range", format!("W/{etag}")),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Dates: the exact Last-Modified holds, an older one does not.
    let lm = get(vec![]).await.unwrap().headers()["last-modified"]
        .to_str()
        .unwrap()
        .to_owned();
    let r = get(vec![
        ("range", "bytes=0-9".into()),
        ("if-range", lm.clone()),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let r = get(vec![
        ("range", "bytes=0-9".into()),
        ("if-range", "Mon, 01 Jan 2001 00:00:00 GMT".into()),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let r = get(vec![("if-none-match", etag.clone())]).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert!(r.bytes().await.unwrap().is_empty());
    let r = get(vec![("if-none-match", format!("\"abc\", W/{etag}"))])
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = get(vec![("if-none-match", "\"abc\"".into())])
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = get(vec![("if-modified-since", lm)]).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    srv.stop().await;
}

#[tokio::test]
async fn unknown_firmware_is_404_json() {
    let (_d, srv, _, _) = setup().await;
    let r = srv.get("/fw/nope").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "firmware-not-found");
    srv.stop().await;
}

/// `GET`/`HEAD /fw/{name}` with a plain name takes the direct way past the router
/// (`http::app`); a percent-encoded name goes through the router. Both must answer alike:
/// same status, headers (but Date) and bytes, for every kind of answer.
#[tokio::test]
async fn the_direct_way_and_the_router_answer_alike() {
    let (_d, srv, _, etag) = setup().await;
    let c = client();
    let asks: [(&str, Option<(&str, &str)>); 7] = [
        ("GET", None),
        ("HEAD", None),
        ("GET", Some(("range", "bytes=10-99"))),
        ("GET", Some(("range", "bytes=0-9,20-29"))),
        ("GET", Some(("range", "bytes=400000-"))),
        ("GET", Some(("if-none-match", etag.as_str()))),
        ("DELETE", None),
    ];
    for (method, header) in asks {
        let mut answers = Vec::new();
        for path in ["/fw/dev.bin", "/fw/dev%2Ebin"] {
            let mut req = c.request(method.parse().unwrap(), srv.url(path));
            if let Some((name, value)) = header {
                req = req.header(name, value);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let mut headers: Vec<(String, String)> = resp
                .headers()
                .iter()
                .filter(|(n, _)| *n != "date")
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            headers.sort();
            let body = resp.bytes().await.unwrap();
            // Multipart boundaries are random per answer.
            let body = match headers.iter().find(|(n, _)| n == "content-type") {
                Some((_, ct)) if ct.starts_with("multipart/") => {
                    headers.retain(|(n, _)| n != "content-type" && n != "content-length");
                    body.len().to_be_bytes().to_vec()
                }
                _ => body.to_vec(),
            };
            answers.push((status, headers, body));
        }
        assert_eq!(answers[0], answers[1], "{method} {header:?}");
        assert_ne!(answers[0].0, StatusCode::NOT_FOUND, "{method} {header:?}");
    }
    srv.stop().await;
}
