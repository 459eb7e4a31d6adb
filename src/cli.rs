//! The command line: `serve`, `keygen`, `config`, `keys`, `token`, and the client commands
//! `push` and `pull` (in `client/`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "fwrepo",
    version,
    about = "Firmware repository and FOTA service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        #[command(flatten)]
        layers: Layers,
        /// Run open (no tokens) even when listening beyond loopback; prints a warning.
        #[arg(long)]
        insecure: bool,
    },
    /// Create a new Ed25519 signing key in the key directory and print its id.
    Keygen(Layers),
    /// Print the effective configuration as TOML.
    Config(Layers),
    /// The signing keys' public halves, for device builds.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Access tokens: create (shown once), list, revoke. A running service sees changes at once.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Upload an image to a running service (streamed, resumable, safe to re-run).
    Push(Box<crate::client::push::PushArgs>),
    /// Download an image from a running service, resuming a partial file; checks the digest
    /// and the signature.
    Pull(crate::client::pull::PullArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token and print it; only its hash is kept.
    Create {
        #[command(flatten)]
        layers: Layers,
        /// admin, publisher, operator, reader or gateway (hawkBit device API only).
        #[arg(long)]
        role: String,
        /// Who or what holds it (shown in the audit log).
        #[arg(long)]
        name: String,
    },
    /// List tokens: id, name, role, creation time.
    List(Layers),
    /// Revoke a token by name or id.
    Revoke {
        #[command(flatten)]
        layers: Layers,
        /// The token's name or id.
        token: String,
        /// Revoke it even if it is the last admin token (the API refuses that).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// List the keys: id, active or retired, file.
    List(Layers),
    /// Print a public key as PEM, SPKI DER (binary) or the C array MCUboot embeds.
    Export {
        #[command(flatten)]
        layers: Layers,
        /// Key id; the active key when absent.
        #[arg(long)]
        key: Option<String>,
        /// pem, der or c.
        #[arg(long, default_value = "pem")]
        format: crate::keys::PublicFormat,
    },
}

/// The configuration layers every command reads.
#[derive(Args)]
struct Layers {
    /// TOML configuration file.
    #[arg(long, env = "FWREPO_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP listen address (http.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Public base URL handed to devices (http.public_url).
    #[arg(long)]
    public_url: Option<String>,
    /// Data root (storage.root).
    #[arg(long)]
    storage: Option<PathBuf>,
    /// Key directory (keys.dir).
    #[arg(long)]
    keys: Option<PathBuf>,
    /// Any key as section.key=value; may be repeated.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

impl Layers {
    fn load(&self) -> Result<Config, String> {
        let mut sets = Vec::new();
        let flags = [
            ("http.listen", self.listen.clone()),
            ("http.public_url", self.public_url.clone()),
            (
                "storage.root",
                self.storage.as_ref().map(|p| p.display().to_string()),
            ),
            (
                "keys.dir",
                self.keys.as_ref().map(|p| p.display().to_string()),
            ),
        ];
        for (key, value) in flags {
            if let Some(v) = value {
                sets.push(format!("{key}={v}"));
            }
        }
        sets.extend(self.sets.iter().cloned());
        Config::load(self.config.as_deref(), std::env::vars(), &sets).map_err(|e| e.to_string())
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { layers, insecure } => layers.load().and_then(|mut c| {
            c.auth.insecure |= insecure;
            serve(c)
        }),
        Command::Token(command) => token(command),
        Command::Keygen(layers) => layers.load().and_then(|c| {
            let path = crate::keys::generate(&c.keys.dir).map_err(|e| e.to_string())?;
            let ring =
                crate::keys::KeyRing::load_or_create(&c.keys.dir, "").map_err(|e| e.to_string())?;
            let key = ring
                .all()
                .iter()
                .find(|k| k.path == path)
                .ok_or("new key not found after writing it")?;
            crate::auth::AuditLog::open(Some(&c.audit_path())).record(
                &crate::auth::AuditEvent::now(&cli_actor(), None, "key generate", &key.id),
            );
            println!("{}", key.id);
            eprintln!(
                "created {}; set keys.active = \"{}\" to sign with it",
                path.display(),
                key.id
            );
            Ok(())
        }),
        Command::Config(layers) => layers.load().map(|c| {
            print!("{}", toml::to_string(&c).unwrap_or_default());
        }),
        Command::Keys(command) => keys(command),
        Command::Push(args) => crate::client::run(crate::client::push::push(*args)),
        Command::Pull(args) => crate::client::run(crate::client::pull::pull(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fwrepo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Who changes things from the command line, for the audit log.
fn cli_actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

fn token(command: TokenCommand) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(token_async(command))
}

async fn token_async(command: TokenCommand) -> Result<(), String> {
    use crate::auth::{AuditEvent, AuditLog, Role};
    let layers = match &command {
        TokenCommand::Create { layers, .. }
        | TokenCommand::List(layers)
        | TokenCommand::Revoke { layers, .. } => layers,
    };
    let config = layers.load()?;
    let backend = config.meta_backend().map_err(|e| e.to_string())?;
    let store = crate::meta::open_tokens(&backend, &config.tokens_path())
        .await
        .map_err(|e| e.to_string())?;
    let audit = AuditLog::open(Some(&config.audit_path()));
    let actor = cli_actor();
    match command {
        TokenCommand::Create { role, name, .. } => {
            let role: Role = role
                .parse()
                .map_err(|e: crate::auth::AuthError| e.to_string())?;
            let made = store.create(&name, role).await.map_err(|e| e.to_string())?;
            audit.record(&AuditEvent::now(
                &actor,
                None,
                "token create",
                &format!("token {name} ({role})"),
            ));
            println!("{}", made.token);
            eprintln!(
                "token {:?} ({role}, id {}) created in {}; it is shown only now. Send it as: Authorization: Bearer <token>",
                made.info.name,
                made.info.id,
                store.describe()
            );
        }
        TokenCommand::List(_) => {
            for t in store.list().await.map_err(|e| e.to_string())? {
                println!("{}\t{}\t{}\t{}", t.id, t.name, t.role, t.created_at);
            }
        }
        TokenCommand::Revoke { token, force, .. } => {
            let gone = store
                .revoke(&token, force)
                .await
                .map_err(|e| e.to_string())?;
            audit.record(&AuditEvent::now(
                &actor,
                None,
                "token revoke",
                &format!("token {} ({})", gone.name, gone.role),
            ));
            eprintln!("token {:?} ({}) revoked", gone.name, gone.id);
        }
    }
    Ok(())
}

fn keys(command: KeysCommand) -> Result<(), String> {
    use std::io::Write;
    let (layers, export) = match &command {
        KeysCommand::List(layers) => (layers, None),
        KeysCommand::Export {
            layers,
            key,
            format,
        } => (layers, Some((key, *format))),
    };
    let config = layers.load()?;
    let ring = crate::keys::KeyRing::load_or_create(&config.keys.dir, &config.keys.active)
        .map_err(|e| e.to_string())?;
    let Some((key, format)) = export else {
        for k in ring.all() {
            let state = if k.id == ring.active().id {
                "active"
            } else {
                "retired"
            };
            println!("{}\t{state}\t{}", k.id, k.path.display());
        }
        return Ok(());
    };
    let entry = match key {
        None => ring.active(),
        Some(id) => ring
            .get(id)
            .ok_or_else(|| format!("key {id:?} is not in {}", config.keys.dir.display()))?,
    };
    let (_, bytes) = entry.export(format);
    std::io::stdout()
        .write_all(&bytes)
        .map_err(|e| e.to_string())
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if config.log.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn serve(config: Config) -> Result<(), String> {
    init_logging(&config);
    // Metadata and file calls run on the blocking pool. tokio allows 512 threads by default;
    // 128 is more than the stores and disks can use at once.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(128)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let cancel = CancellationToken::new();
        let running = crate::server::start(&config, cancel.clone())
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            cancel.cancel();
        });
        running.wait().await;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
