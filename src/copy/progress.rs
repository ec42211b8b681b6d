//! Copy progress a person can watch: per table rows copied, the estimate (`pg_class.reltuples`),
//! rows/s and the time left — in the log every 10 s, in the metrics and `/health` every second,
//! and, when pgcarve runs in a terminal, as live bars on stderr (log lines pass above them).
//! Counts only; never a value.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The terminal's bars, once [`enable_terminal_display`] was called.
static TERMINAL: OnceLock<MultiProgress> = OnceLock::new();

/// Draws copy progress as bars on stderr from now on (call it when stderr is a terminal).
pub fn enable_terminal_display() {
    TERMINAL.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
}

/// A writer for log lines: above the bars while they are drawn, plain stderr otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrAboveBars;

impl Write for StderrAboveBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match TERMINAL.get() {
            Some(mp) => mp.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

use serde_json::json;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::table::TableName;

/// One table's copy.
#[derive(Debug)]
struct Entry {
    table: TableName,
    targets: Vec<String>,
    estimate: u64,
    rows: Arc<AtomicU64>,
    chunks: u32,
    chunks_done: u32,
    started: Option<Instant>,
    finished: Option<Instant>,
}

/// Shared progress of one copy run.
#[derive(Clone, Default)]
pub struct CopyProgress(
    Arc<Mutex<Vec<Entry>>>,
    Arc<Mutex<HashMap<TableName, ProgressBar>>>,
);

/// A snapshot of one table's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct TableProgress {
    /// The table.
    pub table: TableName,
    /// Its owners being copied to.
    pub targets: Vec<String>,
    /// Rows copied so far.
    pub rows: u64,
    /// Rows the source estimates.
    pub estimate: u64,
    /// Rows per second since it started.
    pub rows_per_sec: f64,
    /// Seconds left at that pace, once it has one.
    pub eta_secs: Option<f64>,
    /// `pending`, `copying` or `copied`.
    pub state: &'static str,
    /// Chunks planned and finished.
    pub chunks: (u32, u32),
}

impl CopyProgress {
    fn with<T>(&self, f: impl FnOnce(&mut Vec<Entry>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Adds a table; returns the counter its chunks add their rows to.
    pub fn add(
        &self,
        table: &TableName,
        targets: Vec<String>,
        estimate: u64,
        chunks: u32,
    ) -> Arc<AtomicU64> {
        let rows = Arc::new(AtomicU64::new(0));
        self.with(|v| {
            v.push(Entry {
                table: table.clone(),
                targets,
                estimate,
                rows: rows.clone(),
                chunks,
                chunks_done: 0,
                started: None,
                finished: None,
            })
        });
        rows
    }

    /// A chunk of `table` starts.
    pub fn chunk_started(&self, table: &TableName) {
        self.with(|v| {
            if let Some(e) = v.iter_mut().find(|e| &e.table == table) {
                e.started.get_or_insert_with(Instant::now);
            }
        });
    }

    /// A chunk of `table` finished; true when it was the last.
    pub fn chunk_done(&self, table: &TableName) -> bool {
        self.with(|v| {
            let Some(e) = v.iter_mut().find(|e| &e.table == table) else {
                return false;
            };
            e.chunks_done += 1;
            if e.chunks_done >= e.chunks {
                e.finished = Some(Instant::now());
                true
            } else {
                false
            }
        })
    }

    /// Every table's progress now.
    pub fn snapshot(&self) -> Vec<TableProgress> {
        let now = Instant::now();
        self.with(|v| {
            v.iter()
                .map(|e| {
                    let rows = e.rows.load(Ordering::Relaxed);
                    let elapsed = e
                        .started
                        .map(|s| e.finished.unwrap_or(now).duration_since(s))
                        .unwrap_or_default();
                    let rate = if elapsed > Duration::from_millis(100) {
                        rows as f64 / elapsed.as_secs_f64()
                    } else {
                        0.0
                    };
                    let state = match (e.started, e.finished) {
                        (_, Some(_)) => "copied",
                        (Some(_), None) => "copying",
                        (None, None) => "pending",
                    };
                    let eta = (state == "copying" && rate > 0.0)
                        .then(|| e.estimate.saturating_sub(rows) as f64 / rate);
                    TableProgress {
                        table: e.table.clone(),
                        targets: e.targets.clone(),
                        rows,
                        estimate: e.estimate,
                        rows_per_sec: rate,
                        eta_secs: eta,
                        state,
                        chunks: (e.chunks, e.chunks_done),
                    }
                })
                .collect()
        })
    }

    /// Publishes the progress to the metrics and `/health`.
    pub fn publish(&self, metrics: &Metrics, health: &Health) {
        let snap = self.snapshot();
        for p in &snap {
            let label = [p.table.to_string()];
            let label = [label[0].as_str()];
            metrics
                .copy_rows
                .with_label_values(&label)
                .set(i64::try_from(p.rows).unwrap_or(i64::MAX));
            metrics
                .copy_rows_estimate
                .with_label_values(&label)
                .set(i64::try_from(p.estimate).unwrap_or(i64::MAX));
            metrics
                .copy_done
                .with_label_values(&label)
                .set(i64::from(p.state == "copied"));
        }
        health.set_copy(json!(snap
            .iter()
            .map(|p| json!({
                "table": p.table.to_string(),
                "targets": p.targets,
                "state": p.state,
                "rows": p.rows,
                "estimate": p.estimate,
                "rows_per_sec": p.rows_per_sec.round(),
                "eta_secs": p.eta_secs.map(f64::round),
                "chunks": p.chunks.0,
                "chunks_done": p.chunks.1,
            }))
            .collect::<Vec<_>>()));
    }

    /// One line for `systemctl status`: rows and tables copied so far.
    pub fn summary(&self) -> String {
        let snap = self.snapshot();
        let rows: u64 = snap.iter().map(|p| p.rows).sum();
        let estimate: u64 = snap.iter().map(|p| p.estimate).sum();
        let done = snap.iter().filter(|p| p.state == "copied").count();
        format!(
            "copying: {rows} of ~{estimate} rows, {done}/{} tables copied",
            snap.len()
        )
    }

    /// Draws the terminal's bars (nothing when there is no terminal display).
    pub fn draw(&self) {
        let Some(mp) = TERMINAL.get() else { return };
        let style = ProgressStyle::with_template(
            "{prefix:>32} {bar:30} {human_pos:>11}/{human_len:<11} rows {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let mut bars = self.1.lock().unwrap_or_else(|p| p.into_inner());
        for p in self.snapshot() {
            let bar = bars.entry(p.table.clone()).or_insert_with(|| {
                let b = mp.add(ProgressBar::new(p.estimate.max(1)));
                b.set_style(style.clone());
                b.set_prefix(p.table.to_string());
                b
            });
            if bar.is_finished() {
                continue;
            }
            bar.set_length(p.estimate.max(p.rows).max(1));
            bar.set_position(p.rows);
            match (p.state, p.eta_secs) {
                ("copied", _) => {
                    bar.set_length(p.rows.max(1));
                    bar.finish_with_message(if p.rows_per_sec >= 1.0 {
                        format!("copied ({:.0} rows/s)", p.rows_per_sec)
                    } else {
                        "copied".to_string()
                    });
                }
                ("copying", Some(eta)) => {
                    bar.set_message(format!("{:.0} rows/s, {eta:.0} s left", p.rows_per_sec))
                }
                (state, _) => bar.set_message(state.to_string()),
            }
        }
    }

    /// Logs one line per table being copied (not while bars show it).
    pub fn log(&self) {
        if TERMINAL.get().is_some() {
            return;
        }
        self.log_lines();
    }

    /// Logs one line per table being copied.
    fn log_lines(&self) {
        for p in self.snapshot().iter().filter(|p| p.state == "copying") {
            tracing::info!(
                table = %p.table,
                rows = p.rows,
                estimate = p.estimate,
                rows_per_sec = p.rows_per_sec.round(),
                eta_secs = p.eta_secs.map(f64::round),
                chunks = p.chunks.0,
                chunks_done = p.chunks.1,
                "copying"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_rates_and_the_time_left() {
        let p = CopyProgress::default();
        let t = TableName::parse("patients").unwrap();
        let rows = p.add(&t, vec!["patient".into()], 1000, 2);
        assert_eq!(p.snapshot()[0].state, "pending");
        p.chunk_started(&t);
        rows.fetch_add(500, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(150));
        let s = &p.snapshot()[0];
        assert_eq!((s.state, s.rows), ("copying", 500));
        assert!(s.rows_per_sec > 0.0 && s.eta_secs.unwrap() > 0.0);
        assert!(!p.chunk_done(&t));
        assert!(p.chunk_done(&t));
        let s = &p.snapshot()[0];
        assert_eq!((s.state, s.eta_secs, s.chunks), ("copied", None, (2, 2)));
    }
}
