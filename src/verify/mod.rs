//! `pgcarve verify`: each routed table at each owning target compared with the source — row
//! counts and checksums over key ranges, mismatched ranges narrowed to the exact keys that are
//! missing, extra or different. Reports keys and counts, never other values.
//!
//! # Online and exact
//!
//! Targets apply while we compare, so a comparison is made at known positions: the source range
//! is read under a snapshot, and the position `P` of the source's WAL is read inside it (every
//! transaction the snapshot sees committed before `P`); the target range is read once the slot's
//! confirmed position has passed `P` — pgcarve confirms a position only when every target holds
//! everything before it (see `source::reader::feedback`). The target may be ahead of `P` (rows
//! changed since), so a range that differs is compared again, a few times, each with a fresh
//! snapshot; only a difference that persists is reported. Reads on the monolith are snapshot
//! reads of one range at a time: no locks, and `verify.range_rows` bounds each.
//!
//! # Checksums
//!
//! A range's checksum is the count of its rows and the exact sum of a 64-bit hash of each row
//! (`hash_record_extended` over the routed columns in the source's order: each column hashed
//! by its type's own hash function, so values compare as `=` says — `1.0` equals `1.00` —
//! and nothing is formatted as text; enums, user types and types without a hash function are
//! compared by their text form, with the same session settings on both sides as the copy
//! uses). The sum is order-independent, so both sides scan in any order. The hash functions are
//! PostgreSQL's own (stable across versions: hash partitioning depends on them) and depend on
//! byte order, so source and targets must share it (every x86-64 and ARM64 server does).
//!
//! A table with a single-column integer key is split into key ranges of `verify.range_rows`
//! rows: every range's checksum in one scan per side (or, under `verify.rows_per_second`, a
//! slice of ranges at a time), then a range that differs is split again and finally compared
//! row by row, by index range scans. Any other table is split into hash buckets of the key (or
//! of the whole row, without a key): every bucket's checksum in one scan, then the rows of the
//! buckets that differ, a bounded batch at a time. Row by row means (key, row hash) on both
//! sides, or for a table without a key (REPLICA IDENTITY FULL) the multiset of row hashes with
//! their counts.

pub mod orphans;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::config::VerifyConfig;

use serde_json::json;
use tokio_postgres::Client;

use crate::config::{Settings, Target};
use crate::lsn::Lsn;
use crate::pg::{quote_ident, safe_pg_error};
use crate::table::TableName;

/// A mismatched key range of at most this many rows is compared row by row.
const NARROW_ROWS: i64 = 2_000;
/// Rows of mismatched hash buckets compared row by row at once (bounds memory).
const BUCKET_BATCH_ROWS: i64 = 100_000;
/// Comparisons of rows that differ before the difference is reported.
const ATTEMPTS: u32 = 3;
/// Keys listed per kind of difference (the counts are always whole).
const SAMPLE: usize = 20;

/// Session settings making the text form of values the same on both sides; and no JIT: the
/// checksum scans of a large table cost enough for the planner to optimize and inline their
/// expressions, seconds of compile time for a scan of the same order (seen in the copy's
/// resume comparisons).
const SESSION_SQL: &str = "SET extra_float_digits = 3; SET DateStyle = 'ISO'; \
    SET IntervalStyle = 'postgres'; SET lc_monetary = 'C'; SET TimeZone = 'UTC'; \
    SET statement_timeout = 0; SET jit = off";

/// Differences found in one table at one target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableDiff {
    /// Rows compared on the source (at the last comparison).
    pub source_rows: i64,
    /// Rows on the target.
    pub target_rows: i64,
    /// Keys on the source missing on the target.
    pub missing: Vec<String>,
    /// Keys on the target the source does not have.
    pub extra: Vec<String>,
    /// Keys on both sides whose rows differ.
    pub different: Vec<String>,
    /// Whole counts of each (the lists are samples).
    pub counts: (usize, usize, usize),
}

impl TableDiff {
    /// Whether it differs.
    pub fn differs(&self) -> bool {
        self.counts != (0, 0, 0) || self.source_rows != self.target_rows
    }
}

/// One table at one target.
#[derive(Debug, Clone)]
pub struct TableResult {
    /// Target name.
    pub target: String,
    /// The table.
    pub table: TableName,
    /// The comparison.
    pub diff: TableDiff,
}

/// The report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every table compared.
    pub tables: Vec<TableResult>,
    /// Cross-service relationships with persistent orphans.
    pub orphans: Vec<orphans::Orphans>,
    /// Cross-service relationships checked.
    pub relationships_checked: bool,
}

impl Report {
    /// Some table differs.
    pub fn differs(&self) -> bool {
        self.tables.iter().any(|t| t.diff.differs()) || !self.orphans.is_empty()
    }

    /// The human report.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            let d = &t.diff;
            if !d.differs() {
                out.push_str(&format!(
                    "target {}: {}: identical ({} rows)\n",
                    t.target, t.table, d.source_rows
                ));
                continue;
            }
            out.push_str(&format!(
                "target {}: {}: DIFFERS: source {} rows, target {} rows; {} missing, {} extra, {} different\n",
                t.target, t.table, d.source_rows, d.target_rows, d.counts.0, d.counts.1, d.counts.2
            ));
            for (what, keys, n) in [
                ("missing", &d.missing, d.counts.0),
                ("extra", &d.extra, d.counts.1),
                ("different", &d.different, d.counts.2),
            ] {
                if !keys.is_empty() {
                    let more = if n > keys.len() {
                        format!(" … and {} more", n - keys.len())
                    } else {
                        String::new()
                    };
                    out.push_str(&format!("  {what} keys: {}{more}\n", keys.join(", ")));
                }
            }
        }
        for o in &self.orphans {
            out.push_str(&format!(
                "ORPHANS: {} at {} → {} at {} ({}): {} rows whose parent is missing; missing parent keys: {}\n",
                orphans::columns_at(&o.child.0, &o.child.1), o.child_target,
                orphans::columns_at(&o.parent.0, &o.parent.1), o.parent_target,
                o.constraint, o.rows, o.missing.join(", ")
            ));
        }
        if self.relationships_checked && self.orphans.is_empty() {
            out.push_str("cross-service relationships: no orphans\n");
        }
        out.push_str(if self.differs() {
            "differences found\n"
        } else {
            "every table is identical\n"
        });
        out
    }

    /// The JSON report.
    pub fn json(&self) -> serde_json::Value {
        json!({
            "identical": !self.differs(),
            "tables": self.tables.iter().map(|t| json!({
                "target": t.target, "table": t.table.to_string(), "identical": !t.diff.differs(),
                "source_rows": t.diff.source_rows, "target_rows": t.diff.target_rows,
                "missing": {"count": t.diff.counts.0, "keys": t.diff.missing},
                "extra": {"count": t.diff.counts.1, "keys": t.diff.extra},
                "different": {"count": t.diff.counts.2, "keys": t.diff.different},
            })).collect::<Vec<_>>(),
            "orphans": self.orphans.iter().map(|o| json!({
                "constraint": o.constraint, "child_target": o.child_target,
                "child": orphans::columns_at(&o.child.0, &o.child.1), "parent_target": o.parent_target,
                "parent": orphans::columns_at(&o.parent.0, &o.parent.1), "rows": o.rows,
                "missing_parent_keys": o.missing,
            })).collect::<Vec<_>>(),
        })
    }
}

/// How a table is split and keyed.
#[derive(Debug, Clone)]
struct Shape {
    /// The routed columns, in the source's order, quoted.
    columns: String,
    /// A single-column integer key, quoted.
    int_key: Option<String>,
    /// A single-column key of any type: quoted, and its type.
    single_key: Option<(String, String)>,
    /// The key columns as one text expression, quoted (none: no key, compared as a multiset).
    key_text: Option<String>,
}

/// Reads the table's shape on the source.
async fn shape(src: &Client, t: &TableName) -> Result<Shape, tokio_postgres::Error> {
    // Each column as `rowhash` hashes it (by value, or by its text).
    let columns = crate::rowhash::columns(src, t).await?;
    let key: Vec<(String, String)> = src
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, n) ON true \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary ORDER BY k.n",
            &[&t.quoted()],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let int_key = match key.as_slice() {
        [(name, ty)] if matches!(ty.as_str(), "smallint" | "integer" | "bigint") => {
            Some(quote_ident(name))
        }
        _ => None,
    };
    let single_key = match key.as_slice() {
        [(name, ty)] => Some((quote_ident(name), ty.clone())),
        _ => None,
    };
    let key_text = (!key.is_empty()).then(|| {
        key.iter()
            .map(|(k, _)| format!("{}::text", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(" || ',' || ")
    });
    Ok(Shape {
        columns,
        int_key,
        single_key,
        key_text,
    })
}

/// A key range `[from, to)` (open ends: `None`).
type Range = (Option<i64>, Option<i64>);

fn range_sql(shape: &Shape, r: Range) -> String {
    match &shape.int_key {
        Some(k) => crate::rowhash::key_range(k, r.0, r.1),
        None => "true".into(),
    }
}

/// A row's 64-bit hash (`rowhash`).
fn row_hash(shape: &Shape) -> String {
    crate::rowhash::row_hash(&shape.columns)
}

/// The checksum of a set of rows (`rowhash`).
fn row_sum(shape: &Shape) -> String {
    crate::rowhash::row_sum(&shape.columns)
}

/// A row's hash bucket under `modulus` (of the key, or of the whole row without one).
fn bucket_expr(shape: &Shape, modulus: i64) -> String {
    let h = match &shape.key_text {
        Some(k) => format!("hashtextextended({k}, 0)"),
        None => row_hash(shape),
    };
    format!("(({h} % {modulus}) + {modulus}) % {modulus}")
}

/// `group` → (count, checksum) for every group of rows that `within` selects, in one scan.
async fn group_checksums(
    c: &Client,
    t: &TableName,
    shape: &Shape,
    group: &str,
    within: &str,
) -> Result<HashMap<i64, (i64, String)>, tokio_postgres::Error> {
    let rows = c
        .query(
            &format!(
                "SELECT ({group})::bigint, count(*), {sum} FROM ONLY {t} WHERE {within} GROUP BY 1",
                sum = row_sum(shape),
                t = t.quoted(),
            ),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                (r.get::<_, i64>(1), r.get::<_, String>(2)),
            )
        })
        .collect())
}

/// Which rows a row-by-row read takes.
#[derive(Debug, Clone)]
enum Rows {
    /// Key ranges.
    Ranges(Vec<Range>),
    /// These hash buckets under this modulus.
    Buckets(i64, Vec<i64>),
    /// These keys (for a table without a key: these row hashes).
    Keys(Vec<String>),
}

/// The key of a row as text, or its hash for a table without a key.
fn key_expr(shape: &Shape) -> String {
    shape
        .key_text
        .clone()
        .unwrap_or_else(|| format!("{}::text", row_hash(shape)))
}

/// (key or row hash) → (row hash, count), for the row-by-row comparison.
async fn rows(
    c: &Client,
    t: &TableName,
    shape: &Shape,
    which: &Rows,
) -> Result<BTreeMap<String, (String, i64)>, tokio_postgres::Error> {
    let key = key_expr(shape);
    let sql = |w: &str| {
        format!(
            "SELECT {key}, {h}::text, count(*) FROM ONLY {t} WHERE {w} GROUP BY 1, 2",
            h = row_hash(shape),
            t = t.quoted(),
        )
    };
    let found = match which {
        Rows::Ranges(r) => {
            let w: Vec<String> = r
                .iter()
                .map(|r| format!("({})", range_sql(shape, *r)))
                .collect();
            c.query(&sql(&w.join(" OR ")), &[]).await?
        }
        Rows::Buckets(m, buckets) => {
            c.query(
                &sql(&format!("{} = ANY($1::bigint[])", bucket_expr(shape, *m))),
                &[buckets],
            )
            .await?
        }
        // A single-column key's index finds them.
        Rows::Keys(keys) => match (&shape.int_key, &shape.single_key) {
            (Some(k), _) => {
                let ints: Vec<i64> = keys.iter().filter_map(|x| x.parse().ok()).collect();
                c.query(&sql(&format!("{k} = ANY($1::bigint[])")), &[&ints])
                    .await?
            }
            (None, Some((k, ty))) => {
                c.query(&sql(&format!("{k} = ANY($1::text[]::{ty}[])")), &[keys])
                    .await?
            }
            (None, None) => {
                c.query(&sql(&format!("{key} = ANY($1::text[])")), &[keys])
                    .await?
            }
        },
    };
    Ok(found
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get::<_, String>(1), r.get::<_, i64>(2)),
            )
        })
        .collect())
}

/// Connections and the position each source read is consistent with.
struct Sides {
    source: tokio_postgres::Client,
    /// A second source connection, outside any snapshot, for the slot's confirmed position.
    slot_reader: tokio_postgres::Client,
    target: tokio_postgres::Client,
    slot: String,
}

impl Sides {
    /// Opens a source snapshot; returns the WAL position it is consistent with.
    async fn snapshot(&self) -> Result<Lsn, tokio_postgres::Error> {
        self.source
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?;
        let p: String = self
            .source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        Ok(p.parse().unwrap_or(Lsn::ZERO))
    }

    /// Waits until every target holds everything before `p` (the slot confirmed it).
    async fn wait_applied(&self, p: Lsn) -> Result<(), String> {
        wait_confirmed(&self.slot_reader, &self.slot, p).await
    }
}

/// Waits until the slot has confirmed `p`: pgcarve confirms a position only when every target
/// holds everything before it.
async fn wait_confirmed(slot_reader: &Client, slot: &str, p: Lsn) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    // A record past `p` in this database: the walsender decodes past it and reports the
    // position at once, so an idle slot confirms `p` without waiting for a keepalive. (A role
    // that may not emit it just waits longer.)
    let _ = slot_reader
        .execute(
            "SELECT pg_logical_emit_message(false, 'pgcarve', 'verify')",
            &[],
        )
        .await;
    loop {
        let row = slot_reader
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| format!("source: read slot: {}", safe_pg_error(&e)))?;
        let Some(row) = row else {
            return Err(format!("slot {slot} does not exist: is pgcarve running?"));
        };
        let confirmed: Option<String> = row.get(0);
        if confirmed
            .and_then(|c| c.parse::<Lsn>().ok())
            .is_some_and(|c| c >= p)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the targets have not applied up to {p} within 120 s (is pgcarve running and caught up?)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the source under a snapshot, then the target once it holds everything before the
/// snapshot's position: `both!(sides, table, |client| read(client))` gives `(source, target)`.
macro_rules! both {
    ($sides:expr, $t:expr, |$c:ident| $read:expr) => {{
        let sides: &Sides = $sides;
        let t: &TableName = $t;
        let e =
            |side: &str, e: tokio_postgres::Error| format!("{side}: {t}: {}", safe_pg_error(&e));
        let p = sides.snapshot().await.map_err(|x| e("source", x))?;
        // The target holds everything before `p`: both sides read at once.
        sides.wait_applied(p).await?;
        let (a, b) = futures::join!(
            async {
                let $c = &sides.source;
                $read.await
            },
            async {
                let $c = &sides.target;
                $read.await
            }
        );
        let a = a.map_err(|x| e("source", x))?;
        let b = b.map_err(|x| e("target", x))?;
        sides
            .source
            .batch_execute("COMMIT")
            .await
            .map_err(|x| e("source", x))?;
        (a, b)
    }};
}

/// Keys (or row hashes) that differ, in full: missing, extra, different.
type Keys = (Vec<String>, Vec<String>, Vec<String>);

/// Compares rows one by one at one known position.
async fn narrow(sides: &Sides, t: &TableName, shape: &Shape, which: &Rows) -> Result<Keys, String> {
    let (a, b) = both!(sides, t, |c| rows(c, t, shape, which));
    let keyed = shape.key_text.is_some();
    let (mut missing, mut extra, mut different) = (Vec::new(), Vec::new(), Vec::new());
    for (k, (h, n)) in &a {
        match b.get(k) {
            None => missing.push(k.clone()),
            Some((h2, _)) if keyed && h2 != h => different.push(k.clone()),
            Some((_, n2)) if !keyed && n2 < n => missing.push(k.clone()),
            Some(_) => {}
        }
    }
    for (k, (_, n)) in &b {
        match a.get(k) {
            None => extra.push(k.clone()),
            Some((_, n1)) if !keyed && n1 < n => extra.push(k.clone()),
            Some(_) => {}
        }
    }
    Ok((missing, extra, different))
}

/// Compares mismatched rows row by row, then only the rows that differed, again, until they
/// agree or `ATTEMPTS` comparisons said the same: rows the stream was still bringing (a key
/// inserted after the source's snapshot, say) agree at the next look; a real difference stays.
async fn narrow_persistent(
    sides: &Sides,
    t: &TableName,
    shape: &Shape,
    which: Rows,
    diff: &mut TableDiff,
) -> Result<(), String> {
    let (mut m, mut x, mut d) = narrow(sides, t, shape, &which).await?;
    for attempt in 0..ATTEMPTS {
        if m.is_empty() && x.is_empty() && d.is_empty() {
            break;
        }
        // Each look waits for a fresh confirmed position anyway; a short pause spaces them.
        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt + 1))).await;
        let mut keys: Vec<String> = m.iter().chain(&x).chain(&d).cloned().collect();
        keys.sort();
        keys.dedup();
        (m, x, d) = narrow(sides, t, shape, &Rows::Keys(keys)).await?;
    }
    let keyed = shape.key_text.is_some();
    let name = |k: String| {
        if keyed {
            k
        } else {
            "(a row without a key)".to_string()
        }
    };
    diff.counts.0 += m.len();
    diff.counts.1 += x.len();
    diff.counts.2 += d.len();
    diff.missing.extend(m.into_iter().map(name));
    diff.extra.extend(x.into_iter().map(name));
    diff.different.extend(d.into_iter().map(name));
    Ok(())
}

/// Splits `[from, to)` into `n` ranges.
fn split(r: (i64, i64), n: i64) -> Vec<Range> {
    let (a, b) = r;
    let span = (b - a).max(1);
    let n = n.clamp(1, span);
    (0..n)
        .map(|i| (Some(a + span * i / n), Some(a + span * (i + 1) / n)))
        .collect()
}

/// No difference was found in any range.
fn work_was_clean(d: &TableDiff) -> bool {
    d.counts == (0, 0, 0)
}

/// Opens the first range below and the last above: keys outside the span read are covered.
fn open_ends(mut r: Vec<Range>) -> Vec<Range> {
    if let Some(first) = r.first_mut() {
        first.0 = None;
    }
    if let Some(last) = r.last_mut() {
        last.1 = None;
    }
    r
}

/// Keeps reads under `verify.rows_per_second` on average (0: no limit).
struct Pace {
    rate: u64,
    start: Instant,
    rows: u64,
}

impl Pace {
    fn new(rate: u64) -> Pace {
        Pace {
            rate,
            start: Instant::now(),
            rows: 0,
        }
    }

    /// After reading `rows` rows (from each side): waits until the average is back under the
    /// rate.
    async fn read(&mut self, rows: i64) {
        if self.rate == 0 {
            return;
        }
        self.rows += rows.max(0) as u64;
        let due = self.start + Duration::from_secs_f64(self.rows as f64 / self.rate as f64);
        tokio::time::sleep_until(due.into()).await;
    }

    /// Ranges read per scan: all at once without a limit, else about a second's worth.
    fn ranges_per_scan(&self, range_rows: u64) -> usize {
        match self.rate {
            0 => usize::MAX,
            r => (r / range_rows.max(1)).max(1) as usize,
        }
    }
}

/// Verifies one table at one target.
async fn verify_table(
    sides: &Sides,
    t: &TableName,
    opts: &VerifyConfig,
    pace: &mut Pace,
) -> Result<TableDiff, String> {
    let e = |side: &str, e: tokio_postgres::Error| format!("{side}: {t}: {}", safe_pg_error(&e));
    let shape = shape(&sides.source, t).await.map_err(|x| e("source", x))?;
    let range_rows = opts.range_rows.max(1) as i64;
    let mut diff = TableDiff::default();
    let counts = match shape.int_key.clone() {
        Some(k) => verify_key_ranges(sides, t, &shape, &k, range_rows, pace, &mut diff).await?,
        None => verify_buckets(sides, t, &shape, range_rows, pace, &mut diff).await?,
    };
    // Whole counts, at one known position (the one scan's, when nothing differed).
    match counts {
        Some(counts) if work_was_clean(&diff) => (diff.source_rows, diff.target_rows) = counts,
        _ => {
            let q = format!("SELECT count(*) FROM ONLY {}", t.quoted());
            (diff.source_rows, diff.target_rows) = both!(sides, t, |c| async {
                c.query_one(&q, &[]).await.map(|r| r.get::<_, i64>(0))
            });
        }
    }
    if diff.counts == (0, 0, 0) {
        // Rows moved between the two counts; the ranges agreed.
        diff.target_rows = diff.source_rows;
    }
    for l in [&mut diff.missing, &mut diff.extra, &mut diff.different] {
        l.sort();
        l.dedup();
        l.truncate(SAMPLE);
    }
    Ok(diff)
}

/// A table with a single-column integer key `k`: key ranges, narrowed by index range scans.
/// Returns both sides' whole counts when every range was read in one scan at one position.
async fn verify_key_ranges(
    sides: &Sides,
    t: &TableName,
    shape: &Shape,
    k: &str,
    range_rows: i64,
    pace: &mut Pace,
    diff: &mut TableDiff,
) -> Result<Option<(i64, i64)>, String> {
    let e = |side: &str, e: tokio_postgres::Error| format!("{side}: {t}: {}", safe_pg_error(&e));
    // The ranges: the key's span in pieces, open at both ends so new keys are covered.
    let mut span = (0i64, 0i64);
    let row = sides
        .source
        .query_one(
            &format!(
                "SELECT min({k})::bigint, max({k})::bigint, count(*) FROM ONLY {}",
                t.quoted()
            ),
            &[],
        )
        .await
        .map_err(|x| e("source", x))?;
    let (lo, hi, n): (Option<i64>, Option<i64>, i64) = (row.get(0), row.get(1), row.get(2));
    let ranges = match (lo, hi) {
        (Some(lo), Some(hi)) if n > NARROW_ROWS => {
            span = (lo, hi.saturating_add(1));
            open_ends(split(span, n / range_rows + 1))
        }
        _ => vec![(None, None)],
    };
    // Every range's checksum in one scan per side (under a rate limit, a slice of ranges at a
    // time); then, level by level, the ranges that differ are split in ten and all their
    // pieces compared in one look, until they are small enough to compare row by row.
    let per_scan = pace
        .ranges_per_scan(range_rows as u64)
        .min(ranges.len())
        .max(1);
    let mut whole_counts = None;
    let mut differing: Vec<(Range, i64)> = Vec::new();
    for slice in ranges.chunks(per_scan) {
        let within = range_sql(shape, (slice[0].0, slice[slice.len() - 1].1));
        let (found, counts) = compare_ranges(sides, t, shape, k, slice, &within).await?;
        if slice.len() == ranges.len() {
            whole_counts = Some(counts);
        }
        differing.extend(found);
        pace.read(counts.0.max(counts.1)).await;
    }
    while !differing.is_empty() {
        // An open end stands for the key's span on that side.
        let bounded = |r: Range| (r.0.unwrap_or(span.0), r.1.unwrap_or(span.1));
        let (small, big): (Vec<_>, Vec<_>) = differing.into_iter().partition(|(r, rows)| {
            let (a, b) = bounded(*r);
            *rows <= NARROW_ROWS || b - a <= 1
        });
        // Row by row, a bounded batch of rows at a time: the row-level comparison re-checks
        // what differs, so rows still in flight are not reported.
        for batch in batches(&small, BUCKET_BATCH_ROWS) {
            let rows: i64 = batch.iter().map(|x| x.1).sum();
            let ranges = batch.into_iter().map(|x| x.0).collect();
            narrow_persistent(sides, t, shape, Rows::Ranges(ranges), diff).await?;
            pace.read(rows).await;
        }
        differing = Vec::new();
        for group in big.chunks(100) {
            let mut pieces: Vec<Range> = Vec::new();
            for (r, _) in group {
                let mut parts = split(bounded(*r), 10);
                parts[0].0 = r.0;
                if let Some(last) = parts.last_mut() {
                    last.1 = r.1;
                }
                pieces.extend(parts);
            }
            let within = group
                .iter()
                .map(|(r, _)| format!("({})", range_sql(shape, *r)))
                .collect::<Vec<_>>()
                .join(" OR ");
            let (found, counts) = compare_ranges(sides, t, shape, k, &pieces, &within).await?;
            differing.extend(found);
            pace.read(counts.0.max(counts.1)).await;
        }
    }
    Ok(whole_counts)
}

/// Compares disjoint key ranges, sorted, in one look (`within`: a condition selecting exactly
/// their rows): each row is counted under the range whose lower bound is the greatest one not
/// above its key. Returns the ranges that differ with their larger row count, and both sides'
/// row counts.
async fn compare_ranges(
    sides: &Sides,
    t: &TableName,
    shape: &Shape,
    k: &str,
    ranges: &[Range],
    within: &str,
) -> Result<(Vec<(Range, i64)>, (i64, i64)), String> {
    // `width_bucket(key, lows)`: 0 below the first lower bound, i from the i-th on.
    let lows: Vec<String> = ranges
        .iter()
        .map(|r| r.0.unwrap_or(i64::MIN).to_string())
        .collect();
    let group = format!(
        "width_bucket({k}::bigint, '{{{}}}'::bigint[])",
        lows.join(",")
    );
    let (a, b) = both!(sides, t, |c| group_checksums(c, t, shape, &group, within));
    let counts = (
        a.values().map(|v| v.0).sum::<i64>(),
        b.values().map(|v| v.0).sum::<i64>(),
    );
    let rows = |m: &HashMap<i64, (i64, String)>, i: i64| m.get(&i).map_or(0, |v| v.0);
    let found = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| (i as i64 + 1, *r))
        .filter(|(i, _)| a.get(i) != b.get(i))
        .map(|(i, r)| (r, rows(&a, i).max(rows(&b, i))))
        .collect();
    Ok((found, counts))
}

/// Any other table: hash buckets of the key (of the whole row without one), every bucket's
/// checksum in one scan per side, then the rows of the buckets that differ, in batches of at
/// most `BUCKET_BATCH_ROWS`. Returns both sides' whole counts (read at one position).
async fn verify_buckets(
    sides: &Sides,
    t: &TableName,
    shape: &Shape,
    range_rows: i64,
    pace: &mut Pace,
    diff: &mut TableDiff,
) -> Result<Option<(i64, i64)>, String> {
    let e = |side: &str, e: tokio_postgres::Error| format!("{side}: {t}: {}", safe_pg_error(&e));
    let n: i64 = sides
        .source
        .query_one(&format!("SELECT count(*) FROM ONLY {}", t.quoted()), &[])
        .await
        .map_err(|x| e("source", x))?
        .get(0);
    let modulus = (n / range_rows + 1).max(1);
    let group = bucket_expr(shape, modulus);
    let (a, b) = both!(sides, t, |c| group_checksums(c, t, shape, &group, "true"));
    let counts = (
        a.values().map(|v| v.0).sum::<i64>(),
        b.values().map(|v| v.0).sum::<i64>(),
    );
    pace.read(counts.0.max(counts.1)).await;
    let mut differing: Vec<(i64, i64)> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(k) != b.get(k))
        .map(|k| {
            let rows = |m: &HashMap<i64, (i64, String)>| m.get(k).map_or(0, |v| v.0);
            (*k, rows(&a).max(rows(&b)))
        })
        .collect();
    differing.sort();
    differing.dedup();
    for batch in batches(&differing, BUCKET_BATCH_ROWS) {
        let rows: i64 = batch.iter().map(|x| x.1).sum();
        let buckets = batch.into_iter().map(|x| x.0).collect();
        narrow_persistent(sides, t, shape, Rows::Buckets(modulus, buckets), diff).await?;
        pace.read(rows).await;
    }
    Ok(Some(counts))
}

/// Groups (part, rows) into batches of at most `max_rows` rows (a larger part alone).
fn batches<T: Clone>(parts: &[(T, i64)], max_rows: i64) -> Vec<Vec<(T, i64)>> {
    let mut out: Vec<Vec<(T, i64)>> = Vec::new();
    let mut rows = 0;
    for (part, n) in parts {
        match out.last_mut() {
            Some(last) if rows + n <= max_rows => {
                last.push((part.clone(), *n));
                rows += n;
            }
            _ => {
                out.push(vec![(part.clone(), *n)]);
                rows = *n;
            }
        }
    }
    out
}

async fn connect(c: &crate::conninfo::ConnInfo, what: &str) -> Result<Client, String> {
    let client = crate::pg::open(c, what).await?;
    client
        .batch_execute(SESSION_SQL)
        .await
        .map_err(|e| format!("{what}: {}", safe_pg_error(&e)))?;
    Ok(client)
}

/// Verifies every routed table at every owning target (narrowed by `table`, `target`).
pub async fn run(
    settings: &Settings,
    only_table: Option<&TableName>,
    only_target: Option<&str>,
) -> Result<Report, String> {
    let mut report = Report::default();
    let targets: Vec<&Target> = settings
        .targets
        .iter()
        .filter(|t| only_target.is_none_or(|n| n == t.name))
        .collect();
    if let Some(n) = only_target {
        if targets.is_empty() {
            return Err(format!("no target {n} in the config"));
        }
    }
    let mut seen: HashMap<String, ()> = HashMap::new();
    let mut pace = Pace::new(settings.verify.rows_per_second);
    for t in targets {
        let sides = Sides {
            source: connect(&settings.source, "source").await?,
            slot_reader: connect(&settings.source, "source").await?,
            target: connect(&t.conn, &format!("target {}", t.name)).await?,
            slot: settings.slot.clone(),
        };
        for table in t
            .tables
            .iter()
            .filter(|x| only_table.is_none_or(|o| o == *x))
        {
            seen.insert(table.to_string(), ());
            let diff = verify_table(&sides, table, &settings.verify, &mut pace).await?;
            report.tables.push(TableResult {
                target: t.name.clone(),
                table: table.clone(),
                diff,
            });
        }
    }
    if let Some(o) = only_table {
        if !seen.contains_key(&o.to_string()) {
            return Err(format!("no target owns table {o}"));
        }
    }
    // Relationships across services, when the whole migration is verified.
    if only_table.is_none() && only_target.is_none() {
        let src = connect(&settings.source, "source").await?;
        let slot_reader = connect(&settings.source, "source").await?;
        report.orphans = orphans::check(settings, &src, &slot_reader).await?;
        report.relationships_checked = true;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_the_span_without_gaps() {
        let r = split((0, 100), 3);
        assert_eq!(
            r,
            vec![
                (Some(0), Some(33)),
                (Some(33), Some(66)),
                (Some(66), Some(100))
            ]
        );
        assert_eq!(split((5, 6), 10), vec![(Some(5), Some(6))]);
    }

    #[test]
    fn bucket_batches_bound_their_rows() {
        let b = batches(&[(1, 40), (4, 50), (5, 30), (9, 500), (12, 10)], 100);
        let parts: Vec<Vec<i32>> = b.iter().map(|x| x.iter().map(|p| p.0).collect()).collect();
        assert_eq!(parts, vec![vec![1, 4], vec![5], vec![9], vec![12]]);
        assert!(batches::<i32>(&[], 100).is_empty());
    }

    #[test]
    fn the_report_names_keys_and_counts() {
        let r = Report {
            tables: vec![TableResult {
                target: "billing".into(),
                table: TableName::parse("claims").unwrap(),
                diff: TableDiff {
                    source_rows: 10,
                    target_rows: 9,
                    missing: vec!["7".into()],
                    extra: vec![],
                    different: vec!["3".into()],
                    counts: (1, 0, 1),
                },
            }],
            ..Report::default()
        };
        assert!(r.differs());
        let text = r.text();
        assert!(text.contains("target billing: public.claims: DIFFERS: source 10 rows, target 9 rows; 1 missing, 0 extra, 1 different"), "{text}");
        assert!(text.contains("missing keys: 7") && text.contains("different keys: 3"));
        assert_eq!(r.json()["tables"][0]["missing"]["count"], 1);
    }
}
