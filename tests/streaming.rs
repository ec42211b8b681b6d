//! End-to-end streaming through the daemon, in-process, against the shared clusters.

use crate::common::Env;

const SCHEMA: &str = "
CREATE TABLE patients (id bigint PRIMARY KEY, name text NOT NULL, born date, note text);
CREATE TABLE consultations (id bigint PRIMARY KEY, patient_id bigint NOT NULL, at timestamptz NOT NULL, summary text);
CREATE TABLE audit_log (who text, what text);
ALTER TABLE audit_log REPLICA IDENTITY FULL;
";

#[tokio::test]
async fn streams_inserts_updates_deletes_to_owning_targets() {
    let env = Env::new(
        SCHEMA,
        &[
            ("patient", &["patients", "audit_log"]),
            ("clinical", &["consultations", "patients"]),
        ],
    )
    .await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute(
        "INSERT INTO patients VALUES (1, 'A', '1980-01-02', 'n1'), (2, 'B', NULL, NULL);
         INSERT INTO consultations VALUES (10, 1, '2026-01-01 10:00+00', 's');
         UPDATE patients SET name = 'A2' WHERE id = 1;
         UPDATE patients SET id = 3 WHERE id = 2;
         DELETE FROM consultations WHERE id = 10;
         INSERT INTO consultations VALUES (11, 3, 'infinity', NULL);
         INSERT INTO audit_log VALUES ('x', 'y'), ('x', 'y'), ('z', NULL);
         DELETE FROM audit_log WHERE ctid = (SELECT ctid FROM audit_log WHERE who = 'x' LIMIT 1);
         UPDATE audit_log SET what = 'w' WHERE who = 'z';",
    )
    .await
    .unwrap();
    // Rolled back work and rolled-back savepoints never appear.
    src.batch_execute("BEGIN; INSERT INTO patients VALUES (99, 'gone', NULL, NULL); ROLLBACK;")
        .await
        .unwrap();
    src.batch_execute(
        "BEGIN; INSERT INTO patients VALUES (4, 'kept', NULL, NULL);
         SAVEPOINT s; INSERT INTO patients VALUES (98, 'gone', NULL, NULL); ROLLBACK TO s;
         COMMIT;",
    )
    .await
    .unwrap();
    env.wait_equal("patient", "patients").await;
    env.wait_equal("patient", "audit_log").await;
    env.wait_equal("clinical", "patients").await;
    env.wait_equal("clinical", "consultations").await;
    // Not routed there: stays empty.
    let n: i64 = env
        .target("patient")
        .await
        .query_one("SELECT count(*) FROM consultations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    daemon.stop().await;
}

/// A slot being created counts as active, but transactions committing before its consistent
/// point are never decoded. Creation waits for every transaction running on the cluster, so a
/// start-up while one is open must not be taken for streaming: the row written right after
/// `start` returns must arrive. (Waiting for "active" alone lost such rows under parallel tests.)
#[tokio::test]
async fn start_waits_for_the_consistent_point_not_just_an_active_slot() {
    let env = Env::new(
        "CREATE TABLE notes (id int PRIMARY KEY);",
        &[("svc", &["notes"])],
    )
    .await;
    // A transaction with an xid, open on the source cluster while the slot is created.
    let blocker = crate::common::connect(&crate::common::clusters().source.url("postgres")).await;
    blocker
        .batch_execute("BEGIN; SELECT txid_current();")
        .await
        .unwrap();
    let release = async {
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        blocker.batch_execute("COMMIT").await.unwrap();
    };
    // Write as soon as `start` returns, while the blocker may still be open.
    let start_and_write = async {
        let daemon = env.start().await;
        env.source()
            .await
            .batch_execute("INSERT INTO notes VALUES (1)")
            .await
            .unwrap();
        daemon
    };
    let (daemon, ()) = tokio::join!(start_and_write, release);
    env.wait_equal("svc", "notes").await;
    daemon.stop().await;
}
