//! Row hashes that are equal for equal rows on every cluster, and the key ranges they are
//! summed over: what `verify` compares, and what a resumed copy compares to keep the ranges a
//! target already holds.
//!
//! A row's hash is `hash_record_extended` over its columns, each cast to its base type where
//! that type's hash function hashes by value (`1.0` and `1.00` are equal, as `=` says), else to
//! text: enums, user types and arrays or composites of them carry cluster-specific OIDs, and
//! json and a few others have no hash function. A set of rows' checksum is the exact sum of
//! their hashes (order-independent). The hash functions are PostgreSQL's own (stable across
//! versions: hash partitioning depends on them) and depend on byte order, so both sides must
//! share it (every x86-64 and ARM64 server does). The text casts need the same session
//! settings on both sides (the copy's and verify's).

use tokio_postgres::Client;

use crate::pg::quote_ident;
use crate::table::TableName;

/// Built-in types (by `typname`; their arrays too) whose hash function gives the same value
/// for equal values on every cluster of the same byte order.
const HASHED_BY_VALUE: &[&str] = &[
    "bool",
    "char",
    "name",
    "int2",
    "int4",
    "int8",
    "oid",
    "float4",
    "float8",
    "numeric",
    "text",
    "varchar",
    "bpchar",
    "bytea",
    "date",
    "time",
    "timetz",
    "timestamp",
    "timestamptz",
    "interval",
    "uuid",
    "jsonb",
    "inet",
    "macaddr",
];

/// `"col"::type` (or `::text`) for a column whose base type is `typname` (pure).
pub fn hashed_column(name: &str, typname: &str) -> String {
    let elem = typname.strip_prefix('_').unwrap_or(typname);
    let cast = if HASHED_BY_VALUE.contains(&elem) {
        quote_ident(typname)
    } else {
        "text".to_string()
    };
    format!("{}::{cast}", quote_ident(name))
}

/// The table's columns (generated ones left out), in order, as hashed: read on the side whose
/// types rule (the source). The list goes into [`row_hash`].
pub async fn columns(client: &Client, t: &TableName) -> Result<String, tokio_postgres::Error> {
    let cols: Vec<String> = client
        .query(
            "WITH RECURSIVE col AS ( \
                 SELECT a.attnum, a.attname, a.atttypid AS typ, 0 AS depth FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
                   AND a.attgenerated = '' \
               UNION ALL \
                 SELECT col.attnum, col.attname, t.typbasetype, col.depth + 1 \
                 FROM col JOIN pg_type t ON t.oid = col.typ WHERE t.typtype = 'd' \
             ) \
             SELECT DISTINCT ON (col.attnum) col.attname::text, t.typname::text \
             FROM col JOIN pg_type t ON t.oid = col.typ ORDER BY col.attnum, col.depth DESC",
            &[&t.quoted()],
        )
        .await?
        .iter()
        .map(|r| hashed_column(r.get(0), r.get(1)))
        .collect();
    Ok(cols.join(", "))
}

/// A row's 64-bit hash, over `columns` (from [`columns`]).
pub fn row_hash(columns: &str) -> String {
    format!("hash_record_extended(ROW({columns}), 0)")
}

/// The checksum of a set of rows: the exact sum of their hashes, as text.
pub fn row_sum(columns: &str) -> String {
    format!("coalesce(sum({}), 0)::text", row_hash(columns))
}

/// The condition selecting keys `from..to` (`None`: open at that end): `key` an expression of
/// the key (a column, or `ROW(…)` of several), the bounds SQL literals of it.
pub fn key_range<T: std::fmt::Display>(key: &str, from: Option<T>, to: Option<T>) -> String {
    match (from, to) {
        (None, None) => "true".into(),
        (Some(a), None) => format!("{key} >= {a}"),
        (None, Some(b)) => format!("{key} < {b}"),
        (Some(a), Some(b)) => format!("{key} >= {a} AND {key} < {b}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_types_hash_by_value_and_others_by_text() {
        assert_eq!(hashed_column("dose", "numeric"), r#""dose"::"numeric""#);
        assert_eq!(hashed_column("ids", "_int8"), r#""ids"::"_int8""#);
        assert_eq!(hashed_column("Mood", "mood"), r#""Mood"::text"#);
        assert_eq!(hashed_column("doc", "json"), r#""doc"::text"#);
    }

    #[test]
    fn key_ranges_are_half_open() {
        assert_eq!(key_range::<i64>("id", None, None), "true");
        assert_eq!(key_range("id", Some(3), Some(9)), "id >= 3 AND id < 9");
        assert_eq!(key_range("id", None, Some(9)), "id < 9");
    }
}
