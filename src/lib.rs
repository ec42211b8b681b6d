//! pgcarve: carve a PostgreSQL monolith into database-per-service PostgreSQL databases.
//!
//! One logical replication slot on the monolith is decoded once (pgoutput); every change is
//! routed to the service databases ("targets") that own its table and applied there in source
//! commit order, whole transactions only, exactly once. See README.md for operations and
//! `source`, `apply` for the correctness argument.

pub mod cli;
pub mod config;
pub mod conninfo;
pub mod localpg;
pub mod lsn;
pub mod secret;
pub mod source;
pub mod tls;
