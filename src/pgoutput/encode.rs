//! Encoding: a [`Message`] to wire bytes, the exact inverse of [`super::decode`] (tests, fake
//! servers, benches).

use bytes::{BufMut, BytesMut};

use super::*;

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
