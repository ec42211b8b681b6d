//! What the reader sends to an apply task: decoded row changes of whole source transactions,
//! framed as chunks, plus the barrier that quiesces a target.
//!
//! Tuple values stay `Bytes` slices of the received WAL message (zero copy, shared by every
//! target of a fan-out); their `Debug` prints only kind and length.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::lsn::Lsn;
use crate::pgoutput::PgTimestamp;
use crate::pgoutput::{OldTuple, Relation, Tuple};
use crate::table::TableName;

/// A relation as last described by the source, with a generation that changes whenever a new
/// Relation message replaces it (statement caches key on it).
#[derive(Debug)]
pub struct RelationInfo {
    /// Source table name (the partition root for partitioned tables).
    pub table: TableName,
    /// The Relation message.
    pub relation: Relation,
    /// Bumped on every new description of this relation.
    pub generation: u64,
    /// Targets owning this table, resolved once when the Relation message arrives.
    pub targets: Vec<crate::route::TargetIdx>,
}

/// One row change.
#[derive(Debug, Clone)]
pub enum Change {
    /// A new row.
    Insert {
        /// The relation.
        rel: Arc<RelationInfo>,
        /// Its values.
        new: Tuple,
    },
    /// A changed row; `old` carries the key (changed key) or the whole old row (RI FULL).
    Update {
        /// The relation.
        rel: Arc<RelationInfo>,
        /// Old key or row, when the source sent one.
        old: Option<OldTuple>,
        /// New values (`Unchanged` for TOASTed values not sent).
        new: Tuple,
    },
    /// A removed row, found by its key or whole old row.
    Delete {
        /// The relation.
        rel: Arc<RelationInfo>,
        /// Old key or row.
        old: OldTuple,
    },
    /// TRUNCATE of the listed relations (those this target owns).
    Truncate {
        /// Relations.
        rels: Vec<Arc<RelationInfo>>,
        /// CASCADE.
        cascade: bool,
        /// RESTART IDENTITY.
        restart_identity: bool,
    },
}

impl Change {
    /// The relation of a row change (`None` for a TRUNCATE, which names several).
    pub fn relation(&self) -> Option<&Arc<RelationInfo>> {
        match self {
            Change::Insert { rel, .. }
            | Change::Update { rel, .. }
            | Change::Delete { rel, .. } => Some(rel),
            Change::Truncate { .. } => None,
        }
    }

    /// The operation name used in metrics and logs.
    pub fn operation(&self) -> &'static str {
        match self {
            Change::Insert { .. } => "insert",
            Change::Update { .. } => "update",
            Change::Delete { .. } => "delete",
            Change::Truncate { .. } => "truncate",
        }
    }
}

/// Identity of the source transaction a chunk belongs to.
#[derive(Debug, Clone, Copy)]
pub struct XactInfo {
    /// LSN of the commit record (Begin's final_lsn).
    pub final_lsn: Lsn,
    /// Commit time on the source.
    pub commit_time: PgTimestamp,
    /// Source transaction id.
    pub xid: u32,
}

/// Sent with the last chunk of a source transaction.
#[derive(Debug, Clone, Copy)]
pub struct CommitInfo {
    /// End of the commit record: what the progress table stores.
    pub end_lsn: Lsn,
}

/// A message to an apply task.
#[derive(Debug)]
pub enum ApplyMsg {
    /// Changes of one source transaction; the last chunk carries `commit`.
    Chunk {
        /// The transaction.
        xact: XactInfo,
        /// Its changes for this target (possibly empty on the last chunk).
        changes: Vec<Change>,
        /// Present on the transaction's last chunk.
        commit: Option<CommitInfo>,
    },
    /// Quiesce: commit an open group if it ends with a whole source transaction, otherwise roll
    /// it back; reply with the durably committed LSN. A failed target that is ready to retry
    /// resumes applying after answering.
    Barrier(oneshot::Sender<Lsn>),
    /// Stop applying until an operator acts (a restart): the source did something pgcarve
    /// cannot follow for a table this target owns. The reason names it and the fix; no value.
    Halt(String),
}

/// A relation with no columns, for tests of what carries changes (queue, spool, retries).
#[cfg(test)]
pub fn test_relation(name: &str, generation: u64) -> Arc<RelationInfo> {
    Arc::new(RelationInfo {
        table: TableName::parse(name).expect("a table name"),
        relation: Relation {
            xid: None,
            oid: 16384,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: crate::pgoutput::ReplicaIdentity::Default,
            columns: Vec::new(),
        },
        generation,
        targets: vec![0],
    })
}
