//! The queue from the reader to one apply task, bounded by row changes rather than messages.
//!
//! A bound in messages cannot serve both shapes of traffic: for bulk transactions a message is a
//! chunk of thousands of changes, for single-row transactions it is one change, and a small
//! message bound starves group commit of transactions to group (each COMMIT then covers only
//! what fit in the queue while the previous one was flushing). Here each message weighs the
//! number of changes it carries (at least 1), and the reader waits while a target's queued
//! changes would exceed `apply.queue_changes`: memory stays bounded, and backpressure still
//! reaches the replication stream.

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::link::ApplyMsg;

/// The reader's end.
#[derive(Clone)]
pub struct QueueTx {
    tx: mpsc::UnboundedSender<(ApplyMsg, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    capacity: u32,
}

/// The apply task's end.
pub struct QueueRx {
    rx: mpsc::UnboundedReceiver<(ApplyMsg, OwnedSemaphorePermit)>,
}

/// The apply task is gone; the message is returned.
#[derive(Debug)]
pub struct Closed;

/// A queue holding at most `capacity` changes (a message heavier than that still fits alone).
pub fn channel(capacity: usize) -> (QueueTx, QueueRx) {
    let capacity = u32::try_from(capacity.max(1)).unwrap_or(u32::MAX >> 4);
    let (tx, rx) = mpsc::unbounded_channel();
    (
        QueueTx {
            tx,
            budget: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
        },
        QueueRx { rx },
    )
}

/// How much of the budget a message takes.
pub fn weight(msg: &ApplyMsg, capacity: u32) -> u32 {
    let n = match msg {
        ApplyMsg::Chunk { changes, .. } => changes.len(),
        ApplyMsg::Barrier(_) | ApplyMsg::Halt(_) => 1,
    };
    u32::try_from(n).unwrap_or(u32::MAX).clamp(1, capacity)
}

impl QueueTx {
    /// Waits until `weight` changes fit. Cancel-safe: dropping the future gives nothing up.
    pub async fn room(&self, weight: u32) -> OwnedSemaphorePermit {
        self.budget
            .clone()
            .acquire_many_owned(weight.min(self.capacity))
            .await
            .expect("the budget semaphore is never closed")
    }

    /// Queues a message with the room taken for it.
    pub fn push(&self, msg: ApplyMsg, room: OwnedSemaphorePermit) -> Result<(), Closed> {
        self.tx.send((msg, room)).map_err(|_| Closed)
    }

    /// Waits for room, then queues.
    pub async fn send(&self, msg: ApplyMsg) -> Result<(), Closed> {
        let room = self.room(weight(&msg, self.capacity)).await;
        self.push(msg, room)
    }

    /// The weight of `msg` in this queue.
    pub fn weight(&self, msg: &ApplyMsg) -> u32 {
        weight(msg, self.capacity)
    }
}

impl QueueRx {
    /// The next message; its room is given back as it is taken. `None` once the reader is gone.
    pub async fn recv(&mut self) -> Option<ApplyMsg> {
        self.rx.recv().await.map(|(m, _room)| m)
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<ApplyMsg> {
        self.rx.try_recv().ok().map(|(m, _room)| m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{Change, XactInfo};
    use crate::lsn::Lsn;

    fn chunk(n: usize) -> ApplyMsg {
        let rel = Arc::new(crate::link::RelationInfo {
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
        ApplyMsg::Chunk {
            xact: XactInfo {
                final_lsn: Lsn(1),
                commit_time: 0,
                xid: 1,
            },
            changes: (0..n)
                .map(|_| Change::Insert {
                    rel: rel.clone(),
                    new: Default::default(),
                })
                .collect(),
            commit: None,
        }
    }

    #[tokio::test]
    async fn bounded_by_changes_and_room_returns_on_receipt() {
        let (tx, mut rx) = channel(10);
        tx.send(chunk(6)).await.unwrap();
        tx.send(chunk(0)).await.unwrap(); // weighs 1
                                          // 7 of 10 taken: 3 more fit, 4 do not.
        let full = tokio::time::timeout(std::time::Duration::from_millis(50), tx.send(chunk(4)));
        assert!(full.await.is_err(), "4 changes must wait");
        tx.send(chunk(3)).await.unwrap();
        assert!(rx.try_recv().is_some());
        // The first message's 6 are back: a chunk heavier than the whole budget still fits alone.
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_some());
        tx.send(chunk(25)).await.unwrap();
        assert!(
            matches!(rx.recv().await, Some(ApplyMsg::Chunk { changes, .. }) if changes.len() == 25)
        );
        drop(rx);
        assert!(tx.send(chunk(1)).await.is_err());
    }
}
