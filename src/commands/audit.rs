//! `rds-iam-proxy audit verify FILE...`.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::audit::verify::{VerifyError, verify};
use crate::audit::writer::audit_files;
use crate::cli::AuditCommand;

pub fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { files } => verify_files(files),
    }
}

fn verify_files(args: Vec<PathBuf>) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for a in args {
        if a.is_dir() {
            files.extend(audit_files(&a).with_context(|| format!("cannot list {}", a.display()))?);
        } else {
            files.push(a);
        }
    }
    match verify(&files) {
        Ok(s) => {
            println!(
                "ok: {} records in {} file(s), seq {}..={}, head {}",
                s.records,
                files.len(),
                s.first_seq,
                s.last_seq,
                s.head
            );
            Ok(())
        }
        Err(VerifyError::Broken(b)) => bail!("audit chain broken at {b}"),
        Err(e) => Err(e.into()),
    }
}
