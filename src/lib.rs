//! pgcarve: carve a PostgreSQL monolith into database-per-service PostgreSQL databases.
//!
//! One logical replication slot on the monolith is decoded once (pgoutput); every change is
//! routed to the service databases ("targets") that own its table and applied there in source
//! commit order, whole transactions only, exactly once. See README.md for operations and
//! `source`, `apply` for the correctness argument.

// Apply errors carry table, SQLSTATE, constraint and column by value; they are on the cold path.
#![allow(clippy::result_large_err)]

pub mod apply;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod conninfo;
pub mod daemon;
pub mod demo;
pub mod health;
pub mod http;
pub mod link;
pub mod localpg;
pub mod lsn;
pub mod metrics;
pub mod pg;
pub mod pgoutput;
pub mod route;
pub mod secret;
pub mod source;
pub mod table;
pub mod tls;
