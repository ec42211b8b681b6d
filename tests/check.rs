//! `pgcarve check` on real clusters: every misconfiguration found at once with its fix, and
//! nothing changed anywhere; `--assess` names a cross-service foreign key, sequences and target
//! triggers.

use crate::common::{pgcarve_command, Env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_every_problem_at_once_and_changes_nothing() {
    let env = Env::new(
        "CREATE TABLE patients (id bigint PRIMARY KEY, name text);
         CREATE TABLE events (kind text, n int);
         CREATE TABLE claims (id bigint PRIMARY KEY, patient_id bigint, amount numeric);",
        &[
            ("patient", &["patients"]),
            ("billing", &["claims", "events", "ghosts"]),
        ],
    )
    .await;
    let src = env.source().await;
    src.batch_execute(&format!(
        "CREATE PUBLICATION {} FOR TABLE patients WHERE (id > 0)",
        env.slot
    ))
    .await
    .unwrap();
    src.execute(
        "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
        &[&env.slot],
    )
    .await
    .unwrap();
    env.target("billing")
        .await
        .batch_execute("ALTER TABLE claims DROP COLUMN amount")
        .await
        .unwrap();
    env.target("patient")
        .await
        .batch_execute("INSERT INTO patients VALUES (1, 'zqname')")
        .await
        .unwrap();

    let (code, out) = pgcarve_command(&env, &["check"]);
    assert_eq!(code, 1, "{out}");
    for p in [
        "problem: routed table public.ghosts does not exist on the source",
        "problem: table public.events has no primary key",
        "has a row filter (WHERE) on public.patients",
        "uses plugin \"test_decoding\"",
        "amount",
        "table public.patients already holds rows that pgcarve did not copy",
        "warning: max_slot_wal_keep_size is unlimited",
        "not ready",
    ] {
        assert!(out.contains(p), "missing {p:?} in:\n{out}");
    }
    assert!(!out.contains("zq"), "values in the report");

    // Nothing changed: the publication keeps its filter and one table, the slot its plugin,
    // and no target got the pgcarve schema.
    let tables: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1 AND rowfilter IS NOT NULL",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1);
    let plugin: String = src
        .query_one(
            "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plugin, "test_decoding");
    for t in ["patient", "billing"] {
        let schema: bool = env
            .target(t)
            .await
            .query_one("SELECT to_regnamespace('pgcarve') IS NULL", &[])
            .await
            .unwrap()
            .get(0);
        assert!(schema, "check created pgcarve's schema on {t}");
    }

    let (code, out) = pgcarve_command(&env, &["check", "--format", "json"]);
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["ready"], false);
    assert!(
        report["problems"].as_array().unwrap().len() >= 6,
        "{report}"
    );
    src.execute("SELECT pg_drop_replication_slot($1)", &[&env.slot])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_assess_names_cross_service_foreign_keys_sequences_and_target_triggers() {
    let env = Env::new(
        "CREATE TABLE patients (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text);
         CREATE TABLE claims (id bigint PRIMARY KEY, patient_id bigint REFERENCES patients, amount numeric);
         CREATE TABLE notes (body text);
         ALTER TABLE notes REPLICA IDENTITY FULL;",
        &[("patient", &["patients", "notes"]), ("billing", &["claims"])],
    )
    .await;
    env.source()
        .await
        .batch_execute(
            "INSERT INTO patients (name) SELECT 'zq' FROM generate_series(1, 1000);
             INSERT INTO claims SELECT g, g, 1 FROM generate_series(1, 500) g; ANALYZE;",
        )
        .await
        .unwrap();
    env.target("billing")
        .await
        .batch_execute(
            "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
             CREATE TRIGGER claims_audit BEFORE INSERT ON claims FOR EACH ROW EXECUTE FUNCTION audit();",
        )
        .await
        .unwrap();
    let (code, out) = pgcarve_command(&env, &["check", "--assess"]);
    assert_eq!(code, 0, "{out}");
    for p in [
        "target patient: 2 tables, ~1000 rows",
        "target billing: 1 tables, ~500 rows",
        "public.notes",
        "(no primary key: REPLICA IDENTITY FULL",
        "billing: public.claims claims_patient_id_fkey → public.patients (owned by patient)",
        "public.patients.id: public.patients_id_seq, last value 1000",
        "billing: public.claims trigger claims_audit",
        "ready: no problems found",
    ] {
        assert!(out.contains(p), "missing {p:?} in:\n{out}");
    }
    let (code, out) = pgcarve_command(&env, &["check", "--assess", "--format", "json"]);
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let fk = &report["assessment"]["cross_service_foreign_keys"][0];
    assert_eq!(fk["constraint"], "claims_patient_id_fkey");
    assert_eq!(fk["referenced_owners"][0], "patient");
}
