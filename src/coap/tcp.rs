//! CoAP over TCP and TLS (RFC 8323): the listener, connection limits, and one task per
//! connection running CSM exchange, signaling and requests.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::block::Capacity;
use super::handler::{self, CoapContext, RESPONSE_OVERHEAD};
use super::msg::{codes, decode_uint, is_critical, Message};
use super::tcp_codec::{frame_len, CodecError, TcpCodec};
use super::tcp_io::FrameIo;

/// Our Max-Message-Size: requests are small (GETs and reports), so 8 KiB bounds each
/// connection's read buffer while leaving room for any option a client may send.
pub const OUR_MAX_MESSAGE_SIZE: usize = 8192;
/// A peer's Max-Message-Size until its CSM says otherwise (RFC 8323 §5.3.1).
const DEFAULT_PEER_MAX: u64 = 1152;
/// Largest response we build regardless of the peer's limit: bounds per-connection memory.
const OUR_MAX_RESPONSE: u64 = 1 << 20;

/// CSM option numbers (RFC 8323 §5.3).
const CSM_MAX_MESSAGE_SIZE: u16 = 2;
const CSM_BLOCK_WISE: u16 = 4;
/// Abort's Bad-CSM-Option (RFC 8323 §5.6).
const ABORT_BAD_CSM_OPTION: u16 = 2;

/// Limits that keep thousands of connections affordable.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// Accepts connections until `cancel` fires; `tls` wraps each stream when set. Each
/// connection runs on `work`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<CoapContext>,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cancel: CancellationToken,
    work: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "CoAP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, "CoAP connection refused: max_connections reached");
            work.spawn(refuse(stream));
            continue;
        };
        let (ctx, limits, tls, cancel) = (
            Arc::clone(&ctx),
            limits.clone(),
            tls.clone(),
            cancel.clone(),
        );
        work.spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(stream, &ctx, &limits, cancel).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.idle_timeout, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(s)) => connection(s, &ctx, &limits, cancel).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn refuse(stream: tokio::net::TcpStream) {
    let mut framed = Framed::new(stream, TcpCodec::new(OUR_MAX_MESSAGE_SIZE));
    let _ = framed.send(&csm()).await;
    let mut abort = Message::new(codes::ABORT, Bytes::new());
    abort.payload = Bytes::from_static(b"too many connections");
    let _ = framed.send(&abort).await;
}

fn csm() -> Message {
    let mut m = Message::new(codes::CSM, Bytes::new());
    m.push_uint(CSM_MAX_MESSAGE_SIZE, OUR_MAX_MESSAGE_SIZE as u64);
    m.push(CSM_BLOCK_WISE, Bytes::new());
    m
}

/// What the peer's CSM told us.
struct Peer {
    max_message_size: u64,
    block_wise: bool,
}

impl Peer {
    fn capacity(&self) -> Capacity {
        let max = self.max_message_size.min(OUR_MAX_RESPONSE);
        Capacity {
            max_payload: max.saturating_sub(RESPONSE_OVERHEAD),
            bert: self.block_wise,
            whole_fits: true,
        }
    }
}

enum Next {
    Continue,
    Close,
}

/// Runs one connection to its end.
pub async fn connection<S>(stream: S, ctx: &CoapContext, limits: &Limits, cancel: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut framed = FrameIo::new(stream, OUR_MAX_MESSAGE_SIZE);
    // libcoap's client sends nothing until it has our CSM (RFC 8323 §5.3: send it at once).
    if framed.send(&csm()).await.is_err() {
        return;
    }
    let mut peer = Peer {
        max_message_size: DEFAULT_PEER_MAX,
        block_wise: false,
    };
    // RFC 8323 §5.3: the CSM must be the peer's first message, and a missing one is a
    // connection error. Every client tested (libcoap, aiocoap) sends it at once, so a request
    // before it is refused with Abort rather than served on assumed defaults.
    let mut csm_seen = false;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => {
                let _ = framed.send(&Message::new(codes::RELEASE, Bytes::new())).await;
                return;
            }
            r = tokio::time::timeout(limits.idle_timeout, framed.next()) => r,
        };
        let msg = match next {
            Err(_) => {
                let mut release = Message::new(codes::RELEASE, Bytes::new());
                release.payload = Bytes::from_static(b"idle timeout");
                let _ = framed.send(&release).await;
                return;
            }
            Ok(None) => return,
            Ok(Some(Err(CodecError::Io(_)))) => return,
            Ok(Some(Err(CodecError::Format(e)))) => {
                let mut abort = Message::new(codes::ABORT, Bytes::new());
                abort.payload = Bytes::from(format!("malformed message: {e}"));
                let _ = framed.send(&abort).await;
                return;
            }
            Ok(Some(Ok(m))) => m,
        };
        if !csm_seen && msg.code != codes::EMPTY {
            if msg.code != codes::CSM {
                let mut abort = Message::new(codes::ABORT, Bytes::new());
                abort.payload = Bytes::from_static(b"the first message must be a CSM");
                let _ = framed.send(&abort).await;
                return;
            }
            csm_seen = true;
        }
        let reply = match msg.code >> 5 {
            7 => match signal(&msg, &mut peer) {
                (reply, Next::Close) => {
                    if let Some(r) = reply {
                        let _ = framed.send(&r).await;
                    }
                    return;
                }
                (reply, Next::Continue) => reply,
            },
            0 if msg.code == codes::EMPTY => None, // RFC 8323 §3.4: ignored
            0 => {
                let mut resp =
                    handler::handle(ctx, &msg, peer.capacity(), handler::Sender::Anyone).await;
                if frame_len(&resp) as u64 > peer.max_message_size {
                    // A peer announcing less than our header and options needs leaves no room
                    // for even a 16-byte block: answer 5.00 bare rather than exceed its limit.
                    resp = handler::error(&msg, codes::INTERNAL_SERVER_ERROR, "response too large");
                    resp.payload = Bytes::new();
                }
                Some(resp)
            }
            _ => None, // responses to requests we never sent
        };
        if let Some(r) = reply {
            if framed.send(&r).await.is_err() {
                return;
            }
        }
    }
}

/// Handles a signaling message (RFC 8323 §5).
fn signal(msg: &Message, peer: &mut Peer) -> (Option<Message>, Next) {
    match msg.code {
        codes::CSM => {
            for (n, v) in &msg.options {
                match *n {
                    CSM_MAX_MESSAGE_SIZE => peer.max_message_size = decode_uint(v),
                    CSM_BLOCK_WISE => peer.block_wise = true,
                    n if is_critical(n) => {
                        let mut abort = Message::new(codes::ABORT, Bytes::new());
                        abort.push_uint(ABORT_BAD_CSM_OPTION, n as u64);
                        abort.payload = Bytes::from(format!("unsupported critical CSM option {n}"));
                        return (Some(abort), Next::Close);
                    }
                    _ => {}
                }
            }
            (None, Next::Continue)
        }
        codes::PING => (
            Some(Message::new(codes::PONG, msg.token.clone())),
            Next::Continue,
        ),
        codes::PONG => (None, Next::Continue),
        codes::RELEASE | codes::ABORT => (None, Next::Close),
        _ => {
            let mut abort = Message::new(codes::ABORT, Bytes::new());
            abort.payload = Bytes::from_static(b"unknown signaling code");
            (Some(abort), Next::Close)
        }
    }
}
