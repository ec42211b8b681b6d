//! The periodic source tasks (the catalog check, the heartbeat and retained-WAL reading) and
//! SIGHUP: a reload re-reads the config file; the keys in `config::LIVE_KEYS` change the running
//! tasks at once; a change of targets' table lists (and nothing else) restarts the stream with
//! them inside the process (added tables are copied while it streams); every other changed key
//! is named as taking effect at the next restart. A file that does not validate is rejected and
//! the running config kept. Key names are logged, never values (a URL may hold a password).

use std::path::PathBuf;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{changed_keys, Settings, LIVE_KEYS};
use crate::metrics::Metrics;
use crate::source::ddl::CatalogProblem;
use crate::table::TableName;
use crate::tls::TlsConnector;

/// `targets.NAME.tables`.
fn is_table_list(key: &str) -> bool {
    let parts: Vec<&str> = key.split('.').collect();
    matches!(parts.as_slice(), ["targets", _, "tables"])
}

/// The running periodic tasks and what they were started with.
pub struct Periodic {
    settings: Settings,
    tls: TlsConnector,
    routed: Vec<(TableName, u32)>,
    problems: mpsc::UnboundedSender<CatalogProblem>,
    metrics: Metrics,
    shutdown: CancellationToken,
    watch: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    /// Where a reload that changes table lists asks for a restart of the stream with them.
    restart: Option<mpsc::UnboundedSender<Settings>>,
}

impl Periodic {
    /// Starts the catalog check and the heartbeat.
    pub fn start(
        settings: &Settings,
        tls: TlsConnector,
        routed: Vec<(TableName, u32)>,
        problems: mpsc::UnboundedSender<CatalogProblem>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Periodic {
        let mut p = Periodic {
            settings: settings.clone(),
            tls,
            routed,
            problems,
            metrics,
            shutdown,
            watch: tokio::spawn(async {}),
            heartbeat: tokio::spawn(async {}),
            restart: None,
        };
        p.respawn();
        p
    }

    /// Sends a reload that changes targets' table lists (and nothing else) to `restart`.
    pub fn restarting_with(mut self, restart: mpsc::UnboundedSender<Settings>) -> Periodic {
        self.restart = Some(restart);
        self
    }

    fn respawn(&mut self) {
        self.watch.abort();
        self.heartbeat.abort();
        let s = &self.settings;
        self.watch = tokio::spawn(crate::source::ddl::watch(
            s.source.clone(),
            self.tls.clone(),
            s.publication.clone(),
            self.routed.clone(),
            s.catalog_check,
            self.problems.clone(),
            self.shutdown.clone(),
        ));
        self.heartbeat = tokio::spawn(crate::source::heartbeat::run(
            crate::source::heartbeat::Watch {
                source: s.source.clone(),
                tls: self.tls.clone(),
                slot: s.slot.clone(),
                every: s.heartbeat.unwrap_or(std::time::Duration::from_secs(30)),
                heartbeat: s.heartbeat.is_some(),
                warn_bytes: s.retained_wal_warn_bytes,
            },
            self.metrics.clone(),
            self.shutdown.clone(),
        ));
    }

    /// Applies a reload of `path`.
    fn reload(&mut self, path: &std::path::Path) {
        let new = match super::load_settings(path) {
            Ok(n) => n,
            Err(problems) => {
                tracing::error!(
                    "reload: {} rejected, the running config stays: {problems:#}",
                    path.display()
                );
                return;
            }
        };
        let keys = changed_keys(&self.settings.raw, &new.raw);
        if keys.is_empty() {
            tracing::info!("reload: nothing changed");
            return;
        }
        let (live, later): (Vec<String>, Vec<String>) = keys
            .into_iter()
            .partition(|k| LIVE_KEYS.contains(&k.as_str()));
        // Table lists of existing targets: the stream restarts with them, when nothing else
        // waits for a restart.
        let (tables, mut later): (Vec<String>, Vec<String>) =
            later.into_iter().partition(|k| is_table_list(k));
        if !tables.is_empty() {
            match &self.restart {
                Some(tx) if later.is_empty() => {
                    tracing::info!(keys = ?tables, "reload: the routed tables changed; the stream restarts with them (added tables are copied while it streams)");
                    let _ = tx.send(new.clone());
                }
                _ => later.extend(tables),
            }
        }
        if !live.is_empty() {
            let s = &mut self.settings;
            s.heartbeat = new.heartbeat;
            s.retained_wal_warn_bytes = new.retained_wal_warn_bytes;
            s.catalog_check = new.catalog_check;
            s.raw.source.heartbeat_secs = new.raw.source.heartbeat_secs;
            s.raw.source.retained_wal_warn_bytes = new.raw.source.retained_wal_warn_bytes;
            s.raw.source.catalog_check_secs = new.raw.source.catalog_check_secs;
            self.respawn();
            tracing::info!(keys = ?live, "reload: applied");
        }
        if !later.is_empty() {
            tracing::warn!(keys = ?later, "reload: these changes take effect at the next restart");
        }
    }

    /// Runs until shutdown, reloading on each request (a config path from SIGHUP); gives the
    /// requests back (the daemon may run another pipeline with them).
    pub async fn run(
        mut self,
        mut reloads: Option<mpsc::UnboundedReceiver<PathBuf>>,
    ) -> Option<mpsc::UnboundedReceiver<PathBuf>> {
        loop {
            let next = async {
                match reloads.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                path = next => match path {
                    Some(path) => self.reload(&path),
                    None => reloads = None,
                },
            }
        }
        self.watch.abort();
        self.heartbeat.abort();
        reloads
    }
}
