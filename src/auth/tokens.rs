//! Bearer tokens: only SHA-256 hashes are stored, the token itself is shown once. They live
//! where the metadata can be shared: in a small JSON file beside sled data (the command line
//! and the server both write it, under an exclusive lock, replaced atomically; a running
//! server notices a change on the next request), or in PostgreSQL's `fwrepo_tokens` when the
//! metadata is there, so every instance sees a revocation at once.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AuthError, Role};
use crate::meta::MetaError;

/// Prefix of every token, so a leaked one is recognisable (secret scanners, logs).
const TOKEN_PREFIX: &str = "fwr_";
/// A file changed this recently is re-read on every check: file times are coarser than the
/// interval between two writes, so the stamp alone could miss the second one.
const SETTLE: Duration = Duration::from_secs(2);

/// What is kept of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoredToken {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: String,
    /// SHA-256 of the token, hex.
    pub sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<StoredToken>,
}

/// Tokens in a shared database table (PostgreSQL).
#[async_trait]
pub trait TokenTable: Send + Sync {
    async fn any_token(&self) -> Result<bool, MetaError>;
    async fn token_by_hash(&self, sha256: &str) -> Result<Option<StoredToken>, MetaError>;
    /// In creation order.
    async fn list_tokens(&self) -> Result<Vec<StoredToken>, MetaError>;
    /// Adds a token unless one has its name; `false` then.
    async fn insert_token(&self, token: &StoredToken) -> Result<bool, MetaError>;
    /// Removes the token [`pick`] chooses among all of them, atomically with the choice.
    async fn remove_token(
        &self,
        name_or_id: &str,
        keep_last_admin: bool,
    ) -> Result<Result<StoredToken, AuthError>, MetaError>;
}

/// Which of `tokens` a revocation of `name_or_id` removes: the one with this name, or else
/// with this id; refused when it is the last admin token and `keep_last_admin` is set
/// (without one the service would run open again, or be locked out).
pub fn pick(
    tokens: &[StoredToken],
    name_or_id: &str,
    keep_last_admin: bool,
) -> Result<usize, AuthError> {
    let at = tokens
        .iter()
        .position(|t| t.name == name_or_id)
        .or_else(|| tokens.iter().position(|t| t.id == name_or_id))
        .ok_or_else(|| AuthError::NotFound(name_or_id.to_owned()))?;
    let admins = tokens.iter().filter(|t| t.role == Role::Admin).count();
    if keep_last_admin && tokens[at].role == Role::Admin && admins == 1 {
        return Err(AuthError::LastAdmin(tokens[at].name.clone()));
    }
    Ok(at)
}

/// What anyone may see of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: String,
}

/// A token just made: the only time its secret is seen.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewToken {
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

impl From<&StoredToken> for TokenInfo {
    fn from(s: &StoredToken) -> TokenInfo {
        TokenInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            role: s.role,
            created_at: s.created_at.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: SystemTime,
}

#[derive(Default)]
struct Loaded {
    stamp: Option<Stamp>,
    by_hash: HashMap<[u8; 32], TokenInfo>,
}

/// The token file and what was last read from it.
struct TokenFile {
    path: PathBuf,
    loaded: RwLock<Loaded>,
}

/// Where the tokens are.
#[derive(Clone)]
pub struct TokenStore(Backend);

#[derive(Clone)]
enum Backend {
    File(Arc<TokenFile>),
    Table(Arc<dyn TokenTable>),
}

fn table_error(e: MetaError) -> AuthError {
    AuthError::Store {
        path: "PostgreSQL".into(),
        message: e.to_string(),
    }
}

fn store_error(path: &Path, message: impl std::fmt::Display) -> AuthError {
    AuthError::Store {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn check_name(name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!(
            "name {name:?}: 1 to 64 letters, digits, '.', '_', '-' or '@'"
        )))
    }
}

/// A fresh token for `name` with `role`, and what is stored of it.
fn mint(name: &str, role: Role) -> Result<(String, StoredToken), AuthError> {
    check_name(name)?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| AuthError::Store {
        path: "the system's random source".into(),
        message: e.to_string(),
    })?;
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let digest = hash(&token);
    let created_at = jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string());
    let stored = StoredToken {
        id: hex::encode(&digest[..4]),
        name: name.to_owned(),
        role,
        created_at,
        sha256: hex::encode(digest),
    };
    Ok((token, stored))
}

/// Runs a file operation (lock, fsync) on the blocking pool.
async fn blocking<T: Send + 'static>(
    file: &Arc<TokenFile>,
    op: impl FnOnce(&TokenFile) -> Result<T, AuthError> + Send + 'static,
) -> Result<T, AuthError> {
    let f = Arc::clone(file);
    tokio::task::spawn_blocking(move || op(&f))
        .await
        .map_err(|e| store_error(&file.path, e))?
}

impl TokenStore {
    /// Tokens in the JSON file at `path`.
    pub fn file(path: &Path) -> TokenStore {
        TokenStore(Backend::File(Arc::new(TokenFile {
            path: path.to_owned(),
            loaded: RwLock::new(Loaded::default()),
        })))
    }

    /// Tokens in a shared table.
    pub fn table(table: Arc<dyn TokenTable>) -> TokenStore {
        TokenStore(Backend::Table(table))
    }

    /// Where the tokens are, for messages.
    pub fn describe(&self) -> String {
        match &self.0 {
            Backend::File(f) => f.path.display().to_string(),
            Backend::Table(_) => "PostgreSQL (table fwrepo_tokens)".into(),
        }
    }

    /// Whether no token exists (the service may then run open on loopback).
    pub async fn is_empty(&self) -> Result<bool, AuthError> {
        match &self.0 {
            Backend::File(f) => f.is_empty(),
            Backend::Table(t) => Ok(!t.any_token().await.map_err(table_error)?),
        }
    }

    /// The token's name and role.
    pub async fn check(&self, token: &str) -> Result<TokenInfo, AuthError> {
        match &self.0 {
            Backend::File(f) => f.check(token),
            Backend::Table(t) => t
                .token_by_hash(&hex::encode(hash(token)))
                .await
                .map_err(table_error)?
                .map(|s| TokenInfo::from(&s))
                .ok_or(AuthError::Unknown),
        }
    }

    /// The token with id `id` (a console session names its token by id). The file backend
    /// answers from the tokens it holds in memory, as `check` does.
    pub async fn by_id(&self, id: &str) -> Result<TokenInfo, AuthError> {
        let found = match &self.0 {
            Backend::File(f) => f.by_id(id)?,
            Backend::Table(_) => self.list().await?.into_iter().find(|t| t.id == id),
        };
        found.ok_or(AuthError::Unknown)
    }

    pub async fn list(&self) -> Result<Vec<TokenInfo>, AuthError> {
        let stored = match &self.0 {
            Backend::File(f) => blocking(f, |f| Ok(f.read_file()?.tokens)).await?,
            Backend::Table(t) => t.list_tokens().await.map_err(table_error)?,
        };
        Ok(stored.iter().map(TokenInfo::from).collect())
    }

    /// Makes a token for `name` with `role`.
    pub async fn create(&self, name: &str, role: Role) -> Result<NewToken, AuthError> {
        let (token, stored) = mint(name, role)?;
        let info = TokenInfo::from(&stored);
        match &self.0 {
            Backend::File(f) => blocking(f, |f| f.create(stored)).await?,
            Backend::Table(t) => {
                if !t.insert_token(&stored).await.map_err(table_error)? {
                    return Err(AuthError::NameTaken(name.to_owned()));
                }
            }
        }
        Ok(NewToken { token, info })
    }

    /// Removes the token with this name or id; the last admin token only with `force`.
    pub async fn revoke(&self, name_or_id: &str, force: bool) -> Result<TokenInfo, AuthError> {
        match &self.0 {
            Backend::File(f) => {
                let key = name_or_id.to_owned();
                blocking(f, move |f| f.revoke(&key, !force)).await
            }
            Backend::Table(t) => t
                .remove_token(name_or_id, !force)
                .await
                .map_err(table_error)?
                .map(|s| TokenInfo::from(&s)),
        }
    }
}

impl TokenFile {
    fn stamp(&self) -> Result<Option<Stamp>, AuthError> {
        match fs::metadata(&self.path) {
            Ok(m) => Ok(Some(Stamp {
                ino: m.ino(),
                len: m.len(),
                mtime: m.modified().map_err(|e| store_error(&self.path, e))?,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(store_error(&self.path, e)),
        }
    }

    fn read_file(&self) -> Result<File, AuthError> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| store_error(&self.path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(File::default()),
            Err(e) => Err(store_error(&self.path, e)),
        }
    }

    /// Re-reads the file when it changed. A file that cannot be read or parsed is an error,
    /// never an empty set: that would open the service.
    fn refresh(&self) -> Result<(), AuthError> {
        let stamp = self.stamp()?;
        let settled = stamp.is_none_or(|s| s.mtime.elapsed().is_ok_and(|age| age >= SETTLE));
        {
            let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
            if loaded.stamp == stamp && settled && (stamp.is_some() || loaded.by_hash.is_empty()) {
                return Ok(());
            }
        }
        let file = self.read_file()?;
        let mut by_hash = HashMap::with_capacity(file.tokens.len());
        for t in &file.tokens {
            let mut h = [0u8; 32];
            hex::decode_to_slice(&t.sha256, &mut h)
                .map_err(|_| store_error(&self.path, format!("token {:?}: bad sha256", t.name)))?;
            by_hash.insert(h, TokenInfo::from(t));
        }
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Loaded { stamp, by_hash };
        Ok(())
    }

    /// Answers `f` from the tokens as the file holds them now (re-read first if it changed).
    fn with_tokens<T>(
        &self,
        f: impl FnOnce(&HashMap<[u8; 32], TokenInfo>) -> T,
    ) -> Result<T, AuthError> {
        self.refresh()?;
        Ok(f(&self
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_hash))
    }

    fn is_empty(&self) -> Result<bool, AuthError> {
        self.with_tokens(HashMap::is_empty)
    }

    fn check(&self, token: &str) -> Result<TokenInfo, AuthError> {
        self.with_tokens(|tokens| tokens.get(&hash(token)).cloned())?
            .ok_or(AuthError::Unknown)
    }

    fn by_id(&self, id: &str) -> Result<Option<TokenInfo>, AuthError> {
        self.with_tokens(|tokens| tokens.values().find(|t| t.id == id).cloned())
    }

    /// Adds a token; blocking (file lock and fsync).
    fn create(&self, stored: StoredToken) -> Result<(), AuthError> {
        self.change(|file| {
            if file.tokens.iter().any(|t| t.name == stored.name) {
                return Err(AuthError::NameTaken(stored.name.clone()));
            }
            file.tokens.push(stored);
            Ok(())
        })
    }

    /// Removes the token [`pick`] chooses; blocking.
    fn revoke(&self, name_or_id: &str, keep_last_admin: bool) -> Result<TokenInfo, AuthError> {
        let mut removed = None;
        self.change(|file| {
            let at = pick(&file.tokens, name_or_id, keep_last_admin)?;
            removed = Some(TokenInfo::from(&file.tokens.remove(at)));
            Ok(())
        })?;
        Ok(removed.expect("set when change succeeds"))
    }

    /// Read, modify, write under an exclusive lock; the new file replaces the old atomically.
    fn change(
        &self,
        edit: impl FnOnce(&mut File) -> Result<(), AuthError>,
    ) -> Result<(), AuthError> {
        let err = |e: std::io::Error| store_error(&self.path, e);
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(err)?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.path.with_extension("lock"))
            .map_err(err)?;
        lock.lock().map_err(err)?;
        let mut file = self.read_file()?;
        edit(&mut file)?;
        let tmp = self.path.with_extension("tmp");
        let json = serde_json::to_vec_pretty(&file).map_err(|e| store_error(&self.path, e))?;
        let mut out = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        out.write_all(&json).map_err(err)?;
        out.sync_all().map_err(err)?;
        fs::rename(&tmp, &self.path).map_err(err)?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        drop(lock);
        self.refresh()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What every token store must do; `other` is a second handle on the same tokens (another
    /// process or instance).
    pub(crate) async fn behaves(store: &TokenStore, other: &TokenStore) {
        assert!(store.is_empty().await.unwrap());
        let ci = store.create("ci", Role::Publisher).await.unwrap();
        assert!(ci.token.starts_with(TOKEN_PREFIX));
        assert_eq!(store.check(&ci.token).await.unwrap().role, Role::Publisher);
        assert!(!store.is_empty().await.unwrap());
        assert!(matches!(
            store.check("fwr_nope").await,
            Err(AuthError::Unknown)
        ));
        assert!(matches!(
            other.create("ci", Role::Reader).await,
            Err(AuthError::NameTaken(_))
        ));
        assert!(matches!(
            store.create("a b", Role::Reader).await,
            Err(AuthError::Invalid(_))
        ));
        let ops = other.create("ops", Role::Admin).await.unwrap();
        let names: Vec<String> = store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["ci", "ops"]);
        // The other handle sees the change at once, and its revocation counts here at once.
        assert_eq!(other.check(&ci.token).await.unwrap().name, "ci");
        assert_eq!(other.revoke(&ci.info.id, false).await.unwrap(), ci.info);
        assert!(matches!(
            store.check(&ci.token).await,
            Err(AuthError::Unknown)
        ));
        assert!(matches!(
            store.revoke("ci", false).await,
            Err(AuthError::NotFound(_))
        ));
        // The last admin token goes only when forced; with a second admin, either may go.
        assert!(matches!(
            store.revoke("ops", false).await,
            Err(AuthError::LastAdmin(_))
        ));
        let root = store.create("root", Role::Admin).await.unwrap();
        assert_eq!(other.revoke("root", false).await.unwrap(), root.info);
        assert_eq!(store.check(&ops.token).await.unwrap().name, "ops");
        assert_eq!(store.revoke("ops", true).await.unwrap().role, Role::Admin);
        assert!(matches!(
            other.check(&ops.token).await,
            Err(AuthError::Unknown)
        ));
        assert!(store.is_empty().await.unwrap());
        assert!(store.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn token_file_behaves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = TokenStore::file(&path);
        behaves(&store, &TokenStore::file(&path)).await;
        let made = store.create("kept", Role::Reader).await.unwrap();
        let stored = fs::read_to_string(&path).unwrap();
        assert!(stored.contains(&made.info.id));
        assert!(!stored.contains(&made.token), "only the hash is stored");
        // A corrupt file is an error, never an empty (open) set.
        fs::write(&path, b"{").unwrap();
        let corrupt = TokenStore::file(&path);
        assert!(corrupt.is_empty().await.is_err());
    }
}
