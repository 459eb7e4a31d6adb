//! The PostgreSQL schema and its versions. Each migration takes the schema from one version
//! to the next; `fwrepo_schema` records the version reached. Instances starting together
//! queue on an advisory lock, and each migration commits with its version, so a failed one
//! leaves the schema at the version before it. An instance older than the schema refuses to
//! start rather than write what newer instances would misread.

use tokio_postgres::Client;

use super::postgres::backend;
use super::MetaError;

/// Taken while the schema is checked or changed.
const SCHEMA_LOCK: i64 = 7366436516046733;

/// Version 1 has the tables of the first release; `COLLATE "C"` keeps names and ids in byte
/// order, as listings and cursors expect; partial indexes hold exactly the tasks each engine
/// query looks for. Every statement tolerates a database made before versions were recorded.
const V1: &str = r#"
CREATE TABLE IF NOT EXISTS fwrepo_firmware (
    name          TEXT COLLATE "C" PRIMARY KEY,
    blob_key      TEXT NOT NULL,
    size          BIGINT NOT NULL,
    expires_at_ms BIGINT,
    record        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fwrepo_firmware_expiry
    ON fwrepo_firmware (expires_at_ms, name) WHERE expires_at_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS fwrepo_tasks (
    id          TEXT COLLATE "C" PRIMARY KEY,
    device_id   TEXT COLLATE "C" NOT NULL,
    firmware    TEXT NOT NULL,
    active      BOOLEAN NOT NULL,
    due_ms      BIGINT,
    holds_quota BOOLEAN NOT NULL,
    importing   BOOLEAN NOT NULL,
    task        TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS fwrepo_tasks_active_device
    ON fwrepo_tasks (device_id) WHERE active;
CREATE INDEX IF NOT EXISTS fwrepo_tasks_device ON fwrepo_tasks (device_id, id);
CREATE INDEX IF NOT EXISTS fwrepo_tasks_due ON fwrepo_tasks (due_ms, id) WHERE due_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS fwrepo_tasks_quota ON fwrepo_tasks (id) WHERE holds_quota;
CREATE INDEX IF NOT EXISTS fwrepo_tasks_importing ON fwrepo_tasks (id) WHERE importing;
CREATE INDEX IF NOT EXISTS fwrepo_tasks_firmware ON fwrepo_tasks (firmware) WHERE active;
CREATE TABLE IF NOT EXISTS fwrepo_devices (
    device_id TEXT PRIMARY KEY,
    info      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fwrepo_schedules (
    name     TEXT COLLATE "C" PRIMARY KEY,
    schedule TEXT NOT NULL
);
"#;

/// Version 2: a revision per task (compare-and-swap between instances) and the shared access
/// tokens.
const V2: &str = r#"
ALTER TABLE fwrepo_tasks ADD COLUMN IF NOT EXISTS revision BIGINT NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS fwrepo_tokens (
    seq    BIGSERIAL,
    id     TEXT PRIMARY KEY,
    name   TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL UNIQUE,
    token  TEXT NOT NULL
);
"#;

/// Version 3: device credentials (only the hash of each device token).
const V3: &str = r#"
CREATE TABLE IF NOT EXISTS fwrepo_device_credentials (
    device_id  TEXT PRIMARY KEY,
    credential TEXT NOT NULL
);
"#;

/// Version 4: the fleet. Device ids sort in byte order like every other id; groups;
/// campaigns with one row per member (indexes for each status, the waiting queue in release
/// order and the skipped devices by retry time) and counts per wave and status, each split
/// over a few shards so concurrent task changes rarely wait on one row.
const V4: &str = r#"
ALTER TABLE fwrepo_devices ALTER COLUMN device_id TYPE TEXT COLLATE "C";
CREATE TABLE IF NOT EXISTS fwrepo_groups (
    name  TEXT COLLATE "C" PRIMARY KEY,
    grp   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fwrepo_campaigns (
    id       TEXT COLLATE "C" PRIMARY KEY,
    revision BIGINT NOT NULL,
    live     BOOLEAN NOT NULL,
    campaign TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fwrepo_campaigns_live ON fwrepo_campaigns (id) WHERE live;
CREATE TABLE IF NOT EXISTS fwrepo_campaign_members (
    campaign_id TEXT COLLATE "C" NOT NULL,
    device_id   TEXT COLLATE "C" NOT NULL,
    wave        INTEGER NOT NULL,
    position    BIGINT NOT NULL,
    status      TEXT COLLATE "C" NOT NULL,
    task_id     TEXT,
    reason      TEXT,
    retry_at_ms BIGINT,
    PRIMARY KEY (campaign_id, device_id)
);
CREATE INDEX IF NOT EXISTS fwrepo_members_status
    ON fwrepo_campaign_members (campaign_id, status, device_id);
CREATE INDEX IF NOT EXISTS fwrepo_members_waiting
    ON fwrepo_campaign_members (campaign_id, wave, position, device_id) WHERE status = 'waiting';
CREATE INDEX IF NOT EXISTS fwrepo_members_skipped
    ON fwrepo_campaign_members (campaign_id, retry_at_ms) WHERE status = 'skipped';
CREATE TABLE IF NOT EXISTS fwrepo_campaign_counts (
    campaign_id TEXT COLLATE "C" NOT NULL,
    wave        INTEGER NOT NULL,
    key         TEXT COLLATE "C" NOT NULL,
    shard       SMALLINT NOT NULL,
    n           BIGINT NOT NULL,
    PRIMARY KEY (campaign_id, wave, key, shard)
);
"#;

/// Version 5: campaign rosters (`model::roster`): a started campaign's members in chunks of
/// release order, each found by its last position, written as member rows chunk by chunk.
const V5: &str = r#"
CREATE TABLE IF NOT EXISTS fwrepo_campaign_rosters (
    campaign_id   TEXT COLLATE "C" NOT NULL,
    chunk         INTEGER NOT NULL,
    last_position BIGINT NOT NULL,
    devices       TEXT[] NOT NULL,
    waves         INTEGER[] NOT NULL,
    positions     BIGINT[] NOT NULL,
    materialized  BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (campaign_id, chunk)
);
CREATE INDEX IF NOT EXISTS fwrepo_rosters_last
    ON fwrepo_campaign_rosters (campaign_id, last_position);
"#;

/// Version 6: devices' pre-shared keys for DTLS, one identity per device.
const V6: &str = r#"
CREATE TABLE IF NOT EXISTS fwrepo_device_psks (
    device_id  TEXT COLLATE "C" PRIMARY KEY,
    identity   TEXT COLLATE "C" NOT NULL UNIQUE,
    psk        TEXT NOT NULL
);
"#;

/// Version 7: the index that says whether firmware is in use covers every task, by firmware
/// and whether the task is active. As a partial index of the active tasks it was a way to
/// reach "a device's active task" too, and with statistics from before a rollout (few tasks
/// active) the planner chose to scan all of it for each device instead of looking the
/// device up (EXPLAIN, with 100,000 tasks active and the statistics of none).
const V7: &str = r#"
DROP INDEX IF EXISTS fwrepo_tasks_firmware;
CREATE INDEX IF NOT EXISTS fwrepo_tasks_firmware_active ON fwrepo_tasks (firmware, active);
"#;

/// `MIGRATIONS[k]` takes the schema from version `k` to `k + 1`.
pub(super) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7];

/// The schema version this build writes.
pub(super) const VERSION: i32 = MIGRATIONS.len() as i32;

/// Brings the schema to [`VERSION`]; refuses a newer one.
pub(super) async fn migrate(client: &mut Client) -> Result<(), MetaError> {
    loop {
        let tx = client.transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(backend)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS fwrepo_schema (version INTEGER NOT NULL)")
            .await
            .map_err(backend)?;
        let at: i32 = tx
            .query_opt("SELECT version FROM fwrepo_schema", &[])
            .await
            .map_err(backend)?
            .map_or(0, |r| r.get(0));
        if at > VERSION {
            return Err(MetaError::Backend(format!(
                "postgres: the database schema is at version {at}, newer than this fwrepo knows \
                 ({VERSION}); run a newer fwrepo"
            )));
        }
        let Some(step) = MIGRATIONS.get(at as usize) else {
            return Ok(());
        };
        tx.batch_execute(step).await.map_err(backend)?;
        tx.batch_execute("DELETE FROM fwrepo_schema")
            .await
            .map_err(backend)?;
        tx.execute(
            "INSERT INTO fwrepo_schema (version) VALUES ($1)",
            &[&(at + 1)],
        )
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        tracing::info!(version = at + 1, "PostgreSQL schema migrated");
    }
}
