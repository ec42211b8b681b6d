//! Values and row identity through the daemon: every value arrives exactly as the source
//! renders it, unchanged TOAST is kept, keys move, TRUNCATE reaches every owner, duplicates stay
//! duplicates, and a reader on a target never sees half a source transaction.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use crate::common::Env;

const VALUES_SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'très "content", n''est-ce pas?');
CREATE TABLE vals (
    id int PRIMARY KEY,
    n numeric,
    f float8,
    tz timestamptz,
    ts timestamp,
    d date,
    iv interval,
    jb jsonb,
    js json,
    txt text,  -- not `t`: the comparison aliases the table as `t`
    b bytea,
    u uuid,
    m mood,
    ia int4[],
    ta text[],
    bo boolean,
    ip inet,
    bi bigint
);
"#;

#[tokio::test]
async fn values_round_trip_exactly() {
    let env = Env::new(VALUES_SCHEMA, &[("svc", &["vals"])]).await;
    // A zone with a half-hour and (before 1935) a local-mean-time offset, on both sides, so
    // timestamptz travels as text with odd offsets and the comparison renders it the same way.
    let zone = "ALTER DATABASE {} SET timezone = 'America/St_Johns'";
    env.source()
        .await
        .batch_execute(&zone.replace("{}", &env.source_db))
        .await
        .unwrap();
    env.target("svc")
        .await
        .batch_execute(&zone.replace("{}", &env.targets[0].db))
        .await
        .unwrap();
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute(
        r#"
        INSERT INTO vals VALUES
        (1, 'NaN', 'Infinity', 'infinity', 'infinity', 'infinity',
         '1 year 2 mons 3 days 04:05:06.789012',
         '{"a": {"b": [1, 2.50, null, true, {"c": "é😀\"\\\n\t\u0001"}]}, "n": 1e400, "e": {}, "l": []}',
         E'{ "a" :  [1,2 ,  3],\n\t"a": "dup",  "u": "\\u00e9" }',
         E'it''s "quoted" \\ back\\\\slash\nnew line\ttab 😀 e\u0301 \\N NULL',
         '\x00ff0000'::bytea,
         '00000000-0000-0000-0000-000000000000', 'très "content", n''est-ce pas?',
         '{1,NULL,-2147483648}', '{"a,b","NULL",NULL,"","quo\"te","back\\\\slash","{x}"," sp "}',
         true, '192.168.0.1/24', 9223372036854775807),
        (2, 12345678901234567890.123456789012345678901234567890, '-Infinity', '-infinity', '-infinity', '-infinity',
         '-178000000 years', '"just a string"', '[]', '', ''::bytea,
         'ffffffff-ffff-ffff-ffff-ffffffffffff', 'sad', '{}', '{}', false, '::1',
         -9223372036854775808),
        (3, -0.000000000000000000000000000001, 'NaN', '2024-02-29 23:59:59.999999+00',
         '2000-01-01 00:00:00.000001', '5874897-12-31', '-1 days +01:00:00',
         '{"z": 1, "a": 2, "m": [{"k": null}]}', 'null', 'NULL',
         decode(repeat('00', 1000), 'hex'),
         '123e4567-e89b-12d3-a456-426614174000', 'ok', '{{1,2},{3,4}}', '{{a,b},{c,NULL}}',
         true, '10.1.2.3', 0),
        (4, -0.0, 1e-300, '0044-03-15 12:00:00+00 BC', '0001-01-01 00:00:00 BC', '4713-01-01 BC',
         '00:00:00.000001', '0', '  {"spaced"  :  true}  ', E'\\x41', '\x5c'::bytea,
         'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'sad', '[0:1]={5,6}', '[2:2]={only}',
         false, '2001:db8::1/64', -1),
        (5, 0.00, 0.1, '1999-12-31 23:59:59.5+05:30', '1970-01-01 00:00:00', '2000-02-29',
         '-1 mons -2 days', '1.000', '1.000', E'\u00a0\u2028\ufeff', '\xdeadbeef'::bytea,
         'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A12', 'ok', '{0}', '{""}',
         true, '0.0.0.0/0', 42),
        (6, 'Infinity', '-0', '4713-01-01 00:00:00+00 BC', '294276-12-31 23:59:59.999999', '1-01-01',
         '178000000 years', '{"big": 123456789012345678901234567890.5}', '{}', '😀😀😀',
         '\x0000'::bytea, NULL, NULL, '{NULL}', '{NULL}', NULL, NULL, NULL),
        (7, '-Infinity', 1.7976931348623157e308, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL),
        (8, 4.9e-324, 4.9e-324, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL),
        (9, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL);
        "#,
    )
    .await
    .unwrap();
    env.wait_equal("svc", "vals").await;

    // The nine rows above arrived as one run of inserts, through COPY. The same values again,
    // each insert followed by an update (so no run reaches COPY), go through prepared INSERT
    // statements.
    src.batch_execute(
        "DO $$ DECLARE r vals; BEGIN
             FOR r IN SELECT * FROM vals ORDER BY id LOOP
                 r.id := r.id + 100;
                 INSERT INTO vals SELECT r.*;
                 UPDATE vals SET bo = bo WHERE id = r.id;
                 COMMIT;
             END LOOP;
         END $$",
    )
    .await
    .unwrap();
    env.wait_equal("svc", "vals").await;

    src.batch_execute(
        r#"
        UPDATE vals SET n = 'NaN', f = 'NaN', tz = '-infinity', ts = '-infinity', d = '-infinity',
            jb = '{"after": "update \"x\""}', js = E'[ 1 ,\n 2 ]', txt = E'\\\\', b = '\x00'::bytea,
            ia = '{}', ta = '{NULL,""}', bo = NULL
            WHERE id = 1;
        UPDATE vals SET n = NULL, f = NULL, tz = NULL, ts = NULL, d = NULL, iv = NULL, jb = NULL,
            js = NULL, txt = NULL, b = NULL, u = NULL, m = NULL, ia = NULL, ta = NULL, bo = NULL,
            ip = NULL, bi = NULL
            WHERE id = 2;
        UPDATE vals SET n = 98765432109876543210.000000000000000000000000000001,
            f = 'Infinity', tz = '2024-01-01 00:00:00.000001+14', m = 'très "content", n''est-ce pas?',
            ta = E'{"new\nline","tab\there"}'
            WHERE id = 9;
        DELETE FROM vals WHERE id = 3;
        "#,
    )
    .await
    .unwrap();
    env.wait_equal("svc", "vals").await;
    daemon.stop().await;
}

#[tokio::test]
async fn unchanged_toast_columns_are_left_as_they_are() {
    let env = Env::new(
        "CREATE TABLE docs (id int PRIMARY KEY, big text, small int);
         ALTER TABLE docs ALTER big SET STORAGE EXTERNAL;
         CREATE TABLE docs_full (id int, big text, small int);
         ALTER TABLE docs_full ALTER big SET STORAGE EXTERNAL;
         ALTER TABLE docs_full REPLICA IDENTITY FULL;",
        &[("svc", &["docs", "docs_full"])],
    )
    .await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute(
        "INSERT INTO docs VALUES
             (1, (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 1024)), 1),
             (2, (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 1024)), 10);
         INSERT INTO docs_full VALUES
             (1, (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 1024)), 1);",
    )
    .await
    .unwrap();
    // Out of line on the source, so an UPDATE not touching `big` sends it as unchanged TOAST.
    let external: bool = src
        .query_one(
            "SELECT pg_column_size(big) >= 32768 AND (SELECT reltoastrelid <> 0 FROM pg_class WHERE oid = 'docs'::regclass) FROM docs WHERE id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(external, "the test value should be stored out of line");
    env.wait_equal("svc", "docs").await;
    env.wait_equal("svc", "docs_full").await;

    src.batch_execute(
        "UPDATE docs SET small = small + 1;
         UPDATE docs_full SET small = small + 1;
         BEGIN; UPDATE docs SET small = small + 1 WHERE id = 2; UPDATE docs SET small = small * 3 WHERE id = 2; COMMIT;",
    )
    .await
    .unwrap();
    env.wait_equal("svc", "docs").await;
    env.wait_equal("svc", "docs_full").await;

    let dst = env.target("svc").await;
    for table in ["docs", "docs_full"] {
        let q = format!("SELECT id, md5(big), length(big) FROM {table} ORDER BY id");
        let want: Vec<(i32, Option<String>, Option<i32>)> = src
            .query(&q, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let got: Vec<(i32, Option<String>, Option<i32>)> = dst
            .query(&q, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            got, want,
            "{table}: big on the target differs from the source"
        );
        assert!(
            got.iter()
                .all(|(_, md5, len)| md5.is_some() && *len == Some(32 * 1024)),
            "{table}: big must not be NULL or cut on the target: {got:?}"
        );
    }
    daemon.stop().await;
}

#[tokio::test]
async fn primary_key_update_moves_the_row() {
    let env = Env::new(
        "CREATE TABLE single (id int PRIMARY KEY, v text);
         CREATE TABLE composite (a int, b text, v text, PRIMARY KEY (a, b));",
        &[("svc", &["single", "composite"])],
    )
    .await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute(
        "INSERT INTO single SELECT g, 'v' || g FROM generate_series(1, 10) g;
         INSERT INTO composite SELECT g % 3, 'k' || g, 'v' || g FROM generate_series(1, 10) g;",
    )
    .await
    .unwrap();
    env.wait_equal("svc", "single").await;
    env.wait_equal("svc", "composite").await;

    src.batch_execute(
        "UPDATE single SET id = 100 WHERE id = 1;
         UPDATE single SET id = 200, v = 'moved and changed' WHERE id = 2;
         BEGIN;
           UPDATE single SET id = 300 WHERE id = 3;
           UPDATE single SET v = 'changed after move' WHERE id = 300;
           UPDATE single SET id = 3 WHERE id = 300;
           UPDATE single SET id = 301 WHERE id = 4;
           INSERT INTO single VALUES (4, 'new row on the freed key');
         COMMIT;
         UPDATE single SET id = id + 1000 WHERE id BETWEEN 5 AND 10;
         UPDATE composite SET b = 'renamed' WHERE a = 1 AND b = 'k1';
         UPDATE composite SET a = 7 WHERE a = 2 AND b = 'k2';
         UPDATE composite SET a = 8, b = 'both', v = 'all three' WHERE a = 0 AND b = 'k3';
         UPDATE composite SET a = a + 10 WHERE a = 1;",
    )
    .await
    .unwrap();
    env.wait_equal("svc", "single").await;
    env.wait_equal("svc", "composite").await;
    daemon.stop().await;
}

#[tokio::test]
async fn truncate_reaches_every_owning_target() {
    let env = Env::new(
        "CREATE TABLE shared (id int PRIMARY KEY, v text);
         CREATE TABLE only_a (id int PRIMARY KEY);
         CREATE TABLE numbered (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text);",
        &[("a", &["shared", "only_a", "numbered"]), ("b", &["shared"])],
    )
    .await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute(
        "INSERT INTO shared SELECT g, 'old' FROM generate_series(1, 20) g;
         INSERT INTO only_a SELECT g FROM generate_series(1, 5) g;
         INSERT INTO numbered (v) SELECT 'old' FROM generate_series(1, 7);",
    )
    .await
    .unwrap();
    env.wait_equal("a", "shared").await;
    env.wait_equal("b", "shared").await;
    env.wait_equal("a", "only_a").await;
    env.wait_equal("a", "numbered").await;

    // One TRUNCATE naming a table owned by both targets and one owned by a only.
    src.batch_execute(
        "TRUNCATE shared, only_a;
         INSERT INTO shared VALUES (21, 'new');",
    )
    .await
    .unwrap();
    env.wait_equal("a", "shared").await;
    env.wait_equal("b", "shared").await;
    env.wait_equal("a", "only_a").await;
    for t in ["a", "b"] {
        let ids: Vec<i32> = env
            .target(t)
            .await
            .query("SELECT id FROM shared", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(ids, vec![21], "target {t} should hold only the new row");
    }

    src.batch_execute(
        "TRUNCATE numbered RESTART IDENTITY;
         INSERT INTO numbered (v) VALUES ('new 1'), ('new 2');",
    )
    .await
    .unwrap();
    env.wait_equal("a", "numbered").await;
    let ids: Vec<i32> = env
        .target("a")
        .await
        .query("SELECT id FROM numbered ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1, 2]);
    daemon.stop().await;
}

#[tokio::test]
async fn truncate_empties_only_the_tables_the_source_emptied() {
    let env = Env::new(
        "CREATE TABLE notes (id int PRIMARY KEY);
         CREATE TABLE refs (id int PRIMARY KEY, note_id int REFERENCES notes);",
        &[("a", &["notes", "refs"])],
    )
    .await;
    // On the target only: an inheritance child of a routed table, with a row of its own.
    env.target("a")
        .await
        .batch_execute(
            "CREATE TABLE notes_archive () INHERITS (notes);
             INSERT INTO notes_archive VALUES (99);",
        )
        .await
        .unwrap();
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute("INSERT INTO notes VALUES (1), (2); INSERT INTO refs VALUES (1, 1);")
        .await
        .unwrap();
    env.wait_equal("a", "ONLY notes").await;
    env.wait_equal("a", "refs").await;
    // CASCADE on the source: pgoutput names both tables; the target empties just those.
    src.batch_execute("TRUNCATE notes CASCADE; INSERT INTO notes VALUES (3);")
        .await
        .unwrap();
    env.wait_equal("a", "ONLY notes").await;
    env.wait_equal("a", "refs").await;
    let archived: i64 = env
        .target("a")
        .await
        .query_one("SELECT count(*) FROM notes_archive", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(archived, 1, "a target-only child table must keep its rows");
    daemon.stop().await;
}

#[tokio::test]
async fn replica_identity_full_keeps_duplicates() {
    let env = Env::new(
        "CREATE TABLE events (who text, payload json, at point);
         ALTER TABLE events REPLICA IDENTITY FULL;",
        &[("svc", &["events"])],
    )
    .await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute(
        r#"INSERT INTO events VALUES
             ('x', '{"k":  1}', '(1,2)'), ('x', '{"k":  1}', '(1,2)'),
             ('y', '[1, 2]', '(3.5,-4)'), ('y', '[1, 2]', '(3.5,-4)'), ('y', '[1, 2]', '(3.5,-4)'),
             ('z', NULL, NULL), ('z', NULL, NULL),
             ('w', '{"k":1}', '(1,2)');"#,
    )
    .await
    .unwrap();
    env.wait_equal("svc", "events").await;

    src.batch_execute(
        r#"DELETE FROM events WHERE ctid = (SELECT ctid FROM events WHERE who = 'x' LIMIT 1);
           UPDATE events SET who = 'y2' WHERE ctid = (SELECT ctid FROM events WHERE who = 'y' LIMIT 1);
           UPDATE events SET payload = '{"was": null}' WHERE ctid = (SELECT ctid FROM events WHERE who = 'z' LIMIT 1);
           UPDATE events SET at = '(0,0)' WHERE who = 'w';"#,
    )
    .await
    .unwrap();
    env.wait_equal("svc", "events").await;
    let counts = |rows: Vec<tokio_postgres::Row>| -> Vec<(Option<String>, i64)> {
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    let got = counts(
        env.target("svc")
            .await
            .query(
                "SELECT who, count(*) FROM events GROUP BY who ORDER BY who",
                &[],
            )
            .await
            .unwrap(),
    );
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        got,
        vec![
            (s("w"), 1),
            (s("x"), 1),
            (s("y"), 2),
            (s("y2"), 1),
            (s("z"), 2)
        ]
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_concurrent_reader_never_sees_half_a_transaction() {
    let env = Env::new(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);
         CREATE TABLE bulk (id int PRIMARY KEY, v text);",
        &[("svc", &["accounts", "bulk"])],
    )
    .await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute("INSERT INTO accounts SELECT g, 100 FROM generate_series(1, 10) g")
        .await
        .unwrap();

    // The reader: one statement, one snapshot, over and over on the target.
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicU64::new(0));
    let bad: Arc<Mutex<Vec<String>>> = Arc::default();
    let bulk_seen_full = Arc::new(AtomicBool::new(false));
    let reader = {
        let dst = env.target("svc").await;
        let (stop, polls, bad, bulk_seen_full) = (
            stop.clone(),
            polls.clone(),
            bad.clone(),
            bulk_seen_full.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = dst
                    .query_one(
                        "SELECT (SELECT sum(balance)::int8 FROM accounts),
                                (SELECT count(*) FROM accounts),
                                (SELECT count(*) FROM bulk)",
                        &[],
                    )
                    .await
                    .expect("reader query");
                let (sum, count, bulk): (Option<i64>, i64, i64) = (r.get(0), r.get(1), r.get(2));
                if count == 10 && sum != Some(1000) {
                    bad.lock()
                        .unwrap()
                        .push(format!("accounts: count 10, sum {sum:?}"));
                }
                if count != 0 && count != 10 {
                    bad.lock().unwrap().push(format!("accounts: count {count}"));
                }
                match bulk {
                    0 => {}
                    5000 => bulk_seen_full.store(true, Ordering::Relaxed),
                    n => bad.lock().unwrap().push(format!("bulk: count {n}")),
                }
                polls.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    for _ in 0..300 {
        let from = fastrand::i32(1..=10);
        let to = (from + fastrand::i32(0..9)) % 10 + 1; // any account but `from`
        let amount = fastrand::i32(1..=50);
        src.batch_execute(&format!(
            "BEGIN;
             UPDATE accounts SET balance = balance - {amount} WHERE id = {from};
             UPDATE accounts SET balance = balance + {amount} WHERE id = {to};
             COMMIT;"
        ))
        .await
        .unwrap();
    }
    src.batch_execute("INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    env.wait_equal("svc", "accounts").await;
    env.wait_equal("svc", "bulk").await;
    // One more poll after everything arrived, then stop the reader.
    let after = polls.load(Ordering::Relaxed);
    crate::common::wait_until(
        "the reader to poll once more",
        std::time::Duration::from_secs(60),
        || {
            let polls = polls.clone();
            async move { polls.load(Ordering::Relaxed) > after }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    reader.await.expect("reader task");

    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "the reader saw {} partial states, first ones: {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
    assert!(bulk_seen_full.load(Ordering::Relaxed));
    daemon.stop().await;
}

#[tokio::test]
async fn generated_always_identity_values_are_copied() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let env = Env::new(
        "CREATE TABLE tickets (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
         CREATE TABLE counters (k text PRIMARY KEY, n bigint GENERATED ALWAYS AS IDENTITY, v text);
         CREATE TABLE full_ids (id int GENERATED ALWAYS AS IDENTITY, v text);
         ALTER TABLE full_ids REPLICA IDENTITY FULL;",
        &[("svc", &["tickets", "counters", "full_ids"])],
    )
    .await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute(
        "INSERT INTO tickets (v) VALUES ('a'), ('b');
         INSERT INTO tickets OVERRIDING SYSTEM VALUE VALUES (100, 'c');
         UPDATE tickets SET v = 'b2' WHERE id = 2;
         INSERT INTO counters (k, v) VALUES ('a', 'x'), ('b', 'y');
         INSERT INTO full_ids (v) VALUES ('p'), ('q');",
    )
    .await
    .unwrap();
    // A run of inserts long enough for COPY.
    src.batch_execute("INSERT INTO tickets (v) SELECT 'r' || g FROM generate_series(1, 50) g")
        .await
        .unwrap();
    // Updates that touch GENERATED ALWAYS columns, which UPDATE on the target may not write:
    // a key moved to a new identity value, a non-key identity column (RI DEFAULT: its old
    // value is unknown), and RI FULL rows whose identity value is unchanged.
    src.batch_execute(
        "UPDATE tickets SET id = DEFAULT WHERE id = 1;
         UPDATE counters SET v = 'x2';
         UPDATE counters SET n = DEFAULT WHERE k = 'b';
         UPDATE full_ids SET v = 'p2' WHERE v = 'p';",
    )
    .await
    .unwrap();
    src.batch_execute("INSERT INTO tickets (v) VALUES ('after')")
        .await
        .unwrap();
    for t in ["tickets", "counters", "full_ids"] {
        env.wait_equal("svc", t).await;
    }
    // The target's columns are GENERATED ALWAYS again afterwards.
    let always: i64 = env
        .target("svc")
        .await
        .query_one(
            "SELECT count(*) FROM pg_attribute WHERE attidentity = 'a'
             AND attrelid IN ('tickets'::regclass, 'counters'::regclass, 'full_ids'::regclass)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(always, 3);
    daemon.stop().await;
}

#[tokio::test]
async fn swapping_deferrable_keys_moves_both_rows() {
    let env = Env::new(
        // A deferrable key cannot be the replica identity, hence FULL.
        "CREATE TABLE slots (id int PRIMARY KEY DEFERRABLE, v text);
         ALTER TABLE slots REPLICA IDENTITY FULL;",
        &[("svc", &["slots"])],
    )
    .await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute("INSERT INTO slots SELECT g, 'v' || g FROM generate_series(1, 5) g;")
        .await
        .unwrap();
    env.wait_equal("svc", "slots").await;
    src.batch_execute(
        "UPDATE slots SET id = CASE id WHEN 1 THEN 2 WHEN 2 THEN 1 END WHERE id IN (1, 2);
         UPDATE slots SET id = id + 1 WHERE id >= 3;",
    )
    .await
    .unwrap();
    env.wait_equal("svc", "slots").await;
    daemon.stop().await;
}

#[tokio::test]
async fn tables_with_statement_triggers_or_rules_get_inserts_not_copy() {
    let env = Env::new(
        "CREATE TABLE notes (id int PRIMARY KEY, v text);",
        &[("svc", &["notes"])],
    )
    .await;
    // On the target only: a statement trigger counting INSERT statements. COPY would fire it
    // once for the whole run; row-by-row INSERT fires it once per row.
    env.target("svc")
        .await
        .batch_execute(
            "CREATE TABLE fired (n int NOT NULL);
             INSERT INTO fired VALUES (0);
             CREATE FUNCTION count_stmt() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN UPDATE fired SET n = n + 1; RETURN NULL; END $$;
             CREATE TRIGGER per_statement AFTER INSERT ON notes
                 FOR EACH STATEMENT EXECUTE FUNCTION count_stmt();",
        )
        .await
        .unwrap();
    let daemon = env.start().await;
    env.source()
        .await
        .batch_execute("INSERT INTO notes SELECT g, 'n' || g FROM generate_series(1, 20) g")
        .await
        .unwrap();
    env.wait_equal("svc", "notes").await;
    let fired: i32 = env
        .target("svc")
        .await
        .query_one("SELECT n FROM fired", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(fired, 20);
    daemon.stop().await;
}

#[tokio::test]
async fn full_identity_changes_the_exact_row() {
    // No key: REPLICA IDENTITY FULL. numeric's `=` says 1.0 = 1.00, and json[] has no usable
    // `=` at all: rows must be found by their exact value. char(n) and bit(n) compare with
    // their length; a domain's constraint added later (NOT VALID) must not be checked against
    // the old row a DELETE removes.
    let env = Env::new(
        "CREATE DOMAIN dose AS numeric CHECK (VALUE >= 0);
         CREATE TABLE readings (patient int, value numeric, tags json[], code char(8),
                                flags bit(4), amount dose);
         ALTER TABLE readings REPLICA IDENTITY FULL;",
        &[("svc", &["readings"])],
    )
    .await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute(
        r#"INSERT INTO readings VALUES
             (1, 1.0, ARRAY['{"a": 1}'::json], 'AB12', B'1010', 5),
             (1, 1.00, ARRAY['{"a": 1}'::json], 'AB12', B'1010', 5),
             (2, 5, NULL, NULL, NULL, 300),
             (2, 5, NULL, NULL, NULL, 300);"#,
    )
    .await
    .unwrap();
    env.wait_equal("svc", "readings").await;
    let stricter = "ALTER DOMAIN dose ADD CONSTRAINT small CHECK (VALUE < 100) NOT VALID";
    src.batch_execute(stricter).await.unwrap();
    env.target("svc")
        .await
        .batch_execute(stricter)
        .await
        .unwrap();
    src.batch_execute(
        "DELETE FROM readings WHERE value::text = '1.00';
         UPDATE readings SET tags = ARRAY['{}'::json], flags = B'0101' WHERE patient = 1;
         DELETE FROM readings WHERE ctid = (SELECT min(ctid) FROM readings WHERE patient = 2);",
    )
    .await
    .unwrap();
    env.wait_equal("svc", "readings").await;
    daemon.stop().await;
}

#[tokio::test]
async fn truncate_and_identity_changes_under_deferrable_foreign_keys() {
    // The monolith accepts these; the target defers deferrable constraints to its commit and
    // must not then refuse TRUNCATE or ALTER TABLE with "pending trigger events" (55006).
    let env = Env::new(
        "CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                             parent_id int REFERENCES parent DEFERRABLE);
         CREATE TABLE later (id int PRIMARY KEY,
                             parent_id int REFERENCES parent DEFERRABLE INITIALLY DEFERRED);
         CREATE TABLE late_child (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                             parent_id int REFERENCES parent DEFERRABLE INITIALLY DEFERRED);",
        &[("svc", &["parent", "child", "later", "late_child"])],
    )
    .await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute(
        "BEGIN;
         INSERT INTO parent SELECT g FROM generate_series(1, 3) g;
         INSERT INTO child (parent_id) VALUES (1);
         TRUNCATE child;
         INSERT INTO child (parent_id) VALUES (2);
         COMMIT;",
    )
    .await
    .unwrap();
    env.wait_equal("svc", "child").await;
    // An identity value changed after a row of the same table queued its check; the same with
    // an initially deferred key (its queued check holds, and runs before the identity ALTER).
    for (table, inserted, updated) in [("child", 3, 2), ("late_child", 1, 1)] {
        src.batch_execute(&format!(
            "BEGIN;
             INSERT INTO {table} (parent_id) VALUES ({inserted});
             UPDATE {table} SET id = DEFAULT WHERE parent_id = {updated};
             COMMIT;"
        ))
        .await
        .unwrap();
        env.wait_equal("svc", table).await;
    }
    // Initially deferred: one transaction queues a check, the next truncates the table; both
    // land in one target transaction when they wait in the queue together.
    daemon.stop().await;
    src.batch_execute("INSERT INTO later VALUES (1, 1)")
        .await
        .unwrap();
    src.batch_execute("BEGIN; TRUNCATE later; INSERT INTO later VALUES (2, 2); COMMIT;")
        .await
        .unwrap();
    let daemon = env.start().await;
    env.wait_equal("svc", "later").await;
    env.wait_equal("svc", "parent").await;
    daemon.stop().await;
}

#[tokio::test]
async fn money_and_dates_travel_exactly_whatever_the_source_session_settings() {
    let env = Env::new(
        "CREATE TABLE fees (id int PRIMARY KEY, amount money, due date, span interval);",
        &[("svc", &["fees"])],
    )
    .await;
    // Settings the walsender would otherwise inherit from the source database.
    env.source()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET DateStyle = 'SQL, DMY'; \
             ALTER DATABASE {} SET IntervalStyle = 'sql_standard'; \
             ALTER DATABASE {} SET lc_monetary = 'POSIX'",
            env.source_db, env.source_db, env.source_db
        ))
        .await
        .unwrap();
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute(
        "INSERT INTO fees VALUES
            (1, 1234.56, '2026-02-01', '1 year 2 mons 3 days 04:05:06'),
            (2, -0.07, '2026-12-31', '-3 days'),
            (3, NULL, NULL, NULL);",
    )
    .await
    .unwrap();
    // (Not wait_equal: it compares rows as text, which each side renders with its settings.)
    let dst = env.target("svc").await;
    crate::common::wait_until(
        "three fees on the target",
        Duration::from_secs(60),
        || async {
            dst.query_one("SELECT count(*) FROM fees", &[])
                .await
                .map(|r| r.get::<_, i64>(0) == 3)
                .unwrap_or(false)
        },
    )
    .await;
    // Compared as numbers and ISO dates, not as text rendered by each side's settings.
    let q = "SELECT id, amount::numeric::text, to_char(due, 'YYYY-MM-DD'), \
             extract(epoch FROM span)::text FROM fees ORDER BY id";
    let render = |rows: Vec<tokio_postgres::Row>| {
        rows.iter()
            .map(|r| {
                format!(
                    "{:?}",
                    (
                        r.get::<_, i32>(0),
                        r.get::<_, Option<String>>(1),
                        r.get::<_, Option<String>>(2),
                        r.get::<_, Option<String>>(3)
                    )
                )
            })
            .collect::<Vec<_>>()
    };
    let a = render(src.query(q, &[]).await.unwrap());
    let b = render(dst.query(q, &[]).await.unwrap());
    assert_eq!(a, b);
    daemon.stop().await;
}
