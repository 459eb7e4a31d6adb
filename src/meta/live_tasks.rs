//! The tasks still under way, indexed in memory the ways the engine looks them up: the active
//! task of each device, due times, quota holders, imports and firmware in use. Only an
//! active task has index entries, so the index is as large as the work in progress, not the
//! history. A store that keeps it (sled's) derives it from the stored tasks: it is rebuilt at
//! open and changed under one lock with each task write, so it never disagrees with the
//! tasks, and a task write is one key with no index keys beside it.

use std::collections::{BTreeSet, HashMap};

use crate::model::task::FotaTask;

/// What one active task is indexed under.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The stored version's revision.
    revision: u64,
    device: String,
    firmware: String,
    due_ms: Option<i64>,
    quota: bool,
    importing: bool,
}

#[derive(Debug, Default)]
pub struct LiveTasks {
    /// Active task id → its entries.
    tasks: HashMap<String, Entry>,
    /// Device → its active task.
    active: HashMap<String, String>,
    due: BTreeSet<(i64, String)>,
    importing: BTreeSet<String>,
    quota: usize,
    /// Firmware → how many active tasks deliver it.
    firmware: HashMap<String, usize>,
}

impl LiveTasks {
    /// Moves the index from the task's stored version (if any) to `task`, the new one.
    pub fn apply(&mut self, task: &FotaTask) {
        if let Some(old) = self.tasks.remove(&task.id) {
            if let Some(at) = old.due_ms {
                self.due.remove(&(at, task.id.clone()));
            }
            if old.importing {
                self.importing.remove(&task.id);
            }
            self.quota -= usize::from(old.quota);
            if let Some(n) = self.firmware.get_mut(&old.firmware) {
                *n -= 1;
                if *n == 0 {
                    self.firmware.remove(&old.firmware);
                }
            }
            if self.active.get(&old.device) == Some(&task.id) {
                self.active.remove(&old.device);
            }
        }
        if !task.is_active() {
            return;
        }
        let entry = Entry {
            revision: task.revision,
            device: task.device_id.clone(),
            firmware: task.firmware.clone(),
            due_ms: task.due_ms(),
            quota: task.holds_quota(),
            importing: task.is_importing(),
        };
        if let Some(at) = entry.due_ms {
            self.due.insert((at, task.id.clone()));
        }
        if entry.importing {
            self.importing.insert(task.id.clone());
        }
        self.quota += usize::from(entry.quota);
        *self.firmware.entry(entry.firmware.clone()).or_default() += 1;
        self.active.insert(entry.device.clone(), task.id.clone());
        self.tasks.insert(task.id.clone(), entry);
    }

    /// The stored revision of an active task (`None` for a finished or unknown one).
    pub fn revision(&self, id: &str) -> Option<u64> {
        self.tasks.get(id).map(|e| e.revision)
    }

    pub fn active(&self, device: &str) -> Option<&str> {
        self.active.get(device).map(String::as_str)
    }

    pub fn next_due(&self) -> Option<i64> {
        self.due.first().map(|(at, _)| *at)
    }

    /// Up to `limit` ids due at or before `now_ms`, earliest first.
    pub fn due(&self, now_ms: i64, limit: usize) -> Vec<String> {
        self.due
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect()
    }

    pub fn quota_holders(&self) -> u64 {
        self.quota as u64
    }

    pub fn importing(&self) -> Vec<String> {
        self.importing.iter().cloned().collect()
    }

    pub fn firmware_in_use(&self, name: &str) -> bool {
        self.firmware.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::task::{waiting, Status};

    fn task(id: &str, device: &str, fw: &str) -> FotaTask {
        let mut t = crate::model::task::tests::task(false);
        (t.id, t.device_id, t.firmware) = (id.into(), device.into(), fw.into());
        t.reason = None;
        t.deadline_ms = Some(100);
        t
    }

    #[test]
    fn follows_a_task_from_creation_to_its_end_and_holds_only_active_ones() {
        let mut live = LiveTasks::default();
        let mut a = task("a", "dev", "fw-1");
        live.apply(&a);
        assert_eq!(live.active("dev"), Some("a"));
        assert_eq!(live.next_due(), Some(100));
        assert!(live.firmware_in_use("fw-1"));

        a.reason = Some(waiting::IMPORT.into());
        a.deadline_ms = Some(50);
        live.apply(&a);
        assert_eq!(live.importing(), vec!["a".to_owned()]);
        assert_eq!(live.due(60, 10), vec!["a".to_owned()]);
        assert!(live.due(49, 10).is_empty(), "the old due time is gone");

        a.reason = None;
        a.options.use_quota = true;
        a.set(Status::Downloading, None, 1);
        live.apply(&a);
        assert!(live.importing().is_empty());
        assert_eq!(live.quota_holders(), 1);

        a.set(Status::Succeeded, None, 2);
        live.apply(&a);
        assert_eq!(live.active("dev"), None);
        assert_eq!(live.quota_holders(), 0);
        assert_eq!(live.next_due(), None);
        assert!(!live.firmware_in_use("fw-1"));
        assert!(live.tasks.is_empty() && live.firmware.is_empty());
    }

    #[test]
    fn a_finished_task_leaves_a_newer_active_task_of_its_device_alone() {
        let mut live = LiveTasks::default();
        let mut old = task("a", "dev", "fw-1");
        live.apply(&old);
        let new = task("b", "dev", "fw-2");
        live.apply(&new);
        old.set(Status::Cancelled, None, 1);
        live.apply(&old);
        assert_eq!(live.active("dev"), Some("b"));
        assert!(live.firmware_in_use("fw-2") && !live.firmware_in_use("fw-1"));
    }
}
