//! TLS to PostgreSQL with rustls, chosen the way libpq chooses it: `sslmode` (`disable`,
//! `prefer` (the default), `require`, `verify-ca`, `verify-full`) and `sslrootcert` (a PEM
//! file, or `system` for the platform's roots) in the connection URL's query.
//!
//! As in libpq, `prefer` and `require` encrypt without checking who answers (unless
//! `sslrootcert` is given, when `require` checks the chain like `verify-ca`), `verify-ca`
//! checks the chain, and `verify-full` the chain and the host name.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::{self, CryptoProvider};
use tokio_rustls::rustls::{
    self, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Encrypt only (libpq `prefer`, and `require` without a root certificate).
    Nothing,
    /// The chain up to a trusted root (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    Full,
}

/// A connection URL taken apart: what tokio-postgres reads, and the TLS settings it does not.
#[derive(Debug)]
pub struct Target {
    pub config: tokio_postgres::Config,
    check: Check,
    root_cert: Option<String>,
}

/// Splits `sslmode` and `sslrootcert` off `url` and parses the rest. Errors are one line,
/// naming the setting.
pub fn parse(url: &str) -> Result<Target, String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = String::from("prefer");
    let mut root_cert = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value =
            || percent_decode(v).ok_or_else(|| format!("{k}: not valid percent-encoded UTF-8"));
        match k {
            "sslmode" => mode = value()?,
            "sslrootcert" => root_cert = Some(value()?),
            _ => rest.push(pair),
        }
    }
    let plain = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let mut config: tokio_postgres::Config = plain.parse().map_err(|e| format!("{e}"))?;
    let (ssl, check) = match mode.as_str() {
        "disable" => (SslMode::Disable, Check::Nothing),
        "prefer" => (SslMode::Prefer, Check::Nothing),
        "require" if root_cert.is_some() => (SslMode::Require, Check::Chain),
        "require" => (SslMode::Require, Check::Nothing),
        "verify-ca" => (SslMode::Require, Check::Chain),
        "verify-full" => (SslMode::Require, Check::Full),
        other => {
            return Err(format!(
                "sslmode {other:?}: expected disable, prefer, require, verify-ca or verify-full"
            ))
        }
    };
    if matches!(check, Check::Chain | Check::Full) && root_cert.is_none() {
        return Err(format!(
            "sslmode={mode} needs sslrootcert=<PEM file> (or sslrootcert=system)"
        ));
    }
    config.ssl_mode(ssl);
    Ok(Target {
        config,
        check,
        root_cert,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Target {
    /// The rustls connector, or `None` when TLS is off. Reads the root certificates.
    pub fn connector(&self) -> Result<Option<PgTls>, String> {
        if self.config.get_ssl_mode() == SslMode::Disable {
            return Ok(None);
        }
        let provider = Arc::new(crypto::aws_lc_rs::default_provider());
        let webpki = match self.check {
            Check::Nothing => None,
            Check::Chain | Check::Full => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(self.roots()?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?,
            ),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (self.check, webpki) {
            (Check::Full, Some(webpki)) => webpki,
            (_, chain) => Arc::new(Partial {
                provider: provider.clone(),
                chain,
            }),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Some(PgTls(Arc::new(config))))
    }

    fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match self.root_cert.as_deref() {
            Some("system") | None => {
                let found = rustls_native_certs::load_native_certs();
                if found.certs.is_empty() {
                    return Err("sslrootcert=system: no root certificates found".into());
                }
                roots.add_parsable_certificates(found.certs);
            }
            Some(path) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<_, _>>())
                    .map_err(|e| format!("sslrootcert {path}: {e}"))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!("sslrootcert {path}: no certificate"));
                }
            }
        }
        Ok(roots)
    }
}

/// What `prefer`, `require` and `verify-ca` check: the chain up to a root when `chain` is
/// set, never the host name, and always the handshake's signatures (so even unchecked, the
/// session is encrypted against a passive listener). `verify-full` uses rustls' own WebPKI
/// verifier.
#[derive(Debug)]
struct Partial {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Partial {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// tokio-postgres's TLS hook over tokio-rustls.
#[derive(Clone)]
pub struct PgTls(Arc<ClientConfig>);

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = rustls_pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, host: &str) -> Result<PgTlsConnect, Self::Error> {
        Ok(PgTlsConnect {
            config: self.0.clone(),
            name: ServerName::try_from(host.to_owned())?,
        })
    }
}

pub struct PgTlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move { Ok(PgTlsStream(connector.connect(self.name, stream).await?)) })
    }
}

/// A TLS session to PostgreSQL. It offers no channel binding, so SCRAM runs without it
/// (`channel_binding=prefer`, the default, allows that).
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_follow_libpq() {
        let t = parse("postgres://u@db/x").unwrap();
        assert_eq!(
            (t.config.get_ssl_mode(), t.check),
            (SslMode::Prefer, Check::Nothing)
        );
        let t = parse("postgres://u@db/x?sslmode=disable").unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);
        assert!(t.connector().unwrap().is_none());
        let t = parse("postgres://u@db/x?sslmode=require").unwrap();
        assert_eq!(
            (t.config.get_ssl_mode(), t.check),
            (SslMode::Require, Check::Nothing)
        );
        let t = parse("postgres://u@db/x?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!(t.check, Check::Chain);
        let t = parse("postgres://u@db/x?application_name=fw&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5").unwrap();
        assert_eq!(
            (t.config.get_ssl_mode(), t.check),
            (SslMode::Require, Check::Full)
        );
        assert_eq!(t.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(t.config.get_application_name(), Some("fw"));
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(5))
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let e = parse("postgres://u@db/x?sslmode=allow").unwrap_err();
        assert!(e.contains("sslmode \"allow\""), "{e}");
        let e = parse("postgres://u@db/x?sslmode=verify-ca").unwrap_err();
        assert!(e.contains("sslrootcert"), "{e}");
        let e = parse("postgres://u@db/x?sslrootcert=%zz").unwrap_err();
        assert!(e.contains("sslrootcert"), "{e}");
        let t =
            parse("postgres://u@db/x?sslmode=verify-full&sslrootcert=/nonexistent.pem").unwrap();
        let e = t.connector().err().unwrap();
        assert!(e.contains("/nonexistent.pem"), "{e}");
    }
}
