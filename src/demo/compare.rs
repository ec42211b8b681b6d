//! The demo's final check: every routed table equal in the monolith and in its service
//! database, compared by row count and a digest of the sorted rows (computed in SQL: no value
//! leaves the databases).

use tokio_postgres::Client;

use super::connect;
use super::fixtures::SERVICES;
use crate::localpg::Cluster;

/// The comparison of one target.
pub(super) struct TargetReport {
    /// Target name.
    pub target: &'static str,
    /// Its tables, comma-separated.
    pub tables: String,
    /// Rows in them on the target.
    pub rows: i64,
    /// Every table equal.
    pub equal: bool,
}

/// Row count and a digest of the whole table, sorted by row text.
async fn digest(
    client: &Client,
    table: &str,
) -> Result<(i64, Option<String>), tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t"
            ),
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Compares every service database with the monolith.
pub(super) async fn compare(cluster: &Cluster, care: &Client) -> anyhow::Result<Vec<TargetReport>> {
    let mut out = Vec::new();
    for svc in SERVICES {
        let client = connect(&cluster.url(svc.db)).await?;
        let mut rows = 0;
        let mut equal = true;
        for t in svc.tables {
            let (n, d) = digest(&client, t).await?;
            let (sn, sd) = digest(care, t).await?;
            rows += n;
            equal &= n == sn && d == sd;
        }
        out.push(TargetReport {
            target: svc.target,
            tables: svc.tables.join(", "),
            rows,
            equal,
        });
    }
    Ok(out)
}
