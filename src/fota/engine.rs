//! The engine behind the FOTA routes: every task change goes through `commit`, which stores
//! the task with its indexes only if nobody stored it since it was read (its revision), takes
//! a quota slot in the same store step, keeps the package cache in step, and publishes the
//! transition as an event. Several instances may share the store.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::clock::Clock;
use super::import::Importer;
use super::request::{RequestError, ScheduleRequest};
use super::schedule::{self, Calendar, Schedule, ScheduleError};
use super::task::{waiting, FotaTask, Report, Status, TaskOptions};
use super::view::TaskEvent;
use super::{check_device, FotaError};
use crate::config::FotaConfig;
use crate::firmware::{FirmwareError, Ingested, Repository, UploadRequest};
use crate::meta::{DeviceInfo, FirmwareRecord, MetaStore, Put};
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
    events: broadcast::Sender<Arc<TaskEvent>>,
    /// Names this instance in announcements, so it skips its own when they come back.
    origin: String,
    due_changed: Notify,
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
        Engine {
            cancel,
            work,
            origin: new_capability(),
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
            events: broadcast::channel(EVENT_BUFFER).0,
            due_changed: Notify::new(),
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

    /// Refuses a device that does not present the token its credential needs.
    async fn identify(&self, device: &str, presented: Option<&str>) -> Result<(), FotaError> {
        let required = self.device_credentials.load(Ordering::Relaxed);
        let credential = self.store.device_credential(device).await?;
        if crate::auth::device::admits(required, credential.as_ref(), presented) {
            return Ok(());
        }
        Err(FotaError::DeviceUnauthenticated {
            device: device.to_owned(),
            presented: presented.is_some(),
        })
    }

    /// Makes (or replaces) the device's token; the token is in this answer only.
    pub async fn issue_device_token(
        &self,
        device: &str,
    ) -> Result<(String, crate::meta::DeviceCredential), FotaError> {
        check_device(device)?;
        let (token, credential) = crate::auth::device::mint(device).map_err(|e| {
            FotaError::Meta(crate::meta::MetaError::Backend(format!("random: {e}")))
        })?;
        self.store.put_device_credential(&credential).await?;
        Ok((token, credential))
    }

    /// Removes the device's token; `false` when it had none.
    pub async fn revoke_device_token(&self, device: &str) -> Result<bool, FotaError> {
        check_device(device)?;
        Ok(self.store.remove_device_credential(device).await?)
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
        self.store
            .shared()
            .then(|| json!({"origin": self.origin, "event": event}).to_string())
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
                #[derive(serde::Deserialize)]
                struct Announcement {
                    origin: String,
                    event: TaskEvent,
                }
                match serde_json::from_str::<Announcement>(&message) {
                    Ok(a) if a.origin == this.origin => {}
                    Ok(a) => {
                        let _ = this.events.send(Arc::new(a.event));
                        this.due_changed.notify_one();
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable FOTA announcement"),
                }
            }
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TaskEvent>> {
        self.events.subscribe()
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

    /// Stores the bytes served per task every `fota.progress_save` until shutdown (the last
    /// save comes from [`Engine::save_progress`] once serving has stopped).
    async fn save_progress_every(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(self.config.progress_save.0) => {}
            }
            self.save_progress().await;
        }
    }

    /// Stores the bytes served to each task that are not stored yet, and forgets the counters
    /// of tasks that ended (here or on another instance) and nothing serves any more.
    pub async fn save_progress(&self) {
        let unsaved: Vec<String> = lock(&self.progress)
            .iter()
            .filter(|(_, p)| p.load(Ordering::Relaxed) > 0)
            .map(|(id, _)| id.clone())
            .collect();
        for id in unsaved {
            if let Err(e) = retried(|| self.save_progress_of(&id)).await {
                tracing::warn!(fota_id = %id, error = %e, "FOTA progress not stored");
            }
        }
        lock(&self.packages).retain(|_, (_, at)| at.elapsed() < PACKAGE_TTL);
        // A counter only this map holds (no cached package, no download in flight) and
        // with nothing unsaved can go; the next download of the task makes a new one.
        lock(&self.progress)
            .retain(|_, p| Arc::strong_count(p) > 1 || p.load(Ordering::Relaxed) > 0);
    }

    async fn save_progress_of(&self, id: &str) -> Result<(), FotaError> {
        let _g = self.lock_task(id).await;
        let unsaved = lock(&self.progress)
            .get(id)
            .map_or(0, |p| p.load(Ordering::Relaxed));
        if unsaved == 0 {
            return Ok(());
        }
        match self.store.get_task(id).await? {
            Some(mut t) if t.is_active() => {
                let before = t.clone();
                self.commit(&before, &mut t).await
            }
            // Ended elsewhere: the outcome is stored, and so are the bytes that counted.
            _ => {
                lock(&self.progress).remove(id);
                lock(&self.packages).remove(id);
                Ok(())
            }
        }
    }

    async fn run_timers(self: Arc<Self>) {
        let cancel = self.cancel.clone();
        loop {
            let changed = self.due_changed.notified();
            let now = self.clock.now_ms();
            let mut next = match self.tick(now).await {
                Ok(next) => next.unwrap_or(now + 3_600_000),
                Err(e) => {
                    tracing::warn!(error = %e, "FOTA timer pass failed");
                    now + RETRY_AFTER.as_millis() as i64
                }
            };
            if self.store.shared() {
                // Other instances set deadlines and windows this one is not told of.
                next = next.min(now + self.config.shared_timer_poll.0.as_millis() as i64);
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = changed => {}
                _ = self.clock.sleep_until(next) => {}
            }
        }
    }

    /// Handles every task due by `now`; returns when the next one is due.
    async fn tick(self: &Arc<Self>, now: i64) -> Result<Option<i64>, FotaError> {
        loop {
            let batch = self.store.due(now, DUE_BATCH).await?;
            for task in &batch {
                retried(|| self.on_due(&task.id, now)).await?;
            }
            if batch.len() < DUE_BATCH {
                break;
            }
        }
        Ok(self.store.next_due().await?)
    }

    async fn on_due(self: &Arc<Self>, id: &str, now: i64) -> Result<(), FotaError> {
        let _g = self.lock_task(id).await;
        let Some(mut t) = self.store.get_task(id).await? else {
            return Ok(());
        };
        if t.is_importing() {
            // The lease on the import ran out: this instance's is renewed, another's is
            // taken over.
            drop(_g);
            if self.claim_import(id).await? {
                self.spawn_import(id.to_owned());
            }
            return Ok(());
        }
        let before = t.clone();
        if t.deadline_ms.is_some_and(|d| d <= now) {
            t.set(Status::Failed, Some("timeout"), now);
        } else if t.wake_ms.is_some_and(|w| w <= now) {
            t.wake_ms = None;
            if t.status == Status::Pending {
                let cal = calendar(&t.options.schedule);
                if cal.is_open(now) {
                    t.set(Status::Pending, Some(waiting::DEVICE), now);
                } else {
                    t.wake_ms = cal.next_open(now);
                    if t.reason.as_deref() != Some(waiting::WINDOW) {
                        t.pause_clock(now);
                        t.set(Status::Pending, Some(waiting::WINDOW), now);
                    }
                }
            }
        } else {
            return Ok(());
        }
        self.commit(&before, &mut t).await
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
            // Expired firmware this task kept alive may go now.
            self.repo.expiry_changed.notify_one();
        }
        if before.due_ms() != t.due_ms() {
            self.due_changed.notify_one();
        }
        if let Some(event) = event {
            let _ = self.events.send(Arc::new(event));
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

    /// The schedule named in a request: built in, or stored.
    async fn find_schedule(&self, name: &str) -> Result<Schedule, FotaError> {
        if let Some(s) = schedule::built_in(name) {
            return Ok(s);
        }
        self.store.get_schedule(name).await?.ok_or_else(|| {
            RequestError::Meaningless {
                field: "schedule",
                message: format!("no schedule named {name:?}"),
            }
            .into()
        })
    }

    fn served_protocols(&self) -> String {
        self.bases()
            .iter()
            .filter_map(|(scheme, _)| super::request::Protocol::of_scheme(scheme))
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether the device already runs the firmware, by what it last reported.
    async fn runs_already(
        &self,
        device: &str,
        record: &FirmwareRecord,
    ) -> Result<Option<String>, FotaError> {
        let (Some(want_name), Some(want_version)) = (&record.description, &record.version) else {
            return Ok(None);
        };
        let Some(info) = self.store.get_device(device).await? else {
            return Ok(None);
        };
        Ok(
            (info.pkg_name.as_ref() == Some(want_name)
                && info.pkg_version.as_ref() == Some(want_version))
            .then(|| {
                format!("device reported {want_name} {want_version} already (useCachedData); nothing to download")
            }),
        )
    }

    /// Creates a task from the seed's `scheduleFirmwareUpdate` payload.
    pub async fn schedule(
        self: &Arc<Self>,
        device: &str,
        body: &Value,
    ) -> Result<FotaTask, FotaError> {
        check_device(device)?;
        let req = ScheduleRequest::parse(body)?;
        let scheme = req.protocol.scheme();
        let base = self
            .bases()
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, b)| b.clone())
            .ok_or_else(|| FotaError::ProtocolNotServed {
                requested: req.protocol.name(),
                served: self.served_protocols(),
            })?;
        let sched = self.find_schedule(&req.schedule).await?;
        if let Some(active) = self.store.active_task(device).await? {
            return Err(FotaError::DeviceBusy {
                device: device.to_owned(),
                fota_id: active,
            });
        }
        let record = match self.repo.resolve(&req.name).await {
            Ok(r) => Some(r),
            Err(FirmwareError::NotFound(_)) if req.firmware_url.is_some() => None,
            Err(FirmwareError::NotFound(n)) => return Err(FotaError::NoFirmware(n)),
            Err(e) => return Err(e.into()),
        };
        let now = self.now_ms();
        let id = new_id(now);
        let capability = new_capability();
        let mut t = FotaTask {
            package_uri: format!("{base}/p/{id}/{capability}"),
            capability,
            id,
            device_id: device.to_owned(),
            firmware: req.name.to_string(),
            options: TaskOptions {
                timeout_ms: req.timeout.as_millis() as i64,
                protocol: req.protocol,
                firmware_url: req.firmware_url.as_ref().map(|u| u.to_string()),
                retention_secs: req.retention.map(|d| d.as_secs()),
                description: req.description.clone(),
                use_quota: req.use_quota,
                use_cached_data: req.use_cached_data,
                resume_after_downlink_failure: req.resume_after_downlink_failure,
                upgrade_strategy: req.upgrade_strategy,
                schedule: sched,
            },
            status: Status::Pending,
            reason: None,
            note: None,
            state: 0,
            update_result: 0,
            bytes_served: 0,
            size: record.as_ref().map(|r| r.size),
            created_ms: now,
            started_ms: None,
            finished_ms: None,
            deadline_ms: None,
            remaining_ms: None,
            wake_ms: None,
            import_owner: None,
            history: Vec::new(),
            revision: 0,
        };
        match &record {
            None => t.set(Status::Pending, Some(waiting::IMPORT), now),
            Some(r) => match self.cached(&t, r).await? {
                Some(note) => {
                    t.note = Some(note);
                    t.update_result = 1;
                    t.set(Status::Succeeded, Some("cached-data"), now);
                }
                None => self.place(&mut t, now),
            },
        }
        let event = TaskEvent::of(&t, now);
        let announce = self.announcement(&event);
        if let Some(active) = self.store.create_task(&t, announce.as_deref()).await? {
            return Err(FotaError::DeviceBusy {
                device: device.to_owned(),
                fota_id: active,
            });
        }
        let _ = self.events.send(Arc::new(event));
        tracing::info!(fota_id = %t.id, device, firmware = %t.firmware, status = t.status.as_str(), "FOTA task scheduled");
        if t.is_importing() {
            self.spawn_import(t.id.clone());
        }
        if t.due_ms().is_some() {
            self.due_changed.notify_one();
        }
        Ok(t)
    }

    async fn cached(&self, t: &FotaTask, r: &FirmwareRecord) -> Result<Option<String>, FotaError> {
        if !t.options.use_cached_data {
            return Ok(None);
        }
        self.runs_already(&t.device_id, r).await
    }

    /// A task whose firmware is ready waits for its window or for the device.
    fn place(&self, t: &mut FotaTask, now: i64) {
        let cal = calendar(&t.options.schedule);
        if cal.is_open(now) {
            t.set(Status::Pending, Some(waiting::DEVICE), now);
        } else {
            t.wake_ms = cal.next_open(now);
            t.set(Status::Pending, Some(waiting::WINDOW), now);
        }
    }

    /// Imports a task's firmware on this instance, if it can claim the import: imports are
    /// leased (`fota.import_lease`) so that instances sharing the store fetch each at most
    /// once at a time, and one whose holder stopped renewing is taken over.
    fn spawn_import(self: &Arc<Self>, id: String) {
        if !lock(&self.importing).insert(id.clone()) {
            return;
        }
        let this = Arc::clone(self);
        self.work.spawn(async move {
            let outcome = match retried(|| this.claim_import(&id)).await {
                Ok(true) => tokio::select! {
                    // At shutdown the import is dropped (nothing is committed) and handed
                    // back: another instance, or the next start, fetches it again.
                    _ = this.cancel.cancelled() => retried(|| this.release_import(&id)).await,
                    r = this.run_import(&id) => r,
                    () = this.hold_import(&id) => Ok(()),
                },
                other => other.map(|_| ()),
            };
            if let Err(e) = outcome {
                tracing::warn!(fota_id = %id, error = %e, "FOTA import could not be recorded");
            }
            lock(&this.importing).remove(&id);
        });
    }

    /// Takes or renews the lease on a task's import; whether this instance holds it now.
    /// Another instance's lease is respected until it runs out.
    async fn claim_import(&self, id: &str) -> Result<bool, FotaError> {
        let _g = self.lock_task(id).await;
        let Some(mut t) = self.store.get_task(id).await? else {
            return Ok(false);
        };
        let now = self.now_ms();
        let mine = self.holds_import(&t);
        let lapsed = t.wake_ms.is_none_or(|w| w <= now);
        if !t.is_importing() || (!mine && !lapsed && self.store.shared()) {
            return Ok(false);
        }
        let before = t.clone();
        t.import_owner = Some(self.origin.clone());
        t.wake_ms = Some(now + self.config.import_lease.0.as_millis() as i64);
        self.commit(&before, &mut t).await?;
        Ok(true)
    }

    /// Renews the lease on an import while it runs; returns when it is lost (taken over, or
    /// the task no longer imports, as when it is cancelled).
    async fn hold_import(&self, id: &str) {
        loop {
            tokio::time::sleep(self.config.import_lease.0 / 3).await;
            match retried(|| self.claim_import(id)).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(fota_id = %id, "FOTA import no longer held here; stopped");
                    return;
                }
                Err(e) => {
                    tracing::warn!(fota_id = %id, error = %e, "FOTA import lease not renewed")
                }
            }
        }
    }

    /// The task, locked, while it imports under this instance's lease.
    async fn own_import(
        &self,
        id: &str,
    ) -> Result<Option<(tokio::sync::MutexGuard<'_, ()>, FotaTask)>, FotaError> {
        let g = self.lock_task(id).await;
        let t = self.store.get_task(id).await?;
        Ok(t.filter(|t| t.is_importing() && self.holds_import(t))
            .map(|t| (g, t)))
    }

    fn holds_import(&self, t: &FotaTask) -> bool {
        t.import_owner.as_deref() == Some(self.origin.as_str())
    }

    /// Gives an import this instance holds back, for anyone to take at once.
    async fn release_import(&self, id: &str) -> Result<(), FotaError> {
        let Some((_g, mut t)) = self.own_import(id).await? else {
            return Ok(());
        };
        let before = t.clone();
        t.import_owner = None;
        t.wake_ms = Some(self.now_ms());
        self.commit(&before, &mut t).await
    }

    async fn run_import(&self, id: &str) -> Result<(), FotaError> {
        let Some(t) = self.store.get_task(id).await? else {
            return Ok(());
        };
        let url = t.options.firmware_url.as_deref().unwrap_or_default();
        let outcome = match (FirmwareName::parse(&t.firmware), url::Url::parse(url)) {
            (Ok(name), Ok(url)) => {
                let description = Some(t.options.description.clone()).filter(|d| !d.is_empty());
                let retention = t.options.retention_secs.map(Duration::from_secs);
                self.import(&name, &url, retention, description, None)
                    .await
                    .map(|i| match i {
                        Ingested::Created(r) | Ingested::Existing(r) => r,
                    })
            }
            _ => Err(FotaError::NoFirmware(t.firmware.clone())),
        };
        let outcome = outcome.map_err(|e| {
            tracing::warn!(fota_id = %id, error = %e, "FOTA import failed");
            e.to_string()
        });
        retried(|| self.finish_import(id, &outcome)).await
    }

    /// Records an import's outcome in its task.
    async fn finish_import(
        &self,
        id: &str,
        outcome: &Result<FirmwareRecord, String>,
    ) -> Result<(), FotaError> {
        // Unless another instance took the import over: then its outcome counts.
        let Some((_g, mut t)) = self.own_import(id).await? else {
            return Ok(());
        };
        let before = t.clone();
        let now = self.now_ms();
        t.import_owner = None;
        t.wake_ms = None;
        match outcome {
            Ok(record) => {
                t.size = Some(record.size);
                match self.cached(&t, record).await? {
                    Some(note) => {
                        t.note = Some(note);
                        t.update_result = 1;
                        t.set(Status::Succeeded, Some("cached-data"), now);
                    }
                    None => self.place(&mut t, now),
                }
            }
            Err(e) => {
                t.note = Some(e.clone());
                t.set(Status::Failed, Some("import-failed"), now);
            }
        }
        self.commit(&before, &mut t).await
    }

    /// Downloads `url` into the repository under `name`, unless the name is stored already.
    pub async fn import(
        &self,
        name: &FirmwareName,
        url: &url::Url,
        retention: Option<Duration>,
        description: Option<String>,
        version: Option<String>,
    ) -> Result<Ingested, FotaError> {
        if let Ok(r) = self.repo.resolve(name).await {
            return Ok(Ingested::Existing(FirmwareRecord::clone(&r)));
        }
        let resp = self.importer.fetch(url).await?;
        let req = UploadRequest {
            retention,
            description,
            version,
            content_length: resp.content_length(),
            ..UploadRequest::default()
        };
        let body = futures_util::TryStreamExt::map_err(resp.bytes_stream(), |e| {
            super::import::classify(url, e)
        });
        Ok(self.repo.ingest(name, req, body).await?)
    }

    /// What the device should do now.
    /// The device's work; `credential` is the device token it presented.
    pub async fn work(&self, device: &str, credential: Option<&str>) -> Result<Work, FotaError> {
        check_device(device)?;
        self.identify(device, credential).await?;
        retried(|| self.work_once(device)).await
    }

    async fn work_once(&self, device: &str) -> Result<Work, FotaError> {
        let poll = self.config.poll_interval.0;
        let Some(id) = self.store.active_task(device).await? else {
            return Ok(Work::Nothing { retry_after: poll });
        };
        let _g = self.lock_task(&id).await;
        let Some(mut t) = self.store.get_task(&id).await? else {
            return Ok(Work::Nothing { retry_after: poll });
        };
        let now = self.now_ms();
        if t.status.is_final() {
            return Ok(Work::Nothing { retry_after: poll });
        }
        let record = match self.repo.resolve_any(&t.firmware).await {
            Ok(r) => r,
            Err(FirmwareError::NotFound(_)) if t.is_importing() => {
                return Ok(Work::Nothing {
                    retry_after: IMPORT_RETRY,
                })
            }
            Err(FirmwareError::NotFound(_)) => {
                let before = t.clone();
                t.note = Some(format!("firmware {:?} was deleted", t.firmware));
                t.set(Status::Failed, Some("firmware-missing"), now);
                self.commit(&before, &mut t).await?;
                return Ok(Work::Nothing { retry_after: poll });
            }
            Err(e) => return Err(e.into()),
        };
        if t.status.is_started() {
            return Ok(Work::Task {
                task: Box::new(t),
                record,
            });
        }
        if t.is_importing() {
            return Ok(Work::Nothing {
                retry_after: IMPORT_RETRY,
            });
        }
        let before = t.clone();
        if let Some(wake) = t
            .wake_ms
            .filter(|w| *w > now && t.reason.as_deref() == Some(waiting::DEFERRED))
        {
            return Ok(Work::Nothing {
                retry_after: until(now, wake),
            });
        }
        if let Some(note) = self.cached(&t, &record).await? {
            t.note = Some(note);
            t.update_result = 1;
            t.set(Status::Succeeded, Some("cached-data"), now);
            self.commit(&before, &mut t).await?;
            return Ok(Work::Nothing { retry_after: poll });
        }
        let cal = calendar(&t.options.schedule);
        if !cal.is_open(now) {
            t.pause_clock(now);
            t.wake_ms = cal.next_open(now);
            if t.reason.as_deref() != Some(waiting::WINDOW) {
                t.set(Status::Pending, Some(waiting::WINDOW), now);
            }
            let retry_after = t.wake_ms.map_or(poll, |w| until(now, w));
            if t != before {
                self.commit(&before, &mut t).await?;
            }
            return Ok(Work::Nothing { retry_after });
        }
        t.size = Some(record.size);
        t.deliver(now);
        match self.commit(&before, &mut t).await {
            Ok(()) => Ok(Work::Task {
                task: Box::new(t),
                record,
            }),
            Err(FotaError::QuotaFull) => {
                let mut t = before.clone();
                t.pause_clock(now);
                if t.reason.as_deref() != Some(waiting::QUOTA) {
                    t.set(Status::Pending, Some(waiting::QUOTA), now);
                }
                if t != before {
                    self.commit(&before, &mut t).await?;
                }
                Ok(Work::Nothing { retry_after: poll })
            }
            Err(e) => Err(e),
        }
    }

    /// Applies a device report.
    /// A report on task `id`, from the device that owns it: `credential` is the device token
    /// it presented.
    pub async fn report(
        &self,
        id: &str,
        report: &Report,
        credential: Option<&str>,
    ) -> Result<FotaTask, FotaError> {
        let t = self
            .store
            .get_task(id)
            .await?
            .ok_or_else(|| FotaError::NotFound(id.to_owned()))?;
        self.identify(&t.device_id, credential).await?;
        retried(|| self.report_once(id, report)).await
    }

    async fn report_once(&self, id: &str, report: &Report) -> Result<FotaTask, FotaError> {
        let _g = self.lock_task(id).await;
        let mut t = self
            .store
            .get_task(id)
            .await?
            .ok_or_else(|| FotaError::NotFound(id.to_owned()))?;
        let before = t.clone();
        let now = self.now_ms();
        let deferred_until = now.saturating_add(self.config.deferred_retry.0.as_millis() as i64);
        t.apply(report, deferred_until, now)?;
        if report.pkg_name.is_some() || report.pkg_version.is_some() {
            self.store
                .put_device(&DeviceInfo {
                    device_id: t.device_id.clone(),
                    pkg_name: report.pkg_name.clone(),
                    pkg_version: report.pkg_version.clone(),
                    reported_ms: now,
                })
                .await?;
        }
        if t != before {
            self.commit(&before, &mut t).await?;
        }
        Ok(t)
    }

    /// Cancels a task that has not reached `updating`.
    pub async fn cancel(&self, id: &str) -> Result<FotaTask, FotaError> {
        retried(|| self.cancel_once(id)).await
    }

    async fn cancel_once(&self, id: &str) -> Result<FotaTask, FotaError> {
        let _g = self.lock_task(id).await;
        let mut t = self
            .store
            .get_task(id)
            .await?
            .ok_or_else(|| FotaError::NotFound(id.to_owned()))?;
        let before = t.clone();
        t.cancel(self.now_ms())?;
        self.commit(&before, &mut t).await?;
        Ok(t)
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

    /// A wrong token is always refused; a missing one only with `auth.package_tokens`.
    fn check_capability(&self, capability: &str, token: Option<&str>) -> Result<(), FotaError> {
        match token {
            Some(t) if !capability.is_empty() && same_secret(t, capability) => Ok(()),
            Some(_) => Err(FotaError::PackageToken),
            None if self.package_tokens() => Err(FotaError::PackageToken),
            None => Ok(()),
        }
    }

    /// The firmware behind a task's package URI. A request for bytes moves a task that was
    /// just delivered to `downloading`.
    pub async fn package(
        &self,
        id: &str,
        token: Option<&str>,
        for_bytes: bool,
    ) -> Result<Arc<Package>, FotaError> {
        retried(|| self.package_once(id, token, for_bytes)).await
    }

    async fn package_once(
        &self,
        id: &str,
        token: Option<&str>,
        for_bytes: bool,
    ) -> Result<Arc<Package>, FotaError> {
        let cached = lock(&self.packages)
            .get(id)
            .filter(|(_, at)| at.elapsed() < PACKAGE_TTL)
            .map(|(p, _)| Arc::clone(p));
        if let Some(p) = cached {
            self.check_capability(&p.capability, token)?;
            return Ok(p);
        }
        let mut t = self.task(id).await?;
        self.check_capability(&t.capability, token)?;
        if !t.status.is_started() {
            return Err(FotaError::PackageUnavailable(
                id.to_owned(),
                t.status.as_str(),
            ));
        }
        if t.status == Status::Delivering && for_bytes {
            let _g = self.lock_task(id).await;
            t = self.task(id).await?;
            if t.status == Status::Delivering {
                let before = t.clone();
                let now = self.now_ms();
                t.set(Status::Downloading, None, now);
                self.commit(&before, &mut t).await?;
            }
        }
        let record = self.repo.resolve_any(&t.firmware).await?;
        let progress = Arc::clone(
            lock(&self.progress)
                .entry(t.id.clone())
                .or_insert_with(|| Arc::new(AtomicU64::new(0))),
        );
        let p = Arc::new(Package {
            capability: t.capability.clone(),
            task_id: t.id.clone(),
            record,
            progress,
        });
        if t.status != Status::Delivering {
            let mut cache = lock(&self.packages);
            if cache.len() >= 10_000 {
                cache.clear();
            }
            cache.insert(t.id, (Arc::clone(&p), Instant::now()));
        }
        Ok(p)
    }

    /// Every schedule: the built-in ones, then the stored ones.
    pub async fn schedules(&self) -> Result<Vec<Schedule>, FotaError> {
        let mut all = schedule::built_ins();
        all.extend(self.store.list_schedules().await?);
        Ok(all)
    }

    pub async fn get_schedule(&self, name: &str) -> Result<Schedule, FotaError> {
        if let Some(s) = schedule::built_in(name) {
            return Ok(s);
        }
        self.store
            .get_schedule(name)
            .await?
            .ok_or_else(|| ScheduleError::NotFound(name.to_owned()).into())
    }

    /// Creates or replaces a user-defined schedule. Tasks keep the schedule they were created
    /// with.
    pub async fn put_schedule(&self, name: &str, mut s: Schedule) -> Result<Schedule, FotaError> {
        schedule::check_name(name)?;
        if schedule::built_in(name).is_some() {
            return Err(ScheduleError::BuiltIn(name.to_owned()).into());
        }
        s.name = name.to_owned();
        s.built_in = false;
        s.check()?;
        self.store.put_schedule(&s).await?;
        Ok(s)
    }

    pub async fn delete_schedule(&self, name: &str) -> Result<(), FotaError> {
        if schedule::built_in(name).is_some() {
            return Err(ScheduleError::BuiltIn(name.to_owned()).into());
        }
        if self.store.delete_schedule(name).await? {
            Ok(())
        } else {
            Err(ScheduleError::NotFound(name.to_owned()).into())
        }
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
