use super::*;
use crate::link::{Change, CommitInfo, XactInfo};

fn rel() -> Arc<crate::link::RelationInfo> {
    crate::link::change::test_relation("t", 0)
}

/// A chunk of `n` inserts of the transaction ending at `lsn`.
fn chunk(lsn: u64, n: usize) -> ApplyMsg {
    let rel = rel();
    ApplyMsg::Chunk {
        xact: XactInfo {
            final_lsn: Lsn(lsn),
            commit_time: 0,
            xid: 1,
        },
        changes: (0..n)
            .map(|_| Change::Insert {
                rel: rel.clone(),
                new: Default::default(),
            })
            .collect(),
        commit: Some(CommitInfo { end_lsn: Lsn(lsn) }),
    }
}

fn lsn_of(m: &ApplyMsg) -> u64 {
    match m {
        ApplyMsg::Chunk { xact, .. } => xact.final_lsn.0,
        ApplyMsg::Barrier(_) => u64::MAX,
        ApplyMsg::Halt(_) => u64::MAX - 1,
    }
}

fn spool(dir: &std::path::Path, max_bytes: u64, stall_ms: u64) -> Option<SpoolSettings> {
    Some(SpoolSettings {
        dir: dir.to_path_buf(),
        target: "billing".into(),
        max_bytes,
        stall: Duration::from_millis(stall_ms),
    })
}

fn queued(p: Push) -> bool {
    matches!(p, Push::Queued)
}

#[tokio::test]
async fn bounded_by_changes_and_room_returns_on_receipt() {
    let (tx, mut rx) = channel(10, None);
    assert!(queued(tx.try_push(chunk(1, 6), true)));
    assert!(queued(tx.try_push(chunk(2, 0), true))); // weighs 1
                                                     // 7 of 10 taken: 3 more fit, 4 do not; without a spool the reader waits, forever.
    assert!(matches!(
        tx.try_push(chunk(3, 4), true),
        Push::Wait(_, None)
    ));
    assert!(queued(tx.try_push(chunk(3, 3), true)));
    assert_eq!(rx.try_recv().map(|m| lsn_of(&m)), Some(1));
    assert_eq!(rx.try_recv().map(|m| lsn_of(&m)), Some(2));
    assert_eq!(rx.try_recv().map(|m| lsn_of(&m)), Some(3));
    // A chunk heavier than the whole bound still fits alone.
    assert!(queued(tx.try_push(chunk(4, 25), true)));
    assert!(
        matches!(rx.recv().await, Ok(Some(ApplyMsg::Chunk { changes, .. })) if changes.len() == 25)
    );
    drop(rx);
    assert!(matches!(tx.try_push(chunk(5, 1), true), Push::Closed));
}

#[tokio::test]
async fn a_stalled_target_is_spooled_for_and_order_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = channel(4, spool(dir.path(), 1 << 20, 60_000));
    rx.set_stalled(true);
    let mut outcomes = Vec::new();
    for lsn in 1..=6 {
        outcomes.push(tx.try_push(chunk(lsn, 2), true));
    }
    let spooled = outcomes
        .iter()
        .filter(|p| matches!(p, Push::Spooled))
        .count();
    assert_eq!(spooled, 4, "two chunks fill memory, the rest goes to disk");
    assert!(tx.spooled_bytes() > 0);
    assert!(dir.path().join("billing.spool").exists());
    // The task takes again: memory first, then the spool; a push meanwhile goes behind.
    rx.set_stalled(false);
    let mut got = vec![lsn_of(&rx.recv().await.unwrap().unwrap())];
    assert!(matches!(tx.try_push(chunk(7, 1), true), Push::Spooled));
    while let Some(m) = rx.try_recv() {
        got.push(lsn_of(&m));
    }
    assert_eq!(got, vec![1, 2, 3, 4, 5, 6, 7]);
    assert!(tx.is_empty());
    // Read back whole: the next message is in memory again, and the file is gone.
    assert!(queued(tx.try_push(chunk(8, 1), true)));
    assert!(!dir.path().join("billing.spool").exists());
}

#[tokio::test]
async fn a_target_that_takes_nothing_is_waited_for_then_spooled_for() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = channel(2, spool(dir.path(), 1 << 20, 200));
    assert!(queued(tx.try_push(chunk(1, 2), true)));
    let Push::Wait(msg, Some(at)) = tx.try_push(chunk(2, 2), true) else {
        panic!("a taking target is waited for")
    };
    assert!(at > Instant::now());
    tokio::time::sleep_until(at.into()).await;
    assert!(
        matches!(tx.try_push(msg, true), Push::Spooled),
        "not taking for the stall time"
    );
    assert_eq!(rx.try_recv().map(|m| lsn_of(&m)), Some(1));
    assert_eq!(rx.try_recv().map(|m| lsn_of(&m)), Some(2));
}

#[tokio::test]
async fn a_full_spool_detaches_until_a_barrier_and_keeps_what_it_had() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = channel(1, spool(dir.path(), 200, 60_000));
    rx.set_stalled(true);
    assert!(queued(tx.try_push(chunk(1, 1), true)));
    assert!(matches!(tx.try_push(chunk(2, 1), true), Push::Spooled));
    let mut first = None;
    for lsn in 3..20 {
        if let Push::Dropped { first: f, reason } = tx.try_push(chunk(lsn, 1), true) {
            if f {
                assert!(reason.contains("apply.spool_max_bytes"), "{reason}");
                first.get_or_insert(lsn);
            }
        }
    }
    let first = first.expect("the bound is reached");
    assert!(tx.is_detached());
    assert!(matches!(
        tx.try_push(chunk(99, 1), true),
        Push::Dropped { first: false, .. }
    ));
    // A halt is never dropped: it must stop the target before it could rejoin.
    assert!(matches!(
        tx.try_push(ApplyMsg::Halt("x".into()), true),
        Push::Spooled
    ));
    // What was queued before the drop is still applied, then the halt.
    rx.set_stalled(false);
    let lsns: Vec<u64> = std::iter::from_fn(|| rx.try_recv())
        .map(|m| lsn_of(&m))
        .collect();
    let mut expected: Vec<u64> = (1..first).collect();
    expected.push(u64::MAX - 1);
    assert_eq!(lsns, expected);
    assert!(
        tx.is_empty() && tx.is_detached(),
        "done with what it holds: time to rejoin"
    );
    // The rejoin: the stream restart's barrier ends the detachment; what follows is taken.
    let (reply, answer) = oneshot::channel();
    assert!(queued(tx.try_push(ApplyMsg::Barrier(reply), true)));
    assert!(!tx.is_detached());
    let Some(ApplyMsg::Barrier(r)) = rx.try_recv() else {
        panic!("the barrier first")
    };
    assert!(queued(tx.try_push(chunk(100, 1), true)));
    r.send(Lsn(7)).unwrap();
    assert_eq!(answer.await.unwrap(), Lsn(7));
    assert_eq!(rx.try_recv().map(|m| lsn_of(&m)), Some(100));
}

#[tokio::test]
async fn a_stalled_task_answers_barriers_at_once_and_they_stay_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = channel(1, spool(dir.path(), 1 << 20, 60_000));
    rx.set_stalled(true);
    let (r1, a1) = oneshot::channel();
    let (r2, a2) = oneshot::channel();
    assert!(queued(tx.try_push(chunk(1, 1), true)));
    assert!(queued(tx.try_push(ApplyMsg::Barrier(r1), true)));
    assert!(matches!(tx.try_push(chunk(2, 1), true), Push::Spooled));
    assert!(matches!(
        tx.try_push(ApplyMsg::Barrier(r2), true),
        Push::Spooled
    ));
    assert!(matches!(
        tx.try_push(ApplyMsg::Halt("stop".into()), true),
        Push::Spooled
    ));
    rx.answer_barriers(Lsn(5));
    assert_eq!((a1.await.unwrap(), a2.await.unwrap()), (Lsn(5), Lsn(5)));
    assert_eq!(rx.take_halt().as_deref(), Some("stop"));
    assert_eq!(rx.take_halt(), None);
    let lsns: Vec<u64> = std::iter::from_fn(|| rx.try_recv())
        .map(|m| lsn_of(&m))
        .collect();
    assert_eq!(lsns, vec![1, u64::MAX, 2, u64::MAX, u64::MAX - 1]);
}

#[tokio::test]
async fn the_task_ends_when_the_reader_is_gone_and_everything_was_taken() {
    let (tx, mut rx) = channel(10, None);
    assert!(queued(tx.try_push(chunk(1, 1), true)));
    let tx2 = tx.clone();
    drop(tx);
    assert!(!rx.is_closed(), "a clone still holds it");
    drop(tx2);
    assert!(rx.is_closed());
    assert!(matches!(rx.recv().await, Ok(Some(_))));
    assert!(matches!(rx.recv().await, Ok(None)));
}

#[tokio::test]
async fn with_no_other_target_taking_the_reader_waits_instead_of_spooling() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = channel(2, spool(dir.path(), 1 << 20, 0));
    rx.set_stalled(true);
    assert!(queued(tx.try_push(chunk(1, 2), false)));
    assert!(tx.is_sick());
    assert!(matches!(
        tx.try_push(chunk(2, 2), false),
        Push::Wait(_, None)
    ));
    assert_eq!(tx.spooled_bytes(), 0);
    // Another target takes again: now the spool helps it.
    assert!(matches!(tx.try_push(chunk(2, 2), true), Push::Spooled));
    rx.set_stalled(false);
    assert_eq!(rx.try_recv().map(|m| lsn_of(&m)), Some(1));
    assert_eq!(rx.try_recv().map(|m| lsn_of(&m)), Some(2));
}

#[tokio::test]
async fn an_unreadable_spool_detaches_and_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = channel(1, spool(dir.path(), 1 << 20, 60_000));
    rx.set_stalled(true);
    assert!(queued(tx.try_push(chunk(1, 1), true)));
    assert!(matches!(tx.try_push(chunk(2, 1), true), Push::Spooled));
    assert!(matches!(tx.try_push(chunk(3, 1), true), Push::Spooled));
    rx.set_stalled(false);
    assert_eq!(rx.try_recv().map(|m| lsn_of(&m)), Some(1));
    // Reading the first spooled record flushed both; damage the second's kind byte.
    assert_eq!(rx.try_recv().map(|m| lsn_of(&m)), Some(2));
    let path = dir.path().join("billing.spool");
    let mut bytes = std::fs::read(&path).unwrap();
    let first = u32::from_be_bytes(bytes[0..4].try_into().unwrap()) as usize;
    bytes[4 + first + 4] = b'?';
    std::fs::write(&path, bytes).unwrap();
    assert!(
        rx.try_recv().is_none(),
        "nothing past a record it cannot read"
    );
    assert!(tx.is_detached());
    let err = rx.recv().await.expect_err("the reason, once");
    assert!(err.contains("unknown record kind"), "{err}");
    // Later chunks are dropped until the rejoin's barrier.
    assert!(matches!(
        tx.try_push(chunk(4, 1), true),
        Push::Dropped { .. }
    ));
}
