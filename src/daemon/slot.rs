//! The slot decision at start-up: resume an existing slot, create one, or refuse.
//!
//! A logical slot is the source's promise to keep every transaction after its confirmed
//! position (PostgreSQL docs, "Logical Decoding Concepts",
//! <https://www.postgresql.org/docs/15/logicaldecoding-explanation.html>, and `pg_replication_slots`,
//! <https://www.postgresql.org/docs/15/view-pg-replication-slots.html>, for `wal_status`).
//! The targets' progress rows say what they already hold. The two must describe one history:
//!
//! - **the slot exists**: it must decode our database with pgoutput, and its WAL must still be
//!   there (`wal_status` not `lost`, see `pg_replication_slots` and `max_slot_wal_keep_size`);
//!   then streaming resumes at its confirmed position and each target skips what it holds;
//! - **the slot is missing and no target holds progress**: a first start; create it. Its
//!   consistent point is where history starts for every target;
//! - **the slot is missing but targets hold progress**: the changes between their progress and
//!   now are gone; a new slot would stream from now and leave a silent gap. Refuse, naming the
//!   slot and the targets, and say how to resynchronise.
//!
//! [`decide_slot`] is pure; [`create_slot`] is the only action.

use crate::conninfo::ConnInfo;
use crate::lsn::Lsn;
use crate::source::catalog::SlotInfo;
use crate::source::conn::ReplicationConn;
use crate::tls::TlsConnector;

/// What start-up does about the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotDecision {
    /// Stream from the existing slot, which has confirmed this position.
    Resume(Lsn),
    /// No slot and no target progress: create it.
    Create,
    /// Problems an operator must fix, one per line.
    Refuse(Vec<String>),
}

/// Decides from the slot as the source shows it (`None`: missing) and the targets holding
/// progress (`(name, lsn)`), for slot `slot` in database `database`.
pub fn decide_slot(
    slot: &str,
    database: &str,
    info: Option<&SlotInfo>,
    holding: &[(String, Lsn)],
) -> SlotDecision {
    let Some(s) = info else {
        if holding.is_empty() {
            return SlotDecision::Create;
        }
        let holding: Vec<String> = holding
            .iter()
            .map(|(name, lsn)| format!("{name} (at {lsn})"))
            .collect();
        return SlotDecision::Refuse(vec![format!(
            "replication slot {slot} does not exist on the source, but targets {} hold progress from it: \
             the changes since then are gone, and streaming from a new slot would leave a gap. \
             Resynchronise those targets (empty their tables and delete their rows from pgcarve.progress and pgcarve.copy_table), then start again",
            holding.join(", ")
        )]);
    };
    let mut p = Vec::new();
    if s.plugin != "pgoutput" {
        p.push(format!(
            "slot {slot} uses plugin {:?}, not pgoutput: choose another source.slot",
            s.plugin
        ));
    }
    if s.database != database {
        p.push(format!(
            "slot {slot} belongs to database {:?}, not {database:?}",
            s.database
        ));
    }
    if s.wal_status == "lost" {
        p.push(format!("slot {slot} is invalidated (wal_status lost): the WAL it needed was removed; the targets must be resynchronised from a new copy, then drop the slot with SELECT pg_drop_replication_slot('{slot}')"));
    }
    if p.is_empty() {
        SlotDecision::Resume(s.confirmed_flush)
    } else {
        SlotDecision::Refuse(p)
    }
}

/// Creates the slot over a replication connection; returns its consistent point.
pub async fn create_slot(source: &ConnInfo, tls: &TlsConnector, slot: &str) -> Result<Lsn, String> {
    let mut conn = ReplicationConn::connect(source, tls)
        .await
        .map_err(|e| format!("source replication connection: {e}"))?;
    let lsn = conn
        .create_logical_slot(slot)
        .await
        .map_err(|e| format!("create slot {slot}: {e}"))?;
    conn.close().await;
    tracing::info!(slot, consistent_point = %lsn, "created replication slot");
    Ok(lsn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(plugin: &str, database: &str, wal_status: &str) -> SlotInfo {
        SlotInfo {
            plugin: plugin.into(),
            database: database.into(),
            confirmed_flush: Lsn(0x1000),
            wal_status: wal_status.into(),
        }
    }

    fn refused(d: SlotDecision) -> Vec<String> {
        match d {
            SlotDecision::Refuse(p) => p,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_healthy_slot_resumes_at_its_confirmed_position() {
        let s = info("pgoutput", "care", "reserved");
        assert_eq!(
            decide_slot("pgcarve", "care", Some(&s), &[("patient".into(), Lsn(5))]),
            SlotDecision::Resume(Lsn(0x1000))
        );
    }

    #[test]
    fn a_first_start_creates_the_slot() {
        assert_eq!(
            decide_slot("pgcarve", "care", None, &[]),
            SlotDecision::Create
        );
    }

    #[test]
    fn a_missing_slot_with_target_progress_is_a_gap_and_refused() {
        let p = refused(decide_slot(
            "pgcarve",
            "care",
            None,
            &[
                ("patient".into(), Lsn(0x16B3748)),
                ("billing".into(), Lsn(1)),
            ],
        ));
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("replication slot pgcarve does not exist"));
        assert!(p[0].contains("patient (at 0/16B3748), billing (at 0/1)"));
        assert!(p[0].contains("Resynchronise"));
    }

    #[test]
    fn a_slot_of_another_plugin_is_refused() {
        let s = info("test_decoding", "care", "reserved");
        let p = refused(decide_slot("pgcarve", "care", Some(&s), &[]));
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("uses plugin \"test_decoding\""));
    }

    #[test]
    fn a_slot_of_another_database_is_refused() {
        let s = info("pgoutput", "postgres", "reserved");
        let p = refused(decide_slot("pgcarve", "care", Some(&s), &[]));
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("belongs to database \"postgres\", not \"care\""));
    }

    #[test]
    fn a_lost_slot_is_refused_with_every_other_problem() {
        let s = info("wal2json", "postgres", "lost");
        let p = refused(decide_slot("pgcarve", "care", Some(&s), &[]));
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(p[2].contains("invalidated (wal_status lost)"));
        assert!(p[2].contains("pg_drop_replication_slot('pgcarve')"));
    }
}
