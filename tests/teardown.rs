//! `pgcarve teardown` on real clusters: refused while a pgcarve streams from the slot; with
//! `--force` the slot and publication are gone; `--targets` removes the bookkeeping, never the
//! service tables.

use crate::common::{pgcarve_command, start_daemon, Env};

fn teardown(env: &Env, args: &[&str]) -> (i32, String) {
    let mut all = vec!["teardown"];
    all.extend_from_slice(args);
    pgcarve_command(env, &all)
}

async fn count(c: &tokio_postgres::Client, sql: &str, slot: &str) -> i64 {
    c.query_one(sql, &[&slot]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_refuses_an_attached_slot_then_removes_everything_but_the_data() {
    let env = Env::new(
        "CREATE TABLE notes (id int PRIMARY KEY, v text);",
        &[("svc", &["notes"])],
    )
    .await;
    let daemon = start_daemon(&env.config());
    env.wait_slot().await;
    let src = env.source().await;
    src.batch_execute("INSERT INTO notes VALUES (1, 'zqone')")
        .await
        .unwrap();
    env.wait_equal("svc", "notes").await;

    let (code, out) = teardown(&env, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is in use by process"), "{out}");
    let slots = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1";
    assert_eq!(count(&src, slots, &env.slot).await, 1, "nothing changed");

    let (code, out) = teardown(&env, &["--force", "--targets"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("dropped (the monolith no longer keeps WAL for it)"),
        "{out}"
    );
    daemon.shutdown.cancel();
    let _ = daemon.handle.await;
    assert_eq!(count(&src, slots, &env.slot).await, 0);
    let pubs = "SELECT count(*) FROM pg_publication WHERE pubname = $1";
    assert_eq!(count(&src, pubs, &env.slot).await, 0);
    let target = env.target("svc").await;
    let schema: bool = target
        .query_one("SELECT to_regnamespace('pgcarve') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(schema, "the pgcarve schema is gone");
    let rows: i64 = target
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the service's rows stay");
    assert!(!out.contains("zq"));

    // Again: nothing left to remove.
    let (code, out) = teardown(&env, &["--targets"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("does not exist"), "{out}");
}
