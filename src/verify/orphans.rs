//! Relationships that were foreign keys in the monolith and now cross service databases: the
//! child's rows at one target, the parent's at another, nothing enforcing them. Each is checked
//! across the two databases: the child's distinct key values, in batches, looked up in the
//! parent (a key of several columns compared column by column; a child row with a NULL in its
//! key is not checked, as MATCH SIMPLE does not). Targets stand at different positions while streaming, so a value found missing is
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
    /// Child table and column(s) (`a`, or `(a, b)` for several).
    pub child: (TableName, String),
    /// Target holding the parent rows.
    pub parent_target: String,
    /// Parent table and column(s) (`a`, or `(a, b)` for several).
    pub parent: (TableName, String),
    /// The monolith's constraint name.
    pub constraint: String,
    /// Child rows whose parent is missing.
    pub rows: i64,
    /// Missing parent keys (a sample; a multi-column key as `(a, b)`).
    pub missing: Vec<String>,
}

/// A foreign key of the monolith: child columns → parent columns, pairwise, with the parent
/// columns' types.
#[derive(Debug, Clone)]
struct Relationship {
    constraint: String,
    child: TableName,
    child_cols: Vec<String>,
    parent: TableName,
    parent_cols: Vec<String>,
    types: Vec<String>,
}

/// A table's column(s) for a message: `t.a`, or `t(a, b)`.
pub fn columns_at(table: &TableName, cols: &str) -> String {
    if cols.starts_with('(') {
        format!("{table}{cols}")
    } else {
        format!("{table}.{cols}")
    }
}

impl Relationship {
    /// The columns for a message: `a`, or `(a, b)` for several.
    fn names(cols: &[String]) -> String {
        Self::show(cols)
    }

    /// A key's display: the value, or `(v1, v2)` for several columns.
    fn show(values: &[String]) -> String {
        match values {
            [one] => one.clone(),
            many => format!("({})", many.join(", ")),
        }
    }
}

/// Foreign keys between tables (any number of columns), in constraint name order.
async fn relationships(src: &Client) -> Result<Vec<Relationship>, tokio_postgres::Error> {
    let rows = src
        .query(
            "SELECT k.conname::text, cn.nspname::text, c.relname::text, \
                    array_agg(ca.attname::text ORDER BY u.n), pn.nspname::text, p.relname::text, \
                    array_agg(pa.attname::text ORDER BY u.n), \
                    array_agg(format_type(pa.atttypid, pa.atttypmod) ORDER BY u.n) \
             FROM pg_constraint k \
             JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace \
             JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace \
             CROSS JOIN LATERAL unnest(k.conkey, k.confkey) WITH ORDINALITY u(ck, pk, n) \
             JOIN pg_attribute ca ON ca.attrelid = k.conrelid AND ca.attnum = u.ck \
             JOIN pg_attribute pa ON pa.attrelid = k.confrelid AND pa.attnum = u.pk \
             WHERE k.contype = 'f' AND NOT c.relispartition \
             GROUP BY k.oid, k.conname, cn.nspname, c.relname, pn.nspname, p.relname \
             ORDER BY 1, k.oid",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Relationship {
            constraint: r.get(0),
            child: TableName {
                schema: r.get(1),
                name: r.get(2),
            },
            child_cols: r.get(3),
            parent: TableName {
                schema: r.get(4),
                name: r.get(5),
            },
            parent_cols: r.get(6),
            types: r.get(7),
        })
        .collect())
}

/// `unnest($1::text[], $2::text[], …) AS v(c1, c2, …)`: keys as one text array per column.
fn unnest_keys(n: usize) -> String {
    let arrays: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
    let cols: Vec<String> = (1..=n).map(|i| format!("c{i}")).collect();
    format!("unnest({}) AS v({})", arrays.join(", "), cols.join(", "))
}

/// `x.a = v.c1::ty1 AND x.b = v.c2::ty2`: the columns of `alias` equal to a key of `v`.
fn matches_key(alias: &str, cols: &[String], types: &[String]) -> String {
    cols.iter()
        .zip(types)
        .enumerate()
        .map(|(i, (c, ty))| format!("{alias}.{} = v.c{}::{ty}", quote_ident(c), i + 1))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Keys as one text array per column (the query parameters of `unnest_keys`).
fn columns_of(keys: &[Vec<String>], n: usize) -> Vec<Vec<String>> {
    (0..n)
        .map(|i| keys.iter().map(|k| k[i].clone()).collect())
        .collect()
}

/// Runs `sql` with one text array per key column.
async fn query_keys(
    c: &Client,
    sql: &str,
    keys: &[Vec<String>],
    n: usize,
) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    let cols = columns_of(keys, n);
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = cols
        .iter()
        .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    Ok(c.query(sql, &params)
        .await?
        .iter()
        .map(|r| (0..n).map(|i| r.get::<_, String>(i)).collect())
        .collect())
}

/// Keys (text, one per column) that the parent lacks at the parent's target.
async fn missing_in_parent(
    parent: &Client,
    rel: &Relationship,
    keys: &[Vec<String>],
) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    let n = rel.parent_cols.len();
    let cols: Vec<String> = (1..=n).map(|i| format!("v.c{i}")).collect();
    let sql = format!(
        "SELECT {} FROM {} WHERE NOT EXISTS (SELECT 1 FROM {} p WHERE {})",
        cols.join(", "),
        unnest_keys(n),
        rel.parent.quoted(),
        matches_key("p", &rel.parent_cols, &rel.types)
    );
    query_keys(parent, &sql, keys, n).await
}

/// Of `keys`, those some child row still holds.
async fn still_in_child(
    child: &Client,
    rel: &Relationship,
    keys: &[Vec<String>],
) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    let n = rel.child_cols.len();
    let cols: Vec<String> = (1..=n).map(|i| format!("v.c{i}")).collect();
    let sql = format!(
        "SELECT {} FROM {} WHERE EXISTS (SELECT 1 FROM {} x WHERE {})",
        cols.join(", "),
        unnest_keys(n),
        rel.child.quoted(),
        matches_key("x", &rel.child_cols, &rel.types)
    );
    query_keys(child, &sql, keys, n).await
}

/// Child rows holding one of `keys`.
async fn child_rows(
    child: &Client,
    rel: &Relationship,
    keys: &[Vec<String>],
) -> Result<i64, tokio_postgres::Error> {
    let n = rel.child_cols.len();
    let sql = format!(
        "SELECT count(*)::bigint FROM {} x WHERE EXISTS (SELECT 1 FROM {} WHERE {})",
        rel.child.quoted(),
        unnest_keys(n),
        matches_key("x", &rel.child_cols, &rel.types)
    );
    let cols = columns_of(keys, n);
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = cols
        .iter()
        .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    Ok(child.query_one(&sql, &params).await?.get(0))
}

/// The child's distinct keys (no column NULL: MATCH SIMPLE checks no such row) after `after`
/// in the key order, at most `BATCH`.
async fn child_keys(
    child: &Client,
    rel: &Relationship,
    after: Option<&[String]>,
) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    let n = rel.child_cols.len();
    let cols: Vec<String> = rel.child_cols.iter().map(|c| quote_ident(c)).collect();
    let text: Vec<String> = cols.iter().map(|c| format!("{c}::text")).collect();
    let not_null: Vec<String> = cols.iter().map(|c| format!("{c} IS NOT NULL")).collect();
    // Keyset pagination on the typed row: (a, b) > ($1::ty1, $2::ty2).
    let typed: Vec<String> = rel
        .types
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("${}::text::{ty}", i + 1))
        .collect();
    let after_clause = match after {
        Some(_) => format!("AND ({}) > ({})", cols.join(", "), typed.join(", ")),
        None => String::new(),
    };
    let sql = format!(
        "SELECT DISTINCT {text}, {cols} FROM {t} WHERE {nn} {after_clause} ORDER BY {order} LIMIT {BATCH}",
        text = text.join(", "),
        cols = cols.join(", "),
        t = rel.child.quoted(),
        nn = not_null.join(" AND "),
        order = (n + 1..=2 * n)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    );
    let params: Vec<String> = after.map(|a| a.to_vec()).unwrap_or_default();
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    Ok(child
        .query(&sql, &refs)
        .await?
        .iter()
        .map(|r| (0..n).map(|i| r.get::<_, String>(i)).collect())
        .collect())
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
    for rel in relationships(src)
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
        let (child_owners, parent_owners) = (owners(&rel.child), owners(&rel.parent));
        let Some(parent_target) = parent_owners.first() else {
            continue; // the parent is not routed: nothing to compare with
        };
        let (child, parent) = (&rel.child, &rel.parent);
        for child_target in child_owners.iter().filter(|t| !parent_owners.contains(t)) {
            let cdb = target(settings, child_target).await?;
            let pdb = target(settings, parent_target).await?;
            let at_child = |x| e(&format!("target {child_target}: {child}"), x);
            let at_parent = |x| e(&format!("target {parent_target}: {parent}"), x);
            let mut candidates: Vec<Vec<String>> = Vec::new();
            let mut last: Option<Vec<String>> = None;
            loop {
                let batch = child_keys(&cdb, &rel, last.as_deref())
                    .await
                    .map_err(at_child)?;
                let Some(end) = batch.last().cloned() else {
                    break;
                };
                candidates.extend(
                    missing_in_parent(&pdb, &rel, &batch)
                        .await
                        .map_err(at_parent)?,
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
                let still = still_in_child(&cdb, &rel, &candidates)
                    .await
                    .map_err(at_child)?;
                candidates = missing_in_parent(&pdb, &rel, &still)
                    .await
                    .map_err(at_parent)?;
            }
            if candidates.is_empty() {
                continue;
            }
            let rows = child_rows(&cdb, &rel, &candidates)
                .await
                .map_err(at_child)?;
            let mut missing: Vec<String> =
                candidates.iter().map(|k| Relationship::show(k)).collect();
            missing.sort();
            missing.truncate(SAMPLE);
            out.push(Orphans {
                child_target: child_target.clone(),
                child: (child.clone(), Relationship::names(&rel.child_cols)),
                parent_target: parent_target.clone(),
                parent: (parent.clone(), Relationship::names(&rel.parent_cols)),
                constraint: rel.constraint.clone(),
                rows,
                missing,
            });
        }
    }
    Ok(out)
}
