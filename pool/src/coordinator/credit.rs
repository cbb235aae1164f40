//! What each node has earned: its results of user jobs in a period,
//! counted by whether they may be paid for. A result is **credited** when an
//! independent execution confirmed it (`verified`, or `replaced` — then it
//! is the result of the node whose execution replaced the wrong one), or
//! when it was never checked and its bundle's challenge window has closed
//! with no challenge pending. It is **pending** while it is being checked,
//! suspect, challenged or inside its window, **disputed** when executions
//! disagree with no trusted decision, and a node's results that were
//! replaced are **withdrawn** (kept as evidence). Reads the store only;
//! changes nothing. The settlement ledger is built from this.

use super::Coordinator;
use crate::store::{JobKind, Store, StoreError, Verified};
use std::collections::BTreeMap;
use tidepool_proto::PublicKey;

/// One node's results in a period.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeCredit {
    /// Results it holds, stored in the period.
    pub results: u64,
    /// Of those, the ones that may be paid for.
    pub credited: u64,
    /// Of those, the ones still being checked, challenged or in their
    /// challenge window.
    pub pending: u64,
    /// Of those, the ones executions disagree on with no trusted decision.
    pub disputed: u64,
    /// Its results replaced in the period (not among `results`: the
    /// replacing execution's node holds them now).
    pub withdrawn: u64,
    /// Its strikes (all time).
    pub strikes: u32,
}

impl<S: Store> Coordinator<S> {
    /// Every node's credit for results stored in `[since, until)` (Unix
    /// seconds), as of `now_unix` (which closes challenge windows).
    pub fn credits(
        &mut self,
        since: u64,
        until: u64,
        now_unix: u64,
    ) -> Result<BTreeMap<PublicKey, NodeCredit>, StoreError> {
        let mut out: BTreeMap<PublicKey, NodeCredit> = BTreeMap::new();
        let jobs: Vec<_> = self
            .jobs
            .iter()
            .filter(|(j, _)| self.kinds.get(j).copied().unwrap_or(JobKind::User) == JobKind::User)
            .map(|(j, (bundle, _))| (*j, *bundle))
            .collect();
        for (job, bundle) in jobs {
            let window = self
                .bundles
                .get(&bundle)
                .map_or(0, |b| b.manifest.verification.challenge_window_secs);
            let cutoff = now_unix.saturating_sub(window);
            for c in self.store.result_counts(job, since, until, cutoff)? {
                let e = out.entry(c.node).or_default();
                e.results += c.count;
                match c.verified {
                    _ if c.challenged => e.pending += c.count,
                    Verified::Verified | Verified::Replaced => e.credited += c.count,
                    Verified::Unverified if c.window_closed => e.credited += c.count,
                    Verified::Disputed => e.disputed += c.count,
                    Verified::Unverified | Verified::Checking | Verified::Suspect => {
                        e.pending += c.count
                    }
                }
            }
        }
        for (node, n) in self.store.replaced_counts(since, until)? {
            out.entry(node).or_default().withdrawn += n;
        }
        for (node, e) in out.iter_mut() {
            e.strikes = self.standing_of(node).strikes;
        }
        Ok(out)
    }
}
