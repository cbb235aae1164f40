//! Where a pipeline's items come from: a JSONL feed (one
//! `{"id": ..., "text": ...}` per line), a folder of text files (one item
//! per file), or fortune files (items between lines of `%`, as in Debian's
//! `fortunes` packages). Every item that cannot be used is kept as a
//! [`Rejected`] with the reason, for the report; the rest go on.
//!
//! Reads files; never talks to the pool.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

/// One text item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Unique within a run; stable across runs over the same source.
    pub id: String,
    /// Where it came from (file and position), for the report.
    pub source: String,
    /// The text.
    pub text: String,
}

/// An item that was not processed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The item's id (or its position when it has none).
    pub id: String,
    /// Where it came from.
    pub source: String,
    /// Why, in words.
    pub reason: String,
}

/// Why a feed cannot be read at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot read feed {path}: {source}")]
pub struct FeedError {
    /// The path.
    pub path: std::path::PathBuf,
    /// Why.
    pub source: std::io::Error,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FeedError + '_ {
    move |source| FeedError {
        path: path.to_owned(),
        source,
    }
}

/// The items of every path, in order: a directory gives one item per
/// regular file (sorted by name), a `*.jsonl` file one per line, anything
/// else is a fortune file. Items longer than `max_bytes`, empty or not
/// UTF-8, malformed lines and repeated ids are rejected.
pub fn read_feed(
    paths: &[std::path::PathBuf],
    max_bytes: usize,
) -> Result<(Vec<Item>, Vec<Rejected>), FeedError> {
    let mut raw: Vec<(String, String, Result<Vec<u8>, ItemProblem>)> = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)
                .map_err(io(path))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for f in files {
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let bytes = std::fs::read(&f).map_err(io(&f))?;
                raw.push((name, f.display().to_string(), Ok(bytes)));
            }
        } else if path.extension().is_some_and(|x| x == "jsonl") {
            let bytes = std::fs::read(path).map_err(io(path))?;
            for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let source = format!("{}:{}", path.display(), n + 1);
                raw.push(jsonl_item(line, n + 1, source));
            }
        } else {
            let bytes = std::fs::read(path).map_err(io(path))?;
            let stem = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut n = 0;
            let mut start_line = 1;
            let mut cur: Vec<u8> = Vec::new();
            let mut flush = |cur: &mut Vec<u8>, at: usize, n: &mut usize| {
                if cur.iter().all(u8::is_ascii_whitespace) {
                    cur.clear();
                    return;
                }
                *n += 1;
                raw.push((
                    format!("{stem}-{n}"),
                    format!("{}:{at}", path.display()),
                    Ok(std::mem::take(cur)),
                ));
            };
            for (line_no, line) in (1..).zip(bytes.split_inclusive(|&b| b == b'\n')) {
                if line.strip_suffix(b"\n").unwrap_or(line) == b"%" {
                    flush(&mut cur, start_line, &mut n);
                    start_line = line_no + 1;
                } else {
                    cur.extend_from_slice(line);
                }
            }
            flush(&mut cur, start_line, &mut n);
        }
    }
    let mut items = Vec::new();
    let mut rejected = Vec::new();
    let mut ids = BTreeSet::new();
    for (id, source, bytes) in raw {
        let checked = bytes.and_then(|b| check_text(b, max_bytes));
        let checked = if ids.insert(id.clone()) {
            checked
        } else {
            Err(ItemProblem::RepeatedId)
        };
        match checked {
            Ok(text) => items.push(Item { id, source, text }),
            Err(problem) => rejected.push(Rejected {
                id,
                source,
                reason: problem.to_string(),
            }),
        }
    }
    Ok((items, rejected))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: Option<String>,
    text: String,
    source: Option<String>,
}

fn jsonl_item(
    line: &[u8],
    n: usize,
    source: String,
) -> (String, String, Result<Vec<u8>, ItemProblem>) {
    let fallback = format!("line-{n}");
    if let Err(e) = std::str::from_utf8(line) {
        return (
            fallback,
            source,
            Err(ItemProblem::LineNotUtf8 {
                at: e.valid_up_to(),
            }),
        );
    }
    match serde_json::from_slice::<Line>(line) {
        Ok(l) => (
            l.id.unwrap_or(fallback),
            l.source.unwrap_or(source),
            Ok(l.text.into_bytes()),
        ),
        Err(e) => (fallback, source, Err(ItemProblem::NotAnItem(e.to_string()))),
    }
}

/// An order that puts near-duplicates next to each other: the text's
/// ASCII letters and digits, lowercased (quotes, dashes and spacing
/// ignored). For taking a small sample of a corpus that still has repeats.
pub fn sort_key(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Why a feed entry cannot be an item (its `Display` is the reason in the
/// report's `rejected` list).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemProblem {
    /// Longer than the pipeline's limit.
    #[error("{bytes} bytes; items are at most {max} bytes")]
    TooLong {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The text is not UTF-8.
    #[error("not valid UTF-8 (at byte {at})")]
    NotUtf8 {
        /// Where the first invalid byte is.
        at: usize,
    },
    /// A JSONL line that is not UTF-8.
    #[error("the line is not valid UTF-8 (at byte {at})")]
    LineNotUtf8 {
        /// Where the first invalid byte is.
        at: usize,
    },
    /// A JSONL line that is not an item object (the parser's words).
    #[error("the line is not an item {{\"id\", \"text\"}}: {0}")]
    NotAnItem(String),
    /// Only whitespace.
    #[error("empty")]
    Empty,
    /// An id an earlier item has.
    #[error("the id is used by an earlier item")]
    RepeatedId,
}

/// An item's text, or why it cannot be one.
pub fn check_text(bytes: Vec<u8>, max_bytes: usize) -> Result<String, ItemProblem> {
    if bytes.len() > max_bytes {
        return Err(ItemProblem::TooLong {
            bytes: bytes.len(),
            max: max_bytes,
        });
    }
    let text = String::from_utf8(bytes).map_err(|e| ItemProblem::NotUtf8 {
        at: e.utf8_error().valid_up_to(),
    })?;
    if text.trim().is_empty() {
        return Err(ItemProblem::Empty);
    }
    Ok(text.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortune_jsonl_and_folder_items_with_every_bad_item_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fortunes = dir.path().join("quotes");
        std::fs::write(
            &fortunes,
            "First one.\n%\nSecond,\ntwo lines.\n%\n\n%\nThird.\n",
        )
        .expect("write");
        let jsonl = dir.path().join("feed.jsonl");
        std::fs::write(
            &jsonl,
            b"{\"id\": \"a\", \"text\": \"from json\"}\n\n{\"text\": \"no id\"}\nnot json\n{\"id\": \"a\", \"text\": \"again\"}\n\xff\xfe\n",
        )
        .expect("write");
        let folder = dir.path().join("docs");
        std::fs::create_dir(&folder).expect("mkdir");
        std::fs::write(folder.join("1.txt"), "A file.\n").expect("write");
        std::fs::write(folder.join("2.txt"), b"caf\xe9").expect("write");
        std::fs::write(folder.join("3.txt"), "  \n").expect("write");
        std::fs::write(folder.join("4.txt"), "x".repeat(101)).expect("write");
        let (items, rejected) = read_feed(&[fortunes, jsonl.clone(), folder], 100).expect("feed");
        let texts: Vec<(&str, &str)> = items
            .iter()
            .map(|i| (i.id.as_str(), i.text.as_str()))
            .collect();
        assert_eq!(
            texts,
            [
                ("quotes-1", "First one."),
                ("quotes-2", "Second,\ntwo lines."),
                ("quotes-3", "Third."),
                ("a", "from json"),
                ("line-3", "no id"),
                ("1.txt", "A file."),
            ]
        );
        assert_eq!(
            items[1].source,
            format!("{}:3", dir.path().join("quotes").display())
        );
        let reasons: Vec<(&str, &str)> = rejected
            .iter()
            .map(|r| (r.id.as_str(), r.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 6, "{reasons:?}");
        assert!(
            reasons[0].0 == "line-4" && reasons[0].1.starts_with("the line is not an item"),
            "{reasons:?}"
        );
        assert_eq!(reasons[1], ("a", "the id is used by an earlier item"));
        assert_eq!(
            reasons[2],
            ("line-6", "the line is not valid UTF-8 (at byte 0)")
        );
        assert_eq!(reasons[3], ("2.txt", "not valid UTF-8 (at byte 3)"));
        assert_eq!(reasons[4], ("3.txt", "empty"));
        assert_eq!(
            reasons[5],
            ("4.txt", "101 bytes; items are at most 100 bytes")
        );
        let missing = read_feed(&[dir.path().join("nope.jsonl")], 100).expect_err("missing");
        assert!(
            missing.to_string().starts_with("cannot read feed "),
            "{missing}"
        );
    }
}
