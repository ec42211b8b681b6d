//! Positions flowing back from the targets: what each target was sent and holds, what may be
//! confirmed to the slot, and per-target lag.
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
//!
//! The slot's confirmed position is sent in standby status updates (PostgreSQL docs,
//! "Streaming Replication Protocol", <https://www.postgresql.org/docs/15/protocol-replication.html>): `flush` and `apply` carry it, and
//! PostgreSQL may then remove WAL before it and never sends the transactions before it again.
//! A restart of the stream begins there, so everything a target lacks must lie after it.

use std::collections::VecDeque;

use crate::lsn::Lsn;
use crate::pgoutput::PgTimestamp;

/// The reader's record of one target: what it was sent, what it is known to hold.
#[derive(Debug, Clone)]
pub struct Position {
    /// End LSN of the last transaction dispatched to it: sent, or missed while stalled.
    /// Only grows between barriers.
    dispatched: Lsn,
    /// Transactions whose commit record lies before this are on the target already.
    skip_below: Lsn,
    /// (end LSN, commit time) of dispatched transactions not yet committed there, oldest
    /// first, in increasing end LSN.
    in_flight: VecDeque<(Lsn, PgTimestamp)>,
    /// The committed position last seen, and since when it has not moved while there was work.
    last_committed: Lsn,
    moved_at: std::time::Instant,
}

impl Position {
    /// A target that holds everything up to `committed`.
    pub fn new(committed: Lsn) -> Position {
        Position {
            dispatched: committed,
            skip_below: committed,
            in_flight: VecDeque::new(),
            last_committed: committed,
            moved_at: std::time::Instant::now(),
        }
    }

    /// End LSN of the last transaction dispatched (sent, or missed while stalled).
    pub fn dispatched(&self) -> Lsn {
        self.dispatched
    }

    /// Transactions ending before this are on the target already.
    pub fn skip_below(&self) -> Lsn {
        self.skip_below
    }

    /// A transaction ending at `end_lsn` was dispatched to the target (sent, or missed while
    /// it was stalled). Transactions arrive in commit order.
    pub fn dispatch(&mut self, end_lsn: Lsn, commit_time: PgTimestamp) {
        debug_assert!(
            end_lsn >= self.dispatched,
            "dispatched {end_lsn} after {}",
            self.dispatched
        );
        self.dispatched = self.dispatched.max(end_lsn);
        self.in_flight.push_back((end_lsn, commit_time));
    }

    /// After a barrier: the target holds `committed`, and the stream restarts from the slot.
    pub fn reset(&mut self, committed: Lsn) {
        self.dispatched = committed;
        self.skip_below = committed;
        self.in_flight.clear();
    }

    /// What the confirmation rule sees of this target. A target that is not taking changes
    /// misses the transactions streamed meanwhile: it stays pending at what it has, whatever
    /// was dispatched. (Once it takes changes again, what it missed is in `dispatched`, until
    /// the next barrier restarts the stream from what it has.)
    pub fn for_confirmation(&self, accepts_changes: bool, committed: Lsn) -> TargetPosition {
        TargetPosition {
            dispatched: if accepts_changes {
                self.dispatched
            } else {
                Lsn(u64::MAX)
            },
            committed,
        }
    }

    /// Seconds since the commit of the oldest transaction dispatched and not yet committed on
    /// the target (`committed`), at `now`; 0 when it has everything dispatched.
    pub fn lag_secs(&mut self, committed: Lsn, now: PgTimestamp) -> f64 {
        while self
            .in_flight
            .front()
            .is_some_and(|(end, _)| *end <= committed)
        {
            self.in_flight.pop_front();
        }
        self.in_flight
            .front()
            .map_or(0.0, |(_, t)| seconds_since(*t, now))
    }
}

impl Position {
    /// How long the target has had work (dispatched, not committed) without committing any of
    /// it, at `now`, given what it has `committed`; zero while it moves or has nothing to do.
    /// Call after [`Position::lag_secs`], which forgets what it committed.
    pub fn stuck_for(&mut self, committed: Lsn, now: std::time::Instant) -> std::time::Duration {
        if committed != self.last_committed || self.in_flight.is_empty() {
            self.last_committed = committed;
            self.moved_at = now;
        }
        now.saturating_duration_since(self.moved_at)
    }
}

/// Seconds from `then` to `now`, never negative (clocks of two machines).
pub fn seconds_since(then: PgTimestamp, now: PgTimestamp) -> f64 {
    ((now - then) as f64 / 1e6).max(0.0)
}

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

/// Whether a standby status update is due: always when forced (the server asked, or we are
/// about to wait or leave), else when the confirmed position moved or `interval` passed.
pub fn status_due(
    force: bool,
    confirmed: Lsn,
    last_sent: Lsn,
    since_last: std::time::Duration,
    interval: std::time::Duration,
) -> bool {
    force || confirmed != last_sent || since_last >= interval
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

    #[test]
    fn a_position_is_pending_while_dispatched_is_ahead() {
        let mut p = Position::new(Lsn(100));
        assert_eq!(p.for_confirmation(true, Lsn(100)), pos(100, 100));
        p.dispatch(Lsn(200), 0);
        p.dispatch(Lsn(300), 0);
        assert_eq!(p.for_confirmation(true, Lsn(200)), pos(300, 200));
        // Stalled: pending at what it has, whatever was dispatched.
        assert_eq!(
            p.for_confirmation(false, Lsn(200)),
            TargetPosition {
                dispatched: Lsn(u64::MAX),
                committed: Lsn(200)
            }
        );
        p.reset(Lsn(250));
        assert_eq!(p.skip_below(), Lsn(250));
        assert_eq!(p.for_confirmation(true, Lsn(250)), pos(250, 250));
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_uncommitted_transaction() {
        let mut p = Position::new(Lsn(0));
        p.dispatch(Lsn(10), 1_000_000);
        p.dispatch(Lsn(20), 3_000_000);
        assert_eq!(p.lag_secs(Lsn(0), 5_000_000), 4.0);
        assert_eq!(p.lag_secs(Lsn(10), 5_000_000), 2.0);
        assert_eq!(p.lag_secs(Lsn(20), 5_000_000), 0.0);
        // A commit time ahead of our clock is no lag, not negative lag.
        p.dispatch(Lsn(30), 9_000_000);
        assert_eq!(p.lag_secs(Lsn(20), 5_000_000), 0.0);
    }

    #[test]
    fn a_target_is_stuck_only_while_it_has_work_and_commits_nothing() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Position::new(Lsn(0));
        // Idle: never stuck.
        assert_eq!(p.stuck_for(Lsn(0), t0 + s(100)), s(0));
        p.dispatch(Lsn(10), 0);
        p.dispatch(Lsn(20), 0);
        p.lag_secs(Lsn(0), 0);
        assert_eq!(p.stuck_for(Lsn(0), t0 + s(130)), s(30));
        // It commits something: the clock starts again.
        p.lag_secs(Lsn(10), 0);
        assert_eq!(p.stuck_for(Lsn(10), t0 + s(140)), s(0));
        assert_eq!(p.stuck_for(Lsn(10), t0 + s(145)), s(5));
        // Everything committed: no work, not stuck.
        p.lag_secs(Lsn(20), 0);
        assert_eq!(p.stuck_for(Lsn(20), t0 + s(500)), s(0));
    }

    #[test]
    fn status_updates_when_forced_moved_or_due() {
        use std::time::Duration;
        let s = Duration::from_secs;
        assert!(!status_due(false, Lsn(5), Lsn(5), s(3), s(10)));
        assert!(status_due(true, Lsn(5), Lsn(5), s(3), s(10)));
        assert!(status_due(false, Lsn(6), Lsn(5), s(3), s(10)));
        assert!(status_due(false, Lsn(5), Lsn(5), s(10), s(10)));
    }
}
