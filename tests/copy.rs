//! The initial copy on real clusters: a monolith that already holds rows and keeps taking
//! writes during the copy; kill -9 at several points of a copy; a table added later.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{kill9, metric, spawn_daemon, start_daemon, terminate, wait_until, Env};

const SCHEMA: &str = "
CREATE TABLE patients (id bigint PRIMARY KEY, name text NOT NULL, born date, notes text);
CREATE TABLE allergies (id bigint PRIMARY KEY, patient_id bigint NOT NULL REFERENCES patients, what text);
CREATE TABLE events (kind text, n int);
ALTER TABLE events REPLICA IDENTITY FULL;
CREATE TABLE readings (id bigint, taken date NOT NULL, v numeric, PRIMARY KEY (id, taken)) PARTITION BY RANGE (taken);
CREATE TABLE readings_2024 PARTITION OF readings FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE readings_2025 PARTITION OF readings FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
";

const SEED: &str = "
INSERT INTO patients SELECT g, 'zqname' || g, date '1950-01-01' + g % 20000,
    CASE WHEN g % 500 = 0 THEN repeat('zqtoast', 5000) END FROM generate_series(1, 20000) g;
INSERT INTO allergies SELECT g, g, 'zqpollen' FROM generate_series(1, 20000, 2) g;
INSERT INTO events SELECT 'zqseed', g % 10 FROM generate_series(1, 3000) g;
INSERT INTO readings SELECT g, date '2024-06-01' + (g % 300), g / 7.0 FROM generate_series(1, 4000) g;
ANALYZE;
";

/// One workload transaction touching every table, FK order kept.
async fn step(c: &tokio_postgres::Client, i: i64) -> Result<(), tokio_postgres::Error> {
    let id = 1_000_000 + i;
    c.batch_execute(&format!(
        "BEGIN;
         INSERT INTO patients VALUES ({id}, 'zqnew', NULL, NULL);
         INSERT INTO allergies VALUES ({id}, {id}, 'zqdust');
         UPDATE patients SET name = 'zqupd' || {i} WHERE id = {u};
         DELETE FROM allergies WHERE patient_id = {d}; DELETE FROM patients WHERE id = {d};
         INSERT INTO events VALUES ('zqwl', {m});
         DELETE FROM events WHERE ctid = (SELECT ctid FROM events WHERE kind = 'zqseed' AND n = {m} LIMIT 1);
         INSERT INTO readings VALUES ({id}, date '2025-02-01' + ({i} % 200), {i});
         UPDATE readings SET v = v + 1 WHERE id = {u};
         COMMIT;",
        u = 1 + (i * 37) % 20000,
        d = 2 + (i * 2) % 19998,
        m = i % 10
    ))
    .await
}

/// Runs the workload until `stop`; returns the steps done.
fn workload(env: &Env, stop: Arc<AtomicBool>, from: i64) -> tokio::task::JoinHandle<i64> {
    let url = crate::common::clusters().source.url(&env.source_db);
    tokio::spawn(async move {
        let c = crate::common::connect(&url).await;
        let mut i = from;
        while !stop.load(Ordering::Relaxed) {
            step(&c, i).await.expect("workload transaction");
            i += 1;
        }
        i - from
    })
}

async fn all_equal(env: &Env) {
    for (t, tables) in [
        (
            "clinic",
            &["patients", "allergies", "events", "readings"][..],
        ),
        ("billing", &["patients"][..]),
    ] {
        for table in tables {
            env.wait_equal(t, table).await;
        }
    }
}

fn targets() -> [(&'static str, &'static [&'static str]); 2] {
    [
        ("clinic", &["patients", "allergies", "events", "readings"]),
        ("billing", &["patients"]),
    ]
}

async fn copy_state(env: &Env, target: &str, table: &str) -> Option<(String, String, i32)> {
    env.target(target)
        .await
        .query_opt(
            "SELECT state, coalesce(lsn::text, ''), coalesce(chunks, 0) FROM pgcarve.copy_table WHERE table_name = $1",
            &[&table],
        )
        .await
        .ok()
        .flatten()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Waits until `table`'s copy state on `target` is `state`.
async fn wait_copy_state(env: &Env, target: &str, table: &str, state: &str) {
    wait_until(
        &format!("{table} {state} on {target}"),
        Duration::from_secs(60),
        || async {
            copy_state(env, target, table)
                .await
                .is_some_and(|(s, _, _)| s == state)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_under_writes_leaves_every_target_equal_and_streams_on() {
    let env = Env::new(SCHEMA, &targets()).await;
    env.source().await.batch_execute(SEED).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = workload(&env, stop.clone(), 0);
    // Small chunks: the 20,000 patients are read as block ranges, in parallel.
    let config = format!(
        "{}\n[copy]\nchunk_rows = 2000\nparallel = 3\n",
        env.config()
    );
    let daemon = start_daemon(&config);
    env.wait_slot().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(
        writes.await.unwrap() > 5,
        "the workload ran during the copy"
    );
    all_equal(&env).await;

    let (state, _, chunks) = copy_state(&env, "clinic", "public.patients").await.unwrap();
    assert_eq!(state, "streaming");
    assert!(chunks > 1, "patients copied in {chunks} chunk(s)");
    let (_, _, leaves) = copy_state(&env, "clinic", "public.readings").await.unwrap();
    assert_eq!(leaves, 2, "a partitioned table is read leaf by leaf");
    let copied = metric(
        &daemon,
        "migration_copy_rows",
        &[("table", "public.patients")],
    );
    assert!(copied >= 19_000.0, "copied {copied} patients");
    assert_eq!(metric(&daemon, "migration_copy_done", &[]), 4.0);
    let (_, health) = daemon.obs.health.report();
    assert_eq!(health["copy"].as_array().unwrap().len(), 4, "{health}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_target_table_holding_rows_pgcarve_did_not_copy_is_refused() {
    let env = Env::new(
        "CREATE TABLE notes (id int PRIMARY KEY, v text);",
        &[("svc", &["notes"])],
    )
    .await;
    env.target("svc")
        .await
        .batch_execute("INSERT INTO notes VALUES (1, 'zqmine')")
        .await
        .unwrap();
    let err = env.start_error().await;
    assert!(
        err.contains("table public.notes already holds rows that pgcarve did not copy"),
        "{err}"
    );
    assert!(!err.contains("zq"));
    // Nothing was created on the source.
    let slots: i64 = env
        .source()
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
}

/// Finished chunks of `table` on `target` (0 while the copy state does not exist).
async fn chunks_done(env: &Env, target: &str, table: &str) -> i64 {
    env.target(target)
        .await
        .query_one(
            "SELECT count(*) FROM pgcarve.copy_chunk WHERE table_name = $1",
            &[&table],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_the_copy_loses_and_duplicates_nothing_and_keeps_finished_tables() {
    let env = Env::new(SCHEMA, &targets()).await;
    let src = env.source().await;
    src.batch_execute(SEED).await.unwrap();
    // A bigger patients table: many chunks, so a kill lands mid-table.
    src.batch_execute(
        "INSERT INTO patients SELECT g, 'zqmore', NULL, NULL FROM generate_series(20001, 300000) g; ANALYZE patients;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[copy]\nchunk_rows = 10000\nparallel = 2\n",
            env.config()
        ),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let stop = Arc::new(AtomicBool::new(false));
    let writes = workload(&env, stop.clone(), 0);

    // 1: before the first chunk.
    let mut child = spawn_daemon(&config, &log);
    tokio::time::sleep(Duration::from_millis(60)).await;
    kill9(&mut child);
    // 2: mid-table, once a few chunks of patients committed.
    child = spawn_daemon(&config, &log);
    wait_until("chunks of patients", Duration::from_secs(60), || async {
        chunks_done(&env, "clinic", "public.patients").await >= 3
    })
    .await;
    kill9(&mut child);
    // Tables copied by now are kept from here on.
    let mut finished = Vec::new();
    for t in ["public.events", "public.readings"] {
        if let Some((state, lsn, _)) = copy_state(&env, "clinic", t).await {
            if state == "copied" || state == "streaming" {
                finished.push((t, lsn));
            }
        }
    }
    assert!(
        !finished.is_empty(),
        "small tables finish before the big one"
    );
    // 3: again mid-copy (the redone table, under a new snapshot).
    child = spawn_daemon(&config, &log);
    wait_until(
        "chunks of patients again",
        Duration::from_secs(60),
        || async { chunks_done(&env, "clinic", "public.patients").await >= 2 },
    )
    .await;
    kill9(&mut child);
    // Then to the end.
    child = spawn_daemon(&config, &log);
    env.wait_slot().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(writes.await.unwrap() > 5);
    all_equal(&env).await;
    for (t, lsn) in finished {
        let (state, now, _) = copy_state(&env, "clinic", t).await.unwrap();
        assert_eq!(
            (state.as_str(), now),
            ("streaming", lsn),
            "{t} was copied again"
        );
    }
    // SAFETY: kill on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("zq"), "log leaks values");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_later_is_copied_consistently_while_the_other_targets_stream() {
    let env = Env::new(
        SCHEMA,
        &[("clinic", &["patients"]), ("billing", &["patients"])],
    )
    .await;
    env.source().await.batch_execute(SEED).await.unwrap();
    let daemon = env.start().await;
    env.wait_equal("clinic", "patients").await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = workload(&env, stop.clone(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.stop().await;
    // Writes while it is stopped: the slot holds them, some for the tables added now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    writes.await.unwrap();
    let mut env = env;
    env.targets[0].tables = vec!["patients".into(), "allergies".into(), "events".into()];
    // The clinic's copy of allergies waits on a lock; billing must stream on meanwhile.
    let mut locker = env.target("clinic").await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE allergies IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let daemon = start_daemon(&env.config());
    env.wait_slot().await;
    let src = env.source().await;
    src.batch_execute("INSERT INTO patients VALUES (5000000, 'zqduring', NULL, NULL)")
        .await
        .unwrap();
    env.wait_equal("billing", "patients").await;
    let (_, health) = daemon.obs.health.report();
    assert_eq!(health["status"], "degraded", "{health}");
    lock.rollback().await.unwrap();
    // More writes after the copy: the added tables stream on from their snapshot.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = workload(&env, stop.clone(), 10_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writes.await.unwrap();
    for t in ["patients", "allergies", "events"] {
        env.wait_equal("clinic", t).await;
    }
    env.wait_equal("billing", "patients").await;
    let (state, _, _) = copy_state(&env, "clinic", "public.allergies")
        .await
        .unwrap();
    assert_eq!(state, "streaming");
    assert_eq!(
        metric(&daemon, "migration_copy_done", &[]),
        2.0,
        "only the added tables were copied"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_terminal_the_copy_draws_live_progress_bars() {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let env = Env::new(SCHEMA, &targets()).await;
    env.source().await.batch_execute(SEED).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("daemon.toml");
    std::fs::write(&config, env.config()).unwrap();
    // stderr on a pseudo-terminal, as a person running `pgcarve run` has it.
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new file descriptors, which we own from here on.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            OwnedFd::from_raw_fd(slave),
        )
    };
    let mut child = {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgcarve"));
        cmd.arg("--config")
            .arg(&config)
            .arg("run")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(slave));
        cmd.spawn().expect("spawn pgcarve")
    };
    let screen = std::thread::spawn(move || {
        let mut master = master;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).to_string()
    });
    env.wait_slot().await;
    all_equal(&env).await;
    // SAFETY: kill on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success());
    let screen = screen.join().unwrap();
    for table in [
        "public.patients",
        "public.allergies",
        "public.events",
        "public.readings",
    ] {
        assert!(screen.contains(table), "no bar for {table}:\n{screen}");
    }
    assert!(screen.contains("rows copied"), "{screen}");
    assert!(screen.contains("20,000/20,000"), "{screen}");
    assert!(
        screen.contains("\u{1b}["),
        "drawn with terminal control sequences"
    );
    assert!(!screen.contains("zq"), "values on the screen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_without_foreign_keys_is_copied_beside_its_target_which_streams_on() {
    let env = Env::new(
        SCHEMA,
        &[("clinic", &["patients"]), ("billing", &["patients"])],
    )
    .await;
    env.source().await.batch_execute(SEED).await.unwrap();
    let daemon = env.start().await;
    env.wait_equal("clinic", "patients").await;
    daemon.stop().await;
    let mut env = env;
    env.targets[0].tables = vec!["patients".into(), "events".into(), "readings".into()];
    // The copy of events waits on a lock; the clinic's patients must stream on meanwhile.
    let mut locker = env.target("clinic").await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE events IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("daemon.toml");
    std::fs::write(&config, env.config()).unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = spawn_daemon(&config, &log);
    env.wait_slot().await;
    let src = env.source().await;
    src.batch_execute(
        "INSERT INTO patients VALUES (5000000, 'zqduring', NULL, NULL);
         INSERT INTO events VALUES ('zqduring', 42);",
    )
    .await
    .unwrap();
    env.wait_equal("clinic", "patients").await;
    wait_copy_state(&env, "clinic", "public.events", "copying").await;
    lock.rollback().await.unwrap();

    // Writes to every table while the side stream catches up, a kill -9 among them (most
    // likely before the side stream joined), and a start again.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = workload(&env, stop.clone(), 20_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill9(&mut child);
    child = spawn_daemon(&config, &log);
    env.wait_slot().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(writes.await.unwrap() > 5);
    for t in ["patients", "events", "readings"] {
        env.wait_equal("clinic", t).await;
    }
    env.wait_equal("billing", "patients").await;

    // Once caught up, the side stream joins the clinic's stream: by a clean stop and start
    // inside the daemon, or at the start after the kill when that loses nothing.
    wait_copy_state(&env, "clinic", "public.events", "streaming").await;
    let (state, _, _) = copy_state(&env, "clinic", "public.readings").await.unwrap();
    assert_eq!(state, "streaming");
    let sides: i64 = env
        .target("clinic")
        .await
        .query_one(
            "SELECT count(*) FROM pgcarve.progress WHERE target LIKE '%+joining'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sides, 0, "the side stream's progress row is gone");
    env.wait_slot().await;
    for i in 0..20 {
        step(&src, 90_000 + i).await.unwrap();
    }
    for t in ["patients", "events", "readings"] {
        env.wait_equal("clinic", t).await;
    }
    terminate(&mut child);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("zq"), "log leaks values");
    assert!(
        text.contains("the side stream joined its target"),
        "the side stream joined"
    );
}

/// Whether `constraint` exists on the clinic target, validated; and how many keys are set aside.
async fn key_state(env: &Env, constraint: &str) -> (Option<bool>, i64) {
    let c = env.target("clinic").await;
    let valid: Option<bool> = c
        .query_opt(
            "SELECT convalidated FROM pg_constraint WHERE conname = $1",
            &[&constraint],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    let aside: i64 = match c
        .query_one("SELECT count(*) FROM pgcarve.fk_aside", &[])
        .await
    {
        Ok(r) => r.get(0),
        Err(_) => 0,
    };
    (valid, aside)
}

/// A daemon started with `allergies` added to the clinic (which has a foreign key to
/// `patients` there), its copy waiting at its first write (its state row, planned already, is
/// locked by `locker` until `ROLLBACK`), once it has set the key aside.
struct Blocked {
    env: Env,
    child: std::process::Child,
    locker: tokio_postgres::Client,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn added_with_a_foreign_key_and_blocked() -> Blocked {
    let env = Env::new(
        SCHEMA,
        &[("clinic", &["patients"]), ("billing", &["patients"])],
    )
    .await;
    let src = env.source().await;
    src.batch_execute(SEED).await.unwrap();
    let daemon = env.start().await;
    env.wait_equal("clinic", "patients").await;
    daemon.stop().await;
    let mut env = env;
    env.targets[0].tables = vec!["patients".into(), "allergies".into()];
    assert_eq!(
        key_state(&env, "allergies_patient_id_fkey").await,
        (Some(true), 0),
        "the target has the foreign key to begin with"
    );
    let system_id: String = src
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let locker = env.target("clinic").await;
    locker
        .execute(
            "INSERT INTO pgcarve.copy_table (system_id, slot, target, table_name, state) \
             VALUES ($1, $2, 'clinic', 'public.allergies', 'pending')",
            &[&system_id, &env.slot],
        )
        .await
        .unwrap();
    locker
        .batch_execute(
            "BEGIN; SELECT 1 FROM pgcarve.copy_table WHERE table_name = 'public.allergies' FOR UPDATE",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("daemon.toml");
    std::fs::write(&config, env.config()).unwrap();
    let log = dir.path().join("daemon.log");
    let child = spawn_daemon(&config, &log);
    env.wait_slot().await;
    wait_until("the key set aside", Duration::from_secs(60), || async {
        key_state(&env, "allergies_patient_id_fkey").await == (None, 1)
    })
    .await;
    Blocked {
        env,
        child,
        locker,
        config,
        log,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_with_a_foreign_key_to_the_others_is_copied_beside_them_and_the_key_comes_back(
) {
    let Blocked {
        env,
        mut child,
        locker,
        config,
        log,
        _dir,
    } = added_with_a_foreign_key_and_blocked().await;
    let src = env.source().await;
    // The clinic's patients stream on while the copy waits.
    src.batch_execute("INSERT INTO patients VALUES (5000000, 'zqduring', NULL, NULL)")
        .await
        .unwrap();
    env.wait_equal("clinic", "patients").await;
    locker.batch_execute("ROLLBACK").await.unwrap();

    // Writes to both tables (children of new patients, deletions of parents with their
    // children) while the side stream catches up, a kill -9 among them, a start again.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = workload(&env, stop.clone(), 30_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill9(&mut child);
    child = spawn_daemon(&config, &log);
    env.wait_slot().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(writes.await.unwrap() > 5);
    for t in ["patients", "allergies"] {
        env.wait_equal("clinic", t).await;
    }
    env.wait_equal("billing", "patients").await;

    // Joined, then the key is back: added and validated, nothing left aside.
    wait_copy_state(&env, "clinic", "public.allergies", "streaming").await;
    wait_until(
        "the key back and validated",
        Duration::from_secs(60),
        || async { key_state(&env, "allergies_patient_id_fkey").await == (Some(true), 0) },
    )
    .await;
    // From then on the target checks it, and the stream goes on.
    for i in 0..20 {
        step(&src, 95_000 + i).await.unwrap();
    }
    for t in ["patients", "allergies"] {
        env.wait_equal("clinic", t).await;
    }
    terminate(&mut child);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("zq"), "log leaks values");
    assert!(text.contains("foreign key set aside"), "the log says so");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_puts_back_a_foreign_key_set_aside_by_a_copy_that_never_finished() {
    let Blocked {
        env,
        mut child,
        locker,
        ..
    } = added_with_a_foreign_key_and_blocked().await;
    kill9(&mut child);
    locker.batch_execute("ROLLBACK").await.unwrap();
    let (code, out) = crate::common::pgcarve_command(&env, &["teardown", "--force", "--targets"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("foreign key public.allergies.allergies_patient_id_fkey set aside during a copy: put back"),
        "{out}"
    );
    let c = env.target("clinic").await;
    let back: bool = c
        .query_one(
            "SELECT convalidated AND to_regnamespace('pgcarve') IS NULL FROM pg_constraint \
             WHERE conname = 'allergies_patient_id_fkey'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(back, "the key is back, validated, and the bookkeeping gone");
}

/// Each row's `xmin` by its key (`key`: an expression of `visits`' key as text) on the clinic:
/// unchanged exactly when the row was not written again.
async fn row_versions(env: &Env, key: &str) -> std::collections::HashMap<String, String> {
    env.target("clinic")
        .await
        .query(&format!("SELECT {key}, xmin::text FROM visits"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Starts pgcarve on `env` (chunks of 10,000 rows, one at a time) and kills it (-9) once
/// `chunks` chunks of `visits` committed on the clinic. Returns its folder, config and log.
async fn killed_mid_copy(
    env: &Env,
    chunks: i64,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[copy]\nchunk_rows = 10000\nparallel = 1\n",
            env.config()
        ),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = spawn_daemon(&config, &log);
    wait_until("chunks of visits", Duration::from_secs(60), || async {
        chunks_done(env, "clinic", "public.visits").await >= chunks
    })
    .await;
    kill9(&mut child);
    (dir, config, log)
}

/// A copy of 400,000 `visits` (created by `schema`, filled by `seed`) killed after 8 of 40
/// chunks; `changes` on the monolith; a start again. Then ≥ 90% of the rows already copied
/// keep their version, and the row `changed` (its key as `key` shows it) was written again.
async fn resume_keeps_ranges(
    schema: &str,
    tables: &[&str],
    seed: &str,
    changes: &str,
    key: &str,
    changed: &str,
) -> (Env, String) {
    let env = Env::new(schema, &[("clinic", tables)]).await;
    let src = env.source().await;
    src.batch_execute(seed).await.unwrap();
    src.batch_execute("ANALYZE visits").await.unwrap();
    let (_dir, config, log) = killed_mid_copy(&env, 8).await;
    let before = row_versions(&env, key).await;
    assert!(
        before.len() >= 50_000 && before.len() < 400_000,
        "{} rows",
        before.len()
    );
    // Meanwhile the monolith changes rows the target holds and rows it does not.
    src.batch_execute(changes).await.unwrap();
    let mut child = spawn_daemon(&config, &log);
    env.wait_slot().await;
    for t in tables {
        env.wait_equal("clinic", t).await;
    }
    wait_until("keys set aside back", Duration::from_secs(60), || async {
        key_state(&env, "").await.1 == 0
    })
    .await;
    let after = row_versions(&env, key).await;
    let kept = before
        .iter()
        .filter(|(id, xmin)| after.get(*id) == Some(xmin))
        .count();
    assert!(
        kept * 10 >= before.len() * 9,
        "only {kept} of the {} rows already copied were kept",
        before.len()
    );
    assert_ne!(
        before.get(changed),
        after.get(changed),
        "the changed row's range was copied again"
    );
    terminate(&mut child);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("zq"), "log leaks values");
    assert!(text.contains("resumed"), "the resume was logged");
    (env, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_copy_keeps_the_key_ranges_the_target_already_holds() {
    // Another table references visits: its foreign key is set aside for the resume (emptying
    // a range that differs must not fail or cascade), then comes back.
    let (env, log) = resume_keeps_ranges(
        "CREATE TABLE visits (id bigint PRIMARY KEY, patient bigint, note text);
         CREATE TABLE visit_codes (id bigint PRIMARY KEY, visit_id bigint REFERENCES visits, code text);",
        &["visits", "visit_codes"],
        "INSERT INTO visits SELECT g, g % 1000, 'zqnote' || g FROM generate_series(1, 400000) g;
         INSERT INTO visit_codes SELECT g, g * 7, 'zqcode' FROM generate_series(1, 1000) g;",
        "UPDATE visits SET note = 'zqchanged' WHERE id IN (5, 390000);
         DELETE FROM visits WHERE id = 20005;
         INSERT INTO visits VALUES (500000, 1, 'zqnew');",
        "id::text",
        "5",
    )
    .await;
    assert!(
        log.contains("foreign key set aside"),
        "the key referencing visits was set aside"
    );
    wait_until(
        "the key back and validated",
        Duration::from_secs(60),
        || async { key_state(&env, "visit_codes_visit_id_fkey").await == (Some(true), 0) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_copy_keeps_the_ranges_of_a_composite_text_key() {
    resume_keeps_ranges(
        "CREATE TABLE visits (ward text, n int, note text, PRIMARY KEY (ward, n));",
        &["visits"],
        "INSERT INTO visits SELECT 'ward' || lpad((g / 10000)::text, 2, '0'), g % 10000, 'zqnote' || g
             FROM generate_series(0, 399999) g;",
        "UPDATE visits SET note = 'zqchanged' WHERE (ward, n) IN (('ward00', 5), ('ward39', 7));
         DELETE FROM visits WHERE (ward, n) = ('ward02', 5);
         INSERT INTO visits VALUES ('ward99', 1, 'zqnew'), ('ward00x', 1, 'zqnew');",
        "ward || '/' || n",
        "ward00/5",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_copy_of_a_partitioned_table_keeps_the_partitions_already_copied() {
    // Twelve monthly partitions, one chunk each; January is small and changes meanwhile.
    resume_keeps_ranges(
        "CREATE TABLE visits (id bigint, taken date NOT NULL, note text, PRIMARY KEY (id, taken))
             PARTITION BY RANGE (taken);
CREATE TABLE visits_01 PARTITION OF visits FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
CREATE TABLE visits_02 PARTITION OF visits FOR VALUES FROM ('2024-02-01') TO ('2024-03-01');
CREATE TABLE visits_03 PARTITION OF visits FOR VALUES FROM ('2024-03-01') TO ('2024-04-01');
CREATE TABLE visits_04 PARTITION OF visits FOR VALUES FROM ('2024-04-01') TO ('2024-05-01');
CREATE TABLE visits_05 PARTITION OF visits FOR VALUES FROM ('2024-05-01') TO ('2024-06-01');
CREATE TABLE visits_06 PARTITION OF visits FOR VALUES FROM ('2024-06-01') TO ('2024-07-01');
CREATE TABLE visits_07 PARTITION OF visits FOR VALUES FROM ('2024-07-01') TO ('2024-08-01');
CREATE TABLE visits_08 PARTITION OF visits FOR VALUES FROM ('2024-08-01') TO ('2024-09-01');
CREATE TABLE visits_09 PARTITION OF visits FOR VALUES FROM ('2024-09-01') TO ('2024-10-01');
CREATE TABLE visits_10 PARTITION OF visits FOR VALUES FROM ('2024-10-01') TO ('2024-11-01');
CREATE TABLE visits_11 PARTITION OF visits FOR VALUES FROM ('2024-11-01') TO ('2024-12-01');
CREATE TABLE visits_12 PARTITION OF visits FOR VALUES FROM ('2024-12-01') TO ('2025-01-01');",
        &["visits"],
        "INSERT INTO visits SELECT g, date '2024-01-01' + (g % 28), 'zqnote' FROM generate_series(1, 1000) g;
         INSERT INTO visits SELECT g, (date '2024-01-01' + make_interval(months => 1 + (g - 1001) / 20000))::date,
             'zqnote' || g FROM generate_series(1001, 221000) g;",
        "UPDATE visits SET note = 'zqchanged' WHERE id = 5;
         DELETE FROM visits WHERE id = 200000;
         INSERT INTO visits VALUES (300000, '2024-12-15', 'zqnew');",
        "id || '/' || taken",
        "5/2024-01-06",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_copy_that_a_service_table_references_is_never_emptied_under_it() {
    let env = Env::new(
        "CREATE TABLE visits (id bigint PRIMARY KEY, note text);",
        &[("clinic", &["visits"])],
    )
    .await;
    let src = env.source().await;
    src.batch_execute(
        "INSERT INTO visits SELECT g, 'zqnote' FROM generate_series(1, 200000) g; ANALYZE visits;",
    )
    .await
    .unwrap();
    // The service's own table (not routed) references visits, with rows.
    let clinic = env.target("clinic").await;
    clinic
        .batch_execute(
            "CREATE TABLE local_flags (id int PRIMARY KEY, visit_id bigint REFERENCES visits ON DELETE CASCADE)",
        )
        .await
        .unwrap();
    let (_dir, config, log) = killed_mid_copy(&env, 4).await;
    clinic
        .batch_execute("INSERT INTO local_flags SELECT 1, min(id) FROM visits")
        .await
        .unwrap();
    let mut child = spawn_daemon(&config, &log);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "the copy stops");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("public.local_flags there reference it"),
        "the log names the referencing table"
    );
    assert!(!text.contains("zq"), "log leaks values");
    let kept: i64 = clinic
        .query_one("SELECT count(*) FROM local_flags", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "the service's row is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_a_target_that_orders_the_key_otherwise_copies_the_table_again_whole() {
    let env = Env::new(
        "CREATE TABLE visits (code text PRIMARY KEY, note text);",
        &[("clinic", &["visits"])],
    )
    .await;
    // The monolith sorts in C ('B…' before 'a…'), the service in ICU ('a…' before 'B…').
    env.target("clinic")
        .await
        .batch_execute("ALTER TABLE visits ALTER COLUMN code TYPE text COLLATE \"und-x-icu\"")
        .await
        .unwrap();
    let src = env.source().await;
    src.batch_execute(
        "INSERT INTO visits SELECT CASE WHEN g % 2 = 0 THEN 'a' ELSE 'B' END || lpad(g::text, 7, '0'), 'zqnote'
             FROM generate_series(1, 200000) g;
         ANALYZE visits;",
    )
    .await
    .unwrap();
    let (_dir, config, log) = killed_mid_copy(&env, 4).await;
    src.batch_execute(
        "UPDATE visits SET note = 'zqchanged' WHERE code IN ('B0000001', 'a0000002');
         DELETE FROM visits WHERE code = 'B0000003';",
    )
    .await
    .unwrap();
    let mut child = spawn_daemon(&config, &log);
    env.wait_slot().await;
    env.wait_equal("clinic", "visits").await;
    terminate(&mut child);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("zq"), "log leaks values");
    assert!(
        text.contains("cannot compare the table's ranges as the source cuts them"),
        "the order check caught it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_routed_away_and_back_is_never_streamed_on_from_where_it_stopped() {
    let env = Env::new(
        "CREATE TABLE notes (id int PRIMARY KEY, v text);
         CREATE TABLE labs (id int PRIMARY KEY, v text);",
        &[("svc", &["notes", "labs"])],
    )
    .await;
    let src = env.source().await;
    src.batch_execute("INSERT INTO notes VALUES (1, 'zq'); INSERT INTO labs VALUES (1, 'zq')")
        .await
        .unwrap();
    let daemon = env.start().await;
    env.wait_equal("svc", "labs").await;
    daemon.stop().await;
    // Routed away: the target no longer receives its changes.
    let mut env = env;
    env.targets[0].tables = vec!["notes".into()];
    let daemon = env.start().await;
    src.batch_execute("INSERT INTO labs VALUES (2, 'zq')")
        .await
        .unwrap();
    env.wait_equal("svc", "notes").await;
    daemon.stop().await;
    // Routed back: not streamed on from its old position (row 2 would be missing for good).
    env.targets[0].tables = vec!["notes".into(), "labs".into()];
    let err = env.start_error().await;
    assert!(
        err.contains("table public.labs already holds rows that pgcarve did not copy"),
        "{err}"
    );
    // Emptied, it is copied anew.
    env.target("svc")
        .await
        .batch_execute("TRUNCATE labs")
        .await
        .unwrap();
    let daemon = env.start().await;
    env.wait_equal("svc", "labs").await;
    daemon.stop().await;
}
