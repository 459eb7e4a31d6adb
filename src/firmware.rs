//! The firmware repository: ingest (hash, sign, store, commit), resolve, list, change,
//! delete and expire images. Bytes live in the blob store, records in the metadata store;
//! a record is written only after its blob is durable, so nothing is ever half-visible.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::Notify;

use crate::blob::{BlobError, BlobStore, ByteStream};
use crate::cache::ImageCache;
use crate::digest::{Digests, Hasher, StreamHasher};
use crate::keys::KeyRing;
use crate::mcuboot::RawOptions;
use crate::meta::{FirmwareRecord, MetaError, MetaStore};
use crate::metrics::Metrics;
use crate::name::{FirmwareName, NameError};
use crate::spool::{Spool, SpoolError};

/// How long a resolved record is reused without asking the metadata store. Changes made
/// through this process invalidate at once; the bound only matters for changes made by
/// another instance sharing the store.
const RECORD_TTL: Duration = Duration::from_secs(5);
/// Records held at most; the map is cleared when full (hot names come back at once).
const RECORD_CACHE_ENTRIES: usize = 10_000;

/// Read-ahead chunk for images too large for the hot-image cache.
const READ_AHEAD: u64 = 1 << 20;

/// Longest accepted description and version strings.
pub const MAX_TEXT_LEN: usize = 1024;

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{field}: {message}")]
    InvalidParameter {
        field: &'static str,
        message: String,
    },
    #[error("firmware {0:?} not found")]
    NotFound(String),
    #[error("firmware {name:?} already holds different content (stored sha256 {stored}, uploaded sha256 {uploaded})")]
    NameTaken {
        name: String,
        stored: String,
        uploaded: String,
    },
    #[error(
        "upload does not match the expected digest (expected sha256 {expected}, received {actual})"
    )]
    DigestMismatch { expected: String, actual: String },
    #[error("image exceeds the maximum size of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("upload interrupted: {0}")]
    Interrupted(String),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Mcuboot(#[from] crate::mcuboot::McubootError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl FirmwareError {
    /// Stable code and the kind of failure, mapped to HTTP and CoAP in `crate::error`.
    pub fn code(&self) -> (&'static str, crate::error::Kind) {
        use crate::error::Kind;
        match self {
            FirmwareError::Name(e) => (e.code(), Kind::BadRequest),
            FirmwareError::InvalidParameter { .. } => ("invalid-parameter", Kind::BadRequest),
            FirmwareError::NotFound(_) => ("firmware-not-found", Kind::NotFound),
            FirmwareError::NameTaken { .. } => ("name-taken", Kind::Conflict),
            // The body and the digest asserted for it disagree: well-formed, not acceptable.
            FirmwareError::DigestMismatch { .. } => ("digest-mismatch", Kind::Unprocessable),
            FirmwareError::TooLarge { .. } => ("too-large", Kind::TooLarge),
            FirmwareError::Interrupted(_) => ("upload-interrupted", Kind::BadRequest),
            FirmwareError::Blob(_) => ("storage-unavailable", Kind::Unavailable),
            FirmwareError::Meta(_) => ("metadata-unavailable", Kind::Unavailable),
            FirmwareError::Mcuboot(e) => e.code(),
            FirmwareError::Spool(SpoolError::TooLarge { .. }) => ("too-large", Kind::TooLarge),
            FirmwareError::Spool(SpoolError::Interrupted(_)) => {
                ("upload-interrupted", Kind::BadRequest)
            }
            FirmwareError::Spool(SpoolError::Io { .. }) => {
                ("storage-unavailable", Kind::Unavailable)
            }
        }
    }
}

/// What an upload asks for besides its bytes.
#[derive(Debug, Clone, Default)]
pub struct UploadRequest {
    pub retention: Option<Duration>,
    pub description: Option<String>,
    pub version: Option<String>,
    pub expected_sha256: Option<[u8; 32]>,
    pub content_type: Option<String>,
    pub content_length: Option<u64>,
    /// What the MCUboot image was built with, when fwrepo built it.
    pub mcuboot: Option<crate::mcuboot::McubootInfo>,
}

/// The result of an ingest.
#[derive(Debug)]
pub enum Ingested {
    Created(FirmwareRecord),
    /// The name already held these bytes; nothing new was stored.
    Existing(FirmwareRecord),
}

/// A change to an existing record (`PATCH`). `Some(None)` clears a field.
#[derive(Debug, Default)]
pub struct Change {
    pub retention: Option<Option<Duration>>,
    pub description: Option<Option<String>>,
}

/// How often a change of a firmware record is tried again when the stored record changed
/// between its read and its write (another instance's change, or digests added).
const CHANGE_ATTEMPTS: usize = 16;

/// Bytes of an image as [`Repository::read`] has them.
pub enum ImageBytes {
    /// In one buffer, from the cache.
    Ready(Bytes),
    /// Streamed from the blob store.
    Streamed(ByteStream),
}

impl ImageBytes {
    pub fn into_stream(self) -> ByteStream {
        match self {
            ImageBytes::Ready(b) => futures_util::stream::once(async move { Ok(b) }).boxed(),
            ImageBytes::Streamed(s) => s,
        }
    }
}

/// The repository service shared by every listener.
pub struct Repository {
    meta: Arc<dyn MetaStore>,
    blobs: BlobStore,
    keys: Arc<KeyRing>,
    max_size: u64,
    metrics: Arc<Metrics>,
    images: ImageCache,
    spool: Spool,
    records: Mutex<HashMap<String, (Arc<FirmwareRecord>, Instant)>>,
    /// Woken when an expiry appears or moves, so the sweeper recomputes its timer.
    pub(crate) expiry_changed: Notify,
    /// Whether the last sweep (or the one running) kept expired firmware for an active task,
    /// which a task's end may then let go.
    kept_alive: AtomicBool,
    /// Images stored without their SHA-1 and MD5, for `late_digests`.
    digests_wanted: Mutex<VecDeque<String>>,
    /// Woken when one is added.
    pub(crate) digests_due: Notify,
    /// One metadata change at a time: a change reads the stored record and writes it back
    /// whole, so two at once (each of another field) would lose one.
    changing: tokio::sync::Mutex<()>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn check_text(field: &'static str, value: &str) -> Result<(), FirmwareError> {
    if value.chars().count() > MAX_TEXT_LEN || value.chars().any(|c| c.is_control()) {
        return Err(FirmwareError::InvalidParameter {
            field,
            message: format!("at most {MAX_TEXT_LEN} characters, none of them control characters"),
        });
    }
    Ok(())
}

impl Repository {
    pub fn new(
        meta: Arc<dyn MetaStore>,
        blobs: BlobStore,
        keys: Arc<KeyRing>,
        max_size: u64,
        metrics: Arc<Metrics>,
        images: ImageCache,
        spool: Spool,
    ) -> Repository {
        Repository {
            meta,
            blobs,
            keys,
            max_size,
            metrics,
            images,
            spool,
            records: Mutex::new(HashMap::new()),
            expiry_changed: Notify::new(),
            kept_alive: AtomicBool::new(false),
            digests_wanted: Mutex::default(),
            digests_due: Notify::new(),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    fn records(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<FirmwareRecord>, Instant)>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(&self, name: &str) {
        self.records().remove(name);
    }

    /// The largest image accepted, in bytes.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Loads the firmware gauges; called once at start-up.
    pub async fn init_metrics(&self) -> Result<(), FirmwareError> {
        let (count, bytes) = self.meta.totals().await?;
        self.metrics.set_stored(count, bytes);
        Ok(())
    }

    /// A live (unexpired) record.
    pub async fn resolve(&self, name: &FirmwareName) -> Result<Arc<FirmwareRecord>, FirmwareError> {
        let record = self.resolve_any(name.as_str()).await?;
        if record.is_expired(now_ms()) {
            return Err(FirmwareError::NotFound(name.to_string()));
        }
        Ok(record)
    }

    /// The stored record even when expired: an active FOTA task keeps delivering its
    /// firmware until it ends (the sweeper leaves such records alone).
    pub async fn resolve_any(&self, name: &str) -> Result<Arc<FirmwareRecord>, FirmwareError> {
        let cached = self
            .records()
            .get(name)
            .filter(|(_, at)| at.elapsed() < RECORD_TTL)
            .map(|(r, _)| Arc::clone(r));
        let record = match cached {
            Some(r) => r,
            None => {
                let r = self
                    .meta
                    .get(name)
                    .await?
                    .map(Arc::new)
                    .ok_or_else(|| FirmwareError::NotFound(name.to_owned()))?;
                let mut records = self.records();
                if records.len() >= RECORD_CACHE_ENTRIES {
                    records.clear();
                }
                records.insert(name.to_owned(), (Arc::clone(&r), Instant::now()));
                r
            }
        };
        Ok(record)
    }

    /// The bytes of `record` in `range`: a slice of the cached image when it is hot and small
    /// enough; for a larger image, a range of at most one read-ahead chunk comes from the
    /// cached chunks as CoAP blocks do (random small ranges would otherwise open and read the
    /// blob once each); anything else is streamed from the blob store.
    pub async fn read(
        &self,
        record: &FirmwareRecord,
        range: Range<u64>,
    ) -> Result<ImageBytes, FirmwareError> {
        if self.images.admits(record.size) && range.end <= record.size {
            if let Some(image) = self.read_cached(record).await? {
                let part = image.slice(range.start as usize..range.end as usize);
                return Ok(ImageBytes::Ready(part));
            }
        }
        if self.images.enabled()
            && range.end - range.start <= READ_AHEAD
            && range.end <= record.size
        {
            return Ok(ImageBytes::Ready(self.read_bytes(record, range).await?));
        }
        self.blobs
            .read(&record.blob_key, range)
            .await
            .map(ImageBytes::Streamed)
            .map_err(|e| missing_blob(record, e))
    }

    /// The whole image from the cache (loading it once), if it fits.
    pub async fn read_cached(
        &self,
        record: &FirmwareRecord,
    ) -> Result<Option<Bytes>, FirmwareError> {
        self.images
            .get(&self.blobs, &record.blob_key, record.size)
            .await
            .map_err(|e| missing_blob(record, e))
    }

    /// `range` of the image as one contiguous buffer, for protocols that send it in one
    /// message (CoAP blocks). Hot images are sliced from the cache; larger ones are read in
    /// aligned read-ahead chunks that the cache keeps, so consecutive blocks touch the store
    /// once per chunk.
    pub async fn read_bytes(
        &self,
        record: &FirmwareRecord,
        range: Range<u64>,
    ) -> Result<Bytes, FirmwareError> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        if let Some(image) = self.read_cached(record).await? {
            return Ok(image.slice(range.start as usize..range.end as usize));
        }
        let (first, last) = (range.start / READ_AHEAD, (range.end - 1) / READ_AHEAD);
        if first == last {
            // Within one chunk (every CoAP block, most ranged reads): a slice of it.
            return self.chunk_part(record, first, &range).await;
        }
        let mut parts = Vec::with_capacity((last - first + 1) as usize);
        for i in first..=last {
            parts.push(self.chunk_part(record, i, &range).await?);
        }
        Ok(Bytes::from(parts.concat()))
    }

    /// The part of `range` in read-ahead chunk `i`, from the cache.
    async fn chunk_part(
        &self,
        record: &FirmwareRecord,
        i: u64,
        range: &Range<u64>,
    ) -> Result<Bytes, FirmwareError> {
        let c = i * READ_AHEAD..((i + 1) * READ_AHEAD).min(record.size);
        let bytes = self
            .images
            .get_range(&self.blobs, &record.blob_key, c.clone())
            .await
            .map_err(|e| missing_blob(record, e))?;
        let from = range.start.max(c.start) - c.start;
        let to = range.end.min(c.end) - c.start;
        Ok(bytes.slice(from as usize..to as usize))
    }

    /// Hashes, stores, signs and commits an image. The body is streamed: at most a few parts
    /// of it are in memory at once.
    pub async fn ingest<S, E>(
        &self,
        name: &FirmwareName,
        req: UploadRequest,
        body: S,
    ) -> Result<Ingested, FirmwareError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        if req.content_length.is_some_and(|n| n > self.max_size) {
            return Err(FirmwareError::TooLarge {
                limit: self.max_size,
            });
        }
        for (field, v) in [("description", &req.description), ("version", &req.version)] {
            if let Some(v) = v {
                check_text(field, v)?;
            }
        }
        let now = now_ms();
        // One read serves both questions: is the name taken, or held by an expired record
        // that must be swept before the name is reused?
        // An expired record an active FOTA task still delivers keeps its name.
        let (existing, expired) = match self.meta.get(name.as_str()).await? {
            Some(r) if r.is_expired(now) && !self.meta.firmware_in_use(&r.name).await? => {
                (None, Some(r))
            }
            live => (live, None),
        };
        // A name that is taken only needs the digest of the new bytes, not a second copy.
        let key = BlobStore::new_key(name.as_str());
        let mut writer = match existing {
            None => Some(self.blobs.writer(&key).await?),
            Some(_) => None,
        };
        let (digests, size) = match self.consume(body, writer.as_mut()).await {
            Ok(v) => v,
            Err(e) => {
                if let Some(w) = writer {
                    w.abort().await;
                }
                return Err(e);
            }
        };
        let digest = digests.sha256;
        let digest_hex = hex::encode(digest);
        if let Some(expected) = req.expected_sha256 {
            if expected != digest {
                if let Some(w) = writer {
                    w.abort().await;
                }
                return Err(FirmwareError::DigestMismatch {
                    expected: hex::encode(expected),
                    actual: digest_hex,
                });
            }
        }
        let Some(writer) = writer else {
            return same_or_conflict(existing.expect("taken name has a record"), digest_hex);
        };
        writer.finish().await?;

        let created_at_ms = now_ms();
        let retention_secs = req.retention.map(|d| d.as_secs());
        let signature = self.keys.sign_digest(&digest);
        let record = FirmwareRecord {
            name: name.to_string(),
            size,
            sha256: digest_hex.clone(),
            sha1: digests.sha1.map(hex::encode),
            md5: digests.md5.map(hex::encode),
            content_type: req
                .content_type
                .unwrap_or_else(|| content_type_for(name.as_str())),
            description: req.description,
            version: req.version,
            created_at_ms,
            retention_secs,
            expires_at_ms: retention_secs.map(|s| created_at_ms + (s as i64) * 1000),
            signature_key_id: signature.key_id,
            signature: B64.encode(signature.value),
            blob_key: key.clone(),
            mcuboot: req.mcuboot,
        };
        if let Some(old) = expired {
            self.remove_record(&old).await?;
        }
        match self.meta.insert_new(&record).await {
            Ok(None) => {
                self.forget(&record.name);
                self.metrics.firmware_added(record.size);
                if record.expires_at_ms.is_some() {
                    self.expiry_changed.notify_one();
                }
                tracing::info!(name = %record.name, size, sha256 = %record.sha256, "firmware stored");
                if record.md5.is_none() {
                    self.digests_wanted
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_back(record.name.clone());
                    self.digests_due.notify_one();
                }
                Ok(Ingested::Created(record))
            }
            Ok(Some(winner)) => {
                // A concurrent upload of the same name committed first.
                self.blobs.delete(&key).await?;
                same_or_conflict(winner, digest_hex)
            }
            Err(e) => {
                let _ = self.blobs.delete(&key).await;
                Err(e.into())
            }
        }
    }

    /// Builds an MCUboot image from a raw application binary and ingests it: the body is
    /// spooled to disk, checked against the options, hashed and signed with the active key
    /// (as `imgtool sign` does), then streamed into the repository like any upload.
    pub async fn ingest_mcuboot<S, E>(
        &self,
        name: &FirmwareName,
        mut req: UploadRequest,
        options: &RawOptions,
        body: S,
    ) -> Result<Ingested, FirmwareError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let (options, version) = options.parse()?;
        if req.content_length.is_some_and(|n| n > self.max_size) {
            return Err(FirmwareError::TooLarge {
                limit: self.max_size,
            });
        }
        let spooled = self.spool.write(body, self.max_size).await?;
        // `sha256` vouches for the bytes sent, not for the image built from them.
        if let Some(expected) = req.expected_sha256.take() {
            if expected != spooled.sha256 {
                return Err(FirmwareError::DigestMismatch {
                    expected: hex::encode(expected),
                    actual: hex::encode(spooled.sha256),
                });
            }
        }
        let keys = Arc::clone(&self.keys);
        let path = spooled.path().to_owned();
        let plan = tokio::task::spawn_blocking(move || {
            crate::mcuboot::plan(&path, options, version, keys.active())
        })
        .await
        .map_err(|e| FirmwareError::Interrupted(e.to_string()))??;
        req.version = Some(plan.info.options.version.clone());
        req.content_length = Some(plan.len());
        req.mcuboot = Some(plan.info.clone());
        let stream = plan
            .stream(spooled.path())
            .await
            .map_err(|e| SpoolError::Io {
                path: spooled.path().to_owned(),
                source: e,
            })?;
        let result = self.ingest(name, req, stream).await;
        drop(spooled);
        result
    }

    async fn consume<S, E>(
        &self,
        body: S,
        mut writer: Option<&mut crate::blob::BlobWriter>,
    ) -> Result<(Digests, u64), FirmwareError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let mut body = std::pin::pin!(body);
        let mut hasher = StreamHasher::default();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| FirmwareError::Interrupted(e.to_string()))?;
            size += chunk.len() as u64;
            if size > self.max_size {
                return Err(FirmwareError::TooLarge {
                    limit: self.max_size,
                });
            }
            hasher
                .update(&chunk)
                .await
                .map_err(|e| FirmwareError::Interrupted(e.to_string()))?;
            if let Some(w) = writer.as_deref_mut() {
                w.write(chunk).await?;
            }
        }
        let digests = hasher
            .finish()
            .await
            .map_err(|e| FirmwareError::Interrupted(e.to_string()))?;
        Ok((digests, size))
    }

    /// The record with its SHA-1 and MD5, computed from the stored bytes and kept when it
    /// lacks them: a large image until `late_digests` has been at it, or one stored by a
    /// version before they were computed.
    pub async fn with_all_digests(
        &self,
        record: Arc<FirmwareRecord>,
    ) -> Result<Arc<FirmwareRecord>, FirmwareError> {
        if record.sha1.is_some() && record.md5.is_some() {
            return Ok(record);
        }
        let mut stream = self.read(&record, 0..record.size).await?.into_stream();
        let mut hasher = Hasher::default();
        while let Some(chunk) = stream.next().await {
            hasher.update(&chunk.map_err(|e| FirmwareError::Interrupted(e.to_string()))?);
        }
        let digests = hasher.finish();
        if hex::encode(digests.sha256) != record.sha256 {
            return Err(FirmwareError::Interrupted(format!(
                "stored bytes of {:?} do not match its sha256",
                record.name
            )));
        }
        let mut updated = (*record).clone();
        updated.sha1 = digests.sha1.map(hex::encode);
        updated.md5 = digests.md5.map(hex::encode);
        let (sha1, md5) = (updated.sha1.as_deref(), updated.md5.as_deref());
        let (sha1, md5) = (sha1.unwrap_or_default(), md5.unwrap_or_default());
        self.meta
            .add_digests(&updated.name, &updated.blob_key, sha1, md5)
            .await?;
        self.forget(&updated.name);
        Ok(Arc::new(updated))
    }

    /// The oldest image stored without its SHA-1 and MD5 that `late_digests` has not taken.
    pub(crate) fn take_digests_wanted(&self) -> Option<String> {
        self.digests_wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// A page of live records whose names start with `prefix`, and the cursor of the next.
    pub async fn list(
        &self,
        prefix: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<FirmwareRecord>, Option<String>), FirmwareError> {
        let page = self.meta.list(prefix, cursor, limit).await?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|r| r.name.clone()))
            .flatten();
        let now = now_ms();
        Ok((
            page.into_iter().filter(|r| !r.is_expired(now)).collect(),
            next,
        ))
    }

    pub async fn change(
        &self,
        name: &FirmwareName,
        change: Change,
    ) -> Result<FirmwareRecord, FirmwareError> {
        if let Some(Some(d)) = &change.description {
            check_text("description", d)?;
        }
        // One change at a time here; across instances sharing the store, the replace is a
        // compare-and-swap, retried from the record as it is then.
        let _one = self.changing.lock().await;
        for _ in 0..CHANGE_ATTEMPTS {
            // The stored record, not the cached one, which may predate another change.
            let stored = self
                .meta
                .get(name.as_str())
                .await?
                .filter(|r| !r.is_expired(now_ms()))
                .ok_or_else(|| FirmwareError::NotFound(name.to_string()))?;
            let mut record = stored.clone();
            if let Some(retention) = change.retention {
                record.retention_secs = retention.map(|d| d.as_secs());
                record.expires_at_ms = record
                    .retention_secs
                    .map(|s| record.created_at_ms + (s as i64) * 1000);
            }
            if let Some(description) = &change.description {
                record.description = description.clone();
            }
            let replaced = self.meta.replace(&stored, &record).await?;
            self.forget(name.as_str());
            if replaced {
                self.expiry_changed.notify_one();
                return Ok(record);
            }
        }
        Err(MetaError::Backend(format!(
            "firmware {name} changed under {CHANGE_ATTEMPTS} attempts to change it"
        ))
        .into())
    }

    pub async fn delete(&self, name: &FirmwareName) -> Result<(), FirmwareError> {
        let record = self
            .meta
            .get(name.as_str())
            .await?
            .ok_or_else(|| FirmwareError::NotFound(name.to_string()))?;
        let live = !record.is_expired(now_ms());
        self.remove_record(&record).await?;
        if live {
            tracing::info!(name = %record.name, "firmware deleted");
            Ok(())
        } else {
            Err(FirmwareError::NotFound(name.to_string()))
        }
    }

    /// Record first (the image disappears at once), then the blob; a crash in between leaves
    /// an unreferenced blob for the start-up sweep.
    async fn remove_record(&self, record: &FirmwareRecord) -> Result<(), FirmwareError> {
        let removed = self.meta.remove(&record.name, &record.blob_key).await?;
        self.forget(&record.name);
        self.images.remove(&record.blob_key);
        if removed {
            self.metrics.firmware_removed(record.size);
        }
        self.blobs.delete(&record.blob_key).await?;
        Ok(())
    }

    /// Deletes what has expired by `now`, except firmware an active FOTA task still
    /// delivers (swept when the task ends); returns how many were deleted.
    pub async fn sweep_expired(&self, now: i64) -> Result<usize, FirmwareError> {
        // A task that ends while the sweep runs wakes the sweeper again.
        self.kept_alive.store(true, Ordering::SeqCst);
        let mut total = 0;
        let mut kept: Option<FirmwareRecord> = None;
        loop {
            let batch = self.meta.expired(now, kept.as_ref(), 256).await?;
            if batch.is_empty() {
                self.kept_alive.store(kept.is_some(), Ordering::SeqCst);
                return Ok(total);
            }
            // Every record either leaves the index or moves the cursor past itself.
            for record in &batch {
                if self.meta.firmware_in_use(&record.name).await? {
                    tracing::debug!(name = %record.name, "expired firmware kept for an active FOTA task");
                    kept = Some(record.clone());
                    continue;
                }
                self.remove_record(record).await?;
                total += 1;
                tracing::info!(name = %record.name, "firmware expired and removed");
            }
        }
    }

    /// A FOTA task ended: expired firmware it kept alive may go now, if the sweeper kept any.
    pub fn task_ended(&self) {
        if self.kept_alive.load(Ordering::SeqCst) {
            self.expiry_changed.notify_one();
        }
    }

    /// The first expiry after `now`.
    pub async fn next_expiry(&self, now: i64) -> Result<Option<i64>, FirmwareError> {
        Ok(self.meta.next_expiry_after(now).await?)
    }

    /// Deletes blobs no record points at and staged uploads that never finished, when older
    /// than `grace`. Run at start-up, before the listeners open.
    pub async fn sweep_orphans(&self, grace: Duration) -> Result<usize, FirmwareError> {
        let mut removed = self.blobs.remove_stale_staging(grace).await?;
        let before = SystemTime::now() - grace;
        for key in self.blobs.list_older(before).await? {
            let referenced = match BlobStore::name_of_key(&key) {
                Some(name) => self
                    .meta
                    .get(name)
                    .await?
                    .is_some_and(|r| r.blob_key == key),
                None => false,
            };
            if !referenced {
                self.blobs.delete(&key).await?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed unreferenced blobs left by interrupted uploads"
            );
        }
        Ok(removed)
    }
}

/// A blob gone under a live record (deleted or expired meanwhile) reads as "not found".
fn missing_blob(record: &FirmwareRecord, e: BlobError) -> FirmwareError {
    match e {
        BlobError::Store(object_store::Error::NotFound { .. }) => {
            FirmwareError::NotFound(record.name.clone())
        }
        e => e.into(),
    }
}

fn same_or_conflict(
    existing: FirmwareRecord,
    digest_hex: String,
) -> Result<Ingested, FirmwareError> {
    if existing.sha256 == digest_hex {
        Ok(Ingested::Existing(existing))
    } else {
        Err(FirmwareError::NameTaken {
            name: existing.name,
            stored: existing.sha256,
            uploaded: digest_hex,
        })
    }
}

/// Content type from the name's extension, else `application/octet-stream`.
pub fn content_type_for(name: &str) -> String {
    mime_guess::from_path(name)
        .first()
        .unwrap_or(mime::APPLICATION_OCTET_STREAM)
        .to_string()
}
