//! Integration tests against real throwaway PostgreSQL clusters (one test binary).

mod alerts;
mod auth_tls;
mod check;
mod common;
mod copy;
mod crash;
mod ddl;
mod failure;
mod heartbeat;
mod isolation;
mod layering;
mod message_kinds;
mod notify;
mod reload;
mod replication_conn;
mod schema;
mod status;
mod streaming;
mod systemd;
mod teardown;
mod values;
mod verify;
