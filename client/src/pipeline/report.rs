//! The digest a pipeline run writes: groups of items with their stage
//! outputs (summary, tags...) and the rejected items with reasons, as JSON
//! (for scripts; deterministic for the same items and results) and as
//! Markdown (for people). Figures of the run (times, cache hits) are kept
//! out of it, so two runs over the same items write the same digest.

use super::feed::Rejected;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One item in a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The item's id.
    pub id: String,
    /// Where it came from.
    pub source: String,
    /// Its text.
    pub text: String,
}

/// A group of near-duplicate items (or one item).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportGroup {
    /// Members in input order; the first is the one the stages ran on.
    pub members: Vec<Member>,
    /// The weakest similarity that joined the group, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f64>,
    /// Stage name → its output for the group (`{"error": ...}` if none).
    pub outputs: BTreeMap<String, Value>,
}

/// The digest of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The pipeline's name.
    pub pipeline: String,
    /// Items read (accepted and rejected by the feed).
    pub items: usize,
    /// Groups: duplicates first, larger first, then input order.
    pub groups: Vec<ReportGroup>,
    /// Items not processed, with the reason.
    pub rejected: Vec<Rejected>,
}

impl Report {
    /// Groups with more than one member.
    pub fn duplicate_groups(&self) -> usize {
        self.groups.iter().filter(|g| g.members.len() > 1).count()
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        // A Report is plain data (strings, numbers, JSON values): serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The report as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# {} digest\n", self.pipeline);
        let _ = writeln!(
            md,
            "{} items: {} groups ({} of them near-duplicates), {} rejected.\n",
            self.items,
            self.groups.len(),
            self.duplicate_groups(),
            self.rejected.len()
        );
        for (n, g) in self.groups.iter().enumerate() {
            let title = g
                .outputs
                .values()
                .find_map(|v| v.get("summary").and_then(Value::as_str))
                .map(str::to_owned)
                .unwrap_or_else(|| one_line(&g.members[0].text, 80));
            let _ = writeln!(md, "## {}. {}\n", n + 1, title.trim());
            for (stage, v) in &g.outputs {
                let _ = writeln!(md, "- **{stage}**: {}", render(v));
            }
            if let Some(s) = g.similarity {
                let _ = writeln!(
                    md,
                    "- **{} items**, similarity at least {s:.3}",
                    g.members.len()
                );
            }
            for m in &g.members {
                let _ = writeln!(
                    md,
                    "  - `{}` ({}): {}",
                    m.id,
                    m.source,
                    one_line(&m.text, 160)
                );
            }
            md.push('\n');
        }
        if !self.rejected.is_empty() {
            let _ = writeln!(md, "## Rejected items\n");
            for r in &self.rejected {
                let _ = writeln!(md, "- `{}` ({}): {}", r.id, r.source, r.reason);
            }
        }
        md
    }
}

/// A stage output in one line: its fields, lists joined by commas.
fn render(v: &Value) -> String {
    match v {
        Value::Object(m) => m
            .iter()
            .filter(|(k, _)| k.as_str() != "model")
            .map(|(k, v)| format!("{k}: {}", render(v)))
            .collect::<Vec<_>>()
            .join("; "),
        Value::Array(a) => a.iter().map(render).collect::<Vec<_>>().join(", "),
        Value::String(s) => s.trim().to_owned(),
        other => other.to_string(),
    }
}

/// Whitespace collapsed, cut at `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let s = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() <= max {
        s
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}
