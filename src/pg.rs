//! PostgreSQL helpers every layer uses: quoting, SQLSTATE names, the PHI-safe error summary and
//! the one way to open a normal (non-replication) connection.
//!
//! PostgreSQL errors carry row data in their DETAIL ("Failing row contains (…)") and sometimes
//! in the message itself (key values in unique violations, the input of a 22P02). What leaves
//! this module for a log line or `/health` is the SQLSTATE and its name, never the message of a
//! server error. See the PostgreSQL docs, Appendix A "PostgreSQL Error Codes"
//! (<https://www.postgresql.org/docs/15/errcodes-appendix.html>).

use tokio_postgres::Client;

use crate::conninfo::ConnInfo;
use crate::tls::TlsConnector;

/// Quotes an identifier for SQL and replication commands.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A short name for common SQLSTATEs, so a log line says what happened without the message.
pub fn sqlstate_name(code: &str) -> &'static str {
    match code {
        "428C9" => "generated_always",
        "55006" => "object_in_use",
        "23502" => "not_null_violation",
        "23503" => "foreign_key_violation",
        "23505" => "unique_violation",
        "23514" => "check_violation",
        "23P01" => "exclusion_violation",
        "22P02" => "invalid_text_representation",
        "22001" => "string_data_right_truncation",
        "22003" => "numeric_value_out_of_range",
        "22007" => "invalid_datetime_format",
        "22008" => "datetime_field_overflow",
        "22P05" => "untranslatable_character",
        "42P01" => "undefined_table",
        "42703" => "undefined_column",
        "42804" => "datatype_mismatch",
        "42883" => "undefined_function",
        "42501" => "insufficient_privilege",
        "40001" => "serialization_failure",
        "40P01" => "deadlock_detected",
        "25P02" => "in_failed_sql_transaction",
        "57014" => "query_canceled",
        "57P01" => "admin_shutdown",
        "53100" => "disk_full",
        "53300" => "too_many_connections",
        _ => "see PostgreSQL Appendix A",
    }
}

/// SQLSTATE classes whose messages name things (roles, databases, slots, WAL segments,
/// settings) rather than quote data: connection, authorization, catalog objects, resources,
/// object state, operator intervention, system errors, unsupported features.
const NAMING_CLASSES: &[&str] = &["08", "28", "3D", "42", "53", "55", "57", "58", "0A"];

/// Whether a server message with this SQLSTATE may be shown: only for classes whose messages
/// name objects. Errors raised while the server decodes or converts (encoding conversion, an
/// output function, an internal error) may quote bytes of a row.
pub fn message_is_safe(sqlstate: &str) -> bool {
    NAMING_CLASSES.iter().any(|c| sqlstate.starts_with(c))
}

/// Renders a tokio-postgres error without DETAIL or the server message.
pub fn safe_pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "SQLSTATE {} ({})",
            db.code().code(),
            sqlstate_name(db.code().code())
        ),
        // Not a server error (I/O, TLS, closed): no row data, and the cause is what an operator
        // needs, so follow the source chain that tokio-postgres' Display leaves out.
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text.push_str(": ");
                text.push_str(&c.to_string());
                cause = c.source();
            }
            text
        }
    }
}

/// Opens a normal SQL connection with the database's TLS settings; the connection task runs in
/// the background until the client is dropped.
pub async fn connect(conn: &ConnInfo, tls: &TlsConnector) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = conn.to_tokio_config().connect(tls.clone()).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Opens a normal SQL connection to `conn`, building its TLS settings first; errors are one
/// line naming `what` (`source`, `target billing`) and never a value.
pub async fn open(conn: &ConnInfo, what: &str) -> Result<Client, String> {
    let tls = TlsConnector::new(conn).map_err(|e| format!("{what}: {e}"))?;
    connect(conn, &tls)
        .await
        .map_err(|e| format!("{what}: connect: {}", safe_pg_error(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn only_naming_classes_keep_their_message() {
        assert!(message_is_safe("42704"));
        assert!(message_is_safe("08006"));
        assert!(!message_is_safe("22P05"));
        assert!(!message_is_safe("XX000"));
        assert!(!message_is_safe(""));
    }
}
