//! Metadata: small traits, one per concern, behind `Arc<dyn MetaStore>`, so a second backend
//! (PostgreSQL) is a second implementation and callers do not change.

mod group_flush;
mod live_tasks;
mod pg_batch;
mod pg_batched;
mod pg_fleet;
mod pg_schema;
pub(crate) mod pg_tls;
mod postgres;
mod sled_fleet;
mod sled_store;
mod sled_tasks;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::MetaBackend;
use crate::model::campaign::{Campaign, Counts, Member};
use crate::model::device::Device;
use crate::model::group::Group;
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
    /// SHA-1 and MD5 of the image, lower-case hex, for clients that check them (hawkBit DDI).
    /// Records stored before they were computed lack them until a DDI client needs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
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
    /// Replaces `old`, the record as it was read, by `new` (same name and blob) if the stored
    /// record is still `old`; `false` if it is not (changed since it was read, by this
    /// instance or another sharing the store, or gone). A compare-and-swap: a change made
    /// from a record read before another change landed never undoes it.
    async fn replace(&self, old: &FirmwareRecord, new: &FirmwareRecord) -> Result<bool, MetaError>;
    /// Adds SHA-1 and MD5 (hex) to the record with this name and blob, changing nothing else;
    /// `false` if there is none.
    async fn add_digests(
        &self,
        name: &str,
        blob_key: &str,
        sha1: &str,
        md5: &str,
    ) -> Result<bool, MetaError>;
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

/// A device's pre-shared key for DTLS. The key is kept as it must be used; no route answers
/// with it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevicePsk {
    pub device_id: String,
    /// The PSK identity the device presents in its handshake; one device's only.
    pub identity: String,
    /// The key, hex.
    pub key: String,
    pub created_at: String,
}

impl std::fmt::Debug for DevicePsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePsk")
            .field("device_id", &self.device_id)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
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
    /// Stores a new task unless its device has an active one. A task a campaign releases
    /// (`task.campaign`) moves its member from waiting or skipped to the task's status, with
    /// the counts, in the same step; a member released already refuses it. A shared store
    /// tells the other instances `announce` (JSON) when, and only when, the task is stored.
    async fn create_task(
        &self,
        task: &FotaTask,
        announce: Option<&str>,
    ) -> Result<Created, MetaError>;
    async fn get_task(&self, id: &str) -> Result<Option<FotaTask>, MetaError>;
    /// Replaces a task that is still at revision `expected` (`task.revision` is the new one)
    /// and moves its index entries, and its campaign member and counts when a campaign
    /// released it; durable when it returns. With `quota`, the task takes a
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
    /// The device's active task itself.
    async fn active_task_of(&self, device_id: &str) -> Result<Option<FotaTask>, MetaError> {
        match self.active_task(device_id).await? {
            Some(id) => self.get_task(&id).await,
            None => Ok(None),
        }
    }
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

/// What became of a new task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    Stored,
    /// The device has this active task.
    DeviceBusy(String),
    /// The campaign member was released already (by another instance, or before a restart).
    MemberTaken,
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

/// The device registry, and the devices' credentials.
#[async_trait]
pub trait DeviceStore: Send + Sync {
    async fn get_device(&self, device_id: &str) -> Result<Option<Device>, MetaError>;
    /// Replaces the top-level fields of `patch` in the device's record (creating it, made at
    /// `now_ms`, if it is new) in one atomic step, so writers of different fields (an operator's
    /// tags, a device's report) never undo each other; returns the record as stored.
    async fn merge_device(
        &self,
        device_id: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
        now_ms: i64,
    ) -> Result<Device, MetaError>;
    /// [`DeviceStore::merge_device`] for many devices, each atomic on its own, durable when
    /// it returns.
    async fn merge_devices(
        &self,
        patches: &[(String, serde_json::Map<String, serde_json::Value>)],
        now_ms: i64,
    ) -> Result<(), MetaError>;
    /// Removes the device and its credential; whether it was there.
    async fn delete_device(&self, device_id: &str) -> Result<bool, MetaError>;
    /// Devices in id order after `after`.
    async fn list_devices(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Device>, MetaError>;
    async fn device_credential(
        &self,
        device_id: &str,
    ) -> Result<Option<DeviceCredential>, MetaError>;
    /// Sets the device's credential, replacing the one it had.
    async fn put_device_credential(&self, credential: &DeviceCredential) -> Result<(), MetaError>;
    /// Whether there was one to remove.
    async fn remove_device_credential(&self, device_id: &str) -> Result<bool, MetaError>;
    /// Sets the device's pre-shared key, replacing the one it had; `false` (and nothing
    /// changed) when another device has that identity.
    async fn put_device_psk(&self, psk: &DevicePsk) -> Result<bool, MetaError>;
    /// The pre-shared key a DTLS client names by `identity`.
    async fn psk_by_identity(&self, identity: &str) -> Result<Option<DevicePsk>, MetaError>;
    async fn device_psk(&self, device_id: &str) -> Result<Option<DevicePsk>, MetaError>;
    /// Whether there was one to remove.
    async fn remove_device_psk(&self, device_id: &str) -> Result<bool, MetaError>;
}

/// Named groups of devices.
#[async_trait]
pub trait GroupStore: Send + Sync {
    async fn get_group(&self, name: &str) -> Result<Option<Group>, MetaError>;
    async fn put_group(&self, group: &Group) -> Result<(), MetaError>;
    async fn delete_group(&self, name: &str) -> Result<bool, MetaError>;
    async fn list_groups(&self) -> Result<Vec<Group>, MetaError>;
}

/// Campaigns, their members and the counts kept with every member change. A shared store
/// tells the other instances `announce` (JSON) when, and only when, a campaign change it
/// comes with is stored, as [`TaskStore::create_task`] does.
#[async_trait]
pub trait CampaignStore: Send + Sync {
    async fn create_campaign(
        &self,
        campaign: &Campaign,
        announce: Option<&str>,
    ) -> Result<(), MetaError>;
    async fn get_campaign(&self, id: &str) -> Result<Option<Campaign>, MetaError>;
    /// Replaces a campaign still at revision `expected`; `false` when someone changed it.
    async fn put_campaign(
        &self,
        campaign: &Campaign,
        expected: u64,
        announce: Option<&str>,
    ) -> Result<bool, MetaError>;
    /// Campaigns in id (creation) order after `after`.
    async fn list_campaigns(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Campaign>, MetaError>;
    /// Running and paused campaigns.
    async fn live_campaigns(&self) -> Result<Vec<Campaign>, MetaError>;
    /// Stores the started campaign (still at revision `expected`) with its members, all
    /// waiting and each at its `roster::position`, as a roster (`model::roster`), and their
    /// counts, in one step; `false` when someone changed it first.
    async fn start_campaign(
        &self,
        campaign: &Campaign,
        expected: u64,
        members: &[Member],
        announce: Option<&str>,
    ) -> Result<bool, MetaError>;
    /// Writes the member records of the roster's next chunk not yet written (in release
    /// order); `false` when there is none left. Only materialized members are released,
    /// listed, moved or cancelled.
    async fn materialize(&self, campaign: &str) -> Result<bool, MetaError>;
    async fn campaign_counts(&self, id: &str) -> Result<Counts, MetaError>;
    /// The member, materialized or still in the roster.
    async fn get_member(&self, campaign: &str, device: &str) -> Result<Option<Member>, MetaError>;
    /// Adds a member unless the device is one already (in the roster too); whether it was
    /// added.
    async fn add_member(&self, campaign: &str, member: &Member) -> Result<bool, MetaError>;
    /// Replaces a member whose status is one of `from`, moving the counts; whether it was.
    async fn move_member(
        &self,
        campaign: &str,
        from: &[&str],
        member: &Member,
    ) -> Result<bool, MetaError>;
    /// Materialized members in device order after `after`, of one status or all.
    async fn list_members(
        &self,
        campaign: &str,
        status: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Member>, MetaError>;
    /// Materialized waiting members of waves up to `max_wave`, in release order (wave, then
    /// position).
    async fn waiting_members(
        &self,
        campaign: &str,
        max_wave: u32,
        limit: usize,
    ) -> Result<Vec<Member>, MetaError>;
    /// Skipped members whose retry time has come.
    async fn skipped_due(
        &self,
        campaign: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Member>, MetaError>;
}

/// User-defined maintenance schedules.
#[async_trait]
pub trait ScheduleStore: Send + Sync {
    async fn get_schedule(&self, name: &str) -> Result<Option<Schedule>, MetaError>;
    async fn put_schedule(&self, schedule: &Schedule) -> Result<(), MetaError>;
    async fn list_schedules(&self) -> Result<Vec<Schedule>, MetaError>;
    async fn delete_schedule(&self, name: &str) -> Result<bool, MetaError>;
}

/// What a device's request reads first, the device's credential with its task: one look-up
/// where the backend can join them (PostgreSQL), two otherwise.
#[async_trait]
pub trait DeviceReads: TaskStore + DeviceStore {
    /// The device's credential and its active task.
    async fn credential_and_active_task(
        &self,
        device_id: &str,
    ) -> Result<(Option<DeviceCredential>, Option<FotaTask>), MetaError> {
        let credential = self.device_credential(device_id).await?;
        Ok((credential, self.active_task_of(device_id).await?))
    }

    /// A task and its device's credential.
    async fn task_and_credential(
        &self,
        id: &str,
    ) -> Result<Option<(FotaTask, Option<DeviceCredential>)>, MetaError> {
        let Some(t) = self.get_task(id).await? else {
            return Ok(None);
        };
        let credential = self.device_credential(&t.device_id).await?;
        Ok(Some((t, credential)))
    }
}

/// Every metadata concern of the service.
pub trait MetaStore:
    FirmwareCatalog
    + ExpiryIndex
    + TaskStore
    + DeviceStore
    + DeviceReads
    + ScheduleStore
    + GroupStore
    + CampaignStore
{
}
impl<
        T: FirmwareCatalog
            + ExpiryIndex
            + TaskStore
            + DeviceStore
            + DeviceReads
            + ScheduleStore
            + GroupStore
            + CampaignStore,
    > MetaStore for T
{
}

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

    pub fn record(name: &str, blob: &str, expires: Option<i64>) -> FirmwareRecord {
        FirmwareRecord {
            name: name.into(),
            size: 10,
            sha256: "00".repeat(32),
            sha1: Some("11".repeat(20)),
            md5: None,
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
        assert!(store.replace(&a, &a2).await.unwrap());
        assert_eq!(store.next_expiry_after(0).await.unwrap(), Some(1000));
        // A replace from the record as it was before is refused, and changes nothing.
        let mut stale = a.clone();
        stale.description = Some("stale".into());
        assert!(!store.replace(&a, &stale).await.unwrap());
        assert_eq!(store.get("a").await.unwrap().unwrap(), a2);
        let mut a3 = a2.clone();
        a3.expires_at_ms = None;
        assert!(store.replace(&a2, &a3).await.unwrap());
        let a2 = a3;
        assert_eq!(store.next_expiry_after(0).await.unwrap(), Some(3000));
        let other = record("a", "other-blob", None);
        assert!(!store.replace(&other, &other).await.unwrap());
        let gone = record("nobody", "nobody", None);
        assert!(!store.replace(&gone, &gone).await.unwrap());

        // Digests added later change nothing else, and a replace from the record read before
        // them is refused: the one read after keeps them.
        assert!(store.add_digests("a", "b1", "22", "33").await.unwrap());
        assert!(!store
            .add_digests("a", "other-blob", "22", "33")
            .await
            .unwrap());
        let with = store.get("a").await.unwrap().unwrap();
        assert_eq!(
            (with.sha1.as_deref(), with.md5.as_deref()),
            (Some("22"), Some("33"))
        );
        assert_eq!(with.expires_at_ms, None);
        let mut described = a2.clone();
        described.description = Some("d".into());
        assert!(!store.replace(&a2, &described).await.unwrap());
        let mut described = with.clone();
        described.description = Some("d".into());
        assert!(store.replace(&with, &described).await.unwrap());
        let kept = store.get("a").await.unwrap().unwrap();
        assert_eq!(
            (kept.sha1.as_deref(), kept.md5.as_deref()),
            (Some("22"), Some("33"))
        );
        assert_eq!(kept.description.as_deref(), Some("d"));

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
        assert_eq!(store.create_task(&t1, None).await.unwrap(), Created::Stored);
        let mut other = t1.clone();
        other.id = "02".into();
        assert_eq!(
            store.create_task(&other, None).await.unwrap(),
            Created::DeviceBusy("01".into()),
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
        assert_eq!(store.create_task(&q, None).await.unwrap(), Created::Stored);
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
        assert_eq!(
            store.create_task(&other, None).await.unwrap(),
            Created::Stored
        );
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

        let patch = |v: serde_json::Value| v.as_object().unwrap().clone();
        let d = store
            .merge_device("d", &patch(serde_json::json!({"pkgName": "app"})), 7)
            .await
            .unwrap();
        assert_eq!((d.pkg_name.as_deref(), d.created_ms), (Some("app"), 7));
        assert_eq!(store.get_device("d").await.unwrap(), Some(d));
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
        // Pre-shared keys: one identity per device, found by identity, gone with the device.
        let psk = |device: &str, identity: &str| DevicePsk {
            device_id: device.into(),
            identity: identity.into(),
            key: "00112233".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
        };
        assert!(store.put_device_psk(&psk("d", "id-1")).await.unwrap());
        assert!(
            !store.put_device_psk(&psk("e", "id-1")).await.unwrap(),
            "taken"
        );
        assert_eq!(store.device_psk("e").await.unwrap(), None);
        assert_eq!(
            store.psk_by_identity("id-1").await.unwrap(),
            Some(psk("d", "id-1"))
        );
        assert!(store.put_device_psk(&psk("d", "id-2")).await.unwrap());
        assert_eq!(store.psk_by_identity("id-1").await.unwrap(), None, "freed");
        assert!(store.put_device_psk(&psk("e", "id-1")).await.unwrap());
        assert_eq!(store.device_psk("d").await.unwrap(), Some(psk("d", "id-2")));
        assert!(store.remove_device_psk("e").await.unwrap());
        assert!(!store.remove_device_psk("e").await.unwrap());
        assert_eq!(store.psk_by_identity("id-1").await.unwrap(), None);
        assert!(store.delete_device("d").await.unwrap());
        assert_eq!(store.psk_by_identity("id-2").await.unwrap(), None);
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
        fleet(store).await;
    }

    /// The registry merges field by field; campaign members and counts move together,
    /// also when a campaign task moves them.
    async fn fleet(store: &dyn MetaStore) {
        use crate::model::campaign::{tests::campaign, Member, State, Wave, WaveSize};
        use crate::model::group::{Group, Members};
        use crate::model::roster;
        use crate::model::task::{tests::task, CampaignLink, Status};
        use serde_json::json;
        let patch = |v: serde_json::Value| v.as_object().unwrap().clone();

        // A report and an operator's tags, written apart, both stay.
        store
            .merge_device("m1", &patch(json!({"tags": {"region": "eu"}})), 1)
            .await
            .unwrap();
        let d = store
            .merge_device(
                "m1",
                &patch(json!({"pkgVersion": "1.0", "createdMs": 99})),
                2,
            )
            .await
            .unwrap();
        assert_eq!(d.tags.get("region").map(String::as_str), Some("eu"));
        assert_eq!((d.pkg_version.as_deref(), d.created_ms), (Some("1.0"), 1));
        let many: Vec<_> = (0..30)
            .map(|i| {
                (
                    format!("m{i:02}"),
                    patch(json!({"tags": {"n": i.to_string()}})),
                )
            })
            .chain([("m1".to_owned(), patch(json!({"attributes": {"hw": "b"}})))])
            .collect();
        store.merge_devices(&many, 3).await.unwrap();
        let m1 = store.get_device("m1").await.unwrap().unwrap();
        assert_eq!(m1.attributes.get("hw").map(String::as_str), Some("b"));
        assert_eq!(
            m1.pkg_version.as_deref(),
            Some("1.0"),
            "an import keeps reports"
        );
        let ids = |v: Vec<crate::model::device::Device>| {
            v.into_iter().map(|d| d.device_id).collect::<Vec<_>>()
        };
        assert_eq!(
            ids(store.list_devices(Some("m08"), 3).await.unwrap()),
            ["m09", "m1", "m10"]
        );
        assert!(store.delete_device("m1").await.unwrap());
        assert!(!store.delete_device("m1").await.unwrap());

        let g = Group {
            name: "eu".into(),
            members: Members::Filter("tag.region = eu".into()),
            description: None,
            updated_ms: 1,
        };
        store.put_group(&g).await.unwrap();
        assert_eq!(store.get_group("eu").await.unwrap(), Some(g.clone()));
        assert_eq!(store.list_groups().await.unwrap(), vec![g]);
        assert!(store.delete_group("eu").await.unwrap());
        assert!(!store.delete_group("eu").await.unwrap());

        // A campaign: created, changed only from its revision, started with its members.
        let mut c = campaign(vec![
            Wave {
                size: WaveSize::Count(2),
                success_share: 1.0,
                pause: false,
            },
            Wave {
                size: WaveSize::Rest,
                success_share: 1.0,
                pause: false,
            },
        ]);
        c.id = "c1".into();
        store.create_campaign(&c, None).await.unwrap();
        let member = |d: &str, wave: u32| roster::waiting(d, wave, roster::position("c1", d));
        let members = [member("x3", 0), member("x1", 0), member("x2", 1)];
        let mut started = c.clone();
        started.started(vec![2, 1], "alice", 5);
        started.revision = 1;
        assert!(!store
            .start_campaign(&started, 7, &members, None)
            .await
            .unwrap());
        assert!(store
            .start_campaign(&started, 0, &members, None)
            .await
            .unwrap());
        assert!(
            !store
                .start_campaign(&started, 1, &members, None)
                .await
                .unwrap(),
            "once"
        );
        assert_eq!(store.live_campaigns().await.unwrap(), vec![started.clone()]);
        let counts = store.campaign_counts("c1").await.unwrap();
        assert_eq!(
            (counts.wave(0, "waiting"), counts.wave(1, "waiting")),
            (2, 1)
        );
        let devs = |v: Vec<Member>| v.into_iter().map(|m| m.device_id).collect::<Vec<_>>();
        // Until the driver writes them, the roster's members are known and waiting, refused
        // as late joiners, and neither listed nor released.
        assert_eq!(
            store.get_member("c1", "x1").await.unwrap(),
            Some(member("x1", 0))
        );
        assert_eq!(store.get_member("c1", "x4").await.unwrap(), None);
        assert!(!store.add_member("c1", &member("x2", 0)).await.unwrap());
        assert!(store.waiting_members("c1", 1, 10).await.unwrap().is_empty());
        assert!(store
            .list_members("c1", None, None, 10)
            .await
            .unwrap()
            .is_empty());
        assert!(store.materialize("c1").await.unwrap());
        assert!(!store.materialize("c1").await.unwrap(), "one chunk");
        let mut wave0 = vec![member("x3", 0), member("x1", 0)];
        wave0.sort_by_key(|m| m.position);
        let wave0 = devs(wave0);
        assert_eq!(
            devs(store.waiting_members("c1", 0, 10).await.unwrap()),
            wave0
        );
        assert_eq!(
            devs(store.waiting_members("c1", 1, 10).await.unwrap()),
            [wave0.clone(), vec!["x2".to_owned()]].concat()
        );
        let counts = store.campaign_counts("c1").await.unwrap();
        assert_eq!(
            (counts.wave(0, "waiting"), counts.wave(1, "waiting")),
            (2, 1),
            "counted once"
        );

        // Releasing a member is its task's creation; a second release is refused.
        let mut t = task(false);
        t.id = "c1-x3".into();
        t.device_id = "x3".into();
        t.campaign = Some(CampaignLink {
            id: "c1".into(),
            wave: 0,
        });
        assert_eq!(store.create_task(&t, None).await.unwrap(), Created::Stored);
        let mut again = t.clone();
        again.id = "c1-x3-again".into();
        assert_eq!(
            store.create_task(&again, None).await.unwrap(),
            Created::MemberTaken
        );
        assert_eq!(store.get_task("c1-x3-again").await.unwrap(), None);
        // A busy device leaves its member waiting.
        let mut busy = task(false);
        busy.id = "c1-x1".into();
        busy.device_id = "d".into();
        busy.campaign = Some(CampaignLink {
            id: "c1".into(),
            wave: 0,
        });
        let mut member_x1 = member("x1", 0);
        member_x1.device_id = "d".into();
        assert!(store.add_member("c1", &member_x1).await.unwrap());
        assert!(!store.add_member("c1", &member_x1).await.unwrap(), "once");
        assert!(matches!(
            store.create_task(&busy, None).await.unwrap(),
            Created::DeviceBusy(_)
        ));
        assert_eq!(
            store.get_member("c1", "d").await.unwrap(),
            Some(member_x1.clone())
        );

        // The task's transitions move the member and the counts.
        let before = t.clone();
        t.set(Status::Failed, Some("integrity-check-failure"), 9);
        t.revision = 1;
        assert_eq!(
            store
                .put_task(&t, before.revision, None, None)
                .await
                .unwrap(),
            Put::Stored
        );
        let counts = store.campaign_counts("c1").await.unwrap();
        assert_eq!(counts.wave(0, "failed"), 1);
        assert_eq!(counts.wave(0, "waiting"), 2, "x1 and d");
        assert_eq!(counts.wave(0, "pending"), 0);
        assert_eq!(counts.reasons.get("integrity-check-failure"), Some(&1));
        let failed = store
            .list_members("c1", Some("failed"), None, 10)
            .await
            .unwrap();
        assert_eq!(devs(failed.clone()), ["x3"]);
        assert_eq!(failed[0].task_id.as_deref(), Some("c1-x3"));

        // Moving a member checks where it is.
        let mut retry = failed[0].clone();
        retry.status = "waiting".into();
        retry.task_id = None;
        assert!(!store.move_member("c1", &["skipped"], &retry).await.unwrap());
        assert!(store.move_member("c1", &["failed"], &retry).await.unwrap());
        let counts = store.campaign_counts("c1").await.unwrap();
        assert_eq!((counts.wave(0, "failed"), counts.reasons.len()), (0, 0));
        let mut skip = member("x2", 1);
        skip.status = "skipped".into();
        skip.retry_at_ms = Some(100);
        assert!(store.move_member("c1", &["waiting"], &skip).await.unwrap());
        assert!(store.skipped_due("c1", 99, 10).await.unwrap().is_empty());
        assert_eq!(
            devs(store.skipped_due("c1", 100, 10).await.unwrap()),
            ["x2"]
        );
        assert_eq!(
            devs(
                store
                    .list_members("c1", None, Some("x1"), 10)
                    .await
                    .unwrap()
            ),
            ["x2", "x3"]
        );

        // Campaign records change only from the revision they were read at.
        let mut paused = started.clone();
        paused.state = State::Paused;
        paused.revision = 2;
        assert!(!store.put_campaign(&paused, 0, None).await.unwrap());
        assert!(store.put_campaign(&paused, 1, None).await.unwrap());
        assert_eq!(
            store.get_campaign("c1").await.unwrap(),
            Some(paused.clone())
        );
        assert_eq!(store.list_campaigns(None, 10).await.unwrap(), vec![paused]);
        assert_eq!(store.list_campaigns(Some("c1"), 10).await.unwrap(), vec![]);

        // A roster of several chunks: every device is found before and after its chunk is
        // written, chunks are written in release order, and each member once.
        let mut c2 = campaign(c.waves.clone());
        c2.id = "c2".into();
        store.create_campaign(&c2, None).await.unwrap();
        let n = roster::CHUNK * 2 + 7;
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let d = format!("r{i:05}");
                roster::waiting(&d, (i % 2) as u32, roster::position("c2", &d))
            })
            .collect();
        let mut started2 = c2.clone();
        started2.started(vec![n as u64 / 2, n as u64 - n as u64 / 2], "alice", 5);
        started2.revision = 1;
        assert!(store
            .start_campaign(&started2, 0, &members, None)
            .await
            .unwrap());
        let mut order = members.clone();
        order.sort_by_key(|m| m.position);
        let probes = [&order[0], &order[roster::CHUNK], &order[n - 1]];
        for round in 0..4 {
            for m in probes {
                assert_eq!(
                    store.get_member("c2", &m.device_id).await.unwrap().as_ref(),
                    Some(m),
                    "round {round}"
                );
            }
            let written = store.list_members("c2", None, None, n).await.unwrap();
            assert_eq!(written.len(), (round * roster::CHUNK).min(n));
            assert_eq!(store.materialize("c2").await.unwrap(), round < 3);
        }
        let waiting = store.waiting_members("c2", 0, n).await.unwrap();
        assert_eq!(waiting.len(), n.div_ceil(2));
        assert!(waiting.windows(2).all(|w| w[0].position < w[1].position));
        let counts = store.campaign_counts("c2").await.unwrap();
        assert_eq!(counts.unreleased(None), n as u64);
    }
}
