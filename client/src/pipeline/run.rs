//! One pipeline run as a state machine (sans-IO, like the coordinator):
//! [`Run::poll_submit`] says which inputs to submit to which bundle next,
//! [`Run::handle_result`] takes a finished task's outcome, and
//! [`Run::report`] builds the digest once [`Run::is_done`]. Inputs become
//! ready per item, so an item moves to its next stage as soon as its own
//! task is done; a slow item holds back only the whole-batch stage.
//!
//! Identical inputs within a stage are submitted once (the pool's result
//! cache does the same across runs). This module does no I/O and keeps no
//! clock: the driver ([`super::drive`]) talks to the pool.

use super::feed::{Item, Rejected};
use super::manifest::{Over, PipelineManifest};
use super::report::{Member, Report, ReportGroup};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tidepool_proto::Digest;

/// A stage of this run: the manifest's stage with its published bundle.
#[derive(Debug, Clone)]
struct Stage {
    /// Its name (report keys, submission keys).
    name: String,
    /// What one task covers.
    over: Over,
    /// Index of the `items` stage whose outputs are the input.
    from: Option<usize>,
    /// `options` of an `all` stage, as JSON.
    options: Value,
    /// The published bundle's digest.
    bundle: Digest,
}

/// Where one unit (item, group or the whole batch) stands in one stage.
#[derive(Debug, Clone)]
enum Cell {
    /// Its input is not ready yet.
    Waiting,
    /// Submitted (or sharing a submitted identical input).
    Pending,
    /// The task's output (shared by units with the same input).
    Done(Arc<Vec<u8>>),
    /// The task failed, or an earlier stage did for this unit: why.
    Failed(String),
}

impl Cell {
    fn settled(&self) -> bool {
        matches!(self, Cell::Done(_) | Cell::Failed(_))
    }
}

/// A group found by the `all` stage.
#[derive(Debug, Clone)]
struct Group {
    /// Item indices, in input order; the first is the representative.
    members: Vec<usize>,
    /// The weakest link that joined the group, if the job says.
    similarity: Option<f64>,
}

/// One submission: a stage's inputs, each standing for some units.
#[derive(Debug)]
struct Sub {
    /// The stage.
    stage: usize,
    /// For each input index: the units waiting on it and the input's digest.
    units: Vec<(Vec<usize>, Digest)>,
}

/// What the driver must submit.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// Handle for [`Run::handle_result`].
    pub id: usize,
    /// The stage's index.
    pub stage: usize,
    /// The bundle to run.
    pub bundle: Digest,
    /// The inputs (distinct).
    pub inputs: Vec<Vec<u8>>,
    /// The idempotency key (unique per run and submission).
    pub key: String,
}

/// Why a run cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// The manifest and the published bundles do not match up.
    #[error("{stages} stages but {bundles} bundle digests")]
    Bundles {
        /// Stages in the manifest.
        stages: usize,
        /// Digests given.
        bundles: usize,
    },
    /// The whole-batch stage failed or answered something that is not a
    /// grouping of its items.
    #[error("stage {stage:?}: {why}")]
    Grouping {
        /// The stage.
        stage: String,
        /// What is wrong.
        why: String,
    },
    /// A result for a submission or index this run never made.
    #[error("no submission {sub} input {index} in this run")]
    Unknown {
        /// Submission id.
        sub: usize,
        /// Input index.
        index: u32,
    },
}

/// One run of a pipeline over a batch of items.
#[derive(Debug)]
pub struct Run {
    /// The pipeline's name.
    name: String,
    /// Distinguishes this run's submissions from other runs'.
    run_id: String,
    /// The stages, in order.
    stages: Vec<Stage>,
    /// Accepted items (the units of `items` stages).
    items: Vec<Item>,
    /// Items refused by the feed, then items whose task failed.
    rejected: Vec<Rejected>,
    /// cells[stage][unit]; a `groups` stage has no units until groups exist.
    cells: Vec<Vec<Cell>>,
    /// The groups, once the `all` stage is done.
    groups: Option<Vec<Group>>,
    /// Every submission made, by id.
    subs: Vec<Sub>,
    /// Per stage: input digest → the submission and index computing it.
    inputs: Vec<HashMap<Digest, (usize, usize)>>,
    /// Set when the run cannot finish.
    error: Option<RunError>,
}

impl Run {
    /// A run of `manifest` whose stages were published as `bundles`, over
    /// `items` (with `rejected` already refused by the feed). `run_id`
    /// must differ between runs (submission keys are idempotent).
    pub fn new(
        manifest: &PipelineManifest,
        bundles: &[Digest],
        run_id: &str,
        items: Vec<Item>,
        rejected: Vec<Rejected>,
    ) -> Result<Self, RunError> {
        if bundles.len() != manifest.stages.len() {
            return Err(RunError::Bundles {
                stages: manifest.stages.len(),
                bundles: bundles.len(),
            });
        }
        let stages: Vec<Stage> = manifest
            .stages
            .iter()
            .zip(bundles)
            .map(|(s, b)| Stage {
                name: s.name.clone(),
                over: s.over,
                from: s
                    .from
                    .as_ref()
                    .and_then(|f| manifest.stages.iter().position(|o| &o.name == f)),
                options: s
                    .options
                    .as_ref()
                    .and_then(|t| serde_json::to_value(t).ok())
                    .unwrap_or(Value::Object(Default::default())),
                bundle: *b,
            })
            .collect();
        let cells = stages
            .iter()
            .map(|s| match s.over {
                Over::Items => vec![Cell::Waiting; items.len()],
                Over::All => vec![Cell::Waiting],
                Over::Groups => Vec::new(),
            })
            .collect();
        Ok(Self {
            name: manifest.name.clone(),
            run_id: run_id.to_owned(),
            inputs: vec![HashMap::new(); stages.len()],
            stages,
            items,
            rejected,
            cells,
            groups: None,
            subs: Vec::new(),
            error: None,
        })
    }

    /// Stage names, in order.
    pub fn stage_names(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.name.as_str()).collect()
    }

    /// Units of a stage settled so far and in all (0 of 0 for a `groups`
    /// stage until the groups exist).
    pub fn progress(&self, stage: usize) -> (usize, usize) {
        let c = &self.cells[stage];
        (c.iter().filter(|c| c.settled()).count(), c.len())
    }

    /// The error that stopped the run, if any.
    pub fn error(&self) -> Option<&RunError> {
        self.error.as_ref()
    }

    /// True when nothing more will happen: every unit settled, or an error.
    pub fn is_done(&self) -> bool {
        if self.error.is_some() {
            return true;
        }
        let has_all = self.stages.iter().any(|s| s.over == Over::All);
        if has_all && self.groups.is_none() {
            return false;
        }
        self.cells.iter().flatten().all(Cell::settled)
    }

    /// The next submission to make, if any input has become ready. Call
    /// until it returns `None` after each batch of results.
    pub fn poll_submit(&mut self) -> Option<Submission> {
        if self.error.is_some() {
            return None;
        }
        for s in 0..self.stages.len() {
            let ready = self.ready_units(s);
            if ready.is_empty() {
                continue;
            }
            let mut inputs: Vec<Vec<u8>> = Vec::new();
            let mut units: Vec<(Vec<usize>, Digest)> = Vec::new();
            let id = self.subs.len();
            for (unit, input) in ready {
                let digest = Digest::of(&input);
                if let Some(&(sub, index)) = self.inputs[s].get(&digest) {
                    // The same input is already computed or on its way.
                    if sub == id {
                        units[index].0.push(unit);
                        self.cells[s][unit] = Cell::Pending;
                    } else {
                        let first = self.subs[sub].units[index].0[0];
                        let cell = self.cells[s][first].clone();
                        self.subs[sub].units[index].0.push(unit);
                        self.settle(s, &[unit], cell);
                    }
                    continue;
                }
                self.inputs[s].insert(digest, (id, inputs.len()));
                units.push((vec![unit], digest));
                inputs.push(input);
                self.cells[s][unit] = Cell::Pending;
            }
            if inputs.is_empty() {
                continue;
            }
            self.subs.push(Sub { stage: s, units });
            return Some(Submission {
                id,
                stage: s,
                bundle: self.stages[s].bundle,
                inputs,
                key: format!("{}/{}/{}/{id}", self.name, self.run_id, self.stages[s].name),
            });
        }
        None
    }

    /// Units of stage `s` whose input is ready, with the input; marks units
    /// whose input can never be ready as failed.
    fn ready_units(&mut self, s: usize) -> Vec<(usize, Vec<u8>)> {
        let stage = self.stages[s].clone();
        let mut out = Vec::new();
        match stage.over {
            Over::Items | Over::Groups => {
                for unit in 0..self.cells[s].len() {
                    if !matches!(self.cells[s][unit], Cell::Waiting) {
                        continue;
                    }
                    let item = match (&stage.over, &self.groups) {
                        (Over::Groups, Some(g)) => g[unit].members[0],
                        _ => unit,
                    };
                    match stage.from {
                        None => out.push((unit, text_input(&self.items[item].text))),
                        Some(f) => match &self.cells[f][item] {
                            Cell::Done(o) => out.push((unit, o.to_vec())),
                            Cell::Failed(why) => {
                                self.cells[s][unit] = Cell::Failed(why.clone());
                            }
                            _ => {}
                        },
                    }
                }
            }
            Over::All => {
                let Some(f) = stage.from else { return out };
                if !matches!(self.cells[s][0], Cell::Waiting)
                    || !self.cells[f].iter().all(Cell::settled)
                {
                    return out;
                }
                let mut items = Vec::new();
                for (i, c) in self.cells[f].iter().enumerate() {
                    if let Cell::Done(o) = c {
                        let mut v = match serde_json::from_slice::<Value>(o) {
                            Ok(Value::Object(m)) => m,
                            _ => Default::default(),
                        };
                        v.insert("id".into(), Value::String(self.items[i].id.clone()));
                        items.push(Value::Object(v));
                    }
                }
                if items.is_empty() {
                    self.groups = Some(Vec::new());
                    self.cells[s][0] = Cell::Failed("no item reached this stage".into());
                    self.make_group_cells();
                    return out;
                }
                let input = serde_json::json!({ "options": stage.options, "items": items });
                out.push((0, input.to_string().into_bytes()));
            }
        }
        out
    }

    /// Take the outcome of input `index` of submission `sub`: the output
    /// bytes, or why the task produced none (a job error, or the pool gave
    /// up on it).
    pub fn handle_result(&mut self, sub: usize, index: u32, outcome: Result<Vec<u8>, String>) {
        let Some((units, stage)) = self
            .subs
            .get(sub)
            .and_then(|x| x.units.get(index as usize).map(|u| (u.0.clone(), x.stage)))
        else {
            self.error = Some(RunError::Unknown { sub, index });
            return;
        };
        let cell = match outcome {
            Ok(bytes) => Cell::Done(Arc::new(bytes)),
            Err(why) => Cell::Failed(format!("stage {}: {why}", self.stages[stage].name)),
        };
        self.settle(stage, &units, cell.clone());
        if self.stages[stage].over == Over::All {
            self.take_groups(stage, &cell);
        }
    }

    /// Set the cells of `units` in stage `s`; an item whose `items` stage
    /// failed is rejected with the reason.
    fn settle(&mut self, s: usize, units: &[usize], cell: Cell) {
        for &u in units {
            self.cells[s][u] = cell.clone();
            if let (Over::Items, Cell::Failed(why)) = (self.stages[s].over, &cell) {
                let item = &self.items[u];
                self.rejected.push(Rejected {
                    id: item.id.clone(),
                    source: item.source.clone(),
                    reason: why.clone(),
                });
            }
        }
    }

    /// Read the `all` stage's answer into groups.
    fn take_groups(&mut self, stage: usize, cell: &Cell) {
        let fail = |why: String| RunError::Grouping {
            stage: self.stages[stage].name.clone(),
            why,
        };
        let bytes = match cell {
            Cell::Done(b) => b.clone(),
            Cell::Failed(why) => {
                self.error = Some(fail(why.clone()));
                return;
            }
            _ => return,
        };
        #[derive(serde::Deserialize)]
        struct Answer {
            groups: Vec<GroupAnswer>,
        }
        #[derive(serde::Deserialize)]
        struct GroupAnswer {
            members: Vec<String>,
            #[serde(default)]
            similarity: Option<f64>,
        }
        let answer: Answer = match serde_json::from_slice(&bytes) {
            Ok(a) => a,
            Err(e) => {
                self.error = Some(fail(format!(
                    "the answer is not {{\"groups\": [{{\"members\": [ID, ...]}}]}}: {e}"
                )));
                return;
            }
        };
        let from = self.stages[stage].from.unwrap_or(0);
        let index: HashMap<&str, usize> = self
            .items
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(self.cells[from][*i], Cell::Done(_)))
            .map(|(i, it)| (it.id.as_str(), i))
            .collect();
        let mut seen = vec![false; self.items.len()];
        let mut groups = Vec::new();
        for g in answer.groups {
            let mut members = Vec::new();
            for id in &g.members {
                let Some(&i) = index.get(id.as_str()) else {
                    self.error = Some(fail(format!(
                        "group member {id:?} is not an item it was given"
                    )));
                    return;
                };
                if std::mem::replace(&mut seen[i], true) {
                    self.error = Some(fail(format!("item {id:?} is in two groups")));
                    return;
                }
                members.push(i);
            }
            if members.is_empty() {
                self.error = Some(fail("a group has no members".into()));
                return;
            }
            members.sort_unstable();
            groups.push(Group {
                members,
                similarity: g.similarity,
            });
        }
        if let Some((id, _)) = index.iter().find(|(_, &i)| !seen[i]) {
            self.error = Some(fail(format!("item {id:?} is in no group")));
            return;
        }
        groups.sort_by_key(|g| g.members[0]);
        self.groups = Some(groups);
        self.make_group_cells();
    }

    fn make_group_cells(&mut self) {
        let n = self.groups.as_ref().map_or(0, Vec::len);
        for (s, stage) in self.stages.iter().enumerate() {
            if stage.over == Over::Groups {
                self.cells[s] = vec![Cell::Waiting; n];
            }
        }
    }

    /// The digest of the run: groups (duplicates first, largest first),
    /// with every member and the outputs of the `groups` stages (or, in a
    /// pipeline without grouping, each item with its last stage's output),
    /// and every rejected item with its reason.
    pub fn report(&self) -> Report {
        let report_stages: Vec<usize> = if self.groups.is_some() {
            (0..self.stages.len())
                .filter(|&s| self.stages[s].over == Over::Groups)
                .collect()
        } else {
            self.stages.len().checked_sub(1).into_iter().collect()
        };
        let singles: Vec<Group>;
        let groups: &[Group] = match &self.groups {
            Some(g) => g,
            None => {
                singles = (0..self.items.len())
                    .filter(|&i| {
                        self.cells
                            .iter()
                            .all(|c| !matches!(c.get(i), Some(Cell::Failed(_))))
                    })
                    .map(|i| Group {
                        members: vec![i],
                        similarity: None,
                    })
                    .collect();
                &singles
            }
        };
        let mut out: Vec<ReportGroup> = groups
            .iter()
            .enumerate()
            .map(|(g, group)| {
                let mut outputs = BTreeMap::new();
                for &s in &report_stages {
                    let unit = if self.groups.is_some() {
                        g
                    } else {
                        group.members[0]
                    };
                    let v = match self.cells[s].get(unit) {
                        Some(Cell::Done(b)) => serde_json::from_slice(b)
                            .unwrap_or_else(|_| serde_json::json!({ "bytes": b.len() })),
                        Some(Cell::Failed(why)) => serde_json::json!({ "error": why }),
                        _ => serde_json::json!({ "error": "not run" }),
                    };
                    outputs.insert(self.stages[s].name.clone(), v);
                }
                ReportGroup {
                    members: group
                        .members
                        .iter()
                        .map(|&i| Member {
                            id: self.items[i].id.clone(),
                            source: self.items[i].source.clone(),
                            text: self.items[i].text.clone(),
                        })
                        .collect(),
                    similarity: group.similarity,
                    outputs,
                }
            })
            .collect();
        // Duplicates first, larger groups first; otherwise input order.
        out.sort_by_key(|g| std::cmp::Reverse(g.members.len()));
        Report {
            pipeline: self.name.clone(),
            items: self.items.len() + self.rejected_by_feed(),
            groups: out,
            rejected: self.rejected.clone(),
        }
    }

    fn rejected_by_feed(&self) -> usize {
        let failed: usize = self
            .rejected
            .iter()
            .filter(|r| self.items.iter().any(|i| i.id == r.id))
            .count();
        self.rejected.len() - failed
    }
}

/// The input of a stage that reads an item's text.
fn text_input(text: &str) -> Vec<u8> {
    serde_json::json!({ "text": text }).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn manifest(text: &str) -> PipelineManifest {
        PipelineManifest::parse(text, Path::new("test.toml")).expect("valid")
    }

    const AGG: &str = r#"
name = "agg"
[[stage]]
name = "embed"
bundle = "e.toml"
over = "items"
[[stage]]
name = "dedupe"
bundle = "d.toml"
over = "all"
from = "embed"
options = { threshold = 0.5 }
[[stage]]
name = "summarize"
bundle = "s.toml"
over = "groups"
"#;

    fn items(texts: &[&str]) -> Vec<Item> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Item {
                id: format!("i{i}"),
                source: format!("test:{i}"),
                text: (*t).to_owned(),
            })
            .collect()
    }

    fn run(texts: &[&str]) -> Run {
        let m = manifest(AGG);
        let bundles = [Digest::of(b"e"), Digest::of(b"d"), Digest::of(b"s")];
        Run::new(&m, &bundles, "r1", items(texts), Vec::new()).expect("run")
    }

    fn json(b: &[u8]) -> Value {
        serde_json::from_slice(b).expect("json")
    }

    #[test]
    fn identical_texts_are_one_task_and_groups_feed_the_last_stage() {
        let mut r = run(&["a cat", "a dog", "a cat"]);
        let s = r.poll_submit().expect("embed submission");
        assert_eq!(s.stage, 0);
        assert_eq!(s.inputs.len(), 2, "the repeated text is submitted once");
        assert_eq!(json(&s.inputs[0]), serde_json::json!({"text": "a cat"}));
        assert_eq!(s.key, "agg/r1/embed/0");
        assert!(r.poll_submit().is_none(), "dedupe waits for every item");
        r.handle_result(s.id, 1, Ok(br#"{"vector": [0, 1]}"#.to_vec()));
        assert!(r.poll_submit().is_none(), "one embed is still pending");
        assert_eq!(r.progress(0), (1, 3));
        r.handle_result(s.id, 0, Ok(br#"{"vector": [1, 0]}"#.to_vec()));
        assert_eq!(r.progress(0), (3, 3), "both copies settle together");

        let d = r.poll_submit().expect("dedupe submission");
        assert_eq!(d.stage, 1);
        let input = json(&d.inputs[0]);
        assert_eq!(input["options"]["threshold"], 0.5);
        let ids: Vec<&str> = input["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["id"].as_str().expect("id"))
            .collect();
        assert_eq!(ids, ["i0", "i1", "i2"]);
        assert_eq!(input["items"][0]["vector"], serde_json::json!([1, 0]));
        r.handle_result(
            d.id,
            0,
            Ok(br#"{"groups": [{"members": ["i0", "i2"], "similarity": 1.0}, {"members": ["i1"]}]}"#.to_vec()),
        );
        let g = r.poll_submit().expect("summaries");
        assert_eq!(g.stage, 2);
        assert_eq!(g.inputs.len(), 2, "one per group, from its first member");
        assert_eq!(json(&g.inputs[0]), serde_json::json!({"text": "a cat"}));
        assert_eq!(json(&g.inputs[1]), serde_json::json!({"text": "a dog"}));
        assert!(!r.is_done());
        r.handle_result(g.id, 0, Ok(br#"{"summary": "Cats."}"#.to_vec()));
        r.handle_result(g.id, 1, Err("invalid-input: too short".into()));
        assert!(r.is_done());
        let rep = r.report();
        assert_eq!(rep.items, 3);
        assert_eq!(rep.groups.len(), 2);
        assert_eq!(rep.groups[0].members.len(), 2, "duplicates first");
        assert_eq!(rep.groups[0].outputs["summarize"]["summary"], "Cats.");
        assert_eq!(
            rep.groups[1].outputs["summarize"]["error"],
            "stage summarize: invalid-input: too short"
        );
        assert!(rep.rejected.is_empty());
        assert!(rep.to_markdown().contains("## 1. Cats."));
    }

    #[test]
    fn failed_items_are_rejected_and_left_out_of_the_batch_stage() {
        let mut r = run(&["one", "two", "three"]);
        let s = r.poll_submit().expect("embed");
        r.handle_result(s.id, 0, Ok(br#"{"vector": [1]}"#.to_vec()));
        r.handle_result(s.id, 1, Err("invalid-input: no".into()));
        r.handle_result(s.id, 2, Ok(br#"{"vector": [2]}"#.to_vec()));
        let d = r.poll_submit().expect("dedupe");
        let input = json(&d.inputs[0]);
        assert_eq!(input["items"].as_array().map(Vec::len), Some(2));
        let rep = r.report();
        assert_eq!(rep.rejected.len(), 1);
        assert_eq!(rep.rejected[0].id, "i1");
        assert_eq!(rep.rejected[0].reason, "stage embed: invalid-input: no");
    }

    #[test]
    fn a_bad_grouping_stops_the_run_with_the_stage_named() {
        for (answer, why) in [
            (
                &br#"{"groups": [{"members": ["i0"]}]}"#[..],
                "item \"i1\" is in no group",
            ),
            (
                br#"{"groups": [{"members": ["i0", "i1", "i0"]}]}"#,
                "in two groups",
            ),
            (
                br#"{"groups": [{"members": ["i0", "i1", "zz"]}]}"#,
                "\"zz\" is not an item",
            ),
            (br#"[1, 2]"#, "the answer is not"),
        ] {
            let mut r = run(&["x", "y"]);
            let s = r.poll_submit().expect("embed");
            r.handle_result(s.id, 0, Ok(b"{}".to_vec()));
            r.handle_result(s.id, 1, Ok(b"{}".to_vec()));
            let d = r.poll_submit().expect("dedupe");
            r.handle_result(d.id, 0, Ok(answer.to_vec()));
            let e = r.error().expect("error").to_string();
            assert!(
                e.starts_with("stage \"dedupe\": ") && e.contains(why),
                "{e}"
            );
            assert!(r.is_done());
            assert!(r.poll_submit().is_none());
        }
    }

    #[test]
    fn chained_item_stages_move_each_item_on_as_soon_as_it_is_ready() {
        let m = manifest(
            r#"
name = "chain"
[[stage]]
name = "a"
bundle = "a.toml"
over = "items"
[[stage]]
name = "b"
bundle = "b.toml"
over = "items"
from = "a"
"#,
        );
        let mut r = Run::new(
            &m,
            &[Digest::of(b"a"), Digest::of(b"b")],
            "r",
            items(&["slow", "fast"]),
            Vec::new(),
        )
        .expect("run");
        let a = r.poll_submit().expect("a");
        r.handle_result(a.id, 1, Ok(b"FAST".to_vec()));
        let b = r.poll_submit().expect("b for the fast item alone");
        assert_eq!(b.stage, 1);
        assert_eq!(b.inputs, vec![b"FAST".to_vec()]);
        r.handle_result(a.id, 0, Err("boom".into()));
        assert!(r.poll_submit().is_none(), "nothing to do for a failed item");
        r.handle_result(b.id, 0, Ok(br#"{"n": 1}"#.to_vec()));
        assert!(r.is_done());
        let rep = r.report();
        assert_eq!(
            rep.groups.len(),
            1,
            "without grouping each item is its own group"
        );
        assert_eq!(rep.groups[0].outputs["b"]["n"], 1);
        assert_eq!(rep.rejected[0].reason, "stage a: boom");
        assert!(matches!(
            {
                let mut r2 = Run::new(
                    &m,
                    &[Digest::of(b"a"), Digest::of(b"b")],
                    "r",
                    items(&["x"]),
                    Vec::new(),
                )
                .expect("run");
                r2.handle_result(9, 0, Ok(vec![]));
                r2.error().cloned()
            },
            Some(RunError::Unknown { sub: 9, index: 0 })
        ));
    }
}
