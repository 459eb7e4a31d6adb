//! A started campaign's roster: the devices its target resolved to, in release order, stored
//! as a few chunks when the campaign starts instead of one record per device. Starting a
//! campaign over 100,000 devices then writes some fifty records, not several hundred
//! thousand; the driver turns chunks into member records ("materializes" them) in release
//! order, ahead of the releases, in the background.
//!
//! Until its chunk is materialized a device is a waiting member all the same: the stores look
//! it up in its chunk (found by its release position, which is a hash of campaign and device),
//! count it with the waiting members from the start, and refuse it as a late joiner.

use serde::{Deserialize, Serialize};

use super::campaign::{member, Member};

/// Devices per chunk.
pub const CHUNK: usize = 2048;

/// A campaign's order of release: a hash of the campaign and device, so the first waves are a
/// spread of the fleet rather than the devices whose ids sort first. Below 2^63, so it fits a
/// signed 64-bit column.
pub fn position(cid: &str, device: &str) -> u64 {
    use sha2::Digest;
    let h = sha2::Sha256::new()
        .chain_update(cid.as_bytes())
        .chain_update([0])
        .chain_update(device.as_bytes())
        .finalize();
    u64::from_be_bytes(h[..8].try_into().unwrap_or_default()) >> 1
}

/// A roster member as it starts: waiting.
pub fn waiting(device: &str, wave: u32, position: u64) -> Member {
    Member {
        device_id: device.to_owned(),
        wave,
        position,
        status: member::WAITING.to_owned(),
        task_id: None,
        reason: None,
        retry_at_ms: None,
    }
}

/// Consecutive members of a roster (in release order), column by column.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub devices: Vec<String>,
    pub waves: Vec<u32>,
    pub positions: Vec<u64>,
}

impl Chunk {
    /// The first and last release position it holds.
    pub fn bounds(&self) -> (u64, u64) {
        (
            self.positions.first().copied().unwrap_or(0),
            self.positions.last().copied().unwrap_or(0),
        )
    }

    /// Its members, all waiting.
    pub fn members(&self) -> impl Iterator<Item = Member> + '_ {
        (0..self.devices.len()).map(|i| self.member(i))
    }

    fn member(&self, i: usize) -> Member {
        waiting(&self.devices[i], self.waves[i], self.positions[i])
    }

    /// The device's member if the chunk holds it (`position` is the device's).
    pub fn find(&self, device: &str, position: u64) -> Option<Member> {
        let from = self.positions.partition_point(|p| *p < position);
        (from..self.positions.len())
            .take_while(|i| self.positions[*i] == position)
            .find(|i| self.devices[*i] == device)
            .map(|i| self.member(i))
    }
}

/// Splits campaign `cid`'s members into chunks in release order (position, then device).
/// Each member's position must be the roster's [`position`] (the caller computed it to
/// assign waves), since the stores find a device's chunk by it.
pub fn chunks(cid: &str, members: &[Member]) -> Vec<Chunk> {
    debug_assert!(members
        .iter()
        .all(|m| m.position == position(cid, &m.device_id)));
    let mut sorted: Vec<&Member> = members.iter().collect();
    sorted.sort_unstable_by(|a, b| (a.position, &a.device_id).cmp(&(b.position, &b.device_id)));
    sorted
        .chunks(CHUNK)
        .map(|part| Chunk {
            devices: part.iter().map(|m| m.device_id.clone()).collect(),
            waves: part.iter().map(|m| m.wave).collect(),
            positions: part.iter().map(|m| m.position).collect(),
        })
        .collect()
}

/// Which chunk may hold `position`, given each chunk's last position (ascending).
pub fn chunk_of(lasts: &[u64], position: u64) -> Option<usize> {
    let i = lasts.partition_point(|last| *last < position);
    (i < lasts.len()).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(device: &str, wave: u32) -> Member {
        waiting(device, wave, position("c", device))
    }

    #[test]
    fn every_member_is_found_in_the_chunk_its_position_names_and_no_other_device_is() {
        let members: Vec<Member> = (0..5000).map(|i| member(&format!("d{i}"), i % 3)).collect();
        let chunks = chunks("c", &members);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.iter().map(|c| c.devices.len()).sum::<usize>(), 5000);
        let lasts: Vec<u64> = chunks.iter().map(|c| c.bounds().1).collect();
        assert!(lasts.windows(2).all(|w| w[0] < w[1]), "release order");
        for m in &members {
            let i = chunk_of(&lasts, m.position).expect("a chunk");
            assert_eq!(chunks[i].find(&m.device_id, m.position).as_ref(), Some(m));
        }
        for stranger in ["d5000", "x", ""] {
            let p = position("c", stranger);
            let found = chunk_of(&lasts, p).and_then(|i| chunks[i].find(stranger, p));
            assert_eq!(found, None, "{stranger}");
        }
        let back: Vec<Member> = chunks.iter().flat_map(|c| c.members()).collect();
        assert_eq!(back.len(), 5000);
        assert!(back.windows(2).all(|w| w[0].position <= w[1].position));
    }
}
