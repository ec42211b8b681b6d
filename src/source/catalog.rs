//! Start-up checks and set-up on the source, over a normal SQL connection: `wal_level`, the
//! routed tables (exist, not partitions, usable replica identity), the publication, the slot.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::pg::quote_ident;
use crate::table::TableName;

/// What the source told us at start-up.
#[derive(Debug, Clone)]
pub struct SourceCatalog {
    /// `pg_control_system().system_identifier`.
    pub system_id: String,
    /// Columns of each routed table, in order.
    pub columns: HashMap<TableName, Vec<String>>,
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    /// Output plugin.
    pub plugin: String,
    /// Database the slot decodes.
    pub database: String,
    /// Confirmed flush position.
    pub confirmed_flush: Lsn,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: String,
}

fn db_err(what: &str, e: &tokio_postgres::Error) -> String {
    format!("source: {what}: {}", crate::pg::safe_pg_error(e))
}

/// Checks the source and the routed tables, collecting every problem.
pub async fn preflight(
    client: &Client,
    tables: &[TableName],
) -> Result<SourceCatalog, Vec<String>> {
    let mut problems = Vec::new();
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(|e| vec![db_err("read wal_level", &e)])?
        .get(0);
    if wal_level != "logical" {
        problems.push(format!(
            "source wal_level is {wal_level}: set wal_level = logical in postgresql.conf and restart the monolith"
        ));
    }
    let system_id: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| vec![db_err("read system identifier", &e)])?
        .get(0);
    let mut columns = HashMap::new();
    for t in tables {
        let row = client
            .query_opt(
                "SELECT c.oid, c.relkind::text, c.relreplident::text, c.relispartition, \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(|e| vec![db_err("read catalog", &e)])?;
        let Some(row) = row else {
            problems.push(format!(
                "routed table {t} does not exist on the source (names are case-sensitive, as stored in the catalog)"
            ));
            continue;
        };
        let oid: u32 = row.get(0);
        let kind: String = row.get(1);
        let ident: String = row.get(2);
        let is_partition: bool = row.get(3);
        let has_pk: bool = row.get(4);
        if kind != "r" && kind != "p" {
            problems.push(format!("routed table {t} is not a table (relkind {kind})"));
            continue;
        }
        if is_partition {
            problems.push(format!(
                "routed table {t} is a partition: route its partitioned root table instead"
            ));
        }
        match ident.as_str() {
            "n" => problems.push(format!(
                "table {t} has REPLICA IDENTITY NOTHING: its updates and deletes cannot be replicated; run ALTER TABLE {} REPLICA IDENTITY FULL (or DEFAULT with a primary key)",
                t.quoted()
            )),
            "d" if !has_pk => problems.push(format!(
                "table {t} has no primary key: publishing it would make the monolith's own UPDATE/DELETE on it fail; run ALTER TABLE {} REPLICA IDENTITY FULL (or add a primary key)",
                t.quoted()
            )),
            _ => {}
        }
        let cols = client
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 \
                 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                &[&oid],
            )
            .await
            .map_err(|e| vec![db_err("read columns", &e)])?;
        columns.insert(t.clone(), cols.iter().map(|r| r.get(0)).collect());
    }
    if problems.is_empty() {
        Ok(SourceCatalog { system_id, columns })
    } else {
        Err(problems)
    }
}

/// Creates the publication for the routed tables, or adds routed tables missing from it.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[TableName],
) -> Result<(), Vec<String>> {
    let row = client
        .query_opt(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot \
             FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| vec![db_err("read publication", &e)])?;
    let list = tables
        .iter()
        .map(TableName::quoted)
        .collect::<Vec<_>>()
        .join(", ");
    let Some(row) = row else {
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {list} WITH (publish_via_partition_root = true)",
            quote_ident(publication)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| vec![db_err(&format!("create publication {publication}"), &e)])?;
        tracing::info!(publication, tables = tables.len(), "created publication");
        return Ok(());
    };
    let mut problems = Vec::new();
    let all: bool = row.get(0);
    for (i, op) in [(1, "insert"), (2, "update"), (3, "delete"), (4, "truncate")] {
        if !row.get::<_, bool>(i) {
            problems.push(format!(
                "publication {publication} does not publish {op}: run ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')",
                quote_ident(publication)
            ));
        }
    }
    if !row.get::<_, bool>(5) {
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                quote_ident(publication)
            ))
            .await
            .map_err(|e| vec![db_err("set publish_via_partition_root", &e)])?;
    }
    if !all {
        // Row filters and column lists exist from PostgreSQL 15.
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| vec![db_err("read server version", &e)])?
            .get(0);
        let filters = if version >= 150000 {
            "pr.prqual IS NOT NULL, pr.prattrs IS NOT NULL"
        } else {
            "false, false"
        };
        let present = client
            .query(
                &format!(
                    "SELECT n.nspname::text, c.relname::text, {filters} \
                     FROM pg_publication_rel pr \
                     JOIN pg_publication p ON p.oid = pr.prpubid \
                     JOIN pg_class c ON c.oid = pr.prrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE p.pubname = $1"
                ),
                &[&publication],
            )
            .await
            .map_err(|e| vec![db_err("read publication tables", &e)])?;
        let present: Vec<TableName> = present
            .iter()
            .map(|r| {
                let table = TableName {
                    schema: r.get(0),
                    name: r.get(1),
                };
                // Every row and every column must reach the targets.
                if tables.contains(&table) {
                    let fix = format!(
                        "ALTER PUBLICATION {} SET TABLE … without it (or give pgcarve a publication of its own, source.publication)",
                        quote_ident(publication)
                    );
                    if r.get::<_, bool>(2) {
                        problems.push(format!(
                            "publication {publication} has a row filter (WHERE) on {table}: rows it leaves out would be missing on the targets; {fix}"
                        ));
                    }
                    if r.get::<_, bool>(3) {
                        problems.push(format!(
                            "publication {publication} has a column list on {table}: columns it leaves out would be NULL or default on the targets; {fix}"
                        ));
                    }
                }
                table
            })
            .collect();
        let missing: Vec<&TableName> = tables.iter().filter(|t| !present.contains(t)).collect();
        if !missing.is_empty() {
            let list = missing
                .iter()
                .map(|t| t.quoted())
                .collect::<Vec<_>>()
                .join(", ");
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {list}",
                    quote_ident(publication)
                ))
                .await
                .map_err(|e| vec![db_err("add tables to publication", &e)])?;
            tracing::info!(
                publication,
                added = missing.len(),
                "added routed tables to publication"
            );
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Selects a row while slot `$1` is streaming to a client: held by a walsender, and past its
/// consistent point. A slot being created is also `active`, but until its consistent point is
/// reached `confirmed_flush_lsn` is NULL, and transactions committing meanwhile are never
/// decoded: whoever waits for "streaming" before writing (the demo, the tests) must wait for this.
pub const SLOT_STREAMING_SQL: &str = "SELECT 1 FROM pg_replication_slots \
     WHERE slot_name = $1 AND active AND confirmed_flush_lsn IS NOT NULL";

/// The slot's row in `pg_replication_slots`, if it exists.
pub async fn slot_info(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotInfo>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT coalesce(plugin, '')::text, coalesce(database, '')::text, \
                    coalesce(confirmed_flush_lsn::text, '0/0'), coalesce(wal_status, '') \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        confirmed_flush: r.get::<_, String>(2).parse().unwrap_or(Lsn::ZERO),
        wal_status: r.get(3),
    }))
}
