//! Verification speed: `pgcarve verify` of one table (1,000,000 rows by default), identical and
//! with 10 scattered differences, beside one `COPY … TO STDOUT` of the same table from both
//! sides (read and discarded), in the same run on the same clusters, while pgcarve runs (it
//! copied the table first). Aim: at most 1.5× the two COPYs' time.
//!
//! `cargo bench --bench verify`. Knobs: `PGCARVE_BENCH_VERIFY_ROWS` (default 1000000),
//! `PGCARVE_BENCH_ROUNDS` (default 3, median reported).

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use pgcarve::localpg::{Cluster, ClusterOptions};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

async fn copy_out(c: &Client) -> u64 {
    let s = c.copy_out("COPY rx TO STDOUT").await.unwrap();
    let mut s = std::pin::pin!(s);
    let mut n = 0u64;
    while let Some(b) = s.try_next().await.unwrap() {
        n += b.len() as u64;
    }
    n
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rows: u64 = std::env::var("PGCARVE_BENCH_VERIFY_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rounds: usize = std::env::var("PGCARVE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    pgcarve::localpg::reap_stale_dirs();
    let source = Cluster::start(&ClusterOptions::default()).unwrap();
    let target = Cluster::start(&ClusterOptions::default()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let schema = "CREATE TABLE rx (id bigint PRIMARY KEY, patient_id bigint NOT NULL, drug text NOT NULL, \
                      dose numeric(10,2), written_at timestamptz NOT NULL, note text)";
        for (c, db) in [(&source, "src"), (&target, "dst")] {
            connect(&c.url("postgres")).await.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
            connect(&c.url(db)).await.batch_execute(schema).await.unwrap();
        }
        let src = connect(&source.url("src")).await;
        src.batch_execute(&format!(
            "INSERT INTO rx SELECT g, g % 5000, 'drug-' || (g % 300), (g % 97) * 1.25, \
             '2026-01-01'::timestamptz + g * interval '1 second', repeat('n', 80) FROM generate_series(1, {rows}) g; ANALYZE rx"
        ))
        .await
        .unwrap();
        let config = format!(
            "[source]\nurl = {:?}\nslot = \"bench\"\npublication = \"bench\"\n\n[metrics]\nlisten = \"\"\n\n[targets.t]\nurl = {:?}\ntables = [\"rx\"]\n",
            source.url("src"),
            target.url("dst")
        );
        let settings = pgcarve::config::Config::from_toml(&config).unwrap().validate().unwrap();
        let obs = pgcarve::daemon::Observability::default();
        let shutdown = CancellationToken::new();
        let daemon = tokio::spawn(pgcarve::daemon::run(settings.clone(), obs.clone(), shutdown.clone()));
        loop {
            if obs.health.report().1["phase"] == "streaming" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let dst = connect(&target.url("dst")).await;
        println!("pgcarve verify bench: {rows} rows, {rounds} rounds");
        for (label, differences) in [("identical", false), ("10 differences", true)] {
            if differences {
                // Ten scattered rows changed behind pgcarve's back.
                let step = (rows / 10).max(1);
                dst.batch_execute(&format!("UPDATE rx SET note = 'changed' WHERE id % {step} = 7"))
                    .await
                    .unwrap();
            }
            let (mut v, mut c) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let t0 = Instant::now();
                let r = pgcarve::verify::run(&settings, None, None).await.unwrap();
                v.push(t0.elapsed().as_secs_f64());
                assert_eq!(r.differs(), differences, "{}", r.text());
                if differences {
                    assert_eq!(r.tables[0].diff.counts.2, 10, "{}", r.text());
                }
                let t0 = Instant::now();
                copy_out(&src).await;
                copy_out(&dst).await;
                c.push(t0.elapsed().as_secs_f64());
            }
            let (v, c) = (median(v), median(c));
            println!("{label:<15} verify {v:.2} s, two COPY TO {c:.2} s, ratio {:.2}× (aim ≤ 1.5×)", v / c);
        }
        shutdown.cancel();
        let _ = daemon.await;
    });
}
