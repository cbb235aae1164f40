//! `dedupe`: group near-duplicate items by the cosine similarity of their
//! embeddings. A whole-batch pipeline stage: one task sees every item.
//!
//! Input JSON (what the pipeline runner sends to a `group` stage):
//! `{"options": {"threshold": 0.9}, "items": [{"id": "a", "vector": [...]}, ...]}`
//! (other fields of an item are ignored). Output JSON:
//! `{"groups": [{"members": ["a", "c"], "similarity": 0.97}, {"members": ["b"]}]}`.
//!
//! Two items whose vectors have cosine similarity `>= threshold` are in the
//! same group, and so are items linked through others (single linkage).
//! Groups are ordered by their first member, members by input order, so
//! the first member of each group (its representative) is the earliest
//! item: adding items later never changes an existing group's
//! representative unless a new item joins two groups. `similarity` is the
//! weakest link that joined the group (absent for a group of one).
//!
//! Pure computation: no model, no host call but the input and output.

use serde::{Deserialize, Serialize};
use tidepool_guest::{export_job, io, Job, JobError};

/// Refuse absurd batches early (quadratic work).
const MAX_ITEMS: usize = 20_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    options: Options,
    items: Vec<Item>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// Cosine similarity at or above which two items are duplicates.
    threshold: f32,
}

#[derive(Deserialize)]
struct Item {
    id: String,
    vector: Vec<f32>,
}

#[derive(Serialize)]
struct Response {
    groups: Vec<Group>,
}

#[derive(Serialize)]
struct Group {
    members: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    similarity: Option<f32>,
}

struct Dedupe;

impl Job for Dedupe {
    fn run(input: Vec<u8>) -> Result<Vec<u8>, JobError> {
        let req: Request = io::from_json(&input)?;
        let t = req.options.threshold;
        if !(t > 0.0 && t <= 1.0) {
            return Err(JobError::invalid_input(format!(
                "options.threshold is {t}; it must be in (0, 1]"
            )));
        }
        if req.items.len() > MAX_ITEMS {
            return Err(JobError::invalid_input(format!(
                "{} items; at most {MAX_ITEMS}",
                req.items.len()
            )));
        }
        let dim = req.items.first().map_or(0, |i| i.vector.len());
        let mut unit = Vec::with_capacity(req.items.len());
        for (i, item) in req.items.iter().enumerate() {
            if item.vector.len() != dim || dim == 0 {
                return Err(JobError::invalid_input(format!(
                    "item {i} ({:?}) has a vector of {} numbers; the first has {dim}",
                    item.id,
                    item.vector.len()
                )));
            }
            if item.vector.iter().any(|x| !x.is_finite()) {
                return Err(JobError::invalid_input(format!(
                    "item {i} ({:?}) has a vector with a non-finite number",
                    item.id
                )));
            }
            let norm = item.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            unit.push(
                item.vector
                    .iter()
                    .map(|x| if norm > 0.0 { x / norm } else { 0.0 })
                    .collect::<Vec<f32>>(),
            );
        }
        let groups = group(&unit, t);
        io::to_json(&Response {
            groups: groups
                .into_iter()
                .map(|(members, similarity)| Group {
                    members: members
                        .into_iter()
                        .map(|i| req.items[i].id.clone())
                        .collect(),
                    similarity,
                })
                .collect(),
        })
    }
}

/// Single-linkage groups of unit vectors at `threshold`: member indices in
/// order, groups ordered by first member, with each group's weakest link.
fn group(unit: &[Vec<f32>], threshold: f32) -> Vec<(Vec<usize>, Option<f32>)> {
    let n = unit.len();
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    // Links that joined two groups: the weakest per final group is reported.
    let mut links = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            let s: f32 = unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum();
            if s >= threshold {
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                if a != b {
                    // The smaller index stays the root: it is the earliest member.
                    parent[a.max(b)] = a.min(b);
                    links.push((i, s));
                }
            }
        }
    }
    let mut out: Vec<(Vec<usize>, Option<f32>)> = Vec::new();
    let mut slot = vec![usize::MAX; n];
    for i in 0..n {
        let r = root(&mut parent, i);
        if slot[r] == usize::MAX {
            slot[r] = out.len();
            out.push((Vec::new(), None));
        }
        out[slot[r]].0.push(i);
    }
    for (i, s) in links {
        let g = &mut out[slot[root(&mut parent, i)]];
        g.1 = Some(g.1.map_or(s, |w: f32| w.min(s)));
    }
    out
}

export_job!(Dedupe);
