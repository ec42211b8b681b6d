//! `pgcarve check --assess`: what the split means, read from the monolith's catalog and the
//! targets — per target its tables with rows, bytes and an estimated copy time; tables without
//! a primary key; foreign keys that cross the service map (orphan risks once split); the
//! sequences the routed tables use (to set at cutover); triggers and rules on the targets that
//! apply would fire. Reads only; counts and names, never values.

use std::collections::HashMap;

use serde_json::json;
use tokio_postgres::Client;

use crate::config::Settings;
use crate::pg::safe_pg_error;
use crate::route::Router;
use crate::table::TableName;

/// Rows per second one copy stream sustains, for the estimate: measured by `cargo bench --bench
/// copy` on a 2-core machine (2,000,000 rows in about 5.7 s).
pub const COPY_ROWS_PER_SEC: f64 = 350_000.0;

/// One routed table's size.
#[derive(Debug, Clone)]
pub struct TableSize {
    /// The table.
    pub table: TableName,
    /// `pg_class.reltuples` (0 when never analyzed).
    pub rows: u64,
    /// `pg_total_relation_size`, with indexes and TOAST (partitions summed).
    pub bytes: u64,
    /// Has a primary key.
    pub primary_key: bool,
}

/// The assessment.
#[derive(Debug, Clone, Default)]
pub struct Assessment {
    /// Per target (configuration order): its tables.
    pub targets: Vec<(String, Vec<TableSize>)>,
    /// Foreign keys from a table to one a target of the child does not own: (target, child,
    /// constraint, parent, the parent's owners).
    pub cross_service: Vec<(String, TableName, String, TableName, Vec<String>)>,
    /// Sequences the routed tables use: (table, column, sequence, last value).
    pub sequences: Vec<(TableName, String, String, Option<i64>)>,
    /// Triggers and rules on targets' owned tables: (target, table, kind, name).
    pub target_hooks: Vec<(String, TableName, &'static str, String)>,
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn copy_secs(rows: u64) -> f64 {
    rows as f64 / COPY_ROWS_PER_SEC
}

impl Assessment {
    /// The human report.
    pub fn text(&self) -> String {
        let mut out = String::from("assessment\n");
        for (target, tables) in &self.targets {
            let rows: u64 = tables.iter().map(|t| t.rows).sum();
            let bytes: u64 = tables.iter().map(|t| t.bytes).sum();
            out.push_str(&format!(
                "  target {target}: {} tables, ~{rows} rows, {}, copy ~{:.0} s\n",
                tables.len(),
                human_bytes(bytes),
                copy_secs(rows)
            ));
            for t in tables {
                out.push_str(&format!(
                    "    {:<36} ~{:>10} rows {:>10}  copy ~{:.0} s{}\n",
                    t.table.to_string(),
                    t.rows,
                    human_bytes(t.bytes),
                    copy_secs(t.rows),
                    if t.primary_key {
                        ""
                    } else {
                        "  (no primary key: REPLICA IDENTITY FULL, compared as a multiset)"
                    }
                ));
            }
        }
        if !self.cross_service.is_empty() {
            out.push_str("  foreign keys that cross services (orphan risks once split; nothing enforces them):\n");
            for (target, child, name, parent, owners) in &self.cross_service {
                out.push_str(&format!(
                    "    {target}: {child} {name} → {parent} ({})\n",
                    if owners.is_empty() {
                        "routed to no target".to_string()
                    } else {
                        format!("owned by {}", owners.join(", "))
                    }
                ));
            }
        }
        if !self.sequences.is_empty() {
            out.push_str("  sequences the routed tables use (set the services' own at cutover):\n");
            for (table, column, seq, last) in &self.sequences {
                out.push_str(&format!(
                    "    {table}.{column}: {seq}, last value {}\n",
                    last.map_or("none yet".to_string(), |v| v.to_string())
                ));
            }
        }
        if !self.target_hooks.is_empty() {
            out.push_str("  triggers and rules on targets that apply will fire:\n");
            for (target, table, kind, name) in &self.target_hooks {
                out.push_str(&format!("    {target}: {table} {kind} {name}\n"));
            }
        }
        out
    }

    /// The JSON report.
    pub fn json(&self) -> serde_json::Value {
        json!({
            "copy_rows_per_sec_assumed": COPY_ROWS_PER_SEC,
            "targets": self.targets.iter().map(|(name, tables)| json!({
                "target": name,
                "tables": tables.iter().map(|t| json!({
                    "table": t.table.to_string(), "rows": t.rows, "bytes": t.bytes,
                    "primary_key": t.primary_key, "copy_secs": copy_secs(t.rows).round(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "cross_service_foreign_keys": self.cross_service.iter().map(|(target, child, name, parent, owners)| json!({
                "target": target, "table": child.to_string(), "constraint": name,
                "references": parent.to_string(), "referenced_owners": owners,
            })).collect::<Vec<_>>(),
            "sequences": self.sequences.iter().map(|(table, column, seq, last)| json!({
                "table": table.to_string(), "column": column, "sequence": seq, "last_value": last,
            })).collect::<Vec<_>>(),
            "target_triggers_and_rules": self.target_hooks.iter().map(|(target, table, kind, name)| json!({
                "target": target, "table": table.to_string(), "kind": kind, "name": name,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Reads the assessment.
pub async fn assess(
    settings: &Settings,
    src: &Client,
    router: &Router,
) -> Result<Assessment, String> {
    let err =
        |what: &str, e: tokio_postgres::Error| format!("source: {what}: {}", safe_pg_error(&e));
    let mut a = Assessment::default();
    let mut owners: HashMap<TableName, Vec<String>> = HashMap::new();
    for t in &settings.targets {
        for table in &t.tables {
            owners
                .entry(table.clone())
                .or_default()
                .push(t.name.clone());
        }
    }
    let mut sizes: HashMap<TableName, TableSize> = HashMap::new();
    for table in router.tables() {
        let row = src
            .query_opt(
                "SELECT greatest(c.reltuples, 0)::bigint + coalesce((SELECT sum(greatest(p.reltuples, 0))::bigint \
                        FROM pg_partition_tree(c.oid) t JOIN pg_class p ON p.oid = t.relid WHERE t.isleaf AND p.oid <> c.oid), 0), \
                        coalesce((SELECT sum(pg_total_relation_size(t.relid))::bigint FROM pg_partition_tree(c.oid) t), \
                                 pg_total_relation_size(c.oid)), \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
                 FROM pg_class c WHERE c.oid = to_regclass($1)",
                &[&table.quoted()],
            )
            .await
            .map_err(|e| err("read sizes", e))?;
        if let Some(r) = row {
            sizes.insert(
                table.clone(),
                TableSize {
                    table: table.clone(),
                    rows: r.get::<_, i64>(0).max(0) as u64,
                    bytes: r.get::<_, i64>(1).max(0) as u64,
                    primary_key: r.get(2),
                },
            );
        }
    }
    for t in &settings.targets {
        a.targets.push((
            t.name.clone(),
            t.tables
                .iter()
                .filter_map(|x| sizes.get(x).cloned())
                .collect(),
        ));
    }
    // Foreign keys whose two sides a target of the child does not both own.
    let fks = src
        .query(
            "SELECT cn.nspname::text, c.relname::text, k.conname::text, pn.nspname::text, p.relname::text \
             FROM pg_constraint k \
             JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace \
             JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace \
             WHERE k.contype = 'f' AND NOT c.relispartition ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .map_err(|e| err("read foreign keys", e))?;
    for r in &fks {
        let child = TableName {
            schema: r.get(0),
            name: r.get(1),
        };
        let parent = TableName {
            schema: r.get(3),
            name: r.get(4),
        };
        let Some(child_owners) = owners.get(&child) else {
            continue;
        };
        let parent_owners = owners.get(&parent).cloned().unwrap_or_default();
        for target in child_owners {
            if !parent_owners.contains(target) {
                a.cross_service.push((
                    target.clone(),
                    child.clone(),
                    r.get(2),
                    parent.clone(),
                    parent_owners.clone(),
                ));
            }
        }
    }
    // Sequences owned by or used in defaults of routed tables' columns.
    for table in router.tables() {
        let rows = src
            .query(
                "SELECT a.attname::text, pg_get_serial_sequence($1, a.attname) \
                 FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
                   AND pg_get_serial_sequence($1, a.attname) IS NOT NULL ORDER BY a.attnum",
                &[&table.quoted()],
            )
            .await
            .map_err(|e| err("read sequences", e))?;
        for r in rows {
            let seq: String = r.get(1);
            let last: Option<i64> = src
                .query_one(
                    "SELECT last_value FROM pg_sequences WHERE format('%I.%I', schemaname, sequencename) = $1 \
                        OR format('%s.%s', schemaname, sequencename) = $1",
                    &[&seq],
                )
                .await
                .map(|row| row.get(0))
                .unwrap_or(None);
            a.sequences.push((table.clone(), r.get(0), seq, last));
        }
    }
    // Triggers and rules on the targets' owned tables.
    for t in &settings.targets {
        let Ok(client) = crate::pg::open(&t.conn, &format!("target {}", t.name)).await else {
            continue; // unreachable: reported as a problem already
        };
        for table in &t.tables {
            let rows = client
                .query(
                    "SELECT 'trigger', tgname::text FROM pg_trigger WHERE tgrelid = to_regclass($1) AND NOT tgisinternal \
                     UNION ALL SELECT 'rule', rulename::text FROM pg_rules WHERE format('%I.%I', schemaname, tablename) = $1 \
                     ORDER BY 1, 2",
                    &[&table.quoted()],
                )
                .await
                .map_err(|e| format!("target {}: {}", t.name, safe_pg_error(&e)))?;
            for r in rows {
                let kind: &str = r.get(0);
                a.target_hooks.push((
                    t.name.clone(),
                    table.clone(),
                    if kind == "trigger" { "trigger" } else { "rule" },
                    r.get(1),
                ));
            }
        }
    }
    Ok(a)
}
