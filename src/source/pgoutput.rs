//! Decoding (and, for tests and fake servers, encoding) of `pgoutput` logical replication
//! messages.
//!
//! Each function call handles the payload of one `XLogData` message, which is exactly one
//! `pgoutput` message: a tag byte followed by its body. The layout follows the PostgreSQL 15
//! documentation "Logical Replication Message Formats" and `proto.c`, protocol versions 1 to 3:
//!
//! | tag | message          | body (big-endian; strings NUL-terminated UTF-8)                    |
//! |-----|------------------|--------------------------------------------------------------------|
//! | `B` | Begin            | final LSN, commit time, xid                                        |
//! | `C` | Commit           | flags, commit LSN, end LSN, commit time                            |
//! | `O` | Origin           | commit LSN, origin name                                            |
//! | `R` | Relation         | \[xid\], oid, namespace, name, replica identity, columns           |
//! | `Y` | Type             | \[xid\], oid, namespace, name                                      |
//! | `I` | Insert           | \[xid\], relation oid, `N` tuple                                   |
//! | `U` | Update           | \[xid\], relation oid, optional `K`/`O` tuple, `N` tuple           |
//! | `D` | Delete           | \[xid\], relation oid, `K`/`O` tuple                               |
//! | `T` | Truncate         | \[xid\], relation count, options, relation oids                    |
//! | `M` | Message          | \[xid\], flags, LSN, prefix, content length, content               |
//! | `S` | Stream Start     | xid, first-segment flag                                            |
//! | `E` | Stream Stop      | (nothing)                                                          |
//! | `c` | Stream Commit    | xid, flags, commit LSN, end LSN, commit time                       |
//! | `A` | Stream Abort     | xid, subtransaction xid                                            |
//! | `b` | Begin Prepare    | prepare LSN, end LSN, prepare time, xid, gid                       |
//! | `P` | Prepare          | flags, prepare LSN, end LSN, prepare time, xid, gid                |
//! | `K` | Commit Prepared  | flags, commit LSN, end LSN, commit time, xid, gid                  |
//! | `r` | Rollback Prepared| flags, prepare/rollback end LSN, prepare/rollback time, xid, gid    |
//! | `p` | Stream Prepare   | as Prepare                                                         |
//!
//! "\[xid\]" is present only inside a streamed transaction (between Stream Start and Stream
//! Stop); the caller tracks that state and passes `in_stream`. LSNs become [`Lsn`]; timestamps
//! stay raw `i64` microseconds since 2000-01-01. A tuple is a column count followed by one kind
//! byte per column: `n` null, `u` unchanged TOASTed value, `t` text or `b` binary, the last two
//! with an `i32` length and the bytes.
//!
//! Two rules hold throughout:
//!
//! * **No panics on input.** The payload is untrusted: every read is checked, every length is
//!   compared with what remains before it is used, hostile counts cannot make us pre-allocate
//!   more than the payload could hold, and a payload longer than its message is an error.
//! * **No row values in output.** Values are clinical data. Column values and logical message
//!   contents are zero-copy [`Bytes`] slices of the payload whose `Debug` shows only kind and
//!   length, and [`DecodeError`] never carries payload bytes (a tag or kind byte at most).

#![warn(missing_docs)]

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::lsn::Lsn;

/// Tag of [`Message::Begin`].
pub const TAG_BEGIN: u8 = b'B';
/// Tag of [`Message::Commit`].
pub const TAG_COMMIT: u8 = b'C';
/// Tag of [`Message::Origin`].
pub const TAG_ORIGIN: u8 = b'O';
/// Tag of [`Message::Relation`].
pub const TAG_RELATION: u8 = b'R';
/// Tag of [`Message::Type`].
pub const TAG_TYPE: u8 = b'Y';
/// Tag of [`Message::Insert`].
pub const TAG_INSERT: u8 = b'I';
/// Tag of [`Message::Update`].
pub const TAG_UPDATE: u8 = b'U';
/// Tag of [`Message::Delete`].
pub const TAG_DELETE: u8 = b'D';
/// Tag of [`Message::Truncate`].
pub const TAG_TRUNCATE: u8 = b'T';
/// Tag of [`Message::Message`] (a logical decoding message).
pub const TAG_MESSAGE: u8 = b'M';
/// Tag of [`Message::StreamStart`].
pub const TAG_STREAM_START: u8 = b'S';
/// Tag of [`Message::StreamStop`].
pub const TAG_STREAM_STOP: u8 = b'E';
/// Tag of [`Message::StreamCommit`].
pub const TAG_STREAM_COMMIT: u8 = b'c';
/// Tag of [`Message::StreamAbort`].
pub const TAG_STREAM_ABORT: u8 = b'A';
/// Tag of [`Message::BeginPrepare`].
pub const TAG_BEGIN_PREPARE: u8 = b'b';
/// Tag of [`Message::Prepare`].
pub const TAG_PREPARE: u8 = b'P';
/// Tag of [`Message::CommitPrepared`].
pub const TAG_COMMIT_PREPARED: u8 = b'K';
/// Tag of [`Message::RollbackPrepared`].
pub const TAG_ROLLBACK_PREPARED: u8 = b'r';
/// Tag of [`Message::StreamPrepare`].
pub const TAG_STREAM_PREPARE: u8 = b'p';

/// Every message tag this module understands.
pub const TAGS: [u8; 19] = [
    TAG_BEGIN,
    TAG_COMMIT,
    TAG_ORIGIN,
    TAG_RELATION,
    TAG_TYPE,
    TAG_INSERT,
    TAG_UPDATE,
    TAG_DELETE,
    TAG_TRUNCATE,
    TAG_MESSAGE,
    TAG_STREAM_START,
    TAG_STREAM_STOP,
    TAG_STREAM_COMMIT,
    TAG_STREAM_ABORT,
    TAG_BEGIN_PREPARE,
    TAG_PREPARE,
    TAG_COMMIT_PREPARED,
    TAG_ROLLBACK_PREPARED,
    TAG_STREAM_PREPARE,
];

/// Tuple column kind: SQL NULL.
pub const KIND_NULL: u8 = b'n';
/// Tuple column kind: unchanged TOASTed value, not sent.
pub const KIND_UNCHANGED: u8 = b'u';
/// Tuple column kind: text-format value.
pub const KIND_TEXT: u8 = b't';
/// Tuple column kind: binary-format value.
pub const KIND_BINARY: u8 = b'b';

/// Tuple marker: the new row follows.
pub const MARKER_NEW: u8 = b'N';
/// Tuple marker: the old row's replica identity key follows.
pub const MARKER_KEY: u8 = b'K';
/// Tuple marker: the whole old row follows (REPLICA IDENTITY FULL).
pub const MARKER_OLD: u8 = b'O';

/// Replica identity byte: default (primary key).
pub const IDENTITY_DEFAULT: u8 = b'd';
/// Replica identity byte: nothing.
pub const IDENTITY_NOTHING: u8 = b'n';
/// Replica identity byte: full row.
pub const IDENTITY_FULL: u8 = b'f';
/// Replica identity byte: a chosen unique index.
pub const IDENTITY_INDEX: u8 = b'i';

/// Column flag bit: the column is part of the replica identity key.
pub const COLUMN_FLAG_KEY: u8 = 1;
/// Truncate option bit: CASCADE.
pub const TRUNCATE_CASCADE: u8 = 1;
/// Truncate option bit: RESTART IDENTITY.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;
/// Logical message flag bit: the message is transactional.
pub const MESSAGE_TRANSACTIONAL: u8 = 1;

/// Why a payload is not a well-formed `pgoutput` message; never carries payload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload ended in the middle of a field.
    #[error("pgoutput message ends early, while reading {context}")]
    UnexpectedEnd {
        /// The field being read.
        context: &'static str,
    },
    /// The first byte is not a known message tag.
    #[error("unknown pgoutput message tag 0x{0:02x}")]
    UnknownTag(u8),
    /// A tuple column has a kind other than `n`, `u`, `t` or `b`.
    #[error("unknown tuple column kind 0x{0:02x}")]
    UnknownTupleKind(u8),
    /// A Relation message has a replica identity other than `d`, `n`, `f` or `i`.
    #[error("unknown replica identity 0x{0:02x}")]
    UnknownReplicaIdentity(u8),
    /// A tuple marker (`N`, `K`, `O`) was expected but another byte was found.
    #[error("expected tuple marker {expected}, found 0x{found:02x}")]
    MissingMarker {
        /// The marker(s) allowed here.
        expected: &'static str,
        /// The byte found instead.
        found: u8,
    },
    /// A count or length is negative.
    #[error("negative {context}")]
    NegativeCount {
        /// The field holding the count.
        context: &'static str,
    },
    /// A string is not valid UTF-8.
    #[error("{context} is not valid UTF-8")]
    InvalidUtf8 {
        /// The string field.
        context: &'static str,
    },
    /// A string has no NUL terminator before the payload ends.
    #[error("{context} has no NUL terminator")]
    MissingNul {
        /// The string field.
        context: &'static str,
    },
    /// A flags byte that this module maps to a `bool` has other bits set.
    #[error("{context} has unknown flag bits (0x{found:02x})")]
    UnknownFlags {
        /// The flags field.
        context: &'static str,
        /// The flags byte found.
        found: u8,
    },
    /// Bytes remain after a complete message.
    #[error("{count} unexpected bytes after a complete pgoutput message")]
    TrailingBytes {
        /// How many bytes remain.
        count: usize,
    },
}

/// One decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `B`: a transaction begins.
    Begin(Begin),
    /// `C`: a transaction commits.
    Commit(Commit),
    /// `O`: the transaction came from a replication origin.
    Origin(Origin),
    /// `R`: the layout of a table, sent before its first change.
    Relation(Relation),
    /// `Y`: a non-built-in data type.
    Type(TypeMessage),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: tables were truncated.
    Truncate(Truncate),
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    Message(LogicalMessage),
    /// `S`: a block of a streamed (in-progress) transaction starts.
    StreamStart(StreamStart),
    /// `E`: the current block of a streamed transaction ends.
    StreamStop,
    /// `c`: a streamed transaction commits.
    StreamCommit(StreamCommit),
    /// `A`: a streamed (sub)transaction aborts.
    StreamAbort(StreamAbort),
    /// `b`: a two-phase transaction begins.
    BeginPrepare(BeginPrepare),
    /// `P`: a two-phase transaction is prepared.
    Prepare(Prepare),
    /// `K`: a prepared transaction commits.
    CommitPrepared(CommitPrepared),
    /// `r`: a prepared transaction rolls back.
    RollbackPrepared(RollbackPrepared),
    /// `p`: a streamed two-phase transaction is prepared.
    StreamPrepare(Prepare),
}

/// Body of `B`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01.
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
}

/// Body of `C`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Flags, currently always 0.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01.
    pub commit_time: i64,
}

/// Body of `O`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Commit LSN on the origin server.
    pub commit_lsn: Lsn,
    /// Origin name.
    pub name: String,
}

/// Body of `R`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Streamed transaction id, `Some` only inside a stream.
    pub xid: Option<u32>,
    /// Relation oid, the id later change messages refer to.
    pub oid: u32,
    /// Schema name as sent; empty means `pg_catalog` (see [`Relation::schema`]).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// The table's replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Published columns, in tuple order.
    pub columns: Vec<Column>,
}

impl Relation {
    /// The schema name, with the empty namespace read as `pg_catalog`.
    pub fn schema(&self) -> &str {
        if self.namespace.is_empty() {
            "pg_catalog"
        } else {
            &self.namespace
        }
    }
}

/// A table's REPLICA IDENTITY setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: the full row.
    Full,
    /// `i`: a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// Parses the wire byte.
    pub fn from_byte(byte: u8) -> Result<Self, DecodeError> {
        match byte {
            IDENTITY_DEFAULT => Ok(Self::Default),
            IDENTITY_NOTHING => Ok(Self::Nothing),
            IDENTITY_FULL => Ok(Self::Full),
            IDENTITY_INDEX => Ok(Self::Index),
            other => Err(DecodeError::UnknownReplicaIdentity(other)),
        }
    }

    /// The wire byte.
    pub fn as_byte(self) -> u8 {
        match self {
            Self::Default => IDENTITY_DEFAULT,
            Self::Nothing => IDENTITY_NOTHING,
            Self::Full => IDENTITY_FULL,
            Self::Index => IDENTITY_INDEX,
        }
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Flag bits; [`COLUMN_FLAG_KEY`] marks a key column.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// Data type oid.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

impl Column {
    /// Whether the column is part of the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & COLUMN_FLAG_KEY != 0
    }
}

/// Body of `Y`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    /// Streamed transaction id, `Some` only inside a stream.
    pub xid: Option<u32>,
    /// Type oid.
    pub oid: u32,
    /// Schema name as sent; empty means `pg_catalog`.
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// Body of `I`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Streamed transaction id, `Some` only inside a stream.
    pub xid: Option<u32>,
    /// Oid of the relation (see [`Relation::oid`]).
    pub relation: u32,
    /// The inserted row.
    pub new: Tuple,
}

/// Body of `U`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Streamed transaction id, `Some` only inside a stream.
    pub xid: Option<u32>,
    /// Oid of the relation (see [`Relation::oid`]).
    pub relation: u32,
    /// The old key or row, sent when the key changed or the identity is FULL.
    pub old: Option<OldTuple>,
    /// The new row.
    pub new: Tuple,
}

/// Body of `D`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Streamed transaction id, `Some` only inside a stream.
    pub xid: Option<u32>,
    /// Oid of the relation (see [`Relation::oid`]).
    pub relation: u32,
    /// The deleted row's key or whole row.
    pub old: OldTuple,
}

/// The old side of an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldTuple {
    /// Whether this is the key only or the whole row.
    pub kind: OldKind,
    /// The values (non-key columns are null in a key tuple).
    pub tuple: Tuple,
}

/// Which old tuple an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OldKind {
    /// `K`: the replica identity key columns.
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

impl OldKind {
    fn marker(self) -> u8 {
        match self {
            Self::Key => MARKER_KEY,
            Self::Full => MARKER_OLD,
        }
    }
}

/// Body of `T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Streamed transaction id, `Some` only inside a stream.
    pub xid: Option<u32>,
    /// Option bits ([`TRUNCATE_CASCADE`], [`TRUNCATE_RESTART_IDENTITY`]).
    pub options: u8,
    /// Oids of the truncated relations.
    pub relations: Vec<u32>,
}

impl Truncate {
    /// Whether TRUNCATE ... CASCADE was used.
    pub fn cascade(&self) -> bool {
        self.options & TRUNCATE_CASCADE != 0
    }

    /// Whether TRUNCATE ... RESTART IDENTITY was used.
    pub fn restart_identity(&self) -> bool {
        self.options & TRUNCATE_RESTART_IDENTITY != 0
    }
}

/// Body of `M`; `Debug` shows the content's length only.
#[derive(Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Streamed transaction id, `Some` only inside a stream.
    pub xid: Option<u32>,
    /// Whether the message was emitted transactionally.
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// The emitter's prefix.
    pub prefix: String,
    /// The content, a slice of the payload.
    pub content: Bytes,
}

impl fmt::Debug for LogicalMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogicalMessage")
            .field("xid", &self.xid)
            .field("transactional", &self.transactional)
            .field("lsn", &self.lsn)
            .field("prefix", &self.prefix)
            .field("content", &format_args!("{} bytes", self.content.len()))
            .finish()
    }
}

/// Body of `S`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The streamed transaction.
    pub xid: u32,
    /// Whether this is the transaction's first block.
    pub first_segment: bool,
}

/// Body of `c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    /// The streamed transaction.
    pub xid: u32,
    /// Flags, currently always 0.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01.
    pub commit_time: i64,
}

/// Body of `A`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// The streamed top-level transaction.
    pub xid: u32,
    /// The aborted subtransaction (equal to `xid` when the whole transaction aborts).
    pub subxid: u32,
}

/// Body of `b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepare {
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// LSN just past the prepare record.
    pub end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01.
    pub prepare_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: String,
}

/// Body of `P` and `p`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    /// Flags, currently always 0.
    pub flags: u8,
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// LSN just past the prepare record.
    pub end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01.
    pub prepare_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: String,
}

/// Body of `K`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    /// Flags, currently always 0.
    pub flags: u8,
    /// LSN of the commit prepared record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit prepared record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01.
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: String,
}

/// Body of `r`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    /// Flags, currently always 0.
    pub flags: u8,
    /// LSN just past the prepare record.
    pub prepare_end_lsn: Lsn,
    /// LSN just past the rollback prepared record.
    pub rollback_end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01.
    pub prepare_time: i64,
    /// Rollback time, microseconds since 2000-01-01.
    pub rollback_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: String,
}

/// A row: one [`Value`] per published column.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Value>);

/// One column value; `Debug` shows the kind and length only, never the content.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value that was not sent.
    Unchanged,
    /// `t`: the value in text format, a slice of the payload.
    Text(Bytes),
    /// `b`: the value in binary format, a slice of the payload.
    Binary(Bytes),
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("Null"),
            Value::Unchanged => f.write_str("Unchanged"),
            Value::Text(b) => write!(f, "Text({} bytes)", b.len()),
            Value::Binary(b) => write!(f, "Binary({} bytes)", b.len()),
        }
    }
}

impl Message {
    /// The message's wire tag.
    pub fn tag(&self) -> u8 {
        match self {
            Message::Begin(_) => TAG_BEGIN,
            Message::Commit(_) => TAG_COMMIT,
            Message::Origin(_) => TAG_ORIGIN,
            Message::Relation(_) => TAG_RELATION,
            Message::Type(_) => TAG_TYPE,
            Message::Insert(_) => TAG_INSERT,
            Message::Update(_) => TAG_UPDATE,
            Message::Delete(_) => TAG_DELETE,
            Message::Truncate(_) => TAG_TRUNCATE,
            Message::Message(_) => TAG_MESSAGE,
            Message::StreamStart(_) => TAG_STREAM_START,
            Message::StreamStop => TAG_STREAM_STOP,
            Message::StreamCommit(_) => TAG_STREAM_COMMIT,
            Message::StreamAbort(_) => TAG_STREAM_ABORT,
            Message::BeginPrepare(_) => TAG_BEGIN_PREPARE,
            Message::Prepare(_) => TAG_PREPARE,
            Message::CommitPrepared(_) => TAG_COMMIT_PREPARED,
            Message::RollbackPrepared(_) => TAG_ROLLBACK_PREPARED,
            Message::StreamPrepare(_) => TAG_STREAM_PREPARE,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// Decodes one `pgoutput` message; `in_stream` says whether it arrived inside a streamed block.
pub fn decode(payload: Bytes, in_stream: bool) -> Result<Message, DecodeError> {
    let mut r = Reader(payload);
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
struct Reader(Bytes);

impl Reader {
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

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Appends `msg` in wire format; the exact inverse of [`decode`] for the same `in_stream`.
///
/// Inside a stream the xid of change messages is written (`None` as 0, the invalid xid);
/// outside it is omitted. Strings must not contain NUL (the wire cannot carry one).
///
/// # Panics
///
/// If a count exceeds what the wire can carry: more than 32767 tuple values or columns, more
/// than `u32::MAX` truncated relations, a value longer than `i32::MAX` bytes or a message
/// content longer than `u32::MAX` bytes.
pub fn encode(msg: &Message, in_stream: bool, out: &mut BytesMut) {
    out.put_u8(msg.tag());
    match msg {
        Message::Begin(m) => {
            out.put_u64(m.final_lsn.0);
            out.put_i64(m.commit_time);
            out.put_u32(m.xid);
        }
        Message::Commit(m) => {
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time);
        }
        Message::Origin(m) => {
            out.put_u64(m.commit_lsn.0);
            put_string(out, &m.name);
        }
        Message::Relation(m) => {
            put_xid(out, m.xid, in_stream);
            out.put_u32(m.oid);
            put_string(out, &m.namespace);
            put_string(out, &m.name);
            out.put_u8(m.replica_identity.as_byte());
            out.put_i16(count16(m.columns.len(), "Relation columns"));
            for c in &m.columns {
                out.put_u8(c.flags);
                put_string(out, &c.name);
                out.put_u32(c.type_oid);
                out.put_i32(c.type_modifier);
            }
        }
        Message::Type(m) => {
            put_xid(out, m.xid, in_stream);
            out.put_u32(m.oid);
            put_string(out, &m.namespace);
            put_string(out, &m.name);
        }
        Message::Insert(m) => {
            put_xid(out, m.xid, in_stream);
            out.put_u32(m.relation);
            out.put_u8(MARKER_NEW);
            put_tuple(out, &m.new);
        }
        Message::Update(m) => {
            put_xid(out, m.xid, in_stream);
            out.put_u32(m.relation);
            if let Some(old) = &m.old {
                out.put_u8(old.kind.marker());
                put_tuple(out, &old.tuple);
            }
            out.put_u8(MARKER_NEW);
            put_tuple(out, &m.new);
        }
        Message::Delete(m) => {
            put_xid(out, m.xid, in_stream);
            out.put_u32(m.relation);
            out.put_u8(m.old.kind.marker());
            put_tuple(out, &m.old.tuple);
        }
        Message::Truncate(m) => {
            put_xid(out, m.xid, in_stream);
            let n = u32::try_from(m.relations.len()).expect("too many truncated relations");
            out.put_u32(n);
            out.put_u8(m.options);
            for oid in &m.relations {
                out.put_u32(*oid);
            }
        }
        Message::Message(m) => {
            put_xid(out, m.xid, in_stream);
            out.put_u8(if m.transactional {
                MESSAGE_TRANSACTIONAL
            } else {
                0
            });
            out.put_u64(m.lsn.0);
            put_string(out, &m.prefix);
            let len = u32::try_from(m.content.len()).expect("logical message content too long");
            out.put_u32(len);
            out.put_slice(&m.content);
        }
        Message::StreamStart(m) => {
            out.put_u32(m.xid);
            out.put_u8(u8::from(m.first_segment));
        }
        Message::StreamStop => {}
        Message::StreamCommit(m) => {
            out.put_u32(m.xid);
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time);
        }
        Message::StreamAbort(m) => {
            out.put_u32(m.xid);
            out.put_u32(m.subxid);
        }
        Message::BeginPrepare(m) => {
            out.put_u64(m.prepare_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.prepare_time);
            out.put_u32(m.xid);
            put_string(out, &m.gid);
        }
        Message::Prepare(m) | Message::StreamPrepare(m) => {
            out.put_u8(m.flags);
            out.put_u64(m.prepare_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.prepare_time);
            out.put_u32(m.xid);
            put_string(out, &m.gid);
        }
        Message::CommitPrepared(m) => {
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time);
            out.put_u32(m.xid);
            put_string(out, &m.gid);
        }
        Message::RollbackPrepared(m) => {
            out.put_u8(m.flags);
            out.put_u64(m.prepare_end_lsn.0);
            out.put_u64(m.rollback_end_lsn.0);
            out.put_i64(m.prepare_time);
            out.put_i64(m.rollback_time);
            out.put_u32(m.xid);
            put_string(out, &m.gid);
        }
    }
}

fn put_xid(out: &mut BytesMut, xid: Option<u32>, in_stream: bool) {
    if in_stream {
        out.put_u32(xid.unwrap_or(0));
    }
}

fn put_string(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn count16(n: usize, what: &str) -> i16 {
    i16::try_from(n).unwrap_or_else(|_| panic!("{what}: {n} is more than the wire's 32767"))
}

fn put_tuple(out: &mut BytesMut, tuple: &Tuple) {
    out.put_i16(count16(tuple.0.len(), "tuple values"));
    for value in &tuple.0 {
        match value {
            Value::Null => out.put_u8(KIND_NULL),
            Value::Unchanged => out.put_u8(KIND_UNCHANGED),
            Value::Text(b) => put_value_bytes(out, KIND_TEXT, b),
            Value::Binary(b) => put_value_bytes(out, KIND_BINARY, b),
        }
    }
}

fn put_value_bytes(out: &mut BytesMut, kind: u8, b: &[u8]) {
    out.put_u8(kind);
    out.put_i32(i32::try_from(b.len()).expect("tuple value longer than i32::MAX"));
    out.put_slice(b);
}

#[cfg(test)]
#[path = "pgoutput_tests.rs"]
mod tests;
