//! Integration tests against real throwaway PostgreSQL clusters (one test binary).

mod auth_tls;
mod common;
mod replication_conn;
mod streaming;
