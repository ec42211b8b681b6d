//! What a person looks at: `GET /status`, `pgcarve status`, and the status page `GET /` as a
//! real headless browser renders it (Debian's chromium, `--dump-dom` after its script ran).

use std::time::Duration;

use crate::common::{metric, pgcarve_command_with, start_daemon, wait_until, Env};

fn with_listen(env: &Env) -> (String, u16) {
    let port = pgcarve::localpg::free_port().expect("a free port");
    let config = env
        .config()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    (config, port)
}

/// Runs chromium headless on `url` and returns the DOM after its scripts ran; `None` without
/// chromium.
fn rendered(url: &str) -> Option<String> {
    let bin = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("run chromium");
    Some(String::from_utf8_lossy(&out.stdout).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_json_and_command_show_what_runs() {
    let env = Env::new(
        "CREATE TABLE notes (id int PRIMARY KEY, v text);
         CREATE TABLE claims (id int PRIMARY KEY, amount numeric);",
        &[("clinic", &["notes"]), ("billing", &["claims"])],
    )
    .await;
    let src = env.source().await;
    src.batch_execute("INSERT INTO claims SELECT g, g FROM generate_series(1, 500) g")
        .await
        .unwrap();
    for t in ["clinic", "billing"] {
        env.target(t)
            .await
            .batch_execute("TRUNCATE notes, claims")
            .await
            .unwrap();
    }
    let (config, port) = with_listen(&env);
    let daemon = start_daemon(&config);
    env.wait_slot().await;
    src.batch_execute("INSERT INTO notes SELECT g, 'zqnote' FROM generate_series(1, 50) g")
        .await
        .unwrap();
    env.wait_equal("clinic", "notes").await;
    assert!(
        metric(
            &daemon,
            "migration_apply_batch_seconds_count",
            &[("target", "clinic")]
        ) >= 1.0
    );
    assert_eq!(
        metric(
            &daemon,
            "migration_target_state",
            &[("target", "clinic"), ("state", "streaming")]
        ),
        1.0
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // /status: the health report with each target's counts.
    let mut status = serde_json::Value::Null;
    wait_until("rows in /status", Duration::from_secs(30), || {
        status = pgcarve::status::fetch(addr).unwrap();
        let rows = status["targets"]["clinic"]["rows_applied"].as_u64();
        async move { rows == Some(50) }
    })
    .await;
    assert_eq!(status["status"], "healthy", "{status}");
    assert_eq!(status["targets"]["billing"]["errors"], 0);
    assert_eq!(status["copy"][0]["table"], "public.claims");
    assert_eq!(status["copy"][0]["rows"], 500);

    // pgcarve status: the same on one screen.
    let (code, out) = pgcarve_command_with(&config, &["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("pgcarve healthy: phase streaming"), "{out}");
    assert!(out.contains("clinic") && out.contains("billing"), "{out}");
    assert!(out.contains("initial copy: 2/2 tables copied"), "{out}");

    // The page, as a browser shows it after its script ran.
    if let Some(dom) = rendered(&format!("http://127.0.0.1:{port}/")) {
        assert!(dom.contains("class=\"badge healthy\""), "{dom}");
        assert!(dom.contains("phase streaming"), "{dom}");
        assert!(
            dom.contains("<td>clinic</td>") && dom.contains("<td>billing</td>"),
            "{dom}"
        );
        assert!(dom.contains("<td>public.claims</td>"), "{dom}");
        assert!(dom.contains(">500<"), "the copied rows: {dom}");
        assert!(!dom.contains("zq"));
    } else {
        eprintln!("chromium not installed: the page was not rendered (apt-get install chromium)");
    }
    daemon.stop().await;

    // Stopped: nothing answers; status says so and exits 2.
    let (code, out) = pgcarve_command_with(&config, &["status"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no pgcarve answers at"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_the_page_follow_a_first_copy_into_streaming() {
    let env = Env::new(
        "CREATE TABLE notes (id int PRIMARY KEY);
         INSERT INTO notes SELECT generate_series(1, 100);",
        &[("svc", &["notes"])],
    )
    .await;
    let target = env.target("svc").await;
    target.batch_execute("TRUNCATE notes").await.unwrap();
    // The first copy waits on a lock the test holds.
    let mut locker = env.target("svc").await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE notes IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let (config, port) = with_listen(&env);
    let daemon = start_daemon(&config);
    let health = || async {
        let (code, body) = daemon.obs.health.report();
        (code, body)
    };
    // Copying, with the table's progress published (once a second).
    wait_until("phase copying", Duration::from_secs(30), || async {
        let h = health().await.1;
        h["phase"] == "copying" && h["copy"].as_array().is_some_and(|c| !c.is_empty())
    })
    .await;
    let (code, body) = health().await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("degraded")),
        "{body}"
    );
    if let Some(dom) = rendered(&format!("http://127.0.0.1:{port}/")) {
        assert!(dom.contains("class=\"badge degraded\""), "{dom}");
        assert!(dom.contains("phase copying"), "{dom}");
        assert!(dom.contains("<td>public.notes</td>"), "{dom}");
    }
    lock.rollback().await.unwrap();
    env.wait_slot().await;
    wait_until("healthy", Duration::from_secs(30), || async {
        health().await.1["status"] == "healthy"
    })
    .await;
    let (code, body) = health().await;
    assert_eq!(
        (code, body["phase"].as_str()),
        (200, Some("streaming")),
        "{body}"
    );
    if let Some(dom) = rendered(&format!("http://127.0.0.1:{port}/")) {
        assert!(dom.contains("class=\"badge healthy\""), "{dom}");
        assert!(dom.contains("phase streaming"), "{dom}");
    }
    env.wait_equal("svc", "notes").await;
    daemon.stop().await;
}
