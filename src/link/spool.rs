//! A target's spool: an append-only file holding that target's share of the stream while it
//! cannot take it live (failed, retrying, or not draining its queue), read back to catch up.
//!
//! This is the file format and its two ends; the reader appends, the target's catch-up reads.
//! What goes in is the raw pgoutput messages (Begin, Relation, the target's row changes,
//! Commit) exactly as the source sent them, so catching up decodes and assembles them with the
//! same code as the live stream, and the format needs no second encoder.
//!
//! ```text
//!  file:  [u32 length][pgoutput message] [u32 length][pgoutput message] …
//! ```
//!
//! Rules (see DESIGN.md, "A failing, hung or slow target"):
//! - It holds row data: the folder is created 0700 and the file 0600, and the file is removed
//!   when its writer is dropped.
//! - It is a cache, not state: after a crash every spool is discarded ([`discard_stale`]) and
//!   the slot, held back by the target, replays; the target skips what it holds.
//! - It is bounded ([`SpoolError::Full`]): a target whose spool overflows is detached and rejoins
//!   from the slot.
//! - Frames are appended whole and flushed before a reader is told about them, so a reader
//!   never sees half a frame; a short tail can only come from a crash, and reads as the end.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// The file name suffix of spools.
const SUFFIX: &str = "spool";

/// Bytes of a frame's length prefix.
const FRAME_HEADER: u64 = 4;

/// Why a message could not be spooled. Never carries message bytes.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool reached `apply.spool_max_bytes`.
    #[error("spool full ({max} bytes)")]
    Full {
        /// The bound.
        max: u64,
    },
    /// The file system refused.
    #[error("spool file: {0}")]
    Io(#[from] io::Error),
}

/// The appending end of one target's spool.
pub struct SpoolWriter {
    path: PathBuf,
    file: BufWriter<File>,
    end: u64,
    max_bytes: u64,
    /// A write failed part-way: what follows the last whole frame is not a frame.
    broken: bool,
}

/// Where target `target`'s spool lives in `dir`.
pub fn spool_path(dir: &Path, target: &str) -> PathBuf {
    dir.join(format!("{target}.{SUFFIX}"))
}

/// Removes every spool left in `dir` by an earlier run (they are caches; the slot replays).
/// Returns how many were removed.
pub fn discard_stale(dir: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == SUFFIX) {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl SpoolWriter {
    /// Creates (or empties) target `target`'s spool in `dir`, which is created 0700 if needed.
    pub fn create(dir: &Path, target: &str, max_bytes: u64) -> io::Result<SpoolWriter> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let path = spool_path(dir, target);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        Ok(SpoolWriter {
            path,
            file: BufWriter::with_capacity(256 * 1024, file),
            end: 0,
            max_bytes,
            broken: false,
        })
    }

    /// Appends one message; returns the offset after it. Refuses when the spool would pass
    /// its bound (nothing is written then), unless `force` (small control records, which must
    /// never be refused).
    pub fn append(&mut self, msg: &[u8], force: bool) -> Result<u64, SpoolError> {
        let len = u32::try_from(msg.len()).map_err(|_| SpoolError::Full {
            max: self.max_bytes,
        })?;
        let next = self.end + FRAME_HEADER + u64::from(len);
        if next > self.max_bytes && !force {
            return Err(SpoolError::Full {
                max: self.max_bytes,
            });
        }
        if self.broken {
            return Err(SpoolError::Io(io::Error::other("an earlier write failed")));
        }
        let written = self
            .file
            .write_all(&len.to_be_bytes())
            .and_then(|()| self.file.write_all(msg));
        if let Err(e) = written {
            // Part of a frame may be in the file: no frame may follow it.
            self.broken = true;
            return Err(SpoolError::Io(e));
        }
        self.end = next;
        Ok(next)
    }

    /// Makes everything appended readable by [`SpoolReader`]s.
    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }

    /// The offset after the last message appended.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// A reader from the start of the spool.
    pub fn reader(&self) -> io::Result<SpoolReader> {
        Ok(SpoolReader {
            file: File::open(&self.path)?,
            offset: 0,
        })
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        // It holds row data: never leave it behind.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The reading end of a spool.
pub struct SpoolReader {
    file: File,
    offset: u64,
}

impl SpoolReader {
    /// The next message, or `None` at the end of what was flushed so far (more may come).
    pub fn next_message(&mut self) -> io::Result<Option<Bytes>> {
        let mut header = [0u8; FRAME_HEADER as usize];
        if !self.read_whole(&mut header)? {
            return Ok(None);
        }
        let len = u32::from_be_bytes(header) as usize;
        let mut msg = vec![0u8; len];
        if !self.read_whole(&mut msg)? {
            // Only a crash leaves a torn frame, and spools do not outlive one: the end.
            self.file.seek(SeekFrom::Start(self.offset))?;
            return Ok(None);
        }
        self.offset += FRAME_HEADER + len as u64;
        Ok(Some(Bytes::from(msg)))
    }

    /// The offset after the last message read.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Fills `buf` from the file; `false` (and the position restored) when it ends first.
    fn read_whole(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let start = self.file.stream_position()?;
        let mut filled = 0;
        while filled < buf.len() {
            match self.file.read(&mut buf[filled..])? {
                0 => {
                    self.file.seek(SeekFrom::Start(start))?;
                    return Ok(false);
                }
                n => filled += n,
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_come_back_in_order_also_those_appended_while_reading() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::create(dir.path(), "patient", 1 << 20).unwrap();
        w.append(b"B first", false).unwrap();
        w.append(b"", false).unwrap();
        w.flush().unwrap();
        let mut r = w.reader().unwrap();
        assert_eq!(r.next_message().unwrap().as_deref(), Some(&b"B first"[..]));
        assert_eq!(r.next_message().unwrap().as_deref(), Some(&b""[..]));
        assert_eq!(r.next_message().unwrap(), None, "the end, for now");
        w.append(b"C later", false).unwrap();
        assert_eq!(r.next_message().unwrap(), None, "not flushed yet");
        w.flush().unwrap();
        assert_eq!(r.next_message().unwrap().as_deref(), Some(&b"C later"[..]));
        assert_eq!(r.offset(), w.end());
    }

    #[test]
    fn the_bound_refuses_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::create(dir.path(), "t", 20).unwrap();
        assert_eq!(w.append(&[1; 10], false).unwrap(), 14);
        assert!(matches!(
            w.append(&[2; 3], false),
            Err(SpoolError::Full { max: 20 })
        ));
        assert_eq!(w.end(), 14);
        assert_eq!(
            w.append(&[9; 2], true).unwrap(),
            20,
            "control records pass the bound"
        );
        w.flush().unwrap();
        let mut r = w.reader().unwrap();
        assert_eq!(r.next_message().unwrap().unwrap().len(), 10);
        assert_eq!(r.next_message().unwrap().unwrap().len(), 2);
        assert_eq!(r.next_message().unwrap(), None);
    }

    #[test]
    fn private_files_removed_when_done_and_stale_ones_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let w = SpoolWriter::create(&state, "billing", 1 << 20).unwrap();
        let path = spool_path(&state, "billing");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&path), 0o600);
        drop(w);
        assert!(
            !path.exists(),
            "a spool holds row data: removed with its writer"
        );
        std::fs::write(spool_path(&state, "old"), b"x").unwrap();
        std::fs::write(state.join("keep.toml"), b"x").unwrap();
        assert_eq!(discard_stale(&state).unwrap(), 1);
        assert!(state.join("keep.toml").exists());
        assert_eq!(discard_stale(&dir.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn a_torn_tail_reads_as_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::create(dir.path(), "t", 1 << 20).unwrap();
        w.append(b"whole", false).unwrap();
        w.flush().unwrap();
        // A crash in the middle of a frame: a header promising more than there is.
        let mut f = OpenOptions::new()
            .append(true)
            .open(spool_path(dir.path(), "t"))
            .unwrap();
        f.write_all(&100u32.to_be_bytes()).unwrap();
        f.write_all(b"half").unwrap();
        let mut r = w.reader().unwrap();
        assert_eq!(r.next_message().unwrap().as_deref(), Some(&b"whole"[..]));
        assert_eq!(r.next_message().unwrap(), None);
        assert_eq!(r.offset(), 9);
    }

    proptest! {
        #[test]
        fn any_messages_round_trip(msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut w = SpoolWriter::create(dir.path(), "t", u64::MAX).unwrap();
            for m in &msgs {
                w.append(m, false).unwrap();
            }
            w.flush().unwrap();
            let mut r = w.reader().unwrap();
            for m in &msgs {
                let got = r.next_message().unwrap();
                prop_assert_eq!(got.as_deref(), Some(&m[..]));
            }
            prop_assert_eq!(r.next_message().unwrap(), None);
        }
    }
}
