//! Preparing a target at start-up: inspect (read-only) → plan (pure) → act.
//!
//! [`inspect`] reads what the target holds — can its WAL position be read, each owned table's
//! columns, its progress row — and writes nothing, so a preflight `check` can call it on a
//! production database. [`problems`] turns those facts and the source's columns into what an
//! operator must fix. Only [`Worker::start`] acts: it creates `pgcarve.progress` and flushes
//! the progress an earlier run left. The daemon inspects every target (and the source) before
//! it acts on any.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_postgres::Client;

use super::durability::{force_durable, CommitStatements, Durability, WAL_POSITION_SQL};
use super::group::Group;
use super::progress::{self, ProgressKey};
use super::statements::{TargetColumn, TargetTable};
use super::stmt_cache::StmtCache;
use super::{Session, Worker};
use crate::config::{ApplyConfig, Target};
use crate::conninfo::ConnInfo;
use crate::link::TargetStatus;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::pg::safe_pg_error;
use crate::table::TableName;
use crate::tls::TlsConnector;

/// Why a target could not be prepared at start-up.
#[derive(Debug)]
pub enum StartError {
    /// Unreachable for now: retry.
    Transient(String),
    /// Schema problems an operator must fix, one per line.
    Fatal(Vec<String>),
}

/// What a target database holds, as read by [`inspect`].
#[derive(Debug, Clone)]
pub struct TargetFacts {
    /// `pg_current_wal_insert_lsn()` and `pg_current_wal_flush_lsn()` answered (a primary).
    /// `Err` holds the safe summary of the server's refusal.
    pub wal_position: Result<(), String>,
    /// Each owned table's catalog, in the configuration's order; `None`: it does not exist.
    pub tables: Vec<(TableName, Option<TargetTable>)>,
    /// This target's progress: `None` when `pgcarve.progress` or its row does not exist.
    pub progress: Option<Lsn>,
    /// Why an earlier run stopped this target for an operator, if it did and nobody cleared it.
    pub halted: Option<String>,
}

/// Opens a target session: asynchronous commits (durability is tracked from the WAL flush
/// position, see `durability`), the input settings matching what the replication connection
/// asks the source to write (DateStyle, IntervalStyle, lc_monetary).
pub(super) async fn open_session(
    conn: &ConnInfo,
    tls: &TlsConnector,
) -> Result<Client, tokio_postgres::Error> {
    let client = crate::pg::connect(conn, tls).await?;
    client
        .batch_execute(
            // Commits need not wait for the disk: the slot is confirmed only up to what the
            // target has flushed.
            "SET synchronous_commit = off; SET extra_float_digits = 3; \
             SET DateStyle = 'ISO'; SET IntervalStyle = 'postgres'; SET lc_monetary = 'C'",
        )
        .await?;
    // With synchronous standbys a failover keeps only what they confirmed: commits must wait
    // for them as the server is configured to, or "flushed" would not survive a failover.
    let standbys: String = client
        .query_one("SELECT current_setting('synchronous_standby_names')", &[])
        .await?
        .get(0);
    if !standbys.trim().is_empty() {
        client.batch_execute("RESET synchronous_commit").await?;
    }
    Ok(client)
}

/// Reads the target's facts. Writes nothing. A server refusal of the WAL position functions is
/// a fact; any other error is returned (the target is unreachable for now).
pub async fn inspect(
    client: &Client,
    target: &Target,
    key: &ProgressKey,
) -> Result<TargetFacts, tokio_postgres::Error> {
    let wal_position = match client.query_one(WAL_POSITION_SQL, &[]).await {
        Ok(_) => Ok(()),
        Err(e) if e.as_db_error().is_some() => Err(safe_pg_error(&e)),
        Err(e) => return Err(e),
    };
    let mut tables = Vec::with_capacity(target.tables.len());
    for table in &target.tables {
        tables.push((table.clone(), load_table(client, table).await?));
    }
    let row = progress::read(client, key).await?;
    Ok(TargetFacts {
        wal_position,
        tables,
        progress: row.as_ref().map(|p| p.lsn),
        halted: row.and_then(|p| p.halted),
    })
}

/// What an operator must fix before this target can apply, one line each (pure).
pub fn problems(
    target: &Target,
    facts: &TargetFacts,
    source_columns: &HashMap<TableName, Vec<String>>,
) -> Vec<String> {
    if let Err(e) = &facts.wal_position {
        return vec![format!(
            "target {} ({}): cannot read its WAL position ({e}): pgcarve needs pg_current_wal_insert_lsn() and pg_current_wal_flush_lsn() on a primary to know what the target has flushed",
            target.name,
            target.conn.display_target(),
        )];
    }
    let mut problems = Vec::new();
    if let Some(reason) = &facts.halted {
        problems.push(format!(
            "target {} was stopped by an earlier run and stays stopped until an operator clears it: {reason}. Once it is resynchronised: UPDATE pgcarve.progress SET halted = NULL WHERE target = '{}'",
            target.name,
            target.name.replace('\'', "''")
        ));
    }
    for (table, tt) in &facts.tables {
        let Some(tt) = tt else {
            problems.push(format!(
                "table {table} does not exist on target {} ({}): create it with the source's definition",
                target.name,
                target.conn.display_target()
            ));
            continue;
        };
        let Some(src_cols) = source_columns.get(table) else {
            continue;
        };
        for c in src_cols {
            if !tt.columns.contains_key(c) {
                problems.push(format!(
                    "column {c} of {table} is missing on target {}: ALTER TABLE {} ADD COLUMN …",
                    target.name,
                    table.quoted()
                ));
            }
        }
        for (name, col) in &tt.columns {
            if !src_cols.contains(name) && col.not_null && !col.has_default {
                problems.push(format!(
                    "column {name} of {table} on target {} is NOT NULL without a default and does not exist on the source: inserts would fail",
                    target.name
                ));
            }
        }
    }
    problems
}

/// Loads a target table's columns; `None` when the table does not exist.
pub(super) async fn load_table(
    client: &Client,
    table: &TableName,
) -> Result<Option<TargetTable>, tokio_postgres::Error> {
    // The type rows are compared in (REPLICA IDENTITY FULL): the column's own, with its
    // modifier (char(8) is not `character`, which means char(1)), and for a domain its base
    // type, so the domain's constraints are not checked against old rows.
    let rows = client
        .query(
            "WITH RECURSIVE col AS ( \
                 SELECT a.attnum, a.atttypid AS typ, a.atttypmod AS typmod, 0 AS depth \
                 FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
               UNION ALL \
                 SELECT col.attnum, t.typbasetype, t.typtypmod, col.depth + 1 \
                 FROM col JOIN pg_type t ON t.oid = col.typ WHERE t.typtype = 'd' \
             ), base AS ( \
                 SELECT DISTINCT ON (attnum) attnum, format_type(typ, typmod) AS cmp_type, \
                        depth > 0 AS domain \
                 FROM col ORDER BY attnum, depth DESC \
             ) \
             SELECT a.attname::text, b.cmp_type, a.attnotnull, \
                    (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> ''), \
                    a.attidentity = 'a', b.domain \
             FROM pg_attribute a JOIN base b ON b.attnum = a.attnum \
             WHERE a.attrelid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await?;
    if rows.is_empty() {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()])
            .await?
            .get(0);
        if !exists {
            return Ok(None);
        }
    }
    let mut columns = HashMap::new();
    for r in rows {
        columns.insert(
            r.get::<_, String>(0),
            TargetColumn {
                type_name: r.get(1),
                domain: r.get(5),
                not_null: r.get(2),
                has_default: r.get(3),
                identity_always: r.get(4),
            },
        );
    }
    let has_identity_always = columns.values().any(|c| c.identity_always);
    // COPY acts like INSERT on plain and partitioned tables, except where rules (ignored by
    // COPY), row-level security (COPY FROM refuses it) or statement triggers (fired once per
    // COPY, not per INSERT) are involved: those tables always get INSERT.
    let kind = client
        .query_one(
            "SELECT c.relkind IN ('r', 'p') AND NOT c.relrowsecurity AND NOT c.relhasrules \
                    AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid \
                                    AND NOT t.tgisinternal AND (t.tgtype & 1) = 0), \
                    c.relkind = 'r' \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await?;
    Ok(Some(TargetTable {
        table: table.clone(),
        columns,
        has_identity_always,
        copy_ok: kind.get(0),
        plain: kind.get(1),
    }))
}

/// A target connected and inspected, nothing written yet.
pub struct Inspected {
    tls: TlsConnector,
    client: Client,
    /// What it holds.
    pub facts: TargetFacts,
}

/// Connects to a target and reads its facts. An unreachable target is [`StartError::Transient`];
/// unusable TLS settings are [`StartError::Fatal`].
pub async fn connect_and_inspect(
    target: &Target,
    key: &ProgressKey,
) -> Result<Inspected, StartError> {
    let tls = TlsConnector::new(&target.conn)
        .map_err(|e| StartError::Fatal(vec![format!("targets.{}: {e}", target.name)]))?;
    let client = open_session(&target.conn, &tls)
        .await
        .map_err(|e| transient(target, "connect", &e))?;
    let facts = inspect(&client, target, key)
        .await
        .map_err(|e| transient(target, "read catalog", &e))?;
    Ok(Inspected { tls, client, facts })
}

fn transient(target: &Target, what: &str, e: &tokio_postgres::Error) -> StartError {
    StartError::Transient(format!(
        "target {} ({}): {what}: {}",
        target.name,
        target.conn.display_target(),
        safe_pg_error(e)
    ))
}

impl Worker {
    /// Acts on an inspected target whose facts had no [`problems`]: creates the progress table
    /// and flushes the progress an earlier run left, so it counts as durable.
    pub async fn start(
        target: &Target,
        inspected: Inspected,
        key: ProgressKey,
        cfg: ApplyConfig,
        metrics: Metrics,
        status: watch::Sender<TargetStatus>,
        wake: Arc<tokio::sync::Notify>,
    ) -> Result<Worker, StartError> {
        let Inspected { tls, client, facts } = inspected;
        client
            .batch_execute(progress::CREATE_SQL)
            .await
            .map_err(|e| transient(target, "create pgcarve.progress", &e))?;
        let commit_stmts = CommitStatements::prepare(&client)
            .await
            .map_err(|e| transient(target, "prepare progress upsert", &e))?;
        // What an earlier run committed may not be on disk yet: flush it before counting it
        // as durable.
        if let Some(lsn) = facts.progress {
            force_durable(&client, &commit_stmts.upsert, &key, lsn)
                .await
                .map_err(|e| transient(target, "flush pgcarve.progress", &e))?;
        }
        let tables = facts
            .tables
            .into_iter()
            .filter_map(|(name, tt)| tt.map(|tt| (name, tt)))
            .collect();
        let canceller = super::Canceller::new(&client, tls.clone());
        let worker = Worker {
            canceller,
            name: target.name.clone(),
            session: Session {
                conn: target.conn.clone(),
                tls,
                client: Arc::new(client),
                commit_stmts,
                key,
            },
            cache: StmtCache::new(tables, target.tables.clone()),
            group: Group::default(),
            positions: Durability::at(facts.progress.unwrap_or(Lsn::ZERO)),
            failures: 0,
            one_by_one_until: Lsn::ZERO,
            stall: None,
            retained: super::Retained::new(
                facts.progress.unwrap_or(Lsn::ZERO),
                cfg.retain_changes,
                cfg.spool_dir.clone().map(|d| (d, target.name.clone())),
            ),
            cfg,
            metrics,
            status,
            wake,
        };
        worker
            .metrics
            .target_committed_lsn
            .with_label_values(&[&worker.name])
            .set(worker.positions.committed.0 as i64);
        Ok(worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            name: "patient".into(),
            conn: ConnInfo::parse("postgresql://u@h/d").unwrap(),
            tables: vec![TableName::parse("patients").unwrap()],
        }
    }

    fn column(not_null: bool, has_default: bool) -> TargetColumn {
        TargetColumn {
            type_name: "text".into(),
            domain: false,
            not_null,
            has_default,
            identity_always: false,
        }
    }

    fn facts(columns: &[(&str, TargetColumn)]) -> TargetFacts {
        let table = TableName::parse("patients").unwrap();
        TargetFacts {
            wal_position: Ok(()),
            tables: vec![(
                table.clone(),
                Some(TargetTable {
                    table,
                    columns: columns
                        .iter()
                        .map(|(n, c)| (n.to_string(), c.clone()))
                        .collect(),
                    has_identity_always: false,
                    copy_ok: true,
                    plain: true,
                }),
            )],
            progress: None,
            halted: None,
        }
    }

    #[test]
    fn a_target_stopped_by_an_earlier_run_is_refused_with_the_way_out() {
        let mut f = facts(&[("id", column(true, false))]);
        f.halted = Some("routed table public.patients was dropped".into());
        let p = problems(&target(), &f, &source(&["id"]));
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("was dropped"));
        assert!(p[0].contains("SET halted = NULL WHERE target = 'patient'"));
    }

    fn source(cols: &[&str]) -> HashMap<TableName, Vec<String>> {
        [(
            TableName::parse("patients").unwrap(),
            cols.iter().map(|c| c.to_string()).collect(),
        )]
        .into()
    }

    #[test]
    fn matching_tables_have_no_problems() {
        let f = facts(&[("id", column(true, false)), ("note", column(false, false))]);
        assert!(problems(&target(), &f, &source(&["id", "note"])).is_empty());
    }

    #[test]
    fn a_missing_table_and_a_missing_column_are_named() {
        let mut f = facts(&[("id", column(true, false))]);
        let p = problems(&target(), &f, &source(&["id", "name"]));
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("column name of public.patients is missing on target patient"));
        f.tables[0].1 = None;
        let p = problems(&target(), &f, &source(&["id"]));
        assert!(p[0].starts_with("table public.patients does not exist on target patient"));
    }

    #[test]
    fn a_target_only_not_null_column_needs_a_default() {
        let f = facts(&[
            ("id", column(true, false)),
            ("extra", column(true, false)),
            ("stamped", column(true, true)),
        ]);
        let p = problems(&target(), &f, &source(&["id"]));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("column extra of public.patients"));
    }

    #[test]
    fn a_standby_is_refused_before_anything_else() {
        let mut f = facts(&[]);
        f.wal_position = Err("SQLSTATE 55000 (see PostgreSQL Appendix A)".into());
        let p = problems(&target(), &f, &source(&["id"]));
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("cannot read its WAL position"));
    }
}
