//! FOTA tasks and schedules in sled. A task, its index entries and (for a task a campaign
//! released) its campaign member and counts change in one transaction over three trees, so
//! the indexes and counts never disagree with the tasks.
//!
//! Index keys in `fota_index`, each led by a one-byte kind:
//! `a` device → active task id; `d` due ms (8 bytes, big-endian) ‖ id; `q` id (holds a quota
//! slot); `i` id (importing); `f` firmware ‖ 0 ‖ id (active task delivers it); `v` device ‖ 0 ‖ id
//! (every task of a device).

use async_trait::async_trait;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

use super::sled_fleet::{get_member, put_member};
use super::sled_store::{backend, SledStore};
use super::{Created, MetaError, Put, ScheduleStore, TaskStore};
use crate::model::campaign::{member, Member};
use crate::model::schedule::Schedule;
use crate::model::task::FotaTask;

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, MetaError> {
    serde_json::from_slice(value).map_err(|e| MetaError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

fn key(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![kind];
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

fn due_key(at_ms: i64, id: &str) -> Vec<u8> {
    let mut k = vec![b'd'];
    k.extend_from_slice(&(at_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// The index entries a task version owns (the active-device entry is handled apart).
fn entries(t: &FotaTask) -> Vec<Vec<u8>> {
    let id = t.id.as_bytes();
    let mut out = vec![key(b'v', &[t.device_id.as_bytes(), id])];
    if let Some(at) = t.due_ms() {
        out.push(due_key(at, &t.id));
    }
    if t.holds_quota() {
        out.push(key(b'q', &[id]));
    }
    if t.is_importing() {
        out.push(key(b'i', &[id]));
    }
    if t.is_active() {
        out.push(key(b'f', &[t.firmware.as_bytes(), id]));
    }
    out
}

fn write<T>(
    tasks: &TransactionalTree,
    index: &TransactionalTree,
    old: Option<&FotaTask>,
    new: &FotaTask,
    json: &[u8],
) -> Result<(), ConflictableTransactionError<T>> {
    if let Some(old) = old {
        for k in entries(old) {
            index.remove(k)?;
        }
    }
    for k in entries(new) {
        index.insert(k, &[])?;
    }
    let active = key(b'a', &[new.device_id.as_bytes()]);
    if new.is_active() {
        index.insert(active, new.id.as_bytes())?;
    } else if index.get(&active)?.is_some_and(|v| v == new.id.as_bytes()) {
        index.remove(active)?;
    }
    tasks.insert(new.id.as_bytes(), json)?;
    Ok(())
}

/// The member a campaign task's change moves: to the task's status (and its failure reason),
/// while the member still follows this task (a retried member follows a newer one).
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
    if old.task_id.as_deref() != Some(task.id.as_str()) {
        return Ok(());
    }
    let new = Member {
        status: task.status.as_str().to_owned(),
        reason: task.reason.clone(),
        ..old.clone()
    };
    if new != old {
        put_member(fleet, &link.id, Some(&old), &new)?;
    }
    Ok(())
}

impl SledStore {
    fn transact_tasks<T>(
        &self,
        campaign: bool,
        f: impl Fn(
            &TransactionalTree,
            &TransactionalTree,
            &TransactionalTree,
        ) -> Result<T, ConflictableTransactionError<T>>,
    ) -> Result<T, MetaError> {
        let _one = campaign.then(|| self.fleet_gate.lock().unwrap_or_else(|e| e.into_inner()));
        match (&self.tasks, &self.task_index, &self.fleet).transaction(|(t, i, f2)| f(t, i, f2)) {
            Ok(v) | Err(TransactionError::Abort(v)) => Ok(v),
            Err(TransactionError::Storage(e)) => Err(backend(e)),
        }
    }

    fn scan_ids(&self, prefix: Vec<u8>, limit: usize) -> Result<Vec<Vec<u8>>, MetaError> {
        let mut out = Vec::new();
        for item in self.task_index.scan_prefix(&prefix).take(limit) {
            let (k, _) = item.map_err(backend)?;
            out.push(k[prefix.len()..].to_vec());
        }
        Ok(out)
    }

    /// Tasks holding a quota slot (index entries are keys only, so counting reads no task).
    fn quota_count(&self) -> Result<u64, MetaError> {
        let mut n = 0;
        for entry in self.task_index.scan_prefix([b'q']) {
            entry.map_err(backend)?;
            n += 1;
        }
        Ok(n)
    }

    fn load(&self, id: &[u8]) -> Result<Option<FotaTask>, MetaError> {
        self.tasks
            .get(id)
            .map_err(backend)?
            .map(|v| decode(id, &v))
            .transpose()
    }
}

#[async_trait]
impl TaskStore for SledStore {
    async fn create_task(
        &self,
        task: &FotaTask,
        _announce: Option<&str>,
    ) -> Result<Created, MetaError> {
        let task = task.clone();
        let json = serde_json::to_vec(&task).map_err(backend)?;
        let created = self
            .point(move |s| {
                s.transact_tasks(task.campaign.is_some(), |t, i, f| {
                    if let Some(link) = &task.campaign {
                        let old = get_member(f, &link.id, &task.device_id)?;
                        let Some(old) = old
                            .filter(|m| m.status == member::WAITING || m.status == member::SKIPPED)
                        else {
                            return Err(ConflictableTransactionError::Abort(Created::MemberTaken));
                        };
                        if i.get(key(b'a', &[task.device_id.as_bytes()]))?.is_none() {
                            let new = Member {
                                status: task.status.as_str().to_owned(),
                                task_id: Some(task.id.clone()),
                                reason: task.reason.clone(),
                                retry_at_ms: None,
                                ..old.clone()
                            };
                            put_member(f, &link.id, Some(&old), &new)?;
                        }
                    }
                    if let Some(active) = i.get(key(b'a', &[task.device_id.as_bytes()]))? {
                        let id = String::from_utf8_lossy(&active).into_owned();
                        return Err(ConflictableTransactionError::Abort(Created::DeviceBusy(id)));
                    }
                    write(t, i, None, &task, &json)?;
                    Ok(Created::Stored)
                })
            })
            .await?;
        if created == Created::Stored {
            self.flush().await?;
        }
        Ok(created)
    }

    async fn get_task(&self, id: &str) -> Result<Option<FotaTask>, MetaError> {
        let id = id.to_owned();
        self.point(move |s| s.load(id.as_bytes())).await
    }

    async fn put_task(
        &self,
        task: &FotaTask,
        expected: u64,
        quota: Option<u64>,
        _announce: Option<&str>,
    ) -> Result<Put, MetaError> {
        let task = task.clone();
        let json = serde_json::to_vec(&task).map_err(backend)?;
        let store = move |s: &SledStore| {
            let _gate = quota.map(|_| s.quota_gate.lock().unwrap_or_else(|e| e.into_inner()));
            if let Some(limit) = quota {
                if s.quota_count()? >= limit {
                    return Ok(Put::QuotaFull);
                }
            }
            s.transact_tasks(task.campaign.is_some(), |t, i, f| {
                let old = t
                    .get(task.id.as_bytes())?
                    .and_then(|v| serde_json::from_slice::<FotaTask>(&v).ok());
                if old.as_ref().map_or(0, |o| o.revision) != expected {
                    return Err(ConflictableTransactionError::Abort(Put::Stale));
                }
                write(t, i, old.as_ref(), &task, &json)?;
                follow(f, &task)?;
                Ok(Put::Stored)
            })
        };
        // Counting the quota's holders is a scan: that one goes to the blocking pool.
        let put = match quota {
            Some(_) => self.blocking(store).await?,
            None => self.point(store).await?,
        };
        if put == Put::Stored {
            self.flush().await?;
        }
        Ok(put)
    }

    async fn active_task(&self, device_id: &str) -> Result<Option<String>, MetaError> {
        let k = key(b'a', &[device_id.as_bytes()]);
        self.point(move |s| {
            Ok(s.task_index
                .get(k)
                .map_err(backend)?
                .map(|v| String::from_utf8_lossy(&v).into_owned()))
        })
        .await
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
                    let prefix = key(b'v', &[d.as_bytes(), b""]);
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
        self.blocking(|s| {
            let Some(item) = s.task_index.scan_prefix([b'd']).next() else {
                return Ok(None);
            };
            let (k, _) = item.map_err(backend)?;
            let mut b = [0u8; 8];
            b.copy_from_slice(&k[1..9]);
            Ok(Some(u64::from_be_bytes(b) as i64))
        })
        .await
    }

    async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<FotaTask>, MetaError> {
        self.blocking(move |s| {
            let end = due_key(now_ms.saturating_add(1), "");
            let mut out = Vec::new();
            for item in s.task_index.range(vec![b'd']..end).take(limit) {
                let (k, _) = item.map_err(backend)?;
                match s.load(&k[9..])? {
                    Some(t) => out.push(t),
                    None => {
                        s.task_index.remove(&k).map_err(backend)?;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn quota_holders(&self) -> Result<u64, MetaError> {
        self.blocking(|s| s.quota_count()).await
    }

    async fn importing(&self) -> Result<Vec<FotaTask>, MetaError> {
        self.blocking(|s| {
            let mut out = Vec::new();
            for id in s.scan_ids(vec![b'i'], usize::MAX)? {
                out.extend(s.load(&id)?);
            }
            Ok(out)
        })
        .await
    }

    async fn firmware_in_use(&self, name: &str) -> Result<bool, MetaError> {
        let prefix = key(b'f', &[name.as_bytes(), b""]);
        self.blocking(move |s| Ok(!s.scan_ids(prefix, 1)?.is_empty()))
            .await
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
