//! Serving HTTP/1.1 connections with the limits a public listener needs: a cap on connections
//! at once, a deadline for each request's headers, an idle deadline for kept-alive
//! connections, and progress deadlines for request bodies and for responses the client does
//! not take. Without them, clients that open connections and trickle bytes (slowloris) hold
//! descriptors and memory for ever.
//!
//! Each connection has an [`Activity`]: its IO wrapper notes bytes read and writes that wait
//! on the client, its service notes requests starting and their responses ending, and a
//! watchdog beside the connection closes it when the deadline of its current phase passes.
//! Nothing wakes the watchdog when a phase begins (that was a wake-up and a timer per
//! request): every deadline lies at least the shortest limit after the event that starts it,
//! so a watchdog that wakes at the deadline it knows, and at least once per shortest limit,
//! finds each deadline on time.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::serve::Listener;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::app::App;
use crate::config::HttpConfig;
use crate::metrics::{Cut, Metrics};

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read: Duration,
    pub idle: Duration,
    pub body: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub fn from_config(c: &HttpConfig) -> Limits {
        Limits {
            header_read: c.header_read_timeout.0,
            idle: c.idle_timeout.0,
            body: c.body_timeout.0,
            max_connections: c.max_connections as usize,
        }
    }
}

/// Serves `listener` until `cancel` fires, then lets each connection finish the exchange it
/// is in. Dropping the returned future (an abort after the shutdown grace) closes them all.
/// The scheme of the listener a request came in on (`http` or `https`), in its extensions,
/// for answers that link back to the service (the hawkBit device API's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerScheme(pub &'static str);

/// `slots` caps the connections served at once, shared by the listener's serving threads
/// (`limits.max_connections` of them).
pub async fn serve<L: Listener>(
    mut listener: L,
    scheme: &'static str,
    app: App,
    limits: Limits,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        // At the cap, one accepted connection waits here for a slot and the next ones in the
        // kernel's backlog. The connection comes first: a slot taken while waiting for one
        // would be held from the listener's other threads, whose backlogs may have some.
        let (io, _peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = Arc::clone(&slots).acquire_owned() => p.expect("the semaphore is never closed"),
        };
        while connections.try_join_next().is_some() {}
        let (app, cancel, metrics) = (app.clone(), cancel.clone(), Arc::clone(&metrics));
        connections.spawn(async move {
            connection(io, scheme, app, limits, metrics, cancel).await;
            drop(permit);
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// What a connection is doing, for its watchdog.
struct Activity {
    state: Mutex<State>,
    /// Mirrors `State::write_blocked.is_some()`, so a write that did not wait takes no lock.
    write_waiting: AtomicBool,
}

struct State {
    /// Requests whose responses have not ended (HTTP/1.1 serves one at a time).
    in_flight: usize,
    /// When the connection became idle: accepted, or its last response ended.
    idle_since: Instant,
    /// Whether a request has been served (the first one's headers count from accept).
    served: bool,
    /// The first byte of the next request's headers, while they are being read.
    head_started: Option<Instant>,
    /// Since when a write has waited for the client to take bytes.
    write_blocked: Option<Instant>,
    /// The request head being read, kept to check its framing headers.
    head: HeadScan,
}

/// Finds request heads that carry both `Content-Length` and `Transfer-Encoding` (RFC 9112
/// §6.3, the request smuggling vector). hyper resolves them by taking chunked and closing the
/// connection after; fwrepo refuses them (400) instead. The scanner follows the byte stream
/// as hyper reads it: a head, then as many body bytes as its Content-Length says, then the
/// next head. A chunked body is not followed; the scan starts again at the next point the
/// connection is known to be between requests (the first bytes after a response ended).
struct HeadScan {
    at: Scan,
    /// For each head scanned and not yet served: whether it had both framing headers.
    conflicts: std::collections::VecDeque<bool>,
}

enum Scan {
    /// Bytes of a head so far.
    Head(Vec<u8>),
    /// Body bytes still to come before the next head.
    Body(u64),
    /// Inside a chunked body: not followed.
    Lost,
}

/// Longest head scanned; hyper refuses longer ones itself.
const MAX_SCANNED_HEAD: usize = 64 << 10;

impl HeadScan {
    fn new() -> HeadScan {
        HeadScan {
            at: Scan::Head(Vec::new()),
            conflicts: std::collections::VecDeque::new(),
        }
    }

    fn restart_if_lost(&mut self) {
        if matches!(self.at, Scan::Lost) {
            self.at = Scan::Head(Vec::new());
            self.conflicts.clear();
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.at {
                Scan::Lost => return,
                Scan::Body(left) => {
                    let k = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= k as u64;
                    data = &data[k..];
                    if *left == 0 {
                        self.at = Scan::Head(Vec::new());
                    }
                }
                Scan::Head(bytes) => {
                    if bytes.is_empty() {
                        // Empty lines before a request line are allowed (RFC 9112 §2.2).
                        let blank = data.iter().take_while(|b| matches!(b, b'\r' | b'\n'));
                        data = &data[blank.count()..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let had = bytes.len();
                    // The common case, a whole head in one read, is scanned where it lies.
                    let whole = if had == 0 { head_end(data) } else { None };
                    let (head, used) = match whole {
                        Some(end) => (&data[..end], end),
                        None => {
                            let take = data.len().min(MAX_SCANNED_HEAD.saturating_sub(had));
                            bytes.extend_from_slice(&data[..take]);
                            let from = had.saturating_sub(3);
                            let Some(end) = head_end(&bytes[from..]) else {
                                if bytes.len() >= MAX_SCANNED_HEAD {
                                    self.at = Scan::Lost;
                                }
                                return;
                            };
                            (&bytes[..from + end], from + end - had)
                        }
                    };
                    let f = framing(head);
                    self.conflicts
                        .push_back(f.length.is_some() && f.transfer_encoding);
                    data = &data[used..];
                    self.at = match f.length {
                        _ if f.transfer_encoding => Scan::Lost,
                        Some(n) if n > 0 => Scan::Body(n),
                        // A Content-Length hyper will refuse: nothing to follow.
                        None if f.has_length => Scan::Lost,
                        _ => match std::mem::replace(&mut self.at, Scan::Lost) {
                            // The buffer is kept for the next head.
                            Scan::Head(mut b) => {
                                b.clear();
                                Scan::Head(b)
                            }
                            _ => Scan::Head(Vec::new()),
                        },
                    };
                }
            }
        }
    }
}

/// Where a head ends: just past its blank line.
fn head_end(data: &[u8]) -> Option<usize> {
    data.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// Header lines of a head (after the request line).
fn header_lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|&b| b == b'\n')
        .skip(1)
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.get(name.len()..)?;
    (line[..name.len()].eq_ignore_ascii_case(name) && rest.first() == Some(&b':'))
        .then(|| rest[1..].trim_ascii())
}

/// The framing headers of a head.
struct Framing {
    /// Content-Length, when it parses.
    length: Option<u64>,
    /// Whether a Content-Length is there at all.
    has_length: bool,
    /// Whether a Transfer-Encoding is there.
    transfer_encoding: bool,
}

/// One pass over a head's header lines.
fn framing(head: &[u8]) -> Framing {
    let mut f = Framing {
        length: None,
        has_length: false,
        transfer_encoding: false,
    };
    for line in header_lines(head) {
        if let Some(v) = header_value(line, b"content-length") {
            if !f.has_length {
                f.length = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok());
            }
            f.has_length = true;
        } else if header_value(line, b"transfer-encoding").is_some() {
            f.transfer_encoding = true;
        }
    }
    f
}

impl Activity {
    fn new() -> Activity {
        Activity {
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: Instant::now(),
                served: false,
                head_started: None,
                write_blocked: None,
                head: HeadScan::new(),
            }),
            write_waiting: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self, data: &[u8]) {
        let mut s = self.state();
        if s.in_flight == 0 && s.served && s.head_started.is_none() {
            s.head_started = Some(Instant::now());
            s.head.restart_if_lost();
        }
        s.head.feed(data);
    }

    fn write_pending(&self) {
        let mut s = self.state();
        if s.write_blocked.is_none() {
            s.write_blocked = Some(Instant::now());
            self.write_waiting.store(true, Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        if self.write_waiting.swap(false, Ordering::Relaxed) {
            self.state().write_blocked = None;
        }
    }

    /// A request begins; whether its head had conflicting framing headers.
    fn request_started(&self) -> bool {
        let mut s = self.state();
        s.in_flight += 1;
        s.served = true;
        s.head_started = None;
        s.head.conflicts.pop_front().unwrap_or(false)
    }

    fn response_ended(&self) {
        let mut s = self.state();
        s.in_flight -= 1;
        if s.in_flight == 0 {
            s.idle_since = Instant::now();
        }
    }

    /// When the current phase must have ended, and which limit that is.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Cut)> {
        let s = self.state();
        if let Some(since) = s.write_blocked {
            return Some((since + limits.body, Cut::WriteStalled));
        }
        if s.in_flight > 0 {
            return None;
        }
        Some(match s.head_started {
            Some(at) => (at + limits.header_read, Cut::HeaderTimeout),
            None if !s.served => (s.idle_since + limits.header_read, Cut::HeaderTimeout),
            None => (s.idle_since + limits.idle, Cut::Idle),
        })
    }
}

/// The connection's IO, telling its [`Activity`] about reads and blocked writes.
struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> Watched<I> {
    fn noted<T>(&self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match &polled {
            Poll::Pending => self.activity.write_pending(),
            Poll::Ready(_) => self.activity.wrote(),
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.noted(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.noted(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.noted(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body that tells the [`Activity`] when it has ended (sent or dropped).
struct Ending {
    body: Body,
    activity: Arc<Activity>,
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.activity.response_ended();
    }
}

impl hyper::body::Body for Ending {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The answer to a request with both Content-Length and Transfer-Encoding; the connection
/// closes after it.
fn framing_conflict() -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut resp = super::error::ApiError::bad_request(
        "invalid-framing",
        "a request may carry Content-Length or Transfer-Encoding, not both",
    )
    .into_response();
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

/// Serves one connection until it closes, its watchdog cuts it, or shutdown.
async fn connection<I>(
    io: I,
    scheme: &'static str,
    app: App,
    limits: Limits,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let watched = Watched {
        io,
        activity: Arc::clone(&activity),
    };
    let service_activity = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let activity = Arc::clone(&service_activity);
        let conflict = activity.request_started();
        let req: Request =
            req.map(|b| Body::new(tower_http::timeout::TimeoutBody::new(limits.body, b)));
        let answering = (!conflict).then(|| app.handle(req, scheme));
        async move {
            let resp = match answering {
                Some(answering) => answering.await,
                None => framing_conflict(),
            };
            Ok::<_, std::convert::Infallible>(resp.map(|body| Ending { body, activity }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(watched), service);
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    let shortest = limits.header_read.min(limits.idle).min(limits.body);
    loop {
        // `now` before the look: a phase that begins after it ends no sooner than the wake.
        let now = Instant::now();
        let wake = match activity.deadline(&limits) {
            Some((at, _)) => at.min(now + shortest),
            None => now + shortest,
        };
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = cancel.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if let Some((at, why)) = activity.deadline(&limits) {
                    if at <= now {
                        tracing::debug!(why = why.as_str(), "HTTP connection closed by a limit");
                        metrics.cut(why);
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflicts(stream: &[&[u8]]) -> Vec<bool> {
        let mut scan = HeadScan::new();
        for piece in stream {
            scan.feed(piece);
        }
        scan.conflicts.into_iter().collect()
    }

    #[test]
    fn heads_are_followed_through_bodies() {
        let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".as_slice();
        let put = b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".as_slice();
        let both = b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(conflicts(&[get, put, get]), [false, false, false]);
        assert_eq!(conflicts(&[get, put, both]), [false, false, true]);
        // Split anywhere, even inside the blank line that ends a head.
        let whole = [get, put, both].concat();
        for cut in 1..whole.len() {
            let (a, b) = whole.split_at(cut);
            assert_eq!(conflicts(&[a, b]), [false, false, true], "cut at {cut}");
        }
        // A body that looks like a head is skipped as a body.
        let tricky = b"PUT /a HTTP/1.1\r\nContent-Length: 49\r\n\r\nX: 1\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n";
        assert_eq!(conflicts(&[tricky, get]), [false, false]);
        // After a chunked body nothing more is followed.
        let chunked = b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".as_slice();
        assert_eq!(conflicts(&[chunked, both]), [false]);
    }
}
