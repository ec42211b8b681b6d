//! Apply errors and how they are reported: SQLSTATE, table, column, constraint, target, LSN —
//! never DETAIL, never a server message (both can quote row values), never a value.

use crate::apply::statements::PlanError;
use crate::pg::sqlstate_name;
use crate::table::TableName;

/// Why applying a change failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApplyError {
    /// The target rejected a statement.
    #[error("target rejected {operation} on {table}: SQLSTATE {sqlstate} ({})", sqlstate_name(.sqlstate))]
    Rejected {
        /// The source table.
        table: TableName,
        /// insert / update / delete / truncate / commit.
        operation: &'static str,
        /// SQLSTATE.
        sqlstate: String,
        /// Constraint named by the server, if any.
        constraint: Option<String>,
        /// Column named by the server, if any.
        column: Option<String>,
    },
    /// An UPDATE or DELETE matched no row: the target diverged from the source.
    #[error("{operation} on {table} matched {rows} rows on the target instead of 1: the target diverged from the source")]
    Divergence {
        /// The source table.
        table: TableName,
        /// update / delete.
        operation: &'static str,
        /// Rows matched.
        rows: u64,
    },
    /// A statement could not be built (schema mismatch).
    #[error("{0}")]
    Plan(#[from] PlanError),
    /// The connection failed (no server error): safe description only.
    #[error("target connection: {0}")]
    Connection(String),
    /// The failed group's kept changes could not be read back from disk (retried from the slot).
    #[error("kept changes: {0}")]
    Kept(String),
    /// A value arrived in binary format, which we never request.
    #[error("binary value in column {column} of {table} (pgcarve requests text format)")]
    Binary {
        /// Table.
        table: TableName,
        /// Column.
        column: String,
    },
    /// The source did something pgcarve cannot follow for a table this target owns.
    #[error("{0}")]
    Halted(String),
    /// A Relation for a table this target has no catalog entry for.
    #[error("table {0} is not known on this target")]
    UnknownTable(TableName),
    /// The target's progress row is behind what this task saw it commit: the target lost
    /// committed transactions (restored from a backup, failed over to a lagging standby, or
    /// the row was edited). Continuing could skip changes the slot no longer holds.
    #[error("pgcarve.progress on this target went back from {from} to {to}: the target lost committed transactions (backup restore, failover to a lagging standby?); it stays stalled: resynchronise it")]
    ProgressRewound {
        /// What this task had committed.
        from: crate::lsn::Lsn,
        /// What the target now says.
        to: crate::lsn::Lsn,
    },
}

impl ApplyError {
    /// Builds the report of a tokio-postgres error without its DETAIL or message.
    pub fn from_pg(
        e: &tokio_postgres::Error,
        table: &TableName,
        operation: &'static str,
    ) -> ApplyError {
        match e.as_db_error() {
            Some(db) => ApplyError::Rejected {
                table: table.clone(),
                operation,
                sqlstate: db.code().code().to_string(),
                constraint: db.constraint().map(str::to_string),
                column: db.column().map(str::to_string),
            },
            // Non-server errors (I/O, closed, TLS, protocol) carry no row data.
            None => ApplyError::Connection(e.to_string()),
        }
    }

    /// The label for `migration_errors_total`: the SQLSTATE class, or a word.
    pub fn class(&self) -> String {
        match self {
            ApplyError::Rejected { sqlstate, .. } => sqlstate.chars().take(2).collect(),
            ApplyError::Divergence { .. } | ApplyError::ProgressRewound { .. } => {
                "divergence".into()
            }
            ApplyError::Plan(_) | ApplyError::UnknownTable(_) => "schema".into(),
            ApplyError::Halted(_) => "ddl".into(),
            ApplyError::Connection(_) => "connection".into(),
            ApplyError::Binary { .. } => "protocol".into(),
            ApplyError::Kept(_) => "spool".into(),
        }
    }

    /// Retrying cannot help: the target lost history, or the source changed in a way pgcarve
    /// cannot follow. An operator must act; the target stays stalled until a restart.
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            ApplyError::ProgressRewound { .. } | ApplyError::Halted(_)
        )
    }

    /// SQLSTATE, when the server sent one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ApplyError::Rejected { sqlstate, .. } => Some(sqlstate),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_table_and_code_only() {
        let e = ApplyError::Rejected {
            table: TableName::parse("patients").unwrap(),
            operation: "insert",
            sqlstate: "23505".into(),
            constraint: Some("patients_pkey".into()),
            column: None,
        };
        assert_eq!(
            e.to_string(),
            "target rejected insert on public.patients: SQLSTATE 23505 (unique_violation)"
        );
        assert_eq!(e.class(), "23");
    }
}
