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
