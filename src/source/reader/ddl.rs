//! Monolith DDL as the reader sees it: renames followed and reported, replaced tables and the
//! catalog check's problems stopping the owning targets (`ApplyMsg::Halt`), each reported once.

use tokio::sync::mpsc;

use super::txn::Ddl;
use super::{Reader, ReaderError};
use crate::link::ApplyMsg;
use crate::source::conn::ReplicationConn;
use crate::source::ddl::CatalogProblem;

impl Reader {
    /// Reports monolith DDL seen in the stream: a rename is followed, a replaced table stops
    /// its owners.
    pub(super) async fn on_ddl(
        &mut self,
        conn: &mut ReplicationConn,
        ddl: Ddl,
    ) -> Result<(), ReaderError> {
        match ddl {
            Ddl::Renamed {
                table,
                now,
                targets,
            } => {
                if !self
                    .ddl_seen
                    .insert((table.clone(), format!("renamed {now}")))
                {
                    return Ok(());
                }
                tracing::warn!(
                    table = %table,
                    source_name = %now,
                    targets = %self.names(&targets),
                    "routed table {table} is now {now} on the source (renamed or moved); its changes still go to {table} on its targets. Before the next restart, put {now} in those targets' tables and rename the target tables to match"
                );
                self.metrics
                    .table_renamed
                    .with_label_values(&[&table.to_string(), &now.to_string()])
                    .set(1);
            }
            Ddl::Replaced {
                table,
                oid,
                targets,
            } => {
                let names = self.names(&targets);
                let problem = CatalogProblem {
                    table: table.clone(),
                    problem: "recreated",
                    message: format!(
                        "routed table {table} was dropped and recreated on the source (it is now relation {oid}): its rows since then are not those pgcarve copied; resynchronise {table} on {names} from the source, then restart"
                    ),
                };
                self.halt(conn, problem, &targets).await?;
            }
        }
        Ok(())
    }

    /// Stops the owners of a table an operator must look at: logged, counted, in `/health`,
    /// and each owner stalls (holding the slot) until a restart.
    pub(super) async fn halt(
        &mut self,
        conn: &mut ReplicationConn,
        p: CatalogProblem,
        targets: &[usize],
    ) -> Result<(), ReaderError> {
        if !self
            .ddl_seen
            .insert((p.table.clone(), p.problem.to_string()))
        {
            return Ok(());
        }
        tracing::error!(table = %p.table, problem = p.problem, "{}", p.message);
        self.metrics
            .ddl_problem
            .with_label_values(&[&p.table.to_string(), p.problem])
            .set(1);
        self.health.add_problem(p.message.clone());
        for &i in targets {
            self.send(conn, i, ApplyMsg::Halt(p.message.clone()))
                .await?;
        }
        Ok(())
    }

    /// The names of targets, comma-separated.
    fn names(&self, targets: &[usize]) -> String {
        targets
            .iter()
            .map(|&i| self.links[i].name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The next problem from the catalog check; pending forever without one.
pub(super) async fn next_problem(
    rx: &mut Option<mpsc::UnboundedReceiver<CatalogProblem>>,
) -> Option<CatalogProblem> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
