//! Ed25519 signing keys: PKCS#8 v1 PEM files in the key directory, ids derived from the
//! public key, one active key that signs new uploads, retired keys kept for verification.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// DER prefix of a PKCS#8 v1 `OneAsymmetricKey` holding an Ed25519 seed (RFC 8410 §7).
/// OpenSSL 3.0 reads v1 but rejects ed25519-dalek's v2 output, so we write v1 ourselves.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// DER prefix of a PKCS#8 v2 key (seed followed by `[1]` public key), accepted on read.
const PKCS8_V2_PREFIX: [u8; 16] = [
    0x30, 0x53, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// DER prefix of a `SubjectPublicKeyInfo` for Ed25519 (RFC 8410 §4).
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why keys could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an Ed25519 PKCS#8 PEM private key")]
    NotEd25519 { path: PathBuf },
    #[error("{path} is readable by others (mode {mode:o}); run chmod 600 on it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("configured active key {0:?} is not in the key directory")]
    UnknownActive(String),
    #[error("no random numbers available: {0}")]
    Random(String),
}

/// One key of the ring.
pub struct KeyEntry {
    /// First 16 hex digits of SHA-256 over the raw 32-byte public key.
    pub id: String,
    pub signing: SigningKey,
    pub created: SystemTime,
    pub path: PathBuf,
}

impl KeyEntry {
    pub fn verifying(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub fn public_raw(&self) -> [u8; 32] {
        self.verifying().to_bytes()
    }

    pub fn spki_der(&self) -> Vec<u8> {
        spki_der(&self.public_raw())
    }

    pub fn spki_pem(&self) -> String {
        pem("PUBLIC KEY", &self.spki_der())
    }
}

/// The key directory's keys, loaded once at start-up.
pub struct KeyRing {
    keys: Vec<KeyEntry>,
    active: usize,
}

/// A detached signature as stored with each firmware record.
#[derive(Debug, Clone)]
pub struct DigestSignature {
    pub key_id: String,
    pub value: [u8; 64],
}

impl KeyRing {
    /// Loads every `*.pem` in `dir`; creates the directory and a first key when there is none.
    pub fn load_or_create(dir: &Path, active: &str) -> Result<KeyRing, KeyError> {
        let io = |source| KeyError::Io {
            path: dir.to_owned(),
            source,
        };
        create_private_dir(dir).map_err(io)?;
        let mut keys = load_dir(dir)?;
        if keys.is_empty() {
            let path = generate(dir)?;
            tracing::info!(path = %path.display(), "created a new Ed25519 signing key");
            keys = load_dir(dir)?;
        }
        // Newest first, ties broken by id so the choice is stable.
        keys.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        let active = if active.is_empty() {
            if keys.len() > 1 {
                tracing::warn!(key_id = %keys[0].id, "several keys and keys.active unset: signing with the newest");
            }
            0
        } else {
            keys.iter()
                .position(|k| k.id == active)
                .ok_or_else(|| KeyError::UnknownActive(active.to_owned()))?
        };
        Ok(KeyRing { keys, active })
    }

    pub fn active(&self) -> &KeyEntry {
        &self.keys[self.active]
    }

    pub fn all(&self) -> &[KeyEntry] {
        &self.keys
    }

    pub fn get(&self, id: &str) -> Option<&KeyEntry> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Signs a SHA-256 digest with plain Ed25519, the digest itself being the message (the
    /// convention MCUboot's ED25519 TLV uses).
    pub fn sign_digest(&self, digest: &[u8; 32]) -> DigestSignature {
        let key = self.active();
        DigestSignature {
            key_id: key.id.clone(),
            value: key.signing.sign(digest).to_bytes(),
        }
    }
}

/// Makes a new key file in `dir` and returns its path. The file is written under a temporary
/// name with mode 0600 and renamed, so a crash never leaves a truncated key behind.
pub fn generate(dir: &Path) -> Result<PathBuf, KeyError> {
    let io = |source| KeyError::Io {
        path: dir.to_owned(),
        source,
    };
    create_private_dir(dir).map_err(io)?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    let signing = SigningKey::from_bytes(&seed);
    let id = key_id(&signing.verifying_key().to_bytes());
    let mut der = PKCS8_V1_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    let text = pem("PRIVATE KEY", &der);
    let path = dir.join(format!("{id}.pem"));
    let tmp = dir.join(format!(".{id}.pem.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, &path).map_err(io)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(path)
}

/// Creates the key directory readable by its owner only; an existing one is left as it is.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn load_dir(dir: &Path) -> Result<Vec<KeyEntry>, KeyError> {
    let io = |source| KeyError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut keys = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_none_or(|e| e != "pem") {
            continue;
        }
        let meta = fs::metadata(&path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path, mode });
        }
        let text = fs::read_to_string(&path).map_err(io)?;
        let seed =
            parse_private_pem(&text).ok_or_else(|| KeyError::NotEd25519 { path: path.clone() })?;
        let signing = SigningKey::from_bytes(&seed);
        keys.push(KeyEntry {
            id: key_id(&signing.verifying_key().to_bytes()),
            signing,
            created: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            path,
        });
    }
    Ok(keys)
}

/// Extracts the 32-byte seed from a PKCS#8 v1 or v2 Ed25519 PEM.
pub fn parse_private_pem(text: &str) -> Option<[u8; 32]> {
    let body: String = text
        .lines()
        .skip_while(|l| l.trim() != "-----BEGIN PRIVATE KEY-----")
        .skip(1)
        .take_while(|l| l.trim() != "-----END PRIVATE KEY-----")
        .map(str::trim)
        .collect();
    let der = B64.decode(body).ok()?;
    let seed = match der.len() {
        48 if der[..16] == PKCS8_V1_PREFIX => &der[16..48],
        85 if der[..16] == PKCS8_V2_PREFIX => &der[16..48],
        _ => return None,
    };
    seed.try_into().ok()
}

/// Key id: the first 8 bytes of SHA-256 over the raw public key, in hex.
pub fn key_id(public: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

pub fn spki_der(public: &[u8; 32]) -> Vec<u8> {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(public);
    der
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier;

    #[test]
    fn created_key_round_trips_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let dir_path = dir.path().join("keys");
        let ring = KeyRing::load_or_create(&dir_path, "").unwrap();
        assert_eq!(
            fs::metadata(&dir_path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(ring.all().len(), 1);
        let key = ring.active();
        let mode = fs::metadata(&key.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let digest: [u8; 32] = Sha256::digest(b"image").into();
        let sig = ring.sign_digest(&digest);
        assert_eq!(sig.key_id, key.id);
        key.verifying()
            .verify(&digest, &ed25519_dalek::Signature::from_bytes(&sig.value))
            .unwrap();
        let again = KeyRing::load_or_create(&dir_path, &key.id).unwrap();
        assert_eq!(again.active().public_raw(), key.public_raw());
        assert!(matches!(
            KeyRing::load_or_create(&dir_path, "0011223344556677"),
            Err(KeyError::UnknownActive(_))
        ));
    }

    #[test]
    fn rfc8410_test_vector() {
        // RFC 8410 §10.3 private key and its public key from §10.1.
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
        let seed = parse_private_pem(pem).unwrap();
        let public = SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        assert_eq!(
            hex::encode(public),
            "19bf44096984cdfe8541bac167dc3b96c85086aa30b6b6cb0c5c38ad703166e1"
        );
        assert_eq!(
            B64.encode(spki_der(&public)),
            "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE="
        );
    }
}
