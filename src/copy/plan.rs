//! What the copy does at this start, from what each target holds (pure).

use std::collections::HashMap;

use super::state::{State, TargetCopy};
use crate::lsn::Lsn;
use crate::table::TableName;

/// One owning target of a table to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Index of the target in configuration order.
    pub target: usize,
    /// The target table holds rows of an unfinished copy of ours: empty it first.
    pub redo: bool,
}

/// A table to copy, read once for all its owners that need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableJob {
    /// The routed table.
    pub table: TableName,
    /// Its owners that need the copy.
    pub owners: Vec<Owner>,
}

/// What the copy does at this start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyPlan {
    /// Tables to copy, in configuration order of their first owner.
    pub jobs: Vec<TableJob>,
    /// Per target: tables whose copy finished, with the snapshot position it is consistent
    /// with (the stream skips, for that table, what committed before it).
    pub copied_at: Vec<HashMap<TableName, Lsn>>,
    /// Per target: copies whose every chunk committed but whose table was not yet marked
    /// copied (a stop between the two): mark them, copy nothing.
    pub finish: Vec<Vec<TableName>>,
    /// Per target: tables taken as they are, without a copy (copying is off, or the target
    /// streamed them before copy state existed).
    pub take: Vec<Vec<TableName>>,
}

impl CopyPlan {
    /// The tables this start copies to target `i`.
    pub fn tables_of(&self, i: usize) -> Vec<TableName> {
        self.jobs
            .iter()
            .filter(|j| j.owners.iter().any(|o| o.target == i))
            .map(|j| j.table.clone())
            .collect()
    }

    /// Some table is to be copied.
    pub fn copies(&self) -> bool {
        !self.jobs.is_empty()
    }
}

/// One target's facts for the plan.
#[derive(Debug, Clone)]
pub struct TargetInput<'a> {
    /// Target name.
    pub name: &'a str,
    /// It holds streaming progress (`pgcarve.progress`).
    pub has_progress: bool,
    /// Its copy state and tables.
    pub copy: &'a TargetCopy,
}

/// Plans the copy, or lists every problem an operator must fix (nothing is written before).
pub fn plan(enabled: bool, targets: &[TargetInput<'_>]) -> Result<CopyPlan, Vec<String>> {
    let n = targets.len();
    let mut out = CopyPlan {
        jobs: Vec::new(),
        copied_at: vec![HashMap::new(); n],
        finish: vec![Vec::new(); n],
        take: vec![Vec::new(); n],
    };
    let mut problems = Vec::new();
    let mut job_of: HashMap<TableName, usize> = HashMap::new();
    for (ti, t) in targets.iter().enumerate() {
        for tc in &t.copy.tables {
            let need = |redo: bool, out: &mut CopyPlan, job_of: &mut HashMap<TableName, usize>| {
                let j = *job_of.entry(tc.table.clone()).or_insert_with(|| {
                    out.jobs.push(TableJob {
                        table: tc.table.clone(),
                        owners: Vec::new(),
                    });
                    out.jobs.len() - 1
                });
                out.jobs[j].owners.push(Owner { target: ti, redo });
            };
            match tc.state {
                Some(s) if s.is_done() => {
                    if let Some(lsn) = tc.lsn {
                        out.copied_at[ti].insert(tc.table.clone(), lsn);
                    }
                }
                Some(State::Copying)
                    if tc.lsn.is_some() && tc.chunks.is_some_and(|c| c == tc.chunks_done) =>
                {
                    out.finish[ti].push(tc.table.clone());
                    out.copied_at[ti].insert(tc.table.clone(), tc.lsn.unwrap_or(Lsn::ZERO));
                }
                Some(s) if enabled => {
                    let _ = s;
                    need(true, &mut out, &mut job_of);
                }
                Some(s) => problems.push(format!(
                    "target {}: table {} holds an unfinished copy (state {}): set copy.enabled = true to finish it, \
                     or empty the table and delete its row from pgcarve.copy_table",
                    t.name,
                    tc.table,
                    s.as_str()
                )),
                None if !enabled || (t.has_progress && !t.copy.known) => {
                    out.take[ti].push(tc.table.clone())
                }
                None if tc.has_rows => problems.push(format!(
                    "target {}: table {} already holds rows that pgcarve did not copy: empty it (TRUNCATE {}) so pgcarve copies it \
                     from the source, or set copy.enabled = false to stream into it as it is",
                    t.name,
                    tc.table,
                    tc.table.quoted()
                )),
                None => need(false, &mut out, &mut job_of),
            }
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::state::TableCopy;

    fn tc(name: &str, state: Option<State>, has_rows: bool) -> TableCopy {
        TableCopy {
            table: TableName::parse(name).unwrap(),
            state,
            lsn: state.map(|_| Lsn(100)),
            chunks: state.map(|_| 3),
            chunks_done: 1,
            rows_done: 10,
            has_rows,
            side: false,
        }
    }

    fn copy(known: bool, tables: Vec<TableCopy>) -> TargetCopy {
        TargetCopy { known, tables }
    }

    #[test]
    fn a_first_start_copies_every_empty_table_once_for_all_owners() {
        let a = copy(
            false,
            vec![tc("patients", None, false), tc("allergies", None, false)],
        );
        let b = copy(
            false,
            vec![tc("patients", None, false), tc("claims", None, false)],
        );
        let p = plan(
            true,
            &[
                TargetInput {
                    name: "patient",
                    has_progress: false,
                    copy: &a,
                },
                TargetInput {
                    name: "billing",
                    has_progress: false,
                    copy: &b,
                },
            ],
        )
        .unwrap();
        assert_eq!(p.jobs.len(), 3);
        assert_eq!(p.jobs[0].table.name, "patients");
        assert_eq!(
            p.jobs[0].owners,
            vec![
                Owner {
                    target: 0,
                    redo: false
                },
                Owner {
                    target: 1,
                    redo: false
                }
            ]
        );
        assert!(p.copied_at.iter().all(|m| m.is_empty()));
    }

    #[test]
    fn finished_tables_are_kept_and_unfinished_ones_redone() {
        let mut done = tc("patients", Some(State::Streaming), true);
        done.lsn = Some(Lsn(42));
        let mut all_chunks = tc("claims", Some(State::Copying), true);
        all_chunks.chunks_done = 3;
        let a = copy(
            true,
            vec![
                done,
                tc("allergies", Some(State::Copying), true),
                tc("notes", Some(State::Failed), true),
                all_chunks,
            ],
        );
        let p = plan(
            true,
            &[TargetInput {
                name: "patient",
                has_progress: true,
                copy: &a,
            }],
        )
        .unwrap();
        let names: Vec<_> = p.jobs.iter().map(|j| j.table.name.as_str()).collect();
        assert_eq!(names, ["allergies", "notes"]);
        assert!(p.jobs.iter().all(|j| j.owners
            == vec![Owner {
                target: 0,
                redo: true
            }]));
        assert_eq!(
            p.copied_at[0][&TableName::parse("patients").unwrap()],
            Lsn(42)
        );
        assert_eq!(p.finish[0], vec![TableName::parse("claims").unwrap()]);
    }

    #[test]
    fn a_table_with_rows_pgcarve_did_not_copy_is_refused() {
        let a = copy(
            true,
            vec![tc("patients", None, true), tc("claims", None, true)],
        );
        let e = plan(
            true,
            &[TargetInput {
                name: "patient",
                has_progress: false,
                copy: &a,
            }],
        )
        .unwrap_err();
        assert_eq!(e.len(), 2);
        assert!(
            e[0].contains("table public.patients already holds rows"),
            "{e:?}"
        );
    }

    #[test]
    fn targets_that_streamed_before_copy_state_existed_are_taken_as_they_are() {
        let a = copy(false, vec![tc("patients", None, true)]);
        let p = plan(
            true,
            &[TargetInput {
                name: "patient",
                has_progress: true,
                copy: &a,
            }],
        )
        .unwrap();
        assert!(p.jobs.is_empty());
        assert_eq!(p.take[0].len(), 1);
    }

    #[test]
    fn with_copying_off_tables_are_taken_but_an_unfinished_copy_is_refused() {
        let a = copy(true, vec![tc("patients", None, true)]);
        let p = plan(
            false,
            &[TargetInput {
                name: "patient",
                has_progress: false,
                copy: &a,
            }],
        )
        .unwrap();
        assert!(!p.copies());
        assert_eq!(p.take[0].len(), 1);
        let b = copy(true, vec![tc("patients", Some(State::Copying), true)]);
        let e = plan(
            false,
            &[TargetInput {
                name: "patient",
                has_progress: false,
                copy: &b,
            }],
        )
        .unwrap_err();
        assert!(e[0].contains("unfinished copy (state copying)"));
    }

    #[test]
    fn a_table_added_to_a_streaming_target_is_copied() {
        let mut done = tc("patients", Some(State::Streaming), true);
        done.lsn = None;
        let a = copy(true, vec![done, tc("allergies", None, false)]);
        let p = plan(
            true,
            &[TargetInput {
                name: "patient",
                has_progress: true,
                copy: &a,
            }],
        )
        .unwrap();
        assert_eq!(p.jobs.len(), 1);
        assert_eq!(
            p.jobs[0].owners,
            vec![Owner {
                target: 0,
                redo: false
            }]
        );
        assert!(p.copied_at[0].is_empty());
    }
}
