//! systemd notification on a real run: READY=1 once the pipeline runs, STATUS= lines with the
//! phase, WATCHDOG=1 while the loops work — received on our own notification socket.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::common::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_status_and_watchdog_reach_systemd() {
    let env = Env::new(
        "CREATE TABLE notes (id int PRIMARY KEY, v text);
         INSERT INTO notes SELECT g, 'zq' FROM generate_series(1, 100) g;",
        &[("svc", &["notes"])],
    )
    .await;
    // The target's copy of the schema holds no rows.
    env.target("svc")
        .await
        .batch_execute("TRUNCATE notes")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("daemon.toml");
    std::fs::write(&config, env.config()).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgcarve"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn pgcarve");
    let mut got: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        let ready = got.iter().any(|m| m == "READY=1");
        let streaming = got.iter().any(|m| m.starts_with("STATUS=streaming"));
        let pings = got.iter().filter(|m| *m == "WATCHDOG=1").count();
        if ready && streaming && pings >= 2 {
            break;
        }
    }
    // SAFETY: kill on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(got.iter().filter(|m| *m == "READY=1").count(), 1, "{got:?}");
    assert!(
        got.iter().any(|m| m.starts_with("STATUS=copying: 100 of")),
        "the copy's progress: {got:?}"
    );
    assert!(
        got.iter().any(|m| m.starts_with("STATUS=streaming; lag")),
        "{got:?}"
    );
    assert!(
        got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2,
        "{got:?}"
    );
    let ready_at = got.iter().position(|m| m == "READY=1").unwrap();
    let streaming_at = got
        .iter()
        .position(|m| m.starts_with("STATUS=streaming"))
        .unwrap();
    assert!(ready_at < streaming_at, "READY before streaming: {got:?}");
}
