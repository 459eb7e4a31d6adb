//! CoAP over UDP (RFC 7252): the 4-byte header, piggybacked responses to confirmable
//! requests, non-confirmable answers to non-confirmable ones, and a reply cache keyed on
//! (peer, message id) so a retransmitted request is answered again without any work.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::AtomicU16;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::block::Capacity;
use super::echo::{AddressCheck, ECHO};
use super::handler::{self, CoapContext};
use super::msg::{codes, FormatError, Message};

/// Message types (RFC 7252 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    Con = 0,
    Non = 1,
    Ack = 2,
    Rst = 3,
}

/// A UDP datagram's header fields and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub mtype: MsgType,
    pub message_id: u16,
    pub msg: Message,
}

/// Blocks over UDP stay at 1024 bytes so a response fits the 1152-byte datagram RFC 7252
/// §4.6 recommends.
pub(super) const UDP_BLOCK: u64 = 1024;
/// EXCHANGE_LIFETIME (RFC 7252 §4.8.2): how long a duplicate may still arrive.
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// Reply cache entries at most; the oldest go first.
const REPLY_CACHE_ENTRIES: usize = 16_384;
/// Most bytes sent to an address not yet verified per byte received from it.
const MAX_AMPLIFICATION: usize = 3;
/// Largest datagram read.
const MAX_DATAGRAM: usize = 2048;

pub fn parse(b: &[u8]) -> Result<Datagram, FormatError> {
    if b.len() < 4 {
        return Err(FormatError::Truncated);
    }
    let version = b[0] >> 6;
    if version != 1 {
        return Err(FormatError::BadVersion(version));
    }
    let mtype = match (b[0] >> 4) & 3 {
        0 => MsgType::Con,
        1 => MsgType::Non,
        2 => MsgType::Ack,
        _ => MsgType::Rst,
    };
    let tkl = (b[0] & 0x0f) as usize;
    if tkl > 8 {
        return Err(FormatError::BadTokenLength(tkl as u8));
    }
    let code = b[1];
    let message_id = u16::from_be_bytes([b[2], b[3]]);
    let token = b.get(4..4 + tkl).ok_or(FormatError::Truncated)?;
    let all = Bytes::copy_from_slice(b);
    let msg = Message::decode_body(code, Bytes::copy_from_slice(token), all.slice(4 + tkl..))?;
    if code == codes::EMPTY && (tkl != 0 || b.len() != 4) {
        // An empty message is exactly the 4-byte header (RFC 7252 §4.1).
        return Err(FormatError::Truncated);
    }
    Ok(Datagram {
        mtype,
        message_id,
        msg,
    })
}

pub fn encode(d: &Datagram) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + d.msg.token.len() + d.msg.body_len());
    b.put_u8((1 << 6) | ((d.mtype as u8) << 4) | d.msg.token.len() as u8);
    b.put_u8(d.msg.code);
    b.put_u16(d.message_id);
    b.put_slice(&d.msg.token);
    d.msg.encode_body(&mut b);
    b.freeze()
}

enum Cached {
    /// Being answered; a duplicate is dropped, the answer will come.
    Pending,
    Done(Bytes),
}

/// Answers by exchange (`K`: the peer and message id, or the session and message id), for
/// EXCHANGE_LIFETIME, so a retransmitted request is answered again without any work.
pub(super) struct ReplyCache<K> {
    map: HashMap<K, (Cached, Instant)>,
    order: VecDeque<(K, Instant)>,
}

impl<K> Default for ReplyCache<K> {
    fn default() -> Self {
        ReplyCache {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> ReplyCache<K> {
    fn evict(&mut self, now: Instant) {
        while let Some((key, at)) = self.order.front().cloned() {
            if self.order.len() <= REPLY_CACHE_ENTRIES && now.duration_since(at) < EXCHANGE_LIFETIME
            {
                break;
            }
            self.order.pop_front();
            if self.map.get(&key).is_some_and(|(_, t)| *t == at) {
                self.map.remove(&key);
            }
        }
    }

    /// The answer to an exchange, once made.
    pub(super) fn done(&mut self, key: &K, bytes: Bytes) {
        if let Some(entry) = self.map.get_mut(key) {
            entry.0 = Cached::Done(bytes);
        }
    }
}

pub(super) enum Lookup {
    Replay(Bytes),
    InFlight,
    New,
}

/// Answers a duplicate from the cache, or marks a new exchange as in flight.
pub(super) fn lookup<K: std::hash::Hash + Eq + Clone>(
    cache: &Mutex<ReplyCache<K>>,
    key: K,
) -> Lookup {
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    c.evict(now);
    match c.map.get(&key) {
        Some((Cached::Done(bytes), _)) => Lookup::Replay(bytes.clone()),
        Some((Cached::Pending, _)) => Lookup::InFlight,
        None => {
            c.map.insert(key.clone(), (Cached::Pending, now));
            c.order.push_back((key, now));
            Lookup::New
        }
    }
}

/// What to do with a datagram that parsed: answer it at once (a ping gets a Reset), drop
/// it (acknowledgements, resets, responses), or serve it as a request.
pub(super) fn triage(d: &Datagram) -> Option<Option<Bytes>> {
    match (d.mtype, d.msg.code) {
        (MsgType::Ack | MsgType::Rst, _) => Some(None),
        // An empty confirmable message is a CoAP ping: answered with a Reset.
        (MsgType::Con, codes::EMPTY) => Some(Some(encode(&Datagram {
            mtype: MsgType::Rst,
            message_id: d.message_id,
            msg: Message::default(),
        }))),
        (_, code) if code >> 5 != 0 || code == codes::EMPTY => Some(None),
        _ => None,
    }
}

/// The Reset a malformed confirmable message gets (RFC 7252 §4.2), if it is one.
pub(super) fn reset_for_malformed(b: &[u8]) -> Option<[u8; 4]> {
    (b.len() >= 4 && (b[0] >> 4) & 3 == 0 && b[0] >> 6 == 1).then(|| [0x70, 0, b[2], b[3]])
}

/// The datagram carrying `resp` to request `d`: piggybacked on the Ack of a confirmable
/// request, a non-confirmable message otherwise.
pub(super) fn answer(d: &Datagram, resp: Message, next_mid: &AtomicU16) -> Bytes {
    let out = match d.mtype {
        MsgType::Con => Datagram {
            mtype: MsgType::Ack,
            message_id: d.message_id,
            msg: resp,
        },
        _ => Datagram {
            mtype: MsgType::Non,
            message_id: next_mid.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            msg: resp,
        },
    };
    encode(&out)
}

/// How long the receiving thread sleeps before looking whether it should stop when no
/// datagram and no wake-up came; stopping normally wakes it at once (see [`Stopper`]).
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves UDP on a thread of its own until `cancel` fires (or the runtime is dropped). The
/// returned task ends when the thread has.
///
/// One thread receives, as libcoap's server does: a datagram wakes it straight from the
/// socket, with no event loop between. A request whose answer needs no waiting (a block
/// of a cached image, a replay, a ping) is answered on this thread, in the same wake-up;
/// one that must wait (a store, a file read) continues as a task on the runtime, tracked by
/// `work`. With tokio's event loop in between, each block cost a wake-up of a runtime
/// worker and often a second one for the worker that took the task, and the time per block
/// spread widely with where the scheduler put them. The thread is not on the runtime's
/// blocking pool, which a dropped runtime waits for.
///
/// With `verify_peers`, an address is served only once it has echoed an Echo value (see
/// [`super::echo`]).
pub fn start(
    socket: std::net::UdpSocket,
    ctx: Arc<CoapContext>,
    verify_peers: bool,
    cancel: CancellationToken,
    work: TaskTracker,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(RECEIVE_TIMEOUT))?;
    let rt = tokio::runtime::Handle::current();
    let stop = CancellationToken::new();
    let stopper = Stopper {
        stop: stop.clone(),
        wake: socket.local_addr().ok().map(loopback_of),
    };
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("coap-udp".into())
        .spawn(move || {
            serve(socket, ctx, verify_peers, stop, work, rt);
            drop(done);
        })?;
    Ok(tokio::spawn(async move {
        // Dropped when shutdown comes, or with this task if the runtime goes first: either
        // way the thread stops.
        let stopper = stopper;
        let mut ended = ended;
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = &mut ended => return,
        }
        drop(stopper);
        let _ = ended.await;
    }))
}

fn serve(
    socket: std::net::UdpSocket,
    ctx: Arc<CoapContext>,
    verify_peers: bool,
    stop: CancellationToken,
    work: TaskTracker,
    rt: tokio::runtime::Handle,
) {
    let check = verify_peers.then(AddressCheck::new);
    let socket = Arc::new(socket);
    let cache = Arc::new(Mutex::new(ReplyCache::<(SocketAddr, u16)>::default()));
    let next_mid = Arc::new(AtomicU16::new(rand_u16()));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let waker = std::task::Waker::noop();
    // Answers are first polled on this thread, in the runtime's context (its timers, its
    // spawns); what is not done by then is a task like any other, polled again with its
    // real waker by the runtime.
    let _context = rt.enter();
    while !stop.is_cancelled() {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(v) => v,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "CoAP UDP receive failed");
                continue;
            }
        };
        let d = match parse(&buf[..n]) {
            Ok(d) => d,
            Err(_) => {
                if let Some(rst) = reset_for_malformed(&buf[..n]) {
                    send(&socket, &rst, peer);
                }
                continue;
            }
        };
        if let Some(reply) = triage(&d) {
            if let Some(bytes) = reply {
                send(&socket, &bytes, peer);
            }
            continue;
        }
        if let Some(check) = &check {
            if !check.admit(peer, d.msg.option(ECHO).map(|e| &e[..])) {
                let reply = encode(&unverified(&d, check.challenge(peer), &next_mid));
                // Never more than three times what came in (RFC 9175 §2.4): a request too
                // small for that (no path, so nothing to serve) is dropped.
                if reply.len() <= MAX_AMPLIFICATION * n {
                    send(&socket, &reply, peer);
                }
                continue;
            }
        }
        let key = (peer, d.message_id);
        match lookup(&cache, key) {
            Lookup::Replay(bytes) => {
                send(&socket, &bytes, peer);
                continue;
            }
            Lookup::InFlight => continue,
            Lookup::New => {}
        }
        let (socket, cache, ctx, next_mid) = (
            Arc::clone(&socket),
            Arc::clone(&cache),
            Arc::clone(&ctx),
            Arc::clone(&next_mid),
        );
        let mut answering = Box::pin(async move {
            let cap = Capacity {
                max_payload: UDP_BLOCK,
                bert: false,
                whole_fits: false,
            };
            let resp = handler::handle(&ctx, &d.msg, cap, handler::Sender::Anyone).await;
            let bytes = answer(&d, resp, &next_mid);
            cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .done(&key, bytes.clone());
            send(&socket, &bytes, peer);
        });
        if answering
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
            .is_pending()
        {
            work.spawn_on(answering, &rt);
        }
    }
}

/// Sends one datagram without waiting: with the socket's send buffer full it is dropped,
/// as the network may drop it anyway, and the peer's retransmission is answered from the
/// reply cache. So a task sending from a runtime worker never blocks it.
fn send(socket: &std::net::UdpSocket, bytes: &[u8], peer: SocketAddr) {
    if let Err(e) =
        socket2::SockRef::from(socket).send_to_with_flags(bytes, &peer.into(), libc::MSG_DONTWAIT)
    {
        tracing::debug!(error = %e, %peer, "CoAP UDP send failed");
    }
}

/// Stops the receiving thread when dropped: marks it to stop, and wakes it with an empty
/// datagram to its socket's address so it need not wait for its receive timeout.
struct Stopper {
    stop: CancellationToken,
    wake: Option<SocketAddr>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.stop.cancel();
        let Some(to) = self.wake else { return };
        let from: SocketAddr = match to {
            SocketAddr::V4(_) => (Ipv4Addr::LOCALHOST, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::LOCALHOST, 0).into(),
        };
        if let Ok(s) = std::net::UdpSocket::bind(from) {
            let _ = s.send_to(&[], to);
        }
    }
}

/// The address a bound socket is reached at from this host: its own, or loopback in place
/// of the unspecified address.
fn loopback_of(mut a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

/// 4.01 Unauthorized with an Echo value and nothing else, to a request from an address not
/// yet verified: only a few bytes more than the request.
fn unverified(d: &Datagram, echo: Bytes, next_mid: &AtomicU16) -> Datagram {
    let mut msg = Message::new(codes::UNAUTHORIZED, d.msg.token.clone());
    msg.push(ECHO, echo);
    let (mtype, message_id) = match d.mtype {
        MsgType::Con => (MsgType::Ack, d.message_id),
        _ => (
            MsgType::Non,
            next_mid.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        ),
    };
    Datagram {
        mtype,
        message_id,
        msg,
    }
}

pub(super) fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    u16::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::super::msg::opt;
    use super::*;

    #[test]
    fn header_golden_and_round_trip() {
        let mut msg = Message::new(codes::GET, Bytes::from_static(b"\x12\x34"));
        msg.push(opt::URI_PATH, &b"fw"[..]);
        let d = Datagram {
            mtype: MsgType::Con,
            message_id: 0xbeef,
            msg,
        };
        let wire = encode(&d);
        assert_eq!(
            &wire[..],
            &[0x42, 0x01, 0xbe, 0xef, 0x12, 0x34, 0xb2, b'f', b'w']
        );
        assert_eq!(parse(&wire).unwrap(), d);
        let ack = Datagram {
            mtype: MsgType::Ack,
            message_id: 7,
            msg: Message::new(codes::CONTENT, Bytes::new()),
        };
        assert_eq!(&encode(&ack)[..], &[0x60, 0x45, 0, 7]);
    }

    #[test]
    fn a_dropped_stopper_wakes_the_receiving_thread() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Far longer than the test may take: only the wake-up can end the receive.
        socket
            .set_read_timeout(Some(Duration::from_secs(600)))
            .unwrap();
        let stop = CancellationToken::new();
        let stopper = Stopper {
            stop: stop.clone(),
            wake: Some(loopback_of(socket.local_addr().unwrap())),
        };
        let receiving = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            socket.recv_from(&mut buf).map(|(n, _)| n)
        });
        drop(stopper);
        assert!(stop.is_cancelled());
        assert_eq!(
            receiving.join().unwrap().unwrap(),
            0,
            "woken by an empty datagram"
        );
    }

    #[test]
    fn the_unspecified_address_is_woken_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:5683".parse().unwrap();
        assert_eq!(loopback_of(v4), "127.0.0.1:5683".parse().unwrap());
        let v6: SocketAddr = "[::]:5683".parse().unwrap();
        assert_eq!(loopback_of(v6), "[::1]:5683".parse().unwrap());
        let bound: SocketAddr = "192.0.2.1:5683".parse().unwrap();
        assert_eq!(loopback_of(bound), bound);
    }

    #[test]
    fn malformed_datagrams() {
        assert_eq!(parse(&[0x40, 1, 0]), Err(FormatError::Truncated));
        assert_eq!(parse(&[0x80, 1, 0, 0]), Err(FormatError::BadVersion(2)));
        assert_eq!(parse(&[0x49, 1, 0, 0]), Err(FormatError::BadTokenLength(9)));
        assert_eq!(parse(&[0x42, 1, 0, 0, 1]), Err(FormatError::Truncated));
        assert_eq!(
            parse(&[0x40, 0, 0, 0, 0xff]),
            Err(FormatError::EmptyPayload)
        );
        assert!(parse(&[0x40, 0, 0, 0]).is_ok());
        assert!(parse(&[0x41, 0, 0, 0, 9]).is_err());
    }
}
