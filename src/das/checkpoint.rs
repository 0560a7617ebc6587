//! Where `das tail --checkpoint FILE` stopped: per shard, the last record
//! whose events were printed (or that the shard was read to its end).
//!
//! The reader prints a batch's events, flushes them, and only then moves
//! the checkpoint past the batch (write to a temporary file, fsync,
//! rename, fsync the directory). A stop by signal or end of input happens
//! between batches, so a restart neither repeats nor skips an event. A
//! kill -9 between the flush and the rename repeats that one batch on the
//! restart: at most one batch per shard, never a loss.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Per-shard positions of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub stream: String,
    pub shards: BTreeMap<String, Mark>,
}

/// How far one shard has been read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mark {
    /// The last sequence number whose events were printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Read to its end (a parent after a split or merge).
    #[serde(default)]
    pub finished: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read the checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the checkpoint {path} is not one this command wrote ({problem}); move it away to start afresh"
    )]
    Parse { path: PathBuf, problem: String },
    #[error(
        "the checkpoint {path} is for the stream {theirs:?}, not {ours:?}; give another --checkpoint file"
    )]
    OtherStream {
        path: PathBuf,
        theirs: String,
        ours: String,
    },
    #[error("cannot write the checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Largest checkpoint read: a stream has at most a few thousand shards.
const MAX_LEN: u64 = 16 << 20;

impl Checkpoint {
    /// The checkpoint in `path` for `stream`, or an empty one if the file
    /// does not exist yet.
    pub fn load(path: &Path, stream: &str) -> Result<Self, CheckpointError> {
        let read = |source| CheckpointError::Read {
            path: path.to_owned(),
            source,
        };
        let text = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Checkpoint {
                    stream: stream.to_owned(),
                    shards: BTreeMap::new(),
                });
            }
            Err(e) => return Err(read(e)),
            Ok(m) if m.len() > MAX_LEN => {
                return Err(CheckpointError::Parse {
                    path: path.to_owned(),
                    problem: format!("{} bytes", m.len()),
                });
            }
            Ok(_) => std::fs::read(path).map_err(read)?,
        };
        let c: Checkpoint = serde_json::from_slice(&text).map_err(|e| CheckpointError::Parse {
            path: path.to_owned(),
            problem: e.to_string(),
        })?;
        if c.stream != stream {
            return Err(CheckpointError::OtherStream {
                path: path.to_owned(),
                theirs: c.stream,
                ours: stream.to_owned(),
            });
        }
        Ok(c)
    }

    /// Replaces `path` with this checkpoint, durably.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let write = |source| CheckpointError::Write {
            path: path.to_owned(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let body = serde_json::to_vec_pretty(self).map_err(|e| write(e.into()))?;
        let mut f = std::fs::File::create(&tmp).map_err(write)?;
        f.write_all(&body).map_err(write)?;
        f.write_all(b"\n").map_err(write)?;
        f.sync_all().map_err(write)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(write)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_and_refuses_another_stream() {
        let dir = std::env::temp_dir().join(format!("rip-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.json");
        let _ = std::fs::remove_file(&path);
        let mut c = Checkpoint::load(&path, "aws-rds-das-x").unwrap();
        assert!(c.shards.is_empty());
        c.shards.insert(
            "shardId-000000000000".into(),
            Mark {
                after: Some("4960".into()),
                finished: false,
            },
        );
        c.shards.insert(
            "shardId-000000000001".into(),
            Mark {
                after: None,
                finished: true,
            },
        );
        c.save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path, "aws-rds-das-x").unwrap(), c);
        assert!(matches!(
            Checkpoint::load(&path, "aws-rds-das-y"),
            Err(CheckpointError::OtherStream { .. })
        ));
        std::fs::write(&path, b"{\"stream\":1}").unwrap();
        assert!(matches!(
            Checkpoint::load(&path, "aws-rds-das-x"),
            Err(CheckpointError::Parse { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
