//! `pgcarve check`: the read-only preflight. It reads the source, every target, the
//! publication and the slot with the same inspections start-up uses, and reports every problem
//! at once, each with its fix, plus warnings. It changes nothing on any database (start-up's
//! `act` steps are never called). `--assess` adds the migration assessment (`assess`).

pub mod assess;

use serde_json::json;

use crate::apply::prepare::{connect_and_inspect, problems, StartError};
use crate::apply::progress::ProgressKey;
use crate::config::Settings;
use crate::conninfo::{ConnInfo, Host, SslMode};
use crate::lsn::Lsn;
use crate::pg::safe_pg_error;
use crate::route::Router;
use crate::source::catalog;
use crate::tls::TlsConnector;

/// What `check` found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Problems that would refuse or break the migration, each with its fix.
    pub problems: Vec<String>,
    /// Things that work but deserve attention.
    pub warnings: Vec<String>,
    /// The assessment, with `--assess`.
    pub assessment: Option<assess::Assessment>,
}

impl Report {
    /// The human report.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for p in &self.problems {
            out.push_str(&format!("problem: {p}\n"));
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        if let Some(a) = &self.assessment {
            out.push_str(&a.text());
        }
        out.push_str(if self.problems.is_empty() {
            "ready: no problems found\n"
        } else {
            "not ready: fix the problems above, then run check again\n"
        });
        out
    }

    /// The JSON report.
    pub fn json(&self) -> serde_json::Value {
        json!({
            "ready": self.problems.is_empty(),
            "problems": self.problems,
            "warnings": self.warnings,
            "assessment": self.assessment.as_ref().map(|a| a.json()),
        })
    }
}

/// A connection without TLS to a host that is not this machine.
fn cleartext_remote(c: &ConnInfo) -> Option<String> {
    let Host::Tcp(host) = &c.host else {
        return None;
    };
    let local = matches!(host.as_str(), "localhost" | "127.0.0.1" | "::1");
    (!local && matches!(c.sslmode, SslMode::Disable | SslMode::Prefer)).then(|| host.clone())
}

/// Runs the preflight. `Err`: it could not run (the source is unreachable).
pub async fn run(settings: &Settings, with_assessment: bool) -> Result<Report, String> {
    let mut r = Report::default();
    let router = Router::new(&settings.targets);
    let tables = router.tables();
    let tls = TlsConnector::new(&settings.source).map_err(|e| format!("source: {e}"))?;
    let src = crate::pg::connect(&settings.source, &tls)
        .await
        .map_err(|e| {
            format!(
                "source {}: {}",
                settings.source.display_target(),
                safe_pg_error(&e)
            )
        })?;
    let err =
        |what: &str, e: tokio_postgres::Error| format!("source: {what}: {}", safe_pg_error(&e));

    // The source and its routed tables.
    let facts = catalog::inspect_source(&src, &tables).await?;
    let source = match catalog::plan_source(&facts) {
        Ok(s) => Some(s),
        Err(p) => {
            r.problems.extend(p);
            None
        }
    };
    let role = src
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| err("read role", e))?;
    let (user, replication): (String, bool) = (role.get(0), role.get(1));
    if !replication {
        r.problems.push(format!(
            "source role {user} lacks the REPLICATION attribute: ALTER ROLE {} REPLICATION",
            crate::pg::quote_ident(&user)
        ));
    }
    for (t, f) in &facts.tables {
        if f.is_some() {
            let can: bool = src
                .query_one(
                    "SELECT has_table_privilege(to_regclass($1), 'SELECT')",
                    &[&t.quoted()],
                )
                .await
                .map_err(|e| err("read privileges", e))?
                .get(0);
            if !can {
                r.problems.push(format!(
                    "source role {user} cannot read {t}: GRANT SELECT ON {} TO {}",
                    t.quoted(),
                    crate::pg::quote_ident(&user)
                ));
            }
        }
    }
    let slot = catalog::slot_info(&src, &settings.slot)
        .await
        .map_err(|e| err("read slot", e))?;
    let head = src
        .query_one(
            "SELECT current_setting('max_replication_slots')::int - (SELECT count(*)::int FROM pg_replication_slots), \
                    current_setting('max_wal_senders')::int - (SELECT count(*)::int FROM pg_stat_replication), \
                    current_setting('max_slot_wal_keep_size')",
            &[],
        )
        .await
        .map_err(|e| err("read settings", e))?;
    let (free_slots, free_senders, keep): (i32, i32, String) =
        (head.get(0), head.get(1), head.get(2));
    // The stream's slot (if it is still to be created) and a copy's temporary slot.
    let need_slots = 1 + i32::from(slot.is_none());
    if free_slots < need_slots {
        r.problems.push(format!(
            "the source has {free_slots} free replication slot(s), pgcarve needs {need_slots} (its slot and a temporary one while copying): raise max_replication_slots"
        ));
    }
    if free_senders < 2 {
        r.problems.push(format!(
            "the source has {free_senders} free WAL sender(s), pgcarve needs 2 (the stream and a copy's temporary slot): raise max_wal_senders"
        ));
    }
    if keep == "-1" {
        r.warnings.push(
            "max_slot_wal_keep_size is unlimited on the source: a stopped pgcarve's slot keeps WAL until the disk fills; set a bound the migration can live with"
                .into(),
        );
    }
    if let Some(host) = cleartext_remote(&settings.source) {
        r.warnings.push(format!(
            "source.url reaches {host} without required TLS (sslmode={}): use sslmode=verify-full",
            settings.source.sslmode
        ));
    }
    let publication = catalog::inspect_publication(&src, &settings.publication).await?;
    if let Err(p) = catalog::plan_publication(&settings.publication, publication.as_ref(), &tables)
    {
        r.problems.extend(p);
    }

    // Every target.
    let mut holding: Vec<(String, Lsn)> = Vec::new();
    let mut copies = Vec::new();
    for t in &settings.targets {
        if let Some(host) = cleartext_remote(&t.conn) {
            r.warnings.push(format!(
                "targets.{}.url reaches {host} without required TLS: use sslmode=verify-full",
                t.name
            ));
        }
        let key = ProgressKey {
            system_id: facts.system_id.clone(),
            slot: settings.slot.clone(),
            target: t.name.clone(),
        };
        let inspected = match connect_and_inspect(t, &key).await {
            Ok(i) => i,
            Err(StartError::Transient(reason)) => {
                r.problems
                    .push(format!("{reason}: pgcarve waits for it at start-up"));
                continue;
            }
            Err(StartError::Fatal(p)) => {
                r.problems.extend(p);
                continue;
            }
        };
        if let Some(s) = &source {
            r.problems.extend(problems(t, &inspected.facts, &s.columns));
        }
        let client = crate::pg::open(&t.conn, &format!("target {}", t.name)).await?;
        let terr = |e: tokio_postgres::Error| format!("target {}: {}", t.name, safe_pg_error(&e));
        for table in &t.tables {
            let missing: Option<String> = client
                .query_one(
                    "SELECT string_agg(p, ', ') FROM unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p \
                     WHERE to_regclass($1) IS NOT NULL AND NOT has_table_privilege(to_regclass($1), p)",
                    &[&table.quoted()],
                )
                .await
                .map_err(terr)?
                .get(0);
            if let Some(m) = missing {
                r.problems.push(format!(
                    "target {}: the role cannot {m} on {table}: GRANT {m} ON {} TO the role in targets.{}.url",
                    t.name,
                    table.quoted(),
                    t.name
                ));
            }
        }
        let create: bool = client
            .query_one(
                "SELECT to_regnamespace('pgcarve') IS NOT NULL OR has_database_privilege(current_database(), 'CREATE')",
                &[],
            )
            .await
            .map_err(terr)?
            .get(0);
        if !create {
            r.problems.push(format!(
                "target {}: the role may not create the pgcarve schema (its progress and copy state): GRANT CREATE ON DATABASE to it, or create the schema for it",
                t.name
            ));
        }
        let copy = crate::copy::state::read(&client, &key, &t.tables)
            .await
            .map_err(terr)?;
        let aside = crate::copy::aside::read(&client, &key)
            .await
            .map_err(terr)?;
        if !aside.is_empty() {
            let names: Vec<String> = aside.iter().map(|a| a.label()).collect();
            r.warnings.push(format!(
                "target {}: foreign keys set aside during a copy, not enforced until pgcarve puts them back once the target has caught up (a running pgcarve does; teardown --targets does too): {}",
                t.name,
                names.join(", ")
            ));
        }
        let copied = copy
            .tables
            .iter()
            .filter(|tc| tc.state.is_some())
            .filter_map(|tc| tc.lsn)
            .max();
        if let Some(lsn) = inspected.facts.progress.or(copied) {
            holding.push((t.name.clone(), lsn));
        }
        copies.push((t.name.clone(), inspected.facts.progress.is_some(), copy));
    }
    let inputs: Vec<crate::copy::plan::TargetInput<'_>> = copies
        .iter()
        .map(
            |(name, has_progress, copy)| crate::copy::plan::TargetInput {
                name,
                has_progress: *has_progress,
                copy,
            },
        )
        .collect();
    if let Err(p) = crate::copy::plan::plan(settings.copy.enabled, &inputs) {
        r.problems.extend(p);
    }
    if let crate::daemon::slot::SlotDecision::Refuse(p) = crate::daemon::slot::decide_slot(
        &settings.slot,
        &settings.source.dbname,
        slot.as_ref(),
        &holding,
    ) {
        r.problems.extend(p);
    }
    // The same comparison as `schema`: every difference of existing target tables.
    match crate::schema::run(settings, crate::schema::Mode::Report).await {
        Ok(o) => r
            .problems
            .extend(o.targets.into_iter().flat_map(|(_, p)| p.differences)),
        Err(e) => r.problems.push(e),
    }
    r.problems.dedup();
    if with_assessment {
        r.assessment = Some(assess::assess(settings, &src, &router).await?);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleartext_toward_a_remote_host_is_named_and_local_or_tls_is_not() {
        let c = |url: &str| ConnInfo::parse(url).unwrap();
        assert_eq!(
            cleartext_remote(&c("postgresql://u@db.internal/care?sslmode=disable")).as_deref(),
            Some("db.internal")
        );
        assert_eq!(
            cleartext_remote(&c("postgresql://u@db.internal/care?sslmode=prefer")).as_deref(),
            Some("db.internal")
        );
        assert_eq!(
            cleartext_remote(&c("postgresql://u@db.internal/care?sslmode=verify-full")),
            None
        );
        assert_eq!(
            cleartext_remote(&c("postgresql://u@127.0.0.1/care?sslmode=disable")),
            None
        );
        assert_eq!(cleartext_remote(&c("postgresql://u@localhost/care")), None);
    }
}
