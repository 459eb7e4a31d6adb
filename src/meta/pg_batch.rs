//! Group commit for task updates in PostgreSQL: the plain updates (no quota slot, no campaign
//! member) that arrive while a batch is being written go together in the next one, as one
//! multi-row `UPDATE … FROM unnest(…)` with its announcements: one statement and one commit
//! for all of them instead of one each. Each keeps its own compare-and-swap on the revision,
//! so each caller learns whether its own task was stored, and nothing is answered before the
//! statement that stored it has committed. A batch the database refuses as a whole (a row
//! breaking a constraint) is written again one row at a time, so the refusal reaches only the
//! caller whose row it was.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::postgres::{
    announcing, Param, PgStore, TaskRow, EVENTS_CHANNEL, UPDATE_TASK, UPDATE_TASK_ANNOUNCED,
};
use super::MetaError;

/// The most updates one statement carries.
const MAX_BATCH: usize = 256;

/// One task update waiting for its batch.
pub(super) struct Update {
    pub row: TaskRow,
    pub revision: i64,
    pub expected: i64,
    pub announce: Option<String>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(Update, oneshot::Sender<Result<bool, MetaError>>)>,
    /// Whether a writer is draining the queue.
    writing: bool,
    /// Batch statements written so far.
    batches: u64,
}

/// The updates waiting, and whether a writer is at work on them.
#[derive(Default, Clone)]
pub(super) struct Batcher(Arc<Mutex<Queue>>);

const UPDATE_BATCH: &str = "WITH v AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::int8[],
        $6::bool[], $7::bool[], $8::text[], $9::int8[], $10::int8[], $11::text[])
    AS v(id, device_id, firmware, active, due_ms, holds_quota, importing, task, revision,
        expected, message)
), stored AS (
    UPDATE fwrepo_tasks t SET device_id = v.device_id, firmware = v.firmware,
        active = v.active, due_ms = v.due_ms, holds_quota = v.holds_quota,
        importing = v.importing, task = v.task, revision = v.revision
    FROM v WHERE t.id = v.id AND t.revision = v.expected
    RETURNING t.id, v.message
)
SELECT id, (SELECT count(*) FROM (SELECT pg_notify($12, message)
    WHERE message IS NOT NULL) n) FROM stored";

impl Batcher {
    /// Whether `update` was stored (`false`: its revision was no longer `expected`); durable
    /// when it returns.
    pub async fn update(&self, store: &PgStore, update: Update) -> Result<bool, MetaError> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
            q.waiting.push((update, tx));
            !std::mem::replace(&mut q.writing, true)
        };
        if lead {
            // The writer runs on its own, so a caller that goes away cannot strand the
            // others' answers.
            let (this, store) = (self.clone(), store.clone());
            tokio::spawn(async move { this.write_all(&store).await });
        }
        rx.await
            .unwrap_or_else(|_| Err(MetaError::Backend("task update writer gone".into())))
    }

    /// Batch statements written so far.
    #[cfg(test)]
    pub fn batches(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).batches
    }

    /// Writes batches until the queue is empty.
    async fn write_all(&self, store: &PgStore) {
        loop {
            let batch = {
                let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
                if q.waiting.is_empty() {
                    q.writing = false;
                    return;
                }
                // Two updates of one task never share a statement: the later one waits for
                // the next (one instance serializes them anyway, under the task's lock).
                let mut batch = Vec::new();
                let mut rest = Vec::new();
                let mut ids = std::collections::HashSet::new();
                for item in q.waiting.drain(..) {
                    if batch.len() < MAX_BATCH && ids.insert(item.0.row.id.clone()) {
                        batch.push(item);
                    } else {
                        rest.push(item);
                    }
                }
                q.waiting = rest;
                q.batches += 1;
                batch
            };
            let updates: Vec<&Update> = batch.iter().map(|(u, _)| u).collect();
            match write_batch(store, &updates).await {
                Ok(stored) => {
                    for (u, tx) in batch {
                        let _ = tx.send(Ok(stored.contains(&u.row.id)));
                    }
                }
                Err(_) if batch.len() > 1 => {
                    for (u, tx) in batch {
                        let _ = tx.send(write_one(store, &u).await);
                    }
                }
                Err(e) => {
                    for (_, tx) in batch {
                        let _ = tx.send(Err(MetaError::Backend(e.to_string())));
                    }
                }
            }
        }
    }
}

/// The ids the batch stored.
async fn write_batch(
    store: &PgStore,
    updates: &[&Update],
) -> Result<std::collections::HashSet<String>, MetaError> {
    let rows_of = updates.iter().map(|u| &u.row);
    let ids: Vec<&str> = rows_of.clone().map(|r| r.id.as_str()).collect();
    let devices: Vec<&str> = rows_of.clone().map(|r| r.device_id.as_str()).collect();
    let firmware: Vec<&str> = rows_of.clone().map(|r| r.firmware.as_str()).collect();
    let active: Vec<bool> = rows_of.clone().map(|r| r.active).collect();
    let due: Vec<Option<i64>> = rows_of.clone().map(|r| r.due).collect();
    let quota: Vec<bool> = rows_of.clone().map(|r| r.holds_quota).collect();
    let importing: Vec<bool> = rows_of.clone().map(|r| r.importing).collect();
    let tasks: Vec<&str> = rows_of.map(|r| r.json.as_str()).collect();
    let revision: Vec<i64> = updates.iter().map(|u| u.revision).collect();
    let expected: Vec<i64> = updates.iter().map(|u| u.expected).collect();
    let messages: Vec<Option<&str>> = updates.iter().map(|u| u.announce.as_deref()).collect();
    let rows = store
        .query(
            UPDATE_BATCH,
            &[
                &ids,
                &devices,
                &firmware,
                &active,
                &due,
                &quota,
                &importing,
                &tasks,
                &revision,
                &expected,
                &messages,
                &EVENTS_CHANNEL,
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// One update in a statement of its own.
async fn write_one(store: &PgStore, u: &Update) -> Result<bool, MetaError> {
    let mut params = u.row.params();
    params.extend([&u.revision as Param, &u.expected]);
    let announce = u.announce.as_deref();
    let sql = announcing(&mut params, &announce, UPDATE_TASK, UPDATE_TASK_ANNOUNCED);
    Ok(store.execute(sql, &params).await? == 1)
}
