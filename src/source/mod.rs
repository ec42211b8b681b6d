//! The source side: the replication connection, the streaming protocol, the pgoutput decoder,
//! start-up checks on the monolith, and the reader task that routes changes to the targets.
//!
//! # What may be confirmed to the slot
//!
//! The slot's confirmed position tells PostgreSQL which transactions it never has to send again
//! (those whose commit record starts before it). For every target the reader knows the end LSN
//! of the last transaction it *dispatched* there and the end LSN the target has durably
//! *committed*. A target is pending when dispatched > committed — a transaction sitting in a
//! channel counts as pending. We confirm the minimum committed LSN over pending targets; with no
//! target pending, the end of the last fully processed commit, or the keepalive's `wal_end` when
//! no transaction is open. A target with nothing pending does not hold the slot back, and a
//! target that fails stays pending, so the slot keeps everything it has not applied.

pub mod catalog;
pub mod conn;
pub mod protocol;
pub mod reader;

use crate::lsn::Lsn;

/// One target's position as the reader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetPosition {
    /// End LSN of the last transaction sent to it.
    pub dispatched: Lsn,
    /// End LSN it has durably committed.
    pub committed: Lsn,
}

/// The LSN that may be confirmed to the slot (see the module docs). `idle_wal_end` is the last
/// keepalive's `wal_end`, given only when no transaction is open.
pub fn confirmable(
    targets: &[TargetPosition],
    last_processed: Lsn,
    idle_wal_end: Option<Lsn>,
) -> Lsn {
    let pending_min = targets
        .iter()
        .filter(|t| t.dispatched > t.committed)
        .map(|t| t.committed)
        .min();
    match pending_min {
        Some(lsn) => lsn,
        None => match idle_wal_end {
            Some(end) => end.max(last_processed),
            None => last_processed,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(d: u64, c: u64) -> TargetPosition {
        TargetPosition {
            dispatched: Lsn(d),
            committed: Lsn(c),
        }
    }

    #[test]
    fn pending_targets_hold_the_slot_back() {
        // Target 0 has 200 in flight, target 1 is caught up at 300.
        assert_eq!(
            confirmable(&[pos(200, 100), pos(300, 300)], Lsn(300), None),
            Lsn(100)
        );
    }

    #[test]
    fn minimum_over_pending_only() {
        assert_eq!(
            confirmable(
                &[pos(500, 400), pos(300, 250), pos(100, 100)],
                Lsn(500),
                None
            ),
            Lsn(250)
        );
    }

    #[test]
    fn nothing_pending_confirms_last_processed_commit() {
        // Target 1 never received anything: it does not hold the slot back.
        assert_eq!(
            confirmable(&[pos(300, 300), pos(0, 0)], Lsn(350), None),
            Lsn(350)
        );
    }

    #[test]
    fn idle_keepalive_moves_past_unrelated_wal() {
        assert_eq!(
            confirmable(&[pos(300, 300)], Lsn(300), Some(Lsn(900))),
            Lsn(900)
        );
        // Never behind the last processed commit.
        assert_eq!(
            confirmable(&[pos(300, 300)], Lsn(300), Some(Lsn(10))),
            Lsn(300)
        );
    }

    #[test]
    fn keepalive_ignored_while_pending() {
        assert_eq!(
            confirmable(&[pos(300, 200)], Lsn(300), Some(Lsn(900))),
            Lsn(200)
        );
    }

    #[test]
    fn failed_target_stays_pending() {
        // A failed target keeps dispatched > committed until it recovers.
        assert_eq!(
            confirmable(&[pos(700, 100), pos(900, 900)], Lsn(900), Some(Lsn(950))),
            Lsn(100)
        );
    }

    #[test]
    fn no_targets() {
        assert_eq!(confirmable(&[], Lsn(5), None), Lsn(5));
    }
}
