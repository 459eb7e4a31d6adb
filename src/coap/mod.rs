//! CoAP delivery of firmware to constrained devices: over TCP and TLS (RFC 8323, with BERT),
//! over UDP (RFC 7252) and over DTLS, with block-wise transfer (RFC 7959).

pub mod block;
pub mod dtls;
pub mod echo;
pub mod handler;
pub mod msg;
pub mod tcp;
pub mod tcp_codec;
pub mod tcp_io;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::firmware::Repository;
use crate::fota::Engine;
use crate::metrics::Metrics;
use crate::server::StartError;

/// The CoAP listeners that were started.
pub struct Started {
    pub tcp_addr: Option<SocketAddr>,
    pub udp_addr: Option<SocketAddr>,
    pub tls_addr: Option<SocketAddr>,
    pub dtls_addr: Option<SocketAddr>,
    /// (`coap+tcp`, base) and friends, for resolve answers.
    pub uri_bases: Vec<(&'static str, String)>,
    pub tasks: Vec<JoinHandle<()>>,
}

/// A public base: the configured one, or `scheme://<bound address>`.
fn base(configured: &str, scheme: &str, addr: SocketAddr) -> String {
    if configured.is_empty() {
        format!("{scheme}://{addr}")
    } else {
        configured.trim_end_matches('/').to_owned()
    }
}

/// Listen addresses were checked by `Config::validate`; this keeps a bad one a config error.
fn parse_addr(spec: &str) -> Result<SocketAddr, StartError> {
    spec.parse().map_err(|_| {
        crate::config::ConfigError::Invalid(format!(
            "CoAP listen address {spec:?} is not host:port"
        ))
        .into()
    })
}

async fn bind_udp(spec: &str) -> Result<(tokio::net::UdpSocket, SocketAddr), StartError> {
    let addr = parse_addr(spec)?;
    let socket = tokio::net::UdpSocket::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local = socket
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((socket, local))
}

async fn bind_tcp(spec: &str) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let addr = parse_addr(spec)?;
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((l, local))
}

/// Starts every configured CoAP listener.
pub async fn start(
    config: &Config,
    repo: &Arc<Repository>,
    metrics: &Arc<Metrics>,
    engine: &Arc<Engine>,
    cancel: &CancellationToken,
    work: &TaskTracker,
) -> Result<Started, StartError> {
    let c = &config.coap;
    let ctx = Arc::new(handler::CoapContext {
        repo: Arc::clone(repo),
        metrics: Arc::clone(metrics),
        engine: Arc::clone(engine),
    });
    let limits = tcp::Limits {
        max_connections: c.max_connections as usize,
        idle_timeout: c.idle_timeout.0.max(Duration::from_secs(1)),
    };
    let mut started = Started {
        tcp_addr: None,
        udp_addr: None,
        tls_addr: None,
        dtls_addr: None,
        uri_bases: Vec::new(),
        tasks: Vec::new(),
    };
    if !c.tcp_listen.is_empty() {
        let (l, addr) = bind_tcp(&c.tcp_listen).await?;
        tracing::info!(%addr, "CoAP over TCP listening");
        started
            .uri_bases
            .push(("coap+tcp", base(&c.public_tcp_url, "coap+tcp", addr)));
        started.tcp_addr = Some(addr);
        started.tasks.push(tokio::spawn(tcp::serve(
            l,
            Arc::clone(&ctx),
            limits.clone(),
            None,
            cancel.clone(),
            work.clone(),
        )));
    }
    if c.tls_enabled() {
        let acceptor = tls_acceptor(&c.tls_cert, &c.tls_key)?;
        let (l, addr) = bind_tcp(&c.tls_listen).await?;
        tracing::info!(%addr, "CoAP over TLS listening");
        started
            .uri_bases
            .push(("coaps+tcp", base(&c.public_tls_url, "coaps+tcp", addr)));
        started.tls_addr = Some(addr);
        started.tasks.push(tokio::spawn(tcp::serve(
            l,
            Arc::clone(&ctx),
            limits.clone(),
            Some(acceptor),
            cancel.clone(),
            work.clone(),
        )));
    }
    if !c.udp_listen.is_empty() {
        let (socket, local) = bind_udp(&c.udp_listen).await?;
        tracing::info!(addr = %local, "CoAP over UDP listening");
        started
            .uri_bases
            .push(("coap", base(&c.public_udp_url, "coap", local)));
        started.udp_addr = Some(local);
        let socket = socket.into_std().map_err(|source| StartError::Bind {
            addr: local,
            source,
        })?;
        let serving = udp::start(
            socket,
            Arc::clone(&ctx),
            c.udp_verify_peers,
            cancel.clone(),
            work.clone(),
        )
        .map_err(|source| StartError::Bind {
            addr: local,
            source,
        })?;
        started.tasks.push(serving);
    }
    if !c.dtls_listen.is_empty() {
        let (socket, local) = bind_udp(&c.dtls_listen).await?;
        // With coap.tls_cert and coap.tls_key, certificates too.
        let tls = if c.tls_cert.is_empty() {
            dtls::context()
        } else {
            let ca = (!c.dtls_client_ca.is_empty()).then(|| c.dtls_client_ca.as_ref());
            dtls::context_with_certificate(c.tls_cert.as_ref(), c.tls_key.as_ref(), ca)
        }
        .map_err(|e| StartError::Tls(format!("DTLS: {e}")))?;
        tracing::info!(addr = %local, "CoAP over DTLS listening");
        started
            .uri_bases
            .push(("coaps", base(&c.public_dtls_url, "coaps", local)));
        started.dtls_addr = Some(local);
        let limits = dtls::Limits {
            max_sessions: c.dtls_max_sessions.max(1) as usize,
            max_handshakes: c.dtls_max_handshakes.max(1) as usize,
            handshake_timeout: c.dtls_handshake_timeout.0.max(Duration::from_secs(1)),
            idle_timeout: c.idle_timeout.0.max(Duration::from_secs(1)),
        };
        started.tasks.push(tokio::spawn(dtls::serve(
            socket,
            Arc::clone(&ctx),
            tls,
            limits,
            cancel.clone(),
            work.clone(),
        )));
    }
    Ok(started)
}

/// rustls with the configured certificate chain and key, offering ALPN `coap` (RFC 8323 §4.1).
fn tls_acceptor(cert: &str, key: &str) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    let tls = crate::tls::server_config(cert, key, b"coap").map_err(StartError::Tls)?;
    Ok(tokio_rustls::TlsAcceptor::from(tls))
}
