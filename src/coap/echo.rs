//! Amplification mitigation for CoAP over UDP (RFC 9175 §2.4, item 3). A spoofed request
//! could turn a 9-byte GET into a 1 KiB block sent to a victim. So the first request from an
//! address not yet verified is answered 4.01 Unauthorized carrying an Echo option, a few
//! bytes larger than the request at most; the client repeats its request with that Echo value
//! (libcoap's client does it on its own; aiocoap's does only inside OSCORE), which proves it
//! receives at that address, and it is served from then on. Echo values are stateless: a MAC over the address and the time
//! issued, under a key made at start-up, so spoofed requests cost no memory.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// The Echo option (RFC 9175 §2.2.1).
pub const ECHO: u16 = 252;
/// How long an Echo value may be sent back.
const ECHO_VALID: Duration = Duration::from_secs(60);
/// How long a verified address stays verified after its last request.
const VERIFIED_FOR: Duration = Duration::from_secs(600);
/// Verified addresses remembered at most; the least recently seen go first.
const MAX_VERIFIED: usize = 100_000;
/// Bytes of MAC in an Echo value (after 4 bytes of time).
const MAC_LEN: usize = 8;

/// The addresses that have proved they receive what is sent to them.
pub struct AddressCheck {
    key: [u8; 32],
    verified: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Default for AddressCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl AddressCheck {
    pub fn new() -> AddressCheck {
        let mut key = [0u8; 32];
        // Without the system's randomness the values are guessable only by someone who can
        // also predict this process's start time; still, say so.
        if let Err(e) = getrandom::fill(&mut key) {
            tracing::warn!(error = %e, "no randomness for CoAP Echo values");
        }
        AddressCheck {
            key,
            verified: Mutex::new(HashMap::new()),
        }
    }

    fn mac(&self, peer: SocketAddr, issued: u32) -> [u8; MAC_LEN] {
        let mut h = Sha256::new();
        h.update(self.key);
        match peer.ip() {
            IpAddr::V4(v4) => h.update(v4.octets()),
            IpAddr::V6(v6) => h.update(v6.octets()),
        }
        h.update(peer.port().to_be_bytes());
        h.update(issued.to_be_bytes());
        let digest = h.finalize();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&digest[..MAC_LEN]);
        out
    }

    fn now_secs() -> u32 {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        secs as u32
    }

    /// A fresh Echo value for `peer`.
    pub fn challenge(&self, peer: SocketAddr) -> Bytes {
        let issued = Self::now_secs();
        let mut v = Vec::with_capacity(4 + MAC_LEN);
        v.extend_from_slice(&issued.to_be_bytes());
        v.extend_from_slice(&self.mac(peer, issued));
        Bytes::from(v)
    }

    fn echo_holds(&self, peer: SocketAddr, echo: &[u8]) -> bool {
        let Ok(value) = <[u8; 4 + MAC_LEN]>::try_from(echo) else {
            return false;
        };
        let issued = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
        let age = Self::now_secs().wrapping_sub(issued);
        u64::from(age) <= ECHO_VALID.as_secs() && value[4..] == self.mac(peer, issued)
    }

    /// Whether a request from `peer` carrying `echo` may be served: the address was verified
    /// lately, or this Echo value proves it now.
    pub fn admit(&self, peer: SocketAddr, echo: Option<&[u8]>) -> bool {
        let now = Instant::now();
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(seen) = verified.get_mut(&peer) {
            if now.duration_since(*seen) < VERIFIED_FOR {
                *seen = now;
                return true;
            }
        }
        if !echo.is_some_and(|e| self.echo_holds(peer, e)) {
            return false;
        }
        if verified.len() >= MAX_VERIFIED {
            verified.retain(|_, seen| now.duration_since(*seen) < VERIFIED_FOR);
            if verified.len() >= MAX_VERIFIED {
                let oldest = verified.iter().min_by_key(|(_, t)| **t).map(|(a, _)| *a);
                if let Some(a) = oldest {
                    verified.remove(&a);
                }
            }
        }
        verified.insert(peer, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_proves_the_address_it_was_sent_to() {
        let check = AddressCheck::new();
        let a: SocketAddr = "192.0.2.1:5683".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:5684".parse().unwrap();
        assert!(!check.admit(a, None));
        let echo = check.challenge(a);
        assert_eq!(echo.len(), 12);
        assert!(!check.admit(b, Some(&echo)), "another address");
        let mut forged = echo.to_vec();
        forged[11] ^= 1;
        assert!(!check.admit(a, Some(&forged)));
        assert!(!check.admit(a, Some(&echo[..8])));
        assert!(check.admit(a, Some(&echo)));
        assert!(check.admit(a, None), "verified from then on");
        assert!(!check.admit(b, None));
        // An old value no longer counts.
        let old = issued_at(&check, b, AddressCheck::now_secs() - 61);
        assert!(!check.admit(b, Some(&old)));
    }

    fn issued_at(check: &AddressCheck, peer: SocketAddr, issued: u32) -> Vec<u8> {
        let mut v = issued.to_be_bytes().to_vec();
        v.extend_from_slice(&check.mac(peer, issued));
        v
    }
}
