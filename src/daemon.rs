//! `pgcarve run`: start-up checks, then the reader and one apply task per target until shutdown.
//!
//! Start-up, in order, collecting every problem an operator must fix before failing:
//! 1. the source: `wal_level`, routed tables (exist, not partitions, usable replica identity);
//! 2. the targets: reachable (retried with backoff), owned tables and columns present, progress
//!    table created and read;
//! 3. the publication (created, or routed tables added) and the slot: a missing slot while a
//!    target holds progress is a gap in history, so we refuse to start instead of creating one.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::apply::progress::ProgressKey;
use crate::apply::{StartError, Worker};
use crate::config::{Config, Settings};
use crate::health::Health;
use crate::link::{TargetState, TargetStatus};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::pg::safe_pg_error;
use crate::route::Router;
use crate::source::catalog;
use crate::source::conn::ReplicationConn;
use crate::source::reader::{Reader, TargetLink};
use crate::tls::TlsConnector;

/// Why the daemon stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Problems an operator must fix, one per line.
    #[error("cannot start:\n  - {}", .0.join("\n  - "))]
    Startup(Vec<String>),
    /// Streaming failed for good.
    #[error("stopped: {0}")]
    Reader(#[from] crate::source::reader::ReaderError),
}

/// Handles a running daemon exposes (tests read metrics and health in-process).
#[derive(Clone, Default)]
pub struct Observability {
    /// Metrics registry.
    pub metrics: Metrics,
    /// Health state.
    pub health: Health,
}

/// Loads and checks the config file (before the runtime exists: it says how many threads).
pub fn load_settings(path: &Path) -> anyhow::Result<Settings> {
    Ok(Config::load(path)?.validate()?)
}

/// Runs until SIGINT or SIGTERM.
pub async fn run_until_signal(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining");
        signal.cancel();
    });
    run(settings, Observability::default(), shutdown).await?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Retries `f` with backoff while it fails transiently; gives up on shutdown.
async fn with_retry<T, F, Fut>(what: &str, shutdown: &CancellationToken, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut attempts = 0u32;
    loop {
        match f().await {
            Ok(v) => return Some(v),
            Err(reason) => {
                attempts = attempts.saturating_add(1);
                let delay = crate::backoff::backoff(0.5, 30.0, attempts);
                tracing::warn!(
                    retry_in_secs = delay.as_secs_f64(),
                    "{what} failed, retrying: {reason}"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(
    settings: Settings,
    obs: Observability,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let Observability { metrics, health } = obs;
    let http = match settings.metrics_listen {
        Some(addr) => Some(
            crate::http::serve(addr, metrics.clone(), health.clone(), shutdown.clone())
                .await
                .map_err(|e| DaemonError::Startup(vec![format!("metrics.listen {addr}: {e}")]))?,
        ),
        None => None,
    };
    let result = run_inner(&settings, &metrics, &health, &shutdown).await;
    if let Err(e) = &result {
        health.set_fatal(e.to_string());
    }
    shutdown.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    result
}

async fn run_inner(
    settings: &Settings,
    metrics: &Metrics,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    let tls = TlsConnector::new(&settings.source)
        .map_err(|e| DaemonError::Startup(vec![format!("source: {e}")]))?;
    let router = Router::new(&settings.targets);
    let tables = router.tables();

    // 1. The source.
    let Some(client) = with_retry("connect to source", shutdown, || async {
        crate::pg::connect(&settings.source, &tls)
            .await
            .map_err(|e| {
                format!(
                    "{}: {}",
                    settings.source.display_target(),
                    safe_pg_error(&e)
                )
            })
    })
    .await
    else {
        return Ok(());
    };
    let catalog = catalog::preflight(&client, &tables)
        .await
        .map_err(DaemonError::Startup)?;

    // 2. The targets, concurrently.
    let wake = Arc::new(Notify::new());
    let mut prepared = Vec::new();
    let mut problems = Vec::new();
    let results = futures::future::join_all(settings.targets.iter().map(|t| {
        let wake = wake.clone();
        let catalog = &catalog;
        async move {
            let (status_tx, status_rx) = watch::channel(TargetStatus {
                committed: Lsn::ZERO,
                state: TargetState::Starting,
            });
            let key = ProgressKey {
                system_id: catalog.system_id.clone(),
                slot: settings.slot.clone(),
                target: t.name.clone(),
            };
            let outcome = with_retry(&format!("prepare target {}", t.name), shutdown, || {
                let (key, status_tx, wake) = (key.clone(), status_tx.clone(), wake.clone());
                async move {
                    match Worker::prepare(
                        t,
                        &catalog.columns,
                        key,
                        settings.apply.clone(),
                        metrics.clone(),
                        status_tx,
                        wake,
                    )
                    .await
                    {
                        Ok(w) => Ok(Ok(w)),
                        Err(StartError::Fatal(p)) => Ok(Err(p)),
                        Err(StartError::Transient(reason)) => Err(reason),
                    }
                }
            })
            .await;
            (t.name.clone(), outcome, status_rx)
        }
    }))
    .await;
    for (name, outcome, status_rx) in results {
        match outcome {
            Some(Ok((w, progress))) => prepared.push((name, w, progress, status_rx)),
            Some(Err(p)) => problems.extend(p),
            None => return Ok(()), // shutdown while retrying
        }
    }
    if !problems.is_empty() {
        return Err(DaemonError::Startup(problems));
    }

    // 3. Publication and slot.
    catalog::ensure_publication(&client, &settings.publication, &tables)
        .await
        .map_err(DaemonError::Startup)?;
    let slot = catalog::slot_info(&client, &settings.slot)
        .await
        .map_err(|e| {
            DaemonError::Startup(vec![format!("source: read slot: {}", safe_pg_error(&e))])
        })?;
    let confirmed = match slot {
        Some(s) => {
            let mut p = Vec::new();
            if s.plugin != "pgoutput" {
                p.push(format!(
                    "slot {} uses plugin {:?}, not pgoutput: choose another source.slot",
                    settings.slot, s.plugin
                ));
            }
            if s.database != settings.source.dbname {
                p.push(format!(
                    "slot {} belongs to database {:?}, not {:?}",
                    settings.slot, s.database, settings.source.dbname
                ));
            }
            if s.wal_status == "lost" {
                p.push(format!("slot {} is invalidated (wal_status lost): the WAL it needed was removed; the targets must be resynchronised from a new copy, then drop the slot with SELECT pg_drop_replication_slot('{}')", settings.slot, settings.slot));
            }
            if !p.is_empty() {
                return Err(DaemonError::Startup(p));
            }
            s.confirmed_flush
        }
        None => {
            let holding: Vec<String> = prepared
                .iter()
                .filter(|(_, _, progress, _)| progress.is_some())
                .map(|(name, _, progress, _)| {
                    format!("{name} (at {})", progress.unwrap_or_default())
                })
                .collect();
            if !holding.is_empty() {
                return Err(DaemonError::Startup(vec![format!(
                    "replication slot {} does not exist on the source, but targets {} hold progress from it: \
                     the changes since then are gone, and streaming from a new slot would leave a gap. \
                     Resynchronise those targets (empty their tables and delete their rows from pgcarve.progress), then start again",
                    settings.slot,
                    holding.join(", ")
                )]));
            }
            let mut rconn = ReplicationConn::connect(&settings.source, &tls)
                .await
                .map_err(|e| {
                    DaemonError::Startup(vec![format!("source replication connection: {e}")])
                })?;
            let lsn = rconn
                .create_logical_slot(&settings.slot)
                .await
                .map_err(|e| {
                    DaemonError::Startup(vec![format!("create slot {}: {e}", settings.slot)])
                })?;
            rconn.close().await;
            tracing::info!(slot = %settings.slot, consistent_point = %lsn, "created replication slot");
            lsn
        }
    };
    drop(client);

    // 4. Run.
    let mut links = Vec::new();
    let mut tasks = Vec::new();
    for (name, worker, _, status_rx) in prepared {
        let (tx, rx) = crate::link::queue::channel(settings.apply.queue_changes);
        let committed = worker.committed();
        tracing::info!(target_name = %name, committed = %committed, "target ready");
        tasks.push(worker.spawn(rx));
        links.push(TargetLink::new(name, tx, status_rx, committed));
    }
    let reader = Reader::new(
        settings.clone(),
        tls,
        router,
        links,
        wake,
        confirmed,
        metrics.clone(),
        health.clone(),
    );
    let result = reader.run(shutdown.clone()).await;
    health.set_phase("stopping");
    for t in tasks {
        let _ = t.await;
    }
    tracing::info!("stopped");
    result.map_err(DaemonError::from)
}
