//! What the monolith's catalog says, read over a normal SQL connection: `wal_level`, the routed
//! tables (exist, not partitions, usable replica identity, columns), the publication, the slot.
//!
//! Inspection and action are apart: the `inspect_*` functions only read and return facts (a
//! preflight can run them against production), the `plan_*` functions are pure and turn facts
//! into problems (every one, each with its fix) or a plan, and only [`act_publication`] writes.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::pg::{quote_ident, safe_pg_error};
use crate::table::TableName;

/// What the source told us at start-up, once its facts passed [`plan_source`].
#[derive(Debug, Clone)]
pub struct SourceCatalog {
    /// `pg_control_system().system_identifier`.
    pub system_id: String,
    /// Columns of each routed table, in order.
    pub columns: HashMap<TableName, Vec<String>>,
    /// OID of each routed table: its identity while it streams.
    pub oids: HashMap<TableName, u32>,
}

/// The source cluster and each routed table, as read.
#[derive(Debug, Clone)]
pub struct SourceFacts {
    /// `wal_level`.
    pub wal_level: String,
    /// The system identifier.
    pub system_id: String,
    /// Each routed table, in the order asked; `None` when it does not exist.
    pub tables: Vec<(TableName, Option<TableFacts>)>,
}

/// One routed table on the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFacts {
    /// Its OID.
    pub oid: u32,
    /// `relkind`: `r` table, `p` partitioned table, anything else is not a table.
    pub relkind: String,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: String,
    /// A partition (routed by its root instead).
    pub is_partition: bool,
    /// Has a primary key.
    pub has_primary_key: bool,
    /// Columns that are published (not dropped, not generated), in order.
    pub columns: Vec<String>,
}

/// The publication as `pg_publication` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationFacts {
    /// `FOR ALL TABLES`.
    pub all_tables: bool,
    /// Publishes insert, update, delete, truncate (in that order).
    pub publishes: [bool; 4],
    /// `publish_via_partition_root`.
    pub via_root: bool,
    /// Its tables (empty for `FOR ALL TABLES`).
    pub tables: Vec<PublishedTable>,
}

/// A table listed in the publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedTable {
    /// The table.
    pub table: TableName,
    /// Published with a row filter (`WHERE`).
    pub row_filter: bool,
    /// Published with a column list.
    pub column_list: bool,
}

/// What to do to the publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationPlan {
    /// It does not exist: create it for the routed tables.
    Create,
    /// It exists: set `publish_via_partition_root` and/or add missing routed tables.
    Alter {
        /// Turn on `publish_via_partition_root`.
        set_via_root: bool,
        /// Routed tables it lacks.
        add: Vec<TableName>,
    },
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
    format!("source: {what}: {}", safe_pg_error(e))
}

/// Reads `wal_level`, the system identifier and every routed table. Writes nothing.
pub async fn inspect_source(client: &Client, tables: &[TableName]) -> Result<SourceFacts, String> {
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(|e| db_err("read wal_level", &e))?
        .get(0);
    let system_id: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| db_err("read system identifier", &e))?
        .get(0);
    let mut out = Vec::with_capacity(tables.len());
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
            .map_err(|e| db_err("read catalog", &e))?;
        let Some(row) = row else {
            out.push((t.clone(), None));
            continue;
        };
        let oid: u32 = row.get(0);
        let columns = client
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 \
                 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                &[&oid],
            )
            .await
            .map_err(|e| db_err("read columns", &e))?;
        out.push((
            t.clone(),
            Some(TableFacts {
                oid,
                relkind: row.get(1),
                replica_identity: row.get(2),
                is_partition: row.get(3),
                has_primary_key: row.get(4),
                columns: columns.iter().map(|r| r.get(0)).collect(),
            }),
        ));
    }
    Ok(SourceFacts {
        wal_level,
        system_id,
        tables: out,
    })
}

/// Every problem with the source for streaming the routed tables, or what start-up needs of it.
pub fn plan_source(facts: &SourceFacts) -> Result<SourceCatalog, Vec<String>> {
    let mut problems = Vec::new();
    if facts.wal_level != "logical" {
        problems.push(format!(
            "source wal_level is {}: set wal_level = logical in postgresql.conf and restart the monolith",
            facts.wal_level
        ));
    }
    let mut columns = HashMap::new();
    let mut oids = HashMap::new();
    for (t, table) in &facts.tables {
        let Some(f) = table else {
            problems.push(format!(
                "routed table {t} does not exist on the source (names are case-sensitive, as stored in the catalog; if it was renamed or moved, put its new name in the targets' tables and rename the target tables to match)"
            ));
            continue;
        };
        if f.relkind != "r" && f.relkind != "p" {
            problems.push(format!(
                "routed table {t} is not a table (relkind {})",
                f.relkind
            ));
            continue;
        }
        if f.is_partition {
            problems.push(format!(
                "routed table {t} is a partition: route its partitioned root table instead"
            ));
        }
        match f.replica_identity.as_str() {
            "n" => problems.push(format!(
                "table {t} has REPLICA IDENTITY NOTHING: its updates and deletes cannot be replicated; run ALTER TABLE {} REPLICA IDENTITY FULL (or DEFAULT with a primary key)",
                t.quoted()
            )),
            "d" if !f.has_primary_key => problems.push(format!(
                "table {t} has no primary key: publishing it would make the monolith's own UPDATE/DELETE on it fail; run ALTER TABLE {} REPLICA IDENTITY FULL (or add a primary key)",
                t.quoted()
            )),
            _ => {}
        }
        columns.insert(t.clone(), f.columns.clone());
        oids.insert(t.clone(), f.oid);
    }
    if problems.is_empty() {
        Ok(SourceCatalog {
            system_id: facts.system_id.clone(),
            columns,
            oids,
        })
    } else {
        Err(problems)
    }
}

/// Reads the publication; `None` when it does not exist. Writes nothing.
pub async fn inspect_publication(
    client: &Client,
    publication: &str,
) -> Result<Option<PublicationFacts>, String> {
    let row = client
        .query_opt(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot \
             FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| db_err("read publication", &e))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let all_tables: bool = row.get(0);
    let mut tables = Vec::new();
    if !all_tables {
        // Row filters and column lists exist from PostgreSQL 15.
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| db_err("read server version", &e))?
            .get(0);
        let filters = if version >= 150000 {
            "pr.prqual IS NOT NULL, pr.prattrs IS NOT NULL"
        } else {
            "false, false"
        };
        let rows = client
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
            .map_err(|e| db_err("read publication tables", &e))?;
        tables = rows
            .iter()
            .map(|r| PublishedTable {
                table: TableName {
                    schema: r.get(0),
                    name: r.get(1),
                },
                row_filter: r.get(2),
                column_list: r.get(3),
            })
            .collect();
    }
    Ok(Some(PublicationFacts {
        all_tables,
        publishes: [row.get(1), row.get(2), row.get(3), row.get(4)],
        via_root: row.get(5),
        tables,
    }))
}

/// What to do to the publication so it publishes every routed table whole, or every problem.
pub fn plan_publication(
    publication: &str,
    facts: Option<&PublicationFacts>,
    tables: &[TableName],
) -> Result<PublicationPlan, Vec<String>> {
    let Some(facts) = facts else {
        return Ok(PublicationPlan::Create);
    };
    let mut problems = Vec::new();
    for (publishes, op) in facts
        .publishes
        .iter()
        .zip(["insert", "update", "delete", "truncate"])
    {
        if !publishes {
            problems.push(format!(
                "publication {publication} does not publish {op}: run ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')",
                quote_ident(publication)
            ));
        }
    }
    let mut add = Vec::new();
    if !facts.all_tables {
        // Every row and every column must reach the targets.
        let fix = format!(
            "ALTER PUBLICATION {} SET TABLE … without it (or give pgcarve a publication of its own, source.publication)",
            quote_ident(publication)
        );
        for p in facts.tables.iter().filter(|p| tables.contains(&p.table)) {
            if p.row_filter {
                problems.push(format!(
                    "publication {publication} has a row filter (WHERE) on {}: rows it leaves out would be missing on the targets; {fix}",
                    p.table
                ));
            }
            if p.column_list {
                problems.push(format!(
                    "publication {publication} has a column list on {}: columns it leaves out would be NULL or default on the targets; {fix}",
                    p.table
                ));
            }
        }
        add = tables
            .iter()
            .filter(|t| !facts.tables.iter().any(|p| p.table == **t))
            .cloned()
            .collect();
    }
    if problems.is_empty() {
        Ok(PublicationPlan::Alter {
            set_via_root: !facts.via_root,
            add,
        })
    } else {
        Err(problems)
    }
}

/// Carries out a publication plan.
pub async fn act_publication(
    client: &Client,
    publication: &str,
    tables: &[TableName],
    plan: &PublicationPlan,
) -> Result<(), String> {
    let name = quote_ident(publication);
    let list = |tables: &[TableName]| {
        tables
            .iter()
            .map(TableName::quoted)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match plan {
        PublicationPlan::Create => {
            let sql = format!(
                "CREATE PUBLICATION {name} FOR TABLE {} WITH (publish_via_partition_root = true)",
                list(tables)
            );
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| db_err(&format!("create publication {publication}"), &e))?;
            tracing::info!(publication, tables = tables.len(), "created publication");
        }
        PublicationPlan::Alter { set_via_root, add } => {
            if *set_via_root {
                client
                    .batch_execute(&format!(
                        "ALTER PUBLICATION {name} SET (publish_via_partition_root = true)"
                    ))
                    .await
                    .map_err(|e| db_err("set publish_via_partition_root", &e))?;
            }
            if !add.is_empty() {
                client
                    .batch_execute(&format!("ALTER PUBLICATION {name} ADD TABLE {}", list(add)))
                    .await
                    .map_err(|e| db_err("add tables to publication", &e))?;
                tracing::info!(
                    publication,
                    added = add.len(),
                    "added routed tables to publication"
                );
            }
        }
    }
    Ok(())
}

/// Selects a row while slot `$1` is streaming to a client: held by a walsender, and past its
/// consistent point. A slot being created is also `active`, but until its consistent point is
/// reached `confirmed_flush_lsn` is NULL, and transactions committing meanwhile are never
/// decoded: whoever waits for "streaming" before writing (the demo, the tests) must wait for this.
pub const SLOT_STREAMING_SQL: &str = "SELECT 1 FROM pg_replication_slots \
     WHERE slot_name = $1 AND active AND confirmed_flush_lsn IS NOT NULL";

/// The slot's row in `pg_replication_slots`, if it exists. Writes nothing.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TableName {
        TableName::parse(name).unwrap()
    }

    fn table(relkind: &str, ident: &str, partition: bool, pk: bool) -> TableFacts {
        TableFacts {
            oid: 16384,
            relkind: relkind.into(),
            replica_identity: ident.into(),
            is_partition: partition,
            has_primary_key: pk,
            columns: vec!["id".into(), "name".into()],
        }
    }

    fn source(tables: Vec<(TableName, Option<TableFacts>)>) -> SourceFacts {
        SourceFacts {
            wal_level: "logical".into(),
            system_id: "7300000000000000001".into(),
            tables,
        }
    }

    #[test]
    fn a_good_source_gives_its_columns() {
        let facts = source(vec![
            (t("patients"), Some(table("r", "d", false, true))),
            (t("events"), Some(table("p", "f", false, false))),
        ]);
        let cat = plan_source(&facts).unwrap();
        assert_eq!(cat.system_id, "7300000000000000001");
        assert_eq!(cat.columns[&t("patients")], vec!["id", "name"]);
        assert_eq!(cat.columns.len(), 2);
    }

    #[test]
    fn every_source_problem_is_reported_at_once() {
        let mut facts = source(vec![
            (t("missing"), None),
            (t("a_view"), Some(table("v", "d", false, false))),
            (t("part_1"), Some(table("r", "d", true, true))),
            (t("no_ident"), Some(table("r", "n", false, true))),
            (t("no_pk"), Some(table("r", "d", false, false))),
            (t("full"), Some(table("r", "f", false, false))),
        ]);
        facts.wal_level = "replica".into();
        let p = plan_source(&facts).unwrap_err();
        assert_eq!(p.len(), 6, "{p:#?}");
        assert!(p[0].contains("wal_level is replica"));
        assert!(p[1].contains("public.missing does not exist"));
        assert!(p[2].contains("public.a_view is not a table (relkind v)"));
        assert!(p[3].contains("public.part_1 is a partition"));
        assert!(p[4].contains("REPLICA IDENTITY NOTHING"));
        assert!(p[5].contains("public.no_pk has no primary key"));
        assert!(p[5].contains("ALTER TABLE \"public\".\"no_pk\" REPLICA IDENTITY FULL"));
    }

    fn publication(tables: Vec<PublishedTable>) -> PublicationFacts {
        PublicationFacts {
            all_tables: false,
            publishes: [true; 4],
            via_root: true,
            tables,
        }
    }

    fn published(name: &str, row_filter: bool, column_list: bool) -> PublishedTable {
        PublishedTable {
            table: t(name),
            row_filter,
            column_list,
        }
    }

    #[test]
    fn a_missing_publication_is_created() {
        assert_eq!(
            plan_publication("pgcarve", None, &[t("a")]),
            Ok(PublicationPlan::Create)
        );
    }

    #[test]
    fn missing_tables_are_added_and_via_root_set() {
        let mut facts = publication(vec![published("a", false, false)]);
        facts.via_root = false;
        assert_eq!(
            plan_publication("pgcarve", Some(&facts), &[t("a"), t("b")]),
            Ok(PublicationPlan::Alter {
                set_via_root: true,
                add: vec![t("b")]
            })
        );
        // FOR ALL TABLES already has every table.
        let all = PublicationFacts {
            all_tables: true,
            ..publication(Vec::new())
        };
        assert_eq!(
            plan_publication("pgcarve", Some(&all), &[t("a")]),
            Ok(PublicationPlan::Alter {
                set_via_root: false,
                add: Vec::new()
            })
        );
    }

    #[test]
    fn filters_on_routed_tables_and_unpublished_operations_are_refused() {
        let mut facts = publication(vec![
            published("a", true, false),
            published("b", false, true),
            // Not routed: its filter is none of our business.
            published("other", true, true),
        ]);
        facts.publishes = [true, false, true, false];
        let p = plan_publication("pgcarve", Some(&facts), &[t("a"), t("b")]).unwrap_err();
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(p[0].contains("does not publish update"));
        assert!(p[1].contains("does not publish truncate"));
        assert!(p[2].contains("row filter (WHERE) on public.a"));
        assert!(p[3].contains("column list on public.b"));
    }
}
