//! Speed of `audit search` over a large trail: writes about N GB of audit
//! records with the proxy's own writer (200 people, sessions of 100
//! statements with their outcomes, 64 open at once, files rotated at
//! 256 MiB), then times searches over all of it with the page cache warm:
//! one person (no --grep: the target is 1 GB/s per core), the same with
//! --grep, every statement, and `audit verify` for the cost of the chain
//! alone. One thread; prints MB/s for each, best of three.
//!
//!     cargo run --release --example audit-search-speed -- 2 [DIR]
//!
//! Not a criterion benchmark: one run, a few figures (docs/audit.md).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use rds_iam_proxy::audit::event::{
    Event, Outcome, OutcomeKind, Protocol, SessionEnd, SessionStart, SmallText, Statement, Text,
};
use rds_iam_proxy::audit::search::{Filter, search_dir};
use rds_iam_proxy::audit::{Sink, WriterConfig};

const PEOPLE: u64 = 200;
const PER_SESSION: u64 = 100;
const OPEN: u64 = 64;

fn main() {
    let mut args = std::env::args().skip(1);
    let gb: f64 = args.next().map_or(1.0, |a| a.parse().expect("GB"));
    let dir = args.next().map_or_else(
        || std::env::temp_dir().join(format!("rdsiam-search-speed-{}", std::process::id())),
        Into::into,
    );
    let _ = std::fs::remove_dir_all(&dir);
    let began = Instant::now();
    let written = write(&dir, (gb * 1e9) as u64);
    println!(
        "wrote {:.2} GB in {:.1} s to {}",
        written as f64 / 1e9,
        began.elapsed().as_secs_f64(),
        dir.display()
    );
    let files = rds_iam_proxy::audit::writer::audit_files(&dir).unwrap();
    println!("{} files", files.len());

    let person = Filter {
        person: Some("person-017".into()),
        ..Default::default()
    };
    let grep = Filter {
        grep: Some("where id = 4242".into()),
        ..person.clone()
    };
    for (name, f) in [
        ("--person (no --grep)", person),
        ("--person --grep", grep),
        ("no filter (every statement)", Filter::default()),
    ] {
        let mut best = f64::MAX;
        let mut found = 0;
        for _ in 0..3 {
            let t = Instant::now();
            let s = search_dir(&dir, f.clone()).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
            assert!(s.breaks.is_empty());
            found = s.done.len();
        }
        println!(
            "search {name:<30} {found:>9} rows  {:6.2} s  {:7.0} MB/s",
            best,
            written as f64 / 1e6 / best
        );
    }
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        rds_iam_proxy::audit::verify::verify(&files).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "audit verify (BufReader, for comparison)         {:6.2} s  {:7.0} MB/s",
        best,
        written as f64 / 1e6 / best
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes sessions until about `bytes` are on disk; returns the total.
fn write(dir: &std::path::Path, bytes: u64) -> u64 {
    let sink = Sink::start(WriterConfig {
        dir: dir.to_owned(),
        rotate_bytes: 256 << 20,
        rotate_age: Duration::from_secs(24 * 3600),
        queue_capacity: 1 << 16,
        parameters: false,
        settings: String::new(),
    })
    .unwrap();
    let t0 = SystemTime::now() - Duration::from_secs(365 * 86400);
    let mut conn = 0u64;
    let mut clock = 0u64;
    let size = |dir: &std::path::Path| -> u64 {
        rds_iam_proxy::audit::writer::audit_files(dir)
            .unwrap()
            .iter()
            .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
            .sum()
    };
    let push = |e: Event| {
        while sink.stats.queue_depth.load(Relaxed) > 60_000 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(sink.push(e));
    };
    'all: loop {
        // OPEN sessions at once, their statements interleaved.
        let first = conn + 1;
        for _ in 0..OPEN {
            conn += 1;
            push(Event::SessionStart(Box::new(SessionStart {
                conn,
                time: Some(t0 + Duration::from_millis(clock)),
                identity_source: "sso".into(),
                person: format!("person-{:03}", conn % PEOPLE),
                role_arn: format!(
                    "arn:aws:sts::111122223333:assumed-role/AWSReservedSSO_DBA_0123456789abcdef/person-{:03}",
                    conn % PEOPLE
                ),
                account: "111122223333".into(),
                access_key_id: "ASIAEXAMPLEEXAMPLE00".into(),
                client_addr: "10.0.0.7:51234".into(),
                db_user: format!("person-{:03}", conn % PEOPLE),
                database: "payroll".into(),
                application_name: "psql".into(),
                ..Default::default()
            })));
        }
        for n in 1..=PER_SESSION {
            for c in first..=conn {
                clock += 3;
                let at = t0 + Duration::from_millis(clock);
                let sql = format!(
                    "select e.id, e.name, s.amount from employees e join salaries s on s.employee_id = e.id where id = {} and s.period = '2025-{:02}'",
                    (c * 7919 + n) % 100_000,
                    n % 12 + 1
                );
                push(Event::Statement(Box::new(Statement {
                    conn: c,
                    time: at,
                    n,
                    protocol: Protocol::Extended,
                    name: None,
                    text: Text::capture(sql.as_bytes(), 64 * 1024),
                    params: None,
                    function_oid: None,
                    refused: None,
                    judgeable: true,
                })));
                push(Event::Outcome(Box::new(Outcome {
                    conn: c,
                    time: at + Duration::from_micros(800),
                    n,
                    part: 1,
                    result: OutcomeKind::Complete {
                        tag: SmallText::new(b"SELECT 1"),
                        rows: Some(1),
                    },
                })));
            }
        }
        for c in first..=conn {
            push(Event::SessionEnd(Box::new(SessionEnd {
                conn: c,
                time: t0 + Duration::from_millis(clock),
                duration_ms: 1000,
                bytes_from_client: 1000,
                bytes_to_client: 1000,
                closed_by: "client",
                reason: String::new(),
            })));
        }
        if size(dir) >= bytes {
            break 'all;
        }
    }
    sink.close();
    size(dir)
}
