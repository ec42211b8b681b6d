//! SQL for applying row changes, built from the source's Relation message and the target's
//! catalog. Pure: no I/O, unit-tested.
//!
//! Columns map by name. Each statement comes with a parameter plan (which tuple, which column
//! feeds each `$n`) so values are bound exactly as the SQL expects them, as text, with no
//! conversion on our side: PostgreSQL's input function on the target reads what the source's
//! output function wrote.
//!
//! Row identity:
//! - primary key / REPLICA IDENTITY USING INDEX: `WHERE k1 = $a AND …` over the key columns
//!   flagged in the Relation message, taken from the old key tuple when the source sent one (the
//!   key changed) and from the new tuple otherwise;
//! - REPLICA IDENTITY FULL: every old column compared with `IS NOT DISTINCT FROM` (through
//!   `::text` for types without an equality operator), and exactly one matching row changed,
//!   chosen by `(tableoid, ctid)`, so duplicate rows stay duplicates.
//!
//! Unchanged TOASTed columns are left out of `SET`; each such combination is its own statement
//! shape, prepared once like the others.

use bytes::BytesMut;
use std::collections::HashMap;

use crate::config::TableName;
use crate::source::conn::quote_ident;
use crate::source::pgoutput::{Relation, ReplicaIdentity, Tuple, Value};

/// A column of a target table.
#[derive(Debug, Clone)]
pub struct TargetColumn {
    /// `format_type` of the column type, e.g. `numeric(10,2)`.
    pub type_name: String,
    /// Whether `=` exists for the type (otherwise compare as text).
    pub has_eq: bool,
    /// NOT NULL.
    pub not_null: bool,
    /// Has a default (or is an identity/generated column).
    pub has_default: bool,
}

/// A target table's columns by name.
#[derive(Debug, Clone)]
pub struct TargetTable {
    /// Its name on the target (same as the source's).
    pub table: TableName,
    /// Columns by name.
    pub columns: HashMap<String, TargetColumn>,
}

/// Where a parameter's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The new tuple.
    New,
    /// The old tuple (key or full row).
    Old,
}

/// A statement and how to fill its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The SQL text.
    pub sql: String,
    /// For `$1`, `$2`, …: which tuple and which column position.
    pub params: Vec<(Source, usize)>,
}

/// A statement that cannot be built. Names table and column only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The source column has no counterpart on the target.
    #[error("column {column} of {table} does not exist on the target")]
    MissingColumn {
        /// Table.
        table: TableName,
        /// Column.
        column: String,
    },
    /// UPDATE/DELETE on a relation without any identity to find the row by.
    #[error("{table} has no replica identity (no primary key, REPLICA IDENTITY NOTHING): cannot find rows to update or delete")]
    NoIdentity {
        /// Table.
        table: TableName,
    },
    /// A key column value was not sent.
    #[error("key column {column} of {table} has no value in the change")]
    MissingKey {
        /// Table.
        table: TableName,
        /// Column.
        column: String,
    },
    /// An insert arrived without a full row (an unchanged-TOAST marker or too few values).
    #[error("column {column} of {table} has no value in the inserted row")]
    MissingValue {
        /// Table.
        table: TableName,
        /// Column.
        column: String,
    },
}

fn check_columns(rel: &Relation, tt: &TargetTable) -> Result<(), PlanError> {
    for c in &rel.columns {
        if !tt.columns.contains_key(&c.name) {
            return Err(PlanError::MissingColumn {
                table: tt.table.clone(),
                column: c.name.clone(),
            });
        }
    }
    Ok(())
}

/// Positions of `Unchanged` values in a tuple, or `None` when every value is present.
pub fn unchanged_positions(t: &Tuple) -> Option<Box<[u16]>> {
    if !t.0.iter().any(|v| matches!(v, Value::Unchanged)) {
        return None;
    }
    Some(
        t.0.iter()
            .enumerate()
            .filter(|(_, v)| matches!(v, Value::Unchanged))
            .map(|(i, _)| i as u16)
            .collect(),
    )
}

fn is_skipped(mask: Option<&[u16]>, i: usize) -> bool {
    mask.is_some_and(|m| m.contains(&(i as u16)))
}

/// `INSERT INTO t (c…) OVERRIDING SYSTEM VALUE VALUES ($1…)`: the source's values win, also
/// for `GENERATED ALWAYS` identity columns.
pub fn insert(rel: &Relation, tt: &TargetTable) -> Result<Plan, PlanError> {
    check_columns(rel, tt)?;
    let cols: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let vals: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    Ok(Plan {
        sql: format!(
            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})",
            tt.table.quoted(),
            cols.join(", "),
            vals.join(", ")
        ),
        params: (0..cols.len()).map(|i| (Source::New, i)).collect(),
    })
}

/// `COPY … FROM STDIN` for a run of inserts into one table: the fast path for bulk inserts.
/// COPY writes identity columns as given, like `OVERRIDING SYSTEM VALUE`.
pub fn copy_in(rel: &Relation, tt: &TargetTable) -> Result<Plan, PlanError> {
    check_columns(rel, tt)?;
    let cols: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
    Ok(Plan {
        sql: format!(
            "COPY {} ({}) FROM STDIN",
            tt.table.quoted(),
            cols.join(", ")
        ),
        params: (0..cols.len()).map(|i| (Source::New, i)).collect(),
    })
}

/// Appends one value in COPY text format: backslash, tab, newline and carriage return escaped.
/// In UTF-8 (our client encoding) these bytes never occur inside a multi-byte character.
pub fn copy_escape(out: &mut BytesMut, value: &[u8]) {
    let mut rest = value;
    while let Some(i) = rest
        .iter()
        .position(|&b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(match rest[i] {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            _ => b"\\r",
        });
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
}

/// The WHERE clause finding the row, appending its parameters to `params`.
fn row_filter(
    rel: &Relation,
    tt: &TargetTable,
    key_from: Source,
    old_mask: Option<&[u16]>,
    params: &mut Vec<(Source, usize)>,
) -> Result<String, PlanError> {
    let table = tt.table.quoted();
    match rel.replica_identity {
        ReplicaIdentity::Full => {
            let mut conds = Vec::new();
            for (i, c) in rel.columns.iter().enumerate() {
                if is_skipped(old_mask, i) {
                    continue;
                }
                params.push((Source::Old, i));
                let n = params.len();
                let col = quote_ident(&c.name);
                let has_eq = tt.columns.get(&c.name).is_some_and(|tc| tc.has_eq);
                conds.push(if has_eq {
                    format!("{col} IS NOT DISTINCT FROM ${n}")
                } else {
                    format!("{col}::text IS NOT DISTINCT FROM ${n}::text")
                });
            }
            let conds = if conds.is_empty() {
                "true".to_string()
            } else {
                conds.join(" AND ")
            };
            Ok(format!(
                "(tableoid, ctid) = (SELECT tableoid, ctid FROM {table} WHERE {conds} LIMIT 1)"
            ))
        }
        _ => {
            let keys: Vec<(usize, &str)> = rel
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_key())
                .map(|(i, c)| (i, c.name.as_str()))
                .collect();
            if keys.is_empty() {
                return Err(PlanError::NoIdentity {
                    table: tt.table.clone(),
                });
            }
            let mut conds = Vec::new();
            for (i, name) in keys {
                params.push((key_from, i));
                conds.push(format!("{} = ${}", quote_ident(name), params.len()));
            }
            Ok(conds.join(" AND "))
        }
    }
}

/// `UPDATE t SET … WHERE <identity>`. `has_old` says whether the change carries an old key or
/// row; `new_mask` / `old_mask` list unchanged-TOAST positions to leave out.
pub fn update(
    rel: &Relation,
    tt: &TargetTable,
    has_old: bool,
    new_mask: Option<&[u16]>,
    old_mask: Option<&[u16]>,
) -> Result<Plan, PlanError> {
    check_columns(rel, tt)?;
    let mut params = Vec::new();
    let mut sets = Vec::new();
    // Without an old key the key did not change: leave key columns out of SET (they may be
    // GENERATED ALWAYS identity columns, which UPDATE may only set to DEFAULT).
    let key_unchanged = !has_old && rel.replica_identity != ReplicaIdentity::Full;
    for (i, c) in rel.columns.iter().enumerate() {
        if is_skipped(new_mask, i) || (key_unchanged && c.is_key()) {
            continue;
        }
        params.push((Source::New, i));
        sets.push(format!("{} = ${}", quote_ident(&c.name), params.len()));
    }
    let key_from = if has_old { Source::Old } else { Source::New };
    if rel.replica_identity == ReplicaIdentity::Full && !has_old {
        return Err(PlanError::NoIdentity {
            table: tt.table.clone(),
        });
    }
    let filter = row_filter(rel, tt, key_from, old_mask, &mut params)?;
    if sets.is_empty() {
        // Every column unchanged: still check the row exists, as a no-op update.
        let first = quote_ident(
            &rel.columns
                .first()
                .map(|c| c.name.clone())
                .unwrap_or_default(),
        );
        sets.push(format!("{first} = {first}"));
    }
    Ok(Plan {
        sql: format!(
            "UPDATE {} SET {} WHERE {}",
            tt.table.quoted(),
            sets.join(", "),
            filter
        ),
        params,
    })
}

/// `DELETE FROM t WHERE <identity>`, the identity from the old tuple.
pub fn delete(
    rel: &Relation,
    tt: &TargetTable,
    old_mask: Option<&[u16]>,
) -> Result<Plan, PlanError> {
    check_columns(rel, tt)?;
    let mut params = Vec::new();
    let filter = row_filter(rel, tt, Source::Old, old_mask, &mut params)?;
    Ok(Plan {
        sql: format!("DELETE FROM {} WHERE {}", tt.table.quoted(), filter),
        params,
    })
}

/// `TRUNCATE ONLY a, b [RESTART IDENTITY] [CASCADE]`.
pub fn truncate(tables: &[TableName], restart_identity: bool, cascade: bool) -> String {
    let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let mut sql = format!("TRUNCATE {}", names.join(", "));
    if restart_identity {
        sql.push_str(" RESTART IDENTITY");
    }
    if cascade {
        sql.push_str(" CASCADE");
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pgoutput::Column;

    #[test]
    fn copy_escape_escapes_only_the_copy_delimiters() {
        let mut out = BytesMut::new();
        copy_escape(&mut out, "a\\b\tc\nd\re\\N é ' \" ,".as_bytes());
        assert_eq!(&out[..], "a\\\\b\\tc\\nd\\re\\\\N é ' \" ,".as_bytes());
        out.clear();
        copy_escape(&mut out, b"");
        assert!(out.is_empty());
    }

    fn rel(ri: ReplicaIdentity, cols: &[(&str, bool)]) -> Relation {
        Relation {
            xid: None,
            oid: 1,
            namespace: "public".into(),
            name: "patients".into(),
            replica_identity: ri,
            columns: cols
                .iter()
                .map(|(n, key)| Column {
                    flags: u8::from(*key),
                    name: (*n).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn target(cols: &[(&str, bool)]) -> TargetTable {
        TargetTable {
            table: TableName::parse("patients").unwrap(),
            columns: cols
                .iter()
                .map(|(n, eq)| {
                    (
                        (*n).to_string(),
                        TargetColumn {
                            type_name: "text".into(),
                            has_eq: *eq,
                            not_null: false,
                            has_default: false,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn insert_names_columns() {
        let r = rel(ReplicaIdentity::Default, &[("id", true), ("name", false)]);
        let p = insert(
            &r,
            &target(&[("name", true), ("id", true), ("extra", true)]),
        )
        .unwrap();
        assert_eq!(
            p.sql,
            r#"INSERT INTO "public"."patients" ("id", "name") OVERRIDING SYSTEM VALUE VALUES ($1, $2)"#
        );
        assert_eq!(p.params, vec![(Source::New, 0), (Source::New, 1)]);
    }

    #[test]
    fn missing_target_column_is_named() {
        let r = rel(ReplicaIdentity::Default, &[("id", true), ("ssn", false)]);
        let e = insert(&r, &target(&[("id", true)])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "column ssn of public.patients does not exist on the target"
        );
    }

    #[test]
    fn update_by_key_skips_unchanged_toast() {
        let r = rel(
            ReplicaIdentity::Default,
            &[("id", true), ("note", false), ("name", false)],
        );
        let t = target(&[("id", true), ("note", true), ("name", true)]);
        let p = update(&r, &t, false, Some(&[1]), None).unwrap();
        assert_eq!(
            p.sql,
            r#"UPDATE "public"."patients" SET "name" = $1 WHERE "id" = $2"#
        );
        assert_eq!(p.params, vec![(Source::New, 2), (Source::New, 0)]);
        // A changed key: the old key finds the row.
        let p = update(&r, &t, true, None, None).unwrap();
        assert_eq!(p.params.last(), Some(&(Source::Old, 0)));
    }

    #[test]
    fn full_identity_changes_one_matching_row() {
        let r = rel(ReplicaIdentity::Full, &[("a", true), ("doc", true)]);
        let t = target(&[("a", true), ("doc", false)]);
        let p = delete(&r, &t, None).unwrap();
        assert_eq!(
            p.sql,
            r#"DELETE FROM "public"."patients" WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM "public"."patients" WHERE "a" IS NOT DISTINCT FROM $1 AND "doc"::text IS NOT DISTINCT FROM $2::text LIMIT 1)"#
        );
        assert_eq!(p.params, vec![(Source::Old, 0), (Source::Old, 1)]);
        assert!(update(&r, &t, false, None, None).is_err());
    }

    #[test]
    fn no_identity_is_an_error() {
        let r = rel(ReplicaIdentity::Default, &[("a", false)]);
        let t = target(&[("a", true)]);
        assert!(matches!(
            delete(&r, &t, None),
            Err(PlanError::NoIdentity { .. })
        ));
    }

    #[test]
    fn truncate_flags() {
        let t = vec![
            TableName::parse("a").unwrap(),
            TableName::parse("s.b").unwrap(),
        ];
        assert_eq!(
            truncate(&t, true, true),
            r#"TRUNCATE "public"."a", "s"."b" RESTART IDENTITY CASCADE"#
        );
    }
}
