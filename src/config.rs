//! Service configuration: defaults < TOML file < `FWREPO_SECTION_KEY` environment < flags.
//!
//! Every layer is merged as a TOML table over the serialised defaults, so one list of keys
//! (the structs below) drives the file format, the environment names and `--set`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::name::{format_duration, parse_duration};

/// Why the configuration could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: unknown configuration key {key:?}")]
    UnknownKey { origin: String, key: String },
    #[error("{origin}: {key} expects {expected}, got {value:?}")]
    BadValue {
        origin: String,
        key: String,
        expected: &'static str,
        value: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A duration written as `<integer><unit>` in files and environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

/// The whole configuration. Field docs are mirrored in `deploy/fwrepo.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub https: HttpsConfig,
    pub auth: AuthConfig,
    pub storage: StorageConfig,
    pub s3: S3Config,
    pub keys: KeysConfig,
    pub retention: RetentionConfig,
    pub cache: CacheConfig,
    pub coap: CoapConfig,
    pub fota: FotaConfig,
    pub log: LogConfig,
}

/// More serving threads than this is a typo, not a machine.
const MAX_HTTP_THREADS: u32 = 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP listener.
    pub listen: String,
    /// Base of the URIs handed to devices; empty means `http://<listen>`.
    pub public_url: String,
    /// Largest accepted firmware image in bytes.
    pub max_upload_size: u64,
    /// How long shutdown waits for in-flight requests before closing them.
    pub shutdown_grace: Dur,
    /// Longest time from a new connection (or the first byte of a later request) to the end
    /// of the request's headers, TLS handshake included; HTTP and HTTPS.
    pub header_read_timeout: Dur,
    /// Longest a kept-alive connection waits for its next request.
    pub idle_timeout: Dur,
    /// Longest a request body may send nothing, or a response wait for the client to take
    /// more; a stalled upload is cut and nothing of it is stored.
    pub body_timeout: Dur,
    /// Most connections each listener (HTTP, HTTPS) serves at once; beyond it new ones wait
    /// in the kernel's backlog until one closes.
    pub max_connections: u32,
    /// Threads that serve HTTP and HTTPS connections, each with its own runtime and
    /// listening socket on the shared address; 0 is one per core.
    pub threads: u32,
    /// A resumable upload (tus, `/v1/uploads`) no request touched for this long is removed
    /// with its bytes.
    pub upload_expiry: Dur,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            public_url: String::new(),
            max_upload_size: 4 << 30,
            shutdown_grace: Dur(Duration::from_secs(30)),
            header_read_timeout: Dur(Duration::from_secs(10)),
            idle_timeout: Dur(Duration::from_secs(60)),
            body_timeout: Dur(Duration::from_secs(60)),
            max_connections: 4096,
            threads: 0,
            upload_expiry: Dur(Duration::from_secs(24 * 3600)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Data root for the embedded defaults.
    pub root: PathBuf,
    /// Blob store URL: `file:<path>`, `memory://` or `s3://bucket/prefix`; empty means
    /// `file:<root>/blobs`.
    pub blobs: String,
    /// Metadata store: `sled:<path>`; empty means `sled:<root>/metadata`.
    pub metadata: String,
    /// Unreferenced blobs and staged uploads younger than this survive the start-up sweep.
    /// Zero suits one instance; several instances sharing a store want the longest upload time.
    pub orphan_grace: Dur,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            root: PathBuf::from("storage"),
            blobs: String::new(),
            metadata: String::new(),
            orphan_grace: Dur(Duration::ZERO),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint of an S3-compatible server; empty means AWS.
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Allow a plain-HTTP endpoint (local SeaweedFS, MinIO).
    pub allow_http: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: String::new(),
            region: "us-east-1".into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            allow_http: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// Directory of Ed25519 private keys (PKCS#8 PEM, mode 0600).
    pub dir: PathBuf,
    /// Key id that signs new uploads; empty means the newest key in `dir`.
    pub active: String,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            dir: PathBuf::from("keys"),
            active: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Longest the sweeper sleeps between passes even when no expiry is due.
    pub sweep_interval: Dur,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            sweep_interval: Dur(Duration::from_secs(3600)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Memory for hot images served as slices (HTTP ranges, CoAP blocks); 0 turns it off.
    pub max_bytes: u64,
    /// Larger images are not held whole: only their read-ahead chunks are cached.
    pub max_image: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 256 << 20,
            max_image: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoapConfig {
    /// CoAP over TCP (RFC 8323) listener; empty turns it off.
    pub tcp_listen: String,
    /// CoAP over UDP (RFC 7252) listener; empty turns it off.
    pub udp_listen: String,
    /// CoAP over TLS listener; on only when tls_cert and tls_key are set.
    pub tls_listen: String,
    /// PEM certificate chain for coaps+tcp.
    pub tls_cert: String,
    /// PEM private key for coaps+tcp.
    pub tls_key: String,
    /// Bases of the URIs handed to devices; empty means scheme://<listen address>.
    pub public_tcp_url: String,
    pub public_udp_url: String,
    pub public_tls_url: String,
    /// TCP and TLS connections at most; more are answered with an Abort.
    pub max_connections: u64,
    /// A connection silent this long is released.
    pub idle_timeout: Dur,
    /// Serve a UDP address only after it echoed an Echo value (RFC 9175), so a spoofed
    /// request cannot make fwrepo send a large block to a victim. Off on trusted networks
    /// saves clients one round trip.
    pub udp_verify_peers: bool,
    /// CoAP over DTLS 1.2 (`coaps://`, UDP) listener; empty turns it off. Devices connect with
    /// the pre-shared key set on them (`PUT /v1/devices/{id}/psk`).
    pub dtls_listen: String,
    pub public_dtls_url: String,
    /// DTLS sessions at most (established or not); new handshakes beyond are dropped.
    pub dtls_max_sessions: u64,
    /// DTLS handshakes in progress at most.
    pub dtls_max_handshakes: u64,
    /// A DTLS handshake not finished in this time is dropped. Idle sessions go after
    /// `idle_timeout`.
    pub dtls_handshake_timeout: Dur,
    /// PEM file of the CAs that sign devices' certificates. When set, a DTLS client may
    /// present a certificate (certificate mode); one that verifies makes the session act as
    /// the device its subject's common name names.
    pub dtls_client_ca: String,
}

impl Default for CoapConfig {
    fn default() -> Self {
        CoapConfig {
            tcp_listen: "127.0.0.1:5683".into(),
            udp_listen: "127.0.0.1:5683".into(),
            tls_listen: "127.0.0.1:5684".into(),
            tls_cert: String::new(),
            tls_key: String::new(),
            public_tcp_url: String::new(),
            public_udp_url: String::new(),
            public_tls_url: String::new(),
            max_connections: 10_000,
            idle_timeout: Dur(Duration::from_secs(300)),
            udp_verify_peers: true,
            dtls_listen: "127.0.0.1:5684".into(),
            public_dtls_url: String::new(),
            dtls_max_sessions: 10_000,
            dtls_max_handshakes: 1_000,
            dtls_handshake_timeout: Dur(Duration::from_secs(30)),
            dtls_client_ca: String::new(),
        }
    }
}

impl CoapConfig {
    /// Whether coaps+tcp is configured.
    pub fn tls_enabled(&self) -> bool {
        !self.tls_listen.is_empty() && !self.tls_cert.is_empty() && !self.tls_key.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FotaConfig {
    /// Tasks scheduled with `useQuota` that may be between delivering and updating at once.
    pub quota: u64,
    /// How long a task deferred by its device (result 11) waits before it is offered again.
    pub deferred_retry: Dur,
    /// Hint given to a device with nothing to do: ask again after this long.
    pub poll_interval: Dur,
    /// Longest a firmware import (`firmwareUrl`, `POST /v1/imports`) may take.
    pub import_timeout: Dur,
    /// Redirects an import follows at most.
    pub import_max_redirects: u64,
    /// Let imports reach loopback, private, link-local and multicast addresses. Off by default
    /// so a caller cannot make the service fetch from the network it runs in.
    pub import_allow_internal: bool,
    /// An instance importing a task's firmware renews its claim every third of this; when it
    /// stops (a crash), another instance sharing the metadata takes the import over.
    pub import_lease: Dur,
    /// With metadata shared by several instances (PostgreSQL), how often each looks for
    /// deadlines and windows that other instances set.
    pub shared_timer_poll: Dur,
    /// How often the bytes served per task are stored, so every instance shows them and a
    /// crash loses at most this much of a task's progress (a stop loses none).
    pub progress_save: Dur,
    /// The tenant in hawkBit device API paths (`/{tenant}/controller/v1/...`), compared
    /// without regard to case as hawkBit does; other tenants are not found.
    pub ddi_tenant: String,
}

impl Default for FotaConfig {
    fn default() -> Self {
        FotaConfig {
            quota: 10,
            deferred_retry: Dur(Duration::from_secs(300)),
            poll_interval: Dur(Duration::from_secs(60)),
            import_timeout: Dur(Duration::from_secs(600)),
            import_max_redirects: 5,
            import_allow_internal: false,
            import_lease: Dur(Duration::from_secs(30)),
            shared_timer_poll: Dur(Duration::from_secs(5)),
            progress_save: Dur(Duration::from_secs(5)),
            ddi_tenant: "DEFAULT".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpsConfig {
    /// Address of the HTTPS listener; on only when cert and key are set.
    pub listen: String,
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    /// Base of the https URIs handed out; empty means `https://<listen address>`.
    pub public_url: String,
}

impl Default for HttpsConfig {
    fn default() -> Self {
        HttpsConfig {
            listen: "127.0.0.1:8443".into(),
            cert: String::new(),
            key: String::new(),
            public_url: String::new(),
        }
    }
}

impl HttpsConfig {
    pub fn enabled(&self) -> bool {
        !self.listen.is_empty() && !self.cert.is_empty() && !self.key.is_empty()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Token hashes (`fwrepo token create|list|revoke` and `/v1/tokens` write it); empty means
    /// `<storage.root>/tokens.json`. Not used when the metadata is in PostgreSQL, which then
    /// keeps the tokens.
    pub tokens_file: String,
    /// Audit trail, one JSON line per change; empty means `<storage.root>/audit.log`.
    pub audit_log: String,
    /// Require each FOTA task's package URI token for downloads: `/p/{fotaId}` without it is
    /// refused, and downloads by name (`/fw/{name}`) need a reader token over HTTP and are
    /// refused over CoAP.
    pub package_tokens: bool,
    /// Every device must present its device token on work requests and reports; without it
    /// only devices that have a token must.
    pub device_credentials: bool,
    /// Run open (no tokens) even when listening beyond loopback (`serve --insecure`).
    pub insecure: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter such as `info` or `info,fwrepo::http=debug` (every answer logged);
    /// `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

fn addr(key: &str, listen: &str) -> Result<SocketAddr, ConfigError> {
    listen
        .parse()
        .map_err(|_| ConfigError::Invalid(format!("{key} {listen:?} is not host:port")))
}

/// Where the blobs live, decided once from `storage.blobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobBackend {
    File(PathBuf),
    Memory,
    S3 { bucket: String, prefix: String },
}

/// Where the metadata lives, decided once from `storage.metadata`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaBackend {
    Sled(PathBuf),
    /// A PostgreSQL connection URL (`postgres://user:password@host:port/database`).
    Postgres(String),
}

impl Config {
    /// Builds the configuration from every layer. `file` is the TOML file (if any), `env` the
    /// process environment and `sets` the `section.key=value` pairs given as flags.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Config, ConfigError> {
        let mut table = toml::Table::try_from(Config::default()).expect("defaults serialise");
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let layer: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Parse {
                        path: path.to_owned(),
                        message: e.message().to_owned(),
                    })?;
            let origin = path.display().to_string();
            for (section, values) in layer {
                let Some(values) = values.as_table() else {
                    return Err(ConfigError::UnknownKey {
                        origin,
                        key: section,
                    });
                };
                for (key, value) in values {
                    set_key(
                        &mut table,
                        &origin,
                        &format!("{section}.{key}"),
                        Some(value.clone()),
                        None,
                    )?;
                }
            }
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("FWREPO_") && k != "FWREPO_CONFIG")
            .collect();
        env.sort();
        for (var, value) in env {
            let key = env_key(&table, &var).ok_or_else(|| ConfigError::UnknownKey {
                origin: "environment".into(),
                key: var.clone(),
            })?;
            set_key(&mut table, &var, &key, None, Some(&value))?;
        }
        for set in sets {
            let (key, value) = set.split_once('=').ok_or_else(|| ConfigError::BadValue {
                origin: "--set".into(),
                key: set.clone(),
                expected: "section.key=value",
                value: set.clone(),
            })?;
            set_key(&mut table, "--set", key.trim(), None, Some(value))?;
        }
        let config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: addresses parse, URIs stay short enough for LwM2M.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut bases = Vec::new();
        if self.http_listen()?.is_some() {
            bases.push(("http.public_url", self.public_http_url()?));
        }
        if self.https.cert.is_empty() != self.https.key.is_empty() {
            return Err(ConfigError::Invalid(
                "https.cert and https.key go together".into(),
            ));
        }
        if self.https.enabled() {
            bases.push(("https.public_url", self.public_https_url()?));
        }
        if bases.is_empty() {
            return Err(ConfigError::Invalid(
                "neither HTTP nor HTTPS is on: set http.listen, or https.cert and https.key".into(),
            ));
        }
        for (key, base) in bases {
            // /5/0/1 Package URI holds 255 characters: base + "/fw/" + a 128-character name.
            let longest = base.len() + "/fw/".len() + crate::name::MAX_NAME_LEN;
            if longest > 255 {
                return Err(ConfigError::Invalid(format!(
                    "{key} is {} characters; download URIs would reach {longest} of the 255 an LwM2M Package URI holds",
                    base.len()
                )));
            }
        }
        self.listen_addrs()?;
        for (key, every) in [
            ("fota.shared_timer_poll", self.fota.shared_timer_poll),
            ("fota.progress_save", self.fota.progress_save),
            ("http.upload_expiry", self.http.upload_expiry),
            ("fota.import_lease", self.fota.import_lease),
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.idle_timeout", self.http.idle_timeout),
            ("http.body_timeout", self.http.body_timeout),
        ] {
            if every.0.is_zero() {
                return Err(ConfigError::Invalid(format!("{key} must be more than 0s")));
            }
        }
        let tenant = &self.fota.ddi_tenant;
        if tenant.is_empty()
            || tenant.len() > 64
            || !tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(ConfigError::Invalid(format!(
                "fota.ddi_tenant {tenant:?}: 1 to 64 letters, digits, '.', '_' or '-'"
            )));
        }
        if self.http.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "http.max_connections must be at least 1".into(),
            ));
        }
        if self.http.threads > MAX_HTTP_THREADS {
            return Err(ConfigError::Invalid(format!(
                "http.threads must be at most {MAX_HTTP_THREADS} (0: one per core)"
            )));
        }
        for (key, listen) in [
            ("coap.tcp_listen", &self.coap.tcp_listen),
            ("coap.udp_listen", &self.coap.udp_listen),
            ("coap.tls_listen", &self.coap.tls_listen),
            ("coap.dtls_listen", &self.coap.dtls_listen),
        ] {
            if !listen.is_empty() && listen.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "{key} {listen:?} is not host:port"
                )));
            }
        }
        if !self.coap.dtls_client_ca.is_empty() && self.coap.tls_cert.is_empty() {
            return Err(ConfigError::Invalid(
                "coap.dtls_client_ca needs the server's certificate: coap.tls_cert and coap.tls_key"
                    .into(),
            ));
        }
        if self.coap.tls_cert.is_empty() != self.coap.tls_key.is_empty() {
            return Err(ConfigError::Invalid(
                "coap.tls_cert and coap.tls_key go together".into(),
            ));
        }
        for (key, url) in [
            ("coap.public_tcp_url", &self.coap.public_tcp_url),
            ("coap.public_udp_url", &self.coap.public_udp_url),
            ("coap.public_tls_url", &self.coap.public_tls_url),
            ("coap.public_dtls_url", &self.coap.public_dtls_url),
        ] {
            if url.len() + "/fw/".len() + crate::name::MAX_NAME_LEN > 255 {
                return Err(ConfigError::Invalid(format!(
                    "{key} is {} characters; URIs must fit the 255 of an LwM2M Package URI",
                    url.len()
                )));
            }
        }
        self.blob_backend()?;
        self.meta_backend()?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid(format!(
                "log.format must be text or json, not {:?}",
                self.log.format
            )));
        }
        Ok(())
    }

    pub fn tokens_path(&self) -> PathBuf {
        if self.auth.tokens_file.is_empty() {
            self.storage.root.join("tokens.json")
        } else {
            PathBuf::from(&self.auth.tokens_file)
        }
    }

    pub fn audit_path(&self) -> PathBuf {
        if self.auth.audit_log.is_empty() {
            self.storage.root.join("audit.log")
        } else {
            PathBuf::from(&self.auth.audit_log)
        }
    }

    /// Every address the service listens on, for the open-mode check.
    pub fn listen_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        let mut all = Vec::new();
        if let Some(a) = self.http_listen()? {
            all.push(a);
        }
        if self.https.enabled() {
            all.push(self.https_listen()?);
        }
        for listen in [
            &self.coap.tcp_listen,
            &self.coap.udp_listen,
            &self.coap.dtls_listen,
        ] {
            if !listen.is_empty() {
                all.push(addr("coap", listen)?);
            }
        }
        if self.coap.tls_enabled() {
            all.push(addr("coap.tls_listen", &self.coap.tls_listen)?);
        }
        Ok(all)
    }

    /// The HTTP listener's address; `None` when `http.listen` is empty (HTTPS only).
    pub fn http_listen(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.http.listen.is_empty() {
            return Ok(None);
        }
        addr("http.listen", &self.http.listen).map(Some)
    }

    pub fn https_listen(&self) -> Result<SocketAddr, ConfigError> {
        addr("https.listen", &self.https.listen)
    }

    /// The public HTTPS base URL without a trailing slash.
    pub fn public_https_url(&self) -> Result<String, ConfigError> {
        if self.https.public_url.is_empty() {
            return Ok(format!("https://{}", self.https_listen()?));
        }
        let url = url::Url::parse(&self.https.public_url).map_err(|e| {
            ConfigError::Invalid(format!("https.public_url {:?}: {e}", self.https.public_url))
        })?;
        if url.scheme() != "https" || url.query().is_some() {
            return Err(ConfigError::Invalid(format!(
                "https.public_url {:?} must be an https URL without query",
                self.https.public_url
            )));
        }
        Ok(self.https.public_url.trim_end_matches('/').to_owned())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.http.listen.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "http.listen {:?} is not host:port",
                self.http.listen
            ))
        })
    }

    /// The public HTTP base URL without a trailing slash.
    pub fn public_http_url(&self) -> Result<String, ConfigError> {
        if self.http.public_url.is_empty() {
            return Ok(format!("http://{}", self.listen_addr()?));
        }
        let url = url::Url::parse(&self.http.public_url).map_err(|e| {
            ConfigError::Invalid(format!("http.public_url {:?}: {e}", self.http.public_url))
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.query().is_some() {
            return Err(ConfigError::Invalid(format!(
                "http.public_url {:?} must be an http(s) URL without query",
                self.http.public_url
            )));
        }
        Ok(self.http.public_url.trim_end_matches('/').to_owned())
    }

    pub fn blob_backend(&self) -> Result<BlobBackend, ConfigError> {
        let spec = &self.storage.blobs;
        if spec.is_empty() {
            return Ok(BlobBackend::File(self.storage.root.join("blobs")));
        }
        if let Some(path) = spec.strip_prefix("file:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(ConfigError::Invalid(
                    "storage.blobs file: needs a path".into(),
                ));
            }
            return Ok(BlobBackend::File(PathBuf::from(path)));
        }
        if spec == "memory://" || spec == "memory:" {
            return Ok(BlobBackend::Memory);
        }
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(ConfigError::Invalid(
                    "storage.blobs s3:// needs a bucket".into(),
                ));
            }
            return Ok(BlobBackend::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        Err(ConfigError::Invalid(format!(
            "storage.blobs {spec:?}: expected file:<path>, memory:// or s3://bucket/prefix"
        )))
    }

    pub fn meta_backend(&self) -> Result<MetaBackend, ConfigError> {
        let spec = &self.storage.metadata;
        if spec.is_empty() {
            return Ok(MetaBackend::Sled(self.storage.root.join("metadata")));
        }
        if let Some(path) = spec.strip_prefix("sled:") {
            return Ok(MetaBackend::Sled(PathBuf::from(path)));
        }
        if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            crate::meta::pg_tls::parse(spec).map_err(|e| {
                ConfigError::Invalid(format!("storage.metadata: not a PostgreSQL URL: {e}"))
            })?;
            return Ok(MetaBackend::Postgres(spec.clone()));
        }
        Err(ConfigError::Invalid(format!(
            "storage.metadata {spec:?}: expected sled:<path> or postgres://user:password@host:port/database"
        )))
    }
}

/// Maps `FWREPO_HTTP_MAX_UPLOAD_SIZE` to `http.max_upload_size` by looking the key up.
fn env_key(table: &toml::Table, var: &str) -> Option<String> {
    let rest = var.strip_prefix("FWREPO_")?.to_ascii_lowercase();
    table.iter().find_map(|(section, values)| {
        let key = rest.strip_prefix(&format!("{section}_"))?;
        values
            .as_table()?
            .contains_key(key)
            .then(|| format!("{section}.{key}"))
    })
}

/// Sets `section.key` from either a TOML value or a string, keeping the default's type.
fn set_key(
    table: &mut toml::Table,
    origin: &str,
    key: &str,
    value: Option<toml::Value>,
    text: Option<&str>,
) -> Result<(), ConfigError> {
    let unknown = || ConfigError::UnknownKey {
        origin: origin.to_owned(),
        key: key.to_owned(),
    };
    let (section, field) = key.split_once('.').ok_or_else(unknown)?;
    let slot = table
        .get_mut(section)
        .and_then(|s| s.as_table_mut())
        .and_then(|s| s.get_mut(field))
        .ok_or_else(unknown)?;
    let bad = |expected, value: String| ConfigError::BadValue {
        origin: origin.to_owned(),
        key: key.to_owned(),
        expected,
        value,
    };
    let new = match (slot.clone(), value, text) {
        (toml::Value::String(_), Some(v @ toml::Value::String(_)), _) => v,
        (toml::Value::String(_), None, Some(t)) => toml::Value::String(t.to_owned()),
        (toml::Value::Integer(_), Some(v @ toml::Value::Integer(_)), _) => v,
        (toml::Value::Integer(_), None, Some(t)) => toml::Value::Integer(
            t.trim()
                .parse()
                .map_err(|_| bad("an integer", t.to_owned()))?,
        ),
        (toml::Value::Boolean(_), Some(v @ toml::Value::Boolean(_)), _) => v,
        (toml::Value::Boolean(_), None, Some(t)) => match t.trim() {
            "true" | "1" | "yes" => toml::Value::Boolean(true),
            "false" | "0" | "no" => toml::Value::Boolean(false),
            _ => return Err(bad("true or false", t.to_owned())),
        },
        (old, Some(v), _) => return Err(bad(type_name(&old), v.to_string())),
        (old, None, t) => return Err(bad(type_name(&old), t.unwrap_or_default().to_owned())),
    };
    *slot = new;
    Ok(())
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Boolean(_) => "a boolean",
        _ => "a value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[http]\nlisten = \"127.0.0.1:9000\"\nmax_upload_size = 10\n[keys]\nactive = \"file\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("FWREPO_HTTP_MAX_UPLOAD_SIZE", "20"),
                ("FWREPO_KEYS_ACTIVE", "env"),
                ("PATH", "/bin"),
            ]),
            &["keys.active=flag".into()],
        )
        .unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:9000");
        assert_eq!(c.http.max_upload_size, 20);
        assert_eq!(c.keys.active, "flag");
        assert_eq!(c.http.shutdown_grace, Dur(Duration::from_secs(30)));
    }

    #[test]
    fn bad_layers_are_named() {
        let e = Config::load(None, env(&[("FWREPO_HTTP_NOPE", "1")]), &[]).unwrap_err();
        assert!(e.to_string().contains("FWREPO_HTTP_NOPE"), "{e}");
        let e =
            Config::load(None, env(&[("FWREPO_HTTP_MAX_UPLOAD_SIZE", "big")]), &[]).unwrap_err();
        assert!(e.to_string().contains("integer"), "{e}");
        let e = Config::load(None, vec![], &["retention.sweep_interval=soon".into()]).unwrap_err();
        assert!(e.to_string().contains("duration"), "{e}");
        let long = format!("http.public_url=http://{}.example", "a".repeat(130));
        assert!(Config::load(None, vec![], &[long]).is_err());
        for key in [
            "fota.shared_timer_poll",
            "fota.progress_save",
            "fota.import_lease",
        ] {
            let e = Config::load(None, vec![], &[format!("{key}=0s")]).unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
        let e = Config::load(None, vec![], &["http.threads=100000".into()]).unwrap_err();
        assert!(e.to_string().contains("http.threads"), "{e}");
        let c = Config::load(None, vec![], &["http.threads=3".into()]).unwrap();
        assert_eq!(c.http.threads, 3);
    }

    #[test]
    fn backends_by_url() {
        let mut c = Config::default();
        assert_eq!(
            c.blob_backend().unwrap(),
            BlobBackend::File("storage/blobs".into())
        );
        c.storage.blobs = "s3://fw/prod/eu".into();
        assert_eq!(
            c.blob_backend().unwrap(),
            BlobBackend::S3 {
                bucket: "fw".into(),
                prefix: "prod/eu".into()
            }
        );
        c.storage.blobs = "memory://".into();
        assert_eq!(c.blob_backend().unwrap(), BlobBackend::Memory);
        c.storage.blobs = "ftp://x".into();
        assert!(c.blob_backend().is_err());
    }

    #[test]
    fn metadata_backends() {
        let mut c = Config::default();
        assert_eq!(
            c.meta_backend().unwrap(),
            MetaBackend::Sled("storage/metadata".into())
        );
        let url = "postgres://fwrepo:secret@db.example:5432/fwrepo";
        c.storage.metadata = url.into();
        assert_eq!(c.meta_backend().unwrap(), MetaBackend::Postgres(url.into()));
        c.storage.metadata = "postgres://host:notaport/db".into();
        assert!(c.meta_backend().is_err());
        let tls = "postgres://fwrepo@db.example/fwrepo?sslmode=verify-full&sslrootcert=/etc/ca.pem";
        c.storage.metadata = tls.into();
        assert_eq!(c.meta_backend().unwrap(), MetaBackend::Postgres(tls.into()));
        c.storage.metadata = "postgres://db.example/fwrepo?sslmode=verify-full".into();
        let e = c.meta_backend().unwrap_err().to_string();
        assert!(e.contains("sslrootcert"), "{e}");
        c.storage.metadata = "mysql://x".into();
        assert!(c.meta_backend().is_err());
    }
}
