//! `pgcarve run`: start-up (`startup`: inspect → plan → act, the slot decision in `slot`), then
//! the reader and one apply task per target until shutdown.

pub mod periodic;
pub mod side;
pub mod slot;
pub mod startup;
pub mod verifier;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Settings};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::source::reader::{Reader, ReaderError, ReaderExit, TargetLink};

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

/// Runs until SIGINT or SIGTERM; SIGHUP reloads `config` (see `periodic`).
pub async fn run_until_signal(
    settings: Settings,
    config: std::path::PathBuf,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining");
        signal.cancel();
    });
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| anyhow::anyhow!("cannot install the SIGHUP handler: {e}"))?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(config = %config.display(), "SIGHUP: reloading the config");
            if reload_tx.send(config.clone()).is_err() {
                return;
            }
        }
    });
    run_with_reload(
        settings,
        Observability::default(),
        shutdown,
        Some(reload_rx),
    )
    .await?;
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
    run_with_reload(settings, obs, shutdown, None).await
}

/// [`run`], reloading the config file each time a path arrives on `reloads`.
pub async fn run_with_reload(
    settings: Settings,
    obs: Observability,
    shutdown: CancellationToken,
    reloads: Option<tokio::sync::mpsc::UnboundedReceiver<std::path::PathBuf>>,
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
    // A pipeline ends on shutdown, or stops cleanly once its side streams caught up: the next
    // start joins them to their targets (once: a join that cannot happen waits for a restart).
    // A reload that changes table lists starts it again with them.
    // If the new lists cannot start, the running ones start again.
    let mut settings = settings;
    let mut previous: Option<Settings> = None;
    let mut reloads = reloads;
    let mut join = true;
    let result = loop {
        match run_inner(
            &settings,
            &metrics,
            &health,
            &shutdown,
            reloads.take(),
            join,
        )
        .await
        {
            Ok((End::Join, r)) if !shutdown.is_cancelled() => {
                tracing::info!("starting again to join the side streams to their targets");
                reloads = r;
                join = false;
                previous = None;
            }
            Ok((End::Reload(new), r)) if !shutdown.is_cancelled() => {
                tracing::info!("starting again with the reloaded table lists");
                previous = Some(std::mem::replace(&mut settings, *new));
                reloads = r;
                join = true;
            }
            Ok(_) => break Ok(()),
            Err(Fail::AtStart(reason, r)) if previous.is_some() && !shutdown.is_cancelled() => {
                tracing::error!("reload: the stream cannot start with the new table lists, so it starts again with the running ones: {reason}");
                settings = previous.take().unwrap_or(settings);
                reloads = r;
                join = true;
            }
            Err(Fail::AtStart(reason, _)) | Err(Fail::Running(reason)) => break Err(reason),
        }
    };
    if let Err(e) = &result {
        health.set_fatal(e.to_string());
    }
    shutdown.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    result
}

/// Where the spools live (`apply.spool_dir`, resolved by validation).
fn spool_dir(settings: &Settings) -> std::path::PathBuf {
    settings
        .apply
        .spool_dir
        .clone()
        .unwrap_or_else(|| crate::config::default_spool_dir(&settings.slot))
}

/// Config reload requests (a path per SIGHUP).
type Reloads = Option<tokio::sync::mpsc::UnboundedReceiver<std::path::PathBuf>>;

/// Why a pipeline failed: at its start (the reload requests are given back), or later.
enum Fail {
    AtStart(DaemonError, Reloads),
    Running(DaemonError),
}

/// Why a pipeline ended without an error.
enum End {
    /// Shutdown.
    Stopped,
    /// Its side streams caught up: start again to join them.
    Join,
    /// A reload changed table lists: start again with these settings.
    Reload(Box<Settings>),
}

/// Runs one pipeline: start-up, then the stream until shutdown (or, with `join`, until its
/// side streams caught up). Gives back the reload requests.
async fn run_inner(
    settings: &Settings,
    metrics: &Metrics,
    health: &Health,
    shutdown: &CancellationToken,
    reloads: Reloads,
    join: bool,
) -> Result<(End, Reloads), Fail> {
    let started = match startup::start(settings, metrics, health, shutdown).await {
        Ok(Some(s)) => s,
        Ok(None) => return Ok((End::Stopped, reloads)), // shutdown while waiting for a database
        Err(e) => return Err(Fail::AtStart(e, reloads)),
    };
    run_started(settings, metrics, health, shutdown, reloads, join, started)
        .await
        .map_err(Fail::Running)
}

/// The pipeline after its start.
async fn run_started(
    settings: &Settings,
    metrics: &Metrics,
    health: &Health,
    shutdown: &CancellationToken,
    reloads: Reloads,
    join: bool,
    mut started: startup::Started,
) -> Result<(End, Reloads), DaemonError> {
    // This pipeline's tasks stop with it; `shutdown` stops the daemon.
    let stop = shutdown.child_token();
    let shutdown = &stop;
    // A copy while streaming: its owners (or their side streams) are held at its snapshot's
    // position.
    let online = started.online.take();
    let mut holds = std::mem::take(&mut started.holds).into_iter();
    // The targets as the stream runs them (side streams included).
    let streamed = started.settings.clone();
    let mut links = Vec::new();
    let mut tasks = Vec::new();
    let mut cancellers = Vec::new();
    let spool_dir = spool_dir(settings);
    // Spools are caches: what an earlier run left is in the slot still (held back by targets).
    match crate::link::spool::discard_stale(&spool_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!(dir = %spool_dir.display(), removed = n, "discarded spools of an earlier run"),
        Err(e) => return Err(DaemonError::Startup(vec![format!(
            "cannot clear the spool folder {} ({e}): set apply.spool_dir to a folder pgcarve may write",
            spool_dir.display()
        )])),
    }
    let mut copied_at = started.copied_at.into_iter();
    for t in &streamed.targets {
        let tables: Vec<String> = t.tables.iter().map(|t| t.to_string()).collect();
        metrics.init_target(&t.name, &tables);
    }
    for t in started.targets {
        cancellers.push((t.name.clone(), t.worker.canceller()));
        let spool = crate::link::queue::SpoolSettings {
            dir: spool_dir.clone(),
            target: t.name.clone(),
            max_bytes: settings.apply.spool_max_bytes,
            stall: Duration::from_secs_f64(settings.apply.stall_secs),
        };
        let (tx, rx) = crate::link::queue::channel(settings.apply.queue_changes, Some(spool));
        let committed = t.worker.committed();
        tracing::info!(target_name = %t.name, committed = %committed, "target ready");
        tasks.push(t.worker.spawn(rx));
        let side = links.len() >= settings.targets.len();
        links.push(
            TargetLink::new(t.name, tx, t.status, committed)
                .with_copied_at(copied_at.next().unwrap_or_default(), started.confirmed)
                .with_hold(holds.next().flatten())
                .as_side(side),
        );
    }
    // The catalog check: what the stream cannot show (a routed table dropped, recreated,
    // unpublished, or with a replica identity that no longer publishes its changes).
    let (problems_tx, problems_rx) = tokio::sync::mpsc::unbounded_channel();
    let (restart_tx, mut restart_rx) = tokio::sync::mpsc::unbounded_channel();
    let periodic = tokio::spawn(
        periodic::Periodic::start(
            settings,
            started.tls.clone(),
            started.router.routed_oids(),
            problems_tx,
            metrics.clone(),
            shutdown.clone(),
        )
        .restarting_with(restart_tx)
        .run(reloads),
    );
    let verifier = settings.verify_every.map(|every| {
        tokio::spawn(verifier::run(
            settings.clone(),
            every,
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
        ))
    });
    // Foreign keys set aside during a copy come back once their tables are consistent.
    let keys_back = tokio::spawn(crate::copy::aside::run(
        settings.clone(),
        started.system_id.clone(),
        started.tls.clone(),
        Duration::from_secs(5),
        shutdown.clone(),
    ));
    // A failed copy stops the daemon (its state says what failed; the next start copies again).
    let copy_failed = Arc::new(std::sync::Mutex::new(None));
    let copy_task = online.map(|o| {
        let (failed, stop, health) = (copy_failed.clone(), shutdown.clone(), health.clone());
        let job = o.run(
            settings.clone(),
            started.tls.clone(),
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(reason) = job.await {
                tracing::error!("copy failed: {reason}");
                health.set_fatal(format!("copy failed: {reason}"));
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                stop.cancel();
            }
        })
    });
    let reader = Reader::new(
        streamed.clone(),
        started.tls,
        started.router,
        links,
        started.wake,
        started.confirmed,
        metrics.clone(),
        health.clone(),
    )
    .with_catalog_problems(problems_rx)
    .with_join_sides(join);
    let mut reader = tokio::spawn(reader.run(shutdown.clone()));
    crate::notify::ready();
    let stop_by = Duration::from_secs_f64(settings.apply.shutdown_secs);
    let mut reload = None;
    // Whether every task ended by itself (else a restart inside the process could race what
    // an abandoned connection still commits).
    let mut clean = true;
    let (result, deadline) = tokio::select! {
        r = &mut reader => (r, tokio::time::Instant::now() + Duration::from_secs(5)),
        _ = shutdown.cancelled() => {
            let deadline = tokio::time::Instant::now() + stop_by;
            (bounded_stop(&mut reader, &cancellers, deadline, &mut clean).await, deadline)
        }
        Some(new) = restart_rx.recv() => {
            // A clean stop of this pipeline, as on shutdown; the next one runs the new lists.
            reload = Some(Box::new(new));
            shutdown.cancel();
            let deadline = tokio::time::Instant::now() + stop_by;
            (bounded_stop(&mut reader, &cancellers, deadline, &mut clean).await, deadline)
        }
    };
    shutdown.cancel();
    let reloads = periodic.await.ok().flatten();
    if let Some(v) = verifier {
        v.abort();
    }
    keys_back.abort();
    if let Some(t) = copy_task {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            abort.abort();
            clean = false;
        }
    }
    health.set_phase(crate::health::Phase::Stopping);
    // The apply tasks end once the reader is gone: each rolls back what is open and makes what
    // it committed durable. One that does not (a dead connection) is dropped: the server rolls
    // back its open transaction, and its progress row says what it holds.
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            abort.abort();
            clean = false;
        }
    }
    tracing::info!("stopped");
    if let Some(reason) = copy_failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(DaemonError::Startup(vec![format!("copy: {reason}")]));
    }
    let exit = match result {
        Ok(r) => r.map_err(DaemonError::from)?,
        Err(e) if e.is_cancelled() => ReaderExit::Stopped,
        Err(e) => return Err(DaemonError::Startup(vec![format!("reader task: {e}")])),
    };
    if (reload.is_some() || exit == ReaderExit::Join) && !clean {
        return Err(DaemonError::Startup(vec![
            "the stream did not stop cleanly for a restart inside the process (a target did not finish in time): \
             exiting, so that a new process starts from what the targets hold"
                .into(),
        ]));
    }
    if let Some(new) = reload {
        return Ok((End::Reload(new), reloads));
    }
    if exit == ReaderExit::Join {
        // The side streams' series go: the next start joins them to their targets.
        for t in &streamed.targets[settings.targets.len()..] {
            let tables: Vec<String> = t.tables.iter().map(|t| t.to_string()).collect();
            metrics.remove_target(&t.name, &tables);
        }
        return Ok((End::Join, reloads));
    }
    Ok((End::Stopped, reloads))
}

/// Waits for the reader to stop by `deadline` (`apply.shutdown_secs` after the request):
/// halfway, statements still running on the targets (a lock wait, say) are cancelled, all at
/// once, so the targets can answer the final barrier; at the deadline the reader is dropped
/// (what the slot was last confirmed stays confirmed; nothing is confirmed that a target did
/// not make durable). The apply tasks' own wait ends at the same deadline.
async fn bounded_stop(
    reader: &mut tokio::task::JoinHandle<Result<ReaderExit, ReaderError>>,
    cancellers: &[(String, crate::apply::Canceller)],
    deadline: tokio::time::Instant,
    clean: &mut bool,
) -> Result<Result<ReaderExit, ReaderError>, tokio::task::JoinError> {
    let now = tokio::time::Instant::now();
    let halfway = now + deadline.saturating_duration_since(now) / 2;
    if let Ok(r) = tokio::time::timeout_at(halfway, &mut *reader).await {
        return r;
    }
    let cancels = futures::future::join_all(cancellers.iter().map(|(name, c)| async move {
        match c.cancel().await {
            Ok(()) => tracing::warn!(target_name = %name, "stopping: cancelled the statement running on the target"),
            Err(reason) => tracing::warn!(target_name = %name, "stopping: could not cancel the statement running on the target: {reason}"),
        }
    }));
    let _ = tokio::time::timeout_at(deadline, cancels).await;
    if let Ok(r) = tokio::time::timeout_at(deadline, &mut *reader).await {
        return r;
    }
    tracing::error!(
        "stopping: the reader did not finish within apply.shutdown_secs; leaving without a final confirmation (the slot replays what was not confirmed, and targets skip what they hold)"
    );
    reader.abort();
    *clean = false;
    Ok(Ok(ReaderExit::Stopped))
}
