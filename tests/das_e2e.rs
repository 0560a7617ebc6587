//! `das tail` and `das reconcile` end to end: the proxy binary and psql
//! against the test bed, whose activity stream stand-in (`bed.py run
//! --das`, testbed/das.py) turns the server's own statement log into DAS
//! records encrypted with the real AWS Encryption SDK, on a moto Kinesis
//! stream with two shards, data keys from moto KMS.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use support::bed::{AwsHome, Bed, http_json, is_root, unique_temp_path};
use support::proxy::{Proxy, run};

const DEADLINE: Duration = Duration::from_secs(60);

fn das_bed() -> Option<Bed> {
    if !is_root() {
        eprintln!("skipped: the test bed needs root");
        return None;
    }
    Some(Bed::start_with(&["--das"]))
}

fn das(bed: &Bed) -> &Value {
    bed.info.das.as_ref().expect("bed started with --das")
}

/// A control call to the stand-in.
fn control(bed: &Bed, method: &str, path: &str, body: Option<&Value>) -> Value {
    let url = das(bed)["control_url"].as_str().unwrap().to_owned();
    let (status, v) = http_json(&url, method, path, body);
    assert_eq!(status, 200, "{method} {path} -> {status}: {v}");
    v
}

/// Everything the server logged so far is on the stream.
fn flush(bed: &Bed) -> Value {
    control(bed, "POST", "/_bed/das-flush", Some(&json!({})))
}

/// `rds-iam-proxy das SUB --cluster-resource-id ... --format json`, with
/// AWS calls going to moto and keys of the bed's (moto takes any).
fn das_cmd(bed: &Bed, home: &AwsHome, sub: &str) -> Command {
    let d = das(bed);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
    home.apply(&mut cmd);
    cmd.args(["das", sub, "--cluster-resource-id"])
        .arg(d["cluster_resource_id"].as_str().unwrap())
        .args(["--region", d["region"].as_str().unwrap()])
        .args(["--endpoint-url", d["endpoint_url"].as_str().unwrap()])
        .args(["--format", "json", "--poll-interval", "100ms"]);
    cmd
}

/// A running `das tail`, its lines collected as they come.
struct Tail {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Tail {
    fn start(mut cmd: Command) -> Tail {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn das tail");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("das tail wrote a line that is not JSON ({e}): {line}")
                });
                sink.lock().unwrap().push(v);
            }
        });
        Tail { child, lines }
    }

    /// Waits until the lines so far satisfy `pred`.
    fn wait(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let lines = self.lines.lock().unwrap().clone();
            if pred(&lines) {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "das tail did not print {what}: {lines:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then its exit status, stderr and every line.
    fn stop(mut self) -> (i32, String, Vec<Value>) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "das tail did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        // The reader thread ends at EOF, which has come.
        std::thread::sleep(Duration::from_millis(100));
        let lines = self.lines.lock().unwrap().clone();
        (status.code().unwrap_or(-1), err, lines)
    }
}

fn text(e: &Value) -> &str {
    e["commandText"].as_str().unwrap_or("")
}

/// Events whose statement text contains `needle`.
fn with_text<'a>(lines: &'a [Value], needle: &str) -> Vec<&'a Value> {
    lines.iter().filter(|e| text(e).contains(needle)).collect()
}

fn psql_through(proxy: &Proxy, statements: &[&str]) {
    let mut cmd = proxy.psql("arianna", "");
    for s in statements {
        cmd.args(["-c", s]);
    }
    let (ok, out, err) = run(&mut cmd);
    assert!(ok, "psql through the proxy failed: {out}{err}");
}

fn proxy_for_arianna(bed: &Bed, home: &AwsHome, dir: &Path) -> Proxy {
    bed.create_iam_user("arianna");
    Proxy::builder(bed, home)
        .arg("--audit-mode", "sync")
        .arg("--audit-dir", dir)
        .start()
}

#[test]
fn tail_names_the_person_and_loses_nothing_across_splits_and_restarts() {
    let Some(bed) = das_bed() else { return };
    let home = AwsHome::sso(&bed, "arianna", "DatabaseAdmin");
    let audit = unique_temp_path("rdsiam-das-audit");
    let proxy = proxy_for_arianna(&bed, &home, &audit);
    let keys = AwsHome::static_keys(&bed, &bed.long_term_credentials());
    let checkpoint = unique_temp_path("rdsiam-das-checkpoint");

    let tail = |from: &str| {
        let mut cmd = das_cmd(&bed, &keys, "tail");
        cmd.args(["--from", from])
            .arg("--audit-dir")
            .arg(&audit)
            .arg("--checkpoint")
            .arg(&checkpoint);
        Tail::start(cmd)
    };

    // First run: a session through the proxy, a split in its middle.
    let first = tail("trim-horizon");
    psql_through(&proxy, &["select 'phase1-a'", "select 'phase1-b' as x"]);
    flush(&bed);
    let split = control(&bed, "POST", "/_bed/das-split", Some(&json!({})));
    psql_through(&proxy, &["select 'phase1-c'"]);
    flush(&bed);
    first.wait("the first phase", |l| {
        ["phase1-a", "phase1-b", "phase1-c"]
            .iter()
            .all(|n| !with_text(l, n).is_empty())
    });
    let (code, err, first_lines) = first.stop();
    assert_eq!(code, 0, "das tail exit status; stderr: {err}");
    assert!(err.contains("0 skipped"), "{err}");

    // Statement by statement, the person behind the session.
    for needle in ["phase1-a", "phase1-b", "phase1-c"] {
        let found = with_text(&first_lines, needle);
        assert_eq!(found.len(), 1, "{needle} printed once: {found:#?}");
        let e = found[0];
        assert_eq!(e["person"], "arianna", "{e}");
        assert_eq!(e["through_proxy"], true, "{e}");
        assert_eq!(e["dbUserName"], "arianna", "{e}");
        assert_eq!(e["identity_source"], "sso", "{e}");
        assert!(
            e["role_arn"]
                .as_str()
                .unwrap()
                .contains("AWSReservedSSO_DatabaseAdmin"),
            "{e}"
        );
        assert!(e["proxy_conn"].as_u64().is_some(), "{e}");
    }
    // The connection events of those sessions name her too.
    let sessions: Vec<&str> = ["phase1-a", "phase1-c"]
        .iter()
        .map(|n| with_text(&first_lines, n)[0]["sessionId"].as_str().unwrap())
        .collect();
    for sid in &sessions {
        let connect: Vec<&Value> = first_lines
            .iter()
            .filter(|e| e["sessionId"] == *sid && e["command"] == "CONNECT")
            .collect();
        assert_eq!(connect.len(), 1, "one CONNECT for {sid}: {connect:#?}");
        assert_eq!(connect[0]["person"], "arianna");
    }
    // The split happened while this run read: its parent was read to the end.
    let parent = split["parent"].as_str().expect("split names its parent");
    let saved: Value = serde_json::from_slice(&std::fs::read(&checkpoint).unwrap()).unwrap();
    assert_eq!(
        saved["shards"][parent]["finished"], true,
        "the split parent is finished in the checkpoint: {saved}"
    );

    // While no reader runs: more statements, another split.
    psql_through(&proxy, &["select 'phase2-a'"]);
    flush(&bed);
    control(&bed, "POST", "/_bed/das-split", Some(&json!({})));
    psql_through(&proxy, &["select 'phase2-b'"]);
    flush(&bed);

    // Second run, from the checkpoint: exactly what came after.
    let second = tail("trim-horizon");
    second.wait("the second phase", |l| {
        !with_text(l, "phase2-a").is_empty() && !with_text(l, "phase2-b").is_empty()
    });
    // One more statement after the second run has caught up: nothing of
    // the first phase is read again on the way.
    psql_through(&proxy, &["select 'phase2-c'"]);
    flush(&bed);
    second.wait("the last statement", |l| {
        !with_text(l, "phase2-c").is_empty()
    });
    let (code, err, second_lines) = second.stop();
    assert_eq!(code, 0, "stderr: {err}");
    for needle in ["phase1-a", "phase1-b", "phase1-c"] {
        assert!(
            with_text(&second_lines, needle).is_empty(),
            "{needle} printed again after the restart"
        );
    }
    for needle in ["phase2-a", "phase2-b", "phase2-c"] {
        let found = with_text(&second_lines, needle);
        assert_eq!(found.len(), 1, "{needle} printed once: {found:#?}");
        assert_eq!(found[0]["person"], "arianna");
    }
    // No event at all is printed twice across the two runs.
    let mut seen = std::collections::HashSet::new();
    for e in first_lines.iter().chain(&second_lines) {
        let key = (
            e["sessionId"].as_str().unwrap_or("").to_owned(),
            e["statementId"].to_string(),
            e["class"].to_string(),
            text(e).to_owned(),
            e["logTime"].to_string(),
        );
        assert!(seen.insert(key.clone()), "printed twice: {key:?}");
    }
    let stats = control(&bed, "GET", "/_bed/das-stats", None);
    assert!(
        stats["shards"].as_array().is_some_and(|s| s.len() >= 4),
        "two splits on a two-shard stream: {stats}"
    );
    let _ = std::fs::remove_dir_all(&audit);
    let _ = std::fs::remove_file(&checkpoint);
}

#[test]
fn reconcile_accounts_for_every_session_and_reports_bad_records() {
    let Some(bed) = das_bed() else { return };
    let home = AwsHome::sso(&bed, "arianna", "DatabaseAdmin");
    let audit = unique_temp_path("rdsiam-das-audit");
    let proxy = proxy_for_arianna(&bed, &home, &audit);
    let keys = AwsHome::static_keys(&bed, &bed.long_term_credentials());
    let stamp = rds_iam_proxy::audit::event::rfc3339;
    let reconcile = |from: SystemTime, to: SystemTime| {
        let mut cmd = das_cmd(&bed, &keys, "reconcile");
        cmd.arg("--audit-dir")
            .arg(&audit)
            .args(["--from", &stamp(from), "--to", &stamp(to)]);
        let out = cmd.output().expect("run das reconcile");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "reconcile output is not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (
            out.status.code().unwrap_or(-1),
            report,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // The bed's own setup (the master creating arianna) is a session not
    // through the proxy: the window starts after it.
    std::thread::sleep(Duration::from_millis(1100));
    let t0 = SystemTime::now();
    psql_through(
        &proxy,
        &[
            "create table ledger (id int, amount int)",
            "insert into ledger values (1, 100), (2, 200)",
            "select sum(amount) from ledger",
            "select 1; select 2",
        ],
    );
    // Until the proxy's trail has the session's end.
    let deadline = Instant::now() + DEADLINE;
    while !support::audit::records(&audit)
        .iter()
        .any(|r| r["type"] == "session_end")
    {
        assert!(Instant::now() < deadline, "no session_end in the trail");
        std::thread::sleep(Duration::from_millis(20));
    }
    flush(&bed);
    let t1 = SystemTime::now();
    std::thread::sleep(Duration::from_millis(1100));

    // Everything in the first window came through the proxy.
    let (code, report, err) = reconcile(t0, t1);
    let r = &report["report"];
    assert_eq!(code, 0, "a clean window: {report:#}\n{err}");
    assert_eq!(report["unexplained"], 0, "{report:#}");
    assert_eq!(r["through_proxy"], 1, "{report:#}");
    assert_eq!(r["das_sessions"], 1, "{report:#}");
    assert_eq!(
        r["per_person"]["arianna (arianna)"],
        json!({"sessions": 1, "statements": 4}),
        "{report:#}"
    );

    // A direct login with the master user's password: not through the proxy.
    bed.admin_sql("select 42 as direct");
    // Bad records among the good ones.
    for kind in ["tamper", "wrong-context", "unknown-version", "not-json"] {
        control(&bed, "POST", "/_bed/das-bad", Some(&json!({"kind": kind})));
    }
    flush(&bed);
    let t2 = SystemTime::now();

    let (code, report, err) = reconcile(t0, t2);
    let r = &report["report"];
    assert_eq!(code, 1, "the direct login is unexplained: {report:#}");
    assert_eq!(r["not_through_proxy_count"], 1, "{report:#}");
    let bypass = &r["not_through_proxy"][0];
    assert_eq!(
        bypass["db_user"],
        bed.info.master_user.as_str(),
        "{report:#}"
    );
    assert_eq!(
        bypass["first_statement"], "select 42 as direct",
        "{report:#}"
    );
    assert_eq!(r["through_proxy"], 1, "{report:#}");
    assert_eq!(r["missing_from_stream_count"], 0, "{report:#}");
    assert_eq!(r["missing_from_trail_count"], 0, "{report:#}");
    assert_eq!(
        r["bad_records"],
        json!({"authentication": 1, "data_key": 1, "unknown_version": 1, "malformed": 1}),
        "{report:#}"
    );
    assert_eq!(err.matches("skipped record").count(), 4, "{err}");
    assert!(err.contains("failed authentication"), "{err}");

    // `das tail` reads past the same bad records and says so.
    let mut cmd = das_cmd(&bed, &keys, "tail");
    cmd.args(["--from", "trim-horizon"])
        .arg("--audit-dir")
        .arg(&audit);
    let tail = Tail::start(cmd);
    tail.wait("the direct login", |l| {
        !with_text(l, "select 42 as direct").is_empty()
    });
    let (code, err, lines) = tail.stop();
    assert_eq!(code, 1, "bad records make the exit status 1: {err}");
    assert!(err.contains("4 skipped"), "{err}");
    let direct = with_text(&lines, "select 42 as direct")[0];
    assert_eq!(direct["through_proxy"], false, "{direct}");
    assert!(direct.get("person").is_none(), "{direct}");
    let _ = std::fs::remove_dir_all(&audit);
}
