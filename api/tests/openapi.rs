//! api/openapi.yaml and the router's route table describe the same API; and
//! every route of Firecracker's document is in the table (served or refused
//! by name).

use std::collections::BTreeSet;

/// (METHOD, path) pairs under `paths:` of a Swagger document: paths are
/// keys at two spaces of indent, methods keys at four.
fn routes_of(yaml: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut in_paths = false;
    let mut path = None;
    for line in yaml.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end().trim_end_matches(':')));
        } else if let Some(m) = line.strip_prefix("    ") {
            let m = m.trim_end();
            if let Some(m) = m.strip_suffix(':') {
                if ["get", "put", "patch", "post", "delete"].contains(&m) {
                    if let Some(p) = &path {
                        out.insert((m.to_ascii_uppercase(), p.clone()));
                    }
                }
            }
        }
    }
    out
}

fn table(supported: Option<bool>) -> BTreeSet<(String, String)> {
    api::route_table()
        .iter()
        .filter(|r| match supported {
            None => true,
            Some(s) => s == r.unsupported.is_none(),
        })
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect()
}

#[test]
fn openapi_matches_the_router() {
    let yaml = include_str!("../openapi.yaml");
    let doc = routes_of(yaml);
    assert_eq!(doc.len(), 24, "{doc:?}");
    assert_eq!(doc, table(Some(true)));
}

#[test]
fn firecracker_routes_are_all_known() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/reference/firecracker-api-v1.16.1.yaml"
    );
    let Ok(yaml) = std::fs::read_to_string(path) else {
        eprintln!("{path} not found; skipping");
        return;
    };
    let fc = routes_of(&yaml);
    assert!(fc.len() > 30, "{fc:?}");
    assert_eq!(fc, table(None));
}
