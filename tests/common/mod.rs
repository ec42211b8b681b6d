//! The one shared test helper: throwaway clusters, fresh databases, connections, waiting.
//!
//! One source cluster and one target cluster per test binary, started once (from a thread that
//! lives as long as the binary, because the servers die with the thread that started them);
//! every test makes its own databases in them.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgcarve::localpg::{Cluster, ClusterOptions};
use tokio_postgres::{Client, NoTls};

/// The shared clusters.
pub struct Clusters {
    /// Plays the monolith.
    pub source: Cluster,
    /// Holds the service databases.
    pub target: Cluster,
}

static CLUSTERS: OnceLock<Clusters> = OnceLock::new();

/// Starts `make` on a thread that never exits, so the servers it starts live as long as the test
/// binary and die with it.
pub fn start_on_keeper_thread<T: Send + 'static>(make: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        tx.send(make()).expect("send cluster");
        loop {
            std::thread::park();
        }
    });
    rx.recv().expect("keeper thread")
}

/// The shared source and target clusters of this test binary.
pub fn clusters() -> &'static Clusters {
    CLUSTERS.get_or_init(|| {
        pgcarve::localpg::reap_stale_dirs();
        start_on_keeper_thread(|| {
            let source = Cluster::start(&ClusterOptions::default()).expect("start source cluster");
            let target = Cluster::start(&ClusterOptions::default()).expect("start target cluster");
            Clusters { source, target }
        })
    })
}

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A unique name for a database or slot.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    )
}

/// Connects with tokio-postgres (no TLS) and drives the connection in the background.
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Creates a fresh database in `cluster` and returns its name.
pub async fn fresh_db(cluster: &Cluster, prefix: &str) -> String {
    let name = unique(prefix);
    let admin = connect(&cluster.url("postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    name
}

/// Polls `check` until it returns true, panicking with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A whole table as sorted row texts, for comparing source and target.
pub async fn table_rows(client: &Client, table: &str) -> Vec<String> {
    let rows = client
        .query(&format!("SELECT t::text FROM {table} t ORDER BY 1"), &[])
        .await
        .unwrap_or_else(|e| panic!("read {table}: {e}"));
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

/// A daemon running in-process, stopped by `stop`.
pub struct Daemon {
    /// Cancel to stop.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The daemon task.
    pub handle: tokio::task::JoinHandle<Result<(), pgcarve::daemon::DaemonError>>,
    /// Its metrics and health.
    pub obs: pgcarve::daemon::Observability,
}

impl Daemon {
    /// Requests shutdown and waits for a clean stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle
            .await
            .expect("daemon task")
            .expect("daemon stopped with an error");
    }
}

/// The sum of a metric's series whose labels include `labels`, as the daemon renders it.
pub fn metric(daemon: &Daemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = daemon.obs.metrics.render();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Starts the daemon in-process from a TOML config.
pub fn start_daemon(toml: &str) -> Daemon {
    init_logging();
    let settings = pgcarve::config::Config::from_toml(toml)
        .expect("parse config")
        .validate()
        .expect("valid config");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let obs = pgcarve::daemon::Observability::default();
    let handle = tokio::spawn(pgcarve::daemon::run(
        settings,
        obs.clone(),
        shutdown.clone(),
    ));
    Daemon {
        shutdown,
        handle,
        obs,
    }
}

/// Sends the daemon's log to the test's captured output (shown when a test fails), at the level
/// `PGCARVE_TEST_LOG` names (default `info`).
pub fn init_logging() {
    let filter = std::env::var("PGCARVE_TEST_LOG").unwrap_or_else(|_| "info".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// One service database of an [`Env`].
pub struct EnvTarget {
    /// Target name in the config.
    pub name: String,
    /// Database name.
    pub db: String,
    /// Its URL.
    pub url: String,
    /// Tables it owns.
    pub tables: Vec<String>,
}

/// A source database and target databases with the same schema, and a config routing tables.
pub struct Env {
    /// Source database name.
    pub source_db: String,
    /// The service databases.
    pub targets: Vec<EnvTarget>,
    /// Slot and publication name.
    pub slot: String,
}

impl Env {
    /// Creates the databases and runs `schema` on the source and on every target (in the
    /// shared target cluster).
    pub async fn new(schema: &str, targets: &[(&str, &[&str])]) -> Env {
        Env::on_cluster(schema, targets, &clusters().target).await
    }

    /// As [`Env::new`], with the target databases in `target_cluster`.
    pub async fn on_cluster(
        schema: &str,
        targets: &[(&str, &[&str])],
        target_cluster: &Cluster,
    ) -> Env {
        let c = clusters();
        let source_db = fresh_db(&c.source, "src").await;
        connect(&c.source.url(&source_db))
            .await
            .batch_execute(schema)
            .await
            .expect("source schema");
        let mut out = Vec::new();
        for (name, tables) in targets {
            let db = fresh_db(target_cluster, name).await;
            let url = target_cluster.url(&db);
            connect(&url)
                .await
                .batch_execute(schema)
                .await
                .expect("target schema");
            out.push(EnvTarget {
                name: name.to_string(),
                db,
                url,
                tables: tables.iter().map(|t| t.to_string()).collect(),
            });
        }
        Env {
            source_db,
            targets: out,
            slot: unique("slot"),
        }
    }

    /// Starts the daemon on this environment's config and waits until it streams from its slot.
    pub async fn start(&self) -> Daemon {
        let daemon = start_daemon(&self.config());
        self.wait_slot().await;
        daemon
    }

    /// Runs the daemon on this environment's config, expecting it to refuse to start; returns
    /// the error.
    pub async fn start_error(&self) -> String {
        let settings = pgcarve::config::Config::from_toml(&self.config())
            .expect("parse config")
            .validate()
            .expect("valid config");
        pgcarve::daemon::run(
            settings,
            Default::default(),
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect_err("the daemon should refuse to start")
        .to_string()
    }

    /// The daemon config for this environment.
    pub fn config(&self) -> String {
        let mut s = format!(
            "[source]\nurl = {:?}\nslot = {:?}\npublication = {:?}\n\n[metrics]\nlisten = \"\"\n\n[apply]\nretry_initial_secs = 0.2\nretry_max_secs = 1.0\n",
            clusters().source.url(&self.source_db),
            self.slot,
            self.slot
        );
        for t in &self.targets {
            s.push_str(&format!(
                "\n[targets.{}]\nurl = {:?}\ntables = {:?}\n",
                t.name, t.url, t.tables
            ));
        }
        s
    }

    /// A client on the source database.
    pub async fn source(&self) -> Client {
        connect(&clusters().source.url(&self.source_db)).await
    }

    /// A client on a target database.
    pub async fn target(&self, name: &str) -> Client {
        let t = self
            .targets
            .iter()
            .find(|t| t.name == name)
            .expect("target name");
        connect(&t.url).await
    }

    /// Waits until `table` on target `name` equals the source's.
    pub async fn wait_equal(&self, name: &str, table: &str) {
        let src = self.source().await;
        let dst = self.target(name).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let a = table_rows(&src, table).await;
            let b = table_rows(&dst, table).await;
            if a == b {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{table} on {name} differs from the source after 60 s: source {} rows, target {} rows",
                a.len(),
                b.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the daemon streams from its slot: changes committed from then on are its to
    /// apply (while the slot is still being created they may not be).
    pub async fn wait_slot(&self) {
        let src = self.source().await;
        let slot = self.slot.clone();
        wait_until("the slot streaming", Duration::from_secs(60), || {
            let (src, slot) = (&src, slot.clone());
            async move {
                src.query_opt(pgcarve::source::catalog::SLOT_STREAMING_SQL, &[&slot])
                    .await
                    .map(|r| r.is_some())
                    .unwrap_or(false)
            }
        })
        .await;
    }
}

/// Runs `pgcarve --config CONFIG run` as a child process, its log appended to `log`.
pub fn spawn_daemon(config: &std::path::Path, log: &std::path::Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_pgcarve"))
        .arg("--config")
        .arg(config)
        .arg("run")
        .env("PGCARVE_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn pgcarve")
}

/// Stops a `spawn_daemon` child with SIGTERM and asserts it exits 0 (a clean stop).
pub fn terminate(child: &mut std::process::Child) {
    // SAFETY: kill on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success(), "a clean stop exits 0");
}

/// SIGKILL, then reap.
pub fn kill9(child: &mut std::process::Child) {
    // SAFETY: kill on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// Runs `pgcarve --config <env's config> ARGS…` to the end: (exit code, stdout and stderr).
pub fn pgcarve_command(env: &Env, args: &[&str]) -> (i32, String) {
    pgcarve_command_with(&env.config(), args)
}

/// Runs `pgcarve --config <a file holding config> ARGS…` to the end: (exit code, stdout and
/// stderr).
pub fn pgcarve_command_with(config: &str, args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgcarve"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .output()
        .expect("run pgcarve");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
