//! Device identity: a device token per device, shown once and kept only as its SHA-256, that
//! the device presents on its work requests and reports (HTTP: `Authorization: Bearer`; CoAP:
//! the Uri-Query `token=`). With `auth.device_credentials` every device must have one; without
//! it, a device that has one must still present it, and others act without.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::meta::DeviceCredential;

/// Prefix of every device token, so a leaked one is recognisable and never mistaken for an
/// access token (`fwr_`).
pub const DEVICE_TOKEN_PREFIX: &str = "fwd_";

/// A new token for `device_id`, and what is stored of it.
pub fn mint(device_id: &str) -> Result<(String, DeviceCredential), getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)?;
    let token = format!("{DEVICE_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let created_at = jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string());
    let credential = DeviceCredential {
        device_id: device_id.to_owned(),
        sha256: hex::encode(Sha256::digest(token.as_bytes())),
        created_at,
    };
    Ok((token, credential))
}

/// Whether `presented` is the token behind `credential` (compared without early exit).
pub fn matches(credential: &DeviceCredential, presented: &str) -> bool {
    let digest = hex::encode(Sha256::digest(presented.as_bytes()));
    let (a, b) = (digest.as_bytes(), credential.sha256.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a device may do given its stored credential and the token it presented.
pub fn admits(
    required: bool,
    credential: Option<&DeviceCredential>,
    presented: Option<&str>,
) -> bool {
    match (credential, presented) {
        (None, _) => !required,
        (Some(c), Some(p)) => matches(c, p),
        (Some(_), None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_only_its_credential() {
        let (token, cred) = mint("urn:imei:1").unwrap();
        assert!(token.starts_with(DEVICE_TOKEN_PREFIX));
        assert!(!cred.sha256.contains(&token[4..]));
        let (other, _) = mint("urn:imei:1").unwrap();
        assert!(matches(&cred, &token));
        assert!(!matches(&cred, &other));
        assert!(!matches(&cred, ""));
        // Off: a device without a credential acts freely, one with it must show it.
        assert!(admits(false, None, None));
        assert!(admits(false, None, Some("anything")));
        assert!(!admits(false, Some(&cred), None));
        assert!(!admits(false, Some(&cred), Some(&other)));
        assert!(admits(false, Some(&cred), Some(&token)));
        // On: every device needs its own.
        assert!(!admits(true, None, None));
        assert!(!admits(true, None, Some(&token)));
        assert!(admits(true, Some(&cred), Some(&token)));
    }
}
