//! `rds-iam-proxy audit verify FILE...`.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::audit::verify::{VerifyError, verify};
use crate::audit::writer::audit_files;
use crate::cli::AuditCommand;

pub fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { files, public_key } => {
            let key = match &public_key {
                Some(p) => Some(
                    std::fs::read(p)
                        .with_context(|| format!("cannot read the public key {}", p.display()))?,
                ),
                None => None,
            };
            let dirs: Vec<&PathBuf> = files.iter().filter(|f| f.is_dir()).collect();
            if dirs.len() > 1 && dirs.len() == files.len() {
                // A fleet: each directory is one instance's chain.
                let mut failed = 0;
                for d in dirs {
                    println!("{}:", d.display());
                    if let Err(e) = verify_trail(vec![d.clone()], key.as_deref()) {
                        println!("  FAILED: {}", crate::error::chain_text(e.as_ref()));
                        failed += 1;
                    }
                }
                if failed > 0 {
                    bail!("{failed} trail(s) failed");
                }
                return Ok(());
            }
            if key.is_some() && dirs.len() != 1 {
                bail!("--public-key checks a directory's digests: give the trail's directory");
            }
            verify_trail(files, key.as_deref())
        }
    }
}

fn verify_trail(args: Vec<PathBuf>, key: Option<&[u8]>) -> anyhow::Result<()> {
    let dir = args.iter().find(|a| a.is_dir()).cloned();
    verify_files(args)?;
    let Some(dir) = dir else { return Ok(()) };
    let digests = crate::audit::digest::digest_files(&dir).unwrap_or_default();
    match key {
        None if digests.is_empty() => Ok(()),
        None => {
            println!(
                "{} signed digest(s) not checked: give --public-key PEM (the key from its owner, not the copy in the directory)",
                digests.len()
            );
            Ok(())
        }
        Some(pem) => match crate::audit::digest::check(&dir, pem) {
            Ok(s) => {
                let (time, seq) = s.newest.clone().unwrap_or_default();
                println!(
                    "ok: {} digest(s) signed by key {} cover {} file(s), up to seq {} at {}",
                    s.digests,
                    s.key,
                    s.files_covered,
                    seq.map_or("?".into(), |q| q.to_string()),
                    time
                );
                if !s.beyond.is_empty() {
                    println!(
                        "records after the newest digest (in {}) are covered by the hash chain only",
                        s.beyond.join(", ")
                    );
                }
                Ok(())
            }
            Err(problems) => {
                for p in &problems {
                    println!("digest check: {p}");
                }
                bail!(
                    "{} problem(s) with the signed digests of {}",
                    problems.len(),
                    dir.display()
                )
            }
        },
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
