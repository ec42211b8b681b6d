//! The periodic read-only check of the routed tables in the monolith's catalog: what the
//! replication stream cannot show. A table dropped (no more changes), dropped and recreated
//! (other data under the same name, not in the publication), removed from the publication, or
//! whose replica identity no longer publishes its UPDATEs and DELETEs (the monolith's own writes
//! then fail). Each problem found stops the table's owners (see `reader`) until an operator
//! acts. A rename is not a problem here: the stream follows it by OID (`crate::route`).

use tokio_postgres::Client;

use crate::pg::{quote_ident, safe_pg_error};
use crate::table::TableName;

/// Monolith DDL on a routed table that pgcarve cannot follow. Names and codes only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogProblem {
    /// The routed table.
    pub table: TableName,
    /// A short code for metrics: `dropped`, `recreated`, `unpublished`, `replica_identity`.
    pub problem: &'static str,
    /// What happened and what the operator does, one line.
    pub message: String,
}

/// A routed table as the catalog shows it now, found by the OID it had at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedNow {
    /// The routed name.
    pub table: TableName,
    /// The OID it had at start-up.
    pub oid: u32,
    /// The OID the routed name resolves to now (`None`: no such table).
    pub name_oid: Option<u32>,
    /// The start-up OID still exists.
    pub exists: bool,
    /// Its `relreplident`.
    pub replica_identity: String,
    /// It has a primary key.
    pub has_primary_key: bool,
    /// It has an index marked as its replica identity (for `REPLICA IDENTITY USING INDEX`).
    pub has_identity_index: bool,
    /// It is in the publication (directly, through its schema, or FOR ALL TABLES).
    pub published: bool,
}

/// Reads every routed table by its start-up OID. Writes nothing.
pub async fn inspect_routed(
    client: &Client,
    publication: &str,
    routed: &[(TableName, u32)],
) -> Result<Vec<RoutedNow>, tokio_postgres::Error> {
    let names: Vec<String> = routed.iter().map(|(t, _)| t.quoted()).collect();
    let oids: Vec<u32> = routed.iter().map(|(_, o)| *o).collect();
    let rows = client
        .query(
            "SELECT r.i, to_regclass(r.name)::oid, c.oid IS NOT NULL, \
                    coalesce(c.relreplident::text, ''), \
                    EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = r.oid AND x.indisprimary), \
                    EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = r.oid AND x.indisreplident), \
                    EXISTS (SELECT 1 FROM pg_publication_tables pt \
                            WHERE pt.pubname = $3 AND pt.schemaname = n.nspname \
                              AND pt.tablename = c.relname) \
             FROM unnest($1::text[], $2::oid[]) WITH ORDINALITY AS r(name, oid, i) \
             LEFT JOIN pg_class c ON c.oid = r.oid \
             LEFT JOIN pg_namespace n ON n.oid = c.relnamespace \
             ORDER BY r.i",
            &[&names, &oids, &publication],
        )
        .await?;
    Ok(rows
        .iter()
        .zip(routed)
        .map(|(r, (table, oid))| RoutedNow {
            table: table.clone(),
            oid: *oid,
            name_oid: r.get(1),
            exists: r.get(2),
            replica_identity: r.get(3),
            has_primary_key: r.get(4),
            has_identity_index: r.get(5),
            published: r.get(6),
        })
        .collect())
}

/// What the catalog shows that the stream cannot: a routed table dropped (or dropped and
/// recreated under its name), gone from the publication, or with a replica identity that no
/// longer publishes its UPDATEs and DELETEs. A rename is not a problem (the stream follows
/// it). Pure.
pub fn routed_problems(publication: &str, now: &[RoutedNow]) -> Vec<CatalogProblem> {
    let mut out = Vec::new();
    for t in now {
        let table = &t.table;
        let problem = |problem, message| CatalogProblem {
            table: table.clone(),
            problem,
            message,
        };
        if !t.exists {
            out.push(match t.name_oid {
                Some(new) => problem(
                    "recreated",
                    format!("routed table {table} was dropped and recreated on the source (it is now relation {new}): the new table is other data under the same name; make sure it is in publication {publication}, resynchronise {table} on its targets, clear their halted mark, then restart"),
                ),
                None => problem(
                    "dropped",
                    format!("routed table {table} was dropped on the source: remove it from the targets' tables (or recreate and resynchronise it), then restart"),
                ),
            });
            continue;
        }
        if !t.published {
            out.push(problem(
                "unpublished",
                format!("routed table {table} is no longer in publication {publication}: its changes stop reaching the targets; ALTER PUBLICATION {} ADD TABLE {}, resynchronise {table} on its targets, then restart", quote_ident(publication), table.quoted()),
            ));
        }
        match t.replica_identity.as_str() {
            "n" => out.push(problem(
                "replica_identity",
                format!("routed table {table} now has REPLICA IDENTITY NOTHING: the monolith's UPDATE and DELETE on it fail while it is published; ALTER TABLE {} REPLICA IDENTITY FULL (or DEFAULT with a primary key), then restart", table.quoted()),
            )),
            "i" if !t.has_identity_index => out.push(problem(
                "replica_identity",
                format!("routed table {table} lost the index of its REPLICA IDENTITY USING INDEX: the monolith's UPDATE and DELETE on it fail while it is published; ALTER TABLE {} REPLICA IDENTITY USING INDEX … (or FULL), then restart", table.quoted()),
            )),
            "d" if !t.has_primary_key => out.push(problem(
                "replica_identity",
                format!("routed table {table} has no primary key any more: the monolith's UPDATE and DELETE on it fail while it is published; ALTER TABLE {} REPLICA IDENTITY FULL (or add a primary key), then restart", table.quoted()),
            )),
            _ => {}
        }
    }
    out
}

/// Checks the routed tables every `every`, read-only, and sends each problem found (once per
/// table and problem) until `shutdown`. A source that cannot be reached is retried at the next
/// check: the stream reports lost connections itself.
pub async fn watch(
    source: crate::conninfo::ConnInfo,
    tls: crate::tls::TlsConnector,
    publication: String,
    routed: Vec<(TableName, u32)>,
    every: std::time::Duration,
    problems: tokio::sync::mpsc::UnboundedSender<CatalogProblem>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut client: Option<Client> = None;
    let mut sent: Vec<(TableName, &'static str)> = Vec::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = crate::pg::connect(&source, &tls).await.ok();
        }
        let Some(c) = &client else { continue };
        let now = match inspect_routed(c, &publication, &routed).await {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(
                    "catalog check failed, retrying at the next one: {}",
                    safe_pg_error(&e)
                );
                continue;
            }
        };
        for p in routed_problems(&publication, &now) {
            if sent.contains(&(p.table.clone(), p.problem)) {
                continue;
            }
            sent.push((p.table.clone(), p.problem));
            if problems.send(p).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TableName {
        TableName::parse(name).unwrap()
    }

    fn routed_now(name: &str) -> RoutedNow {
        RoutedNow {
            table: t(name),
            oid: 100,
            name_oid: Some(100),
            exists: true,
            replica_identity: "d".into(),
            has_primary_key: true,
            has_identity_index: false,
            published: true,
        }
    }

    #[test]
    fn a_healthy_or_renamed_routed_table_is_no_problem() {
        let mut renamed = routed_now("b");
        renamed.name_oid = None; // its routed name is free: it was renamed
        assert!(routed_problems("pgcarve", &[routed_now("a"), renamed]).is_empty());
    }

    #[test]
    fn dropped_recreated_unpublished_and_identity_problems_are_found() {
        let mut dropped = routed_now("dropped");
        dropped.exists = false;
        dropped.name_oid = None;
        let mut recreated = routed_now("recreated");
        recreated.exists = false;
        recreated.name_oid = Some(200);
        let mut unpublished = routed_now("unpublished");
        unpublished.published = false;
        let mut nothing = routed_now("nothing");
        nothing.replica_identity = "n".into();
        let mut no_pk = routed_now("no_pk");
        no_pk.has_primary_key = false;
        let mut full = routed_now("full");
        full.replica_identity = "f".into();
        full.has_primary_key = false;
        let p = routed_problems(
            "pgcarve",
            &[dropped, recreated, unpublished, nothing, no_pk, full],
        );
        let codes: Vec<(String, &str)> = p
            .iter()
            .map(|p| (p.table.name.clone(), p.problem))
            .collect();
        assert_eq!(
            codes,
            vec![
                ("dropped".to_string(), "dropped"),
                ("recreated".into(), "recreated"),
                ("unpublished".into(), "unpublished"),
                ("nothing".into(), "replica_identity"),
                ("no_pk".into(), "replica_identity"),
            ]
        );
        assert!(p[1].message.contains("relation 200"));
        assert!(p[2]
            .message
            .contains("ALTER PUBLICATION \"pgcarve\" ADD TABLE \"public\".\"unpublished\""));
    }
}
