//! The progress table on each target, `pgcarve.progress`: the end LSN of the last source
//! transaction applied there, written in the same target transaction as its changes. Keyed by
//! (source system identifier, slot, target name), because two targets may share a database.

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
    PRIMARY KEY (system_id, slot, target)
);
COMMIT;";

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

/// Reads this key's LSN; `None` when `pgcarve.progress` or the row does not exist (never
/// applied anything). Writes nothing.
pub async fn read(
    client: &Client,
    key: &ProgressKey,
) -> Result<Option<Lsn>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('pgcarve.progress') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT lsn::text FROM pgcarve.progress WHERE system_id = $1 AND slot = $2 AND target = $3",
            &[&key.system_id, &key.slot, &key.target],
        )
        .await?;
    Ok(row.and_then(|r| r.get::<_, String>(0).parse().ok()))
}

/// Prepares the upsert.
pub async fn prepare_upsert(client: &Client) -> Result<Statement, tokio_postgres::Error> {
    client.prepare(UPSERT_SQL).await
}
