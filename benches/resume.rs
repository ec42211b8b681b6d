//! Resuming a stopped copy: one table (1,000,000 rows by default) copied by pgcarve in chunks
//! of 100,000 rows, one at a time, stopped once half of its chunks committed, then started
//! again — beside a whole copy of the same table by pgcarve in the same run (what the restart
//! cost when an unfinished table was emptied and copied again). The resumed copy compares the
//! key ranges the target holds with the source and copies only those that differ.
//!
//! `cargo bench --bench resume`. Knobs: `PGCARVE_BENCH_RESUME_ROWS` (default 1000000),
//! `PGCARVE_BENCH_ROUNDS` (default 3, median reported), `PGCARVE_BENCH_RESUME_KEY=composite`
//! (a `(ward text, id bigint)` primary key instead of `id bigint`: its ranges are cut at every
//! n-th key in its order and compared as rows).

use std::time::{Duration, Instant};

use pgcarve::localpg::{Cluster, ClusterOptions};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

const SCHEMA: &str = "CREATE TABLE rx (ward text NOT NULL, id bigint NOT NULL, \
    patient_id bigint NOT NULL, drug text NOT NULL, dose numeric(10,2), \
    written_at timestamptz NOT NULL, note text, PRIMARY KEY";

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Chunks of `rx` committed on the target.
async fn chunks(dst: &Client) -> i64 {
    dst.query_one(
        "SELECT count(*) FROM pgcarve.copy_chunk WHERE table_name = 'public.rx'",
        &[],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(0)
}

/// Whether `rx` is copied on the target.
async fn copied(dst: &Client) -> bool {
    dst.query_opt(
        "SELECT 1 FROM pgcarve.copy_table WHERE table_name = 'public.rx' AND state IN ('copied', 'streaming')",
        &[],
    )
    .await
    .ok()
    .flatten()
    .is_some()
}

struct Run {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), pgcarve::daemon::DaemonError>>,
}

fn start(config: &str) -> Run {
    let settings = pgcarve::config::Config::from_toml(config)
        .unwrap()
        .validate()
        .unwrap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(pgcarve::daemon::run(
        settings,
        pgcarve::daemon::Observability::default(),
        shutdown.clone(),
    ));
    Run { shutdown, handle }
}

impl Run {
    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

fn main() {
    let rows: u64 = std::env::var("PGCARVE_BENCH_RESUME_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rounds: usize = std::env::var("PGCARVE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let composite = std::env::var("PGCARVE_BENCH_RESUME_KEY").is_ok_and(|k| k == "composite");
    let schema = format!(
        "{SCHEMA} {})",
        if composite { "(ward, id)" } else { "(id)" }
    );
    pgcarve::localpg::reap_stale_dirs();
    let source = Cluster::start(&ClusterOptions::default()).unwrap();
    let target = Cluster::start(&ClusterOptions::default()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        connect(&source.url("postgres"))
            .await
            .batch_execute("CREATE DATABASE src")
            .await
            .unwrap();
        let src = connect(&source.url("src")).await;
        src.batch_execute(&format!(
            "{schema}; INSERT INTO rx SELECT 'ward-' || lpad((g / 100000)::text, 4, '0'), g, g % 5000, 'drug-' || (g % 300), (g % 97) * 1.25, \
             '2026-01-01'::timestamptz + g * interval '1 second', repeat('n', 80) \
             FROM generate_series(1, {rows}) g; ANALYZE rx"
        ))
        .await
        .unwrap();
        let chunk_rows = (rows / 10).max(1000);
        let total_chunks = rows.div_ceil(chunk_rows) as i64;
        println!(
            "pgcarve resume bench: {rows} rows in chunks of {chunk_rows}, {rounds} rounds, {} key",
            if composite { "(ward text, id bigint)" } else { "id bigint" }
        );
        let (mut whole, mut resumed) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for resume in [false, true] {
                let name = format!("r{round}_{}", u8::from(resume));
                connect(&target.url("postgres"))
                    .await
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                let dst = connect(&target.url(&name)).await;
                dst.batch_execute(&schema).await.unwrap();
                let config = format!(
                    "[source]\nurl = {:?}\nslot = {name:?}\npublication = {name:?}\n\n[metrics]\nlisten = \"\"\n\n\
                     [copy]\nchunk_rows = {chunk_rows}\nparallel = 1\n\n[targets.t]\nurl = {:?}\ntables = [\"rx\"]\n",
                    source.url("src"),
                    target.url(&name),
                );
                if resume {
                    // Stopped once half the chunks committed.
                    let run = start(&config);
                    while chunks(&dst).await < total_chunks / 2 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    run.stop().await;
                }
                let t0 = Instant::now();
                let run = start(&config);
                while !copied(&dst).await {
                    assert!(!run.handle.is_finished(), "pgcarve stopped");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let secs = t0.elapsed().as_secs_f64();
                run.stop().await;
                let n: i64 = dst
                    .query_one("SELECT count(*) FROM rx", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n as u64, rows, "every row arrived");
                src.execute("SELECT pg_drop_replication_slot($1)", &[&name])
                    .await
                    .unwrap();
                eprintln!("  round {round} {}: {secs:.2} s", if resume { "resumed" } else { "whole" });
                if resume {
                    resumed.push(secs);
                } else {
                    whole.push(secs);
                }
            }
        }
        let (w, r) = (median(whole), median(resumed));
        println!(
            "whole copy {w:.2} s; resumed after half the chunks {r:.2} s; resumed / whole {:.2}",
            r / w
        );
    });
}
