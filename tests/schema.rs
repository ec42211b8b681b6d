//! `pgcarve schema` on real clusters: every supported type created on an empty target, run
//! twice; differences of existing tables reported with nothing changed; the created tables
//! then take the initial copy and the stream.

use std::time::Duration;

use crate::common::{pgcarve_command, start_daemon, wait_until, Env};

const SOURCE: &str = "
CREATE TYPE mood AS ENUM ('calm', 'anxious', 'in pain');
CREATE DOMAIN dose AS numeric(10,2) CHECK (VALUE >= 0);
CREATE SCHEMA lab;
CREATE TABLE patients (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mrn text NOT NULL UNIQUE,
    name text NOT NULL,
    born date,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE SEQUENCE visit_no;
CREATE TABLE visits (
    id bigint PRIMARY KEY,
    patient_id bigint NOT NULL REFERENCES patients,
    no integer NOT NULL DEFAULT nextval('visit_no'),
    feeling mood,
    feelings mood[],
    dose dose,
    label text GENERATED ALWAYS AS ('visit ' || id) STORED);
CREATE INDEX visits_patient ON visits (patient_id) WHERE feeling IS NOT NULL;
CREATE TABLE lab.every_type (
    id integer PRIMARY KEY, c_a smallint, c_b bigint, c_c numeric(12,3), c_d real, c_e double precision,
    c_f text, c_g varchar(20), c_h char(8), c_i boolean, c_j date, c_k time, c_l timestamp, c_m timestamptz,
    c_n interval, c_o jsonb, c_p json, c_q uuid, c_r bytea, c_s inet, c_t cidr, c_u macaddr, c_v integer[],
    c_w text[], c_x tstzrange, c_y int4range, c_z bit(4), c_aa varbit, c_ab money, c_ac tsvector, c_ad point);
CREATE TABLE claims (id bigint PRIMARY KEY, patient_id bigint REFERENCES patients, amount dose NOT NULL);
CREATE TABLE notes (body text);
ALTER TABLE notes REPLICA IDENTITY FULL;
";

const ROWS: &str = "
INSERT INTO patients (mrn, name, born) SELECT 'm' || g, 'zqname' || g, date '1980-01-01' + g FROM generate_series(1, 50) g;
INSERT INTO visits (id, patient_id, feeling, feelings, dose)
    SELECT g, 1 + g % 50, 'in pain', ARRAY['calm', 'in pain']::mood[], g / 3.0 FROM generate_series(1, 200) g;
INSERT INTO lab.every_type VALUES (1, 1, 2, 3.5, 4.25, 5.125, 'zqf', 'zqg', 'zqh', true, '2024-02-29', '12:34:56',
    '2024-02-29 12:00', '2024-02-29 12:00+02', '1 day 2 hours', '{\"zq\": [1, 2]}', '{\"zq\": 1}',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff', '10.0.0.1', '10.0.0.0/8', '08:00:2b:01:02:03',
    '{1,2,NULL}', '{\"zq a\",b}', '[2024-01-01,2024-02-01)', '[1,10)', B'1010', B'101', 12.34,
    to_tsvector('simple', 'zq words'), point(1.5, 2.5));
INSERT INTO lab.every_type (id) VALUES (2);
INSERT INTO claims SELECT g, 1 + g % 50, g FROM generate_series(1, 30) g;
INSERT INTO notes SELECT 'zqnote' FROM generate_series(1, 3);
";

fn targets() -> [(&'static str, &'static [&'static str]); 2] {
    [
        ("clinic", &["patients", "visits", "lab.every_type", "notes"]),
        ("billing", &["claims"]),
    ]
}

/// Runs `pgcarve schema` on `env`'s config: (exit code, output).
fn schema(env: &Env) -> (i32, String) {
    pgcarve_command(env, &["schema"])
}

/// Each table's columns as (name, type), for comparing definitions.
async fn columns(c: &tokio_postgres::Client, table: &str) -> Vec<(String, String, bool)> {
    c.query(
        "SELECT attname::text, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute \
         WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_creates_every_supported_type_once_then_the_copy_and_stream_fill_it() {
    let env = Env::new("SELECT 1", &targets()).await;
    let src = env.source().await;
    src.batch_execute(SOURCE).await.unwrap();
    src.batch_execute(ROWS).await.unwrap();

    let (code, out) = schema(&env);
    assert_eq!(code, 0, "{out}");
    for t in [
        "public.patients",
        "public.visits",
        "lab.every_type",
        "public.notes",
    ] {
        assert!(
            out.contains(&format!("target clinic: created table {t}")),
            "{out}"
        );
    }
    assert!(
        out.contains("target billing: foreign key not created (crosses services): public.claims: claims_patient_id_fkey references public.patients, owned by clinic"),
        "{out}"
    );
    let clinic = env.target("clinic").await;
    for t in ["patients", "visits", "lab.every_type", "notes"] {
        assert_eq!(columns(&src, t).await, columns(&clinic, t).await, "{t}");
    }
    let billing = env.target("billing").await;
    assert_eq!(
        columns(&src, "claims").await,
        columns(&billing, "claims").await
    );
    let has = |sql: &'static str| {
        let clinic = &clinic;
        async move { clinic.query_one(sql, &[]).await.unwrap().get::<_, bool>(0) }
    };
    assert!(
        has("SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'visits_patient_id_fkey')")
            .await
    );
    assert!(
        has("SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE indexname = 'visits_patient')").await
    );
    assert!(
        has("SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'patients_mrn_key')").await
    );
    assert!(has("SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'patients'::regclass AND attname = 'id' AND attidentity = 'a')").await);
    assert!(has("SELECT pg_get_expr(adbin, adrelid) = 'now()' FROM pg_attrdef WHERE adrelid = 'patients'::regclass").await);
    assert!(
        has("SELECT NOT EXISTS (SELECT 1 FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum WHERE d.adrelid = 'visits'::regclass AND a.attname = 'no')").await,
        "a default that calls the monolith's sequence is not created"
    );
    assert!(has("SELECT enum_range(NULL::mood)::text = '{calm,anxious,\"in pain\"}'").await);
    assert!(!out.contains("zq"));

    // Run again: nothing to change.
    let (code, again) = schema(&env);
    assert_eq!(code, 0, "{again}");
    assert!(again.contains("nothing to change"), "{again}");
    assert!(!again.contains("created table"), "{again}");

    // The created tables take the copy and the stream.
    let daemon = start_daemon(&env.config());
    env.wait_slot().await;
    src.batch_execute(
        "INSERT INTO patients (mrn, name) VALUES ('late', 'zqlate');
         UPDATE visits SET feeling = 'calm' WHERE id = 7;
         INSERT INTO lab.every_type (id, c_o) VALUES (3, '{\"a\": 1}');",
    )
    .await
    .unwrap();
    for t in ["patients", "visits", "lab.every_type", "notes"] {
        env.wait_equal("clinic", t).await;
    }
    env.wait_equal("billing", "claims").await;

    // verify compares every one of these types (enums whose OIDs differ between the clusters,
    // json without a hash function, arrays, domains) without a false positive, and finds a
    // value changed in each kind.
    let (code, out) = pgcarve_command(&env, &["verify"]);
    assert_eq!(code, 0, "{out}");
    env.target("clinic")
        .await
        .batch_execute(
            "UPDATE visits SET feelings = ARRAY['calm']::mood[] WHERE id = 9;
             UPDATE lab.every_type SET c_p = '{\"zq\": 2}' WHERE id = 1;
             UPDATE lab.every_type SET c_ab = 1 WHERE id = 2;",
        )
        .await
        .unwrap();
    let (code, out) = pgcarve_command(&env, &["verify"]);
    assert_eq!(code, 1, "{out}");
    for line in [
        "target clinic: public.visits: DIFFERS: source 200 rows, target 200 rows; 0 missing, 0 extra, 1 different",
        "different keys: 9",
        "target clinic: lab.every_type: DIFFERS: source 3 rows, target 3 rows; 0 missing, 0 extra, 2 different",
        "different keys: 1, 2",
        "target clinic: public.patients: identical",
        "cross-service relationships: no orphans",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(!out.contains("zq"), "{out}");
    daemon.stop().await;
}

#[tokio::test]
async fn schema_reports_every_difference_and_changes_nothing() {
    let env = Env::new("SELECT 1", &targets()).await;
    env.source().await.batch_execute(SOURCE).await.unwrap();
    // The clinic's patients differ three ways; its mood lacks a label; billing lacks claims.
    env.target("clinic")
        .await
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('calm', 'anxious');
             CREATE TABLE patients (id integer, name text NOT NULL, born date, created_at timestamptz);",
        )
        .await
        .unwrap();
    let (code, out) = schema(&env);
    assert_eq!(code, 1, "{out}");
    for d in [
        "difference: target clinic: table public.patients column id is integer on the target, bigint on the source",
        "difference: target clinic: table public.patients lacks column mrn (text)",
        "difference: target clinic: table public.patients has no primary key (the source's is PRIMARY KEY (id))",
        "difference: target clinic: enum public.mood lacks label(s) 'in pain'",
        "nothing was changed",
    ] {
        assert!(out.contains(d), "missing {d:?} in:\n{out}");
    }
    let created: bool = env
        .target("billing")
        .await
        .query_one("SELECT to_regclass('claims') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!created, "nothing is created while any target differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_create_schema_builds_the_tables_then_their_indexes_once_the_data_is_in() {
    let env = Env::new("SELECT 1", &targets()).await;
    let src = env.source().await;
    src.batch_execute(SOURCE).await.unwrap();
    src.batch_execute(ROWS).await.unwrap();
    let daemon = start_daemon(&format!("{}\n[copy]\ncreate_schema = true\n", env.config()));
    env.wait_slot().await;
    src.batch_execute("INSERT INTO visits (id, patient_id) VALUES (1000, 3)")
        .await
        .unwrap();
    for t in ["patients", "visits", "lab.every_type", "notes"] {
        env.wait_equal("clinic", t).await;
    }
    env.wait_equal("billing", "claims").await;
    let clinic = env.target("clinic").await;
    let indexes: bool = clinic
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE indexname = 'visits_patient') \
               AND NOT EXISTS (SELECT 1 FROM pgcarve.schema_pending)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(indexes, "secondary indexes follow the data");
    // Foreign keys come back once the stream runs: added, then validated.
    wait_until(
        "the foreign key added and validated",
        Duration::from_secs(60),
        || async {
            clinic
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'visits_patient_id_fkey' \
                       AND convalidated) AND NOT EXISTS (SELECT 1 FROM pgcarve.fk_aside)",
                    &[],
                )
                .await
                .unwrap()
                .get(0)
        },
    )
    .await;
    daemon.stop().await;
}
