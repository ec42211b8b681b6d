//! `pgcarve demo`: a throwaway PostgreSQL cluster holding a small healthcare monolith (`care`)
//! and nine service databases, the daemon streaming between them in-process, a concurrent
//! workload on the monolith, live progress, and a final table-by-table comparison.
//!
//! Everything is synthetic (`Patient 000123`, `MRN-…`); progress lines show counts only, never
//! row values. The cluster lives on a dedicated thread (the server dies with the thread that
//! started it) and is removed at the end, also after Ctrl-C.

mod compare;
mod fixtures;
mod workload;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use prometheus::core::Collector;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::daemon::{DaemonError, Observability};
use crate::localpg::{Cluster, ClusterOptions};
use compare::compare;
use fixtures::{
    config_text, monolith_schema, service_schema, HISTORY, MONOLITH, SEED, SERVICES, SESSIONS,
    SLOT, TABLES,
};
use workload::{session, Stats};

/// Connects to a database of the demo cluster (local, no TLS).
async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Starts the cluster on a thread that never exits (the server gets SIGQUIT when the thread
/// that started it exits); the cluster itself is returned and removed when dropped.
async fn start_cluster() -> anyhow::Result<Cluster> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pgcarve-demo-cluster".into())
        .spawn(move || {
            let _ = tx.send(Cluster::start(&ClusterOptions::default()));
            loop {
                std::thread::park();
            }
        })
        .context("spawn the cluster thread")?;
    rx.await
        .context("cluster thread ended")?
        .context("start a throwaway PostgreSQL cluster")
}

/// Runs the demo: `seconds` of workload, then verification; with `keep`, waits for Ctrl-C
/// before removing the cluster.
pub async fn run(seconds: u64, keep: bool) -> anyhow::Result<()> {
    if crate::localpg::find_bindir().is_none() {
        bail!("{}", crate::localpg::INSTALL_HINT);
    }
    let interrupt = CancellationToken::new();
    {
        let interrupt = interrupt.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupt.cancel();
            }
        });
    }
    crate::localpg::reap_stale_dirs();
    let started = Instant::now();
    println!("starting a throwaway PostgreSQL cluster ...");
    let cluster = start_cluster().await?;
    println!(
        "cluster up on 127.0.0.1:{} ({:.1}s)",
        cluster.port,
        started.elapsed().as_secs_f64()
    );
    let result = with_cluster(&cluster, seconds, keep, &interrupt).await;
    println!("removing the cluster ...");
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .context("remove the cluster")?;
    result
}

async fn with_cluster(
    cluster: &Cluster,
    seconds: u64,
    keep: bool,
    interrupt: &CancellationToken,
) -> anyhow::Result<()> {
    // Databases and schemas.
    let admin = connect(&cluster.url("postgres")).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {MONOLITH}"))
        .await
        .context("create the monolith database")?;
    connect(&cluster.url(MONOLITH))
        .await?
        .batch_execute(&monolith_schema())
        .await
        .context("create the monolith schema")?;
    for svc in SERVICES {
        admin
            .batch_execute(&format!("CREATE DATABASE {}", svc.db))
            .await
            .with_context(|| format!("create database {}", svc.db))?;
        connect(&cluster.url(svc.db))
            .await?
            .batch_execute(&service_schema(svc))
            .await
            .with_context(|| format!("create the schema of {}", svc.db))?;
    }
    drop(admin);
    connect(&cluster.url(MONOLITH))
        .await?
        .batch_execute(&format!("BEGIN; {SEED} {HISTORY} COMMIT;"))
        .await
        .context("write the monolith's history")?;
    println!(
        "monolith `{MONOLITH}`: {} tables holding 160,000 rows; {} service databases",
        TABLES.len(),
        SERVICES.len()
    );

    // The daemon.
    let metrics_port = crate::localpg::free_port().context("pick a port for /metrics")?;
    let settings = crate::config::Config::from_toml(&config_text(cluster, metrics_port))
        .context("demo config")?
        .validate()
        .context("demo config")?;
    let obs = Observability::default();
    let shutdown = CancellationToken::new();
    let mut daemon = Some(tokio::spawn(crate::daemon::run(
        settings,
        obs.clone(),
        shutdown.clone(),
    )));
    println!("metrics: http://127.0.0.1:{metrics_port}/metrics   health: http://127.0.0.1:{metrics_port}/health");

    let result = with_daemon(cluster, seconds, keep, interrupt, &obs, &mut daemon).await;

    shutdown.cancel();
    let stopped = match daemon.take() {
        None => Ok(()), // already stopped and reported
        Some(handle) => match tokio::time::timeout(Duration::from_secs(60), handle).await {
            Ok(Ok(r)) => r.map_err(anyhow::Error::from),
            Ok(Err(e)) => Err(anyhow!("daemon task: {e}")),
            Err(_) => Err(anyhow!("the daemon did not stop within 60 s")),
        },
    };
    result?;
    stopped.context("daemon")
}

type DaemonTask = Option<tokio::task::JoinHandle<Result<(), DaemonError>>>;

/// The daemon's exit, if it already stopped (a start-up refusal, for example).
async fn daemon_exit(daemon: &mut DaemonTask) -> Option<anyhow::Error> {
    if !daemon.as_ref().is_some_and(|h| h.is_finished()) {
        return None;
    }
    Some(match daemon.take()?.await {
        Ok(Ok(())) => anyhow!("the daemon stopped unexpectedly"),
        Ok(Err(e)) => anyhow!("the daemon stopped: {e}"),
        Err(e) => anyhow!("daemon task: {e}"),
    })
}

async fn with_daemon(
    cluster: &Cluster,
    seconds: u64,
    keep: bool,
    interrupt: &CancellationToken,
    obs: &Observability,
    daemon: &mut DaemonTask,
) -> anyhow::Result<()> {
    // Wait for streaming.
    let care = connect(&cluster.url(MONOLITH)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_print = Instant::now();
    loop {
        let active = care
            .query_opt(crate::source::catalog::SLOT_STREAMING_SQL, &[&SLOT])
            .await?
            .is_some();
        if active {
            break;
        }
        if let Some(e) = daemon_exit(daemon).await {
            return Err(e);
        }
        if interrupt.is_cancelled() {
            bail!("interrupted before streaming started");
        }
        if Instant::now() > deadline {
            bail!("the daemon did not start streaming within 60 s");
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            print_copy(obs);
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    print_copy(obs);
    println!("slot {SLOT} active; running the workload for {seconds}s from {SESSIONS} sessions");

    // Workload and progress.
    let stats = Arc::new(Stats::default());
    let t0 = Instant::now();
    let progress_stop = CancellationToken::new();
    let progress = tokio::spawn(progress_loop(
        t0,
        stats.clone(),
        obs.clone(),
        progress_stop.clone(),
    ));
    let stop = interrupt.child_token();
    let mut sessions = Vec::new();
    for n in 0..SESSIONS {
        let client = connect(&cluster.url(MONOLITH)).await?;
        sessions.push(tokio::spawn(session(
            n,
            client,
            stats.clone(),
            stop.clone(),
        )));
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
        _ = interrupt.cancelled() => println!("interrupted: stopping the workload"),
    }
    stop.cancel();
    let mut workload_error = None;
    for s in sessions {
        match s.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => workload_error = Some(e),
            Err(e) => workload_error = Some(anyhow!("workload task: {e}")),
        }
    }
    println!(
        "workload done: {} transactions committed, {} rolled back on purpose, {} failed and rolled back",
        stats.committed.load(Ordering::Relaxed),
        stats.rolled_back.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed)
    );
    if let Some(e) = workload_error.filter(|_| !interrupt.is_cancelled()) {
        progress_stop.cancel();
        let _ = progress.await;
        return Err(e.context("workload"));
    }

    // Verification.
    println!("waiting for every service database to equal the monolith ...");
    let wait = if interrupt.is_cancelled() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(60)
    };
    let deadline = Instant::now() + wait;
    let report = loop {
        let report = compare(cluster, &care).await;
        if interrupt.is_cancelled() {
            if let Err(e) = &report {
                // A Ctrl-C in a terminal reaches the server too (same process group).
                progress_stop.cancel();
                let _ = progress.await;
                println!(
                    "interrupted: the databases cannot be compared any more ({e:#}); nothing verified"
                );
                return Ok(());
            }
        }
        let done = matches!(&report, Ok(r) if r.iter().all(|t| t.equal));
        if done || Instant::now() > deadline {
            break report;
        }
        if let Some(e) = daemon_exit(daemon).await {
            progress_stop.cancel();
            let _ = progress.await;
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    progress_stop.cancel();
    let _ = progress.await;
    let report = report?;
    println!();
    println!("{:<12} {:<34} {:>8}  result", "target", "tables", "rows");
    for t in &report {
        println!(
            "{:<12} {:<34} {:>8}  {}",
            t.target,
            t.tables,
            t.rows,
            if t.equal { "equal ✓" } else { "DIFFERENT" }
        );
    }
    let different: Vec<&str> = report
        .iter()
        .filter(|t| !t.equal)
        .map(|t| t.target)
        .collect();
    println!(
        "total {:.1}s; applied {} rows from {} source transactions (counted once per target)",
        t0.elapsed().as_secs_f64(),
        rows_by_target(obs).values().sum::<u64>(),
        obs.metrics
            .transactions_applied
            .collect()
            .iter()
            .flat_map(|mf| mf.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum::<u64>()
    );

    if keep && !interrupt.is_cancelled() {
        println!();
        println!("{:<13} {}", "monolith:", cluster.url(MONOLITH));
        for svc in SERVICES {
            println!("{:<13} {}", format!("{}:", svc.target), cluster.url(svc.db));
        }
        println!("the daemon keeps streaming; press Ctrl-C to stop and remove everything");
        interrupt.cancelled().await;
    }
    if !different.is_empty() {
        bail!(
            "service databases differ from the monolith: {}",
            different.join(", ")
        );
    }
    if interrupt.is_cancelled() && !keep {
        println!("(the workload was interrupted early)");
    }
    Ok(())
}

/// Rows applied per target, summed over tables and operations.
/// One line of copy progress, while the initial copy runs.
fn print_copy(obs: &Observability) {
    let (_, health) = obs.health.report();
    let Some(tables) = health["copy"].as_array().filter(|t| !t.is_empty()) else {
        return;
    };
    let sum = |k: &str| tables.iter().filter_map(|t| t[k].as_u64()).sum::<u64>();
    let done = tables.iter().filter(|t| t["state"] == "copied").count();
    println!(
        "initial copy: {} of ~{} rows, {done}/{} tables copied",
        sum("rows"),
        sum("estimate"),
        tables.len()
    );
}

fn rows_by_target(obs: &Observability) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for mf in obs.metrics.rows_applied.collect() {
        for m in mf.get_metric() {
            if let Some(l) = m.get_label().iter().find(|l| l.name() == "target") {
                *out.entry(l.value().to_string()).or_default() +=
                    m.get_counter().get_value() as u64;
            }
        }
    }
    out
}

async fn progress_loop(
    t0: Instant,
    stats: Arc<Stats>,
    obs: Observability,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rows = rows_by_target(&obs);
        let applied: Vec<String> = SERVICES
            .iter()
            .map(|s| format!("{}={}", s.target, rows.get(s.target).copied().unwrap_or(0)))
            .collect();
        println!(
            "[{:>4}s] source txns {:>6} | applied rows {} | lag={:.2}s",
            t0.elapsed().as_secs(),
            stats.committed.load(Ordering::Relaxed),
            applied.join(" "),
            obs.metrics.lag_seconds.get()
        );
    }
}
