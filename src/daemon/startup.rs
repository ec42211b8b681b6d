//! Start-up: inspect → plan → act.
//!
//! 1. **Inspect** the source (`wal_level`, the routed tables), every target (reachable — retried
//!    with backoff —, owned tables and columns, progress), the publication and the slot. Nothing
//!    is written.
//! 2. **Plan** from those facts: every problem an operator must fix is collected and start-up
//!    refuses with all of them; otherwise the publication plan and the slot decision
//!    (`super::slot`).
//! 3. **Act**: create the progress table on each target and flush what an earlier run left
//!    there, then create or alter the publication, and create the slot last if it is missing
//!    (a slot left behind by a start-up that fails later would hold the monolith's WAL).
//!
//! A refusal therefore changes nothing on any database. (A target that becomes unreachable
//! between inspection and action is inspected and checked again when it is back; a problem
//! found then refuses start-up after other targets' progress tables exist, never after the slot
//! or the publication changed.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::side;
use super::slot::{create_slot, decide_slot, SlotDecision};
use super::{with_retry, DaemonError};
use crate::apply::prepare::{connect_and_inspect, problems, Inspected};
use crate::apply::progress::ProgressKey;
use crate::apply::{StartError, Worker};
use crate::config::{Settings, Target};
use crate::copy::plan::{CopyPlan, TargetInput};
use crate::copy::state::TargetCopy;
use crate::health::{Health, Phase};
use crate::link::{TargetState, TargetStatus};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::pg::safe_pg_error;
use crate::route::Router;
use crate::source::catalog::{self, SourceCatalog};
use crate::table::TableName;
use crate::tls::TlsConnector;

/// A target ready to run: its apply task and the receiver of its status.
pub struct ReadyTarget {
    /// Target name.
    pub name: String,
    /// Its apply task, not yet spawned.
    pub worker: Worker,
    /// What the task publishes.
    pub status: watch::Receiver<TargetStatus>,
}

/// What start-up set up.
pub struct Started {
    /// Routing, with each routed table's OID.
    pub router: Router,
    /// TLS for the source (the reader's replication connection).
    pub tls: TlsConnector,
    /// The slot's confirmed position (or the new slot's consistent point).
    pub confirmed: Lsn,
    /// Every target, in configuration order.
    pub targets: Vec<ReadyTarget>,
    /// Woken by any target whose status changes.
    pub wake: Arc<Notify>,
    /// Per target (configuration order): tables whose copy is consistent with a snapshot
    /// position; the stream skips, for each, what committed before it.
    pub copied_at: Vec<HashMap<TableName, Lsn>>,
    /// A copy to run while streaming (tables added, or left unfinished by an earlier run).
    pub online: Option<crate::copy::OnlineCopy>,
    /// The settings as the stream runs them: side streams (`super::side`) appended to the
    /// targets, their tables taken from their targets.
    pub settings: Settings,
    /// Per target of `settings`: held at a copy's position (`link::hold`).
    pub holds: Vec<Option<crate::link::hold::CopyHold>>,
    /// The source's system identifier.
    pub system_id: String,
}

fn startup(problems: Vec<String>) -> DaemonError {
    DaemonError::Startup(problems)
}

/// Runs start-up; `None` when shutdown came while waiting for a database.
pub async fn start(
    settings: &Settings,
    metrics: &Metrics,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<Option<Started>, DaemonError> {
    let tls =
        TlsConnector::new(&settings.source).map_err(|e| startup(vec![format!("source: {e}")]))?;
    let tables = Router::new(&settings.targets).tables();

    // Inspect and plan the source.
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
        return Ok(None);
    };
    let source_facts = catalog::inspect_source(&client, &tables)
        .await
        .map_err(|e| startup(vec![e]))?;
    let source = catalog::plan_source(&source_facts).map_err(startup)?;

    // `copy.create_schema`: the tables a target lacks, from the source's catalog (their
    // secondary indexes and foreign keys once the copy is in). A difference refuses start-up.
    if settings.copy.create_schema {
        let outcome = crate::schema::run(
            settings,
            crate::schema::Mode::Deferred {
                system_id: &source.system_id,
            },
        )
        .await
        .map_err(|e| startup(vec![format!("copy.create_schema: {e}")]))?;
        if outcome.has_differences() {
            return Err(startup(
                outcome
                    .targets
                    .into_iter()
                    .flat_map(|(_, p)| p.differences)
                    .collect(),
            ));
        }
        for (name, p) in &outcome.targets {
            for t in &p.created {
                tracing::info!(target_name = %name, table = %t, "created the table from the source's catalog");
            }
        }
    }

    // Inspect the targets, concurrently; then plan them.
    let results = futures::future::join_all(
        settings
            .targets
            .iter()
            .map(|t| inspect_target(t, key(settings, &source, t), shutdown)),
    )
    .await;
    let mut inspected = Vec::with_capacity(results.len());
    let mut found = Vec::new();
    for (t, result) in settings.targets.iter().zip(results) {
        match result {
            None => return Ok(None),
            Some(Err(p)) => found.extend(p),
            Some(Ok(i)) => {
                found.extend(problems(t, &i.facts, &source.columns));
                inspected.push(i);
            }
        }
    }
    if !found.is_empty() {
        return Err(startup(found));
    }

    // What each target holds of the copy, and what this start copies.
    let mut copies = Vec::with_capacity(settings.targets.len());
    for t in &settings.targets {
        let Some(c) = read_copy_state(t, key(settings, &source, t), shutdown).await else {
            return Ok(None);
        };
        copies.push(c);
    }
    let inputs: Vec<TargetInput<'_>> = settings
        .targets
        .iter()
        .zip(&inspected)
        .zip(&copies)
        .map(|((t, i), c)| TargetInput {
            name: &t.name,
            has_progress: i.facts.progress.is_some(),
            copy: c,
        })
        .collect();
    let mut copy_plan = crate::copy::plan::plan(settings.copy.enabled, &inputs).map_err(startup)?;

    // Inspect and plan the publication and the slot.
    let publication = catalog::inspect_publication(&client, &settings.publication)
        .await
        .map_err(|e| startup(vec![e]))?;
    let publication_plan =
        catalog::plan_publication(&settings.publication, publication.as_ref(), &tables)
            .map_err(startup)?;
    let slot = catalog::slot_info(&client, &settings.slot)
        .await
        .map_err(|e| startup(vec![format!("source: read slot: {}", safe_pg_error(&e))]))?;
    // A target holds history from the slot once it streamed or copied under it.
    let holding: Vec<(String, Lsn)> = settings
        .targets
        .iter()
        .zip(&inspected)
        .zip(&copies)
        .filter_map(|((t, i), c)| {
            let copied = c
                .tables
                .iter()
                .filter(|tc| tc.state.is_some())
                .filter_map(|tc| tc.lsn)
                .max();
            i.facts.progress.or(copied).map(|lsn| (t.name.clone(), lsn))
        })
        .collect();
    let decision = decide_slot(
        &settings.slot,
        &settings.source.dbname,
        slot.as_ref(),
        &holding,
    );

    // Act: the targets first (a progress table is harmless), the slot last (a slot left behind
    // by a start-up that then fails would hold the monolith's WAL).
    let resume_at = match decision {
        SlotDecision::Refuse(p) => return Err(startup(p)),
        SlotDecision::Resume(lsn) => Some(lsn),
        SlotDecision::Create => None,
    };
    // Copies beside a running stream: the foreign keys linking the copied tables are set aside
    // until the target is consistent again (`crate::copy::aside`).
    if resume_at.is_some() {
        set_aside_keys(settings, &source, &copy_plan).await?;
    }
    // Side streams: tables copied while their target streams its others (`super::side`).
    let (sides, joins) = match resume_at {
        Some(m) => plan_sides(settings, &source, &inspected, &copies, &copy_plan, m).await?,
        None => (Vec::new(), Vec::new()),
    };
    let streamed = Settings {
        targets: side::stream_targets(&settings.targets, &sides),
        ..settings.clone()
    };
    // Side streams are inspected like targets (same database, their own progress row).
    let mut inspected: Vec<Inspected> = inspected;
    for t in &streamed.targets[settings.targets.len()..] {
        match inspect_target(t, key(settings, &source, t), shutdown).await {
            None => return Ok(None),
            Some(Err(p)) => return Err(startup(p)),
            Some(Ok(i)) => inspected.push(i),
        }
    }
    let wake = Arc::new(Notify::new());
    let started =
        futures::future::join_all(streamed.targets.iter().zip(inspected).map(|(t, i)| {
            let (status_tx, status) = watch::channel(TargetStatus {
                committed: Lsn::ZERO,
                state: TargetState::Starting,
            });
            let key = key(settings, &source, t);
            let wake = &wake;
            let source = &source;
            async move {
                let worker = start_target(
                    settings, source, t, i, key, metrics, status_tx, wake, shutdown,
                )
                .await?;
                Ok::<_, DaemonError>(worker.map(|worker| ReadyTarget {
                    name: t.name.clone(),
                    worker,
                    status,
                }))
            }
        }))
        .await;
    let mut targets = Vec::with_capacity(started.len());
    for t in started {
        match t? {
            Some(t) => targets.push(t),
            None => return Ok(None),
        }
    }
    catalog::act_publication(&client, &settings.publication, &tables, &publication_plan)
        .await
        .map_err(|e| startup(vec![e]))?;
    for (i, t) in settings.targets.iter().enumerate() {
        record_copy_state(t, key(settings, &source, t), &copy_plan, i)
            .await
            .map_err(|e| startup(vec![e]))?;
    }
    for (i, points) in &joins {
        let t = &settings.targets[*i];
        let mut client = target_client(t).await.map_err(|e| startup(vec![e]))?;
        side::join(&mut client, &key(settings, &source, t), points)
            .await
            .map_err(|e| startup(vec![e]))?;
        for (table, at) in points {
            tracing::info!(target_name = %t.name, table = %table, at = %at, "the side stream joined its target");
            copy_plan.copied_at[*i].insert(table.clone(), *at);
        }
    }
    let mut online = None;
    let confirmed = match resume_at {
        Some(lsn) if !copy_plan.copies() => lsn,
        None if !copy_plan.copies() => create_slot(&settings.source, &tls, &settings.slot)
            .await
            .map_err(|e| startup(vec![e]))?,
        // A first start copies under the new slot's own snapshot, before streaming.
        None => {
            let Some(at) = copy_tables(
                settings,
                &tls,
                &source.system_id,
                &mut copy_plan,
                metrics,
                health,
                shutdown,
            )
            .await?
            else {
                return Ok(None);
            };
            at
        }
        // Later, under a temporary slot's snapshot, while the stream runs: the owners are held
        // at its position (`link::hold`), the others stream on.
        Some(lsn) => {
            online = Some(
                prepare_online_copy(settings, &tls, &source.system_id, &mut copy_plan, &sides)
                    .await?,
            );
            lsn
        }
    };
    // Holds per streamed target: a side stream is held in its target's place.
    let mut holds: Vec<Option<crate::link::hold::CopyHold>> = online
        .as_ref()
        .map(|o| o.holds.clone())
        .unwrap_or_else(|| vec![None; settings.targets.len()]);
    for s in &sides {
        let h = if s.copying.is_empty() {
            None
        } else {
            holds[s.target].take()
        };
        holds.push(h);
    }
    side::move_copied_at(&mut copy_plan.copied_at, &sides);
    crate::schema::finish_pending(settings)
        .await
        .map_err(|e| startup(vec![format!("copy.create_schema: {e}")]))?;
    for t in &settings.targets {
        crate::copy::mark_streaming(t, &key(settings, &source, t))
            .await
            .map_err(|e| startup(vec![e]))?;
    }
    drop(client);
    let mut router = Router::new(&streamed.targets);
    router.set_oids(&source.oids);
    Ok(Some(Started {
        router,
        tls,
        confirmed,
        targets,
        wake,
        copied_at: copy_plan.copied_at,
        online,
        settings: streamed,
        holds,
        system_id: source.system_id.clone(),
    }))
}

/// Reads a target's copy state (retrying while it is unreachable). `None`: shutdown.
async fn read_copy_state(
    t: &Target,
    key: ProgressKey,
    shutdown: &CancellationToken,
) -> Option<TargetCopy> {
    with_retry(
        &format!("read copy state of target {}", t.name),
        shutdown,
        || async {
            let client = target_client(t).await?;
            crate::copy::state::read(&client, &key, &t.tables)
                .await
                .map_err(|e| format!("target {}: read copy state: {}", t.name, safe_pg_error(&e)))
        },
    )
    .await
}

async fn target_client(t: &Target) -> Result<tokio_postgres::Client, String> {
    crate::pg::open(&t.conn, &format!("target {}", t.name)).await
}

/// Creates the copy state tables on a target and records what the plan settled without a
/// copy: tables taken as they are, copies whose every chunk had committed.
async fn record_copy_state(
    t: &Target,
    key: ProgressKey,
    plan: &CopyPlan,
    i: usize,
) -> Result<(), String> {
    let client = target_client(t).await?;
    let err = |what: &str, e: tokio_postgres::Error| {
        format!("target {}: {what}: {}", t.name, safe_pg_error(&e))
    };
    client
        .batch_execute(crate::copy::state::CREATE_SQL)
        .await
        .map_err(|e| err("create pgcarve.copy_table", e))?;
    // A table no longer routed here stops receiving changes: its copy state is forgotten, so
    // routing it again copies it anew (or refuses while the target still holds its rows)
    // instead of streaming on from a position it has long fallen behind.
    let routed: Vec<String> = t.tables.iter().map(|t| t.to_string()).collect();
    let forgotten: Vec<String> = client
        .query(
            crate::copy::state::UNROUTED_SQL,
            &[&key.system_id, &key.slot, &key.target, &routed],
        )
        .await
        .map_err(|e| err("forget tables no longer routed", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for table in forgotten {
        tracing::warn!(target_name = %t.name, table = %table, "the table is no longer routed to this target: its copy state is forgotten (routing it again copies it anew)");
    }
    for table in &plan.take[i] {
        client
            .execute(
                crate::copy::state::TAKEN_SQL,
                &[&key.system_id, &key.slot, &key.target, &table.to_string()],
            )
            .await
            .map_err(|e| err("record copy state", e))?;
    }
    for table in &plan.finish[i] {
        client
            .execute(
                crate::copy::state::COPIED_SQL,
                &[&key.system_id, &key.slot, &key.target, &table.to_string()],
            )
            .await
            .map_err(|e| err("record copy state", e))?;
    }
    Ok(())
}

/// The first start: creates the main slot with an exported snapshot and copies the plan's
/// tables under it before anything streams. Returns the slot's consistent point, where the
/// stream starts; `None`: shutdown.
async fn copy_tables(
    settings: &Settings,
    tls: &TlsConnector,
    system_id: &str,
    plan: &mut CopyPlan,
    metrics: &Metrics,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<Option<Lsn>, DaemonError> {
    let mut conn = crate::source::conn::ReplicationConn::connect(&settings.source, tls)
        .await
        .map_err(|e| startup(vec![format!("source replication connection: {e}")]))?;
    let slot = &settings.slot;
    let (lsn, snapshot) = conn
        .create_logical_slot_exporting(slot, false)
        .await
        .map_err(|e| startup(vec![format!("create slot {slot}: {e}")]))?;
    tracing::info!(slot, consistent_point = %lsn, tables = plan.jobs.len(), "copying the routed tables under the slot's snapshot");
    health.set_phase(Phase::Copying);
    metrics.copying.set(1);
    // The pipeline runs: a long copy must not count against systemd's start timeout.
    crate::notify::ready();
    let progress = crate::copy::progress::CopyProgress::default();
    let reporter = tokio::spawn(crate::copy::report(
        progress.clone(),
        metrics.clone(),
        health.clone(),
    ));
    let run = crate::copy::CopyRun {
        settings,
        tls,
        system_id,
        snapshot: &snapshot,
        lsn,
        progress: &progress,
        shutdown,
        side: &[],
    };
    let result = crate::copy::run(&run, plan).await;
    reporter.abort();
    progress.publish(metrics, health);
    progress.draw();
    crate::notify::status(&progress.summary());
    // The snapshot is no longer needed; a temporary slot goes with its connection.
    conn.close().await;
    health.set_phase(Phase::Starting);
    metrics.copying.set(0);
    match result {
        Ok(()) => {}
        Err(_) if shutdown.is_cancelled() => return Ok(None),
        Err(reason) => {
            tracing::error!("initial copy failed: {reason}");
            return Err(startup(vec![format!("initial copy: {reason}")]));
        }
    }
    for job in &plan.jobs {
        for o in &job.owners {
            plan.copied_at[o.target].insert(job.table.clone(), lsn);
        }
    }
    tracing::info!(tables = plan.jobs.len(), consistent_point = %lsn, "initial copy done");
    Ok(Some(lsn))
}

/// Sets aside, on each target that copies tables at this (later) start, the foreign keys with
/// an end in a copied table. A target where this role may not drop them keeps them: its copies
/// then hold the target (and a resumed table that others reference is copied again whole).
async fn set_aside_keys(
    settings: &Settings,
    source: &SourceCatalog,
    plan: &CopyPlan,
) -> Result<(), DaemonError> {
    for (i, t) in settings.targets.iter().enumerate() {
        let copying = plan.tables_of(i);
        if copying.is_empty() {
            continue;
        }
        let mut client = target_client(t).await.map_err(|e| startup(vec![e]))?;
        match crate::copy::aside::set_aside(
            &mut client,
            &key(settings, source, t),
            &t.tables,
            &copying,
        )
        .await
        .map_err(|e| startup(vec![e]))?
        {
            crate::copy::aside::SetAside::Done(keys) => {
                for a in keys {
                    tracing::warn!(target_name = %t.name, table = %a.table, constraint = %a.name, references = %a.parent, "foreign key set aside while its tables copy beside the stream; it is added back (then validated) once the target has caught up");
                }
            }
            crate::copy::aside::SetAside::Busy => {
                tracing::warn!(target_name = %t.name, "the tables of foreign keys to set aside stayed locked by other sessions: the keys stay, so the target waits while their tables copy");
            }
            crate::copy::aside::SetAside::NotAllowed(keys) => {
                tracing::warn!(target_name = %t.name, constraints = ?keys, "this role does not own these foreign keys' tables (or may not reference the other): they stay, so the target waits while their tables copy");
            }
        }
    }
    Ok(())
}

/// Plans side streams at a start that resumes at the slot's confirmed position `confirmed`:
/// side tables that may join their target now (their join points), and per target the side
/// stream that runs (tables it applies, tables this start copies onto it).
#[allow(clippy::type_complexity)]
async fn plan_sides(
    settings: &Settings,
    source: &SourceCatalog,
    inspected: &[Inspected],
    copies: &[TargetCopy],
    plan: &CopyPlan,
    confirmed: Lsn,
) -> Result<(Vec<side::Side>, Vec<(usize, Vec<(TableName, Lsn)>)>), DaemonError> {
    let mut sides = Vec::new();
    let mut joins = Vec::new();
    for (i, t) in settings.targets.iter().enumerate() {
        let mut joined = side::side_tables(&copies[i]);
        let copying = plan.tables_of(i);
        if joined.is_empty() && copying.is_empty() {
            continue;
        }
        let client = target_client(t).await.map_err(|e| startup(vec![e]))?;
        if !joined.is_empty() {
            let row = side::side_progress(&client, &key(settings, source, t))
                .await
                .map_err(|e| startup(vec![e]))?;
            let own = inspected[i].facts.progress;
            // A side stream stopped for an operator does not join: its start refuses with why.
            let halted = row.as_ref().is_some_and(|p| p.halted.is_some());
            let points = side::join_points(&joined, row.map(|p| p.lsn), confirmed, own);
            if let (Some(points), false) = (points, halted) {
                joins.push((i, points));
                joined.clear();
            }
        }
        // This start's copies go beside the stream when no foreign key links them with the
        // target's other tables; else the target is held while they copy.
        let beside = !copying.is_empty() && {
            let refs = crate::copy::references(&client, &t.tables)
                .await
                .map_err(|e| {
                    startup(vec![format!(
                        "target {}: read foreign keys: {}",
                        t.name,
                        safe_pg_error(&e)
                    )])
                })?;
            side::may_stream_others(&t.tables, &copying, &refs)
        };
        if !joined.is_empty() || beside {
            sides.push(side::Side {
                target: i,
                joined,
                copying: if beside { copying } else { Vec::new() },
            });
        }
    }
    Ok((sides, joins))
}

/// Creates a temporary slot with an exported snapshot for the tables to copy while streaming,
/// and holds their owners at its position (the stream skips, for these tables, what committed
/// before it). A target with a side stream for them (`sides`) streams its other tables on;
/// its side stream is the one held.
async fn prepare_online_copy(
    settings: &Settings,
    tls: &TlsConnector,
    system_id: &str,
    plan: &mut CopyPlan,
    sides: &[side::Side],
) -> Result<crate::copy::OnlineCopy, DaemonError> {
    let mut conn = crate::source::conn::ReplicationConn::connect(&settings.source, tls)
        .await
        .map_err(|e| startup(vec![format!("source replication connection: {e}")]))?;
    // Unique in the process too: a restart inside it may run another copy.
    static COPIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let slot = format!(
        "{}_copy_{}_{}",
        &settings.slot[..settings.slot.len().min(40)],
        std::process::id(),
        COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let (lsn, snapshot) = conn
        .create_logical_slot_exporting(&slot, true)
        .await
        .map_err(|e| startup(vec![format!("create slot {slot}: {e}")]))?;
    let mut holds = vec![None; settings.targets.len()];
    for job in &plan.jobs {
        for o in &job.owners {
            plan.copied_at[o.target].insert(job.table.clone(), lsn);
            holds[o.target].get_or_insert_with(|| crate::link::hold::CopyHold::new(lsn));
        }
    }
    let mut side = vec![false; settings.targets.len()];
    for s in sides.iter().filter(|s| !s.copying.is_empty()) {
        side[s.target] = true;
        tracing::info!(target_name = %settings.targets[s.target].name, tables = s.copying.len(), at = %lsn, "copying beside the stream: the target streams its other tables on; a side stream takes the copied tables' changes from the snapshot's position");
    }
    tracing::info!(slot, at = %lsn, tables = plan.jobs.len(), "copying while streaming: the owners of these tables without a side stream are held at the snapshot's position, the other targets stream on");
    Ok(crate::copy::OnlineCopy {
        conn,
        snapshot,
        lsn,
        system_id: system_id.to_string(),
        plan: plan.clone(),
        holds,
        side,
    })
}

/// The progress row key of target `t`.
fn key(settings: &Settings, source: &SourceCatalog, t: &Target) -> ProgressKey {
    ProgressKey {
        system_id: source.system_id.clone(),
        slot: settings.slot.clone(),
        target: t.name.clone(),
    }
}

/// Connects to and inspects a target, retrying while it is unreachable. `None`: shutdown.
async fn inspect_target(
    t: &Target,
    key: ProgressKey,
    shutdown: &CancellationToken,
) -> Option<Result<Inspected, Vec<String>>> {
    with_retry(&format!("prepare target {}", t.name), shutdown, || async {
        match connect_and_inspect(t, &key).await {
            Ok(i) => Ok(Ok(i)),
            Err(StartError::Fatal(p)) => Ok(Err(p)),
            Err(StartError::Transient(reason)) => Err(reason),
        }
    })
    .await
}

/// Acts on an inspected target. If it became unreachable meanwhile, it is connected to and
/// inspected again (and checked again) until it starts. `Ok(None)`: shutdown.
#[allow(clippy::too_many_arguments)]
async fn start_target(
    settings: &Settings,
    source: &SourceCatalog,
    t: &Target,
    inspected: Inspected,
    key: ProgressKey,
    metrics: &Metrics,
    status: watch::Sender<TargetStatus>,
    wake: &Arc<Notify>,
    shutdown: &CancellationToken,
) -> Result<Option<Worker>, DaemonError> {
    let first = Mutex::new(Some(inspected));
    let outcome = with_retry(&format!("prepare target {}", t.name), shutdown, || {
        let (key, status, wake) = (key.clone(), status.clone(), wake.clone());
        let first = first.lock().unwrap_or_else(|p| p.into_inner()).take();
        async move {
            let inspected = match first {
                Some(i) => i,
                None => match connect_and_inspect(t, &key).await {
                    Ok(i) => i,
                    Err(StartError::Fatal(p)) => return Ok(Err(p)),
                    Err(StartError::Transient(reason)) => return Err(reason),
                },
            };
            let p = problems(t, &inspected.facts, &source.columns);
            if !p.is_empty() {
                return Ok(Err(p));
            }
            let worker = Worker::start(
                t,
                inspected,
                key,
                settings.apply.clone(),
                metrics.clone(),
                status,
                wake,
            );
            match worker.await {
                Ok(w) => Ok(Ok(w)),
                Err(StartError::Fatal(p)) => Ok(Err(p)),
                Err(StartError::Transient(reason)) => Err(reason),
            }
        }
    })
    .await;
    match outcome {
        None => Ok(None),
        Some(Ok(w)) => Ok(Some(w)),
        Some(Err(p)) => Err(startup(p)),
    }
}
