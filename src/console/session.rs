//! Console sessions: after signing in with an access token, the browser holds a cookie
//! `fwrepo_session = <token id>.<expiry>.<MAC>` (HttpOnly, SameSite=Strict, Secure under
//! HTTPS). Nothing is stored per session, so every instance sharing the keys and the tokens
//! accepts it; each request looks the token up again, so revoking the token ends its sessions
//! at once. Changes made with a session also need the `X-Fwrepo-Csrf` header, a MAC of the
//! cookie the page reads from `GET /ui/session` (a cross-site page can neither read it nor
//! send the cookie: SameSite=Strict).
//!
//! The MAC key is derived from the active signing key (a signature over a fixed label, which
//! Ed25519 makes deterministic), so instances that sign alike agree on it and no new secret
//! must be distributed; rotating the signing key signs everyone out.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::auth::mac::{hmac_sha256, same};
use crate::keys::KeyRing;

/// The cookie's name.
pub const COOKIE: &str = "fwrepo_session";
/// How long a sign-in lasts.
pub const LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// Issues and checks session cookies.
pub struct Sessions {
    key: [u8; 32],
}

/// A valid session: the token it was made with, and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub token_id: String,
    pub expires_secs: u64,
}

impl Sessions {
    pub fn new(keys: &KeyRing) -> Sessions {
        let label = Sha256::digest(b"fwrepo console session key, version 1");
        let signature = keys.sign_digest(&label.into());
        Sessions {
            key: Sha256::digest(signature.value).into(),
        }
    }

    #[cfg(test)]
    fn with_key(key: [u8; 32]) -> Sessions {
        Sessions { key }
    }

    fn mac(&self, purpose: &str, msg: &str) -> String {
        B64.encode(hmac_sha256(
            &self.key,
            format!("{purpose}\n{msg}").as_bytes(),
        ))
    }

    /// A cookie value for the token `token_id`, valid until `now_secs` + [`LIFETIME`].
    pub fn issue(&self, token_id: &str, now_secs: u64) -> String {
        let body = format!("{token_id}.{}", now_secs + LIFETIME.as_secs());
        format!("{body}.{}", self.mac("session", &body))
    }

    /// The session a cookie value names, if it is genuine and not expired.
    pub fn verify(&self, cookie: &str, now_secs: u64) -> Option<Session> {
        let (body, mac) = cookie.rsplit_once('.')?;
        if !same(self.mac("session", body).as_bytes(), mac.as_bytes()) {
            return None;
        }
        let (token_id, expires) = body.split_once('.')?;
        let expires_secs: u64 = expires.parse().ok()?;
        (expires_secs > now_secs).then(|| Session {
            token_id: token_id.to_owned(),
            expires_secs,
        })
    }

    /// The CSRF value that goes with a cookie value.
    pub fn csrf(&self, cookie: &str) -> String {
        self.mac("csrf", cookie)
    }

    /// Whether `sent` is the CSRF value of `cookie`.
    pub fn csrf_matches(&self, cookie: &str, sent: &str) -> bool {
        same(self.csrf(cookie).as_bytes(), sent.as_bytes())
    }
}

/// The session cookie's value among the request's cookies.
pub fn cookie(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_genuine_expire_and_carry_their_csrf() {
        let s = Sessions::with_key([7; 32]);
        let c = s.issue("ab12cd34", 1000);
        let got = s.verify(&c, 1001).unwrap();
        assert_eq!(got.token_id, "ab12cd34");
        assert_eq!(got.expires_secs, 1000 + LIFETIME.as_secs());
        assert!(s.verify(&c, 1000 + LIFETIME.as_secs()).is_none(), "expired");
        // Another token id, a later expiry, or another key: not genuine.
        let forged = c.replacen("ab12cd34", "ffffffff", 1);
        assert!(s.verify(&forged, 1001).is_none());
        let (body, mac) = c.rsplit_once('.').unwrap();
        let (id, _) = body.split_once('.').unwrap();
        assert!(s.verify(&format!("{id}.99999999999.{mac}"), 1001).is_none());
        assert!(Sessions::with_key([8; 32]).verify(&c, 1001).is_none());
        assert!(s.verify("garbage", 1).is_none());
        assert!(s.csrf_matches(&c, &s.csrf(&c)));
        assert!(!s.csrf_matches(&c, &s.csrf(&forged)));
        assert!(!s.csrf_matches(&c, ""));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = axum::http::HeaderMap::new();
        h.append(
            axum::http::header::COOKIE,
            "a=1; fwrepo_session=x.1.y".parse().unwrap(),
        );
        assert_eq!(cookie(&h), Some("x.1.y"));
        assert_eq!(cookie(&axum::http::HeaderMap::new()), None);
    }
}
