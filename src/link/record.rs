//! How an [`ApplyMsg`] is written into a spool frame and read back.
//!
//! Row changes are written as pgoutput messages (the tested encoder and decoder, so the spool
//! needs no second tuple format), with one difference: where pgoutput puts a relation's OID,
//! a record puts the relation's index in the spool's [`Registry`]. A relation may be described
//! anew (a new generation, same OID) while a spool holds changes of the old description; the
//! registry keeps each description's `Arc`, so every change comes back with exactly the
//! description it left with.
//!
//! ```text
//!  chunk:   'C' final_lsn:u64 commit_time:i64 xid:u32 has_commit:u8 end_lsn:u64 n:u32
//!               n × (len:u32, pgoutput Insert/Update/Delete/Truncate)
//!  barrier: 'B' seq:u64        (the reply waits in memory, under `seq`)
//!  halt:    'H' reason (UTF-8; a value-free message)
//! ```
//!
//! The reason and the registry are the only things besides row values; a record is never
//! logged, and an error reading one names the offset, not the content.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{ApplyMsg, Change, CommitInfo, RelationInfo, XactInfo};
use crate::lsn::Lsn;
use crate::pgoutput::{self, Delete, Insert, Message, Truncate, Update};

const CHUNK: u8 = b'C';
const BARRIER: u8 = b'B';
const HALT: u8 = b'H';

/// The relation descriptions a spool's records refer to, by index.
#[derive(Default)]
pub struct Registry {
    rels: Vec<Arc<RelationInfo>>,
    index: HashMap<*const RelationInfo, u32>,
}

// The raw pointers are only identities of `Arc`s the registry itself holds.
unsafe impl Send for Registry {}
unsafe impl Sync for Registry {}

impl Registry {
    fn id(&mut self, rel: &Arc<RelationInfo>) -> u32 {
        let key = Arc::as_ptr(rel);
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        let i = u32::try_from(self.rels.len()).expect("fewer than 2^32 relations");
        self.rels.push(rel.clone());
        self.index.insert(key, i);
        i
    }

    fn get(&self, id: u32) -> Result<Arc<RelationInfo>, RecordError> {
        self.rels
            .get(id as usize)
            .cloned()
            .ok_or(RecordError("a change names an unknown relation index"))
    }

    /// Forgets every description (the spool is empty).
    pub fn clear(&mut self) {
        self.rels.clear();
        self.index.clear();
    }
}

/// A record that cannot be read back (a bug or a damaged file). Names no content.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("spool record: {0}")]
pub struct RecordError(&'static str);

/// What a record holds besides a chunk: the barrier's sequence number or the halt reason.
#[derive(Debug)]
pub enum Record {
    /// A chunk, whole.
    Msg(ApplyMsg),
    /// A barrier; its reply is kept in memory under this number.
    Barrier(u64),
}

/// Writes a chunk record.
pub fn encode_chunk(
    xact: &XactInfo,
    changes: &[Change],
    commit: Option<CommitInfo>,
    registry: &mut Registry,
    out: &mut BytesMut,
) {
    out.put_u8(CHUNK);
    out.put_u64(xact.final_lsn.0);
    out.put_i64(xact.commit_time);
    out.put_u32(xact.xid);
    out.put_u8(u8::from(commit.is_some()));
    out.put_u64(commit.map_or(0, |c| c.end_lsn.0));
    out.put_u32(u32::try_from(changes.len()).expect("a chunk holds fewer than 2^32 changes"));
    let mut msg = BytesMut::new();
    for c in changes {
        msg.clear();
        pgoutput::encode(&as_message(c, registry), false, &mut msg);
        out.put_u32(u32::try_from(msg.len()).expect("a change under 4 GiB"));
        out.put_slice(&msg);
    }
}

/// Writes a barrier record.
pub fn encode_barrier(seq: u64, out: &mut BytesMut) {
    out.put_u8(BARRIER);
    out.put_u64(seq);
}

/// Writes a halt record.
pub fn encode_halt(reason: &str, out: &mut BytesMut) {
    out.put_u8(HALT);
    out.put_slice(reason.as_bytes());
}

fn as_message(c: &Change, registry: &mut Registry) -> Message {
    match c {
        Change::Insert { rel, new } => Message::Insert(Insert {
            xid: None,
            relation: registry.id(rel),
            new: new.clone(),
        }),
        Change::Update { rel, old, new } => Message::Update(Update {
            xid: None,
            relation: registry.id(rel),
            old: old.clone(),
            new: new.clone(),
        }),
        Change::Delete { rel, old } => Message::Delete(Delete {
            xid: None,
            relation: registry.id(rel),
            old: old.clone(),
        }),
        Change::Truncate {
            rels,
            cascade,
            restart_identity,
        } => Message::Truncate(Truncate {
            xid: None,
            options: if *cascade {
                pgoutput::TRUNCATE_CASCADE
            } else {
                0
            } | if *restart_identity {
                pgoutput::TRUNCATE_RESTART_IDENTITY
            } else {
                0
            },
            relations: rels.iter().map(|r| registry.id(r)).collect(),
        }),
    }
}

/// Reads a record back.
pub fn decode(mut buf: Bytes, registry: &Registry) -> Result<Record, RecordError> {
    let short = RecordError("record ends early");
    if buf.is_empty() {
        return Err(short);
    }
    match buf.get_u8() {
        CHUNK => {
            if buf.remaining() < 8 + 8 + 4 + 1 + 8 + 4 {
                return Err(short);
            }
            let xact = XactInfo {
                final_lsn: Lsn(buf.get_u64()),
                commit_time: buf.get_i64(),
                xid: buf.get_u32(),
            };
            let has_commit = buf.get_u8() != 0;
            let end_lsn = Lsn(buf.get_u64());
            let n = buf.get_u32() as usize;
            let mut changes = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                if buf.remaining() < 4 {
                    return Err(short);
                }
                let len = buf.get_u32() as usize;
                if buf.remaining() < len {
                    return Err(short);
                }
                let msg = pgoutput::decode(buf.split_to(len), false)
                    .map_err(|_| RecordError("a change does not decode"))?;
                changes.push(as_change(msg, registry)?);
            }
            Ok(Record::Msg(ApplyMsg::Chunk {
                xact,
                changes,
                commit: has_commit.then_some(CommitInfo { end_lsn }),
            }))
        }
        BARRIER => {
            if buf.remaining() < 8 {
                return Err(short);
            }
            Ok(Record::Barrier(buf.get_u64()))
        }
        HALT => {
            let reason = String::from_utf8(buf.to_vec())
                .map_err(|_| RecordError("a halt reason is not UTF-8"))?;
            Ok(Record::Msg(ApplyMsg::Halt(reason)))
        }
        _ => Err(RecordError("unknown record kind")),
    }
}

fn as_change(msg: Message, registry: &Registry) -> Result<Change, RecordError> {
    Ok(match msg {
        Message::Insert(m) => Change::Insert {
            rel: registry.get(m.relation)?,
            new: m.new,
        },
        Message::Update(m) => Change::Update {
            rel: registry.get(m.relation)?,
            old: m.old,
            new: m.new,
        },
        Message::Delete(m) => Change::Delete {
            rel: registry.get(m.relation)?,
            old: m.old,
        },
        Message::Truncate(t) => Change::Truncate {
            rels: t
                .relations
                .iter()
                .map(|&r| registry.get(r))
                .collect::<Result<_, _>>()?,
            cascade: t.cascade(),
            restart_identity: t.options & pgoutput::TRUNCATE_RESTART_IDENTITY != 0,
        },
        _ => return Err(RecordError("a change is not a row change")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{OldKind, OldTuple, Tuple, Value};
    use proptest::prelude::*;

    fn rel(name: &str, generation: u64) -> Arc<RelationInfo> {
        crate::link::change::test_relation(name, generation)
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn a_chunk_comes_back_with_the_same_descriptions() {
        let (old, new) = (rel("patients", 1), rel("patients", 2));
        let tuple = Tuple(vec![text("7"), Value::Null, Value::Unchanged]);
        let changes = vec![
            Change::Insert {
                rel: old.clone(),
                new: tuple.clone(),
            },
            Change::Update {
                rel: new.clone(),
                old: Some(OldTuple {
                    kind: OldKind::Key,
                    tuple: tuple.clone(),
                }),
                new: tuple.clone(),
            },
            Change::Delete {
                rel: new.clone(),
                old: OldTuple {
                    kind: OldKind::Full,
                    tuple: tuple.clone(),
                },
            },
            Change::Truncate {
                rels: vec![old.clone(), new.clone()],
                cascade: true,
                restart_identity: false,
            },
        ];
        let xact = XactInfo {
            final_lsn: Lsn(100),
            commit_time: 5,
            xid: 9,
        };
        let mut reg = Registry::default();
        let mut out = BytesMut::new();
        encode_chunk(
            &xact,
            &changes,
            Some(CommitInfo { end_lsn: Lsn(120) }),
            &mut reg,
            &mut out,
        );
        let Record::Msg(ApplyMsg::Chunk {
            xact: x,
            changes: back,
            commit,
        }) = decode(out.freeze(), &reg).unwrap()
        else {
            panic!("a chunk")
        };
        assert_eq!((x.final_lsn, x.commit_time, x.xid), (Lsn(100), 5, 9));
        assert_eq!(commit.map(|c| c.end_lsn), Some(Lsn(120)));
        assert_eq!(back.len(), 4);
        let Change::Insert { rel: r, new: t } = &back[0] else {
            panic!()
        };
        assert!(Arc::ptr_eq(r, &old), "the old description, not the new one");
        assert_eq!(t, &tuple);
        let Change::Update { rel: r, old: o, .. } = &back[1] else {
            panic!()
        };
        assert!(Arc::ptr_eq(r, &new));
        assert_eq!(o.as_ref().map(|o| o.kind), Some(OldKind::Key));
        let Change::Truncate {
            rels,
            cascade,
            restart_identity,
        } = &back[3]
        else {
            panic!()
        };
        assert!(Arc::ptr_eq(&rels[0], &old) && Arc::ptr_eq(&rels[1], &new));
        assert!(*cascade && !*restart_identity);
    }

    #[test]
    fn barriers_and_halts_come_back() {
        let reg = Registry::default();
        let mut out = BytesMut::new();
        encode_barrier(42, &mut out);
        assert!(matches!(
            decode(out.split().freeze(), &reg),
            Ok(Record::Barrier(42))
        ));
        encode_halt("table patients was replaced", &mut out);
        assert!(matches!(
            decode(out.freeze(), &reg),
            Ok(Record::Msg(ApplyMsg::Halt(r))) if r == "table patients was replaced"
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_give_a_record_or_an_error_never_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..200)
        ) {
            let mut reg = Registry::default();
            reg.id(&rel("t", 0));
            let _ = decode(Bytes::from(bytes), &reg);
        }
    }
}
