//! Pages of the settlement ledger: a node's (or, for the pool's admins,
//! every node's) results of user jobs in a period, each with its state for
//! payment and the node's signed receipt, signed by the pool's key. States
//! follow [`credits`](Coordinator::credits), judged at the statement's
//! `as_of` time (fixed by its first page). Reads the store only; changes
//! nothing.

use super::{refusal, Coordinator};
use crate::store::{Store, Verified};
use tidepool_proto::ledger::{
    LedgerCursor, LedgerPage, LedgerQuery, LedgerRow, RowState, SignedPage, MAX_PAGE_RECEIPT_BYTES,
    MAX_PAGE_ROWS,
};
use tidepool_proto::session::Refusal;
use tidepool_proto::wire::ErrorCode;
use tidepool_proto::{PublicKey, SignedReceipt};

/// How a result counts, from its verification state, whether a challenge
/// of it is pending, and whether its challenge window has closed.
pub(crate) fn row_state(verified: Verified, challenged: bool, window_closed: bool) -> RowState {
    match verified {
        _ if challenged => RowState::Pending,
        Verified::Verified | Verified::Replaced => RowState::Credited,
        Verified::Unverified if window_closed => RowState::Credited,
        Verified::Disputed => RowState::Disputed,
        Verified::Unverified | Verified::Checking | Verified::Suspect => RowState::Pending,
    }
}

impl<S: Store> Coordinator<S> {
    /// One signed page of the ledger for `peer`. A node may read only its
    /// own rows (`query.node` must be its key); admins read anyone's.
    pub fn ledger_page(
        &mut self,
        peer: &PublicKey,
        now_unix: u64,
        query: LedgerQuery,
        as_of: Option<u64>,
        after: Option<LedgerCursor>,
        limit: u32,
    ) -> Result<SignedPage, Refusal> {
        let Some(key) = self.signer.clone() else {
            return Err(refusal(
                ErrorCode::Internal,
                "this pool has no key to sign its ledger with",
            ));
        };
        if !self.is_admin(peer) && query.node != Some(*peer) {
            return Err(refusal(
                ErrorCode::Forbidden,
                format!(
                    "only the pool's admins read other nodes' ledger rows; ask for your own (node {peer})"
                ),
            ));
        }
        if query.since >= query.until {
            return Err(refusal(
                ErrorCode::Invalid,
                format!(
                    "the period is empty: since {} is not before until {}",
                    query.since, query.until
                ),
            ));
        }
        let as_of = as_of.unwrap_or(now_unix);
        if as_of > now_unix {
            return Err(refusal(
                ErrorCode::Invalid,
                format!("as_of {as_of} is in the future (now {now_unix})"),
            ));
        }
        // Rows accepted after the statement's time wait for a later statement.
        let until = query.until.min(as_of.saturating_add(1));
        let mut left = limit.clamp(1, MAX_PAGE_ROWS);
        let mut bytes = 0usize;
        let mut rows = Vec::new();
        let mut next = None;
        let node = query.node;
        let decode = |raw: &[u8]| -> Result<SignedReceipt, Refusal> {
            rmp_serde::from_slice(raw).map_err(|e| {
                refusal(
                    ErrorCode::Internal,
                    format!("a stored receipt is corrupt: {e}"),
                )
            })
        };
        // Accepted results first, then replaced ones. A page ends when it
        // has `limit` rows or its receipts reach the byte budget; `next`
        // then says where the following page starts.
        let fits = |bytes: usize, more: usize, rows: &[LedgerRow]| {
            rows.is_empty() || bytes + more <= MAX_PAGE_RECEIPT_BYTES
        };
        let withdrawn_from = match after {
            Some(LedgerCursor::Withdrawn { id }) => id,
            None | Some(LedgerCursor::Result { .. }) => {
                let from = match after {
                    Some(LedgerCursor::Result { at, task }) => {
                        Some((at, tidepool_proto::wire::TaskId(task)))
                    }
                    _ => None,
                };
                let found =
                    self.store
                        .ledger_results(query.since, until, node.as_ref(), from, left)?;
                let mut ended = found.len() as u32 == left;
                for r in found {
                    if !fits(bytes, r.receipt.len(), &rows) {
                        ended = true;
                        break;
                    }
                    bytes += r.receipt.len();
                    let window = self
                        .jobs
                        .get(&r.job)
                        .and_then(|(b, _)| self.bundles.get(b))
                        .map_or(0, |b| b.manifest.verification.challenge_window_secs);
                    let closed = r.done_at < as_of.saturating_sub(window);
                    next = Some(LedgerCursor::Result {
                        at: r.done_at,
                        task: r.task.0,
                    });
                    rows.push(LedgerRow {
                        node: r.node,
                        job: r.job,
                        index: r.index,
                        state: row_state(r.verified, r.challenged, closed),
                        at: r.done_at,
                        receipt: decode(&r.receipt)?,
                    });
                    left -= 1;
                }
                if ended {
                    // More results may follow: the next page goes on from here.
                    return Ok(self.sign_page(&key, query, as_of, after, rows, next));
                }
                0
            }
        };
        next = None;
        let found =
            self.store
                .ledger_withdrawn(query.since, until, node.as_ref(), withdrawn_from, left)?;
        let mut ended = found.len() as u32 == left;
        let mut last = withdrawn_from;
        for w in found {
            if !fits(bytes, w.receipt.len(), &rows) {
                ended = true;
                break;
            }
            bytes += w.receipt.len();
            last = w.id;
            rows.push(LedgerRow {
                node: w.node,
                job: w.job,
                index: w.index,
                state: RowState::Withdrawn,
                at: w.at,
                receipt: decode(&w.receipt)?,
            });
        }
        if ended {
            next = Some(LedgerCursor::Withdrawn { id: last });
        }
        Ok(self.sign_page(&key, query, as_of, after, rows, next))
    }

    fn sign_page(
        &self,
        key: &tidepool_proto::SecretKey,
        query: LedgerQuery,
        as_of: u64,
        after: Option<LedgerCursor>,
        rows: Vec<LedgerRow>,
        next: Option<LedgerCursor>,
    ) -> SignedPage {
        LedgerPage {
            pool: key.public(),
            query,
            as_of,
            after,
            rows,
            next,
        }
        .sign(key)
    }
}
