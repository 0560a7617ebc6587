//! Memory and time of `das reconcile` over a long window: N activity
//! events in sessions of 100 statements, 200 open at once, against a
//! matching audit trail written to a temporary directory. Prints the peak
//! resident memory (VmHWM) after the trail is written and after the
//! reconcile, so runs with different N show whether memory follows the
//! window or the open sessions.
//!
//!     cargo run --release --example das-reconcile-memory -- 1000000
//!
//! Not a criterion benchmark: one run, one figure (docs/PERFORMANCE.md).

use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use rds_iam_proxy::audit::event::rfc3339;
use rds_iam_proxy::das::event::Event;
use rds_iam_proxy::das::reconcile::Reconciler;
use rds_iam_proxy::das::trail::Trail;

const PER_SESSION: u64 = 100;
const OPEN: u64 = 200;

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Statement `i` of the whole run: which session, and its text.
fn statement(i: u64) -> (u64, u64, String) {
    // Sessions run OPEN at a time, interleaved statement by statement.
    let group = i / (OPEN * PER_SESSION);
    let within = i % (OPEN * PER_SESSION);
    let session = group * OPEN + within % OPEN;
    let n = within / OPEN + 1;
    (
        session,
        n,
        format!(
            "select amount from ledger where id = {} and n = {n}",
            session * 7
        ),
    )
}

fn main() {
    let total: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let sessions = total.div_ceil(PER_SESSION);
    let start = SystemTime::now() - Duration::from_secs(7 * 86_400);
    let at = |i: u64| start + Duration::from_millis(i);
    let dir = std::env::temp_dir().join(format!("rip-das-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // The trail: session starts, statements, ends, in time order.
    let t = Instant::now();
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(dir.join("audit-20260101T000000000000-00000001.jsonl")).unwrap(),
    );
    writeln!(
        f,
        r#"{{"type":"audit_start","time":"{}","instance":"bench:1"}}"#,
        rfc3339(start)
    )
    .unwrap();
    let session_start = |f: &mut dyn Write, s: u64, i: u64| {
        writeln!(
            f,
            r#"{{"type":"session_start","time":"{}","conn":{s},"person":"person{}","identity_source":"sso","db_user":"u{}","backend_pid":{},"upstream_local_port":{}}}"#,
            rfc3339(at(i)),
            s % 50,
            s % 50,
            10_000 + s,
            20_000 + s % 40_000
        )
        .unwrap();
    };
    for i in 0..total {
        let (s, n, text) = statement(i);
        if n == 1 {
            session_start(&mut f, s, i);
        }
        writeln!(
            f,
            r#"{{"type":"statement","time":"{}","conn":{s},"n":{n},"part":1,"parts":1,"text":"{text}"}}"#,
            rfc3339(at(i))
        )
        .unwrap();
        if n == PER_SESSION || i + 1 == total {
            writeln!(
                f,
                r#"{{"type":"session_end","time":"{}","conn":{s}}}"#,
                rfc3339(at(i))
            )
            .unwrap();
        }
    }
    drop(f);
    let written = t.elapsed();
    let size = std::fs::metadata(dir.join("audit-20260101T000000000000-00000001.jsonl"))
        .unwrap()
        .len();
    let before = vm_hwm_kib();

    // The stream's events, in batches of 1,000, as the reader hands them.
    let t = Instant::now();
    let mut r = Reconciler::new(Trail::open(&dir).unwrap(), start, at(total));
    r.begin().unwrap();
    let mut batch = Vec::with_capacity(1000);
    for i in 0..total {
        let (s, _, text) = statement(i);
        let fields = serde_json::json!({
            "type": "record",
            "class": "READ",
            "command": "SELECT",
            "commandText": text,
            "dbUserName": format!("u{}", s % 50),
            "pid": 10_000 + s,
            "remotePort": 20_000 + s % 40_000,
            "logTime": rfc3339(at(i)),
        });
        let serde_json::Value::Object(fields) = fields else {
            unreachable!()
        };
        batch.push(Event { fields });
        if batch.len() == 1000 {
            r.feed(&batch).unwrap();
            batch.clear();
        }
    }
    r.feed(&batch).unwrap();
    let report = r.finish().unwrap();
    let took = t.elapsed();
    let after = vm_hwm_kib();
    println!(
        "{total} events in {sessions} sessions ({OPEN} open at once); trail {:.0} MB written in {:.1} s",
        size as f64 / 1e6,
        written.as_secs_f64()
    );
    println!(
        "reconcile: {:.1} s ({:.0} events/s), unexplained {}, through the proxy {}",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        report.unexplained(),
        report.through_proxy
    );
    println!("peak RSS: {before} KiB before the reconcile, {after} KiB after");
    let _ = std::fs::remove_dir_all(&dir);
}
