//! The engine's parts use only the parts below them, in the order `engine/mod.rs` gives: an
//! import that runs back up fails here, before it turns the layers into a circle again.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

/// `engine/mod.rs`'s order, top to bottom. The parts of one layer do not use each other.
const LAYERS: &[&[&str]] = &[
    &["end_to_end_tests", "layering_tests", "server"],
    &["broker", "http", "runtime"],
    &["ws"],
    &["bridge", "config", "pubsub", "stats"],
    &["mask", "net", "platform", "tls"],
];

fn layer(part: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&part))
        .unwrap_or_else(|| panic!("`{part}` is in no layer: add it to LAYERS and to mod.rs"))
}

/// The names `source` reaches through `prefix`: `prefix::name` and `prefix::{a, b::c}`.
fn names_after(source: &str, prefix: &str, names: &mut BTreeSet<String>) {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in source.match_indices(prefix) {
        let rest = &source[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group's own names: `{ws::{conn, batch}, bridge}` is `ws` and `bridge`.
            let (mut depth, mut item) = (0usize, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.insert(ident(&item));
                        item.clear();
                    }
                    _ if depth == 0 => item.push(c),
                    _ => {}
                }
            }
            names.insert(ident(&item));
        } else {
            names.insert(ident(rest));
        }
    }
    names.remove("");
}

/// The parts (or, for a name that is no part, the re-exports of `engine/mod.rs`) a file uses.
fn uses(source: &str, top_level: bool) -> BTreeSet<String> {
    let code: String = source
        .lines()
        .map(|line| line.find("//").map_or(line, |at| &line[..at]))
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = BTreeSet::new();
    names_after(&code, "crate::engine::", &mut names);
    if top_level {
        // A top-level file's `super` is the engine; indented, it is the file (`mod tests`).
        names_after(&code, "\nuse super::", &mut names);
    } else {
        names_after(&code, "super::super::", &mut names);
    }
    names
}

#[test]
fn parts_use_only_the_parts_below_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let parts: BTreeSet<String> = LAYERS
        .iter()
        .flat_map(|l| l.iter())
        .map(|p| p.to_string())
        .collect();
    let mut files = Vec::new();
    for entry in fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let part = path.file_name().unwrap().to_string_lossy().into_owned();
            for file in fs::read_dir(&path).unwrap() {
                let file = file.unwrap().path();
                // A folder's `mod.rs` is at the engine's level: its `super` is the engine.
                let top_level = file.file_name().is_some_and(|name| name == "mod.rs");
                files.push((part.clone(), top_level, file));
            }
        } else if path.file_name().is_some_and(|name| name != "mod.rs") {
            let part = path.file_stem().unwrap().to_string_lossy().into_owned();
            files.push((part, true, path));
        }
    }
    let mut wrong = Vec::new();
    for (part, top_level, path) in files {
        let source = format!("\n{}", fs::read_to_string(&path).unwrap());
        for used in uses(&source, top_level) {
            let ok = if parts.contains(&used) {
                used == part || layer(&used) > layer(&part)
            } else {
                // Re-exported by mod.rs for py and the bench; inside, only the top may use them.
                layer(&part) == 0
            };
            if !ok {
                wrong.push(format!("{} uses {used}", path.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_imports_that_run_back_up() {
    let source = "\nuse super::ws::conn::Conn;\nuse crate::engine::{http::serve, config};\n";
    let used: Vec<String> = uses(source, true).into_iter().collect();
    assert_eq!(used, ["config", "http", "ws"]);
    let nested = "    use super::*;\n    // crate::engine::server\n    crate::engine::bridge::x();";
    let used: Vec<String> = uses(nested, false).into_iter().collect();
    assert_eq!(used, ["bridge"]);
    let groups = "\nuse crate::engine::{ws::{conn::Conn, batch}, bridge::events::Event, stats};\n";
    let used: Vec<String> = uses(groups, false).into_iter().collect();
    assert_eq!(used, ["bridge", "stats", "ws"]);
}
