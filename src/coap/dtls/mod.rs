//! CoAP over DTLS 1.2 (`coaps://`, RFC 7252 §9): one UDP socket and one task for every
//! peer, with pre-shared keys from the device registry.
//!
//! **Why OpenSSL.** rustls has no DTLS. The candidates were:
//! - the `openssl` crate over the system's OpenSSL: the DTLS stack libcoap's `-openssl`
//!   builds use, so it interoperates with the clients devices are tested against; every
//!   suite CoAP names (`TLS_PSK_WITH_AES_128_CCM_8` and `TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8`,
//!   mandatory, and their GCM variants); security fixes come with the distribution's
//!   libssl. It does not expose `DTLSv1_listen` or `DTLSv1_handle_timeout`, and OpenSSL 3.0
//!   has no Connection ID (RFC 9146): a device whose NAT rebinds handshakes again.
//! - `dimpl` (sans-I/O, pure Rust, DTLS 1.2 and 1.3): fits one socket well, but offers no
//!   `TLS_PSK_WITH_AES_128_GCM_SHA256` and no `TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8`.
//! - `webrtc-dtls` / `rtc-dtls` (pure Rust, every suite above): built for WebRTC, one
//!   connection object per peer with its own tasks (webrtc-dtls) or a young sans-I/O API that
//!   changed with each release (rtc-dtls), and a large tree (rustls, ring, rcgen,
//!   x509-parser) for what OpenSSL gives.
//!
//! The two things the crate does not expose are done here in safe code: the cookie exchange
//! is answered statelessly before OpenSSL sees anything (`hello`), and OpenSSL's retransmit
//! timer runs when a tick calls into a session still shaking hands (`session`).
//!
//! **Identity.** The PSK identity names a device's key in the registry; it is read from the
//! ClientKeyExchange and looked up before OpenSSL asks for the key, and the session then acts
//! as that device: its work requests and reports need no token, and it cannot report on
//! another device's task.

pub mod client;
pub mod hello;
pub mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU16;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use openssl::ssl::{SslContext, SslContextBuilder, SslMethod, SslOptions, SslVersion};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::block::Capacity;
use super::handler::{self, CoapContext, Sender};
use super::udp::{self, lookup, Lookup, ReplyCache};
use hello::{CookieKey, COOKIE_SLOT_SECS};
use session::{Failed, Progress, Session};

/// Cipher suites offered, in OpenSSL's names: the two CoAP requires (RFC 7252 §9.1.3.1,
/// §9.1.3.2.1) and their GCM variants.
const CIPHERS: &str =
    "PSK-AES128-CCM8:PSK-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256";
/// Largest datagram read.
const MAX_DATAGRAM: usize = 2048;
/// Datagrams kept at most while a session's key is looked up.
const HELD: usize = 8;
/// How often sessions still shaking hands get a chance to retransmit, and idle ones are let go.
const TICK: Duration = Duration::from_millis(200);

/// What the listener allows.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_handshakes: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

/// The OpenSSL context every session shares: DTLS 1.2 only, the suites above, pre-shared
/// keys from each session's looked-up key, and cookies checked by the listener.
pub fn context() -> Result<SslContext, openssl::error::ErrorStack> {
    builder().map(SslContextBuilder::build)
}

/// [`context`] with the server's certificate chain and key (PEM files, the same ones
/// `coaps+tcp` uses), so the ECDHE-ECDSA suites are offered too.
/// With `client_ca`, a client may present a certificate signed by one of those CAs; one that
/// does not verify fails the handshake, none at all is fine (PSK, or no device identity).
pub fn context_with_certificate(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> Result<SslContext, openssl::error::ErrorStack> {
    let mut b = builder()?;
    b.set_certificate_chain_file(cert)?;
    b.set_private_key_file(key, openssl::ssl::SslFiletype::PEM)?;
    b.check_private_key()?;
    if let Some(ca) = client_ca {
        b.set_ca_file(ca)?;
        b.set_verify(openssl::ssl::SslVerifyMode::PEER);
    }
    Ok(b.build())
}

fn builder() -> Result<SslContextBuilder, openssl::error::ErrorStack> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_cipher_list(CIPHERS)?;
    b.set_options(SslOptions::COOKIE_EXCHANGE | SslOptions::NO_TICKET);
    b.set_psk_server_callback(|ssl, identity, key| {
        let secrets = session::secrets_index()?;
        let found = ssl.ex_data(secrets).and_then(session::Secrets::psk);
        // The key looked up for the identity the ClientKeyExchange named; none is an
        // unknown identity, and the handshake fails.
        match found {
            Some(p) if Some(p.identity.as_bytes()) == identity && p.key.len() <= key.len() => {
                key[..p.key.len()].copy_from_slice(&p.key);
                Ok(p.key.len())
            }
            _ => Ok(0),
        }
    });
    b.set_cookie_generate_cb(|ssl, out| {
        let secrets = session::secrets_index()?;
        let cookie = ssl
            .ex_data(secrets)
            .map(|s| s.cookie.clone())
            .unwrap_or_default();
        let n = cookie.len().min(out.len());
        out[..n].copy_from_slice(&cookie[..n]);
        Ok(n)
    });
    // Only ClientHellos whose cookie the listener checked reach a session.
    b.set_cookie_verify_cb(|ssl, got| {
        session::secrets_index()
            .ok()
            .and_then(|i| ssl.ex_data(i))
            .is_some_and(|s| s.cookie == got)
    });
    Ok(b)
}

/// What comes back to the listener's task from work it spawned.
enum Done {
    /// A PSK identity looked up: the device and key, or nothing.
    Key {
        peer: SocketAddr,
        session: u64,
        found: Option<session::Psk>,
    },
    /// A CoAP response to encrypt and send.
    Reply {
        peer: SocketAddr,
        session: u64,
        bytes: Bytes,
    },
}

fn slot_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / COOKIE_SLOT_SECS)
}

struct Listener {
    socket: Arc<UdpSocket>,
    ctx: Arc<CoapContext>,
    tls: SslContext,
    cookies: CookieKey,
    limits: Limits,
    sessions: HashMap<SocketAddr, Session>,
    next_id: u64,
    done_tx: mpsc::Sender<Done>,
    cache: Arc<Mutex<ReplyCache<(u64, u16)>>>,
    next_mid: Arc<AtomicU16>,
    work: TaskTracker,
}

/// Serves CoAP over DTLS on `socket` until `cancel` fires.
pub async fn serve(
    socket: UdpSocket,
    ctx: Arc<CoapContext>,
    tls: SslContext,
    limits: Limits,
    cancel: CancellationToken,
    work: TaskTracker,
) {
    let (done_tx, mut done_rx) = mpsc::channel(1024);
    let mut l = Listener {
        socket: Arc::new(socket),
        ctx,
        tls,
        cookies: CookieKey::random(),
        limits,
        sessions: HashMap::new(),
        next_id: 0,
        done_tx,
        cache: Arc::new(Mutex::new(ReplyCache::default())),
        next_mid: Arc::new(AtomicU16::new(udp::rand_u16())),
        work,
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = l.socket.recv_from(&mut buf) => match r {
                Ok((n, peer)) => l.datagram(peer, &buf[..n]).await,
                Err(e) => tracing::debug!(error = %e, "DTLS receive failed"),
            },
            Some(done) = done_rx.recv() => l.done(done).await,
            _ = tick.tick() => l.tick().await,
        }
    }
}

impl Listener {
    async fn send(&self, peer: SocketAddr, datagrams: Vec<Vec<u8>>) {
        for d in datagrams {
            let _ = self.socket.send_to(&d, peer).await;
        }
    }

    fn handshakes(&self) -> usize {
        self.sessions.values().filter(|s| !s.established).count()
    }

    async fn datagram(&mut self, peer: SocketAddr, d: &[u8]) {
        let now = Instant::now();
        if let Some(ch) = hello::client_hello(d) {
            // A retransmitted ClientHello goes to the handshake it started.
            if let Some(s) = self.sessions.get_mut(&peer) {
                if !s.established && s.random == ch.random {
                    let r = s.feed(d.to_vec(), now);
                    self.after(peer, r).await;
                    return;
                }
            }
            let slot = slot_now();
            if !self.cookies.verify(peer, &ch, slot) {
                let cookie = self.cookies.cookie(peer, &ch.random, slot);
                let _ = self
                    .socket
                    .send_to(&hello::hello_verify_request(&ch, &cookie), peer)
                    .await;
                return;
            }
            // A new handshake from an address replaces its session.
            self.sessions.remove(&peer);
            if self.sessions.len() >= self.limits.max_sessions
                || self.handshakes() >= self.limits.max_handshakes
            {
                tracing::debug!(%peer, "DTLS handshake refused: limits reached");
                return;
            }
            self.next_id += 1;
            match Session::accept(&self.tls, &ch, self.next_id, now) {
                Ok((s, out)) => {
                    self.sessions.insert(peer, s);
                    self.send(peer, out).await;
                }
                Err(Failed(why)) => tracing::debug!(%peer, why, "DTLS handshake failed"),
            }
            return;
        }
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if let Some(held) = &mut s.held {
            // The rest of the flight, behind the ClientKeyExchange, until the key is there.
            if held.len() < HELD {
                held.push(d.to_vec());
            }
            return;
        }
        if !s.established && !s.psk_looked_up && s.psk_suite() {
            if let Some(identity) = hello::psk_identity(d) {
                let identity = String::from_utf8_lossy(identity).into_owned();
                s.psk_looked_up = true;
                s.held = Some(vec![d.to_vec()]);
                let (ctx, tx, session) = (Arc::clone(&self.ctx), self.done_tx.clone(), s.id);
                self.work.spawn(async move {
                    let found = match ctx.engine.device_psk(&identity).await {
                        Ok(found) => found.map(|(device, key)| session::Psk {
                            identity,
                            device,
                            key,
                        }),
                        Err(e) => {
                            tracing::warn!(error = %e, "DTLS key lookup failed");
                            None
                        }
                    };
                    let _ = tx
                        .send(Done::Key {
                            peer,
                            session,
                            found,
                        })
                        .await;
                });
                return;
            }
        }
        let r = s.feed(d.to_vec(), now);
        self.after(peer, r).await;
    }

    /// Sends what a session wrote, serves what it received, and drops it when it failed.
    async fn after(&mut self, peer: SocketAddr, r: Result<Progress, Failed>) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        let out = s.take_outbound();
        let (session, device) = (s.id, s.device.clone());
        self.send(peer, out).await;
        match r {
            Ok(Progress::Data(messages)) => {
                for m in messages {
                    self.request(peer, session, device.clone(), m).await;
                }
            }
            Ok(Progress::Established) => {
                tracing::debug!(%peer, device = device.as_deref().unwrap_or(""), "DTLS session established");
            }
            Ok(Progress::Handshaking) => {}
            Err(Failed(why)) => {
                tracing::debug!(%peer, why, "DTLS session ended");
                self.sessions.remove(&peer);
            }
        }
    }

    /// One CoAP message from a session: answered at once, dropped, or served on `work`.
    async fn request(
        &mut self,
        peer: SocketAddr,
        session: u64,
        device: Option<String>,
        m: Vec<u8>,
    ) {
        let d = match udp::parse(&m) {
            Ok(d) => d,
            Err(_) => {
                if let Some(rst) = udp::reset_for_malformed(&m) {
                    self.reply(peer, &rst).await;
                }
                return;
            }
        };
        if let Some(reply) = udp::triage(&d) {
            if let Some(bytes) = reply {
                self.reply(peer, &bytes).await;
            }
            return;
        }
        let key = (session, d.message_id);
        match lookup(&self.cache, key) {
            Lookup::Replay(bytes) => return self.reply(peer, &bytes).await,
            Lookup::InFlight => return,
            Lookup::New => {}
        }
        let (ctx, cache, next_mid, tx) = (
            Arc::clone(&self.ctx),
            Arc::clone(&self.cache),
            Arc::clone(&self.next_mid),
            self.done_tx.clone(),
        );
        self.work.spawn(async move {
            let cap = Capacity {
                max_payload: udp::UDP_BLOCK,
                bert: false,
                whole_fits: false,
            };
            let sender = match &device {
                Some(d) => Sender::Device(d),
                None => Sender::Anyone,
            };
            let resp = handler::handle(&ctx, &d.msg, cap, sender).await;
            let bytes = udp::answer(&d, resp, &next_mid);
            cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .done(&key, bytes.clone());
            let _ = tx
                .send(Done::Reply {
                    peer,
                    session,
                    bytes,
                })
                .await;
        });
    }

    /// Encrypts `bytes` for the peer's session and sends it.
    async fn reply(&mut self, peer: SocketAddr, bytes: &[u8]) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if let Err(Failed(why)) = s.write(bytes) {
            tracing::debug!(%peer, why, "DTLS write failed");
            self.sessions.remove(&peer);
            return;
        }
        let out = s.take_outbound();
        self.send(peer, out).await;
    }

    async fn done(&mut self, done: Done) {
        match done {
            Done::Key {
                peer,
                session,
                found,
            } => {
                let Some(s) = self.sessions.get_mut(&peer).filter(|s| s.id == session) else {
                    return;
                };
                s.set_psk(found);
                for d in s.held.take().unwrap_or_default() {
                    let Some(s) = self.sessions.get_mut(&peer) else {
                        return;
                    };
                    let r = s.feed(d, Instant::now());
                    self.after(peer, r).await;
                }
            }
            Done::Reply {
                peer,
                session,
                bytes,
            } => {
                if self.sessions.get(&peer).is_some_and(|s| s.id == session) {
                    self.reply(peer, &bytes).await;
                }
            }
        }
    }

    /// Retransmits flights whose timer ran out, and lets go of handshakes past their
    /// deadline and sessions idle past theirs.
    async fn tick(&mut self) {
        let now = Instant::now();
        let limits = self.limits.clone();
        self.sessions.retain(|_, s| {
            if s.established {
                now.duration_since(s.last_heard) < limits.idle_timeout
            } else {
                now.duration_since(s.started) < limits.handshake_timeout
            }
        });
        let shaking: Vec<SocketAddr> = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.established && s.held.is_none())
            .map(|(p, _)| *p)
            .collect();
        for peer in shaking {
            if let Some(s) = self.sessions.get_mut(&peer) {
                let r = s.tick().map(|()| Progress::Handshaking);
                self.after(peer, r).await;
            }
        }
        self.ctx
            .metrics
            .set_dtls(self.sessions.len() as u64, self.handshakes() as u64);
    }
}
