//! What the open target transaction was made of, kept so a retry needs nothing from the slot.
//!
//! A group (one target transaction, several source transactions) that fails is rolled back;
//! to try it again the task needs its changes again. It keeps the chunks it applied since the
//! last commit, up to `apply.retain_changes`, and a retry applies them again before taking new
//! messages from its queue, so a retry restarts nothing that other targets share. Only when the
//! group was larger, or the target lost commits that had not reached its disk (a crash of the
//! target before its WAL flush), does the retry need the stream again from the slot.

use std::collections::VecDeque;

use crate::link::{ApplyMsg, Change, CommitInfo, XactInfo};
use crate::lsn::Lsn;

/// The chunks of the open group, in order.
pub(super) struct Retained {
    chunks: Vec<(XactInfo, Vec<Change>, Option<CommitInfo>)>,
    changes: usize,
    /// Every chunk since the last commit is here (none was left out for size).
    complete: bool,
    /// What the target had committed when the group began.
    pub base: Lsn,
    limit: usize,
}

impl Retained {
    /// Nothing kept yet; the target holds `committed`.
    pub fn new(committed: Lsn, limit: usize) -> Retained {
        Retained {
            chunks: Vec::new(),
            changes: 0,
            complete: true,
            base: committed,
            limit,
        }
    }

    /// Keeps a copy of a chunk about to be applied (values are shared, not copied).
    pub fn keep(&mut self, xact: &XactInfo, changes: &[Change], commit: Option<CommitInfo>) {
        if !self.complete {
            return;
        }
        self.changes += changes.len();
        if self.changes > self.limit {
            self.chunks = Vec::new();
            self.complete = false;
            return;
        }
        self.chunks.push((*xact, changes.to_vec(), commit));
    }

    /// The group committed (or was given up for a fresh stream): start again at `committed`.
    pub fn reset(&mut self, committed: Lsn) {
        self.chunks.clear();
        self.changes = 0;
        self.complete = true;
        self.base = committed;
    }

    /// Whether a retry can apply the failed group from here: all of it is kept, and the target
    /// still holds what it had when the group began (`reloaded` is its progress now).
    pub fn covers(&self, reloaded: Lsn) -> bool {
        self.complete && reloaded >= self.base
    }

    /// Whether every chunk since the last commit is kept.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// Hands the chunks over for the retry, oldest first, and starts again at `committed`.
    pub fn take(&mut self, committed: Lsn) -> VecDeque<ApplyMsg> {
        let chunks = std::mem::take(&mut self.chunks);
        self.reset(committed);
        chunks
            .into_iter()
            .map(|(xact, changes, commit)| ApplyMsg::Chunk {
                xact,
                changes,
                commit,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xact(lsn: u64) -> XactInfo {
        XactInfo {
            final_lsn: Lsn(lsn),
            commit_time: 0,
            xid: 1,
        }
    }

    #[test]
    fn a_retry_gets_the_group_back_in_order() {
        let mut r = Retained::new(Lsn(10), 100);
        r.keep(&xact(20), &[], None);
        r.keep(&xact(20), &[], Some(CommitInfo { end_lsn: Lsn(21) }));
        r.keep(&xact(30), &[], Some(CommitInfo { end_lsn: Lsn(31) }));
        assert!(r.covers(Lsn(10)));
        assert!(
            r.covers(Lsn(21)),
            "a lost COMMIT answer: more is there, skipped"
        );
        assert!(
            !r.covers(Lsn(5)),
            "the target lost commits: the slot must send again"
        );
        let back: Vec<_> = r
            .take(Lsn(10))
            .into_iter()
            .map(|m| match m {
                ApplyMsg::Chunk { xact, commit, .. } => (xact.final_lsn.0, commit.is_some()),
                _ => panic!(),
            })
            .collect();
        assert_eq!(back, vec![(20, false), (20, true), (30, true)]);
        assert!(r.take(Lsn(10)).is_empty());
    }

    #[test]
    fn a_group_larger_than_the_limit_is_not_kept() {
        let rel = std::sync::Arc::new(crate::link::RelationInfo {
            table: crate::table::TableName::parse("t").unwrap(),
            relation: crate::pgoutput::Relation {
                xid: None,
                oid: 1,
                namespace: "public".into(),
                name: "t".into(),
                replica_identity: crate::pgoutput::ReplicaIdentity::Default,
                columns: Vec::new(),
            },
            generation: 0,
            targets: vec![0],
        });
        let three: Vec<Change> = (0..3)
            .map(|_| Change::Insert {
                rel: rel.clone(),
                new: Default::default(),
            })
            .collect();
        let mut r = Retained::new(Lsn(0), 5);
        r.keep(&xact(1), &three, None);
        assert!(r.complete());
        r.keep(&xact(1), &three, None);
        assert!(!r.complete() && !r.covers(Lsn(0)));
        r.reset(Lsn(2));
        assert!(r.complete() && r.covers(Lsn(2)));
    }
}
