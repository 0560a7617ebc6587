//! `rds-iam-proxy audit verify FILE...`, `audit search` and `audit tail`.

use std::io::{IsTerminal as _, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::audit::search::{Filter, Outcome, Row, Search, read_lines, search_dir};
use crate::audit::verify::{VerifyError, verify};
use crate::audit::writer::audit_files;
use crate::cli::{AuditCommand, AuditFilterArgs, AuditFormat, AuditSearchArgs, AuditTailArgs};

/// Runs the subcommand; the exit status is 1 when a chain is broken.
pub fn run(command: AuditCommand) -> anyhow::Result<u8> {
    match command {
        AuditCommand::Verify { files, public_key } => verify_command(files, public_key).map(|()| 0),
        AuditCommand::Search(args) => search(args),
        AuditCommand::Tail(args) => tail(args),
    }
}

fn verify_command(files: Vec<PathBuf>, public_key: Option<PathBuf>) -> anyhow::Result<()> {
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

fn filter(a: &AuditFilterArgs) -> Filter {
    Filter {
        person: a.person.clone(),
        db_user: a.db_user.clone(),
        database: a.database.clone(),
        grep: a.grep.clone(),
        outcome: a.outcome,
        ..Default::default()
    }
}

fn format(a: &AuditFilterArgs) -> AuditFormat {
    a.format.unwrap_or(if std::io::stdout().is_terminal() {
        AuditFormat::Table
    } else {
        AuditFormat::Json
    })
}

fn search(args: AuditSearchArgs) -> anyhow::Result<u8> {
    let mut f = filter(&args.filter);
    if let Some(since) = &args.since {
        f.from = Some(super::das::when("--since", since)?);
    }
    if let Some(from) = &args.from {
        f.from = Some(super::das::when("--from", from)?);
    }
    if let Some(to) = &args.to {
        f.to = Some(super::das::when("--to", to)?);
    }
    if let (Some(from), Some(to)) = (f.from, f.to)
        && to <= from
    {
        bail!("--to must come after --from");
    }
    let dir = &args.filter.audit_dir;
    let began = std::time::Instant::now();
    let s = search_dir(dir, f).with_context(|| format!("cannot read {}", dir.display()))?;
    let took = began.elapsed();
    let fmt = format(&args.filter);
    let mut out = std::io::stdout().lock();
    if fmt == AuditFormat::Table && !s.done.is_empty() {
        writeln!(out, "{}", table_header())?;
    }
    for r in &s.done {
        print_row(&mut out, fmt, r)?;
    }
    out.flush()?;
    for b in &s.breaks {
        eprintln!("audit chain broken at {b}");
    }
    eprintln!(
        "{} statement(s) found in {} records ({:.1} MB) in {:.2} s; chain {}",
        s.done.len(),
        s.chain.records,
        s.bytes as f64 / 1e6,
        took.as_secs_f64(),
        if s.breaks.is_empty() {
            "intact".to_owned()
        } else {
            format!("BROKEN in {} place(s)", s.breaks.len())
        }
    );
    Ok(u8::from(!s.breaks.is_empty()))
}

/// Follows the directory's newest file (and the ones rotation opens after
/// it). It starts at the newest file that holds an `audit_start`, so the
/// sessions open now are known and the chain is checked from there, and
/// prints only what is written after it started.
fn tail(args: AuditTailArgs) -> anyhow::Result<u8> {
    let dir = args.filter.audit_dir.clone();
    let fmt = format(&args.filter);
    let files = audit_files(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut s = Search::new(filter(&args.filter));
    let first = files
        .iter()
        .rposition(|f| holds_audit_start(f).unwrap_or(false))
        .unwrap_or(0);
    let mut buf = Vec::new();
    // Catch up in silence.
    let mut at: Option<(PathBuf, u64, u64)> = None;
    for f in files.iter().skip(first) {
        let (pos, lines, _) = read_lines(f, 0, 0, &mut buf, |no, line| s.line(f, no, line))?;
        at = Some((f.clone(), pos, lines));
    }
    s.done.clear();
    let mut reported = s.breaks.len();
    for b in &s.breaks {
        eprintln!("audit chain broken at {b}");
    }
    if fmt == AuditFormat::Table {
        println!("{}", table_header());
    }
    loop {
        let files = audit_files(&dir)?;
        if let Some((file, pos, lines)) = &mut at {
            let (p, l, _) = read_lines(file, *pos, *lines, &mut buf, |no, line| {
                s.line(file, no, line)
            })?;
            (*pos, *lines) = (p, l);
            // Rotated: the current file is done once a newer one exists
            // (read above to its end, as the writer closed it).
            if let Some(next) = files.iter().find(|f| *f > file) {
                at = Some((next.clone(), 0, 0));
                continue;
            }
        } else if let Some(f) = files.first() {
            at = Some((f.clone(), 0, 0));
            continue;
        }
        let mut out = std::io::stdout().lock();
        for r in s.done.drain(..) {
            print_row(&mut out, fmt, &r)?;
        }
        out.flush()?;
        for b in &s.breaks[reported..] {
            eprintln!("audit chain broken at {b}");
        }
        reported = s.breaks.len();
        std::thread::sleep(args.poll_interval);
    }
}

fn holds_audit_start(f: &Path) -> std::io::Result<bool> {
    let text = std::fs::read(f)?;
    Ok(memchr::memmem::find(&text, b",\"type\":\"audit_start\",").is_some())
}

fn table_header() -> String {
    format!(
        "{:<19}  {:<16} {:<16} {:<22} {:>9}  STATEMENT",
        "TIME (UTC)", "PERSON", "DATABASE", "OUTCOME", "DURATION"
    )
}

/// The first line of a statement, cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let mut s: String = flat.chars().take(max - 1).collect();
        s.push('…');
        s
    }
}

fn print_row(out: &mut impl Write, fmt: AuditFormat, r: &Row) -> std::io::Result<()> {
    match fmt {
        AuditFormat::Table => {
            let outcome = match &r.outcome {
                Outcome::Ok { tag, .. } => tag.clone(),
                Outcome::Error { sqlstate, .. } => format!("ERROR {sqlstate}"),
                Outcome::NotExecuted(_) => "not executed".to_owned(),
                Outcome::None | Outcome::Pending => "-".to_owned(),
            };
            let took = r
                .duration_ms
                .map_or("-".to_owned(), |ms| format!("{ms:.1} ms"));
            let refused = if r.refused.is_some() {
                "[refused] "
            } else {
                ""
            };
            writeln!(
                out,
                "{:<19}  {:<16} {:<16} {:<22} {:>9}  {refused}{}",
                r.time.get(..19).unwrap_or(&r.time).replace('T', " "),
                one_line(&r.session.person, 16),
                one_line(&r.session.database, 16),
                one_line(&outcome, 22),
                took,
                one_line(&r.text, 100)
            )
        }
        AuditFormat::Json => {
            let mut v = serde_json::json!({
                "time": r.time,
                "seq": r.seq,
                "instance": &*r.instance,
                "conn": r.session.conn,
                "n": r.n,
                "part": r.part,
                "person": r.session.person,
                "db_user": r.session.db_user,
                "database": r.session.database,
                "application_name": r.session.application_name,
                "client_addr": r.session.client_addr,
                "protocol": r.protocol,
                "statement": r.text,
                "refused": r.refused,
                "outcome": match r.outcome.kind() {
                    crate::audit::search::OutcomeKind::Ok => "ok",
                    crate::audit::search::OutcomeKind::Error => "error",
                    crate::audit::search::OutcomeKind::NotExecuted => "not_executed",
                    crate::audit::search::OutcomeKind::None => "none",
                },
                "duration_ms": r.duration_ms,
            });
            match &r.outcome {
                Outcome::Ok { tag, rows } => {
                    v["command_tag"] = tag.as_str().into();
                    v["rows"] = (*rows).into();
                }
                Outcome::Error { sqlstate, message } => {
                    v["sqlstate"] = sqlstate.as_str().into();
                    v["error"] = message.as_str().into();
                }
                Outcome::NotExecuted(why) => v["not_executed"] = why.as_str().into(),
                _ => {}
            }
            writeln!(out, "{v}")
        }
    }
}
