//! `rds-iam-proxy audit verify`: walks the hash chain through one or more
//! audit files and says where it breaks.
//!
//! Each record starts `{"seq":N,"prev":"<sha256 of the previous line>"`.
//! A changed record breaks the next record's `prev`; a deleted one leaves a
//! gap in `seq`; a reordered one runs `seq` backwards; a torn write leaves a
//! last line without its newline. Deleting the newest records of the newest
//! file cannot be seen from the file alone: compare the head printed here
//! with the one the proxy logs when it rotates or stops.

use std::fmt;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::event::hex;

/// Where the chain broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub file: PathBuf,
    /// 1-based line number.
    pub line: u64,
    pub seq: Option<u64>,
    pub problem: String,
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(s) = self.seq {
            write!(f, " (seq {s})")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// What a clean walk found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub head: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {file}: {source}")]
    Read { file: PathBuf, source: io::Error },
    #[error("{0}")]
    Broken(Break),
    #[error("no records in the given files")]
    Empty,
}

/// The `seq` of a record line, if it starts the way every record does.
pub fn seq_of(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn prev_of(line: &[u8]) -> Option<[u8; 32]> {
    let at = line.windows(9).position(|w| w == b",\"prev\":\"")? + 9;
    let h = line.get(at..at + 64)?;
    let mut out = [0; 32];
    for (i, pair) in h.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Walks `files` in the order given (oldest first) as one chain.
pub fn verify(files: &[PathBuf]) -> Result<Summary, VerifyError> {
    let mut last: Option<(u64, [u8; 32])> = None;
    let mut first_seq = None;
    let mut records = 0u64;
    for file in files {
        walk(file, &mut last, &mut first_seq, &mut records)?;
    }
    let (last_seq, head) = last.ok_or(VerifyError::Empty)?;
    Ok(Summary {
        records,
        first_seq: first_seq.unwrap_or(0),
        last_seq,
        head: hex(&head),
    })
}

fn walk(
    file: &Path,
    last: &mut Option<(u64, [u8; 32])>,
    first_seq: &mut Option<u64>,
    records: &mut u64,
) -> Result<(), VerifyError> {
    let read = |source| VerifyError::Read {
        file: file.to_owned(),
        source,
    };
    let mut reader = BufReader::new(std::fs::File::open(file).map_err(read)?);
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(read)? == 0 {
            return Ok(());
        }
        line_no += 1;
        let broken = |seq, problem: String| {
            VerifyError::Broken(Break {
                file: file.to_owned(),
                line: line_no,
                seq,
                problem,
            })
        };
        if buf.pop() != Some(b'\n') {
            return Err(broken(
                seq_of(&buf),
                "record is truncated (no end of line): a torn write or a cut file".into(),
            ));
        }
        let (Some(seq), Some(prev)) = (seq_of(&buf), prev_of(&buf)) else {
            return Err(broken(None, "not an audit record (no seq/prev)".into()));
        };
        if buf.last() != Some(&b'}') {
            return Err(broken(Some(seq), "record is cut short".into()));
        }
        if let Some((last_seq, last_hash)) = *last {
            if seq <= last_seq {
                return Err(broken(
                    Some(seq),
                    format!("out of order: follows seq {last_seq}"),
                ));
            }
            if seq != last_seq + 1 {
                return Err(broken(
                    Some(seq),
                    format!(
                        "records deleted: seq {}..={} missing",
                        last_seq + 1,
                        seq - 1
                    ),
                ));
            }
            if prev != last_hash {
                return Err(broken(
                    Some(seq),
                    format!(
                        "the previous record (seq {last_seq}) was changed: its hash does not match this record's prev"
                    ),
                ));
            }
        } else {
            *first_seq = Some(seq);
        }
        *last = Some((seq, Sha256::digest(&buf).into()));
        *records += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_seq_and_prev() {
        let line = format!("{{\"seq\":42,\"prev\":\"{}\",\"v\":1}}", "ab".repeat(32));
        assert_eq!(seq_of(line.as_bytes()), Some(42));
        assert_eq!(prev_of(line.as_bytes()), Some([0xab; 32]));
        assert_eq!(seq_of(b"{\"seq\":x"), None);
    }
}
