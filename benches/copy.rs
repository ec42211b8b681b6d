//! Initial copy speed: `pgcarve run`'s initial copy beside a plain binary COPY pipe
//! (`COPY … TO STDOUT (FORMAT binary)` streamed into `COPY … FROM STDIN (FORMAT binary)`, one
//! table after the other, over one connection pair) and beside a native subscription's initial
//! table synchronisation (`copy_data = true`), on the same two throwaway clusters, in the same
//! run. Every consumer starts from an empty target database with the schema.
//!
//! Scenarios: `one`, one table of 2,000,000 rows; `ten`, ten tables of 200,000 rows each.
//! pgcarve runs twice: without chunks (`copy.chunk_rows` above the table size), and with chunks
//! of 250,000 rows, four at once (`copy.parallel = 4`).
//!
//! pgcarve and native are timed from start until every table is copied (slot creation included
//! for both); the pipe from its first statement to its last commit.
//!
//! `cargo bench --bench copy`. Knobs: `PGCARVE_BENCH_COPY_ROWS` (default 2000000: the `one`
//! table; `ten` uses a tenth per table), `PGCARVE_BENCH_ROUNDS` (default 3, median reported),
//! `PGCARVE_BENCH_FSYNC` (default `on`), `PGCARVE_BENCH_SCENARIOS` (`one,ten`).

use std::time::{Duration, Instant};

use futures::{SinkExt, TryStreamExt};
use pgcarve::localpg::{Cluster, ClusterOptions};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

fn table_sql(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (
            id bigint PRIMARY KEY,
            patient_id bigint NOT NULL,
            drug text NOT NULL,
            dose numeric(10,2),
            written_at timestamptz NOT NULL,
            note text);"
    )
}

fn fill_sql(name: &str, rows: u64) -> String {
    format!(
        "INSERT INTO {name} SELECT g, g % 5000, 'drug-' || (g % 300), (g % 97) * 1.25, \
         '2026-01-01'::timestamptz + g * interval '1 second', repeat('n', 80) \
         FROM generate_series(1, {rows}) g; ANALYZE {name};"
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Consumer {
    Pipe,
    Native,
    Pgcarve,
    PgcarveChunks,
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

struct Bench {
    source: Cluster,
    target: Cluster,
    next: std::cell::Cell<u32>,
}

impl Bench {
    fn unique(&self, prefix: &str) -> String {
        let n = self.next.get();
        self.next.set(n + 1);
        format!("{prefix}_{n}")
    }

    async fn create_db(&self, cluster: &Cluster, name: &str, schema: &str) -> Client {
        connect(&cluster.url("postgres"))
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let c = connect(&cluster.url(name)).await;
        c.batch_execute(schema).await.unwrap();
        c
    }

    /// Seconds to copy `tables` of source database `src_db` into a fresh target database.
    async fn measure(&self, src_db: &str, tables: &[String], consumer: Consumer) -> f64 {
        let schema: String = tables.iter().map(|t| table_sql(t)).collect();
        let dst_db = self.unique("dst");
        let dst = self.create_db(&self.target, &dst_db, &schema).await;
        let src = connect(&self.source.url(src_db)).await;
        let name = self.unique("c");
        let secs = match consumer {
            Consumer::Pipe => {
                let t0 = Instant::now();
                for t in tables {
                    let out = src
                        .copy_out(&format!("COPY {t} TO STDOUT (FORMAT binary)"))
                        .await
                        .unwrap();
                    let sink = dst
                        .copy_in::<_, bytes::Bytes>(&format!("COPY {t} FROM STDIN (FORMAT binary)"))
                        .await
                        .unwrap();
                    let mut sink = std::pin::pin!(sink);
                    let mut out = std::pin::pin!(out);
                    while let Some(b) = out.try_next().await.unwrap() {
                        sink.feed(b).await.unwrap();
                    }
                    sink.as_mut().finish().await.unwrap();
                }
                t0.elapsed().as_secs_f64()
            }
            Consumer::Native => {
                src.batch_execute(&format!(
                    "CREATE PUBLICATION {name} FOR TABLE {}",
                    tables.join(", ")
                ))
                .await
                .unwrap();
                let t0 = Instant::now();
                dst.batch_execute(&format!(
                    "CREATE SUBSCRIPTION {name} CONNECTION '{}' PUBLICATION {name} WITH (copy_data = true)",
                    self.source.url(src_db).replace('\'', "''")
                ))
                .await
                .unwrap();
                loop {
                    let pending: i64 = dst
                        .query_one(
                            "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid \
                             WHERE s.subname = $1 AND r.srsubstate NOT IN ('r', 's')",
                            &[&name],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    if pending == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let secs = t0.elapsed().as_secs_f64();
                dst.batch_execute(&format!("DROP SUBSCRIPTION {name}"))
                    .await
                    .unwrap();
                secs
            }
            Consumer::Pgcarve | Consumer::PgcarveChunks => {
                let (chunk_rows, parallel) = if consumer == Consumer::Pgcarve {
                    (1_000_000_000, 4)
                } else {
                    (250_000, 4)
                };
                let config = format!(
                    "[source]\nurl = {:?}\nslot = {name:?}\npublication = {name:?}\n\n[metrics]\nlisten = \"\"\n\n\
                     [copy]\nchunk_rows = {chunk_rows}\nparallel = {parallel}\n\n[targets.t]\nurl = {:?}\ntables = {:?}\n",
                    self.source.url(src_db),
                    self.target.url(&dst_db),
                    tables
                );
                let settings = pgcarve::config::Config::from_toml(&config)
                    .unwrap()
                    .validate()
                    .unwrap();
                let obs = pgcarve::daemon::Observability::default();
                let shutdown = CancellationToken::new();
                let t0 = Instant::now();
                let handle = tokio::spawn(pgcarve::daemon::run(
                    settings,
                    obs.clone(),
                    shutdown.clone(),
                ));
                loop {
                    let (_, h) = obs.health.report();
                    let copied = h["copy"]
                        .as_array()
                        .map(|a| a.iter().filter(|t| t["state"] == "copied").count())
                        .unwrap_or(0);
                    if copied == tables.len() && h["phase"] != "copying" {
                        break;
                    }
                    assert!(!handle.is_finished(), "pgcarve stopped: {h}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let secs = t0.elapsed().as_secs_f64();
                shutdown.cancel();
                handle.await.unwrap().unwrap();
                src.execute("SELECT pg_drop_replication_slot($1)", &[&name])
                    .await
                    .unwrap();
                secs
            }
        };
        // Every row arrived.
        for t in tables {
            let q = format!("SELECT count(*) FROM {t}");
            let a: i64 = src.query_one(&q, &[]).await.unwrap().get(0);
            let b: i64 = dst.query_one(&q, &[]).await.unwrap().get(0);
            assert_eq!(a, b, "{consumer:?}: {t} has {b} of {a} rows");
        }
        drop(dst);
        connect(&self.target.url("postgres"))
            .await
            .batch_execute(&format!("DROP DATABASE {dst_db}"))
            .await
            .unwrap();
        secs
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rows: u64 = env_or("PGCARVE_BENCH_COPY_ROWS", 2_000_000);
    let rounds: usize = env_or("PGCARVE_BENCH_ROUNDS", 3);
    let fsync: String = env_or("PGCARVE_BENCH_FSYNC", "on".to_string());
    let wanted: String = env_or("PGCARVE_BENCH_SCENARIOS", "one,ten".to_string());
    pgcarve::localpg::reap_stale_dirs();
    let opts = pgcarve::localpg::ClusterOptions {
        settings: vec![
            ("fsync".into(), fsync.clone()),
            ("max_wal_size".into(), "4GB".into()),
            ("checkpoint_timeout".into(), "30min".into()),
        ],
        ..ClusterOptions::default()
    };
    let bench = Bench {
        source: Cluster::start(&opts).expect("start source cluster"),
        target: Cluster::start(&opts).expect("start target cluster"),
        next: std::cell::Cell::new(0),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(pgcarve::config::default_threads())
        .enable_all()
        .build()
        .unwrap();
    println!(
        "pgcarve initial-copy bench: {rows} rows, {rounds} rounds, fsync={fsync}, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<5} {:>9} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9}",
        "scen",
        "rows",
        "pipe s",
        "native s",
        "carve s",
        "chunks s",
        "c/pipe",
        "c/native",
        "ch/pipe",
        "ch/native"
    );
    rt.block_on(async {
        for scenario in ["one", "ten"] {
            if !wanted.split(',').any(|w| w.trim() == scenario) {
                continue;
            }
            let (count, per) = if scenario == "one" { (1, rows) } else { (10, rows / 10) };
            let tables: Vec<String> = (0..count).map(|i| format!("rx{i}")).collect();
            let src_db = bench.unique("src");
            let schema: String = tables.iter().map(|t| table_sql(t)).collect();
            let src = bench.create_db(&bench.source, &src_db, &schema).await;
            for t in &tables {
                src.batch_execute(&fill_sql(t, per)).await.unwrap();
            }
            src.batch_execute("CHECKPOINT").await.unwrap();
            let consumers = [
                Consumer::Pipe,
                Consumer::Native,
                Consumer::Pgcarve,
                Consumer::PgcarveChunks,
            ];
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); consumers.len()];
            for round in 0..rounds {
                // Rotate who goes first, so drift on a shared machine hits all.
                for k in 0..consumers.len() {
                    let i = (k + round) % consumers.len();
                    let secs = bench.measure(&src_db, &tables, consumers[i]).await;
                    eprintln!("  {scenario} round {round} {:?}: {secs:.2} s", consumers[i]);
                    times[i].push(secs);
                }
            }
            let m: Vec<f64> = times.into_iter().map(median).collect();
            println!(
                "{:<5} {:>9} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>8.2}x {:>8.2}x {:>8.2}x {:>8.2}x",
                scenario,
                per * count as u64,
                m[0],
                m[1],
                m[2],
                m[3],
                m[0] / m[2],
                m[1] / m[2],
                m[0] / m[3],
                m[1] / m[3]
            );
        }
    });
    println!("ratios are speed ratios (baseline seconds / pgcarve seconds): above 1 means pgcarve is faster");
    // pgcarve ran in this process: its peak memory is (at most) this process's.
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("peak RSS of this process (pgcarve ran in it, beside the pipe's client): {peak}");
}
