//! Side streams: a table copied while its target streams its other tables.
//!
//! A copy after the first start (a table added to a target, or one left unfinished) is read
//! under a snapshot at `C2`. If the target's other tables need not wait for it — no foreign key
//! on the target links the copied tables with the others, once those keys are set aside
//! (`crate::copy::aside`) — the target keeps streaming them, and
//! the copied tables get a *side stream* of their own: a second link and apply task into the
//! same database, named `<target>+joining`, with its own progress row. It is held at `C2` while
//! the copy runs (it takes nothing after `C2` until the rows are in), then applies the copied
//! tables' changes from `C2` on, catching up while the target's other tables never waited.
//!
//! # Joining
//!
//! A side stream joins its target at a later start, when that loses and repeats nothing. Every
//! target, side streams included, holds all of its changes before the slot's confirmed
//! position `M` (the reader confirms nothing a target lacks). So at a start the side stream
//! holds every change of its tables before `S = max(P_side, M, C2)` (`P_side`: its progress
//! row), and nothing after. The target will skip, per table, changes before `S` (the copy
//! position, `copy_table.lsn`, is set to `S`), and whole transactions before its own progress
//! `P`. Nothing of the side tables is lost exactly when `S ≥ P`; then the tables join, their
//! copy rows and the side stream's progress row changed in one target transaction. After a
//! clean stop `M` is past every target's progress, so the next start always joins. After a
//! crash the side stream may run on until a start where it can.
//!
//! The daemon does not wait for an operator's restart: once every side stream has caught up
//! (the reader sees it under a second behind for a few ticks, with no copy running), the
//! reader stops cleanly (`ReaderExit::Join`) and the daemon starts its pipeline again in the
//! same process — the start that joins them. It does so once per process: a join refused then
//! waits for the next restart.
//!
//! Held instead (`link::hold`, the whole target waits at `C2`): a target whose copied tables
//! are still linked by a foreign key with its other tables (this role may not set it aside:
//! the copy, or the other tables' stream, would break it), or whose every table is being
//! copied.

use std::collections::{HashMap, HashSet};

use crate::apply::progress::ProgressKey;
use crate::config::Target;
use crate::copy::state::{State, TargetCopy};
use crate::lsn::Lsn;
use crate::pg::safe_pg_error;
use crate::table::TableName;

/// The progress name of `target`'s side stream.
pub fn side_name(target: &str) -> String {
    format!("{target}+joining")
}

/// One target's side stream: the tables it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    /// Index of the target in configuration order.
    pub target: usize,
    /// Tables copied earlier that the side stream applies (their copy position).
    pub joined: Vec<(TableName, Lsn)>,
    /// Tables this start copies onto the side stream.
    pub copying: Vec<TableName>,
}

impl Side {
    /// Every table of the side stream.
    pub fn tables(&self) -> Vec<TableName> {
        self.joined
            .iter()
            .map(|(t, _)| t.clone())
            .chain(self.copying.iter().cloned())
            .collect()
    }
}

/// A target's tables applied by its side stream: copied with `side` set — including a copy
/// whose every chunk committed but that was not yet marked copied (pure).
pub fn side_tables(copy: &TargetCopy) -> Vec<(TableName, Lsn)> {
    copy.tables
        .iter()
        .filter(|tc| {
            let finished =
                tc.state == Some(State::Copying) && tc.chunks.is_some_and(|c| c == tc.chunks_done);
            tc.side && (tc.state.is_some_and(|s| s.is_done()) || finished)
        })
        .filter_map(|tc| Some((tc.table.clone(), tc.lsn?)))
        .collect()
}

/// Where each side table joins its target (`S` per table), or `None` when some would lose
/// changes (the target's own progress `target_at` is past what the side stream holds) (pure).
pub fn join_points(
    tables: &[(TableName, Lsn)],
    side_at: Option<Lsn>,
    confirmed: Lsn,
    target_at: Option<Lsn>,
) -> Option<Vec<(TableName, Lsn)>> {
    let held = side_at.unwrap_or(Lsn::ZERO).max(confirmed);
    let points: Vec<(TableName, Lsn)> = tables
        .iter()
        .map(|(t, copied)| (t.clone(), held.max(*copied)))
        .collect();
    let target_at = target_at.unwrap_or(Lsn::ZERO);
    points
        .iter()
        .all(|(_, s)| *s >= target_at)
        .then_some(points)
}

/// Whether copying `copying` on a target may leave its other tables streaming: some other
/// table remains and no foreign key links a copied table with another (pure).
pub fn may_stream_others(
    tables: &[TableName],
    copying: &[TableName],
    refs: &HashSet<(TableName, TableName)>,
) -> bool {
    let copied: HashSet<&TableName> = copying.iter().collect();
    let others = tables.iter().any(|t| !copied.contains(t));
    others
        && !refs
            .iter()
            .any(|(a, b)| copied.contains(a) != copied.contains(b))
}

/// The targets as the stream runs them: each side stream's tables taken from its target and
/// given to a target of their own (same database), appended in order.
pub fn stream_targets(targets: &[Target], sides: &[Side]) -> Vec<Target> {
    let mut out: Vec<Target> = targets.to_vec();
    for s in sides {
        let tables = s.tables();
        out[s.target].tables.retain(|t| !tables.contains(t));
        out.push(Target {
            name: side_name(&targets[s.target].name),
            conn: targets[s.target].conn.clone(),
            tables,
        });
    }
    out
}

/// Reads the side stream's progress row on its target (`None`: it never applied anything).
pub async fn side_progress(
    client: &tokio_postgres::Client,
    key: &ProgressKey,
) -> Result<Option<crate::apply::progress::Progress>, String> {
    let side = ProgressKey {
        target: side_name(&key.target),
        ..key.clone()
    };
    crate::apply::progress::read(client, &side)
        .await
        .map_err(|e| {
            format!(
                "target {}: read progress: {}",
                key.target,
                safe_pg_error(&e)
            )
        })
}

/// Joins side tables to their target at their join points: copy rows and the side stream's
/// progress row in one transaction.
pub async fn join(
    client: &mut tokio_postgres::Client,
    key: &ProgressKey,
    points: &[(TableName, Lsn)],
) -> Result<(), String> {
    let err = |what: &str, e: tokio_postgres::Error| {
        format!("target {}: {what}: {}", key.target, safe_pg_error(&e))
    };
    let tx = client.transaction().await.map_err(|e| err("begin", e))?;
    for (t, at) in points {
        tx.execute(
            crate::copy::state::JOIN_SQL,
            &[
                &key.system_id,
                &key.slot,
                &key.target,
                &t.to_string(),
                &at.to_string(),
            ],
        )
        .await
        .map_err(|e| err("join a side stream", e))?;
    }
    tx.execute(
        "DELETE FROM pgcarve.progress WHERE system_id = $1 AND slot = $2 AND target = $3",
        &[&key.system_id, &key.slot, &side_name(&key.target)],
    )
    .await
    .map_err(|e| err("join a side stream", e))?;
    tx.commit().await.map_err(|e| err("commit", e))
}

/// Moves the copy positions of side tables from their target's map to their side stream's
/// (appended after the targets, in `sides` order).
pub fn move_copied_at(copied_at: &mut Vec<HashMap<TableName, Lsn>>, sides: &[Side]) {
    for s in sides {
        let mut mine = HashMap::new();
        for t in s.tables() {
            if let Some(at) = copied_at[s.target].remove(&t) {
                mine.insert(t, at);
            }
        }
        copied_at.push(mine);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TableName {
        TableName::parse(s).unwrap()
    }

    #[test]
    fn a_side_table_joins_only_where_the_target_loses_nothing() {
        let tables = vec![(t("labs"), Lsn(100)), (t("notes"), Lsn(300))];
        // After a clean stop the confirmed position is past the target's progress.
        let p = join_points(&tables, Some(Lsn(400)), Lsn(500), Some(Lsn(480))).unwrap();
        assert_eq!(p, vec![(t("labs"), Lsn(500)), (t("notes"), Lsn(500))]);
        // The side stream is ahead of the target.
        let p = join_points(&tables, Some(Lsn(700)), Lsn(200), Some(Lsn(650))).unwrap();
        assert_eq!(p[0].1, Lsn(700));
        // The target committed past what the side stream holds: it would skip side changes.
        assert_eq!(
            join_points(&tables, Some(Lsn(400)), Lsn(200), Some(Lsn(650))),
            None
        );
        // Never applied anything: it holds its copy, and the target nothing yet.
        let p = join_points(&tables, None, Lsn(50), None).unwrap();
        assert_eq!(p, vec![(t("labs"), Lsn(100)), (t("notes"), Lsn(300))]);
    }

    #[test]
    fn a_side_copy_whose_chunks_all_committed_stays_on_the_side() {
        use crate::copy::state::TableCopy;
        let tc = |state, side, done| TableCopy {
            table: t("labs"),
            state: Some(state),
            lsn: Some(Lsn(9)),
            chunks: Some(2),
            chunks_done: done,
            rows_done: 0,
            has_rows: true,
            side,
        };
        let copy = |tables| TargetCopy {
            known: true,
            tables,
        };
        assert_eq!(
            side_tables(&copy(vec![tc(State::Copying, true, 2)])),
            vec![(t("labs"), Lsn(9))]
        );
        assert!(side_tables(&copy(vec![tc(State::Copying, true, 1)])).is_empty());
        assert!(side_tables(&copy(vec![tc(State::Copied, false, 2)])).is_empty());
        assert_eq!(
            side_tables(&copy(vec![tc(State::Copied, true, 2)])).len(),
            1
        );
    }

    #[test]
    fn only_tables_without_foreign_keys_to_the_others_stream_beside() {
        let all = [t("patients"), t("allergies"), t("events")];
        let refs: HashSet<_> = [(t("allergies"), t("patients"))].into();
        assert!(may_stream_others(&all, &[t("events")], &refs));
        assert!(!may_stream_others(&all, &[t("allergies")], &refs));
        assert!(!may_stream_others(&all, &[t("patients")], &refs));
        assert!(may_stream_others(
            &all,
            &[t("allergies"), t("patients")],
            &refs
        ));
        // Nothing else to stream: the target is held instead.
        assert!(!may_stream_others(&all, &all, &refs));
    }

    #[test]
    fn side_streams_take_their_tables_from_the_target() {
        let conn = crate::conninfo::ConnInfo::parse("postgresql://u@h/db").unwrap();
        let targets = vec![Target {
            name: "clinic".into(),
            conn,
            tables: vec![t("patients"), t("events"), t("labs")],
        }];
        let sides = [Side {
            target: 0,
            joined: vec![(t("labs"), Lsn(5))],
            copying: vec![t("events")],
        }];
        let out = stream_targets(&targets, &sides);
        assert_eq!(out[0].tables, vec![t("patients")]);
        assert_eq!(out[1].name, "clinic+joining");
        assert_eq!(out[1].tables, vec![t("labs"), t("events")]);
        let mut copied_at = vec![HashMap::from([(t("labs"), Lsn(5)), (t("events"), Lsn(9))])];
        move_copied_at(&mut copied_at, &sides);
        assert!(copied_at[0].is_empty());
        assert_eq!(copied_at[1].len(), 2);
    }
}
