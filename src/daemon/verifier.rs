//! Periodic verification while running (`verify.interval_secs`, off by default): the `verify`
//! command's comparison of every routed table and cross-service relationship, its outcome in
//! `data_inconsistency_detected` (how many are inconsistent now, which the `DataInconsistency`
//! alert watches), `migration_last_verified_timestamp_seconds`, the log and `/health` (the
//! status page shows it). Counts and names only.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::health::Health;
use crate::metrics::Metrics;

/// Runs until `shutdown`, one verification every `every`.
pub async fn run(
    settings: Settings,
    every: Duration,
    metrics: Metrics,
    health: Health,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            o = crate::verify::run(&settings, None, None) => o,
        };
        match outcome {
            Ok(report) => {
                let tables: Vec<String> = report
                    .tables
                    .iter()
                    .filter(|t| t.diff.differs())
                    .map(|t| format!("{} at {}", t.table, t.target))
                    .chain(
                        report
                            .orphans
                            .iter()
                            .map(|o| format!("{} (orphans)", o.constraint)),
                    )
                    .collect();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                metrics.inconsistency.set(tables.len() as i64);
                metrics.last_verified.set(now);
                health.set_verification(serde_json::json!({
                    "at_unix": now,
                    "inconsistent": tables,
                    "tables_compared": report.tables.len(),
                }));
                if tables.is_empty() {
                    tracing::info!(
                        tables = report.tables.len(),
                        "verification: every table and relationship matches the monolith"
                    );
                } else {
                    tracing::error!(inconsistent = ?tables, "verification found differences: run pgcarve verify for the keys");
                }
            }
            Err(reason) => {
                tracing::warn!("verification could not run, trying again at the next one: {reason}")
            }
        }
    }
}
