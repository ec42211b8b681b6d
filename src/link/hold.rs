//! [`CopyHold`]: a target held at a snapshot position while tables are copied into it, so a
//! table added later (or copied again after a stop) joins the stream at exactly its copy's
//! position while the other targets stream on.
//!
//! The reader sends the target every transaction that commits before the position `at`, and
//! none from there on (the target misses them, and the slot keeps them: it stays pending) —
//! until the reader itself sees the release and restarts the stream: a target sent a later
//! transaction before that restart would commit past the ones it missed. Once
//! the target holds everything it was sent before `at`, the hold is *drained*: the target's
//! tables stand exactly at `at`, as the copy's snapshot does, so the copy is consistent with
//! them (foreign keys included). After the copy commits, the hold is *released* and the target
//! rejoins with one stream restart from the slot's confirmed position; it skips what it holds,
//! and for each copied table what committed before `at` (it is in the copy).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::lsn::Lsn;

/// Shared between the reader (which drains) and the copy (which waits, then releases).
#[derive(Clone, Debug)]
pub struct CopyHold(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    at: Lsn,
    drained: watch::Sender<bool>,
    released: AtomicBool,
}

impl CopyHold {
    /// A hold at snapshot position `at`.
    pub fn new(at: Lsn) -> CopyHold {
        CopyHold(Arc::new(Inner {
            at,
            drained: watch::channel(false).0,
            released: AtomicBool::new(false),
        }))
    }

    /// The snapshot position.
    pub fn at(&self) -> Lsn {
        self.0.at
    }

    /// The target holds everything before `at` and takes nothing after: copy now.
    pub fn set_drained(&self) {
        self.0.drained.send_replace(true);
    }

    /// Waits until drained.
    pub async fn drained(&self) {
        let mut rx = self.0.drained.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// The copy is committed: the target takes the stream again.
    pub fn release(&self) {
        self.0.released.store(true, Ordering::SeqCst);
    }

    /// Whether the copy has released the target.
    pub fn is_released(&self) -> bool {
        self.0.released.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drains_then_releases() {
        let h = CopyHold::new(Lsn(100));
        assert_eq!(h.at(), Lsn(100));
        let waiter = {
            let h = h.clone();
            tokio::spawn(async move { h.drained().await })
        };
        h.set_drained();
        waiter.await.unwrap();
        assert!(!h.is_released());
        h.release();
        assert!(h.is_released());
    }
}
