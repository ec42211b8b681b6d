//! Prometheus metrics: names as consts, one registry per daemon (tests run several in-process).
//! Labels come from configuration and catalogs (target, table, operation, SQLSTATE class),
//! never from row data.

use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

/// Seconds between now and the commit time of the oldest source transaction not yet applied
/// on every target that owns a part of it; 0 when caught up.
pub const LAG_SECONDS: &str = "migration_lag_seconds";
/// The same, per target.
pub const TARGET_LAG_SECONDS: &str = "migration_target_lag_seconds";
/// Failed apply attempts, by target and SQLSTATE class.
pub const ERRORS_TOTAL: &str = "migration_errors_total";
/// Tables and cross-service relationships the last periodic verification found inconsistent.
pub const INCONSISTENCY: &str = "data_inconsistency_detected";
/// Rows applied, by target, table and operation.
pub const ROWS_APPLIED_TOTAL: &str = "migration_rows_applied_total";
/// Source transactions committed on a target.
pub const TRANSACTIONS_APPLIED_TOTAL: &str = "migration_transactions_applied_total";
/// 1 while the replication stream is up.
pub const SOURCE_CONNECTED: &str = "migration_source_connected";
/// Reconnects of the replication stream (errors and target retries).
pub const STREAM_RESTARTS_TOTAL: &str = "migration_stream_restarts_total";
/// 1 while a target applies, 0 while it is failed and retrying.
pub const TARGET_UP: &str = "migration_target_up";
/// The LSN confirmed to the slot, as a number (bytes of WAL).
pub const CONFIRMED_LSN: &str = "migration_confirmed_lsn";
/// The latest WAL position received from the source.
pub const RECEIVED_LSN: &str = "migration_received_lsn";
/// The LSN each target has durably committed.
pub const TARGET_COMMITTED_LSN: &str = "migration_target_committed_lsn";
/// Seconds a target has had work without committing any of it (0 while it moves or is idle).
pub const TARGET_STUCK_SECONDS: &str = "migration_target_stuck_seconds";
/// Bytes of a target's share waiting in its spool on disk (0 while it takes changes live).
pub const SPOOL_BYTES: &str = "migration_spool_bytes";
/// 1 while a target is detached (its spool overflowed): it rejoins by one stream restart.
pub const TARGET_DETACHED: &str = "migration_target_detached";
/// Bytes of WAL between the newest position the source reported and the position confirmed to
/// the slot: what the slot makes the monolith keep beyond pgcarve's progress.
pub const LAG_BYTES: &str = "migration_lag_bytes";
/// WAL the slot keeps on the monolith (`pg_current_wal_lsn() - restart_lsn`), bytes.
pub const SLOT_RETAINED_WAL_BYTES: &str = "migration_slot_retained_wal_bytes";
/// Seconds from a target transaction's BEGIN to its COMMIT (one group of source
/// transactions), by target.
pub const APPLY_BATCH_SECONDS: &str = "migration_apply_batch_seconds";
/// 1 for a target's current state (`streaming`, `retrying`, `failed`, `starting`), by target.
pub const TARGET_STATE: &str = "migration_target_state";
/// Unix time of the last verification that completed (0: none yet).
pub const LAST_VERIFIED: &str = "migration_last_verified_timestamp_seconds";
/// 1 while an initial copy runs (the stream waits for the first one).
pub const COPYING: &str = "migration_copying";
/// 1, labelled with the version: which pgcarve is running.
pub const BUILD_INFO: &str = "migration_build_info";
/// Rows the initial copy has read of a table (written to each owner that needs it).
pub const COPY_ROWS: &str = "migration_copy_rows";
/// The source's estimate of a table's rows (`pg_class.reltuples`) when its copy began.
pub const COPY_ROWS_ESTIMATE: &str = "migration_copy_rows_estimate";
/// 1 once a table's initial copy committed on every owner that needed it.
pub const COPY_DONE: &str = "migration_copy_done";
/// 1 while monolith DDL on a routed table needs an operator, by table and problem.
pub const DDL_PROBLEM: &str = "migration_ddl_problem";
/// 1 for a routed table renamed or moved on the monolith (followed), by routed and new name.
pub const TABLE_RENAMED: &str = "migration_table_renamed";

/// The values of `migration_target_state`'s `state` label.
pub const TARGET_STATES: &[&str] = &["starting", "streaming", "retrying", "failed"];

/// The `sqlstate_class` values of `migration_errors_total` created at zero for every target:
/// pgcarve's own words and the SQLSTATE classes a target plausibly answers with (others appear
/// with their first error).
pub const ERROR_CLASSES: &[&str] = &[
    "divergence",
    "schema",
    "ddl",
    "connection",
    "protocol",
    "spool",
    "08",
    "22",
    "23",
    "25",
    "40",
    "42",
    "53",
    "54",
    "55",
    "57",
    "58",
    "XX",
];

/// Handles to every metric.
#[derive(Clone)]
pub struct Metrics {
    /// The registry served on /metrics.
    pub registry: Registry,
    /// See [`LAG_SECONDS`].
    pub lag_seconds: Gauge,
    /// See [`TARGET_LAG_SECONDS`].
    pub target_lag_seconds: GaugeVec,
    /// See [`ERRORS_TOTAL`].
    pub errors_total: IntCounterVec,
    /// See [`INCONSISTENCY`].
    pub inconsistency: IntGauge,
    /// See [`ROWS_APPLIED_TOTAL`].
    pub rows_applied: IntCounterVec,
    /// See [`TRANSACTIONS_APPLIED_TOTAL`].
    pub transactions_applied: IntCounterVec,
    /// See [`SOURCE_CONNECTED`].
    pub source_connected: IntGauge,
    /// See [`STREAM_RESTARTS_TOTAL`].
    pub stream_restarts: IntCounter,
    /// See [`TARGET_UP`].
    pub target_up: IntGaugeVec,
    /// See [`CONFIRMED_LSN`].
    pub confirmed_lsn: IntGauge,
    /// See [`RECEIVED_LSN`].
    pub received_lsn: IntGauge,
    /// See [`TARGET_COMMITTED_LSN`].
    pub target_committed_lsn: IntGaugeVec,
    /// See [`TARGET_STUCK_SECONDS`].
    pub target_stuck_seconds: GaugeVec,
    /// See [`DDL_PROBLEM`].
    pub ddl_problem: IntGaugeVec,
    /// See [`SPOOL_BYTES`].
    pub spool_bytes: IntGaugeVec,
    /// See [`TARGET_DETACHED`].
    pub target_detached: IntGaugeVec,
    /// See [`TABLE_RENAMED`].
    pub table_renamed: IntGaugeVec,
    /// See [`LAG_BYTES`].
    pub lag_bytes: IntGauge,
    /// See [`COPYING`].
    pub copying: IntGauge,
    /// See [`LAST_VERIFIED`].
    pub last_verified: IntGauge,
    /// See [`SLOT_RETAINED_WAL_BYTES`].
    pub slot_retained_wal_bytes: IntGauge,
    /// See [`APPLY_BATCH_SECONDS`].
    pub apply_batch_seconds: HistogramVec,
    /// See [`TARGET_STATE`].
    pub target_state: IntGaugeVec,
    /// See [`COPY_ROWS`].
    pub copy_rows: IntGaugeVec,
    /// See [`COPY_ROWS_ESTIMATE`].
    pub copy_rows_estimate: IntGaugeVec,
    /// See [`COPY_DONE`].
    pub copy_done: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("metric names are unique");
        };
        let lag_seconds = Gauge::new(LAG_SECONDS, "Seconds since the commit of the oldest source transaction not yet applied on every owning target (0 when caught up).").unwrap();
        let target_lag_seconds = GaugeVec::new(
            Opts::new(TARGET_LAG_SECONDS, "migration_lag_seconds for one target."),
            &["target"],
        )
        .unwrap();
        let errors_total = IntCounterVec::new(Opts::new(ERRORS_TOTAL, "Failed apply attempts by target and SQLSTATE class (divergence: a row to update or delete was not found)."), &["target", "sqlstate_class"]).unwrap();
        let inconsistency = IntGauge::new(
            INCONSISTENCY,
            "Tables and cross-service relationships the last verification found inconsistent (0 when all matched).",
        )
        .unwrap();
        let rows_applied = IntCounterVec::new(
            Opts::new(
                ROWS_APPLIED_TOTAL,
                "Rows applied (committed) by target, table and operation.",
            ),
            &["target", "table", "operation"],
        )
        .unwrap();
        let transactions_applied = IntCounterVec::new(
            Opts::new(
                TRANSACTIONS_APPLIED_TOTAL,
                "Source transactions committed on a target.",
            ),
            &["target"],
        )
        .unwrap();
        let source_connected = IntGauge::new(
            SOURCE_CONNECTED,
            "1 while the replication stream from the source is up.",
        )
        .unwrap();
        let stream_restarts = IntCounter::new(
            STREAM_RESTARTS_TOTAL,
            "Restarts of the replication stream (connection loss or a target retrying).",
        )
        .unwrap();
        let target_up = IntGaugeVec::new(
            Opts::new(
                TARGET_UP,
                "1 while the target applies, 0 while failed and retrying.",
            ),
            &["target"],
        )
        .unwrap();
        let confirmed_lsn = IntGauge::new(
            CONFIRMED_LSN,
            "LSN confirmed to the replication slot (bytes).",
        )
        .unwrap();
        let received_lsn = IntGauge::new(
            RECEIVED_LSN,
            "Latest WAL position received from the source (bytes).",
        )
        .unwrap();
        let target_committed_lsn = IntGaugeVec::new(
            Opts::new(
                TARGET_COMMITTED_LSN,
                "Source commit LSN durably applied on the target (bytes).",
            ),
            &["target"],
        )
        .unwrap();
        let ddl_problem = IntGaugeVec::new(
            Opts::new(
                DDL_PROBLEM,
                "1 while monolith DDL on a routed table (dropped, recreated, unpublished, replica identity) stalls its owners until an operator acts.",
            ),
            &["table", "problem"],
        )
        .unwrap();
        let table_renamed = IntGaugeVec::new(
            Opts::new(
                TABLE_RENAMED,
                "1 for a routed table renamed or moved on the monolith; its changes still reach its owners.",
            ),
            &["table", "source_name"],
        )
        .unwrap();
        let target_stuck_seconds = GaugeVec::new(
            Opts::new(
                TARGET_STUCK_SECONDS,
                "Seconds the target has had work without committing any of it (a lock wait, a dead connection); 0 while it moves or is idle.",
            ),
            &["target"],
        )
        .unwrap();
        reg(Box::new(target_stuck_seconds.clone()));
        let spool_bytes = IntGaugeVec::new(
            Opts::new(
                SPOOL_BYTES,
                "Bytes of the target's share of the stream waiting in its spool on disk (0 while it takes changes live).",
            ),
            &["target"],
        )
        .unwrap();
        reg(Box::new(spool_bytes.clone()));
        let target_detached = IntGaugeVec::new(
            Opts::new(
                TARGET_DETACHED,
                "1 while the target is detached (its spool reached apply.spool_max_bytes); it rejoins by one stream restart.",
            ),
            &["target"],
        )
        .unwrap();
        reg(Box::new(target_detached.clone()));
        let lag_bytes = IntGauge::new(
            LAG_BYTES,
            "Bytes of WAL between the newest position the source reported and the position confirmed to the slot.",
        )
        .unwrap();
        reg(Box::new(lag_bytes.clone()));
        let copying = IntGauge::new(
            COPYING,
            "1 while an initial copy runs (the first start's stream waits for it).",
        )
        .unwrap();
        reg(Box::new(copying.clone()));
        let last_verified = IntGauge::new(
            LAST_VERIFIED,
            "Unix time of the last verification that completed (0: none yet).",
        )
        .unwrap();
        reg(Box::new(last_verified.clone()));
        let slot_retained_wal_bytes = IntGauge::new(
            SLOT_RETAINED_WAL_BYTES,
            "WAL the slot keeps on the monolith (pg_current_wal_lsn() - restart_lsn), bytes.",
        )
        .unwrap();
        reg(Box::new(slot_retained_wal_bytes.clone()));
        let apply_batch_seconds = HistogramVec::new(
            HistogramOpts::new(
                APPLY_BATCH_SECONDS,
                "Seconds from a target transaction's BEGIN to its COMMIT (one group of source transactions).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["target"],
        )
        .unwrap();
        reg(Box::new(apply_batch_seconds.clone()));
        let target_state = IntGaugeVec::new(
            Opts::new(
                TARGET_STATE,
                "1 for the target's current state (streaming, retrying, failed, starting).",
            ),
            &["target", "state"],
        )
        .unwrap();
        reg(Box::new(target_state.clone()));
        let build_info = IntGaugeVec::new(
            Opts::new(
                BUILD_INFO,
                "1, labelled with the running pgcarve's version.",
            ),
            &["version"],
        )
        .unwrap();
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        reg(Box::new(build_info));
        let copy_gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["table"]).unwrap();
            reg(Box::new(g.clone()));
            g
        };
        let copy_rows = copy_gauge(
            COPY_ROWS,
            "Rows the initial copy has read of the table (written to each owner that needs it).",
        );
        let copy_rows_estimate = copy_gauge(
            COPY_ROWS_ESTIMATE,
            "The source's estimate of the table's rows (pg_class.reltuples) when its copy began.",
        );
        let copy_done = copy_gauge(
            COPY_DONE,
            "1 once the table's initial copy committed on every owner that needed it.",
        );
        reg(Box::new(ddl_problem.clone()));
        reg(Box::new(table_renamed.clone()));
        reg(Box::new(lag_seconds.clone()));
        reg(Box::new(target_lag_seconds.clone()));
        reg(Box::new(errors_total.clone()));
        reg(Box::new(inconsistency.clone()));
        reg(Box::new(rows_applied.clone()));
        reg(Box::new(transactions_applied.clone()));
        reg(Box::new(source_connected.clone()));
        reg(Box::new(stream_restarts.clone()));
        reg(Box::new(target_up.clone()));
        reg(Box::new(confirmed_lsn.clone()));
        reg(Box::new(received_lsn.clone()));
        reg(Box::new(target_committed_lsn.clone()));
        Metrics {
            registry,
            lag_seconds,
            target_lag_seconds,
            errors_total,
            inconsistency,
            rows_applied,
            transactions_applied,
            source_connected,
            stream_restarts,
            target_up,
            confirmed_lsn,
            received_lsn,
            target_committed_lsn,
            spool_bytes,
            target_detached,
            ddl_problem,
            table_renamed,
            target_stuck_seconds,
            lag_bytes,
            copying,
            last_verified,
            slot_retained_wal_bytes,
            apply_batch_seconds,
            target_state,
            copy_rows,
            copy_rows_estimate,
            copy_done,
        }
    }

    /// Creates every series of a target at zero, so alert rules and dashboards see them from
    /// start-up (an `increase()` over a counter that appears with its first error misses it).
    pub fn init_target(&self, target: &str, tables: &[String]) {
        for class in ERROR_CLASSES {
            self.errors_total.with_label_values(&[target, class]);
        }
        for table in tables {
            for op in ["insert", "update", "delete", "truncate"] {
                self.rows_applied.with_label_values(&[target, table, op]);
            }
        }
        let t = [target];
        self.transactions_applied.with_label_values(&t);
        self.target_up.with_label_values(&t);
        self.target_lag_seconds.with_label_values(&t);
        self.target_committed_lsn.with_label_values(&t);
        self.target_stuck_seconds.with_label_values(&t);
        self.spool_bytes.with_label_values(&t);
        self.target_detached.with_label_values(&t);
        self.apply_batch_seconds.with_label_values(&t);
        self.set_target_state(target, "starting");
    }

    /// Removes a target's series (a side stream that joined its target).
    pub fn remove_target(&self, target: &str, tables: &[String]) {
        for class in ERROR_CLASSES {
            let _ = self.errors_total.remove_label_values(&[target, class]);
        }
        for table in tables {
            for op in ["insert", "update", "delete", "truncate"] {
                let _ = self.rows_applied.remove_label_values(&[target, table, op]);
            }
        }
        let t = [target];
        let _ = self.transactions_applied.remove_label_values(&t);
        let _ = self.target_up.remove_label_values(&t);
        let _ = self.target_lag_seconds.remove_label_values(&t);
        let _ = self.target_committed_lsn.remove_label_values(&t);
        let _ = self.target_stuck_seconds.remove_label_values(&t);
        let _ = self.spool_bytes.remove_label_values(&t);
        let _ = self.target_detached.remove_label_values(&t);
        let _ = self.apply_batch_seconds.remove_label_values(&t);
        for s in TARGET_STATES {
            let _ = self.target_state.remove_label_values(&[target, s]);
        }
    }

    /// Sets the target's state series: 1 for `state`, 0 for the others.
    pub fn set_target_state(&self, target: &str, state: &str) {
        for s in TARGET_STATES {
            self.target_state
                .with_label_values(&[target, s])
                .set(i64::from(*s == state));
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("text encoding into a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_all_names() {
        let m = Metrics::new();
        m.errors_total.with_label_values(&["patient", "23"]).inc();
        m.rows_applied
            .with_label_values(&["patient", "public.patients", "insert"])
            .inc();
        m.target_lag_seconds
            .with_label_values(&["patient"])
            .set(0.0);
        m.target_up.with_label_values(&["patient"]).set(1);
        m.transactions_applied.with_label_values(&["patient"]).inc();
        m.target_committed_lsn
            .with_label_values(&["patient"])
            .set(1);
        let text = m.render();
        for name in [
            LAG_SECONDS,
            ERRORS_TOTAL,
            INCONSISTENCY,
            ROWS_APPLIED_TOTAL,
            SOURCE_CONNECTED,
            CONFIRMED_LSN,
            TARGET_UP,
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
