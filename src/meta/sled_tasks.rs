//! FOTA tasks and schedules in sled. A task is one key in `fota_tasks`, written alone; what the
//! engine looks tasks up by lives in memory (`LiveTasks`), rebuilt from the tasks at open and
//! moved under one lock with every task write. In sled, every multi-key transaction seals and
//! writes its log buffer twice and wakes its whole I/O pool, which made index keys beside
//! each task cost more than the rest of a FOTA request (bench/all.sh fota-sled).
//!
//! A task a campaign released changes with its campaign member and counts in one transaction
//! over `fota_tasks` and `fleet`, so members never disagree with their tasks.
//!
//! `fota_index` keeps `v` device ‖ 0 ‖ id for every task of a device (listing a device's
//! tasks), written once, before its task. Index keys of other kinds are from earlier versions
//! and are removed at open.

use std::sync::MutexGuard;

use async_trait::async_trait;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

use super::live_tasks::LiveTasks;
use super::sled_fleet::{get_member, put_member};
use super::sled_store::{backend, SledStore};
use super::{Created, MetaError, Put, ScheduleStore, TaskStore};
use crate::model::campaign::member;
use crate::model::schedule::Schedule;
use crate::model::task::FotaTask;

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, MetaError> {
    serde_json::from_slice(value).map_err(|e| MetaError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

/// The `fota_index` key listing task `id` under its device.
fn device_key(device: &str, id: &str) -> Vec<u8> {
    [b"v", device.as_bytes(), &[0], id.as_bytes()].concat()
}

/// Moves the member a campaign task's change moves (`Member::following`).
fn follow<T>(
    fleet: &TransactionalTree,
    task: &FotaTask,
) -> Result<(), ConflictableTransactionError<T>> {
    let Some(link) = &task.campaign else {
        return Ok(());
    };
    let Some(old) = get_member(fleet, &link.id, &task.device_id)? else {
        return Ok(());
    };
    if let Some(new) = old.following(task) {
        put_member(fleet, &link.id, Some(&old), &new)?;
    }
    Ok(())
}

impl SledStore {
    /// The index of tasks under way, from every stored task; index keys of earlier versions
    /// other than `v` go.
    pub(super) fn rebuild_live_tasks(
        tasks: &sled::Tree,
        index: &sled::Tree,
    ) -> Result<LiveTasks, MetaError> {
        for kind in [b'a', b'd', b'q', b'i', b'f'] {
            for item in index.scan_prefix([kind]) {
                let (k, _) = item.map_err(backend)?;
                index.remove(k).map_err(backend)?;
            }
        }
        let mut live = LiveTasks::default();
        for item in tasks.iter() {
            let (k, v) = item.map_err(backend)?;
            live.apply(&decode::<FotaTask>(&k, &v)?);
        }
        Ok(live)
    }

    fn live(&self) -> MutexGuard<'_, LiveTasks> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes a task a campaign released with its member and counts, over the tasks, the
    /// task index and the fleet; `Abort(r)` returns `r`.
    fn transact_campaign<T>(
        &self,
        f: impl Fn(
            &TransactionalTree,
            &TransactionalTree,
            &TransactionalTree,
        ) -> Result<T, ConflictableTransactionError<T>>,
    ) -> Result<T, MetaError> {
        let _one = self.fleet_gate.lock().unwrap_or_else(|e| e.into_inner());
        match (&self.tasks, &self.task_index, &self.fleet).transaction(|(t, i, f2)| f(t, i, f2)) {
            Ok(v) | Err(TransactionError::Abort(v)) => Ok(v),
            Err(TransactionError::Storage(e)) => Err(backend(e)),
        }
    }

    fn load(&self, id: &[u8]) -> Result<Option<FotaTask>, MetaError> {
        self.tasks
            .get(id)
            .map_err(backend)?
            .map(|v| decode(id, &v))
            .transpose()
    }

    fn load_all(&self, ids: Vec<String>) -> Result<Vec<FotaTask>, MetaError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(self.load(id.as_bytes())?);
        }
        Ok(out)
    }

    /// Stores a new task under the held index lock, unless its device has an active one.
    fn create(
        &self,
        live: &mut LiveTasks,
        task: &FotaTask,
        json: &[u8],
    ) -> Result<Created, MetaError> {
        let busy = live.active(&task.device_id).map(str::to_owned);
        let listed = device_key(&task.device_id, &task.id);
        let created = match &task.campaign {
            None => match busy {
                Some(id) => Created::DeviceBusy(id),
                None => {
                    // The listing key first: a crash between the two leaves a key naming no
                    // task, which listing skips, never a task its device does not list.
                    self.task_index.insert(listed, &[]).map_err(backend)?;
                    self.tasks
                        .insert(task.id.as_bytes(), json)
                        .map_err(backend)?;
                    Created::Stored
                }
            },
            Some(link) => self.transact_campaign(|t, i, f| {
                let old = get_member(f, &link.id, &task.device_id)?;
                let Some(old) =
                    old.filter(|m| m.status == member::WAITING || m.status == member::SKIPPED)
                else {
                    return Err(ConflictableTransactionError::Abort(Created::MemberTaken));
                };
                if let Some(id) = &busy {
                    return Err(ConflictableTransactionError::Abort(Created::DeviceBusy(
                        id.clone(),
                    )));
                }
                put_member(f, &link.id, Some(&old), &old.released_to(task))?;
                i.insert(listed.as_slice(), &[])?;
                t.insert(task.id.as_bytes(), json)?;
                Ok(Created::Stored)
            })?,
        };
        if created == Created::Stored {
            live.apply(task);
        }
        Ok(created)
    }

    /// Replaces a task still at revision `expected`, under the held index lock.
    fn put(
        &self,
        live: &mut LiveTasks,
        task: &FotaTask,
        expected: u64,
        quota: Option<u64>,
        json: &[u8],
    ) -> Result<Put, MetaError> {
        if quota.is_some_and(|limit| live.quota_holders() >= limit) {
            return Ok(Put::QuotaFull);
        }
        // An active task's revision is in the index (kept under this lock); only a finished
        // one is read back.
        let revision = match live.revision(&task.id) {
            Some(r) => r,
            None => self.load(task.id.as_bytes())?.map_or(0, |o| o.revision),
        };
        if revision != expected {
            return Ok(Put::Stale);
        }
        match &task.campaign {
            None => {
                self.tasks
                    .insert(task.id.as_bytes(), json)
                    .map_err(backend)?;
            }
            Some(_) => self.transact_campaign(|t, _, f| {
                t.insert(task.id.as_bytes(), json)?;
                follow(f, task)?;
                Ok(())
            })?,
        }
        live.apply(task);
        Ok(Put::Stored)
    }
}

#[async_trait]
impl TaskStore for SledStore {
    async fn create_task(
        &self,
        task: &FotaTask,
        _announce: Option<&str>,
    ) -> Result<Created, MetaError> {
        let json = serde_json::to_vec(task).map_err(backend)?;
        let created = self.point(|s| s.create(&mut s.live(), task, &json)).await?;
        if created == Created::Stored {
            self.flush().await?;
        }
        Ok(created)
    }

    async fn get_task(&self, id: &str) -> Result<Option<FotaTask>, MetaError> {
        self.point(|s| s.load(id.as_bytes())).await
    }

    async fn put_task(
        &self,
        task: &FotaTask,
        expected: u64,
        quota: Option<u64>,
        _announce: Option<&str>,
    ) -> Result<Put, MetaError> {
        let json = serde_json::to_vec(task).map_err(backend)?;
        let put = self
            .point(|s| s.put(&mut s.live(), task, expected, quota, &json))
            .await?;
        if put == Put::Stored {
            self.flush().await?;
        }
        Ok(put)
    }

    async fn active_task(&self, device_id: &str) -> Result<Option<String>, MetaError> {
        Ok(self.live().active(device_id).map(str::to_owned))
    }

    async fn list_tasks(
        &self,
        device_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FotaTask>, MetaError> {
        let (device_id, after) = (device_id.map(str::to_owned), after.map(str::to_owned));
        self.blocking(move |s| {
            let mut out = Vec::new();
            let mut start = after.map(|a| [a.as_bytes(), &[0]].concat());
            match device_id {
                Some(d) => {
                    let prefix = device_key(&d, "");
                    let from = [
                        prefix.as_slice(),
                        start.take().unwrap_or_default().as_slice(),
                    ]
                    .concat();
                    for item in s.task_index.range(from..) {
                        let (k, _) = item.map_err(backend)?;
                        if !k.starts_with(&prefix) || out.len() >= limit {
                            break;
                        }
                        // A key written just before a crash may name a task never stored.
                        if let Some(t) = s.load(&k[prefix.len()..])? {
                            out.push(t);
                        }
                    }
                }
                None => {
                    for item in s.tasks.range(start.unwrap_or_default()..).take(limit) {
                        let (k, v) = item.map_err(backend)?;
                        out.push(decode(&k, &v)?);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn next_due(&self) -> Result<Option<i64>, MetaError> {
        Ok(self.live().next_due())
    }

    async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<FotaTask>, MetaError> {
        let ids = self.live().due(now_ms, limit);
        self.blocking(move |s| s.load_all(ids)).await
    }

    async fn quota_holders(&self) -> Result<u64, MetaError> {
        Ok(self.live().quota_holders())
    }

    async fn importing(&self) -> Result<Vec<FotaTask>, MetaError> {
        let ids = self.live().importing();
        self.blocking(move |s| s.load_all(ids)).await
    }

    async fn firmware_in_use(&self, name: &str) -> Result<bool, MetaError> {
        Ok(self.live().firmware_in_use(name))
    }
}

#[async_trait]
impl ScheduleStore for SledStore {
    async fn get_schedule(&self, name: &str) -> Result<Option<Schedule>, MetaError> {
        let name = name.to_owned();
        self.point(move |s| {
            s.schedules
                .get(name.as_bytes())
                .map_err(backend)?
                .map(|v| decode(name.as_bytes(), &v))
                .transpose()
        })
        .await
    }

    async fn put_schedule(&self, schedule: &Schedule) -> Result<(), MetaError> {
        let json = serde_json::to_vec(schedule).map_err(backend)?;
        let name = schedule.name.clone();
        self.blocking(move |s| {
            s.schedules.insert(name.as_bytes(), json).map_err(backend)?;
            Ok(())
        })
        .await?;
        self.flush().await
    }

    async fn list_schedules(&self) -> Result<Vec<Schedule>, MetaError> {
        self.blocking(|s| {
            s.schedules
                .iter()
                .map(|item| {
                    let (k, v) = item.map_err(backend)?;
                    decode(&k, &v)
                })
                .collect()
        })
        .await
    }

    async fn delete_schedule(&self, name: &str) -> Result<bool, MetaError> {
        let name = name.to_owned();
        let removed = self
            .blocking(move |s| {
                Ok(s.schedules
                    .remove(name.as_bytes())
                    .map_err(backend)?
                    .is_some())
            })
            .await?;
        if removed {
            self.flush().await?;
        }
        Ok(removed)
    }
}
