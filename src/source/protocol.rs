//! The streaming replication protocol inside CopyBoth: what the server sends (XLogData `w`,
//! primary keepalive `k`) and what we send (standby status update `r`). Pure, no I/O.
//!
//! See the PostgreSQL docs, "Streaming Replication Protocol", START_REPLICATION.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::lsn::Lsn;

/// Tag of an XLogData message.
pub const TAG_XLOG_DATA: u8 = b'w';
/// Tag of a primary keepalive message.
pub const TAG_KEEPALIVE: u8 = b'k';
/// Tag of a standby status update.
pub const TAG_STATUS_UPDATE: u8 = b'r';

/// Seconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01 00:00:00 UTC.
const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;

pub use crate::pgoutput::PgTimestamp;

/// The current time as a PostgreSQL timestamp.
pub fn pg_now() -> PgTimestamp {
    system_time_to_pg(SystemTime::now())
}

/// Converts wall-clock time to a PostgreSQL timestamp.
pub fn system_time_to_pg(t: SystemTime) -> PgTimestamp {
    let since_unix = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    since_unix.as_micros() as i64 - (PG_EPOCH_OFFSET_SECS as i64) * 1_000_000
}

/// Converts a PostgreSQL timestamp to wall-clock time.
pub fn pg_to_system_time(ts: PgTimestamp) -> SystemTime {
    let unix_micros = ts + (PG_EPOCH_OFFSET_SECS as i64) * 1_000_000;
    if unix_micros <= 0 {
        UNIX_EPOCH
    } else {
        UNIX_EPOCH + Duration::from_micros(unix_micros as u64)
    }
}

/// One message the server sends inside CopyBoth. `Debug` shows an XLogData's length, never its
/// bytes (they hold row values).
#[derive(Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// WAL data: one pgoutput message.
    XLogData {
        /// Start of the WAL data in this message.
        wal_start: Lsn,
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock at transmission.
        send_time: PgTimestamp,
        /// The pgoutput message.
        data: Bytes,
    },
    /// A keepalive; `reply_requested` asks for a status update now.
    Keepalive {
        /// Current end of WAL on the server (for logical: what it has sent).
        wal_end: Lsn,
        /// Server clock at transmission.
        send_time: PgTimestamp,
        /// The server wants an immediate reply, or it will time us out.
        reply_requested: bool,
    },
}

impl std::fmt::Debug for ServerMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            } => f
                .debug_struct("XLogData")
                .field("wal_start", wal_start)
                .field("wal_end", wal_end)
                .field("send_time", send_time)
                .field("data_len", &data.len())
                .finish(),
            ServerMessage::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            } => f
                .debug_struct("Keepalive")
                .field("wal_end", wal_end)
                .field("send_time", send_time)
                .field("reply_requested", reply_requested)
                .finish(),
        }
    }
}

/// A CopyData payload we cannot parse. Never carries the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Empty CopyData.
    #[error("empty CopyData message from server")]
    Empty,
    /// Unknown tag.
    #[error("unknown replication message tag 0x{0:02x}")]
    UnknownTag(u8),
    /// Too short for its header.
    #[error("truncated replication message (tag {0:?})")]
    Truncated(char),
}

/// Parses one CopyData payload from the server.
pub fn parse_server_message(mut buf: Bytes) -> Result<ServerMessage, ProtocolError> {
    let tag = buf.try_get_u8().map_err(|_| ProtocolError::Empty)?;
    let short = || ProtocolError::Truncated(tag as char);
    match tag {
        TAG_XLOG_DATA => {
            let wal_start = Lsn(buf.try_get_u64().map_err(|_| short())?);
            let wal_end = Lsn(buf.try_get_u64().map_err(|_| short())?);
            let send_time = buf.try_get_i64().map_err(|_| short())?;
            Ok(ServerMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data: buf,
            })
        }
        TAG_KEEPALIVE => {
            let wal_end = Lsn(buf.try_get_u64().map_err(|_| short())?);
            let send_time = buf.try_get_i64().map_err(|_| short())?;
            let reply = buf.try_get_u8().map_err(|_| short())?;
            Ok(ServerMessage::Keepalive {
                wal_end,
                send_time,
                reply_requested: reply == 1,
            })
        }
        other => Err(ProtocolError::UnknownTag(other)),
    }
}

/// Encodes a standby status update: `written` is what we have received, `flushed` and `applied`
/// what may be confirmed (the slot's `confirmed_flush_lsn` follows `flushed`).
pub fn encode_status_update(
    written: Lsn,
    flushed: Lsn,
    applied: Lsn,
    now: PgTimestamp,
    reply_requested: bool,
) -> BytesMut {
    let mut b = BytesMut::with_capacity(34);
    b.put_u8(TAG_STATUS_UPDATE);
    b.put_u64(written.0);
    b.put_u64(flushed.0);
    b.put_u64(applied.0);
    b.put_i64(now);
    b.put_u8(u8::from(reply_requested));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_wal_data() {
        let m = ServerMessage::XLogData {
            wal_start: Lsn(1),
            wal_end: Lsn(2),
            send_time: 0,
            data: Bytes::from_static(b"Alice Smith"),
        };
        let text = format!("{m:?}");
        assert!(
            text.contains("data_len: 11") && !text.contains("Alice"),
            "{text}"
        );
    }

    #[test]
    fn parses_xlogdata() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(10);
        b.put_u64(20);
        b.put_i64(30);
        b.put_slice(b"Bxyz");
        match parse_server_message(b.freeze()).unwrap() {
            ServerMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            } => {
                assert_eq!((wal_start, wal_end, send_time), (Lsn(10), Lsn(20), 30));
                assert_eq!(&data[..], b"Bxyz");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn parses_keepalive() {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(99);
        b.put_i64(5);
        b.put_u8(1);
        assert_eq!(
            parse_server_message(b.freeze()).unwrap(),
            ServerMessage::Keepalive {
                wal_end: Lsn(99),
                send_time: 5,
                reply_requested: true
            }
        );
    }

    #[test]
    fn rejects_short_and_unknown() {
        assert_eq!(
            parse_server_message(Bytes::new()),
            Err(ProtocolError::Empty)
        );
        assert_eq!(
            parse_server_message(Bytes::from_static(b"k\0\0")),
            Err(ProtocolError::Truncated('k'))
        );
        assert_eq!(
            parse_server_message(Bytes::from_static(b"z")),
            Err(ProtocolError::UnknownTag(b'z'))
        );
    }

    #[test]
    fn status_update_layout() {
        let b = encode_status_update(Lsn(1), Lsn(2), Lsn(3), 4, true);
        assert_eq!(b.len(), 34);
        assert_eq!(b[0], b'r');
        assert_eq!(&b[1..9], &1u64.to_be_bytes());
        assert_eq!(&b[9..17], &2u64.to_be_bytes());
        assert_eq!(&b[33], &1);
    }

    #[test]
    fn timestamps_round_trip() {
        let now = SystemTime::now();
        let back = pg_to_system_time(system_time_to_pg(now));
        let diff = now.duration_since(back).unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_micros(2));
        assert_eq!(
            system_time_to_pg(UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS)),
            0
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data: Vec<u8>) {
            let _ = parse_server_message(Bytes::from(data));
        }
    }
}
