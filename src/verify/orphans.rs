//! Relationships that were foreign keys in the monolith and now cross service databases: the
//! child's rows at one target, the parent's at another, nothing enforcing them. Each is checked
//! across the two databases: the child's distinct key values, in batches, looked up in the
//! parent. Targets stand at different positions while streaming, so a value found missing is
//! looked up again (both sides read after the slot confirmed a fresh position) and only
//! persistent orphans are reported, with a sample of the missing parent keys.

use std::time::Duration;

use tokio_postgres::Client;

use crate::config::Settings;
use crate::pg::{quote_ident, safe_pg_error};
use crate::table::TableName;

/// Distinct child values looked up at once.
const BATCH: i64 = 5_000;
/// Missing parent keys listed per relationship.
const SAMPLE: usize = 20;

/// A cross-service relationship and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphans {
    /// Target holding the child rows.
    pub child_target: String,
    /// Child table and column.
    pub child: (TableName, String),
    /// Target holding the parent rows.
    pub parent_target: String,
    /// Parent table and column.
    pub parent: (TableName, String),
    /// The monolith's constraint name.
    pub constraint: String,
    /// Child rows whose parent is missing.
    pub rows: i64,
    /// Missing parent keys (a sample).
    pub missing: Vec<String>,
}

/// Single-column foreign keys between routed tables that no one target holds both sides of:
/// (constraint, child, child column, parent, parent column, parent column type).
async fn relationships(
    src: &Client,
) -> Result<Vec<(String, TableName, String, TableName, String, String)>, tokio_postgres::Error> {
    let rows = src
        .query(
            "SELECT k.conname::text, cn.nspname::text, c.relname::text, ca.attname::text, \
                    pn.nspname::text, p.relname::text, pa.attname::text, format_type(pa.atttypid, pa.atttypmod) \
             FROM pg_constraint k \
             JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace \
             JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace \
             JOIN pg_attribute ca ON ca.attrelid = k.conrelid AND ca.attnum = k.conkey[1] \
             JOIN pg_attribute pa ON pa.attrelid = k.confrelid AND pa.attnum = k.confkey[1] \
             WHERE k.contype = 'f' AND cardinality(k.conkey) = 1 AND NOT c.relispartition \
             ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                TableName {
                    schema: r.get(1),
                    name: r.get(2),
                },
                r.get(3),
                TableName {
                    schema: r.get(4),
                    name: r.get(5),
                },
                r.get(6),
                r.get(7),
            )
        })
        .collect())
}

/// Values of `values` (text) that `parent.column` lacks at the parent's target.
async fn missing_in_parent(
    parent: &Client,
    table: &TableName,
    column: &str,
    ty: &str,
    values: &[String],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = parent
        .query(
            &format!(
                "SELECT v FROM unnest($1::text[]) v \
                 WHERE NOT EXISTS (SELECT 1 FROM {t} p WHERE p.{c} = v::{ty})",
                t = table.quoted(),
                c = quote_ident(column)
            ),
            &[&values],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Connects to target `name`.
async fn target(settings: &Settings, name: &str) -> Result<Client, String> {
    let t = settings
        .targets
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| format!("no target {name}"))?;
    super::connect(&t.conn, &format!("target {name}")).await
}

/// Waits until every target holds everything the source has now.
async fn wait(settings: &Settings, slot_reader: &Client) -> Result<(), String> {
    let p: String = slot_reader
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| format!("source: {}", safe_pg_error(&e)))?
        .get(0);
    super::wait_confirmed(
        slot_reader,
        &settings.slot,
        p.parse().unwrap_or(crate::lsn::Lsn::ZERO),
    )
    .await
}

/// Checks every cross-service relationship (`slot_reader`: a source connection outside any
/// snapshot, for the slot's confirmed position).
pub async fn check(
    settings: &Settings,
    src: &Client,
    slot_reader: &Client,
) -> Result<Vec<Orphans>, String> {
    let e = |what: &str, x: tokio_postgres::Error| format!("{what}: {}", safe_pg_error(&x));
    let mut out = Vec::new();
    for (constraint, child, ccol, parent, pcol, ty) in relationships(src)
        .await
        .map_err(|x| e("source: read foreign keys", x))?
    {
        let owners = |t: &TableName| -> Vec<String> {
            settings
                .targets
                .iter()
                .filter(|x| x.tables.contains(t))
                .map(|x| x.name.clone())
                .collect()
        };
        let (child_owners, parent_owners) = (owners(&child), owners(&parent));
        let Some(parent_target) = parent_owners.first() else {
            continue; // the parent is not routed: nothing to compare with
        };
        for child_target in child_owners.iter().filter(|t| !parent_owners.contains(t)) {
            let cdb = target(settings, child_target).await?;
            let pdb = target(settings, parent_target).await?;
            let mut candidates: Vec<String> = Vec::new();
            let mut last: Option<String> = None;
            loop {
                let batch: Vec<String> = cdb
                    .query(
                        &format!(
                            "SELECT DISTINCT {c}::text AS v, {c} AS k FROM {t} WHERE {c} IS NOT NULL \
                             AND ($1::text IS NULL OR {c} > $1::text::{ty}) ORDER BY k LIMIT {BATCH}",
                            c = quote_ident(&ccol),
                            t = child.quoted()
                        ),
                        &[&last],
                    )
                    .await
                    .map_err(|x| e(&format!("target {child_target}: {child}"), x))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let Some(end) = batch.last().cloned() else {
                    break;
                };
                candidates.extend(
                    missing_in_parent(&pdb, &parent, &pcol, &ty, &batch)
                        .await
                        .map_err(|x| e(&format!("target {parent_target}: {parent}"), x))?,
                );
                last = Some(end);
                if (batch.len() as i64) < BATCH {
                    break;
                }
            }
            // Targets stand at different positions: look again once both hold the same prefix.
            for attempt in 0..4u64 {
                if candidates.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300 * (attempt + 1))).await;
                wait(settings, slot_reader).await?;
                let still_child: Vec<String> = cdb
                    .query(
                        &format!(
                            "SELECT DISTINCT {c}::text FROM {t} WHERE {c} = ANY($1::text[]::{ty}[])",
                            c = quote_ident(&ccol),
                            t = child.quoted()
                        ),
                        &[&candidates],
                    )
                    .await
                    .map_err(|x| e(&format!("target {child_target}: {child}"), x))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                candidates = missing_in_parent(&pdb, &parent, &pcol, &ty, &still_child)
                    .await
                    .map_err(|x| e(&format!("target {parent_target}: {parent}"), x))?;
            }
            if candidates.is_empty() {
                continue;
            }
            let rows: i64 = cdb
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {t} WHERE {c} = ANY($1::text[]::{ty}[])",
                        c = quote_ident(&ccol),
                        t = child.quoted()
                    ),
                    &[&candidates],
                )
                .await
                .map_err(|x| e(&format!("target {child_target}: {child}"), x))?
                .get(0);
            candidates.sort();
            candidates.truncate(SAMPLE);
            out.push(Orphans {
                child_target: child_target.clone(),
                child: (child.clone(), ccol.clone()),
                parent_target: parent_target.clone(),
                parent: (parent.clone(), pcol.clone()),
                constraint: constraint.clone(),
                rows,
                missing: candidates,
            });
        }
    }
    Ok(out)
}
