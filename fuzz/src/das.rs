//! An activity stream record's payload (src/das/esdk.rs, das/record.rs,
//! das/event.rs): what anyone who can write to the Kinesis stream, or
//! corrupt it, hands `das tail`.
//!
//! The input is tried as an Encryption SDK message under the data key of
//! the seeds (tests/fixtures/das), as gzip, as a decrypted batch and as a
//! time. Checks: no panic and no allocation by a length the input
//! declares; a message that decrypts gives a plaintext no longer than
//! itself, and the same one again; inflation never passes its cap; every
//! typed view of every event of a batch stands any value.

use rds_iam_proxy::das::{esdk, event, record};

/// tests/fixtures/das/data_key.hex (regenerated fixtures bring a new key:
/// copy it here).
const KEY: [u8; 32] = [
    0x06, 0xc8, 0xb2, 0xb5, 0x74, 0x5a, 0x55, 0xa7, 0xad, 0xb6, 0x38, 0x4b, 0x80, 0x5a, 0x65, 0x29,
    0x53, 0x31, 0x30, 0xd4, 0x46, 0x6c, 0x6f, 0xac, 0x12, 0x35, 0x53, 0x7a, 0x14, 0x0f, 0xb9, 0x86,
];

const CAP: usize = 1 << 20;

pub fn check(data: &[u8]) {
    if let Ok(d) = esdk::decrypt(data, &KEY) {
        assert!(d.plaintext.len() <= data.len());
        let again = esdk::decrypt(data, &KEY).expect("decrypts twice");
        assert_eq!(again.plaintext, d.plaintext);
    }
    if let Ok(out) = esdk::gunzip_capped(data, CAP) {
        assert!(out.len() <= CAP);
    }
    if let Ok(b) = record::batch(data) {
        for e in &b.events {
            let _ = (e.session_id(), e.pid(), e.remote_host(), e.remote_port());
            let _ = (e.db_user(), e.database(), e.class(), e.command());
            let _ = (e.command_text(), e.exit_code(), e.log_time());
            let _ = (e.is_statement(), e.session_start_secs());
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = event::parse_time(s);
    }
}
