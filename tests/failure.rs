//! Failures: a target that rejects a change stalls alone and catches up, in order and without
//! skipping anything, once the cause is fixed; lost connections reconnect and resume.

use std::time::Duration;

use crate::common::{metric, wait_until, Env};

const SCHEMA: &str = "CREATE TABLE patients (id bigint PRIMARY KEY, name text NOT NULL);";

/// Two targets owning `patients`; "strict" rejects ids of 100 and more.
async fn strict_and_other() -> Env {
    let env = Env::new(
        SCHEMA,
        &[("strict", &["patients"]), ("other", &["patients"])],
    )
    .await;
    env.target("strict")
        .await
        .batch_execute("ALTER TABLE patients ADD CONSTRAINT small_ids CHECK (id < 100)")
        .await
        .unwrap();
    env
}

/// One target "t" owning `patients`, the daemon streaming, and one row applied there.
async fn one_target_with_a_row() -> (Env, crate::common::Daemon, tokio_postgres::Client) {
    let env = Env::new(SCHEMA, &[("t", &["patients"])]).await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute("INSERT INTO patients VALUES (1, 'a')")
        .await
        .unwrap();
    env.wait_equal("t", "patients").await;
    (env, daemon, src)
}

/// Ends the walsender serving `slot`, so the daemon reconnects (a barrier).
async fn drop_source_connection(src: &tokio_postgres::Client, slot: &str) {
    src.batch_execute(&format!(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
          WHERE slot_name = '{slot}' AND active_pid IS NOT NULL"
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn rejected_row_stalls_only_its_target_until_fixed() {
    let env = strict_and_other().await;
    let daemon = env.start().await;
    let src = env.source().await;
    src.batch_execute("INSERT INTO patients VALUES (1, 'a'), (2, 'b')")
        .await
        .unwrap();
    src.batch_execute("INSERT INTO patients VALUES (150, 'rejected on strict')")
        .await
        .unwrap();
    src.batch_execute("INSERT INTO patients VALUES (3, 'after')")
        .await
        .unwrap();

    // The other target keeps streaming.
    env.wait_equal("other", "patients").await;
    // The strict target counts the error and holds exactly what came before the bad row.
    wait_until("error counted", Duration::from_secs(30), || async {
        metric(
            &daemon,
            "migration_errors_total",
            &[("target", "strict"), ("sqlstate_class", "23")],
        ) > 0.0
    })
    .await;
    let strict = env.target("strict").await;
    let ids: Vec<i64> = strict
        .query("SELECT id FROM patients ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // A prefix of the source's history: the good transaction may have shared a rolled-back
    // group with the bad one, but nothing after the rejected row may be there.
    assert!(
        ids.is_empty() || ids == vec![1, 2],
        "target must hold a prefix of history, got {ids:?}"
    );
    // Retries go one source transaction at a time, so the good one before the bad one lands.
    wait_until(
        "the good prefix committed",
        Duration::from_secs(30),
        || async {
            let ids: Vec<i64> = strict
                .query("SELECT id FROM patients ORDER BY id", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert!(ids.is_empty() || ids == vec![1, 2], "not a prefix: {ids:?}");
            ids == vec![1, 2]
        },
    )
    .await;
    // Between the good prefix's commit and the bad transaction's next failure the target is
    // briefly streaming: wait for the failure.
    wait_until("degraded", Duration::from_secs(30), || async {
        daemon.obs.health.report().1["status"] == "degraded"
    })
    .await;
    let (code, body) = daemon.obs.health.report();
    assert_eq!(
        code, 200,
        "a retrying target is degraded, not failed: {body}"
    );
    // Retries continue (backoff), and the error is never skipped.
    wait_until("a retry", Duration::from_secs(30), || async {
        metric(&daemon, "migration_errors_total", &[("target", "strict")]) >= 2.0
    })
    .await;
    // Attempts accumulate across retries of the same change, so the backoff grows.
    wait_until("attempts to grow", Duration::from_secs(30), || async {
        let body = daemon.obs.health.report().1;
        body["targets"]["strict"]["failure"]["attempts"]
            .as_u64()
            .is_some_and(|a| a >= 3)
    })
    .await;

    // A barrier while this target is stalled (here: the source connection drops) must not
    // let the slot move past what the stalled target still needs.
    drop_source_connection(&src, &env.slot).await;
    src.batch_execute("INSERT INTO patients VALUES (5, 'during the stall')")
        .await
        .unwrap();
    env.wait_equal("other", "patients").await;

    // The operator fixes the cause; the row and everything after it arrive.
    strict
        .batch_execute("ALTER TABLE patients DROP CONSTRAINT small_ids")
        .await
        .unwrap();
    env.wait_equal("strict", "patients").await;
    src.batch_execute("INSERT INTO patients VALUES (4, 'later')")
        .await
        .unwrap();
    env.wait_equal("strict", "patients").await;
    env.wait_equal("other", "patients").await;
    wait_until("healthy again", Duration::from_secs(30), || async {
        daemon.obs.health.report().1["status"] == "healthy"
    })
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn lost_source_and_target_connections_reconnect_and_resume() {
    let (env, daemon, src) = one_target_with_a_row().await;

    // Kill the walsender serving our slot.
    src.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
        &[&env.slot],
    )
    .await
    .unwrap();
    src.batch_execute("INSERT INTO patients VALUES (2, 'b')")
        .await
        .unwrap();
    env.wait_equal("t", "patients").await;

    // Kill the target's apply connection.
    let db = &env.targets[0].db;
    env.target("t")
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'pgcarve' AND pid <> pg_backend_pid()",
            &[db],
        )
        .await
        .unwrap();
    src.batch_execute(
        "INSERT INTO patients VALUES (3, 'c'); UPDATE patients SET name = 'z' WHERE id = 1",
    )
    .await
    .unwrap();
    env.wait_equal("t", "patients").await;
    assert!(metric(&daemon, "migration_stream_restarts_total", &[]) >= 1.0);
    daemon.stop().await;
}

#[tokio::test]
async fn missing_slot_with_progress_refuses_to_start() {
    let (env, daemon, _) = one_target_with_a_row().await;
    daemon.stop().await;
    // The walsender may take a moment to exit after the daemon closed its connection.
    let src = env.source().await;
    wait_until("the slot dropped", Duration::from_secs(30), || async {
        src.execute("SELECT pg_drop_replication_slot($1)", &[&env.slot])
            .await
            .is_ok()
    })
    .await;
    let err = env.start_error().await;
    assert!(err.contains(&env.slot) && err.contains("t (at"), "{err}");
}

#[tokio::test]
async fn table_without_key_or_identity_is_refused_with_the_fix() {
    let env = Env::new(
        "CREATE TABLE nokey (a int); CREATE TABLE patients (id int PRIMARY KEY);",
        &[("t", &["nokey", "patients", "ghost"])],
    )
    .await;
    let err = env.start_error().await;
    assert!(
        err.contains("REPLICA IDENTITY FULL") && err.contains("public.nokey"),
        "{err}"
    );
    assert!(err.contains("public.ghost does not exist"), "{err}");
}

#[tokio::test]
async fn a_publication_filtering_rows_or_columns_is_refused() {
    let env = Env::new(
        "CREATE TABLE patients (id int PRIMARY KEY, name text);
         CREATE TABLE notes (id int PRIMARY KEY, body text);",
        &[("t", &["patients", "notes"])],
    )
    .await;
    env.source()
        .await
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE patients WHERE (id > 10), notes (id)",
            env.slot
        ))
        .await
        .unwrap();
    let err = env.start_error().await;
    assert!(
        err.contains("public.patients") && err.contains("row filter"),
        "{err}"
    );
    assert!(
        err.contains("public.notes") && err.contains("column list"),
        "{err}"
    );
}

#[tokio::test]
async fn a_refused_start_changes_nothing_on_any_database() {
    // The publication filters one routed table and lacks the other: start-up must refuse
    // before it adds the missing table, creates the slot or creates pgcarve.progress.
    let env = Env::new(
        "CREATE TABLE patients (id int PRIMARY KEY, name text);
         CREATE TABLE notes (id int PRIMARY KEY, body text);",
        &[("t", &["patients", "notes"])],
    )
    .await;
    let src = env.source().await;
    src.batch_execute(&format!(
        "CREATE PUBLICATION {} FOR TABLE patients WHERE (id > 10)",
        env.slot
    ))
    .await
    .unwrap();
    let err = env.start_error().await;
    assert!(err.contains("row filter"), "{err}");
    let published: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 1, "the publication was altered");
    let slots: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "a slot was created");
    let progress: bool = env
        .target("t")
        .await
        .query_one("SELECT to_regclass('pgcarve.progress') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!progress, "pgcarve.progress was created on the target");
}

#[tokio::test]
async fn a_target_whose_progress_goes_back_stalls_instead_of_skipping() {
    let (env, daemon, src) = one_target_with_a_row().await;
    // Until the target has flushed that commit, losing it would be a crash losing an
    // asynchronous commit, which pgcarve repairs from the slot. Wait until it is durable.
    wait_until("the commit durable", Duration::from_secs(30), || async {
        metric(
            &daemon,
            "migration_target_committed_lsn",
            &[("target", "t")],
        ) > 0.0
    })
    .await;
    // The target as if restored from an older backup: its rows and its progress go back, and
    // pgcarve's connection is cut.
    let dst = env.target("t").await;
    dst.batch_execute(
        "DELETE FROM patients;
         UPDATE pgcarve.progress SET lsn = '0/1';
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = 'pgcarve' AND datname = current_database();",
    )
    .await
    .unwrap();
    src.batch_execute("INSERT INTO patients VALUES (2, 'b')")
        .await
        .unwrap();
    wait_until("the rewind reported", Duration::from_secs(30), || async {
        metric(
            &daemon,
            "migration_errors_total",
            &[("target", "t"), ("sqlstate_class", "divergence")],
        ) > 0.0
    })
    .await;
    // /health follows the target's status when the reader next looks (on its wake-up or tick).
    wait_until("the rewind in /health", Duration::from_secs(30), || async {
        let (_, body) = daemon.obs.health.report();
        // Retrying cannot help: an operator must act, so /health fails (503).
        body["status"] == "failed"
            && body["targets"]["t"]["state"] == "failed"
            && body["targets"]["t"]["failure"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("went back"))
    })
    .await;
    // Nothing was applied past the hole.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n: i64 = dst
        .query_one("SELECT count(*) FROM patients", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "a target that lost history must not be written to");
    daemon.stop().await;
    // A restart does not stream on past the hole.
    let err = env.start_error().await;
    assert!(
        err.contains("stopped by an earlier run") && err.contains("went back"),
        "{err}"
    );
}

#[tokio::test]
async fn a_target_crash_loses_no_committed_change() {
    // A target cluster of its own, crashed (immediate shutdown: WAL buffers not yet written
    // are lost, so are asynchronous commits in them) and restarted in the middle of a stream.
    let mut own = pgcarve::localpg::Cluster::start(&pgcarve::localpg::ClusterOptions::default())
        .expect("start own target cluster");
    let env = Env::on_cluster(SCHEMA, &[("t", &["patients"])], &own).await;
    let daemon = env.start().await;
    let src = env.source().await;
    // Single-row transactions, so many commits are in flight around each crash.
    let mut next = 0i64;
    for round in 0..4 {
        for _ in 0..200 {
            next += 1;
            src.execute("INSERT INTO patients VALUES ($1, 'p')", &[&next])
                .await
                .unwrap();
        }
        if round < 3 {
            own.crash_and_restart().expect("restart the target");
        }
    }
    env.wait_equal("t", "patients").await;
    // And its progress is where the source is.
    wait_until(
        "the target's progress durable",
        Duration::from_secs(30),
        || async { daemon.obs.health.report().1["status"] == "healthy" },
    )
    .await;
    daemon.stop().await;
}

/// Stalls "strict" (retrying every `retry_secs`) on a rejected row, drops the source connection
/// while it is stalled (a barrier), streams a transaction it cannot take meanwhile, lets
/// `more_errors` further failures happen, then waits `settle` for status updates to go out, stops
/// the daemon, fixes the cause and starts a new run: the slot must still have held everything
/// the stalled target missed, so it ends level with the source.
async fn stall_through_a_barrier_then_fix(retry_secs: u32, more_errors: f64, settle: Duration) {
    let env = strict_and_other().await;
    let config = env
        .config()
        .replace(
            "retry_initial_secs = 0.2",
            &format!("retry_initial_secs = {retry_secs}"),
        )
        .replace(
            "retry_max_secs = 1.0",
            &format!("retry_max_secs = {retry_secs}"),
        );
    let daemon = crate::common::start_daemon(&config);
    env.wait_slot().await;
    let src = env.source().await;
    src.batch_execute("INSERT INTO patients VALUES (150, 'rejected on strict')")
        .await
        .unwrap();
    wait_until("strict stalled", Duration::from_secs(30), || async {
        metric(&daemon, "migration_errors_total", &[("target", "strict")]) > 0.0
    })
    .await;
    drop_source_connection(&src, &env.slot).await;
    src.batch_execute("INSERT INTO patients VALUES (5, 'during the stall')")
        .await
        .unwrap();
    env.wait_equal("other", "patients").await;
    wait_until("further failures", Duration::from_secs(60), || async {
        metric(&daemon, "migration_errors_total", &[("target", "strict")]) >= 1.0 + more_errors
    })
    .await;
    tokio::time::sleep(settle).await;
    daemon.stop().await;
    env.target("strict")
        .await
        .batch_execute("ALTER TABLE patients DROP CONSTRAINT small_ids")
        .await
        .unwrap();
    let daemon = env.start().await;
    env.wait_equal("strict", "patients").await;
    env.wait_equal("other", "patients").await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_stalled_target_keeps_holding_the_slot_through_a_source_reconnect() {
    // Slow retries: the target stays failed (not ready) for the whole run. Status updates go
    // out at least every 10 s: let one go out.
    stall_through_a_barrier_then_fix(60, 0.0, Duration::from_secs(11)).await;
}

#[tokio::test]
async fn a_retrying_target_still_holds_what_it_missed_while_stalled() {
    // Retries every 3 s: the target takes changes again at each retry's barrier (then fails
    // again); two of them, then a status update.
    stall_through_a_barrier_then_fix(3, 2.0, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_column_added_on_the_source_stalls_until_added_on_the_target() {
    let (env, daemon, src) = one_target_with_a_row().await;
    // DDL is not replicated: the new column stalls the target, naming it.
    src.batch_execute(
        "ALTER TABLE patients ADD COLUMN note text;
         INSERT INTO patients VALUES (2, 'b', 'n');",
    )
    .await
    .unwrap();
    wait_until(
        "the missing column reported",
        Duration::from_secs(30),
        || async {
            daemon.obs.health.report().1["targets"]["t"]["failure"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("note"))
        },
    )
    .await;
    // Fixed on the target: the next retry plans from the target's catalog as it is now.
    env.target("t")
        .await
        .batch_execute("ALTER TABLE patients ADD COLUMN note text")
        .await
        .unwrap();
    env.wait_equal("t", "patients").await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_stop_ends_in_time_while_a_target_waits_on_a_lock() {
    let env = Env::new(
        SCHEMA,
        &[("locked", &["patients"]), ("free", &["patients"])],
    )
    .await;
    let config = env
        .config()
        .replace("[apply]\n", "[apply]\nshutdown_secs = 4\nhung_secs = 1\n");
    let daemon = crate::common::start_daemon(&config);
    env.wait_slot().await;
    // A transaction on one target holds the table: its apply task waits on the lock.
    let mut locker = env.target("locked").await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE patients IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let src = env.source().await;
    src.batch_execute("INSERT INTO patients VALUES (1, 'a'), (2, 'b')")
        .await
        .unwrap();
    env.wait_equal("free", "patients").await;
    // Seen as not progressing (apply.hung_secs = 1), in /health and in the metrics.
    wait_until(
        "the locked target reported",
        Duration::from_secs(30),
        || async {
            let (_, body) = daemon.obs.health.report();
            body["status"] == "degraded"
                && body["targets"]["locked"]["progressing"] == false
                && body["targets"]["free"]["progressing"] == true
                && metric(
                    &daemon,
                    "migration_target_stuck_seconds",
                    &[("target", "locked")],
                ) >= 1.0
        },
    )
    .await;
    // The stop cancels the waiting statement and ends within apply.shutdown_secs; 60 s is
    // only the test's own deadline against a hang.
    tokio::time::timeout(Duration::from_secs(60), daemon.stop())
        .await
        .expect("the daemon did not stop while a target waited on a lock");
    lock.rollback().await.unwrap();
    // Nothing was lost: the locked target catches up after a restart.
    let daemon = env.start().await;
    env.wait_equal("locked", "patients").await;
    daemon.stop().await;
}
