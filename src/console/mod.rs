//! The web console at `/ui/`: a few ES modules, a stylesheet and one HTML shell, built into
//! the binary (no CDN, no Node toolchain: the sources are what is served), calling the same
//! JSON API as every other client with a session cookie (`session`). Every answer carries a
//! strict Content-Security-Policy: scripts and styles from this origin only, no inline code.

pub mod session;

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// One file of the console.
pub struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub bytes: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:literal) => {
        Asset {
            name: $name,
            content_type: $type,
            bytes: include_bytes!(concat!("assets/", $name)),
        }
    };
}

/// Everything the console is made of.
pub static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("icon.svg", "image/svg+xml"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("api.js", "text/javascript; charset=utf-8"),
    asset!("dom.js", "text/javascript; charset=utf-8"),
    asset!("session.js", "text/javascript; charset=utf-8"),
    asset!("signin.js", "text/javascript; charset=utf-8"),
    asset!("firmware.js", "text/javascript; charset=utf-8"),
    asset!("upload.js", "text/javascript; charset=utf-8"),
    asset!("updates.js", "text/javascript; charset=utf-8"),
    asset!("events.js", "text/javascript; charset=utf-8"),
    asset!("tokens.js", "text/javascript; charset=utf-8"),
    asset!("table.js", "text/javascript; charset=utf-8"),
    asset!("chart.js", "text/javascript; charset=utf-8"),
    asset!("fleet.js", "text/javascript; charset=utf-8"),
    asset!("campaigns.js", "text/javascript; charset=utf-8"),
    asset!("schedules.js", "text/javascript; charset=utf-8"),
    asset!("health.js", "text/javascript; charset=utf-8"),
];

/// The policy every console answer carries.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The asset called `name`, with its ETag.
pub fn asset(name: &str) -> Option<(&'static Asset, &'static str)> {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    let etags = ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| format!("\"{}\"", hex::encode(&Sha256::digest(a.bytes)[..12])))
            .collect()
    });
    let i = ASSETS.iter().position(|a| a.name == name)?;
    Some((&ASSETS[i], etags[i].as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_the_pages_import_is_served() {
        for a in ASSETS
            .iter()
            .filter(|a| a.name.ends_with(".js") || a.name.ends_with(".html"))
        {
            let text = std::str::from_utf8(a.bytes).unwrap();
            for (i, _) in text.match_indices("from \"./") {
                let rest = &text[i + "from \"./".len()..];
                let name = &rest[..rest.find('"').unwrap()];
                assert!(
                    asset(name).is_some(),
                    "{} imports {name}, which is not served",
                    a.name
                );
            }
            // The policy forbids inline code: none may be written.
            assert!(
                !text.contains("<script>") && !text.contains(" onclick="),
                "{}",
                a.name
            );
            assert!(
                !text.contains("innerHTML"),
                "{}: build the DOM with dom.js",
                a.name
            );
        }
        assert!(asset("index.html").unwrap().1.starts_with('"'));
        assert!(asset("../Cargo.toml").is_none());
    }
}
