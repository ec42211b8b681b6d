//! A target that rejected a change, or lost its connection: the stalled state.
//!
//! Names: a [`Failure`] is one failed attempt (the error and the source transaction it belongs
//! to); [`Stall`] is the state the task is in until a retry succeeds; [`Worker::stall`] enters
//! it. The task rolls back and waits out a backoff, in one of two ways:
//!
//! - **From what it kept** (the usual case): the failed group's chunks are in
//!   [`super::retained`], and what came after is in the queue, which spools while the task does
//!   not take it (`link::queue`). The other targets never wait. After the backoff the task
//!   reconnects, reloads its progress and applies the kept chunks again, then the queue.
//! - **From the slot**: the kept chunks could not be written or read back (a disk error), or
//!   the target lost commits that were not on its disk yet. The task discards what it is sent, and after the backoff publishes
//!   "retry ready"; the reader restarts the stream from the slot's confirmed position (held back
//!   by this target), and the next barrier resumes applying.
//!
//! Either way nothing is skipped: the slot keeps everything the target has not made durable.
//!
//! After a failure the transactions of the failed group are retried one source transaction per
//! target transaction ([`Worker::one_by_one`]), so the good ones before the bad one commit and
//! the bad one is named with its exact LSN.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::durability::CommitStatements;
use super::error::ApplyError;
use super::prepare::{load_table, open_session};
use super::progress;
use super::statements::PlanError;
use super::Worker;
use crate::backoff::backoff;
use crate::link::TargetState;
use crate::lsn::Lsn;
use crate::pg::safe_pg_error;

/// One failed attempt: the error, with the commit LSN of the source transaction it belongs to
/// when known (a pipelined statement may fail after later transactions were sent).
pub(super) struct Failure {
    /// What went wrong (value-free).
    pub err: ApplyError,
    /// The source transaction's commit LSN.
    pub lsn: Option<Lsn>,
}

impl From<ApplyError> for Failure {
    fn from(err: ApplyError) -> Failure {
        Failure { err, lsn: None }
    }
}

impl From<PlanError> for Failure {
    fn from(err: PlanError) -> Failure {
        ApplyError::Plan(err).into()
    }
}

/// The stalled state: what failed, and when the next retry may start.
pub(super) struct Stall {
    /// The last failure's error.
    err: ApplyError,
    /// The source transaction it belongs to, when known.
    lsn: Option<Lsn>,
    /// Consecutive failed attempts (what the backoff grows with).
    attempts: u32,
    /// When the backoff ends.
    pub retry_at: Instant,
    /// The backoff has ended and "retry ready" is published: the next barrier retries.
    pub ready: bool,
    /// No retry: an operator must act first (the task stays stalled until it stops).
    pub needs_operator: bool,
    /// The retry needs the stream again from the slot (nothing kept to retry from).
    pub from_slot: bool,
}

impl Stall {
    /// Waiting to retry from what the task kept: the queue is left to spool.
    pub fn keeps_queue(&self) -> bool {
        !self.needs_operator && !self.from_slot
    }
}

impl Worker {
    /// Still retrying the transactions of a failed group one by one.
    pub(super) fn one_by_one(&self) -> bool {
        self.positions.committed <= self.one_by_one_until && self.one_by_one_until > Lsn::ZERO
    }

    /// Enters the stalled state after `err` (in the source transaction `lsn`, when known):
    /// rolls back, counts, logs and publishes it.
    pub(super) async fn stall(&mut self, err: ApplyError, lsn: Option<Lsn>) {
        self.rollback().await;
        self.one_by_one_until = self
            .one_by_one_until
            .max(self.group.last)
            .max(lsn.unwrap_or(Lsn::ZERO));
        // Counted across retries until a group commits, so the backoff grows while the same
        // change keeps failing.
        self.failures = self.failures.saturating_add(1);
        let attempts = self.failures;
        self.metrics
            .errors_total
            .with_label_values(&[&self.name, &err.class()])
            .inc();
        let delay = backoff(
            self.cfg.retry_initial_secs,
            self.cfg.retry_max_secs,
            attempts,
        );
        let (table, constraint, column) = match &err {
            ApplyError::Rejected {
                table,
                constraint,
                column,
                ..
            } => (Some(table.to_string()), constraint.clone(), column.clone()),
            ApplyError::Divergence { table, .. } => (Some(table.to_string()), None, None),
            _ => (None, None, None),
        };
        tracing::error!(
            target_name = %self.name,
            table = table.as_deref().unwrap_or(""),
            lsn = %lsn.unwrap_or(self.positions.committed),
            sqlstate = err.sqlstate().unwrap_or(""),
            constraint = constraint.as_deref().unwrap_or(""),
            column = column.as_deref().unwrap_or(""),
            error_kind = %err.class(),
            attempt = attempts,
            retry_in_secs = delay.as_secs_f64(),
            needs_operator = err.needs_operator(),
            "apply failed; target stalled, other targets continue: {}",
            err
        );
        let needs_operator = err.needs_operator();
        if needs_operator {
            self.persist_halt(&err).await;
        }
        self.publish(TargetState::Stalled {
            attempts,
            retry_ready: false,
            needs_operator,
            error: err.to_string(),
        });
        // Once the slot must send again, it stays so until a barrier resumes the task.
        let from_slot =
            !self.retained.complete() || self.stall.as_ref().is_some_and(|s| s.from_slot);
        self.stall = Some(Stall {
            from_slot,
            needs_operator,
            err,
            lsn,
            attempts,
            retry_at: Instant::now() + delay,
            ready: false,
        });
    }

    /// Records on the target why it stopped, so a restart does not stream on past it.
    async fn persist_halt(&mut self, err: &ApplyError) {
        let key = &self.session.key;
        let lsn = self.positions.committed.to_string();
        let reason = err.to_string();
        let params: [&(dyn postgres_types::ToSql + Sync); 5] =
            [&key.system_id, &key.slot, &key.target, &lsn, &reason];
        if let Err(e) = self
            .session
            .client
            .execute(progress::HALT_SQL, &params)
            .await
        {
            tracing::error!(
                target_name = %self.name,
                "could not record the stop in pgcarve.progress ({}): after a restart, check this target before it streams again",
                safe_pg_error(&e)
            );
        }
    }

    /// The backoff ended: say so, so the reader restarts the stream for the retry.
    pub(super) fn retry_ready(&mut self) {
        let Some(stall) = self.stall.as_mut() else {
            return;
        };
        stall.ready = true;
        let state = TargetState::Stalled {
            attempts: stall.attempts,
            retry_ready: true,
            needs_operator: false,
            error: stall.err.to_string(),
        };
        self.publish(state);
    }

    /// The backoff ended for a task that kept its failed group: reconnect, reload, and hand back
    /// the kept chunks to apply again (`None` when it stalled again, or must wait for the
    /// stream: the target lost commits that were not on its disk yet).
    pub(super) async fn retry_from_kept(&mut self) -> Option<super::Replay> {
        let lsn = self.stall.as_ref().and_then(|s| s.lsn);
        if let Err(e) = self.reconnect_if_needed().await {
            self.stall(e, lsn).await;
            return None;
        }
        if !self.retained.covers(self.positions.committed) {
            tracing::warn!(
                target_name = %self.name,
                committed = %self.positions.committed,
                "the target holds less than when the failed group began; retrying from the slot"
            );
            if let Some(stall) = self.stall.as_mut() {
                stall.from_slot = true;
            }
            self.retained.reset(self.positions.committed);
            self.retry_ready();
            return None;
        }
        tracing::info!(target_name = %self.name, committed = %self.positions.committed, "retrying target from what it kept");
        self.stall = None;
        self.publish(TargetState::Streaming);
        Some(self.retained.take(self.positions.committed))
    }

    /// The queue could not read this target's spool back: it is detached (the reader restarts
    /// the stream for it once it has applied what it holds).
    /// `reason` is value-free: a file error, or a record error, which names no content.
    pub(super) fn spool_lost(&mut self, reason: &str) {
        tracing::error!(target_name = %self.name, committed = %self.positions.committed, "cannot read the spool back ({reason}); the target is detached and rejoins from the slot");
    }

    /// A barrier while stalled: before the backoff ends, answer it; after, retry — reconnect
    /// and reload, take changes again, then answer. A retry that fails stalls again.
    pub(super) async fn barrier_while_stalled(&mut self, reply: oneshot::Sender<Lsn>) {
        let Some(stall) = self.stall.as_ref() else {
            return;
        };
        if !stall.ready {
            let _ = reply.send(self.positions.durable);
            return;
        }
        let lsn = stall.lsn;
        let resumed = self.reconnect_if_needed().await;
        if resumed.is_ok() {
            self.retained.reset(self.positions.committed);
            // Taking changes before the reader hears the answer.
            tracing::info!(target_name = %self.name, committed = %self.positions.committed, "retrying target");
            self.stall = None;
            self.publish(TargetState::Streaming);
        }
        let _ = reply.send(self.positions.durable);
        if let Err(e) = resumed {
            self.stall(e, lsn).await;
        }
    }

    /// After a failure: reconnect when the connection is gone, and always reload the progress
    /// row (a lost COMMIT answer may hide a successful commit).
    async fn reconnect_if_needed(&mut self) -> Result<(), ApplyError> {
        let conn_err = |e: tokio_postgres::Error| ApplyError::Connection(safe_pg_error(&e));
        // A new connection replaces the old one only once the progress row is read from it,
        // so `committed` never outlives a failed reload.
        let (client, commit_stmts) = if self.session.client.is_closed() {
            let client = Arc::new(
                open_session(&self.session.conn, &self.session.tls)
                    .await
                    .map_err(conn_err)?,
            );
            let stmts = CommitStatements::prepare(&client).await.map_err(conn_err)?;
            (client, Some(stmts))
        } else {
            (self.session.client.clone(), None)
        };
        // A retry may write: the progress table comes back if someone dropped it (it is
        // empty then, and a target that had made anything durable stops on ProgressRewound).
        client
            .batch_execute(progress::CREATE_SQL)
            .await
            .map_err(conn_err)?;
        let reloaded = progress::read(&client, &self.session.key)
            .await
            .map_err(conn_err)?
            .map_or(Lsn::ZERO, |p| p.lsn);
        // The cause may have been fixed in the target's schema (a column added, a trigger or a
        // rule changed): plan from its catalog as it is now.
        let mut tables = HashMap::with_capacity(self.cache.owned.len());
        for name in &self.cache.owned {
            // A table gone from the target fails only the changes that reach it.
            if let Some(tt) = load_table(&client, name).await.map_err(conn_err)? {
                tables.insert(name.clone(), tt);
            }
        }
        self.cache.reload(tables);
        if let Some(stmts) = commit_stmts {
            self.canceller.follow(&client);
            self.session.client = client;
            self.session.commit_stmts = stmts;
        }
        let p = &mut self.positions;
        // Ahead: a COMMIT whose answer was lost did succeed. Behind what was durable: the
        // target lost what it had on disk; never skip past that silently. Between the two: a
        // target crash took asynchronous commits that were not flushed yet, which the slot
        // still holds: apply them again.
        if reloaded < p.durable {
            return Err(ApplyError::ProgressRewound {
                from: p.durable,
                to: reloaded,
            });
        }
        if reloaded < p.committed {
            tracing::warn!(
                target_name = %self.name,
                committed = %p.committed,
                durable = %p.durable,
                reloaded = %reloaded,
                "the target lost asynchronous commits (a crash before its WAL flush); the slot still holds them: applying them again"
            );
        }
        p.undurable.retain(|(lsn, _)| *lsn <= reloaded);
        p.committed = reloaded;
        // What the target has now is read from it: make it durable, so the slot can move even
        // if no group commits soon (the groups' positions may not cover it).
        self.make_durable().await
    }
}
