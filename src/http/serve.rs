//! Serving HTTP/1.1 connections with the limits a public listener needs: a cap on connections
//! at once, a deadline for each request's headers, an idle deadline for kept-alive
//! connections, and progress deadlines for request bodies and for responses the client does
//! not take. Without them, clients that open connections and trickle bytes (slowloris) hold
//! descriptors and memory for ever.
//!
//! Each connection has an [`Activity`]: its IO wrapper notes bytes read and writes that wait
//! on the client, its service notes requests starting and their responses ending, and a
//! watchdog beside the connection closes it when the deadline of its current phase passes.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::serve::Listener;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

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
pub async fn serve<L: Listener>(
    mut listener: L,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        // A slot first: at the cap, new connections wait in the kernel's backlog.
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = Arc::clone(&slots).acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (io, _peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let (app, cancel, metrics) = (app.clone(), cancel.clone(), Arc::clone(&metrics));
        connections.spawn(async move {
            connection(io, app, limits, metrics, cancel).await;
            drop(permit);
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// What a connection is doing, for its watchdog.
struct Activity {
    state: Mutex<State>,
    /// Wakes the watchdog when a phase with a deadline begins.
    changed: Notify,
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
            }),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) {
        let mut s = self.state();
        if s.in_flight == 0 && s.served && s.head_started.is_none() {
            s.head_started = Some(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    fn write_pending(&self) {
        let mut s = self.state();
        if s.write_blocked.is_none() {
            s.write_blocked = Some(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    fn wrote(&self) {
        self.state().write_blocked = None;
    }

    fn request_started(&self) {
        let mut s = self.state();
        s.in_flight += 1;
        s.served = true;
        s.head_started = None;
    }

    fn response_ended(&self) {
        let mut s = self.state();
        s.in_flight -= 1;
        if s.in_flight == 0 {
            s.idle_since = Instant::now();
            drop(s);
            self.changed.notify_one();
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
            self.activity.read();
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

/// Serves one connection until it closes, its watchdog cuts it, or shutdown.
async fn connection<I>(
    io: I,
    app: Router,
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
        activity.request_started();
        let req: Request =
            req.map(|b| Body::new(tower_http::timeout::TimeoutBody::new(limits.body, b)));
        let app = app.clone();
        async move {
            // The router's error type is Infallible.
            let resp = app
                .oneshot(req)
                .await
                .unwrap_or_else(|never| match never {});
            Ok::<_, std::convert::Infallible>(resp.map(|body| Ending { body, activity }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(watched), service);
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        let deadline = activity.deadline(&limits);
        let sleep = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
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
            _ = activity.changed.notified() => {}
            _ = sleep => {
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
