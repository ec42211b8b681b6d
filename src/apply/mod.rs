//! Apply: one task per target, owning its connection, fed by a bounded queue (`crate::link`).
//!
//! Every source transaction's changes for this target are applied inside one target
//! transaction, together with the progress row (`pgcarve.progress`) holding that source
//! transaction's commit end LSN. Consecutive source transactions already waiting in the queue
//! are grouped into one target transaction (group commit, `group`); a source transaction is
//! never split. The task publishes what the target holds *durably* on a `watch`
//! (`durability`), and the reader decides from it what may be confirmed to the slot.
//!
//! Exactly once: the progress row commits atomically with the rows, so after any crash the
//! target's progress LSN says exactly which source transactions it holds. The reader skips those
//! when it streams again; the task also skips any transaction whose commit LSN lies below its
//! progress (after a reconnect it reloads the progress row first, because a COMMIT whose answer
//! was lost may have succeeded).
//!
//! Failure (`failure`): a change the target rejects rolls the group back, is logged and
//! counted (SQLSTATE, table, target, LSN; never values) and stalls the task; after a backoff it
//! applies the group again from the chunks it kept (`retained`) and goes on with its queue,
//! which spooled meanwhile. The other targets never wait for it, and the slot keeps everything
//! it has not made durable.
//!
//! | file          | what it holds                                                         |
//! |---------------|-----------------------------------------------------------------------|
//! | `prepare`     | start-up: inspect the target (read-only), list problems, then act      |
//! | `group`       | the open group: pipelined statements, COPY runs, commit, row counts    |
//! | `stmt_cache`  | statement kinds and prepared statements per relation and shape         |
//! | `statements`  | the SQL of each kind, pure                                             |
//! | `bind`        | values as text parameters and COPY rows                                |
//! | `durability`  | committed vs flushed, and what may be published                        |
//! | `failure`     | the stalled state and the retry                                        |
//! | `retained`    | the open group's chunks, kept for a retry                              |
//! | `progress`    | the `pgcarve.progress` table                                           |
//! | `error`       | [`ApplyError`]: what failed, without values                            |

mod bind;
mod durability;
pub mod error;
mod failure;
mod group;
pub mod prepare;
pub mod progress;
mod retained;
pub mod statements;
mod stmt_cache;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::ApplyConfig;
use crate::conninfo::ConnInfo;
use crate::link::queue::QueueRx;
use crate::link::{ApplyMsg, TargetState, TargetStatus};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::tls::TlsConnector;

pub use bind::TextParam;
pub use error::ApplyError;
pub use prepare::StartError;

use durability::{CommitStatements, Durability};
use failure::{Failure, Stall};
use group::Group;
use progress::ProgressKey;
use retained::{Replay, Retained};
use stmt_cache::StmtCache;

/// How often an idle target's WAL flush position is read while commits await durability.
const FLUSH_POLL: Duration = Duration::from_millis(100);

/// Idle polls after which the remaining commits are made durable with a synchronous commit.
const IDLE_POLLS_BEFORE_FORCE: u32 = 10;

/// The target connection and what is prepared on it.
struct Session {
    /// Where the target is.
    conn: ConnInfo,
    /// Its TLS settings (for reconnects).
    tls: TlsConnector,
    /// The open connection.
    client: Arc<Client>,
    /// The progress upsert and WAL-position query.
    commit_stmts: CommitStatements,
    /// This target's progress row.
    key: ProgressKey,
}

/// Cancels the statement a target's apply task is running, so a stop never waits for a lock
/// on the target. Follows the task's reconnects.
#[derive(Clone)]
pub struct Canceller {
    token: Arc<std::sync::Mutex<tokio_postgres::CancelToken>>,
    tls: TlsConnector,
}

impl Canceller {
    fn new(client: &Client, tls: TlsConnector) -> Canceller {
        Canceller {
            token: Arc::new(std::sync::Mutex::new(client.cancel_token())),
            tls,
        }
    }

    /// Points at a new connection of the task.
    fn follow(&self, client: &Client) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = client.cancel_token();
    }

    /// Asks the target to cancel the running statement (within 5 s, or gives up); the
    /// statement then fails with 57014 and its group rolls back. The reason when it could not.
    pub async fn cancel(&self) -> Result<(), String> {
        let token = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let cancel = token.cancel_query(self.tls.clone());
        match tokio::time::timeout(Duration::from_secs(5), cancel).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(crate::pg::safe_pg_error(&e)),
            Err(_) => Err("no answer within 5 s".into()),
        }
    }
}

/// One target's apply task.
pub struct Worker {
    /// Target name (metric labels, logs).
    name: String,
    /// The connection.
    session: Session,
    /// The target's catalog and prepared statements.
    cache: StmtCache,
    /// The open target transaction.
    group: Group,
    /// Committed and durable positions.
    positions: Durability,
    /// Failed attempts since the last successful commit (the backoff grows with them).
    failures: u32,
    /// After a failure, until the transactions of the failed group are committed: one source
    /// transaction per target transaction (see [`failure`]).
    one_by_one_until: Lsn,
    /// `Some` while stalled after a failure.
    stall: Option<Stall>,
    /// The open group's chunks, for a retry that needs nothing from the slot.
    retained: Retained,
    cfg: ApplyConfig,
    metrics: Metrics,
    /// Where the task publishes its status for the reader and `/health`.
    status: watch::Sender<TargetStatus>,
    /// Wakes the reader when the status changes.
    wake: Arc<tokio::sync::Notify>,
    /// Cancels the running statement on a stop.
    canceller: Canceller,
}

impl Worker {
    /// What cancels this task's running statement.
    pub fn canceller(&self) -> Canceller {
        self.canceller.clone()
    }

    /// The committed LSN (at start-up also durable: `prepare` flushes it).
    pub fn committed(&self) -> Lsn {
        self.positions.committed
    }

    fn publish(&self, state: TargetState) {
        let up = i64::from(state == TargetState::Streaming);
        let name = match &state {
            TargetState::Starting => "starting",
            TargetState::Streaming => "streaming",
            TargetState::Stalled {
                needs_operator: true,
                ..
            } => "failed",
            TargetState::Stalled { .. } => "retrying",
        };
        self.metrics.set_target_state(&self.name, name);
        self.metrics
            .target_up
            .with_label_values(&[&self.name])
            .set(up);
        self.status.send_replace(TargetStatus {
            committed: self.positions.durable,
            state,
        });
        self.wake.notify_one();
    }

    /// Starts the apply task. The target takes changes from now on: it says so before the
    /// task first runs, so the reader can never see a transaction begin while it is Starting.
    pub fn spawn(self, rx: QueueRx) -> tokio::task::JoinHandle<()> {
        self.publish(TargetState::Streaming);
        tokio::spawn(self.run(rx))
    }

    /// Runs until the queue closes (the reader is gone). Two states: applying, and stalled
    /// after a failure (`self.stall`, see [`failure`]).
    async fn run(mut self, mut rx: QueueRx) {
        let mut carry: Option<ApplyMsg> = None;
        // A failed group being applied again (see [`retained`]), before anything new.
        let mut replay = Replay::default();
        let mut idle_polls = 0u32;
        let mut told_stalled = false;
        loop {
            // The queue spools for a task that waits to retry from what it kept.
            let waiting = self.stall.as_ref().is_some_and(|s| s.keeps_queue());
            if waiting != told_stalled {
                rx.set_stalled(waiting);
                told_stalled = waiting;
            }
            if let Some(stall) = &self.stall {
                if stall.from_slot {
                    // The stream brings everything after what the target holds again: what a
                    // retry had not applied yet must not go before it (or skip it).
                    replay = Replay::default();
                }
                if stall.keeps_queue() {
                    // Waiting to retry from what it kept: the queue is left as it is (it spools),
                    // barriers are answered at once, a halt stops it for good.
                    rx.answer_barriers(self.positions.durable);
                    if let Some(reason) = rx.take_halt() {
                        self.stall(ApplyError::Halted(reason), None).await;
                        continue;
                    }
                    if rx.is_closed() {
                        break;
                    }
                    let retry_at = stall.retry_at;
                    tokio::select! {
                        _ = rx.control_changed() => {}
                        _ = tokio::time::sleep_until(retry_at) => {
                            if let Some(kept) = self.retry_from_kept().await {
                                // What an earlier retry had not applied yet when it failed
                                // comes after what it applied again.
                                replay = kept.followed_by(std::mem::take(&mut replay));
                            }
                        }
                    }
                    continue;
                }
                // Waiting for the stream again, or for an operator: discard chunks, answer
                // barriers, retry after the backoff.
                let (retry_at, waiting) = (stall.retry_at, !stall.ready && !stall.needs_operator);
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Ok(None) => break,
                        Ok(Some(ApplyMsg::Chunk { .. })) | Err(_) => {}
                        // Stalled already, maybe for a retryable error: a halt must still stop
                        // it for good, or the next retry would carry on past it.
                        Ok(Some(ApplyMsg::Halt(reason))) => {
                            self.stall(ApplyError::Halted(reason), None).await;
                        }
                        Ok(Some(ApplyMsg::Barrier(reply))) => self.barrier_while_stalled(reply).await,
                    },
                    _ = tokio::time::sleep_until(retry_at), if waiting => self.retry_ready(),
                }
                continue;
            }
            // Applying.
            let msg = match carry.take().or_else(|| replay.pop_front()) {
                Some(m) => m,
                // The kept chunks could not all be read back: the slot has them.
                None if replay.lost => {
                    replay = Replay::default();
                    self.retained.give_up();
                    let err =
                        ApplyError::Kept("the failed group's file could not be read back".into());
                    self.stall(err, None).await;
                    continue;
                }
                // (Inside an open target transaction a poll would share its fate: after a
                // failed pipelined statement it would fail too, and hide the cause.)
                None if self.positions.undurable.is_empty() || self.group.in_txn => {
                    match rx.recv().await {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => {
                            self.spool_lost(&e);
                            continue;
                        }
                    }
                }
                // Idle with commits not yet known durable: watch the target's WAL flush.
                None => tokio::select! {
                    m = rx.recv() => match m {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => {
                            self.spool_lost(&e);
                            continue;
                        }
                    },
                    _ = tokio::time::sleep(FLUSH_POLL) => {
                        idle_polls += 1;
                        // The WAL flush may stop short of a group's position (a page
                        // boundary) while nothing else is written: then force it.
                        let r = if idle_polls >= IDLE_POLLS_BEFORE_FORCE {
                            idle_polls = 0;
                            self.make_durable().await
                        } else {
                            self.poll_flush().await
                        };
                        if let Err(e) = r {
                            self.stall(e, None).await;
                        }
                        continue;
                    }
                },
            };
            match msg {
                ApplyMsg::Halt(reason) => {
                    self.stall(ApplyError::Halted(reason), None).await;
                }
                ApplyMsg::Barrier(reply) => {
                    // The reader restarts from what is durable: make everything durable first,
                    // so it need not send again what this target already has.
                    let done = match self.finish_group().await {
                        Ok(()) => self.make_durable().await.map_err(Failure::from),
                        Err(f) => Err(f),
                    };
                    // What was not committed comes again with the new stream.
                    self.retained.reset(self.positions.committed);
                    // Answer first: the reader waits for every target's answer.
                    let _ = reply.send(self.positions.durable);
                    if let Err(f) = done {
                        self.stall(f.err, f.lsn).await;
                    }
                }
                ApplyMsg::Chunk {
                    xact,
                    changes,
                    commit,
                } => {
                    if xact.final_lsn >= self.positions.committed {
                        self.retained.keep(&xact, &changes, commit);
                    }
                    if let Err(f) = self.apply_chunk(&xact, changes, commit).await {
                        // A statement sent earlier may have failed first: report the cause,
                        // not what the aborted transaction did to the statements after it.
                        let f = match self.drain().await {
                            Err(first) => first,
                            Ok(()) => f,
                        };
                        self.stall(f.err, f.lsn.or(Some(xact.final_lsn))).await;
                        continue;
                    }
                    // (A transaction skipped as already applied opens no target transaction:
                    // nothing to commit.)
                    if commit.is_some() && self.group.in_txn {
                        if self.group.txns < self.cfg.group_transactions as u64
                            && !self.one_by_one()
                        {
                            // (Never past kept chunks that could not be read back.)
                            let next = replay.pop_front().or_else(|| {
                                if replay.lost {
                                    None
                                } else {
                                    rx.try_recv()
                                }
                            });
                            if let Some(next) = next {
                                carry = Some(next);
                                continue;
                            }
                        }
                        if let Err(f) = self.commit_group().await {
                            self.stall(f.err, f.lsn.or(Some(xact.final_lsn))).await;
                        }
                    }
                }
            }
        }
        if self.group.in_txn {
            let _ = self.session.client.batch_execute("ROLLBACK").await;
        }
        // Leave nothing undurable behind (the next start would otherwise redo it).
        let _ = self.make_durable().await;
    }
}
