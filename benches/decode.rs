//! Decoding throughput of `pgoutput` messages: a realistic stream of small transactions on a
//! 12-column patient table, measured in bytes and in messages per second.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgcarve::lsn::Lsn;
use pgcarve::pgoutput::{
    decode, encode, Begin, Column, Commit, Insert, Message, OldKind, OldTuple, Relation,
    ReplicaIdentity, Tuple, Update, Value,
};

const TRANSACTIONS: u64 = 1_000;
const RELATION: u32 = 16_390;

fn text(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// One synthetic patient row with values of typical sizes.
fn row(id: u64) -> Tuple {
    let note: String = "Patient reports mild dizziness after dose change; BP stable. "
        .chars()
        .cycle()
        .take(200)
        .collect();
    Tuple(vec![
        text(&id.to_string()),
        text(&format!("3f2c9a1e-7b4d-4e21-9c6a-{id:012x}")),
        text(&format!("MRN-{id:08}")),
        text("Margaret"),
        text("Okonkwo-Fitzgerald"),
        text("1957-03-14"),
        text("F"),
        text("+1-555-0142"),
        text("m.okonkwo@example.org"),
        text("2024-05-17 08:42:13.512934+00"),
        text("2024-05-17 09:03:51.004211+00"),
        text(&note),
    ])
}

fn relation() -> Message {
    let names = [
        ("id", 20),
        ("patient_uuid", 2950),
        ("mrn", 1043),
        ("first_name", 1043),
        ("last_name", 1043),
        ("birth_date", 1082),
        ("sex", 1042),
        ("phone", 1043),
        ("email", 1043),
        ("admitted_at", 1184),
        ("updated_at", 1184),
        ("note", 25),
    ];
    Message::Relation(Relation {
        xid: None,
        oid: RELATION,
        namespace: "clinical".into(),
        name: "patients".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: names
            .iter()
            .enumerate()
            .map(|(i, &(name, type_oid))| Column {
                flags: u8::from(i == 0),
                name: name.into(),
                type_oid,
                type_modifier: -1,
            })
            .collect(),
    })
}

/// A Relation, then transactions of Begin / 5 Inserts / an Update with a key tuple / Commit.
fn stream() -> Vec<Bytes> {
    let mut messages = vec![relation()];
    let mut lsn = 0x16_B374_D848_u64;
    let mut id = 1_000_000_u64;
    for xid in 0..TRANSACTIONS {
        let xid = 5_000 + xid as u32;
        messages.push(Message::Begin(Begin {
            final_lsn: Lsn(lsn + 4_000),
            commit_time: 769_000_000_000_000 + i64::from(xid),
            xid,
        }));
        for _ in 0..5 {
            id += 1;
            messages.push(Message::Insert(Insert {
                xid: None,
                relation: RELATION,
                new: row(id),
            }));
        }
        let mut key = vec![Value::Null; 12];
        key[0] = text(&(id - 2).to_string());
        messages.push(Message::Update(Update {
            xid: None,
            relation: RELATION,
            old: Some(OldTuple {
                kind: OldKind::Key,
                tuple: Tuple(key),
            }),
            new: row(id + 1_000_000),
        }));
        messages.push(Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(lsn + 4_000),
            end_lsn: Lsn(lsn + 4_100),
            commit_time: 769_000_000_000_000 + i64::from(xid),
        }));
        lsn += 5_000;
    }
    messages
        .iter()
        .map(|m| {
            let mut out = BytesMut::new();
            encode(m, false, &mut out);
            out.freeze()
        })
        .collect()
}

fn decode_all(messages: &[Bytes]) -> usize {
    let mut decoded = 0;
    for payload in messages {
        let msg = decode(payload.clone(), false).expect("the bench stream is valid");
        black_box(&msg);
        decoded += 1;
    }
    decoded
}

fn bench(c: &mut Criterion) {
    let messages = stream();
    let bytes: u64 = messages.iter().map(|m| m.len() as u64).sum();

    let mut group = c.benchmark_group("pgoutput_decode");
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("patients_stream", |b| {
        b.iter(|| decode_all(black_box(&messages)))
    });
    group.finish();

    let mut group = c.benchmark_group("pgoutput_decode_messages");
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.bench_function("patients_stream", |b| {
        b.iter(|| decode_all(black_box(&messages)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
