//! `pgcarve teardown`: after cutover (or to abandon a migration), remove what pgcarve left on the
//! monolith — the slot, which otherwise holds the monolith's WAL forever, and the publication —
//! and with `--targets` its bookkeeping on the service databases (`pgcarve.progress`, the copy
//! state). The service tables and their rows are never touched.
//!
//! A slot in use (a pgcarve still attached) is refused unless `--force`, which ends the
//! walsender holding it first.

use std::time::{Duration, Instant};

use crate::config::Settings;
use crate::pg::{quote_ident, safe_pg_error};

/// What teardown did, line by line, and whether it refused.
#[derive(Debug, Default)]
pub struct Report {
    /// What was done or found, one line each.
    pub lines: Vec<String>,
    /// It refused (the slot is in use and `--force` was not given).
    pub refused: bool,
}

/// The bookkeeping tables on a target, children first.
const TARGET_TABLES: &[&str] = &[
    "pgcarve.fk_aside",
    "pgcarve.copy_chunk",
    "pgcarve.copy_table",
    "pgcarve.schema_pending",
    "pgcarve.progress",
];

/// Runs teardown. Errors (unreachable databases, refused statements) name the database, never
/// a value.
pub async fn run(settings: &Settings, targets: bool, force: bool) -> Result<Report, String> {
    let mut report = Report::default();
    let src = crate::pg::open(&settings.source, "source").await?;
    let err =
        |what: &str, e: tokio_postgres::Error| format!("source: {what}: {}", safe_pg_error(&e));
    let slot = &settings.slot;
    let system_id: String = src
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| err("read system identifier", e))?
        .get(0);
    let pid: Option<Option<i32>> = src
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(|e| err("read slot", e))?
        .map(|r| r.get(0));
    match pid {
        None => report.lines.push(format!("slot {slot}: does not exist")),
        Some(Some(pid)) if !force => {
            report.lines.push(format!(
                "slot {slot} is in use by process {pid} (a pgcarve still streaming?): stop it first, or pass --force to end that connection"
            ));
            report.refused = true;
            return Ok(report);
        }
        Some(holder) => {
            if let Some(pid) = holder {
                src.execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .map_err(|e| err("end the connection holding the slot", e))?;
                report
                    .lines
                    .push(format!("slot {slot}: ended process {pid}, which held it"));
            }
            drop_slot(&src, slot).await?;
            report.lines.push(format!(
                "slot {slot}: dropped (the monolith no longer keeps WAL for it)"
            ));
        }
    }
    let publication = &settings.publication;
    let exists: bool = src
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[publication],
        )
        .await
        .map_err(|e| err("read publication", e))?
        .get(0);
    if exists {
        src.batch_execute(&format!("DROP PUBLICATION {}", quote_ident(publication)))
            .await
            .map_err(|e| err("drop publication", e))?;
        report
            .lines
            .push(format!("publication {publication}: dropped"));
    } else {
        report
            .lines
            .push(format!("publication {publication}: does not exist"));
    }
    if targets {
        for t in &settings.targets {
            report.lines.extend(keys_back(t, &system_id, slot).await?);
            report.lines.push(clear_target(t, &system_id, slot).await?);
        }
    }
    Ok(report)
}

/// Drops the slot, waiting (up to 10 s) for a walsender that was just ended to let it go.
async fn drop_slot(src: &tokio_postgres::Client, slot: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match src
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return Ok(()),
            // 55006: still active (its walsender is on its way out).
            Err(e)
                if e.code().is_some_and(|c| c.code() == "55006") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("source: drop slot {slot}: {}", safe_pg_error(&e))),
        }
    }
}

/// Puts back the foreign keys a copy set aside on target `t` (`crate::copy::aside`): each is
/// added `NOT VALID`, then validated. A key that cannot be added back stops teardown (its
/// definition stays recorded); one that does not validate is reported and stays not valid.
async fn keys_back(
    t: &crate::config::Target,
    system_id: &str,
    slot: &str,
) -> Result<Vec<String>, String> {
    let mut client = crate::pg::open(&t.conn, &format!("target {}", t.name)).await?;
    let key = crate::apply::progress::ProgressKey {
        system_id: system_id.to_string(),
        slot: slot.to_string(),
        target: t.name.clone(),
    };
    let read = |e: tokio_postgres::Error| {
        format!(
            "target {}: read foreign keys set aside: {}",
            t.name,
            safe_pg_error(&e)
        )
    };
    let mut lines = Vec::new();
    for a in crate::copy::aside::read(&client, &key)
        .await
        .map_err(read)?
    {
        match crate::copy::aside::restore(&mut client, &key, &a).await {
            Ok(()) => lines.push(format!(
                "target {}: foreign key {} set aside during a copy: put back",
                t.name,
                a.label()
            )),
            Err(reason) => lines.push(format!(
                "{reason} (it stays NOT VALID: check the rows, then ALTER TABLE … VALIDATE CONSTRAINT)"
            )),
        }
    }
    let stuck: Vec<String> = crate::copy::aside::read(&client, &key)
        .await
        .map_err(read)?
        .iter()
        .filter(|a| !a.added)
        .map(|a| a.label())
        .collect();
    if !stuck.is_empty() {
        return Err(format!(
            "target {}: foreign keys set aside during a copy could not be added back ({}): their definitions stay in pgcarve.fk_aside; fix the cause and run teardown again",
            t.name,
            stuck.join(", ")
        ));
    }
    Ok(lines)
}

/// Removes this slot's bookkeeping rows for target `t`, and the `pgcarve` schema once nothing
/// else (another slot, another target in the same database) has rows in it.
async fn clear_target(
    t: &crate::config::Target,
    system_id: &str,
    slot: &str,
) -> Result<String, String> {
    let mut client = crate::pg::open(&t.conn, &format!("target {}", t.name)).await?;
    let err = |e: tokio_postgres::Error| format!("target {}: {}", t.name, safe_pg_error(&e));
    let tx = client.transaction().await.map_err(err)?;
    let mut removed = 0u64;
    for table in TARGET_TABLES {
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[table])
            .await
            .map_err(err)?
            .get(0);
        if !exists {
            continue;
        }
        removed += if *table == "pgcarve.schema_pending" {
            tx.execute(
                &format!("DELETE FROM {table} WHERE target = $1"),
                &[&t.name],
            )
            .await
            .map_err(err)?
        } else {
            tx.execute(
                // A side stream's progress row (`<target>+joining`) goes with its target's.
                &format!(
                    "DELETE FROM {table} WHERE system_id = $1 AND slot = $2 \
                     AND (target = $3 OR target = $3 || '+joining')"
                ),
                &[&system_id, &slot, &t.name],
            )
            .await
            .map_err(err)?
        };
    }
    let mut left = false;
    for table in ["pgcarve.progress", "pgcarve.copy_table"] {
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .map_err(err)?
            .get(0);
        if exists {
            left |= tx
                .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), &[])
                .await
                .map_err(err)?
                .get::<_, bool>(0);
        }
    }
    let dropped = !left
        && tx
            .query_one("SELECT to_regnamespace('pgcarve') IS NOT NULL", &[])
            .await
            .map_err(err)?
            .get::<_, bool>(0);
    if dropped {
        tx.batch_execute("DROP SCHEMA pgcarve CASCADE")
            .await
            .map_err(err)?;
    }
    tx.commit().await.map_err(err)?;
    Ok(format!(
        "target {}: removed {removed} bookkeeping row(s){}; its tables and rows are untouched",
        t.name,
        if dropped {
            " and the pgcarve schema"
        } else {
            ""
        }
    ))
}
