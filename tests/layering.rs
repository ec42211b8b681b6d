//! The module graph points one way (see `src/lib.rs`): leaves ← config and the contracts ←
//! source / apply ← daemon ← the commands. Read from the source text, so an import that breaks
//! the layering fails here before anyone has to untangle it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers from the bottom. A module may import modules of lower layers, and of its own layer
/// as long as no circle forms.
const LAYERS: &[&[&str]] = &[
    &[
        "lsn", "backoff", "secret", "metrics", "notify", "conninfo", "tls", "pg", "table",
        "pgoutput",
    ],
    &[
        "config", "route", "rowhash", "link", "health", "http", "localpg",
    ],
    &["source", "apply"],
    &["copy", "schema", "teardown"],
    &["daemon", "check", "verify"],
    &["demo", "cli", "status", "main", "lib"],
];

/// Pairs that must never import each other in either direction.
const APART: &[(&str, &str)] = &[("source", "apply")];

/// The top-level module a file under `src/` belongs to.
fn module_of(rel: &Path) -> String {
    let first = rel.components().next().expect("a path under src");
    let first = first.as_os_str().to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Top-level modules named by `crate::x` paths (also inside `crate::{x, y}` groups).
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        // Comments count too: a doc link into another layer is a dependency for the reader.
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        let name = ident(&group[j..]);
                        if !name.is_empty() {
                            out.insert(name);
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let module = module_of(path.strip_prefix(&src).expect("under src"));
                let text = std::fs::read_to_string(&path).expect("read source file");
                let deps = graph.entry(module.clone()).or_default();
                deps.extend(imports(&text).into_iter().filter(|m| *m != module));
            }
        }
    }
    graph
}

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer of tests/layering.rs: place it"))
}

#[test]
fn imports_point_down_the_layers() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, deps) in &graph {
        for dep in deps {
            if layer(dep) > layer(module) {
                wrong.push(format!("{module} imports {dep}, a higher layer"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn source_and_apply_never_import_each_other() {
    let graph = graph();
    for (a, b) in APART {
        for (from, to) in [(a, b), (b, a)] {
            assert!(
                !graph.get(*from).is_some_and(|d| d.contains(*to)),
                "src/{from} imports crate::{to}: they talk only through crate::link"
            );
        }
    }
}

#[test]
fn no_import_circles() {
    let graph = graph();
    // Depth-first search with colours; a grey node reached again closes a circle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match colour.get(node) {
            Some(1) => {
                let start = path.iter().position(|p| p == node).unwrap_or(0);
                let mut circle = path[start..].to_vec();
                circle.push(node.to_string());
                return Some(circle);
            }
            Some(2) => return None,
            _ => {}
        }
        colour.insert(node.to_string(), 1);
        path.push(node.to_string());
        for dep in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(dep, graph, colour, path) {
                return Some(c);
            }
        }
        path.pop();
        colour.insert(node.to_string(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for module in graph.keys() {
        if let Some(circle) = visit(module, &graph, &mut colour, &mut Vec::new()) {
            panic!("import circle: {}", circle.join(" -> "));
        }
    }
}

#[test]
fn the_reader_sees_grouped_imports() {
    let found = imports("use crate::{link::{A, B}, pg};\nlet x = crate::lsn::Lsn(0);");
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        vec!["link".to_string(), "lsn".into(), "pg".into()]
    );
}
