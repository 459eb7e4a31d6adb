//! The statements that concurrent requests share (see `pg_batch`): the task writes and reads
//! and the device look-ups every device request and every scheduling makes. A write batch the
//! database refuses as a whole (a row breaking a constraint) is written again one item at a
//! time, so the refusal reaches only the caller whose item it was.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;

use super::pg_batch::{all_failed, Batcher, Kind};
use super::postgres::{announcing, Param, PgStore, TaskRow, EVENTS_CHANNEL};
use super::postgres::{UPDATE_TASK, UPDATE_TASK_ANNOUNCED};
use super::{Created, MetaError};
use tokio_postgres::Row;

/// One batcher per kind; clones share them.
#[derive(Default, Clone)]
pub(super) struct Batches {
    pub updates: Batcher<TaskUpdates>,
    pub creations: Batcher<TaskCreations>,
    pub tasks: Batcher<ByKey<TaskById>>,
    pub active: Batcher<ByKey<ActiveByDevice>>,
    pub active_tasks: Batcher<ByKey<ActiveTaskByDevice>>,
    pub credentials: Batcher<ByKey<CredentialByDevice>>,
    pub device_states: Batcher<ByKey<DeviceState>>,
    pub tasks_and_credentials: Batcher<ByKey<TaskAndCredential>>,
    pub merges: Batcher<DeviceMerges>,
    pub any_token: Batcher<AnyToken>,
}

/// A task update: stored (`true`) only if the task's revision is still `expected`.
pub(super) struct Update {
    pub row: TaskRow,
    pub revision: i64,
    pub expected: i64,
    pub announce: Option<String>,
}

/// Plain task updates (no quota slot, no campaign member).
pub(super) struct TaskUpdates;

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

impl Kind for TaskUpdates {
    type Item = Update;
    type Out = bool;

    fn key(u: &Update) -> Option<&str> {
        Some(&u.row.id)
    }

    async fn run(store: &PgStore, items: Vec<Update>) -> Vec<Result<bool, MetaError>> {
        match update_batch(store, &items).await {
            Ok(stored) => items
                .iter()
                .map(|u| Ok(stored.contains(&u.row.id)))
                .collect(),
            Err(_) if items.len() > 1 => {
                let mut outs = Vec::with_capacity(items.len());
                for u in &items {
                    outs.push(update_one(store, u).await);
                }
                outs
            }
            Err(e) => all_failed(items.len(), &e),
        }
    }
}

/// The ids the batch stored.
async fn update_batch(store: &PgStore, updates: &[Update]) -> Result<HashSet<String>, MetaError> {
    let c = Columns::of(updates.iter().map(|u| &u.row));
    let revision: Vec<i64> = updates.iter().map(|u| u.revision).collect();
    let expected: Vec<i64> = updates.iter().map(|u| u.expected).collect();
    let messages: Vec<Option<&str>> = updates.iter().map(|u| u.announce.as_deref()).collect();
    let mut params = c.params();
    params.extend([&revision as Param, &expected, &messages, &EVENTS_CHANNEL]);
    let rows = store.query(UPDATE_BATCH, &params).await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// One update in a statement of its own.
async fn update_one(store: &PgStore, u: &Update) -> Result<bool, MetaError> {
    let mut params = u.row.params();
    params.extend([&u.revision as Param, &u.expected]);
    let announce = u.announce.as_deref();
    let sql = announcing(&mut params, &announce, UPDATE_TASK, UPDATE_TASK_ANNOUNCED);
    Ok(store.execute(sql, &params).await? == 1)
}

/// A new task outside any campaign, with the announcement of its creation.
pub(super) struct Creation {
    pub row: TaskRow,
    pub announce: Option<String>,
}

/// New tasks: the unique index on each device's active task decides who is busy.
pub(super) struct TaskCreations;

const INSERT_BATCH: &str = "WITH v AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::int8[],
        $6::bool[], $7::bool[], $8::text[], $9::text[])
    AS v(id, device_id, firmware, active, due_ms, holds_quota, importing, task, message)
), stored AS (
    INSERT INTO fwrepo_tasks (id, device_id, firmware, active, due_ms, holds_quota,
        importing, task)
    SELECT id, device_id, firmware, active, due_ms, holds_quota, importing, task FROM v
    ON CONFLICT DO NOTHING RETURNING id
)
SELECT s.id, (SELECT count(*) FROM (SELECT pg_notify($10, v.message)
    WHERE v.message IS NOT NULL) n) FROM stored s JOIN v ON v.id = s.id";

const ACTIVE_OF: &str =
    "SELECT device_id, id FROM fwrepo_tasks WHERE device_id = ANY($1) AND active";

impl Kind for TaskCreations {
    type Item = Creation;
    type Out = Created;

    /// Two new tasks of one device never share a statement, so the index, not the order
    /// of rows in one statement, decides between them.
    fn key(c: &Creation) -> Option<&str> {
        Some(&c.row.device_id)
    }

    async fn run(store: &PgStore, items: Vec<Creation>) -> Vec<Result<Created, MetaError>> {
        let stored = insert_batch(store, &items).await;
        let refused: Vec<&str> = (items.iter())
            .filter(|c| !stored.as_ref().is_ok_and(|s| s.contains(&c.row.id)))
            .map(|c| c.row.device_id.as_str())
            .collect();
        let active = match (&stored, refused.is_empty()) {
            (Ok(_), false) => store.query(ACTIVE_OF, &[&refused]).await.map(|rows| {
                (rows.iter())
                    .map(|r| (r.get(0), r.get(1)))
                    .collect::<HashMap<String, String>>()
            }),
            _ => Ok(HashMap::new()),
        };
        let mut outs = Vec::with_capacity(items.len());
        for c in &items {
            let stored = stored.as_ref().map(|s| s.contains(&c.row.id));
            outs.push(match (stored, &active) {
                (Ok(true), _) => Ok(Created::Stored),
                (Ok(false), Err(e)) => Err(MetaError::Backend(e.to_string())),
                (Ok(false), Ok(active)) if active.contains_key(&c.row.device_id) => {
                    Ok(Created::DeviceBusy(active[&c.row.device_id].clone()))
                }
                // Refused for another reason, or the statement as a whole was refused: on
                // its own, which says why.
                _ => store.create_alone(&c.row, c.announce.as_deref()).await,
            });
        }
        outs
    }
}

/// The ids of the tasks the statement stored; the others were refused by a unique index.
async fn insert_batch(store: &PgStore, items: &[Creation]) -> Result<HashSet<String>, MetaError> {
    let c = Columns::of(items.iter().map(|c| &c.row));
    let messages: Vec<Option<&str>> = items.iter().map(|c| c.announce.as_deref()).collect();
    let mut params = c.params();
    params.extend([&messages as Param, &EVENTS_CHANNEL]);
    let rows = store.query(INSERT_BATCH, &params).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The columns of several task rows, as arrays for `unnest`.
struct Columns<'a> {
    ids: Vec<&'a str>,
    devices: Vec<&'a str>,
    firmware: Vec<&'a str>,
    active: Vec<bool>,
    due: Vec<Option<i64>>,
    quota: Vec<bool>,
    importing: Vec<bool>,
    tasks: Vec<&'a str>,
}

impl<'a> Columns<'a> {
    fn of(rows: impl Iterator<Item = &'a TaskRow> + Clone) -> Columns<'a> {
        Columns {
            ids: rows.clone().map(|r| r.id.as_str()).collect(),
            devices: rows.clone().map(|r| r.device_id.as_str()).collect(),
            firmware: rows.clone().map(|r| r.firmware.as_str()).collect(),
            active: rows.clone().map(|r| r.active).collect(),
            due: rows.clone().map(|r| r.due).collect(),
            quota: rows.clone().map(|r| r.holds_quota).collect(),
            importing: rows.clone().map(|r| r.importing).collect(),
            tasks: rows.map(|r| r.json.as_str()).collect(),
        }
    }

    /// `$1` to `$8`, in `TaskRow::params`'s order.
    fn params(&self) -> Vec<Param<'_>> {
        vec![
            &self.ids,
            &self.devices,
            &self.firmware,
            &self.active,
            &self.due,
            &self.quota,
            &self.importing,
            &self.tasks,
        ]
    }
}

/// A look-up by one text key: `SQL` takes the keys as `$1` and returns one row per key
/// found, the key first.
pub(super) trait Lookup: Send + Sync + 'static {
    const SQL: &'static str;
    type Value: Clone + Send + 'static;
    fn value(row: &Row) -> Self::Value;
}

/// Look-ups of one kind, in one `= ANY($1)` statement.
pub(super) struct ByKey<L>(PhantomData<L>);

impl<L: Lookup> Kind for ByKey<L> {
    type Item = String;
    type Out = Option<L::Value>;

    async fn run(store: &PgStore, keys: Vec<String>) -> Vec<Result<Option<L::Value>, MetaError>> {
        match store.query(L::SQL, &[&keys]).await {
            Ok(rows) => {
                let found: HashMap<String, L::Value> =
                    rows.iter().map(|r| (r.get(0), L::value(r))).collect();
                keys.iter().map(|k| Ok(found.get(k).cloned())).collect()
            }
            Err(e) => all_failed(keys.len(), &e),
        }
    }
}

/// A task's JSON by id.
pub(super) struct TaskById;
impl Lookup for TaskById {
    const SQL: &'static str = "SELECT id, task FROM fwrepo_tasks WHERE id = ANY($1)";
    type Value = String;
    fn value(row: &Row) -> String {
        row.get(1)
    }
}

/// A device's active task id.
pub(super) struct ActiveByDevice;
impl Lookup for ActiveByDevice {
    const SQL: &'static str = ACTIVE_OF;
    type Value = String;
    fn value(row: &Row) -> String {
        row.get(1)
    }
}

/// A device's active task's JSON.
pub(super) struct ActiveTaskByDevice;
impl Lookup for ActiveTaskByDevice {
    const SQL: &'static str =
        "SELECT device_id, task FROM fwrepo_tasks WHERE device_id = ANY($1) AND active";
    type Value = String;
    fn value(row: &Row) -> String {
        row.get(1)
    }
}

/// A device's credential JSON.
pub(super) struct CredentialByDevice;
impl Lookup for CredentialByDevice {
    const SQL: &'static str = "SELECT device_id, credential FROM fwrepo_device_credentials
        WHERE device_id = ANY($1)";
    type Value = String;
    fn value(row: &Row) -> String {
        row.get(1)
    }
}

/// A device's credential JSON and its active task's JSON (a row for every key asked).
pub(super) struct DeviceState;
impl Lookup for DeviceState {
    const SQL: &'static str = "SELECT d.id, c.credential, t.task FROM unnest($1::text[]) AS d(id)
        LEFT JOIN fwrepo_device_credentials c ON c.device_id = d.id
        LEFT JOIN fwrepo_tasks t ON t.device_id = d.id AND t.active";
    type Value = (Option<String>, Option<String>);
    fn value(row: &Row) -> Self::Value {
        (row.get(1), row.get(2))
    }
}

/// A task's JSON by id, with its device's credential JSON.
pub(super) struct TaskAndCredential;
impl Lookup for TaskAndCredential {
    const SQL: &'static str = "SELECT t.id, t.task, c.credential FROM fwrepo_tasks t
        LEFT JOIN fwrepo_device_credentials c ON c.device_id = t.device_id
        WHERE t.id = ANY($1)";
    type Value = (String, Option<String>);
    fn value(row: &Row) -> Self::Value {
        (row.get(1), row.get(2))
    }
}

/// A merge into one device's JSON: `patch` onto the stored device, or `fresh` when there is
/// none.
pub(super) struct Merge {
    pub device_id: String,
    pub fresh: String,
    pub patch: String,
}

/// Device merges (what a device reports, when it was last seen); each answer is the device's
/// JSON after its merge.
pub(super) struct DeviceMerges;

impl Kind for DeviceMerges {
    type Item = Merge;
    type Out = String;

    fn key(m: &Merge) -> Option<&str> {
        Some(&m.device_id)
    }

    async fn run(store: &PgStore, items: Vec<Merge>) -> Vec<Result<String, MetaError>> {
        let mut merged = merge_batch(store, &items).await.unwrap_or_default();
        let mut outs = Vec::with_capacity(items.len());
        for m in &items {
            outs.push(match merged.remove(&m.device_id) {
                Some(info) => Ok(info),
                // Created between the two statements, or the batch was refused: alone.
                None => store.merge_alone(m).await,
            });
        }
        outs
    }
}

/// Each merged device's JSON by id: stored devices merge, new ones are inserted. A device
/// left out was inserted by someone else between the two statements.
async fn merge_batch(
    store: &PgStore,
    items: &[Merge],
) -> Result<HashMap<String, String>, MetaError> {
    let ids: Vec<&str> = items.iter().map(|m| m.device_id.as_str()).collect();
    let patches: Vec<&str> = items.iter().map(|m| m.patch.as_str()).collect();
    let mut merged: HashMap<String, String> = store
        .query(
            "UPDATE fwrepo_devices d SET info = (d.info::jsonb || u.patch::jsonb)::text
             FROM unnest($1::TEXT[], $2::TEXT[]) AS u(id, patch)
             WHERE d.device_id = u.id RETURNING d.device_id, d.info",
            &[&ids, &patches],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let new: Vec<&Merge> = items
        .iter()
        .filter(|m| !merged.contains_key(&m.device_id))
        .collect();
    if new.is_empty() {
        return Ok(merged);
    }
    let ids: Vec<&str> = new.iter().map(|m| m.device_id.as_str()).collect();
    let fresh: Vec<&str> = new.iter().map(|m| m.fresh.as_str()).collect();
    let inserted = store
        .query(
            "INSERT INTO fwrepo_devices (device_id, info)
             SELECT id, info FROM unnest($1::TEXT[], $2::TEXT[]) AS u(id, info)
             ON CONFLICT (device_id) DO NOTHING RETURNING device_id, info",
            &[&ids, &fresh],
        )
        .await?;
    merged.extend(inserted.iter().map(|r| (r.get(0), r.get(1))));
    Ok(merged)
}

/// Whether any management token exists: every caller waiting shares one answer.
pub(super) struct AnyToken;

impl Kind for AnyToken {
    type Item = ();
    type Out = bool;
    const MAX: usize = usize::MAX;

    async fn run(store: &PgStore, items: Vec<()>) -> Vec<Result<bool, MetaError>> {
        match store
            .query_one("SELECT EXISTS (SELECT 1 FROM fwrepo_tokens)", &[])
            .await
        {
            Ok(row) => {
                let any: bool = row.get(0);
                items.iter().map(|_| Ok(any)).collect()
            }
            Err(e) => all_failed(items.len(), &e),
        }
    }
}
