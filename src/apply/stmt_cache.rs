//! Prepared statements per (relation, statement shape), and the target catalog they are
//! planned from.
//!
//! A statement is planned from the source's Relation message and the target table's columns
//! (see [`statements`]), prepared once on the target and reused. Its key says everything that
//! changes the SQL: the relation and its generation (a new Relation message makes older
//! statements useless), the [`StmtKind`], whether an old tuple came, and which positions carry
//! unchanged TOASTed values (left out of SET and WHERE).

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Statement;

use super::error::ApplyError;
use super::statements::{self, Plan, PlanError, TargetTable};
use super::{failure::Failure, Worker};
use crate::link::{Change, RelationInfo};
use crate::table::TableName;

/// What a prepared statement does. Every kind is planned by its own arm: no catch-all.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub(super) enum StmtKind {
    /// `INSERT … OVERRIDING SYSTEM VALUE`.
    Insert,
    /// `UPDATE`; `GENERATED ALWAYS` identity columns whose old value is unknown are checked in
    /// WHERE, not written (a guarded plan).
    Update,
    /// `UPDATE` that writes `GENERATED ALWAYS` identity columns, run between ALTERs.
    UpdateWritingIdentity,
    /// `DELETE`.
    Delete,
    /// `COPY … FROM STDIN` for a run of inserts.
    Copy,
}

impl StmtKind {
    /// Plans the SQL of this kind for `rel` on target table `tt`.
    fn plan(self, rel: &RelationInfo, tt: &TargetTable, key: &StmtKey) -> Result<Plan, PlanError> {
        let r = &rel.relation;
        let (new_mask, old_mask) = (key.new_mask.as_deref(), key.old_mask.as_deref());
        match self {
            StmtKind::Insert => statements::insert(r, tt),
            StmtKind::Update => statements::update(r, tt, key.has_old, new_mask, old_mask, true),
            StmtKind::UpdateWritingIdentity => {
                statements::update(r, tt, key.has_old, new_mask, old_mask, false)
            }
            StmtKind::Delete => statements::delete(r, tt, old_mask),
            StmtKind::Copy => statements::copy_in(r, tt),
        }
    }
}

/// Everything that changes a statement's SQL.
#[derive(Debug, Hash, PartialEq, Eq)]
pub(super) struct StmtKey {
    oid: u32,
    generation: u64,
    kind: StmtKind,
    has_old: bool,
    new_mask: Option<Box<[u16]>>,
    old_mask: Option<Box<[u16]>>,
}

impl StmtKey {
    /// The key of the COPY statement for runs of inserts into `rel`.
    fn copy(rel: &RelationInfo) -> StmtKey {
        StmtKey {
            oid: rel.relation.oid,
            generation: rel.generation,
            kind: StmtKind::Copy,
            has_old: false,
            new_mask: None,
            old_mask: None,
        }
    }

    /// The key of a row change's statement; `writing_identity` asks for the UPDATE that writes
    /// identity columns (see [`statements::update`]). An UPDATE needs the target table to know
    /// which identity columns it may leave out.
    fn for_change(
        c: &Change,
        writing_identity: bool,
        tables: &HashMap<TableName, TargetTable>,
    ) -> Result<StmtKey, ApplyError> {
        let (rel, kind, has_old, new_mask, old_mask) = match c {
            Change::Insert { rel, .. } => (rel, StmtKind::Insert, false, None, None),
            Change::Update { rel, old, new } => {
                let tt = tables
                    .get(&rel.table)
                    .ok_or_else(|| ApplyError::UnknownTable(rel.table.clone()))?;
                let old = old.as_ref().map(|o| &o.tuple);
                (
                    rel,
                    if writing_identity {
                        StmtKind::UpdateWritingIdentity
                    } else {
                        StmtKind::Update
                    },
                    old.is_some(),
                    statements::update_skip_positions(&rel.relation, tt, new, old),
                    old.and_then(statements::unchanged_positions),
                )
            }
            Change::Delete { rel, old } => (
                rel,
                StmtKind::Delete,
                true,
                None,
                statements::unchanged_positions(&old.tuple),
            ),
            Change::Truncate { .. } => unreachable!("truncates have no prepared statement"),
        };
        Ok(StmtKey {
            oid: rel.relation.oid,
            generation: rel.generation,
            kind,
            has_old,
            new_mask,
            old_mask,
        })
    }
}

/// A statement prepared on the target, with its parameter plan.
pub(super) struct Prepared {
    /// The prepared statement.
    pub stmt: Statement,
    /// How to bind it.
    pub plan: Plan,
}

/// The target catalog of the owned tables and the statements prepared from it.
pub(super) struct StmtCache {
    /// Catalog of each owned table present on the target (a missing one is gone from it).
    pub tables: HashMap<TableName, TargetTable>,
    /// The tables this target owns.
    pub owned: Vec<TableName>,
    stmts: HashMap<StmtKey, Arc<Prepared>>,
}

impl StmtCache {
    /// A cache planning from `tables`, for the owned tables `owned`.
    pub fn new(tables: HashMap<TableName, TargetTable>, owned: Vec<TableName>) -> StmtCache {
        StmtCache {
            tables,
            owned,
            stmts: HashMap::new(),
        }
    }

    /// Replaces the catalog (after a failure, the cause may have been fixed on the target) and
    /// forgets every statement planned from the old one.
    pub fn reload(&mut self, tables: HashMap<TableName, TargetTable>) {
        self.tables = tables;
        self.stmts.clear();
    }

    fn table(&self, table: &TableName) -> Result<&TargetTable, ApplyError> {
        self.tables
            .get(table)
            .ok_or_else(|| ApplyError::UnknownTable(table.clone()))
    }

    fn insert(&mut self, key: StmtKey, p: Arc<Prepared>) {
        // A newer description of the relation makes older statements useless.
        self.stmts
            .retain(|k, _| k.oid != key.oid || k.generation == key.generation);
        self.stmts.insert(key, p);
    }
}

impl Worker {
    /// The prepared statement for a row change; `writing_identity` asks for the UPDATE that
    /// writes identity columns.
    pub(super) async fn statement_for(
        &mut self,
        c: &Change,
        writing_identity: bool,
    ) -> Result<Arc<Prepared>, Failure> {
        let key = StmtKey::for_change(c, writing_identity, &self.cache.tables)?;
        if let Some(p) = self.cache.stmts.get(&key) {
            return Ok(p.clone());
        }
        // Answers to statements in flight must be read first: the connection stops reading
        // while an unpolled answer queue is full, and a statement that already failed would
        // make this prepare fail with 25P02 instead of naming the cause.
        self.drain().await?;
        let rel = c.relation().expect("row changes have one relation");
        let plan = key.kind.plan(rel, self.cache.table(&rel.table)?, &key)?;
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

    /// The prepared `COPY … FROM STDIN` for runs of inserts into `rel`.
    pub(super) async fn copy_statement(
        &mut self,
        rel: &Arc<RelationInfo>,
    ) -> Result<Arc<Prepared>, ApplyError> {
        let key = StmtKey::copy(rel);
        if let Some(p) = self.cache.stmts.get(&key) {
            return Ok(p.clone());
        }
        let plan = key.kind.plan(rel, self.cache.table(&rel.table)?, &key)?;
        self.prepare_cached(key, plan, &rel.table, "insert").await
    }

    /// `ALTER TABLE … ALTER COLUMN c SET GENERATED {kind}` inside the open target transaction,
    /// for UPDATEs that must write `GENERATED ALWAYS` identity columns: `BY DEFAULT` before
    /// them, `ALWAYS` after. ALTER TABLE is refused while checks are queued on the table, so
    /// between the two the table's deferred checks run immediately (see
    /// [`Worker::check_deferred_now`]).
    pub(super) async fn set_identity(
        &mut self,
        table: &TableName,
        cols: &[String],
        kind: &str,
        op: &'static str,
    ) -> Result<(), ApplyError> {
        if kind != "ALWAYS" {
            // ALTER TABLE is refused while any check is queued on the table, initially
            // deferred ones included: run them all now. They hold here unless the source
            // transaction repairs a violation only later on, which is then reported as the
            // constraint's violation, naming it (the ALTER could not run either way).
            self.group.undeferred = self
                .check_deferred_now(std::slice::from_ref(table), true, op)
                .await?;
        }
        let alters: Vec<String> = cols
            .iter()
            .map(|c| format!("ALTER COLUMN {c} SET GENERATED {kind}"))
            .collect();
        self.session
            .client
            .batch_execute(&format!(
                "ALTER TABLE {} {}",
                table.quoted(),
                alters.join(", ")
            ))
            .await
            .map_err(|e| ApplyError::from_pg(&e, table, op))?;
        if kind == "ALWAYS" && std::mem::take(&mut self.group.undeferred) {
            self.defer_again(table, op).await?;
        }
        Ok(())
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
            .session
            .client
            .prepare(&plan.sql)
            .await
            .map_err(|e| ApplyError::from_pg(&e, table, op))?;
        let p = Arc::new(Prepared { stmt, plan });
        self.cache.insert(key, p.clone());
        Ok(p)
    }
}
