//! The embedded metadata backend: sled, with every call on the blocking pool.

use std::path::PathBuf;

use async_trait::async_trait;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{ExpiryIndex, FirmwareCatalog, FirmwareRecord, MetaError};

/// Trees: `firmware` (name → JSON record), `expiry` (8-byte big-endian expiry ms ‖ name),
/// and the FOTA trees of `sled_tasks`.
#[derive(Clone)]
pub struct SledStore {
    firmware: sled::Tree,
    expiry: sled::Tree,
    /// Task id → JSON task.
    pub(super) tasks: sled::Tree,
    /// `v` device ‖ 0 ‖ id: every task of a device (see `sled_tasks`).
    pub(super) task_index: sled::Tree,
    /// Device id → JSON `DeviceInfo`.
    pub(super) devices: sled::Tree,
    /// Device id → JSON `DeviceCredential`.
    pub(super) device_credentials: sled::Tree,
    /// `i` identity → JSON `DevicePsk`; `d` device id → identity.
    pub(super) device_psks: sled::Tree,
    /// Schedule name → JSON schedule.
    pub(super) schedules: sled::Tree,
    /// Group name → JSON group.
    pub(super) groups: sled::Tree,
    /// Campaigns, their members and counts (see `sled_fleet`).
    pub(super) fleet: sled::Tree,
    /// Held by every change of campaign members: their counts are shared keys, and one
    /// writer at a time is cheaper than sled's conflict retries on them.
    pub(super) fleet_gate: std::sync::Arc<std::sync::Mutex<()>>,
    /// Decoded roster chunks of started campaigns (they never change).
    pub(super) rosters: std::sync::Arc<super::sled_fleet::RosterCache>,
    /// The tasks under way, indexed (see `sled_tasks`); held across each task write, so a
    /// check (the device's active task, the quota's holders) and the write are one step (one
    /// process owns a sled database).
    pub(super) live: std::sync::Arc<std::sync::Mutex<super::live_tasks::LiveTasks>>,
    /// Concurrent changes share fsyncs.
    group: super::group_flush::GroupFlush,
}

/// sled's page cache (its default is 1 GiB); reads that miss go to the OS page cache, which
/// the kernel can reclaim. In bench/fleet.sh a cache of 4 MiB or 16 MiB left the process as
/// large and made releases a third slower.
const SLED_CACHE: u64 = 128 << 20;

pub(super) fn backend(e: impl std::fmt::Display) -> MetaError {
    MetaError::Backend(e.to_string())
}

fn decode(key: &[u8], value: &[u8]) -> Result<FirmwareRecord, MetaError> {
    serde_json::from_slice(value).map_err(|e| MetaError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

fn expiry_key(at_ms: i64, name: &str) -> Vec<u8> {
    let mut k = (at_ms.max(0) as u64).to_be_bytes().to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn expiry_of(key: &[u8]) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[..8]);
    u64::from_be_bytes(b) as i64
}

/// How long opening waits for a previous holder of the database's file lock in this process
/// to let go. sled releases it when its last handle goes, and that can be one of its own
/// I/O threads finishing a write after the service has stopped: a restart in the same
/// process (tests do it) could find the lock still held for a moment.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens the database at `path`, waiting up to `wait` while its file lock is held.
fn open_db(path: &std::path::Path, wait: std::time::Duration) -> Result<sled::Db, MetaError> {
    let until = std::time::Instant::now() + wait;
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(SLED_CACHE)
            .open()
        {
            // sled words the lock's error; its kind is not WouldBlock.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < until =>
            {
                // Nothing announces the release: look again shortly.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r.map_err(|e| MetaError::Backend(format!("{}: {e}", path.display()))),
        }
    }
}

impl SledStore {
    pub async fn open(path: PathBuf) -> Result<SledStore, MetaError> {
        tokio::task::spawn_blocking(move || {
            let db = open_db(&path, LOCK_WAIT)?;
            let tasks = db.open_tree("fota_tasks").map_err(backend)?;
            let task_index = db.open_tree("fota_index").map_err(backend)?;
            let live = SledStore::rebuild_live_tasks(&tasks, &task_index)?;
            Ok(SledStore {
                firmware: db.open_tree("firmware").map_err(backend)?,
                expiry: db.open_tree("expiry").map_err(backend)?,
                tasks,
                task_index,
                devices: db.open_tree("devices").map_err(backend)?,
                device_credentials: db.open_tree("device_credentials").map_err(backend)?,
                device_psks: db.open_tree("device_psks").map_err(backend)?,
                schedules: db.open_tree("schedules").map_err(backend)?,
                groups: db.open_tree("groups").map_err(backend)?,
                fleet: db.open_tree("fleet").map_err(backend)?,
                fleet_gate: Default::default(),
                rosters: Default::default(),
                live: std::sync::Arc::new(std::sync::Mutex::new(live)),
                group: super::group_flush::GroupFlush::new(db),
            })
        })
        .await
        .map_err(backend)?
    }

    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SledStore) -> Result<T, MetaError> + Send + 'static,
    ) -> Result<T, MetaError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(backend)?
    }

    /// Runs a point read or a small transaction (a few keys) on the calling task. sled keeps
    /// its pages in memory, so these take microseconds: handing each to the blocking pool cost
    /// more (two thread hand-offs and their futex wake-ups, over half the CPU of task creation
    /// in a profile) than the work itself. Scans and the fsync (`flush`) stay on the pool.
    pub(super) async fn point<T>(
        &self,
        f: impl FnOnce(&SledStore) -> Result<T, MetaError>,
    ) -> Result<T, MetaError> {
        f(self)
    }

    /// Makes every write so far durable, sharing the fsync with the changes that arrive
    /// together (group commit). sled's `flush_async` stalled for good under a few dozen
    /// concurrent callers (bench/fota.sh); its blocking flush, one at a time, does not.
    pub(super) async fn flush(&self) -> Result<(), MetaError> {
        self.group.flush().await
    }

    /// Runs a transaction over both trees; `Abort(r)` returns `r` without committing.
    fn transact<T>(
        &self,
        f: impl Fn(
            &sled::transaction::TransactionalTree,
            &sled::transaction::TransactionalTree,
        ) -> Result<T, ConflictableTransactionError<T>>,
    ) -> Result<T, MetaError> {
        match (&self.firmware, &self.expiry).transaction(|(fw, ex)| f(fw, ex)) {
            Ok(v) | Err(TransactionError::Abort(v)) => Ok(v),
            Err(TransactionError::Storage(e)) => Err(backend(e)),
        }
    }
}

/// In a transaction: the record stored under `name` with blob `blob_key`; the transaction
/// ends with `false` (no such record) when there is none, or one of another blob.
fn stored(
    fw: &sled::transaction::TransactionalTree,
    name: &str,
    blob_key: &str,
) -> Result<FirmwareRecord, ConflictableTransactionError<bool>> {
    let refuse = || ConflictableTransactionError::Abort(false);
    let old = fw.get(name.as_bytes())?.ok_or_else(refuse)?;
    let old: FirmwareRecord = serde_json::from_slice(&old).map_err(|_| refuse())?;
    if old.blob_key != blob_key {
        return Err(refuse());
    }
    Ok(old)
}

/// In a transaction: `record` as stored.
fn encoded(record: &FirmwareRecord) -> Result<Vec<u8>, ConflictableTransactionError<bool>> {
    serde_json::to_vec(record).map_err(|_| ConflictableTransactionError::Abort(false))
}

#[async_trait]
impl FirmwareCatalog for SledStore {
    async fn get(&self, name: &str) -> Result<Option<FirmwareRecord>, MetaError> {
        let name = name.to_owned();
        self.point(move |s| {
            s.firmware
                .get(name.as_bytes())
                .map_err(backend)?
                .map(|v| decode(name.as_bytes(), &v))
                .transpose()
        })
        .await
    }

    async fn insert_new(
        &self,
        record: &FirmwareRecord,
    ) -> Result<Option<FirmwareRecord>, MetaError> {
        let record = record.clone();
        let json = serde_json::to_vec(&record).map_err(backend)?;
        let existing = self
            .blocking(move |s| {
                let existing = s.transact(|fw, ex| {
                    if let Some(old) = fw.get(record.name.as_bytes())? {
                        return Err(ConflictableTransactionError::Abort(Some(old)));
                    }
                    fw.insert(record.name.as_bytes(), json.as_slice())?;
                    if let Some(at) = record.expires_at_ms {
                        ex.insert(expiry_key(at, &record.name), &[])?;
                    }
                    Ok(None)
                })?;
                existing
                    .map(|v| decode(record.name.as_bytes(), &v))
                    .transpose()
            })
            .await?;
        if existing.is_none() {
            self.flush().await?;
        }
        Ok(existing)
    }

    async fn replace(&self, old: &FirmwareRecord, new: &FirmwareRecord) -> Result<bool, MetaError> {
        let (old, new) = (old.clone(), new.clone());
        let replaced = self
            .blocking(move |s| {
                s.transact(|fw, ex| {
                    let stored = stored(fw, &old.name, &old.blob_key)?;
                    if stored != old || new.name != old.name || new.blob_key != old.blob_key {
                        return Err(ConflictableTransactionError::Abort(false));
                    }
                    if let Some(at) = stored.expires_at_ms {
                        ex.remove(expiry_key(at, &stored.name))?;
                    }
                    if let Some(at) = new.expires_at_ms {
                        ex.insert(expiry_key(at, &new.name), &[])?;
                    }
                    fw.insert(new.name.as_bytes(), encoded(&new)?)?;
                    Ok(true)
                })
            })
            .await?;
        if replaced {
            self.flush().await?;
        }
        Ok(replaced)
    }

    async fn add_digests(
        &self,
        name: &str,
        blob_key: &str,
        sha1: &str,
        md5: &str,
    ) -> Result<bool, MetaError> {
        let (name, blob_key) = (name.to_owned(), blob_key.to_owned());
        let (sha1, md5) = (sha1.to_owned(), md5.to_owned());
        let updated = self
            .blocking(move |s| {
                s.transact(|fw, _| {
                    let mut record = stored(fw, &name, &blob_key)?;
                    (record.sha1, record.md5) = (Some(sha1.clone()), Some(md5.clone()));
                    fw.insert(name.as_bytes(), encoded(&record)?)?;
                    Ok(true)
                })
            })
            .await?;
        if updated {
            self.flush().await?;
        }
        Ok(updated)
    }

    async fn remove(&self, name: &str, blob_key: &str) -> Result<bool, MetaError> {
        let (name, blob_key) = (name.to_owned(), blob_key.to_owned());
        let removed = self
            .blocking(move |s| {
                s.transact(|fw, ex| {
                    let Some(old) = fw.get(name.as_bytes())? else {
                        return Err(ConflictableTransactionError::Abort(false));
                    };
                    let Ok(old) = serde_json::from_slice::<FirmwareRecord>(&old) else {
                        // A corrupt record is removed rather than kept forever.
                        fw.remove(name.as_bytes())?;
                        return Ok(true);
                    };
                    if old.blob_key != blob_key {
                        return Err(ConflictableTransactionError::Abort(false));
                    }
                    if let Some(at) = old.expires_at_ms {
                        ex.remove(expiry_key(at, &old.name))?;
                    }
                    fw.remove(name.as_bytes())?;
                    Ok(true)
                })
            })
            .await?;
        if removed {
            self.flush().await?;
        }
        Ok(removed)
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FirmwareRecord>, MetaError> {
        let (prefix, after) = (prefix.to_owned(), after.map(str::to_owned));
        self.blocking(move |s| {
            let iter = match &after {
                Some(a) if a.as_str() >= prefix.as_str() => {
                    let mut start = a.as_bytes().to_vec();
                    start.push(0);
                    s.firmware.range(start..)
                }
                _ => s.firmware.range(prefix.as_bytes()..),
            };
            let mut out = Vec::new();
            for item in iter {
                let (k, v) = item.map_err(backend)?;
                if !k.starts_with(prefix.as_bytes()) || out.len() >= limit {
                    break;
                }
                out.push(decode(&k, &v)?);
            }
            Ok(out)
        })
        .await
    }

    async fn totals(&self) -> Result<(u64, u64), MetaError> {
        self.blocking(|s| {
            let mut count = 0;
            let mut bytes = 0;
            for item in s.firmware.iter() {
                let (k, v) = item.map_err(backend)?;
                count += 1;
                bytes += decode(&k, &v)?.size;
            }
            Ok((count, bytes))
        })
        .await
    }
}

#[async_trait]
impl ExpiryIndex for SledStore {
    async fn next_expiry_after(&self, after_ms: i64) -> Result<Option<i64>, MetaError> {
        self.blocking(move |s| {
            let start = expiry_key(after_ms.saturating_add(1), "");
            Ok(s.expiry
                .range(start..)
                .next()
                .transpose()
                .map_err(backend)?
                .map(|(k, _)| expiry_of(&k)))
        })
        .await
    }

    async fn expired(
        &self,
        now_ms: i64,
        after: Option<&FirmwareRecord>,
        limit: usize,
    ) -> Result<Vec<FirmwareRecord>, MetaError> {
        let start = match after {
            Some(r) => {
                let mut k = expiry_key(r.expires_at_ms.unwrap_or(0), &r.name);
                k.push(0);
                k
            }
            None => Vec::new(),
        };
        self.blocking(move |s| {
            let end = (now_ms.max(0) as u64 + 1).to_be_bytes().to_vec();
            let mut out = Vec::new();
            if start >= end {
                return Ok(out);
            }
            for item in s.expiry.range(start..end).take(limit) {
                let (k, _) = item.map_err(backend)?;
                let name = &k[8..];
                if let Some(v) = s.firmware.get(name).map_err(backend)? {
                    out.push(decode(name, &v)?);
                } else {
                    // An index entry without its record: drop it.
                    s.expiry.remove(&k).map_err(backend)?;
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn opening_waits_for_the_lock_and_then_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let held = super::open_db(&path, Duration::ZERO).unwrap();
        // Held throughout: refused once the wait is over, with the lock named.
        let started = std::time::Instant::now();
        let e = super::open_db(&path, Duration::from_millis(100)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(100), "it waited");
        assert!(e.to_string().contains("lock"), "{e}");
        // Let go while the second waits: it opens.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            rx.recv().unwrap();
            drop(held);
        });
        let opener = {
            let path = path.clone();
            std::thread::spawn(move || super::open_db(&path, Duration::from_secs(30)))
        };
        tx.send(()).unwrap();
        holder.join().unwrap();
        opener
            .join()
            .unwrap()
            .expect("opened once the lock was let go");
    }

    #[tokio::test]
    async fn sled_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::SledStore::open(dir.path().join("db")).await.unwrap();
        crate::meta::suite::run(&store).await;
    }

    #[tokio::test]
    async fn tasks_under_way_are_indexed_again_after_a_restart() {
        use crate::meta::{Put, TaskStore};
        use crate::model::task::{tests::task, Status};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = super::SledStore::open(path.clone()).await.unwrap();
        let mut done = task(false);
        (done.id, done.device_id, done.firmware) = ("01".into(), "d1".into(), "old-fw".into());
        store.create_task(&done, None).await.unwrap();
        let mut next = done.clone();
        next.set(Status::Succeeded, None, 5);
        next.revision = 1;
        assert_eq!(
            store.put_task(&next, 0, None, None).await.unwrap(),
            Put::Stored
        );
        let mut busy = task(false);
        (busy.id, busy.device_id) = ("02".into(), "d2".into());
        busy.options.use_quota = true;
        busy.deliver(100);
        store.create_task(&busy, None).await.unwrap();
        // An index key an earlier version kept beside the tasks.
        store.task_index.insert(b"ad9", b"99".to_vec()).unwrap();
        drop(store);

        let store = super::SledStore::open(path).await.unwrap();
        assert_eq!(store.active_task("d2").await.unwrap(), Some("02".into()));
        assert_eq!(store.active_task("d1").await.unwrap(), None);
        assert_eq!(
            store.active_task("d9").await.unwrap(),
            None,
            "old keys are gone"
        );
        assert_eq!(store.quota_holders().await.unwrap(), 1);
        assert_eq!(store.next_due().await.unwrap(), busy.due_ms());
        assert!(store.firmware_in_use("fw").await.unwrap());
        assert!(!store.firmware_in_use("old-fw").await.unwrap());
        let listed = store.list_tasks(Some("d1"), None, 10).await.unwrap();
        assert_eq!(listed, vec![next]);
    }
}
