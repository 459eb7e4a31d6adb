//! Metadata: small traits, one per concern, behind `Arc<dyn MetaStore>`, so a second backend
//! (PostgreSQL) is a second implementation and callers do not change.

mod group_flush;
mod pg_schema;
pub(crate) mod pg_tls;
mod postgres;
mod sled_store;
mod sled_tasks;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::MetaBackend;
use crate::model::schedule::Schedule;
use crate::model::task::FotaTask;

/// Why the metadata store failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store: {0}")]
    Backend(String),
    #[error("metadata record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
}

/// What the repository knows of one stored image. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareRecord {
    pub name: String,
    pub size: u64,
    /// SHA-256 of the image, lower-case hex.
    pub sha256: String,
    pub content_type: String,
    pub description: Option<String>,
    pub version: Option<String>,
    pub created_at_ms: i64,
    /// Retention in seconds; `None` keeps the image forever.
    pub retention_secs: Option<u64>,
    pub expires_at_ms: Option<i64>,
    pub signature_key_id: String,
    /// Ed25519 signature over the 32-byte digest, base64.
    pub signature: String,
    /// Object-store key of the bytes.
    pub blob_key: String,
    /// Set when fwrepo built and signed the stored MCUboot image from a raw body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcuboot: Option<crate::mcuboot::McubootInfo>,
}

impl FirmwareRecord {
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|t| t <= now_ms)
    }
}

/// Name → record, with create-once semantics.
#[async_trait]
pub trait FirmwareCatalog: Send + Sync {
    async fn get(&self, name: &str) -> Result<Option<FirmwareRecord>, MetaError>;
    /// Stores `record` unless its name is taken; returns the holder of the name otherwise.
    /// The record is durable when this returns `Ok(None)`.
    async fn insert_new(
        &self,
        record: &FirmwareRecord,
    ) -> Result<Option<FirmwareRecord>, MetaError>;
    /// Replaces the record with the same name and blob; `false` if there is none.
    async fn update(&self, record: &FirmwareRecord) -> Result<bool, MetaError>;
    /// Removes the record of `name` if it still points at `blob_key`.
    async fn remove(&self, name: &str, blob_key: &str) -> Result<bool, MetaError>;
    /// Records whose names start with `prefix`, in name order, after `after`.
    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FirmwareRecord>, MetaError>;
    /// Number of records and sum of their sizes.
    async fn totals(&self) -> Result<(u64, u64), MetaError>;
}

/// Records ordered by expiry, so the sweeper sleeps until the next one instead of scanning.
#[async_trait]
pub trait ExpiryIndex: Send + Sync {
    /// The first expiry strictly after `after_ms`.
    async fn next_expiry_after(&self, after_ms: i64) -> Result<Option<i64>, MetaError>;
    /// Up to `limit` records that expire at or before `now_ms`, in expiry order, after the
    /// record `after` (a cursor for passes that keep some records).
    async fn expired(
        &self,
        now_ms: i64,
        after: Option<&FirmwareRecord>,
        limit: usize,
    ) -> Result<Vec<FirmwareRecord>, MetaError>;
}

/// What a device last told us about the firmware it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    pub device_id: String,
    pub pkg_name: Option<String>,
    pub pkg_version: Option<String>,
    pub reported_ms: i64,
}

/// A device's credential: what is kept of its device token (only the SHA-256, as for access
/// tokens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCredential {
    pub device_id: String,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    pub created_at: String,
}

/// FOTA tasks with the indexes the engine works from: the active task per device, due times,
/// quota holders, imports in progress and firmware in use.
#[async_trait]
pub trait TaskStore: Send + Sync {
    /// Whether other instances change these tasks too (their deadlines must be looked for).
    fn shared(&self) -> bool {
        false
    }

    /// What other instances announce (their own messages come back too), until `cancel`;
    /// `None` for a store one process owns.
    fn announcements(
        &self,
        _cancel: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::sync::mpsc::Receiver<String>> {
        None
    }
    /// Stores a new task unless its device has an active one; returns that one's id then.
    /// A shared store tells the other instances `announce` (JSON) when, and only when, the
    /// task is stored.
    async fn create_task(
        &self,
        task: &FotaTask,
        announce: Option<&str>,
    ) -> Result<Option<String>, MetaError>;
    async fn get_task(&self, id: &str) -> Result<Option<FotaTask>, MetaError>;
    /// Replaces a task that is still at revision `expected` (`task.revision` is the new one)
    /// and moves its index entries; durable when it returns. With `quota`, the task takes a
    /// quota slot, and only if fewer than that many tasks hold one. `announce` as for
    /// [`TaskStore::create_task`].
    async fn put_task(
        &self,
        task: &FotaTask,
        expected: u64,
        quota: Option<u64>,
        announce: Option<&str>,
    ) -> Result<Put, MetaError>;
    async fn active_task(&self, device_id: &str) -> Result<Option<String>, MetaError>;
    /// Tasks in id (creation) order after `after`, of one device or all.
    async fn list_tasks(
        &self,
        device_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FotaTask>, MetaError>;
    /// The earliest moment a task needs the engine.
    async fn next_due(&self) -> Result<Option<i64>, MetaError>;
    /// Up to `limit` tasks due at or before `now_ms`.
    async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<FotaTask>, MetaError>;
    /// How many tasks hold a quota slot.
    async fn quota_holders(&self) -> Result<u64, MetaError>;
    /// Tasks waiting for their firmware to be imported.
    async fn importing(&self) -> Result<Vec<FotaTask>, MetaError>;
    /// Whether an active task delivers the firmware `name`.
    async fn firmware_in_use(&self, name: &str) -> Result<bool, MetaError>;
}

/// What became of a task update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Stored,
    /// Someone changed the task since it was read (another request, another instance).
    Stale,
    /// Every quota slot is taken.
    QuotaFull,
}

/// What devices reported (for `useCachedData`), and their credentials.
#[async_trait]
pub trait DeviceStore: Send + Sync {
    async fn get_device(&self, device_id: &str) -> Result<Option<DeviceInfo>, MetaError>;
    async fn put_device(&self, info: &DeviceInfo) -> Result<(), MetaError>;
    async fn device_credential(
        &self,
        device_id: &str,
    ) -> Result<Option<DeviceCredential>, MetaError>;
    /// Sets the device's credential, replacing the one it had.
    async fn put_device_credential(&self, credential: &DeviceCredential) -> Result<(), MetaError>;
    /// Whether there was one to remove.
    async fn remove_device_credential(&self, device_id: &str) -> Result<bool, MetaError>;
}

/// User-defined maintenance schedules.
#[async_trait]
pub trait ScheduleStore: Send + Sync {
    async fn get_schedule(&self, name: &str) -> Result<Option<Schedule>, MetaError>;
    async fn put_schedule(&self, schedule: &Schedule) -> Result<(), MetaError>;
    async fn list_schedules(&self) -> Result<Vec<Schedule>, MetaError>;
    async fn delete_schedule(&self, name: &str) -> Result<bool, MetaError>;
}

/// Every metadata concern of the service.
pub trait MetaStore:
    FirmwareCatalog + ExpiryIndex + TaskStore + DeviceStore + ScheduleStore
{
}
impl<T: FirmwareCatalog + ExpiryIndex + TaskStore + DeviceStore + ScheduleStore> MetaStore for T {}

/// Opens the configured backend, and the tokens that go with it (see [`open_tokens`]); with
/// PostgreSQL both share one store and its connections.
pub async fn open(
    backend: &MetaBackend,
    tokens_file: &std::path::Path,
) -> Result<(Arc<dyn MetaStore>, crate::auth::TokenStore), MetaError> {
    match backend {
        MetaBackend::Sled(path) => Ok((
            Arc::new(sled_store::SledStore::open(path.clone()).await?),
            crate::auth::TokenStore::file(tokens_file),
        )),
        MetaBackend::Postgres(url) => {
            let store = Arc::new(postgres::PgStore::open(url).await?);
            Ok((store.clone(), crate::auth::TokenStore::table(store)))
        }
    }
}

/// Where the bearer tokens live for this metadata backend: beside sled, the token file (the
/// command line changes it while the server holds sled's lock); with PostgreSQL, its table,
/// so every instance sharing the database sees a new or revoked token at once.
pub async fn open_tokens(
    backend: &MetaBackend,
    file: &std::path::Path,
) -> Result<crate::auth::TokenStore, MetaError> {
    match backend {
        MetaBackend::Sled(_) => Ok(crate::auth::TokenStore::file(file)),
        MetaBackend::Postgres(url) => Ok(crate::auth::TokenStore::table(Arc::new(
            postgres::PgStore::open(url).await?,
        ))),
    }
}

#[cfg(test)]
pub(crate) mod suite {
    //! The behaviour every backend must show; each backend's tests call `run`.
    use super::*;

    fn record(name: &str, blob: &str, expires: Option<i64>) -> FirmwareRecord {
        FirmwareRecord {
            name: name.into(),
            size: 10,
            sha256: "00".repeat(32),
            content_type: "application/octet-stream".into(),
            description: None,
            version: None,
            created_at_ms: 1,
            retention_secs: expires.map(|_| 1),
            expires_at_ms: expires,
            signature_key_id: "k".into(),
            signature: "s".into(),
            blob_key: blob.into(),
            mcuboot: None,
        }
    }

    pub async fn run(store: &dyn MetaStore) {
        assert_eq!(store.get("a").await.unwrap(), None);
        let a = record("a", "b1", Some(5000));
        assert_eq!(store.insert_new(&a).await.unwrap(), None);
        assert_eq!(
            store.insert_new(&record("a", "b2", None)).await.unwrap(),
            Some(a.clone())
        );
        assert_eq!(store.get("a").await.unwrap(), Some(a.clone()));
        for n in ["ab", "b", "aa"] {
            store.insert_new(&record(n, n, Some(3000))).await.unwrap();
        }
        let names = |v: Vec<FirmwareRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(
            names(store.list("a", None, 10).await.unwrap()),
            ["a", "aa", "ab"]
        );
        assert_eq!(names(store.list("a", Some("a"), 1).await.unwrap()), ["aa"]);
        assert_eq!(names(store.list("", Some("ab"), 10).await.unwrap()), ["b"]);
        assert_eq!(store.totals().await.unwrap(), (4, 40));

        assert_eq!(store.next_expiry_after(0).await.unwrap(), Some(3000));
        assert_eq!(store.next_expiry_after(3000).await.unwrap(), Some(5000));
        assert_eq!(
            names(store.expired(2999, None, 10).await.unwrap()),
            Vec::<String>::new()
        );
        let due = store.expired(3000, None, 10).await.unwrap();
        assert_eq!(names(due.clone()), ["aa", "ab", "b"]);
        // A cursor skips what a pass kept.
        assert_eq!(
            names(store.expired(3000, Some(&due[0]), 10).await.unwrap()),
            ["ab", "b"]
        );

        // Moving an expiry moves its index entry.
        let mut a2 = a.clone();
        a2.expires_at_ms = Some(1000);
        assert!(store.update(&a2).await.unwrap());
        assert_eq!(store.next_expiry_after(0).await.unwrap(), Some(1000));
        a2.expires_at_ms = None;
        assert!(store.update(&a2).await.unwrap());
        assert_eq!(store.next_expiry_after(0).await.unwrap(), Some(3000));
        assert!(!store
            .update(&record("a", "other-blob", None))
            .await
            .unwrap());

        assert!(!store.remove("aa", "wrong-blob").await.unwrap());
        assert!(store.remove("aa", "aa").await.unwrap());
        assert!(store.remove("ab", "ab").await.unwrap());
        assert!(store.remove("b", "b").await.unwrap());
        assert_eq!(store.next_expiry_after(0).await.unwrap(), None);
        assert_eq!(store.get("aa").await.unwrap(), None);
        assert_eq!(store.totals().await.unwrap(), (1, 10));
        tasks(store).await;
    }

    /// Tasks and their indexes move together.
    async fn tasks(store: &dyn MetaStore) {
        use crate::model::task::{tests::task, Status};
        let mut t1 = task(false);
        t1.id = "01".into();
        t1.options.use_quota = true;
        assert_eq!(store.create_task(&t1, None).await.unwrap(), None);
        let mut other = t1.clone();
        other.id = "02".into();
        assert_eq!(
            store.create_task(&other, None).await.unwrap(),
            Some("01".into()),
            "one active task per device"
        );
        assert_eq!(store.active_task("d").await.unwrap(), Some("01".into()));
        assert!(store.firmware_in_use("fw").await.unwrap());
        assert!(!store.firmware_in_use("f").await.unwrap());
        assert_eq!(store.next_due().await.unwrap(), None);

        t1.deliver(100);
        t1.revision = 1;
        assert_eq!(
            store.put_task(&t1, 0, Some(1), None).await.unwrap(),
            Put::Stored
        );
        assert_eq!(store.quota_holders().await.unwrap(), 1);
        // A change made from an older read is refused.
        let mut late = t1.clone();
        late.set(Status::Cancelled, None, 100);
        assert_eq!(
            store.put_task(&late, 0, None, None).await.unwrap(),
            Put::Stale
        );
        assert_eq!(store.get_task("01").await.unwrap(), Some(t1.clone()));
        assert_eq!(store.next_due().await.unwrap(), Some(1100));
        assert!(store.due(1099, 10).await.unwrap().is_empty());
        assert_eq!(store.due(1100, 10).await.unwrap(), vec![t1.clone()]);

        // With the one slot taken, another task cannot take it, and is not stored.
        let mut q = task(false);
        q.id = "00".into();
        q.device_id = "q".into();
        q.options.use_quota = true;
        assert_eq!(store.create_task(&q, None).await.unwrap(), None);
        let pending = q.clone();
        q.deliver(100);
        q.revision = 1;
        assert_eq!(
            store.put_task(&q, 0, Some(1), None).await.unwrap(),
            Put::QuotaFull
        );
        assert_eq!(store.get_task("00").await.unwrap(), Some(pending));
        assert_eq!(
            store.put_task(&q, 0, Some(2), None).await.unwrap(),
            Put::Stored
        );
        assert_eq!(store.quota_holders().await.unwrap(), 2);
        q.set(Status::Cancelled, None, 100);
        q.revision = 2;
        assert_eq!(
            store.put_task(&q, 1, None, None).await.unwrap(),
            Put::Stored
        );

        t1.set(Status::Failed, Some("timeout"), 1100);
        t1.revision = 2;
        assert_eq!(
            store.put_task(&t1, 1, None, None).await.unwrap(),
            Put::Stored
        );
        assert_eq!(store.get_task("01").await.unwrap(), Some(t1.clone()));
        assert_eq!(store.quota_holders().await.unwrap(), 0);
        assert_eq!(store.next_due().await.unwrap(), None);
        assert_eq!(store.active_task("d").await.unwrap(), None);
        assert!(!store.firmware_in_use("fw").await.unwrap());

        let mut t3 = task(false);
        t3.id = "03".into();
        t3.device_id = "e".into();
        t3.set(Status::Pending, Some("import"), 5);
        store.create_task(&t3, None).await.unwrap();
        assert_eq!(store.importing().await.unwrap(), vec![t3.clone()]);
        assert_eq!(store.create_task(&other, None).await.unwrap(), None);
        let ids = |v: Vec<FotaTask>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.list_tasks(None, None, 10).await.unwrap()),
            ["00", "01", "02", "03"]
        );
        assert_eq!(
            ids(store.list_tasks(Some("d"), None, 10).await.unwrap()),
            ["01", "02"]
        );
        assert_eq!(
            ids(store.list_tasks(Some("d"), Some("01"), 10).await.unwrap()),
            ["02"]
        );
        assert_eq!(
            ids(store.list_tasks(None, Some("02"), 10).await.unwrap()),
            ["03"]
        );

        let info = DeviceInfo {
            device_id: "d".into(),
            pkg_name: Some("app".into()),
            pkg_version: None,
            reported_ms: 1,
        };
        store.put_device(&info).await.unwrap();
        assert_eq!(store.get_device("d").await.unwrap(), Some(info));
        assert_eq!(store.device_credential("d").await.unwrap(), None);
        let mut cred = DeviceCredential {
            device_id: "d".into(),
            sha256: "aa".repeat(32),
            created_at: "2026-01-01T00:00:00Z".into(),
        };
        store.put_device_credential(&cred).await.unwrap();
        cred.sha256 = "bb".repeat(32);
        store.put_device_credential(&cred).await.unwrap();
        assert_eq!(store.device_credential("d").await.unwrap(), Some(cred));
        assert!(store.remove_device_credential("d").await.unwrap());
        assert!(!store.remove_device_credential("d").await.unwrap());
        assert_eq!(store.device_credential("d").await.unwrap(), None);
        let s = crate::model::schedule::Schedule {
            name: "n".into(),
            time_zone: "UTC".into(),
            windows: Vec::new(),
            built_in: false,
        };
        store.put_schedule(&s).await.unwrap();
        assert_eq!(store.list_schedules().await.unwrap(), vec![s.clone()]);
        assert!(store.delete_schedule("n").await.unwrap());
        assert!(!store.delete_schedule("n").await.unwrap());
    }
}
