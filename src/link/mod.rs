//! The contract between the reader and the apply tasks, and nothing else: what travels to a
//! target ([`ApplyMsg`]: chunks of whole source transactions, barriers), the queue it travels
//! in (bounded by row changes), and what each target publishes back ([`TargetStatus`]).
//!
//! ```text
//!  reader ──ApplyMsg──► queue (bounded by changes) ──► apply task
//!     ▲                                                    │
//!     └──────────── TargetStatus (watch) ◄─────────────────┘
//! ```
//!
//! [`hold::CopyHold`] holds a target at a copy's snapshot position while a table is copied
//! into it.
//!
//! [`spool`] is the file a target's share of the stream goes to while it cannot take it live
//! (its frames; `record`: what a frame holds; `queue` decides when to spool).
//!
//! Neither side imports the other: both speak only these types, so the reader can be tested
//! without a target and an apply task without a replication stream.

pub mod change;
pub mod hold;
pub mod queue;
pub mod record;
pub mod spool;
pub mod status;

pub use change::{ApplyMsg, Change, CommitInfo, RelationInfo, XactInfo};
pub use status::{TargetState, TargetStatus};
