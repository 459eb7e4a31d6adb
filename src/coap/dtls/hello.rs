//! The stateless part of a DTLS 1.2 server (RFC 6347 §4.2.1): reading a ClientHello out of a
//! datagram, the cookie (an HMAC of the peer's address, the ClientHello's random and a time
//! slot, so it needs no state and expires), the HelloVerifyRequest that carries it, and the
//! first ClientHello rebuilt from a second one, which lets a fresh OpenSSL session replay the
//! cookie exchange it did not see (see `session`).
//!
//! Nothing here allocates per peer: a spoofed ClientHello costs one HMAC and one small reply.

use std::net::SocketAddr;
use std::ops::Range;

use crate::auth::mac::{hmac_sha256, same};

/// Record content type of handshake messages.
const HANDSHAKE: u8 = 22;
/// Handshake message types.
const CLIENT_HELLO: u8 = 1;
const HELLO_VERIFY_REQUEST: u8 = 3;
pub const CLIENT_KEY_EXCHANGE: u8 = 16;
/// DTLS record header: type, version (2), epoch (2), sequence number (6), length (2).
pub const RECORD_HEADER: usize = 13;
/// Handshake header: type, length (3), message_seq (2), fragment offset (3) and length (3).
const HANDSHAKE_HEADER: usize = 12;
/// DTLS 1.0's version on the wire, which a HelloVerifyRequest carries whatever the version
/// negotiated later (RFC 6347 §4.2.1).
const DTLS_1_0: [u8; 2] = [0xfe, 0xff];
/// Cookie bytes sent (of the 32-byte HMAC).
const COOKIE_LEN: usize = 16;

/// A ClientHello that arrived whole in one record at the start of a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// The datagram.
    pub datagram: &'a [u8],
    pub record_seq: [u8; 6],
    pub message_seq: u16,
    pub random: [u8; 32],
    /// Where the cookie (without its length byte) is in `datagram`.
    pub cookie: Range<usize>,
}

fn be(b: &[u8]) -> usize {
    b.iter().fold(0, |n, x| (n << 8) | *x as usize)
}

/// The first record of a datagram: (type, epoch, its fragment), if the header is whole.
pub fn first_record(d: &[u8]) -> Option<(u8, u16, &[u8])> {
    let header = d.get(..RECORD_HEADER)?;
    let len = be(&header[11..13]);
    let body = d.get(RECORD_HEADER..RECORD_HEADER + len)?;
    Some((header[0], be(&header[3..5]) as u16, body))
}

/// The handshake message of type `kind` a datagram starts with, in epoch 0 (plaintext) and
/// unfragmented: (its header, its body).
fn first_handshake(d: &[u8], kind: u8) -> Option<(&[u8], &[u8])> {
    let (content, epoch, body) = first_record(d)?;
    if content != HANDSHAKE || epoch != 0 {
        return None;
    }
    let hs = body.get(..HANDSHAKE_HEADER)?;
    let (len, frag_off, frag_len) = (be(&hs[1..4]), be(&hs[6..9]), be(&hs[9..12]));
    if hs[0] != kind || frag_off != 0 || frag_len != len {
        return None;
    }
    Some((hs, body.get(HANDSHAKE_HEADER..HANDSHAKE_HEADER + len)?))
}

/// The ClientHello a datagram starts with: epoch 0, unfragmented, well formed up to its
/// cookie.
pub fn client_hello(d: &[u8]) -> Option<ClientHello<'_>> {
    let (hs, msg) = first_handshake(d, CLIENT_HELLO)?;
    // client_version (2), random (32), session_id <0..32>, cookie <0..255>, then the rest.
    let random: [u8; 32] = msg.get(2..34)?.try_into().ok()?;
    let sid_len = *msg.get(34)? as usize;
    if sid_len > 32 {
        return None;
    }
    let at = 35 + sid_len;
    let cookie_len = *msg.get(at)? as usize;
    let start = RECORD_HEADER + HANDSHAKE_HEADER + at + 1;
    // Something must follow the cookie (the cipher suites).
    msg.get(at + 1 + cookie_len..at + 3 + cookie_len)?;
    Some(ClientHello {
        datagram: d,
        record_seq: d[5..11].try_into().ok()?,
        message_seq: be(&hs[4..6]) as u16,
        random,
        cookie: start..start + cookie_len,
    })
}

/// The secret cookies are made with, and the time slots they are good for.
pub struct CookieKey {
    secret: [u8; 32],
}

/// A cookie is good in the slot it was made in and the next: 30 to 60 seconds.
pub const COOKIE_SLOT_SECS: u64 = 30;

impl CookieKey {
    pub fn random() -> CookieKey {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("system random source");
        CookieKey { secret }
    }

    /// The cookie for `peer` and `random` in time slot `slot`.
    pub fn cookie(&self, peer: SocketAddr, random: &[u8; 32], slot: u64) -> [u8; COOKIE_LEN] {
        let mut m = Vec::with_capacity(64);
        match peer {
            SocketAddr::V4(a) => m.extend_from_slice(&a.ip().octets()),
            SocketAddr::V6(a) => m.extend_from_slice(&a.ip().octets()),
        }
        m.extend_from_slice(&peer.port().to_be_bytes());
        m.extend_from_slice(random);
        m.extend_from_slice(&slot.to_be_bytes());
        let mac = hmac_sha256(&self.secret, &m);
        mac[..COOKIE_LEN].try_into().unwrap_or_default()
    }

    /// Whether `ch` carries the cookie made for `peer` in slot `now_slot` or the one before.
    pub fn verify(&self, peer: SocketAddr, ch: &ClientHello<'_>, now_slot: u64) -> bool {
        let got = &ch.datagram[ch.cookie.clone()];
        got.len() == COOKIE_LEN
            && [now_slot, now_slot.saturating_sub(1)]
                .iter()
                .any(|slot| same(got, &self.cookie(peer, &ch.random, *slot)))
    }
}

fn handshake_record(
    record_seq: &[u8; 6],
    version: [u8; 2],
    kind: u8,
    message_seq: u16,
    body: &[u8],
) -> Vec<u8> {
    let hs_len = HANDSHAKE_HEADER + body.len();
    let mut out = Vec::with_capacity(RECORD_HEADER + hs_len);
    out.push(HANDSHAKE);
    out.extend_from_slice(&version);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(record_seq);
    out.extend_from_slice(&(hs_len as u16).to_be_bytes());
    out.push(kind);
    let len = (body.len() as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.extend_from_slice(&message_seq.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&len[1..]);
    out.extend_from_slice(body);
    out
}

/// The HelloVerifyRequest answering `ch` with `cookie`, in a record with the ClientHello's
/// sequence number (RFC 6347 §4.2.1).
pub fn hello_verify_request(ch: &ClientHello<'_>, cookie: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(3 + cookie.len());
    body.extend_from_slice(&DTLS_1_0);
    body.push(cookie.len() as u8);
    body.extend_from_slice(cookie);
    handshake_record(&ch.record_seq, DTLS_1_0, HELLO_VERIFY_REQUEST, 0, &body)
}

/// The ClientHello `ch` (a second one, carrying a cookie) as the first would have been: no
/// cookie, message sequence 0, record sequence 0. Only what OpenSSL reads of the first is
/// kept: the HelloVerifyRequest it answers with is dropped, and the handshake transcript
/// starts at the second (RFC 6347 §4.2.1).
pub fn first_client_hello(ch: &ClientHello<'_>) -> Vec<u8> {
    let d = ch.datagram;
    let msg_start = RECORD_HEADER + HANDSHAKE_HEADER;
    let hs_len = be(&d[RECORD_HEADER + 1..RECORD_HEADER + 4]);
    let msg = &d[msg_start..msg_start + hs_len];
    let cookie_at = ch.cookie.start - msg_start;
    let mut body = Vec::with_capacity(msg.len());
    body.extend_from_slice(&msg[..cookie_at - 1]);
    body.push(0);
    body.extend_from_slice(&msg[cookie_at + ch.cookie.len()..]);
    let version = [d[1], d[2]];
    handshake_record(&[0; 6], version, CLIENT_HELLO, 0, &body)
}

/// The PSK identity of the ClientKeyExchange a datagram starts with (epoch 0, unfragmented),
/// so the key can be looked up before OpenSSL asks for it.
pub fn psk_identity(d: &[u8]) -> Option<&[u8]> {
    let (_, msg) = first_handshake(d, CLIENT_KEY_EXCHANGE)?;
    let id_len = be(msg.get(..2)?);
    msg.get(2..2 + id_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a client builds it: version DTLS 1.2, a random, an empty session id,
    /// `cookie`, two cipher suites, null compression, no extensions.
    fn hello(cookie: &[u8], message_seq: u16, record_seq: u8) -> Vec<u8> {
        let mut body = vec![0xfe, 0xfd];
        body.extend((0..32).map(|i| i as u8));
        body.push(0);
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 4, 0xc0, 0xa8, 0x00, 0xa8, 1, 0]);
        handshake_record(
            &[0, 0, 0, 0, 0, record_seq],
            [0xfe, 0xfd],
            CLIENT_HELLO,
            message_seq,
            &body,
        )
    }

    #[test]
    fn a_cookie_is_good_for_its_peer_and_random_for_two_slots() {
        let key = CookieKey::random();
        let peer: SocketAddr = "192.0.2.7:5684".parse().unwrap();
        let first = hello(&[], 0, 0);
        let ch = client_hello(&first).unwrap();
        assert_eq!(ch.cookie.len(), 0);
        assert!(!key.verify(peer, &ch, 10));
        let cookie = key.cookie(peer, &ch.random, 10);
        let hvr = hello_verify_request(&ch, &cookie);
        assert_eq!(hvr[0], HANDSHAKE);
        assert_eq!(hvr[RECORD_HEADER], HELLO_VERIFY_REQUEST);
        assert!(hvr.ends_with(&cookie));

        let second = hello(&cookie, 1, 1);
        let ch2 = client_hello(&second).unwrap();
        assert_eq!((ch2.message_seq, ch2.record_seq[5]), (1, 1));
        assert!(key.verify(peer, &ch2, 10));
        assert!(key.verify(peer, &ch2, 11), "the next slot");
        assert!(!key.verify(peer, &ch2, 12), "expired");
        assert!(!key.verify("192.0.2.7:5685".parse().unwrap(), &ch2, 10));
        assert!(!CookieKey::random().verify(peer, &ch2, 10));

        // The first ClientHello rebuilt from the second is the first, byte for byte.
        assert_eq!(first_client_hello(&ch2), first);
    }

    #[test]
    fn anything_else_is_not_a_client_hello() {
        let good = hello(&[1, 2, 3], 1, 1);
        for cut in 0..good.len() {
            assert_eq!(client_hello(&good[..cut]), None, "cut at {cut}");
        }
        let mut epoch1 = good.clone();
        epoch1[4] = 1;
        assert_eq!(client_hello(&epoch1), None);
        let mut fragment = good.clone();
        fragment[RECORD_HEADER + 11] -= 1;
        assert_eq!(client_hello(&fragment), None);
        let mut long_sid = good.clone();
        long_sid[RECORD_HEADER + HANDSHAKE_HEADER + 34] = 33;
        assert_eq!(client_hello(&long_sid), None);
        assert_eq!(client_hello(&[]), None);
    }

    #[test]
    fn the_psk_identity_of_a_client_key_exchange() {
        let cke = handshake_record(
            &[0; 6],
            [0xfe, 0xfd],
            CLIENT_KEY_EXCHANGE,
            2,
            b"\0\x05meter",
        );
        assert_eq!(psk_identity(&cke), Some(&b"meter"[..]));
        assert_eq!(psk_identity(&cke[..cke.len() - 1]), None);
        assert_eq!(psk_identity(&hello(&[], 0, 0)), None);
    }
}
