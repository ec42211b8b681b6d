//! The source side: the replication connection, the streaming protocol, the pgoutput decoder,
//! start-up checks on the monolith, and the reader task that routes changes to the targets.
//!
//! The slot confirmation rule is argued in `reader::feedback`, routing in `reader::txn`.

pub mod catalog;
pub mod conn;
pub mod ddl;
pub mod heartbeat;
pub mod protocol;
pub mod reader;
