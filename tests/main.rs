//! Integration tests against real throwaway PostgreSQL clusters (one test binary).

mod common;
mod replication_conn;
