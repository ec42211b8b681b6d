//! The one retry delay every loop uses: doubling from a first delay, capped, with up to 20 %
//! jitter so several targets (or several daemons) do not retry in lockstep.

use std::time::Duration;

/// Delay before retry number `attempts` (1 for the first retry): `initial_secs · 2^(attempts-1)`,
/// at most `max_secs`, times a random factor in [1, 1.2).
pub fn backoff(initial_secs: f64, max_secs: f64, attempts: u32) -> Duration {
    let exp = initial_secs * 2f64.powi(attempts.saturating_sub(1).min(30) as i32);
    let capped = exp.min(max_secs);
    let jitter = 1.0 + fastrand::f64() * 0.2;
    Duration::from_secs_f64((capped * jitter).min(max_secs * 1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_and_caps() {
        let d = |a| backoff(1.0, 8.0, a).as_secs_f64();
        assert!((1.0..=1.2).contains(&d(1)));
        assert!((2.0..=2.4).contains(&d(2)));
        assert!((8.0..=9.6).contains(&d(10)));
        // Huge attempt counts neither overflow nor pass the cap.
        assert!((8.0..=9.6).contains(&d(u32::MAX)));
        // Attempt 0 is treated as the first.
        assert!((1.0..=1.2).contains(&d(0)));
    }

    #[test]
    fn the_reader_reconnect_schedule() {
        // 1 s, 2 s, … capped at 30 s (what the reader used before it shared this function).
        for (attempt, base) in [(1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (40, 30.0)] {
            let d = backoff(1.0, 30.0, attempt).as_secs_f64();
            assert!((base..=base * 1.2).contains(&d), "attempt {attempt}: {d}");
        }
    }
}
