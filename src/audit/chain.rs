//! The hash chain of the audit trail, checked one record line at a time:
//! what `audit verify` walks and what `audit search` and `audit tail`
//! check as they read.
//!
//! Each record starts `{"seq":N,"prev":"<sha256 of the previous line>"`;
//! seq goes up by one from record to record, across files.

use sha2::{Digest, Sha256};

/// Where a walk stands: the last record's seq and the hex of its hash.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    last: Option<(u64, [u8; 64])>,
    pub first_seq: Option<u64>,
    pub records: u64,
}

/// Why a line does not continue the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub seq: Option<u64>,
    pub problem: String,
}

/// The `seq` of a record line, if it starts the way every record does.
pub fn seq_of(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    if end == 0 || end > 19 {
        return None;
    }
    let mut n = 0u64;
    for &d in &rest[..end] {
        n = n * 10 + u64::from(d - b'0');
    }
    Some(n)
}

/// The hex of `prev`, right after the seq.
pub fn prev_hex(line: &[u8]) -> Option<&[u8]> {
    let digits = line.get(7..)?.iter().position(|b| !b.is_ascii_digit())?;
    let rest = line.get(7 + digits..)?.strip_prefix(b",\"prev\":\"")?;
    let hex = rest.get(..64)?;
    (rest.get(64) == Some(&b'"')).then_some(hex)
}

impl Chain {
    /// Checks one whole record line (without its end of line) and moves on
    /// to it.
    pub fn check(&mut self, line: &[u8]) -> Result<(), Link> {
        let (Some(seq), Some(prev)) = (seq_of(line), prev_hex(line)) else {
            return Err(Link {
                seq: None,
                problem: "not an audit record (no seq/prev)".into(),
            });
        };
        let broken = |problem: String| {
            Err(Link {
                seq: Some(seq),
                problem,
            })
        };
        if line.last() != Some(&b'}') {
            return broken("record is cut short".into());
        }
        if let Some((last_seq, last_hex)) = &self.last {
            let last_seq = *last_seq;
            if seq <= last_seq {
                return broken(format!("out of order: follows seq {last_seq}"));
            }
            if seq != last_seq + 1 {
                return broken(format!(
                    "records deleted: seq {}..={} missing",
                    last_seq + 1,
                    seq - 1
                ));
            }
            if prev != last_hex {
                return broken(format!(
                    "the previous record (seq {last_seq}) was changed: its hash does not match this record's prev"
                ));
            }
        } else {
            self.first_seq = Some(seq);
        }
        self.take(seq, line);
        Ok(())
    }

    /// Continues from `line` after a break, so that one change is reported
    /// once and what follows is still checked.
    pub fn resync(&mut self, line: &[u8]) {
        if let Some(seq) = seq_of(line) {
            self.take(seq, line);
        } else {
            self.last = None;
        }
    }

    fn take(&mut self, seq: u64, line: &[u8]) {
        let hash: [u8; 32] = Sha256::digest(line).into();
        // Kept as hex: the next record's prev is compared as it is written.
        let mut hex = [0u8; 64];
        hex_into(&hash, &mut hex);
        self.last = Some((seq, hex));
        self.records += 1;
    }

    /// The last record's seq and hash (hex).
    pub fn head(&self) -> Option<(u64, String)> {
        self.last
            .as_ref()
            .map(|(s, h)| (*s, String::from_utf8_lossy(h).into_owned()))
    }
}

fn hex_into(bytes: &[u8; 32], out: &mut [u8; 64]) {
    const H: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = H[usize::from(b >> 4)];
        out[2 * i + 1] = H[usize::from(b & 15)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_seq_and_prev() {
        let line = format!("{{\"seq\":42,\"prev\":\"{}\",\"v\":1}}", "ab".repeat(32));
        assert_eq!(seq_of(line.as_bytes()), Some(42));
        assert_eq!(prev_hex(line.as_bytes()), Some("ab".repeat(32).as_bytes()));
        assert_eq!(seq_of(b"{\"seq\":x"), None);
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        let mut ours = [0u8; 64];
        hex_into(&bytes, &mut ours);
        let mut theirs = Vec::new();
        crate::audit::event::push_hex(&mut theirs, &bytes);
        assert_eq!(&ours[..], &theirs[..], "the writer's hex");
    }
}
