//! Every relative link in the project's Markdown (README.md, CHANGELOG.md, CONTRIBUTING.md and
//! everything under docs/) resolves: the file or directory it names exists, and a `#fragment`
//! into a Markdown file names one of its headings, by the anchor GitHub gives it. Links in code
//! blocks and code spans are not links, and links to other sites are not checked.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut anchors_of = HashMap::new();
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files(&root) {
        let shown = file
            .strip_prefix(root.as_path())
            .unwrap_or(file.as_path())
            .display()
            .to_string();
        for (first_line, block) in Document::parse(&read(&file)).blocks {
            let block = without_code_spans(&block);
            for (offset, target) in link_targets(&block) {
                if is_external(&target) {
                    continue;
                }
                checked += 1;
                if let Err(problem) = resolve(&file, &target, &mut anchors_of) {
                    let line = first_line + block[..offset].matches('\n').count();
                    broken.push(format!("{shown}:{line}: ({target}): {problem}"));
                }
            }
        }
    }
    assert!(
        checked > 0,
        "no relative link found: the scan itself is broken"
    );
    assert!(
        broken.is_empty(),
        "{} broken link(s):\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// The Markdown files whose links are checked.
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = ["README.md", "CHANGELOG.md", "CONTRIBUTING.md"]
        .iter()
        .map(|name| root.join(name))
        .collect();
    collect_markdown(&root.join("docs"), &mut files);
    files
}

/// Adds every `.md` file under `dir` to `files`, in name order.
fn collect_markdown(dir: &Path, files: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_markdown(&path, files);
        } else if path.extension().is_some_and(|extension| extension == "md") {
            files.push(path);
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A Markdown file as far as links go: its text outside code fences, in blocks of non-blank
/// lines (a code span may wrap within one), and its headings.
struct Document {
    /// Each block's first line number and its lines.
    blocks: Vec<(usize, String)>,
    /// The text of each heading, in order.
    headings: Vec<String>,
}

impl Document {
    fn parse(text: &str) -> Self {
        let mut blocks = Vec::new();
        let mut headings = Vec::new();
        let mut fence: Option<(char, usize)> = None;
        let mut block: Option<(usize, String)> = None;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let trimmed = line.trim_start();
            if let Some((marker, length, rest)) = fence_marker(trimmed) {
                blocks.extend(block.take());
                fence = match fence {
                    None => Some((marker, length)),
                    Some((open, open_length))
                        if marker == open && length >= open_length && rest.trim().is_empty() =>
                    {
                        None
                    }
                    still_open => still_open,
                };
                continue;
            }
            if fence.is_some() {
                continue;
            }
            if trimmed.is_empty() {
                blocks.extend(block.take());
                continue;
            }
            if let Some(heading) = heading(line) {
                blocks.extend(block.take());
                headings.push(heading.to_owned());
                blocks.push((number, line.to_owned()));
                continue;
            }
            match &mut block {
                Some((_, lines)) => {
                    lines.push('\n');
                    lines.push_str(line);
                }
                None => block = Some((number, line.to_owned())),
            }
        }
        blocks.extend(block);
        Self { blocks, headings }
    }
}

/// The fence character, the length of its run and the rest of the line, when `line` (without
/// its indentation) opens or closes a code fence.
fn fence_marker(line: &str) -> Option<(char, usize, &str)> {
    let marker = line.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let length = line.chars().take_while(|c| *c == marker).count();
    if length < 3 {
        return None;
    }
    Some((marker, length, &line[length..]))
}

/// The text of an ATX heading (`## Text`), without its closing hashes.
fn heading(line: &str) -> Option<&str> {
    let level = line.chars().take_while(|c| *c == '#').count();
    let rest = &line[level..];
    if !(1..=6).contains(&level) || !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    let text = rest.trim();
    let without_closing = text.trim_end_matches('#');
    if without_closing.is_empty() || without_closing.ends_with(' ') {
        Some(without_closing.trim_end())
    } else {
        Some(text)
    }
}

/// The anchor GitHub gives a heading: lower case, spaces to `-`, and every character that is
/// not alphanumeric, `-` or `_` dropped (backticks and other punctuation among them).
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of `headings`; a repeated one gets `-1`, `-2`, … as GitHub numbers them.
fn anchors(headings: &[String]) -> HashSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut anchors = HashSet::new();
    for heading in headings {
        let base = anchor(heading);
        let count = seen.entry(base.clone()).or_insert(0);
        anchors.insert(if *count == 0 {
            base
        } else {
            format!("{base}-{count}")
        });
        *count += 1;
    }
    anchors
}

/// `text` with every inline code span blanked out; newlines stay, so offsets keep their lines.
fn without_code_spans(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while at < chars.len() {
        if chars[at] != '`' {
            out.push(chars[at]);
            at += 1;
            continue;
        }
        let run = chars[at..].iter().take_while(|c| **c == '`').count();
        match closing_run(&chars, at + run, run) {
            Some(end) => {
                out.extend(
                    chars[at..end]
                        .iter()
                        .map(|c| if *c == '\n' { '\n' } else { ' ' }),
                );
                at = end;
            }
            None => {
                out.extend(std::iter::repeat_n('`', run));
                at += run;
            }
        }
    }
    out
}

/// The index just past the first run of exactly `run` backticks at or after `from`.
fn closing_run(chars: &[char], from: usize, run: usize) -> Option<usize> {
    let mut at = from;
    while at < chars.len() {
        if chars[at] == '`' {
            let length = chars[at..].iter().take_while(|c| **c == '`').count();
            if length == run {
                return Some(at + length);
            }
            at += length;
        } else {
            at += 1;
        }
    }
    None
}

/// The target of every inline link `[text](target)` (and image) in `text`, with the offset of
/// its `](`.
fn link_targets(text: &str) -> Vec<(usize, String)> {
    let mut targets = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("](") {
        let start = from + found + 2;
        let after = &text[start..];
        let end = after
            .find(|c: char| c == ')' || c.is_whitespace())
            .unwrap_or(after.len());
        let target = after[..end].trim_start_matches('<').trim_end_matches('>');
        targets.push((from + found, target.to_owned()));
        from = start;
    }
    targets
}

fn is_external(target: &str) -> bool {
    let target = target.to_ascii_lowercase();
    ["http:", "https:", "mailto:"]
        .iter()
        .any(|scheme| target.starts_with(scheme))
}

/// Checks that `target`, linked from `file`, names an existing file or directory and, for a
/// fragment into a Markdown file, one of its headings.
fn resolve(
    file: &Path,
    target: &str,
    anchors_of: &mut HashMap<PathBuf, HashSet<String>>,
) -> Result<(), String> {
    if target.is_empty() {
        return Err("empty target".to_owned());
    }
    let (path, fragment) = match target.split_once('#') {
        Some((path, fragment)) => (path, Some(fragment)),
        None => (target, None),
    };
    let destination = if path.is_empty() {
        file.to_path_buf()
    } else {
        file.parent().expect("a file has a directory").join(path)
    };
    let destination = destination
        .canonicalize()
        .map_err(|_| "no such file or directory".to_owned())?;
    let Some(fragment) = fragment else {
        return Ok(());
    };
    if destination
        .extension()
        .is_none_or(|extension| extension != "md")
    {
        return Ok(());
    }
    let known = anchors_of
        .entry(destination)
        .or_insert_with_key(|markdown| anchors(&Document::parse(&read(markdown)).headings));
    if known.contains(fragment) {
        Ok(())
    } else {
        Err(format!("no heading has the anchor #{fragment}"))
    }
}

#[test]
fn anchors_follow_github() {
    let headings = [
        "`GET /v1/tokens/{tenant}/{environment}`",
        "Signed client assertions (`private_key_jwt`)",
        "`[shared_cache.tls]`",
        "Organizations (Auth0)",
        "Limits",
        "Limits",
    ]
    .map(str::to_owned);
    let found = anchors(&headings);
    for expected in [
        "get-v1tokenstenantenvironment",
        "signed-client-assertions-private_key_jwt",
        "shared_cachetls",
        "organizations-auth0",
        "limits",
        "limits-1",
    ] {
        assert!(found.contains(expected), "{expected} in {found:?}");
    }
}

#[test]
fn code_is_not_scanned_for_links() {
    let text =
        "[a](one.md) `[b](two.md)` ``[c](`three`.md)``\n\n```\n[d](four.md)\n```\n[e](five.md#x)";
    let document = Document::parse(text);
    let targets: Vec<String> = document
        .blocks
        .iter()
        .flat_map(|(_, block)| link_targets(&without_code_spans(block)))
        .map(|(_, target)| target)
        .collect();
    assert_eq!(targets, ["one.md", "five.md#x"]);
}
