//! The fleet in PostgreSQL: the device registry, groups, and campaigns with one row per
//! member and counts that move in the transaction that moves a member. Counts are split over
//! [`SHARDS`] rows per (wave, status) by device, so concurrent task changes of one campaign
//! rarely queue on one row; a status query sums a few dozen rows whatever the fleet's size.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Transaction};

use super::pg_batched::Merge;
use super::postgres::{
    announcing, backend, decode, encode, from, rows, Param, PgStore, EVENTS_CHANNEL,
};
use super::{CampaignStore, DeviceCredential, DevicePsk, DeviceStore, GroupStore, MetaError};
use crate::model::campaign::{Campaign, Counts, Member};
use crate::model::device::Device;
use crate::model::group::Group;
use crate::model::roster;
use crate::model::task::FotaTask;

const SHARDS: u32 = 8;
/// Rows per statement in bulk writes.
const CHUNK: usize = 5000;

fn shard(device: &str) -> i16 {
    let h = device
        .bytes()
        .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
    (h % SHARDS) as i16
}

/// A page of devices, after a device id (see [`from`]).
pub(super) const LIST_DEVICES: &str =
    "SELECT info FROM fwrepo_devices WHERE device_id > $1 ORDER BY device_id LIMIT $2";

const MEMBER_COLUMNS: &str = "device_id, wave, position, status, task_id, reason, retry_at_ms";

fn member(r: &Row) -> Member {
    Member {
        device_id: r.get(0),
        wave: r.get::<_, i32>(1) as u32,
        position: r.get::<_, i64>(2) as u64,
        status: r.get(3),
        task_id: r.get(4),
        reason: r.get(5),
        retry_at_ms: r.get(6),
    }
}

/// The member, locked until the transaction ends.
pub(super) async fn lock_member(
    tx: &Transaction<'_>,
    cid: &str,
    device: &str,
) -> Result<Option<Member>, MetaError> {
    let row = tx
        .query_opt(
            &format!(
                "SELECT {MEMBER_COLUMNS} FROM fwrepo_campaign_members
                 WHERE campaign_id = $1 AND device_id = $2 FOR UPDATE"
            ),
            &[&cid, &device],
        )
        .await
        .map_err(backend)?;
    Ok(row.as_ref().map(member))
}

/// Adds `(wave, key) → delta` to the counts, in key order (so transactions lock count rows in
/// one order and cannot deadlock on them).
async fn count(
    tx: &Transaction<'_>,
    cid: &str,
    shard: i16,
    deltas: BTreeMap<(i32, String), i64>,
) -> Result<(), MetaError> {
    let deltas: Vec<_> = deltas.into_iter().filter(|(_, d)| *d != 0).collect();
    if deltas.is_empty() {
        return Ok(());
    }
    let waves: Vec<i32> = deltas.iter().map(|((w, _), _)| *w).collect();
    let keys: Vec<&str> = deltas.iter().map(|((_, k), _)| k.as_str()).collect();
    let ns: Vec<i64> = deltas.iter().map(|(_, d)| *d).collect();
    tx.execute(
        "INSERT INTO fwrepo_campaign_counts (campaign_id, wave, key, shard, n)
         SELECT $1, w, k, $2, d FROM unnest($3::INT[], $4::TEXT[], $5::BIGINT[]) AS u(w, k, d)
         ORDER BY w, k
         ON CONFLICT (campaign_id, wave, key, shard)
         DO UPDATE SET n = fwrepo_campaign_counts.n + EXCLUDED.n",
        &[&cid, &shard, &waves, &keys, &ns],
    )
    .await
    .map_err(backend)?;
    Ok(())
}

/// The wave −1 holds failed members by reason.
const REASONS: i32 = -1;

fn tally(deltas: &mut BTreeMap<(i32, String), i64>, m: &Member, sign: i64) {
    *deltas.entry((m.wave as i32, m.status.clone())).or_default() += sign;
    if m.status == crate::model::campaign::member::FAILED {
        let r = m.reason.clone().unwrap_or_else(|| "unknown".into());
        *deltas.entry((REASONS, r)).or_default() += sign;
    }
}

/// Stores `new` in place of `old` (or as a new member), moving the counts.
pub(super) async fn moved(
    tx: &Transaction<'_>,
    cid: &str,
    old: Option<&Member>,
    new: &Member,
) -> Result<(), MetaError> {
    tx.execute(
        "INSERT INTO fwrepo_campaign_members
         (campaign_id, device_id, wave, position, status, task_id, reason, retry_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (campaign_id, device_id) DO UPDATE SET wave = $3, position = $4,
         status = $5, task_id = $6, reason = $7, retry_at_ms = $8",
        &[
            &cid,
            &new.device_id,
            &(new.wave as i32),
            &(new.position as i64),
            &new.status,
            &new.task_id,
            &new.reason,
            &new.retry_at_ms,
        ],
    )
    .await
    .map_err(backend)?;
    let mut deltas = BTreeMap::new();
    if let Some(o) = old {
        tally(&mut deltas, o, -1);
    }
    tally(&mut deltas, new, 1);
    count(tx, cid, shard(&new.device_id), deltas).await
}

/// Moves the member of a campaign task to the task's status, while it follows this task.
pub(super) async fn follow(tx: &Transaction<'_>, task: &FotaTask) -> Result<(), MetaError> {
    let Some(link) = &task.campaign else {
        return Ok(());
    };
    let Some(old) = lock_member(tx, &link.id, &task.device_id).await? else {
        return Ok(());
    };
    if let Some(new) = old.following(task) {
        moved(tx, &link.id, Some(&old), &new).await?;
    }
    Ok(())
}

impl PgStore {
    /// The device's member as the campaign's roster has it (waiting), whether materialized
    /// or not.
    async fn in_roster(&self, cid: &str, device: &str) -> Result<Option<Member>, MetaError> {
        let position = roster::position(cid, device) as i64;
        let row = self
            .query_opt(
                "SELECT waves[i], positions[i] FROM (
                     SELECT waves, positions, array_position(devices, $2::TEXT) AS i
                     FROM fwrepo_campaign_rosters
                     WHERE campaign_id = $1 AND last_position >= $3
                     ORDER BY last_position LIMIT 1) AS r
                 WHERE i IS NOT NULL",
                &[&cid, &device, &position],
            )
            .await?;
        Ok(row
            .map(|r| roster::waiting(device, r.get::<_, i32>(0) as u32, r.get::<_, i64>(1) as u64)))
    }
}

/// A patch without the fields a merge never changes.
fn mergeable(patch: &Map<String, Value>) -> Map<String, Value> {
    patch
        .iter()
        .filter(|(k, _)| *k != "deviceId" && *k != "createdMs")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl PgStore {
    /// One merge in a statement of its own: `patch` onto the stored device, else `fresh`.
    pub(super) async fn merge_alone(&self, m: &Merge) -> Result<String, MetaError> {
        let row = self
            .query_one(
                "INSERT INTO fwrepo_devices (device_id, info) VALUES ($1, $2)
                 ON CONFLICT (device_id)
                 DO UPDATE SET info = (fwrepo_devices.info::jsonb || $3::text::jsonb)::text
                 RETURNING info",
                &[&m.device_id, &m.fresh, &m.patch],
            )
            .await?;
        Ok(row.get(0))
    }
}

#[async_trait]
impl DeviceStore for PgStore {
    async fn get_device(&self, device_id: &str) -> Result<Option<Device>, MetaError> {
        let row = self
            .query_opt(
                "SELECT info FROM fwrepo_devices WHERE device_id = $1",
                &[&device_id],
            )
            .await?;
        row.map(|r| decode(device_id, r.get(0))).transpose()
    }

    async fn merge_device(
        &self,
        device_id: &str,
        patch: &Map<String, Value>,
        now_ms: i64,
    ) -> Result<Device, MetaError> {
        let fresh = Device::new(device_id, now_ms)
            .merged(patch)
            .map_err(backend)?;
        let merge = Merge {
            device_id: device_id.to_owned(),
            fresh: encode(&fresh)?,
            patch: encode(&mergeable(patch))?,
        };
        let info = self.batched.merges.run(self, merge).await?;
        decode(device_id, &info)
    }

    async fn merge_devices(
        &self,
        patches: &[(String, Map<String, Value>)],
        now_ms: i64,
    ) -> Result<(), MetaError> {
        for chunk in patches.chunks(CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
            let mut fresh = Vec::with_capacity(chunk.len());
            let mut merges = Vec::with_capacity(chunk.len());
            for (id, p) in chunk {
                fresh.push(encode(
                    &Device::new(id, now_ms).merged(p).map_err(backend)?,
                )?);
                merges.push(encode(&mergeable(p))?);
            }
            // Existing devices merge, new ones are inserted; one that appeared between the
            // two statements (its first report) merges on its own below.
            let c = self.conn().await?;
            let updated = c
                .client()
                .query(
                    "UPDATE fwrepo_devices d SET info = (d.info::jsonb || u.patch::jsonb)::text
                     FROM unnest($1::TEXT[], $2::TEXT[]) AS u(id, patch)
                     WHERE d.device_id = u.id RETURNING d.device_id",
                    &[&ids, &merges],
                )
                .await
                .map_err(backend)?;
            let inserted = c
                .client()
                .query(
                    "INSERT INTO fwrepo_devices (device_id, info)
                     SELECT id, info FROM unnest($1::TEXT[], $2::TEXT[]) AS u(id, info)
                     ON CONFLICT (device_id) DO NOTHING RETURNING device_id",
                    &[&ids, &fresh],
                )
                .await
                .map_err(backend)?;
            drop(c);
            let done: HashSet<String> = updated
                .iter()
                .chain(&inserted)
                .map(|r| r.get::<_, String>(0))
                .collect();
            for (id, p) in chunk {
                if !done.contains(id) {
                    self.merge_device(id, p, now_ms).await?;
                }
            }
        }
        Ok(())
    }

    async fn delete_device(&self, device_id: &str) -> Result<bool, MetaError> {
        let mut c = self.conn().await?;
        let tx = c.client_mut().transaction().await.map_err(backend)?;
        for table in ["fwrepo_device_credentials", "fwrepo_device_psks"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE device_id = $1"),
                &[&device_id],
            )
            .await
            .map_err(backend)?;
        }
        let n = tx
            .execute(
                "DELETE FROM fwrepo_devices WHERE device_id = $1",
                &[&device_id],
            )
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(n == 1)
    }

    async fn list_devices(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Device>, MetaError> {
        let found = self
            .query(
                LIST_DEVICES,
                &[&from(after), &(limit.min(i64::MAX as usize) as i64)],
            )
            .await?;
        rows(&found, "info")
    }

    async fn device_credential(
        &self,
        device_id: &str,
    ) -> Result<Option<DeviceCredential>, MetaError> {
        let json = self
            .batched
            .credentials
            .run(self, device_id.to_owned())
            .await?;
        json.map(|j| decode(device_id, &j)).transpose()
    }

    async fn put_device_credential(&self, credential: &DeviceCredential) -> Result<(), MetaError> {
        let json = encode(credential)?;
        self.execute(
            "INSERT INTO fwrepo_device_credentials (device_id, credential) VALUES ($1, $2)
                 ON CONFLICT (device_id) DO UPDATE SET credential = $2",
            &[&credential.device_id, &json],
        )
        .await?;
        Ok(())
    }

    async fn remove_device_credential(&self, device_id: &str) -> Result<bool, MetaError> {
        let n = self
            .execute(
                "DELETE FROM fwrepo_device_credentials WHERE device_id = $1",
                &[&device_id],
            )
            .await?;
        Ok(n == 1)
    }

    async fn put_device_psk(&self, psk: &DevicePsk) -> Result<bool, MetaError> {
        // The identity's uniqueness decides; a conflict on it stores nothing.
        let stored = self
            .query(
                "INSERT INTO fwrepo_device_psks (device_id, identity, psk) VALUES ($1, $2, $3)
                 ON CONFLICT (device_id) DO UPDATE SET identity = $2, psk = $3
                 WHERE NOT EXISTS (SELECT 1 FROM fwrepo_device_psks
                                   WHERE identity = $2 AND device_id <> $1)
                 RETURNING 1",
                &[&psk.device_id, &psk.identity, &encode(psk)?],
            )
            .await;
        match stored {
            Ok(rows) => Ok(rows.len() == 1),
            Err(e) if e.to_string().contains("fwrepo_device_psks_identity_key") => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn psk_by_identity(&self, identity: &str) -> Result<Option<DevicePsk>, MetaError> {
        let row = self
            .query_opt(
                "SELECT psk FROM fwrepo_device_psks WHERE identity = $1",
                &[&identity],
            )
            .await?;
        row.map(|r| decode(identity, r.get(0))).transpose()
    }

    async fn device_psk(&self, device_id: &str) -> Result<Option<DevicePsk>, MetaError> {
        let row = self
            .query_opt(
                "SELECT psk FROM fwrepo_device_psks WHERE device_id = $1",
                &[&device_id],
            )
            .await?;
        row.map(|r| decode(device_id, r.get(0))).transpose()
    }

    async fn remove_device_psk(&self, device_id: &str) -> Result<bool, MetaError> {
        let n = self
            .execute(
                "DELETE FROM fwrepo_device_psks WHERE device_id = $1",
                &[&device_id],
            )
            .await?;
        Ok(n == 1)
    }
}

#[async_trait]
impl super::DeviceReads for PgStore {
    async fn credential_and_active_task(
        &self,
        device_id: &str,
    ) -> Result<(Option<DeviceCredential>, Option<FotaTask>), MetaError> {
        let found = self
            .batched
            .device_states
            .run(self, device_id.to_owned())
            .await?;
        let (credential, task) = found.unwrap_or_default();
        Ok((
            credential.map(|j| decode(device_id, &j)).transpose()?,
            task.map(|j| decode(device_id, &j)).transpose()?,
        ))
    }

    async fn task_and_credential(
        &self,
        id: &str,
    ) -> Result<Option<(FotaTask, Option<DeviceCredential>)>, MetaError> {
        let Some((task, credential)) = self
            .batched
            .tasks_and_credentials
            .run(self, id.to_owned())
            .await?
        else {
            return Ok(None);
        };
        Ok(Some((
            decode(id, &task)?,
            credential.map(|j| decode(id, &j)).transpose()?,
        )))
    }
}

#[async_trait]
impl GroupStore for PgStore {
    async fn get_group(&self, name: &str) -> Result<Option<Group>, MetaError> {
        let row = self
            .query_opt("SELECT grp FROM fwrepo_groups WHERE name = $1", &[&name])
            .await?;
        row.map(|r| decode(name, r.get(0))).transpose()
    }

    async fn put_group(&self, group: &Group) -> Result<(), MetaError> {
        self.execute(
            "INSERT INTO fwrepo_groups (name, grp) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET grp = $2",
            &[&group.name, &encode(group)?],
        )
        .await?;
        Ok(())
    }

    async fn delete_group(&self, name: &str) -> Result<bool, MetaError> {
        let n = self
            .execute("DELETE FROM fwrepo_groups WHERE name = $1", &[&name])
            .await?;
        Ok(n == 1)
    }

    async fn list_groups(&self) -> Result<Vec<Group>, MetaError> {
        let found = self
            .query("SELECT grp FROM fwrepo_groups ORDER BY name", &[])
            .await?;
        rows(&found, "grp")
    }
}

#[async_trait]
impl CampaignStore for PgStore {
    async fn create_campaign(&self, c: &Campaign, announce: Option<&str>) -> Result<(), MetaError> {
        let mut params: Vec<Param> = vec![&c.id];
        let revision = c.revision as i64;
        let (live, json) = (c.state.is_live(), encode(c)?);
        params.extend([&revision as Param, &live, &json]);
        let statement = announcing(
            &mut params,
            &announce,
            "INSERT INTO fwrepo_campaigns (id, revision, live, campaign) VALUES ($1, $2, $3, $4)",
            "WITH stored AS (INSERT INTO fwrepo_campaigns (id, revision, live, campaign)
             VALUES ($1, $2, $3, $4) RETURNING 1) SELECT pg_notify($5, $6) FROM stored",
        );
        self.query(statement, &params).await?;
        Ok(())
    }

    async fn get_campaign(&self, id: &str) -> Result<Option<Campaign>, MetaError> {
        let row = self
            .query_opt(
                "SELECT campaign FROM fwrepo_campaigns WHERE id = $1",
                &[&id],
            )
            .await?;
        row.map(|r| decode(id, r.get(0))).transpose()
    }

    async fn put_campaign(
        &self,
        c: &Campaign,
        expected: u64,
        announce: Option<&str>,
    ) -> Result<bool, MetaError> {
        let (revision, expected) = (c.revision as i64, expected as i64);
        let (live, json) = (c.state.is_live(), encode(c)?);
        let mut params: Vec<Param> = vec![&c.id, &revision, &live, &json, &expected];
        let statement = announcing(
            &mut params,
            &announce,
            "UPDATE fwrepo_campaigns SET revision = $2, live = $3, campaign = $4
             WHERE id = $1 AND revision = $5 RETURNING 1",
            "WITH stored AS (UPDATE fwrepo_campaigns SET revision = $2, live = $3,
             campaign = $4 WHERE id = $1 AND revision = $5 RETURNING 1)
             SELECT pg_notify($6, $7) FROM stored",
        );
        Ok(self.query(statement, &params).await?.len() == 1)
    }

    async fn list_campaigns(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Campaign>, MetaError> {
        let found = self
            .query(
                "SELECT campaign FROM fwrepo_campaigns WHERE id > $1 ORDER BY id LIMIT $2",
                &[&from(after), &(limit.min(i64::MAX as usize) as i64)],
            )
            .await?;
        rows(&found, "campaign")
    }

    async fn live_campaigns(&self) -> Result<Vec<Campaign>, MetaError> {
        let found = self
            .query(
                "SELECT campaign FROM fwrepo_campaigns WHERE live ORDER BY id",
                &[],
            )
            .await?;
        rows(&found, "campaign")
    }

    async fn start_campaign(
        &self,
        c: &Campaign,
        expected: u64,
        members: &[Member],
        announce: Option<&str>,
    ) -> Result<bool, MetaError> {
        let mut conn = self.conn().await?;
        let tx = conn.client_mut().transaction().await.map_err(backend)?;
        let n = tx
            .execute(
                "UPDATE fwrepo_campaigns SET revision = $2, live = $3, campaign = $4
                 WHERE id = $1 AND revision = $5 AND NOT live",
                &[
                    &c.id,
                    &(c.revision as i64),
                    &c.state.is_live(),
                    &encode(c)?,
                    &(expected as i64),
                ],
            )
            .await
            .map_err(backend)?;
        if n != 1 {
            return Ok(false);
        }
        let chunks: Vec<_> = roster::chunks(&c.id, members)
            .into_iter()
            .enumerate()
            .map(|(i, chunk)| {
                let waves: Vec<i32> = chunk.waves.iter().map(|w| *w as i32).collect();
                let positions: Vec<i64> = chunk.positions.iter().map(|p| *p as i64).collect();
                (
                    i as i32,
                    positions.last().copied().unwrap_or(0),
                    chunk.devices,
                    waves,
                    positions,
                )
            })
            .collect();
        let insert = tx
            .prepare(
                "INSERT INTO fwrepo_campaign_rosters
                 (campaign_id, chunk, last_position, devices, waves, positions)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await
            .map_err(backend)?;
        // Sent together: the client pipelines them.
        futures_util::future::try_join_all(chunks.iter().map(
            |(i, last, devices, waves, positions)| {
                let params: [&(dyn ToSql + Sync); 6] = [&c.id, i, last, devices, waves, positions];
                tx.execute_raw(&insert, params)
            },
        ))
        .await
        .map_err(backend)?;
        let mut deltas = BTreeMap::new();
        for m in members {
            tally(&mut deltas, m, 1);
        }
        count(&tx, &c.id, 0, deltas).await?;
        if let Some(message) = announce {
            // Sent at the commit.
            tx.execute("SELECT pg_notify($1, $2)", &[&EVENTS_CHANNEL, &message])
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(true)
    }

    async fn materialize(&self, campaign: &str) -> Result<bool, MetaError> {
        // One statement: take the next chunk no instance has taken (or is taking), mark it,
        // and write its members.
        let written = self
            .execute(
                "WITH next AS (
                     SELECT chunk FROM fwrepo_campaign_rosters
                     WHERE campaign_id = $1 AND NOT materialized
                     ORDER BY chunk LIMIT 1 FOR UPDATE SKIP LOCKED),
                 taken AS (
                     UPDATE fwrepo_campaign_rosters r SET materialized = true FROM next
                     WHERE r.campaign_id = $1 AND r.chunk = next.chunk
                     RETURNING r.devices, r.waves, r.positions)
                 INSERT INTO fwrepo_campaign_members
                 (campaign_id, device_id, wave, position, status)
                 SELECT $1, u.d, u.w, u.p, 'waiting'
                 FROM taken, unnest(taken.devices, taken.waves, taken.positions) AS u(d, w, p)
                 ON CONFLICT DO NOTHING",
                &[&campaign],
            )
            .await?;
        Ok(written > 0)
    }

    async fn campaign_counts(&self, id: &str) -> Result<Counts, MetaError> {
        let found = self
            .query(
                "SELECT wave, key, sum(n)::BIGINT FROM fwrepo_campaign_counts
                 WHERE campaign_id = $1 GROUP BY wave, key",
                &[&id],
            )
            .await?;
        let mut counts = Counts::default();
        for r in &found {
            let (wave, key, n): (i32, String, i64) = (r.get(0), r.get(1), r.get(2));
            if wave == REASONS {
                if n > 0 {
                    counts.reasons.insert(key, n as u64);
                }
            } else {
                counts.add(wave as usize, &key, n);
            }
        }
        Ok(counts)
    }

    async fn get_member(&self, campaign: &str, device: &str) -> Result<Option<Member>, MetaError> {
        let row = self
            .query_opt(
                &format!(
                    "SELECT {MEMBER_COLUMNS} FROM fwrepo_campaign_members
                     WHERE campaign_id = $1 AND device_id = $2"
                ),
                &[&campaign, &device],
            )
            .await?;
        match row {
            Some(r) => Ok(Some(member(&r))),
            None => self.in_roster(campaign, device).await,
        }
    }

    async fn add_member(&self, campaign: &str, m: &Member) -> Result<bool, MetaError> {
        if self.in_roster(campaign, &m.device_id).await?.is_some() {
            return Ok(false);
        }
        let mut c = self.conn().await?;
        let tx = c.client_mut().transaction().await.map_err(backend)?;
        if lock_member(&tx, campaign, &m.device_id).await?.is_some() {
            return Ok(false);
        }
        let inserted = tx
            .execute(
                "INSERT INTO fwrepo_campaign_members
                 (campaign_id, device_id, wave, position, status) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
                &[
                    &campaign,
                    &m.device_id,
                    &(m.wave as i32),
                    &(m.position as i64),
                    &m.status,
                ],
            )
            .await
            .map_err(backend)?;
        if inserted != 1 {
            return Ok(false);
        }
        moved(&tx, campaign, None, m).await?;
        tx.commit().await.map_err(backend)?;
        Ok(true)
    }

    async fn move_member(
        &self,
        campaign: &str,
        from: &[&str],
        m: &Member,
    ) -> Result<bool, MetaError> {
        let mut c = self.conn().await?;
        let tx = c.client_mut().transaction().await.map_err(backend)?;
        let Some(old) = lock_member(&tx, campaign, &m.device_id).await? else {
            return Ok(false);
        };
        if !from.contains(&old.status.as_str()) {
            return Ok(false);
        }
        moved(&tx, campaign, Some(&old), m).await?;
        tx.commit().await.map_err(backend)?;
        Ok(true)
    }

    async fn list_members(
        &self,
        campaign: &str,
        status: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Member>, MetaError> {
        let limit = limit.min(i64::MAX as usize) as i64;
        // One statement per filter, each with a plan that walks the index it needs.
        let found = match status {
            Some(status) => {
                self.query(
                    &format!(
                        "SELECT {MEMBER_COLUMNS} FROM fwrepo_campaign_members
                         WHERE campaign_id = $1 AND status = $2 AND device_id > $3
                         ORDER BY device_id LIMIT $4"
                    ),
                    &[&campaign, &status, &from(after), &limit],
                )
                .await?
            }
            None => {
                self.query(
                    &format!(
                        "SELECT {MEMBER_COLUMNS} FROM fwrepo_campaign_members
                         WHERE campaign_id = $1 AND device_id > $2
                         ORDER BY device_id LIMIT $3"
                    ),
                    &[&campaign, &from(after), &limit],
                )
                .await?
            }
        };
        Ok(found.iter().map(member).collect())
    }

    async fn waiting_members(
        &self,
        campaign: &str,
        max_wave: u32,
        limit: usize,
    ) -> Result<Vec<Member>, MetaError> {
        let found = self
            .query(
                &format!(
                    "SELECT {MEMBER_COLUMNS} FROM fwrepo_campaign_members
                     WHERE campaign_id = $1 AND status = 'waiting' AND wave <= $2
                     ORDER BY wave, position, device_id LIMIT $3"
                ),
                &[
                    &campaign,
                    &(max_wave as i32),
                    &(limit.min(i64::MAX as usize) as i64),
                ],
            )
            .await?;
        Ok(found.iter().map(member).collect())
    }

    async fn skipped_due(
        &self,
        campaign: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Member>, MetaError> {
        let found = self
            .query(
                &format!(
                    "SELECT {MEMBER_COLUMNS} FROM fwrepo_campaign_members
                     WHERE campaign_id = $1 AND status = 'skipped' AND retry_at_ms <= $2
                     ORDER BY retry_at_ms LIMIT $3"
                ),
                &[&campaign, &now_ms, &(limit.min(i64::MAX as usize) as i64)],
            )
            .await?;
        Ok(found.iter().map(member).collect())
    }
}
