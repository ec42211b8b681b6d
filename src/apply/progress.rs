//! The progress table on each target, `pgcarve.progress`: the end LSN of the last source
//! transaction applied there, written in the same target transaction as its changes. Keyed by
//! (source system identifier, slot, target name), because two targets may share a database.
//!
//! `halted` records why a target was stopped for an operator (its progress went back, monolith
//! DDL pgcarve cannot follow): the stop must outlive a restart, or start-up would stream on as
//! if nothing had happened. Start-up refuses while it is set; the operator clears it once the
//! target is resynchronised.

use tokio_postgres::{Client, Statement};

use crate::lsn::Lsn;

/// Creates the schema and table if needed. Serialized by an advisory lock so targets sharing a
/// database do not race on `CREATE … IF NOT EXISTS`.
pub const CREATE_SQL: &str = "BEGIN;
SELECT pg_advisory_xact_lock(hashtext('pgcarve.progress'));
CREATE SCHEMA IF NOT EXISTS pgcarve;
CREATE TABLE IF NOT EXISTS pgcarve.progress (
    system_id  text        NOT NULL,
    slot       text        NOT NULL,
    target     text        NOT NULL,
    lsn        pg_lsn      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    halted     text,
    PRIMARY KEY (system_id, slot, target)
);
ALTER TABLE pgcarve.progress ADD COLUMN IF NOT EXISTS halted text;
COMMIT;";

/// Records why the target stopped; parameters: system_id, slot, target, lsn (text, for a row
/// that does not exist yet), reason.
pub const HALT_SQL: &str =
    "INSERT INTO pgcarve.progress AS p (system_id, slot, target, lsn, halted) \
VALUES ($1, $2, $3, $4::text::pg_lsn, $5) \
ON CONFLICT (system_id, slot, target) DO UPDATE SET halted = EXCLUDED.halted";

/// A target's progress row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// End LSN of the last source transaction applied.
    pub lsn: Lsn,
    /// Why the target was stopped for an operator, while it is.
    pub halted: Option<String>,
}

/// Upserts the row; parameters: system_id, slot, target, lsn (text).
pub const UPSERT_SQL: &str = "INSERT INTO pgcarve.progress AS p (system_id, slot, target, lsn, updated_at) \
VALUES ($1, $2, $3, $4::text::pg_lsn, now()) \
ON CONFLICT (system_id, slot, target) DO UPDATE SET lsn = EXCLUDED.lsn, updated_at = EXCLUDED.updated_at";

/// The key of one progress row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressKey {
    /// Source cluster's system identifier.
    pub system_id: String,
    /// Slot name.
    pub slot: String,
    /// Target name.
    pub target: String,
}

/// Reads this key's row; `None` when `pgcarve.progress` or the row does not exist (never
/// applied anything). Writes nothing (and reads tables made before `halted` existed).
pub async fn read(
    client: &Client,
    key: &ProgressKey,
) -> Result<Option<Progress>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('pgcarve.progress') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT lsn::text, to_jsonb(p) ->> 'halted' FROM pgcarve.progress p \
             WHERE system_id = $1 AND slot = $2 AND target = $3",
            &[&key.system_id, &key.slot, &key.target],
        )
        .await?;
    Ok(row.and_then(|r| {
        Some(Progress {
            lsn: r.get::<_, String>(0).parse().ok()?,
            halted: r.get(1),
        })
    }))
}

/// Prepares the upsert.
pub async fn prepare_upsert(client: &Client) -> Result<Statement, tokio_postgres::Error> {
    client.prepare(UPSERT_SQL).await
}
