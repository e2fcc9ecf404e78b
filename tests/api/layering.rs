//! The layering that `src/lib.rs` states is the layering the code has: every `crate::<module>`
//! path in a file of `src/` (in a `use` line or inline, outside comments) names its own module
//! or one that the table in lib.rs allows, the table has no circle, and no file is longer than
//! 600 lines before its tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Most lines of a file before its `#[cfg(test)]` module.
const MAX_LINES: usize = 600;

fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The `| module | may use |` table of lib.rs's Layout section.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let lib = std::fs::read_to_string(source_dir().join("lib.rs")).expect("src/lib.rs");
    let names = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    lib.lines()
        .filter_map(|line| line.strip_prefix("//! | `"))
        .map(|row| {
            let mut cells = row.split('|');
            let module = cells
                .next()
                .unwrap_or_default()
                .trim_end_matches(['`', ' ']);
            let uses = cells.next().map(names).unwrap_or_default();
            (module.to_owned(), uses.into_iter().collect())
        })
        .collect()
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`api` for `src/api/tokens.rs`).
fn top_module(path: &Path) -> String {
    let relative = path.strip_prefix(source_dir()).expect("under src/");
    let first = relative.iter().next().expect("a file name");
    Path::new(first)
        .file_stem()
        .expect("a name")
        .to_string_lossy()
        .into_owned()
}

/// The modules named as `crate::<module>` outside comments.
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let module: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let preceded_by_ident = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if !module.is_empty() && !preceded_by_ident {
                named.insert(module);
            }
            rest = after;
        }
    }
    named
}

#[test]
fn every_import_follows_the_table_in_lib_rs() {
    let allowed = allowed();
    assert!(allowed.contains_key("broker") && allowed.contains_key("telemetry"));
    let mut files = Vec::new();
    rust_files(&source_dir(), &mut files);
    let mut violations = Vec::new();
    for path in &files {
        let module = top_module(path);
        if module == "main" || module == "lib" {
            continue;
        }
        let Some(may_use) = allowed.get(&module) else {
            violations.push(format!(
                "{}: module {module} is not in lib.rs's table",
                path.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(path).expect("readable source");
        for named in named_modules(&text) {
            if named != module && !may_use.contains(&named) {
                violations.push(format!("{}: {module} uses crate::{named}", path.display()));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_table_has_no_circle() {
    let allowed = allowed();
    // Repeatedly remove modules that use nothing left; a circle is what cannot be removed.
    let mut left = allowed.clone();
    while let Some(leaf) = left
        .iter()
        .find(|(_, uses)| uses.iter().all(|used| !left.contains_key(used)))
        .map(|(module, _)| module.clone())
    {
        left.remove(&leaf);
    }
    assert!(left.is_empty(), "circle among {:?}", left.keys());
    for (module, uses) in &allowed {
        for used in uses {
            assert!(
                allowed.contains_key(used),
                "{module} may use {used}, which is not in the table"
            );
        }
    }
}

#[test]
fn no_file_is_longer_than_600_lines_before_its_tests() {
    let mut files = Vec::new();
    rust_files(&source_dir(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|path| {
            let text = std::fs::read_to_string(path).expect("readable source");
            let lines = text
                .lines()
                .take_while(|line| !line.starts_with("#[cfg(test)]"))
                .count();
            (lines > MAX_LINES).then(|| format!("{}: {lines} lines", path.display()))
        })
        .collect();
    assert!(long.is_empty(), "{}", long.join("\n"));
}

#[test]
fn the_scanner_sees_inline_paths_and_skips_comments() {
    let named = named_modules(
        "use crate::broker::Broker;\nlet x = crate::config::Settings::load(None); // crate::api\n/// see crate::app\nsupercrate::nope",
    );
    assert_eq!(
        named,
        BTreeSet::from(["broker".to_owned(), "config".to_owned()])
    );
}
