//! Tests of the statement planner: SQL and parameter plans for every kind and identity.
use super::*;
use crate::pgoutput::Column;

/// COPY text format's reading of a field, as the server does it for our escapes.
fn copy_unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 1 < field.len() {
            out.push(match field[i + 1] {
                b't' => b'\t',
                b'n' => b'\n',
                b'r' => b'\r',
                other => other,
            });
            i += 2;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

proptest::proptest! {
    #[test]
    fn copy_escape_round_trips_and_never_leaks_a_delimiter(value in r"(?s).*|[\\\t\n\rN.a]*") {
        let mut out = BytesMut::new();
        copy_escape(&mut out, value.as_bytes());
        proptest::prop_assert!(!out.iter().any(|b| matches!(b, b'\t' | b'\n' | b'\r')));
        proptest::prop_assert_eq!(copy_unescape(&out), value.as_bytes());
        // Never read as NULL (`\N`) or as the end-of-data marker (`\.`).
        proptest::prop_assert!(&out[..] != b"\\N" && &out[..] != b"\\.");
    }
}

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

fn target(cols: &[&str]) -> TargetTable {
    TargetTable {
        table: TableName::parse("patients").unwrap(),
        columns: cols
            .iter()
            .map(|n| {
                (
                    (*n).to_string(),
                    TargetColumn {
                        type_name: "text".into(),
                        domain: false,
                        not_null: false,
                        has_default: false,
                        identity_always: false,
                    },
                )
            })
            .collect(),
        has_identity_always: false,
        copy_ok: true,
        plain: true,
    }
}

/// `tt` with `col` a `GENERATED ALWAYS` identity column.
fn with_identity_always(mut tt: TargetTable, col: &str) -> TargetTable {
    tt.columns.get_mut(col).expect("column").identity_always = true;
    tt.has_identity_always = true;
    tt
}

#[test]
fn identity_always_columns_are_skipped_when_unchanged_and_overridden_otherwise() {
    use bytes::Bytes;
    let r = rel(ReplicaIdentity::Full, &[("id", false), ("v", false)]);
    let tt = with_identity_always(target(&["id", "v"]), "id");
    let t = |a: &'static str, b: &'static str| {
        Tuple(vec![
            Value::Text(Bytes::from_static(a.as_bytes())),
            Value::Text(Bytes::from_static(b.as_bytes())),
        ])
    };
    // Same identity value: left out of SET, no ALTER needed.
    let skip = update_skip_positions(&r, &tt, &t("1", "b"), Some(&t("1", "a")));
    assert_eq!(skip.as_deref(), Some(&[0u16][..]));
    let p = update(&r, &tt, true, skip.as_deref(), None, true).unwrap();
    assert!(p.identity_override.is_empty(), "{}", p.sql);
    assert!(!p.sql.contains("SET \"id\""), "{}", p.sql);
    // A new identity value: written, between ALTERs.
    let skip = update_skip_positions(&r, &tt, &t("2", "b"), Some(&t("1", "a")));
    assert_eq!(skip, None);
    let p = update(&r, &tt, true, None, None, true).unwrap();
    assert_eq!(p.identity_override, ["\"id\""]);
}

#[test]
fn a_no_op_update_never_sets_an_identity_always_column() {
    use bytes::Bytes;
    // `UPDATE notes SET body = body` with a TOASTed body: the new tuple is (id, unchanged).
    let r = rel(ReplicaIdentity::Default, &[("id", true), ("body", false)]);
    let tt = with_identity_always(target(&["id", "body"]), "id");
    let new = Tuple(vec![
        Value::Text(Bytes::from_static(b"1")),
        Value::Unchanged,
    ]);
    let skip = update_skip_positions(&r, &tt, &new, None);
    let p = update(&r, &tt, false, skip.as_deref(), None, true).unwrap();
    assert_eq!(
        p.sql,
        "UPDATE \"public\".\"patients\" SET \"body\" = \"body\" WHERE \"id\" = $1"
    );
    assert!(p.identity_override.is_empty());
}

#[test]
fn unknown_old_identity_values_are_guarded_not_written() {
    // RI DEFAULT, a non-key identity column: its old value is not sent.
    let r = rel(
        ReplicaIdentity::Default,
        &[("k", true), ("n", false), ("v", false)],
    );
    let tt = with_identity_always(target(&["k", "n", "v"]), "n");
    let p = update(&r, &tt, false, None, None, true).unwrap();
    assert!(p.guarded && p.identity_override.is_empty(), "{}", p.sql);
    assert_eq!(
        p.sql,
        "UPDATE \"public\".\"patients\" SET \"v\" = $1 WHERE \"k\" = $2 AND \"n\" = $3"
    );
    assert_eq!(
        p.params,
        [(Source::New, 2), (Source::New, 0), (Source::New, 1)]
    );
    // The fallback writes it between ALTERs.
    let p = update(&r, &tt, false, None, None, false).unwrap();
    assert!(!p.guarded);
    assert_eq!(p.identity_override, ["\"n\""]);
}

#[test]
fn insert_names_columns() {
    let r = rel(ReplicaIdentity::Default, &[("id", true), ("name", false)]);
    let p = insert(&r, &target(&["name", "id", "extra"])).unwrap();
    assert_eq!(
        p.sql,
        r#"INSERT INTO "public"."patients" ("id", "name") OVERRIDING SYSTEM VALUE VALUES ($1, $2)"#
    );
    assert_eq!(p.params, vec![(Source::New, 0), (Source::New, 1)]);
}

#[test]
fn missing_target_column_is_named() {
    let r = rel(ReplicaIdentity::Default, &[("id", true), ("ssn", false)]);
    let e = insert(&r, &target(&["id"])).unwrap_err();
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
    let t = target(&["id", "note", "name"]);
    let p = update(&r, &t, false, Some(&[1]), None, true).unwrap();
    assert_eq!(
        p.sql,
        r#"UPDATE "public"."patients" SET "name" = $1 WHERE "id" = $2"#
    );
    assert_eq!(p.params, vec![(Source::New, 2), (Source::New, 0)]);
    // A changed key: the old key finds the row.
    let p = update(&r, &t, true, None, None, true).unwrap();
    assert_eq!(p.params.last(), Some(&(Source::Old, 0)));
}

#[test]
fn full_identity_changes_one_matching_row() {
    let r = rel(ReplicaIdentity::Full, &[("a", true), ("doc", true)]);
    let t = target(&["a", "doc"]);
    let p = delete(&r, &t, None).unwrap();
    assert_eq!(
        p.sql,
        r#"DELETE FROM "public"."patients" WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM "public"."patients" WHERE record_image_eq(ROW("a", "doc"), ROW($1::text, $2::text)) LIMIT 1)"#
    );
    assert_eq!(p.params, vec![(Source::Old, 0), (Source::Old, 1)]);
    assert!(update(&r, &t, false, None, None, true).is_err());
}

#[test]
fn no_identity_is_an_error() {
    let r = rel(ReplicaIdentity::Default, &[("a", false)]);
    let t = target(&["a"]);
    assert!(matches!(
        delete(&r, &t, None),
        Err(PlanError::NoIdentity { .. })
    ));
}

#[test]
fn truncate_flags() {
    let t = vec![
        (TableName::parse("a").unwrap(), true),
        (TableName::parse("s.b").unwrap(), false),
    ];
    assert_eq!(
        truncate(&t, true),
        r#"TRUNCATE ONLY "public"."a", "s"."b" RESTART IDENTITY"#
    );
    assert_eq!(truncate(&t[..1], false), r#"TRUNCATE ONLY "public"."a""#);
}
