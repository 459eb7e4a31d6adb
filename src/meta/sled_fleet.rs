//! The fleet in sled: the device registry, groups, and campaigns with their members and
//! counts.
//!
//! Keys in the `fleet` tree, each led by a one-byte kind (`cid` is the campaign id):
//! `K` cid → campaign; `m` cid 0 device → member; `s` cid 0 status 0 device (members by
//! status); `w` cid 0 wave (4 bytes) position (8) device (waiting, in release order);
//! `k` cid 0 retry-at ms (8) device (skipped, by retry time); `c` cid 0 wave (4) status →
//! count; `r` cid 0 reason → failed members with that reason. Counts are 8-byte big-endian
//! and move in the transaction that moves a member (the task's, when a task moves it).
//! The roster (`model::roster`): `p` cid 0 chunk (4) → chunk; `P` cid 0 → each chunk's last
//! position; `D` cid 0 → chunks materialized (4).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use super::sled_store::{backend, SledStore};
use super::{CampaignStore, DeviceCredential, DevicePsk, DeviceStore, GroupStore, MetaError};
use crate::model::campaign::{member, Campaign, Counts, Member};
use crate::model::device::Device;
use crate::model::group::Group;
use crate::model::roster::{self, Chunk};

type Abort<T> = ConflictableTransactionError<T>;

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    key: &[u8],
    value: &[u8],
) -> Result<T, MetaError> {
    serde_json::from_slice(value).map_err(|e| MetaError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

fn k(kind: u8, cid: &str) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(cid.as_bytes());
    v.push(0);
    v
}

fn campaign_key(cid: &str) -> Vec<u8> {
    let mut v = vec![b'K'];
    v.extend_from_slice(cid.as_bytes());
    v
}

fn member_key(cid: &str, device: &str) -> Vec<u8> {
    [k(b'm', cid), device.as_bytes().to_vec()].concat()
}

fn count_key(cid: &str, wave: u32, status: &str) -> Vec<u8> {
    [
        k(b'c', cid),
        wave.to_be_bytes().to_vec(),
        status.as_bytes().to_vec(),
    ]
    .concat()
}

fn chunk_key(cid: &str, chunk: u32) -> Vec<u8> {
    [k(b'p', cid), chunk.to_be_bytes().to_vec()].concat()
}

/// Decoded roster records, a bounded few; a started campaign's roster never changes.
#[derive(Default)]
pub struct RosterCache {
    lasts: std::sync::Mutex<HashMap<String, Arc<Vec<u64>>>>,
    chunks: std::sync::Mutex<HashMap<(String, u32), Arc<Chunk>>>,
}

impl RosterCache {
    fn forget(&self, cid: &str) {
        self.lasts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(cid);
        self.chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(c, _), _| c != cid);
    }
}

/// Entries kept of each kind before the cache starts again.
const ROSTERS_CACHED: usize = 256;

fn cached<K: std::hash::Hash + Eq, V>(
    map: &std::sync::Mutex<HashMap<K, Arc<V>>>,
    key: K,
    load: impl FnOnce() -> Result<Option<V>, MetaError>,
) -> Result<Option<Arc<V>>, MetaError> {
    if let Some(v) = map.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(Some(Arc::clone(v)));
    }
    let Some(v) = load()?.map(Arc::new) else {
        return Ok(None);
    };
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= ROSTERS_CACHED {
        map.clear();
    }
    map.insert(key, Arc::clone(&v));
    Ok(Some(v))
}

fn reason_key(cid: &str, reason: &str) -> Vec<u8> {
    [k(b'r', cid), reason.as_bytes().to_vec()].concat()
}

/// The index entries a member owns (besides its record and counts).
fn entries(cid: &str, m: &Member) -> Vec<Vec<u8>> {
    let d = m.device_id.as_bytes();
    let mut out = vec![[
        k(b's', cid),
        m.status.as_bytes().to_vec(),
        vec![0],
        d.to_vec(),
    ]
    .concat()];
    if m.status == member::WAITING {
        out.push(
            [
                k(b'w', cid),
                m.wave.to_be_bytes().to_vec(),
                m.position.to_be_bytes().to_vec(),
                d.to_vec(),
            ]
            .concat(),
        );
    }
    if m.status == member::SKIPPED {
        let at = m.retry_at_ms.unwrap_or(0).max(0) as u64;
        out.push([k(b'k', cid), at.to_be_bytes().to_vec(), d.to_vec()].concat());
    }
    out
}

fn failure(m: &Member) -> Option<&str> {
    (m.status == member::FAILED).then(|| m.reason.as_deref().unwrap_or("unknown"))
}

fn read_count(v: Option<sled::IVec>) -> i64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, i64::from_be_bytes)
}

fn bump<T>(tx: &TransactionalTree, key: Vec<u8>, delta: i64) -> Result<(), Abort<T>> {
    let n = read_count(tx.get(&key)?) + delta;
    if n <= 0 {
        tx.remove(key)?;
    } else {
        tx.insert(key, &n.to_be_bytes())?;
    }
    Ok(())
}

/// Replaces member `old` (if any) with `new`, moving index entries and counts.
pub(super) fn put_member<T>(
    tx: &TransactionalTree,
    cid: &str,
    old: Option<&Member>,
    new: &Member,
) -> Result<(), Abort<T>> {
    if let Some(o) = old {
        for e in entries(cid, o) {
            tx.remove(e)?;
        }
        bump(tx, count_key(cid, o.wave, &o.status), -1)?;
        if let Some(r) = failure(o) {
            bump(tx, reason_key(cid, r), -1)?;
        }
    }
    for e in entries(cid, new) {
        tx.insert(e, &[])?;
    }
    bump(tx, count_key(cid, new.wave, &new.status), 1)?;
    if let Some(r) = failure(new) {
        bump(tx, reason_key(cid, r), 1)?;
    }
    let json = serde_json::to_vec(new).map_err(|e| {
        ConflictableTransactionError::Storage(sled::Error::Unsupported(e.to_string()))
    })?;
    tx.insert(member_key(cid, &new.device_id), json)?;
    Ok(())
}

pub(super) fn get_member<T>(
    tx: &TransactionalTree,
    cid: &str,
    device: &str,
) -> Result<Option<Member>, Abort<T>> {
    Ok(tx
        .get(member_key(cid, device))?
        .and_then(|v| serde_json::from_slice(&v).ok()))
}

impl SledStore {
    fn get_json<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, MetaError> {
        self.fleet
            .get(key)
            .map_err(backend)?
            .map(|v| decode(key, &v))
            .transpose()
    }

    /// Each roster chunk's last position, if the campaign has a roster.
    fn roster_lasts(&self, cid: &str) -> Result<Option<Arc<Vec<u64>>>, MetaError> {
        cached(&self.rosters.lasts, cid.to_owned(), || {
            self.get_json(&k(b'P', cid))
        })
    }

    fn roster_chunk(&self, cid: &str, chunk: u32) -> Result<Option<Arc<Chunk>>, MetaError> {
        cached(&self.rosters.chunks, (cid.to_owned(), chunk), || {
            self.get_json(&chunk_key(cid, chunk))
        })
    }

    /// The device's member as the roster has it (waiting), whether materialized or not.
    fn in_roster(&self, cid: &str, device: &str) -> Result<Option<Member>, MetaError> {
        let Some(lasts) = self.roster_lasts(cid)? else {
            return Ok(None);
        };
        let p = roster::position(cid, device);
        let Some(i) = roster::chunk_of(&lasts, p) else {
            return Ok(None);
        };
        Ok(self
            .roster_chunk(cid, i as u32)?
            .and_then(|c| c.find(device, p)))
    }

    fn transact_fleet<T>(
        &self,
        f: impl Fn(&TransactionalTree) -> Result<T, Abort<T>>,
    ) -> Result<T, MetaError> {
        let _one = self.fleet_gate.lock().unwrap_or_else(|e| e.into_inner());
        match self.fleet.transaction(f) {
            Ok(v) | Err(TransactionError::Abort(v)) => Ok(v),
            Err(TransactionError::Storage(e)) => Err(backend(e)),
        }
    }

    fn scan<T: serde::de::DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<T>, MetaError> {
        let start = match after {
            Some(a) => [prefix, a, &[0]].concat(),
            None => prefix.to_vec(),
        };
        let mut out = Vec::new();
        for item in tree.range(start..) {
            let (key, v) = item.map_err(backend)?;
            if !key.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push(decode(&key, &v)?);
        }
        Ok(out)
    }

    /// Members named by the index keys under `prefix` (the device id ends each key).
    fn members_at(
        &self,
        cid: &str,
        prefix: Vec<u8>,
        after: Option<&str>,
        skip: usize,
        limit: usize,
        stop: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<Member>, MetaError> {
        let start = match after {
            Some(a) => [prefix.as_slice(), a.as_bytes(), &[0]].concat(),
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for item in self.fleet.range(start..) {
            let (key, _) = item.map_err(backend)?;
            if !key.starts_with(&prefix) || out.len() >= limit || stop(&key[prefix.len()..]) {
                break;
            }
            let device = String::from_utf8_lossy(&key[prefix.len() + skip..]).into_owned();
            let mk = member_key(cid, &device);
            if let Some(v) = self.fleet.get(&mk).map_err(backend)? {
                out.push(decode(&mk, &v)?);
            }
        }
        Ok(out)
    }
}

fn merge(old: Option<&[u8]>, id: &str, patch: &Map<String, Value>, now_ms: i64) -> Option<Vec<u8>> {
    let base = old
        .and_then(|v| serde_json::from_slice::<Device>(v).ok())
        .unwrap_or_else(|| Device::new(id, now_ms));
    // A patch that does not fit the record leaves it as it was (the caller checked it).
    let merged = base.merged(patch).unwrap_or(base);
    serde_json::to_vec(&merged).ok()
}

#[async_trait]
impl DeviceStore for SledStore {
    async fn get_device(&self, device_id: &str) -> Result<Option<Device>, MetaError> {
        let id = device_id.to_owned();
        self.point(move |s| {
            s.devices
                .get(id.as_bytes())
                .map_err(backend)?
                .map(|v| decode(id.as_bytes(), &v))
                .transpose()
        })
        .await
    }

    async fn merge_device(
        &self,
        device_id: &str,
        patch: &Map<String, Value>,
        now_ms: i64,
    ) -> Result<Device, MetaError> {
        let (id, patch) = (device_id.to_owned(), patch.clone());
        let stored = self
            .point(move |s| {
                let v = s
                    .devices
                    .update_and_fetch(id.as_bytes(), |old| merge(old, &id, &patch, now_ms))
                    .map_err(backend)?
                    .ok_or_else(|| backend("device record vanished"))?;
                decode(id.as_bytes(), &v)
            })
            .await?;
        self.flush().await?;
        Ok(stored)
    }

    async fn merge_devices(
        &self,
        patches: &[(String, Map<String, Value>)],
        now_ms: i64,
    ) -> Result<(), MetaError> {
        let patches = patches.to_vec();
        self.blocking(move |s| {
            for (id, patch) in &patches {
                s.devices
                    .update_and_fetch(id.as_bytes(), |old| merge(old, id, patch, now_ms))
                    .map_err(backend)?;
            }
            Ok(())
        })
        .await?;
        self.flush().await
    }

    async fn delete_device(&self, device_id: &str) -> Result<bool, MetaError> {
        let id = device_id.to_owned();
        let gone = self
            .blocking(move |s| {
                s.device_credentials
                    .remove(id.as_bytes())
                    .map_err(backend)?;
                s.remove_psk(&id)?;
                Ok(s.devices.remove(id.as_bytes()).map_err(backend)?.is_some())
            })
            .await?;
        self.flush().await?;
        Ok(gone)
    }

    async fn list_devices(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Device>, MetaError> {
        let after = after.map(str::to_owned);
        self.blocking(move |s| s.scan(&s.devices, b"", after.as_deref().map(str::as_bytes), limit))
            .await
    }

    async fn device_credential(
        &self,
        device_id: &str,
    ) -> Result<Option<DeviceCredential>, MetaError> {
        let id = device_id.to_owned();
        self.point(move |s| {
            s.device_credentials
                .get(id.as_bytes())
                .map_err(backend)?
                .map(|v| decode(id.as_bytes(), &v))
                .transpose()
        })
        .await
    }

    async fn put_device_credential(&self, credential: &DeviceCredential) -> Result<(), MetaError> {
        let json = serde_json::to_vec(credential).map_err(backend)?;
        let id = credential.device_id.clone();
        self.blocking(move |s| {
            s.device_credentials
                .insert(id.as_bytes(), json)
                .map_err(backend)?;
            Ok(())
        })
        .await?;
        self.flush().await
    }

    async fn remove_device_credential(&self, device_id: &str) -> Result<bool, MetaError> {
        let id = device_id.to_owned();
        let gone = self
            .blocking(move |s| {
                Ok(s.device_credentials
                    .remove(id.as_bytes())
                    .map_err(backend)?
                    .is_some())
            })
            .await?;
        self.flush().await?;
        Ok(gone)
    }

    async fn put_device_psk(&self, psk: &DevicePsk) -> Result<bool, MetaError> {
        let psk = psk.clone();
        let json = serde_json::to_vec(&psk).map_err(backend)?;
        let stored = self
            .blocking(move |s| {
                let by_identity = [b"i", psk.identity.as_bytes()].concat();
                let by_device = [b"d", psk.device_id.as_bytes()].concat();
                let r = s.device_psks.transaction(|tx| {
                    if let Some(v) = tx.get(&by_identity)? {
                        let owner: Option<DevicePsk> = serde_json::from_slice(&v).ok();
                        if owner.is_some_and(|o| o.device_id != psk.device_id) {
                            return Ok(false);
                        }
                    }
                    if let Some(old) = tx.get(&by_device)? {
                        tx.remove([b"i", old.as_ref()].concat())?;
                    }
                    tx.insert(by_identity.as_slice(), json.as_slice())?;
                    tx.insert(by_device.as_slice(), psk.identity.as_bytes())?;
                    Ok(true)
                });
                r.map_err(|e: TransactionError<()>| backend(format!("{e:?}")))
            })
            .await?;
        self.flush().await?;
        Ok(stored)
    }

    async fn psk_by_identity(&self, identity: &str) -> Result<Option<DevicePsk>, MetaError> {
        let key = [b"i", identity.as_bytes()].concat();
        self.blocking(move |s| {
            s.device_psks
                .get(&key)
                .map_err(backend)?
                .map(|v| decode(&key, &v))
                .transpose()
        })
        .await
    }

    async fn device_psk(&self, device_id: &str) -> Result<Option<DevicePsk>, MetaError> {
        let key = [b"d", device_id.as_bytes()].concat();
        let identity = self
            .blocking(move |s| s.device_psks.get(&key).map_err(backend))
            .await?;
        match identity {
            Some(i) => self.psk_by_identity(&String::from_utf8_lossy(&i)).await,
            None => Ok(None),
        }
    }

    async fn remove_device_psk(&self, device_id: &str) -> Result<bool, MetaError> {
        let id = device_id.to_owned();
        let gone = self.blocking(move |s| s.remove_psk(&id)).await?;
        self.flush().await?;
        Ok(gone)
    }
}

impl SledStore {
    /// Removes the device's pre-shared key and its identity; whether it had one.
    fn remove_psk(&self, device_id: &str) -> Result<bool, MetaError> {
        let by_device = [b"d", device_id.as_bytes()].concat();
        let r = self.device_psks.transaction(|tx| {
            let Some(identity) = tx.get(&by_device)? else {
                return Ok(false);
            };
            tx.remove([b"i", identity.as_ref()].concat())?;
            tx.remove(by_device.as_slice())?;
            Ok(true)
        });
        r.map_err(|e: TransactionError<()>| backend(format!("{e:?}")))
    }
}

#[async_trait]
impl super::DeviceReads for SledStore {}

#[async_trait]
impl GroupStore for SledStore {
    async fn get_group(&self, name: &str) -> Result<Option<Group>, MetaError> {
        let name = name.to_owned();
        self.blocking(move |s| {
            s.groups
                .get(name.as_bytes())
                .map_err(backend)?
                .map(|v| decode(name.as_bytes(), &v))
                .transpose()
        })
        .await
    }

    async fn put_group(&self, group: &Group) -> Result<(), MetaError> {
        let json = serde_json::to_vec(group).map_err(backend)?;
        let name = group.name.clone();
        self.blocking(move |s| {
            s.groups.insert(name.as_bytes(), json).map_err(backend)?;
            Ok(())
        })
        .await?;
        self.flush().await
    }

    async fn delete_group(&self, name: &str) -> Result<bool, MetaError> {
        let name = name.to_owned();
        let gone = self
            .blocking(move |s| Ok(s.groups.remove(name.as_bytes()).map_err(backend)?.is_some()))
            .await?;
        self.flush().await?;
        Ok(gone)
    }

    async fn list_groups(&self) -> Result<Vec<Group>, MetaError> {
        self.blocking(|s| s.scan(&s.groups, b"", None, usize::MAX))
            .await
    }
}

#[async_trait]
impl CampaignStore for SledStore {
    async fn create_campaign(
        &self,
        campaign: &Campaign,
        _announce: Option<&str>,
    ) -> Result<(), MetaError> {
        let json = serde_json::to_vec(campaign).map_err(backend)?;
        let key = campaign_key(&campaign.id);
        self.blocking(move |s| {
            s.fleet.insert(key, json).map_err(backend)?;
            Ok(())
        })
        .await?;
        self.flush().await
    }

    async fn get_campaign(&self, id: &str) -> Result<Option<Campaign>, MetaError> {
        let key = campaign_key(id);
        self.point(move |s| s.get_json(&key)).await
    }

    async fn put_campaign(
        &self,
        campaign: &Campaign,
        expected: u64,
        _announce: Option<&str>,
    ) -> Result<bool, MetaError> {
        let json = serde_json::to_vec(campaign).map_err(backend)?;
        let key = campaign_key(&campaign.id);
        let stored = self
            .blocking(move |s| {
                s.transact_fleet(|tx| {
                    let now: Option<Campaign> =
                        tx.get(&key)?.and_then(|v| serde_json::from_slice(&v).ok());
                    if now.is_none_or(|c| c.revision != expected) {
                        return Ok(false);
                    }
                    tx.insert(key.as_slice(), json.as_slice())?;
                    Ok(true)
                })
            })
            .await?;
        if stored {
            self.flush().await?;
        }
        Ok(stored)
    }

    async fn list_campaigns(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Campaign>, MetaError> {
        let after = after.map(str::to_owned);
        self.blocking(move |s| s.scan(&s.fleet, b"K", after.as_deref().map(str::as_bytes), limit))
            .await
    }

    async fn live_campaigns(&self) -> Result<Vec<Campaign>, MetaError> {
        let all: Vec<Campaign> = self
            .blocking(|s| s.scan(&s.fleet, b"K", None, usize::MAX))
            .await?;
        Ok(all.into_iter().filter(|c| c.state.is_live()).collect())
    }

    async fn start_campaign(
        &self,
        campaign: &Campaign,
        expected: u64,
        members: &[Member],
        _announce: Option<&str>,
    ) -> Result<bool, MetaError> {
        let json = serde_json::to_vec(campaign).map_err(backend)?;
        let cid = campaign.id.clone();
        let members = members.to_vec();
        let stored = self
            .blocking(move |s| {
                let _one = s.fleet_gate.lock().unwrap_or_else(|e| e.into_inner());
                let key = campaign_key(&cid);
                let now: Option<Campaign> = s
                    .fleet
                    .get(&key)
                    .map_err(backend)?
                    .map(|v| decode(&key, &v))
                    .transpose()?;
                if now.is_none_or(|c| c.revision != expected || c.state.is_live()) {
                    return Ok(false);
                }
                // One batch: the campaign, its roster and the counts land together. Keys a
                // crashed earlier start left behind go in the same batch.
                let mut batch = sled::Batch::default();
                for kind in [b'm', b's', b'w', b'k', b'c', b'r', b'p', b'P', b'D'] {
                    for item in s.fleet.scan_prefix(k(kind, &cid)) {
                        batch.remove(item.map_err(backend)?.0);
                    }
                }
                let chunks = roster::chunks(&cid, &members);
                let lasts: Vec<u64> = chunks.iter().map(|c| c.bounds().1).collect();
                for (i, chunk) in chunks.iter().enumerate() {
                    let json = serde_json::to_vec(chunk).map_err(backend)?;
                    batch.insert(chunk_key(&cid, i as u32), json);
                }
                batch.insert(k(b'P', &cid), serde_json::to_vec(&lasts).map_err(backend)?);
                let mut counts = std::collections::BTreeMap::<(u32, String), i64>::new();
                for m in &members {
                    *counts.entry((m.wave, m.status.clone())).or_default() += 1;
                }
                for ((wave, status), n) in counts {
                    batch.insert(count_key(&cid, wave, &status), &n.to_be_bytes());
                }
                batch.insert(key, json);
                s.fleet.apply_batch(batch).map_err(backend)?;
                s.rosters.forget(&cid);
                Ok(true)
            })
            .await?;
        if stored {
            self.flush().await?;
        }
        Ok(stored)
    }

    async fn materialize(&self, campaign: &str) -> Result<bool, MetaError> {
        let cid = campaign.to_owned();
        let wrote = self
            .blocking(move |s| {
                let _one = s.fleet_gate.lock().unwrap_or_else(|e| e.into_inner());
                let Some(lasts) = s.roster_lasts(&cid)? else {
                    return Ok(false);
                };
                let done_key = k(b'D', &cid);
                let done = s
                    .fleet
                    .get(&done_key)
                    .map_err(backend)?
                    .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
                    .map_or(0, u32::from_be_bytes);
                if done as usize >= lasts.len() {
                    return Ok(false);
                }
                let chunk = s
                    .roster_chunk(&cid, done)?
                    .ok_or_else(|| MetaError::Corrupt {
                        key: String::from_utf8_lossy(&chunk_key(&cid, done)).into_owned(),
                        message: "a roster chunk is missing".into(),
                    })?;
                // Counted at the start already; a member record that exists is newer.
                let mut batch = sled::Batch::default();
                for m in chunk.members() {
                    let mk = member_key(&cid, &m.device_id);
                    if s.fleet.contains_key(&mk).map_err(backend)? {
                        continue;
                    }
                    for e in entries(&cid, &m) {
                        batch.insert(e, &[]);
                    }
                    batch.insert(mk, serde_json::to_vec(&m).map_err(backend)?);
                }
                batch.insert(done_key, &(done + 1).to_be_bytes());
                s.fleet.apply_batch(batch).map_err(backend)?;
                Ok(true)
            })
            .await?;
        if wrote {
            self.flush().await?;
        }
        Ok(wrote)
    }

    async fn campaign_counts(&self, id: &str) -> Result<Counts, MetaError> {
        let cid = id.to_owned();
        self.blocking(move |s| {
            let mut counts = Counts::default();
            let prefix = k(b'c', &cid);
            for item in s.fleet.scan_prefix(&prefix) {
                let (key, v) = item.map_err(backend)?;
                let rest = &key[prefix.len()..];
                let wave = u32::from_be_bytes(rest[..4].try_into().map_err(backend)?);
                let status = String::from_utf8_lossy(&rest[4..]);
                counts.add(wave as usize, &status, read_count(Some(v)));
            }
            let prefix = k(b'r', &cid);
            for item in s.fleet.scan_prefix(&prefix) {
                let (key, v) = item.map_err(backend)?;
                let reason = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                counts
                    .reasons
                    .insert(reason, read_count(Some(v)).max(0) as u64);
            }
            Ok(counts)
        })
        .await
    }

    async fn get_member(&self, campaign: &str, device: &str) -> Result<Option<Member>, MetaError> {
        let (cid, device) = (campaign.to_owned(), device.to_owned());
        self.point(move |s| match s.get_json(&member_key(&cid, &device))? {
            Some(m) => Ok(Some(m)),
            None => s.in_roster(&cid, &device),
        })
        .await
    }

    async fn add_member(&self, campaign: &str, m: &Member) -> Result<bool, MetaError> {
        let (cid, m) = (campaign.to_owned(), m.clone());
        let added = self
            .blocking(move |s| {
                if s.in_roster(&cid, &m.device_id)?.is_some() {
                    return Ok(false);
                }
                s.transact_fleet(|tx| {
                    if get_member::<bool>(tx, &cid, &m.device_id)?.is_some() {
                        return Ok(false);
                    }
                    put_member(tx, &cid, None, &m)?;
                    Ok(true)
                })
            })
            .await?;
        if added {
            self.flush().await?;
        }
        Ok(added)
    }

    async fn move_member(
        &self,
        campaign: &str,
        from: &[&str],
        m: &Member,
    ) -> Result<bool, MetaError> {
        let (cid, m) = (campaign.to_owned(), m.clone());
        let from: Vec<String> = from.iter().map(|s| s.to_string()).collect();
        let moved = self
            .blocking(move |s| {
                s.transact_fleet(|tx| {
                    let Some(old) = get_member::<bool>(tx, &cid, &m.device_id)? else {
                        return Ok(false);
                    };
                    if !from.contains(&old.status) {
                        return Ok(false);
                    }
                    put_member(tx, &cid, Some(&old), &m)?;
                    Ok(true)
                })
            })
            .await?;
        if moved {
            self.flush().await?;
        }
        Ok(moved)
    }

    async fn list_members(
        &self,
        campaign: &str,
        status: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Member>, MetaError> {
        let cid = campaign.to_owned();
        let (status, after) = (status.map(str::to_owned), after.map(str::to_owned));
        self.blocking(move |s| match status {
            None => s.scan(
                &s.fleet,
                &k(b'm', &cid),
                after.as_deref().map(str::as_bytes),
                limit,
            ),
            Some(st) => {
                let prefix = [k(b's', &cid), st.into_bytes(), vec![0]].concat();
                s.members_at(&cid, prefix, after.as_deref(), 0, limit, |_| false)
            }
        })
        .await
    }

    async fn waiting_members(
        &self,
        campaign: &str,
        max_wave: u32,
        limit: usize,
    ) -> Result<Vec<Member>, MetaError> {
        let cid = campaign.to_owned();
        self.blocking(move |s| {
            s.members_at(&cid, k(b'w', &cid), None, 12, limit, |rest| {
                u32::from_be_bytes(rest[..4].try_into().unwrap_or_default()) > max_wave
            })
        })
        .await
    }

    async fn skipped_due(
        &self,
        campaign: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Member>, MetaError> {
        let cid = campaign.to_owned();
        self.blocking(move |s| {
            s.members_at(&cid, k(b'k', &cid), None, 8, limit, |rest| {
                u64::from_be_bytes(rest[..8].try_into().unwrap_or_default()) > now_ms.max(0) as u64
            })
        })
        .await
    }
}
