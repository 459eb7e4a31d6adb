//! Spooled uploads: a body that must be read more than once (an MCUboot image is hashed and
//! signed before it is stored) goes to a private file first, never into memory. Files are
//! removed when dropped, and whatever a crash left behind is cleared at start-up.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Why a body could not be spooled.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("body exceeds the maximum size of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("upload interrupted: {0}")]
    Interrupted(String),
}

/// The directory spooled bodies live in.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

/// One spooled body; the file goes when this does.
#[derive(Debug)]
pub struct SpoolFile {
    path: PathBuf,
    /// SHA-256 of what was written.
    pub sha256: [u8; 32],
}

impl SpoolFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Spool {
    /// Creates `dir` (mode 0700) and removes files a previous run left in it.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        use std::os::unix::fs::DirBuilderExt;
        let io = |source| SpoolError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            if entry.file_type().map_err(io)?.is_file() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Spool {
            dir: dir.to_owned(),
        })
    }

    /// Writes `body` to a new file, refusing more than `limit` bytes.
    pub async fn write<S, E>(&self, body: S, limit: u64) -> Result<SpoolFile, SpoolError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let mut id = [0u8; 12];
        getrandom::fill(&mut id).map_err(|e| SpoolError::Io {
            path: self.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut spooled = SpoolFile {
            path: self.dir.join(format!("{}.part", hex::encode(id))),
            sha256: [0; 32],
        };
        let io = |source| SpoolError::Io {
            path: spooled.path.clone(),
            source,
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&spooled.path)
            .await
            .map_err(io)?;
        let mut body = std::pin::pin!(body);
        let mut size = 0u64;
        let mut hasher = Sha256::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| SpoolError::Interrupted(e.to_string()))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(SpoolError::TooLarge { limit });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        spooled.sha256 = hasher.finalize().into();
        Ok(spooled)
    }
}
