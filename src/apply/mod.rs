//! Apply: one task per target, owning its connection, fed by a bounded channel.
//!
//! Every source transaction's changes for this target are applied inside one target
//! transaction, together with the progress row (`pgcarve.progress`) holding that source
//! transaction's commit end LSN. Consecutive source transactions already waiting in the channel
//! are grouped into one target transaction (group commit); a source transaction is never split.
//! After COMMIT the task publishes its durably committed LSN on a `watch`, which the reader uses
//! to decide what may be confirmed to the slot.
//!
//! Exactly once: the progress row commits atomically with the rows, so after any crash the
//! target's progress LSN says exactly which source transactions it holds. The reader skips those
//! when it streams again; the task also skips any transaction whose commit LSN lies below its
//! progress (after a reconnect it reloads the progress row first, because a COMMIT whose answer
//! was lost may have succeeded).
//!
//! Failure: a change the target rejects rolls the group back, is logged and counted (SQLSTATE,
//! table, target, LSN; never values) and puts the task in the failed state: it discards what
//! arrives, and after a backoff reports "ready to retry". The reader then restarts the stream
//! from the slot's confirmed position (held back by this target), and the transaction is tried
//! again. Nothing is skipped and nothing is buffered for a stalled target.

pub mod error;
pub mod progress;
pub mod statements;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use futures::stream::FuturesOrdered;
use futures::{SinkExt, StreamExt};
use postgres_types::{Format, IsNull, ToSql, Type};
use tokio::sync::watch;
use tokio_postgres::{Client, Statement};

use crate::config::{ApplyConfig, Target};
use crate::conninfo::ConnInfo;
use crate::link::{ApplyMsg, Change, CommitInfo, RelationInfo, XactInfo};
use crate::link::{TargetState, TargetStatus};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::pg::safe_pg_error;
use crate::pgoutput::{Tuple, Value};
use crate::table::TableName;
use crate::tls::TlsConnector;

pub use error::ApplyError;
use progress::ProgressKey;
use statements::{Plan, Source, TargetColumn, TargetTable};

/// How often an idle target's WAL flush position is read while commits await durability.
const FLUSH_POLL: Duration = Duration::from_millis(100);

/// Idle polls after which the remaining commits are made durable with a synchronous commit.
const IDLE_POLLS_BEFORE_FORCE: u32 = 10;

/// The target's WAL insert and flush positions (durability is read from them).
const WAL_POSITION_SQL: &str =
    "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text";

/// Statements every group commit runs, prepared once per connection.
struct CommitStatements {
    /// Writes the progress row.
    upsert: Statement,
    /// [`WAL_POSITION_SQL`].
    position: Statement,
}

async fn prepare_commit_statements(
    client: &Client,
) -> Result<CommitStatements, tokio_postgres::Error> {
    Ok(CommitStatements {
        upsert: progress::prepare_upsert(client).await?,
        position: client.prepare(WAL_POSITION_SQL).await?,
    })
}

/// Statements kept in flight on a target connection at once.
const PIPELINE_DEPTH: usize = 256;

/// A run of at least this many inserts into one table goes through COPY. COPY costs two round
/// trips to set up, so short runs are cheaper as pipelined statements.
const COPY_MIN_ROWS: usize = 8;

/// A pending run of inserts is sent once it has this many rows (bounds the worker's memory).
const COPY_MAX_ROWS: usize = 10_000;

/// COPY data is sent in pieces of about this size.
const COPY_BUFFER: usize = 256 * 1024;

/// `StmtKey::kind` of the COPY statement.
const KIND_COPY: u8 = 3;

/// `StmtKey::kind` of an UPDATE that writes identity columns between ALTERs.
const KIND_UPDATE_UNGUARDED: u8 = 4;

/// A failure, with the commit LSN of the source transaction it belongs to when known (a
/// pipelined statement may fail after later transactions were sent).
struct Failed {
    err: ApplyError,
    lsn: Option<Lsn>,
}

impl From<ApplyError> for Failed {
    fn from(err: ApplyError) -> Failed {
        Failed { err, lsn: None }
    }
}

impl From<statements::PlanError> for Failed {
    fn from(err: statements::PlanError) -> Failed {
        ApplyError::Plan(err).into()
    }
}

/// Consecutive inserts into one table, not yet sent, each with its source transaction's LSN.
struct InsertRun {
    rel: Arc<RelationInfo>,
    rows: Vec<(Change, Lsn)>,
}

/// One pipelined row statement awaiting its answer.
type Flight = Pin<Box<dyn Future<Output = Result<(), Failed>> + Send>>;

/// A value bound as text, so the target's input function parses exactly what the source's
/// output function wrote. `Debug` shows only whether it is NULL and its length.
pub struct TextParam(Option<Bytes>);

impl std::fmt::Debug for TextParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("NULL"),
            Some(b) => write!(f, "text({} bytes)", b.len()),
        }
    }
}

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(b) => {
                out.put_slice(b);
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    postgres_types::to_sql_checked!();
}

/// Why a target could not be prepared at start-up.
#[derive(Debug)]
pub enum StartError {
    /// Unreachable for now: retry.
    Transient(String),
    /// Schema problems an operator must fix, one per line.
    Fatal(Vec<String>),
}

/// A statement prepared on the target, with its parameter plan.
struct Prepared {
    stmt: Statement,
    plan: Plan,
}

#[derive(Hash, PartialEq, Eq)]
struct StmtKey {
    oid: u32,
    generation: u64,
    kind: u8,
    has_old: bool,
    new_mask: Option<Box<[u16]>>,
    old_mask: Option<Box<[u16]>>,
}

/// One target's apply task state.
pub struct Worker {
    name: String,
    conn: ConnInfo,
    tls: TlsConnector,
    client: Arc<Client>,
    /// Row statements sent and not yet answered, across the source transactions of the open
    /// group; drained before COPY, TRUNCATE and COMMIT.
    in_flight: FuturesOrdered<Flight>,
    tables: HashMap<TableName, TargetTable>,
    /// The tables this target owns (those missing from `tables` are gone from the target).
    owned: Vec<TableName>,
    stmts: HashMap<StmtKey, Arc<Prepared>>,
    commit_stmts: CommitStatements,
    key: ProgressKey,
    committed: Lsn,
    cfg: ApplyConfig,
    metrics: Metrics,
    status: watch::Sender<TargetStatus>,
    wake: Arc<tokio::sync::Notify>,
    in_txn: bool,
    /// The open group ends with a whole source transaction.
    group_complete: bool,
    group_end: Lsn,
    group_txns: u64,
    group_rows: HashMap<(u32, &'static str), (Arc<RelationInfo>, u64)>,
    /// Failed attempts since the last successful commit.
    failures: u32,
    /// Progress known to be on the target's disk: what is published to the reader (and so
    /// what the slot may be confirmed up to). Commits are asynchronous, so `committed` runs
    /// ahead of it until the target's WAL flush passes their commit records.
    durable: Lsn,
    /// Committed groups not yet known durable: (progress LSN, target WAL position after the
    /// COMMIT), oldest first.
    undurable: VecDeque<(Lsn, Lsn)>,
    /// Inserts waiting to be sent as one run (COPY when long enough).
    pending: Option<InsertRun>,
    /// After a failure, until the transactions of the failed group are committed: one source
    /// transaction per target transaction, and runs end with their transaction, so the good
    /// transactions before the bad one commit, and the bad one is named with its exact LSN.
    precise_until: Lsn,
    /// Commit LSN of the last source transaction started in the open group.
    group_last: Lsn,
}

async fn connect(conn: &ConnInfo, tls: &TlsConnector) -> Result<Client, tokio_postgres::Error> {
    let client = crate::pg::connect(conn, tls).await?;
    client
        .batch_execute(
            // Commits need not wait for the disk: the slot is confirmed only up to what the
            // target has flushed (see `Worker::durable`).
            "SET synchronous_commit = off; SET extra_float_digits = 3; \
             SET DateStyle = 'ISO'; SET IntervalStyle = 'postgres'",
        )
        .await?;
    // With synchronous standbys a failover keeps only what they confirmed: commits must wait
    // for them as the server is configured to, or "flushed" would not survive a failover.
    let standbys: String = client
        .query_one("SELECT current_setting('synchronous_standby_names')", &[])
        .await?
        .get(0);
    if !standbys.trim().is_empty() {
        client.batch_execute("RESET synchronous_commit").await?;
    }
    Ok(client)
}

/// Loads a target table's columns; `None` when the table does not exist.
async fn load_table(
    client: &Client,
    table: &TableName,
) -> Result<Option<TargetTable>, tokio_postgres::Error> {
    // The type rows are compared in (REPLICA IDENTITY FULL): the column's own, with its
    // modifier (char(8) is not `character`, which means char(1)), and for a domain its base
    // type, so the domain's constraints are not checked against old rows.
    let rows = client
        .query(
            "WITH RECURSIVE col AS ( \
                 SELECT a.attnum, a.atttypid AS typ, a.atttypmod AS typmod, 0 AS depth \
                 FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
               UNION ALL \
                 SELECT col.attnum, t.typbasetype, t.typtypmod, col.depth + 1 \
                 FROM col JOIN pg_type t ON t.oid = col.typ WHERE t.typtype = 'd' \
             ), base AS ( \
                 SELECT DISTINCT ON (attnum) attnum, format_type(typ, typmod) AS cmp_type, \
                        depth > 0 AS domain \
                 FROM col ORDER BY attnum, depth DESC \
             ) \
             SELECT a.attname::text, b.cmp_type, a.attnotnull, \
                    (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> ''), \
                    a.attidentity = 'a', b.domain \
             FROM pg_attribute a JOIN base b ON b.attnum = a.attnum \
             WHERE a.attrelid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await?;
    if rows.is_empty() {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()])
            .await?
            .get(0);
        if !exists {
            return Ok(None);
        }
    }
    let mut columns = HashMap::new();
    for r in rows {
        columns.insert(
            r.get::<_, String>(0),
            TargetColumn {
                type_name: r.get(1),
                domain: r.get(5),
                not_null: r.get(2),
                has_default: r.get(3),
                identity_always: r.get(4),
            },
        );
    }
    let has_identity_always = columns.values().any(|c| c.identity_always);
    // COPY acts like INSERT on plain and partitioned tables, except where rules (ignored by
    // COPY), row-level security (COPY FROM refuses it) or statement triggers (fired once per
    // COPY, not per INSERT) are involved: those tables always get INSERT.
    let kind = client
        .query_one(
            "SELECT c.relkind IN ('r', 'p') AND NOT c.relrowsecurity AND NOT c.relhasrules \
                    AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid \
                                    AND NOT t.tgisinternal AND (t.tgtype & 1) = 0), \
                    c.relkind = 'r' \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await?;
    Ok(Some(TargetTable {
        table: table.clone(),
        columns,
        has_identity_always,
        copy_ok: kind.get(0),
        plain: kind.get(1),
    }))
}

impl Worker {
    /// Connects, creates the progress table, loads and checks the owned tables against the
    /// source's columns. Returns the worker and its progress (`None`: nothing applied yet).
    pub async fn prepare(
        target: &Target,
        source_columns: &HashMap<TableName, Vec<String>>,
        key: ProgressKey,
        cfg: ApplyConfig,
        metrics: Metrics,
        status: watch::Sender<TargetStatus>,
        wake: Arc<tokio::sync::Notify>,
    ) -> Result<(Worker, Option<Lsn>), StartError> {
        let tls = TlsConnector::new(&target.conn)
            .map_err(|e| StartError::Fatal(vec![format!("targets.{}: {e}", target.name)]))?;
        let transient = |what: &str, e: &tokio_postgres::Error| {
            StartError::Transient(format!(
                "target {} ({}): {what}: {}",
                target.name,
                target.conn.display_target(),
                safe_pg_error(e)
            ))
        };
        let client = connect(&target.conn, &tls)
            .await
            .map_err(|e| transient("connect", &e))?;
        // Durability is read from the target's WAL positions.
        if let Err(e) = client.query_one(WAL_POSITION_SQL, &[]).await {
            if e.as_db_error().is_some() {
                return Err(StartError::Fatal(vec![format!(
                    "target {} ({}): cannot read its WAL position ({}): pgcarve needs pg_current_wal_insert_lsn() and pg_current_wal_flush_lsn() on a primary to know what the target has flushed",
                    target.name,
                    target.conn.display_target(),
                    safe_pg_error(&e)
                )]));
            }
            return Err(transient("read WAL position", &e));
        }
        let mut problems = Vec::new();
        let mut tables = HashMap::new();
        for table in &target.tables {
            match load_table(&client, table).await.map_err(|e| transient("read catalog", &e))? {
                None => problems.push(format!(
                    "table {table} does not exist on target {} ({}): create it with the source's definition",
                    target.name,
                    target.conn.display_target()
                )),
                Some(tt) => {
                    if let Some(src_cols) = source_columns.get(table) {
                        for c in src_cols {
                            if !tt.columns.contains_key(c) {
                                problems.push(format!(
                                    "column {c} of {table} is missing on target {}: ALTER TABLE {} ADD COLUMN …",
                                    target.name,
                                    table.quoted()
                                ));
                            }
                        }
                        for (name, col) in &tt.columns {
                            if !src_cols.contains(name) && col.not_null && !col.has_default {
                                problems.push(format!(
                                    "column {name} of {table} on target {} is NOT NULL without a default and does not exist on the source: inserts would fail",
                                    target.name
                                ));
                            }
                        }
                    }
                    tables.insert(table.clone(), tt);
                }
            }
        }
        if !problems.is_empty() {
            return Err(StartError::Fatal(problems));
        }
        let committed = progress::load(&client, &key)
            .await
            .map_err(|e| transient("create or read pgcarve.progress", &e))?;
        let commit_stmts = prepare_commit_statements(&client)
            .await
            .map_err(|e| transient("prepare progress upsert", &e))?;
        // What an earlier run committed may not be on disk yet: flush it before counting it
        // as durable.
        if let Some(lsn) = committed {
            force_durable(&client, &commit_stmts.upsert, &key, lsn)
                .await
                .map_err(|e| transient("flush pgcarve.progress", &e))?;
        }
        let worker = Worker {
            name: target.name.clone(),
            conn: target.conn.clone(),
            tls,
            client: Arc::new(client),
            in_flight: FuturesOrdered::new(),
            tables,
            owned: target.tables.clone(),
            stmts: HashMap::new(),
            commit_stmts,
            key,
            committed: committed.unwrap_or(Lsn::ZERO),
            durable: committed.unwrap_or(Lsn::ZERO),
            undurable: VecDeque::new(),
            cfg,
            metrics,
            status,
            wake,
            in_txn: false,
            group_complete: true,
            group_end: Lsn::ZERO,
            group_txns: 0,
            group_rows: HashMap::new(),
            failures: 0,
            pending: None,
            precise_until: Lsn::ZERO,
            group_last: Lsn::ZERO,
        };
        worker
            .metrics
            .target_committed_lsn
            .with_label_values(&[&worker.name])
            .set(worker.committed.0 as i64);
        Ok((worker, committed))
    }

    /// Still retrying the transactions of a failed group one by one.
    fn precise(&self) -> bool {
        self.committed <= self.precise_until && self.precise_until > Lsn::ZERO
    }

    /// The committed LSN (at start-up also durable: `prepare` flushes it).
    pub fn committed(&self) -> Lsn {
        self.committed
    }

    fn publish(&self, state: TargetState) {
        let up = i64::from(state == TargetState::Streaming);
        self.metrics
            .target_up
            .with_label_values(&[&self.name])
            .set(up);
        self.status.send_replace(TargetStatus {
            committed: self.durable,
            state,
        });
        self.wake.notify_one();
    }

    /// Starts the apply task. The target takes changes from now on: it says so before the
    /// task first runs, so the reader can never see a transaction begin while it is Starting.
    pub fn spawn(self, rx: crate::link::queue::QueueRx) -> tokio::task::JoinHandle<()> {
        self.publish(TargetState::Streaming);
        tokio::spawn(self.run(rx))
    }

    /// Runs until the channel closes (the reader is gone).
    async fn run(mut self, mut rx: crate::link::queue::QueueRx) {
        let mut carry: Option<ApplyMsg> = None;
        let mut idle_polls = 0u32;
        loop {
            let msg = match carry.take() {
                Some(m) => m,
                // (Inside an open target transaction a poll would share its fate: after a
                // failed pipelined statement it would fail too, and hide the cause.)
                None if self.undurable.is_empty() || self.in_txn => match rx.recv().await {
                    Some(m) => m,
                    None => break,
                },
                // Idle with commits not yet known durable: watch the target's WAL flush.
                None => tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => m,
                        None => break,
                    },
                    _ = tokio::time::sleep(FLUSH_POLL) => {
                        idle_polls += 1;
                        // The WAL flush may stop short of a group's position (a page
                        // boundary) while nothing else is written: then force it.
                        let r = if idle_polls >= IDLE_POLLS_BEFORE_FORCE {
                            idle_polls = 0;
                            self.make_durable().await
                        } else {
                            self.poll_flush().await
                        };
                        if let Err(e) = r {
                            self.fail(e, None, &mut rx).await;
                        }
                        continue;
                    }
                },
            };
            match msg {
                ApplyMsg::Barrier(reply) => {
                    // The reader restarts from what is durable: make everything durable first,
                    // so it need not send again what this target already has.
                    let done = match self.finish_group().await {
                        Ok(()) => self.make_durable().await.map_err(Failed::from),
                        Err(f) => Err(f),
                    };
                    // Answer first: the reader waits for every target's answer, and fail()
                    // waits for the reader's next barrier.
                    let _ = reply.send(self.durable);
                    if let Err(f) = done {
                        self.fail(f.err, f.lsn, &mut rx).await;
                    }
                }
                ApplyMsg::Chunk {
                    xact,
                    changes,
                    commit,
                } => {
                    if let Err(f) = self.apply_chunk(&xact, changes, commit).await {
                        // A statement sent earlier may have failed first: report the cause,
                        // not what the aborted transaction did to the statements after it.
                        let f = match self.drain().await {
                            Err(first) => first,
                            Ok(()) => f,
                        };
                        self.fail(f.err, f.lsn.or(Some(xact.final_lsn)), &mut rx)
                            .await;
                        continue;
                    }
                    // (A transaction skipped as already applied opens no target transaction:
                    // nothing to commit.)
                    if commit.is_some() && self.in_txn {
                        if self.group_txns < self.cfg.group_transactions as u64 && !self.precise() {
                            if let Some(next) = rx.try_recv() {
                                carry = Some(next);
                                continue;
                            }
                        }
                        if let Err(f) = self.commit_group().await {
                            self.fail(f.err, f.lsn.or(Some(xact.final_lsn)), &mut rx)
                                .await;
                        }
                    }
                }
            }
        }
        if self.in_txn {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        // Leave nothing undurable behind (the next start would otherwise redo it).
        let _ = self.make_durable().await;
    }

    /// Reads the target's WAL flush position and advances `durable` over the groups it covers.
    async fn poll_flush(&mut self) -> Result<(), ApplyError> {
        let row = self
            .client
            .query_one(&self.commit_stmts.position, &[])
            .await
            .map_err(|e| ApplyError::Connection(safe_pg_error(&e)))?;
        let flush = parse_lsn(row.get(1))?;
        self.advance_durable(flush);
        Ok(())
    }

    fn advance_durable(&mut self, flush: Lsn) {
        if let Some(lsn) = flushed_prefix(&mut self.undurable, flush) {
            self.advance_to(lsn);
        }
    }

    /// Makes everything committed durable now: a synchronous commit flushes the target's WAL
    /// up to it, and so every asynchronous commit before it.
    async fn make_durable(&mut self) -> Result<(), ApplyError> {
        if self.durable >= self.committed || self.in_txn {
            return Ok(());
        }
        force_durable(
            &self.client,
            &self.commit_stmts.upsert,
            &self.key,
            self.committed,
        )
        .await
        .map_err(|e| ApplyError::Connection(safe_pg_error(&e)))?;
        self.undurable.clear();
        self.advance_to(self.committed);
        Ok(())
    }

    /// Publishes `lsn` as durable, in whatever state the task is.
    fn advance_to(&mut self, lsn: Lsn) {
        self.durable = self.durable.max(lsn);
        self.metrics
            .target_committed_lsn
            .with_label_values(&[&self.name])
            .set(self.durable.0 as i64);
        let state = self.status.borrow().state.clone();
        self.publish(state);
    }

    /// Commits the open group if it ends with a whole source transaction, else rolls it back.
    async fn finish_group(&mut self) -> Result<(), Failed> {
        if !self.in_txn {
            return Ok(());
        }
        if self.group_complete && self.group_txns > 0 {
            self.commit_group().await
        } else {
            self.rollback().await;
            Ok(())
        }
    }

    async fn rollback(&mut self) {
        self.in_flight = FuturesOrdered::new();
        self.pending = None;
        if self.in_txn {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        self.in_txn = false;
        self.group_txns = 0;
        self.group_complete = true;
        self.group_rows.clear();
    }

    async fn apply_chunk(
        &mut self,
        xact: &XactInfo,
        changes: Vec<Change>,
        commit: Option<CommitInfo>,
    ) -> Result<(), Failed> {
        // Already here (a COMMIT whose answer was lost, then a reconnect): skip, never repeat.
        if xact.final_lsn < self.committed {
            return Ok(());
        }
        if !self.in_txn {
            self.client
                // The source checked deferrable constraints at its commit; applying row by row,
                // the target must too (a key swap is valid only at commit).
                .batch_execute("BEGIN; SET CONSTRAINTS ALL DEFERRED")
                .await
                .map_err(|e| ApplyError::Connection(safe_pg_error(&e)))?;
            self.in_txn = true;
        }
        self.group_complete = false;
        let lsn = xact.final_lsn;
        self.group_last = lsn;
        for c in changes {
            match c {
                Change::Truncate {
                    ref rels,
                    restart_identity,
                    ..
                } => {
                    self.flush_inserts().await?;
                    self.drain().await?;
                    let names: Vec<(TableName, bool)> = rels
                        .iter()
                        .map(|r| {
                            let plain = self.tables.get(&r.table).is_none_or(|t| t.plain);
                            (r.table.clone(), plain)
                        })
                        .collect();
                    let sql = statements::truncate(&names, restart_identity);
                    let first =
                        names
                            .first()
                            .map(|(t, _)| t.clone())
                            .unwrap_or_else(|| TableName {
                                schema: String::new(),
                                name: String::new(),
                            });
                    self.client
                        .batch_execute(&sql)
                        .await
                        .map_err(|e| ApplyError::from_pg(&e, &first, "truncate"))?;
                    for r in rels {
                        self.count(r, "truncate");
                    }
                }
                Change::Insert { ref rel, .. } => {
                    self.count(rel, "insert");
                    let same = self
                        .pending
                        .as_ref()
                        .is_some_and(|p| Arc::ptr_eq(&p.rel, rel));
                    if !same {
                        self.flush_inserts().await?;
                        self.pending = Some(InsertRun {
                            rel: rel.clone(),
                            rows: Vec::new(),
                        });
                    }
                    let run = self.pending.as_mut().expect("pending run");
                    run.rows.push((c, lsn));
                    if run.rows.len() >= COPY_MAX_ROWS {
                        self.flush_inserts().await?;
                    }
                }
                Change::Update { ref rel, .. } | Change::Delete { ref rel, .. } => {
                    self.count(rel, c.operation());
                    self.flush_inserts().await?;
                    self.pipeline(&c, lsn).await?;
                }
            }
        }
        // After a failure, retry one source transaction per run, so a failing run names the
        // exact transaction.
        if self.precise() {
            self.flush_inserts().await?;
        }
        if let Some(c) = commit {
            self.group_complete = true;
            self.group_end = c.end_lsn;
            self.group_txns += 1;
        }
        Ok(())
    }

    fn count(&mut self, rel: &Arc<RelationInfo>, op: &'static str) {
        self.group_rows
            .entry((rel.relation.oid, op))
            .or_insert_with(|| (rel.clone(), 0))
            .1 += 1;
    }

    /// Sends the pending run of inserts: through COPY when it has at least [`COPY_MIN_ROWS`]
    /// rows, else as pipelined statements. Runs collect consecutive inserts into one table,
    /// across the source transactions of a group, so single-row transactions reach COPY too.
    async fn flush_inserts(&mut self) -> Result<(), Failed> {
        let Some(run) = self.pending.take() else {
            return Ok(());
        };
        let copy_ok = self.tables.get(&run.rel.table).is_some_and(|t| t.copy_ok);
        if copy_ok && run.rows.len() >= COPY_MIN_ROWS {
            self.drain().await?;
            let first_lsn = run.rows.first().map(|(_, l)| *l);
            return self.copy_inserts(&run.rel, &run.rows).await.map_err(|err| {
                // Rows of several transactions: name the first; the retry is precise.
                Failed {
                    err,
                    lsn: first_lsn,
                }
            });
        }
        for (c, lsn) in &run.rows {
            self.pipeline(c, *lsn).await?;
        }
        Ok(())
    }

    /// Sends a row change as a prepared statement, pipelined: its answer is awaited later
    /// (at the latest by [`Worker::drain`]), so single-row transactions do not each wait a
    /// round trip.
    async fn pipeline(&mut self, c: &Change, lsn: Lsn) -> Result<(), Failed> {
        let p = self.statement_for(c, false).await?;
        let (rel, new, old, op) = match c {
            Change::Insert { rel, new } => (rel, Some(new), None, "insert"),
            Change::Update { rel, old, new } => {
                (rel, Some(new), old.as_ref().map(|o| &o.tuple), "update")
            }
            Change::Delete { rel, old } => (rel, None, Some(&old.tuple), "delete"),
            Change::Truncate { .. } => unreachable!("truncates are not pipelined"),
        };
        let params = bind(&p.plan, new, old, rel)?;
        if p.plan.guarded {
            // Identity values checked, not written: alone, to see the row count.
            self.drain().await?;
            let rows = self
                .client
                .execute_raw(&p.stmt, params)
                .await
                .map_err(|e| Failed {
                    err: ApplyError::from_pg(&e, &rel.table, op),
                    lsn: Some(lsn),
                })?;
            return match rows {
                1 => Ok(()),
                // The source changed an identity value: write it.
                0 => {
                    let p = self.statement_for(c, true).await?;
                    let params = bind(&p.plan, new, old, rel)?;
                    self.with_identity_override(p, params, rel, op, lsn).await
                }
                rows => Err(Failed {
                    err: ApplyError::Divergence {
                        table: rel.table.clone(),
                        operation: op,
                        rows,
                    },
                    lsn: Some(lsn),
                }),
            };
        }
        if !p.plan.identity_override.is_empty() {
            self.drain().await?;
            return self.with_identity_override(p, params, rel, op, lsn).await;
        }
        let mut fut = flight(self.client.clone(), p, params, rel.clone(), op, lsn);
        // tokio-postgres sends a request during its future's first poll. Poll each statement
        // once, here and in order, so the target receives them in source order no matter
        // when the queue of in-flight futures is polled afterwards.
        if let Poll::Ready(r) = futures::poll!(&mut fut) {
            fut = Box::pin(futures::future::ready(r));
        }
        self.in_flight.push_back(fut);
        if self.in_flight.len() >= PIPELINE_DEPTH {
            if let Some(Err(f)) = self.in_flight.next().await {
                // The cause; what follows it only failed because the transaction aborted.
                self.in_flight = FuturesOrdered::new();
                return Err(f);
            }
        }
        Ok(())
    }

    /// Runs an UPDATE that writes `GENERATED ALWAYS` identity columns, alone, between
    /// `ALTER COLUMN … SET GENERATED BY DEFAULT` and back. Rare: an identity value changed.
    async fn with_identity_override(
        &mut self,
        p: Arc<Prepared>,
        params: Vec<TextParam>,
        rel: &Arc<RelationInfo>,
        op: &'static str,
        lsn: Lsn,
    ) -> Result<(), Failed> {
        let cols = p.plan.identity_override.clone();
        let with_lsn = |err| Failed {
            err,
            lsn: Some(lsn),
        };
        self.set_identity(&rel.table, &cols, "BY DEFAULT", op)
            .await
            .map_err(with_lsn)?;
        flight(self.client.clone(), p, params, rel.clone(), op, lsn).await?;
        self.set_identity(&rel.table, &cols, "ALWAYS", op)
            .await
            .map_err(with_lsn)
    }

    /// Waits for every statement in flight; the first failure, in send order, is the cause.
    async fn drain(&mut self) -> Result<(), Failed> {
        while let Some(r) = self.in_flight.next().await {
            if let Err(f) = r {
                self.in_flight = FuturesOrdered::new();
                return Err(f);
            }
        }
        Ok(())
    }

    /// Inserts a run of rows of one relation with one `COPY … FROM STDIN`.
    async fn copy_inserts(
        &mut self,
        rel: &Arc<RelationInfo>,
        changes: &[(Change, Lsn)],
    ) -> Result<(), ApplyError> {
        let key = StmtKey {
            oid: rel.relation.oid,
            generation: rel.generation,
            kind: KIND_COPY,
            has_old: false,
            new_mask: None,
            old_mask: None,
        };
        let p = match self.stmts.get(&key) {
            Some(p) => p.clone(),
            None => {
                let tt = self
                    .tables
                    .get(&rel.table)
                    .ok_or_else(|| ApplyError::UnknownTable(rel.table.clone()))?;
                let plan = statements::copy_in(&rel.relation, tt)?;
                self.prepare_cached(key, plan, &rel.table, "insert").await?
            }
        };
        let reject = |e: tokio_postgres::Error| ApplyError::from_pg(&e, &rel.table, "insert");
        let sink = self
            .client
            .copy_in::<_, Bytes>(&p.stmt)
            .await
            .map_err(reject)?;
        let mut sink = std::pin::pin!(sink);
        let mut buf = BytesMut::with_capacity(COPY_BUFFER);
        for (c, _) in changes {
            let Change::Insert { new, .. } = c else {
                unreachable!("copy_inserts gets runs of inserts")
            };
            encode_copy_row(&mut buf, new, rel)?;
            if buf.len() >= COPY_BUFFER {
                sink.send(buf.split().freeze()).await.map_err(reject)?;
            }
        }
        if !buf.is_empty() {
            sink.send(buf.freeze()).await.map_err(reject)?;
        }
        let rows = sink.as_mut().finish().await.map_err(reject)?;
        if rows != changes.len() as u64 {
            return Err(ApplyError::Divergence {
                table: rel.table.clone(),
                operation: "insert",
                rows,
            });
        }
        Ok(())
    }

    /// The prepared statement for a row change; `unguarded` asks for the UPDATE that writes
    /// identity columns (see [`statements::update`]).
    async fn statement_for(
        &mut self,
        c: &Change,
        unguarded: bool,
    ) -> Result<Arc<Prepared>, Failed> {
        let (rel, kind, has_old, new_mask, old_mask) = match c {
            Change::Insert { rel, .. } => (rel, 0u8, false, None, None),
            Change::Update { rel, old, new } => (
                rel,
                if unguarded { KIND_UPDATE_UNGUARDED } else { 1 },
                old.is_some(),
                match self.tables.get(&rel.table) {
                    Some(tt) => statements::update_skip_positions(
                        &rel.relation,
                        tt,
                        new,
                        old.as_ref().map(|o| &o.tuple),
                    ),
                    None => return Err(ApplyError::UnknownTable(rel.table.clone()).into()),
                },
                old.as_ref()
                    .and_then(|o| statements::unchanged_positions(&o.tuple)),
            ),
            Change::Delete { rel, old } => (
                rel,
                2,
                true,
                None,
                statements::unchanged_positions(&old.tuple),
            ),
            Change::Truncate { .. } => unreachable!("truncates have no prepared statement"),
        };
        let key = StmtKey {
            oid: rel.relation.oid,
            generation: rel.generation,
            kind,
            has_old,
            new_mask,
            old_mask,
        };
        if let Some(p) = self.stmts.get(&key) {
            return Ok(p.clone());
        }
        // Answers to statements in flight must be read first: the connection stops reading
        // while an unpolled answer queue is full, and a statement that already failed would
        // make this prepare fail with 25P02 instead of naming the cause.
        self.drain().await?;
        let tt = self
            .tables
            .get(&rel.table)
            .ok_or_else(|| ApplyError::UnknownTable(rel.table.clone()))?;
        let plan = match kind {
            0 => statements::insert(&rel.relation, tt)?,
            1 | KIND_UPDATE_UNGUARDED => statements::update(
                &rel.relation,
                tt,
                has_old,
                key.new_mask.as_deref(),
                key.old_mask.as_deref(),
                kind == 1,
            )?,
            _ => statements::delete(&rel.relation, tt, key.old_mask.as_deref())?,
        };
        if plan.identity_override.is_empty() {
            return Ok(self
                .prepare_cached(key, plan, &rel.table, c.operation())
                .await?);
        }
        // Such an UPDATE only parses while its identity columns are BY DEFAULT.
        let cols = plan.identity_override.clone();
        self.set_identity(&rel.table, &cols, "BY DEFAULT", "update")
            .await?;
        let p = self
            .prepare_cached(key, plan, &rel.table, c.operation())
            .await?;
        self.set_identity(&rel.table, &cols, "ALWAYS", "update")
            .await?;
        Ok(p)
    }

    /// `ALTER TABLE … ALTER COLUMN c SET GENERATED {kind}` inside the open target transaction,
    /// for UPDATEs that must write `GENERATED ALWAYS` identity columns.
    async fn set_identity(
        &mut self,
        table: &TableName,
        cols: &[String],
        kind: &str,
        op: &'static str,
    ) -> Result<(), ApplyError> {
        let alters: Vec<String> = cols
            .iter()
            .map(|c| format!("ALTER COLUMN {c} SET GENERATED {kind}"))
            .collect();
        self.client
            .batch_execute(&format!(
                "ALTER TABLE {} {}",
                table.quoted(),
                alters.join(", ")
            ))
            .await
            .map_err(|e| ApplyError::from_pg(&e, table, op))
    }

    /// Prepares `plan` on the target and caches it under `key`.
    async fn prepare_cached(
        &mut self,
        key: StmtKey,
        plan: Plan,
        table: &TableName,
        op: &'static str,
    ) -> Result<Arc<Prepared>, ApplyError> {
        let stmt = self
            .client
            .prepare(&plan.sql)
            .await
            .map_err(|e| ApplyError::from_pg(&e, table, op))?;
        // A newer description of the relation makes older statements useless.
        self.stmts
            .retain(|k, _| k.oid != key.oid || k.generation == key.generation);
        let p = Arc::new(Prepared { stmt, plan });
        self.stmts.insert(key, p.clone());
        Ok(p)
    }

    async fn commit_group(&mut self) -> Result<(), Failed> {
        self.flush_inserts().await?;
        // In an aborted transaction COMMIT answers ROLLBACK without an error: every statement
        // must have succeeded before it is sent.
        self.drain().await?;
        let lsn = self.group_end.to_string();
        let params: [&(dyn ToSql + Sync); 4] =
            [&self.key.system_id, &self.key.slot, &self.key.target, &lsn];
        let progress = self.client.execute(&self.commit_stmts.upsert, &params);
        let commit = self.client.batch_execute("COMMIT");
        // Sent after COMMIT (prepared: no extra round trip): the insert position is past its
        // commit record.
        let position = self.client.query_one(&self.commit_stmts.position, &[]);
        let (p, c, pos) = futures::join!(progress, commit, position);
        let progress_table = TableName {
            schema: "pgcarve".into(),
            name: "progress".into(),
        };
        p.map_err(|e| ApplyError::from_pg(&e, &progress_table, "commit"))?;
        c.map_err(|e| ApplyError::from_pg(&e, &progress_table, "commit"))?;
        self.in_txn = false;
        self.failures = 0;
        self.committed = self.group_end;
        // The commit succeeded; if the position query failed, the connection is gone and the
        // reconnect reloads progress.
        let pos = pos.map_err(|e| ApplyError::Connection(safe_pg_error(&e)))?;
        let (insert, flush) = (parse_lsn(pos.get(0))?, parse_lsn(pos.get(1))?);
        self.undurable.push_back((self.group_end, insert));
        let txns = self.group_txns;
        self.group_txns = 0;
        for ((_, op), (rel, n)) in self.group_rows.drain() {
            self.metrics
                .rows_applied
                .with_label_values(&[&self.name, &rel.table.to_string(), op])
                .inc_by(n);
        }
        self.metrics
            .transactions_applied
            .with_label_values(&[&self.name])
            .inc_by(txns);
        self.publish(TargetState::Streaming);
        self.advance_durable(flush);
        Ok(())
    }

    /// The failed state: roll back, report, discard changes, and wait for the backoff and a
    /// barrier before applying again.
    async fn fail(
        &mut self,
        err: ApplyError,
        lsn: Option<Lsn>,
        rx: &mut crate::link::queue::QueueRx,
    ) {
        self.rollback().await;
        self.precise_until = self
            .precise_until
            .max(self.group_last)
            .max(lsn.unwrap_or(Lsn::ZERO));
        let mut err = err;
        loop {
            // Counted across retries until a group commits, so the backoff grows while the
            // same change keeps failing.
            self.failures = self.failures.saturating_add(1);
            let attempts = self.failures;
            self.metrics
                .errors_total
                .with_label_values(&[&self.name, &err.class()])
                .inc();
            let delay = backoff(&self.cfg, attempts);
            let (table, constraint, column) = match &err {
                ApplyError::Rejected {
                    table,
                    constraint,
                    column,
                    ..
                } => (Some(table.to_string()), constraint.clone(), column.clone()),
                ApplyError::Divergence { table, .. } => (Some(table.to_string()), None, None),
                _ => (None, None, None),
            };
            tracing::error!(
                target_name = %self.name,
                table = table.as_deref().unwrap_or(""),
                lsn = %lsn.unwrap_or(self.committed),
                sqlstate = err.sqlstate().unwrap_or(""),
                constraint = constraint.as_deref().unwrap_or(""),
                column = column.as_deref().unwrap_or(""),
                error_kind = %err.class(),
                attempt = attempts,
                retry_in_secs = delay.as_secs_f64(),
                "apply failed; target stalled, other targets continue: {}",
                err
            );
            self.publish(TargetState::Stalled {
                attempts,
                retry_ready: false,
                error: err.to_string(),
            });
            let retry_at = tokio::time::Instant::now() + delay;
            let mut ready = false;
            let resumed = loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        None => return,
                        Some(ApplyMsg::Chunk { .. }) => {}
                        Some(ApplyMsg::Barrier(reply)) => {
                            if !ready {
                                let _ = reply.send(self.durable);
                                continue;
                            }
                            let r = self.reconnect_if_needed().await;
                            if r.is_ok() {
                                // Taking changes before the reader hears the answer.
                                tracing::info!(target_name = %self.name, committed = %self.committed, "retrying target");
                                self.publish(TargetState::Streaming);
                            }
                            let _ = reply.send(self.durable);
                            break r;
                        }
                    },
                    _ = tokio::time::sleep_until(retry_at), if !ready => {
                        ready = true;
                        self.publish(TargetState::Stalled {
                            attempts,
                            retry_ready: true,
                            error: err.to_string(),
                        });
                    }
                }
            };
            match resumed {
                Ok(()) => return,
                Err(e) => err = e,
            }
        }
    }

    /// After a failure: reconnect when the connection is gone, and always reload the progress
    /// row (a lost COMMIT answer may hide a successful commit).
    async fn reconnect_if_needed(&mut self) -> Result<(), ApplyError> {
        let conn_err = |e: tokio_postgres::Error| ApplyError::Connection(safe_pg_error(&e));
        // A new connection replaces the old one only once the progress row is read from it,
        // so `committed` never outlives a failed reload.
        let (client, commit_stmts) = if self.client.is_closed() {
            let client = Arc::new(connect(&self.conn, &self.tls).await.map_err(conn_err)?);
            let stmts = prepare_commit_statements(&client).await.map_err(conn_err)?;
            (client, Some(stmts))
        } else {
            (self.client.clone(), None)
        };
        let reloaded = progress::load(&client, &self.key)
            .await
            .map_err(conn_err)?
            .unwrap_or(Lsn::ZERO);
        // The cause may have been fixed in the target's schema (a column added, a trigger or a
        // rule changed): plan from its catalog as it is now.
        let mut tables = HashMap::with_capacity(self.owned.len());
        for name in &self.owned {
            // A table gone from the target fails only the changes that reach it.
            if let Some(tt) = load_table(&client, name).await.map_err(conn_err)? {
                tables.insert(name.clone(), tt);
            }
        }
        self.tables = tables;
        self.stmts.clear();
        if let Some(stmts) = commit_stmts {
            self.client = client;
            self.commit_stmts = stmts;
        }
        // Ahead: a COMMIT whose answer was lost did succeed. Behind what was durable: the
        // target lost what it had on disk; never skip past that silently. Between the two: a
        // target crash took asynchronous commits that were not flushed yet, which the slot
        // still holds: apply them again.
        if reloaded < self.durable {
            return Err(ApplyError::ProgressRewound {
                from: self.durable,
                to: reloaded,
            });
        }
        if reloaded < self.committed {
            tracing::warn!(
                target_name = %self.name,
                committed = %self.committed,
                durable = %self.durable,
                reloaded = %reloaded,
                "the target lost asynchronous commits (a crash before its WAL flush); the slot still holds them: applying them again"
            );
        }
        self.undurable.retain(|(lsn, _)| *lsn <= reloaded);
        self.committed = reloaded;
        // What the target has now is read from it: make it durable, so the slot can move even
        // if no group commits soon (the groups' positions may not cover it).
        self.make_durable().await
    }
}

/// Appends one row in COPY text format (tab-separated, `\N` for NULL, newline-terminated).
fn encode_copy_row(buf: &mut BytesMut, row: &Tuple, rel: &RelationInfo) -> Result<(), ApplyError> {
    let column = |i: usize| {
        rel.relation
            .columns
            .get(i)
            .map(|c| c.name.clone())
            .unwrap_or_default()
    };
    if row.0.len() != rel.relation.columns.len() {
        return Err(ApplyError::Plan(statements::PlanError::MissingValue {
            table: rel.table.clone(),
            column: column(row.0.len().min(rel.relation.columns.len())),
        }));
    }
    for (i, v) in row.0.iter().enumerate() {
        if i > 0 {
            buf.put_u8(b'\t');
        }
        match v {
            Value::Null => buf.extend_from_slice(b"\\N"),
            Value::Text(b) => statements::copy_escape(buf, b),
            // An insert carries every value; "unchanged" belongs to updates only.
            Value::Unchanged => {
                return Err(ApplyError::Plan(statements::PlanError::MissingValue {
                    table: rel.table.clone(),
                    column: column(i),
                }))
            }
            Value::Binary(_) => {
                return Err(ApplyError::Binary {
                    table: rel.table.clone(),
                    column: column(i),
                })
            }
        }
    }
    buf.put_u8(b'\n');
    Ok(())
}

/// Pops the groups whose commit lies at or before `flush` and returns the newest one's LSN.
fn flushed_prefix(undurable: &mut VecDeque<(Lsn, Lsn)>, flush: Lsn) -> Option<Lsn> {
    let mut newest = None;
    while let Some(&(lsn, at)) = undurable.front() {
        if at > flush {
            break;
        }
        newest = Some(lsn);
        undurable.pop_front();
    }
    newest
}

fn parse_lsn(text: &str) -> Result<Lsn, ApplyError> {
    text.parse()
        .map_err(|_| ApplyError::Connection(format!("target sent an unreadable LSN {text:?}")))
}

/// A synchronous commit of the progress row: flushes the target's WAL up to it.
async fn force_durable(
    client: &Client,
    upsert: &Statement,
    key: &ProgressKey,
    lsn: Lsn,
) -> Result<(), tokio_postgres::Error> {
    let lsn = lsn.to_string();
    let params: [&(dyn ToSql + Sync); 4] = [&key.system_id, &key.slot, &key.target, &lsn];
    let result = async {
        client
            .batch_execute("BEGIN; SET LOCAL synchronous_commit = on")
            .await?;
        client.execute(upsert, &params).await?;
        client.batch_execute("COMMIT").await
    }
    .await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// Executes one bound row statement and checks that it touched exactly one row.
fn flight(
    client: Arc<Client>,
    p: Arc<Prepared>,
    params: Vec<TextParam>,
    rel: Arc<RelationInfo>,
    op: &'static str,
    lsn: Lsn,
) -> Flight {
    Box::pin(async move {
        let failed = |err| Failed {
            err,
            lsn: Some(lsn),
        };
        let rows = client
            .execute_raw(&p.stmt, params)
            .await
            .map_err(|e| failed(ApplyError::from_pg(&e, &rel.table, op)))?;
        if rows != 1 {
            return Err(failed(ApplyError::Divergence {
                table: rel.table.clone(),
                operation: op,
                rows,
            }));
        }
        Ok(())
    })
}

/// Binds a change's values per the statement's plan.
fn bind(
    plan: &Plan,
    new: Option<&Tuple>,
    old: Option<&Tuple>,
    rel: &RelationInfo,
) -> Result<Vec<TextParam>, ApplyError> {
    let mut out = Vec::with_capacity(plan.params.len());
    for &(src, i) in &plan.params {
        let tuple = match src {
            Source::New => new,
            Source::Old => old,
        };
        let column = || {
            rel.relation
                .columns
                .get(i)
                .map(|c| c.name.clone())
                .unwrap_or_default()
        };
        let value = tuple.and_then(|t| t.0.get(i)).ok_or_else(|| {
            ApplyError::Plan(statements::PlanError::MissingKey {
                table: rel.table.clone(),
                column: column(),
            })
        })?;
        out.push(match value {
            Value::Null => TextParam(None),
            Value::Text(b) => TextParam(Some(b.clone())),
            Value::Unchanged => {
                return Err(ApplyError::Plan(statements::PlanError::MissingKey {
                    table: rel.table.clone(),
                    column: column(),
                }))
            }
            Value::Binary(_) => {
                return Err(ApplyError::Binary {
                    table: rel.table.clone(),
                    column: column(),
                })
            }
        });
    }
    Ok(out)
}

/// Retry delay after `attempts` failures: doubling from `retry_initial_secs`, capped at
/// `retry_max_secs`, with up to 20 % jitter so several targets do not retry in lockstep.
pub fn backoff(cfg: &ApplyConfig, attempts: u32) -> Duration {
    let exp = cfg.retry_initial_secs * 2f64.powi(attempts.saturating_sub(1).min(30) as i32);
    let capped = exp.min(cfg.retry_max_secs);
    let jitter = 1.0 + fastrand::f64() * 0.2;
    Duration::from_secs_f64((capped * jitter).min(cfg.retry_max_secs * 1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let cfg = ApplyConfig {
            retry_initial_secs: 1.0,
            retry_max_secs: 8.0,
            ..ApplyConfig::default()
        };
        let d = |a| backoff(&cfg, a).as_secs_f64();
        assert!((1.0..=1.2).contains(&d(1)));
        assert!((2.0..=2.4).contains(&d(2)));
        assert!((8.0..=9.6).contains(&d(10)));
    }

    #[test]
    fn durable_follows_the_flush_over_whole_groups_only() {
        let mut q: VecDeque<(Lsn, Lsn)> = [
            (Lsn(100), Lsn(1000)),
            (Lsn(200), Lsn(2000)),
            (Lsn(300), Lsn(3000)),
        ]
        .into();
        assert_eq!(flushed_prefix(&mut q, Lsn(999)), None);
        assert_eq!(q.len(), 3);
        // A flush exactly at a group's position covers it; one short of the next does not.
        assert_eq!(flushed_prefix(&mut q, Lsn(2999)), Some(Lsn(200)));
        assert_eq!(q.len(), 1);
        assert_eq!(flushed_prefix(&mut q, Lsn(5000)), Some(Lsn(300)));
        assert!(q.is_empty());
        assert_eq!(flushed_prefix(&mut q, Lsn(9000)), None);
    }

    #[test]
    fn text_param_debug_hides_value() {
        let p = TextParam(Some(Bytes::from_static(b"Alice")));
        assert_eq!(format!("{p:?}"), "text(5 bytes)");
    }
}
