//! End-to-end apply throughput: rows per second through `pgcarve run` beside PostgreSQL's
//! native logical replication (publication + subscription) on the same workload, in the same
//! run, on the same two throwaway clusters.
//!
//! Each measurement pre-writes the workload into the source's WAL while a slot holds it, then
//! starts the consumer with the target table locked, waits until the consumer is blocked on that
//! lock (connected, decoding, applying its first row), releases it and times how long it takes
//! until the last transaction (a sentinel row) is visible on every target. Both consumers start
//! from the same slot position and apply the same transactions; what is measured is decode +
//! apply throughput, not start-up time and not the workload generator.
//!
//! Scenarios:
//! - `bulk`: transactions of 1,000 rows into a prescriptions table, one target;
//! - `small`: single-row transactions, one target;
//! - `fanout3`: the bulk workload into three target databases. pgcarve decodes once for all
//!   three; native replication needs one slot and one walsender decoding per subscription.
//! - `isolation`: the bulk workload into two targets, one of which rejects every row (a CHECK
//!   constraint) and so stalls on its first transaction for the whole run; compared with
//!   pgcarve on the same two targets both healthy, by the healthy target's rows/s (a sick
//!   target must not slow the others: aim ≥ 0.9×).
//!
//! `cargo bench --bench e2e`. Knobs (environment): `PGCARVE_BENCH_ROWS` (default 200000; the
//! small scenario uses a tenth), `PGCARVE_BENCH_ROUNDS` (default 3, the median is reported),
//! `PGCARVE_BENCH_FSYNC` (default `on`; `off` for a faster, less realistic run),
//! `PGCARVE_BENCH_SCENARIOS` (comma-separated subset), `PGCARVE_BENCH_NATIVE_SYNC` (the
//! subscriptions' `synchronous_commit`, default `off` as in PostgreSQL and as pgcarve's apply),
//! `PGCARVE_BENCH_THREADS` (pgcarve's runtime threads, default as `apply.threads`).
//! Both sides confirm their slot only up to what the subscriber has flushed.

use std::time::{Duration, Instant};

use pgcarve::localpg::{Cluster, ClusterOptions};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

const SCHEMA: &str = "
    CREATE TABLE rx (
        id bigint PRIMARY KEY,
        patient_id bigint NOT NULL,
        drug text NOT NULL,
        dose numeric(10,2),
        written_at timestamptz NOT NULL,
        note text
    );
    CREATE TABLE bench_done (id int PRIMARY KEY);";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scenario {
    Bulk,
    Small,
    Fanout3,
    Isolation,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Bulk => "bulk",
            Scenario::Small => "small",
            Scenario::Fanout3 => "fanout3",
            Scenario::Isolation => "isolation",
        }
    }
    fn targets(self) -> usize {
        match self {
            Scenario::Fanout3 => 3,
            Scenario::Isolation => 2,
            _ => 1,
        }
    }
    fn rows(self, rows: u64) -> u64 {
        match self {
            Scenario::Small => rows / 10,
            _ => rows,
        }
    }
    /// The workload as one DO block that commits as it goes.
    fn workload(self, rows: u64) -> String {
        let values = "g, g % 5000, 'drug-' || (g % 300), (g % 97) * 1.25, \
                      '2026-01-01'::timestamptz + g * interval '1 second', repeat('n', 80)";
        match self {
            Scenario::Small => format!(
                "DO $$ BEGIN FOR g IN 1..{rows} LOOP
                     INSERT INTO rx VALUES ({values}); COMMIT;
                 END LOOP; END $$;"
            ),
            _ => format!(
                "DO $$ BEGIN FOR b IN 0..{last} LOOP
                     INSERT INTO rx SELECT {values}
                     FROM generate_series(b * 1000 + 1, b * 1000 + 1000) g; COMMIT;
                 END LOOP; END $$;",
                last = rows / 1000 - 1
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Consumer {
    Pgcarve,
    Native,
    /// pgcarve with the last target rejecting every row (the isolation scenario).
    PgcarveOneFailing,
}

struct Bench {
    source: Cluster,
    target: Cluster,
    next: std::cell::Cell<u32>,
    /// The subscriptions' synchronous_commit.
    native_sync: String,
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

impl Bench {
    fn unique(&self, prefix: &str) -> String {
        let n = self.next.get();
        self.next.set(n + 1);
        format!("{prefix}_{n}")
    }

    async fn fresh_db(&self, cluster: &Cluster, prefix: &str) -> (String, Client) {
        let name = self.unique(prefix);
        connect(&cluster.url("postgres"))
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let client = connect(&cluster.url(&name)).await;
        client.batch_execute(SCHEMA).await.unwrap();
        (name, client)
    }

    /// One measurement: seconds from starting the consumer until every target has everything.
    async fn measure(&self, scenario: Scenario, consumer: Consumer, rows: u64) -> f64 {
        let (src_db, src) = self.fresh_db(&self.source, "src").await;
        src.batch_execute("CREATE PUBLICATION pub FOR TABLE rx, bench_done")
            .await
            .unwrap();
        // One slot for pgcarve; one per subscription for native replication.
        let slots: Vec<String> = match consumer {
            Consumer::Pgcarve | Consumer::PgcarveOneFailing => vec!["carve".into()],
            Consumer::Native => (0..scenario.targets()).map(|i| format!("sub{i}")).collect(),
        };
        for s in &slots {
            src.batch_execute(&format!(
                "SELECT pg_create_logical_replication_slot('{s}', 'pgoutput')"
            ))
            .await
            .unwrap();
        }
        let mut targets = Vec::new();
        for _ in 0..scenario.targets() {
            targets.push(self.fresh_db(&self.target, "dst").await);
        }
        // The sick target: every row breaks a constraint, so its first transaction fails and
        // keeps failing.
        let healthy = match consumer {
            Consumer::PgcarveOneFailing => {
                let (_, sick) = targets.last().expect("a target");
                sick.batch_execute("ALTER TABLE rx ADD CONSTRAINT reject_all CHECK (id < 0)")
                    .await
                    .unwrap();
                targets.len() - 1
            }
            _ => targets.len(),
        };

        src.batch_execute(&scenario.workload(scenario.rows(rows)))
            .await
            .unwrap();
        src.batch_execute("INSERT INTO bench_done VALUES (1)")
            .await
            .unwrap();

        // Subscriptions are made first (making one reads the table, which the lock would block),
        // disabled until the measurement starts.
        if consumer == Consumer::Native {
            for (i, (_, t)) in targets.iter().enumerate() {
                t.batch_execute(&format!(
                    "CREATE SUBSCRIPTION sub{i} CONNECTION '{}' PUBLICATION pub
                 WITH (create_slot = false, slot_name = 'sub{i}', copy_data = false,
                       enabled = false, synchronous_commit = '{}')",
                    self.source.url(&src_db),
                    self.native_sync
                ))
                .await
                .unwrap();
            }
        }
        // Both consumers are measured from the same state: connected, decoding, and waiting
        // on the target table, which a lock holds until every target has a waiting writer.
        let mut locks = Vec::new();
        for (db, _) in &targets {
            let l = connect(&self.target.url(db)).await;
            l.batch_execute("BEGIN; LOCK TABLE rx IN ACCESS EXCLUSIVE MODE")
                .await
                .unwrap();
            locks.push(l);
        }
        let daemon = match consumer {
            Consumer::Pgcarve | Consumer::PgcarveOneFailing => {
                let mut toml = format!(
                    "[source]\nurl = {:?}\nslot = \"carve\"\npublication = \"pub\"\n\n[metrics]\nlisten = \"\"\n{}",
                    self.source.url(&src_db),
                    std::env::var("PGCARVE_BENCH_APPLY").unwrap_or_default()
                );
                for (i, (db, _)) in targets.iter().enumerate() {
                    toml.push_str(&format!(
                        "\n[targets.t{i}]\nurl = {:?}\ntables = [\"rx\", \"bench_done\"]\n",
                        self.target.url(db)
                    ));
                }
                let settings = pgcarve::config::Config::from_toml(&toml)
                    .unwrap()
                    .validate()
                    .unwrap();
                let shutdown = CancellationToken::new();
                let handle = tokio::spawn(pgcarve::daemon::run(
                    settings,
                    pgcarve::daemon::Observability::default(),
                    shutdown.clone(),
                ));
                Some((shutdown, handle))
            }
            Consumer::Native => {
                for (i, (_, t)) in targets.iter().enumerate() {
                    t.batch_execute(&format!("ALTER SUBSCRIPTION sub{i} ENABLE"))
                        .await
                        .unwrap();
                }
                None
            }
        };
        let waiting = Instant::now();
        for (_, t) in &targets {
            loop {
                let blocked: i64 = t
                    .query_one(
                        "SELECT count(*) FROM pg_locks
                         WHERE relation = 'rx'::regclass AND NOT granted",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if blocked > 0 {
                    break;
                }
                assert!(
                    waiting.elapsed() < Duration::from_secs(120),
                    "{consumer:?} never reached the target table"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let start = Instant::now();
        for l in &locks {
            l.batch_execute("COMMIT").await.unwrap();
        }
        for (_, t) in &targets[..healthy] {
            loop {
                let done = t
                    .query_opt("SELECT 1 FROM bench_done", &[])
                    .await
                    .unwrap()
                    .is_some();
                if done {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(1800),
                    "{consumer:?} did not catch up"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let secs = start.elapsed().as_secs_f64();

        // Stop, check, clean up.
        if let Some((shutdown, handle)) = daemon {
            shutdown.cancel();
            handle.await.unwrap().unwrap();
        }
        let want = scenario.rows(rows) as i64;
        for (i, (db, t)) in targets.iter().enumerate() {
            let n: i64 = t
                .query_one("SELECT count(*) FROM rx", &[])
                .await
                .unwrap()
                .get(0);
            let want = if i < healthy { want } else { 0 };
            assert_eq!(
                n, want,
                "{consumer:?} target {db}: row count {n}, want {want}"
            );
            if consumer == Consumer::Native {
                t.batch_execute(&format!(
                    "ALTER SUBSCRIPTION sub{i} DISABLE;
                     ALTER SUBSCRIPTION sub{i} SET (slot_name = NONE);"
                ))
                .await
                .unwrap();
                t.batch_execute(&format!("DROP SUBSCRIPTION sub{i}"))
                    .await
                    .unwrap();
            }
        }
        drop(targets);
        for s in &slots {
            // A walsender may still be exiting: retry the drop for a while.
            let mut tries = 0;
            while let Err(e) = src
                .batch_execute(&format!("SELECT pg_drop_replication_slot('{s}')"))
                .await
            {
                tries += 1;
                assert!(tries < 200, "drop slot {s}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        drop(src);
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
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let rows: u64 = env_or("PGCARVE_BENCH_ROWS", 200_000);
    assert!(rows >= 10_000, "PGCARVE_BENCH_ROWS must be at least 10000");
    let rows = rows / 1000 * 1000;
    let rounds: usize = env_or("PGCARVE_BENCH_ROUNDS", 3);
    let fsync: String = env_or("PGCARVE_BENCH_FSYNC", "on".to_string());
    let native_sync: String = env_or("PGCARVE_BENCH_NATIVE_SYNC", "off".to_string());
    let wanted: String = env_or(
        "PGCARVE_BENCH_SCENARIOS",
        "bulk,small,fanout3,isolation".to_string(),
    );
    let scenarios: Vec<Scenario> = [
        Scenario::Bulk,
        Scenario::Small,
        Scenario::Fanout3,
        Scenario::Isolation,
    ]
    .into_iter()
    .filter(|s| wanted.split(',').any(|w| w.trim() == s.name()))
    .collect();

    pgcarve::localpg::reap_stale_dirs();
    let opts = ClusterOptions {
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
        native_sync: native_sync.clone(),
    };
    // pgcarve runs in this process: its runtime gets the daemon's thread count.
    let threads: usize = env_or("PGCARVE_BENCH_THREADS", pgcarve::config::default_threads());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();

    println!(
        "pgcarve end-to-end bench: {rows} rows (small: {}), {rounds} rounds, fsync={fsync}, {} CPUs, pgcarve threads {threads}",
        rows / 10,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "durability: pgcarve commits with synchronous_commit=off; native subscriptions with \
         synchronous_commit={native_sync}; both confirm the slot up to what the target flushed"
    );
    println!(
        "{:<9} {:>12} {:>14} {:>14} {:>8}",
        "scenario", "rows/target", "pgcarve rows/s", "native rows/s", "ratio"
    );
    rt.block_on(async {
        // Warm both clusters (catalog caches, first WAL segments, the subscription launcher)
        // so the first measured round does not pay for it.
        for c in [Consumer::Pgcarve, Consumer::Native] {
            bench.measure(Scenario::Bulk, c, 10_000).await;
        }
        for scenario in scenarios {
            let n = scenario.rows(rows);
            let (mut carve, mut native) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                // Alternate who goes first, so drift on a shared machine hits both.
                // The isolation scenario's baseline is pgcarve with both targets healthy.
                let other = match scenario {
                    Scenario::Isolation => Consumer::PgcarveOneFailing,
                    _ => Consumer::Native,
                };
                let order = if round % 2 == 0 {
                    [Consumer::Pgcarve, other]
                } else {
                    [other, Consumer::Pgcarve]
                };
                for c in order {
                    let secs = bench.measure(scenario, c, rows).await;
                    let rate = n as f64 / secs;
                    eprintln!(
                        "  {} round {round} {c:?}: {secs:.2} s, {rate:.0} rows/s",
                        scenario.name()
                    );
                    match c {
                        Consumer::Pgcarve => carve.push(rate),
                        Consumer::Native | Consumer::PgcarveOneFailing => native.push(rate),
                    }
                }
            }
            let (c, nat) = (median(carve), median(native));
            if scenario == Scenario::Isolation {
                // The healthy target with a sick neighbour, over the same with none.
                println!(
                    "{:<9} {:>12} {:>14.0} {:>14.0} {:>7.2}x   (one failing / none failing; healthy target's rows/s)",
                    scenario.name(),
                    n,
                    nat,
                    c,
                    nat / c
                );
                continue;
            }
            println!(
                "{:<9} {:>12} {:>14.0} {:>14.0} {:>7.2}x",
                scenario.name(),
                n,
                c,
                nat,
                c / nat
            );
        }
    });
}
