//! What the open target transaction was made of, kept so a retry needs nothing from the slot.
//!
//! A group (one target transaction, several source transactions) that fails is rolled back;
//! to try it again the task needs its changes again. It keeps the chunks it applied since the
//! last commit — the first `apply.retain_changes` changes in memory, the rest in a file beside
//! the spools (the same records, `link::record`) — and a retry applies them again before taking
//! new messages from its queue, so a retry restarts nothing that other targets share. Only when
//! that file cannot be written, or the target lost commits that had not reached its disk (a
//! crash of the target before its WAL flush), does the retry need the stream again from the
//! slot.

use std::collections::VecDeque;
use std::path::PathBuf;

use bytes::BytesMut;

use crate::link::record::{self, Record, Registry};
use crate::link::spool::{SpoolReader, SpoolWriter};
use crate::link::{ApplyMsg, Change, CommitInfo, XactInfo};
use crate::lsn::Lsn;

/// Where chunks beyond the memory limit go: a folder and the target's name.
pub(super) type Spill = Option<(PathBuf, String)>;

struct KeptFile {
    writer: SpoolWriter,
    registry: Registry,
    records: u64,
}

/// The chunks of the open group, in order.
pub(super) struct Retained {
    mem: Vec<(XactInfo, Vec<Change>, Option<CommitInfo>)>,
    changes: usize,
    file: Option<KeptFile>,
    /// Every chunk since the last commit is kept (none was lost to a file error).
    complete: bool,
    /// What the target had committed when the group began.
    pub base: Lsn,
    limit: usize,
    spill: Spill,
    /// Numbers the files, so the next group's file never replaces one being read back.
    files: u64,
    buf: BytesMut,
}

/// Kept chunks handed back for a retry: memory first, then the file, then what an earlier
/// retry had not applied yet when it failed.
#[derive(Default)]
pub(super) struct Replay {
    mem: VecDeque<ApplyMsg>,
    file: Option<(SpoolReader, KeptFile)>,
    then: Option<Box<Replay>>,
    /// The file could not be read back whole: the rest must come from the slot.
    pub lost: bool,
}

impl Replay {
    /// The next kept chunk.
    pub fn pop_front(&mut self) -> Option<ApplyMsg> {
        if let Some(m) = self.own_next() {
            return Some(m);
        }
        if self.lost {
            return None;
        }
        let then = self.then.as_mut()?;
        let m = then.pop_front();
        if then.lost {
            self.lost = true;
        }
        if m.is_none() {
            self.then = None;
        }
        m
    }

    /// Nothing left to apply (the file, if any, read back whole).
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
            && self.file.as_ref().is_none_or(|(_, k)| k.records == 0)
            && self.then.as_ref().is_none_or(|t| t.is_empty())
    }

    /// Puts `rest` (what a failed retry had not applied yet) after this replay.
    pub fn followed_by(mut self, rest: Replay) -> Replay {
        if rest.lost {
            self.lost = true;
        } else if !rest.is_empty() {
            debug_assert!(self.then.is_none());
            self.then = Some(Box::new(rest));
        }
        self
    }

    fn own_next(&mut self) -> Option<ApplyMsg> {
        if let Some(m) = self.mem.pop_front() {
            return Some(m);
        }
        let (reader, kept) = self.file.as_mut()?;
        if kept.records == 0 {
            self.file = None; // removes the file
            return None;
        }
        let frame = match kept.writer.flush().and_then(|()| reader.next_message()) {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => return self.lose(),
        };
        kept.records -= 1;
        match record::decode(frame, &kept.registry) {
            Ok(Record::Msg(m @ ApplyMsg::Chunk { .. })) => Some(m),
            _ => self.lose(),
        }
    }

    fn lose(&mut self) -> Option<ApplyMsg> {
        self.file = None;
        self.lost = true;
        None
    }
}

impl Retained {
    /// Nothing kept yet; the target holds `committed`.
    pub fn new(committed: Lsn, limit: usize, spill: Spill) -> Retained {
        Retained {
            mem: Vec::new(),
            changes: 0,
            file: None,
            complete: true,
            base: committed,
            limit,
            spill,
            files: 0,
            buf: BytesMut::new(),
        }
    }

    /// Keeps a copy of a chunk about to be applied (values are shared, not copied).
    pub fn keep(&mut self, xact: &XactInfo, changes: &[Change], commit: Option<CommitInfo>) {
        if !self.complete {
            return;
        }
        self.changes += changes.len();
        if self.changes <= self.limit && self.file.is_none() {
            self.mem.push((*xact, changes.to_vec(), commit));
            return;
        }
        // (A file error: it names the file, never a value.)
        if let Err(reason) = self.keep_in_file(xact, changes, commit) {
            tracing::warn!(
                "cannot keep the open group's changes on disk ({reason}); should it fail, its retry reads it again from the slot"
            );
            self.file = None;
            self.mem = Vec::new();
            self.complete = false;
        }
    }

    fn keep_in_file(
        &mut self,
        xact: &XactInfo,
        changes: &[Change],
        commit: Option<CommitInfo>,
    ) -> Result<(), String> {
        if self.file.is_none() {
            let (dir, name) = self.spill.as_ref().ok_or("no spool folder")?;
            self.files += 1;
            let writer = SpoolWriter::create(dir, &format!("{name}.kept{}", self.files), u64::MAX)
                .map_err(|e| e.to_string())?;
            self.file = Some(KeptFile {
                writer,
                registry: Registry::default(),
                records: 0,
            });
        }
        let kept = self.file.as_mut().expect("opened above");
        self.buf.clear();
        record::encode_chunk(xact, changes, commit, &mut kept.registry, &mut self.buf);
        kept.writer
            .append(&self.buf, true)
            .map_err(|e| e.to_string())?;
        kept.records += 1;
        Ok(())
    }

    /// The group committed (or was given up for a fresh stream): start again at `committed`.
    pub fn reset(&mut self, committed: Lsn) {
        self.mem.clear();
        self.file = None;
        self.changes = 0;
        self.complete = true;
        self.base = committed;
    }

    /// Whether a retry can apply the failed group from here: all of it is kept, and the target
    /// still holds what it had when the group began (`reloaded` is its progress now).
    pub fn covers(&self, reloaded: Lsn) -> bool {
        self.complete && reloaded >= self.base
    }

    /// Whether every chunk since the last commit is kept.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// Gives up what is kept: the retry reads it from the slot.
    pub fn give_up(&mut self) {
        self.reset(self.base);
        self.complete = false;
    }

    /// Hands the chunks over for the retry, oldest first, and starts again at `committed`.
    pub fn take(&mut self, committed: Lsn) -> Replay {
        let mem = std::mem::take(&mut self.mem)
            .into_iter()
            .map(|(xact, changes, commit)| ApplyMsg::Chunk {
                xact,
                changes,
                commit,
            })
            .collect();
        let mut lost = false;
        let file = self
            .file
            .take()
            .and_then(|kept| match kept.writer.reader() {
                Ok(reader) => Some((reader, kept)),
                Err(_) => {
                    // The rest of the group is in the slot only.
                    lost = true;
                    None
                }
            });
        self.reset(committed);
        Replay {
            mem,
            file,
            then: None,
            lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xact(lsn: u64) -> XactInfo {
        XactInfo {
            final_lsn: Lsn(lsn),
            commit_time: 0,
            xid: 1,
        }
    }

    fn inserts(n: usize) -> Vec<Change> {
        let rel = crate::link::change::test_relation("t", 0);
        (0..n)
            .map(|_| Change::Insert {
                rel: rel.clone(),
                new: Default::default(),
            })
            .collect()
    }

    fn lsns(mut r: Replay) -> Vec<(u64, usize, bool)> {
        std::iter::from_fn(|| r.pop_front())
            .map(|m| match m {
                ApplyMsg::Chunk {
                    xact,
                    changes,
                    commit,
                } => (xact.final_lsn.0, changes.len(), commit.is_some()),
                _ => panic!("only chunks are kept"),
            })
            .collect()
    }

    #[test]
    fn a_retry_gets_the_group_back_in_order() {
        let mut r = Retained::new(Lsn(10), 100, None);
        r.keep(&xact(20), &[], None);
        r.keep(&xact(20), &[], Some(CommitInfo { end_lsn: Lsn(21) }));
        r.keep(&xact(30), &[], Some(CommitInfo { end_lsn: Lsn(31) }));
        assert!(r.covers(Lsn(10)));
        assert!(
            r.covers(Lsn(21)),
            "a lost COMMIT answer: more is there, skipped"
        );
        assert!(
            !r.covers(Lsn(5)),
            "the target lost commits: the slot must send again"
        );
        assert_eq!(
            lsns(r.take(Lsn(10))),
            vec![(20, 0, false), (20, 0, true), (30, 0, true)]
        );
        assert!(lsns(r.take(Lsn(10))).is_empty());
    }

    #[test]
    fn beyond_the_memory_limit_chunks_are_kept_on_disk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Some((dir.path().to_path_buf(), "billing".to_string()));
        let mut r = Retained::new(Lsn(0), 5, spill);
        r.keep(&xact(1), &inserts(3), None);
        r.keep(&xact(1), &inserts(3), None);
        r.keep(&xact(1), &inserts(2), Some(CommitInfo { end_lsn: Lsn(2) }));
        r.keep(&xact(3), &inserts(1), Some(CommitInfo { end_lsn: Lsn(4) }));
        assert!(r.complete() && r.covers(Lsn(0)));
        let file = dir.path().join("billing.kept1.spool");
        assert!(file.exists());
        let replay = r.take(Lsn(0));
        // While the kept chunks are read back, the retry's own copies go to another file.
        r.keep(&xact(1), &inserts(6), None);
        assert!(dir.path().join("billing.kept2.spool").exists());
        assert_eq!(
            lsns(replay),
            vec![(1, 3, false), (1, 3, false), (1, 2, true), (3, 1, true)]
        );
        assert!(!file.exists(), "read back whole: removed");
        r.reset(Lsn(4));
        assert!(!dir.path().join("billing.kept2.spool").exists());
    }

    #[test]
    fn a_retry_that_fails_early_keeps_what_it_had_not_applied_yet() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Some((dir.path().to_path_buf(), "t".to_string()));
        let mut r = Retained::new(Lsn(0), 2, spill);
        for lsn in [10, 20, 30] {
            r.keep(
                &xact(lsn),
                &inserts(1),
                Some(CommitInfo {
                    end_lsn: Lsn(lsn + 1),
                }),
            );
        }
        let mut first = r.take(Lsn(0));
        // The retry applies (and keeps) the first transaction, then fails on it again.
        let m = first.pop_front().unwrap();
        let ApplyMsg::Chunk {
            xact: x,
            changes,
            commit,
        } = &m
        else {
            panic!()
        };
        r.keep(x, changes, *commit);
        // The next retry: what was applied again, then what the failed one never reached.
        let second = r.take(Lsn(0)).followed_by(first);
        assert_eq!(
            lsns(second),
            vec![(10, 1, true), (20, 1, true), (30, 1, true)]
        );
    }

    #[test]
    fn a_kept_file_that_cannot_be_opened_again_is_lost_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Some((dir.path().to_path_buf(), "t".to_string()));
        let mut r = Retained::new(Lsn(0), 1, spill);
        r.keep(&xact(1), &inserts(1), None);
        r.keep(&xact(1), &inserts(1), Some(CommitInfo { end_lsn: Lsn(2) }));
        std::fs::remove_file(dir.path().join("t.kept1.spool")).unwrap();
        let mut replay = r.take(Lsn(0));
        assert!(replay.pop_front().is_some(), "the part in memory");
        assert!(replay.pop_front().is_none());
        assert!(replay.lost, "the rest must come from the slot");
    }

    #[test]
    fn without_a_place_on_disk_a_large_group_is_not_kept() {
        let mut r = Retained::new(Lsn(0), 5, None);
        r.keep(&xact(1), &inserts(3), None);
        assert!(r.complete());
        r.keep(&xact(1), &inserts(3), None);
        assert!(!r.complete() && !r.covers(Lsn(0)));
        r.reset(Lsn(2));
        assert!(r.complete() && r.covers(Lsn(2)));
    }
}
