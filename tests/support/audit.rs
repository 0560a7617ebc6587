//! Reading the audit trail the proxy wrote, for tests that check it.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Every record in the directory's files, oldest first.
pub fn records(dir: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            out.push(serde_json::from_str(line).expect("each line is JSON"));
        }
    }
    out
}
