//! Transaction assembly and routing, pure: which part of which source transaction goes to
//! which target, and what each target skips.
//!
//! # Why routing is decided at Begin
//!
//! pgoutput (protocol version 1, no streaming of in-progress transactions) sends a transaction
//! only once it has committed, as Begin, its changes, Commit — never interleaved with another
//! (PostgreSQL docs, "Logical Replication Protocol Message Flow",
//! <https://www.postgresql.org/docs/15/protocol-logical-replication.html>). Begin carries the LSN of the commit record
//! (`final_lsn`, <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>), so before the first change arrives we know where the whole
//! transaction lies relative to what each target holds, and decide once per target:
//!
//! - [`Route::Held`]: it ends before what the target already has (a stream restarted from the
//!   slot's confirmed position re-sends it): skip it, whole;
//! - [`Route::NotTaking`]: the target is stalled: if the transaction has changes for it, it
//!   misses them, and the target must keep holding the slot before this transaction until a
//!   restart brings it again;
//! - [`Route::Send`]: collect its changes and send them in chunks.
//!
//! Deciding per change instead would let a target that recovers mid-transaction receive only
//! the tail of a transaction — a partial transaction, which the apply side must never see.
//!
//! Relations are known by OID: a Relation message describes the OID's current name and
//! columns, and every change names the OID. The owning targets are resolved when the Relation
//! message arrives, not per change.

use std::collections::HashMap;
use std::sync::Arc;

use crate::link::{ApplyMsg, Change, CommitInfo, RelationInfo, XactInfo};
use crate::lsn::Lsn;
use crate::pgoutput::{Relation, Truncate};
use crate::route::{Router, Routing, TargetIdx};
use crate::table::TableName;

/// What the open transaction means for one target, decided at its Begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Its changes are collected and sent.
    Send,
    /// The target already has this transaction (it ends before what it holds).
    Held,
    /// The target is not taking changes: if the transaction has changes for it, it misses them
    /// and must hold the slot before them until it has them.
    NotTaking,
}

/// The route of a transaction whose commit record is at `final_lsn`, for a target that holds
/// everything before `skip_below` and does (or does not) take changes now.
pub fn route_at_begin(accepts_changes: bool, final_lsn: Lsn, skip_below: Lsn) -> Route {
    if !accepts_changes {
        Route::NotTaking
    } else if final_lsn < skip_below {
        Route::Held
    } else {
        Route::Send
    }
}

/// Monolith DDL seen in the stream that concerns a routed table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ddl {
    /// Renamed or moved to another schema: followed.
    Renamed {
        /// The routed name (and the table's name on the targets).
        table: TableName,
        /// Its name on the source now.
        now: TableName,
        /// Its owners.
        targets: Vec<TargetIdx>,
    },
    /// The routed name now belongs to another table (`oid`): not followed.
    Replaced {
        /// The routed name.
        table: TableName,
        /// The new table's OID.
        oid: u32,
        /// The owners of the routed table.
        targets: Vec<TargetIdx>,
    },
}

/// The last Relation message of every OID seen in this stream.
#[derive(Debug, Default)]
pub struct Relations {
    by_oid: HashMap<u32, Arc<RelationInfo>>,
    generation: u64,
}

impl Relations {
    /// Records a Relation message: a new generation for its OID, owners resolved once by OID
    /// (see `crate::route`). Returns what changed about a routed table, for the reader to
    /// report: its changes under a new name still go to its owners under the routed name; a
    /// routed name held by a new OID goes nowhere, and its owners must stop.
    pub fn describe(&mut self, r: Relation, router: &Router) -> Option<Ddl> {
        let name = TableName {
            schema: r.schema().to_string(),
            name: r.name.clone(),
        };
        self.generation += 1;
        let (table, targets, ddl) = match router.route(r.oid, &name) {
            Routing::NotRouted => (name, Vec::new(), None),
            Routing::Routed { table, targets } => (table.clone(), targets.to_vec(), None),
            Routing::Renamed { table, targets } => (
                table.clone(),
                targets.to_vec(),
                Some(Ddl::Renamed {
                    table: table.clone(),
                    now: name,
                    targets: targets.to_vec(),
                }),
            ),
            Routing::Replaced { table, targets } => (
                name,
                Vec::new(),
                Some(Ddl::Replaced {
                    table: table.clone(),
                    oid: r.oid,
                    targets: targets.to_vec(),
                }),
            ),
        };
        self.by_oid.insert(
            r.oid,
            Arc::new(RelationInfo {
                table,
                relation: r,
                generation: self.generation,
                targets,
            }),
        );
        ddl
    }

    /// The relation a change names; an OID without a Relation message is a broken stream.
    pub fn get(&self, oid: u32) -> Result<&Arc<RelationInfo>, String> {
        self.by_oid
            .get(&oid)
            .ok_or_else(|| format!("change for relation {oid} before its Relation message"))
    }
}

/// The open transaction's part for one target.
#[derive(Debug)]
struct Part {
    route: Route,
    /// Changes not yet sent.
    buf: Vec<Change>,
    /// The transaction has changes for this target (sent, buffered or missed).
    seen: bool,
}

/// What a transaction's Commit means for one target that had changes in it.
#[derive(Debug)]
pub enum AtCommit {
    /// Send the last chunk, carrying the commit.
    Send(ApplyMsg),
    /// The target missed the transaction (it was not taking changes): it must count as
    /// pending at what it has until the stream brings the transaction again.
    Missed,
}

/// A source transaction between its Begin and its Commit.
#[derive(Debug)]
pub struct OpenTxn {
    /// The transaction.
    pub xact: XactInfo,
    parts: Vec<Part>,
}

impl OpenTxn {
    /// Opens a transaction with one route per target (in target order).
    pub fn begin(xact: XactInfo, routes: impl IntoIterator<Item = Route>) -> OpenTxn {
        OpenTxn {
            xact,
            parts: routes
                .into_iter()
                .map(|route| Part {
                    route,
                    buf: Vec::new(),
                    seen: false,
                })
                .collect(),
        }
    }

    /// Whether some target is being sent this transaction (it counts toward lag).
    pub fn sending(&self) -> bool {
        self.parts.iter().any(|p| p.route == Route::Send)
    }

    /// Adds a change for target `i`; returns a full chunk to send now (at most `chunk_size`
    /// changes each), so huge transactions travel in pieces.
    pub fn push(&mut self, i: TargetIdx, change: Change, chunk_size: usize) -> Option<ApplyMsg> {
        let part = &mut self.parts[i];
        part.seen = true;
        if part.route != Route::Send {
            return None;
        }
        part.buf.push(change);
        if part.buf.len() < chunk_size {
            return None;
        }
        let changes = std::mem::replace(&mut part.buf, Vec::with_capacity(chunk_size));
        Some(ApplyMsg::Chunk {
            xact: self.xact,
            changes,
            commit: None,
        })
    }

    /// Ends the transaction: for every target with changes in it (and not holding it already),
    /// the last chunk to send or the fact that it missed them.
    pub fn commit(self, end_lsn: Lsn) -> impl Iterator<Item = (TargetIdx, AtCommit)> {
        let xact = self.xact;
        self.parts
            .into_iter()
            .enumerate()
            .filter(|(_, p)| p.seen && p.route != Route::Held)
            .map(move |(i, p)| {
                let at = match p.route {
                    Route::NotTaking => AtCommit::Missed,
                    _ => AtCommit::Send(ApplyMsg::Chunk {
                        xact,
                        changes: p.buf,
                        commit: Some(CommitInfo { end_lsn }),
                    }),
                };
                (i, at)
            })
    }
}

/// A TRUNCATE split by target: each owning target gets one TRUNCATE of the relations it owns,
/// in target order.
pub fn truncate_parts(
    t: &Truncate,
    relations: &Relations,
    targets: usize,
) -> Result<Vec<(TargetIdx, Change)>, String> {
    let mut per_target: Vec<Vec<Arc<RelationInfo>>> = vec![Vec::new(); targets];
    for oid in &t.relations {
        let rel = relations.get(*oid)?;
        for &i in &rel.targets {
            per_target[i].push(rel.clone());
        }
    }
    Ok(per_target
        .into_iter()
        .enumerate()
        .filter(|(_, rels)| !rels.is_empty())
        .map(|(i, rels)| {
            (
                i,
                Change::Truncate {
                    rels,
                    cascade: t.cascade(),
                    restart_identity: t.restart_identity(),
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{ReplicaIdentity, TRUNCATE_RESTART_IDENTITY};

    fn router() -> Router {
        let target = crate::route::test_target;
        // 0 owns patients and allergies, 1 owns patients and claims: patients fans out.
        Router::new(&[
            target("patient", &["patients", "allergies"]),
            target("billing", &["patients", "claims"]),
        ])
    }

    fn relation(oid: u32, name: &str) -> Relation {
        Relation {
            xid: None,
            oid,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: Vec::new(),
        }
    }

    fn relations() -> Relations {
        let mut r = Relations::default();
        let router = router();
        for (oid, name) in [
            (1, "patients"),
            (2, "allergies"),
            (3, "claims"),
            (4, "audit_log"),
        ] {
            assert_eq!(r.describe(relation(oid, name), &router), None);
        }
        r
    }

    #[test]
    fn a_renamed_routed_table_keeps_its_owners_and_is_reported() {
        let mut router = router();
        router.set_oids(&[(TableName::parse("patients").unwrap(), 1)].into());
        let mut rels = Relations::default();
        let ddl = rels.describe(relation(1, "patients_v2"), &router);
        assert_eq!(
            ddl,
            Some(Ddl::Renamed {
                table: TableName::parse("patients").unwrap(),
                now: TableName::parse("patients_v2").unwrap(),
                targets: vec![0, 1],
            })
        );
        let rel = rels.get(1).unwrap();
        assert_eq!(rel.table.name, "patients", "applied under the routed name");
        assert_eq!(rel.targets, vec![0, 1]);
    }

    #[test]
    fn a_recreated_routed_table_goes_nowhere_and_is_reported() {
        let mut router = router();
        router.set_oids(&[(TableName::parse("patients").unwrap(), 1)].into());
        let mut rels = Relations::default();
        let ddl = rels.describe(relation(9, "patients"), &router);
        assert!(
            matches!(ddl, Some(Ddl::Replaced { oid: 9, ref targets, .. }) if targets == &[0, 1])
        );
        assert!(rels.get(9).unwrap().targets.is_empty());
    }

    fn xact() -> XactInfo {
        XactInfo {
            final_lsn: Lsn(500),
            commit_time: 0,
            xid: 7,
        }
    }

    fn insert(rels: &Relations, oid: u32) -> Change {
        Change::Insert {
            rel: rels.get(oid).unwrap().clone(),
            new: Default::default(),
        }
    }

    fn sent(at: &AtCommit) -> usize {
        match at {
            AtCommit::Send(ApplyMsg::Chunk {
                changes, commit, ..
            }) => {
                assert!(commit.is_some(), "the last chunk carries the commit");
                changes.len()
            }
            other => panic!("expected a last chunk, got {other:?}"),
        }
    }

    #[test]
    fn the_route_is_decided_once_at_begin() {
        assert_eq!(route_at_begin(true, Lsn(500), Lsn(400)), Route::Send);
        // Exactly at what the target holds is new to it; before it is held.
        assert_eq!(route_at_begin(true, Lsn(400), Lsn(400)), Route::Send);
        assert_eq!(route_at_begin(true, Lsn(399), Lsn(400)), Route::Held);
        // A stalled target misses the transaction whatever it holds.
        assert_eq!(route_at_begin(false, Lsn(399), Lsn(400)), Route::NotTaking);
        assert_eq!(route_at_begin(false, Lsn(500), Lsn(400)), Route::NotTaking);
    }

    #[test]
    fn relations_resolve_owners_and_unknown_oids_are_errors() {
        let rels = relations();
        assert_eq!(rels.get(1).unwrap().targets, vec![0, 1]);
        assert_eq!(rels.get(3).unwrap().targets, vec![1]);
        assert!(rels.get(4).unwrap().targets.is_empty(), "not routed");
        assert!(rels.get(99).unwrap_err().contains("relation 99"));
    }

    #[test]
    fn a_new_description_gets_a_new_generation() {
        let mut rels = relations();
        let before = rels.get(1).unwrap().generation;
        rels.describe(relation(1, "patients"), &router());
        assert!(rels.get(1).unwrap().generation > before);
    }

    #[test]
    fn each_target_gets_only_its_changes_and_the_commit() {
        let rels = relations();
        let mut txn = OpenTxn::begin(xact(), [Route::Send, Route::Send]);
        for oid in [1, 2, 3, 2] {
            for &i in &rels.get(oid).unwrap().targets.clone() {
                assert!(txn.push(i, insert(&rels, oid), 100).is_none());
            }
        }
        let out: Vec<_> = txn.commit(Lsn(600)).collect();
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].0, sent(&out[0].1)), (0, 3)); // patients, allergies ×2
        assert_eq!((out[1].0, sent(&out[1].1)), (1, 2)); // patients, claims
    }

    #[test]
    fn large_transactions_travel_in_chunks_and_the_last_carries_the_commit() {
        let rels = relations();
        let mut txn = OpenTxn::begin(xact(), [Route::Send, Route::Send]);
        let mut chunks = 0;
        for _ in 0..7 {
            if let Some(ApplyMsg::Chunk {
                changes, commit, ..
            }) = txn.push(0, insert(&rels, 2), 3)
            {
                assert_eq!(changes.len(), 3);
                assert!(commit.is_none());
                chunks += 1;
            }
        }
        assert_eq!(chunks, 2);
        let out: Vec<_> = txn.commit(Lsn(600)).collect();
        assert_eq!(out.len(), 1, "target 1 had no changes: nothing to send");
        assert_eq!(sent(&out[0].1), 1);
    }

    #[test]
    fn held_targets_skip_and_stalled_targets_miss() {
        let rels = relations();
        let mut txn = OpenTxn::begin(xact(), [Route::Held, Route::NotTaking]);
        for &i in &rels.get(1).unwrap().targets.clone() {
            assert!(txn.push(i, insert(&rels, 1), 1).is_none(), "never sent");
        }
        let out: Vec<_> = txn.commit(Lsn(600)).collect();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 1);
        assert!(matches!(out[0].1, AtCommit::Missed));
    }

    #[test]
    fn a_stalled_target_without_changes_in_the_transaction_misses_nothing() {
        let rels = relations();
        let mut txn = OpenTxn::begin(xact(), [Route::Send, Route::NotTaking]);
        assert!(txn.sending());
        assert!(txn.push(0, insert(&rels, 2), 10).is_none());
        let out: Vec<_> = txn.commit(Lsn(600)).collect();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 0);
    }

    #[test]
    fn a_truncate_is_split_by_owner() {
        let rels = relations();
        let t = Truncate {
            xid: None,
            options: TRUNCATE_RESTART_IDENTITY,
            relations: vec![1, 3, 4],
        };
        let parts = truncate_parts(&t, &rels, 2).unwrap();
        let names = |c: &Change| match c {
            Change::Truncate {
                rels,
                restart_identity,
                cascade,
            } => {
                assert!(*restart_identity && !*cascade);
                rels.iter()
                    .map(|r| r.table.name.clone())
                    .collect::<Vec<_>>()
            }
            _ => panic!("a truncate"),
        };
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].0, names(&parts[0].1)),
            (0, vec!["patients".into()])
        );
        assert_eq!(
            (parts[1].0, names(&parts[1].1)),
            (1, vec!["patients".to_string(), "claims".into()])
        );
        let unknown = Truncate {
            relations: vec![42],
            ..t
        };
        assert!(truncate_parts(&unknown, &rels, 2).is_err());
    }
}
