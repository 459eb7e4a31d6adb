//! The engine behind the FOTA routes: every task change goes through `commit`, which stores
//! the task with its indexes only if nobody stored it since it was read (its revision), takes
//! a quota slot in the same store step, keeps the package cache in step, and publishes the
//! transition as an event. Several instances may share the store.
//!
//! This file holds the engine's state, `commit` and the events; the rest is by concern:
//! `scheduling` (operators: schedule, cancel, schedules), `device` (devices: identity, work,
//! reports, packages), `imports`, `timers` and `progress`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod ddi;
mod device;
pub use ddi::{ConfigMode, Controller};
pub use device::Proof;
mod imports;
mod progress;
mod scheduling;
mod timers;

use super::clock::Clock;
use super::import::Importer;
use super::request::{RequestError, ScheduleRequest};
use super::schedule::{self, Calendar, Schedule, ScheduleError};
use super::task::{waiting, CampaignLink, FotaTask, Report, Status, TaskOptions};
use super::view::TaskEvent;
use super::{check_device, FotaError};
use crate::config::FotaConfig;
use crate::firmware::{FirmwareError, Ingested, Repository, UploadRequest};
use crate::meta::{Created, FirmwareRecord, MetaStore, Put};
use crate::name::FirmwareName;

/// Lock stripes: operations on one task are serialised, different tasks rarely contend.
const STRIPES: usize = 64;
/// Fresh reads a step gets when the task keeps changing under it.
const STALE_RETRIES: usize = 16;
/// How long a package lookup is reused for the next block or range of the same task.
const PACKAGE_TTL: Duration = Duration::from_secs(1);
/// Tasks handled per batch when timers fire.
const DUE_BATCH: usize = 256;
/// Hint to a device whose firmware is still being imported.
const IMPORT_RETRY: Duration = Duration::from_secs(10);
/// After a failed timer pass, try again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Events a slow subscriber may fall behind before it is told it lagged.
const EVENT_BUFFER: usize = 4096;

/// A device that polls is written to the registry at most this often (its last-seen time).
const SEEN_EVERY: Duration = Duration::from_secs(60);
/// Devices whose last write is remembered; the memory is forgotten past it (costing a write).
const SEEN_REMEMBERED: usize = 200_000;

/// Offers a device without an active task the campaigns it has joined since they started.
#[async_trait::async_trait]
pub trait Joiner: Send + Sync {
    /// Whether a task was released for `device`.
    async fn join(&self, device: &str) -> Result<bool, FotaError>;
}

/// What a device gets when it asks for work.
pub enum Work {
    /// Download `record` from the task's package URI.
    Task {
        task: Box<FotaTask>,
        record: Arc<FirmwareRecord>,
    },
    /// Nothing now; ask again after the hint.
    Nothing { retry_after: Duration },
}

/// A task's firmware, resolved for serving bytes on its package URI.
pub struct Package {
    capability: String,
    pub task_id: String,
    pub record: Arc<FirmwareRecord>,
    progress: Arc<AtomicU64>,
}

impl Package {
    /// Counts bytes served to the task.
    pub fn served(&self, n: u64) {
        self.progress.fetch_add(n, Ordering::Relaxed);
    }
}

/// The FOTA engine.
pub struct Engine {
    store: Arc<dyn MetaStore>,
    repo: Arc<Repository>,
    clock: Arc<dyn Clock>,
    config: FotaConfig,
    importer: Importer,
    /// Public base per URI scheme, set once the listeners are bound.
    bases: OnceLock<Vec<(&'static str, String)>>,
    /// `auth.package_tokens`: a package URI works only with its capability.
    package_tokens: AtomicBool,
    /// `auth.device_credentials`: every device must present its device token.
    device_credentials: AtomicBool,
    locks: Vec<tokio::sync::Mutex<()>>,
    /// Bytes served per task not yet folded into the stored task.
    progress: Mutex<HashMap<String, Arc<AtomicU64>>>,
    packages: Mutex<HashMap<String, (Arc<Package>, Instant)>>,
    importing: Mutex<HashSet<String>>,
    /// When this instance last wrote each device's last-seen time.
    seen: Mutex<HashMap<String, i64>>,
    /// Weak: the fleet holds the engine, and a cycle would keep the store open after shutdown.
    joiner: OnceLock<std::sync::Weak<dyn Joiner>>,
    events: broadcast::Sender<Arc<TaskEvent>>,
    /// Notified when a campaign's task moved: the fleet's driver waits on this, not on every
    /// transition.
    campaign_moved: Notify,
    /// What other instances announce besides task transitions (campaign changes), for the
    /// fleet above.
    others: broadcast::Sender<Arc<Value>>,
    /// Names this instance in announcements, so it skips its own when they come back.
    origin: String,
    /// How this instance's announcements begin (`{"origin":"…",`), made once: the origin
    /// comes first so the instance skips its own, as they come back, without reading them.
    own_prefix: String,
    due_changed: Notify,
    /// When the timer will next look at the store unless woken: a task due earlier wakes it
    /// (`i64::MAX` while it is looking, so every change made meanwhile wakes it again).
    next_wake: AtomicI64,
    /// Shutdown: timers and imports stop when it fires and run on `work`.
    cancel: CancellationToken,
    work: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A task id: creation time (ms, 6 bytes) then 10 random bytes, in hex, so ids sort by
/// creation and cannot be guessed.
fn new_id(now_ms: i64) -> String {
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&now_ms.max(0).to_be_bytes()[2..]);
    getrandom::fill(&mut b[6..]).expect("system random source");
    hex::encode(b)
}

/// 128 random bits, base64url: the package URI's last segment.
fn new_capability() -> String {
    use base64::Engine as _;
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("system random source");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Compares without an early exit, so the time taken does not tell how much matched.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Runs a read-change-store step again, on a fresh read, while another writer (a concurrent
/// request, another instance) stored the task first.
async fn retried<T, F: Future<Output = Result<T, FotaError>>>(
    mut step: impl FnMut() -> F,
) -> Result<T, FotaError> {
    for _ in 0..STALE_RETRIES {
        match step().await {
            Err(FotaError::Stale(_)) => continue,
            other => return other,
        }
    }
    step().await
}

fn until(now: i64, at: i64) -> Duration {
    Duration::from_millis((at - now).max(0) as u64)
}

impl Engine {
    pub fn new(
        store: Arc<dyn MetaStore>,
        repo: Arc<Repository>,
        clock: Arc<dyn Clock>,
        config: FotaConfig,
        cancel: CancellationToken,
        work: TaskTracker,
    ) -> Engine {
        let origin = new_capability();
        let own_prefix = format!(
            "{{\"origin\":{},",
            serde_json::to_string(&origin).unwrap_or_default()
        );
        Engine {
            cancel,
            work,
            origin,
            own_prefix,
            importer: Importer::new(&config),
            store,
            repo,
            clock,
            config,
            bases: OnceLock::new(),
            package_tokens: AtomicBool::new(false),
            device_credentials: AtomicBool::new(false),
            locks: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            progress: Mutex::new(HashMap::new()),
            packages: Mutex::new(HashMap::new()),
            importing: Mutex::new(HashSet::new()),
            seen: Mutex::new(HashMap::new()),
            joiner: OnceLock::new(),
            events: broadcast::channel(EVENT_BUFFER).0,
            campaign_moved: Notify::new(),
            others: broadcast::channel(EVENT_BUFFER).0,
            due_changed: Notify::new(),
            next_wake: AtomicI64::new(i64::MAX),
        }
    }

    /// Sets the public bases of package URIs; the first call wins.
    pub fn set_bases(&self, bases: Vec<(&'static str, String)>) {
        let _ = self.bases.set(bases);
    }

    /// Requires each package URI's capability (`auth.package_tokens`).
    pub fn set_package_tokens(&self, on: bool) {
        self.package_tokens.store(on, Ordering::Relaxed);
    }

    pub fn package_tokens(&self) -> bool {
        self.package_tokens.load(Ordering::Relaxed)
    }

    pub fn set_device_credentials(&self, on: bool) {
        self.device_credentials.store(on, Ordering::Relaxed);
    }

    fn bases(&self) -> &[(&'static str, String)] {
        self.bases.get().map(Vec::as_slice).unwrap_or_default()
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The announcement of `event` to the other instances sharing the store, if any; the
    /// store sends it when, and in the transaction in which, it stores the task.
    fn announcement(&self, event: &TaskEvent) -> Option<String> {
        self.announce("event", event)
    }

    /// An announcement of `what` under `kind` (other than `event`, which is a task's) to the
    /// other instances sharing the store, if any; they receive it from
    /// [`Engine::others_announced`].
    pub fn announce(&self, kind: &str, what: &impl serde::Serialize) -> Option<String> {
        if !self.store.shared() {
            return None;
        }
        let what = serde_json::to_string(what).ok()?;
        let kind = serde_json::to_string(kind).ok()?;
        Some(format!("{}{kind}:{what}}}", self.own_prefix))
    }

    /// What other instances announce besides task transitions, as announced.
    pub fn others_announced(&self) -> broadcast::Receiver<Arc<Value>> {
        self.others.subscribe()
    }

    /// Passes on what other instances announce: their transitions reach this instance's
    /// subscribers, and a change of theirs may move a deadline this instance times.
    fn follow_others(self: &Arc<Self>) {
        let Some(mut announced) = self.store.announcements(self.cancel.clone()) else {
            return;
        };
        let this = Arc::clone(self);
        self.work.spawn(async move {
            while let Some(message) = announced.recv().await {
                if message.starts_with(&this.own_prefix) {
                    continue;
                }
                // Parsed once: a transition is read from the document itself, not a copy.
                let parsed = serde_json::from_str::<Value>(&message).and_then(|v| {
                    v.get("event")
                        .filter(|e| !e.is_null())
                        .map(<TaskEvent as serde::Deserialize>::deserialize)
                        .transpose()
                        .map(|event| (event, v))
                });
                match parsed {
                    Ok((Some(e), _)) => {
                        this.publish(e);
                        this.due_changed.notify_one();
                    }
                    Ok((None, other)) => {
                        let _ = this.others.send(Arc::new(other));
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable announcement"),
                }
            }
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TaskEvent>> {
        self.events.subscribe()
    }

    /// Passes a transition on to subscribers, and wakes the fleet's driver if the task is a
    /// campaign's. Most tasks are in no campaign: a driver woken by every transition cost a
    /// thread wake-up each, under load.
    pub(super) fn publish(&self, event: TaskEvent) {
        if event.campaign.is_some() {
            self.campaign_moved.notify_one();
        }
        let _ = self.events.send(Arc::new(event));
    }

    /// Completes once a campaign's task has moved since the last call completed (a move
    /// while nobody waited counts once).
    pub async fn campaign_task_moved(&self) {
        self.campaign_moved.notified().await
    }

    /// Forgets a campaign task's move that nobody waited for yet.
    pub fn forget_campaign_moves(&self) {
        std::pin::pin!(self.campaign_moved.notified()).enable();
    }

    async fn lock_task(&self, id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let h = id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        self.locks[h % STRIPES].lock().await
    }

    /// Restarts interrupted imports, follows what other instances announce and runs the timer
    /// until shutdown.
    pub async fn start(self: &Arc<Self>) -> Result<(), FotaError> {
        for task in self.store.importing().await? {
            self.spawn_import(task.id);
        }
        self.follow_others();
        let this = Arc::clone(self);
        self.work.spawn(async move { this.run_timers().await });
        let this = Arc::clone(self);
        self.work
            .spawn(async move { this.save_progress_every().await });
        Ok(())
    }

    /// Persists a changed task and everything that follows from the change. Refused when the
    /// stored task changed since `before` was read ([`FotaError::Stale`]; the step is run
    /// again on a fresh read) and when the change takes a quota slot none is left for
    /// ([`FotaError::QuotaFull`]).
    async fn commit(&self, before: &FotaTask, t: &mut FotaTask) -> Result<(), FotaError> {
        let unsaved = lock(&self.progress).get(&t.id).cloned();
        let folded = unsaved.as_ref().map_or(0, |p| p.swap(0, Ordering::Relaxed));
        t.bytes_served += folded;
        t.revision = before.revision + 1;
        let quota = (!before.holds_quota() && t.holds_quota()).then_some(self.config.quota);
        let transition =
            before.status != t.status || before.reason != t.reason || before.state != t.state;
        let event = transition.then(|| TaskEvent::of(t, self.now_ms()));
        let announce = event.as_ref().and_then(|e| self.announcement(e));
        let put = self
            .store
            .put_task(t, before.revision, quota, announce.as_deref())
            .await;
        if !matches!(put, Ok(Put::Stored)) {
            if let Some(p) = unsaved {
                p.fetch_add(folded, Ordering::Relaxed);
            }
            t.bytes_served -= folded;
            t.revision = before.revision;
            return Err(match put {
                Err(e) => e.into(),
                Ok(Put::QuotaFull) => FotaError::QuotaFull,
                Ok(_) => FotaError::Stale(t.id.clone()),
            });
        }
        lock(&self.packages).remove(&t.id);
        if !t.is_active() {
            lock(&self.progress).remove(&t.id);
            self.repo.task_ended();
        }
        if before.due_ms() != t.due_ms() {
            self.due_moved(t.due_ms());
        }
        if let Some(event) = event {
            self.publish(event);
            tracing::info!(
                fota_id = %t.id, device = %t.device_id, status = t.status.as_str(),
                reason = t.reason.as_deref().unwrap_or(""), "FOTA task"
            );
        }
        Ok(())
    }

    /// Bytes served to a task, including what is not yet stored.
    pub fn bytes_served(&self, t: &FotaTask) -> u64 {
        t.bytes_served
            + lock(&self.progress)
                .get(&t.id)
                .map_or(0, |p| p.load(Ordering::Relaxed))
    }

    pub async fn task(&self, id: &str) -> Result<FotaTask, FotaError> {
        self.store
            .get_task(id)
            .await?
            .ok_or_else(|| FotaError::NotFound(id.to_owned()))
    }

    /// A page of tasks, optionally of one device and in one status, and the next cursor.
    pub async fn list(
        &self,
        device: Option<&str>,
        status: Option<Status>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<FotaTask>, Option<String>), FotaError> {
        if let Some(d) = device {
            check_device(d)?;
        }
        let page = self.store.list_tasks(device, after, limit).await?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|t| t.id.clone()))
            .flatten();
        let tasks = page
            .into_iter()
            .filter(|t| status.is_none_or(|s| t.status == s))
            .collect();
        Ok((tasks, next))
    }
}

/// A stored schedule was checked when it was saved; one that no longer compiles (a time zone
/// gone from the system database) is treated as always open rather than blocking forever.
fn calendar(s: &Schedule) -> Calendar {
    s.calendar().unwrap_or_else(|e| {
        tracing::warn!(schedule = %s.name, error = %e, "schedule does not compile; treating it as always open");
        Calendar::always()
    })
}
