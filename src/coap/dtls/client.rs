//! A DTLS client with a pre-shared key over in-memory datagrams, and a whole handshake with
//! the listener's own pieces (cookie, replayed exchange, session) without a socket: for the
//! in-process tests, the fuzz target and the benchmark's checks. Devices use their own
//! stacks; the interop tests drive libcoap's.

use std::net::SocketAddr;
use std::time::Instant;

use openssl::error::ErrorStack;
use openssl::ssl::{ErrorCode, Ssl, SslContextBuilder, SslMethod, SslStream};

use super::hello::{self, CookieKey};
use super::session::{Failed, Pipe, Progress, Psk, Session};

pub struct Client {
    stream: SslStream<Pipe>,
    pub established: bool,
}

impl Client {
    /// A client that will present `identity` with `key`, offering `TLS_PSK_WITH_AES_128_CCM_8`.
    pub fn psk(identity: &str, key: &[u8]) -> Result<Client, ErrorStack> {
        Client::psk_offering(identity, key, "PSK-AES128-CCM8")
    }

    /// A PSK client offering the suites `ciphers` names (OpenSSL's names).
    pub fn psk_offering(identity: &str, key: &[u8], ciphers: &str) -> Result<Client, ErrorStack> {
        let mut b = SslContextBuilder::new(SslMethod::dtls())?;
        b.set_cipher_list(ciphers)?;
        let (identity, key) = (identity.as_bytes().to_vec(), key.to_vec());
        b.set_psk_client_callback(move |_, _, id, psk| {
            if identity.len() >= id.len() || key.len() > psk.len() {
                return Ok(0);
            }
            id[..identity.len()].copy_from_slice(&identity);
            id[identity.len()] = 0;
            psk[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        let mut ssl = Ssl::new(&b.build())?;
        ssl.set_connect_state();
        ssl.set_mtu(super::session::MTU)?;
        Ok(Client {
            stream: SslStream::new(ssl, Pipe::default())?,
            established: false,
        })
    }

    /// Feeds datagrams from the server (none to start); the datagrams to send back and the
    /// application data that arrived.
    pub fn feed(&mut self, datagrams: Vec<Vec<u8>>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        for d in datagrams {
            self.stream.get_mut().push(d);
        }
        let mut data = Vec::new();
        if !self.established {
            match self.stream.do_handshake() {
                Ok(()) => self.established = true,
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(_) => return (self.stream.get_mut().take(), data),
            }
        }
        if self.established {
            let mut buf = [0u8; super::session::MAX_RECORD];
            while let Ok(n) = self.stream.ssl_read(&mut buf) {
                data.push(buf[..n].to_vec());
            }
        }
        (self.stream.get_mut().take(), data)
    }

    /// A client for certificate mode offering `ciphers`, that does not check the server's
    /// certificate (the tests check suites, not trust).
    pub fn unverified_offering(ciphers: &str) -> Result<Client, ErrorStack> {
        let mut b = SslContextBuilder::new(SslMethod::dtls())?;
        b.set_cipher_list(ciphers)?;
        b.set_verify(openssl::ssl::SslVerifyMode::NONE);
        let mut ssl = Ssl::new(&b.build())?;
        ssl.set_connect_state();
        ssl.set_mtu(super::session::MTU)?;
        Ok(Client {
            stream: SslStream::new(ssl, Pipe::default())?,
            established: false,
        })
    }

    /// The suite negotiated, once there is one.
    pub fn cipher(&self) -> Option<&'static str> {
        self.stream.ssl().current_cipher().map(|c| c.name())
    }

    /// One record of application data.
    pub fn write(&mut self, plaintext: &[u8]) -> Vec<Vec<u8>> {
        let _ = self.stream.ssl_write(plaintext);
        self.stream.get_mut().take()
    }
}

/// Shakes hands between `client` and the listener's pieces as `peer` would over the network:
/// the stateless cookie exchange, then a session with `psk` as looked up. The session, or why
/// it failed.
pub fn handshake(
    ctx: &openssl::ssl::SslContext,
    cookies: &CookieKey,
    peer: SocketAddr,
    client: &mut Client,
    psk: Option<Psk>,
) -> Result<Session, Failed> {
    let (first, _) = client.feed(Vec::new());
    let d = first
        .first()
        .ok_or_else(|| Failed("no ClientHello".into()))?;
    let ch = hello::client_hello(d).ok_or_else(|| Failed("not a ClientHello".into()))?;
    let cookie = cookies.cookie(peer, &ch.random, 0);
    let (second, _) = client.feed(vec![hello::hello_verify_request(&ch, &cookie)]);
    let d = second
        .first()
        .ok_or_else(|| Failed("no second ClientHello".into()))?;
    let ch = hello::client_hello(d).ok_or_else(|| Failed("not a ClientHello".into()))?;
    if !cookies.verify(peer, &ch, 0) {
        return Err(Failed("the cookie did not come back".into()));
    }
    let now = Instant::now();
    let (mut s, mut to_client) = Session::accept(ctx, &ch, 1, now)?;
    s.set_psk(psk);
    for _ in 0..8 {
        let (to_server, _) = client.feed(std::mem::take(&mut to_client));
        for d in to_server {
            if let Progress::Established = s.feed(d, now)? {}
            to_client.extend(s.take_outbound());
        }
        if s.established && client.established {
            return Ok(s);
        }
    }
    Err(Failed("the handshake did not finish".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psk(key: &[u8]) -> Option<Psk> {
        Some(Psk {
            identity: "dev-psk".into(),
            device: "dev".into(),
            key: key.to_vec(),
        })
    }

    #[test]
    fn both_psk_suites_are_served() {
        let ctx = super::super::context().unwrap();
        let cookies = CookieKey::random();
        let peer: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        for suite in ["PSK-AES128-CCM8", "PSK-AES128-GCM-SHA256"] {
            let mut c = Client::psk_offering("dev-psk", b"0123456789abcdef", suite).unwrap();
            handshake(&ctx, &cookies, peer, &mut c, psk(b"0123456789abcdef")).unwrap();
            assert_eq!(c.cipher(), Some(suite));
        }
    }

    #[test]
    fn both_certificate_suites_are_served() {
        use openssl::{asn1::Asn1Time, ec, hash::MessageDigest, nid::Nid, pkey::PKey, x509};
        let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut name = x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, "localhost")
            .unwrap();
        let name = name.build();
        let mut cert = x509::X509Builder::new().unwrap();
        cert.set_version(2).unwrap();
        cert.set_subject_name(&name).unwrap();
        cert.set_issuer_name(&name).unwrap();
        cert.set_pubkey(&key).unwrap();
        cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        cert.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        cert.sign(&key, MessageDigest::sha256()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert_path, cert.build().to_pem().unwrap()).unwrap();
        std::fs::write(&key_path, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let ctx = super::super::context_with_certificate(&cert_path, &key_path, None).unwrap();
        let cookies = CookieKey::random();
        let peer: SocketAddr = "127.0.0.1:40003".parse().unwrap();
        for suite in ["ECDHE-ECDSA-AES128-CCM8", "ECDHE-ECDSA-AES128-GCM-SHA256"] {
            let mut c = Client::unverified_offering(suite).unwrap();
            let s = handshake(&ctx, &cookies, peer, &mut c, None).unwrap();
            assert_eq!(c.cipher(), Some(suite));
            assert_eq!(s.device, None, "no client certificate, no device");
        }
    }

    #[test]
    fn a_lost_flight_is_sent_again_when_its_timer_runs_out() {
        let ctx = super::super::context().unwrap();
        let cookies = CookieKey::random();
        let peer: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let mut c = Client::psk("dev-psk", b"0123456789abcdef").unwrap();
        let (first, _) = c.feed(Vec::new());
        let ch = hello::client_hello(&first[0]).unwrap();
        let cookie = cookies.cookie(peer, &ch.random, 0);
        let (second, _) = c.feed(vec![hello::hello_verify_request(&ch, &cookie)]);
        let ch = hello::client_hello(&second[0]).unwrap();
        let (mut s, flight) = Session::accept(&ctx, &ch, 1, Instant::now()).unwrap();
        assert!(!flight.is_empty());
        // The flight is lost; OpenSSL's timer (1 s at first) brings it again.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let again = loop {
            s.tick().unwrap();
            let out = s.take_outbound();
            if !out.is_empty() || Instant::now() > deadline {
                break out;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(!again.is_empty(), "no retransmission in 5 s");
        // With it, the handshake goes on.
        s.set_psk(psk(b"0123456789abcdef"));
        let (to_server, _) = c.feed(again);
        for d in to_server {
            s.feed(d, Instant::now()).unwrap();
        }
        let _ = c.feed(s.take_outbound());
        assert!(s.established && c.established);
    }

    #[test]
    fn a_psk_handshake_then_data_both_ways_and_a_wrong_key_fails() {
        let ctx = super::super::context().unwrap();
        let cookies = CookieKey::random();
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mut c = Client::psk("dev-psk", b"0123456789abcdef").unwrap();
        let mut s = handshake(&ctx, &cookies, peer, &mut c, psk(b"0123456789abcdef")).unwrap();
        assert_eq!(s.device.as_deref(), Some("dev"));
        let mut got = Vec::new();
        for d in c.write(b"hello") {
            if let Progress::Data(m) = s.feed(d, Instant::now()).unwrap() {
                got.extend(m);
            }
        }
        assert_eq!(got, vec![b"hello".to_vec()]);
        s.write(b"world").unwrap();
        let (_, data) = c.feed(s.take_outbound());
        assert_eq!(data, vec![b"world".to_vec()]);

        // Records that are not the session's are dropped, and it goes on.
        let junk: Vec<Vec<u8>> = vec![
            vec![23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 99, 0, 24, 1, 2, 3],
            [
                &[23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 99, 0, 24][..],
                &[7; 24],
            ]
            .concat(),
            [
                &[22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 98, 0, 4][..],
                &[1, 0, 0, 0],
            ]
            .concat(),
            vec![21, 0xfe, 0xfd],
            Vec::new(),
        ];
        for d in junk {
            assert!(
                !matches!(s.feed(d.clone(), Instant::now()), Ok(Progress::Data(ref m)) if !m.is_empty()),
                "{d:?}"
            );
        }
        let mut got = Vec::new();
        for d in c.write(b"again") {
            if let Progress::Data(m) = s.feed(d, Instant::now()).unwrap() {
                got.extend(m);
            }
        }
        assert_eq!(got, vec![b"again".to_vec()]);

        let mut c = Client::psk("dev-psk", b"0123456789abcdeX").unwrap();
        assert!(handshake(&ctx, &cookies, peer, &mut c, psk(b"0123456789abcdef")).is_err());
        let mut c = Client::psk("dev-psk", b"0123456789abcdef").unwrap();
        assert!(
            handshake(&ctx, &cookies, peer, &mut c, None).is_err(),
            "unknown identity"
        );
    }
}
