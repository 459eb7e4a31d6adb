//! Documents that must stay true: openapi.yaml against the router, and the sample config
//! against the configuration's keys and defaults.

use std::collections::BTreeSet;

/// (METHOD, path) pairs under `paths:` in openapi.yaml, read by indentation.
fn spec_routes(text: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut in_paths = false;
    let mut path: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end().trim_end_matches(':')));
        } else if let Some(m) = line.strip_prefix("    ") {
            let m = m.split(':').next().unwrap_or_default();
            if ["get", "put", "post", "patch", "delete", "head", "options"].contains(&m) {
                out.insert((m.to_uppercase(), path.clone().expect("method under a path")));
            }
        }
    }
    out
}

#[test]
fn openapi_matches_the_router() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let spec = spec_routes(&text);
    let served: BTreeSet<(String, String)> = fwrepo::http::routes()
        .table()
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = served.difference(&spec).collect();
    let extra: Vec<_> = spec.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "not in openapi.yaml: {missing:?}; not served: {extra:?}"
    );
}

#[test]
fn sample_config_lists_every_key_with_its_default() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/fwrepo.toml"))
        .unwrap();
    let sample: toml::Table = text.parse().unwrap();
    let defaults = toml::Table::try_from(fwrepo::config::Config::default()).unwrap();
    assert_eq!(
        sample, defaults,
        "deploy/fwrepo.toml differs from the defaults"
    );
    // And it loads as a config file.
    fwrepo::config::Config::load(
        Some(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/fwrepo.toml"
        ))),
        Vec::new(),
        &[],
    )
    .unwrap();
}
