//! pgcarve binary: parse the CLI, set up logging, load config, dispatch. Exit codes: 0 success,
//! 1 "ran fine, found a problem", 2 usage/config error or failure to run.

use std::process::ExitCode;

use clap::Parser;
use pgcarve::cli::{Cli, Command, LogFormat};

/// tokio-postgres logs server NOTICEs at info and statements at debug, and a target's trigger
/// may RAISE NOTICE with row values: its events pass at warn and above only, whatever
/// `PGCARVE_LOG` says (a separate filter, so no directive can lower it).
fn passes_floor(target: &str, level: &tracing::Level) -> bool {
    !target.starts_with("tokio_postgres") || *level <= tracing::Level::WARN
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGCARVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let floor = tracing_subscriber::filter::filter_fn(|m| passes_floor(m.target(), m.level()));
    // Colours only for a person at a terminal: journald and files get plain lines.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(|| pgcarve::copy::progress::StderrAboveBars);
    match format {
        LogFormat::Human => builder.finish().with(floor).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .finish()
            .with(floor)
            .init(),
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Schema { dry_run } => return schema(&cli.config, dry_run),
        Command::Teardown { targets, force } => return teardown(&cli.config, targets, force),
        Command::Status { format } => return status(&cli.config, format),
        Command::Check { assess, format } => return check(&cli.config, assess, format),
        Command::Verify {
            ref table,
            ref target,
            range_rows,
            rows_per_second,
            format,
        } => {
            return verify(
                &cli.config,
                table.as_deref(),
                target.as_deref(),
                (range_rows, rows_per_second),
                format,
            )
        }
        _ => {}
    }
    let result = match cli.command {
        Command::Run => pgcarve::daemon::load_settings(&cli.config).and_then(|settings| {
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                pgcarve::copy::progress::enable_terminal_display();
            }
            let threads = settings.apply.threads;
            runtime(threads)?.block_on(pgcarve::daemon::run_until_signal(
                settings,
                cli.config.clone(),
            ))
        }),
        // The demo runs its workload sessions beside the daemon: a thread per core.
        Command::Demo { seconds, keep } => {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            runtime(threads).and_then(|rt| rt.block_on(pgcarve::demo::run(seconds, keep)))
        }
        Command::Schema { .. }
        | Command::Teardown { .. }
        | Command::Status { .. }
        | Command::Check { .. }
        | Command::Verify { .. } => {
            unreachable!("handled above")
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgcarve: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A report command's end: its text on stdout, exit 1 when it found a problem (or refused),
/// 2 when it could not run.
fn report_exit(outcome: anyhow::Result<(String, bool)>) -> ExitCode {
    match outcome {
        Ok((text, problem)) => {
            print!("{text}");
            if problem {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("pgcarve: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `pgcarve schema`: 0 in place (created or nothing to do), 1 differences, 2 could not run.
fn schema(config: &std::path::Path, dry_run: bool) -> ExitCode {
    let mode = if dry_run {
        pgcarve::schema::Mode::Report
    } else {
        pgcarve::schema::Mode::Apply
    };
    report_exit(pgcarve::daemon::load_settings(config).and_then(|settings| {
        let o = runtime(1)?
            .block_on(pgcarve::schema::run(&settings, mode))
            .map_err(anyhow::Error::msg)?;
        Ok((o.report(), o.has_differences()))
    }))
}

/// `pgcarve check`: 0 ready, 1 problems, 2 could not run (a config error counts: its problems
/// are printed).
fn check(config: &std::path::Path, assess: bool, format: pgcarve::cli::ReportFormat) -> ExitCode {
    report_exit(pgcarve::daemon::load_settings(config).and_then(|settings| {
        let r = runtime(1)?
            .block_on(pgcarve::check::run(&settings, assess))
            .map_err(anyhow::Error::msg)?;
        let text = match format {
            pgcarve::cli::ReportFormat::Json => format!("{}\n", r.json()),
            pgcarve::cli::ReportFormat::Human => r.text(),
        };
        Ok((text, !r.problems.is_empty()))
    }))
}

/// `pgcarve verify`: 0 identical, 1 differences, 2 could not run.
fn verify(
    config: &std::path::Path,
    table: Option<&str>,
    target: Option<&str>,
    (range_rows, rows_per_second): (Option<u64>, Option<u64>),
    format: pgcarve::cli::ReportFormat,
) -> ExitCode {
    report_exit(
        pgcarve::daemon::load_settings(config).and_then(|mut settings| {
            if let Some(n) = range_rows {
                anyhow::ensure!(
                    (100..=10_000_000).contains(&n),
                    "--range-rows {n}: between 100 and 10000000"
                );
                settings.verify.range_rows = n;
            }
            if let Some(n) = rows_per_second {
                anyhow::ensure!(
                    n == 0 || n >= 100,
                    "--rows-per-second {n}: 0 (no limit) or at least 100"
                );
                settings.verify.rows_per_second = n;
            }
            let table = match table {
                Some(t) => Some(pgcarve::table::TableName::parse(t).ok_or_else(|| {
                    anyhow::anyhow!("--table {t:?} is not a table name (use table or schema.table)")
                })?),
                None => None,
            };
            let r = runtime(1)?
                .block_on(pgcarve::verify::run(&settings, table.as_ref(), target))
                .map_err(anyhow::Error::msg)?;
            let text = match format {
                pgcarve::cli::ReportFormat::Json => format!("{}\n", r.json()),
                pgcarve::cli::ReportFormat::Human => r.text(),
            };
            Ok((text, r.differs()))
        }),
    )
}

/// `pgcarve status`: 0 healthy or degraded, 1 failed, 2 not reachable.
fn status(config: &std::path::Path, format: pgcarve::cli::ReportFormat) -> ExitCode {
    report_exit(pgcarve::daemon::load_settings(config).and_then(|settings| {
        let addr = settings.metrics_listen.ok_or_else(|| {
            anyhow::anyhow!(
                "metrics.listen is off in this config: pgcarve status reads /status there"
            )
        })?;
        let s = pgcarve::status::fetch(addr).map_err(anyhow::Error::msg)?;
        let text = match format {
            pgcarve::cli::ReportFormat::Json => format!("{s}\n"),
            pgcarve::cli::ReportFormat::Human => pgcarve::status::summary(&s),
        };
        Ok((text, s["status"] == "failed"))
    }))
}

/// `pgcarve teardown`: 0 done, 1 refused (slot in use), 2 could not run.
fn teardown(config: &std::path::Path, targets: bool, force: bool) -> ExitCode {
    report_exit(pgcarve::daemon::load_settings(config).and_then(|settings| {
        let r = runtime(1)?
            .block_on(pgcarve::teardown::run(&settings, targets, force))
            .map_err(anyhow::Error::msg)?;
        let text: String = r.lines.iter().map(|l| format!("{l}\n")).collect();
        Ok((text, r.refused))
    }))
}

#[cfg(test)]
mod tests {
    use super::passes_floor;
    use tracing::Level;

    #[test]
    fn tokio_postgres_notices_never_pass() {
        assert!(!passes_floor("tokio_postgres::connection", &Level::INFO));
        assert!(!passes_floor("tokio_postgres::query", &Level::DEBUG));
        assert!(passes_floor("tokio_postgres::connection", &Level::WARN));
        assert!(passes_floor("pgcarve::apply", &Level::DEBUG));
    }
}
