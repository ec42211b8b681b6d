//! pgcarve binary: parse the CLI, set up logging, load config, dispatch. Exit codes: 0 success,
//! 1 "ran fine, found a problem", 2 usage/config error or failure to run.

use std::process::ExitCode;

use clap::Parser;
use pgcarve::cli::{Cli, Command, LogFormat};

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGCARVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // tokio-postgres logs server NOTICEs at info and statements at debug; a target's
        // trigger may RAISE NOTICE with row values. Never below warn, whatever PGCARVE_LOG says.
        .add_directive("tokio_postgres=warn".parse().expect("static directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgcarve: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run => pgcarve::daemon::run_from_file(&cli.config).await,
            Command::Demo { seconds, keep } => pgcarve::demo::run(seconds, keep).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgcarve: {e:#}");
            ExitCode::from(2)
        }
    }
}
