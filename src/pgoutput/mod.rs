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

use bytes::Bytes;

use crate::lsn::Lsn;

mod decode;
mod encode;

pub use decode::decode;
pub use encode::encode;

/// Microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's timestamp representation (commit
/// times in Begin and Commit, send times in the streaming protocol).
pub type PgTimestamp = i64;

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

#[cfg(test)]
mod tests;
