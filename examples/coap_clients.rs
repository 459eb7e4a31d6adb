//! Many CoAP-over-TCP clients at once, for bench/all.sh's 10,000-client row: every client
//! connects and exchanges CSMs first, then all fetch the same image block by block (Block2 at
//! the given size) at the same time, and each checks the SHA-256 of what it got. Prints one
//! line: `seconds=<transfer time> ok=<clients that got the right bytes> failed=<the rest>`.
//! Runs on one thread, so the server under test keeps the other core.
//!
//!   coap_clients HOST:PORT PATH CLIENTS BLOCK-SIZE SHA256-HEX

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use fwrepo::coap::block::Block;
use fwrepo::coap::msg::{codes, opt, Message};
use fwrepo::coap::tcp_codec::TcpCodec;
use sha2::{Digest, Sha256};
use tokio::sync::{Barrier, Semaphore};
use tokio_util::codec::Framed;

type Conn = Framed<tokio::net::TcpStream, TcpCodec>;

/// Connects and exchanges CSMs (ours: Max-Message-Size for one block and its header).
async fn connect(addr: &str, block: u64, dialing: &Semaphore) -> Result<Conn, String> {
    let _turn = dialing.acquire().await.map_err(|e| e.to_string())?;
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut c = Framed::new(s, TcpCodec::new(64 << 10));
    let csm = next(&mut c).await?;
    if csm.code != codes::CSM {
        return Err(format!("first message {:#x}, not CSM", csm.code));
    }
    let mut ours = Message::new(codes::CSM, Bytes::new());
    ours.push_uint(2, block + 64);
    c.send(&ours).await.map_err(|e| format!("send CSM: {e}"))?;
    Ok(c)
}

async fn next(c: &mut Conn) -> Result<Message, String> {
    match tokio::time::timeout(Duration::from_secs(30), c.next()).await {
        Err(_) => Err("no answer in 30 s".into()),
        Ok(None) => Err("closed".into()),
        Ok(Some(Err(e))) => Err(format!("decode: {e}")),
        Ok(Some(Ok(m))) => Ok(m),
    }
}

/// Fetches `path` block by block and returns its SHA-256.
async fn fetch(c: &mut Conn, path: &str, szx: u8) -> Result<String, String> {
    let mut digest = Sha256::new();
    let mut num = 0u64;
    loop {
        let mut m = Message::new(codes::GET, Bytes::from_static(b"\x01"));
        for seg in path.split('/') {
            m.push(opt::URI_PATH, Bytes::copy_from_slice(seg.as_bytes()));
        }
        let b = Block {
            num,
            more: false,
            szx,
        };
        m.push_uint(opt::BLOCK2, b.encode());
        c.send(&m).await.map_err(|e| format!("send: {e}"))?;
        let r = loop {
            let r = next(c).await?;
            if r.code != codes::PONG && r.code != codes::CSM {
                break r;
            }
        };
        if r.code != codes::CONTENT {
            return Err(format!("block {num}: code {:#x}", r.code));
        }
        digest.update(&r.payload);
        let more = r
            .option(opt::BLOCK2)
            .and_then(|v| Block::decode(v))
            .is_some_and(|b| b.more);
        if !more {
            return Ok(hex::encode(digest.finalize()));
        }
        num += 1;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, path, clients, block, want] = &args[..] else {
        eprintln!("usage: coap_clients HOST:PORT PATH CLIENTS BLOCK-SIZE SHA256-HEX");
        std::process::exit(2);
    };
    let clients: usize = clients.parse().expect("CLIENTS is a number");
    let block: u64 = block.parse().expect("BLOCK-SIZE is a number");
    let szx = (block.trailing_zeros() as u8).saturating_sub(4);
    assert!(
        block.is_power_of_two() && (16..=1024).contains(&block),
        "BLOCK-SIZE is a power of two from 16 to 1024"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let (addr, path, want) = (Arc::new(addr.clone()), Arc::new(path.clone()), want.clone());
        // Dial a few hundred at a time so the listen backlog does not overflow into SYN
        // retransmissions, which would time the kernel's back-off rather than the server.
        let dialing = Arc::new(Semaphore::new(256));
        let ready = Arc::new(Barrier::new(clients + 1));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (addr, path, dialing, ready) = (
                Arc::clone(&addr),
                Arc::clone(&path),
                Arc::clone(&dialing),
                Arc::clone(&ready),
            );
            tasks.spawn(async move {
                let conn = connect(&addr, block, &dialing).await;
                ready.wait().await;
                let mut c = conn?;
                fetch(&mut c, &path, szx).await
            });
        }
        ready.wait().await;
        let start = Instant::now();
        let (mut ok, mut failed) = (0usize, 0usize);
        let mut first_error = None;
        while let Some(done) = tasks.join_next().await {
            match done.expect("a client task ends") {
                Ok(sha) if sha == want => ok += 1,
                Ok(sha) => {
                    failed += 1;
                    first_error.get_or_insert(format!("digest {sha}"));
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!("seconds={secs:.3} ok={ok} failed={failed}");
        if let Some(e) = first_error {
            eprintln!("first failure: {e}");
        }
    });
}
