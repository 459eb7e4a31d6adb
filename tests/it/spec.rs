//! Documents that must stay true: openapi.yaml against the router, and the sample config
//! against the configuration's keys and defaults.

use std::collections::BTreeMap;

use fwrepo::auth::Rule;

/// (METHOD, path) → its `x-fwrepo-role` for every operation under `paths:` in openapi.yaml,
/// read by indentation.
fn spec_routes(text: &str) -> BTreeMap<(String, String), Option<String>> {
    let mut out = BTreeMap::new();
    let mut in_paths = false;
    let mut path: Option<String> = None;
    let mut op: Option<(String, String)> = None;
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
            op = None;
        } else if let Some(role) = line.strip_prefix("      x-fwrepo-role:") {
            let key = op.clone().expect("x-fwrepo-role under an operation");
            out.insert(key, Some(role.trim().to_owned()));
        } else if let Some(m) = line.strip_prefix("    ") {
            let m = m.split(':').next().unwrap_or_default();
            if ["get", "put", "post", "patch", "delete", "head", "options"].contains(&m) {
                let key = (m.to_uppercase(), path.clone().expect("method under a path"));
                out.insert(key.clone(), None);
                op = Some(key);
            }
        }
    }
    out
}

fn rule_name(rule: Rule) -> String {
    match rule {
        Rule::Public => "public".into(),
        Rule::Device | Rule::DeviceByName => "device".into(),
        Rule::Role(r) => r.as_str().into(),
    }
}

#[test]
fn openapi_matches_the_router() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let spec = spec_routes(&text);
    let served: BTreeMap<(String, String), Option<String>> = fwrepo::http::routes()
        .table()
        .iter()
        .map(|(m, p, r)| ((m.to_string(), p.to_string()), Some(rule_name(*r))))
        .collect();
    let missing: Vec<_> = served.keys().filter(|k| !spec.contains_key(*k)).collect();
    let extra: Vec<_> = spec.keys().filter(|k| !served.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "not in openapi.yaml: {missing:?}; not served: {extra:?}"
    );
    // Each operation documents the access rule it really has.
    let wrong: Vec<_> = served
        .iter()
        .filter(|(k, rule)| spec[*k] != **rule)
        .map(|(k, rule)| {
            format!(
                "{} {}: served as {rule:?}, documented {:?}",
                k.0, k.1, spec[k]
            )
        })
        .collect();
    assert!(wrong.is_empty(), "x-fwrepo-role: {wrong:#?}");
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
