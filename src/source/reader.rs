//! The reader task: one replication stream, decoded once, routed to every owning target.
//!
//! ```text
//!  slot ──CopyBoth──► reader ──Chunk/Barrier──► [bounded mpsc] ──► apply task (target A)
//!                       │    └──────────────────► [bounded mpsc] ──► apply task (target B)
//!                       ◄──── committed LSN (watch) ─────────────────┘
//!                       └──standby status update (confirm = rule in `source`)──► slot
//! ```
//!
//! Whole source transactions travel as chunks (at most `apply.chunk_changes` changes each);
//! the awaited `send` on a full channel is the backpressure that stops reading, so the slot, not
//! our memory, holds the WAL. Status updates keep flowing while we wait.
//!
//! Restarts (connection loss, a failed target ready to retry) first send a barrier to
//! every target: each finishes or rolls back its open group and answers with its committed LSN.
//! Then the stream starts again from the slot's confirmed position and each target skips what it
//! holds (`final_lsn < committed`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::health::Health;
use crate::link::TargetStatus;
use crate::link::{ApplyMsg, Change, CommitInfo, RelationInfo, XactInfo};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::pg::quote_ident;
use crate::pgoutput::{self, Message};
use crate::route::Router;
use crate::source::conn::{ConnError, ReplicationConn};
use crate::source::protocol::{self, PgTimestamp, ServerMessage};
use crate::source::{confirmable, TargetPosition};
use crate::table::TableName;
use crate::tls::TlsConnector;

/// Send a status update at least this often, even when nothing changed.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// How often the reader recomputes lag and sends a changed confirmation.
const TICK: Duration = Duration::from_secs(1);

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
}

/// The reader's handle on one target.
pub struct TargetLink {
    /// Target name.
    pub name: String,
    /// Channel to the apply task.
    pub tx: crate::link::queue::QueueTx,
    /// The apply task's published status.
    pub status: watch::Receiver<TargetStatus>,
    dispatched: Lsn,
    skip_below: Lsn,
    /// (end LSN, commit time) of dispatched transactions not yet committed there.
    in_flight: VecDeque<(Lsn, PgTimestamp)>,
}

impl TargetLink {
    /// Links a target whose progress is `committed`.
    pub fn new(
        name: String,
        tx: crate::link::queue::QueueTx,
        status: watch::Receiver<TargetStatus>,
        committed: Lsn,
    ) -> TargetLink {
        TargetLink {
            name,
            tx,
            status,
            dispatched: committed,
            skip_below: committed,
            in_flight: VecDeque::new(),
        }
    }
}

/// What the open transaction means for one target, decided at its Begin.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Its changes are collected and sent.
    Send,
    /// The target already has this transaction (it ends before what it holds).
    Held,
    /// The target is not taking changes: if the transaction has changes for it, it misses them
    /// and must hold the slot before them until it has them.
    NotTaking,
}

/// The open transaction's part for one target.
struct TxnPart {
    route: Route,
    /// Changes not yet sent.
    buf: Vec<Change>,
    /// The transaction has changes for this target (sent, buffered or missed).
    seen: bool,
}

struct OpenTxn {
    xact: XactInfo,
    parts: Vec<TxnPart>,
}

enum StreamEnd {
    Shutdown,
    RetryTarget,
}

/// The reader task's state.
pub struct Reader {
    settings: Settings,
    tls: TlsConnector,
    router: Router,
    links: Vec<TargetLink>,
    wake: Arc<Notify>,
    relations: HashMap<u32, Arc<RelationInfo>>,
    generation: u64,
    open: Option<OpenTxn>,
    confirmed: Lsn,
    last_processed: Lsn,
    idle_wal_end: Option<Lsn>,
    received: Lsn,
    last_status: Instant,
    sent_confirmed: Lsn,
    metrics: Metrics,
    health: Health,
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
            relations: HashMap::new(),
            generation: 0,
            open: None,
            confirmed,
            last_processed: confirmed,
            idle_wal_end: None,
            received: confirmed,
            last_status: Instant::now(),
            sent_confirmed: Lsn::ZERO,
            metrics,
            health,
        }
    }

    /// Streams until `shutdown`, reconnecting with backoff after failures.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ReaderError> {
        let mut attempts = 0u32;
        loop {
            let result = self.stream_once(&shutdown).await;
            self.metrics.source_connected.set(0);
            self.health.set_source_connected(false);
            match result {
                Ok(StreamEnd::Shutdown) => return Ok(()),
                Ok(StreamEnd::RetryTarget) => {
                    attempts = 0;
                    self.barrier().await?;
                }
                Err(ReaderError::TargetGone(t)) => return Err(ReaderError::TargetGone(t)),
                Err(e) => {
                    attempts += 1;
                    let delay = crate::backoff::backoff(1.0, 30.0, attempts);
                    tracing::warn!(
                        sqlstate = e_code(&e),
                        attempt = attempts,
                        retry_in_secs = delay.as_secs_f64(),
                        confirmed = %self.confirmed,
                        "replication stream lost, reconnecting: {}",
                        e
                    );
                    self.barrier().await?;
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
            self.metrics.stream_restarts.inc();
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
    }

    fn positions(&self) -> Vec<TargetPosition> {
        self.links
            .iter()
            .map(|l| {
                let status = l.status.borrow();
                TargetPosition {
                    // A target that is not taking changes misses the transactions streamed
                    // meanwhile: it stays pending at what it has, whatever was dispatched.
                    // (Once it takes changes again, what it missed is in `dispatched`, until
                    // the next barrier restarts the stream from what it has.)
                    dispatched: if status.accepts_changes() {
                        l.dispatched
                    } else {
                        Lsn(u64::MAX)
                    },
                    committed: status.committed,
                }
            })
            .collect()
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
        let c = confirmable(&self.positions(), self.last_processed, idle);
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
        if !force
            && self.confirmed == self.sent_confirmed
            && self.last_status.elapsed() < STATUS_INTERVAL
        {
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

    fn update_lag(&mut self) {
        let now = protocol::pg_now();
        let mut overall = 0.0f64;
        for l in &mut self.links {
            let committed = l.status.borrow().committed;
            while l
                .in_flight
                .front()
                .is_some_and(|(end, _)| *end <= committed)
            {
                l.in_flight.pop_front();
            }
            let lag = l
                .in_flight
                .front()
                .map_or(0.0, |(_, t)| ((now - t) as f64 / 1e6).max(0.0));
            self.metrics
                .target_lag_seconds
                .with_label_values(&[&l.name])
                .set(lag);
            overall = overall.max(lag);
        }
        if let Some(open) = &self.open {
            if open.parts.iter().any(|p| p.route == Route::Send) {
                overall = overall.max(((now - open.xact.commit_time) as f64 / 1e6).max(0.0));
            }
        }
        self.metrics.lag_seconds.set(overall);
        self.health.set_lag(overall, self.confirmed);
    }

    /// Quiesces every target and resets the dispatch state to what each has committed.
    async fn barrier(&mut self) -> Result<(), ReaderError> {
        let mut replies = Vec::with_capacity(self.links.len());
        for l in &self.links {
            let (tx, rx) = oneshot::channel();
            l.tx.send(ApplyMsg::Barrier(tx))
                .await
                .map_err(|_| ReaderError::TargetGone(l.name.clone()))?;
            replies.push(rx);
        }
        let mut committed = Vec::with_capacity(replies.len());
        for (l, rx) in self.links.iter().zip(replies) {
            committed.push(
                rx.await
                    .map_err(|_| ReaderError::TargetGone(l.name.clone()))?,
            );
        }
        // Confirm what the barrier made durable before forgetting what was in flight.
        self.update_confirmed();
        for (l, c) in self.links.iter_mut().zip(committed) {
            l.dispatched = c;
            l.skip_below = c;
            l.in_flight.clear();
        }
        self.open = None;
        self.idle_wal_end = None;
        // The stream restarts from the confirmed position: everything after it will be read
        // again, so it no longer counts as processed. Without this, a target that was reset to
        // an older position would not be pending, and we would confirm past what it needs.
        self.last_processed = self.confirmed;
        Ok(())
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
                _ = shutdown.cancelled() => {
                    self.barrier().await?;
                    self.send_status(&mut conn, true).await?;
                    conn.close().await;
                    return Ok(StreamEnd::Shutdown);
                }
                // 2. A target changed state: a retry-ready failed target restarts the stream.
                _ = self.wake.notified() => {
                    if self.links.iter().any(|l| matches!(l.status.borrow().state,
                        crate::link::TargetState::Stalled { retry_ready: true, .. })) {
                        self.send_status(&mut conn, true).await?;
                        conn.close().await;
                        return Ok(StreamEnd::RetryTarget);
                    }
                    self.health.set_targets(self.target_statuses());
                }
                // 3. Timer: lag, and a status update when due.
                _ = tick.tick() => {
                    self.update_lag();
                    self.health.set_targets(self.target_statuses());
                    self.send_status(&mut conn, false).await?;
                }
                // 4. The next message from the server.
                data = conn.next_copy_data() => {
                    let Some(data) = data? else {
                        return Err(ReaderError::Stream("server ended the replication stream".into()));
                    };
                    self.handle(&mut conn, data).await?;
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
                let parts = self
                    .links
                    .iter()
                    .map(|l| TxnPart {
                        route: if !l.status.borrow().accepts_changes() {
                            Route::NotTaking
                        } else if b.final_lsn < l.skip_below {
                            Route::Held
                        } else {
                            Route::Send
                        },
                        buf: Vec::new(),
                        seen: false,
                    })
                    .collect();
                self.idle_wal_end = None;
                self.open = Some(OpenTxn {
                    xact: XactInfo {
                        final_lsn: b.final_lsn,
                        commit_time: b.commit_time,
                        xid: b.xid,
                    },
                    parts,
                });
            }
            Message::Commit(c) => {
                let open = self
                    .open
                    .take()
                    .ok_or_else(|| ReaderError::Stream("Commit without Begin".into()))?;
                let OpenTxn { xact, parts } = open;
                for (i, part) in parts.into_iter().enumerate() {
                    if !part.seen || part.route == Route::Held {
                        continue;
                    }
                    if part.route == Route::NotTaking {
                        // Not sent, yet the target needs it: it stays pending (and lagging)
                        // at what it has, even once it takes changes again, until a barrier
                        // restarts the stream from what it has.
                        let l = &mut self.links[i];
                        l.dispatched = l.dispatched.max(c.end_lsn);
                        l.in_flight.push_back((c.end_lsn, xact.commit_time));
                        continue;
                    }
                    let msg = ApplyMsg::Chunk {
                        xact,
                        changes: part.buf,
                        commit: Some(CommitInfo { end_lsn: c.end_lsn }),
                    };
                    self.send(conn, i, msg).await?;
                    let l = &mut self.links[i];
                    l.dispatched = c.end_lsn;
                    l.in_flight.push_back((c.end_lsn, xact.commit_time));
                }
                self.last_processed = c.end_lsn;
            }
            Message::Relation(r) => {
                let table = TableName {
                    schema: r.schema().to_string(),
                    name: r.name.clone(),
                };
                self.generation += 1;
                let targets = self.router.targets_for(&table).to_vec();
                self.relations.insert(
                    r.oid,
                    Arc::new(RelationInfo {
                        table,
                        relation: r,
                        generation: self.generation,
                        targets,
                    }),
                );
            }
            Message::Insert(ins) => {
                let rel = self.relation(ins.relation)?;
                self.add(
                    conn,
                    &rel,
                    Change::Insert {
                        rel: rel.clone(),
                        new: ins.new,
                    },
                )
                .await?;
            }
            Message::Update(up) => {
                let rel = self.relation(up.relation)?;
                let change = Change::Update {
                    rel: rel.clone(),
                    old: up.old,
                    new: up.new,
                };
                self.add(conn, &rel, change).await?;
            }
            Message::Delete(del) => {
                let rel = self.relation(del.relation)?;
                self.add(
                    conn,
                    &rel,
                    Change::Delete {
                        rel: rel.clone(),
                        old: del.old,
                    },
                )
                .await?;
            }
            Message::Truncate(t) => {
                let mut per_target: Vec<Vec<Arc<RelationInfo>>> =
                    vec![Vec::new(); self.links.len()];
                for oid in &t.relations {
                    let rel = self.relation(*oid)?;
                    for &i in &rel.targets {
                        per_target[i].push(rel.clone());
                    }
                }
                for (i, rels) in per_target.into_iter().enumerate() {
                    if rels.is_empty() {
                        continue;
                    }
                    let change = Change::Truncate {
                        rels,
                        cascade: t.cascade(),
                        restart_identity: t.restart_identity(),
                    };
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

    fn relation(&self, oid: u32) -> Result<Arc<RelationInfo>, ReaderError> {
        self.relations.get(&oid).cloned().ok_or_else(|| {
            ReaderError::Stream(format!(
                "change for relation {oid} before its Relation message"
            ))
        })
    }

    async fn add(
        &mut self,
        conn: &mut ReplicationConn,
        rel: &Arc<RelationInfo>,
        change: Change,
    ) -> Result<(), ReaderError> {
        // `rel` is our own Arc, so its target list can be read while `self` is borrowed mutably.
        let rel = rel.clone();
        let Some((last, rest)) = rel.targets.split_last() else {
            return Ok(());
        };
        for &i in rest {
            self.push(conn, i, change.clone()).await?;
        }
        self.push(conn, *last, change).await
    }

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
        let part = &mut open.parts[i];
        part.seen = true;
        if part.route != Route::Send {
            return Ok(());
        }
        part.buf.push(change);
        if part.buf.len() >= chunk_size {
            let changes = std::mem::replace(&mut part.buf, Vec::with_capacity(chunk_size));
            let xact = open.xact;
            self.send(
                conn,
                i,
                ApplyMsg::Chunk {
                    xact,
                    changes,
                    commit: None,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Sends to a target, waiting for room (backpressure) while keeping the source connection
    /// alive with status updates.
    async fn send(
        &mut self,
        conn: &mut ReplicationConn,
        i: usize,
        msg: ApplyMsg,
    ) -> Result<(), ReaderError> {
        let tx = self.links[i].tx.clone();
        let weight = tx.weight(&msg);
        let mut msg = Some(msg);
        loop {
            tokio::select! {
                room = tx.room(weight) => {
                    if let Some(m) = msg.take() {
                        tx.push(m, room)
                            .map_err(|_| ReaderError::TargetGone(self.links[i].name.clone()))?;
                    }
                    return Ok(());
                }
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    self.update_lag();
                    self.send_status(conn, true).await?;
                }
            }
        }
    }
}

fn e_code(e: &ReaderError) -> &str {
    match e {
        ReaderError::Conn(c) => c.code().unwrap_or(""),
        _ => "",
    }
}
