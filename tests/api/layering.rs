//! The layering that `src/lib.rs` states is the layering the code has: every `crate::<module>`
//! path in a file of `src/` (in a `use` line or inline, outside comments) names its own module
//! or one that the table in lib.rs allows, the table has no circle, the files inside one module
//! do not import each other in a circle either, and no file is longer than 600 lines before its
//! tests unless it is named below as long because of its subject (and says so in its `//!`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Most lines of a file before its `#[cfg(test)]` module: a smell, not a rule that forces
/// splits by size.
const MAX_LINES: usize = 600;

/// Files that are long because their subject is (each says so in its `//!`), relative to `src/`.
/// A file long because two subjects share it is split by subject instead.
const LONG_BY_SUBJECT: &[&str] = &[];

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
            let relative = path
                .strip_prefix(source_dir())
                .expect("under src/")
                .to_string_lossy()
                .replace('\\', "/");
            let allowed = LONG_BY_SUBJECT.contains(&relative.as_str())
                && text.contains("//! This file is long because");
            (lines > MAX_LINES && !allowed).then(|| format!("{}: {lines} lines", path.display()))
        })
        .collect();
    assert!(long.is_empty(), "{}", long.join("\n"));
}

/// The sibling files a file inside a module names (`super::sibling::…`, `super::{sibling::…}`
/// or `crate::<module>::sibling::…`), outside comments.
fn named_siblings(text: &str, module: &str, siblings: &BTreeSet<String>) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let absolute = format!("crate::{module}::");
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        for prefix in ["super::", absolute.as_str()] {
            let mut rest = code;
            while let Some(at) = rest.find(prefix) {
                let after = &rest[at + prefix.len()..];
                let first: Vec<&str> = match after.strip_prefix('{') {
                    // `super::{a::X, b, c::{Y, Z}}`: the first segment of each top-level item.
                    Some(group) => {
                        let mut depth = 0usize;
                        let mut items = Vec::new();
                        let mut start = 0;
                        for (index, c) in group.char_indices() {
                            match c {
                                '{' => depth += 1,
                                '}' if depth == 0 => {
                                    items.push(&group[start..index]);
                                    break;
                                }
                                '}' => depth -= 1,
                                ',' if depth == 0 => {
                                    items.push(&group[start..index]);
                                    start = index + 1;
                                }
                                _ => {}
                            }
                        }
                        items
                    }
                    None => vec![after],
                };
                for item in first {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if siblings.contains(&name) {
                        named.insert(name);
                    }
                }
                rest = after;
            }
        }
    }
    named
}

#[test]
fn files_inside_a_module_import_each_other_in_no_circle() {
    let mut circles = Vec::new();
    for entry in std::fs::read_dir(source_dir()).expect("readable src/") {
        let dir = entry.expect("a directory entry").path();
        if !dir.is_dir() {
            continue;
        }
        let module = dir
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        // Only the module's direct children are siblings; deeper files belong to a child.
        let children: BTreeMap<String, PathBuf> = files
            .into_iter()
            .filter(|path| path.parent() == Some(dir.as_path()))
            .map(|path| {
                let stem = path
                    .file_stem()
                    .expect("a name")
                    .to_string_lossy()
                    .into_owned();
                (stem, path)
            })
            .collect();
        let names: BTreeSet<String> = children.keys().cloned().collect();
        let mut uses: BTreeMap<String, BTreeSet<String>> = children
            .iter()
            .map(|(name, path)| {
                let text = std::fs::read_to_string(path).expect("readable source");
                let mut named = named_siblings(&text, &module, &names);
                named.remove(name);
                (name.clone(), named)
            })
            .collect();
        while let Some(leaf) = uses
            .iter()
            .find(|(_, used)| used.iter().all(|name| !uses.contains_key(name)))
            .map(|(name, _)| name.clone())
        {
            uses.remove(&leaf);
        }
        if !uses.is_empty() {
            let left: Vec<String> = uses
                .iter()
                .map(|(name, used)| format!("{module}/{name}.rs uses {used:?}"))
                .collect();
            circles.push(left.join("; "));
        }
    }
    assert!(
        circles.is_empty(),
        "circles inside modules:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_sibling_scanner_sees_groups_and_absolute_paths() {
    let siblings = BTreeSet::from(["store".to_owned(), "shared".to_owned(), "fleet".to_owned()]);
    let named = named_siblings(
        "use super::{Grant, store::{HandleId, Session}, shared::Record};\nlet x = crate::user_tokens::fleet::f(); // super::nope",
        "user_tokens",
        &siblings,
    );
    assert_eq!(
        named,
        BTreeSet::from(["fleet".to_owned(), "shared".to_owned(), "store".to_owned()])
    );
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
