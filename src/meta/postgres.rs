//! The metadata store in PostgreSQL, for several fwrepo instances sharing one database (with
//! S3 blobs). Records and tasks are stored as JSON text beside the columns the indexes need;
//! every write is one statement or one transaction, committed (durable) before it returns.
//! The schema is created on first start.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row, Statement};
use tokio_util::sync::CancellationToken;

use super::pg_batched::{self, Batches};
use super::pg_fleet;
use super::pg_schema;
use super::pg_tls::{self, PgTls};

use super::{
    Created, ExpiryIndex, FirmwareCatalog, FirmwareRecord, MetaError, Put, ScheduleStore, TaskStore,
};
use crate::auth::{StoredToken, TokenTable};
use crate::model::campaign::member;
use crate::model::schedule::Schedule;
use crate::model::task::FotaTask;

/// Connections kept open; each request takes one for the length of its statement.
const POOL_SIZE: usize = 8;

/// How long a connection keeps a prepared statement, and with it the generic plan it may
/// have settled on. A plan made while a table was small scans the whole table once it has
/// grown (a rollout's first devices, then 100,000: a seq scan per statement, 4,300 work
/// requests/s); PostgreSQL plans again only after an ANALYZE. A second bounds how long such
/// a plan lives, and costs a prepare and five planned runs per statement and connection each
/// second, against a plan per run when custom plans were forced.
const PLAN_LIFETIME: Duration = Duration::from_secs(1);

/// The error with its causes: tokio-postgres says "db error" or "error performing TLS
/// handshake" and keeps the why in the source chain.
pub(super) fn backend(e: impl std::error::Error) -> MetaError {
    let mut text = format!("postgres: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    MetaError::Backend(text)
}

fn setting(e: String) -> MetaError {
    MetaError::Backend(format!("postgres: {e}"))
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    json: &str,
) -> Result<T, MetaError> {
    serde_json::from_str(json).map_err(|e| MetaError::Corrupt {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

pub(super) fn encode<T: serde::Serialize>(value: &T) -> Result<String, MetaError> {
    serde_json::to_string(value).map_err(backend)
}

/// The JSON in column `col` of each row, decoded.
pub(super) fn rows<T: serde::de::DeserializeOwned>(
    rows: &[Row],
    col: &str,
) -> Result<Vec<T>, MetaError> {
    rows.iter()
        .map(|r| decode(col, r.get::<_, &str>(col)))
        .collect()
}

/// A few connections, each re-established when it breaks (a database restart costs the
/// requests in flight, not the process). Clones share them.
#[derive(Clone)]
pub struct PgStore {
    config: tokio_postgres::Config,
    tls: Option<PgTls>,
    slots: Arc<[Mutex<Option<Pooled>>]>,
    next: Arc<AtomicUsize>,
    /// The statements concurrent requests share.
    pub(super) batched: Batches,
}

/// A pooled connection and the statements prepared on it: a statement used again skips the
/// parse round trip, and the planner once PostgreSQL keeps a generic plan for it (prepared
/// once per connection and [`PLAN_LIFETIME`], not once per request).
struct Pooled {
    client: Client,
    /// Each with when it was prepared.
    statements: std::collections::HashMap<String, (Statement, Instant)>,
    /// The thread whose runtime drives the connection: the one that opened it.
    home: std::thread::ThreadId,
}

impl PgStore {
    /// Connects and creates the schema if it is not there.
    pub async fn open(url: &str) -> Result<PgStore, MetaError> {
        let target = pg_tls::parse(url).map_err(setting)?;
        let tls = target.connector().map_err(setting)?;
        let mut config = target.config;
        // PostgreSQL's own choice of plan (`auto`, set in case the server's default differs):
        // after five runs planned for their parameters, a statement keeps one generic plan
        // if that plan looks no dearer than theirs. A batch's look-ups and updates by key
        // settle on it under load, when the arrays grow: planning every run had been 40% of
        // the statements' time (`pg_stat_statements`, FOTA bench, when custom plans were
        // forced). A statement whose generic plan is dearer keeps being planned for its
        // parameters. Page statements have no optional filter, whose generic plan could not
        // use an index (see `from`). A generic plan is only as good as the table sizes it
        // saw, so statements are prepared again after PLAN_LIFETIME (see `Conn::statement`).
        let options = config.get_options().unwrap_or_default().to_owned();
        config.options(format!("{options} -c plan_cache_mode=auto").trim_start());
        let store = PgStore {
            config,
            tls,
            slots: (0..POOL_SIZE).map(|_| Mutex::new(None)).collect(),
            next: Arc::new(AtomicUsize::new(0)),
            batched: Default::default(),
        };
        let mut conn = store.conn().await?;
        pg_schema::migrate(conn.client_mut()).await?;
        drop(conn);
        Ok(store)
    }

    /// A connection, preferring one driven by this thread's runtime, then an unopened slot
    /// (opened here), then any free one. HTTP is served by threads with a runtime each (see
    /// [`crate::http::threads`]): a connection driven by another thread's runtime costs two
    /// wake-ups of that thread per statement. Reports ran 10–15% slower before this.
    pub(super) async fn conn(&self) -> Result<Conn<'_>, MetaError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let here = std::thread::current().id();
        let mut other = None;
        let mut unopened = None;
        let mut own = None;
        for k in 0..POOL_SIZE {
            let Ok(slot) = self.slots[(start + k) % POOL_SIZE].try_lock() else {
                continue;
            };
            match slot.as_ref() {
                Some(p) if p.home == here && !p.client.is_closed() => {
                    own = Some(slot);
                    break;
                }
                Some(p) if !p.client.is_closed() => {
                    other.get_or_insert(slot);
                }
                _ => {
                    unopened.get_or_insert(slot);
                }
            }
        }
        let mut slot = match own.or(unopened).or(other) {
            Some(s) => s,
            None => self.slots[start % POOL_SIZE].lock().await,
        };
        if slot.as_ref().is_none_or(|p| p.client.is_closed()) {
            let client = match &self.tls {
                Some(tls) => {
                    let (client, connection) =
                        self.config.connect(tls.clone()).await.map_err(backend)?;
                    tokio::spawn(watch(connection));
                    client
                }
                None => {
                    let (client, connection) = self.config.connect(NoTls).await.map_err(backend)?;
                    tokio::spawn(watch(connection));
                    client
                }
            };
            *slot = Some(Pooled {
                client,
                statements: Default::default(),
                home: std::thread::current().id(),
            });
        }
        Ok(Conn(slot))
    }
}

/// Drives a connection until it ends, saying why if that was not a clean close.
async fn watch<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::warn!(error = %e, "PostgreSQL connection ended");
    }
}

/// The NOTIFY channel task transitions go out on.
pub(super) const EVENTS_CHANNEL: &str = "fwrepo_events";

/// Listens on [`EVENTS_CHANNEL`] on its own connection and passes each payload on, until the
/// connection ends or `cancel` fires. A full queue drops payloads (the listener fell behind).
async fn listen<S, T>(
    connected: Result<(Client, tokio_postgres::Connection<S, T>), tokio_postgres::Error>,
    tx: &mpsc::Sender<String>,
    cancel: &CancellationToken,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (client, mut connection) = connected?;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {EVENTS_CHANNEL}");
    let mut listen = std::pin::pin!(client.batch_execute(&statement));
    let mut listening = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            done = &mut listen, if !listening => {
                done?;
                listening = true;
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let _ = tx.try_send(n.payload().to_owned());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
        }
    }
}

pub(super) type Params<'a> = [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// One statement on a pooled connection.
impl PgStore {
    pub(super) async fn execute(&self, sql: &str, params: &Params<'_>) -> Result<u64, MetaError> {
        let mut c = self.conn().await?;
        let st = c.statement(sql).await?;
        let r = c.client().execute(&st, params).await;
        c.checked(r)
    }

    pub(super) async fn query(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, MetaError> {
        let mut c = self.conn().await?;
        let st = c.statement(sql).await?;
        let r = c.client().query(&st, params).await;
        c.checked(r)
    }

    pub(super) async fn query_opt(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, MetaError> {
        let mut c = self.conn().await?;
        let st = c.statement(sql).await?;
        let r = c.client().query_opt(&st, params).await;
        c.checked(r)
    }

    pub(super) async fn query_one(&self, sql: &str, params: &Params<'_>) -> Result<Row, MetaError> {
        let mut c = self.conn().await?;
        let st = c.statement(sql).await?;
        let r = c.client().query_one(&st, params).await;
        c.checked(r)
    }
}

/// A connection taken from the pool.
pub(super) struct Conn<'a>(MutexGuard<'a, Option<Pooled>>);

impl Conn<'_> {
    pub(super) fn client(&self) -> &Client {
        &self.0.as_ref().expect("connected").client
    }

    pub(super) fn client_mut(&mut self) -> &mut Client {
        &mut self.0.as_mut().expect("connected").client
    }

    /// `sql` prepared on this connection, once per [`PLAN_LIFETIME`].
    pub(super) async fn statement(&mut self, sql: &str) -> Result<Statement, MetaError> {
        self.statement_within(sql, PLAN_LIFETIME).await
    }

    /// `sql` as prepared on this connection less than `lifetime` ago, or prepared now.
    async fn statement_within(
        &mut self,
        sql: &str,
        lifetime: Duration,
    ) -> Result<Statement, MetaError> {
        let pooled = self.0.as_mut().expect("connected");
        if let Some((st, at)) = pooled.statements.get(sql) {
            if at.elapsed() < lifetime {
                return Ok(st.clone());
            }
        }
        let st = pooled.client.prepare(sql).await.map_err(backend)?;
        // The replaced statement is closed on the server when its last clone goes.
        pooled
            .statements
            .insert(sql.to_owned(), (st.clone(), Instant::now()));
        Ok(st)
    }

    /// A statement's result; after a failure the connection's statements are prepared
    /// afresh, in case the schema changed under them (another instance upgraded it).
    pub(super) fn checked<T>(
        &mut self,
        r: Result<T, tokio_postgres::Error>,
    ) -> Result<T, MetaError> {
        if r.is_err() {
            self.forget_statements();
        }
        r.map_err(backend)
    }

    /// Prepares every statement again from the next use on.
    pub(super) fn forget_statements(&mut self) {
        if let Some(p) = self.0.as_mut() {
            p.statements.clear();
        }
    }
}

#[async_trait]
impl FirmwareCatalog for PgStore {
    async fn get(&self, name: &str) -> Result<Option<FirmwareRecord>, MetaError> {
        let row = self
            .query_opt(
                "SELECT record FROM fwrepo_firmware WHERE name = $1",
                &[&name],
            )
            .await?;
        row.map(|r| decode(name, r.get(0))).transpose()
    }

    async fn insert_new(
        &self,
        record: &FirmwareRecord,
    ) -> Result<Option<FirmwareRecord>, MetaError> {
        let json = encode(record)?;
        let inserted = self
            .execute(
                "INSERT INTO fwrepo_firmware (name, blob_key, size, expires_at_ms, record)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
                &[
                    &record.name,
                    &record.blob_key,
                    &(record.size as i64),
                    &record.expires_at_ms,
                    &json,
                ],
            )
            .await?;
        if inserted == 1 {
            return Ok(None);
        }
        // Taken: the holder (or, had it just gone, try once more).
        match self.get(&record.name).await? {
            Some(holder) => Ok(Some(holder)),
            None => Box::pin(self.insert_new(record)).await,
        }
    }

    async fn replace(&self, old: &FirmwareRecord, new: &FirmwareRecord) -> Result<bool, MetaError> {
        if new.name != old.name || new.blob_key != old.blob_key {
            return Ok(false);
        }
        // The stored JSON compared as jsonb, nulls left out: equal documents whatever their
        // spacing and key order, and whether an absent field was stored as null or not at
        // all (records from before a field existed); a record add_digests extended since
        // is not equal.
        let n = self
            .execute(
                "UPDATE fwrepo_firmware SET size = $3, expires_at_ms = $4, record = $5
                 WHERE name = $1 AND blob_key = $2
                   AND jsonb_strip_nulls(record::jsonb) = jsonb_strip_nulls($6::text::jsonb)",
                &[
                    &new.name,
                    &new.blob_key,
                    &(new.size as i64),
                    &new.expires_at_ms,
                    &encode(new)?,
                    &encode(old)?,
                ],
            )
            .await?;
        Ok(n == 1)
    }

    async fn add_digests(
        &self,
        name: &str,
        blob_key: &str,
        sha1: &str,
        md5: &str,
    ) -> Result<bool, MetaError> {
        let n = self
            .execute(
                "UPDATE fwrepo_firmware SET record = (record::jsonb
                     || jsonb_build_object('sha1', $3::text, 'md5', $4::text))::text
                 WHERE name = $1 AND blob_key = $2",
                &[&name, &blob_key, &sha1, &md5],
            )
            .await?;
        Ok(n == 1)
    }

    async fn remove(&self, name: &str, blob_key: &str) -> Result<bool, MetaError> {
        let n = self
            .execute(
                "DELETE FROM fwrepo_firmware WHERE name = $1 AND blob_key = $2",
                &[&name, &blob_key],
            )
            .await?;
        Ok(n == 1)
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FirmwareRecord>, MetaError> {
        let found = self
            .query(
                "SELECT record FROM fwrepo_firmware
                 WHERE name >= $1 AND left(name, char_length($1)) = $1 AND name > $2
                 ORDER BY name LIMIT $3",
                &[
                    &prefix,
                    &from(after),
                    &(limit.min(i64::MAX as usize) as i64),
                ],
            )
            .await?;
        rows(&found, "record")
    }

    async fn totals(&self) -> Result<(u64, u64), MetaError> {
        let row = self
            .query_one(
                "SELECT count(*), coalesce(sum(size), 0)::BIGINT FROM fwrepo_firmware",
                &[],
            )
            .await?;
        Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
    }
}

#[async_trait]
impl ExpiryIndex for PgStore {
    async fn next_expiry_after(&self, after_ms: i64) -> Result<Option<i64>, MetaError> {
        let row = self
            .query_one(
                "SELECT min(expires_at_ms) FROM fwrepo_firmware WHERE expires_at_ms > $1",
                &[&after_ms],
            )
            .await?;
        Ok(row.get(0))
    }

    async fn expired(
        &self,
        now_ms: i64,
        after: Option<&FirmwareRecord>,
        limit: usize,
    ) -> Result<Vec<FirmwareRecord>, MetaError> {
        let (after_at, after_name) = match after {
            Some(r) => (r.expires_at_ms.unwrap_or(0), r.name.as_str()),
            None => (i64::MIN, ""),
        };
        let found = self
            .query(
                "SELECT record FROM fwrepo_firmware
                 WHERE expires_at_ms <= $1 AND (expires_at_ms, name) > ($2, $3)
                 ORDER BY expires_at_ms, name LIMIT $4",
                &[&now_ms, &after_at, &after_name, &(limit as i64)],
            )
            .await?;
        rows(&found, "record")
    }
}

/// A task's JSON and due time, computed once per write.
pub(super) type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

/// A task's columns.
pub(super) struct TaskRow {
    pub(super) id: String,
    pub(super) device_id: String,
    pub(super) firmware: String,
    pub(super) active: bool,
    pub(super) due: Option<i64>,
    pub(super) holds_quota: bool,
    pub(super) importing: bool,
    pub(super) json: String,
}

impl TaskRow {
    pub(super) fn of(t: &FotaTask) -> Result<TaskRow, MetaError> {
        Ok(TaskRow {
            id: t.id.clone(),
            device_id: t.device_id.clone(),
            firmware: t.firmware.clone(),
            active: t.is_active(),
            due: t.due_ms(),
            holds_quota: t.holds_quota(),
            importing: t.is_importing(),
            json: encode(t)?,
        })
    }

    /// `$1` to `$8` of `INSERT_TASK` and `UPDATE_TASK`.
    pub(super) fn params(&self) -> Vec<Param<'_>> {
        vec![
            &self.id,
            &self.device_id,
            &self.firmware,
            &self.active,
            &self.due,
            &self.holds_quota,
            &self.importing,
            &self.json,
        ]
    }
}

pub(super) const UPDATE_TASK: &str = "UPDATE fwrepo_tasks SET device_id = $2, firmware = $3,
    active = $4, due_ms = $5, holds_quota = $6, importing = $7, task = $8, revision = $9
    WHERE id = $1 AND revision = $10";

/// `UPDATE_TASK` that also announces, in the same transaction, when it stores the task.
pub(super) const UPDATE_TASK_ANNOUNCED: &str =
    "WITH stored AS (UPDATE fwrepo_tasks SET device_id = $2,
    firmware = $3, active = $4, due_ms = $5, holds_quota = $6, importing = $7, task = $8,
    revision = $9 WHERE id = $1 AND revision = $10 RETURNING 1)
    SELECT pg_notify($11, $12) FROM stored";

/// `plain`, or with an announcement `announced`, which takes the channel and the message
/// after `params`.
pub(super) fn announcing<'a>(
    params: &mut Vec<Param<'a>>,
    announce: &'a Option<&str>,
    plain: &'static str,
    announced: &'static str,
) -> &'static str {
    match announce {
        Some(message) => {
            params.push(&EVENTS_CHANNEL);
            params.push(message);
            announced
        }
        None => plain,
    }
}

/// A page of one device's tasks, after a task id.
const LIST_DEVICE_TASKS: &str =
    "SELECT task FROM fwrepo_tasks WHERE device_id = $1 AND id > $2 ORDER BY id LIMIT $3";

/// A page of all tasks, after a task id.
const LIST_TASKS: &str = "SELECT task FROM fwrepo_tasks WHERE id > $1 ORDER BY id LIMIT $2";

/// Where a page starts: after the cursor, or, with none, after the empty string, which sorts
/// before every key (keys are never empty). A page's statement has no optional filter
/// (`$1 IS NULL OR key > $1`): the generic plan PostgreSQL may keep for it could not use the
/// key's index, and scanned from the first key for every page (a device's tasks at 100,000
/// tasks: 281 ms, against 0.25 ms on the index).
pub(super) fn from(after: Option<&str>) -> &str {
    after.unwrap_or("")
}

const COUNT_QUOTA: &str = "SELECT count(*) FROM fwrepo_tasks WHERE holds_quota";

/// The advisory lock taking a quota slot holds.
const QUOTA_LOCK: i64 = 7366436516046734;

const INSERT_TASK: &str = "INSERT INTO fwrepo_tasks
    (id, device_id, firmware, active, due_ms, holds_quota, importing, task)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// `INSERT_TASK` that also announces, in the same transaction.
const INSERT_TASK_ANNOUNCED: &str = "WITH stored AS (INSERT INTO fwrepo_tasks
    (id, device_id, firmware, active, due_ms, holds_quota, importing, task)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING 1)
    SELECT pg_notify($9, $10) FROM stored";

impl PgStore {
    /// A task outside any campaign, in a statement of its own.
    pub(super) async fn create_alone(
        &self,
        row: &TaskRow,
        announce: Option<&str>,
    ) -> Result<Created, MetaError> {
        let mut params = row.params();
        let statement = announcing(&mut params, &announce, INSERT_TASK, INSERT_TASK_ANNOUNCED);
        let mut c = self.conn().await?;
        let st = c.statement(statement).await?;
        let r = c.client().execute(&st, &params).await;
        if r.as_ref()
            .is_err_and(|e| e.code() != Some(&SqlState::UNIQUE_VIOLATION))
        {
            c.forget_statements();
        }
        drop(c);
        self.created(r.map(|_| ()), &row.device_id).await
    }

    /// What an insert's outcome means: a unique violation while the device has an active
    /// task is that task's.
    async fn created(
        &self,
        inserted: Result<(), tokio_postgres::Error>,
        device_id: &str,
    ) -> Result<Created, MetaError> {
        match inserted {
            Ok(()) => Ok(Created::Stored),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                match self.active_task(device_id).await? {
                    Some(active) => Ok(Created::DeviceBusy(active)),
                    None => Err(backend(e)),
                }
            }
            Err(e) => Err(backend(e)),
        }
    }
}

#[async_trait]
impl TaskStore for PgStore {
    fn shared(&self) -> bool {
        true
    }

    fn announcements(&self, cancel: CancellationToken) -> Option<mpsc::Receiver<String>> {
        let (tx, rx) = mpsc::channel(1024);
        let (config, tls) = (self.config.clone(), self.tls.clone());
        tokio::spawn(async move {
            loop {
                let ended = match &tls {
                    Some(tls) => listen(config.connect(tls.clone()).await, &tx, &cancel).await,
                    None => listen(config.connect(NoTls).await, &tx, &cancel).await,
                };
                if cancel.is_cancelled() || tx.is_closed() {
                    return;
                }
                if let Err(e) = ended {
                    tracing::warn!(error = %backend(e), "PostgreSQL LISTEN connection lost; reconnecting");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        });
        Some(rx)
    }

    async fn create_task(
        &self,
        task: &FotaTask,
        announce: Option<&str>,
    ) -> Result<Created, MetaError> {
        let row = TaskRow::of(task)?;
        let Some(link) = &task.campaign else {
            let announce = announce.map(str::to_owned);
            let creation = pg_batched::Creation { row, announce };
            return self.batched.creations.run(self, creation).await;
        };
        let mut params = row.params();
        let statement = announcing(&mut params, &announce, INSERT_TASK, INSERT_TASK_ANNOUNCED);
        // One transaction: the member's move and the task, which the unique index on active
        // tasks per device may refuse.
        let inserted = {
            let mut c = self.conn().await?;
            let tx = c.client_mut().transaction().await.map_err(backend)?;
            let Some(old) = pg_fleet::lock_member(&tx, &link.id, &task.device_id)
                .await?
                .filter(|m| m.status == member::WAITING || m.status == member::SKIPPED)
            else {
                return Ok(Created::MemberTaken);
            };
            match tx.execute(statement, &params).await {
                Ok(_) => {
                    pg_fleet::moved(&tx, &link.id, Some(&old), &old.released_to(task)).await?;
                    tx.commit().await
                }
                Err(e) => Err(e),
            }
        };
        self.created(inserted, &task.device_id).await
    }

    async fn get_task(&self, id: &str) -> Result<Option<FotaTask>, MetaError> {
        let json = self.batched.tasks.run(self, id.to_owned()).await?;
        json.map(|j| decode(id, &j)).transpose()
    }

    async fn put_task(
        &self,
        task: &FotaTask,
        expected: u64,
        quota: Option<u64>,
        announce: Option<&str>,
    ) -> Result<Put, MetaError> {
        if quota.is_none() && task.campaign.is_none() {
            let update = pg_batched::Update {
                row: TaskRow::of(task)?,
                revision: task.revision as i64,
                expected: expected as i64,
                announce: announce.map(str::to_owned),
            };
            let stored = self.batched.updates.run(self, update).await?;
            return Ok(if stored { Put::Stored } else { Put::Stale });
        }
        let row = TaskRow::of(task)?;
        let (revision, expected) = (task.revision as i64, expected as i64);
        let mut params = row.params();
        params.extend([&revision as Param, &expected]);
        // The announcement goes out at commit, and only if the task was stored.
        let statement = announcing(&mut params, &announce, UPDATE_TASK, UPDATE_TASK_ANNOUNCED);
        let mut c = self.conn().await?;
        let tx = c.client_mut().transaction().await.map_err(backend)?;
        if let Some(limit) = quota {
            // Instances taking a slot queue on one lock; counting the holders and storing
            // the task then commit together.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&QUOTA_LOCK])
                .await
                .map_err(backend)?;
            let holders: i64 = tx
                .query_one(COUNT_QUOTA, &[])
                .await
                .map_err(backend)?
                .get(0);
            if holders as u64 >= limit {
                return Ok(Put::QuotaFull);
            }
        }
        if tx.execute(statement, &params).await.map_err(backend)? != 1 {
            return Ok(Put::Stale);
        }
        pg_fleet::follow(&tx, task).await?;
        tx.commit().await.map_err(backend)?;
        Ok(Put::Stored)
    }

    async fn active_task(&self, device_id: &str) -> Result<Option<String>, MetaError> {
        self.batched.active.run(self, device_id.to_owned()).await
    }

    async fn active_task_of(&self, device_id: &str) -> Result<Option<FotaTask>, MetaError> {
        let json = self
            .batched
            .active_tasks
            .run(self, device_id.to_owned())
            .await?;
        json.map(|j| decode(device_id, &j)).transpose()
    }

    async fn list_tasks(
        &self,
        device_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FotaTask>, MetaError> {
        let limit = limit.min(i64::MAX as usize) as i64;
        let found = match device_id {
            Some(device) => {
                self.query(LIST_DEVICE_TASKS, &[&device, &from(after), &limit])
                    .await?
            }
            None => self.query(LIST_TASKS, &[&from(after), &limit]).await?,
        };
        rows(&found, "task")
    }

    async fn next_due(&self) -> Result<Option<i64>, MetaError> {
        let row = self
            .query_one("SELECT min(due_ms) FROM fwrepo_tasks", &[])
            .await?;
        Ok(row.get(0))
    }

    async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<FotaTask>, MetaError> {
        let found = self
            .query(
                "SELECT task FROM fwrepo_tasks WHERE due_ms <= $1 ORDER BY due_ms, id LIMIT $2",
                &[&now_ms, &(limit.min(i64::MAX as usize) as i64)],
            )
            .await?;
        rows(&found, "task")
    }

    async fn quota_holders(&self) -> Result<u64, MetaError> {
        let row = self.query_one(COUNT_QUOTA, &[]).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn importing(&self) -> Result<Vec<FotaTask>, MetaError> {
        let found = self
            .query(
                "SELECT task FROM fwrepo_tasks WHERE importing ORDER BY id",
                &[],
            )
            .await?;
        rows(&found, "task")
    }

    async fn firmware_in_use(&self, name: &str) -> Result<bool, MetaError> {
        let row = self
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM fwrepo_tasks WHERE firmware = $1 AND active)",
                &[&name],
            )
            .await?;
        Ok(row.get(0))
    }
}

#[async_trait]
impl ScheduleStore for PgStore {
    async fn get_schedule(&self, name: &str) -> Result<Option<Schedule>, MetaError> {
        let row = self
            .query_opt(
                "SELECT schedule FROM fwrepo_schedules WHERE name = $1",
                &[&name],
            )
            .await?;
        row.map(|r| decode(name, r.get(0))).transpose()
    }

    async fn put_schedule(&self, schedule: &Schedule) -> Result<(), MetaError> {
        let json = encode(schedule)?;
        self.execute(
            "INSERT INTO fwrepo_schedules (name, schedule) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET schedule = $2",
            &[&schedule.name, &json],
        )
        .await?;
        Ok(())
    }

    async fn list_schedules(&self) -> Result<Vec<Schedule>, MetaError> {
        let found = self
            .query("SELECT schedule FROM fwrepo_schedules ORDER BY name", &[])
            .await?;
        rows(&found, "schedule")
    }

    async fn delete_schedule(&self, name: &str) -> Result<bool, MetaError> {
        let n = self
            .execute("DELETE FROM fwrepo_schedules WHERE name = $1", &[&name])
            .await?;
        Ok(n == 1)
    }
}

#[async_trait]
impl TokenTable for PgStore {
    async fn any_token(&self) -> Result<bool, MetaError> {
        self.batched.any_token.run(self, ()).await
    }

    async fn token_by_hash(&self, sha256: &str) -> Result<Option<StoredToken>, MetaError> {
        let found = self
            .query_opt(
                "SELECT token FROM fwrepo_tokens WHERE sha256 = $1",
                &[&sha256],
            )
            .await?;
        found
            .map(|r| decode("token", r.get::<_, &str>(0)))
            .transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<StoredToken>, MetaError> {
        let found = self
            .query("SELECT token FROM fwrepo_tokens ORDER BY seq", &[])
            .await?;
        rows(&found, "token")
    }

    async fn insert_token(&self, token: &StoredToken) -> Result<bool, MetaError> {
        let n = self
            .execute(
                "INSERT INTO fwrepo_tokens (id, name, sha256, token) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO NOTHING",
                &[&token.id, &token.name, &token.sha256, &encode(token)?],
            )
            .await?;
        Ok(n == 1)
    }

    async fn remove_token(
        &self,
        name_or_id: &str,
        keep_last_admin: bool,
    ) -> Result<Result<StoredToken, crate::auth::AuthError>, MetaError> {
        // Revocations queue on one lock, so two admins revoking each other cannot both pass
        // the last-admin check.
        let mut c = self.conn().await?;
        let tx = c.client_mut().transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&TOKENS_LOCK])
            .await
            .map_err(backend)?;
        let found = tx
            .query("SELECT token FROM fwrepo_tokens ORDER BY seq", &[])
            .await
            .map_err(backend)?;
        let tokens: Vec<StoredToken> = rows(&found, "token")?;
        let at = match crate::auth::pick(&tokens, name_or_id, keep_last_admin) {
            Ok(at) => at,
            Err(e) => return Ok(Err(e)),
        };
        let gone = tokens.into_iter().nth(at).expect("picked from the list");
        tx.execute("DELETE FROM fwrepo_tokens WHERE name = $1", &[&gone.name])
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(Ok(gone))
    }
}

/// The advisory lock token revocations hold.
const TOKENS_LOCK: i64 = 7366436516046735;

#[cfg(test)]
mod tests {
    /// A fresh database on the server scripts/test starts (`TEST_POSTGRES_URL`, a URL to
    /// a database this test may create others from); `None` (skip) without one, except
    /// under CI where PostgreSQL must be there.
    pub async fn fresh_database() -> Option<String> {
        let Ok(admin) = std::env::var("TEST_POSTGRES_URL") else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("TEST_POSTGRES_URL is required under CI=true (scripts/test sets it)");
            }
            eprintln!("SKIPPED: TEST_POSTGRES_URL is not set; run scripts/test");
            return None;
        };
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .expect("test PostgreSQL reachable");
        tokio::spawn(conn);
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).unwrap();
        let db = format!("fwrepo_test_{}", hex::encode(id));
        client
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        let base = admin.rsplit_once('/').expect("URL with a database").0;
        Some(format!("{base}/{db}"))
    }

    /// The CA that signed the test server's certificate (`TEST_POSTGRES_CA`, set by
    /// scripts/test, whose server has TLS on with a certificate for `localhost` only).
    fn test_ca() -> Option<String> {
        match std::env::var("TEST_POSTGRES_CA") {
            Ok(ca) => Some(ca),
            Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("TEST_POSTGRES_CA is required under CI=true (scripts/test sets it)")
            }
            Err(_) => {
                eprintln!("SKIPPED: TEST_POSTGRES_CA is not set; run scripts/test");
                None
            }
        }
    }

    /// Whether the store's connection to the server is encrypted, as the server sees it.
    async fn encrypted(url: &str) -> Result<bool, crate::meta::MetaError> {
        let store = super::PgStore::open(url).await?;
        let conn = store.conn().await?;
        let row = conn
            .client()
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(super::backend)?;
        Ok(row.get(0))
    }

    #[tokio::test]
    async fn tls_as_libpq_chooses_it() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let Some(ca) = test_ca() else {
            return;
        };
        assert!(url.contains("//fwrepo@127.0.0.1:"), "{url}");
        let by_name = url.replacen("@127.0.0.1:", "@localhost:", 1);

        // verify-full: the chain and the name the certificate carries.
        let full = format!("{by_name}?sslmode=verify-full&sslrootcert={ca}");
        assert!(encrypted(&full).await.unwrap());
        // By address the name does not match: verify-full refuses, verify-ca accepts.
        let e = encrypted(&format!("{url}?sslmode=verify-full&sslrootcert={ca}"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("certificate not valid for name"), "{e}");
        let chain = format!("{url}?sslmode=verify-ca&sslrootcert={ca}");
        assert!(encrypted(&chain).await.unwrap());

        // A root that did not sign the server's certificate is refused by both.
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other-ca.pem");
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=another CA", "-keyout"])
            .arg(dir.path().join("other-ca.key"))
            .arg("-out")
            .arg(&other)
            .output()
            .expect("openssl runs");
        assert!(made.status.success(), "{made:?}");
        let other = other.display();
        for mode in ["verify-full", "verify-ca", "require"] {
            let e = encrypted(&format!("{by_name}?sslmode={mode}&sslrootcert={other}"))
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains("UnknownIssuer"), "{mode}: {e}");
        }

        // require and prefer (the default) encrypt without checking; disable does not.
        assert!(encrypted(&format!("{url}?sslmode=require")).await.unwrap());
        assert!(encrypted(&url).await.unwrap());
        assert!(!encrypted(&format!("{url}?sslmode=disable")).await.unwrap());
    }

    #[tokio::test]
    async fn tokens_in_postgres_behave() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let store = crate::auth::TokenStore::table(std::sync::Arc::new(
            super::PgStore::open(&url).await.unwrap(),
        ));
        let other = crate::auth::TokenStore::table(std::sync::Arc::new(
            super::PgStore::open(&url).await.unwrap(),
        ));
        crate::auth::tokens_tests::behaves(&store, &other).await;
        // Only the hash is stored.
        let made = store
            .create("kept", crate::auth::Role::Reader)
            .await
            .unwrap();
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let all: String = client
            .query_one(
                "SELECT string_agg(id || name || sha256 || token, '') FROM fwrepo_tokens",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(all.contains(&made.info.id) && !all.contains(&made.token));
    }

    #[tokio::test]
    async fn schema_versions_upgrade_and_refuse_newer() {
        use crate::meta::pg_schema::{MIGRATIONS, VERSION};
        use crate::meta::{Put, TaskStore};
        let Some(url) = fresh_database().await else {
            return;
        };
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        // A database from before versions were recorded: the first tables, a task in them.
        client.batch_execute(MIGRATIONS[0]).await.unwrap();
        let mut t = crate::model::task::tests::task(false);
        t.id = "old".into();
        client
            .execute(
                "INSERT INTO fwrepo_tasks (id, device_id, firmware, active, due_ms, holds_quota,
                 importing, task) VALUES ($1, $2, $3, true, NULL, false, false, $4)",
                &[
                    &t.id,
                    &t.device_id,
                    &t.firmware,
                    &serde_json::to_string(&t).unwrap(),
                ],
            )
            .await
            .unwrap();
        let version = async || -> i32 {
            client
                .query_one("SELECT version FROM fwrepo_schema", &[])
                .await
                .unwrap()
                .get(0)
        };

        let store = super::PgStore::open(&url).await.unwrap();
        assert_eq!(version().await, VERSION);
        let mut stored = store.get_task("old").await.unwrap().unwrap();
        assert_eq!(stored, t);
        stored.revision = 1;
        assert_eq!(
            store.put_task(&stored, 0, None, None).await.unwrap(),
            Put::Stored
        );
        let token = crate::auth::TokenStore::table(std::sync::Arc::new(store));
        token.create("ops", crate::auth::Role::Admin).await.unwrap();

        // Opening again changes nothing; a schema newer than this build is refused.
        super::PgStore::open(&url).await.unwrap();
        assert_eq!(version().await, VERSION);
        client
            .execute("UPDATE fwrepo_schema SET version = $1", &[&(VERSION + 1)])
            .await
            .unwrap();
        let e = super::PgStore::open(&url).await.err().unwrap().to_string();
        assert!(e.contains("newer than this fwrepo knows"), "{e}");
    }

    /// Tasks for plans to be chosen over: 5,000 of 500 devices (`t1`…, `d0`…).
    const FIVE_THOUSAND_TASKS: &str = "INSERT INTO fwrepo_tasks (id, device_id, firmware,
             active, due_ms, holds_quota, importing, task, revision)
         SELECT 't' || i, 'd' || (i % 500), 'fw', false, NULL, false, false, '{}', 0
         FROM generate_series(1, 5000) AS i";

    /// A look-up by a batch of keys settles on one generic plan, and a statement is prepared
    /// again once its lifetime is over.
    #[tokio::test]
    async fn a_batch_look_up_settles_on_a_generic_plan_until_it_is_prepared_again() {
        use std::time::Duration;
        let Some(url) = fresh_database().await else {
            return;
        };
        let store = super::PgStore::open(&url).await.unwrap();
        let mut conn = store.conn().await.unwrap();
        // Plans are chosen by the table's size.
        conn.client()
            .batch_execute(&format!("{FIVE_THOUSAND_TASKS}; ANALYZE fwrepo_tasks"))
            .await
            .unwrap();
        // This connection's prepared statements of `sql` on the server: name, and how many
        // runs took the generic plan and how many were planned for their parameters.
        async fn prepared(client: &tokio_postgres::Client, sql: &str) -> Vec<(String, i64, i64)> {
            let rows = client
                .query(
                    "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements
                     WHERE statement = $1",
                    &[&sql],
                )
                .await
                .unwrap();
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect()
        }
        let long = Duration::from_secs(3600);

        // A batch's look-up by key, eight runs of 40 keys: planned for the first five, then
        // one generic plan serves.
        let by_key = "SELECT task FROM fwrepo_tasks WHERE id = ANY($1)";
        for run in 0..8 {
            let ids: Vec<String> = (0..40).map(|i| format!("t{}", run * 40 + i + 1)).collect();
            let st = conn.statement_within(by_key, long).await.unwrap();
            assert_eq!(conn.client().query(&st, &[&ids]).await.unwrap().len(), 40);
        }
        let kept = prepared(conn.client(), by_key).await;
        assert_eq!(kept.len(), 1, "one statement for every run: {kept:?}");
        assert_eq!((kept[0].1, kept[0].2), (3, 5), "{kept:?}");

        // Once its lifetime is over the statement is prepared again, and the one it replaced
        // is closed on the server, not left behind.
        let fresh = conn.statement_within(by_key, Duration::ZERO).await.unwrap();
        conn.client()
            .query(&fresh, &[&vec!["t1".to_owned()]])
            .await
            .unwrap();
        let now = prepared(conn.client(), by_key).await;
        assert_eq!(now.len(), 1, "{now:?}");
        assert_ne!(now[0].0, kept[0].0, "{now:?}");
        assert_eq!((now[0].1, now[0].2), (0, 1), "{now:?}");
    }

    /// A page's statement, on the generic plan PostgreSQL may keep for it, walks the index of
    /// its filter and cursor: a page deep into 5,000 tasks or devices reads one page's rows.
    #[tokio::test]
    async fn page_statements_walk_their_index_on_a_generic_plan() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let store = super::PgStore::open(&url).await.unwrap();
        let conn = store.conn().await.unwrap();
        conn.client()
            .batch_execute(&format!(
                "{FIVE_THOUSAND_TASKS};
                 INSERT INTO fwrepo_devices (device_id, info)
                 SELECT 'd' || i, '{{}}' FROM generate_series(1, 5000) AS i;
                 ANALYZE fwrepo_tasks; ANALYZE fwrepo_devices;
                 SET plan_cache_mode = force_generic_plan"
            ))
            .await
            .unwrap();
        for (i, (sql, args, index)) in [
            (
                super::LIST_DEVICE_TASKS,
                "'d7', 't4000', 10",
                "fwrepo_tasks_device",
            ),
            (super::LIST_TASKS, "'t4000', 10", "fwrepo_tasks_pkey"),
            (
                super::super::pg_fleet::LIST_DEVICES,
                "'d4000', 10",
                "fwrepo_devices_pkey",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            conn.client()
                .batch_execute(&format!("PREPARE page{i} AS {sql}"))
                .await
                .unwrap();
            let plan: Vec<String> = conn
                .client()
                .query(&format!("EXPLAIN EXECUTE page{i}({args})"), &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let plan = plan.join("\n");
            assert!(plan.contains(index), "{sql}:\n{plan}");
            assert!(plan.contains("Index Cond"), "{sql}:\n{plan}");
            assert!(!plan.contains("Filter"), "{sql}:\n{plan}");
        }
    }

    #[tokio::test]
    async fn announcements_go_out_with_stored_writes_only() {
        use crate::meta::{Put, TaskStore};
        use std::time::Duration;
        let Some(url) = fresh_database().await else {
            return;
        };
        let store = super::PgStore::open(&url).await.unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut heard = store.announcements(cancel.clone()).unwrap();
        let mut t = crate::model::task::tests::task(false);
        assert_eq!(
            store.create_task(&t, Some("created")).await.unwrap(),
            super::super::Created::Stored
        );
        // LISTEN starts on its own connection: write until the first announcement is heard.
        let first = loop {
            t.revision += 1;
            let put = store.put_task(&t, t.revision - 1, None, Some("probe"));
            assert_eq!(put.await.unwrap(), Put::Stored);
            let next = tokio::time::timeout(Duration::from_millis(200), heard.recv());
            if let Ok(got) = next.await {
                break got.unwrap();
            }
        };
        assert!(["created", "probe"].contains(&first.as_str()), "{first}");
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), heard.recv()).await
        {
        }
        // A stale write, with and without a quota slot, and a full quota announce nothing.
        let current = t.revision;
        t.revision = current + 1;
        let stale = store.put_task(&t, current + 5, None, Some("stale"));
        assert_eq!(stale.await.unwrap(), Put::Stale);
        let stale = store.put_task(&t, current + 5, Some(10), Some("stale-quota"));
        assert_eq!(stale.await.unwrap(), Put::Stale);
        let full = store.put_task(&t, current, Some(0), Some("full"));
        assert_eq!(full.await.unwrap(), Put::QuotaFull);
        // A second task for the device is refused and announces nothing.
        let mut twin = crate::model::task::tests::task(false);
        twin.id = "twin".into();
        assert!(
            store.create_task(&twin, Some("twin")).await.unwrap() != super::super::Created::Stored
        );
        let stored = store.put_task(&t, current, Some(10), Some("stored"));
        assert_eq!(stored.await.unwrap(), Put::Stored);
        let next = tokio::time::timeout(Duration::from_secs(10), heard.recv());
        assert_eq!(next.await.unwrap().unwrap(), "stored");
        cancel.cancel();
    }

    /// Updates that arrive together share statements, and each caller learns its own
    /// outcome: stored, stale, or the error of a row the database refused, which costs the
    /// other rows of its batch nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_task_updates_share_statements_and_keep_their_own_outcomes() {
        use crate::meta::{Created, Put, TaskStore};
        use crate::model::task::{tests::task, Status};
        let Some(url) = fresh_database().await else {
            return;
        };
        let store = super::PgStore::open(&url).await.unwrap();
        let n = 40;
        let mut tasks = Vec::new();
        for i in 0..n {
            let mut t = task(false);
            (t.id, t.device_id) = (format!("t{i:02}"), format!("d{i:02}"));
            assert_eq!(store.create_task(&t, None).await.unwrap(), Created::Stored);
            tasks.push(t);
        }
        // d00's first task ends, and the device gets a second, active one.
        let mut ended = tasks[0].clone();
        ended.set(Status::Cancelled, None, 1);
        ended.revision = 1;
        assert_eq!(
            store.put_task(&ended, 0, None, None).await.unwrap(),
            Put::Stored
        );
        let mut second = task(false);
        (second.id, second.device_id) = ("t99".into(), "d00".into());
        assert_eq!(
            store.create_task(&second, None).await.unwrap(),
            Created::Stored
        );

        let batches_before = store.batched.updates.batches();
        tasks[0] = ended;
        let puts = tasks.iter().enumerate().map(|(i, t)| {
            let (store, mut t) = (store.clone(), t.clone());
            tokio::spawn(async move {
                t.revision += 1;
                t.note = Some(format!("update {i}"));
                // Odd ones expect a revision the task does not have. The first makes the
                // ended task active again beside d00's active one: the database refuses it.
                let expected = if i % 2 == 1 { 7 } else { t.revision - 1 };
                if i == 0 {
                    t.status = Status::Pending;
                }
                store.put_task(&t, expected, None, Some("batched")).await
            })
        });
        let outcomes = futures_util::future::join_all(puts).await;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let outcome = outcome.unwrap();
            match i {
                0 => assert!(outcome.is_err(), "the refused row: {outcome:?}"),
                i if i % 2 == 1 => assert_eq!(outcome.unwrap(), Put::Stale, "task {i}"),
                i => assert_eq!(outcome.unwrap(), Put::Stored, "task {i}"),
            }
            let stored = store.get_task(&tasks[i].id).await.unwrap().unwrap();
            let updated = i % 2 == 0 && i > 0;
            assert_eq!(stored.note.is_some(), updated, "task {i}");
        }
        let batches = store.batched.updates.batches() - batches_before;
        assert!(
            batches < n as u64,
            "{n} updates went in {batches} statements"
        );
    }

    /// Creations that arrive together share statements: each device ends with one active
    /// task, the caller refused learns which task the device is busy with, and a creation
    /// refused for another reason (an id taken) fails alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creations_share_statements_and_keep_their_own_outcomes() {
        use crate::meta::{Created, TaskStore};
        use crate::model::task::tests::task;
        let Some(url) = fresh_database().await else {
            return;
        };
        let store = super::PgStore::open(&url).await.unwrap();
        let mut busy = task(false);
        (busy.id, busy.device_id) = ("held".into(), "busy".into());
        assert_eq!(
            store.create_task(&busy, None).await.unwrap(),
            Created::Stored
        );

        // Two new tasks for each of 20 devices, one for the busy device, and one whose id
        // is the busy device's task's.
        let mut wanted = Vec::new();
        for i in 0..40 {
            wanted.push((format!("c{i:02}"), format!("d{:02}", i % 20)));
        }
        wanted.push(("c40".into(), "busy".into()));
        wanted.push(("held".into(), "fresh".into()));
        let before = store.batched.creations.batches();
        let creations = wanted.iter().map(|(id, device)| {
            let (store, mut t) = (store.clone(), task(false));
            (t.id, t.device_id) = (id.clone(), device.clone());
            tokio::spawn(async move { store.create_task(&t, Some("created")).await })
        });
        let outcomes: Vec<_> = futures_util::future::join_all(creations)
            .await
            .into_iter()
            .map(|o| o.unwrap())
            .collect();
        let batches = store.batched.creations.batches() - before;

        for k in 0..20 {
            let device = format!("d{k:02}");
            let active = store.active_task(&device).await.unwrap().unwrap();
            let pair = [k, k + 20].map(|i| outcomes[i].as_ref().unwrap().clone());
            let stored = pair.iter().filter(|o| **o == Created::Stored).count();
            assert_eq!(stored, 1, "{device}: {pair:?}");
            assert!(
                pair.contains(&Created::DeviceBusy(active.clone())),
                "{device} is busy with {active}: {pair:?}"
            );
        }
        assert_eq!(
            outcomes[40].as_ref().unwrap(),
            &Created::DeviceBusy("held".into())
        );
        assert!(outcomes[41].is_err(), "{:?}", outcomes[41]);
        assert_eq!(store.active_task("fresh").await.unwrap(), None);
        assert!(
            batches < wanted.len() as u64,
            "{} creations went in {batches} statements",
            wanted.len()
        );
    }

    /// Look-ups that arrive together share statements, and each caller gets its own key's
    /// answer, absent ones included; merges into devices that arrive together keep each
    /// other's fields and each caller gets the device as its merge left it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_lookups_and_merges_share_statements_and_answer_each_caller() {
        use crate::meta::{DeviceCredential, DeviceReads, DeviceStore, TaskStore};
        use crate::model::task::tests::task;
        use serde_json::{json, Map, Value};
        let Some(url) = fresh_database().await else {
            return;
        };
        let store = super::PgStore::open(&url).await.unwrap();
        for i in 0..30 {
            let mut t = task(false);
            (t.id, t.device_id) = (format!("t{i:02}"), format!("d{i:02}"));
            store.create_task(&t, None).await.unwrap();
            if i % 2 == 0 {
                let credential = DeviceCredential {
                    device_id: t.device_id.clone(),
                    sha256: format!("{i:064}"),
                    created_at: "2026-12-04T00:00:00Z".into(),
                };
                store.put_device_credential(&credential).await.unwrap();
            }
            if i < 10 {
                let patch: Map<String, Value> =
                    Map::from_iter([("tags".to_owned(), json!({"old": "1"}))]);
                store.merge_device(&t.device_id, &patch, 1).await.unwrap();
            }
        }
        let counts = |store: &super::PgStore| {
            let b = &store.batched;
            [
                b.tasks.batches(),
                b.active.batches(),
                b.credentials.batches(),
                b.merges.batches(),
                b.device_states.batches(),
                b.tasks_and_credentials.batches(),
            ]
        };
        let before = counts(&store);
        let calls = (0..40).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let (id, device) = (format!("t{i:02}"), format!("d{i:02}"));
                let patch: Map<String, Value> =
                    Map::from_iter([("pkgVersion".to_owned(), json!(i.to_string()))]);
                let (t, active, credential, merged, state, with) = tokio::join!(
                    store.get_task(&id),
                    store.active_task(&device),
                    store.device_credential(&device),
                    store.merge_device(&device, &patch, 2),
                    store.credential_and_active_task(&device),
                    store.task_and_credential(&id),
                );
                let (t, active, credential) = (t.unwrap(), active.unwrap(), credential.unwrap());
                (
                    t,
                    active,
                    credential,
                    merged.unwrap(),
                    state.unwrap(),
                    with.unwrap(),
                )
            })
        });
        let answers = futures_util::future::join_all(calls).await;
        for (i, answer) in answers.into_iter().enumerate() {
            let (t, active, credential, merged, state, with) = answer.unwrap();
            let (id, known) = (format!("t{i:02}"), i < 30);
            let sha = (known && i % 2 == 0).then(|| format!("{i:064}"));
            assert_eq!(t.map(|t| t.id), known.then(|| id.clone()), "task {i}");
            assert_eq!(active, known.then(|| id.clone()), "active {i}");
            assert_eq!(credential.map(|c| c.sha256), sha, "credential {i}");
            assert_eq!(state.0.map(|c| c.sha256), sha, "state's credential {i}");
            assert_eq!(
                state.1.map(|t| t.id),
                known.then(|| id.clone()),
                "state's task {i}"
            );
            let with = with.map(|(t, c)| (t.id, c.map(|c| c.sha256)));
            assert_eq!(
                with,
                known.then(|| (id.clone(), sha.clone())),
                "task with credential {i}"
            );
            let merged = serde_json::to_value(&merged).unwrap();
            assert_eq!(
                merged["pkgVersion"],
                json!(i.to_string()),
                "device {i}: {merged}"
            );
            let tags = if i < 10 {
                json!({"old": "1"})
            } else {
                json!({})
            };
            assert_eq!(merged["tags"], tags, "device {i}: {merged}");
        }
        let after = counts(&store);
        let kinds = [
            "tasks",
            "active",
            "credentials",
            "merges",
            "states",
            "tasks+credentials",
        ];
        for (kind, (b, a)) in kinds.iter().zip(before.iter().zip(after)) {
            assert!(a - b < 40, "40 {kind} calls went in {} statements", a - b);
        }
    }

    /// PostgreSQL chooses each statement's plan, whatever the server's default, and options
    /// the URL sets stay.
    #[tokio::test]
    async fn connections_let_postgresql_choose_plans_and_keep_the_urls_options() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        for url in [
            url.clone(),
            format!("{url}{sep}options=-c%20statement_timeout%3D4321"),
        ] {
            let store = super::PgStore::open(&url).await.unwrap();
            let mode = store.query_one("SHOW plan_cache_mode", &[]).await.unwrap();
            assert_eq!(mode.get::<_, String>(0), "auto", "{url}");
            if url.contains("options") {
                let timeout = store
                    .query_one("SHOW statement_timeout", &[])
                    .await
                    .unwrap();
                assert_eq!(timeout.get::<_, String>(0), "4321ms");
            }
        }
    }

    /// A record stored without the fields that are null (as versions from before those
    /// fields wrote it) is still the record read back: a change of it lands.
    #[tokio::test]
    async fn records_stored_without_null_fields_can_be_replaced() {
        use crate::meta::FirmwareCatalog;
        let Some(url) = fresh_database().await else {
            return;
        };
        let store = super::PgStore::open(&url).await.unwrap();
        let mut old = crate::meta::suite::record("old", "old-blob", None);
        old.sha1 = None;
        assert_eq!(
            FirmwareCatalog::insert_new(&store, &old).await.unwrap(),
            None
        );
        store
            .execute(
                "UPDATE fwrepo_firmware SET record = (record::jsonb - 'description' - 'version'
                     - 'retention_secs' - 'expires_at_ms')::text WHERE name = 'old'",
                &[],
            )
            .await
            .unwrap();
        let read = FirmwareCatalog::get(&store, "old").await.unwrap().unwrap();
        assert_eq!(read, old);
        let mut changed = read.clone();
        changed.description = Some("now described".into());
        assert!(FirmwareCatalog::replace(&store, &read, &changed)
            .await
            .unwrap());
        let got = FirmwareCatalog::get(&store, "old").await.unwrap();
        assert_eq!(got, Some(changed));
    }

    #[tokio::test]
    async fn postgres_passes_the_suite() {
        let Some(url) = fresh_database().await else {
            return;
        };
        let store = super::PgStore::open(&url).await.unwrap();
        crate::meta::suite::run(&store).await;
        // Opening again finds the schema in place.
        let again = super::PgStore::open(&url).await.unwrap();
        crate::meta::FirmwareCatalog::get(&again, "a")
            .await
            .unwrap()
            .unwrap();
    }
}
