//! `/health`: `healthy` (streaming, every target applying), `degraded` (starting,
//! reconnecting, a target retrying) or `failed` (source unreachable past a grace period, or a
//! fatal condition). HTTP 200 for the first two, 503 for `failed`; a JSON body always.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::link::{TargetState, TargetStatus};
use crate::lsn::Lsn;

/// What the daemon as a whole is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Checking the databases and preparing the targets.
    Starting,
    /// Copying the routed tables' existing rows (the `copy` module).
    Copying,
    /// The replication stream has been up at least once; streaming or reconnecting.
    Streaming,
    /// Shutting down.
    Stopping,
}

impl Phase {
    /// The name `/health` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Copying => "copying",
            Phase::Streaming => "streaming",
            Phase::Stopping => "stopping",
        }
    }
}

/// How long the source may be unreachable before /health says `failed`.
pub const SOURCE_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct State {
    phase: Phase,
    source_connected: bool,
    source_down_since: Option<Instant>,
    fatal: Option<String>,
    lag_seconds: f64,
    confirmed: Lsn,
    targets: Vec<(String, TargetStatus)>,
    /// Conditions an operator must fix (monolith DDL pgcarve cannot follow), with the fix.
    problems: Vec<String>,
    /// Targets with work that committed nothing for `apply.hung_secs`.
    not_progressing: Vec<String>,
    /// Per target: bytes waiting in its spool, and whether it is detached.
    spools: Vec<(String, u64, bool)>,
    /// The initial copy's per-table progress (empty list when nothing was copied).
    copy: serde_json::Value,
    /// A copy runs while streaming (its owners are held).
    copying: bool,
    /// The last periodic verification's outcome (null: none yet).
    verification: serde_json::Value,
}

/// Shared health state, written by the daemon and reader, read by the HTTP server.
#[derive(Clone)]
pub struct Health(Arc<Mutex<State>>);

impl Default for Health {
    fn default() -> Self {
        Health(Arc::new(Mutex::new(State {
            phase: Phase::Starting,
            source_connected: false,
            source_down_since: Some(Instant::now()),
            fatal: None,
            lag_seconds: 0.0,
            confirmed: Lsn::ZERO,
            targets: Vec::new(),
            problems: Vec::new(),
            not_progressing: Vec::new(),
            spools: Vec::new(),
            copy: json!([]),
            copying: false,
            verification: serde_json::Value::Null,
        })))
    }
}

/// The overall verdict, a pure function of the state.
pub fn verdict(
    phase: Phase,
    source_connected: bool,
    source_down_for: Option<Duration>,
    fatal: bool,
    targets: &[TargetState],
    targets_stuck: bool,
) -> &'static str {
    let needs_operator = |t: &TargetState| {
        matches!(
            t,
            TargetState::Stalled {
                needs_operator: true,
                ..
            }
        )
    };
    if fatal
        || source_down_for.is_some_and(|d| d > SOURCE_GRACE)
        || targets.iter().any(needs_operator)
    {
        return "failed";
    }
    if phase != Phase::Streaming
        || targets_stuck
        || !source_connected
        || targets.iter().any(|t| *t != TargetState::Streaming)
    {
        return "degraded";
    }
    "healthy"
}

impl Health {
    fn with(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    /// Sets the phase. While copying, the replication stream is not expected to be up (the
    /// copy's own source connections fail the copy when the source goes away).
    pub fn set_phase(&self, phase: Phase) {
        self.with(|s| {
            if phase == Phase::Copying {
                s.source_down_since = None;
            }
            s.phase = phase;
        });
    }

    /// Records the last periodic verification's outcome.
    pub fn set_verification(&self, v: serde_json::Value) {
        self.with(|s| s.verification = v);
    }

    /// Records whether a copy runs while streaming (degraded meanwhile).
    pub fn set_copying(&self, copying: bool) {
        self.with(|s| s.copying = copying);
    }

    /// Records the initial copy's per-table progress.
    pub fn set_copy(&self, copy: serde_json::Value) {
        self.with(|s| s.copy = copy);
    }

    /// Records a condition that stops the daemon.
    pub fn set_fatal(&self, why: String) {
        self.with(|s| s.fatal = Some(why));
    }

    /// Records whether the replication stream is up.
    pub fn set_source_connected(&self, up: bool) {
        self.with(|s| {
            if up {
                s.source_down_since = None;
                s.phase = Phase::Streaming;
            } else if s.source_connected || s.source_down_since.is_none() {
                s.source_down_since = Some(Instant::now());
            }
            s.source_connected = up;
        });
    }

    /// Records a condition an operator must fix (shown until the daemon stops; /health fails).
    pub fn add_problem(&self, problem: String) {
        self.with(|s| {
            if !s.problems.contains(&problem) {
                s.problems.push(problem);
            }
        });
    }

    /// Records which targets are not making progress.
    pub fn set_not_progressing(&self, targets: Vec<String>) {
        self.with(|s| s.not_progressing = targets);
    }

    /// Records each target's spool: (name, bytes waiting, detached).
    pub fn set_spools(&self, spools: Vec<(String, u64, bool)>) {
        self.with(|s| s.spools = spools);
    }

    /// Records lag and confirmed position.
    pub fn set_lag(&self, lag: f64, confirmed: Lsn) {
        self.with(|s| {
            s.lag_seconds = lag;
            s.confirmed = confirmed;
        });
    }

    /// Copies the targets' published status: (target name, status) in configuration order.
    pub fn set_targets(&self, targets: Vec<(String, TargetStatus)>) {
        self.with(|s| s.targets = targets);
    }

    /// Status code and JSON body for /health.
    pub fn report(&self) -> (u16, serde_json::Value) {
        let s = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let states: Vec<TargetState> = s.targets.iter().map(|(_, t)| t.state.clone()).collect();
        let status = verdict(
            s.phase,
            s.source_connected,
            s.source_down_since.map(|t| t.elapsed()),
            s.fatal.is_some() || !s.problems.is_empty(),
            &states,
            !s.not_progressing.is_empty()
                || s.copying
                || s.spools.iter().any(|(_, _, detached)| *detached),
        );
        let targets: serde_json::Map<String, serde_json::Value> = s
            .targets
            .iter()
            .map(|(name, t)| {
                let (state, extra) = match &t.state {
                    TargetState::Starting => ("starting", json!(null)),
                    TargetState::Streaming => ("streaming", json!(null)),
                    TargetState::Stalled {
                        attempts,
                        retry_ready,
                        needs_operator,
                        error,
                    } => (
                        if *needs_operator {
                            "failed"
                        } else {
                            "retrying"
                        },
                        json!({"attempts": attempts, "retry_ready": retry_ready,
                               "needs_operator": needs_operator, "error": error}),
                    ),
                };
                let progressing = !s.not_progressing.contains(name);
                let (spooled, detached) = s
                    .spools
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .map_or((0, false), |(_, b, d)| (*b, *d));
                (
                    name.clone(),
                    json!({"state": state, "committed_lsn": t.committed.to_string(),
                           "progressing": progressing, "spooled_bytes": spooled,
                           "detached": detached, "failure": extra}),
                )
            })
            .collect();
        let body = json!({
            "status": status,
            "phase": s.phase.as_str(),
            "source_connected": s.source_connected,
            "confirmed_lsn": s.confirmed.to_string(),
            "lag_seconds": s.lag_seconds,
            "fatal": s.fatal,
            "problems": s.problems,
            "targets": targets,
            "copy": s.copy,
            "verification": s.verification,
        });
        (if status == "failed" { 503 } else { 200 }, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let ok = [TargetState::Streaming];
        assert_eq!(
            verdict(Phase::Streaming, true, None, false, &ok, false),
            "healthy"
        );
        assert_eq!(
            verdict(
                Phase::Starting,
                false,
                Some(Duration::from_secs(1)),
                false,
                &ok,
                false
            ),
            "degraded"
        );
        let retrying = [TargetState::Stalled {
            attempts: 1,
            retry_ready: false,
            needs_operator: false,
            error: String::new(),
        }];
        let needs_operator = [TargetState::Stalled {
            attempts: 1,
            retry_ready: false,
            needs_operator: true,
            error: String::new(),
        }];
        assert_eq!(
            verdict(Phase::Streaming, true, None, false, &needs_operator, false),
            "failed"
        );
        assert_eq!(
            verdict(Phase::Streaming, true, None, false, &retrying, false),
            "degraded"
        );
        assert_eq!(
            verdict(
                Phase::Streaming,
                false,
                Some(Duration::from_secs(61)),
                false,
                &ok,
                false
            ),
            "failed"
        );
        assert_eq!(
            verdict(Phase::Streaming, true, None, true, &ok, false),
            "failed"
        );
        // Applying, but a target with work has committed nothing for apply.hung_secs.
        assert_eq!(
            verdict(Phase::Streaming, true, None, false, &ok, true),
            "degraded"
        );
    }
}
