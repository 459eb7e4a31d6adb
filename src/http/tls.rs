//! HTTPS: a listener that completes TLS handshakes off the accept path (a slow or silent
//! client cannot hold up others) and hands finished streams to axum.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Finished handshakes waiting for axum to take them.
const BACKLOG: usize = 256;

/// Accepted TLS connections, ready for `axum::serve`.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `work`; stops when `cancel` fires. `local` is the address `tcp` is
    /// bound to, as binding reported it.
    /// A handshake gets `limits.header_read`; at most `slots` run at once (`limits.max_connections`,
    /// shared by the listener's serving threads).
    pub fn new(
        tcp: TcpListener,
        local: SocketAddr,
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
        limits: &super::serve::Limits,
        slots: Arc<tokio::sync::Semaphore>,
        cancel: CancellationToken,
        work: TaskTracker,
    ) -> TlsListener {
        let acceptor = TlsAcceptor::from(tls);
        let (tx, ready) = mpsc::channel(BACKLOG);
        let handshakes = work.clone();
        let timeout = limits.header_read;
        work.spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    accepted = tcp.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, "HTTPS accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                // After the accept, as in `serve::serve`: the slots are shared with the
                // listener's other serving threads.
                let permit = tokio::select! {
                    _ = cancel.cancelled() => return,
                    p = Arc::clone(&slots).acquire_owned() => p.expect("never closed"),
                };
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let (tx, cancel) = (tx.clone(), cancel.clone());
                handshakes.spawn(async move {
                    let _permit = permit;
                    let handshake = tokio::time::timeout(timeout, acceptor.accept(stream));
                    let done = tokio::select! {
                        _ = cancel.cancelled() => return,
                        done = handshake => done,
                    };
                    match done {
                        Ok(Ok(tls)) => {
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                _ = tx.send((tls, peer)) => {}
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended (shutdown): wait for graceful shutdown to stop serving.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
