//! Aurora Database Activity Streams, read from the auditor's side:
//! `das tail` prints every activity event with the person behind its
//! session, and `das reconcile` accounts for every session and statement
//! of a window on both sides (the stream, the proxy's trail), so that a
//! session that did not come through the proxy stands out.
//!
//! The path of one Kinesis record (DESIGN.md section 8): [`stream`] reads
//! the shards in order (children after their parents) and keeps a
//! [`checkpoint`]; [`record`] parses the envelope, has KMS unwrap the data
//! key under the cluster's encryption context, decrypts the Encryption
//! SDK message ([`esdk`]) and inflates the gzip batch into [`event`]s;
//! [`trail`] reads the proxy's audit files for the sessions DAS knows by
//! pid, client port and backend start; [`tail`] and [`reconcile`] join
//! the two.

pub mod checkpoint;
pub mod esdk;
pub mod event;
pub mod reconcile;
pub mod record;
pub mod stream;
pub mod tail;
pub mod trail;

/// The Kinesis stream Aurora creates for a cluster's activity stream.
pub fn stream_name(cluster_resource_id: &str) -> String {
    format!("aws-rds-das-{cluster_resource_id}")
}
