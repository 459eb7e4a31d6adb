//! Serving threads: HTTP and HTTPS connections are served the way nginx's workers serve
//! them, by one thread per core, each with a runtime of its own and a listening socket of its
//! own on the shared address (`SO_REUSEPORT`: the kernel spreads new connections across the
//! sockets). A connection stays on the thread that accepted it, so a request is read, answered
//! and written by one thread, with no work-stealing wake-ups between cores. On 4 KiB ranged
//! reads this served 12–18% more requests per second than the shared multi-threaded runtime,
//! and hyper alone 10% more (bench/all.sh http-range, http-floor).
//!
//! Work a request starts that outlives it (an import, a connection to PostgreSQL, a group
//! flush) runs on the thread's runtime too, so a thread keeps its runtime going after its
//! listener stopped, until [`ServingThreads::finish`], which comes after the service's
//! tracked work has ended. A thread also stops when the task that watches it is dropped: an
//! abort after the shutdown grace, or the caller's runtime going away.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Largest number of blocking-pool threads per serving thread (metadata and file calls).
const BLOCKING_THREADS: usize = 64;

/// The serving threads of one service.
pub struct ServingThreads {
    /// Fires when the service has stopped, or when this is dropped: threads whose listener
    /// has stopped then end.
    gone: DropGuard,
    token: CancellationToken,
    exited: Vec<oneshot::Receiver<()>>,
}

impl Default for ServingThreads {
    fn default() -> Self {
        let token = CancellationToken::new();
        ServingThreads {
            gone: token.clone().drop_guard(),
            token,
            exited: Vec::new(),
        }
    }
}

/// How many serving threads `configured` means: 0 is one per core.
pub fn count(configured: u32) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    }
}

/// `n` listening sockets on `addr`, sharing it through `SO_REUSEPORT`, and the address they
/// are bound to (port 0 picks one port for all). A port some other socket already listens on
/// is refused, as a plain bind refuses it: without the check, a second fwrepo started on the
/// same port by the same user would silently take half the connections.
pub fn bind(addr: SocketAddr, n: usize) -> io::Result<(Vec<TcpListener>, SocketAddr)> {
    if addr.port() != 0 {
        // Not SO_REUSEPORT: fails when anything listens there, reuse-port or not.
        drop(socket(addr, false)?);
    }
    let first = socket(addr, true)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..n.max(1) {
        listeners.push(socket(bound, true)?);
    }
    Ok((listeners, bound))
}

fn socket(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // As std's and tokio's bind do: a restart does not wait out TIME_WAIT.
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    if reuse_port {
        // tokio's backlog.
        s.listen(1024)?;
        s.set_nonblocking(true)?;
    }
    Ok(s.into())
}

impl ServingThreads {
    /// Starts a thread named `name` that runs `serve(listener)` on a runtime of its own. The
    /// returned task, on the caller's runtime, ends when `serve` has returned; dropping or
    /// aborting it before that stops the thread and drops whatever `serve` still runs.
    pub async fn spawn<F, Fut>(
        &mut self,
        name: String,
        listener: TcpListener,
        serve: F,
    ) -> io::Result<JoinHandle<()>>
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let (served, served_rx) = oneshot::channel::<()>();
        let (exited, exited_rx) = oneshot::channel::<()>();
        let (built, built_rx) = oneshot::channel::<io::Result<()>>();
        let cut = CancellationToken::new();
        let (stop, gone) = (cut.clone(), self.token.clone());
        let blocking = format!("{name}-blocking");
        // The runtime is made on its thread: one dropped here, in the caller's runtime,
        // would panic.
        std::thread::Builder::new().name(name).spawn(move || {
            // The runtime and the listener's registration with it, both reported to the
            // caller: a thread that cannot serve fails the start.
            let started = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(BLOCKING_THREADS)
                .thread_name(blocking)
                .build()
                .and_then(|rt| {
                    let listener = {
                        let _context = rt.enter();
                        tokio::net::TcpListener::from_std(listener)?
                    };
                    Ok((rt, listener))
                });
            let (rt, listener) = match started {
                Ok(started) => {
                    let _ = built.send(Ok(()));
                    started
                }
                Err(e) => {
                    let _ = built.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let serving = async move {
                    serve(listener).await;
                    let _ = served.send(());
                    gone.cancelled().await;
                };
                tokio::select! {
                    _ = serving => {}
                    _ = stop.cancelled() => {}
                }
            });
            drop(rt);
            let _ = exited.send(());
        })?;
        built_rx
            .await
            .unwrap_or_else(|_| Err(io::Error::other("serving thread ended at start")))?;
        self.exited.push(exited_rx);
        Ok(tokio::spawn(async move {
            let armed = cut.drop_guard();
            if served_rx.await.is_ok() {
                armed.disarm();
            }
        }))
    }

    /// Lets every thread end, once the service has stopped, and waits until each has: what
    /// their runtimes held (stores, connections) is dropped when this returns.
    pub async fn finish(self) {
        let ServingThreads { gone, exited, .. } = self;
        drop(gone);
        for e in exited {
            let _ = e.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_port_in_use_is_refused_and_port_zero_is_shared() {
        let (listeners, bound) = bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(listeners.len(), 3);
        for l in &listeners {
            assert_eq!(l.local_addr().unwrap(), bound);
        }
        // Another reuse-port group on the same port would share it; the check refuses.
        let again = bind(bound, 2).expect_err("the port is taken");
        assert_eq!(again.kind(), io::ErrorKind::AddrInUse);
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = bind(plain.local_addr().unwrap(), 2).expect_err("the port is taken");
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn work_outlives_the_listener_until_finish_and_an_abort_stops_the_thread() {
        let (mut listeners, _) = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let mut threads = ServingThreads::default();
        let stop = CancellationToken::new();
        let (after_tx, after_rx) = oneshot::channel::<()>();
        let (ran_tx, ran_rx) = oneshot::channel::<()>();
        let s = stop.clone();
        let served = threads
            .spawn(
                "t-served".into(),
                listeners.pop().unwrap(),
                move |_l| async move {
                    s.cancelled().await;
                    // Work a request started, still running after the listener stopped.
                    tokio::spawn(async move {
                        let _ = after_rx.await;
                        let _ = ran_tx.send(());
                    });
                },
            )
            .await
            .unwrap();
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Count(Arc<AtomicUsize>);
        impl Drop for Count {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let d = Count(Arc::clone(&dropped));
        let endless = threads
            .spawn(
                "t-endless".into(),
                listeners.pop().unwrap(),
                move |_l| async move {
                    let _d = d;
                    std::future::pending::<()>().await;
                },
            )
            .await
            .unwrap();
        stop.cancel();
        served.await.unwrap();
        // The first thread's runtime still runs the work its serve left.
        after_tx.send(()).unwrap();
        ran_rx.await.expect("the work ran after serve returned");
        endless.abort();
        let _ = endless.await;
        threads.finish().await;
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "the aborted serve was dropped"
        );
    }
}
