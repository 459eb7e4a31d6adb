//! Server-side fetches of firmware (`firmwareUrl`, `POST /v1/imports`): streaming, bounded in
//! time and redirects, and refusing internal addresses after DNS resolution and on every
//! redirect, so a caller cannot make the service reach into the network it runs in.

use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::FotaConfig;

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Refused(String),
    #[error("{url} answered {status}")]
    Upstream { url: String, status: u16 },
    #[error("fetching {url} took longer than the import timeout")]
    Timeout { url: String },
    #[error("fetching {url} failed: {message}")]
    Network { url: String, message: String },
}

impl ImportError {
    pub fn code(&self) -> (&'static str, crate::error::Kind) {
        use crate::error::Kind;
        match self {
            ImportError::Refused(_) => ("import-refused", Kind::Unprocessable),
            // The URL given could not be fetched: the request cannot be carried out as given
            // (422), which is not a fault of this service (5xx).
            ImportError::Upstream { .. } | ImportError::Network { .. } => {
                ("import-failed", Kind::Unprocessable)
            }
            ImportError::Timeout { .. } => ("import-timeout", Kind::Unprocessable),
        }
    }
}

/// Refusal carried through reqwest's error chain.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refusal(String);

/// A redirect chain longer than allowed.
#[derive(Debug, thiserror::Error)]
#[error("more than {0} redirects")]
struct RedirectLimit(usize);

pub use super::address::is_internal;

fn refusal(host: &str, ip: IpAddr) -> String {
    format!(
        "{host} resolves to {ip}, an internal address; imports from internal addresses are off (fota.import_allow_internal)"
    )
}

/// A resolver that drops internal addresses, so the connection can only go to what was checked.
struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| !is_internal(a.ip()))
                .collect();
            match (allowed.is_empty(), addrs.first()) {
                (true, Some(a)) => Err(Box::new(Refusal(refusal(&host, a.ip()))) as _),
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// An IP literal host that is internal.
fn literal_refusal(url: &url::Url) -> Option<String> {
    let ip = match url.host()? {
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
        url::Host::Domain(_) => return None,
    };
    is_internal(ip).then(|| refusal(&ip.to_string(), ip))
}

/// The HTTP client of imports.
pub struct Importer {
    client: reqwest::Client,
    allow_internal: bool,
}

impl Importer {
    pub fn new(config: &FotaConfig) -> Importer {
        let allow_internal = config.import_allow_internal;
        let max = config.import_max_redirects as usize;
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max {
                return attempt.error(RedirectLimit(max));
            }
            if !matches!(attempt.url().scheme(), "http" | "https") {
                let m = format!("redirect to a non-HTTP URL {}", attempt.url());
                return attempt.error(Refusal(m));
            }
            // Refused directly, so refused as a redirect target too.
            if !attempt.url().username().is_empty() || attempt.url().password().is_some() {
                return attempt.error(Refusal("redirect to a URL with credentials".into()));
            }
            match literal_refusal(attempt.url()).filter(|_| !allow_internal) {
                Some(m) => attempt.error(Refusal(m)),
                None => attempt.follow(),
            }
        });
        let mut builder = reqwest::Client::builder()
            .redirect(policy)
            .timeout(config.import_timeout.0)
            .no_proxy()
            .user_agent(concat!("fwrepo/", env!("CARGO_PKG_VERSION")));
        if !allow_internal {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        Importer {
            client: builder
                .build()
                .expect("HTTP client configuration is static"),
            allow_internal,
        }
    }

    /// Starts a download; the body streams from the returned response.
    pub async fn fetch(&self, url: &url::Url) -> Result<reqwest::Response, ImportError> {
        if !self.allow_internal {
            if let Some(m) = literal_refusal(url) {
                return Err(ImportError::Refused(m));
            }
        }
        let resp = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| classify(url, e))?;
        if !resp.status().is_success() {
            return Err(ImportError::Upstream {
                url: resp.url().to_string(),
                status: resp.status().as_u16(),
            });
        }
        Ok(resp)
    }
}

/// Maps a reqwest failure, finding our refusal inside its error chain.
pub fn classify(url: &url::Url, e: reqwest::Error) -> ImportError {
    let mut source: Option<&(dyn StdError + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refusal>() {
            return ImportError::Refused(r.0.clone());
        }
        source = s.source();
    }
    if e.is_timeout() {
        return ImportError::Timeout {
            url: url.to_string(),
        };
    }
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    ImportError::Network {
        url: url.to_string(),
        message,
    }
}
