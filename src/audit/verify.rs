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

use super::chain::Chain;
pub use super::chain::seq_of;

/// Walks `files` in the order given (oldest first) as one chain.
pub fn verify(files: &[PathBuf]) -> Result<Summary, VerifyError> {
    let mut chain = Chain::default();
    for file in files {
        walk(file, &mut chain)?;
    }
    let (last_seq, head) = chain.head().ok_or(VerifyError::Empty)?;
    Ok(Summary {
        records: chain.records,
        first_seq: chain.first_seq.unwrap_or(0),
        last_seq,
        head,
    })
}

fn walk(file: &Path, chain: &mut Chain) -> Result<(), VerifyError> {
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
        chain
            .check(&buf)
            .map_err(|link| broken(link.seq, link.problem))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_log(dir: &Path, events: usize, rotate_bytes: u64) -> Vec<PathBuf> {
        use crate::audit::event::{Event, SessionEnd};
        let sink = crate::audit::Sink::start(crate::audit::WriterConfig {
            dir: dir.to_owned(),
            rotate_bytes,
            rotate_age: std::time::Duration::from_secs(3600),
            queue_capacity: 1024,
            parameters: false,
            settings: String::new(),
            rotated: None,
        })
        .unwrap();
        for i in 0..events {
            // Durable one by one: each is its own batch, so rotation (checked
            // after each batch) can happen between any two.
            let ack = sink.push_durable(Event::SessionEnd(Box::new(SessionEnd {
                conn: i as u64,
                time: std::time::SystemTime::now(),
                duration_ms: 1,
                bytes_from_client: 2,
                bytes_to_client: 3,
                closed_by: "client",
                reason: "line\nbreak \" quote".into(),
            })));
            assert!(ack.blocking_recv().unwrap());
        }
        sink.close();
        crate::audit::writer::audit_files(dir).unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rdsiam-verify-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn edit(file: &Path, f: impl FnOnce(&mut Vec<String>)) {
        let text = std::fs::read_to_string(file).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        f(&mut lines);
        std::fs::write(file, lines.join("\n") + "\n").unwrap();
    }

    fn broken(files: &[PathBuf]) -> Break {
        match verify(files) {
            Err(VerifyError::Broken(b)) => b,
            other => panic!("expected a break, got {other:?}"),
        }
    }

    #[test]
    fn a_clean_chain_across_rotated_files_verifies() {
        let dir = temp_dir("clean");
        let files = write_log(&dir, 40, 2048);
        assert!(files.len() > 2, "{files:?}");
        let s = verify(&files).unwrap();
        assert_eq!(s.first_seq, 1);
        assert_eq!(s.last_seq, s.records);
        // A later start continues the chain in a new file.
        let more = write_log(&dir, 3, 1 << 20);
        // file_start, audit_start, 3 events, audit_stop, file_end.
        assert_eq!(verify(&more).unwrap().records, s.records + 7);
        // Leaving a middle file out is a gap.
        let mut gap = more.clone();
        gap.remove(1);
        assert!(broken(&gap).problem.contains("deleted"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tampering_is_found_at_the_right_record() {
        let dir = temp_dir("tamper");
        let files = write_log(&dir, 10, 1 << 20);
        assert_eq!(files.len(), 1);
        let f = &files[0];
        let pristine = std::fs::read(f).unwrap();

        edit(f, |l| l[4] = l[4].replace("\"conn\":2", "\"conn\":4"));
        let b = broken(&files);
        assert_eq!((b.line, b.seq), (6, Some(6)));
        assert!(b.problem.contains("seq 5) was changed"), "{}", b.problem);

        std::fs::write(f, &pristine).unwrap();
        edit(f, |l| {
            l.remove(3);
        });
        let b = broken(&files);
        assert_eq!((b.line, b.seq), (4, Some(5)));
        assert!(b.problem.contains("seq 4..=4 missing"), "{}", b.problem);

        std::fs::write(f, &pristine).unwrap();
        edit(f, |l| l.swap(2, 3));
        let b = broken(&files);
        assert_eq!(b.line, 3);

        std::fs::write(f, &pristine).unwrap();
        std::fs::write(f, &pristine[..pristine.len() - 10]).unwrap();
        let b = broken(&files);
        assert!(b.problem.contains("truncated"), "{}", b.problem);

        std::fs::write(f, &pristine).unwrap();
        assert!(verify(&files).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
