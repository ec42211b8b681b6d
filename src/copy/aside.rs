//! Foreign keys set aside while tables copy beside a running stream, and put back once the
//! target is consistent again.
//!
//! A copy after the first start (a table added to a target, or one left unfinished) is read
//! under a snapshot at `C2`, while the target's other tables stand wherever their stream is.
//! Until the copied tables and the others reach the same position of the source's history, a
//! foreign key between them can fail on the target although the source never broke it (a
//! copied child row whose parent the stream has not applied yet; a range of a resumed parent
//! emptied and copied again under its children), or cascade where the source did not. So at
//! such a start every foreign key on the target with an end in a copied table is *set aside*:
//! its definition is kept in `pgcarve.fk_aside` and the constraint dropped, in one target
//! transaction. The target then never waits for the copy (a side stream takes the copied
//! tables, `daemon::side`), and a resumed copy may empty and copy again any key range.
//!
//! # When a key comes back
//!
//! A set-aside key is put back once every table it links is copied and joined to its target's
//! stream (state `copied` or `streaming`, no side stream) and the slot's confirmed position has
//! passed each one's copy position. Then the target holds every change before that position
//! for all of its tables and applies the rest in one stream, in source commit order: at each
//! commit its tables stand at one instant of the source, where the key held. It comes back in
//! two steps, so the stream never waits long: `ADD CONSTRAINT … NOT VALID` (a brief lock, under
//! `lock_timeout`; every write from then on is checked), then `VALIDATE CONSTRAINT`, which
//! checks the rows already there without blocking writes. A key that was not valid on the
//! target stays not valid. A validation that fails (the target broke the key, which the source
//! would not have let happen) is logged with the constraint, table and SQLSTATE and tried again
//! later; the key stays added meanwhile.
//!
//! `copy.create_schema` keeps the foreign keys of the tables it creates here too, put back by
//! the same rule once the data is in.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::apply::progress::ProgressKey;
use crate::copy::state::TargetCopy;
use crate::lsn::Lsn;
use crate::pg::{quote_ident, safe_pg_error};
use crate::table::TableName;

/// Creates `pgcarve.fk_aside` (serialized like `pgcarve.progress`). Runs inside a transaction.
pub const CREATE_SQL: &str = "SELECT pg_advisory_xact_lock(hashtext('pgcarve.progress'));
CREATE SCHEMA IF NOT EXISTS pgcarve;
CREATE TABLE IF NOT EXISTS pgcarve.fk_aside (
    system_id     text    NOT NULL,
    slot          text    NOT NULL,
    target        text    NOT NULL,
    table_schema  text    NOT NULL,
    table_name    text    NOT NULL,
    name          text    NOT NULL,
    parent_schema text    NOT NULL,
    parent_name   text    NOT NULL,
    definition    text    NOT NULL,
    validated     boolean NOT NULL,
    added         boolean NOT NULL DEFAULT false,
    set_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (system_id, slot, target, table_schema, table_name, name)
);";

/// Every foreign key on the target: name, referencing table, referenced table, definition,
/// whether it is valid, and whether this role may drop it and add it again (owns the
/// referencing table, may reference the other).
const FOREIGN_KEYS_SQL: &str = "SELECT k.conname::text, cn.nspname::text, c.relname::text, \
        pn.nspname::text, p.relname::text, pg_get_constraintdef(k.oid), k.convalidated, \
        pg_has_role(c.relowner, 'USAGE') AND has_table_privilege(k.confrelid, 'REFERENCES') \
    FROM pg_constraint k \
    JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace \
    JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace \
    WHERE k.contype = 'f' AND k.conparentid = 0";

/// Records a key set aside (again: not added any more). Parameters: key…, table schema and
/// name, constraint, parent schema and name, definition, validated.
const RECORD_SQL: &str = "INSERT INTO pgcarve.fk_aside AS a (system_id, slot, target, \
        table_schema, table_name, name, parent_schema, parent_name, definition, validated) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
    ON CONFLICT (system_id, slot, target, table_schema, table_name, name) DO UPDATE \
    SET added = false, validated = a.validated OR EXCLUDED.validated, set_at = now()";

/// A foreign key set aside on a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aside {
    /// The referencing table.
    pub table: TableName,
    /// The constraint's name.
    pub name: String,
    /// The referenced table.
    pub parent: TableName,
    /// `pg_get_constraintdef`, without `NOT VALID`.
    pub definition: String,
    /// It is validated once added back.
    pub validated: bool,
    /// Added back (`NOT VALID`); its validation is still to come.
    pub added: bool,
}

impl Aside {
    /// `table.name`, for logs and errors.
    pub fn label(&self) -> String {
        format!("{}.{}", self.table, self.name)
    }
}

/// Drops `NOT VALID` from a constraint definition (pure).
fn definition(def: &str) -> String {
    def.trim()
        .strip_suffix("NOT VALID")
        .unwrap_or(def)
        .trim()
        .to_string()
}

/// What setting keys aside on one target came to.
#[derive(Debug)]
pub enum SetAside {
    /// These keys were set aside now (maybe none).
    Done(Vec<Aside>),
    /// Nothing was set aside: this role may not drop and add back these keys.
    NotAllowed(Vec<String>),
    /// Nothing was set aside: the tables stayed locked by others past `lock_timeout`.
    Busy,
}

/// Sets aside every foreign key on the target between two of its `routed` tables with an end in
/// `copying`, in one transaction (waiting at most `lock_timeout` for the tables). Keys already
/// set aside stay so. Keys from or to a table pgcarve does not route there stay: the service's
/// own tables keep their referential actions.
pub async fn set_aside(
    client: &mut Client,
    key: &ProgressKey,
    routed: &[TableName],
    copying: &[TableName],
) -> Result<SetAside, String> {
    let err = |what: &str, e: tokio_postgres::Error| {
        format!("target {}: {what}: {}", key.target, safe_pg_error(&e))
    };
    let rows = client
        .query(FOREIGN_KEYS_SQL, &[])
        .await
        .map_err(|e| err("read foreign keys", e))?;
    let mut keys = Vec::new();
    let mut refused = Vec::new();
    for r in &rows {
        let table = TableName {
            schema: r.get(1),
            name: r.get(2),
        };
        let parent = TableName {
            schema: r.get(3),
            name: r.get(4),
        };
        if (!copying.contains(&table) && !copying.contains(&parent))
            || !routed.contains(&table)
            || !routed.contains(&parent)
        {
            continue;
        }
        let a = Aside {
            table,
            name: r.get(0),
            parent,
            definition: definition(r.get(5)),
            validated: r.get(6),
            added: false,
        };
        if r.get::<_, bool>(7) {
            keys.push(a);
        } else {
            refused.push(a.label());
        }
    }
    if !refused.is_empty() {
        return Ok(SetAside::NotAllowed(refused));
    }
    if keys.is_empty() {
        return Ok(SetAside::Done(keys));
    }
    let tx = client.transaction().await.map_err(|e| err("begin", e))?;
    tx.batch_execute(CREATE_SQL)
        .await
        .map_err(|e| err("create pgcarve.fk_aside", e))?;
    tx.batch_execute("SET LOCAL lock_timeout = '10s'")
        .await
        .map_err(|e| err("set lock_timeout", e))?;
    for a in &keys {
        tx.execute(
            RECORD_SQL,
            &[
                &key.system_id,
                &key.slot,
                &key.target,
                &a.table.schema,
                &a.table.name,
                &a.name,
                &a.parent.schema,
                &a.parent.name,
                &a.definition,
                &a.validated,
            ],
        )
        .await
        .map_err(|e| err("record a foreign key set aside", e))?;
        let dropped = tx
            .batch_execute(&format!(
                "ALTER TABLE {} DROP CONSTRAINT {}",
                a.table.quoted(),
                quote_ident(&a.name)
            ))
            .await;
        match dropped {
            Ok(()) => {}
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                return Ok(SetAside::Busy)
            }
            Err(e) => return Err(err(&format!("set aside foreign key {}", a.label()), e)),
        }
    }
    tx.commit().await.map_err(|e| err("commit", e))?;
    Ok(SetAside::Done(keys))
}

/// Keeps foreign keys that `copy.create_schema` will create once the data is in, inside the
/// transaction that creates their tables. Parameters of each: referencing table, constraint,
/// referenced table, definition.
pub async fn keep_created(
    tx: &tokio_postgres::Transaction<'_>,
    key: &ProgressKey,
    keys: &[(TableName, String, TableName, String)],
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute(CREATE_SQL).await?;
    for (table, name, parent, def) in keys {
        tx.execute(
            RECORD_SQL,
            &[
                &key.system_id,
                &key.slot,
                &key.target,
                &table.schema,
                &table.name,
                name,
                &parent.schema,
                &parent.name,
                &definition(def),
                &true,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Reads the keys set aside on a target (none when nothing ever was). Writes nothing.
pub async fn read(client: &Client, key: &ProgressKey) -> Result<Vec<Aside>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('pgcarve.fk_aside') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT table_schema, table_name, name, parent_schema, parent_name, definition, \
                    validated, added \
             FROM pgcarve.fk_aside WHERE system_id = $1 AND slot = $2 AND target = $3 \
             ORDER BY set_at, table_schema, table_name, name",
            &[&key.system_id, &key.slot, &key.target],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Aside {
            table: TableName {
                schema: r.get(0),
                name: r.get(1),
            },
            name: r.get(2),
            parent: TableName {
                schema: r.get(3),
                name: r.get(4),
            },
            definition: r.get(5),
            validated: r.get(6),
            added: r.get(7),
        })
        .collect())
}

/// Whether a key set aside may come back (pure): each table it links is either not copied
/// here or copied and joined (no side stream), and the slot's confirmed position has passed
/// each copy position.
pub fn due(a: &Aside, copy: &TargetCopy, confirmed: Lsn) -> bool {
    [&a.table, &a.parent]
        .iter()
        .all(|t| match copy.tables.iter().find(|tc| &tc.table == *t) {
            None => true,
            Some(tc) => {
                tc.state.is_some_and(|s| s.is_done())
                    && !tc.side
                    && tc.lsn.is_none_or(|at| confirmed >= at)
            }
        })
}

/// Puts one key back: added `NOT VALID` (recorded in the same transaction), then validated,
/// then forgotten. Errors name the constraint and the SQLSTATE.
pub async fn restore(client: &mut Client, key: &ProgressKey, a: &Aside) -> Result<(), String> {
    let err = |what: &str, e: tokio_postgres::Error| {
        format!(
            "target {}: foreign key {}: {what}: {}",
            key.target,
            a.label(),
            safe_pg_error(&e)
        )
    };
    let forget = "DELETE FROM pgcarve.fk_aside WHERE system_id = $1 AND slot = $2 AND target = $3 \
                  AND table_schema = $4 AND table_name = $5 AND name = $6";
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
        &key.system_id,
        &key.slot,
        &key.target,
        &a.table.schema,
        &a.table.name,
        &a.name,
    ];
    // A table dropped meanwhile: nothing to add back.
    let gone: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NULL OR to_regclass($2) IS NULL",
            &[&a.table.quoted(), &a.parent.quoted()],
        )
        .await
        .map_err(|e| err("read catalog", e))?
        .get(0);
    if gone {
        client
            .execute(forget, &params)
            .await
            .map_err(|e| err("forget", e))?;
        return Err(format!(
            "target {}: foreign key {}: a table it links no longer exists: forgotten",
            key.target,
            a.label()
        ));
    }
    if !a.added {
        let tx = client.transaction().await.map_err(|e| err("begin", e))?;
        tx.batch_execute("SET LOCAL lock_timeout = '2s'")
            .await
            .map_err(|e| err("set lock_timeout", e))?;
        // Added again by hand meanwhile: taken as it is.
        let exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass($1) \
                 AND conname = $2 AND contype = 'f')",
                &[&a.table.quoted(), &a.name],
            )
            .await
            .map_err(|e| err("read catalog", e))?
            .get(0);
        // A partitioned table takes no NOT VALID foreign key before PostgreSQL 18: added
        // valid at once (its rows are checked under the lock).
        let partitioned: bool = tx
            .query_one(
                "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)",
                &[&a.table.quoted()],
            )
            .await
            .map_err(|e| err("read catalog", e))?
            .get(0);
        if !exists {
            tx.batch_execute(&format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {}{}",
                a.table.quoted(),
                quote_ident(&a.name),
                a.definition,
                if partitioned && a.validated {
                    ""
                } else {
                    " NOT VALID"
                }
            ))
            .await
            .map_err(|e| err("add back", e))?;
        }
        tx.execute(
            "UPDATE pgcarve.fk_aside SET added = true WHERE system_id = $1 AND slot = $2 \
             AND target = $3 AND table_schema = $4 AND table_name = $5 AND name = $6",
            &params,
        )
        .await
        .map_err(|e| err("record", e))?;
        tx.commit().await.map_err(|e| err("commit", e))?;
    }
    if a.validated {
        client
            .batch_execute(&format!(
                "SET statement_timeout = 0; ALTER TABLE {} VALIDATE CONSTRAINT {}",
                a.table.quoted(),
                quote_ident(&a.name)
            ))
            .await
            .map_err(|e| err("validate", e))?;
    }
    client
        .execute(forget, &params)
        .await
        .map_err(|e| err("forget", e))?;
    Ok(())
}

/// Puts back, on one target, every key set aside that is due (`confirmed`: the slot's
/// confirmed position). Returns what came back, and the errors (each key is tried on its own).
pub async fn restore_due(
    client: &mut Client,
    key: &ProgressKey,
    tables: &[TableName],
    confirmed: Lsn,
) -> Result<(Vec<Aside>, Vec<String>), String> {
    let err = |what: &str, e: tokio_postgres::Error| {
        format!("target {}: {what}: {}", key.target, safe_pg_error(&e))
    };
    let asides = read(client, key)
        .await
        .map_err(|e| err("read foreign keys set aside", e))?;
    if asides.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let copy = crate::copy::state::read(client, key, tables)
        .await
        .map_err(|e| err("read copy state", e))?;
    let mut back = Vec::new();
    let mut problems = Vec::new();
    for a in asides.into_iter().filter(|a| due(a, &copy, confirmed)) {
        match restore(client, key, &a).await {
            Ok(()) => back.push(a),
            Err(reason) => problems.push(reason),
        }
    }
    Ok((back, problems))
}

/// Puts back the keys set aside on every target whenever they are due, until `shutdown`.
/// Each target is looked at every `every`; a problem is logged when it first appears or
/// changes (a lock not granted in time is tried again quietly at the next look).
pub async fn run(
    settings: crate::config::Settings,
    system_id: String,
    tls: crate::tls::TlsConnector,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut last: HashMap<String, String> = HashMap::new();
    // One connection per target, kept between looks (opened again after a problem).
    let mut clients: HashMap<String, Client> = HashMap::new();
    // After a problem other than a lock, a target is looked at again later and later (a
    // validation that fails scans the table each time): `every` doubled per problem, up to
    // 10 minutes.
    let mut backoff: HashMap<String, (u32, tokio::time::Instant)> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        for t in &settings.targets {
            if backoff
                .get(&t.name)
                .is_some_and(|(_, next)| tokio::time::Instant::now() < *next)
            {
                continue;
            }
            let key = ProgressKey {
                system_id: system_id.clone(),
                slot: settings.slot.clone(),
                target: t.name.clone(),
            };
            let client = match clients.remove(&t.name) {
                Some(c) if !c.is_closed() => Ok(c),
                _ => crate::pg::open(&t.conn, &format!("target {}", t.name)).await,
            };
            let outcome = match client {
                Ok(mut c) => {
                    let r = restore_target(&settings, &tls, &mut c, t, &key).await;
                    if r.is_ok() {
                        clients.insert(t.name.clone(), c);
                    }
                    r
                }
                Err(reason) => Err(reason),
            };
            let problem = match outcome {
                Ok((back, problems)) => {
                    for a in back {
                        tracing::info!(target_name = %t.name, table = %a.table, constraint = %a.name, validated = a.validated, "the foreign key set aside during the copy is back");
                    }
                    problems.join("; ")
                }
                Err(reason) => reason,
            };
            // A lock not granted in time is tried again quietly.
            let problem = problem
                .split("; ")
                .filter(|p| !p.contains("55P03"))
                .collect::<Vec<_>>()
                .join("; ");
            if problem.is_empty() {
                backoff.remove(&t.name);
            } else {
                let tries = backoff.get(&t.name).map_or(0, |(n, _)| n + 1);
                let wait = (every * 2u32.saturating_pow(tries.min(16)))
                    .min(std::time::Duration::from_secs(600));
                backoff.insert(t.name.clone(), (tries, tokio::time::Instant::now() + wait));
                if last.get(&t.name) != Some(&problem) {
                    tracing::warn!(target_name = %t.name, retry_secs = wait.as_secs(), "foreign keys set aside: {problem}");
                }
            }
            last.insert(t.name.clone(), problem);
        }
    }
}

/// One look at one target: nothing to do unless keys are set aside there.
async fn restore_target(
    settings: &crate::config::Settings,
    tls: &crate::tls::TlsConnector,
    client: &mut Client,
    t: &crate::config::Target,
    key: &ProgressKey,
) -> Result<(Vec<Aside>, Vec<String>), String> {
    let pending = read(client, key).await.map_err(|e| {
        format!(
            "target {}: read foreign keys set aside: {}",
            t.name,
            safe_pg_error(&e)
        )
    })?;
    if pending.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let src = crate::pg::connect(&settings.source, tls)
        .await
        .map_err(|e| format!("source: {}", safe_pg_error(&e)))?;
    let confirmed: Option<String> = src
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&settings.slot],
        )
        .await
        .map_err(|e| format!("source: read slot: {}", safe_pg_error(&e)))?
        .and_then(|r| r.get(0));
    let Some(confirmed) = confirmed.and_then(|s| s.parse::<Lsn>().ok()) else {
        return Ok((Vec::new(), Vec::new()));
    };
    restore_due(client, key, &t.tables, confirmed).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::state::{State, TableCopy};

    fn t(s: &str) -> TableName {
        TableName::parse(s).unwrap()
    }

    fn aside() -> Aside {
        Aside {
            table: t("allergies"),
            name: "allergies_patient_fk".into(),
            parent: t("patients"),
            definition: "FOREIGN KEY (patient_id) REFERENCES patients(id)".into(),
            validated: true,
            added: false,
        }
    }

    fn copy(state: Option<State>, side: bool, lsn: Option<u64>) -> TargetCopy {
        let tc = |table: &str, state, side, lsn: Option<u64>| TableCopy {
            table: t(table),
            state,
            lsn: lsn.map(Lsn),
            chunks: None,
            chunks_done: 0,
            rows_done: 0,
            has_rows: true,
            side,
        };
        TargetCopy {
            known: true,
            tables: vec![
                tc("patients", Some(State::Streaming), false, Some(100)),
                tc("allergies", state, side, lsn),
            ],
        }
    }

    #[test]
    fn a_key_comes_back_once_its_tables_are_joined_and_confirmed_past_their_copies() {
        let a = aside();
        // (state of allergies, side stream, its copy position, confirmed) → due
        let cases = [
            // Still copying, copied on a side stream, failed, or never copied: not yet.
            (Some(State::Copying), false, Some(500), 900, false),
            (Some(State::Copied), true, Some(500), 900, false),
            (Some(State::Failed), false, Some(500), 900, false),
            (None, false, None, 900, false),
            // Joined, but the slot has not confirmed past the copy's position.
            (Some(State::Streaming), false, Some(500), 499, false),
            (Some(State::Streaming), false, Some(500), 99, false),
            (Some(State::Streaming), false, Some(500), 500, true),
            (Some(State::Copied), false, Some(500), 700, true),
        ];
        for (state, side, lsn, confirmed, want) in cases {
            let got = due(&a, &copy(state, side, lsn), Lsn(confirmed));
            assert_eq!(
                got, want,
                "{state:?} side={side} at {lsn:?}, confirmed {confirmed}"
            );
        }
        // A table not routed here (a local table) does not hold it back.
        let mut local = aside();
        local.parent = t("local_codes");
        let joined = copy(Some(State::Streaming), false, Some(500));
        assert!(due(&local, &joined, Lsn(500)));
    }

    #[test]
    fn a_definition_is_kept_without_not_valid() {
        assert_eq!(
            definition("FOREIGN KEY (a) REFERENCES p(id) NOT VALID"),
            "FOREIGN KEY (a) REFERENCES p(id)"
        );
        assert_eq!(
            definition("FOREIGN KEY (a) REFERENCES p(id) ON DELETE CASCADE"),
            "FOREIGN KEY (a) REFERENCES p(id) ON DELETE CASCADE"
        );
    }
}
