//! The open group: consecutive source transactions applied inside one target transaction.
//!
//! Row statements are pipelined (sent without waiting for each answer, up to
//! [`PIPELINE_DEPTH`] in flight), runs of at least [`COPY_MIN_ROWS`] inserts into one table go
//! through `COPY … FROM STDIN`, and the group ends with the progress row, COMMIT and a read of
//! the target's WAL position in one round trip. A source transaction is never split across
//! target transactions. Answers are read before COPY, TRUNCATE and COMMIT: in an aborted
//! transaction COMMIT answers ROLLBACK without an error, so every statement must have succeeded
//! before it is sent, and the first failure in send order is the cause.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use futures::{SinkExt, StreamExt};
use postgres_types::ToSql;
use tokio_postgres::Client;

use super::bind::{bind, encode_copy_row, TextParam};
use super::durability::parse_lsn;
use super::error::ApplyError;
use super::failure::Failure;
use super::statements;
use super::stmt_cache::Prepared;
use super::Worker;
use crate::link::{Change, CommitInfo, RelationInfo, TargetState, XactInfo};
use crate::lsn::Lsn;
use crate::pg::safe_pg_error;
use crate::table::TableName;

/// Statements kept in flight on a target connection at once.
const PIPELINE_DEPTH: usize = 256;

/// A run of at least this many inserts into one table goes through COPY. COPY costs two round
/// trips to set up, so short runs are cheaper as pipelined statements.
const COPY_MIN_ROWS: usize = 8;

/// A pending run of inserts is sent once it has this many rows (bounds the worker's memory).
const COPY_MAX_ROWS: usize = 10_000;

/// COPY data is sent in pieces of about this size.
const COPY_BUFFER: usize = 256 * 1024;

/// Consecutive inserts into one table, not yet sent, each with its source transaction's LSN.
pub(super) struct InsertRun {
    rel: Arc<RelationInfo>,
    rows: Vec<(Change, Lsn)>,
}

/// One pipelined row statement awaiting its answer.
type Flight = Pin<Box<dyn Future<Output = Result<(), Failure>> + Send>>;

/// The open target transaction and what it holds.
pub(super) struct Group {
    /// A target transaction is open.
    pub in_txn: bool,
    /// The open group ends with a whole source transaction.
    pub complete: bool,
    /// Commit end LSN of the last whole source transaction in the group: its progress row.
    pub end: Lsn,
    /// Commit LSN of the last source transaction started in the group.
    pub last: Lsn,
    /// Whole source transactions in the group.
    pub txns: u64,
    /// Rows per (relation, operation), added to the metrics when the group commits.
    rows: HashMap<(u32, &'static str), (Arc<RelationInfo>, u64)>,
    /// Inserts waiting to be sent as one run (COPY when long enough).
    pending: Option<InsertRun>,
    /// Row statements sent and not yet answered, across the source transactions of the group;
    /// drained before COPY, TRUNCATE and COMMIT.
    in_flight: FuturesOrdered<Flight>,
    /// Constraints were made immediate while identity columns are writable: defer them again.
    pub undeferred: bool,
    /// When the target transaction began (the apply latency histogram).
    pub began: Option<std::time::Instant>,
}

impl Default for Group {
    fn default() -> Group {
        Group {
            in_txn: false,
            complete: true,
            end: Lsn::ZERO,
            last: Lsn::ZERO,
            txns: 0,
            rows: HashMap::new(),
            pending: None,
            in_flight: FuturesOrdered::new(),
            undeferred: false,
            began: None,
        }
    }
}

/// What a statement's row count means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RowOutcome {
    /// It touched the rows it should.
    Applied,
    /// A guarded UPDATE matched nothing: the source changed an identity value, run the UPDATE
    /// that writes it.
    IdentityChanged,
    /// Any other count: the target diverged from the source (a row missing, or an INSERT that
    /// met an existing key's row count) — an apply error, never success.
    Diverged,
}

/// The one rule for row counts: `expected` rows (1 per row statement, the run's length for a
/// COPY); a guarded UPDATE may also match 0.
pub(super) fn row_outcome(expected: u64, rows: u64, guarded: bool) -> RowOutcome {
    if rows == expected {
        RowOutcome::Applied
    } else if guarded && rows == 0 {
        RowOutcome::IdentityChanged
    } else {
        RowOutcome::Diverged
    }
}

fn diverged(table: &TableName, operation: &'static str, rows: u64) -> ApplyError {
    ApplyError::Divergence {
        table: table.clone(),
        operation,
        rows,
    }
}

impl Worker {
    /// Applies one chunk of a source transaction inside the open group (opening one if needed).
    pub(super) async fn apply_chunk(
        &mut self,
        xact: &XactInfo,
        changes: Vec<Change>,
        commit: Option<CommitInfo>,
    ) -> Result<(), Failure> {
        // Already here (a COMMIT whose answer was lost, then a reconnect): skip, never repeat.
        if xact.final_lsn < self.positions.committed {
            return Ok(());
        }
        // A transaction is whole: a chunk of another one while it is open means chunks went
        // missing (a bug, or a spool lost): never commit it that way.
        if self.group.in_txn && !self.group.complete && xact.final_lsn != self.group.last {
            self.retained.give_up();
            return Err(ApplyError::Kept(format!(
                "a chunk of the transaction at {} arrived while the one at {} was incomplete",
                xact.final_lsn, self.group.last
            ))
            .into());
        }
        if !self.group.in_txn {
            self.session
                .client
                // A source statement touching several rows arrives as one statement per row, so
                // an initially-immediate deferrable constraint (a key swap in one UPDATE) holds
                // only at the end of the source's statement: check deferrable constraints at
                // the commit. NOT DEFERRABLE ones stay immediate, as on the source; TRUNCATE and
                // ALTER first run the checks queued on their tables (check_deferred_now).
                .batch_execute("BEGIN; SET CONSTRAINTS ALL DEFERRED")
                .await
                .map_err(|e| ApplyError::Connection(safe_pg_error(&e)))?;
            self.group.in_txn = true;
            self.group.began = Some(std::time::Instant::now());
        }
        self.group.complete = false;
        let lsn = xact.final_lsn;
        self.group.last = lsn;
        for c in changes {
            match c {
                Change::Truncate {
                    ref rels,
                    restart_identity,
                    ..
                } => self.truncate(rels, restart_identity).await?,
                Change::Insert { ref rel, .. } => {
                    self.count(rel, "insert");
                    let same = self
                        .group
                        .pending
                        .as_ref()
                        .is_some_and(|p| Arc::ptr_eq(&p.rel, rel));
                    if !same {
                        self.flush_inserts().await?;
                        self.group.pending = Some(InsertRun {
                            rel: rel.clone(),
                            rows: Vec::new(),
                        });
                    }
                    let run = self.group.pending.as_mut().expect("pending run");
                    run.rows.push((c, lsn));
                    if run.rows.len() >= COPY_MAX_ROWS {
                        self.flush_inserts().await?;
                    }
                }
                Change::Update { ref rel, .. } | Change::Delete { ref rel, .. } => {
                    self.count(rel, c.operation());
                    self.flush_inserts().await?;
                    self.pipeline(&c, lsn).await?;
                }
            }
        }
        // After a failure, retry one source transaction per run, so a failing run names the
        // exact transaction.
        if self.one_by_one() {
            self.flush_inserts().await?;
        }
        if let Some(c) = commit {
            self.group.complete = true;
            self.group.end = c.end_lsn;
            self.group.txns += 1;
        }
        Ok(())
    }

    async fn truncate(
        &mut self,
        rels: &[Arc<RelationInfo>],
        restart_identity: bool,
    ) -> Result<(), Failure> {
        self.flush_inserts().await?;
        self.drain().await?;
        let names: Vec<(TableName, bool)> = rels
            .iter()
            .map(|r| {
                let plain = self.cache.tables.get(&r.table).is_none_or(|t| t.plain);
                (r.table.clone(), plain)
            })
            .collect();
        let sql = statements::truncate(&names, restart_identity);
        let first = names
            .first()
            .map(|(t, _)| t.clone())
            .unwrap_or_else(|| TableName {
                schema: String::new(),
                name: String::new(),
            });
        let tables: Vec<TableName> = names.into_iter().map(|(t, _)| t).collect();
        // Every check queued on these tables runs now, also initially deferred ones: the source
        // could not have truncated them with checks pending either (55006).
        let undeferred = self.check_deferred_now(&tables, true, "truncate").await?;
        self.session
            .client
            .batch_execute(&sql)
            .await
            .map_err(|e| ApplyError::from_pg(&e, &first, "truncate"))?;
        if undeferred {
            self.defer_again(&first, "truncate").await?;
        }
        for r in rels {
            self.count(r, "truncate");
        }
        Ok(())
    }

    fn count(&mut self, rel: &Arc<RelationInfo>, op: &'static str) {
        self.group
            .rows
            .entry((rel.relation.oid, op))
            .or_insert_with(|| (rel.clone(), 0))
            .1 += 1;
    }

    /// Sends the pending run of inserts: through COPY when it has at least [`COPY_MIN_ROWS`]
    /// rows, else as pipelined statements. Runs collect consecutive inserts into one table,
    /// across the source transactions of a group, so single-row transactions reach COPY too.
    async fn flush_inserts(&mut self) -> Result<(), Failure> {
        let Some(run) = self.group.pending.take() else {
            return Ok(());
        };
        let copy_ok = self
            .cache
            .tables
            .get(&run.rel.table)
            .is_some_and(|t| t.copy_ok);
        if copy_ok && run.rows.len() >= COPY_MIN_ROWS {
            self.drain().await?;
            let first_lsn = run.rows.first().map(|(_, l)| *l);
            return self.copy_inserts(&run.rel, &run.rows).await.map_err(|err| {
                // Rows of several transactions: name the first; the retry is one by one.
                Failure {
                    err,
                    lsn: first_lsn,
                }
            });
        }
        for (c, lsn) in &run.rows {
            self.pipeline(c, *lsn).await?;
        }
        Ok(())
    }

    /// Sends a row change as a prepared statement, pipelined: its answer is awaited later
    /// (at the latest by [`Worker::drain`]), so single-row transactions do not each wait a
    /// round trip.
    async fn pipeline(&mut self, c: &Change, lsn: Lsn) -> Result<(), Failure> {
        let p = self.statement_for(c, false).await?;
        let (rel, new, old, op) = match c {
            Change::Insert { rel, new } => (rel, Some(new), None, "insert"),
            Change::Update { rel, old, new } => {
                (rel, Some(new), old.as_ref().map(|o| &o.tuple), "update")
            }
            Change::Delete { rel, old } => (rel, None, Some(&old.tuple), "delete"),
            Change::Truncate { .. } => unreachable!("truncates are not pipelined"),
        };
        let params = bind(&p.plan, new, old, rel)?;
        if p.plan.guarded {
            // Identity values checked, not written: alone, to see the row count.
            self.drain().await?;
            let rows = self
                .session
                .client
                .execute_raw(&p.stmt, params)
                .await
                .map_err(|e| Failure {
                    err: ApplyError::from_pg(&e, &rel.table, op),
                    lsn: Some(lsn),
                })?;
            return match row_outcome(1, rows, true) {
                RowOutcome::Applied => Ok(()),
                RowOutcome::IdentityChanged => {
                    let p = self.statement_for(c, true).await?;
                    let params = bind(&p.plan, new, old, rel)?;
                    self.with_identity_override(p, params, rel, op, lsn).await
                }
                RowOutcome::Diverged => Err(Failure {
                    err: diverged(&rel.table, op, rows),
                    lsn: Some(lsn),
                }),
            };
        }
        if !p.plan.identity_override.is_empty() {
            self.drain().await?;
            return self.with_identity_override(p, params, rel, op, lsn).await;
        }
        let mut fut = flight(self.session.client.clone(), p, params, rel.clone(), op, lsn);
        // tokio-postgres sends a request during its future's first poll. Poll each statement
        // once, here and in order, so the target receives them in source order no matter
        // when the queue of in-flight futures is polled afterwards.
        if let Poll::Ready(r) = futures::poll!(&mut fut) {
            fut = Box::pin(futures::future::ready(r));
        }
        self.group.in_flight.push_back(fut);
        if self.group.in_flight.len() >= PIPELINE_DEPTH {
            if let Some(Err(f)) = self.group.in_flight.next().await {
                // The cause; what follows it only failed because the transaction aborted.
                self.group.in_flight = FuturesOrdered::new();
                return Err(f);
            }
        }
        Ok(())
    }

    /// Runs an UPDATE that writes `GENERATED ALWAYS` identity columns, alone, between
    /// `ALTER COLUMN … SET GENERATED BY DEFAULT` and back. Rare: an identity value changed.
    async fn with_identity_override(
        &mut self,
        p: Arc<Prepared>,
        params: Vec<TextParam>,
        rel: &Arc<RelationInfo>,
        op: &'static str,
        lsn: Lsn,
    ) -> Result<(), Failure> {
        let cols = p.plan.identity_override.clone();
        let with_lsn = |err| Failure {
            err,
            lsn: Some(lsn),
        };
        self.set_identity(&rel.table, &cols, "BY DEFAULT", op)
            .await
            .map_err(with_lsn)?;
        flight(self.session.client.clone(), p, params, rel.clone(), op, lsn).await?;
        self.set_identity(&rel.table, &cols, "ALWAYS", op)
            .await
            .map_err(with_lsn)
    }

    /// Waits for every statement in flight; the first failure, in send order, is the cause.
    pub(super) async fn drain(&mut self) -> Result<(), Failure> {
        while let Some(r) = self.group.in_flight.next().await {
            if let Err(f) = r {
                self.group.in_flight = FuturesOrdered::new();
                return Err(f);
            }
        }
        Ok(())
    }

    /// Inserts a run of rows of one relation with one `COPY … FROM STDIN`.
    async fn copy_inserts(
        &mut self,
        rel: &Arc<RelationInfo>,
        changes: &[(Change, Lsn)],
    ) -> Result<(), ApplyError> {
        let p = self.copy_statement(rel).await?;
        let reject = |e: tokio_postgres::Error| ApplyError::from_pg(&e, &rel.table, "insert");
        let sink = self
            .session
            .client
            .copy_in::<_, Bytes>(&p.stmt)
            .await
            .map_err(reject)?;
        let mut sink = std::pin::pin!(sink);
        let mut buf = BytesMut::with_capacity(COPY_BUFFER);
        for (c, _) in changes {
            let Change::Insert { new, .. } = c else {
                unreachable!("copy_inserts gets runs of inserts")
            };
            encode_copy_row(&mut buf, new, rel)?;
            if buf.len() >= COPY_BUFFER {
                sink.send(buf.split().freeze()).await.map_err(reject)?;
            }
        }
        if !buf.is_empty() {
            sink.send(buf.freeze()).await.map_err(reject)?;
        }
        let rows = sink.as_mut().finish().await.map_err(reject)?;
        match row_outcome(changes.len() as u64, rows, false) {
            RowOutcome::Applied => Ok(()),
            _ => Err(diverged(&rel.table, "insert", rows)),
        }
    }

    /// Commits the open group if it ends with a whole source transaction, else rolls it back.
    pub(super) async fn finish_group(&mut self) -> Result<(), Failure> {
        if !self.group.in_txn {
            return Ok(());
        }
        if self.group.complete && self.group.txns > 0 {
            self.commit_group().await
        } else {
            self.rollback().await;
            Ok(())
        }
    }

    /// Rolls the open group back and forgets it.
    pub(super) async fn rollback(&mut self) {
        self.group.in_flight = FuturesOrdered::new();
        self.group.pending = None;
        if self.group.in_txn {
            let _ = self.session.client.batch_execute("ROLLBACK").await;
        }
        self.group.in_txn = false;
        self.group.txns = 0;
        self.group.complete = true;
        self.group.rows.clear();
        self.group.undeferred = false;
    }

    /// Writes the progress row and commits the group; records where its commit lies in the
    /// target's WAL, for durability.
    pub(super) async fn commit_group(&mut self) -> Result<(), Failure> {
        self.flush_inserts().await?;
        // In an aborted transaction COMMIT answers ROLLBACK without an error: every statement
        // must have succeeded before it is sent.
        self.drain().await?;
        let client = &self.session.client;
        let key = &self.session.key;
        let lsn = self.group.end.to_string();
        let params: [&(dyn ToSql + Sync); 4] = [&key.system_id, &key.slot, &key.target, &lsn];
        let progress = client.execute(&self.session.commit_stmts.upsert, &params);
        let commit = client.batch_execute("COMMIT");
        // Sent after COMMIT (prepared: no extra round trip): the insert position is past its
        // commit record.
        let position = client.query_one(&self.session.commit_stmts.position, &[]);
        let (p, c, pos) = futures::join!(progress, commit, position);
        let progress_table = TableName {
            schema: "pgcarve".into(),
            name: "progress".into(),
        };
        p.map_err(|e| ApplyError::from_pg(&e, &progress_table, "commit"))?;
        c.map_err(|e| ApplyError::from_pg(&e, &progress_table, "commit"))?;
        self.group.in_txn = false;
        self.failures = 0;
        self.positions.committed = self.group.end;
        self.retained.reset(self.group.end);
        // The commit succeeded; if the position query failed, the connection is gone and the
        // reconnect reloads progress.
        let pos = pos.map_err(|e| ApplyError::Connection(safe_pg_error(&e)))?;
        let (insert, flush) = (parse_lsn(pos.get(0))?, parse_lsn(pos.get(1))?);
        self.positions.committed_group(self.group.end, insert);
        let txns = self.group.txns;
        self.group.txns = 0;
        for ((_, op), (rel, n)) in self.group.rows.drain() {
            self.metrics
                .rows_applied
                .with_label_values(&[&self.name, &rel.table.to_string(), op])
                .inc_by(n);
        }
        self.metrics
            .transactions_applied
            .with_label_values(&[&self.name])
            .inc_by(txns);
        if let Some(began) = self.group.began.take() {
            self.metrics
                .apply_batch_seconds
                .with_label_values(&[&self.name])
                .observe(began.elapsed().as_secs_f64());
        }
        self.publish(TargetState::Streaming);
        self.advance_durable(flush);
        Ok(())
    }
}

/// The deferrable constraints whose checks may be queued on these tables: their own
/// (foreign keys, deferrable unique and exclusion constraints) and foreign keys referencing
/// them. Schema-qualified and quoted, ready for `SET CONSTRAINTS`.
const DEFERRABLE_CONSTRAINTS_SQL: &str = "\
    SELECT coalesce(string_agg(DISTINCT format('%I.%I', n.nspname, c.conname), ', '), '') \
    FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace \
    WHERE c.condeferrable AND ($2 OR NOT c.condeferred) \
      AND (c.conrelid = ANY($1::text[]::regclass[]) OR c.confrelid = ANY($1::text[]::regclass[]))";

impl Worker {
    /// Fires now the deferred checks queued on `tables`, before a TRUNCATE or an ALTER TABLE on
    /// them (PostgreSQL refuses both on a table with pending trigger events, 55006). Target
    /// transactions defer every deferrable constraint to the commit, because a source statement
    /// that touched several rows arrives as one statement per row and an initially-immediate
    /// deferrable constraint held only at the end of the source's statement: at a source
    /// statement boundary such as this one, those held on the source. Initially deferred ones
    /// are included only when asked (`all`): the source checks them at its commit, and mid-way
    /// they may not hold yet. Returns whether any constraint was made immediate.
    pub(super) async fn check_deferred_now(
        &mut self,
        tables: &[TableName],
        all: bool,
        op: &'static str,
    ) -> Result<bool, ApplyError> {
        let Some(first) = tables.first() else {
            return Ok(false);
        };
        let quoted: Vec<String> = tables.iter().map(TableName::quoted).collect();
        let client = &self.session.client;
        let names: String = client
            .query_one(DEFERRABLE_CONSTRAINTS_SQL, &[&quoted, &all])
            .await
            .map_err(|e| ApplyError::from_pg(&e, first, op))?
            .get(0);
        if names.is_empty() {
            return Ok(false);
        }
        client
            .batch_execute(&format!("SET CONSTRAINTS {names} IMMEDIATE"))
            .await
            .map_err(|e| ApplyError::from_pg(&e, first, op))?;
        Ok(true)
    }

    /// Defers every deferrable constraint again, the state each target transaction starts in
    /// (by name it could also hit a same-named non-deferrable constraint of another table).
    pub(super) async fn defer_again(
        &mut self,
        table: &TableName,
        op: &'static str,
    ) -> Result<(), ApplyError> {
        self.session
            .client
            .batch_execute("SET CONSTRAINTS ALL DEFERRED")
            .await
            .map_err(|e| ApplyError::from_pg(&e, table, op))
    }
}

/// Executes one bound row statement and checks that it touched exactly one row.
fn flight(
    client: Arc<Client>,
    p: Arc<Prepared>,
    params: Vec<TextParam>,
    rel: Arc<RelationInfo>,
    op: &'static str,
    lsn: Lsn,
) -> Flight {
    Box::pin(async move {
        let failed = |err| Failure {
            err,
            lsn: Some(lsn),
        };
        let rows = client
            .execute_raw(&p.stmt, params)
            .await
            .map_err(|e| failed(ApplyError::from_pg(&e, &rel.table, op)))?;
        match row_outcome(1, rows, false) {
            RowOutcome::Applied => Ok(()),
            _ => Err(failed(diverged(&rel.table, op, rows))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_is_applied_anything_else_diverged() {
        assert_eq!(row_outcome(1, 1, false), RowOutcome::Applied);
        assert_eq!(row_outcome(1, 0, false), RowOutcome::Diverged);
        assert_eq!(row_outcome(1, 2, false), RowOutcome::Diverged);
    }

    #[test]
    fn a_guarded_update_matching_nothing_means_the_identity_changed() {
        assert_eq!(row_outcome(1, 1, true), RowOutcome::Applied);
        assert_eq!(row_outcome(1, 0, true), RowOutcome::IdentityChanged);
        assert_eq!(row_outcome(1, 3, true), RowOutcome::Diverged);
    }

    #[test]
    fn a_copy_must_write_every_row_of_its_run() {
        assert_eq!(row_outcome(500, 500, false), RowOutcome::Applied);
        assert_eq!(row_outcome(500, 499, false), RowOutcome::Diverged);
    }
}
