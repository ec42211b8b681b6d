//! The source side: the replication connection, the streaming protocol and the pgoutput decoder.

pub mod conn;
pub mod pgoutput;
pub mod protocol;
