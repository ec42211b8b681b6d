//! The reader's dealings with the targets' queues: sending (waiting only while a target
//! takes its share; see `link::queue` for when it is spooled for instead), which targets get
//! the transactions that begin, the barrier that quiesces every target, and when a target
//! needs the stream again.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Reader, ReaderError, TargetLink};
use crate::link::queue::Push;
use crate::link::{ApplyMsg, TargetState};
use crate::lsn::Lsn;
use crate::source::conn::ReplicationConn;

impl Reader {
    /// Each target's spool and detachment, in the metrics and `/health` (a target is also
    /// detached by a spool the apply side cannot read back: the queue is the one truth).
    pub(super) fn publish_queues(&self) {
        let mut spools = Vec::with_capacity(self.links.len());
        for l in &self.links {
            let (bytes, detached) = (l.tx.spooled_bytes(), l.tx.is_detached());
            let label = [l.name.as_str()];
            let m = &self.metrics;
            m.spool_bytes
                .with_label_values(&label)
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            m.target_detached
                .with_label_values(&label)
                .set(i64::from(detached));
            spools.push((l.name.clone(), bytes, detached));
        }
        self.health.set_spools(spools);
    }

    /// How long a stream restart waits for a target's answer to its barrier: long enough for
    /// a healthy target to commit what it holds, short enough that a hung one costs the others
    /// little.
    pub(super) fn restart_patience(&self) -> Duration {
        Duration::from_secs_f64(self.settings.apply.stall_secs).max(Duration::from_secs(5))
    }

    /// Quiesces every target and resets the dispatch state to what each has committed. A
    /// target that does not answer within `patience` (a lock, a dead connection) is not
    /// waited for: it counts at what its status says is durable, and the barrier stays in its
    /// queue, so it settles what it holds before what the new stream sends it. (A stalled
    /// target answers at once.)
    pub(super) async fn barrier(&mut self, patience: Duration) -> Result<(), ReaderError> {
        let mut replies = Vec::with_capacity(self.links.len());
        for l in &self.links {
            let (tx, rx) = oneshot::channel();
            if let Push::Closed = l.tx.try_push(ApplyMsg::Barrier(tx), true) {
                return Err(ReaderError::TargetGone(l.name.clone()));
            }
            replies.push(rx);
        }
        let deadline = tokio::time::Instant::now() + patience;
        let mut committed = Vec::with_capacity(replies.len());
        for (l, rx) in self.links.iter().zip(replies) {
            let c = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(c)) => c,
                Ok(Err(_)) => return Err(ReaderError::TargetGone(l.name.clone())),
                Err(_) => {
                    let durable = l.status.borrow().committed;
                    tracing::warn!(target_name = %l.name, committed = %durable, "target did not answer the barrier in time; counting it at what it made durable");
                    durable
                }
            };
            committed.push(c);
        }
        // Confirm what the barrier made durable before forgetting what was in flight.
        self.update_confirmed();
        for (l, c) in self.links.iter_mut().zip(committed) {
            l.pos.reset(c);
        }
        self.publish_queues();
        self.open = None;
        self.idle_wal_end = None;
        // The stream restarts from the confirmed position: everything after it will be read
        // again, so it no longer counts as processed. Without this, a target that was reset to
        // an older position would not be pending, and we would confirm past what it needs.
        self.last_processed = self.confirmed;
        Ok(())
    }

    /// Sends to a target: into its queue, or its spool while it does not take changes (see
    /// `link::queue`), waiting only while it takes them slower than we read (backpressure),
    /// with the source connection kept alive by status updates meanwhile. A target whose spool
    /// overflows is detached: it stays pending at what it holds until it rejoins.
    pub(super) async fn send(
        &mut self,
        conn: &mut ReplicationConn,
        i: usize,
        msg: ApplyMsg,
    ) -> Result<(), ReaderError> {
        let tx = self.links[i].tx.clone();
        let lsn = match &msg {
            ApplyMsg::Chunk { xact, .. } => Some(xact.final_lsn),
            _ => None,
        };
        let mut msg = msg;
        let mut status_at = Instant::now() + Duration::from_secs(5);
        // Whether another target takes its share (a spool would help it) is asked only once
        // this one's memory is full.
        let mut others_live = None;
        loop {
            let until = match tx.try_push(msg, others_live.unwrap_or(false)) {
                Push::Queued | Push::Spooled | Push::Dropped { first: false, .. } => return Ok(()),
                Push::Dropped {
                    first: true,
                    reason,
                } => {
                    let l = &self.links[i];
                    tracing::warn!(
                        target_name = %l.name,
                        lsn = %lsn.unwrap_or(Lsn::ZERO),
                        committed = %l.status.borrow().committed,
                        "target detached: {reason}; the slot keeps what it lacks, and it rejoins by one stream restart once it has applied what it holds"
                    );
                    self.publish_queues();
                    return Ok(());
                }
                Push::Closed => return Err(ReaderError::TargetGone(self.links[i].name.clone())),
                Push::Wait(m, until) => {
                    msg = m;
                    if others_live.is_none() {
                        others_live = Some(
                            self.links
                                .iter()
                                .enumerate()
                                .any(|(j, l)| j != i && Self::takes(l) && !l.tx.is_sick()),
                        );
                        continue;
                    }
                    until
                }
            };
            // Without an instant, look again each second: another target may take again.
            let sick_at = until.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = tx.changed() => {}
                _ = tokio::time::sleep_until(sick_at.into()) => {}
                _ = tokio::time::sleep_until(status_at.into()) => {
                    self.update_lag();
                    self.send_status(conn, true).await?;
                    status_at = Instant::now() + Duration::from_secs(5);
                }
                _ = self.shutdown.cancelled() => return Err(ReaderError::Stopping),
            }
            // The other targets may have changed meanwhile.
            others_live = None;
        }
    }

    /// Whether target `l` gets the transactions that begin now: not while it is detached, nor
    /// once it waits for an operator (the slot keeps them; spooling would only fill the disk).
    pub(super) fn takes(l: &TargetLink) -> bool {
        let operator = matches!(
            l.status.borrow().state,
            TargetState::Stalled {
                needs_operator: true,
                ..
            }
        );
        !operator && !l.tx.is_detached()
    }

    /// A target that needs the stream again: ready to retry after a failure the queue could
    /// not keep (`retry_ready`), or detached and done with what it holds. One restart per
    /// need: a target that has not reached the barrier of the restart made for it yet (it may
    /// first discard a long queue) asks for no other.
    pub(super) fn needs_restream(&mut self) -> bool {
        let mut needed = false;
        for l in &mut self.links {
            if std::mem::take(&mut l.rejoin) {
                needed = true;
                continue;
            }
            let wants = {
                let status = l.status.borrow();
                match status.state {
                    TargetState::Stalled {
                        retry_ready: true, ..
                    } => true,
                    TargetState::Streaming => l.tx.is_detached() && l.tx.is_empty(),
                    _ => false,
                }
            };
            if !wants {
                l.restart_asked = false;
            } else if !l.restart_asked {
                l.restart_asked = true;
                needed = true;
            }
        }
        needed
    }
}
