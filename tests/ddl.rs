//! Monolith DDL on routed tables: a rename or a move to another schema is followed; a table
//! dropped and recreated stops its owners, fails /health and never lets the slot pass what
//! they have not applied.

use std::time::Duration;

use tokio_postgres::Client;

use crate::common::{metric, start_daemon, table_rows, wait_until, Daemon, Env};

const SCHEMA: &str = "CREATE TABLE patients (id bigint PRIMARY KEY, name text NOT NULL);
                      CREATE TABLE notes (id bigint PRIMARY KEY);
                      CREATE SCHEMA archive;";

/// Waits until `target_table` on target `t` holds what `source_table` holds on the source.
async fn wait_same(env: &Env, source_table: &str, target_table: &str) {
    let src = env.source().await;
    let dst = env.target("t").await;
    wait_until(
        &format!("{target_table} on the target equal to {source_table} on the source"),
        Duration::from_secs(60),
        || async { table_rows(&src, source_table).await == table_rows(&dst, target_table).await },
    )
    .await;
}

/// One target owning both tables, the daemon streaming with a catalog check every half second,
/// and one patient and one note applied.
async fn streaming_with_a_quick_catalog_check() -> (Env, Daemon, Client) {
    let env = Env::new(SCHEMA, &[("t", &["patients", "notes"])]).await;
    let config = env
        .config()
        .replace("[source]\n", "[source]\ncatalog_check_secs = 0.5\n");
    let daemon = start_daemon(&config);
    env.wait_slot().await;
    let src = env.source().await;
    src.batch_execute("INSERT INTO patients VALUES (1, 'a'); INSERT INTO notes VALUES (1);")
        .await
        .unwrap();
    env.wait_equal("t", "patients").await;
    env.wait_equal("t", "notes").await;
    (env, daemon, src)
}

#[tokio::test]
async fn a_renamed_or_moved_routed_table_keeps_reaching_its_owner() {
    // The quick catalog check shows it takes a rename for no problem.
    let (env, daemon, src) = streaming_with_a_quick_catalog_check().await;
    // Renamed under writes: the changes go on to public.patients on the target.
    src.batch_execute(
        "BEGIN; ALTER TABLE patients RENAME TO patients_v2;
                INSERT INTO patients_v2 VALUES (2, 'b'); COMMIT;
         UPDATE patients_v2 SET name = 'a2' WHERE id = 1;
         INSERT INTO notes VALUES (2);",
    )
    .await
    .unwrap();
    wait_same(&env, "patients_v2", "patients").await;
    env.wait_equal("t", "notes").await;
    assert_eq!(
        metric(
            &daemon,
            "migration_table_renamed",
            &[
                ("table", "public.patients"),
                ("source_name", "public.patients_v2")
            ]
        ),
        1.0
    );
    // Moved to another schema: followed as well.
    src.batch_execute(
        "ALTER TABLE patients_v2 SET SCHEMA archive;
         INSERT INTO archive.patients_v2 VALUES (3, 'c');
         DELETE FROM archive.patients_v2 WHERE id = 2;",
    )
    .await
    .unwrap();
    wait_same(&env, "archive.patients_v2", "patients").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, body) = daemon.obs.health.report();
    assert_ne!(body["status"], "failed", "{body}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_dropped_and_recreated_routed_table_stops_its_owner_and_holds_the_slot() {
    let (env, daemon, src) = streaming_with_a_quick_catalog_check().await;
    // "Rebuild the table": drop, recreate, refill. The new table is not in the publication.
    src.batch_execute(
        "DROP TABLE patients;
         CREATE TABLE patients (id bigint PRIMARY KEY, name text NOT NULL);
         INSERT INTO patients VALUES (1, 'a'), (2, 'b');",
    )
    .await
    .unwrap();
    wait_until(
        "the recreated table reported",
        Duration::from_secs(30),
        || async {
            let (code, body) = daemon.obs.health.report();
            code == 503
                && body["status"] == "failed"
                && body["targets"]["t"]["state"] == "failed"
                && body["problems"].as_array().is_some_and(|p| {
                    p.iter()
                        .any(|m| m.as_str().unwrap_or("").contains("recreated"))
                })
        },
    )
    .await;
    assert_eq!(
        metric(
            &daemon,
            "migration_ddl_problem",
            &[("table", "public.patients"), ("problem", "recreated")]
        ),
        1.0
    );
    assert!(
        metric(
            &daemon,
            "migration_errors_total",
            &[("target", "t"), ("sqlstate_class", "ddl")]
        ) >= 1.0
    );
    // The owner stopped: a later change of its other table waits, and the slot stays where
    // the target is.
    src.batch_execute("INSERT INTO notes VALUES (2)")
        .await
        .unwrap();
    let after: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dst = env.target("t").await;
    let notes: i64 = dst
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(notes, 1, "a stopped target must not apply anything");
    let held: bool = src
        .query_one(
            "SELECT confirmed_flush_lsn < $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&env.slot, &after],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        held,
        "the slot moved past a change the stopped target did not apply"
    );
    daemon.stop().await;
    // The stop outlives a restart: start-up refuses until an operator clears it.
    let err = env.start_error().await;
    assert!(
        err.contains("stopped by an earlier run") && err.contains("recreated"),
        "{err}"
    );
}
