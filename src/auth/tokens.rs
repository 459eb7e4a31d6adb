//! Bearer tokens in a small JSON file beside the data: only SHA-256 hashes are stored, the
//! token itself is shown once. The command line and the HTTP API both write the file (under
//! an exclusive lock, replaced atomically), and a running server notices a change on the next
//! request, so revocation needs no restart.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AuthError, Role};

/// Prefix of every token, so a leaked one is recognisable (secret scanners, logs).
const TOKEN_PREFIX: &str = "fwr_";
/// A file changed this recently is re-read on every check: file times are coarser than the
/// interval between two writes, so the stamp alone could miss the second one.
const SETTLE: Duration = Duration::from_secs(2);

/// What the file keeps of a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Stored {
    id: String,
    name: String,
    role: Role,
    created_at: String,
    /// SHA-256 of the token, hex.
    sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<Stored>,
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

impl From<&Stored> for TokenInfo {
    fn from(s: &Stored) -> TokenInfo {
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
pub struct TokenStore {
    path: PathBuf,
    loaded: RwLock<Loaded>,
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

impl TokenStore {
    pub fn open(path: &Path) -> TokenStore {
        TokenStore {
            path: path.to_owned(),
            loaded: RwLock::new(Loaded::default()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

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

    /// Whether no token exists (the service may then run open on loopback).
    pub fn is_empty(&self) -> Result<bool, AuthError> {
        self.refresh()?;
        Ok(self
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_hash
            .is_empty())
    }

    /// The token's name and role.
    pub fn check(&self, token: &str) -> Result<TokenInfo, AuthError> {
        self.refresh()?;
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_hash
            .get(&hash(token))
            .cloned()
            .ok_or(AuthError::Unknown)
    }

    pub fn list(&self) -> Result<Vec<TokenInfo>, AuthError> {
        Ok(self
            .read_file()?
            .tokens
            .iter()
            .map(TokenInfo::from)
            .collect())
    }

    /// Makes a token for `name` with `role`; blocking (file lock and fsync).
    pub fn create(&self, name: &str, role: Role) -> Result<NewToken, AuthError> {
        check_name(name)?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| store_error(&self.path, e))?;
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
        let digest = hash(&token);
        let created_at = jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string());
        let stored = Stored {
            id: hex::encode(&digest[..4]),
            name: name.to_owned(),
            role,
            created_at,
            sha256: hex::encode(digest),
        };
        let info = TokenInfo::from(&stored);
        self.change(|file| {
            if file.tokens.iter().any(|t| t.name == name) {
                return Err(AuthError::NameTaken(name.to_owned()));
            }
            file.tokens.push(stored);
            Ok(())
        })?;
        Ok(NewToken { token, info })
    }

    /// Removes the token with this name or id; blocking.
    pub fn revoke(&self, name_or_id: &str) -> Result<TokenInfo, AuthError> {
        let mut removed = None;
        self.change(|file| {
            let at = file
                .tokens
                .iter()
                .position(|t| t.name == name_or_id || t.id == name_or_id)
                .ok_or_else(|| AuthError::NotFound(name_or_id.to_owned()))?;
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
mod tests {
    use super::*;

    #[test]
    fn create_check_list_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = TokenStore::open(&path);
        assert!(store.is_empty().unwrap());
        let ci = store.create("ci", Role::Publisher).unwrap();
        assert!(ci.token.starts_with(TOKEN_PREFIX));
        assert_eq!(store.check(&ci.token).unwrap().role, Role::Publisher);
        assert!(matches!(store.check("fwr_nope"), Err(AuthError::Unknown)));
        assert!(matches!(
            store.create("ci", Role::Reader),
            Err(AuthError::NameTaken(_))
        ));
        assert!(matches!(
            store.create("a b", Role::Reader),
            Err(AuthError::Invalid(_))
        ));
        // A second handle on the same file (another process) sees the change at once.
        let other = TokenStore::open(&path);
        assert_eq!(other.check(&ci.token).unwrap().name, "ci");
        let stored = fs::read_to_string(&path).unwrap();
        assert!(!stored.contains(&ci.token), "only the hash is stored");
        other.revoke(&ci.info.id).unwrap();
        assert!(matches!(store.check(&ci.token), Err(AuthError::Unknown)));
        assert!(store.list().unwrap().is_empty());
        assert!(matches!(store.revoke("ci"), Err(AuthError::NotFound(_))));
        // A corrupt file is an error, never an empty (open) set.
        fs::write(&path, b"{").unwrap();
        let corrupt = TokenStore::open(&path);
        assert!(corrupt.is_empty().is_err());
    }
}
