//! Decoding: bytes of one XLogData payload to a [`Message`], every read checked.

use bytes::{Buf, Bytes};

use super::*;

/// Decodes one `pgoutput` message; `in_stream` says whether it arrived inside a streamed block.
pub fn decode(payload: Bytes, in_stream: bool) -> Result<Message, DecodeError> {
    let mut r = Cursor(payload);
    let tag = r.u8("message tag")?;
    let msg = match tag {
        TAG_BEGIN => Message::Begin(Begin {
            final_lsn: r.lsn("Begin final LSN")?,
            commit_time: r.i64("Begin commit time")?,
            xid: r.u32("Begin xid")?,
        }),
        TAG_COMMIT => Message::Commit(Commit {
            flags: r.u8("Commit flags")?,
            commit_lsn: r.lsn("Commit LSN")?,
            end_lsn: r.lsn("Commit end LSN")?,
            commit_time: r.i64("Commit time")?,
        }),
        TAG_ORIGIN => Message::Origin(Origin {
            commit_lsn: r.lsn("Origin commit LSN")?,
            name: r.string("Origin name")?,
        }),
        TAG_RELATION => Message::Relation(r.relation(in_stream)?),
        TAG_TYPE => Message::Type(TypeMessage {
            xid: r.xid(in_stream)?,
            oid: r.u32("Type oid")?,
            namespace: r.string("Type namespace")?,
            name: r.string("Type name")?,
        }),
        TAG_INSERT => {
            let xid = r.xid(in_stream)?;
            let relation = r.u32("Insert relation oid")?;
            r.marker(MARKER_NEW, "N")?;
            Message::Insert(Insert {
                xid,
                relation,
                new: r.tuple()?,
            })
        }
        TAG_UPDATE => Message::Update(r.update(in_stream)?),
        TAG_DELETE => {
            let xid = r.xid(in_stream)?;
            let relation = r.u32("Delete relation oid")?;
            let kind = match r.u8("Delete tuple marker")? {
                MARKER_KEY => OldKind::Key,
                MARKER_OLD => OldKind::Full,
                found => {
                    return Err(DecodeError::MissingMarker {
                        expected: "K or O",
                        found,
                    })
                }
            };
            Message::Delete(Delete {
                xid,
                relation,
                old: OldTuple {
                    kind,
                    tuple: r.tuple()?,
                },
            })
        }
        TAG_TRUNCATE => Message::Truncate(r.truncate(in_stream)?),
        TAG_MESSAGE => Message::Message(r.logical_message(in_stream)?),
        TAG_STREAM_START => Message::StreamStart(StreamStart {
            xid: r.u32("Stream Start xid")?,
            first_segment: r.flag("Stream Start first segment")?,
        }),
        TAG_STREAM_STOP => Message::StreamStop,
        TAG_STREAM_COMMIT => Message::StreamCommit(StreamCommit {
            xid: r.u32("Stream Commit xid")?,
            flags: r.u8("Stream Commit flags")?,
            commit_lsn: r.lsn("Stream Commit LSN")?,
            end_lsn: r.lsn("Stream Commit end LSN")?,
            commit_time: r.i64("Stream Commit time")?,
        }),
        TAG_STREAM_ABORT => Message::StreamAbort(StreamAbort {
            xid: r.u32("Stream Abort xid")?,
            subxid: r.u32("Stream Abort subxid")?,
        }),
        TAG_BEGIN_PREPARE => Message::BeginPrepare(BeginPrepare {
            prepare_lsn: r.lsn("Begin Prepare LSN")?,
            end_lsn: r.lsn("Begin Prepare end LSN")?,
            prepare_time: r.i64("Begin Prepare time")?,
            xid: r.u32("Begin Prepare xid")?,
            gid: r.string("Begin Prepare gid")?,
        }),
        TAG_PREPARE => Message::Prepare(r.prepare()?),
        TAG_COMMIT_PREPARED => Message::CommitPrepared(CommitPrepared {
            flags: r.u8("Commit Prepared flags")?,
            commit_lsn: r.lsn("Commit Prepared LSN")?,
            end_lsn: r.lsn("Commit Prepared end LSN")?,
            commit_time: r.i64("Commit Prepared time")?,
            xid: r.u32("Commit Prepared xid")?,
            gid: r.string("Commit Prepared gid")?,
        }),
        TAG_ROLLBACK_PREPARED => Message::RollbackPrepared(RollbackPrepared {
            flags: r.u8("Rollback Prepared flags")?,
            prepare_end_lsn: r.lsn("Rollback Prepared prepare end LSN")?,
            rollback_end_lsn: r.lsn("Rollback Prepared rollback end LSN")?,
            prepare_time: r.i64("Rollback Prepared prepare time")?,
            rollback_time: r.i64("Rollback Prepared rollback time")?,
            xid: r.u32("Rollback Prepared xid")?,
            gid: r.string("Rollback Prepared gid")?,
        }),
        TAG_STREAM_PREPARE => Message::StreamPrepare(r.prepare()?),
        other => return Err(DecodeError::UnknownTag(other)),
    };
    match r.0.remaining() {
        0 => Ok(msg),
        count => Err(DecodeError::TrailingBytes { count }),
    }
}

/// Checked, context-labelled reads over the rest of a payload. Struct literals evaluate their
/// fields in source order, so `decode` lists fields in wire order.
struct Cursor(Bytes);

impl Cursor {
    fn u8(&mut self, context: &'static str) -> Result<u8, DecodeError> {
        self.0
            .try_get_u8()
            .map_err(|_| DecodeError::UnexpectedEnd { context })
    }

    fn i16(&mut self, context: &'static str) -> Result<i16, DecodeError> {
        self.0
            .try_get_i16()
            .map_err(|_| DecodeError::UnexpectedEnd { context })
    }

    fn u32(&mut self, context: &'static str) -> Result<u32, DecodeError> {
        self.0
            .try_get_u32()
            .map_err(|_| DecodeError::UnexpectedEnd { context })
    }

    fn i32(&mut self, context: &'static str) -> Result<i32, DecodeError> {
        self.0
            .try_get_i32()
            .map_err(|_| DecodeError::UnexpectedEnd { context })
    }

    fn i64(&mut self, context: &'static str) -> Result<i64, DecodeError> {
        self.0
            .try_get_i64()
            .map_err(|_| DecodeError::UnexpectedEnd { context })
    }

    fn lsn(&mut self, context: &'static str) -> Result<Lsn, DecodeError> {
        self.0
            .try_get_u64()
            .map(Lsn)
            .map_err(|_| DecodeError::UnexpectedEnd { context })
    }

    /// The streamed-transaction xid that prefixes change messages inside a stream.
    fn xid(&mut self, in_stream: bool) -> Result<Option<u32>, DecodeError> {
        if in_stream {
            self.u32("streamed transaction xid").map(Some)
        } else {
            Ok(None)
        }
    }

    /// A flags byte mapped to a bool: 0 or 1, anything else is refused so nothing is lost.
    fn flag(&mut self, context: &'static str) -> Result<bool, DecodeError> {
        match self.u8(context)? {
            0 => Ok(false),
            1 => Ok(true),
            found => Err(DecodeError::UnknownFlags { context, found }),
        }
    }

    /// An `i16` count that must not be negative.
    fn count16(&mut self, context: &'static str) -> Result<usize, DecodeError> {
        let n = self.i16(context)?;
        usize::try_from(n).map_err(|_| DecodeError::NegativeCount { context })
    }

    /// A capacity for `count` items of at least `min_size` bytes each that the rest of the
    /// payload could actually hold.
    fn capacity(&self, count: usize, min_size: usize) -> usize {
        count.min(self.0.remaining() / min_size)
    }

    /// The next `len` bytes, zero-copy.
    fn take(&mut self, len: usize, context: &'static str) -> Result<Bytes, DecodeError> {
        if len > self.0.remaining() {
            return Err(DecodeError::UnexpectedEnd { context });
        }
        Ok(self.0.split_to(len))
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, context: &'static str) -> Result<String, DecodeError> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::MissingNul { context })?;
        let raw = self.take(end, context)?;
        self.u8(context)?; // the NUL itself
        std::str::from_utf8(&raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { context })
    }

    fn marker(&mut self, expected: u8, name: &'static str) -> Result<(), DecodeError> {
        match self.u8("tuple marker")? {
            found if found == expected => Ok(()),
            found => Err(DecodeError::MissingMarker {
                expected: name,
                found,
            }),
        }
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.count16("tuple column count")?;
        let mut values = Vec::with_capacity(self.capacity(n, 1));
        for _ in 0..n {
            let value = match self.u8("tuple column kind")? {
                KIND_NULL => Value::Null,
                KIND_UNCHANGED => Value::Unchanged,
                KIND_TEXT => Value::Text(self.value_bytes()?),
                KIND_BINARY => Value::Binary(self.value_bytes()?),
                other => return Err(DecodeError::UnknownTupleKind(other)),
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    fn value_bytes(&mut self) -> Result<Bytes, DecodeError> {
        const CONTEXT: &str = "tuple value length";
        let len = self.i32(CONTEXT)?;
        let len =
            usize::try_from(len).map_err(|_| DecodeError::NegativeCount { context: CONTEXT })?;
        self.take(len, "tuple value")
    }

    fn relation(&mut self, in_stream: bool) -> Result<Relation, DecodeError> {
        let xid = self.xid(in_stream)?;
        let oid = self.u32("Relation oid")?;
        let namespace = self.string("Relation namespace")?;
        let name = self.string("Relation name")?;
        let replica_identity = ReplicaIdentity::from_byte(self.u8("Relation replica identity")?)?;
        let n = self.count16("Relation column count")?;
        // A column takes at least flags + NUL + type oid + modifier = 10 bytes.
        let mut columns = Vec::with_capacity(self.capacity(n, 10));
        for _ in 0..n {
            columns.push(Column {
                flags: self.u8("column flags")?,
                name: self.string("column name")?,
                type_oid: self.u32("column type oid")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(Relation {
            xid,
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn update(&mut self, in_stream: bool) -> Result<Update, DecodeError> {
        let xid = self.xid(in_stream)?;
        let relation = self.u32("Update relation oid")?;
        let old_kind = match self.u8("tuple marker")? {
            MARKER_KEY => Some(OldKind::Key),
            MARKER_OLD => Some(OldKind::Full),
            MARKER_NEW => None,
            found => {
                return Err(DecodeError::MissingMarker {
                    expected: "K, O or N",
                    found,
                })
            }
        };
        let old = match old_kind {
            Some(kind) => {
                let tuple = self.tuple()?;
                self.marker(MARKER_NEW, "N")?;
                Some(OldTuple { kind, tuple })
            }
            None => None,
        };
        Ok(Update {
            xid,
            relation,
            old,
            new: self.tuple()?,
        })
    }

    fn truncate(&mut self, in_stream: bool) -> Result<Truncate, DecodeError> {
        let xid = self.xid(in_stream)?;
        let n = self.u32("Truncate relation count")?;
        let options = self.u8("Truncate options")?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let mut relations = Vec::with_capacity(self.capacity(n, 4));
        for _ in 0..n {
            relations.push(self.u32("Truncate relation oid")?);
        }
        Ok(Truncate {
            xid,
            options,
            relations,
        })
    }

    fn logical_message(&mut self, in_stream: bool) -> Result<LogicalMessage, DecodeError> {
        let xid = self.xid(in_stream)?;
        let transactional = self.flag("Message flags")?;
        let lsn = self.lsn("Message LSN")?;
        let prefix = self.string("Message prefix")?;
        let len = self.u32("Message content length")?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        Ok(LogicalMessage {
            xid,
            transactional,
            lsn,
            prefix,
            content: self.take(len, "Message content")?,
        })
    }

    fn prepare(&mut self) -> Result<Prepare, DecodeError> {
        Ok(Prepare {
            flags: self.u8("Prepare flags")?,
            prepare_lsn: self.lsn("Prepare LSN")?,
            end_lsn: self.lsn("Prepare end LSN")?,
            prepare_time: self.i64("Prepare time")?,
            xid: self.u32("Prepare xid")?,
            gid: self.string("Prepare gid")?,
        })
    }
}
