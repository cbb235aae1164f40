//! Verification on the real coordinator and SQLite store, with simulated
//! nodes and time: sampling by reputation, re-execution on other nodes,
//! third executions, penalties, look-back re-checks, cache eviction,
//! challenges, canaries, and the measured detection rate of six kinds of
//! cheater against the model 1-(1-s·c)^N.
//!
//! Outputs here are synthetic (an honest node reverses its input); the same
//! paths run with real guests and models in `tests/tests/verification.rs`.

use std::time::{Duration, Instant};
use tidepool_pool::coordinator::{Coordinator, PoolConfig, PoolEvent};
use tidepool_pool::store::SqliteStore;
use tidepool_pool::verify::{audit_draw, VerifyPolicy};
use tidepool_proto::ledger::{check_pages, LedgerQuery, RowState};

use tidepool_proto::wire::{
    Canary, Capabilities, ChallengeState, ErrorCode, JobId, LeaseId, Outcome, TaskGrant, TaskId,
    TaskRecord, TaskResult, TaskState, Verdict,
};
use tidepool_proto::{Digest, KeyRole, PublicKey, SecretKey};
use tidepool_testkit::{bundle, fake_node};

const NOW_UNIX: u64 = 1_800_000_000;

/// How a simulated node answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Honest,
    /// Honest, and its output names the task identity it was given (as a
    /// job that reads its task id, a hash seed or a virtual clock does).
    HonestSeeded,
    /// Honest on this engine, whose bytes differ from other engines' (as
    /// tract's and ONNX Runtime's do); its hello and receipts name it.
    Engine(&'static str),
    AlwaysWrong,
    /// Wrong with this probability.
    WrongP(f64),
    /// Returns the answer to the task before (another input).
    Replay,
    /// Returns the first half of the answer.
    Truncate,
    /// Runs "another model": a different function of the input.
    OtherModel,
    /// An `llm`-tier node: its "model" generates the input's bytes as
    /// tokens, and its output is that text reversed; replaying a claim, it
    /// accepts claimed tokens while they are the ones it would choose.
    LlmHonest,
    /// An `llm`-tier verifier that never runs its model on a check: it
    /// returns the claimed tokens and the text they make.
    LazyVerifier,
}

impl Kind {
    /// Chance that one answer is wrong (`c` in the detection model).
    fn c(self) -> f64 {
        match self {
            Kind::Honest | Kind::HonestSeeded | Kind::Engine(_) => 0.0,
            Kind::WrongP(p) => p,
            _ => 1.0,
        }
    }
}

/// The client that submits the tests' jobs (and so owns them).
fn submitter() -> tidepool_proto::PublicKey {
    SecretKey::from_seed(KeyRole::Client, &[7; 32]).public()
}

fn honest_output(input: &[u8]) -> Vec<u8> {
    input.iter().rev().copied().collect()
}

/// A simulated node: key, behaviour, its own seeded randomness, memory of
/// the last answer (for replay).
struct SimNode {
    key: SecretKey,
    kind: Kind,
    rng: u64,
    last: Vec<u8>,
    /// Checks (grants with a transcript to replay) it answered.
    checks_answered: u64,
    /// The leases it answered, in order, and whether it lied.
    answered: Vec<(LeaseId, bool)>,
}

impl SimNode {
    fn new(seed: u8, kind: Kind, rng: u64) -> Self {
        Self {
            key: SecretKey::from_seed(KeyRole::Node, &[seed; 32]),
            kind,
            rng: rng | 1,
            last: honest_output(b"an earlier input"),
            checks_answered: 0,
            answered: Vec::new(),
        }
    }

    fn public(&self) -> PublicKey {
        self.key.public()
    }

    /// An `llm`-tier answer (see [`Kind::LlmHonest`]).
    fn generate(&mut self, g: &TaskGrant, component: Digest) -> TaskResult {
        let own: Vec<u32> = g.input.0.iter().map(|b| u32::from(*b)).collect();
        let tokens = match (&g.replay, self.kind) {
            (Some(claim), Kind::LazyVerifier) => {
                self.checks_answered += 1;
                claim.first().map(|c| c.tokens.clone()).unwrap_or_default()
            }
            (Some(_), _) => {
                self.checks_answered += 1;
                own
            }
            (None, _) => own,
        };
        let output: Vec<u8> = tokens.iter().rev().map(|t| *t as u8).collect();
        let transcript = vec![tidepool_proto::llm::Generation {
            prompt: Digest::of(&g.input.0),
            tokens,
        }];
        fake_node::answer_generated(&self.key, g, component, output, transcript)
    }

    /// Its hello: [`caps`], with its engine if it has one.
    fn caps(&self) -> Capabilities {
        let mut c = caps();
        if let Kind::Engine(e) = self.kind {
            c.engines = vec![e.to_owned()];
        }
        c
    }

    /// xorshift64*: the node's private coin.
    fn coin(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn answer(&mut self, g: &TaskGrant, component: Digest) -> TaskResult {
        if matches!(self.kind, Kind::LlmHonest | Kind::LazyVerifier) {
            return self.generate(g, component);
        }
        let mut right = honest_output(&g.input.0);
        if self.kind == Kind::HonestSeeded {
            right.extend_from_slice(g.identity.as_bytes());
        }
        if let Kind::Engine(e) = self.kind {
            // Numbers from the input, off in the 8th digit on "ort" engines.
            let noise = if e.starts_with("ort") { 1e-7 } else { 0.0 };
            let x = g.input.0.iter().map(|b| f64::from(*b)).sum::<f64>() / 1000.0;
            right = format!(
                "{{\"n\":{},\"v\":[{x:?},{:?}]}}",
                g.input.0.len(),
                0.5 + noise
            )
            .into_bytes();
        }
        let output = match self.kind {
            Kind::Honest | Kind::HonestSeeded | Kind::Engine(_) => right.clone(),
            Kind::AlwaysWrong => {
                let mut o = right.clone();
                o[0] ^= 1;
                o
            }
            Kind::WrongP(p) => {
                let mut o = right.clone();
                if self.coin() < p {
                    o[0] ^= 1;
                }
                o
            }
            Kind::Replay => self.last.clone(),
            Kind::Truncate => right[..right.len() / 2].to_vec(),
            Kind::OtherModel => {
                let mut o = b"other:".to_vec();
                o.extend_from_slice(&g.input.0);
                o
            }
            Kind::LlmHonest | Kind::LazyVerifier => unreachable!("answered by generate"),
        };
        self.answered.push((g.lease, output != right));
        self.last = right;
        let engine = match self.kind {
            Kind::Engine(e) => Some(e),
            _ => None,
        };
        fake_node::answer_on(&self.key, g, component, output, "sim", engine)
    }
}

fn caps() -> Capabilities {
    Capabilities {
        encodings: vec!["onnx".into()],
        slots: 4,
        fetch_models: true,
        ..Capabilities::default()
    }
}

struct Sim {
    c: Coordinator<SqliteStore>,
    publisher: SecretKey,
    bundle: Digest,
    component: Digest,
    nodes: Vec<SimNode>,
    now: Instant,
    events: Vec<PoolEvent>,
}

/// The pool policy of these tests: publisher key 1, long leases.
fn config(policy: VerifyPolicy) -> PoolConfig {
    let mut cfg = PoolConfig {
        lease_ttl: Duration::from_secs(30),
        verify: policy,
        ..PoolConfig::default()
    };
    cfg.publishers
        .insert(SecretKey::from_seed(KeyRole::Publisher, &[1; 32]).public());
    cfg
}

/// The keys of sim nodes `indexes` (for `trusted`: a strike needs a
/// trusted node among the executions that agree).
fn trust(indexes: &[u8]) -> std::collections::BTreeSet<PublicKey> {
    indexes
        .iter()
        .map(|i| SecretKey::from_seed(KeyRole::Node, &[10 + i; 32]).public())
        .collect()
}

fn secret(seed: u64) -> [u8; 32] {
    Digest::of(&seed.to_be_bytes()).0
}

impl Sim {
    fn new(policy: VerifyPolicy, kinds: &[Kind], seed: u64) -> Self {
        Self::with_tier(policy, kinds, seed, "")
    }

    fn with_tier(policy: VerifyPolicy, kinds: &[Kind], seed: u64, extra: &str) -> Self {
        let c = Coordinator::new(
            SqliteStore::in_memory().expect("db"),
            config(policy),
            &|_| true,
        )
        .expect("coordinator");
        Self::on(c, kinds, seed, extra)
    }

    /// Publish the bundle on `c` and say hello from one node per kind.
    fn on(mut c: Coordinator<SqliteStore>, kinds: &[Kind], seed: u64, extra: &str) -> Self {
        let publisher = SecretKey::from_seed(KeyRole::Publisher, &[1; 32]);
        let component = bundle::component();
        let (bundle, _) = c
            .handle_publish(
                NOW_UNIX,
                bundle::signed(&publisher, "rev", extra, NOW_UNIX),
                &|_| true,
            )
            .expect("publish");
        let now = Instant::now();
        c.set_clock(now, NOW_UNIX);
        let nodes: Vec<SimNode> = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| SimNode::new(10 + i as u8, *k, seed.wrapping_mul(7919) + i as u64))
            .collect();
        for n in &nodes {
            c.handle_node_hello(now, n.public(), n.caps())
                .expect("hello");
        }
        Self {
            c,
            publisher,
            bundle,
            component: component.sha256,
            nodes,
            now,
            events: Vec::new(),
        }
    }

    fn submit(&mut self, key: &str, inputs: &[Vec<u8>]) -> JobId {
        self.c
            .handle_submit(NOW_UNIX, &submitter(), &self.bundle, key, inputs)
            .expect("submit")
            .0
    }

    /// Node `i` asks for up to `want` tasks and answers them all.
    fn work(&mut self, i: usize, want: u32) -> usize {
        self.now += Duration::from_millis(1);
        let key = self.nodes[i].public();
        let grants = match self.c.handle_lease(self.now, &key, want, &[]) {
            Ok((grants, _)) => grants,
            Err(e) if e.code == ErrorCode::Forbidden => return 0, // banned
            Err(e) => panic!("lease: {e:?}"),
        };
        let results: Vec<TaskResult> = grants
            .iter()
            .map(|g| self.nodes[i].answer(g, self.component))
            .collect();
        let n = results.len();
        self.c
            .handle_results(self.now, &key, results)
            .expect("results");
        while let Some(e) = self.c.poll_event() {
            self.events.push(e);
        }
        n
    }

    /// Everyone works until nothing is left.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut any = 0;
            for i in 0..self.nodes.len() {
                any += self.work(i, 8);
            }
            if any == 0 {
                return;
            }
        }
        panic!("the pool did not settle");
    }

    fn records(&mut self, job: JobId) -> Vec<TaskRecord> {
        self.c.job_results(job, 0, 100_000).expect("results")
    }

    fn caught(&self) -> Vec<(PublicKey, TaskId)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                PoolEvent::Caught { node, task, .. } => Some((*node, *task)),
                _ => None,
            })
            .collect()
    }
}

fn inputs(tag: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{tag} item {i:05}").into_bytes())
        .collect()
}

fn output_of(r: &TaskRecord) -> Vec<u8> {
    match &r.outcome {
        Some(Outcome::Output(b)) => b.0.clone(),
        other => panic!("task {} has no output: {other:?}", r.task),
    }
}

#[test]
fn honest_nodes_are_checked_until_trusted_and_never_flagged() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(1)),
            ..VerifyPolicy::default()
        },
        &[Kind::Honest, Kind::Honest, Kind::Honest],
        1,
    );
    let ins = inputs("honest", 4000);
    let job = sim.submit("j", &ins);
    sim.settle();
    assert!(sim.caught().is_empty(), "{:?}", sim.caught());
    let recs = sim.records(job);
    assert!(recs.iter().all(|r| r.state == TaskState::Done));
    for (r, i) in recs.iter().zip(&ins) {
        assert_eq!(output_of(r), honest_output(i));
    }
    let verified = recs.iter().filter(|r| r.verification == "verified").count();
    let unverified = recs
        .iter()
        .filter(|r| r.verification == "unverified")
        .count();
    assert_eq!(verified + unverified, recs.len());
    let status = sim.c.pool_status(sim.now).expect("status");
    // A new node is checked every time at first; each confirmation lowers
    // its rate by 0.5 points. Reaching reputation 1000 takes 180
    // confirmations (~460 results); the floor ~1200 results.
    assert!(verified >= 3 * 180, "{verified} verified");
    for n in &status.nodes {
        assert_eq!(n.strikes, 0);
        assert!(
            n.reputation <= 1_000,
            "{}: reputation {}",
            n.key,
            n.reputation
        );
        assert_eq!(n.sampling, f64::from(n.reputation.max(1)) / 10_000.0);
    }
    assert_eq!(status.verification.mismatches, 0);
    assert_eq!(status.verification.confirmed as usize, verified);
    assert_eq!(
        status.verification.pending, 0,
        "every check ran on another node"
    );
}

/// The pool owner's own nodes (`trusted`) are sampled at the floor from
/// their first result; a stranger beside them is checked every time at
/// first, as before.
#[test]
fn trusted_own_nodes_are_not_re_executed_while_a_stranger_is() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(7)),
            trusted: trust(&[0, 1]),
            ..VerifyPolicy::default()
        },
        &[Kind::Honest, Kind::Honest, Kind::Honest],
        1,
    );
    let ins = inputs("own", 300);
    let job = sim.submit("j", &ins);
    sim.settle();
    let status = sim.c.pool_status(sim.now).expect("status");
    let stranger = SecretKey::from_seed(KeyRole::Node, &[12; 32]).public();
    let verified = sim
        .records(job)
        .iter()
        .filter(|r| r.verification == "verified")
        .count();
    for n in &status.nodes {
        if n.key == stranger {
            assert!(
                n.reputation > 0,
                "the stranger earns standing: {}",
                n.reputation
            );
        } else {
            assert_eq!(n.reputation, 0, "{} starts at the floor", n.key);
            assert_eq!(n.sampling, 0.0001);
        }
    }
    // Only the stranger's results (about a third) are re-executed, nearly
    // all of them; of the own nodes' ~200, almost surely none.
    assert!((50..=140).contains(&verified), "{verified} verified");
    assert!(sim.caught().is_empty());
}

#[test]
fn a_check_never_runs_on_the_node_that_produced_the_result() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(2)),
            ..VerifyPolicy::default()
        },
        &[Kind::Honest, Kind::Honest],
        2,
    );
    let job = sim.submit("j", &inputs("alone", 5));
    // Only node 0 works: its results are all sampled (new node), but the
    // checks wait for another node.
    while sim.work(0, 8) > 0 {}
    assert_eq!(sim.c.checks_pending(), 5);
    assert!(sim
        .records(job)
        .iter()
        .all(|r| r.verification == "checking"));
    // Node 1 runs them and confirms.
    sim.settle();
    assert_eq!(sim.c.checks_pending(), 0);
    let recs = sim.records(job);
    assert!(
        recs.iter().all(|r| r.verification == "verified"),
        "{recs:?}"
    );
    assert!(recs.iter().all(|r| r.node == Some(sim.nodes[0].public())));
    assert_eq!(
        sim.c.node_standing(&sim.nodes[0].public()).reputation,
        10_000 - 5 * 50
    );
}

#[test]
fn a_liar_is_caught_replaced_quarantined_and_its_recent_results_rechecked() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(3)),
            initial_reputation: 0,
            lookback: 50,
            trusted: trust(&[1, 2]),
            ..VerifyPolicy::default()
        },
        &[Kind::AlwaysWrong, Kind::Honest, Kind::Honest],
        3,
    );
    let ins = inputs("liar", 30);
    let job = sim.submit("j", &ins);
    // The liar takes everything; at reputation 0 almost nothing is checked.
    while sim.work(0, 8) > 0 {}
    let recs = sim.records(job);
    let wrong = recs
        .iter()
        .zip(&ins)
        .filter(|(r, i)| output_of(r) != honest_output(i))
        .count();
    assert_eq!(wrong, 30, "the liar answered all, all wrong");

    // A repeated input is served from the cache while nobody suspects.
    let again = sim.submit("again", &ins[..1]);
    assert_eq!(sim.records(again)[0].cached_from, Some(recs[0].task));

    // The submitter challenges one result.
    let ch = sim
        .c
        .handle_challenge(sim.now, recs[7].task)
        .expect("challenge");
    assert_eq!(
        (ch.target, ch.job, ch.index, ch.state.as_str()),
        (recs[7].task, job, 7, "pending")
    );
    sim.settle();

    let liar = sim.nodes[0].public();
    let caught = sim.caught();
    assert_eq!(caught.first(), Some(&(liar, recs[7].task)), "{caught:?}");
    let st = sim.c.node_standing(&liar);
    assert_eq!(st.reputation, 10_000);
    assert!(st.strikes >= 1);
    // Every result of the liar was re-checked (look-back) and replaced by the
    // honest answer; the cached copy too.
    let recs = sim.records(job);
    for (r, i) in recs.iter().zip(&ins) {
        assert_eq!(output_of(r), honest_output(i), "task {}", r.task);
        assert_eq!(r.verification, "replaced");
        assert_ne!(r.node, Some(liar));
    }
    assert_eq!(recs[7].challenge, Some(ChallengeState::Upheld));
    assert_eq!(output_of(&sim.records(again)[0]), honest_output(&ins[0]));
    // Each replaced result is kept as evidence: the liar's signed receipt
    // for its wrong output, and the two executions that agreed against it.
    for (r, i) in recs.iter().zip(&ins) {
        let ev = sim.c.evidence(r.task).expect("evidence");
        assert_eq!(ev.len(), 1, "task {}", r.task);
        assert_eq!(ev[0].node, liar);
        assert_eq!(ev[0].decided_by.len(), 2);
        let signed: tidepool_proto::receipt::SignedReceipt =
            rmp_serde::from_slice(ev[0].receipt.as_deref().expect("receipt")).expect("receipt");
        let receipt = signed.open(&liar).expect("signed by the liar");
        let mut lie = honest_output(i);
        lie[0] ^= 1;
        assert_eq!(receipt.receipt.output, Digest::of(&lie), "task {}", r.task);
    }
    // The liar earns nothing: its 30 results are withdrawn, and the
    // honest nodes whose executions replaced them hold them, credited.
    let credits = sim
        .c
        .credits(0, NOW_UNIX + 1_000_000, NOW_UNIX + 1_000_000)
        .expect("credits");
    let l = &credits[&liar];
    assert_eq!((l.results, l.credited, l.withdrawn), (0, 0, 30), "{l:?}");
    assert!(l.strikes >= 1);
    let honest_credit: u64 = [1, 2]
        .iter()
        .map(|i| {
            credits
                .get(&sim.nodes[*i].public())
                .map_or(0, |c| c.credited)
        })
        .sum();
    // The 30 replaced results, the cached copy is not a result, plus what
    // the honest nodes answered of other jobs (none here).
    assert_eq!(honest_credit, 30, "{credits:?}");
    // Quarantined: no tasks for the liar while honest nodes get them.
    sim.submit("more", &inputs("more", 4));
    assert_eq!(sim.work(0, 8), 0, "quarantined node got work");
    assert_eq!(sim.work(1, 8), 4);
    let status = sim.c.pool_status(sim.now).expect("status");
    let row = status.nodes.iter().find(|n| n.key == liar).expect("liar");
    assert!(row.quarantined_until > 0 && row.strikes >= 1);
    assert!(status.verification.replaced >= 30);
}

#[test]
fn suspect_results_are_not_served_from_the_cache() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(4)),
            initial_reputation: 0,
            trusted: trust(&[1, 2]),
            ..VerifyPolicy::default()
        },
        &[Kind::AlwaysWrong, Kind::Honest, Kind::Honest],
        4,
    );
    let ins = inputs("suspect", 6);
    let job = sim.submit("j", &ins);
    while sim.work(0, 8) > 0 {}
    let recs = sim.records(job);
    sim.c
        .handle_challenge(sim.now, recs[0].task)
        .expect("challenge");
    // Node 1 checks (disagrees), node 2 decides: the liar is caught and its
    // other results become suspect, with checks queued.
    sim.work(1, 1);
    sim.work(2, 1);
    assert_eq!(sim.caught().len(), 1);
    let recs = sim.records(job);
    assert!(
        recs[1..].iter().all(|r| r.verification == "suspect"),
        "{recs:?}"
    );
    // A resubmission of a suspect input is computed again, not copied.
    let again = sim.submit("again", &ins[3..4]);
    assert_eq!(sim.records(again)[0].cached_from, None);
    assert_eq!(sim.records(again)[0].state, TaskState::Queued);
}

#[test]
fn a_challenge_of_a_right_result_leaves_it() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(5)),
            initial_reputation: 0,
            ..VerifyPolicy::default()
        },
        &[Kind::Honest, Kind::Honest],
        5,
    );
    let ins = inputs("right", 3);
    let job = sim.submit("j", &ins);
    while sim.work(0, 8) > 0 {}
    let before = sim.records(job);
    let producer = before[1].node.expect("done");
    let standing = sim.c.node_standing(&producer);
    sim.c
        .handle_challenge(sim.now, before[1].task)
        .expect("challenge");
    sim.settle();
    let after = sim.records(job);
    // A challenge confirms nothing about its producer: otherwise a client
    // could pump a node's standing with challenges of right results.
    assert_eq!(sim.c.node_standing(&producer).confirmed, standing.confirmed);
    assert_eq!(output_of(&after[1]), output_of(&before[1]));
    assert_eq!(after[1].node, before[1].node);
    assert_eq!(after[1].verification, "verified");
    assert_eq!(after[1].challenge, Some(ChallengeState::Rejected));
    assert!(sim.caught().is_empty());
    // Refusals: unknown task, a task without a result, a closed window.
    let e = sim
        .c
        .handle_challenge(sim.now, TaskId(99_999))
        .expect_err("unknown");
    assert_eq!(e.code, ErrorCode::NotFound);
    let pending = sim.submit("later", &inputs("later", 1));
    let t = sim.records(pending)[0].task;
    let e = sim.c.handle_challenge(sim.now, t).expect_err("no result");
    assert!(e.message.contains("no result"), "{}", e.message);
    let e = sim
        .c
        .handle_challenge(sim.now + Duration::from_secs(10 * 86_400), before[0].task)
        .expect_err("window");
    assert!(e.message.contains("challenge window"), "{}", e.message);
}

/// Canaries are made from verified results and run with their identity:
/// on a job that prints its task identity (`HonestSeeded`), an honest node
/// answers a canary exactly as the original, a liar is caught by one, and
/// an unconfirmed result never becomes one.
#[test]
fn canaries_catch_a_liar_and_confirm_honest_nodes() {
    let mut sim = Sim::with_tier(
        VerifyPolicy {
            secret: Some(secret(6)),
            initial_reputation: 0,
            canary_rate: 1.0,
            trusted: trust(&[0, 2]),
            ..VerifyPolicy::default()
        },
        &[Kind::HonestSeeded, Kind::Truncate, Kind::HonestSeeded],
        6,
        "[verification]\nsampling = \"always\"\n",
    );
    // Known answers: a job run by the two honest nodes, each result checked.
    let known = sim.submit("known", &inputs("canary", 3));
    while sim.work(0, 8) + sim.work(2, 8) > 0 {}
    let records = sim.records(known);
    assert!(
        records.iter().all(|r| r.verification == "verified"),
        "{records:?}"
    );
    let items: Vec<Canary> = (0..3).map(|index| Canary { job: known, index }).collect();
    // An unconfirmed result does not become a canary.
    let open = sim.submit("open", &inputs("unchecked", 1));
    sim.c
        .handle_lease(sim.now, &sim.nodes[0].public(), 0, &[])
        .expect("lease");
    let publisher = sim.publisher.public();
    let bundle = sim.bundle;
    let e = sim
        .c
        .handle_add_canaries(
            &publisher,
            &bundle,
            vec![Canary {
                job: open,
                index: 0,
            }],
        )
        .expect_err("no result yet");
    assert!(e.message.contains("no result"), "{e:?}");
    // Only publishers may add them.
    let stranger = SecretKey::from_seed(KeyRole::Client, &[9; 32]).public();
    assert_eq!(
        sim.c
            .handle_add_canaries(&stranger, &sim.bundle.clone(), items.clone())
            .expect_err("stranger")
            .code,
        ErrorCode::Forbidden
    );
    assert_eq!(
        sim.c
            .handle_add_canaries(&publisher, &bundle, items)
            .expect("add"),
        3
    );
    let job = sim.submit("j", &inputs("work", 20));
    sim.settle();
    let honest = sim.nodes[0].public();
    let liar = sim.nodes[1].public();
    // The canary looks like any task: the truncating node answers it like
    // the rest, and is caught by it.
    let caught = sim.caught();
    assert!(caught.iter().any(|(n, _)| *n == liar), "{caught:?}");
    assert!(caught.iter().all(|(n, _)| *n != honest));
    assert!(sim.c.node_standing(&honest).confirmed >= 1);
    // Canary tasks are not part of the user's job.
    assert_eq!(sim.records(job).len(), 20);
    let status = sim.c.pool_status(sim.now).expect("status");
    assert!(status.verification.canaries >= 2);
    assert_eq!(status.jobs.len(), 3, "hidden jobs are not listed");
    // The other honest node answered canaries too, with their identity.
    assert!(caught.iter().all(|(n, _)| *n != sim.nodes[2].public()));
}

#[test]
fn repeated_strikes_ban_a_node() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(7)),
            quarantine: Duration::ZERO,
            ban_after: 2,
            lookback: 0,
            trusted: trust(&[1, 2]),
            ..VerifyPolicy::default()
        },
        &[Kind::AlwaysWrong, Kind::Honest, Kind::Honest],
        7,
    );
    sim.submit("j", &inputs("ban", 40));
    sim.settle();
    let liar = sim.nodes[0].public();
    let st = sim.c.node_standing(&liar);
    assert!(st.banned && st.strikes >= 2, "{st:?}");
    let e = sim
        .c
        .handle_node_hello(sim.now, liar, caps())
        .expect_err("banned");
    assert_eq!(e.code, ErrorCode::Forbidden);
    assert!(e.message.contains("banned"), "{}", e.message);
}

#[test]
fn tolerance_tier_accepts_float_noise_that_exact_flags() {
    // Two honest engines whose floats differ in the last digits.
    for (tier, expect_caught) in [
        ("", true),
        (
            "[determinism]\ntier = \"tolerance\"\nabs = \"1e-4\"\ncosine = \"0.9999\"\n",
            false,
        ),
    ] {
        let mut sim = Sim::with_tier(
            VerifyPolicy {
                secret: Some(secret(8)),
                trusted: trust(&[1, 2]),
                ..VerifyPolicy::default()
            },
            &[Kind::Honest, Kind::Honest, Kind::Honest],
            8,
            tier,
        );
        let v: Vec<f32> = vec![0.125, -0.5, 0.25];
        let input = serde_json::to_vec(&v).expect("json");
        let job = sim.submit("j", &[input]);
        // Node 0 answers with noise; the others exactly.
        let key = sim.nodes[0].public();
        let (grants, _) = sim.c.handle_lease(sim.now, &key, 1, &[]).expect("lease");
        let noisy: Vec<f32> = v.iter().rev().map(|x| x + 1e-6).collect();
        let out = serde_json::to_vec(&noisy).expect("json");
        let g = &grants[0];
        let r = fake_node::answer(&sim.nodes[0].key, g, sim.component, out, "sim");
        sim.c
            .handle_results(sim.now, &key, vec![r])
            .expect("results");
        // The honest answer in these sims reverses bytes, not numbers: make
        // the checkers answer with the exact reversed vector instead.
        let exact: Vec<f32> = v.iter().rev().copied().collect();
        for i in 1..3 {
            let key = sim.nodes[i].public();
            let (grants, _) = sim.c.handle_lease(sim.now, &key, 1, &[]).expect("lease");
            let results = grants
                .iter()
                .map(|g| {
                    let out = serde_json::to_vec(&exact).expect("json");
                    fake_node::answer(&sim.nodes[i].key, g, sim.component, out, "sim")
                })
                .collect();
            sim.c
                .handle_results(sim.now, &key, results)
                .expect("results");
        }
        while let Some(e) = sim.c.poll_event() {
            sim.events.push(e);
        }
        assert_eq!(!sim.caught().is_empty(), expect_caught, "tier {tier:?}");
        let rec = &sim.records(job)[0];
        assert_eq!(
            rec.verification,
            if expect_caught {
                "replaced"
            } else {
                "verified"
            }
        );
    }
}

#[test]
fn pending_checks_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pool.db");
    let cfg = config(VerifyPolicy {
        secret: Some(secret(9)),
        ..VerifyPolicy::default()
    });
    let open = || {
        Coordinator::new(
            SqliteStore::open(&path, tidepool_pool::Durability::Process).expect("db"),
            cfg.clone(),
            &|_| true,
        )
        .expect("coordinator")
    };
    let mut sim = Sim::on(open(), &[Kind::Honest, Kind::Honest], 9, "");
    let job = sim.submit("j", &inputs("restart", 4));
    while sim.work(0, 8) > 0 {}
    assert_eq!(sim.c.checks_pending(), 4);
    // The pool restarts: the checks are still queued, and still never go to
    // the node that produced the results.
    sim.c = open();
    sim.c.set_clock(sim.now, NOW_UNIX);
    for n in &sim.nodes {
        sim.c
            .handle_node_hello(sim.now, n.public(), caps())
            .expect("hello");
    }
    assert_eq!(sim.c.checks_pending(), 4);
    assert_eq!(sim.work(0, 8), 0);
    assert_eq!(sim.work(1, 8), 4);
    assert!(sim
        .records(job)
        .iter()
        .all(|r| r.verification == "verified"));
    assert_eq!(sim.c.node_standing(&sim.nodes[0].public()).confirmed, 4);
}

/// Measure, for each kind of cheater, how many of its results the pool
/// takes before catching it, over many seeded runs, and compare the
/// distribution with the model P(caught within N) = 1-(1-s·c)^N.
///
/// Reputation is held at r (step 0) so s = r/10000 is constant; the
/// comparison is the Dvoretzky–Kiefer–Wolfowitz 95% band around the
/// empirical CDF. Prints the table (run with `--nocapture`).
#[test]
fn detection_follows_the_sampling_model() {
    let runs: u64 = std::env::var("TIDEPOOL_DETECTION_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    // Another seed base gives another independent sample.
    let base: u64 = std::env::var("TIDEPOOL_DETECTION_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let r = 500; // s = 0.05
    let s = f64::from(r) / 10_000.0;
    let kinds = [
        ("always wrong", Kind::AlwaysWrong),
        ("wrong with p = 0.3", Kind::WrongP(0.3)),
        ("replays another answer", Kind::Replay),
        ("truncates its output", Kind::Truncate),
        ("runs another model", Kind::OtherModel),
    ];
    let eps = ((2.0f64 / 0.05).ln() / (2.0 * runs as f64)).sqrt();
    let mut table = String::from(
        "| cheater | s·c | runs | mean N measured | mean N model (1/(s·c)) | max |F̂(N) − F(N)| | 95% band |\n|---|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    for (k, (name, kind)) in kinds.into_iter().enumerate() {
        let q = s * kind.c();
        let mut ns: Vec<u64> = Vec::new();
        for seed in 0..runs {
            // Independent draws per kind and run.
            let seed = base + 100_000 * k as u64 + seed;
            let mut sim = Sim::new(
                VerifyPolicy {
                    secret: Some(secret(seed)),
                    initial_reputation: r,
                    step: 0,
                    lookback: 0,
                    trusted: trust(&[1, 2]),
                    ..VerifyPolicy::default()
                },
                &[kind, Kind::Honest, Kind::Honest],
                seed,
            );
            let cheater = sim.nodes[0].public();
            let mut n = None;
            for step in 0..5000 {
                // The cheater takes one task at a time; honest nodes run
                // the checks (and ordinary tasks, which are not counted).
                let key = sim.nodes[0].public();
                sim.now += Duration::from_millis(1);
                let (mut grants, _) = sim.c.handle_lease(sim.now, &key, 1, &[]).expect("lease");
                if grants.is_empty() {
                    // Work arrives in batches, as it would.
                    sim.submit(
                        &format!("j{step}"),
                        &inputs(&format!("run {seed} {step}"), 200),
                    );
                    grants = sim.c.handle_lease(sim.now, &key, 1, &[]).expect("lease").0;
                }
                let results: Vec<TaskResult> = grants
                    .iter()
                    .map(|g| sim.nodes[0].answer(g, sim.component))
                    .collect();
                sim.c
                    .handle_results(sim.now, &key, results)
                    .expect("results");
                while let Some(e) = sim.c.poll_event() {
                    sim.events.push(e);
                }
                // Honest nodes take only the checks waiting for them.
                while sim.c.checks_pending() > 0 {
                    let a = sim.work(1, 1);
                    let b = sim.work(2, 1);
                    if a + b == 0 {
                        break;
                    }
                }
                if let Some((_, task)) = sim.caught().into_iter().find(|(k, _)| *k == cheater) {
                    // The node saw leases by their wire names; the pool
                    // draws and reports by row.
                    let row = |l: &LeaseId| LeaseId {
                        task: sim.c.task_of_wire(l.task),
                        attempt: l.attempt,
                    };
                    let answered = &sim.nodes[0].answered;
                    let idx = answered
                        .iter()
                        .position(|(l, _)| row(l).task == task)
                        .expect("caught on one of its own results");
                    // Caught exactly at its first lie that the audit draw sampled.
                    let first = answered
                        .iter()
                        .position(|(l, lied)| {
                            *lied && audit_draw(&secret(seed), row(l), &cheater) < s
                        })
                        .expect("a sampled lie");
                    assert_eq!(idx, first, "{name}, run {seed}");
                    n = Some(idx as u64 + 1);
                    break;
                }
            }
            ns.push(n.unwrap_or_else(|| panic!("{name}: not caught in run {seed}")));
        }
        ns.sort_unstable();
        let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64;
        let max_n = *ns.last().expect("runs");
        let mut sup: f64 = 0.0;
        for n in 1..=max_n {
            let emp = ns.iter().filter(|&&x| x <= n).count() as f64 / ns.len() as f64;
            let model = 1.0 - (1.0 - q).powf(n as f64);
            // Also just below each step of the empirical CDF.
            let emp_before = ns.iter().filter(|&&x| x < n).count() as f64 / ns.len() as f64;
            sup = sup
                .max((emp - model).abs())
                .max((emp_before - (1.0 - (1.0 - q).powf(n as f64 - 1.0))).abs());
        }
        table.push_str(&format!(
            "| {name} | {q:.3} | {runs} | {mean:.1} | {:.1} | {sup:.3} | {eps:.3} |\n",
            1.0 / q
        ));
        if sup > eps {
            failures.push(format!("{name}: sup {sup:.3} > band {eps:.3}"));
        }
    }
    println!("{table}");
    assert!(failures.is_empty(), "{failures:?}\n{table}");
}

/// Re-executions go to another operator's node, and to another hardware
/// class when one has room; decisions prefer trusted nodes.
#[test]
fn checks_prefer_other_operators_hardware_and_trusted_nodes() {
    let op_x = SecretKey::from_seed(KeyRole::Client, &[40; 32]).public();
    let op_y = SecretKey::from_seed(KeyRole::Client, &[41; 32]).public();
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(12)),
            ..VerifyPolicy::default()
        },
        &[Kind::Honest, Kind::Honest, Kind::Honest, Kind::Honest],
        12,
    );
    let with = |op: PublicKey, hw: &str| Capabilities {
        operator: Some(op),
        hardware: Some(hw.into()),
        ..caps()
    };
    // 0: producer (operator X, class A); 1: same operator; 2: other
    // operator, same class; 3: other operator, other class.
    for (i, c) in [
        with(op_x, "class A"),
        with(op_x, "class B"),
        with(op_y, "class A"),
        with(op_y, "class B"),
    ]
    .into_iter()
    .enumerate()
    {
        let k = sim.nodes[i].public();
        sim.c.handle_node_hello(sim.now, k, c).expect("hello");
    }
    let job = sim.submit("j", &inputs("placement", 1));
    assert_eq!(sim.work(0, 1), 1);
    assert_eq!(sim.c.checks_pending(), 1);
    assert_eq!(sim.work(1, 8), 0, "same operator never checks");
    assert_eq!(
        sim.work(2, 8),
        0,
        "same hardware class waits while another class has room"
    );
    assert_eq!(sim.work(3, 8), 1);
    assert_eq!(sim.records(job)[0].verification, "verified");

    // With only the same class left, it does get the check.
    let job = sim.submit("j2", &inputs("placement two", 1));
    assert_eq!(sim.work(0, 1), 1);
    let gone = sim.nodes[3].public();
    sim.c.handle_node_gone(sim.now, &gone);
    sim.c.handle_node_gone(sim.now, &gone);
    assert_eq!(sim.work(2, 8), 1);
    assert_eq!(sim.records(job)[0].verification, "verified");
}

/// Executions that never agree end `disputed` after MAX_EXECUTIONS, with
/// nobody penalised; the stored result stays.
#[test]
fn results_on_which_no_two_executions_agree_are_disputed() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(13)),
            decide_after: 0,
            ..VerifyPolicy::default()
        },
        &[
            Kind::AlwaysWrong,
            Kind::Truncate,
            Kind::OtherModel,
            Kind::Replay,
            Kind::Honest,
        ],
        13,
    );
    let job = sim.submit("j", &inputs("dispute", 1));
    assert_eq!(sim.work(0, 1), 1);
    let before = sim.records(job)[0].clone();
    sim.settle();
    let after = &sim.records(job)[0];
    assert_eq!(after.verification, "disputed");
    assert_eq!(output_of(after), output_of(&before));
    assert!(sim.caught().is_empty(), "{:?}", sim.caught());
    let status = sim.c.pool_status(sim.now).expect("status");
    assert_eq!(
        status.verification.executed as usize,
        tidepool_pool::coordinator::MAX_EXECUTIONS - 1
    );
}

/// A node banned while it holds leases loses them at once: other nodes get
/// the tasks without waiting for the leases to expire.
#[test]
fn a_banned_node_leases_go_to_others_at_once() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(14)),
            initial_reputation: 0,
            ban_after: 1,
            lookback: 0,
            trusted: trust(&[1, 2]),
            ..VerifyPolicy::default()
        },
        &[Kind::AlwaysWrong, Kind::Honest, Kind::Honest],
        14,
    );
    let job = sim.submit("j", &inputs("banned", 4));
    // The liar answers one task and holds the rest.
    let liar = sim.nodes[0].public();
    let (grants, _) = sim.c.handle_lease(sim.now, &liar, 6, &[]).expect("lease");
    assert_eq!(grants.len(), 4, "its four slots");
    let answer = sim.nodes[0].answer(&grants[0], sim.component);
    sim.c
        .handle_results(sim.now, &liar, vec![answer])
        .expect("results");
    sim.c
        .handle_challenge(sim.now, sim.c.task_of_wire(grants[0].lease.task))
        .expect("challenge");
    sim.work(1, 1);
    sim.work(2, 1);
    assert!(sim.c.node_standing(&liar).banned);
    // Without any time passing, the other three are queued again.
    assert_eq!(sim.work(1, 8) + sim.work(2, 8), 3);
    let recs = sim.records(job);
    assert!(recs.iter().all(|r| r.node != Some(liar)), "{recs:?}");
    assert!(
        recs[1].reasons.iter().any(|r| r.contains("was banned")),
        "{:?}",
        recs[1]
    );
}

/// Every execution of a task sees the original's identity: a job whose
/// output depends on its task id (as `env-probe`'s does, or any job that
/// seeds from it) is confirmed by every re-execution under `exact` with
/// every result checked.
#[test]
fn re_executions_see_the_original_task_identity() {
    let mut sim = Sim::with_tier(
        VerifyPolicy {
            secret: Some(secret(21)),
            ..VerifyPolicy::default()
        },
        &[Kind::HonestSeeded, Kind::HonestSeeded, Kind::HonestSeeded],
        21,
        "[verification]\nsampling = \"always\"\n",
    );
    let job = sim.submit("j", &inputs("seeded", 20));
    sim.settle();
    let stats = sim.c.pool_status(sim.now).expect("status").verification;
    assert_eq!(
        (
            stats.executed,
            stats.confirmed,
            stats.mismatches,
            stats.replaced
        ),
        (20, 20, 0, 0),
        "{stats:?}"
    );
    assert!(sim.caught().is_empty(), "{:?}", sim.caught());
    let recs = sim.records(job);
    assert!(
        recs.iter().all(|r| r.verification == "verified"),
        "{recs:?}"
    );
    // Twenty tasks, twenty identities; each named by two executions.
    let mut seen = std::collections::BTreeMap::<Vec<u8>, usize>::new();
    for r in &recs {
        let out = output_of(r);
        *seen.entry(out[out.len() - 32..].to_vec()).or_default() += 1;
    }
    assert_eq!(seen.len(), 20);
}

/// A receipt must name the identity the pool gave the task: one that names
/// another is refused, and the task goes to another node.
#[test]
fn a_receipt_naming_another_identity_is_refused() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(22)),
            ..VerifyPolicy::default()
        },
        &[Kind::Honest, Kind::Honest],
        22,
    );
    sim.submit("j", &inputs("named", 2));
    let key = sim.nodes[0].public();
    let (grants, _) = sim.c.handle_lease(sim.now, &key, 2, &[]).expect("lease");
    assert_eq!(grants.len(), 2);
    assert_ne!(grants[0].identity, grants[1].identity);
    let mut forged = grants[0].clone();
    forged.identity = grants[1].identity.clone();
    let wrong = sim.nodes[0].answer(&forged, sim.component);
    let right = sim.nodes[0].answer(&grants[1], sim.component);
    let verdicts = sim
        .c
        .handle_results(sim.now, &key, vec![wrong, right])
        .expect("results");
    match &verdicts[0].1 {
        Verdict::Refused(why) => assert!(why.contains("task identity"), "{why}"),
        v => panic!("a receipt naming another identity was {v:?}"),
    }
    assert_eq!(verdicts[1].1, Verdict::Accepted);
}

/// Nodes never see row ids: the tasks of one batch arrive under unordered
/// names, and a re-execution's name says nothing about when it was made.
#[test]
fn task_ids_on_the_wire_are_not_row_ids() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(23)),
            ..VerifyPolicy::default()
        },
        &[Kind::Honest],
        23,
    );
    sim.submit("j", &inputs("opaque", 8));
    let key = sim.nodes[0].public();
    let (grants, _) = sim.c.handle_lease(sim.now, &key, 8, &[]).expect("lease");
    let wire: Vec<u64> = grants.iter().map(|g| g.lease.task.0).collect();
    let rows: Vec<u64> = grants
        .iter()
        .map(|g| sim.c.task_of_wire(g.lease.task).0)
        .collect();
    assert_eq!(
        rows,
        (1..=4).collect::<Vec<u64>>(),
        "granted in order (a new node's allowance)"
    );
    assert!(wire.iter().zip(&rows).all(|(w, r)| w != r), "{wire:?}");
    assert!(
        !wire.windows(2).all(|w| w[0] < w[1]),
        "names in row order: {wire:?}"
    );
}

/// Under `exact`, a check runs only on a node with the engines the result's
/// receipt names: two engines whose honest bytes differ never meet, so
/// nobody is struck. A result whose engine no connected node has waits,
/// and pool status says why, until such a node connects.
#[test]
fn exact_checks_run_only_on_the_producers_engines() {
    let always = "[verification]\nsampling = \"always\"\n";
    let mut sim = Sim::with_tier(
        VerifyPolicy {
            secret: Some(secret(24)),
            ..VerifyPolicy::default()
        },
        &[
            Kind::Engine("tract-sim"),
            Kind::Engine("tract-sim"),
            Kind::Engine("ort-sim"),
        ],
        24,
        always,
    );
    let job = sim.submit("j", &inputs("engines", 24));
    sim.settle();
    let ort = sim.nodes[2].public();
    let status = sim.c.pool_status(sim.now).expect("status");
    let v = status.verification;
    assert_eq!((v.mismatches, v.replaced), (0, 0), "{v:?}");
    assert!(sim.caught().is_empty(), "{:?}", sim.caught());
    let recs = sim.records(job);
    let ort_results = recs.iter().filter(|r| r.node == Some(ort)).count();
    assert!(ort_results > 0, "the ort node took part");
    assert_eq!(v.pending as usize, ort_results, "its results' checks wait");
    assert_eq!(
        status.checks_waiting.len(),
        1,
        "{:?}",
        status.checks_waiting
    );
    assert!(
        status.checks_waiting[0].contains("engines: ort-sim"),
        "{:?}",
        status.checks_waiting
    );
    // A second node on that engine connects: the checks run and confirm.
    let second = SimNode::new(40, Kind::Engine("ort-sim"), 24);
    sim.c
        .handle_node_hello(sim.now, second.public(), second.caps())
        .expect("hello");
    sim.nodes.push(second);
    sim.settle();
    let status = sim.c.pool_status(sim.now).expect("status");
    let v = status.verification;
    assert_eq!(
        (v.pending, v.executed, v.confirmed, v.mismatches),
        (0, 24, 24, 0),
        "{v:?}"
    );
    assert!(status.checks_waiting.is_empty());
    assert!(sim.caught().is_empty());
    assert!(sim
        .records(job)
        .iter()
        .all(|r| r.verification == "verified"));
}

/// Under `tolerance` a check may cross engines (the tier is for engines
/// that differ in floating point).
#[test]
fn tolerance_checks_may_cross_engines() {
    let mut sim = Sim::with_tier(
        VerifyPolicy {
            secret: Some(secret(25)),
            ..VerifyPolicy::default()
        },
        &[Kind::Engine("tract-sim"), Kind::Engine("ort-sim")],
        25,
        "[determinism]\ntier = \"tolerance\"\nabs = \"1e-3\"\n\n[verification]\nsampling = \"always\"\n",
    );
    let job = sim.submit("j", &inputs("cross", 8));
    sim.settle();
    let status = sim.c.pool_status(sim.now).expect("status");
    // Every check ran on the other engine (the only other node): the bytes
    // differ, the numbers agree within the tier, every result confirms.
    let v = status.verification;
    assert_eq!(
        (v.pending, v.executed, v.confirmed, v.mismatches),
        (0, 8, 8, 0),
        "{v:?}"
    );
    let recs = sim.records(job);
    let outputs: std::collections::BTreeSet<Vec<u8>> = recs.iter().map(output_of).collect();
    assert!(recs.iter().all(|r| r.verification == "verified"));
    assert!(sim.caught().is_empty());
    // Two nodes: each check ran on the engine that did not produce the
    // result, and both engines ran something.
    let (a, b) = (sim.nodes[0].answered.len(), sim.nodes[1].answered.len());
    assert_eq!(a + b, 16, "8 results and 8 checks");
    assert!(a > 0 && b > 0, "{a} and {b}");
    assert_eq!(outputs.len(), 8);
}

/// Two or three colluding fresh keys that tell the same lie take every
/// check of an honest node's results while no trusted node is connected:
/// whether or not fresh keys may decide (`decide_after` 0 or the default),
/// the honest node is never struck and no result is replaced — the results
/// stay `checking` or end `disputed`. Once a trusted node connects it
/// decides: every result `verified`, the colluders struck, the honest node
/// still clean.
#[test]
fn colluding_fresh_keys_cannot_frame_an_honest_node() {
    for colluders in [2u8, 3] {
        for decide_after in [0, VerifyPolicy::default().decide_after] {
            let case = format!("{colluders} colluders, decide_after {decide_after}");
            let trusted_idx = colluders + 1;
            let mut kinds = vec![Kind::Honest];
            kinds.extend((0..colluders).map(|_| Kind::AlwaysWrong));
            let mut sim = Sim::new(
                VerifyPolicy {
                    secret: Some(secret(30 + u64::from(colluders))),
                    trusted: trust(&[trusted_idx]),
                    decide_after,
                    canary_rate: 0.0,
                    ..VerifyPolicy::default()
                },
                &kinds,
                30,
            );
            let job = sim.submit("j", &inputs("framed", 6));
            let victim = sim.nodes[0].public();
            while sim.work(0, 8) > 0 {}
            let honest: Vec<Vec<u8>> = sim.records(job).iter().map(output_of).collect();
            // The submitter challenges one of them too.
            let first = sim.records(job)[0].task;
            sim.c.handle_challenge(sim.now, first).expect("challenge");
            // The colluders take every check (and decide when they may).
            for _ in 0..50 {
                for i in 1..=usize::from(colluders) {
                    sim.work(i, 8);
                }
            }
            let st = sim.c.node_standing(&victim);
            assert_eq!((st.strikes, st.banned), (0, false), "{case}");
            assert!(sim.caught().is_empty(), "{case}: {:?}", sim.caught());
            for (r, h) in sim.records(job).iter().zip(&honest) {
                assert_eq!(&output_of(r), h, "{case}: a right result was replaced");
                assert!(
                    r.verification == "checking" || r.verification == "disputed",
                    "{case}: {r:?}"
                );
            }
            if decide_after == 0 {
                assert!(
                    sim.records(job)
                        .iter()
                        .all(|r| r.verification == "disputed"),
                    "{case}"
                );
            }
            // The challenge waits for the trusted node's decision.
            assert_eq!(
                sim.records(job)[0].challenge,
                Some(ChallengeState::Pending),
                "{case}"
            );
            // A trusted node connects and decides.
            let t = SimNode::new(10 + trusted_idx, Kind::Honest, 99);
            sim.c
                .handle_node_hello(sim.now, t.public(), t.caps())
                .expect("hello");
            sim.nodes.push(t);
            sim.settle();
            let st = sim.c.node_standing(&victim);
            assert_eq!((st.strikes, st.banned), (0, false), "{case}");
            for (r, h) in sim.records(job).iter().zip(&honest) {
                assert_eq!(&output_of(r), h, "{case}");
                assert_eq!(r.verification, "verified", "{case}: {r:?}");
            }
            assert_eq!(
                sim.records(job)[0].challenge,
                Some(ChallengeState::Rejected),
                "{case}"
            );
            let caught: std::collections::BTreeSet<PublicKey> =
                sim.caught().into_iter().map(|(k, _)| k).collect();
            assert!(!caught.contains(&victim), "{case}");
            assert!(
                !caught.is_empty(),
                "{case}: the colluders that checked are struck"
            );
            assert!(
                caught.iter().all(|k| sim.nodes[1..=usize::from(colluders)]
                    .iter()
                    .any(|n| n.public() == *k)),
                "{case}: only colluders struck"
            );
        }
    }
}

/// The pool chooses who checks, not whoever asks first: three colluding
/// fresh keys that tell the same lie and always ask before two trusted
/// honest nodes never get each other's results to check, so none of their
/// lies is confirmed — every one is replaced by the honest answer. (Under
/// first come, the colluders took each other's checks and confirmed.)
#[test]
fn colluders_do_not_get_to_check_each_other() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(33)),
            trusted: trust(&[3, 4]),
            canary_rate: 0.0,
            ..VerifyPolicy::default()
        },
        &[
            Kind::AlwaysWrong,
            Kind::AlwaysWrong,
            Kind::AlwaysWrong,
            Kind::Honest,
            Kind::Honest,
        ],
        33,
    );
    let ins = inputs("chosen", 12);
    let job = sim.submit("j", &ins);
    // The colluders take the first results.
    for i in 0..3 {
        sim.work(i, 4);
    }
    sim.settle();
    let recs = sim.records(job);
    for (r, input) in recs.iter().zip(&ins) {
        assert_eq!(output_of(r), honest_output(input), "{r:?}");
        assert!(
            r.verification == "replaced" || r.verification == "verified",
            "{r:?}"
        );
    }
    assert!(recs.iter().any(|r| r.verification == "replaced"));
    let honest = [sim.nodes[3].public(), sim.nodes[4].public()];
    assert!(sim.caught().iter().all(|(k, _)| !honest.contains(k)));
}

/// A confirmation is only as good as the node that gave it. Two colluding
/// fresh keys, alone in the pool: one (A) produces, the other (B) checks
/// and confirms the same lie, so A's results read `verified`. Later B is
/// caught (checking an honest node's results, decided by a trusted node)
/// while A is never checked by anyone else: the results B confirmed are
/// re-checked when B is struck, found wrong, and replaced, and A is struck
/// too. (Before, A's lies stood `verified` for good.)
#[test]
fn results_confirmed_by_a_struck_checker_are_rechecked() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(34)),
            trusted: trust(&[3]),
            canary_rate: 0.0,
            ..VerifyPolicy::default()
        },
        &[Kind::AlwaysWrong, Kind::AlwaysWrong],
        34,
    );
    let ins = inputs("confirmed", 6);
    let job = sim.submit("j", &ins);
    while sim.work(0, 8) > 0 {}
    for _ in 0..20 {
        sim.work(1, 8);
    }
    let recs = sim.records(job);
    assert!(
        recs.iter().all(|r| r.verification == "verified"),
        "the colluders confirm each other while nobody else is about: {recs:?}"
    );
    // A leaves. An honest node joins and works; B checks its results and
    // lies; a trusted node joins and decides against B.
    let (a, b) = (sim.nodes[0].public(), sim.nodes[1].public());
    sim.c.handle_node_gone(sim.now, &a);
    let join = |sim: &mut Sim, seed: u8| {
        let n = SimNode::new(seed, Kind::Honest, u64::from(seed));
        sim.c
            .handle_node_hello(sim.now, n.public(), n.caps())
            .expect("hello");
        sim.nodes.push(n);
    };
    join(&mut sim, 12);
    let other = sim.submit("k", &inputs("honest", 6));
    while sim.work(2, 8) > 0 {}
    for _ in 0..20 {
        sim.work(1, 8);
    }
    join(&mut sim, 13);
    let b_caught = |sim: &Sim| sim.caught().iter().any(|(k, _)| *k == b);
    for _ in 0..50 {
        for i in 1..4 {
            if !b_caught(&sim) {
                sim.work(i, 8);
            }
        }
    }
    assert!(b_caught(&sim), "B is struck: {:?}", sim.caught());
    assert!(
        !sim.caught().iter().any(|(k, _)| *k == a),
        "A has not been checked by anyone else yet"
    );
    // Struck, B's confirmations no longer stand: A's results are
    // re-checked and not served from the cache meanwhile.
    for r in sim.records(job) {
        assert_ne!(r.verification, "verified", "{r:?}");
    }
    // A comes back; everyone works (A is excluded from checks of its own
    // results).
    sim.c
        .handle_node_hello(sim.now, a, sim.nodes[0].caps())
        .expect("hello");
    sim.settle();
    let recs = sim.records(job);
    for (r, i) in recs.iter().zip(&ins) {
        assert_eq!(
            output_of(r),
            honest_output(i),
            "a confirmed lie stands: {r:?}"
        );
        assert_eq!(r.verification, "replaced", "{r:?}");
    }
    assert!(sim.caught().iter().any(|(k, _)| *k == a), "A is struck");
    // The honest node's results stand, checked by the trusted node.
    for r in sim.records(other) {
        assert_eq!(r.verification, "verified", "{r:?}");
    }
}

/// A result never checked is credited only once its bundle's challenge
/// window has closed with no challenge pending.
#[test]
fn unchecked_results_are_credited_when_the_challenge_window_closes() {
    let mut sim = Sim::with_tier(
        VerifyPolicy {
            secret: Some(secret(34)),
            canary_rate: 0.0,
            ..VerifyPolicy::default()
        },
        &[Kind::Honest],
        34,
        "[verification]\nsampling = \"none\"\nchallenge_window_secs = 100\n",
    );
    let job = sim.submit("j", &inputs("window", 5));
    sim.settle();
    let node = sim.nodes[0].public();
    let at = |sim: &mut Sim, now: u64| {
        sim.c.credits(0, NOW_UNIX + 1000, now).expect("credits")[&node].clone()
    };
    let open = at(&mut sim, NOW_UNIX + 10);
    assert_eq!(
        (open.results, open.credited, open.pending),
        (5, 0, 5),
        "{open:?}"
    );
    let closed = at(&mut sim, NOW_UNIX + 200);
    assert_eq!(
        (closed.results, closed.credited, closed.pending),
        (5, 5, 0),
        "{closed:?}"
    );
    // A challenge made in the window holds its result back until decided.
    let first = sim.records(job)[0].task;
    sim.c.handle_challenge(sim.now, first).expect("challenge");
    let held = at(&mut sim, NOW_UNIX + 200);
    assert_eq!((held.credited, held.pending), (4, 1), "{held:?}");
    // Nothing was stored in another period.
    let later = sim
        .c
        .credits(NOW_UNIX + 1000, NOW_UNIX + 2000, NOW_UNIX + 3000)
        .expect("credits");
    assert!(later.is_empty(), "{later:?}");
}

/// The ledger's signed pages, fetched a few rows at a time, hold every
/// result once, in the states `credits` counts, and the liar's replaced
/// results as withdrawn; a node reads only its own rows; bad periods and
/// times are refused with what is wrong.
#[test]
fn ledger_pages_chain_agree_with_credits_and_stay_private() {
    let admin = SecretKey::from_seed(KeyRole::Client, &[77; 32]);
    let pool_key = SecretKey::from_seed(KeyRole::Pool, &[78; 32]);
    let mut cfg = config(VerifyPolicy {
        secret: Some(secret(35)),
        trusted: trust(&[1, 2]),
        canary_rate: 0.0,
        ..VerifyPolicy::default()
    });
    cfg.admins.insert(admin.public());
    let mut c = Coordinator::new(SqliteStore::in_memory().expect("db"), cfg, &|_| true)
        .expect("coordinator");
    c.set_signer(pool_key.clone());
    let mut sim = Sim::on(
        c,
        &[Kind::WrongP(0.5), Kind::Honest, Kind::Honest],
        35,
        "[verification]\nsampling = \"always\"\n",
    );
    sim.submit("j", &inputs("ledger", 24));
    sim.settle();
    let query = |node| LedgerQuery {
        since: 0,
        until: NOW_UNIX + 1000,
        node,
    };
    let fetch = |sim: &mut Sim, who: &PublicKey, q: LedgerQuery| {
        let mut pages = Vec::new();
        let (mut as_of, mut after) = (None, None);
        loop {
            let p = sim
                .c
                .ledger_page(who, NOW_UNIX + 5, q.clone(), as_of, after, 5)
                .expect("page");
            let opened = p.open(&pool_key.public(), pages.len() + 1).expect("open");
            assert!(opened.rows.len() <= 5);
            as_of = Some(opened.as_of);
            after = opened.next;
            pages.push(p);
            if after.is_none() {
                return pages;
            }
        }
    };
    let pages = fetch(&mut sim, &admin.public(), query(None));
    assert!(pages.len() > 3, "{} pages", pages.len());
    let checked = check_pages(&pool_key.public(), &pages).expect("checks out");
    let credits = sim
        .c
        .credits(0, NOW_UNIX + 1000, NOW_UNIX + 5)
        .expect("credits");
    for (node, t) in &checked.totals {
        let c = credits.get(node).cloned().unwrap_or_default();
        assert_eq!(
            (t.credited, t.pending, t.disputed, t.withdrawn),
            (c.credited, c.pending, c.disputed, c.withdrawn),
            "{node}"
        );
    }
    let liar = sim.nodes[0].public();
    assert!(checked.totals[&liar].withdrawn > 0, "{:?}", checked.totals);
    let standing = checked
        .rows
        .iter()
        .filter(|r| r.state != RowState::Withdrawn)
        .count();
    assert_eq!(standing, 24);

    // A node reads its own rows, the same ones.
    let mine = fetch(&mut sim, &liar, query(Some(liar)));
    let own = check_pages(&pool_key.public(), &mine).expect("own");
    assert_eq!(own.totals.get(&liar), checked.totals.get(&liar));
    assert_eq!(own.totals.len(), 1);

    // Refusals say what is wrong.
    let refused = |sim: &mut Sim, who: &PublicKey, q: LedgerQuery, as_of| {
        sim.c
            .ledger_page(who, NOW_UNIX + 5, q, as_of, None, 5)
            .expect_err("refused")
    };
    let e = refused(&mut sim, &liar, query(None), None);
    assert_eq!(e.code, ErrorCode::Forbidden, "{e:?}");
    let other = sim.nodes[1].public();
    let e = refused(&mut sim, &liar, query(Some(other)), None);
    assert_eq!(e.code, ErrorCode::Forbidden, "{e:?}");
    let e = refused(
        &mut sim,
        &admin.public(),
        LedgerQuery {
            since: 10,
            until: 10,
            node: None,
        },
        None,
    );
    assert!(e.message.contains("the period is empty"), "{e:?}");
    let e = refused(&mut sim, &admin.public(), query(None), Some(NOW_UNIX + 60));
    assert!(e.message.contains("in the future"), "{e:?}");
}

/// Decoys catch a lazy `llm` verifier (one that returns the claimed tokens
/// without running its model) at the rate the model gives: with decoy rate
/// d per check, it is still uncaught after n checks with chance (1 − d)^n.
/// An honest verifier that answers the same decoys is never struck, and
/// the results the lazy one "confirmed" were all right anyway here (the
/// producer is honest): what decoys measure is the verifier alone.
#[test]
fn decoys_catch_a_lazy_llm_verifier_at_the_modelled_rate() {
    let runs: u64 = std::env::var("TIDEPOOL_DECOY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut table = String::from(
        "| decoy rate d | runs | mean checks to catch (measured) | 1/d (model) | caught within n₉₅ = ln 0.05 / ln(1 − d) | model |\n|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    for (k, d) in [0.05f64, 0.1, 0.2].into_iter().enumerate() {
        let mut ns = Vec::new();
        for run in 0..runs {
            let seed = 5000 + 1000 * k as u64 + run;
            let mut sim = Sim::with_tier(
                VerifyPolicy {
                    secret: Some(secret(seed)),
                    canary_rate: 0.0,
                    decoy_rate: d,
                    trusted: trust(&[0]),
                    ..VerifyPolicy::default()
                },
                &[Kind::LlmHonest, Kind::LazyVerifier, Kind::LlmHonest],
                seed,
                "[determinism]\ntier = \"llm\"\n\n[verification]\nsampling = \"always\"\n",
            );
            let lazy = sim.nodes[1].public();
            let honest_verifier = sim.nodes[2].public();
            let mut caught_after = None;
            for step in 0..4000 {
                // The producer takes new work; the verifiers take the checks.
                if sim.work(0, 4) == 0 {
                    sim.submit(
                        &format!("j{step}"),
                        &inputs(&format!("decoy {seed} {step}"), 20),
                    );
                    sim.work(0, 4);
                }
                sim.work(1, 1);
                sim.work(2, 1);
                if sim.caught().iter().any(|(n, _)| *n == lazy) {
                    caught_after = Some(sim.nodes[1].checks_answered);
                    break;
                }
            }
            assert!(
                !sim.caught()
                    .iter()
                    .any(|(n, _)| *n == honest_verifier || *n == sim.nodes[0].public()),
                "an honest node struck (d = {d}, run {run})"
            );
            ns.push(caught_after.unwrap_or_else(|| panic!("d = {d}: not caught in run {run}")));
        }
        let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64;
        let n95 = (0.05f64.ln() / (1.0 - d).ln()).ceil() as u64;
        let within = ns.iter().filter(|&&n| n <= n95).count() as f64 / ns.len() as f64;
        table.push_str(&format!(
            "| {d} | {runs} | {mean:.1} | {:.1} | {:.0}% (n₉₅ = {n95}) | 95% |\n",
            1.0 / d,
            within * 100.0
        ));
        // A loose band: 60 runs put the share within n₉₅ at 95% ± ~6%.
        if within < 0.85 {
            failures.push(format!("d = {d}: {within:.2} caught within {n95} checks"));
        }
    }
    println!("{table}");
    assert!(failures.is_empty(), "{failures:?}\n{table}");
}

/// A bundle may pin a model to an engine: its tasks go only to nodes that
/// run it, and a receipt that says another engine ran it is refused.
#[test]
fn a_pinned_engine_gets_only_its_own_nodes() {
    let mut sim = Sim::new(
        VerifyPolicy {
            secret: Some(secret(36)),
            canary_rate: 0.0,
            ..VerifyPolicy::default()
        },
        &[Kind::Engine("tract-sim 1"), Kind::Engine("ort-sim 2")],
        36,
    );
    let publisher = sim.publisher.clone();
    let (pinned, _) = sim
        .c
        .handle_publish(
            NOW_UNIX,
            bundle::signed_with_model(
                &publisher,
                "pinned",
                "[verification]\nsampling = \"none\"\n",
                "engine = \"ort-sim\"\n",
                NOW_UNIX,
            ),
            &|_| true,
        )
        .expect("publish");
    sim.c
        .handle_submit(NOW_UNIX, &submitter(), &pinned, "pinned", &inputs("pin", 4))
        .expect("submit");
    // The tract node gets nothing of it, and is told why in the job's status.
    let tract = sim.nodes[0].public();
    let (grants, _) = sim.c.handle_lease(sim.now, &tract, 8, &[]).expect("lease");
    assert!(grants.is_empty(), "{grants:?}");
    let manifest = sim.c.manifest(&pinned).expect("published").clone();
    let locked: tidepool_proto::manifest::LockedManifest =
        rmp_serde::from_slice(&manifest.manifest).expect("locked");
    let why = tidepool_pool::coordinator::cannot_run(&sim.nodes[0].caps(), &locked)
        .expect("unfit")
        .to_string();
    assert_eq!(why, "does not run ort-sim, which model m is pinned to");
    // The ort node runs it; a receipt naming another engine is refused.
    let ort = sim.nodes[1].public();
    let (grants, _) = sim.c.handle_lease(sim.now, &ort, 8, &[]).expect("lease");
    assert_eq!(grants.len(), 4);
    let component = bundle::component().sha256;
    let key = sim.nodes[1].key.clone();
    let liar = fake_node::answer_on(
        &key,
        &grants[0],
        component,
        b"x".to_vec(),
        "sim",
        Some("tract-sim 1"),
    );
    let rest: Vec<TaskResult> = grants[1..]
        .iter()
        .map(|g| sim.nodes[1].answer(g, component))
        .collect();
    let mut results = vec![liar];
    results.extend(rest);
    let verdicts = sim
        .c
        .handle_results(sim.now, &ort, results)
        .expect("results");
    match &verdicts[0].1 {
        Verdict::Refused(why) => assert!(why.contains("pins it to"), "{why}"),
        v => panic!("a receipt from another engine was {v:?}"),
    }
    assert!(
        verdicts[1..].iter().all(|(_, v)| *v == Verdict::Accepted),
        "{verdicts:?}"
    );
}
