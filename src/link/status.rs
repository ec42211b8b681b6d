//! What each apply task publishes about itself on a `watch`: its durable position and state.
//! The reader decides routing and slot confirmation from it; `/health` shows it.

use crate::lsn::Lsn;

/// What a target is doing, as the reader and /health see it.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetState {
    /// Connecting and loading its catalog.
    Starting,
    /// Applying.
    Streaming,
    /// A change was rejected or the connection failed: stalled, waiting to retry.
    Stalled {
        /// Consecutive failed attempts.
        attempts: u32,
        /// The backoff has elapsed: restart the stream to retry.
        retry_ready: bool,
        /// Retrying cannot help: an operator must act, then restart pgcarve.
        needs_operator: bool,
        /// What went wrong (value-free).
        error: String,
    },
}

/// Published by each apply task.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetStatus {
    /// End LSN of the last source transaction durably committed here.
    pub committed: Lsn,
    /// Current state.
    pub state: TargetState,
}

impl TargetStatus {
    /// Whether the reader should send changes to this target.
    pub fn accepts_changes(&self) -> bool {
        self.state == TargetState::Streaming
    }
}
