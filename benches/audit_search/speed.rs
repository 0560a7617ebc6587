//! Speed of `audit search` over a large trail: writes about N GB of audit
//! records with the proxy's own writer (200 people, sessions of 100
//! statements with their outcomes, 64 open at once, files rotated at
//! 256 MiB), then times searches over all of it with the page cache warm:
//! one person (no --grep: the target is 1 GB/s per core), the same with
//! --grep, every statement, and `audit verify` for the cost of the chain
//! alone. One thread; prints, best of three, MB/s of wall time and MB per
//! CPU second (user + system, from /proc/self/stat): the per-core figure,
//! which holds when other work shares the cores.
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
    println!(
        "{:<37} {:>9}  {:>7} {:>10} {:>9}",
        "", "rows", "wall s", "wall MB/s", "MB/CPU-s"
    );
    // ONLY_PERSON=1: the person search alone (for a profiler).
    let only_person = std::env::var_os("ONLY_PERSON").is_some();
    for (name, f) in [
        ("--person (no --grep)", person),
        ("--person --grep", grep),
        ("no filter (every statement)", Filter::default()),
    ]
    .into_iter()
    .take(if only_person { 1 } else { 3 })
    {
        let (mut best, mut best_cpu, mut found) = (f64::MAX, f64::MAX, 0);
        for _ in 0..3 {
            let (t, c) = (Instant::now(), cpu_seconds());
            let s = search_dir(&dir, f.clone()).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
            best_cpu = best_cpu.min(cpu_seconds() - c);
            assert!(s.breaks.is_empty());
            found = s.done.len();
        }
        report(&format!("search {name}"), found, best, best_cpu, written);
    }
    let (mut best, mut best_cpu) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let (t, c) = (Instant::now(), cpu_seconds());
        rds_iam_proxy::audit::verify::verify(&files).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        best_cpu = best_cpu.min(cpu_seconds() - c);
    }
    report("audit verify (for comparison)", 0, best, best_cpu, written);
    let _ = std::fs::remove_dir_all(&dir);
}

fn report(name: &str, rows: usize, wall: f64, cpu: f64, bytes: u64) {
    let mb = bytes as f64 / 1e6;
    println!(
        "{name:<37} {rows:>9}  {wall:>7.2} {:>10.0} {:>9.0}",
        mb / wall,
        mb / cpu.max(0.01)
    );
}

/// User + system CPU time of this process (the writer thread has ended
/// before any search).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
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
        rotated: None,
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
