//! The floor under fwrepo's HTTP rows: hyper alone, on the same serving threads (one per
//! core, each with its own runtime and socket), allocator and connection settings as
//! `fwrepo serve`, answering every request with one fixed 206 of
//! 4 KiB and the headers a ranged download carries, with no routing, access check, lookup
//! or range parsing. bench/all.sh's `http-floor` row runs it against nginx as fwrepo's
//! ranged rows do: what this reaches is what any handler on hyper can reach.
//!
//!   hyper_floor HOST:PORT

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper_util::rt::TokioIo;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .expect("usage: hyper_floor HOST:PORT")
        .parse()
        .expect("HOST:PORT");
    let body = Bytes::from(vec![0x5a; 4096]);
    // As `fwrepo serve` serves HTTP: a thread per core, each with its own runtime and its own
    // socket on the shared address.
    let n = fwrepo::http::threads::count(0);
    let (listeners, _) = fwrepo::http::threads::bind(addr, n).expect("bind");
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let body = body.clone();
            std::thread::spawn(move || serve(l, body))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn serve(listener: std::net::TcpListener, body: Bytes) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let body = body.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let mut resp = hyper::Response::new(Full::new(body.clone()));
                        *resp.status_mut() = hyper::StatusCode::PARTIAL_CONTENT;
                        let h = resp.headers_mut();
                        h.insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/octet-stream"),
                        );
                        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
                        h.insert(
                            header::CONTENT_RANGE,
                            HeaderValue::from_static("bytes 0-4095/16777216"),
                        );
                        h.insert(
                            header::ETAG,
                            HeaderValue::from_static(
                                "\"sha256:5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a\"",
                            ),
                        );
                        h.insert(
                            header::LAST_MODIFIED,
                            HeaderValue::from_static("Sat, 05 Dec 2026 03:00:00 GMT"),
                        );
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
}
