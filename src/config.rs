//! `daemon.toml`: serde structs with defaults, loading through the `config` crate, and a
//! `validate` step that collects every problem (one line each, with its fix) before anything
//! connects anywhere.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::conninfo::ConnInfo;
use crate::secret;
use crate::table::TableName;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The monolith.
    pub source: SourceConfig,
    /// Service databases by name.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
    /// Apply tuning.
    #[serde(default)]
    pub apply: ApplyConfig,
    /// HTTP endpoint for /metrics and /health.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The initial copy.
    #[serde(default)]
    pub copy: CopyConfig,
    /// Periodic verification inside the daemon.
    #[serde(default)]
    pub verify: VerifyConfig,
}

/// `[source]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq URI of the monolith.
    pub url: String,
    /// Logical replication slot name.
    #[serde(default = "default_name")]
    pub slot: String,
    /// Publication name.
    #[serde(default = "default_name")]
    pub publication: String,
    /// File holding the password (first line), instead of `PGCARVE_SOURCE_PASSWORD`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Seconds between read-only checks of the routed tables in the source catalog (dropped,
    /// recreated, unpublished, replica identity).
    #[serde(default = "default_catalog_check")]
    pub catalog_check_secs: f64,
    /// Seconds between source heartbeats (a logical decoding message, no table write) that let
    /// the slot advance while the routed tables are idle, and readings of the WAL the slot
    /// keeps; 0 turns the heartbeat off (the reading goes on every 30 s).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: f64,
    /// A warning is logged when the slot keeps more of the monolith's WAL than this, bytes.
    #[serde(default = "default_retained_wal_warn")]
    pub retained_wal_warn_bytes: u64,
}

/// `[targets.NAME]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// libpq URI of the service database.
    pub url: String,
    /// Tables this service owns, `schema.table` or `table` (schema `public`).
    pub tables: Vec<String>,
    /// File holding the password, instead of `PGCARVE_TARGET_<NAME>_PASSWORD`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// `[apply]`: how changes are batched toward the targets.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// Changes per chunk sent to a target task (a big source transaction travels as several).
    #[serde(default = "default_chunk_changes")]
    pub chunk_changes: usize,
    /// Row changes that may wait per target (bounds memory; backpressure beyond it).
    #[serde(default = "default_queue_changes")]
    pub queue_changes: usize,
    /// Most source transactions grouped into one target transaction.
    #[serde(default = "default_group_transactions")]
    pub group_transactions: usize,
    /// First retry delay after a target rejects a change, seconds.
    #[serde(default = "default_retry_initial")]
    pub retry_initial_secs: f64,
    /// Longest retry delay, seconds.
    #[serde(default = "default_retry_max")]
    pub retry_max_secs: f64,
    /// Threads running pgcarve's own tasks (reader, apply tasks, metrics).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Longest time a stop (SIGTERM, SIGINT) takes, seconds: after half of it, statements
    /// still running on targets are cancelled; at its end, pgcarve exits whatever the targets
    /// are doing (what they committed is safe; the rest comes again from the slot).
    #[serde(default = "default_shutdown")]
    pub shutdown_secs: f64,
    /// A target that has work and commits none of it for this long (a lock wait, a dead
    /// connection) is reported as not progressing, seconds.
    #[serde(default = "default_hung")]
    pub hung_secs: f64,
    /// A target that takes nothing for this long while work waits for it (or that is stalled
    /// after a failure) no longer holds the reader up: its share goes to its spool, seconds.
    #[serde(default = "default_stall")]
    pub stall_secs: f64,
    /// Bound of each target's spool, bytes; a target whose spool reaches it is detached and
    /// rejoins by one stream restart.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// Folder of the spools (created 0700; they hold row data). Default: `spool-<slot>` under
    /// systemd's `$STATE_DIRECTORY`, else `pgcarve-<slot>` in the temporary folder (always
    /// set once validated).
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// Changes of the open target transaction kept in memory, so a retry after a failure
    /// needs nothing from the slot; beyond this many they are kept in a file beside the
    /// spools.
    #[serde(default = "default_retain_changes")]
    pub retain_changes: usize,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            chunk_changes: default_chunk_changes(),
            queue_changes: default_queue_changes(),
            group_transactions: default_group_transactions(),
            retry_initial_secs: default_retry_initial(),
            retry_max_secs: default_retry_max(),
            threads: default_threads(),
            shutdown_secs: default_shutdown(),
            hung_secs: default_hung(),
            stall_secs: default_stall(),
            spool_max_bytes: default_spool_max_bytes(),
            spool_dir: None,
            retain_changes: default_retain_changes(),
        }
    }
}

/// `[copy]`: the initial copy of the routed tables (see the `copy` module).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CopyConfig {
    /// Copy each routed table's existing rows before streaming its changes. Off: the targets
    /// get only what commits after the slot is created (their tables must already hold the
    /// rest).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Chunks copied at once (each: one source and one connection per owning target).
    #[serde(default = "default_copy_parallel")]
    pub parallel: usize,
    /// A table estimated to hold more rows than this is read in block ranges of about this
    /// many rows each, in parallel.
    #[serde(default = "default_copy_chunk_rows")]
    pub chunk_rows: u64,
    /// Run `schema` before the first copy: create the tables a target lacks (their secondary
    /// indexes and foreign keys once the data is in).
    #[serde(default)]
    pub create_schema: bool,
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig {
            enabled: true,
            parallel: default_copy_parallel(),
            chunk_rows: default_copy_chunk_rows(),
            create_schema: false,
        }
    }
}

fn default_true() -> bool {
    true
}
/// Four: copying waits mostly on the two servers, and four streams keep both busy on small
/// machines without crowding the monolith.
fn default_copy_parallel() -> usize {
    4
}
fn default_copy_chunk_rows() -> u64 {
    500_000
}

/// `[verify]`: how `pgcarve verify` compares, and periodic verification while running.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// Seconds between verifications of every routed table and cross-service relationship;
    /// 0 (the default) turns it off. Each run reads the whole monolith once, range by range.
    #[serde(default)]
    pub interval_secs: f64,
    /// Rows per compared range (key range or hash bucket): a range that differs is narrowed
    /// from this size down to single rows.
    #[serde(default = "default_verify_range_rows")]
    pub range_rows: u64,
    /// Upper bound on rows read per second from each side, on average; 0: no limit.
    #[serde(default)]
    pub rows_per_second: u64,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            interval_secs: 0.0,
            range_rows: default_verify_range_rows(),
            rows_per_second: 0,
        }
    }
}

fn default_verify_range_rows() -> u64 {
    20_000
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address for the HTTP endpoint; empty disables it.
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_listen(),
        }
    }
}

fn default_name() -> String {
    "pgcarve".into()
}
fn default_catalog_check() -> f64 {
    30.0
}
fn default_heartbeat() -> f64 {
    30.0
}
fn default_retained_wal_warn() -> u64 {
    5_000_000_000
}
fn default_chunk_changes() -> usize {
    2000
}
fn default_queue_changes() -> usize {
    50_000
}
fn default_group_transactions() -> usize {
    500
}
fn default_retry_initial() -> f64 {
    1.0
}
fn default_stall() -> f64 {
    1.0
}
fn default_spool_max_bytes() -> u64 {
    1 << 30
}
fn default_retain_changes() -> usize {
    100_000
}
fn default_hung() -> f64 {
    60.0
}
fn default_shutdown() -> f64 {
    30.0
}
fn default_retry_max() -> f64 {
    60.0
}
/// One: pgcarve's own work per row is small and mostly waits on I/O, while the walsender and
/// the target backends need the cores; measured faster than one thread per core on 2 cores
/// (`benches/e2e.rs`, `PGCARVE_BENCH_THREADS`).
pub fn default_threads() -> usize {
    1
}
fn default_listen() -> String {
    "127.0.0.1:9187".into()
}

/// A configuration that cannot be used: every problem, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

/// A validated target.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name from `[targets.NAME]`.
    pub name: String,
    /// Connection parameters, password resolved.
    pub conn: ConnInfo,
    /// Owned tables.
    pub tables: Vec<TableName>,
}

/// A validated configuration, ready to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Source connection, password resolved.
    pub source: ConnInfo,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Targets in name order.
    pub targets: Vec<Target>,
    /// Apply tuning.
    pub apply: ApplyConfig,
    /// Metrics listen address, if enabled.
    pub metrics_listen: Option<SocketAddr>,
    /// Interval of the routed tables' catalog check.
    pub catalog_check: std::time::Duration,
    /// The initial copy.
    pub copy: CopyConfig,
    /// Source heartbeat interval (`None`: off).
    pub heartbeat: Option<std::time::Duration>,
    /// Retained-WAL warning threshold, bytes.
    pub retained_wal_warn_bytes: u64,
    /// Periodic verification interval (`None`: off).
    pub verify_every: Option<std::time::Duration>,
    /// How verification compares (range size, rate).
    pub verify: VerifyConfig,
    /// The file as parsed (what a reload compares against).
    pub raw: Config,
}

impl Config {
    /// Reads and parses a TOML file. Unknown keys are errors naming the key.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(ConfigError(vec![format!(
                "config file {} does not exist (pass --config FILE or set PGCARVE_CONFIG)",
                path.display()
            )]));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(vec![format!(
                "cannot read config file {}: {e}",
                path.display()
            )])
        })?;
        Config::from_toml(&text)
            .map_err(|e| ConfigError(vec![format!("{}: {}", path.display(), e)]))
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, config::ConfigError> {
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?
            .try_deserialize()
    }

    /// Checks everything that can be checked without connecting, and resolves passwords.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        let source = match ConnInfo::parse(&self.source.url) {
            Ok(mut c) => {
                match secret::resolve(
                    "PGCARVE_SOURCE_PASSWORD",
                    self.source.password_file.as_deref(),
                    "source-password",
                    c.password.take(),
                ) {
                    Ok(pw) => c.password = pw,
                    Err(e) => problems.push(format!("source.password_file: {e}")),
                }
                Some(c)
            }
            Err(e) => {
                problems.push(format!("source.url: {e}"));
                None
            }
        };
        for (key, v) in [
            ("slot", &self.source.slot),
            ("publication", &self.source.publication),
        ] {
            if !valid_object_name(v) {
                problems.push(format!(
                    "source.{key} = {v:?}: use 1-63 lowercase letters, digits and underscores"
                ));
            }
        }
        if self.targets.is_empty() {
            problems.push(
                "no targets: add at least one [targets.NAME] with url and tables".to_string(),
            );
        }
        let mut targets = Vec::new();
        for (name, t) in &self.targets {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                problems.push(format!(
                    "targets.{name}: target names use letters, digits, '_' and '-'"
                ));
            }
            let conn = match ConnInfo::parse(&t.url) {
                Ok(mut c) => {
                    match secret::resolve(
                        &secret::target_password_env(name),
                        t.password_file.as_deref(),
                        &format!("target-{name}-password"),
                        c.password.take(),
                    ) {
                        Ok(pw) => c.password = pw,
                        Err(e) => problems.push(format!("targets.{name}.password_file: {e}")),
                    }
                    Some(c)
                }
                Err(e) => {
                    problems.push(format!("targets.{name}.url: {e}"));
                    None
                }
            };
            if t.tables.is_empty() {
                problems.push(format!(
                    "targets.{name}.tables is empty: list the tables this service owns"
                ));
            }
            let mut tables: Vec<TableName> = Vec::new();
            for raw in &t.tables {
                match TableName::parse(raw) {
                    Some(tn) if tables.contains(&tn) => {
                        problems.push(format!("targets.{name}.tables lists {tn} twice"))
                    }
                    Some(tn) => tables.push(tn),
                    None => problems.push(format!(
                        "targets.{name}.tables: {raw:?} is not a table name (use \"table\" or \"schema.table\")"
                    )),
                }
            }
            if let Some(conn) = conn {
                targets.push(Target {
                    name: name.clone(),
                    conn,
                    tables,
                });
            }
        }
        let a = &self.apply;
        if a.chunk_changes == 0 || a.queue_changes == 0 || a.group_transactions == 0 {
            problems.push(
                "apply.chunk_changes, apply.queue_changes and apply.group_transactions must be at least 1"
                    .into(),
            );
        }
        if !(1..=256).contains(&a.threads) {
            problems.push(format!(
                "apply.threads = {}: must be between 1 and 256",
                a.threads
            ));
        }
        if !(a.hung_secs > 0.0 && a.hung_secs <= 86400.0) {
            problems.push(format!(
                "apply.hung_secs = {}: must be > 0 and at most 86400",
                a.hung_secs
            ));
        }
        if !(a.stall_secs >= 0.05 && a.stall_secs <= 3600.0) {
            problems.push(format!(
                "apply.stall_secs = {}: must be between 0.05 and 3600",
                a.stall_secs
            ));
        }
        if a.spool_max_bytes < 1 << 20 {
            problems.push(format!(
                "apply.spool_max_bytes = {}: must be at least 1048576 (1 MiB)",
                a.spool_max_bytes
            ));
        }
        if !(a.shutdown_secs >= 1.0 && a.shutdown_secs <= 3600.0) {
            problems.push(format!(
                "apply.shutdown_secs = {}: must be between 1 and 3600",
                a.shutdown_secs
            ));
        }
        if !(a.retry_initial_secs > 0.0 && a.retry_max_secs >= a.retry_initial_secs) {
            problems
                .push("apply.retry_initial_secs must be > 0 and <= apply.retry_max_secs".into());
        }
        if !(1..=64).contains(&self.copy.parallel) {
            problems.push(format!(
                "copy.parallel = {}: must be between 1 and 64",
                self.copy.parallel
            ));
        }
        if self.copy.chunk_rows < 1000 {
            problems.push(format!(
                "copy.chunk_rows = {}: must be at least 1000",
                self.copy.chunk_rows
            ));
        }
        let vi = self.verify.interval_secs;
        if !(vi == 0.0 || (1.0..=604_800.0).contains(&vi)) {
            problems.push(format!(
                "verify.interval_secs = {vi}: 0 (off) or between 1 and 604800"
            ));
        }
        if !(100..=10_000_000).contains(&self.verify.range_rows) {
            problems.push(format!(
                "verify.range_rows = {}: between 100 and 10000000",
                self.verify.range_rows
            ));
        }
        if self.verify.rows_per_second != 0 && self.verify.rows_per_second < 100 {
            problems.push(format!(
                "verify.rows_per_second = {}: 0 (no limit) or at least 100",
                self.verify.rows_per_second
            ));
        }
        let hb = self.source.heartbeat_secs;
        if !(hb == 0.0 || (1.0..=3600.0).contains(&hb)) {
            problems.push(format!(
                "source.heartbeat_secs = {hb}: 0 (off) or between 1 and 3600"
            ));
        }
        let check = self.source.catalog_check_secs;
        if !(check > 0.0 && check <= 3600.0) {
            problems.push(format!(
                "source.catalog_check_secs = {check}: must be > 0 and at most 3600"
            ));
        }
        let metrics_listen = if self.metrics.listen.is_empty() {
            None
        } else {
            match self.metrics.listen.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    problems.push(format!(
                        "metrics.listen = {:?}: expected host:port such as 127.0.0.1:9187",
                        self.metrics.listen
                    ));
                    None
                }
            }
        };
        match (problems.is_empty(), source) {
            (true, Some(source)) => Ok(Settings {
                source,
                slot: self.source.slot.clone(),
                publication: self.source.publication.clone(),
                targets,
                apply: ApplyConfig {
                    spool_dir: Some(
                        self.apply
                            .spool_dir
                            .clone()
                            .unwrap_or_else(|| default_spool_dir(&self.source.slot)),
                    ),
                    ..self.apply.clone()
                },
                metrics_listen,
                catalog_check: std::time::Duration::from_secs_f64(check.clamp(0.001, 3600.0)),
                copy: self.copy.clone(),
                heartbeat: (hb > 0.0)
                    .then(|| std::time::Duration::from_secs_f64(hb.clamp(1.0, 3600.0))),
                retained_wal_warn_bytes: self.source.retained_wal_warn_bytes,
                verify_every: (vi > 0.0).then(|| std::time::Duration::from_secs_f64(vi)),
                verify: self.verify.clone(),
                raw: self.clone(),
            }),
            _ => Err(ConfigError(problems)),
        }
    }
}

/// Keys a reload applies to the running daemon; every other change needs a restart.
pub const LIVE_KEYS: &[&str] = &[
    "source.heartbeat_secs",
    "source.retained_wal_warn_bytes",
    "source.catalog_check_secs",
];

/// The keys (`section.key`, `targets.NAME.key`) whose values differ between two configs (pure).
/// Only names: values may hold passwords (a URL's) and are never logged.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let null = serde_json::Value::Null;
                    walk(
                        &p,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            (a, b) if a != b => out.push(path.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let (a, b) = (
        serde_json::to_value(old).unwrap_or_default(),
        serde_json::to_value(new).unwrap_or_default(),
    );
    walk("", &a, &b, &mut out);
    out
}

/// A folder named after the slot (one per instance: each start empties it) under systemd's
/// state directory, else in the temporary folder.
pub fn default_spool_dir(slot: &str) -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        // systemd may list several, separated by colons: the first is ours.
        Some(s) if !s.is_empty() => {
            let all = s.to_string_lossy().into_owned();
            PathBuf::from(all.split(':').next().unwrap_or_default()).join(format!("spool-{slot}"))
        }
        _ => std::env::temp_dir().join(format!("pgcarve-{slot}")),
    }
}

fn valid_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_changed_keys_never_values() {
        let a = Config::from_toml(
            "[source]\nurl = \"postgresql://u:secret@h/db\"\n[targets.svc]\nurl = \"postgresql://h/t\"\ntables = [\"a\"]\n",
        )
        .unwrap();
        let b = Config::from_toml(
            "[source]\nurl = \"postgresql://u:other@h/db\"\nheartbeat_secs = 5\n[targets.svc]\nurl = \"postgresql://h/t\"\ntables = [\"a\", \"b\"]\n[apply]\nhung_secs = 10\n",
        )
        .unwrap();
        assert_eq!(
            changed_keys(&a, &b),
            [
                "apply.hung_secs",
                "source.heartbeat_secs",
                "source.url",
                "targets.svc.tables"
            ]
        );
        assert!(changed_keys(&a, &a).is_empty());
    }

    const GOOD: &str = r#"
[source]
url = "postgresql://carve@db:5432/care"

[targets.patient]
url = "postgresql://carve@db:5432/patient_db"
tables = ["patients", "billing.claims"]

[targets.shared]
url = "postgresql://carve@db:5432/shared_db"
tables = ["patients"]
"#;

    #[test]
    fn parses_and_defaults() {
        let s = Config::from_toml(GOOD).unwrap().validate().unwrap();
        assert_eq!(s.slot, "pgcarve");
        assert_eq!(s.publication, "pgcarve");
        assert_eq!(s.targets.len(), 2);
        assert_eq!(
            s.targets[0].tables[1],
            TableName {
                schema: "billing".into(),
                name: "claims".into()
            }
        );
        assert_eq!(s.metrics_listen.unwrap().port(), 9187);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = GOOD.replace("[source]\n", "[source]\nslott = \"x\"\n");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("slott"), "{err}");
        let text = GOOD.replace(
            "tables = [\"patients\"]",
            "tables = [\"patients\"]\ntabels = []",
        );
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("tabels"), "{err}");
    }

    #[test]
    fn target_names_keep_their_case() {
        let text = GOOD.replace("[targets.patient]", "[targets.PatientSvc]");
        let s = Config::from_toml(&text).unwrap().validate().unwrap();
        assert!(s.targets.iter().any(|t| t.name == "PatientSvc"));
    }

    #[test]
    fn collects_every_problem() {
        let text = r#"
[source]
url = "mysql://x"
slot = "Bad-Slot"

[targets.a]
url = "postgresql://u@h/d?sslmode=maybe"
tables = ["x.y.z", "t", "t"]

[metrics]
listen = "nope"

[apply]
threads = 0
"#;
        let err = Config::from_toml(text).unwrap().validate().unwrap_err();
        let all = err.to_string();
        for needle in [
            "source.url",
            "source.slot",
            "targets.a.url",
            "x.y.z",
            "twice",
            "metrics.listen",
            "apply.threads",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
    }

    #[test]
    fn no_targets_is_an_error() {
        let err = Config::from_toml("[source]\nurl = \"postgresql://u@h/d\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("no targets"));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn repository_daemon_toml_is_valid() {
        let c = Config::from_toml(include_str!("../daemon.toml")).expect("daemon.toml parses");
        let s = c.validate().expect("daemon.toml validates");
        assert_eq!(s.targets.len(), 9);
    }
}
