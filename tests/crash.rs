//! Exactly once under SIGKILL: the daemon runs as a child process and is killed at random
//! instants (including during start-up and mid-transaction) while the monolith keeps writing;
//! after the last restart every target equals the source exactly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{kill9, spawn_daemon, Env};

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, qty int NOT NULL, label text);
CREATE TABLE events (kind text, n int);
ALTER TABLE events REPLICA IDENTITY FULL;
";

/// One workload transaction: a mix of inserts, updates, deletes, duplicate rows in a table
/// without a key, and now and then a bigger multi-row transaction.
async fn workload_step(c: &tokio_postgres::Client, i: i64) -> Result<(), tokio_postgres::Error> {
    match i % 7 {
        0 => {
            c.batch_execute(&format!(
                "BEGIN; INSERT INTO items SELECT g, 1, 'zqbulk' FROM generate_series({a}, {b}) g; \
                 INSERT INTO events VALUES ('zqbulk', {i}), ('zqbulk', {i}); COMMIT;",
                a = 1_000_000 + i * 100,
                b = 1_000_000 + i * 100 + 99
            ))
            .await
        }
        1 | 2 => {
            c.batch_execute(&format!(
                "INSERT INTO items VALUES ({i}, {i} % 10, 'zqlabel{i}'); INSERT INTO events VALUES ('zqins', {n});",
                n = i % 5
            ))
            .await
        }
        3 => {
            c.batch_execute(&format!(
                "BEGIN; UPDATE items SET qty = qty + 1 WHERE id = {a}; UPDATE items SET label = NULL WHERE id = {b}; COMMIT;",
                a = i - 2,
                b = i - 5
            ))
            .await
        }
        4 => {
            c.batch_execute(&format!(
                "DELETE FROM items WHERE id = {a}; \
                 DELETE FROM events WHERE ctid = (SELECT ctid FROM events WHERE kind = 'zqins' AND n = {n} LIMIT 1);",
                a = i - 10,
                n = i % 5
            ))
            .await
        }
        5 => {
            c.batch_execute(&format!(
                "UPDATE items SET id = id + 500000 WHERE id = {a}; UPDATE events SET n = n + 100 WHERE ctid = (SELECT ctid FROM events WHERE kind = 'zqbulk' LIMIT 1);",
                a = i - 3
            ))
            .await
        }
        _ => {
            c.batch_execute(&format!(
                "BEGIN; INSERT INTO items VALUES ({i}, 0, 'zqrolledback'); ROLLBACK;"
            ))
            .await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_instants_loses_and_duplicates_nothing() {
    let env = Env::new(SCHEMA, &[("a", &["items", "events"]), ("b", &["items"])]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("daemon.toml");
    std::fs::write(&config, env.config()).unwrap();
    let log = dir.path().join("daemon.log");

    // The first run creates the slot and publication; then the workload starts.
    let mut child = spawn_daemon(&config, &log);
    env.wait_slot().await;

    let stop = Arc::new(AtomicBool::new(false));
    let src = env.source().await;
    let stop_w = stop.clone();
    let workload = tokio::spawn(async move {
        let mut i = 10i64;
        while !stop_w.load(Ordering::Relaxed) {
            workload_step(&src, i).await.expect("workload transaction");
            i += 1;
        }
        i
    });

    for round in 0..6 {
        // Round 0 kills during start-up; the others at random points while streaming.
        let ms = if round == 1 {
            30
        } else {
            fastrand::u64(150..1500)
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        kill9(&mut child);
        child = spawn_daemon(&config, &log);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let steps = workload.await.unwrap();
    assert!(steps > 50, "workload ran only {steps} steps");

    for (target, table) in [("a", "items"), ("a", "events"), ("b", "items")] {
        env.wait_equal(target, table).await;
    }
    // A clean stop on SIGTERM exits 0.
    // SAFETY: kill on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "daemon exit {status}; log tail:\n{}",
        tail(&text)
    );
    // Row values never reach the log: every text value the workload writes carries "zq".
    assert!(!text.contains("zq"), "log leaks values:\n{}", tail(&text));
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
