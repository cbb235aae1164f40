//! The settlement ledger: what each node earned in a period, as rows the
//! pool signs page by page. Every row carries the node's own signed
//! receipt, so a statement can be checked offline by anyone holding the
//! pool's public key: the pool's signature on every page, the node's on
//! every receipt, the pages' chain from first to last, and the totals.
//!
//! The pool builds [`LedgerPage`]s from its store; the CLI assembles them
//! into a [`StatementFile`] and checks one with [`StatementFile::verify`].
//! This module never does I/O.

use crate::keys::{PublicKey, SecretKey, Signature, LEDGER_TAG};
use crate::receipt::{Metering, SignedReceipt};
use crate::wire::JobId;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most rows a page holds (a request asks for at most this many).
pub const MAX_PAGE_ROWS: u32 = 256;
/// Most receipt bytes a page holds; a page stops early rather than pass it
/// (receipts are bounded at intake, so one always fits).
pub const MAX_PAGE_RECEIPT_BYTES: usize = 4 * 1024 * 1024;
/// The file format's name and version, first field of a statement file.
pub const STATEMENT_FORMAT: &str = "tidepool-ledger/1";

/// How a result counts for its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RowState {
    /// May be paid for: confirmed by an independent execution, or never
    /// checked and its challenge window closed unchallenged.
    Credited,
    /// Being checked, challenged, or inside its challenge window.
    Pending,
    /// Executions disagree and no trusted node has decided yet.
    Disputed,
    /// Replaced as wrong: earns nothing; the receipt is the evidence.
    Withdrawn,
}

impl RowState {
    /// The state's name as files print it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Credited => "credited",
            Self::Pending => "pending",
            Self::Disputed => "disputed",
            Self::Withdrawn => "withdrawn",
        }
    }
}

/// One result in a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRow {
    /// The node that ran it (the receipt's signer).
    pub node: PublicKey,
    /// The job it belongs to.
    pub job: JobId,
    /// Its input's index in the job.
    pub index: u32,
    /// How it counts.
    pub state: RowState,
    /// When it was accepted (Unix seconds); for a withdrawn row, when it
    /// was replaced.
    pub at: u64,
    /// The node's signed receipt for it.
    pub receipt: SignedReceipt,
}

/// Where a page ends, so the next one starts after it. Results come first
/// (by acceptance time, then task), withdrawn results after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerCursor {
    /// After this accepted result.
    Result {
        /// Its acceptance time.
        at: u64,
        /// Its task row.
        task: u64,
    },
    /// After this withdrawn result (its evidence record).
    Withdrawn {
        /// The evidence record.
        id: u64,
    },
}

/// Which results a statement covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerQuery {
    /// From (Unix seconds, inclusive).
    pub since: u64,
    /// Until (Unix seconds, exclusive).
    pub until: u64,
    /// Only this node's results (`None`: every node's; pool admins only).
    pub node: Option<PublicKey>,
}

/// One page of a statement, as the pool signs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerPage {
    /// The pool that signed it.
    pub pool: PublicKey,
    /// What the statement covers (the same on every page).
    pub query: LedgerQuery,
    /// The time the states are judged at (challenge windows closed before
    /// it); fixed by the first page, the same on every page.
    pub as_of: u64,
    /// Where this page starts (`None`: the first page).
    pub after: Option<LedgerCursor>,
    /// Its rows.
    pub rows: Vec<LedgerRow>,
    /// Where the next page starts (`None`: this is the last).
    pub next: Option<LedgerCursor>,
}

/// A page and the pool's signature over [`LEDGER_TAG`] and its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPage {
    /// MessagePack of the [`LedgerPage`].
    #[serde(with = "crate::manifest::bytes_field")]
    pub body: Vec<u8>,
    /// The pool's signature.
    pub signature: Signature,
}

/// Why a statement does not check out. Each says what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// Not a statement file.
    #[error("not a tidepool ledger statement: {0}")]
    Malformed(String),
    /// A page's signature is not the pool's.
    #[error("page {page}: the pool's signature does not verify")]
    BadSignature {
        /// Page number (from 1).
        page: usize,
    },
    /// Pages do not form one statement.
    #[error("page {page}: {why}")]
    Chain {
        /// Page number (from 1).
        page: usize,
        /// What is wrong.
        why: String,
    },
    /// A row's receipt does not check out.
    #[error("row {row} (job {job}, input {index}): {why}")]
    Row {
        /// Row number (from 1).
        row: usize,
        /// Its job.
        job: JobId,
        /// Its input index.
        index: u32,
        /// What is wrong.
        why: String,
    },
    /// The readable part of the file says something the signed pages do not.
    #[error("{0}")]
    Differs(String),
}

impl LedgerPage {
    /// Serialise and sign with the pool's key.
    pub fn sign(&self, key: &SecretKey) -> SignedPage {
        // Plain data serialises to a Vec without fail.
        let body = rmp_serde::to_vec_named(self).expect("ledger page serialises");
        SignedPage {
            signature: key.sign(LEDGER_TAG, &body),
            body,
        }
    }
}

impl SignedPage {
    /// Check the pool's signature and decode.
    pub fn open(&self, pool: &PublicKey, page: usize) -> Result<LedgerPage, LedgerError> {
        pool.verify(LEDGER_TAG, &self.body, &self.signature)
            .map_err(|_| LedgerError::BadSignature { page })?;
        let p: LedgerPage = rmp_serde::from_slice(&self.body)
            .map_err(|e| LedgerError::Malformed(format!("page {page}: {e}")))?;
        if p.pool != *pool {
            return Err(LedgerError::Chain {
                page,
                why: format!("names pool {}, the statement's is {pool}", p.pool),
            });
        }
        Ok(p)
    }
}

/// One node's totals in a statement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTotals {
    /// Results that may be paid for.
    pub credited: u64,
    /// Results still being checked or inside their challenge window.
    pub pending: u64,
    /// Results executions disagree on with no trusted decision.
    pub disputed: u64,
    /// Results replaced as wrong (each one a strike).
    pub withdrawn: u64,
    /// What the credited results used, from their receipts.
    pub metering: Metering,
}

fn add(m: &mut Metering, r: &Metering) {
    m.bytes_in = m.bytes_in.saturating_add(r.bytes_in);
    m.bytes_out = m.bytes_out.saturating_add(r.bytes_out);
    m.computes = m.computes.saturating_add(r.computes);
    m.compute_us = m.compute_us.saturating_add(r.compute_us);
    m.tensor_bytes_in = m.tensor_bytes_in.saturating_add(r.tensor_bytes_in);
    m.tensor_bytes_out = m.tensor_bytes_out.saturating_add(r.tensor_bytes_out);
    m.tokens_in = m.tokens_in.saturating_add(r.tokens_in);
    m.tokens_out = m.tokens_out.saturating_add(r.tokens_out);
}

/// A row as a statement file shows it, for people and spreadsheets; the
/// signed pages are what counts, and [`StatementFile::verify`] holds these
/// to them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowView {
    /// The node.
    pub node: PublicKey,
    /// The job.
    pub job: u64,
    /// Input index.
    pub index: u32,
    /// `credited`, `pending`, `disputed` or `withdrawn`.
    pub state: RowState,
    /// Accepted (or replaced) at, Unix seconds.
    pub at: u64,
    /// The task identity the receipt names.
    pub task: String,
    /// Digest of the output the receipt commits to.
    pub output: String,
    /// What the task used, from the receipt.
    pub metering: Metering,
}

/// A signed page as a file holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageText {
    /// Base64 of the page's MessagePack.
    pub body: String,
    /// Base64 of the pool's signature.
    pub signature: String,
}

/// A statement as written to a file (`tidepool pool ledger export
/// --json`, `tidepool node statement`): the signed pages, and the rows and
/// totals they make, readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementFile {
    /// [`STATEMENT_FORMAT`].
    pub format: String,
    /// The pool that signed it.
    pub pool: PublicKey,
    /// From (Unix seconds, inclusive).
    pub since: u64,
    /// Until (Unix seconds, exclusive).
    pub until: u64,
    /// Only this node's results, if set.
    pub node: Option<PublicKey>,
    /// When the states were judged.
    pub as_of: u64,
    /// Per node.
    pub totals: BTreeMap<PublicKey, NodeTotals>,
    /// Every row, readable.
    pub rows: Vec<RowView>,
    /// The pool's signed pages, in order.
    pub pages: Vec<PageText>,
}

/// What a statement proves once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Its rows, from the signed pages.
    pub rows: Vec<LedgerRow>,
    /// Its totals, recomputed from the rows.
    pub totals: BTreeMap<PublicKey, NodeTotals>,
}

/// Check pages signed by `pool`: signatures, one query and time, a chain
/// from the first page to the last, every receipt signed by its row's node,
/// and no result twice. Returns the rows and their totals.
pub fn check_pages(pool: &PublicKey, pages: &[SignedPage]) -> Result<Checked, LedgerError> {
    let mut rows = Vec::new();
    let mut first: Option<(LedgerQuery, u64)> = None;
    let mut expect_after: Option<LedgerCursor> = None;
    let mut ended = false;
    for (i, signed) in pages.iter().enumerate() {
        let n = i + 1;
        let chain = |why: String| LedgerError::Chain { page: n, why };
        if ended {
            return Err(chain("comes after the last page".into()));
        }
        let p = signed.open(pool, n)?;
        match &first {
            None => first = Some((p.query.clone(), p.as_of)),
            Some((q, as_of)) => {
                if *q != p.query || *as_of != p.as_of {
                    return Err(chain("covers another period, node or time".into()));
                }
            }
        }
        if p.after != expect_after {
            return Err(chain(format!(
                "starts after {:?}, the previous page ended at {expect_after:?}",
                p.after
            )));
        }
        expect_after = p.next;
        ended = p.next.is_none();
        rows.extend(p.rows);
    }
    if !ended {
        return Err(LedgerError::Chain {
            page: pages.len(),
            why: "the statement stops before its last page".into(),
        });
    }
    let (query, _) = first.ok_or_else(|| LedgerError::Malformed("no pages".into()))?;
    let mut totals: BTreeMap<PublicKey, NodeTotals> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut cache = crate::receipt::VerifiedRoots::default();
    for (i, r) in rows.iter().enumerate() {
        let bad = |why: String| LedgerError::Row {
            row: i + 1,
            job: r.job,
            index: r.index,
            why,
        };
        let lr = r
            .receipt
            .open_cached(&r.node, &mut cache)
            .map_err(|e| bad(e.to_string()))?;
        if let Some(only) = &query.node {
            if r.node != *only {
                return Err(bad(format!("is {}'s, the statement is {only}'s", r.node)));
            }
        }
        // A withdrawn row's time is when it was replaced, within the
        // period like every other row's.
        if r.at < query.since || r.at >= query.until {
            return Err(bad(format!(
                "at {} is outside {}..{}",
                r.at, query.since, query.until
            )));
        }
        if r.state != RowState::Withdrawn && !seen.insert((r.job, r.index, lr.lease.attempt)) {
            return Err(bad("the same result appears twice".into()));
        }
        let t = totals.entry(r.node).or_default();
        match r.state {
            RowState::Credited => {
                t.credited += 1;
                add(&mut t.metering, &lr.receipt.metering);
            }
            RowState::Pending => t.pending += 1,
            RowState::Disputed => t.disputed += 1,
            RowState::Withdrawn => t.withdrawn += 1,
        }
    }
    Ok(Checked { rows, totals })
}

fn view(r: &LedgerRow) -> Result<RowView, LedgerError> {
    // Rows reach here from checked pages or from the pool's store, whose
    // receipts were opened at intake; a body that does not decode is malformed.
    let lr: crate::receipt::LeaseReceipt = rmp_serde::from_slice(&r.receipt.body).map_err(|e| {
        LedgerError::Malformed(format!("receipt of job {} input {}: {e}", r.job, r.index))
    })?;
    Ok(RowView {
        node: r.node,
        job: r.job.0,
        index: r.index,
        state: r.state,
        at: r.at,
        task: lr.receipt.task_id,
        output: lr.receipt.output.to_string(),
        metering: lr.receipt.metering,
    })
}

impl StatementFile {
    /// The file for pages signed by `pool`, checked as
    /// [`verify`](Self::verify) would.
    pub fn from_pages(pool: &PublicKey, pages: &[SignedPage]) -> Result<Self, LedgerError> {
        let checked = check_pages(pool, pages)?;
        let first = pages
            .first()
            .ok_or_else(|| LedgerError::Malformed("no pages".into()))?
            .open(pool, 1)?;
        Ok(Self {
            format: STATEMENT_FORMAT.into(),
            pool: *pool,
            since: first.query.since,
            until: first.query.until,
            node: first.query.node,
            as_of: first.as_of,
            rows: checked.rows.iter().map(view).collect::<Result<_, _>>()?,
            totals: checked.totals,
            pages: pages
                .iter()
                .map(|p| PageText {
                    body: STANDARD.encode(&p.body),
                    signature: STANDARD.encode(p.signature.0),
                })
                .collect(),
        })
    }

    /// Check the file: the pool's signature on every page, every receipt,
    /// the chain, and that the readable header, rows and totals say what
    /// the signed pages say. `pool`, if given, must be the file's pool.
    pub fn verify(&self, pool: Option<&PublicKey>) -> Result<Checked, LedgerError> {
        if self.format != STATEMENT_FORMAT {
            return Err(LedgerError::Malformed(format!(
                "format {:?}, expected {STATEMENT_FORMAT:?}",
                self.format
            )));
        }
        if let Some(p) = pool {
            if *p != self.pool {
                return Err(LedgerError::Differs(format!(
                    "the file is signed as pool {}, not {p}",
                    self.pool
                )));
            }
        }
        let mut pages = Vec::with_capacity(self.pages.len());
        for (i, t) in self.pages.iter().enumerate() {
            let bad = |what: &str, e: base64::DecodeError| {
                LedgerError::Malformed(format!("page {}: {what} is not base64: {e}", i + 1))
            };
            let body = STANDARD.decode(&t.body).map_err(|e| bad("body", e))?;
            let sig = STANDARD
                .decode(&t.signature)
                .map_err(|e| bad("signature", e))?;
            let sig: [u8; 64] = sig.try_into().map_err(|_| {
                LedgerError::Malformed(format!("page {}: signature is not 64 bytes", i + 1))
            })?;
            pages.push(SignedPage {
                body,
                signature: Signature(sig),
            });
        }
        let checked = check_pages(&self.pool, &pages)?;
        let first = pages[0].open(&self.pool, 1)?;
        let header = (
            first.query.since,
            first.query.until,
            first.query.node,
            first.as_of,
        );
        if header != (self.since, self.until, self.node, self.as_of) {
            return Err(LedgerError::Differs(
                "the header's period, node or time is not the signed pages'".into(),
            ));
        }
        if self.rows.len() != checked.rows.len() {
            return Err(LedgerError::Differs(format!(
                "the file lists {} rows, the signed pages hold {}",
                self.rows.len(),
                checked.rows.len()
            )));
        }
        for (i, (shown, signed)) in self.rows.iter().zip(&checked.rows).enumerate() {
            if *shown != view(signed)? {
                return Err(LedgerError::Differs(format!(
                    "row {} (job {}, input {}) is not what the pool signed",
                    i + 1,
                    shown.job,
                    shown.index
                )));
            }
        }
        for (node, t) in &checked.totals {
            if self.totals.get(node) != Some(t) {
                return Err(LedgerError::Differs(format!(
                    "the totals for node {node} do not add up from its rows"
                )));
            }
        }
        if let Some(extra) = self.totals.keys().find(|k| !checked.totals.contains_key(k)) {
            return Err(LedgerError::Differs(format!(
                "totals name node {extra}, which has no rows"
            )));
        }
        Ok(checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyRole;
    use crate::receipt::{LeaseReceipt, Receipt};
    use crate::wire::{LeaseId, TaskId};
    use crate::Digest;

    fn row(node: &SecretKey, task: u64, state: RowState, out: &[u8]) -> LedgerRow {
        let lr = LeaseReceipt {
            lease: LeaseId {
                task: TaskId(task),
                attempt: 1,
            },
            bundle: Digest::of(b"b"),
            receipt: Receipt::plain(format!("t{task}"), Digest::of(b"c"), b"in", out, "t"),
        };
        LedgerRow {
            node: node.public(),
            job: JobId(1),
            index: task as u32,
            state,
            at: 100 + task,
            receipt: lr.sign(node),
        }
    }

    fn pages(pool: &SecretKey, rows: Vec<LedgerRow>, per: usize) -> Vec<SignedPage> {
        let chunks: Vec<Vec<LedgerRow>> = rows.chunks(per).map(<[_]>::to_vec).collect();
        let n = chunks.len();
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, rows)| LedgerPage {
                pool: pool.public(),
                query: LedgerQuery {
                    since: 0,
                    until: 1000,
                    node: None,
                },
                as_of: 2000,
                after: (i > 0).then_some(LedgerCursor::Withdrawn { id: i as u64 }),
                next: (i + 1 < n).then_some(LedgerCursor::Withdrawn { id: i as u64 + 1 }),
                rows,
            })
            .map(|p| p.sign(pool))
            .collect()
    }

    #[test]
    fn a_statement_checks_out_and_any_change_is_caught() {
        let pool = SecretKey::from_seed(KeyRole::Pool, &[1; 32]);
        let a = SecretKey::from_seed(KeyRole::Node, &[2; 32]);
        let b = SecretKey::from_seed(KeyRole::Node, &[3; 32]);
        let rows = vec![
            row(&a, 1, RowState::Credited, b"xy"),
            row(&a, 2, RowState::Credited, b"xyz"),
            row(&b, 3, RowState::Pending, b"x"),
            row(&b, 4, RowState::Withdrawn, b"lie"),
        ];
        let file = StatementFile::from_pages(&pool.public(), &pages(&pool, rows, 3)).expect("file");
        let ok = file.verify(Some(&pool.public())).expect("verifies");
        assert_eq!(ok.totals[&a.public()].credited, 2);
        assert_eq!(ok.totals[&a.public()].metering.bytes_out, 5);
        assert_eq!(ok.totals[&b.public()].withdrawn, 1);
        assert_eq!(ok.totals[&b.public()].credited, 0);

        // Through JSON and back, unchanged.
        let text = serde_json::to_string(&file).expect("json");
        let back: StatementFile = serde_json::from_str(&text).expect("parse");
        assert!(back.verify(None).is_ok());

        let mut shown = file.clone();
        shown.rows[3].state = RowState::Credited;
        let e = shown.verify(None).expect_err("edited row");
        assert!(e.to_string().contains("row 4"), "{e}");

        let mut total = file.clone();
        total.totals.get_mut(&b.public()).expect("b").credited = 1;
        assert!(total.verify(None).is_err());

        let mut body = file.clone();
        let mut raw = STANDARD.decode(&body.pages[1].body).expect("b64");
        raw[20] ^= 1;
        body.pages[1].body = STANDARD.encode(raw);
        assert_eq!(
            body.verify(None).expect_err("tampered page"),
            LedgerError::BadSignature { page: 2 }
        );

        let mut cut = file.clone();
        cut.pages.pop();
        assert!(matches!(cut.verify(None), Err(LedgerError::Chain { .. })));

        let other = SecretKey::from_seed(KeyRole::Pool, &[9; 32]);
        assert!(file.verify(Some(&other.public())).is_err());
    }

    #[test]
    fn a_row_whose_receipt_another_key_signed_is_refused() {
        let pool = SecretKey::from_seed(KeyRole::Pool, &[1; 32]);
        let a = SecretKey::from_seed(KeyRole::Node, &[2; 32]);
        let b = SecretKey::from_seed(KeyRole::Node, &[3; 32]);
        let mut r = row(&a, 1, RowState::Credited, b"x");
        r.node = b.public(); // credited to b, signed by a
        let e = check_pages(&pool.public(), &pages(&pool, vec![r], 8)).expect_err("refused");
        assert!(matches!(e, LedgerError::Row { row: 1, .. }), "{e}");
    }
}
