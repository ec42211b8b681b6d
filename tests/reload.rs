//! SIGHUP on a running pgcarve: live keys change at once, a table added to a target is copied
//! and streamed after the stream restarts inside the process, other changes are named as
//! needing a restart, a broken file is rejected and the daemon runs on.

use std::time::Duration;

use crate::common::{spawn_daemon, wait_until, Env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_live_keys_names_the_rest_and_survives_a_broken_file() {
    let mut env = Env::new(
        "CREATE TABLE notes (id int PRIMARY KEY); CREATE TABLE more (id int PRIMARY KEY);",
        &[("svc", &["notes"])],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("daemon.toml");
    let log = dir.path().join("daemon.log");
    std::fs::write(&config, env.config()).unwrap();
    let mut child = spawn_daemon(&config, &log);
    env.wait_slot().await;
    let hup = |child: &std::process::Child| {
        // SAFETY: kill on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGHUP);
        }
    };
    let log_has = |text: &'static str| {
        let log = log.clone();
        move || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains(text)
            }
        }
    };

    // A live key and a key that needs a restart: the first applies now, the second is named.
    std::fs::write(
        &config,
        env.config()
            .replace("[source]\n", "[source]\nheartbeat_secs = 2\n")
            .replace("retry_max_secs = 1.0", "retry_max_secs = 2.0"),
    )
    .unwrap();
    hup(&child);
    wait_until(
        "the reload applied",
        Duration::from_secs(30),
        log_has("reload: applied"),
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("source.heartbeat_secs"), "{text}");
    assert!(
        text.contains("apply.retry_max_secs") && text.contains("take effect at the next restart"),
        "{text}"
    );

    // A table added to the target: the stream restarts with it, and it is copied (its rows
    // from before) and streamed, while the target's other table streams on.
    let src = env.source().await;
    src.batch_execute("INSERT INTO more SELECT g FROM generate_series(1, 500) g")
        .await
        .unwrap();
    env.targets[0].tables.push("more".into());
    std::fs::write(
        &config,
        env.config()
            .replace("[source]\n", "[source]\nheartbeat_secs = 2\n"),
    )
    .unwrap();
    hup(&child);
    wait_until(
        "the stream restarted with the new table",
        Duration::from_secs(30),
        log_has("starting again with the reloaded table lists"),
    )
    .await;
    src.batch_execute("INSERT INTO more VALUES (501); INSERT INTO notes VALUES (2)")
        .await
        .unwrap();
    env.wait_equal("svc", "more").await;
    env.wait_equal("svc", "notes").await;

    // A broken file: rejected, and the daemon streams on.
    std::fs::write(&config, "[source]\nurl = 12\n").unwrap();
    hup(&child);
    wait_until(
        "the broken file rejected",
        Duration::from_secs(30),
        log_has("the running config stays"),
    )
    .await;
    env.source()
        .await
        .batch_execute("INSERT INTO notes VALUES (1)")
        .await
        .unwrap();
    env.wait_equal("svc", "notes").await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon is still running"
    );
    // SAFETY: kill on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success());
    // Not a terminal: plain log lines, no colour codes.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a non-terminal log"
    );
}
