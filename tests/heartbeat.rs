//! The source heartbeat: with the routed tables idle, the slot still advances, and the WAL it
//! retains is measured.

use std::time::Duration;

use crate::common::{metric, start_daemon, wait_until, Env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_slot_advances_with_heartbeats_and_its_retained_wal_is_measured() {
    let env = Env::new(
        "CREATE TABLE notes (id int PRIMARY KEY);",
        &[("svc", &["notes"])],
    )
    .await;
    let config = env
        .config()
        .replace("[source]\n", "[source]\nheartbeat_secs = 1\n");
    let daemon = start_daemon(&config);
    env.wait_slot().await;
    let src = env.source().await;
    let confirmed = || async {
        let lsn: String = src
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.slot],
            )
            .await
            .unwrap()
            .get(0);
        lsn.parse::<pgcarve::lsn::Lsn>().unwrap()
    };
    let before = confirmed().await;
    // No writes anywhere: only heartbeats move the WAL, and the slot follows them.
    wait_until(
        "the idle slot advancing",
        Duration::from_secs(30),
        || async { confirmed().await > before },
    )
    .await;
    wait_until(
        "the retained WAL measured",
        Duration::from_secs(30),
        || async { metric(&daemon, "migration_slot_retained_wal_bytes", &[]) > 0.0 },
    )
    .await;
    daemon.stop().await;
}
