//! The audit trail checked against the server's own log: seeded random
//! sequences of client messages (simple queries, multi-statement strings,
//! the extended protocol with named and unnamed statements and portals,
//! errors at every position, pipelining across Syncs, COPY in and out,
//! function calls, transactions and savepoints, SQL PREPARE/EXECUTE) go
//! through the proxy with sync audit, and PostgreSQL's `log_statement =
//! all` says what it executed. For every session:
//!
//! - the statements the server logged as executed are exactly the audit's
//!   statements that have no `not_executed` outcome (and were not rejected
//!   before execution, which the server does not log as a statement), in
//!   the same order, with the same text;
//! - the server logged as many errors as the audit recorded error
//!   outcomes, and a simple Query has an error outcome exactly when the
//!   server logged an error for it.
//!
//! `AUDIT_DIFF_SEED` replays one seed, `AUDIT_DIFF_SESSIONS` and
//! `AUDIT_DIFF_BATCHES` make the run longer; a failure prints its seed.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::audit::records;
use support::bed::{Bed, sso_setup, unique_temp_path};
use support::proxy::Proxy;
use support::raw;
use tokio::io::{AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

const USER: &str = "aud_diff";
/// `int4pl`, for FunctionCall.
const INT4PL_OID: u32 = 177;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(body: &mut Vec<u8>, s: &str) {
    body.extend_from_slice(s.as_bytes());
    body.push(0);
}

fn query(out: &mut Vec<u8>, sql: &str) {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    msg(out, b'Q', &b);
}

fn parse(out: &mut Vec<u8>, name: &str, sql: &str) {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&[0, 0]);
    msg(out, b'P', &b);
}

fn bind(out: &mut Vec<u8>, portal: &str, statement: &str, params: &[&str]) {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&[0, 0]);
    msg(out, b'B', &b);
}

fn named(out: &mut Vec<u8>, tag: u8, kind: Option<u8>, name: &str) {
    let mut b = Vec::new();
    b.extend(kind);
    cstr(&mut b, name);
    if tag == b'E' {
        b.extend_from_slice(&0i32.to_be_bytes());
    }
    msg(out, tag, &b);
}

fn function_call(out: &mut Vec<u8>, a: i32, b: i32) {
    let mut m = Vec::new();
    m.extend_from_slice(&INT4PL_OID.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 1, 0, 2]);
    for v in [a, b] {
        m.extend_from_slice(&4i32.to_be_bytes());
        m.extend_from_slice(&v.to_be_bytes());
    }
    m.extend_from_slice(&[0, 1]);
    msg(out, b'F', &m);
}

/// One batch of messages, sent in a single write; ends with a Sync and a
/// marker Query that always runs, so the reader knows where it ends.
fn batch(rng: &mut Rng, out: &mut Vec<u8>, marker: &str) {
    let statements = ["", "s0", "s1", "s2"];
    let portals = ["", "p0"];
    for _ in 0..1 + rng.below(8) {
        let k = rng.below(20);
        match rng.below(24) {
            0 => query(out, &format!("SELECT {k}")),
            1 => query(out, &format!("INSERT INTO t VALUES ({k})")),
            2 => query(out, "SELECT 1/0"),
            3 => query(out, &format!("SELEC {k}")),
            4 => query(out, &format!("SELECT {k}; SELECT {}", k + 1)),
            5 => query(out, &format!("SELECT {k}; SELECT 1/0; SELECT {}", k + 1)),
            6 => query(
                out,
                rng.pick(&[
                    "BEGIN",
                    "COMMIT",
                    "ROLLBACK",
                    "SAVEPOINT sp",
                    "ROLLBACK TO sp",
                ]),
            ),
            7 => query(
                out,
                &format!("{} q{}", rng.pick(&["EXECUTE", "DEALLOCATE"]), rng.below(2)),
            ),
            8 => query(
                out,
                &format!("PREPARE q{} AS DELETE FROM t WHERE k = {k}", rng.below(2)),
            ),
            9 => {
                query(out, "COPY t FROM STDIN");
                msg(out, b'd', format!("{}\n", 100 + rng.below(50)).as_bytes());
                // Sync is ignored during COPY. (A Query sent here is not
                // a statement either, but PostgreSQL then ends the session:
                // the model's unit tests cover it.)
                if rng.below(3) == 0 {
                    msg(out, b'S', &[]);
                }
                msg(out, b'd', format!("{}\n", 200 + rng.below(50)).as_bytes());
                if rng.below(5) == 0 {
                    msg(out, b'f', b"changed my mind\0");
                } else {
                    msg(out, b'c', &[]);
                }
            }
            10 => query(out, "COPY (SELECT k FROM t ORDER BY k LIMIT 3) TO STDOUT"),
            11 => function_call(out, k as i32, 1),
            12 | 13 => {
                let text = rng.pick(&[
                    "SELECT $1::int",
                    "INSERT INTO t VALUES ($1::int)",
                    "SELECT 7",
                    "DELETE FROM t WHERE k = 3",
                    "SELEC 1",
                ]);
                parse(out, rng.pick(&statements), text);
            }
            14 | 15 => {
                let statement = if rng.below(6) == 0 {
                    "nope"
                } else {
                    rng.pick(&statements)
                };
                let value = k.to_string();
                let params: &[&str] = if rng.below(2) == 0 { &[&value] } else { &[] };
                bind(out, rng.pick(&portals), statement, params);
            }
            16 | 17 => named(out, b'E', None, rng.pick(&portals)),
            18 => named(out, b'D', Some(b'P'), rng.pick(&portals)),
            19 => named(
                out,
                b'C',
                Some(if rng.below(2) == 0 { b'S' } else { b'P' }),
                rng.pick(&statements),
            ),
            20 | 21 => msg(out, b'S', &[]),
            22 => {
                // A whole unnamed statement in one segment.
                parse(out, "", &format!("SELECT {k} + 100"));
                bind(out, "", "", &[]);
                named(out, b'E', None, "");
            }
            _ => msg(out, b'H', &[]),
        }
    }
    msg(out, b'S', &[]);
    query(out, &format!("ROLLBACK; SELECT '{marker}'"));
}

/// The messages of a batch, for a failure report.
fn shown(mut b: &[u8]) -> String {
    let mut out = String::new();
    while b.len() >= 5 {
        let len = u32::from_be_bytes(b[1..5].try_into().unwrap()) as usize;
        let body = String::from_utf8_lossy(&b[5..1 + len]).replace('\0', "|");
        out.push_str(&format!("\n  {} {body}", b[0] as char));
        b = &b[1 + len..];
    }
    out
}

/// Reads until the marker's row and the ReadyForQuery after it.
async fn read_to_marker(s: &mut BufStream<TcpStream>, marker: &str) -> Result<(), String> {
    let mut seen = false;
    loop {
        let read = tokio::time::timeout(Duration::from_secs(20), raw::read_message(s)).await;
        let Ok(Some((tag, body))) = read else {
            return Err(format!("no answer up to marker {marker} ({read:?})"));
        };
        match tag {
            b'D' if body.ends_with(marker.as_bytes()) => seen = true,
            b'Z' if seen => return Ok(()),
            _ => {}
        }
    }
}

/// What the server logged for one backend: executed statements (text) and
/// errors, in order.
#[derive(Debug, PartialEq)]
enum Logged {
    Executed(String),
    Error,
}

fn server_log(path: &Path, pid: i64) -> Vec<Logged> {
    let log = String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
    let tag = format!(" [{pid}] ");
    let mut out = Vec::new();
    for line in log.lines().filter(|l| l.contains(&tag)) {
        let Some((_, rest)) = line.split_once(&format!("{USER}@")) else {
            continue;
        };
        let Some((_, rest)) = rest.split_once(' ') else {
            continue;
        };
        if let Some(text) = rest.strip_prefix("LOG:  statement: ") {
            out.push(Logged::Executed(text.to_owned()));
        } else if rest == "LOG:  execute <unnamed>: " {
            // The unnamed portal a failed Query left in its transaction:
            // the proxy does not know it and says so.
            out.push(Logged::Executed(
                "<statement not known to rds-iam-proxy>".to_owned(),
            ));
        } else if let Some(r) = rest.strip_prefix("LOG:  execute ") {
            let (_, text) = r.split_once(": ").unwrap();
            out.push(Logged::Executed(text.to_owned()));
        } else if rest.starts_with("LOG:  fastpath function call: ") {
            out.push(Logged::Executed(format!("<function {INT4PL_OID}>")));
        } else if rest.starts_with("ERROR:  ") {
            out.push(Logged::Error);
        }
    }
    out
}

/// The same, as the audit trail tells it for connection `conn`.
fn audit_view(records: &[Value], conn: u64) -> Vec<Logged> {
    let mine: Vec<&Value> = records.iter().filter(|r| r["conn"] == conn).collect();
    let mut out = Vec::new();
    let mut n = 0;
    for r in &mine {
        match r["type"].as_str() {
            Some("statement") if r["n"].as_u64() != Some(n) => {
                n = r["n"].as_u64().unwrap();
                let parts: Vec<&str> = mine
                    .iter()
                    .filter(|s| s["type"] == "statement" && s["n"] == n)
                    .map(|s| s["text"].as_str().unwrap())
                    .collect();
                let outcomes: Vec<&&Value> = mine
                    .iter()
                    .filter(|o| o["type"] == "outcome" && o["n"] == n)
                    .collect();
                let not_run = outcomes.iter().any(|o| o.get("not_executed").is_some());
                let first_error = outcomes
                    .first()
                    .and_then(|o| o["sqlstate"].as_str())
                    .unwrap_or("");
                // Rejected before the server logs a statement: a syntax
                // error of a Query, an Execute of no portal, a function
                // call in an aborted transaction.
                let unlogged = match r["protocol"].as_str().unwrap() {
                    "simple" => first_error == "42601",
                    "extended" => first_error == "34000",
                    _ => first_error == "25P02",
                };
                let text = match r["protocol"].as_str().unwrap() {
                    "function" => format!("<function {}>", r["function_oid"]),
                    _ => parts.join("; "),
                };
                if !not_run && !unlogged {
                    out.push(Logged::Executed(text));
                }
                for o in outcomes {
                    if o.get("sqlstate").is_some() {
                        out.push(Logged::Error);
                    }
                }
            }
            Some("outcome") if r["n"] == 0 && r.get("sqlstate").is_some() => {
                out.push(Logged::Error)
            }
            _ => {}
        }
    }
    out
}

fn superuser_sql(bed: &Bed, sql: &str) {
    let out = Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .arg("-h")
        .arg(&bed.info.pg_socket_dir)
        .args([
            "-p",
            &bed.info.pg_port.to_string(),
            "-d",
            &bed.info.database,
            "-c",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Orders the errors within each executed statement's span the same way
/// on both sides: the server logs an error after its statement line, the
/// audit after the statement record; an error outside any statement is
/// where the server raised it. Compared as sequences.
fn describe(v: &[Logged]) -> String {
    v.iter()
        .map(|l| match l {
            Logged::Executed(t) => format!("  exec {t}\n"),
            Logged::Error => "  ERROR\n".to_owned(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_matches_what_the_server_executed() {
    let Some((bed, home)) = sso_setup("the_audit_matches_what_the_server_executed", USER) else {
        return;
    };
    superuser_sql(bed, &format!("ALTER ROLE {USER} SET log_statement = 'all'"));
    let dir = unique_temp_path("rdsiam-audit-diff");
    let proxy = Proxy::builder(bed, &home)
        .arg("--audit-mode", "sync")
        .arg("--audit-dir", &dir)
        .start();
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let seeds: Vec<u64> = match std::env::var("AUDIT_DIFF_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => {
            let base = env("AUDIT_DIFF_BASE", 1);
            (base..base + env("AUDIT_DIFF_SESSIONS", 40)).collect()
        }
    };
    let batches = env("AUDIT_DIFF_BATCHES", 50);
    let started = Instant::now();
    let mut sessions = Vec::new();
    for &seed in &seeds {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let mut s = BufStream::new(tcp);
        s.write_all(&raw::startup_packet(
            0,
            &[("user", USER), ("database", &bed.info.database)],
        ))
        .await
        .unwrap();
        s.flush().await.unwrap();
        let greeting = raw::read_until_ready(&mut s).await;
        assert_eq!(
            greeting.last().map(|m| m.0),
            Some(b'Z'),
            "seed {seed}: {greeting:?}"
        );
        let mut setup = Vec::new();
        query(&mut setup, "CREATE TEMP TABLE t (k int PRIMARY KEY)");
        query(&mut setup, "SELECT 'setup'");
        s.write_all(&setup).await.unwrap();
        s.flush().await.unwrap();
        read_to_marker(&mut s, "setup").await.unwrap();
        for b in 0..batches {
            let marker = format!("m-{seed}-{b}");
            let mut out = Vec::new();
            batch(&mut rng, &mut out, &marker);
            if std::env::var("AUDIT_DIFF_SEED").is_ok() {
                eprintln!("batch {b}: {}", shown(&out));
            }
            s.write_all(&out).await.unwrap();
            s.flush().await.unwrap();
            if let Err(e) = read_to_marker(&mut s, &marker).await {
                panic!(
                    "seed {seed}, batch {b}: {e}\nsent: {}\n{}",
                    shown(&out),
                    proxy.log()
                );
            }
        }
        let mut bye = Vec::new();
        msg(&mut bye, b'X', &[]);
        s.write_all(&bye).await.unwrap();
        s.flush().await.unwrap();
        sessions.push(seed);
    }

    // Every session's end is recorded once it is over.
    let deadline = Instant::now() + Duration::from_secs(30);
    let all = loop {
        let all = records(&dir);
        let ends = all.iter().filter(|r| r["type"] == "session_end").count();
        if ends >= sessions.len() || Instant::now() > deadline {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The server writes its log asynchronously: wait until the last
    // marker of the last session is there.
    let last = format!("m-{}-{}", seeds.last().unwrap(), batches - 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&bed.info.pg_log)
        .unwrap_or_default()
        .contains(&last)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let starts: Vec<&Value> = all
        .iter()
        .filter(|r| r["type"] == "session_start" && r["db_user"] == USER)
        .collect();
    assert_eq!(starts.len(), sessions.len());
    let mut statements = 0;
    for (seed, start) in sessions.iter().zip(&starts) {
        let conn = start["conn"].as_u64().unwrap();
        let pid = start["backend_pid"].as_i64().unwrap();
        let server = server_log(&bed.info.pg_log, pid);
        let audit = audit_view(&all, conn);
        statements += server
            .iter()
            .filter(|l| matches!(l, Logged::Executed(_)))
            .count();
        let executed = |v: &[Logged]| -> Vec<String> {
            v.iter()
                .filter_map(|l| match l {
                    Logged::Executed(t) => Some(t.clone()),
                    Logged::Error => None,
                })
                .collect()
        };
        let (se, ae) = (executed(&server), executed(&audit));
        if se != ae {
            let at = se
                .iter()
                .zip(&ae)
                .position(|(a, b)| a != b)
                .unwrap_or(se.len().min(ae.len()));
            panic!(
                "seed {seed} (AUDIT_DIFF_SEED={seed} AUDIT_DIFF_BATCHES={batches}): executed \
                 statements differ at #{at}: server {:?}, audit {:?}\nserver:\n{}\naudit:\n{}",
                se.get(at),
                ae.get(at),
                describe(&server),
                describe(&audit)
            );
        }
        let errors = |v: &[Logged]| v.iter().filter(|l| **l == Logged::Error).count();
        assert_eq!(
            errors(&server),
            errors(&audit),
            "seed {seed}: error counts differ\nserver:\n{}\naudit:\n{}",
            describe(&server),
            describe(&audit)
        );
        let unmatched = all
            .iter()
            .filter(|r| r["conn"] == conn && r["type"] == "outcome" && r["n"].is_null())
            .count();
        assert_eq!(unmatched, 0);
    }
    eprintln!(
        "audit differential: {} sessions x {batches} batches, {statements} executed statements \
         compared in {:.1}s",
        sessions.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        statements > sessions.len() * batches as usize,
        "too few statements ran"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
