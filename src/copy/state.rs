//! The copy state on each target, in its `pgcarve` schema beside `pgcarve.progress`, keyed like
//! it by (source system identifier, slot, target name) and the routed table:
//!
//! - `pgcarve.copy_table`: one row per table: `pending → copying → copied → streaming`, or
//!   `failed` with a reason (SQLSTATE and table, never values); `lsn` is the position of the
//!   snapshot the copy was read under (the stream skips, for this table, every transaction
//!   that committed before it), `chunks` how many chunks that snapshot's plan had.
//!   `side` marks a copy made while the target streamed its other tables: a side stream of its
//!   own (progress key `<target>+joining`) applies the table's changes from the snapshot's
//!   position on, until a start joins it to the target's stream (`lsn` is then where the
//!   target takes over, and `side` is false again).
//! - `pgcarve.copy_chunk`: one row per finished chunk, committed in the same target transaction
//!   as the chunk's rows: after any crash, the rows are there exactly when the row is.

use tokio_postgres::Client;

use crate::apply::progress::ProgressKey;
use crate::lsn::Lsn;
use crate::table::TableName;

/// Creates the tables if needed (serialized like `pgcarve.progress`: targets may share a
/// database).
pub const CREATE_SQL: &str = "BEGIN;
SELECT pg_advisory_xact_lock(hashtext('pgcarve.progress'));
CREATE SCHEMA IF NOT EXISTS pgcarve;
CREATE TABLE IF NOT EXISTS pgcarve.copy_table (
    system_id  text        NOT NULL,
    slot       text        NOT NULL,
    target     text        NOT NULL,
    table_name text        NOT NULL,
    state      text        NOT NULL CHECK (state IN ('pending', 'copying', 'copied', 'streaming', 'failed')),
    lsn        pg_lsn,
    chunks     integer,
    rows       bigint      NOT NULL DEFAULT 0,
    reason     text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (system_id, slot, target, table_name)
);
CREATE TABLE IF NOT EXISTS pgcarve.copy_chunk (
    system_id  text        NOT NULL,
    slot       text        NOT NULL,
    target     text        NOT NULL,
    table_name text        NOT NULL,
    lsn        pg_lsn      NOT NULL,
    chunk      integer     NOT NULL,
    rows       bigint      NOT NULL,
    done_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (system_id, slot, target, table_name, lsn, chunk)
);
DO $$ BEGIN
    -- Only when missing: ALTER TABLE locks the table even when the column exists.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'pgcarve.copy_table'::regclass AND attname = 'side') THEN
        ALTER TABLE pgcarve.copy_table ADD COLUMN side boolean NOT NULL DEFAULT false;
    END IF;
END $$;
COMMIT;";

/// A table's state as the target holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// To be copied.
    Pending,
    /// Being copied (or a copy that stopped halfway).
    Copying,
    /// Copied; its changes stream from the snapshot's position on.
    Copied,
    /// Copied and streaming.
    Streaming,
    /// The copy failed (the reason is beside it); copied again at the next start.
    Failed,
}

impl State {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Copying => "copying",
            State::Copied => "copied",
            State::Streaming => "streaming",
            State::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<State> {
        Some(match s {
            "pending" => State::Pending,
            "copying" => State::Copying,
            "copied" => State::Copied,
            "streaming" => State::Streaming,
            "failed" => State::Failed,
            _ => return None,
        })
    }

    /// The table holds a complete copy.
    pub fn is_done(self) -> bool {
        matches!(self, State::Copied | State::Streaming)
    }
}

/// What a target holds about one owned table, read without writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopy {
    /// The routed table.
    pub table: TableName,
    /// Its copy state row, if any.
    pub state: Option<State>,
    /// The snapshot position its copy is consistent with.
    pub lsn: Option<Lsn>,
    /// Chunks planned under that snapshot.
    pub chunks: Option<i32>,
    /// Finished chunks under that snapshot (and their rows).
    pub chunks_done: i32,
    /// Rows in those chunks.
    pub rows_done: i64,
    /// The target table holds at least one row.
    pub has_rows: bool,
    /// Copied while the target streamed its other tables: a side stream applies its changes.
    pub side: bool,
}

/// What a target holds about the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetCopy {
    /// `pgcarve.copy_table` exists.
    pub known: bool,
    /// Each owned table that exists on the target, in configuration order.
    pub tables: Vec<TableCopy>,
}

/// Reads the copy state of `tables` (those that exist on the target). Writes nothing.
pub async fn read(
    client: &Client,
    key: &ProgressKey,
    tables: &[TableName],
) -> Result<TargetCopy, tokio_postgres::Error> {
    let known: bool = client
        .query_one(
            "SELECT to_regclass('pgcarve.copy_table') IS NOT NULL \
               AND to_regclass('pgcarve.copy_chunk') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        let Some(only) = only_keyword(client, t).await? else {
            continue;
        };
        // A target-only inheritance child's rows are not the table's.
        let has_rows: bool = client
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {only}{})", t.quoted()),
                &[],
            )
            .await?
            .get(0);
        let mut tc = TableCopy {
            table: t.clone(),
            state: None,
            lsn: None,
            chunks: None,
            chunks_done: 0,
            rows_done: 0,
            has_rows,
            side: false,
        };
        if known {
            let row = client
                .query_opt(
                    "SELECT s.state, s.lsn::text, s.chunks, \
                            (SELECT count(*)::int FROM pgcarve.copy_chunk c WHERE c.system_id = s.system_id \
                               AND c.slot = s.slot AND c.target = s.target AND c.table_name = s.table_name AND c.lsn = s.lsn), \
                            (SELECT coalesce(sum(c.rows), 0)::bigint FROM pgcarve.copy_chunk c WHERE c.system_id = s.system_id \
                               AND c.slot = s.slot AND c.target = s.target AND c.table_name = s.table_name AND c.lsn = s.lsn), \
                            coalesce((to_jsonb(s) ->> 'side')::boolean, false) \
                     FROM pgcarve.copy_table s \
                     WHERE s.system_id = $1 AND s.slot = $2 AND s.target = $3 AND s.table_name = $4",
                    &[&key.system_id, &key.slot, &key.target, &t.to_string()],
                )
                .await?;
            if let Some(r) = row {
                tc.state = State::parse(r.get::<_, &str>(0));
                tc.lsn = r.get::<_, Option<String>>(1).and_then(|s| s.parse().ok());
                tc.chunks = r.get(2);
                tc.chunks_done = r.get(3);
                tc.rows_done = r.get(4);
                tc.side = r.get(5);
            }
        }
        out.push(tc);
    }
    Ok(TargetCopy { known, tables: out })
}

/// `"ONLY "` for a plain table (its inheritance children on the target are not ours), `""`
/// for a partitioned one (its rows live in its partitions); `None`: no such table.
pub async fn only_keyword(
    client: &Client,
    t: &TableName,
) -> Result<Option<&'static str>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)",
            &[&t.quoted()],
        )
        .await?;
    Ok(row.map(|r| {
        if r.get::<_, &str>(0) == "p" {
            ""
        } else {
            "ONLY "
        }
    }))
}

/// Sets a table's state, snapshot position and plan (`copying` at the start of a copy: its
/// earlier chunks are forgotten). Parameters: key…, table, state, lsn (text or NULL), chunks,
/// side.
pub const SET_STATE_SQL: &str = "INSERT INTO pgcarve.copy_table AS s \
    (system_id, slot, target, table_name, state, lsn, chunks, rows, reason, side, updated_at) \
VALUES ($1, $2, $3, $4, $5, $6::text::pg_lsn, $7, 0, NULL, $8, now()) \
ON CONFLICT (system_id, slot, target, table_name) DO UPDATE SET state = EXCLUDED.state, \
    lsn = EXCLUDED.lsn, chunks = EXCLUDED.chunks, rows = 0, reason = NULL, side = EXCLUDED.side, \
    updated_at = now()";

/// Joins a side-streamed table to its target's stream from `lsn` on. Parameters: key…, table,
/// lsn (text).
pub const JOIN_SQL: &str = "UPDATE pgcarve.copy_table SET state = 'streaming', side = false, \
    lsn = $5::text::pg_lsn, updated_at = now() \
WHERE system_id = $1 AND slot = $2 AND target = $3 AND table_name = $4 AND side";

/// Forgets the copy state of tables no longer routed to the target, chunks included; returns
/// their names. Parameters: key…, the routed tables (text[]).
pub const UNROUTED_SQL: &str = "WITH gone AS ( \
    DELETE FROM pgcarve.copy_table WHERE system_id = $1 AND slot = $2 AND target = $3 \
      AND NOT (table_name = ANY($4)) RETURNING table_name), \
  chunks AS ( \
    DELETE FROM pgcarve.copy_chunk WHERE system_id = $1 AND slot = $2 AND target = $3 \
      AND NOT (table_name = ANY($4))) \
SELECT table_name FROM gone";

/// Forgets a table's chunks. Parameters: key…, table.
pub const FORGET_CHUNKS_SQL: &str = "DELETE FROM pgcarve.copy_chunk \
WHERE system_id = $1 AND slot = $2 AND target = $3 AND table_name = $4";

/// Records a finished chunk. Parameters: key…, table, lsn (text), chunk, rows.
pub const CHUNK_DONE_SQL: &str = "INSERT INTO pgcarve.copy_chunk \
    (system_id, slot, target, table_name, lsn, chunk, rows) \
VALUES ($1, $2, $3, $4, $5::text::pg_lsn, $6, $7)";

/// Marks a table copied with its chunks' rows. Parameters: key…, table.
pub const COPIED_SQL: &str = "UPDATE pgcarve.copy_table s SET state = 'copied', updated_at = now(), \
    rows = (SELECT coalesce(sum(c.rows), 0) FROM pgcarve.copy_chunk c WHERE c.system_id = s.system_id \
            AND c.slot = s.slot AND c.target = s.target AND c.table_name = s.table_name AND c.lsn = s.lsn) \
WHERE system_id = $1 AND slot = $2 AND target = $3 AND table_name = $4";

/// Marks a table failed with a reason free of values. Parameters: key…, table, reason.
pub const FAILED_SQL: &str = "UPDATE pgcarve.copy_table SET state = 'failed', reason = $5, updated_at = now() \
WHERE system_id = $1 AND slot = $2 AND target = $3 AND table_name = $4 AND state <> 'copied' AND state <> 'streaming'";

/// Marks every copied table of this key streaming (not those a side stream applies: they
/// join at a start). Parameters: key….
pub const STREAMING_SQL: &str =
    "UPDATE pgcarve.copy_table SET state = 'streaming', updated_at = now() \
WHERE system_id = $1 AND slot = $2 AND target = $3 AND state = 'copied' AND NOT side";

/// Records tables taken as they are (no copy: the target streamed them before copy state
/// existed, or copying is off). Parameters: key…, table.
pub const TAKEN_SQL: &str = "INSERT INTO pgcarve.copy_table AS s \
    (system_id, slot, target, table_name, state, lsn, chunks) VALUES ($1, $2, $3, $4, 'streaming', NULL, NULL) \
ON CONFLICT (system_id, slot, target, table_name) DO NOTHING";
