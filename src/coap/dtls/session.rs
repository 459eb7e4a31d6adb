//! One DTLS session: an OpenSSL `SSL` fed datagram by datagram through an in-memory pipe, so
//! one UDP socket and one task serve every peer. OpenSSL never sees a ClientHello whose
//! cookie the listener has not checked; a new session replays the cookie exchange from the
//! checked ClientHello (`hello::first_client_hello`), so OpenSSL's handshake state and
//! transcript are those of a server that answered the first hello itself.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::OnceLock;
use std::time::Instant;

use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslStream};

use super::hello::ClientHello;

/// Largest datagram OpenSSL writes: records fit a 1280-byte IPv6 path with room for the
/// UDP and IP headers.
pub const MTU: u32 = 1200;
/// Largest plaintext record read: a datagram's worth (on the stack, per datagram).
pub const MAX_RECORD: usize = 2048;

/// Datagrams in and out of one session's OpenSSL: each read takes one datagram, each write
/// is one datagram.
#[derive(Default)]
pub struct Pipe {
    inbound: VecDeque<Vec<u8>>,
    outbound: Vec<Vec<u8>>,
}

impl Pipe {
    pub fn push(&mut self, datagram: Vec<u8>) {
        self.inbound.push_back(datagram);
    }

    pub fn take(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.outbound)
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(d) = self.inbound.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.outbound.push(b.to_vec());
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A device's pre-shared key, as the handshake uses it.
#[derive(Clone)]
pub struct Psk {
    pub identity: String,
    pub device: String,
    pub key: Vec<u8>,
}

/// What the callbacks of the shared `SslContext` read from the session they run for.
pub struct Secrets {
    /// The cookie the listener made for this peer and ClientHello.
    pub cookie: Vec<u8>,
    /// The pre-shared key of the identity the client named, once looked up.
    pub psk: std::sync::Mutex<Option<Psk>>,
}

impl Secrets {
    pub fn psk(&self) -> Option<Psk> {
        self.psk.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The index of [`Secrets`] in each `SSL`.
pub fn secrets_index() -> Result<Index<Ssl, Secrets>, ErrorStack> {
    static INDEX: OnceLock<Index<Ssl, Secrets>> = OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index()?;
    Ok(*INDEX.get_or_init(|| i))
}

/// How a datagram moved a session along.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Still shaking hands (or nothing new).
    Handshaking,
    /// The handshake finished with this datagram.
    Established,
    /// Application data: CoAP messages, one per record.
    Data(Vec<Vec<u8>>),
}

/// The session failed: bad handshake, wrong key, fatal alert, or the peer closed it.
#[derive(Debug)]
pub struct Failed(pub String);

pub struct Session {
    stream: SslStream<Pipe>,
    /// The ClientHello random of the handshake that made it (a retransmitted ClientHello
    /// goes to the session; another starts a new one).
    pub random: [u8; 32],
    pub established: bool,
    /// The device its pre-shared key belongs to.
    pub device: Option<String>,
    pub started: Instant,
    pub last_heard: Instant,
    /// Datagrams that arrived while its PSK was looked up (the ClientKeyExchange first),
    /// fed in order once it is; `None` when no lookup is under way.
    pub held: Option<Vec<Vec<u8>>>,
    /// Its client's PSK identity was looked up already.
    pub psk_looked_up: bool,
    /// Distinguishes sessions of one address over time.
    pub id: u64,
}

fn failed(e: openssl::ssl::Error) -> Failed {
    Failed(match e.ssl_error() {
        Some(stack) => stack.to_string(),
        None => e.to_string(),
    })
}

impl Session {
    /// A session for the (cookie-checked) ClientHello `ch`, with the datagrams to send.
    pub fn accept(
        ctx: &SslContext,
        ch: &ClientHello<'_>,
        id: u64,
        now: Instant,
    ) -> Result<(Session, Vec<Vec<u8>>), Failed> {
        let stack = |e: ErrorStack| Failed(e.to_string());
        let mut ssl = Ssl::new(ctx).map_err(stack)?;
        ssl.set_mtu(MTU).map_err(stack)?;
        ssl.set_ex_data(
            secrets_index().map_err(stack)?,
            Secrets {
                cookie: ch.datagram[ch.cookie.clone()].to_vec(),
                psk: Default::default(),
            },
        );
        let mut stream = SslStream::new(ssl, Pipe::default()).map_err(stack)?;
        // The exchange the listener did statelessly, replayed: OpenSSL answers the first
        // hello with a HelloVerifyRequest, which was sent already.
        stream
            .get_mut()
            .inbound
            .push_back(super::hello::first_client_hello(ch));
        match stream.accept() {
            Ok(()) => return Err(Failed("handshake ended on the first hello".into())),
            Err(e) if e.code() == ErrorCode::WANT_READ => {}
            Err(e) => return Err(failed(e)),
        }
        stream.get_mut().outbound.clear();
        let mut s = Session {
            stream,
            random: ch.random,
            established: false,
            device: None,
            started: now,
            last_heard: now,
            held: None,
            psk_looked_up: false,
            id,
        };
        s.feed(ch.datagram.to_vec(), now)?;
        let out = s.take_outbound();
        Ok((s, out))
    }

    /// Whether the suite chosen for this handshake takes a pre-shared key (or none is known
    /// yet).
    pub fn psk_suite(&self) -> bool {
        self.stream
            .ssl()
            .current_cipher()
            .is_none_or(|c| c.name().starts_with("PSK"))
    }

    /// Gives the session the key for the identity its client named (or none: unknown).
    pub fn set_psk(&mut self, psk: Option<Psk>) {
        if let Ok(i) = secrets_index() {
            if let Some(s) = self.stream.ssl().ex_data(i) {
                *s.psk.lock().unwrap_or_else(|e| e.into_inner()) = psk;
            }
        }
    }

    /// Feeds one datagram; what it moved (datagrams to send wait in [`Session::take_outbound`]).
    pub fn feed(&mut self, d: Vec<u8>, now: Instant) -> Result<Progress, Failed> {
        self.last_heard = now;
        self.stream.get_mut().inbound.push_back(d);
        if !self.established {
            match self.stream.do_handshake() {
                Ok(()) => {
                    self.established = true;
                    self.device = self.proven_device();
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => return Ok(Progress::Handshaking),
                Err(e) => return Err(failed(e)),
            }
            // Records behind the Finished in the same datagram are read below.
            if self.stream.get_ref().inbound.is_empty() {
                return Ok(Progress::Established);
            }
        }
        let mut data = Vec::new();
        let mut buf = [0u8; MAX_RECORD];
        loop {
            match self.stream.ssl_read(&mut buf) {
                Ok(n) => data.push(buf[..n].to_vec()),
                Err(e) if e.code() == ErrorCode::WANT_READ => break,
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                    return Err(Failed("closed by the peer".into()))
                }
                // A record that does not decrypt is dropped by OpenSSL without an error;
                // anything else ends the session.
                Err(e) => return Err(failed(e)),
            }
        }
        Ok(Progress::Data(data))
    }

    /// The device the handshake proved: the one whose pre-shared key it used, or the one a
    /// verified client certificate names by its subject's common name.
    fn proven_device(&self) -> Option<String> {
        let ssl = self.stream.ssl();
        let i = secrets_index().ok()?;
        if let Some(p) = ssl.ex_data(i).and_then(Secrets::psk) {
            return Some(p.device);
        }
        let cert = ssl.peer_certificate()?;
        if ssl.verify_result() != openssl::x509::X509VerifyResult::OK {
            return None;
        }
        let cn = cert
            .subject_name()
            .entries_by_nid(openssl::nid::Nid::COMMONNAME)
            .next()?
            .data()
            .to_string()
            .ok()?;
        crate::fota::check_device(&cn).ok().map(|()| cn)
    }

    /// Encrypts one CoAP message as one record.
    pub fn write(&mut self, plaintext: &[u8]) -> Result<(), Failed> {
        self.stream.ssl_write(plaintext).map(|_| ()).map_err(failed)
    }

    /// Lets OpenSSL retransmit its last flight when its timer ran out (RFC 6347 §4.2.4).
    pub fn tick(&mut self) -> Result<(), Failed> {
        if self.established {
            return Ok(());
        }
        match self.stream.do_handshake() {
            Ok(()) => {
                self.established = true;
                self.device = self.proven_device();
                Ok(())
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => Ok(()),
            Err(e) => Err(failed(e)),
        }
    }

    /// Datagrams OpenSSL wrote since the last call.
    pub fn take_outbound(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.stream.get_mut().outbound)
    }
}
