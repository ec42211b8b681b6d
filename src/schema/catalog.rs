//! What the schema command reads: a routed table's definition on the source, and what a target
//! already has. Reads only.

use tokio_postgres::Client;

use crate::table::TableName;

/// A column as the source defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Name.
    pub name: String,
    /// `format_type` with its modifier (`numeric(10,2)`, `character varying(20)`).
    pub type_sql: String,
    /// NOT NULL.
    pub not_null: bool,
    /// The default expression (`pg_get_expr`), or the generation expression.
    pub default: Option<String>,
    /// `a` (ALWAYS) or `d` (BY DEFAULT) identity, else empty.
    pub identity: String,
    /// A stored generated column.
    pub generated: bool,
    /// Type OID (of the element, for an array).
    pub type_oid: u32,
}

/// A user-defined type a routed column uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserType {
    /// `CREATE TYPE … AS ENUM`.
    Enum {
        /// Qualified name.
        name: TableName,
        /// Labels in sort order.
        labels: Vec<String>,
    },
    /// `CREATE DOMAIN`.
    Domain {
        /// Qualified name.
        name: TableName,
        /// `format_type` of its base type.
        base: String,
        /// NOT NULL.
        not_null: bool,
        /// Default expression.
        default: Option<String>,
        /// Its constraints (`CONSTRAINT name CHECK (…)`).
        checks: Vec<String>,
    },
}

impl UserType {
    /// Its name.
    pub fn name(&self) -> &TableName {
        match self {
            UserType::Enum { name, .. } | UserType::Domain { name, .. } => name,
        }
    }
}

/// A routed table as the source defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    /// The table.
    pub table: TableName,
    /// Columns in order.
    pub columns: Vec<Column>,
    /// Primary key and unique constraints: (name, definition).
    pub keys: Vec<(String, String)>,
    /// The primary key's constraint name, if any.
    pub primary_key: Option<String>,
    /// Indexes that back no constraint (`pg_get_indexdef`), with their names.
    pub indexes: Vec<(String, String)>,
    /// Foreign keys: (name, definition, referenced table).
    pub foreign_keys: Vec<(String, String, TableName)>,
    /// User types its columns use, dependencies first.
    pub types: Vec<UserType>,
    /// Columns whose type cannot be created from here (composite, range or base types of
    /// extensions): (column, type).
    pub unsupported: Vec<(String, String)>,
}

/// The table's OID; `None`: no such table.
async fn oid_of(client: &Client, table: &TableName) -> Result<Option<u32>, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT to_regclass($1)::oid", &[&table.quoted()])
        .await?
        .get(0))
}

/// Reads a routed table's definition; `None`: it does not exist.
pub async fn source_table(
    client: &Client,
    table: &TableName,
) -> Result<Option<SourceTable>, tokio_postgres::Error> {
    let Some(oid) = oid_of(client, table).await? else {
        return Ok(None);
    };
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated = 's', \
                    CASE WHEN t.typcategory = 'A' AND t.typelem <> 0 THEN t.typelem ELSE t.oid END \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    let columns: Vec<Column> = rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_sql: r.get(1),
            not_null: r.get(2),
            default: r.get(3),
            identity: r.get(4),
            generated: r.get(5),
            type_oid: r.get(6),
        })
        .collect();
    let cons = client
        .query(
            "SELECT c.conname::text, c.contype::text, pg_get_constraintdef(c.oid), \
                    rn.nspname::text, r.relname::text \
             FROM pg_constraint c LEFT JOIN pg_class r ON r.oid = c.confrelid \
             LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace \
             WHERE c.conrelid = $1 AND c.contype IN ('p', 'u', 'f') ORDER BY c.contype DESC, c.conname",
            &[&oid],
        )
        .await?;
    let mut keys = Vec::new();
    let mut foreign_keys = Vec::new();
    let mut primary_key = None;
    for r in &cons {
        let (name, kind, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        match kind.as_str() {
            "f" => foreign_keys.push((
                name,
                def,
                TableName {
                    schema: r.get(3),
                    name: r.get(4),
                },
            )),
            k => {
                if k == "p" {
                    primary_key = Some(name.clone());
                }
                keys.push((name, def));
            }
        }
    }
    let idx = client
        .query(
            "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = $1 AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid \
                                                     AND k.conrelid = i.indrelid) \
             ORDER BY 1",
            &[&oid],
        )
        .await?;
    let indexes = idx.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut types = Vec::new();
    let mut unsupported = Vec::new();
    for c in &columns {
        if c.type_oid < 16384 {
            continue;
        }
        match user_type(client, c.type_oid).await? {
            Some(t) => {
                // A domain over an enum needs the enum first.
                if let UserType::Domain { .. } = &t {
                    let base: Option<u32> = client
                        .query_one(
                            "SELECT CASE WHEN b.typcategory = 'A' AND b.typelem <> 0 THEN b.typelem ELSE b.oid END \
                             FROM pg_type t JOIN pg_type b ON b.oid = t.typbasetype WHERE t.oid = $1",
                            &[&c.type_oid],
                        )
                        .await?
                        .get(0);
                    if let Some(b) = base.filter(|b| *b >= 16384) {
                        match user_type(client, b).await? {
                            Some(e @ UserType::Enum { .. }) => push_type(&mut types, e),
                            _ => unsupported.push((c.name.clone(), c.type_sql.clone())),
                        }
                    }
                }
                push_type(&mut types, t)
            }
            None => unsupported.push((c.name.clone(), c.type_sql.clone())),
        }
    }
    Ok(Some(SourceTable {
        table: table.clone(),
        columns,
        keys,
        primary_key,
        indexes,
        foreign_keys,
        types,
        unsupported,
    }))
}

fn push_type(types: &mut Vec<UserType>, t: UserType) {
    if !types.iter().any(|x| x.name() == t.name()) {
        types.push(t);
    }
}

/// An enum or a domain by OID; `None` for any other user type.
async fn user_type(client: &Client, oid: u32) -> Result<Option<UserType>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT n.nspname::text, t.typname::text, t.typtype::text, \
                    format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typdefault \
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
            &[&oid],
        )
        .await?;
    let name = TableName {
        schema: row.get(0),
        name: row.get(1),
    };
    let kind: String = row.get(2);
    Ok(match kind.as_str() {
        "e" => Some(UserType::Enum {
            name,
            labels: enum_labels(client, oid).await?,
        }),
        "d" => {
            let checks = client
                .query(
                    "SELECT 'CONSTRAINT ' || quote_ident(conname) || ' ' || pg_get_constraintdef(oid) \
                     FROM pg_constraint WHERE contypid = $1 AND contype = 'c' ORDER BY conname",
                    &[&oid],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            Some(UserType::Domain {
                name,
                base: row.get(3),
                not_null: row.get(4),
                default: row.get(5),
                checks,
            })
        }
        _ => None,
    })
}

async fn enum_labels(client: &Client, oid: u32) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A table as a target has it, for the comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetTable {
    /// Columns: (name, `format_type`).
    pub columns: Vec<(String, String)>,
    /// Has a primary key.
    pub has_primary_key: bool,
}

/// Reads a table on a target; `None`: missing.
pub async fn target_table(
    client: &Client,
    table: &TableName,
) -> Result<Option<TargetTable>, tokio_postgres::Error> {
    let Some(oid) = oid_of(client, table).await? else {
        return Ok(None);
    };
    let columns = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let has_primary_key: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = $1 AND indisprimary)",
            &[&oid],
        )
        .await?
        .get(0);
    Ok(Some(TargetTable {
        columns,
        has_primary_key,
    }))
}

/// A user type as a target has it: `None` missing; for an enum its labels.
pub async fn target_type(
    client: &Client,
    name: &TableName,
) -> Result<Option<Vec<String>>, tokio_postgres::Error> {
    let oid: Option<u32> = client
        .query_one("SELECT to_regtype($1)::oid", &[&name.quoted()])
        .await?
        .get(0);
    match oid {
        None => Ok(None),
        Some(oid) => Ok(Some(enum_labels(client, oid).await?)),
    }
}
