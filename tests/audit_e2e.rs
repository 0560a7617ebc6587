//! The audit trail and the password guard end to end: the proxy binary
//! against the test bed, driven by psql, pgbench and tokio-postgres.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::audit::records;
use support::bed::{AwsHome, Bed, sso_setup, unique_temp_path};
use support::proxy::{Proxy, clean_pg_env, run};

const DEADLINE: Duration = Duration::from_secs(30);
/// The session's pid and PostgreSQL's `%c` session id, as the server has
/// them.
const SESSION_ID_SQL: &str = "select pid, to_hex(floor(extract(epoch from backend_start))::bigint) || '.' || to_hex(pid) from pg_stat_activity where pid = pg_backend_pid()";
const GUARD_MESSAGE: &str = "password changes are not allowed through rds-iam-proxy";

fn audited(bed: &Bed, home: &AwsHome, mode: &str, dir: &Path) -> Proxy {
    Proxy::builder(bed, home)
        .arg("--audit-mode", mode)
        .arg("--audit-dir", dir)
        .start()
}

/// Waits for a record matching `pred` (async mode writes in the background).
fn wait_record(dir: &Path, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let r = records(dir);
        if r.iter().any(&pred) {
            return r;
        }
        assert!(Instant::now() < deadline, "record not written: {r:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the records as a whole satisfy `pred`.
fn wait_all(dir: &Path, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let r = records(dir);
        if pred(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "records not written: {r:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn of_conn(records: &[Value], conn: u64) -> Vec<&Value> {
    records.iter().filter(|r| r["conn"] == conn).collect()
}

fn verify_cli(args: &[&Path]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
    cmd.args(["audit", "verify"]).args(args);
    run(&mut cmd)
}

/// A short summary of a statement/outcome record, for exact comparisons.
fn brief(r: &Value) -> String {
    match r["type"].as_str().unwrap() {
        "statement" => format!(
            "statement n={} part={}/{} {} {}",
            r["n"], r["part"], r["parts"], r["protocol"], r["text"]
        ),
        "outcome" if r["sqlstate"].is_string() => {
            format!("outcome n={} part={} {}", r["n"], r["part"], r["sqlstate"])
        }
        "outcome" => format!(
            "outcome n={} part={} {} rows={}",
            r["n"], r["part"], r["command_tag"], r["rows"]
        ),
        t => t.to_owned(),
    }
}

#[test]
fn psql_session_produces_exactly_the_expected_records() {
    let Some((bed, home)) = sso_setup(
        "psql_session_produces_exactly_the_expected_records",
        "aud_psql",
    ) else {
        return;
    };
    let dir = unique_temp_path("rdsiam-audit");
    let proxy = audited(bed, &home, "async", &dir);
    let (ok, out, err) = run(proxy.psql("aud_psql", "application_name=audit-test").args([
        "-c",
        "select 1 as one; select 2",
        "-c",
        SESSION_ID_SQL,
        "-c",
        "select nosuchcolumn",
    ]));
    assert!(!ok, "the last statement fails");
    assert!(err.contains("nosuchcolumn"), "{err}");
    // The server's own view of the session: its pid and its `%c` id.
    let (pid, session_id) = out.lines().nth(2).unwrap().split_once('|').unwrap();
    let pid: i64 = pid.parse().unwrap();

    let all = wait_record(&dir, |r| r["type"] == "session_end");
    let start = all.iter().find(|r| r["type"] == "session_start").unwrap();
    let conn = start["conn"].as_u64().unwrap();
    assert_eq!(start["person"], "aud_psql");
    assert_eq!(start["db_user"], "aud_psql");
    assert_eq!(start["identity_source"], "sso");
    assert_eq!(start["application_name"], "audit-test");
    assert_eq!(
        start["backend_pid"], pid,
        "the join key with Activity Streams"
    );
    assert!(
        start["role_arn"]
            .as_str()
            .unwrap()
            .contains("AWSReservedSSO_DatabaseAdmin")
    );
    assert_eq!(
        start["session_id"], session_id,
        "Activity Streams' sessionId, estimated without a query: {start}"
    );
    assert_eq!(start["upstream_local_host"], "127.0.0.1");
    assert!(start["upstream_local_port"].as_u64().unwrap() > 0);
    assert!(
        start["backend_started_after"].as_str() <= start["backend_started_before"].as_str(),
        "{start}"
    );
    assert!(start["access_key_id"].as_str().unwrap().starts_with("ASIA"));
    assert!(start["client_tls"].as_str().unwrap().contains("TLSv1_3"));
    assert!(start.get("secret_access_key").is_none());

    let got: Vec<String> = of_conn(&all, conn).into_iter().map(brief).collect();
    let expect = [
        "session_start",
        "statement n=1 part=1/2 \"simple\" \"select 1 as one\"",
        "statement n=1 part=2/2 \"simple\" \"select 2\"",
        "outcome n=1 part=1 \"SELECT 1\" rows=1",
        "outcome n=1 part=2 \"SELECT 1\" rows=1",
        &format!("statement n=2 part=1/1 \"simple\" \"{SESSION_ID_SQL}\""),
        "outcome n=2 part=1 \"SELECT 1\" rows=1",
        "statement n=3 part=1/1 \"simple\" \"select nosuchcolumn\"",
        "outcome n=3 part=1 \"42703\"",
        "session_end",
    ];
    assert_eq!(got, expect);
    let end = all.iter().find(|r| r["type"] == "session_end").unwrap();
    assert_eq!(end["closed_by"], "client");
    assert!(end["bytes_from_client"].as_u64().unwrap() > 50);

    // The chain verifies; a changed record is found where it is.
    let (ok, out, err) = verify_cli(&[&dir]);
    assert!(ok && out.starts_with("ok: "), "{out}{err}");
    drop(proxy); // the proxy would keep appending
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(&file).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("from pg_stat_activity where pid"))
        .unwrap();
    std::fs::write(
        &file,
        text.replacen(
            "from pg_stat_activity where pid",
            "from pg_stat_activity where 42",
            1,
        ),
    )
    .unwrap();
    let (ok, _, err) = verify_cli(&[&file]);
    assert!(!ok);
    assert!(
        err.contains(&format!(":{} (seq {})", line + 2, line + 2)) && err.contains("was changed"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn password_changes_are_refused_audited_and_redacted() {
    let Some((bed, home)) = sso_setup(
        "password_changes_are_refused_audited_and_redacted",
        "aud_guard",
    ) else {
        return;
    };
    let dir = unique_temp_path("rdsiam-audit");
    let proxy = audited(bed, &home, "async", &dir);

    // What psql's \\password sends (ALTER USER with a SCRAM verifier),
    // then the session goes on.
    let scram = "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$c3RvcmVka2V5:c2VydmVya2V5";
    let (ok, out, err) = run(proxy.psql("aud_guard", "").args([
        "-v",
        "ON_ERROR_STOP=0",
        "-c",
        &format!("ALTER USER aud_guard PASSWORD '{scram}'"),
        "-c",
        "select 1; create role x password 'y'; select 2",
        "-c",
        "select 'still usable'",
    ]));
    assert!(ok, "{err}");
    assert_eq!(err.matches(GUARD_MESSAGE).count(), 2, "{err}");
    assert!(err.contains("ERROR:"), "{err}");
    assert_eq!(out.trim(), "still usable");

    // Extended protocol, inside a transaction, and pipelined.
    let client = proxy.tokio_pg("aud_guard").await.unwrap();
    let e = client
        .execute("alter role aud_guard with encrypted password 'x'", &[])
        .await
        .unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42501");
    assert_eq!(db.message(), GUARD_MESSAGE);
    client.batch_execute("begin").await.unwrap();
    assert!(
        client
            .batch_execute("alter user aud_guard password 'x'")
            .await
            .is_err()
    );
    let e = client.query_one("select 1", &[]).await.unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "25P02");
    client.batch_execute("rollback").await.unwrap();
    let (a, b, c) = tokio::join!(
        client.query_one("select 1::int", &[]),
        client.execute("alter user aud_guard password 'pipelined'", &[]),
        client.query_one("select 2::int", &[]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(b.unwrap_err().as_db_error().unwrap().code().code(), "42501");
    assert_eq!(c.unwrap().get::<_, i32>(0), 2);
    drop(client);

    let all = wait_all(&dir, |all| {
        all.iter()
            .filter(|r| r["type"] == "outcome" && r["sqlstate"] == "42501")
            .count()
            >= 5
    });
    let refused: Vec<&Value> = all
        .iter()
        .filter(|r| r["refused"] == "password change")
        .collect();
    assert_eq!(refused.len(), 7, "{refused:#?}");
    for r in &refused {
        if r["text"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("password")
        {
            assert_eq!(r["redacted"], true, "{r}");
        }
    }
    let text = all.iter().map(|r| r.to_string()).collect::<String>();
    for secret in ["c3RvcmVka2V5", "SCRAM-SHA-256$", "'pipelined'", "'y'"] {
        assert!(!text.contains(secret), "{secret} leaked into the audit log");
    }
    assert!(!proxy.log().contains("c3RvcmVka2V5"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn prepared_statements_are_resolved_to_their_text() {
    let Some((bed, home)) = sso_setup("prepared_statements_are_resolved_to_their_text", "aud_prep")
    else {
        return;
    };
    let dir = unique_temp_path("rdsiam-audit");
    let proxy = audited(bed, &home, "async", &dir);

    let script = unique_temp_path("rdsiam-pgbench").with_extension("sql");
    std::fs::write(
        &script,
        "\\set x random(1, 1000)\nselect :x::int + 1 as pgbench_marker;\n",
    )
    .unwrap();
    let mut cmd = Command::new("pgbench");
    clean_pg_env(&mut cmd);
    cmd.env("PGHOST", "127.0.0.1")
        .env("PGPORT", proxy.addr.port().to_string())
        .env("PGUSER", "aud_prep")
        .env("PGDATABASE", "mylab")
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", proxy.ca_cert())
        .args(["-n", "-M", "prepared", "-c", "1", "-t", "5", "-f"])
        .arg(&script);
    let (ok, out, err) = run(&mut cmd);
    assert!(ok, "{out}{err}");

    let client = proxy.tokio_pg("aud_prep").await.unwrap();
    let stmt = client
        .prepare("select $1::int * 2 as tp_marker")
        .await
        .unwrap();
    for i in 0..3 {
        let row = client.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 2);
    }
    drop(client);

    // Wait for the outcomes of the last statements (the test's runtime
    // does not run the connection task while it waits here, so the session
    // itself may not end yet).
    let all = wait_all(&dir, |all| {
        all.iter()
            .filter(|r| r["type"] == "outcome" && r["command_tag"] == "SELECT 1")
            .count()
            >= 8
    });
    let pgbench: Vec<&Value> = all
        .iter()
        .filter(|r| {
            r["type"] == "statement" && r["text"] == "select $1::int + 1 as pgbench_marker;"
        })
        .collect();
    assert_eq!(pgbench.len(), 5, "{all:#?}");
    for r in &pgbench {
        assert_eq!(r["protocol"], "extended");
        assert!(
            r["statement_name"].as_str().unwrap().starts_with('P'),
            "{r}"
        );
        assert!(r.get("params").is_none(), "parameters are off by default");
    }
    let tp: Vec<&Value> = all
        .iter()
        .filter(|r| r["type"] == "statement" && r["text"] == "select $1::int * 2 as tp_marker")
        .collect();
    assert_eq!(tp.len(), 3, "{all:#?}");
    assert!(!tp[0]["statement_name"].as_str().unwrap().is_empty());
    // Each Execute has its outcome.
    for r in tp {
        let conn = &r["conn"];
        let n = &r["n"];
        assert!(
            all.iter().any(|o| o["type"] == "outcome"
                && &o["conn"] == conn
                && &o["n"] == n
                && o["command_tag"] == "SELECT 1"),
            "no outcome for {r}"
        );
    }
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_dir_all(&dir);
}

fn count(bed: &Bed, table: &str) -> i64 {
    bed.admin_sql(&format!("select count(*) from {table}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn sync_mode_kill_9_loses_no_record_of_a_forwarded_statement() {
    let Some((bed, home)) = sso_setup(
        "sync_mode_kill_9_loses_no_record_of_a_forwarded_statement",
        "aud_kill",
    ) else {
        return;
    };
    bed.admin_sql(
        "drop table if exists audit_kill; create table audit_kill (k int); \
         grant insert on audit_kill to aud_kill",
    );
    let dir = unique_temp_path("rdsiam-audit");
    let proxy = audited(bed, &home, "sync", &dir);
    let mut sql = String::new();
    for k in 1..=5000 {
        sql.push_str(&format!("insert into audit_kill values ({k});\n"));
    }
    let mut psql = proxy.psql("aud_kill", "");
    let mut child = psql
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(sql.as_bytes());
    });
    let deadline = Instant::now() + DEADLINE;
    while count(bed, "audit_kill") < 50 {
        assert!(Instant::now() < deadline, "inserts do not arrive");
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Command::new("kill")
        .args(["-9", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = child.wait();
    let _ = feeder.join();
    let rows: Vec<i64> = bed
        .admin_sql("select k from audit_kill order by k")
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(rows.len() >= 50 && rows.len() < 5000, "{}", rows.len());
    // A torn last line is possible after kill -9; every whole record is
    // read, and every row the server has is among them.
    let mut recorded = std::collections::HashSet::new();
    for f in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let r: Value = serde_json::from_str(line).unwrap();
            if let Some(k) = r["text"]
                .as_str()
                .and_then(|t| t.strip_prefix("insert into audit_kill values ("))
            {
                recorded.insert(k.trim_end_matches([')', ';']).parse::<i64>().unwrap());
            }
        }
    }
    let missing: Vec<&i64> = rows.iter().filter(|k| !recorded.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "forwarded without a record: {missing:?}"
    );
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sync_mode_full_disk_refuses_statements() {
    let Some((bed, home)) = sso_setup("sync_mode_full_disk_refuses_statements", "aud_disk") else {
        return;
    };
    bed.admin_sql(
        "drop table if exists audit_disk; create table audit_disk (k int); \
         grant insert on audit_disk to aud_disk",
    );
    let dir = unique_temp_path("rdsiam-audit-tmpfs");
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a small tmpfs (needs root)");
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _umount = Umount(dir.clone());
    let proxy = audited(bed, &home, "sync", &dir.join("log"));
    let client = proxy.tokio_pg("aud_disk").await.unwrap();
    client
        .batch_execute("insert into audit_disk values (1)")
        .await
        .unwrap();

    // Fill the disk.
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while f.write_all(&[0u8; 4096]).is_ok() {}
    let _ = f.sync_all();
    drop(f);

    // The current page of the log file may still take a record or two.
    let mut refused = None;
    for k in 2..200 {
        if let Err(e) = client
            .batch_execute(&format!("insert into audit_disk values ({k})"))
            .await
        {
            refused = Some((k, e));
            break;
        }
    }
    let (k, e) = refused.expect("statements refused once the disk is full");
    let db = e
        .as_db_error()
        .expect("an ErrorResponse, not a dropped connection");
    assert_eq!(db.code().code(), "58030", "{db:?}");
    assert!(
        db.message().contains("cannot write its audit log"),
        "{db:?}"
    );
    let present = bed.admin_sql(&format!("select count(*) from audit_disk where k = {k}"));
    assert_eq!(present.trim(), "0", "the refused insert never ran");
    let before = count(bed, "audit_disk");
    // New sessions are refused too.
    let Err(e) = proxy.tokio_pg("aud_disk").await else {
        panic!("a new session was accepted with the audit log unwritable");
    };
    assert_eq!(e.as_db_error().unwrap().code().code(), "58030");

    // Space again: the log resumes and so do statements.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + DEADLINE;
    while client
        .batch_execute("insert into audit_disk values (3)")
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count(bed, "audit_disk"), before + 1);
    drop(client);
    drop(proxy);
}

/// A statement too long to hold (past 16 MiB) is refused by the server in
/// its place (54000), recorded as refused, and every outcome after it
/// still lands on its own statement.
#[tokio::test]
async fn a_statement_too_long_to_hold_is_refused_and_outcomes_stay_in_place() {
    let Some((bed, home)) = sso_setup(
        "a_statement_too_long_to_hold_is_refused_and_outcomes_stay_in_place",
        "aud_long",
    ) else {
        return;
    };
    let dir = unique_temp_path("rdsiam-audit");
    let proxy = audited(bed, &home, "sync", &dir);
    let client = proxy.tokio_pg("aud_long").await.unwrap();
    let long = format!("select '{}' as long_marker", "x".repeat(17 * 1024 * 1024));
    let err = client.simple_query(&long).await.unwrap_err();
    let db = err.as_db_error().expect("an error from the server");
    assert_eq!(db.code().code(), "54000", "{db:?}");
    assert!(db.message().contains("longer than"), "{}", db.message());
    let rows = client
        .simple_query("select 'after' as after_marker")
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "columns, a row and the command tag");
    drop(client);

    // Outcomes are written as they come (the session's end would need the
    // connection task, which this runtime does not run while it waits).
    let all = wait_record(&dir, |r| r["type"] == "outcome" && r["n"] == 2);
    let conn = all.iter().find(|r| r["type"] == "session_start").unwrap()["conn"]
        .as_u64()
        .unwrap();
    let got: Vec<String> = of_conn(&all, conn)
        .into_iter()
        .filter(|r| r["type"] == "statement" || r["type"] == "outcome")
        .map(brief)
        .collect();
    let text = format!(
        "\"<statement of {} bytes not held by rds-iam-proxy>\"",
        long.len() + 6
    );
    assert_eq!(
        got,
        [
            format!("statement n=1 part=1/1 \"simple\" {text}"),
            "outcome n=1 part=1 \"54000\"".to_owned(),
            "statement n=2 part=1/1 \"simple\" \"select 'after' as after_marker\"".to_owned(),
            "outcome n=2 part=1 \"SELECT 1\" rows=1".to_owned(),
        ]
    );
    let refused = all
        .iter()
        .find(|r| r["type"] == "statement" && r["n"] == 1 && r["conn"] == conn)
        .unwrap();
    assert_eq!(refused["refused"], "too long to audit");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With stamping on, the server (and so Activity Streams'
/// clientApplication) sees the person and connection id before the
/// client's own application_name; the audit record keeps the client's.
#[test]
fn application_name_is_stamped_when_asked() {
    let Some((bed, home)) = sso_setup("application_name_is_stamped_when_asked", "aud_stamp") else {
        return;
    };
    let dir = unique_temp_path("rdsiam-audit");
    let proxy = Proxy::builder(bed, &home)
        .arg("--audit-mode", "async")
        .arg("--audit-dir", &dir)
        .env("RDS_IAM_PROXY_AUDIT_STAMP_APPLICATION_NAME", "true")
        .start();
    let (ok, out, err) = run(proxy.psql("aud_stamp", "application_name=report").args([
        "-c",
        "select application_name from pg_stat_activity where pid = pg_backend_pid()",
    ]));
    assert!(ok, "{out}{err}");
    let all = wait_record(&dir, |r| r["type"] == "session_end");
    let start = all.iter().find(|r| r["type"] == "session_start").unwrap();
    assert_eq!(start["application_name"], "report");
    assert_eq!(
        out.trim(),
        format!("rds-iam-proxy:aud_stamp:{} report", start["conn"])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// FunctionCall records name their function. psql's `\lo_import` calls the
/// large-object functions through libpq's fastpath (FunctionCall, by OID
/// only); each OID gets one `function` record with the name the server
/// gives it, looked up on a connection of the proxy's own, so the user's
/// session holds no statement of the proxy's.
#[test]
fn function_calls_are_named() {
    let Some((bed, home)) = sso_setup("function_calls_are_named", "aud_fn") else {
        return;
    };
    let dir = unique_temp_path("rdsiam-audit");
    let proxy = audited(bed, &home, "sync", &dir);
    let file = unique_temp_path("rdsiam-lo");
    std::fs::write(&file, b"large object bytes").unwrap();
    let mut psql = proxy.psql("aud_fn", "");
    psql.arg("-c")
        .arg(format!("\\lo_import {}", file.display()));
    let (ok, out, err) = run(&mut psql);
    assert!(ok, "{out}{err}");
    let called = |r: &[Value]| -> std::collections::BTreeSet<u64> {
        r.iter()
            .filter(|x| x["type"] == "statement" && x["protocol"] == "function")
            .filter_map(|x| x["function_oid"].as_u64())
            .collect()
    };
    let records = wait_all(&dir, |r| {
        let oids = called(r);
        !oids.is_empty()
            && oids.iter().all(|oid| {
                r.iter()
                    .any(|x| x["type"] == "function" && x["function_oid"] == *oid)
            })
    });
    let named: Vec<&Value> = records.iter().filter(|r| r["type"] == "function").collect();
    assert_eq!(
        named.len(),
        called(&records).len(),
        "one lookup per OID: {named:#?}"
    );
    for r in &named {
        let oid = r["function_oid"].as_u64().unwrap();
        let server = bed.admin_sql(&format!("select {oid}::regprocedure"));
        assert_eq!(r["name"].as_str(), Some(server.trim()), "{r}");
    }
    let names: Vec<&str> = named.iter().filter_map(|r| r["name"].as_str()).collect();
    assert!(names.iter().any(|n| n.starts_with("lo_open(")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("lowrite(")), "{names:?}");
    assert!(
        !records.iter().any(|r| r["type"] == "statement"
            && r["text"]
                .as_str()
                .is_some_and(|t| t.contains("regprocedure"))),
        "the lookup ran in the user's session"
    );
    let _ = std::fs::remove_file(&file);
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `audit search` and `audit tail` over a real session's trail: the
/// person's statements with their outcomes, the error alone with
/// `--outcome error`, none for someone else, the table on request; tail
/// prints a statement run after it started, with its outcome; a changed
/// record makes the search say where and exit 1.
#[test]
fn audit_search_and_tail_find_a_persons_statements() {
    let Some((bed, home)) = sso_setup(
        "audit_search_and_tail_find_a_persons_statements",
        "aud_find",
    ) else {
        return;
    };
    let dir = unique_temp_path("rdsiam-audit-search");
    let proxy = audited(bed, &home, "sync", &dir);
    let (ok, _, err) = run(proxy.psql("aud_find", "").args([
        "-c",
        "select 'needle' as first",
        "-c",
        "select nosuchcolumn",
    ]));
    assert!(!ok && err.contains("nosuchcolumn"), "{err}");
    wait_record(&dir, |r| r["type"] == "session_end");

    let search = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
        cmd.args(["audit", "search", "--audit-dir"])
            .arg(&dir)
            .args(extra);
        let out = cmd.output().unwrap();
        let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (
            out.status.code(),
            rows,
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, rows, _, err) = search(&["--person", "aud_find", "--since", "1h"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("chain intact"), "{err}");
    let texts: Vec<&str> = rows
        .iter()
        .map(|r| r["statement"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["select 'needle' as first", "select nosuchcolumn"]);
    assert_eq!(rows[0]["outcome"], "ok");
    assert_eq!(rows[0]["command_tag"], "SELECT 1");
    assert_eq!(rows[0]["database"], "mylab");
    assert!(rows[0]["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(rows[1]["outcome"], "error");
    assert_eq!(rows[1]["sqlstate"], "42703");

    let (_, errors, _, _) = search(&["--person", "aud_find", "--outcome", "error"]);
    assert_eq!(errors.len(), 1);
    let (_, grep, _, _) = search(&["--grep", "needle"]);
    assert_eq!(grep.len(), 1);
    let (_, nobody, _, _) = search(&["--person", "someone-else"]);
    assert!(nobody.is_empty());
    let (_, _, table, _) = search(&["--person", "aud_find", "--format", "table"]);
    let table = String::from_utf8_lossy(&table);
    assert!(table.starts_with("TIME (UTC)"), "{table}");
    assert!(
        table.contains("ERROR 42703") && table.contains("select nosuchcolumn"),
        "{table}"
    );

    // tail: only what is written after it starts.
    let mut tail = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"))
        .args([
            "audit",
            "tail",
            "--format",
            "json",
            "--person",
            "aud_find",
            "--audit-dir",
        ])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // Until tail has caught up, statements might be read as old ones:
    // keep running one until tail prints it.
    let deadline = Instant::now() + DEADLINE;
    let got = loop {
        let (ok, _, err) = run(proxy.psql("aud_find", "").args(["-c", "select 'tailed'"]));
        assert!(ok, "{err}");
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
            break line;
        }
        assert!(Instant::now() < deadline, "audit tail printed nothing");
    };
    let _ = tail.kill();
    let _ = tail.wait();
    let row: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(row["statement"], "select 'tailed'");
    assert_eq!(row["person"], "aud_find");
    assert_eq!(row["outcome"], "ok");
    drop(proxy);

    // A changed record: reported with its place, exit status 1.
    let (file, text) = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::read_to_string(p).unwrap()))
        .find(|(_, t)| t.contains("needle"))
        .unwrap();
    std::fs::write(&file, text.replacen("needle", "nEEdle", 1)).unwrap();
    let (code, rows, _, err) = search(&["--person", "aud_find"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("audit chain broken at") && err.contains("was changed"),
        "{err}"
    );
    assert!(rows.len() >= 2, "the search goes on past the break");
}
