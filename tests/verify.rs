//! `pgcarve verify` on real clusters while pgcarve streams: injected differences found with
//! their keys (a value changed only in a TOASTed column included), a table without a key
//! compared as a multiset, every owner of a fan-out table checked, and no false positive under
//! a concurrent write workload.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{pgcarve_command, start_daemon, Env};

const SCHEMA: &str = "
CREATE TABLE patients (id bigint PRIMARY KEY, name text NOT NULL, notes text);
CREATE TABLE events (kind text, n int);
ALTER TABLE events REPLICA IDENTITY FULL;
";

/// The targets of these tests: patients fan out to both.
const TARGETS: [(&str, &[&str]); 2] = [
    ("clinic", &["patients", "events"]),
    ("billing", &["patients"]),
];

const SEED: &str = "
INSERT INTO patients SELECT g, 'zqname' || g, CASE WHEN g % 100 = 0 THEN repeat('zqtoast', 4000) END
    FROM generate_series(1, 30000) g;
INSERT INTO events SELECT 'zqkind', g % 7 FROM generate_series(1, 300) g;
ANALYZE;
";

async fn started(env: &Env) -> crate::common::Daemon {
    env.source().await.batch_execute(SEED).await.unwrap();
    for t in ["clinic", "billing"] {
        env.target(t)
            .await
            .batch_execute("TRUNCATE patients, events")
            .await
            .unwrap();
    }
    let daemon = start_daemon(&env.config());
    env.wait_slot().await;
    env.wait_equal("clinic", "patients").await;
    env.wait_equal("clinic", "events").await;
    env.wait_equal("billing", "patients").await;
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_each_injected_difference_by_key_and_nothing_else() {
    let env = Env::new(SCHEMA, &TARGETS).await;
    let daemon = started(&env).await;
    let (code, out) = pgcarve_command(&env, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("every table is identical"), "{out}");

    // Behind pgcarve's back, on the clinic only.
    env.target("clinic")
        .await
        .batch_execute(
            "DELETE FROM patients WHERE id = 5;
             INSERT INTO patients VALUES (999999, 'zqextra', NULL);
             UPDATE patients SET name = 'zqchanged' WHERE id = 7;
             UPDATE patients SET notes = notes || 'x' WHERE id = 2500;
             DELETE FROM events WHERE ctid = (SELECT ctid FROM events WHERE n = 3 LIMIT 1);",
        )
        .await
        .unwrap();
    let (code, out) = pgcarve_command(&env, &["verify"]);
    assert_eq!(code, 1, "{out}");
    for line in [
        "target clinic: public.patients: DIFFERS",
        "1 missing, 1 extra, 2 different",
        "missing keys: 5",
        "extra keys: 999999",
        "different keys: 2500, 7",
        "target clinic: public.events: DIFFERS: source 300 rows, target 299 rows; 1 missing, 0 extra, 0 different",
        "target billing: public.patients: identical (30000 rows)",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(!out.contains("zq"), "values in the report:\n{out}");

    // Small ranges read a slice at a time under a rate limit: the same differences, and the
    // keyless table compared bucket by bucket.
    let (code, out2) = pgcarve_command(
        &env,
        &[
            "verify",
            "--range-rows",
            "100",
            "--rows-per-second",
            "40000",
        ],
    );
    assert_eq!(code, 1, "{out2}");
    assert_eq!(
        out2, out,
        "small ranges and a rate limit changed the report"
    );
    let (code, out) = pgcarve_command(&env, &["verify", "--range-rows", "5"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("--range-rows 5: between 100 and 10000000"),
        "{out}"
    );

    // Narrowed, as JSON.
    let (code, out) = pgcarve_command(
        &env,
        &[
            "verify", "--target", "clinic", "--table", "patients", "--format", "json",
        ],
    );
    assert_eq!(code, 1, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["tables"].as_array().unwrap().len(), 1);
    assert_eq!(r["tables"][0]["missing"]["keys"][0], "5");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_sees_no_difference_while_the_monolith_writes_and_pgcarve_streams() {
    let env = Env::new(SCHEMA, &TARGETS).await;
    let daemon = started(&env).await;
    let stop = Arc::new(AtomicBool::new(false));
    let url = crate::common::clusters().source.url(&env.source_db);
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = crate::common::connect(&url).await;
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                c.batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO patients VALUES ({n}, 'zqnew', NULL);
                     UPDATE patients SET name = 'zqupd' || {i} WHERE id = {u};
                     DELETE FROM patients WHERE id = {d};
                     INSERT INTO events VALUES ('zqwl', {m} + 1000 * {i});
                     COMMIT;",
                    n = 100_000 + i,
                    u = 1 + (i * 13) % 30_000,
                    d = 2 + (i * 7) % 29_000,
                    m = i % 7
                ))
                .await
                .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, out) = tokio::task::spawn_blocking({
        let config = env.config();
        move || crate::common::pgcarve_command_with(&config, &["verify"])
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_eq!(code, 0, "a false positive under writes:\n{out}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_orphans_of_a_foreign_key_that_now_crosses_services() {
    let env = Env::new(
        "CREATE TABLE patients (id bigint PRIMARY KEY, name text);
         CREATE TABLE claims (id bigint PRIMARY KEY, patient_id bigint, amount numeric);",
        &[("patient", &["patients"]), ("billing", &["claims"])],
    )
    .await;
    let src = env.source().await;
    src.batch_execute(
        "ALTER TABLE claims ADD CONSTRAINT claims_patient_fk FOREIGN KEY (patient_id) REFERENCES patients;
         INSERT INTO patients SELECT g, 'zq' FROM generate_series(1, 2000) g;
         INSERT INTO claims SELECT g, 1 + g % 2000, g FROM generate_series(1, 6000) g;",
    )
    .await
    .unwrap();
    let daemon = start_daemon(&env.config());
    env.wait_slot().await;
    env.wait_equal("billing", "claims").await;
    env.wait_equal("patient", "patients").await;
    let (code, out) = pgcarve_command(&env, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("cross-service relationships: no orphans"),
        "{out}"
    );

    // A patient gone from the patient service only: its claims at billing are orphans.
    env.target("patient")
        .await
        .batch_execute("DELETE FROM patients WHERE id IN (42, 43)")
        .await
        .unwrap();
    let (code, out) = pgcarve_command(&env, &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("ORPHANS: public.claims.patient_id at billing → public.patients.id at patient (claims_patient_fk): 6 rows whose parent is missing; missing parent keys: 42, 43"),
        "{out}"
    );
    assert!(!out.contains("zq"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_verifies_periodically_and_drives_the_inconsistency_metric() {
    let env = Env::new(
        "CREATE TABLE patients (id bigint PRIMARY KEY, name text);
         INSERT INTO patients SELECT g, 'zq' FROM generate_series(1, 500) g;",
        &[("clinic", &["patients"])],
    )
    .await;
    env.target("clinic")
        .await
        .batch_execute("TRUNCATE patients")
        .await
        .unwrap();
    let daemon = start_daemon(&format!("{}\n[verify]\ninterval_secs = 1\n", env.config()));
    env.wait_slot().await;
    env.wait_equal("clinic", "patients").await;
    crate::common::wait_until("a verification", Duration::from_secs(60), || async {
        crate::common::metric(&daemon, "migration_last_verified_timestamp_seconds", &[]) > 0.0
    })
    .await;
    assert_eq!(
        crate::common::metric(&daemon, "data_inconsistency_detected", &[]),
        0.0
    );
    env.target("clinic")
        .await
        .batch_execute("DELETE FROM patients WHERE id = 9")
        .await
        .unwrap();
    crate::common::wait_until(
        "the inconsistency seen",
        Duration::from_secs(60),
        || async { crate::common::metric(&daemon, "data_inconsistency_detected", &[]) == 1.0 },
    )
    .await;
    let (_, health) = daemon.obs.health.report();
    assert_eq!(
        health["verification"]["inconsistent"][0], "public.patients at clinic",
        "{health}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_narrows_uuid_and_composite_keys_and_finds_orphans_of_a_composite_foreign_key() {
    let env = Env::new(
        "CREATE TABLE labs (id uuid PRIMARY KEY, result text);
         CREATE TABLE visits (site text, visit_no int, note text, PRIMARY KEY (site, visit_no));
         CREATE TABLE charges (id bigint PRIMARY KEY, site text, visit_no int, amount numeric);",
        &[("clinical", &["labs", "visits"]), ("billing", &["charges"])],
    )
    .await;
    let src = env.source().await;
    src.batch_execute(
        "ALTER TABLE charges ADD CONSTRAINT charges_visit_fk FOREIGN KEY (site, visit_no) REFERENCES visits;
         INSERT INTO labs SELECT md5('l' || g)::uuid, 'zqresult' || g FROM generate_series(1, 5000) g;
         INSERT INTO visits SELECT 's' || (g % 5 + 1), g / 5 + 1, 'zqnote' FROM generate_series(0, 4999) g;
         INSERT INTO charges SELECT g, 's' || (g % 5 + 1), g % 1000 + 1, g FROM generate_series(1, 3000) g;
         INSERT INTO charges VALUES (9000, NULL, 17, 1);",
    )
    .await
    .unwrap();
    let daemon = start_daemon(&env.config());
    env.wait_slot().await;
    for (t, table) in [
        ("clinical", "labs"),
        ("clinical", "visits"),
        ("billing", "charges"),
    ] {
        env.wait_equal(t, table).await;
    }
    let (code, out) = pgcarve_command(&env, &["verify", "--range-rows", "500"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("cross-service relationships: no orphans"),
        "{out}"
    );

    let keys = src
        .query_one("SELECT md5('l7')::uuid::text, md5('l9')::uuid::text", &[])
        .await
        .unwrap();
    let (gone, changed): (String, String) = (keys.get(0), keys.get(1));
    env.target("clinical")
        .await
        .batch_execute(&format!(
            "DELETE FROM labs WHERE id = '{gone}';
             INSERT INTO labs VALUES ('00000000-0000-0000-0000-000000000001', 'zqextra');
             UPDATE labs SET result = 'zqchanged' WHERE id = '{changed}';
             DELETE FROM visits WHERE site = 's2' AND visit_no = 17;
             UPDATE visits SET note = 'zqchanged' WHERE site = 's3' AND visit_no = 5;"
        ))
        .await
        .unwrap();
    let (code, out) = pgcarve_command(&env, &["verify", "--range-rows", "500"]);
    assert_eq!(code, 1, "{out}");
    for line in [
        "target clinical: public.labs: DIFFERS: source 5000 rows, target 5000 rows; 1 missing, 1 extra, 1 different".to_string(),
        format!("missing keys: {gone}"),
        "extra keys: 00000000-0000-0000-0000-000000000001".to_string(),
        format!("different keys: {changed}"),
        "target clinical: public.visits: DIFFERS: source 5000 rows, target 4999 rows; 1 missing, 0 extra, 1 different".to_string(),
        "missing keys: s2,17".to_string(),
        "different keys: s3,5".to_string(),
        "target billing: public.charges: identical (3001 rows)".to_string(),
        "ORPHANS: public.charges(site, visit_no) at billing → public.visits(site, visit_no) at clinical (charges_visit_fk): 3 rows whose parent is missing; missing parent keys: (s2, 17)".to_string(),
    ] {
        assert!(out.contains(&line), "missing {line:?} in:\n{out}");
    }
    assert!(!out.contains("zq"), "values in the report:\n{out}");
    daemon.stop().await;
}
