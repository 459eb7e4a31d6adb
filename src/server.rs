//! Start-up and shutdown: opens the stores, sweeps what a crash left, starts the listeners
//! and background loops under one cancellation token, and waits for them with a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::blob::{BlobError, BlobStore};
use crate::cache::ImageCache;
use crate::config::{Config, ConfigError};
use crate::firmware::{FirmwareError, Repository};
use crate::fota::{Clock, Engine, FotaError, SystemClock};
use crate::http::{self, AppState};
use crate::keys::{KeyError, KeyRing};
use crate::meta::{self, MetaError};
use crate::metrics::Metrics;
use crate::spool::{Spool, SpoolError};
use crate::{late_digests, retention};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    #[error(transparent)]
    Fota(#[from] FotaError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("partial uploads: {0}")]
    Uploads(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("refusing to listen beyond loopback ({0}) with no access tokens: create one with `fwrepo token create --role admin --name <your-name>` (same --config/--storage as serve), or pass --insecure to run open")]
    Insecure(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started service.
pub struct Running {
    /// Where the HTTP listener is bound (useful with port 0); `None` when HTTP is off.
    pub http_addr: Option<SocketAddr>,
    /// Where the HTTPS listener is bound, when on.
    pub https_addr: Option<SocketAddr>,
    /// Where the CoAP listeners are bound, when on.
    pub coap_tcp_addr: Option<SocketAddr>,
    pub coap_udp_addr: Option<SocketAddr>,
    pub coap_tls_addr: Option<SocketAddr>,
    pub coap_dtls_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Work spawned while serving (connections, requests, timers, imports): `wait` returns
    /// only once all of it has ended, so the stores it holds are closed.
    work: TaskTracker,
    engine: Arc<Engine>,
    /// The HTTP and HTTPS serving threads, ended last.
    serving: http::threads::ServingThreads,
    grace: Duration,
}

impl Running {
    /// Asks every listener and loop to stop.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Waits until everything stopped: listeners, connections, timers and imports, so the
    /// stores are closed when it returns. Once shutdown began, all of it gets one grace
    /// period; in-flight HTTP requests are then cut off.
    pub async fn wait(self) {
        let Running {
            cancel,
            tasks,
            work,
            engine,
            serving,
            grace,
            ..
        } = self;
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let mut all = std::pin::pin!(futures_util::future::join_all(tasks));
        let ended = tokio::select! {
            _ = &mut all => true,
            _ = cancel.cancelled() => false,
        };
        // Everything else watches the same token and ends soon after it fires; a connection
        // first finishes the exchange it is in. One grace period bounds all of it.
        cancel.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        if !ended && tokio::time::timeout_at(deadline, &mut all).await.is_err() {
            tracing::warn!(
                ?grace,
                "in-flight requests did not finish in time; closing them"
            );
            aborts.iter().for_each(|a| a.abort());
            all.await;
        }
        work.close();
        if tokio::time::timeout_at(deadline, work.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                still_running = work.len(),
                "background work did not stop in time"
            );
        }
        // Nothing serves bytes any more: what was served is stored.
        engine.save_progress().await;
        // Work that requests started ran on the serving threads' runtimes, and has ended.
        serving.finish().await;
    }
}

/// One listening socket per serving thread, all on `addr` (see [`http::threads`]).
fn bind_shared(
    addr: SocketAddr,
    threads: usize,
) -> Result<(Vec<std::net::TcpListener>, SocketAddr), StartError> {
    http::threads::bind(addr, threads).map_err(|source| StartError::Bind { addr, source })
}

/// Tokens, audit log and the open-mode decision; refuses to run open beyond loopback.
async fn access(
    config: &Config,
    tokens: crate::auth::TokenStore,
    keys: &KeyRing,
) -> Result<http::access::Access, StartError> {
    let listeners = config.listen_addrs()?;
    let open_allowed = crate::auth::open_allowed(&listeners, config.auth.insecure);
    if matches!(
        config.meta_backend()?,
        crate::config::MetaBackend::Postgres(_)
    ) {
        let file = crate::auth::TokenStore::file(&config.tokens_path());
        if !file.is_empty().await.unwrap_or(true) {
            tracing::warn!(file = %config.tokens_path().display(), "the metadata is in PostgreSQL, so tokens are too; the tokens in this file are not used (create them again with `fwrepo token create`)");
        }
    }
    if tokens.is_empty().await? {
        let outside: Vec<String> = listeners
            .iter()
            .filter(|a| !a.ip().is_loopback())
            .map(ToString::to_string)
            .collect();
        if !open_allowed {
            return Err(StartError::Insecure(outside.join(", ")));
        }
        if outside.is_empty() {
            tracing::info!("no access tokens: open to loopback clients only");
        } else {
            tracing::warn!(listeners = %outside.join(", "), "--insecure: running OPEN beyond loopback with no access tokens; anyone who can connect may change firmware and tasks");
        }
    }
    Ok(http::access::Access {
        tokens,
        audit: crate::auth::AuditLog::open(Some(&config.audit_path())),
        open_allowed,
        package_tokens: config.auth.package_tokens,
        sessions: crate::console::session::Sessions::new(keys),
    })
}

/// Starts the service; it runs until `cancel` fires.
pub async fn start(config: &Config, cancel: CancellationToken) -> Result<Running, StartError> {
    start_with_clock(config, cancel, Arc::new(SystemClock)).await
}

/// Starts the service with the FOTA engine on `clock` (tests move time by hand).
pub async fn start_with_clock(
    config: &Config,
    cancel: CancellationToken,
    clock: Arc<dyn Clock>,
) -> Result<Running, StartError> {
    config.validate()?;
    let (meta, tokens) = meta::open(&config.meta_backend()?, &config.tokens_path()).await?;
    let keys = KeyRing::load_or_create(&config.keys.dir, &config.keys.active)?;
    let access = access(config, tokens, &keys).await?;
    let active = keys.active();
    tracing::info!(key_id = %active.id, public_key = %hex::encode(active.public_raw()), "signing key");
    let blobs = BlobStore::open(&config.blob_backend()?, &config.s3)?;
    let metrics = Arc::new(Metrics::default());
    let repo = Arc::new(Repository::new(
        Arc::clone(&meta),
        blobs,
        Arc::new(keys),
        config.http.max_upload_size,
        Arc::clone(&metrics),
        ImageCache::new(config.cache.max_bytes, config.cache.max_image),
        Spool::open(&config.storage.root.join("spool"))?,
    ));
    repo.sweep_orphans(config.storage.orphan_grace.0).await?;
    repo.init_metrics().await?;

    let mut uri_bases = Vec::new();
    let threads = http::threads::count(config.http.threads);
    let http = match config.http_listen()? {
        Some(addr) => {
            let (listener, bound) = bind_shared(addr, threads)?;
            let mut base = config.public_http_url()?;
            if config.http.public_url.is_empty() && addr.port() == 0 {
                base = format!("http://{bound}");
            }
            uri_bases.push(("http", base));
            Some((listener, bound))
        }
        None => None,
    };
    let https = if config.https.enabled() {
        let addr = config.https_listen()?;
        let tls = crate::tls::server_config(&config.https.cert, &config.https.key, b"http/1.1")
            .map_err(StartError::Tls)?;
        let (listener, bound) = bind_shared(addr, threads)?;
        let mut base = config.public_https_url()?;
        if config.https.public_url.is_empty() && addr.port() == 0 {
            base = format!("https://{bound}");
        }
        uri_bases.push(("https", base));
        Some((listener, bound, tls))
    } else {
        None
    };
    let mut tasks = Vec::new();
    let work = TaskTracker::new();
    let engine = Arc::new(Engine::new(
        Arc::clone(&meta),
        Arc::clone(&repo),
        Arc::clone(&clock),
        config.fota.clone(),
        cancel.clone(),
        work.clone(),
    ));
    let coap = crate::coap::start(config, &repo, &metrics, &engine, &cancel, &work).await?;
    uri_bases.extend(coap.uri_bases);
    tasks.extend(coap.tasks);
    engine.set_bases(uri_bases.clone());
    engine.set_package_tokens(config.auth.package_tokens);
    engine.set_device_credentials(config.auth.device_credentials);
    engine.start().await?;
    let fleet = crate::fleet::Fleet::new(
        meta,
        Arc::clone(&engine),
        Arc::clone(&repo),
        clock,
        cancel.clone(),
        work.clone(),
    );
    fleet.run();
    let uploads = crate::uploads::Uploads::open(
        &config.storage.root.join("uploads"),
        config.http.upload_expiry.0,
    )
    .map_err(StartError::Uploads)?;
    work.spawn(Arc::clone(&uploads).sweep_every(cancel.clone()));
    let state = AppState::new(http::Services {
        uploads,
        fleet,
        repo: Arc::clone(&repo),
        metrics: Arc::clone(&metrics),
        uri_bases: Arc::new(uri_bases),
        engine: Arc::clone(&engine),
        cancel: cancel.clone(),
        access: Arc::new(access),
    });
    let app = http::router(state);
    let limits = http::serve::Limits::from_config(&config.http);
    let mut serving = http::threads::ServingThreads::default();
    let mut http_addr = None;
    if let Some((listeners, bound)) = http {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        for (i, listener) in listeners.into_iter().enumerate() {
            let (app, slots, metrics, cancel) = (
                app.clone(),
                Arc::clone(&slots),
                Arc::clone(&metrics),
                cancel.clone(),
            );
            let task = serving
                .spawn(format!("http-{i}"), listener, move |listener| {
                    // Headers and a small body go out as separate writes; without TCP_NODELAY,
                    // Nagle holds the body back until the client's delayed ACK (~40 ms), capping
                    // ranged reads.
                    let listener = listener.tap_io(|tcp| {
                        if let Err(e) = tcp.set_nodelay(true) {
                            tracing::debug!(error = %e, "TCP_NODELAY not set");
                        }
                    });
                    http::serve::serve(listener, "http", app, limits, slots, metrics, cancel)
                })
                .await;
            tasks.push(task.map_err(|source| StartError::Bind {
                addr: bound,
                source,
            })?);
        }
        tracing::info!(http_addr = %bound, threads, "HTTP listening");
        http_addr = Some(bound);
    }
    let mut https_addr = None;
    if let Some((listeners, bound, tls)) = https {
        let (handshakes, slots) = (
            Arc::new(Semaphore::new(limits.max_connections)),
            Arc::new(Semaphore::new(limits.max_connections)),
        );
        for (i, listener) in listeners.into_iter().enumerate() {
            let (app, tls, handshakes, slots, metrics, cancel, work) = (
                app.clone(),
                Arc::clone(&tls),
                Arc::clone(&handshakes),
                Arc::clone(&slots),
                Arc::clone(&metrics),
                cancel.clone(),
                work.clone(),
            );
            let task = serving
                .spawn(format!("https-{i}"), listener, move |listener| async move {
                    // Made here: it starts its accept loop on this thread's runtime.
                    let listener = http::tls::TlsListener::new(
                        listener,
                        bound,
                        tls,
                        &limits,
                        handshakes,
                        cancel.clone(),
                        work,
                    );
                    http::serve::serve(listener, "https", app, limits, slots, metrics, cancel).await
                })
                .await;
            tasks.push(task.map_err(|source| StartError::Bind {
                addr: bound,
                source,
            })?);
        }
        tracing::info!(https_addr = %bound, threads, "HTTPS listening");
        https_addr = Some(bound);
    }
    let sweeper = tokio::spawn(retention::run(
        Arc::clone(&repo),
        config.retention.sweep_interval.0,
        cancel.clone(),
    ));
    tasks.push(sweeper);
    tasks.push(tokio::spawn(late_digests::run(
        Arc::clone(&repo),
        cancel.clone(),
    )));
    Ok(Running {
        http_addr,
        https_addr,
        coap_tcp_addr: coap.tcp_addr,
        coap_udp_addr: coap.udp_addr,
        coap_tls_addr: coap.tls_addr,
        coap_dtls_addr: coap.dtls_addr,
        cancel,
        tasks,
        work,
        engine,
        serving,
        grace: config.http.shutdown_grace.0,
    })
}
