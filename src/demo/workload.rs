//! The demo's workload: concurrent sessions of random clinical transactions on the monolith —
//! visits, chart updates, billing, lab results, appointments, staff logins, deletes, key changes,
//! REPLICA IDENTITY FULL updates, and transactions rolled back on purpose. Every value is
//! synthetic, and nothing here logs a value (failures log their SQLSTATE only).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::anyhow;
use tokio_postgres::{Client, Error, Transaction};
use tokio_util::sync::CancellationToken;

use super::fixtures::{APPOINTMENT_STATUSES, CLAIM_STATUSES, DRUGS, UNITS};

/// Transactions of all sessions, by outcome.
#[derive(Default)]
pub(super) struct Stats {
    /// Committed.
    pub committed: AtomicU64,
    /// Rolled back on purpose.
    pub rolled_back: AtomicU64,
    /// Failed (a lock conflict, say) and rolled back.
    pub failed: AtomicU64,
}
/// What one workload session has created (sessions never touch each other's rows).
#[derive(Default)]
struct Owned {
    patients: Vec<i64>,
    consultations: Vec<(i64, i64)>,
    lab_orders: Vec<i64>,
    lab_results: Vec<i64>,
    appointments: Vec<i64>,
    claims: Vec<i64>,
    payments: Vec<i64>,
    events: Vec<i64>,
}

fn pick<T: Copy>(v: &[T]) -> Option<T> {
    (!v.is_empty()).then(|| v[fastrand::usize(..v.len())])
}

fn take<T>(v: &mut Vec<T>) -> Option<T> {
    (!v.is_empty()).then(|| v.swap_remove(fastrand::usize(..v.len())))
}
/// One workload session: random transactions until `stop`. Transactions that fail (a lock
/// conflict, say) are rolled back and counted; a lost connection ends the session with an error.
pub(super) async fn session(
    n: u64,
    mut client: Client,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut owned = Owned::default();
    let mut counter: u64 = 0;
    while !stop.is_cancelled() {
        counter += 1;
        let seq = (n as i64 + 1) * 1_000_000_000 + counter as i64;
        let roll = fastrand::u32(..100);
        let outcome = step(&mut client, &mut owned, n, seq, roll).await;
        match outcome {
            Ok(true) => {
                stats.committed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {
                stats.rolled_back.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if client.is_closed() {
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                    return Err(anyhow!("session {n}: connection lost: {e}"));
                }
                // SQLSTATE only: messages can quote row values.
                tracing::debug!(
                    session = n,
                    sqlstate = e.code().map(|c| c.code()).unwrap_or("-"),
                    "workload transaction failed and was rolled back"
                );
                stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Leave the other sessions and the daemon some CPU on small machines.
        if counter % 8 == 0 {
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}
/// One transaction; `Ok(false)` when it was rolled back on purpose.
async fn step(
    client: &mut Client,
    owned: &mut Owned,
    n: u64,
    seq: i64,
    roll: u32,
) -> Result<bool, Error> {
    let tx = client.transaction().await?;
    match roll {
        0..=39 => visit(&tx, owned, n, seq).await?,
        40..=51 => update_chart(&tx, owned, seq).await?,
        52..=63 => bill(&tx, owned).await?,
        64..=73 => record_lab_result(&tx, owned).await?,
        74..=81 => change_appointment(&tx, owned).await?,
        82..=86 => staff_and_reference(&tx, owned, seq).await?,
        87..=92 => delete_one(&tx, owned).await?,
        93..=95 => move_patient_key(&tx, owned).await?,
        96..=97 => review_event(&tx, owned).await?,
        // A transaction rolled back on purpose: none of it may reach a service.
        _ => {
            tx.execute(
                "INSERT INTO patients (hospital_id, mrn, name, birth_date, notes)
                 VALUES (1, $1, 'Patient rolled back', DATE '1970-01-01', 'never committed')",
                &[&format!("MRN-ROLLBACK-{seq}")],
            )
            .await?;
            event(&tx, owned, seq, "rolled-back", None).await?;
            owned.events.pop();
            tx.rollback().await?;
            return Ok(false);
        }
    }
    tx.commit().await?;
    Ok(true)
}

/// A visit: patient (new or known), consultation, prescriptions, lab order, claim, follow-up
/// appointment, analytics event.
async fn visit(tx: &Transaction<'_>, owned: &mut Owned, n: u64, seq: i64) -> Result<(), Error> {
    let patient =
        match pick(&owned.patients) {
            Some(p) if fastrand::bool() => p,
            _ => {
                let num = seq % 1_000_000_000 + n as i64 * 100_000;
                let notes = if fastrand::u8(..10) == 0 {
                    // Large enough to be TOASTed: later updates leave it unchanged.
                    let mut s = String::from("Synthetic long note ");
                    s.extend(std::iter::repeat_with(fastrand::alphanumeric).take(4000));
                    s
                } else {
                    format!("Synthetic note {num:06}")
                };
                let row = tx
                .query_one(
                    "INSERT INTO patients (hospital_id, mrn, name, birth_date, allergies, notes)
                     VALUES ($1, $2, $3, (DATE '1940-01-01' + $4::int), $5::text::jsonb, $6)
                     RETURNING id",
                    &[
                        &(1 + fastrand::i64(0..3)),
                        &format!("MRN-{n}-{num:06}"),
                        &format!("Patient {num:06}"),
                        &fastrand::i32(0..30_000),
                        &if fastrand::bool() { "[]" } else { r#"["allergen-a"]"# },
                        &notes,
                    ],
                )
                .await?;
                let id: i64 = row.get(0);
                owned.patients.push(id);
                id
            }
        };
    let codes: Vec<String> = (0..fastrand::usize(1..4))
        .map(|_| format!("DX{:03}", fastrand::u32(1..21)))
        .collect();
    let doctor = 1 + fastrand::i64(0..30);
    let c: i64 = tx
        .query_one(
            "INSERT INTO consultations (patient_id, doctor_id, started_at, diagnosis_codes, summary)
             VALUES ($1, $2, now() - make_interval(mins => $3), $4, $5) RETURNING id",
            &[
                &patient,
                &doctor,
                &fastrand::i32(0..600),
                &codes,
                &format!("Synthetic summary {seq}"),
            ],
        )
        .await?
        .get(0);
    owned.consultations.push((c, patient));
    for _ in 0..fastrand::usize(0..3) {
        tx.execute(
            "INSERT INTO prescriptions (consultation_id, drug, dose, refills)
             VALUES ($1, $2, $3::text::numeric, $4)",
            &[
                &c,
                &pick(DRUGS).unwrap_or("Drug A"),
                &format!("{}.{:03}", fastrand::u32(0..500), fastrand::u32(0..1000)),
                &fastrand::i32(0..6),
            ],
        )
        .await?;
    }
    if fastrand::bool() {
        let o: i64 = tx
            .query_one(
                "INSERT INTO lab_orders (consultation_id, test_code, ordered_at, status)
                 VALUES ($1, $2, now(), 'ordered') RETURNING id",
                &[&c, &format!("LAB{:03}", fastrand::u32(1..11))],
            )
            .await?
            .get(0);
        owned.lab_orders.push(o);
    }
    let claim: i64 = tx
        .query_one(
            "INSERT INTO claims (patient_id, consultation_id, amount, status, updated_at)
             VALUES ($1, $2, $3::text::numeric, 'submitted', now()) RETURNING id",
            &[
                &patient,
                &c,
                &format!("{}.{:02}", fastrand::u32(20..5000), fastrand::u32(0..100)),
            ],
        )
        .await?
        .get(0);
    owned.claims.push(claim);
    if fastrand::bool() {
        let a: i64 = tx
            .query_one(
                "INSERT INTO appointments (patient_id, doctor_id, during, status)
                 VALUES ($1, $2, tstzrange(date_trunc('hour', now()) + make_interval(days => $3),
                                           date_trunc('hour', now()) + make_interval(days => $3, mins => 30)),
                         'scheduled') RETURNING id",
                &[&patient, &doctor, &fastrand::i32(1..60)],
            )
            .await?
            .get(0);
        owned.appointments.push(a);
    }
    event(tx, owned, seq, "visit", Some(patient)).await?;
    Ok(())
}

/// Patient chart updates (notes or allergies; the other column unchanged).
async fn update_chart(tx: &Transaction<'_>, owned: &mut Owned, seq: i64) -> Result<(), Error> {
    let Some(p) = pick(&owned.patients) else {
        return Ok(());
    };
    if fastrand::bool() {
        tx.execute(
            "UPDATE patients SET notes = $2 WHERE id = $1",
            &[&p, &format!("Synthetic note revised {seq}")],
        )
        .await?;
    } else {
        tx.execute(
            "UPDATE patients SET allergies = allergies || $2::text::jsonb WHERE id = $1",
            &[
                &p,
                &format!(r#"["allergen-{}"]"#, fastrand::u8(b'a'..b'h') as char),
            ],
        )
        .await?;
    }
    Ok(())
}

/// Billing: claim status, sometimes a payment.
async fn bill(tx: &Transaction<'_>, owned: &mut Owned) -> Result<(), Error> {
    let Some(claim) = pick(&owned.claims) else {
        return Ok(());
    };
    let status = pick(CLAIM_STATUSES).unwrap_or("approved");
    tx.execute(
        "UPDATE claims SET status = $2, updated_at = now() WHERE id = $1",
        &[&claim, &status],
    )
    .await?;
    if status == "paid" {
        if let Some(row) = tx
            .query_opt(
                "INSERT INTO payments (claim_id, amount, method, paid_at)
                 SELECT id, amount, $2, now() FROM claims WHERE id = $1 RETURNING id",
                &[
                    &claim,
                    &if fastrand::bool() {
                        "card"
                    } else {
                        "insurance"
                    },
                ],
            )
            .await?
        {
            owned.payments.push(row.get(0));
        }
    }
    Ok(())
}

/// Laboratory: a result for an order.
async fn record_lab_result(tx: &Transaction<'_>, owned: &mut Owned) -> Result<(), Error> {
    let Some(o) = take(&mut owned.lab_orders) else {
        return Ok(());
    };
    let Some(row) = tx
        .query_opt(
            "INSERT INTO lab_results (lab_order_id, value, unit, flagged, resulted_at)
             SELECT id, $2::text::numeric, $3, $4, now() FROM lab_orders WHERE id = $1
             RETURNING id",
            &[
                &o,
                &format!("{}.{:02}", fastrand::u32(0..300), fastrand::u32(0..100)),
                &pick(UNITS).unwrap_or("mmol/L"),
                &(fastrand::u8(..10) == 0),
            ],
        )
        .await?
    else {
        // The order went with a deleted patient.
        return Ok(());
    };
    owned.lab_results.push(row.get(0));
    tx.execute(
        "UPDATE lab_orders SET status = 'resulted' WHERE id = $1",
        &[&o],
    )
    .await?;
    Ok(())
}

/// Appointments change status.
async fn change_appointment(tx: &Transaction<'_>, owned: &mut Owned) -> Result<(), Error> {
    let Some(a) = pick(&owned.appointments) else {
        return Ok(());
    };
    tx.execute(
        "UPDATE appointments SET status = $2::text::appointment_status WHERE id = $1",
        &[&a, &pick(APPOINTMENT_STATUSES).unwrap_or("completed")],
    )
    .await?;
    Ok(())
}

/// Staff and reference data (auth, shared).
async fn staff_and_reference(
    tx: &Transaction<'_>,
    owned: &mut Owned,
    seq: i64,
) -> Result<(), Error> {
    tx.execute(
        "UPDATE users SET last_login = now() WHERE id = $1",
        &[&(1 + fastrand::i64(0..30))],
    )
    .await?;
    if fastrand::u8(..4) == 0 {
        tx.execute(
            "UPDATE hospitals SET beds = beds + 1 WHERE id = $1",
            &[&(1 + fastrand::i64(0..3))],
        )
        .await?;
    }
    if fastrand::u8(..4) == 0 {
        tx.execute(
            "UPDATE system_codes SET active = NOT active WHERE code = $1",
            &[&format!("DX{:03}", fastrand::u32(1..21))],
        )
        .await?;
    }
    event(tx, owned, seq, "login", None).await?;
    Ok(())
}

/// Deletes: a payment, a lab result, an appointment, an analytics event (no primary key:
/// REPLICA IDENTITY FULL), and rarely a whole patient (cascades).
async fn delete_one(tx: &Transaction<'_>, owned: &mut Owned) -> Result<(), Error> {
    match fastrand::u8(..5) {
        0 => {
            if let Some(p) = take(&mut owned.payments) {
                tx.execute("DELETE FROM payments WHERE id = $1", &[&p])
                    .await?;
            }
        }
        1 => {
            if let Some(r) = take(&mut owned.lab_results) {
                tx.execute("DELETE FROM lab_results WHERE id = $1", &[&r])
                    .await?;
            }
        }
        2 => {
            if let Some(a) = take(&mut owned.appointments) {
                tx.execute("DELETE FROM appointments WHERE id = $1", &[&a])
                    .await?;
            }
        }
        3 => {
            if let Some(e) = take(&mut owned.events) {
                tx.execute("DELETE FROM analytics_events WHERE seq = $1", &[&e])
                    .await?;
            }
        }
        _ => {
            if owned.patients.len() > 20 {
                if let Some(p) = take(&mut owned.patients) {
                    tx.execute("DELETE FROM patients WHERE id = $1", &[&p])
                        .await?;
                    forget_patient(owned, p);
                }
            }
        }
    }
    Ok(())
}

/// A primary-key change (cascades to consultations, appointments, claims).
async fn move_patient_key(tx: &Transaction<'_>, owned: &mut Owned) -> Result<(), Error> {
    if let Some(i) = (!owned.patients.is_empty()).then(|| fastrand::usize(..owned.patients.len())) {
        let old = owned.patients[i];
        let new = old + 1_000_000_000;
        tx.execute("UPDATE patients SET id = $2 WHERE id = $1", &[&old, &new])
            .await?;
        owned.patients[i] = new;
        for c in owned.consultations.iter_mut().filter(|c| c.1 == old) {
            c.1 = new;
        }
    }
    Ok(())
}

/// An analytics event updated in place (REPLICA IDENTITY FULL update).
async fn review_event(tx: &Transaction<'_>, owned: &mut Owned) -> Result<(), Error> {
    if let Some(e) = pick(&owned.events) {
        tx.execute(
            "UPDATE analytics_events SET payload = payload || '{\"reviewed\": true}' WHERE seq = $1",
            &[&e],
        )
        .await?;
    }
    Ok(())
}

fn forget_patient(owned: &mut Owned, p: i64) {
    // The cascade removed the patient's consultations and what hangs off them; ids of rows
    // that no longer exist are only ever used in statements matching nothing.
    owned.consultations.retain(|c| c.1 != p);
}

async fn event(
    tx: &Transaction<'_>,
    owned: &mut Owned,
    seq: i64,
    kind: &str,
    patient: Option<i64>,
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO analytics_events (seq, occurred_at, event, patient_id, payload)
         VALUES ($1, now(), $2, $3, $4::text::jsonb)",
        &[
            &seq,
            &kind,
            &patient,
            &format!(r#"{{"source": "demo", "weight": {}}}"#, fastrand::u8(..100)),
        ],
    )
    .await?;
    owned.events.push(seq);
    Ok(())
}
