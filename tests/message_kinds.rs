//! Every pgoutput message kind PostgreSQL 15 sends, decoded from a real server.
//!
//! A workload that makes the server emit each kind (plain and streamed transactions, two-phase
//! transactions, replication origins, logical messages, a user-defined type, truncate flags,
//! both kinds of old tuple, unchanged TOAST values, NULLs), decoded with proto_version 3 in text
//! mode and again in binary mode. Each decoded message must also re-encode to the exact bytes the
//! server sent.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::BytesMut;
use pgcarve::conninfo::ConnInfo;
use pgcarve::lsn::Lsn;
use pgcarve::pgoutput::{self, Message, OldKind, Value};
use pgcarve::source::conn::ReplicationConn;
use pgcarve::source::protocol::{parse_server_message, ServerMessage};
use pgcarve::tls::TlsConnector;

use crate::common::{clusters, connect, fresh_db, unique};

const END_PREFIX: &str = "pgcarve-test-end";

/// Everything the server sent, decoded, up to the end marker.
async fn decode_all(url: &str, slot: &str, binary: bool) -> Vec<Message> {
    let info = ConnInfo::parse(url).unwrap();
    let tls = TlsConnector::new(&info).unwrap();
    let mut conn = ReplicationConn::connect(&info, &tls).await.unwrap();
    let mut options = vec![
        ("proto_version", "3".to_string()),
        ("publication_names", "kinds".to_string()),
        ("messages", "true".to_string()),
        ("streaming", "true".to_string()),
        ("two_phase", "true".to_string()),
    ];
    if binary {
        options.push(("binary", "true".to_string()));
    }
    conn.start_replication(slot, Lsn::ZERO, &options)
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut in_stream = false;
    let read = async {
        loop {
            let data = conn.next_copy_data().await.unwrap().expect("copy ended");
            let ServerMessage::XLogData { data, .. } = parse_server_message(data).unwrap() else {
                continue;
            };
            let msg = pgoutput::decode(data.clone(), in_stream)
                .unwrap_or_else(|e| panic!("decode {:?}: {e}", data.first().map(|b| *b as char)));
            let mut again = BytesMut::new();
            pgoutput::encode(&msg, in_stream, &mut again);
            assert_eq!(&again[..], &data[..], "re-encoding {msg:?}");
            match &msg {
                Message::StreamStart(_) => in_stream = true,
                Message::StreamStop => in_stream = false,
                _ => {}
            }
            let end = matches!(&msg, Message::Message(m) if m.prefix == END_PREFIX);
            out.push(msg);
            if end {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(90), read)
        .await
        .expect("the end marker arrives");
    out
}

#[tokio::test]
async fn every_message_kind_from_a_real_server_decodes_and_re_encodes() {
    let c = clusters();
    let db = fresh_db(&c.source, "kinds").await;
    let url = c.source.url(&db);
    let sql = connect(&url).await;
    let slot = unique("kinds");
    let origin = unique("origin");
    sql.batch_execute(&format!(
        "ALTER DATABASE {db} SET logical_decoding_work_mem = '64kB';
         CREATE TYPE mood AS ENUM ('calm', 'tense');
         CREATE TABLE t (id int PRIMARY KEY, note text, big text, m mood);
         ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE TABLE full_t (a int, b text);
         ALTER TABLE full_t REPLICA IDENTITY FULL;
         CREATE TABLE child (id int PRIMARY KEY, t_id int REFERENCES t (id));
         CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY);
         CREATE PUBLICATION kinds FOR TABLE t, full_t, child, ident;
         SELECT pg_replication_origin_create('{origin}');"
    ))
    .await
    .unwrap();
    // Its own statement: a slot cannot be made in a transaction that has written. Two-phase
    // decoding is switched on when the slot is made.
    sql.batch_execute(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput', false, true)"
    ))
    .await
    .unwrap();

    // Plain DML: insert (with NULL and an enum, so a Type message), update without and with a
    // key change, an unchanged out-of-line TOAST value, delete, and RI FULL old rows.
    sql.batch_execute(
        "INSERT INTO t VALUES (1, NULL, repeat('x', 10000), 'calm');
         UPDATE t SET note = 'n' WHERE id = 1;
         UPDATE t SET id = 2 WHERE id = 1;
         DELETE FROM t WHERE id = 2;
         INSERT INTO full_t VALUES (1, 'a'), (1, 'a');
         UPDATE full_t SET b = 'b' WHERE a = 1;
         DELETE FROM full_t;
         INSERT INTO ident DEFAULT VALUES;
         TRUNCATE t, child, ident RESTART IDENTITY CASCADE;",
    )
    .await
    .unwrap();
    // Logical messages, transactional and not.
    sql.batch_execute(
        "BEGIN; SELECT pg_logical_emit_message(true, 'pfx-tx', 'inside'); COMMIT;
         SELECT pg_logical_emit_message(false, 'pfx-now', '\\x00ff'::bytea);",
    )
    .await
    .unwrap();
    // A transaction from a replication origin.
    sql.batch_execute(&format!(
        "SELECT pg_replication_origin_session_setup('{origin}');
         BEGIN;
         SELECT pg_replication_origin_xact_setup('0/ABCDEF', now());
         INSERT INTO t VALUES (10, 'from-origin', NULL, NULL);
         COMMIT;
         SELECT pg_replication_origin_session_reset();"
    ))
    .await
    .unwrap();
    // Streamed transactions (larger than logical_decoding_work_mem): one commits, one aborts.
    sql.batch_execute(
        "BEGIN; INSERT INTO t SELECT g, repeat('s', 100), NULL, NULL
                FROM generate_series(100, 3099) g; COMMIT;
         BEGIN; INSERT INTO t SELECT g, repeat('a', 100), NULL, NULL
                FROM generate_series(5000, 7999) g; ROLLBACK;",
    )
    .await
    .unwrap();
    // Two-phase: commit prepared, rollback prepared, and a streamed prepare. COMMIT and
    // ROLLBACK PREPARED each need a statement of their own.
    for stmt in [
        "BEGIN; INSERT INTO t VALUES (20, 'p1', NULL, NULL); PREPARE TRANSACTION 'kinds-g1'",
        "COMMIT PREPARED 'kinds-g1'",
        "BEGIN; INSERT INTO t VALUES (21, 'p2', NULL, NULL); PREPARE TRANSACTION 'kinds-g2'",
        "ROLLBACK PREPARED 'kinds-g2'",
        "BEGIN; INSERT INTO t SELECT g, repeat('q', 100), NULL, NULL
                FROM generate_series(10000, 12999) g;
         PREPARE TRANSACTION 'kinds-g3'",
        "COMMIT PREPARED 'kinds-g3'",
    ] {
        sql.batch_execute(stmt).await.unwrap();
    }
    sql.batch_execute(&format!(
        "SELECT pg_logical_emit_message(false, '{END_PREFIX}', '')"
    ))
    .await
    .unwrap();

    for binary in [false, true] {
        let msgs = decode_all(&url, &slot, binary).await;
        let tags: BTreeSet<char> = msgs.iter().map(|m| m.tag() as char).collect();
        let want: BTreeSet<char> = "BCORYIUDTMSEcAbPKrp".chars().collect();
        let missing: Vec<char> = want.difference(&tags).copied().collect();
        assert!(
            missing.is_empty(),
            "binary={binary}: missing kinds {missing:?}"
        );
        check_contents(&msgs, &origin, binary);
    }
    // The last walsender may still be exiting (the slot is active until it has).
    let drop = format!("SELECT pg_drop_replication_slot('{slot}')");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = sql.batch_execute(&drop).await {
        assert!(std::time::Instant::now() < deadline, "drop slot: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_contents(msgs: &[Message], origin: &str, binary: bool) {
    // Relation: the key column is flagged, RI FULL is reported.
    let rel_t = msgs
        .iter()
        .find_map(|m| match m {
            Message::Relation(r) if r.name == "t" => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!(rel_t.namespace, "public");
    let keys: Vec<&str> = rel_t
        .columns
        .iter()
        .filter(|c| c.is_key())
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(keys, ["id"]);
    assert!(msgs.iter().any(|m| matches!(m,
        Message::Relation(r) if r.name == "full_t"
            && r.replica_identity == pgoutput::ReplicaIdentity::Full)));
    // The enum's Type message names it.
    assert!(msgs
        .iter()
        .any(|m| matches!(m, Message::Type(t) if t.name == "mood" && t.namespace == "public")));

    // The first insert: a NULL, and text or binary values as asked.
    let first = msgs
        .iter()
        .find_map(|m| match m {
            Message::Insert(i) if i.relation == rel_t.oid => Some(i),
            _ => None,
        })
        .unwrap();
    assert_eq!(first.new.0[1], Value::Null);
    match &first.new.0[0] {
        Value::Text(b) => {
            assert!(!binary);
            assert_eq!(&b[..], b"1");
        }
        Value::Binary(b) => {
            assert!(binary);
            assert_eq!(&b[..], &1i32.to_be_bytes());
        }
        other => panic!("id value {other:?}"),
    }

    // Updates of t: the note update leaves the out-of-line TOAST value unchanged; the key change
    // carries the old key.
    let updates: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::Update(u) if u.relation == rel_t.oid => Some(u),
            _ => None,
        })
        .collect();
    assert!(updates[0].old.is_none());
    assert_eq!(updates[0].new.0[2], Value::Unchanged);
    let moved = updates[1].old.as_ref().expect("old key on key change");
    assert_eq!(moved.kind, OldKind::Key);
    // RI FULL: old rows are whole rows.
    assert!(msgs.iter().any(|m| matches!(m,
        Message::Update(u) if u.old.as_ref().is_some_and(|o| o.kind == OldKind::Full))));
    assert!(msgs
        .iter()
        .any(|m| matches!(m, Message::Delete(d) if d.old.kind == OldKind::Full)));
    assert!(msgs
        .iter()
        .any(|m| matches!(m, Message::Delete(d) if d.old.kind == OldKind::Key)));

    // TRUNCATE … RESTART IDENTITY CASCADE: both flags, all three relations.
    let tr = msgs
        .iter()
        .find_map(|m| match m {
            Message::Truncate(t) => Some(t),
            _ => None,
        })
        .unwrap();
    assert!(tr.cascade() && tr.restart_identity());
    assert_eq!(tr.relations.len(), 3);

    // Logical messages.
    assert!(msgs.iter().any(|m| matches!(m,
        Message::Message(l) if l.prefix == "pfx-tx" && l.transactional && &l.content[..] == b"inside")));
    assert!(msgs.iter().any(|m| matches!(m,
        Message::Message(l) if l.prefix == "pfx-now" && !l.transactional && l.content[..] == [0u8, 0xff])));

    // The origin's name and the LSN it was given.
    let o = msgs
        .iter()
        .find_map(|m| match m {
            Message::Origin(o) => Some(o),
            _ => None,
        })
        .unwrap();
    assert_eq!(o.name, origin);
    assert_eq!(o.commit_lsn, "0/ABCDEF".parse::<Lsn>().unwrap());

    // Streamed transactions: the committed one ends in StreamCommit, the aborted one in a
    // top-level StreamAbort (xid = subxid); changes inside a stream carry the xid.
    let committed = msgs
        .iter()
        .find_map(|m| match m {
            Message::StreamCommit(c) => Some(c.xid),
            _ => None,
        })
        .unwrap();
    assert!(msgs
        .iter()
        .any(|m| matches!(m, Message::Insert(i) if i.xid == Some(committed))));
    assert!(msgs
        .iter()
        .any(|m| matches!(m, Message::StreamAbort(a) if a.xid == a.subxid)));

    // Two-phase: each gid's path.
    let gids = |tag: u8| -> Vec<String> {
        msgs.iter()
            .filter(|m| m.tag() == tag)
            .map(|m| match m {
                Message::BeginPrepare(p) => p.gid.clone(),
                Message::Prepare(p) | Message::StreamPrepare(p) => p.gid.clone(),
                Message::CommitPrepared(p) => p.gid.clone(),
                Message::RollbackPrepared(p) => p.gid.clone(),
                _ => unreachable!(),
            })
            .collect()
    };
    assert_eq!(gids(b'b'), ["kinds-g1", "kinds-g2"]);
    assert_eq!(gids(b'P'), ["kinds-g1", "kinds-g2"]);
    assert_eq!(gids(b'p'), ["kinds-g3"]);
    assert_eq!(gids(b'K'), ["kinds-g1", "kinds-g3"]);
    assert_eq!(gids(b'r'), ["kinds-g2"]);
}
