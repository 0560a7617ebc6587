//! The PostgreSQL wire protocol, sans I/O.
//!
//! Functions here turn bytes into frames and frames into bytes. They never
//! touch a socket, return `Ok(None)` when more bytes are needed, and check
//! every length against a limit before using it.

pub mod backend;
pub mod frame;
pub mod messages;
pub mod startup;
