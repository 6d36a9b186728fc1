//! ARCHITECTURE.md's map of crate dependencies is the truth: this test
//! reads the block between its `crate-deps` markers and compares it with
//! what `cargo metadata` says each workspace crate depends on.

use std::collections::BTreeMap;
use std::process::Command;

fn documented() -> BTreeMap<String, Vec<String>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let text = std::fs::read_to_string(format!("{root}/ARCHITECTURE.md")).unwrap();
    let marker = "<!-- crate-deps:begin -->";
    let begin = text.find(marker).expect("begin marker") + marker.len();
    let end = text.find("<!-- crate-deps:end -->").expect("end marker");
    let mut map = BTreeMap::new();
    for line in text[begin..end].lines() {
        let Some((name, deps)) = line.split_once("->") else {
            continue;
        };
        let mut deps: Vec<String> = deps
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| format!("vmplay-{d}"))
            .collect();
        deps.sort();
        map.insert(name.trim().to_string(), deps);
    }
    map
}

fn actual() -> BTreeMap<String, Vec<String>> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut map = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let mut deps: Vec<String> = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"].is_null())
            .filter_map(|d| d["name"].as_str())
            .filter(|n| n.starts_with("vmplay"))
            .map(String::from)
            .collect();
        deps.sort();
        map.insert(p["name"].as_str().unwrap().to_string(), deps);
    }
    map
}

#[test]
fn architecture_md_crate_arrows_match_cargo_metadata() {
    let (doc, real) = (documented(), actual());
    assert_eq!(
        doc, real,
        "ARCHITECTURE.md's crate-deps block disagrees with Cargo.toml: update the map"
    );
}
