//! pgcarve: carve a PostgreSQL monolith into database-per-service PostgreSQL databases.
//!
//! One logical replication slot on the monolith is decoded once (pgoutput); every change is
//! routed to the service databases ("targets") that own its table and applied there in source
//! commit order, whole transactions only, exactly once. See README.md for operations.
//!
//! # Reading order
//!
//! Modules form layers; each imports only from layers below it (and `tests/layering.rs` fails
//! when one does not):
//!
//! ```text
//!  main, cli, demo          the commands
//!        │
//!  daemon                   run: startup (inspect → plan → act), slot decision, the tasks
//!        │
//!  copy, schema, teardown   the initial copy under a snapshot with a known position; the
//!                           targets' tables from the monolith's catalog; removing it all
//!        │
//!  source        apply      the reader (replication stream → routed chunks) and one apply task
//!        │         │        per target; they never import each other, only `link`
//!  config, route, link, health, http, localpg
//!        │
//!  lsn, backoff, secret, metrics, notify, conninfo, tls, pg, table, pgoutput   (leaves)
//! ```
//!
//! The correctness arguments live in module docs: what may be confirmed to the slot
//! (`source::reader::feedback`), why routing is decided at Begin (`source::reader::txn`),
//! durability with asynchronous target commits (`apply::durability`), exactly-once apply and
//! the stalled state (`apply`, `apply::failure`), the slot decision (`daemon::slot`).

// Apply errors carry table, SQLSTATE, constraint and column by value; they are on the cold path.
#![allow(clippy::result_large_err)]

pub mod apply;
pub mod backoff;
pub mod check;
pub mod cli;
pub mod config;
pub mod conninfo;
pub mod copy;
pub mod daemon;
pub mod demo;
pub mod health;
pub mod http;
pub mod link;
pub mod localpg;
pub mod lsn;
pub mod metrics;
pub mod notify;
pub mod pg;
pub mod pgoutput;
pub mod route;
pub mod rowhash;
pub mod schema;
pub mod secret;
pub mod source;
pub mod status;
pub mod table;
pub mod teardown;
pub mod tls;
pub mod verify;
