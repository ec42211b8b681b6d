//! Tests of the pgoutput decoder: hand-built messages of every kind, malformed input, and
//! properties (never panics; encode then decode is the identity).
use super::*;
use bytes::BytesMut;
use proptest::prelude::*;

/// A tiny big-endian byte builder, independent of `encode`, for hand-written fixtures.
struct W(Vec<u8>);

impl W {
    fn tag(tag: u8) -> W {
        W(vec![tag])
    }
    fn u8(mut self, v: u8) -> W {
        self.0.push(v);
        self
    }
    fn i16(mut self, v: i16) -> W {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> W {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> W {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> W {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i64(mut self, v: i64) -> W {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn raw(mut self, b: &[u8]) -> W {
        self.0.extend_from_slice(b);
        self
    }
    fn s(self, s: &str) -> W {
        self.raw(s.as_bytes()).u8(0)
    }
    /// A text value: kind `t`, length, bytes.
    fn text(self, v: &str) -> W {
        self.u8(b't').i32(v.len() as i32).raw(v.as_bytes())
    }
}

fn dec(bytes: &[u8], in_stream: bool) -> Result<Message, DecodeError> {
    decode(Bytes::copy_from_slice(bytes), in_stream)
}

fn enc(msg: &Message, in_stream: bool) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(msg, in_stream, &mut out);
    out.to_vec()
}

fn text(v: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(v.as_bytes()))
}

/// The fixture decodes to `expected`, `encode` reproduces it byte for byte, every strict
/// prefix is an error and one extra byte is `TrailingBytes`.
fn check(w: W, in_stream: bool, expected: Message) {
    let bytes = w.0;
    assert_eq!(dec(&bytes, in_stream), Ok(expected.clone()));
    assert_eq!(
        enc(&expected, in_stream),
        bytes,
        "encode is decode's inverse"
    );
    for cut in 0..bytes.len() {
        assert!(
            dec(&bytes[..cut], in_stream).is_err(),
            "prefix of {cut} bytes decoded"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(
        dec(&longer, in_stream),
        Err(DecodeError::TrailingBytes { count: 1 })
    );
}

#[test]
fn begin_written_out_byte_by_byte() {
    let bytes = [
        b'B', // tag
        0, 0, 0, 0x16, 0xB3, 0x74, 0xD8, 0x48, // final LSN 16/B374D848
        0, 0, 0, 0, 0, 0, 0x01, 0x00, // commit time 256
        0, 0, 0x02, 0x10, // xid 528
    ];
    let expected = Message::Begin(Begin {
        final_lsn: Lsn(0x16_B374_D848),
        commit_time: 256,
        xid: 528,
    });
    check(W(bytes.to_vec()), false, expected.clone());
    // Begin never carries a stream xid, so `in_stream` does not matter.
    assert_eq!(dec(&bytes, true), Ok(expected));
}

#[test]
fn commit() {
    let w = W::tag(b'C').u8(0).u64(10).u64(20).i64(-5);
    let m = Commit {
        flags: 0,
        commit_lsn: Lsn(10),
        end_lsn: Lsn(20),
        commit_time: -5,
    };
    check(w, false, Message::Commit(m));
}

#[test]
fn origin() {
    let w = W::tag(b'O').u64(7).s("pg_16389");
    let m = Origin {
        commit_lsn: Lsn(7),
        name: "pg_16389".into(),
    };
    check(w, false, Message::Origin(m));
}

fn relation_bytes(prefix: W, identity: u8) -> W {
    prefix
        .u32(16_390)
        .s("")
        .s("patients")
        .u8(identity)
        .i16(3)
        .u8(1)
        .s("id")
        .u32(20)
        .i32(-1)
        .u8(0)
        .s("name")
        .u32(1043)
        .i32(104)
        .u8(0)
        .s("naïve_ü")
        .u32(25)
        .i32(-1)
}

fn relation_value(xid: Option<u32>, replica_identity: ReplicaIdentity) -> Relation {
    let col = |flags, name: &str, type_oid, type_modifier| Column {
        flags,
        name: name.into(),
        type_oid,
        type_modifier,
    };
    Relation {
        xid,
        oid: 16_390,
        namespace: String::new(),
        name: "patients".into(),
        replica_identity,
        columns: vec![
            col(1, "id", 20, -1),
            col(0, "name", 1043, 104),
            col(0, "naïve_ü", 25, -1),
        ],
    }
}

#[test]
fn relation_with_every_replica_identity() {
    for (byte, identity) in [
        (b'd', ReplicaIdentity::Default),
        (b'n', ReplicaIdentity::Nothing),
        (b'f', ReplicaIdentity::Full),
        (b'i', ReplicaIdentity::Index),
    ] {
        let w = relation_bytes(W::tag(b'R'), byte);
        check(w, false, Message::Relation(relation_value(None, identity)));
    }
}

#[test]
fn relation_in_stream_and_helpers() {
    let w = relation_bytes(W::tag(b'R').u32(999), b'd');
    let rel = relation_value(Some(999), ReplicaIdentity::Default);
    check(w, true, Message::Relation(rel.clone()));
    assert_eq!(rel.schema(), "pg_catalog");
    let keys: Vec<bool> = rel.columns.iter().map(Column::is_key).collect();
    assert_eq!(keys, [true, false, false]);
    let public = Relation {
        namespace: "public".into(),
        ..rel
    };
    assert_eq!(public.schema(), "public");
}

#[test]
fn relation_without_columns() {
    let w = W::tag(b'R').u32(1).s("s").s("t").u8(b'n').i16(0);
    let m = Relation {
        xid: None,
        oid: 1,
        namespace: "s".into(),
        name: "t".into(),
        replica_identity: ReplicaIdentity::Nothing,
        columns: vec![],
    };
    check(w, false, Message::Relation(m));
}

#[test]
fn type_message_outside_and_inside_stream() {
    let w = W::tag(b'Y').u32(16_400).s("public").s("mood");
    let m = TypeMessage {
        xid: None,
        oid: 16_400,
        namespace: "public".into(),
        name: "mood".into(),
    };
    check(w, false, Message::Type(m.clone()));
    let w = W::tag(b'Y').u32(77).u32(16_400).s("public").s("mood");
    check(w, true, Message::Type(TypeMessage { xid: Some(77), ..m }));
}

#[test]
fn insert_with_every_value_kind() {
    let w = W::tag(b'I')
        .u32(16_390)
        .u8(b'N')
        .i16(5)
        .text("42")
        .u8(b'n')
        .u8(b'u')
        .u8(b'b')
        .i32(3)
        .raw(&[0, 1, 0xff])
        .text("");
    let m = Insert {
        xid: None,
        relation: 16_390,
        new: Tuple(vec![
            text("42"),
            Value::Null,
            Value::Unchanged,
            Value::Binary(Bytes::from_static(&[0, 1, 0xff])),
            text(""),
        ]),
    };
    check(w, false, Message::Insert(m));
}

#[test]
fn insert_in_stream_and_empty_tuple() {
    let w = W::tag(b'I').u32(5).u32(16_390).u8(b'N').i16(0);
    let m = Insert {
        xid: Some(5),
        relation: 16_390,
        new: Tuple(vec![]),
    };
    check(w, true, Message::Insert(m));
}

fn new_row() -> (W, Tuple) {
    let w = W(vec![]).u8(b'N').i16(2).text("7").text("Bob");
    (w, Tuple(vec![text("7"), text("Bob")]))
}

#[test]
fn update_without_old_tuple() {
    let (row, new) = new_row();
    let w = W::tag(b'U').u32(16_390).raw(&row.0);
    let m = Update {
        xid: None,
        relation: 16_390,
        old: None,
        new,
    };
    check(w, false, Message::Update(m));
}

#[test]
fn update_with_key_tuple() {
    let (row, new) = new_row();
    let w = W::tag(b'U')
        .u32(16_390)
        .u8(b'K')
        .i16(2)
        .text("6")
        .u8(b'n')
        .raw(&row.0);
    let old = OldTuple {
        kind: OldKind::Key,
        tuple: Tuple(vec![text("6"), Value::Null]),
    };
    let m = Update {
        xid: None,
        relation: 16_390,
        old: Some(old),
        new,
    };
    check(w, false, Message::Update(m));
}

#[test]
fn update_with_full_old_tuple_in_stream() {
    let (row, new) = new_row();
    let w = W::tag(b'U')
        .u32(31)
        .u32(16_390)
        .u8(b'O')
        .i16(2)
        .text("7")
        .text("Rob")
        .raw(&row.0);
    let old = OldTuple {
        kind: OldKind::Full,
        tuple: Tuple(vec![text("7"), text("Rob")]),
    };
    let m = Update {
        xid: Some(31),
        relation: 16_390,
        old: Some(old),
        new: new.clone(),
    };
    check(w, true, Message::Update(m));
    // A new tuple with an unchanged TOAST value.
    let w = W::tag(b'U').u32(1).u8(b'N').i16(1).u8(b'u');
    let m = Update {
        xid: None,
        relation: 1,
        old: None,
        new: Tuple(vec![Value::Unchanged]),
    };
    check(w, false, Message::Update(m));
}

#[test]
fn delete_by_key_and_by_full_row() {
    let w = W::tag(b'D').u32(16_390).u8(b'K').i16(2).text("7").u8(b'n');
    let m = Delete {
        xid: None,
        relation: 16_390,
        old: OldTuple {
            kind: OldKind::Key,
            tuple: Tuple(vec![text("7"), Value::Null]),
        },
    };
    check(w, false, Message::Delete(m));
    let w = W::tag(b'D')
        .u32(8)
        .u32(16_390)
        .u8(b'O')
        .i16(2)
        .text("7")
        .text("Bob");
    let m = Delete {
        xid: Some(8),
        relation: 16_390,
        old: OldTuple {
            kind: OldKind::Full,
            tuple: Tuple(vec![text("7"), text("Bob")]),
        },
    };
    check(w, true, Message::Delete(m));
}

#[test]
fn truncate_options() {
    for (options, cascade, restart) in [
        (0, false, false),
        (1, true, false),
        (2, false, true),
        (3, true, true),
    ] {
        let w = W::tag(b'T').u32(2).u8(options).u32(16_390).u32(16_400);
        let m = Truncate {
            xid: None,
            options,
            relations: vec![16_390, 16_400],
        };
        assert_eq!(m.cascade(), cascade);
        assert_eq!(m.restart_identity(), restart);
        check(w, false, Message::Truncate(m));
    }
}

#[test]
fn truncate_in_stream() {
    let w = W::tag(b'T').u32(12).u32(1).u8(0).u32(16_390);
    let m = Truncate {
        xid: Some(12),
        options: 0,
        relations: vec![16_390],
    };
    check(w, true, Message::Truncate(m));
}

#[test]
fn logical_messages() {
    let w = W::tag(b'M').u8(1).u64(99).s("pgcarve").u32(3).raw(b"a\0b");
    let m = LogicalMessage {
        xid: None,
        transactional: true,
        lsn: Lsn(99),
        prefix: "pgcarve".into(),
        content: Bytes::from_static(b"a\0b"),
    };
    check(w, false, Message::Message(m.clone()));
    let w = W::tag(b'M').u32(4).u8(0).u64(99).s("pgcarve").u32(0);
    let m = LogicalMessage {
        xid: Some(4),
        transactional: false,
        content: Bytes::new(),
        ..m
    };
    check(w, true, Message::Message(m));
}

#[test]
fn stream_start_stop_commit_abort() {
    let first = StreamStart {
        xid: 700,
        first_segment: true,
    };
    check(
        W::tag(b'S').u32(700).u8(1),
        false,
        Message::StreamStart(first),
    );
    let later = StreamStart {
        xid: 700,
        first_segment: false,
    };
    check(
        W::tag(b'S').u32(700).u8(0),
        true,
        Message::StreamStart(later),
    );
    check(W::tag(b'E'), true, Message::StreamStop);
    let w = W::tag(b'c').u32(700).u8(0).u64(1000).u64(1100).i64(123);
    let m = StreamCommit {
        xid: 700,
        flags: 0,
        commit_lsn: Lsn(1000),
        end_lsn: Lsn(1100),
        commit_time: 123,
    };
    check(w, false, Message::StreamCommit(m));
    let w = W::tag(b'A').u32(700).u32(701);
    let m = StreamAbort {
        xid: 700,
        subxid: 701,
    };
    check(w, false, Message::StreamAbort(m));
}

#[test]
fn two_phase_messages() {
    let w = W::tag(b'b').u64(1).u64(2).i64(3).u32(4).s("gid-1");
    let m = BeginPrepare {
        prepare_lsn: Lsn(1),
        end_lsn: Lsn(2),
        prepare_time: 3,
        xid: 4,
        gid: "gid-1".into(),
    };
    check(w, false, Message::BeginPrepare(m));

    let prepare = Prepare {
        flags: 0,
        prepare_lsn: Lsn(5),
        end_lsn: Lsn(6),
        prepare_time: 7,
        xid: 8,
        gid: "gid-2".into(),
    };
    let w = || W::u8(W(vec![]), 0).u64(5).u64(6).i64(7).u32(8).s("gid-2");
    check(
        W::tag(b'P').raw(&w().0),
        false,
        Message::Prepare(prepare.clone()),
    );
    check(
        W::tag(b'p').raw(&w().0),
        false,
        Message::StreamPrepare(prepare),
    );

    let w = W::tag(b'K').u8(0).u64(9).u64(10).i64(11).u32(12).s("gid-3");
    let m = CommitPrepared {
        flags: 0,
        commit_lsn: Lsn(9),
        end_lsn: Lsn(10),
        commit_time: 11,
        xid: 12,
        gid: "gid-3".into(),
    };
    check(w, false, Message::CommitPrepared(m));

    let w = W::tag(b'r')
        .u8(0)
        .u64(13)
        .u64(14)
        .i64(15)
        .i64(16)
        .u32(17)
        .s("gid-4");
    let m = RollbackPrepared {
        flags: 0,
        prepare_end_lsn: Lsn(13),
        rollback_end_lsn: Lsn(14),
        prepare_time: 15,
        rollback_time: 16,
        xid: 17,
        gid: "gid-4".into(),
    };
    check(w, false, Message::RollbackPrepared(m));
}

#[test]
fn empty_payload_and_unknown_tags() {
    assert_eq!(
        dec(&[], false),
        Err(DecodeError::UnexpectedEnd {
            context: "message tag"
        })
    );
    for tag in 0..=u8::MAX {
        if !TAGS.contains(&tag) {
            assert_eq!(dec(&[tag, 0, 0], false), Err(DecodeError::UnknownTag(tag)));
        }
    }
}

#[test]
fn unknown_tuple_kind() {
    let w = W::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x');
    assert_eq!(dec(&w.0, false), Err(DecodeError::UnknownTupleKind(b'x')));
}

#[test]
fn negative_counts_and_lengths() {
    let neg = |context| Err(DecodeError::NegativeCount { context });
    let w = W::tag(b'I').u32(1).u8(b'N').i16(-1);
    assert_eq!(dec(&w.0, false), neg("tuple column count"));
    let w = W::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-1);
    assert_eq!(dec(&w.0, false), neg("tuple value length"));
    let w = W::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'b').i32(i32::MIN);
    assert_eq!(dec(&w.0, false), neg("tuple value length"));
    let w = W::tag(b'R').u32(1).s("s").s("t").u8(b'd').i16(-3);
    assert_eq!(dec(&w.0, false), neg("Relation column count"));
}

#[test]
fn hostile_counts_fail_without_huge_allocations() {
    let end = |context| Err(DecodeError::UnexpectedEnd { context });
    let w = W::tag(b'I').u32(1).u8(b'N').i16(i16::MAX).u8(b'n');
    assert_eq!(dec(&w.0, false), end("tuple column kind"));
    let w = W::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(1)
        .u8(b't')
        .i32(i32::MAX)
        .raw(b"x");
    assert_eq!(dec(&w.0, false), end("tuple value"));
    let w = W::tag(b'T').u32(u32::MAX).u8(0).u32(1);
    assert_eq!(dec(&w.0, false), end("Truncate relation oid"));
    let w = W::tag(b'M').u8(0).u64(1).s("p").u32(u32::MAX).raw(b"x");
    assert_eq!(dec(&w.0, false), end("Message content"));
    let w = W::tag(b'R').u32(1).s("s").s("t").u8(b'd').i16(i16::MAX);
    assert_eq!(dec(&w.0, false), end("column flags"));
}

#[test]
fn strings_must_be_terminated_utf8() {
    let w = W::tag(b'O').u64(1).raw(b"Alice\xff").u8(0);
    let err = dec(&w.0, false).unwrap_err();
    assert_eq!(
        err,
        DecodeError::InvalidUtf8 {
            context: "Origin name"
        }
    );
    assert!(!format!("{err} {err:?}").contains("Alice"));
    let w = W::tag(b'O').u64(1).raw(b"Alice");
    let err = dec(&w.0, false).unwrap_err();
    assert_eq!(
        err,
        DecodeError::MissingNul {
            context: "Origin name"
        }
    );
    assert!(!format!("{err} {err:?}").contains("Alice"));
}

#[test]
fn markers_are_checked() {
    let w = W::tag(b'I').u32(1).u8(b'K').i16(0);
    assert_eq!(
        dec(&w.0, false),
        Err(DecodeError::MissingMarker {
            expected: "N",
            found: b'K'
        })
    );
    let w = W::tag(b'U').u32(1).u8(b'X').i16(0);
    assert_eq!(
        dec(&w.0, false),
        Err(DecodeError::MissingMarker {
            expected: "K, O or N",
            found: b'X'
        })
    );
    let w = W::tag(b'U').u32(1).u8(b'K').i16(0).u8(b'O').i16(0);
    assert_eq!(
        dec(&w.0, false),
        Err(DecodeError::MissingMarker {
            expected: "N",
            found: b'O'
        })
    );
    let w = W::tag(b'D').u32(1).u8(b'N').i16(0);
    assert_eq!(
        dec(&w.0, false),
        Err(DecodeError::MissingMarker {
            expected: "K or O",
            found: b'N'
        })
    );
}

#[test]
fn unknown_replica_identity_and_flags() {
    let w = W::tag(b'R').u32(1).s("s").s("t").u8(b'x').i16(0);
    assert_eq!(
        dec(&w.0, false),
        Err(DecodeError::UnknownReplicaIdentity(b'x'))
    );
    let w = W::tag(b'S').u32(1).u8(2);
    assert_eq!(
        dec(&w.0, false),
        Err(DecodeError::UnknownFlags {
            context: "Stream Start first segment",
            found: 2
        })
    );
    let w = W::tag(b'M').u8(3).u64(1).s("p").u32(0);
    assert_eq!(
        dec(&w.0, false),
        Err(DecodeError::UnknownFlags {
            context: "Message flags",
            found: 3
        })
    );
}

#[test]
fn trailing_bytes() {
    let w = W::tag(b'E').raw(b"abc");
    assert_eq!(
        dec(&w.0, false),
        Err(DecodeError::TrailingBytes { count: 3 })
    );
    // An Insert decoded without the stream xid it was sent with does not line up.
    let w = W::tag(b'I').u32(5).u32(16_390).u8(b'N').i16(0);
    assert!(dec(&w.0, false).is_err());
}

#[test]
fn debug_never_shows_values() {
    let w = W::tag(b'U')
        .u32(1)
        .u8(b'O')
        .i16(2)
        .text("Alice")
        .u8(b'b')
        .i32(5)
        .raw(b"Alice")
        .u8(b'N')
        .i16(2)
        .text("Alice")
        .u8(b'n');
    let msg = dec(&w.0, false).unwrap();
    for shown in [format!("{msg:?}"), format!("{msg:#?}")] {
        assert!(!shown.contains("Alice"), "{shown}");
        assert!(!shown.contains("65, 108"), "{shown}"); // "Al" as a byte list
    }
    assert!(format!("{msg:?}").contains("Text(5 bytes)"));
    assert!(format!("{msg:?}").contains("Binary(5 bytes)"));
    assert_eq!(format!("{:?}", Value::Null), "Null");
    assert_eq!(format!("{:?}", Value::Unchanged), "Unchanged");

    let w = W::tag(b'M').u8(1).u64(1).s("audit").u32(5).raw(b"Alice");
    let msg = dec(&w.0, false).unwrap();
    let shown = format!("{msg:?}");
    assert!(!shown.contains("Alice"), "{shown}");
    assert!(shown.contains("content: 5 bytes"), "{shown}");
}

#[test]
fn values_are_slices_of_the_payload() {
    let w = W::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(2)
        .text("hello")
        .u8(b'b')
        .i32(2)
        .raw(b"hi");
    let payload = Bytes::from(w.0);
    let start = payload.as_ptr() as usize;
    let range = start..start + payload.len();
    let Message::Insert(insert) = decode(payload.clone(), false).unwrap() else {
        panic!("not an insert");
    };
    for value in &insert.new.0 {
        let (Value::Text(b) | Value::Binary(b)) = value else {
            panic!("not a text or binary value");
        };
        assert!(range.contains(&(b.as_ptr() as usize)), "value was copied");
    }
}

#[test]
fn tags_round_trip_through_message_tag() {
    let msg = Message::StreamStop;
    assert_eq!(msg.tag(), b'E');
    assert_eq!(TAGS.len(), 19);
    let mut sorted = TAGS.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), TAGS.len(), "tags are distinct");
}

// ------------------------------------------------------------------------------------------
// Property tests
// ------------------------------------------------------------------------------------------

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn name() -> impl Strategy<Value = String> {
    "[^\\x00]{0,12}"
}

fn blob() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(Value::Unchanged),
        blob().prop_map(Value::Text),
        blob().prop_map(Value::Binary),
    ]
}

fn tuple() -> impl Strategy<Value = Tuple> {
    proptest::collection::vec(value(), 0..8).prop_map(Tuple)
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    let kind = prop_oneof![Just(OldKind::Key), Just(OldKind::Full)];
    (kind, tuple()).prop_map(|(kind, tuple)| OldTuple { kind, tuple })
}

fn xid(in_stream: bool) -> BoxedStrategy<Option<u32>> {
    if in_stream {
        any::<u32>().prop_map(Some).boxed()
    } else {
        Just(None).boxed()
    }
}

fn column() -> impl Strategy<Value = Column> {
    (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| Column {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    )
}

fn identity() -> impl Strategy<Value = ReplicaIdentity> {
    prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ]
}

fn prepare() -> impl Strategy<Value = Prepare> {
    (
        any::<u8>(),
        lsn(),
        lsn(),
        any::<i64>(),
        any::<u32>(),
        name(),
    )
        .prop_map(
            |(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| Prepare {
                flags,
                prepare_lsn,
                end_lsn,
                prepare_time,
                xid,
                gid,
            },
        )
}

/// Any message, with stream xids present exactly when `in_stream`.
fn message(in_stream: bool) -> BoxedStrategy<Message> {
    let x = || xid(in_stream);
    let arms: Vec<BoxedStrategy<Message>> = vec![
        (lsn(), any::<i64>(), any::<u32>())
            .prop_map(|(final_lsn, commit_time, xid)| {
                Message::Begin(Begin {
                    final_lsn,
                    commit_time,
                    xid,
                })
            })
            .boxed(),
        (any::<u8>(), lsn(), lsn(), any::<i64>())
            .prop_map(|(flags, commit_lsn, end_lsn, commit_time)| {
                Message::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                })
            })
            .boxed(),
        (lsn(), name())
            .prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name }))
            .boxed(),
        (
            x(),
            any::<u32>(),
            name(),
            name(),
            identity(),
            proptest::collection::vec(column(), 0..6),
        )
            .prop_map(|(xid, oid, namespace, name, replica_identity, columns)| {
                Message::Relation(Relation {
                    xid,
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            })
            .boxed(),
        (x(), any::<u32>(), name(), name())
            .prop_map(|(xid, oid, namespace, name)| {
                Message::Type(TypeMessage {
                    xid,
                    oid,
                    namespace,
                    name,
                })
            })
            .boxed(),
        (x(), any::<u32>(), tuple())
            .prop_map(|(xid, relation, new)| Message::Insert(Insert { xid, relation, new }))
            .boxed(),
        (
            x(),
            any::<u32>(),
            proptest::option::of(old_tuple()),
            tuple(),
        )
            .prop_map(|(xid, relation, old, new)| {
                Message::Update(Update {
                    xid,
                    relation,
                    old,
                    new,
                })
            })
            .boxed(),
        (x(), any::<u32>(), old_tuple())
            .prop_map(|(xid, relation, old)| Message::Delete(Delete { xid, relation, old }))
            .boxed(),
        (
            x(),
            any::<u8>(),
            proptest::collection::vec(any::<u32>(), 0..6),
        )
            .prop_map(|(xid, options, relations)| {
                Message::Truncate(Truncate {
                    xid,
                    options,
                    relations,
                })
            })
            .boxed(),
        (x(), any::<bool>(), lsn(), name(), blob())
            .prop_map(|(xid, transactional, lsn, prefix, content)| {
                Message::Message(LogicalMessage {
                    xid,
                    transactional,
                    lsn,
                    prefix,
                    content,
                })
            })
            .boxed(),
        (any::<u32>(), any::<bool>())
            .prop_map(|(xid, first_segment)| {
                Message::StreamStart(StreamStart { xid, first_segment })
            })
            .boxed(),
        Just(Message::StreamStop).boxed(),
        (any::<u32>(), any::<u8>(), lsn(), lsn(), any::<i64>())
            .prop_map(|(xid, flags, commit_lsn, end_lsn, commit_time)| {
                Message::StreamCommit(StreamCommit {
                    xid,
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                })
            })
            .boxed(),
        (any::<u32>(), any::<u32>())
            .prop_map(|(xid, subxid)| Message::StreamAbort(StreamAbort { xid, subxid }))
            .boxed(),
        (lsn(), lsn(), any::<i64>(), any::<u32>(), name())
            .prop_map(|(prepare_lsn, end_lsn, prepare_time, xid, gid)| {
                Message::BeginPrepare(BeginPrepare {
                    prepare_lsn,
                    end_lsn,
                    prepare_time,
                    xid,
                    gid,
                })
            })
            .boxed(),
        prepare().prop_map(Message::Prepare).boxed(),
        (
            any::<u8>(),
            lsn(),
            lsn(),
            any::<i64>(),
            any::<u32>(),
            name(),
        )
            .prop_map(|(flags, commit_lsn, end_lsn, commit_time, xid, gid)| {
                Message::CommitPrepared(CommitPrepared {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                    xid,
                    gid,
                })
            })
            .boxed(),
        (
            any::<u8>(),
            lsn(),
            lsn(),
            any::<i64>(),
            any::<i64>(),
            any::<u32>(),
            name(),
        )
            .prop_map(
                |(
                    flags,
                    prepare_end_lsn,
                    rollback_end_lsn,
                    prepare_time,
                    rollback_time,
                    xid,
                    gid,
                )| {
                    Message::RollbackPrepared(RollbackPrepared {
                        flags,
                        prepare_end_lsn,
                        rollback_end_lsn,
                        prepare_time,
                        rollback_time,
                        xid,
                        gid,
                    })
                },
            )
            .boxed(),
        prepare().prop_map(Message::StreamPrepare).boxed(),
    ];
    proptest::strategy::Union::new(arms).boxed()
}

fn stream_and_message() -> impl Strategy<Value = (bool, Message)> {
    any::<bool>().prop_flat_map(|in_stream| (Just(in_stream), message(in_stream)))
}

proptest! {
    #[test]
    fn any_bytes_decode_without_panicking(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        in_stream: bool,
    ) {
        let _ = decode(Bytes::from(bytes), in_stream);
    }

    #[test]
    fn any_body_after_a_valid_tag_decodes_without_panicking(
        tag in proptest::sample::select(TAGS.to_vec()),
        body in proptest::collection::vec(any::<u8>(), 0..256),
        in_stream: bool,
    ) {
        let mut bytes = vec![tag];
        bytes.extend(body);
        let _ = decode(Bytes::from(bytes), in_stream);
    }

    #[test]
    fn encode_then_decode_is_identity((in_stream, msg) in stream_and_message()) {
        let mut out = BytesMut::new();
        encode(&msg, in_stream, &mut out);
        prop_assert_eq!(decode(out.freeze(), in_stream), Ok(msg));
    }

    #[test]
    fn damaged_encodings_never_panic_and_cuts_never_decode(
        (in_stream, msg) in stream_and_message(),
        at in any::<prop::sample::Index>(),
        byte: u8,
    ) {
        let mut out = BytesMut::new();
        encode(&msg, in_stream, &mut out);
        let bytes = out.to_vec();
        let i = at.index(bytes.len());
        prop_assert!(dec(&bytes[..i], in_stream).is_err());
        let mut damaged = bytes.clone();
        damaged[i] = byte;
        let _ = dec(&damaged, in_stream);
        let _ = dec(&damaged, !in_stream);
    }
}
