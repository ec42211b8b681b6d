//! Durability: what a target has on disk, and so what the slot may be confirmed up to.
//!
//! Target sessions commit asynchronously (`synchronous_commit = off`): a COMMIT returns before
//! its WAL record is flushed, and a target crash may take the last commits with it. The slot
//! must therefore never be confirmed past what the target has *flushed*. Each group commit
//! records the target's WAL insert position right after its COMMIT (a position past the commit
//! record); once the target's WAL flush position (`pg_current_wal_flush_lsn()`) reaches it, the
//! group is durable, and every group before it too, because WAL is flushed in order. See the
//! PostgreSQL docs, "Asynchronous Commit" (<https://www.postgresql.org/docs/15/wal-async-commit.html>) and
//! "Backup Control Functions" for `pg_current_wal_insert_lsn` / `pg_current_wal_flush_lsn`
//! (<https://www.postgresql.org/docs/15/functions-admin.html#FUNCTIONS-ADMIN-BACKUP>).
//!
//! ```text
//!   committed ──► undurable: (progress LSN, WAL position after COMMIT), oldest first
//!                    │ flush position passes a group's WAL position
//!                    ▼
//!   durable ◄── the newest group at or before the flush  ──► published to the reader
//! ```
//!
//! Two situations need a synchronous commit of the progress row ([`force_durable`]), which
//! flushes the WAL up to it and so every asynchronous commit before it:
//! - barriers, shutdown and start-up: the reader restarts from what is durable, so everything
//!   the target has must be durable first, or it would be sent again;
//! - an idle target: the WAL flush can stop short of a group's position (a page boundary) while
//!   nothing else is written, so after a few idle polls the rest is forced.
//!
//! With synchronous standbys the target keeps its own `synchronous_commit` (a failover keeps
//! only what the standbys confirmed), and "flushed" then means what the server says it means.

use std::collections::VecDeque;

use postgres_types::ToSql;
use tokio_postgres::{Client, Statement};

use super::error::ApplyError;
use super::progress::{self, ProgressKey};
use super::Worker;
use crate::lsn::Lsn;
use crate::pg::safe_pg_error;

/// The target's WAL insert and flush positions (durability is read from them).
pub(super) const WAL_POSITION_SQL: &str =
    "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text";

/// Statements every group commit runs, prepared once per connection.
pub(super) struct CommitStatements {
    /// Writes the progress row.
    pub upsert: Statement,
    /// [`WAL_POSITION_SQL`].
    pub position: Statement,
}

impl CommitStatements {
    /// Prepares both on `client`.
    pub async fn prepare(client: &Client) -> Result<CommitStatements, tokio_postgres::Error> {
        Ok(CommitStatements {
            upsert: progress::prepare_upsert(client).await?,
            position: client.prepare(WAL_POSITION_SQL).await?,
        })
    }
}

/// A target's positions: committed (its progress row says so) and durable (on its disk).
#[derive(Debug, Default)]
pub(super) struct Durability {
    /// End LSN of the last source transaction committed on the target (maybe not flushed).
    pub committed: Lsn,
    /// Progress known to be on the target's disk: what is published to the reader.
    /// Invariant: `durable <= committed`, except after a reload that found the target behind.
    pub durable: Lsn,
    /// Committed groups not yet known durable: (progress LSN, target WAL position after the
    /// COMMIT), oldest first.
    pub undurable: VecDeque<(Lsn, Lsn)>,
}

impl Durability {
    /// Starts from a progress row that is on disk (start-up flushes it first).
    pub fn at(lsn: Lsn) -> Durability {
        Durability {
            committed: lsn,
            durable: lsn,
            undurable: VecDeque::new(),
        }
    }

    /// A group committed at progress `lsn`, its commit record before WAL position `at`.
    pub fn committed_group(&mut self, lsn: Lsn, at: Lsn) {
        self.committed = lsn;
        self.undurable.push_back((lsn, at));
    }

    /// The target flushed its WAL up to `flush`: the newest progress LSN that became durable.
    pub fn flushed(&mut self, flush: Lsn) -> Option<Lsn> {
        flushed_prefix(&mut self.undurable, flush)
    }
}

/// Pops the groups whose commit lies at or before `flush` and returns the newest one's LSN.
pub(super) fn flushed_prefix(undurable: &mut VecDeque<(Lsn, Lsn)>, flush: Lsn) -> Option<Lsn> {
    let mut newest = None;
    while let Some(&(lsn, at)) = undurable.front() {
        if at > flush {
            break;
        }
        newest = Some(lsn);
        undurable.pop_front();
    }
    newest
}

/// Reads an LSN the target printed.
pub(super) fn parse_lsn(text: &str) -> Result<Lsn, ApplyError> {
    text.parse()
        .map_err(|_| ApplyError::Connection(format!("target sent an unreadable LSN {text:?}")))
}

/// A synchronous commit of the progress row: flushes the target's WAL up to it.
pub(super) async fn force_durable(
    client: &Client,
    upsert: &Statement,
    key: &ProgressKey,
    lsn: Lsn,
) -> Result<(), tokio_postgres::Error> {
    let lsn = lsn.to_string();
    let params: [&(dyn ToSql + Sync); 4] = [&key.system_id, &key.slot, &key.target, &lsn];
    let result = async {
        client
            .batch_execute("BEGIN; SET LOCAL synchronous_commit = on")
            .await?;
        client.execute(upsert, &params).await?;
        client.batch_execute("COMMIT").await
    }
    .await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

impl Worker {
    /// Reads the target's WAL flush position and advances `durable` over the groups it covers.
    pub(super) async fn poll_flush(&mut self) -> Result<(), ApplyError> {
        let row = self
            .session
            .client
            .query_one(&self.session.commit_stmts.position, &[])
            .await
            .map_err(|e| ApplyError::Connection(safe_pg_error(&e)))?;
        let flush = parse_lsn(row.get(1))?;
        self.advance_durable(flush);
        Ok(())
    }

    /// Publishes what a flush up to `flush` made durable.
    pub(super) fn advance_durable(&mut self, flush: Lsn) {
        if let Some(lsn) = self.positions.flushed(flush) {
            self.advance_to(lsn);
        }
    }

    /// Makes everything committed durable now: a synchronous commit flushes the target's WAL
    /// up to it, and so every asynchronous commit before it.
    pub(super) async fn make_durable(&mut self) -> Result<(), ApplyError> {
        if self.positions.durable >= self.positions.committed || self.group.in_txn {
            return Ok(());
        }
        force_durable(
            &self.session.client,
            &self.session.commit_stmts.upsert,
            &self.session.key,
            self.positions.committed,
        )
        .await
        .map_err(|e| ApplyError::Connection(safe_pg_error(&e)))?;
        self.positions.undurable.clear();
        self.advance_to(self.positions.committed);
        Ok(())
    }

    /// Publishes `lsn` as durable, in whatever state the task is.
    pub(super) fn advance_to(&mut self, lsn: Lsn) {
        self.positions.durable = self.positions.durable.max(lsn);
        self.metrics
            .target_committed_lsn
            .with_label_values(&[&self.name])
            .set(self.positions.durable.0 as i64);
        let state = self.status.borrow().state.clone();
        self.publish(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_follows_the_flush_over_whole_groups_only() {
        let mut q: VecDeque<(Lsn, Lsn)> = [
            (Lsn(100), Lsn(1000)),
            (Lsn(200), Lsn(2000)),
            (Lsn(300), Lsn(3000)),
        ]
        .into();
        assert_eq!(flushed_prefix(&mut q, Lsn(999)), None);
        assert_eq!(q.len(), 3);
        // A flush exactly at a group's position covers it; one short of the next does not.
        assert_eq!(flushed_prefix(&mut q, Lsn(2999)), Some(Lsn(200)));
        assert_eq!(q.len(), 1);
        assert_eq!(flushed_prefix(&mut q, Lsn(5000)), Some(Lsn(300)));
        assert!(q.is_empty());
        assert_eq!(flushed_prefix(&mut q, Lsn(9000)), None);
    }

    #[test]
    fn committed_groups_become_durable_in_order() {
        let mut d = Durability::at(Lsn(10));
        d.committed_group(Lsn(20), Lsn(500));
        d.committed_group(Lsn(30), Lsn(600));
        assert_eq!(d.committed, Lsn(30));
        assert_eq!(d.flushed(Lsn(499)), None);
        assert_eq!(d.flushed(Lsn(550)), Some(Lsn(20)));
        assert_eq!(d.flushed(Lsn(600)), Some(Lsn(30)));
        assert!(d.undurable.is_empty());
    }

    #[test]
    fn unreadable_lsn_is_a_connection_error() {
        assert_eq!(parse_lsn("0/16B3748").unwrap(), Lsn(0x16B3748));
        assert!(matches!(parse_lsn("nope"), Err(ApplyError::Connection(_))));
    }
}
