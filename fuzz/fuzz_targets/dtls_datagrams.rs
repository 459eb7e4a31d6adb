//! The DTLS listener's entry points with arbitrary datagrams (each input is split into
//! datagrams by 2-byte big-endian lengths). Before a handshake: the ClientHello reader, the
//! cookie check and HelloVerifyRequest, the ClientKeyExchange's identity, and a session
//! started from whatever reads as a ClientHello (as if its cookie were good). After one: every
//! datagram fed to an established PSK session, which must then either have failed cleanly or
//! still take its client's next record. Nothing may panic.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use fwrepo::coap::dtls::client::{self, Client};
use fwrepo::coap::dtls::hello::{self, CookieKey};
use fwrepo::coap::dtls::session::{Progress, Psk, Session};
use libfuzzer_sys::fuzz_target;
use openssl::ssl::SslContext;

const KEY: &[u8] = b"fuzzing-key-0123";

fn split(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < 32 {
        let n = (u16::from_be_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
        out.push(&data[2..2 + n]);
        data = &data[2 + n..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    static SHARED: OnceLock<(SslContext, CookieKey)> = OnceLock::new();
    let (ctx, cookies) =
        SHARED.get_or_init(|| (fwrepo::coap::dtls::context().unwrap(), CookieKey::random()));
    let peer: SocketAddr = "192.0.2.1:5684".parse().unwrap();
    let now = Instant::now();
    let datagrams = split(data);
    for d in &datagrams {
        let _ = hello::psk_identity(d);
        if let Some(ch) = hello::client_hello(d) {
            let cookie = cookies.cookie(peer, &ch.random, 0);
            let _ = hello::hello_verify_request(&ch, &cookie);
            let _ = cookies.verify(peer, &ch, 0);
            let _ = Session::accept(ctx, &ch, 1, now);
        }
    }
    let psk = Psk {
        identity: "fuzz".into(),
        device: "fuzz-device".into(),
        key: KEY.to_vec(),
    };
    let mut c = Client::psk("fuzz", KEY).unwrap();
    let mut s = client::handshake(ctx, cookies, peer, &mut c, Some(psk)).expect("handshake");
    for d in datagrams {
        if s.feed(d.to_vec(), now).is_err() {
            return;
        }
        s.take_outbound();
    }
    let mut got = Vec::new();
    for d in c.write(b"still here") {
        match s.feed(d, now) {
            Ok(Progress::Data(m)) => got.extend(m),
            Ok(_) => {}
            Err(_) => return,
        }
    }
    assert_eq!(got, vec![b"still here".to_vec()]);
});
