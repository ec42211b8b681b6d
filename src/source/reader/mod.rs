//! The reader task: one replication stream, decoded once, routed to every owning target.
//!
//! ```text
//!  slot ──CopyBoth──► reader ──Chunk/Barrier──► [queue: memory, or spool] ──► apply task (A)
//!                       │    └──────────────────► [queue: memory, or spool] ──► apply task (B)
//!                       ◄──── committed LSN (watch) ──────────────────────────┘
//!                       └──standby status update (confirm = rule in `feedback`)──► slot
//! ```
//!
//! Whole source transactions travel as chunks (at most `apply.chunk_changes` changes each).
//! A target that takes its share slower than we read makes us wait (backpressure: the slot,
//! not our memory, holds the WAL); a target that takes nothing is spooled for, so the others go
//! on (`link::queue`, [`targets`]). Status updates keep flowing while we wait.
//!
//! What goes where is decided in [`txn`] (pure); what may be confirmed in [`feedback`] (pure).
//!
//! Restarts (connection loss, a detached target rejoining, a retry that needs the slot) first
//! send a barrier to every target: each finishes or rolls back its open group and answers with
//! its committed LSN (a stalled one at once, a hung one is not waited for). Then the stream
//! starts again from the slot's confirmed position and each target skips what it holds
//! (`final_lsn < committed`).

mod ddl;
pub mod feedback;
mod targets;
pub mod txn;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::health::Health;
use crate::link::hold::CopyHold;
use crate::link::queue::QueueTx;
use crate::link::{Change, TargetStatus, XactInfo};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::pg::quote_ident;
use crate::pgoutput::{self, Message};
use crate::route::Router;
use crate::source::conn::{ConnError, ReplicationConn};
use crate::source::ddl::CatalogProblem;
use crate::source::protocol::{self, ServerMessage};
use crate::table::TableName;
use crate::tls::TlsConnector;
use ddl::next_problem;
use feedback::{confirmable, seconds_since, status_due, Position};
use txn::{route_at_begin, truncate_parts, AtCommit, OpenTxn, Relations};

/// Send a status update at least this often, even when nothing changed.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// How often the reader recomputes lag and sends a changed confirmation.
const TICK: Duration = Duration::from_secs(1);
/// Ticks in a row a side stream must be caught up (less than a second behind) before the
/// reader stops to join it.
const JOIN_AFTER_TICKS: u32 = 3;

/// Why streaming stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// The replication connection failed or the server refused a command.
    #[error("{0}")]
    Conn(#[from] ConnError),
    /// The stream carried something we cannot decode.
    #[error("cannot decode pgoutput message: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    /// The server streamed something out of order (e.g. a change for an unknown relation).
    #[error("replication stream: {0}")]
    Stream(String),
    /// An apply task is gone (a bug or a panic).
    #[error("apply task for target {0} stopped")]
    TargetGone(String),
    /// A stop was requested while waiting for a target's queue to take a message.
    #[error("stopping")]
    Stopping,
}

/// The reader's handle on one target.
pub struct TargetLink {
    /// Target name.
    pub name: String,
    /// Queue to the apply task.
    pub tx: QueueTx,
    /// The apply task's published status.
    pub status: watch::Receiver<TargetStatus>,
    /// What it was sent and holds.
    pos: Position,
    /// A stream restart was made for its need (see `needs_restream`).
    restart_asked: bool,
    /// Tables whose copy on this target is consistent with a snapshot position: their changes
    /// in transactions that committed before it are in the copy already (the `copy` module).
    copied_at: HashMap<TableName, Lsn>,
    /// Held at a copy's snapshot position (see `link::hold`).
    hold: Option<CopyHold>,
    /// Once the stream passed the hold's position: the end LSN of the last transaction
    /// dispatched before it (the target must commit up to there to be drained).
    hold_reached: Option<Lsn>,
    /// Released from a hold: it rejoins with one stream restart.
    rejoin: bool,
    /// A side stream (`daemon::side`), and for how many ticks in a row it has had nothing in
    /// flight.
    side: Option<u32>,
}

impl TargetLink {
    /// Links a target whose progress is `committed`.
    pub fn new(
        name: String,
        tx: QueueTx,
        status: watch::Receiver<TargetStatus>,
        committed: Lsn,
    ) -> TargetLink {
        TargetLink {
            name,
            tx,
            status,
            pos: Position::new(committed),
            restart_asked: false,
            copied_at: HashMap::new(),
            hold: None,
            hold_reached: None,
            rejoin: false,
            side: None,
        }
    }

    /// Marks a side stream: once it has caught up, the reader stops cleanly so a new start
    /// joins it to its target.
    pub fn as_side(mut self, side: bool) -> TargetLink {
        self.side = side.then_some(0);
        self
    }

    /// Holds the target at a copy's snapshot position until the copy releases it.
    pub fn with_hold(mut self, hold: Option<CopyHold>) -> TargetLink {
        self.hold = hold;
        self
    }

    /// The stream has passed the hold's position `at` (a transaction committing at or after
    /// it begins, or the server has sent everything before it): note what was dispatched.
    fn pass_hold(&mut self, at_or_after: Lsn) {
        if self.hold_reached.is_none() && self.hold.as_ref().is_some_and(|h| at_or_after >= h.at())
        {
            self.hold_reached = Some(self.pos.dispatched());
        }
    }

    /// Sets the tables whose copy holds every transaction that committed before a position,
    /// for a stream that starts at `stream_start`. A copy consistent with a position at or
    /// before it filters nothing (every transaction streamed commits after it), so only later
    /// ones are kept: after the first start the map is empty, and routing a change costs no
    /// lookup.
    pub fn with_copied_at(
        mut self,
        copied_at: HashMap<TableName, Lsn>,
        stream_start: Lsn,
    ) -> TargetLink {
        self.copied_at = copied_at
            .into_iter()
            .filter(|(_, at)| *at > stream_start)
            .collect();
        self
    }

    /// The copy of `table` on this target already holds the transaction whose commit record
    /// is at `final_lsn`.
    fn in_copy(&self, table: &TableName, final_lsn: Lsn) -> bool {
        !self.copied_at.is_empty() && self.copied_at.get(table).is_some_and(|&at| final_lsn < at)
    }
}

/// Why one replication stream ended without an error.
enum StreamEnd {
    Shutdown,
    RetryTarget,
    /// Every side stream caught up: stop cleanly so a new start joins them to their targets.
    Join,
}

/// How the reader ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderExit {
    /// Shutdown was requested.
    Stopped,
    /// Stopped cleanly because every side stream (`daemon::side`) caught up with the stream:
    /// the daemon starts again, which joins them to their targets.
    Join,
}

/// The reader task's state.
pub struct Reader {
    settings: Settings,
    tls: TlsConnector,
    router: Router,
    links: Vec<TargetLink>,
    wake: Arc<Notify>,
    relations: Relations,
    open: Option<OpenTxn>,
    confirmed: Lsn,
    last_processed: Lsn,
    idle_wal_end: Option<Lsn>,
    received: Lsn,
    last_status: Instant,
    /// When systemd last got a STATUS= line.
    last_notify_status: Instant,
    sent_confirmed: Lsn,
    metrics: Metrics,
    health: Health,
    /// Monolith DDL already reported (each is reported once).
    ddl_seen: HashSet<(TableName, String)>,
    /// Problems the periodic catalog check finds (`catalog::watch`).
    catalog_problems: Option<mpsc::UnboundedReceiver<CatalogProblem>>,
    /// Stop cleanly once every side stream caught up (`ReaderExit::Join`).
    join_sides: bool,
    /// The stop request (a wait for a full queue gives way to it).
    shutdown: CancellationToken,
}

impl Reader {
    /// Builds the reader; `confirmed` is the slot's confirmed position at start.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        tls: TlsConnector,
        router: Router,
        links: Vec<TargetLink>,
        wake: Arc<Notify>,
        confirmed: Lsn,
        metrics: Metrics,
        health: Health,
    ) -> Reader {
        Reader {
            settings,
            tls,
            router,
            links,
            wake,
            relations: Relations::default(),
            open: None,
            confirmed,
            last_processed: confirmed,
            idle_wal_end: None,
            received: confirmed,
            last_status: Instant::now(),
            last_notify_status: Instant::now()
                .checked_sub(Duration::from_secs(60))
                .unwrap_or_else(Instant::now),
            sent_confirmed: Lsn::ZERO,
            metrics,
            health,
            ddl_seen: HashSet::new(),
            catalog_problems: None,
            join_sides: false,
            shutdown: CancellationToken::new(),
        }
    }

    /// Takes the problems the periodic catalog check finds: each stops the table's owners.
    pub fn with_catalog_problems(mut self, rx: mpsc::UnboundedReceiver<CatalogProblem>) -> Reader {
        self.catalog_problems = Some(rx);
        self
    }

    /// Ends cleanly once every side stream has caught up, so the daemon starts again and joins
    /// them to their targets.
    pub fn with_join_sides(mut self, join: bool) -> Reader {
        self.join_sides = join;
        self
    }

    /// Streams until `shutdown`, reconnecting with backoff after failures.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<ReaderExit, ReaderError> {
        self.shutdown = shutdown.clone();
        let mut attempts = 0u32;
        loop {
            let result = self.stream_once(&shutdown).await;
            self.metrics.source_connected.set(0);
            self.health.set_source_connected(false);
            match result {
                Ok(StreamEnd::Shutdown) | Err(ReaderError::Stopping) => {
                    return Ok(ReaderExit::Stopped)
                }
                Ok(StreamEnd::Join) => return Ok(ReaderExit::Join),
                Ok(StreamEnd::RetryTarget) => {
                    attempts = 0;
                    self.barrier(self.restart_patience()).await?;
                }
                Err(ReaderError::TargetGone(t)) => return Err(ReaderError::TargetGone(t)),
                Err(e) => {
                    attempts += 1;
                    let delay = crate::backoff::backoff(1.0, 30.0, attempts);
                    tracing::warn!(
                        sqlstate = sqlstate_of(&e),
                        attempt = attempts,
                        retry_in_secs = delay.as_secs_f64(),
                        confirmed = %self.confirmed,
                        "replication stream lost, reconnecting: {}",
                        e
                    );
                    self.barrier(self.restart_patience()).await?;
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(ReaderExit::Stopped),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
            self.metrics.stream_restarts.inc();
            if shutdown.is_cancelled() {
                return Ok(ReaderExit::Stopped);
            }
        }
    }

    /// Every target's name and published status, for `/health`.
    fn target_statuses(&self) -> Vec<(String, TargetStatus)> {
        self.links
            .iter()
            .map(|l| (l.name.clone(), l.status.borrow().clone()))
            .collect()
    }

    fn update_confirmed(&mut self) {
        let idle = if self.open.is_none() {
            self.idle_wal_end
        } else {
            None
        };
        let positions: Vec<_> = self
            .links
            .iter()
            .map(|l| {
                let status = l.status.borrow();
                l.pos.for_confirmation(
                    status.accepts_changes() && !l.tx.is_detached(),
                    status.committed,
                )
            })
            .collect();
        let c = confirmable(&positions, self.last_processed, idle);
        if c > self.confirmed {
            self.confirmed = c;
            self.metrics.confirmed_lsn.set(c.0 as i64);
        }
    }

    async fn send_status(
        &mut self,
        conn: &mut ReplicationConn,
        force: bool,
    ) -> Result<(), ReaderError> {
        self.update_confirmed();
        if !status_due(
            force,
            self.confirmed,
            self.sent_confirmed,
            self.last_status.elapsed(),
            STATUS_INTERVAL,
        ) {
            return Ok(());
        }
        let msg = protocol::encode_status_update(
            self.received.max(self.confirmed),
            self.confirmed,
            self.confirmed,
            protocol::pg_now(),
            false,
        );
        conn.send_copy_data(&msg).await?;
        self.sent_confirmed = self.confirmed;
        self.last_status = Instant::now();
        Ok(())
    }

    /// Every side stream has been caught up (under a second behind, taking changes) for
    /// `JOIN_AFTER_TICKS` ticks in a row, and no copy is running: a clean stop now lets the
    /// next start join them (`daemon::side`).
    fn sides_caught_up(&mut self) -> bool {
        if !self.join_sides || !self.links.iter().any(|l| l.side.is_some()) {
            return false;
        }
        let copying = self.links.iter().any(|l| l.hold.is_some() || l.rejoin);
        let now = protocol::pg_now();
        let mut all = true;
        for l in &mut self.links {
            let Some(ticks) = l.side.as_mut() else {
                continue;
            };
            let (committed, taking) = {
                let s = l.status.borrow();
                (s.committed, s.accepts_changes())
            };
            let caught_up =
                !copying && taking && !l.tx.is_detached() && l.pos.lag_secs(committed, now) < 1.0;
            *ticks = if caught_up { *ticks + 1 } else { 0 };
            all &= *ticks >= JOIN_AFTER_TICKS;
        }
        all
    }

    /// Held targets: drained once they hold everything dispatched before the hold's position
    /// (with `may_ask`, the server is asked for a keepalive while it has not said it passed
    /// it: once per tick, never in answer to a keepalive); with `may_release` — only where the
    /// caller restarts the stream at once — released ones are let go to rejoin with one stream
    /// restart.
    async fn check_holds(
        &mut self,
        conn: &mut ReplicationConn,
        may_ask: bool,
        may_release: bool,
    ) -> Result<(), ReaderError> {
        let mut ask = false;
        for l in &mut self.links {
            let Some(h) = &l.hold else { continue };
            if h.is_released() {
                if !may_release {
                    continue;
                }
                tracing::info!(target_name = %l.name, at = %h.at(), "copy done; the target rejoins the stream");
                l.hold = None;
                l.hold_reached = None;
                l.rejoin = true;
            } else if let Some(before) = l.hold_reached {
                if l.status.borrow().committed >= before {
                    h.set_drained();
                }
            } else {
                ask = true;
            }
        }
        if ask && may_ask && self.open.is_none() {
            let msg = protocol::encode_status_update(
                self.received.max(self.confirmed),
                self.confirmed,
                self.confirmed,
                protocol::pg_now(),
                true,
            );
            conn.send_copy_data(&msg).await?;
        }
        Ok(())
    }

    fn update_lag(&mut self) {
        let now = protocol::pg_now();
        let clock = Instant::now();
        let hung = Duration::from_secs_f64(self.settings.apply.hung_secs);
        let mut overall = 0.0f64;
        let mut not_progressing = Vec::new();
        for l in &mut self.links {
            let committed = l.status.borrow().committed;
            let lag = l.pos.lag_secs(committed, now);
            let stuck = l.pos.stuck_for(committed, clock);
            self.metrics
                .target_lag_seconds
                .with_label_values(&[&l.name])
                .set(lag);
            self.metrics
                .target_stuck_seconds
                .with_label_values(&[&l.name])
                .set(stuck.as_secs_f64());
            if stuck >= hung {
                not_progressing.push(l.name.clone());
            }
            overall = overall.max(lag);
        }
        self.health.set_not_progressing(not_progressing);
        self.publish_queues();
        if let Some(open) = &self.open {
            if open.sending() {
                overall = overall.max(seconds_since(open.xact.commit_time, now));
            }
        }
        self.metrics.lag_seconds.set(overall);
        self.metrics.lag_bytes.set(
            i64::try_from(self.received.0.saturating_sub(self.confirmed.0)).unwrap_or(i64::MAX),
        );
        self.health.set_lag(overall, self.confirmed);
        if self.last_notify_status.elapsed() >= Duration::from_secs(5) {
            self.last_notify_status = Instant::now();
            crate::notify::status(&format!(
                "streaming; lag {overall:.1} s; confirmed {}; {} targets",
                self.confirmed,
                self.links.len()
            ));
        }
    }

    /// The end of a stream on shutdown: quiesce the targets (for at most most of
    /// `apply.shutdown_secs`: the daemon cancels statements that hold them up), confirm what is
    /// durable, close.
    async fn stop_streaming(&mut self, conn: ReplicationConn) -> Result<StreamEnd, ReaderError> {
        self.end_streaming(conn, StreamEnd::Shutdown).await
    }

    /// [`Reader::stop_streaming`], ending with `end`.
    async fn end_streaming(
        &mut self,
        mut conn: ReplicationConn,
        end: StreamEnd,
    ) -> Result<StreamEnd, ReaderError> {
        let grace = Duration::from_secs_f64(self.settings.apply.shutdown_secs * 0.8);
        match tokio::time::timeout(grace, self.barrier(grace)).await {
            Ok(r) => r?,
            // Positions stay as they were: what the silent targets made durable is what their
            // status says, and only that is confirmed.
            Err(_) => tracing::warn!(
                "targets did not finish within apply.shutdown_secs; confirming what they made durable"
            ),
        }
        self.send_status(&mut conn, true).await?;
        conn.close().await;
        Ok(end)
    }

    async fn stream_once(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<StreamEnd, ReaderError> {
        let mut conn = tokio::select! {
            _ = shutdown.cancelled() => return Ok(StreamEnd::Shutdown),
            c = ReplicationConn::connect(&self.settings.source, &self.tls) => c?,
        };
        let options = [
            ("proto_version", "1".to_string()),
            ("publication_names", quote_ident(&self.settings.publication)),
        ];
        conn.start_replication(&self.settings.slot, Lsn::ZERO, &options)
            .await?;
        self.metrics.source_connected.set(1);
        self.health.set_source_connected(true);
        tracing::info!(slot = %self.settings.slot, confirmed = %self.confirmed, "streaming");
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                // 1. Shutdown: quiesce targets, confirm what is durable, leave.
                _ = shutdown.cancelled() => return self.stop_streaming(conn).await,
                // 2. A target changed state: a retry-ready failed target restarts the stream.
                _ = self.wake.notified() => {
                    // A held target may have committed what drains it.
                    if self.links.iter().any(|l| l.hold.is_some()) {
                        self.check_holds(&mut conn, false, true).await?;
                    }
                    if self.needs_restream() {
                        self.send_status(&mut conn, true).await?;
                        conn.close().await;
                        return Ok(StreamEnd::RetryTarget);
                    }
                    self.health.set_targets(self.target_statuses());
                }
                // 3. The catalog check found monolith DDL pgcarve cannot follow.
                Some(p) = next_problem(&mut self.catalog_problems) => {
                    let targets = self.router.targets_for(&p.table).to_vec();
                    match self.halt(&mut conn, p, &targets).await {
                        Err(ReaderError::Stopping) => return self.stop_streaming(conn).await,
                        r => r?,
                    }
                }
                // 4. Timer: lag, and a status update when due.
                _ = tick.tick() => {
                    crate::notify::watchdog();
                    self.check_holds(&mut conn, true, true).await?;
                    if self.needs_restream() {
                        self.send_status(&mut conn, true).await?;
                        conn.close().await;
                        return Ok(StreamEnd::RetryTarget);
                    }
                    if self.sides_caught_up() {
                        tracing::info!("every side stream caught up; stopping cleanly to join them to their targets");
                        return self.end_streaming(conn, StreamEnd::Join).await;
                    }
                    self.update_lag();
                    self.health.set_targets(self.target_statuses());
                    self.send_status(&mut conn, false).await?;
                }
                // 5. The next message from the server.
                data = conn.next_copy_data() => {
                    let Some(data) = data? else {
                        return Err(ReaderError::Stream("server ended the replication stream".into()));
                    };
                    match self.handle(&mut conn, data).await {
                        Err(ReaderError::Stopping) => return self.stop_streaming(conn).await,
                        r => r?,
                    }
                }
            }
        }
    }

    async fn handle(
        &mut self,
        conn: &mut ReplicationConn,
        data: bytes::Bytes,
    ) -> Result<(), ReaderError> {
        match protocol::parse_server_message(data)
            .map_err(|e| ReaderError::Stream(e.to_string()))?
        {
            ServerMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.received = self.received.max(wal_end);
                if self.open.is_none() {
                    self.idle_wal_end = Some(wal_end);
                    // Everything before `wal_end` has been sent.
                    for l in &mut self.links {
                        l.pass_hold(wal_end);
                    }
                    // A held target with nothing left to commit is drained now, not at the
                    // next tick.
                    if self.links.iter().any(|l| l.hold.is_some()) {
                        self.check_holds(conn, false, false).await?;
                    }
                }
                self.send_status(conn, reply_requested).await?;
            }
            ServerMessage::XLogData {
                wal_start, data, ..
            } => {
                self.received = self.received.max(wal_start);
                self.metrics.received_lsn.set(self.received.0 as i64);
                let msg = pgoutput::decode(data, false)?;
                self.route(conn, msg).await?;
            }
        }
        Ok(())
    }

    async fn route(&mut self, conn: &mut ReplicationConn, msg: Message) -> Result<(), ReaderError> {
        match msg {
            Message::Begin(b) => {
                for l in &mut self.links {
                    l.pass_hold(b.final_lsn);
                }
                let routes = self.links.iter().map(|l| {
                    // Held until the reader itself lets go (`check_holds`, which restarts the
                    // stream at once): a target released by the copy but sent this
                    // transaction before that restart would commit past the ones it missed.
                    let held = l.hold.as_ref().is_some_and(|h| b.final_lsn >= h.at());
                    route_at_begin(Self::takes(l) && !held, b.final_lsn, l.pos.skip_below())
                });
                let xact = XactInfo {
                    final_lsn: b.final_lsn,
                    commit_time: b.commit_time,
                    xid: b.xid,
                };
                self.idle_wal_end = None;
                self.open = Some(OpenTxn::begin(xact, routes));
            }
            Message::Commit(c) => {
                let open = self
                    .open
                    .take()
                    .ok_or_else(|| ReaderError::Stream("Commit without Begin".into()))?;
                let commit_time = open.xact.commit_time;
                for (i, at) in open.commit(c.end_lsn) {
                    // Missed: not sent, yet the target needs it: it stays pending (and
                    // lagging) at what it has, even once it takes changes again, until a
                    // barrier restarts the stream from what it has.
                    if let AtCommit::Send(msg) = at {
                        self.send(conn, i, msg).await?;
                    }
                    self.links[i].pos.dispatch(c.end_lsn, commit_time);
                }
                self.last_processed = c.end_lsn;
            }
            Message::Relation(r) => {
                if let Some(ddl) = self.relations.describe(r, &self.router) {
                    self.on_ddl(conn, ddl).await?;
                }
            }
            Message::Insert(ins) => {
                let rel = self.relation(ins.relation)?;
                self.add(conn, Change::Insert { rel, new: ins.new }).await?;
            }
            Message::Update(up) => {
                let rel = self.relation(up.relation)?;
                let change = Change::Update {
                    rel,
                    old: up.old,
                    new: up.new,
                };
                self.add(conn, change).await?;
            }
            Message::Delete(del) => {
                let rel = self.relation(del.relation)?;
                self.add(conn, Change::Delete { rel, old: del.old }).await?;
            }
            Message::Truncate(t) => {
                let parts = truncate_parts(&t, &self.relations, self.links.len())
                    .map_err(ReaderError::Stream)?;
                let final_lsn = self.open.as_ref().map_or(Lsn::ZERO, |o| o.xact.final_lsn);
                for (i, mut change) in parts {
                    // A table whose copy holds this transaction is not truncated again.
                    if let Change::Truncate { rels, .. } = &mut change {
                        rels.retain(|r| !self.links[i].in_copy(&r.table, final_lsn));
                        if rels.is_empty() {
                            continue;
                        }
                    }
                    self.push(conn, i, change).await?;
                }
            }
            // Origins, types (we bind text, so type names are not needed) and logical decoding
            // messages carry nothing to apply.
            Message::Origin(_) | Message::Type(_) | Message::Message(_) => {}
            other => {
                return Err(ReaderError::Stream(format!(
                    "unexpected pgoutput message '{}' (streaming and two-phase are not requested)",
                    other.tag() as char
                )))
            }
        }
        Ok(())
    }

    fn relation(&self, oid: u32) -> Result<Arc<crate::link::RelationInfo>, ReaderError> {
        self.relations
            .get(oid)
            .cloned()
            .map_err(ReaderError::Stream)
    }

    /// Adds a row change to the open transaction's part of every owning target.
    async fn add(&mut self, conn: &mut ReplicationConn, change: Change) -> Result<(), ReaderError> {
        // Our own Arc, so its target list can be read while `self` is borrowed mutably.
        let rel = change.relation().expect("a row change").clone();
        let final_lsn = self.open.as_ref().map_or(Lsn::ZERO, |o| o.xact.final_lsn);
        // Owners whose copy of the table holds this transaction already do not get it again.
        let owners: Vec<usize>;
        let targets = if self.links.iter().all(|l| l.copied_at.is_empty()) {
            &rel.targets[..]
        } else {
            owners = rel
                .targets
                .iter()
                .copied()
                .filter(|&i| !self.links[i].in_copy(&rel.table, final_lsn))
                .collect();
            &owners[..]
        };
        let Some((last, rest)) = targets.split_last() else {
            return Ok(());
        };
        for &i in rest {
            self.push(conn, i, change.clone()).await?;
        }
        self.push(conn, *last, change).await
    }

    /// Adds a change to target `i`'s part; sends a chunk once it is full.
    async fn push(
        &mut self,
        conn: &mut ReplicationConn,
        i: usize,
        change: Change,
    ) -> Result<(), ReaderError> {
        let chunk_size = self.settings.apply.chunk_changes;
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| ReaderError::Stream("row change outside a transaction".into()))?;
        if let Some(chunk) = open.push(i, change, chunk_size) {
            self.send(conn, i, chunk).await?;
        }
        Ok(())
    }
}

/// The SQLSTATE of a server error, for the log line; empty for anything else.
fn sqlstate_of(e: &ReaderError) -> &str {
    match e {
        ReaderError::Conn(c) => c.code().unwrap_or(""),
        _ => "",
    }
}
