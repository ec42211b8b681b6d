//! Command-line interface: `pgcarve [--config FILE] [--log-format human|json] <command>`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Carve a PostgreSQL monolith into database-per-service PostgreSQL databases, exactly once.
#[derive(Debug, Parser)]
#[command(name = "pgcarve", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "PGCARVE_CONFIG",
        default_value = "daemon.toml"
    )]
    pub config: PathBuf,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line (for journald/log shippers).
    Json,
}

/// Format of a command's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// For people.
    Human,
    /// One JSON document.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream the monolith's changes into the service databases until stopped (SIGINT/SIGTERM).
    Run,
    /// Create each target's tables from the monolith's catalog (types, keys, indexes, foreign
    /// keys within the target); report every difference of existing tables and change nothing
    /// then. Exit 0: in place, 1: differences, 2: could not run.
    Schema {
        /// Only report what would be created.
        #[arg(long)]
        dry_run: bool,
    },
    /// Drop the slot (which holds the monolith's WAL) and the publication; with `--targets`
    /// also pgcarve's bookkeeping on the service databases (never their tables). Refuses while
    /// a pgcarve is attached to the slot, unless `--force`. Exit 0 done, 1 refused, 2 failed.
    Teardown {
        /// Also remove `pgcarve.progress` and the copy state on every target.
        #[arg(long)]
        targets: bool,
        /// End the connection holding the slot first.
        #[arg(long)]
        force: bool,
    },
    /// Read-only preflight of the source, every target, the publication and the slot: every
    /// problem at once, each with its fix. Changes nothing. Exit 0 ready, 1 problems, 2 could
    /// not run.
    Check {
        /// Add the migration assessment: sizes and copy time per target, tables without a
        /// primary key, foreign keys that cross services, sequences, triggers on targets.
        #[arg(long)]
        assess: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
    /// Compare each routed table at each owning target with the monolith, online: counts,
    /// checksums over key ranges, and the keys that are missing, extra or different (never other
    /// values). Exit 0 identical, 1 differences, 2 could not run.
    Verify {
        /// Only this table (`table` or `schema.table`).
        #[arg(long)]
        table: Option<String>,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Rows per compared range (overrides `verify.range_rows`).
        #[arg(long)]
        range_rows: Option<u64>,
        /// Upper bound on rows read per second from each side, 0 for none (overrides
        /// `verify.rows_per_second`).
        #[arg(long)]
        rows_per_second: Option<u64>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
    /// A one-screen summary of the running pgcarve (its `/status` at `metrics.listen`). Exit 0
    /// healthy or degraded, 1 failed, 2 not reachable.
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
    /// Start a throwaway local PostgreSQL with a sample healthcare monolith and stream it live
    /// into service databases, showing progress; stops by itself (or on Ctrl-C).
    Demo {
        /// How long the sample workload runs, in seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Print the connection URLs and keep the clusters until Ctrl-C after the workload ends.
        #[arg(long)]
        keep: bool,
    },
}
