//! Keeping the slot from holding the monolith's WAL without need, and saying when it does.
//!
//! - **Heartbeat**: while the routed tables are idle, nothing of ours is decoded, yet WAL keeps
//!   growing (other tables, other databases). Every `source.heartbeat_secs` a non-transactional
//!   logical decoding message (`pg_logical_emit_message`, no table is written; pgoutput does not
//!   send it to us, as we do not ask for messages) puts a record of our database in the WAL: the
//!   walsender decodes past it, its keepalive reports the position, and the reader confirms it.
//! - **Retained WAL**: how much WAL the slot keeps (`pg_current_wal_lsn() - restart_lsn`), as a
//!   metric; a warning when it crosses `source.retained_wal_warn_bytes`.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::conninfo::ConnInfo;
use crate::metrics::Metrics;
use crate::pg::safe_pg_error;
use crate::tls::TlsConnector;

/// What the task watches and how often.
pub struct Watch {
    /// The monolith.
    pub source: ConnInfo,
    /// Its TLS.
    pub tls: TlsConnector,
    /// The slot.
    pub slot: String,
    /// How often.
    pub every: Duration,
    /// Send heartbeats (else only read the retained WAL).
    pub heartbeat: bool,
    /// Warn above this many retained bytes.
    pub warn_bytes: u64,
}

/// Runs until `shutdown`: a heartbeat and a retained-WAL reading every `every`.
pub async fn run(w: Watch, metrics: Metrics, shutdown: CancellationToken) {
    let Watch {
        source,
        tls,
        slot,
        every,
        heartbeat,
        warn_bytes,
    } = w;
    let mut client: Option<Client> = None;
    let mut heartbeat = heartbeat;
    let mut warned = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = crate::pg::connect(&source, &tls).await.ok();
        }
        let Some(c) = &client else { continue };
        if heartbeat {
            if let Err(e) = c
                .execute(
                    "SELECT pg_logical_emit_message(false, 'pgcarve', 'heartbeat')",
                    &[],
                )
                .await
            {
                if e.code().is_some_and(|s| s.code() == "42501") {
                    tracing::warn!(
                        "source heartbeat off: the role may not run pg_logical_emit_message ({}); while the routed tables are idle the slot advances only with the monolith's own WAL in this database (GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) to the role)",
                        safe_pg_error(&e)
                    );
                    heartbeat = false;
                } else {
                    tracing::debug!("source heartbeat failed: {}", safe_pg_error(&e));
                }
            }
        }
        match c
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(Some(row)) => {
                let bytes: Option<i64> = row.get(0);
                let bytes = bytes.unwrap_or(0).max(0);
                metrics.slot_retained_wal_bytes.set(bytes);
                let over = bytes as u64 >= warn_bytes;
                if over && !warned {
                    tracing::warn!(
                        slot,
                        retained_bytes = bytes,
                        threshold = warn_bytes,
                        "the slot retains more WAL on the monolith than source.retained_wal_warn_bytes: a target is behind or stalled (see /health); the monolith's disk fills until it catches up"
                    );
                } else if !over && warned {
                    tracing::info!(
                        slot,
                        retained_bytes = bytes,
                        "the slot's retained WAL is below the warning threshold again"
                    );
                }
                warned = over;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(
                "reading the slot's retained WAL failed: {}",
                safe_pg_error(&e)
            ),
        }
    }
}
