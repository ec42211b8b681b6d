//! The queue from the reader to one apply task: bounded by row changes in memory, and spilling
//! to the target's spool on disk while the target does not take what it is sent.
//!
//! # Why changes, not messages
//! A bound in messages cannot serve both shapes of traffic: for bulk transactions a message is a
//! chunk of thousands of changes, for single-row transactions it is one change, and a small
//! message bound starves group commit. Each message weighs the number of changes it carries (at
//! least 1); at most `apply.queue_changes` wait in memory.
//!
//! # When the reader waits, and when it spools
//! With memory full, the reader waits (backpressure to the slot) as long as the target is
//! taking: a target slower than the source sets the pace, as it must. It stops waiting and
//! appends to the target's spool ([`super::spool`]) once the target is *sick*: it said it is
//! stalled (a rejected change, waiting to retry), or it has taken nothing for `apply.stall_secs`
//! while work waited (a lock, a dead connection). From then on every message goes to the spool
//! until the apply task has read it all back, so order is kept: memory holds the oldest
//! messages, the spool the newer ones. Control messages (barriers, halts) are never refused.
//! A spool only helps while some other target takes its share: when none does, the reader
//! waits instead (the caller says which, `others_live`).
//!
//! # Detached
//! A spool that reaches `apply.spool_max_bytes` (or that the file system refuses) detaches the
//! target: every later chunk is dropped (barriers and halts are not), and the reader, told so, counts the target as pending
//! at what it holds (the slot keeps the rest) until it rejoins by one stream restart, whose
//! barrier ends the detachment. What was queued before the drop is still applied.
//!
//! # Barriers to a stalled target
//! A barrier is answered by the apply task when it reaches it, so what was before it is settled.
//! A task that is stalled does not take messages; it answers pending barriers at once with what
//! is durable ([`QueueRx::answer_barriers`]), and the barrier stays in place as the separator
//! between what was sent before a stream restart and after.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{oneshot, Notify};

use super::record::{self, Record, Registry};
use super::spool::{SpoolError, SpoolReader, SpoolWriter};
use crate::link::ApplyMsg;
use crate::lsn::Lsn;

/// Where and how much a target may spool.
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    /// The spool folder (created 0700).
    pub dir: PathBuf,
    /// The file's name (the target's name).
    pub target: String,
    /// The bound, bytes.
    pub max_bytes: u64,
    /// How long a target may take nothing while work waits before it is spooled for.
    pub stall: Duration,
}

/// What became of a message offered to the queue.
#[derive(Debug)]
pub enum Push {
    /// In memory.
    Queued,
    /// In the spool.
    Spooled,
    /// Dropped: the target is detached. `first` when this message detached it.
    Dropped {
        /// This message detached the target.
        first: bool,
        /// Why (value-free).
        reason: String,
    },
    /// Memory is full and the target is taking: offer it again after [`QueueTx::changed`] or
    /// at the instant given (when the target would count as sick).
    Wait(ApplyMsg, Option<Instant>),
    /// The apply task is gone.
    Closed,
}

struct Disk {
    writer: SpoolWriter,
    reader: SpoolReader,
    registry: Registry,
    /// Records written and not read back yet.
    records: u64,
}

struct Inner {
    mem: VecDeque<(ApplyMsg, u32)>,
    mem_weight: u32,
    capacity: u32,
    spool: Option<SpoolSettings>,
    disk: Option<Disk>,
    detached: bool,
    stalled: bool,
    /// Since when the target has had work without taking any (reset on every take, and when
    /// work arrives in an empty queue).
    waiting_since: Instant,
    tx_closed: bool,
    rx_closed: bool,
    next_seq: u64,
    /// Replies of the barriers in the spool, by sequence number.
    replies: HashMap<u64, oneshot::Sender<Lsn>>,
    /// The newest halt queued, for a stalled task to see at once.
    halt: Option<String>,
    /// Barriers queued in memory whose reply was not sent yet.
    unanswered: usize,
    /// Why the spool could not be read back, until the task hears it.
    lost: Option<String>,
    buf: BytesMut,
}

struct Shared {
    inner: Mutex<Inner>,
    to_reader: Notify,
    to_apply: Notify,
    /// A barrier or halt was queued, or the reader left (what a stalled task waits for).
    control: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Marks the queue closed when the last [`QueueTx`] clone goes.
struct TxOwner(Arc<Shared>);

impl Drop for TxOwner {
    fn drop(&mut self) {
        self.0.lock().tx_closed = true;
        self.0.to_apply.notify_one();
        self.0.control.notify_one();
    }
}

/// The reader's end.
#[derive(Clone)]
pub struct QueueTx {
    shared: Arc<Shared>,
    _owner: Arc<TxOwner>,
}

/// The apply task's end.
pub struct QueueRx {
    shared: Arc<Shared>,
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        self.shared.lock().rx_closed = true;
        self.shared.to_reader.notify_one();
    }
}

/// The apply task is gone.
#[derive(Debug)]
pub struct Closed;

/// A queue holding at most `capacity` changes in memory (a message heavier than that still
/// fits alone), spooling as the module docs say when `spool` is given.
pub fn channel(capacity: usize, spool: Option<SpoolSettings>) -> (QueueTx, QueueRx) {
    let capacity = u32::try_from(capacity.max(1)).unwrap_or(u32::MAX >> 4);
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            mem: VecDeque::new(),
            mem_weight: 0,
            capacity,
            spool,
            disk: None,
            detached: false,
            stalled: false,
            waiting_since: Instant::now(),
            tx_closed: false,
            rx_closed: false,
            next_seq: 0,
            replies: HashMap::new(),
            halt: None,
            unanswered: 0,
            lost: None,
            buf: BytesMut::new(),
        }),
        to_reader: Notify::new(),
        to_apply: Notify::new(),
        control: Notify::new(),
    });
    (
        QueueTx {
            shared: shared.clone(),
            _owner: Arc::new(TxOwner(shared.clone())),
        },
        QueueRx { shared },
    )
}

/// How much of the memory bound a message takes.
fn weight(msg: &ApplyMsg, capacity: u32) -> u32 {
    let n = match msg {
        ApplyMsg::Chunk { changes, .. } => changes.len(),
        ApplyMsg::Barrier(_) | ApplyMsg::Halt(_) => 1,
    };
    u32::try_from(n).unwrap_or(u32::MAX).clamp(1, capacity)
}

impl Inner {
    fn sick(&self, now: Instant) -> bool {
        let stall = self.spool.as_ref().map(|s| s.stall);
        self.stalled
            || stall.is_some_and(|s| now.saturating_duration_since(self.waiting_since) >= s)
    }

    /// Appends to the spool, opening it if needed. Control messages pass the bound.
    fn spool(&mut self, msg: ApplyMsg) -> Result<(), String> {
        let settings = self.spool.as_ref().ok_or("no spool is configured")?;
        if self.disk.is_none() {
            let writer = SpoolWriter::create(&settings.dir, &settings.target, settings.max_bytes)
                .map_err(|e| {
                format!("cannot create the spool in {}: {e}", settings.dir.display())
            })?;
            let reader = writer
                .reader()
                .map_err(|e| format!("cannot read the spool: {e}"))?;
            self.disk = Some(Disk {
                writer,
                reader,
                registry: Registry::default(),
                records: 0,
            });
        }
        let disk = self.disk.as_mut().expect("opened above");
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let control = match msg {
            ApplyMsg::Chunk {
                xact,
                changes,
                commit,
            } => {
                record::encode_chunk(&xact, &changes, commit, &mut disk.registry, &mut buf);
                false
            }
            ApplyMsg::Barrier(reply) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.replies.insert(seq, reply);
                record::encode_barrier(seq, &mut buf);
                true
            }
            ApplyMsg::Halt(reason) => {
                record::encode_halt(&reason, &mut buf);
                true
            }
        };
        let r = disk.writer.append(&buf, control);
        self.buf = buf;
        match r {
            Ok(_) => {
                disk.records += 1;
                Ok(())
            }
            Err(SpoolError::Full { max }) => Err(format!(
                "its spool reached apply.spool_max_bytes ({max} bytes)"
            )),
            Err(SpoolError::Io(e)) => Err(format!("writing its spool failed: {e}")),
        }
    }

    fn take(&mut self) -> Result<Option<ApplyMsg>, String> {
        if let Some((msg, w)) = self.mem.pop_front() {
            self.mem_weight -= w;
            // (One answered already carries a reply nobody waits for: it was not counted.)
            if matches!(&msg, ApplyMsg::Barrier(reply) if !reply.is_closed()) {
                self.unanswered = self.unanswered.saturating_sub(1);
            }
            self.waiting_since = Instant::now();
            return Ok(Some(msg));
        }
        let Some(disk) = self.disk.as_mut() else {
            return Ok(None);
        };
        if disk.records == 0 {
            // Read back whole: memory takes new messages again (the file goes with its writer).
            self.disk = None;
            return Ok(None);
        }
        let read = |disk: &mut Disk| disk.reader.next_message().map_err(|e| e.to_string());
        let frame = match read(disk)? {
            Some(f) => f,
            None => {
                disk.writer.flush().map_err(|e| e.to_string())?;
                read(disk)?.ok_or("a spooled record is missing")?
            }
        };
        disk.records -= 1;
        self.waiting_since = Instant::now();
        Ok(Some(
            match record::decode(frame, &disk.registry).map_err(|e| e.to_string())? {
                Record::Msg(m) => m,
                // Answered already while the task was stalled: a reply nobody waits for.
                Record::Barrier(seq) => ApplyMsg::Barrier(
                    self.replies
                        .remove(&seq)
                        .unwrap_or_else(|| oneshot::channel().0),
                ),
            },
        ))
    }
}

impl QueueTx {
    /// Offers a message: queued, spooled, dropped (detached), or to wait (see [`Push`]).
    /// `others_live`: some other target takes its share now; when none does, a spool would
    /// help nobody, and the reader waits (backpressure to the slot).
    pub fn try_push(&self, msg: ApplyMsg, others_live: bool) -> Push {
        let mut g = self.shared.lock();
        if g.rx_closed {
            return Push::Closed;
        }
        let control = !matches!(msg, ApplyMsg::Chunk { .. });
        if let ApplyMsg::Halt(reason) = &msg {
            g.halt = Some(reason.clone());
        }
        if g.detached {
            match msg {
                // A barrier: the stream restarts, and everything after it is sent again.
                ApplyMsg::Barrier(_) => g.detached = false,
                // A halt is never dropped: it must stop the target before it rejoins.
                ApplyMsg::Halt(_) => {}
                ApplyMsg::Chunk { .. } => {
                    return Push::Dropped {
                        first: false,
                        reason: "detached".into(),
                    }
                }
            }
        }
        let now = Instant::now();
        let pushed = if g.disk.is_some() {
            g.spool(msg).map(|()| Push::Spooled)
        } else {
            let w = weight(&msg, g.capacity);
            if control || g.mem_weight + w <= g.capacity || g.mem.is_empty() {
                if g.mem.is_empty() {
                    g.waiting_since = now;
                }
                if matches!(msg, ApplyMsg::Barrier(_)) {
                    g.unanswered += 1;
                }
                g.mem.push_back((msg, w));
                g.mem_weight += w;
                Ok(Push::Queued)
            } else if others_live && g.spool.is_some() && g.sick(now) {
                g.spool(msg).map(|()| Push::Spooled)
            } else {
                let at = g
                    .spool
                    .as_ref()
                    .filter(|_| !g.stalled && others_live)
                    .map(|s| g.waiting_since + s.stall);
                return Push::Wait(msg, at);
            }
        };
        drop(g);
        self.shared.to_apply.notify_one();
        if control {
            self.shared.control.notify_one();
        }
        match pushed {
            Ok(p) => p,
            Err(reason) => {
                self.shared.lock().detached = true;
                Push::Dropped {
                    first: true,
                    reason,
                }
            }
        }
    }

    /// Resolves when the apply task took something or changed state (after a [`Push::Wait`]).
    pub async fn changed(&self) {
        self.shared.to_reader.notified().await
    }

    /// The target does not take what it is sent (see the module docs), or is detached.
    pub fn is_sick(&self) -> bool {
        let g = self.shared.lock();
        g.detached || (!g.mem.is_empty() && g.sick(Instant::now())) || g.stalled
    }

    /// Dropping this target's chunks until the next barrier.
    pub fn is_detached(&self) -> bool {
        self.shared.lock().detached
    }

    /// Nothing waits, in memory or spooled.
    pub fn is_empty(&self) -> bool {
        let g = self.shared.lock();
        g.mem.is_empty() && g.disk.as_ref().is_none_or(|d| d.records == 0)
    }

    /// Bytes in the spool now (0 when not spooling).
    pub fn spooled_bytes(&self) -> u64 {
        let g = self.shared.lock();
        g.disk
            .as_ref()
            .map_or(0, |d| d.writer.end() - d.reader.offset())
    }
}

impl Inner {
    /// Takes the next message; a spool that cannot be read back detaches the target (what it
    /// held comes again from the slot) and its error waits for [`QueueRx::recv`].
    fn take_or_detach(&mut self) -> Option<ApplyMsg> {
        match self.take() {
            Ok(m) => m,
            Err(e) => {
                self.disk = None;
                self.detached = true;
                self.lost = Some(e);
                None
            }
        }
    }
}

impl QueueRx {
    /// The next message, or `None` once the reader is gone and nothing is left. An unreadable
    /// spool detaches the target (its error is returned once; the slot keeps what was lost).
    pub async fn recv(&mut self) -> Result<Option<ApplyMsg>, String> {
        loop {
            let notified = self.shared.to_apply.notified();
            {
                let mut g = self.shared.lock();
                let m = g.take_or_detach();
                if let Some(e) = g.lost.take() {
                    drop(g);
                    self.shared.to_reader.notify_one();
                    return Err(e);
                }
                match m {
                    Some(m) => {
                        drop(g);
                        self.shared.to_reader.notify_one();
                        return Ok(Some(m));
                    }
                    None if g.tx_closed => return Ok(None),
                    None => {}
                }
            }
            notified.await;
        }
    }

    /// The next message if one is waiting (an unreadable spool detaches the target and reads
    /// as nothing; the next `recv` says why).
    pub fn try_recv(&mut self) -> Option<ApplyMsg> {
        let m = self.shared.lock().take_or_detach();
        self.shared.to_reader.notify_one();
        m
    }

    /// Whether the apply task takes messages: a stalled task's share goes to the spool without
    /// the reader waiting.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.lock().stalled = stalled;
        self.shared.to_reader.notify_one();
    }

    /// Resolves when a barrier or a halt was queued, or the reader left.
    pub async fn control_changed(&self) {
        self.shared.control.notified().await
    }

    /// Answers every queued barrier with `durable` at once (for a stalled task); the barriers
    /// stay in place as separators.
    pub fn answer_barriers(&self, durable: Lsn) {
        let mut g = self.shared.lock();
        if g.unanswered > 0 {
            g.unanswered = 0;
            for (m, _) in g.mem.iter_mut() {
                if let ApplyMsg::Barrier(reply) = m {
                    let _ = std::mem::replace(reply, oneshot::channel().0).send(durable);
                }
            }
        }
        for (_, reply) in g.replies.drain() {
            let _ = reply.send(durable);
        }
    }

    /// The newest halt the reader queued, once.
    pub fn take_halt(&self) -> Option<String> {
        self.shared.lock().halt.take()
    }

    /// The reader is gone.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().tx_closed
    }
}

#[cfg(test)]
mod tests;
