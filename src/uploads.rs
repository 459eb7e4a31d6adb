//! Partial uploads of the resumable upload protocol (tus 1.0, routes in `http/uploads.rs`):
//! the bytes received so far in `<id>.bin`, and in `<id>.json` what the upload is (its
//! length, its metadata) and the offset confirmed to the client. Each append is made durable
//! (data, then the offset) before it is confirmed, so a crash loses no confirmed byte; bytes
//! written after the last confirmed offset are dropped when the upload goes on. Uploads no
//! one touched for `http.upload_expiry` are removed.
//!
//! Partial uploads live on the instance's own disk (`storage.root/uploads`): with several
//! instances, a client resumes on the one it started with (sticky routing).

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

/// Bytes gathered before each write to the partial file.
const WRITE_BUFFER: usize = 1 << 20;

/// What is kept of an upload besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Upload {
    pub id: String,
    /// The whole image's length (`Upload-Length`).
    pub length: u64,
    /// Bytes received and made durable.
    pub offset: u64,
    /// `Upload-Metadata`, decoded.
    pub metadata: BTreeMap<String, String>,
    pub created_ms: i64,
    /// The last change; the upload expires `expiry` after it.
    pub touched_ms: i64,
}

impl Upload {
    pub fn expires_ms(&self, expiry: Duration) -> i64 {
        self.touched_ms.saturating_add(expiry.as_millis() as i64)
    }

    pub fn is_complete(&self) -> bool {
        self.offset == self.length
    }
}

/// Why an upload operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("no upload {0:?} (finished, cancelled, expired or never made)")]
    NotFound(String),
    #[error(
        "the upload is at offset {have}, not {sent}; ask for its offset (HEAD) and send from there"
    )]
    OffsetMismatch { have: u64, sent: u64 },
    #[error("another request is appending to this upload")]
    Busy,
    #[error("the body goes past the upload's length {length}")]
    TooLong { length: u64 },
    #[error("uploads: {0}")]
    Io(#[from] io::Error),
}

impl UploadError {
    pub fn code(&self) -> (&'static str, crate::error::Kind) {
        use crate::error::Kind;
        match self {
            UploadError::NotFound(_) => ("upload-not-found", Kind::NotFound),
            UploadError::OffsetMismatch { .. } => ("upload-offset-mismatch", Kind::Conflict),
            UploadError::Busy => ("upload-busy", Kind::Conflict),
            UploadError::TooLong { .. } => ("too-large", Kind::TooLarge),
            UploadError::Io(_) => ("storage-unavailable", Kind::Unavailable),
        }
    }
}

/// The partial uploads of this instance.
pub struct Uploads {
    dir: PathBuf,
    pub expiry: Duration,
    /// Uploads with a request appending to them.
    busy: Mutex<HashSet<String>>,
}

/// Marks an upload busy while it lives.
struct Claim<'a> {
    uploads: &'a Uploads,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.uploads.lock_busy().remove(&self.id);
    }
}

fn now_ms() -> i64 {
    crate::firmware::now_ms()
}

/// Upload ids are 128 random bits in hex; anything else names no upload (and no file).
fn check_id(id: &str) -> Result<(), UploadError> {
    if id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        Err(UploadError::NotFound(id.to_owned()))
    }
}

impl Uploads {
    pub fn open(dir: &Path, expiry: Duration) -> io::Result<Arc<Uploads>> {
        std::fs::create_dir_all(dir)?;
        Ok(Arc::new(Uploads {
            dir: dir.to_owned(),
            expiry,
            busy: Mutex::new(HashSet::new()),
        }))
    }

    fn lock_busy(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn data(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.bin"))
    }

    fn info(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes the upload's record atomically and durably.
    async fn save(&self, u: &Upload) -> Result<(), UploadError> {
        let tmp = self.dir.join(format!("{}.json.tmp", u.id));
        let json = serde_json::to_vec(u).map_err(io::Error::other)?;
        let mut f = tokio::fs::File::create(&tmp).await?;
        f.write_all(&json).await?;
        f.sync_all().await?;
        drop(f);
        tokio::fs::rename(&tmp, self.info(&u.id)).await?;
        tokio::fs::File::open(&self.dir).await?.sync_all().await?;
        Ok(())
    }

    /// Starts an upload of `length` bytes.
    pub async fn create(
        &self,
        length: u64,
        metadata: BTreeMap<String, String>,
    ) -> Result<Upload, UploadError> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|e| io::Error::other(e.to_string()))?;
        let now = now_ms();
        let u = Upload {
            id: hex::encode(b),
            length,
            offset: 0,
            metadata,
            created_ms: now,
            touched_ms: now,
        };
        tokio::fs::File::create(self.data(&u.id)).await?;
        self.save(&u).await?;
        Ok(u)
    }

    /// The upload, unless it is unknown or expired.
    pub async fn get(&self, id: &str) -> Result<Upload, UploadError> {
        check_id(id)?;
        let bytes = match tokio::fs::read(self.info(id)).await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(UploadError::NotFound(id.to_owned()))
            }
            Err(e) => return Err(e.into()),
        };
        let u: Upload = serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if u.expires_ms(self.expiry) <= now_ms() {
            return Err(UploadError::NotFound(id.to_owned()));
        }
        Ok(u)
    }

    fn claim(&self, id: &str) -> Result<Claim<'_>, UploadError> {
        if !self.lock_busy().insert(id.to_owned()) {
            return Err(UploadError::Busy);
        }
        Ok(Claim {
            uploads: self,
            id: id.to_owned(),
        })
    }

    /// Appends `body`, sent for `offset`, to the upload. What arrives is kept even when the
    /// body breaks off (the client resumes from the offset it is then told); the result is
    /// the upload after the append, and how the body ended.
    pub async fn append<S, E>(
        &self,
        id: &str,
        offset: u64,
        body: S,
    ) -> Result<(Upload, Result<(), String>), UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let _claim = self.claim(id)?;
        let mut u = self.get(id).await?;
        if offset != u.offset {
            return Err(UploadError::OffsetMismatch {
                have: u.offset,
                sent: offset,
            });
        }
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(self.data(id))
            .await?;
        // Bytes past the confirmed offset were never confirmed: drop them.
        file.set_len(u.offset).await?;
        file.seek(io::SeekFrom::Start(u.offset)).await?;
        // Bodies arrive in pieces of a few KiB; each file write is a trip to the blocking pool.
        let mut f = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut body = std::pin::pin!(body);
        let mut written = u.offset;
        let mut ended = Ok(());
        let mut too_long = false;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    ended = Err(e.to_string());
                    break;
                }
            };
            let room = u.length - written;
            if chunk.len() as u64 > room {
                f.write_all(&chunk[..room as usize]).await?;
                written = u.length;
                too_long = true;
                break;
            }
            f.write_all(&chunk).await?;
            written += chunk.len() as u64;
        }
        f.flush().await?;
        let file = f.into_inner();
        file.sync_data().await?;
        drop(file);
        if written != u.offset {
            u.offset = written;
        }
        u.touched_ms = now_ms();
        self.save(&u).await?;
        if too_long {
            return Err(UploadError::TooLong { length: u.length });
        }
        Ok((u, ended))
    }

    /// The upload's bytes, for ingesting a complete upload; the claim keeps appends out.
    pub async fn read_complete(
        &self,
        id: &str,
    ) -> Result<(Upload, tokio::fs::File, impl Drop + '_), UploadError> {
        let claim = self.claim(id)?;
        let u = self.get(id).await?;
        let f = tokio::fs::File::open(self.data(id)).await?;
        Ok((u, f, claim))
    }

    /// Removes the upload; whether it was there.
    pub async fn remove(&self, id: &str) -> Result<bool, UploadError> {
        check_id(id)?;
        let existed = match tokio::fs::remove_file(self.info(id)).await {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e.into()),
        };
        match tokio::fs::remove_file(self.data(id)).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(existed)
    }

    /// Removes expired uploads (and the leftovers of interrupted creations); how many.
    pub async fn sweep(&self) -> Result<usize, UploadError> {
        let mut removed = 0;
        let mut entries = tokio::fs::read_dir(&self.dir).await?;
        let now = now_ms();
        while let Some(e) = entries.next_entry().await? {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((id, ext)) = name.split_once('.') else {
                continue;
            };
            if check_id(id).is_err() || ext != "json" {
                // A data file without its record (a creation cut short), or a temporary
                // record, goes once it is as old as an expired upload.
                let old = e
                    .metadata()
                    .await
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > self.expiry);
                if old && tokio::fs::metadata(self.info(id)).await.is_err() {
                    let _ = tokio::fs::remove_file(e.path()).await;
                }
                continue;
            }
            let expired = match tokio::fs::read(e.path()).await {
                Ok(b) => serde_json::from_slice::<Upload>(&b)
                    .map_or(true, |u| u.expires_ms(self.expiry) <= now),
                Err(_) => false,
            };
            if expired && !self.lock_busy().contains(id) && self.remove(id).await? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Sweeps every so often until `cancel` fires.
    pub async fn sweep_every(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let every = (self.expiry / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        loop {
            match self.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "expired partial uploads removed"),
                Err(e) => tracing::warn!(error = %e, "sweeping partial uploads"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, String>> {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn appends_resume_at_the_confirmed_offset() {
        let dir = tempfile::tempdir().unwrap();
        let up = Uploads::open(dir.path(), Duration::from_secs(60)).unwrap();
        let u = up.create(10, BTreeMap::new()).await.unwrap();
        let (u1, ended) = up.append(&u.id, 0, body(&[b"abc", b"de"])).await.unwrap();
        assert_eq!((u1.offset, ended), (5, Ok(())));
        assert!(matches!(
            up.append(&u.id, 3, body(&[b"x"])).await,
            Err(UploadError::OffsetMismatch { have: 5, sent: 3 })
        ));
        // A body that breaks off keeps what arrived.
        let broken = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"fg")),
            Err("connection reset".to_owned()),
        ]);
        let (u2, ended) = up.append(&u.id, 5, broken).await.unwrap();
        assert_eq!(u2.offset, 7);
        assert!(ended.is_err());
        // Unconfirmed bytes on disk (a crash after the write) are dropped.
        std::fs::write(up.data(&u.id), b"abcdefgJUNK").unwrap();
        let (u3, _) = up.append(&u.id, 7, body(&[b"hij"])).await.unwrap();
        assert!(u3.is_complete());
        assert_eq!(std::fs::read(up.data(&u.id)).unwrap(), b"abcdefghij");
        assert!(matches!(
            up.append(&u.id, 10, body(&[b"k"])).await,
            Err(UploadError::TooLong { length: 10 })
        ));
        assert!(up.remove(&u.id).await.unwrap());
        assert!(matches!(up.get(&u.id).await, Err(UploadError::NotFound(_))));
        assert!(matches!(
            up.get("../etc").await,
            Err(UploadError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn expired_uploads_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let up = Uploads::open(dir.path(), Duration::from_secs(60)).unwrap();
        let mut u = up.create(10, BTreeMap::new()).await.unwrap();
        let fresh = up.create(10, BTreeMap::new()).await.unwrap();
        u.touched_ms -= 61_000;
        up.save(&u).await.unwrap();
        assert!(matches!(up.get(&u.id).await, Err(UploadError::NotFound(_))));
        assert_eq!(up.sweep().await.unwrap(), 1);
        assert!(!up.data(&u.id).exists());
        assert_eq!(up.get(&fresh.id).await.unwrap(), fresh);
    }
}
