//! The network misbehaving, end to end: a fault relay (support/fault.rs)
//! between the proxy and PostgreSQL, or between a client and the proxy,
//! resets, stalls, closes, trickles and throttles. Whatever it does, the
//! proxy does not hang, panic or keep descriptors; the client ends with an
//! ErrorResponse that has a SQLSTATE, after whole messages only; and sync
//! audit records no outcome for a statement that did not complete.
//! Also: accept under descriptor exhaustion.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::audit::records;
use support::bed::{AwsHome, Bed, sso_setup, unique_temp_path};
use support::fault::{Dir, Fault, Relay};
use support::proxy::{Proxy, ProxyBuilder};
use support::raw;
use tokio::io::{AsyncRead, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(30);
/// Rows of 997 bytes, so row ends never line up with reads or TLS records.
const ROW: usize = 997;

/// The two forwarding paths: the plain relay (no audit, password guard
/// off) and the inspecting pump with synchronous audit into `audit`.
#[derive(Debug, Clone, Copy)]
enum Route {
    Plain,
    SyncAudit,
}

fn rows_sql(rows: u32) -> String {
    format!("select repeat('x', {ROW}) from generate_series(1, {rows})")
}

fn builder(bed: &Bed, home: &AwsHome, path: Route, audit: &Path) -> ProxyBuilder {
    let b = Proxy::builder(bed, home);
    match path {
        Route::Plain => b.env("RDS_IAM_PROXY_ALLOW_PASSWORD_CHANGES", "true"),
        Route::SyncAudit => b.arg("--audit-mode", "sync").arg("--audit-dir", audit),
    }
}

/// Reads a result: every DataRow must be whole and `ROW` wide. Returns the
/// rows and the first other message after them (`None`: end of stream).
async fn rows_then<S: AsyncRead + Unpin>(s: &mut S) -> (u64, Option<(u8, Vec<u8>)>) {
    let mut rows = 0;
    loop {
        match tokio::time::timeout(DEADLINE, raw::read_message(s))
            .await
            .expect("the session hangs")
        {
            Some((b'T', _)) => {}
            Some((b'D', body)) => {
                assert_eq!(body.len(), 2 + 4 + ROW, "a cut row after {rows} rows");
                rows += 1;
            }
            other => return (rows, other),
        }
    }
}

/// The SQLSTATE of an ErrorResponse that must come next, after which the
/// stream must end.
async fn ends_with_error<S: AsyncRead + Unpin>(s: &mut S, last: Option<(u8, Vec<u8>)>) -> String {
    let (tag, body) = last.expect("the stream ended without an ErrorResponse");
    assert_eq!(tag, b'E', "{:?}", String::from_utf8_lossy(&body));
    let (code, _) = raw::error_fields(&body);
    let after = tokio::time::timeout(DEADLINE, raw::read_message(s))
        .await
        .expect("the session stays open after its FATAL");
    assert!(after.is_none(), "bytes after the FATAL: {after:?}");
    code
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The proxy's descriptors come back to `baseline` once sessions end.
fn no_descriptor_kept(proxy: &Proxy, baseline: usize) {
    let deadline = Instant::now() + DEADLINE;
    while fds(proxy.pid()) > baseline {
        assert!(
            Instant::now() < deadline,
            "{} descriptors open, {baseline} before:\n{}",
            fds(proxy.pid()),
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sync audit trail of the session that sent `sql`: it is recorded as
/// sent, no outcome says it completed, and the session's end names the
/// server's side.
fn audit_says_not_completed(dir: &Path, sql: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let all = records(dir);
        let conn = all
            .iter()
            .find(|r| r["type"] == "statement" && r["text"] == sql)
            .map(|r| r["conn"].clone())
            .unwrap_or_else(|| panic!("no statement record for {sql}: {all:#?}"));
        let of_conn: Vec<&Value> = all.iter().filter(|r| r["conn"] == conn).collect();
        if let Some(end) = of_conn.iter().find(|r| r["type"] == "session_end") {
            assert_eq!(end["closed_by"], "upstream", "{end}");
            let done: Vec<&&Value> = of_conn
                .iter()
                .filter(|r| r["type"] == "outcome" && r["command_tag"].is_string())
                .collect();
            assert!(done.is_empty(), "an outcome for a cut statement: {done:?}");
            return;
        }
        assert!(Instant::now() < deadline, "no session_end: {of_conn:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn answers(addr: SocketAddr, user: &str) {
    let mut s = raw::login(addr, user).await;
    assert_eq!(raw::simple_query(&mut s, "select 41 + 1").await, ["42"]);
}

/// Between the proxy and the server: a reset or a close (FIN) in the middle
/// of a result, a silent server past the idle timeout, a reset as the proxy
/// sends a statement. Each ends the client's session with whole rows, then
/// a FATAL with a SQLSTATE (08006 for a lost server, 57P05 for the idle
/// timeout), on both forwarding paths; nothing is kept; the next session
/// works. (Before: the client was left with part of a row and no word, or
/// the bare end of the stream.)
#[tokio::test]
async fn a_server_leg_that_fails_ends_the_session_with_a_sqlstate() {
    let Some((bed, home)) = sso_setup("server_leg_faults", "faultsrv") else {
        return;
    };
    let pg: SocketAddr = format!("127.0.0.1:{}", bed.info.pg_port).parse().unwrap();
    let relay = Relay::start(pg).await;
    let big = rows_sql(3000);
    for path in [Route::Plain, Route::SyncAudit] {
        let audit = unique_temp_path("rdsiam-fault-audit");
        let proxy = builder(bed, &home, path, &audit)
            .arg("--connect-to", relay.addr.to_string())
            .arg("--idle-timeout", "2s")
            .start();
        answers(proxy.addr, "faultsrv").await;
        let baseline = fds(proxy.pid());
        let cases = [
            (Dir::Back, Fault::ResetAfter(200_000), big.as_str(), "08006"),
            (Dir::Back, Fault::CloseAfter(200_000), &big, "08006"),
            (Dir::Back, Fault::StallAfter(200_000), &big, "57P05"),
            (
                Dir::Forward,
                Fault::ResetAfter(0),
                "select 'reset on the way'",
                "08006",
            ),
        ];
        for (dir, fault, sql, expect) in cases {
            let what = format!("{path:?} {dir:?} {fault:?}");
            let mut s = raw::login(proxy.addr, "faultsrv").await;
            relay.arm(dir, fault);
            raw::simple_query_send(&mut s, sql).await;
            let (rows, last) = rows_then(&mut s).await;
            let code = ends_with_error(&mut s, last).await;
            assert_eq!(code, expect, "{what}, after {rows} rows");
            if dir == Dir::Back {
                assert!(rows > 0 && rows < 3000, "{what}: {rows} rows");
            }
            relay.arm(dir, Fault::Pass);
            if matches!(path, Route::SyncAudit) && expect == "08006" {
                audit_says_not_completed(&audit, sql);
            }
            answers(proxy.addr, "faultsrv").await;
            no_descriptor_kept(&proxy, baseline);
        }
        let log = proxy.log();
        assert!(!log.contains("panicked"), "{log}");
        let _ = std::fs::remove_dir_all(&audit);
    }
}

/// One byte per write both ways (TLS records arrive in pieces: login and a
/// 20 KB result), and a bandwidth cap (a 300 KB result at 400 KB/s): results arrive whole and exact, on both legs and both
/// paths.
#[tokio::test]
async fn slow_and_narrow_networks_change_nothing() {
    let Some((bed, home)) = sso_setup("slow_networks", "faultslow") else {
        return;
    };
    let pg: SocketAddr = format!("127.0.0.1:{}", bed.info.pg_port).parse().unwrap();
    let server_leg = Relay::start(pg).await;
    for path in [Route::Plain, Route::SyncAudit] {
        let audit = unique_temp_path("rdsiam-fault-audit");
        let proxy = builder(bed, &home, path, &audit)
            .arg("--connect-to", server_leg.addr.to_string())
            .start();
        let client_leg = Relay::start(proxy.addr).await;
        for (relay, fault, n) in [
            (&server_leg, Fault::Trickle(Duration::ZERO), 20),
            (&client_leg, Fault::Trickle(Duration::ZERO), 20),
            (&server_leg, Fault::Cap(400_000), 300),
            (&client_leg, Fault::Cap(400_000), 300),
        ] {
            let what = format!(
                "{path:?} {fault:?} on the {} leg",
                if std::ptr::eq(relay, &server_leg) {
                    "server"
                } else {
                    "client"
                }
            );
            relay.arm(Dir::Forward, fault);
            relay.arm(Dir::Back, fault);
            let mut s = raw::login(client_leg.addr, "faultslow").await;
            raw::simple_query_send(&mut s, &rows_sql(n)).await;
            let (rows, last) = rows_then(&mut s).await;
            assert_eq!(rows, u64::from(n), "{what}");
            let (tag, body) = last.expect("no CommandComplete");
            let tag_text = format!("SELECT {n}\0");
            assert_eq!(
                (tag, body.as_slice()),
                (b'C', tag_text.as_bytes()),
                "{what}"
            );
            assert_eq!(raw::read_message(&mut s).await.map(|m| m.0), Some(b'Z'));
            assert_eq!(
                raw::simple_query(&mut s, "select 'still here'").await,
                ["still here"],
                "{what}"
            );
            relay.arm(Dir::Forward, Fault::Pass);
            relay.arm(Dir::Back, Fault::Pass);
        }
        let _ = std::fs::remove_dir_all(&audit);
    }
}

/// The client's side: a client that half-closes after its Query still gets
/// the whole answer; a client reset inside a statement, short or long,
/// runs nothing and is audited as sent by no one; the proxy keeps nothing.
#[tokio::test]
async fn a_client_leg_that_fails_runs_nothing_it_did_not_send() {
    let Some((bed, home)) = sso_setup("client_leg_faults", "faultcli") else {
        return;
    };
    bed.admin_sql(
        "drop table if exists fault_keep; create table fault_keep (k int); \
         insert into fault_keep values (1); grant delete on fault_keep to faultcli",
    );
    for path in [Route::Plain, Route::SyncAudit] {
        let audit = unique_temp_path("rdsiam-fault-audit");
        let proxy = builder(bed, &home, path, &audit).start();
        answers(proxy.addr, "faultcli").await;
        let baseline = fds(proxy.pid());

        let mut s = raw::login(proxy.addr, "faultcli").await;
        raw::simple_query_send(&mut s, &rows_sql(50)).await;
        s.shutdown().await.unwrap();
        let (rows, last) = rows_then(&mut s).await;
        assert_eq!(rows, 50, "{path:?}: half-closed client");
        assert_eq!(last.map(|m| m.0), Some(b'C'));
        assert_eq!(raw::read_message(&mut s).await.map(|m| m.0), Some(b'Z'));
        assert!(raw::read_message(&mut s).await.is_none());

        for padding in [0, 3000] {
            let sql = format!("delete from fault_keep /* {} */", "p".repeat(padding));
            let mut message = vec![b'Q'];
            message.extend(((sql.len() + 5) as u32).to_be_bytes());
            message.extend(sql.as_bytes());
            message.push(0);
            let s = raw::login(proxy.addr, "faultcli").await;
            let mut s = s;
            s.write_all(&message[..message.len() - 8]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
            no_descriptor_kept(&proxy, baseline);
            assert_eq!(bed.admin_sql("select count(*) from fault_keep").trim(), "1");
            if matches!(path, Route::SyncAudit) {
                let all = records(&audit);
                assert!(
                    !all.iter()
                        .any(|r| r["text"].as_str().is_some_and(|t| t.contains("fault_keep"))),
                    "{all:#?}"
                );
            }
        }
        answers(proxy.addr, "faultcli").await;
        assert!(!proxy.log().contains("panicked"), "{}", proxy.log());
        let _ = std::fs::remove_dir_all(&audit);
    }
}

/// Out of descriptors: with `ulimit -n` lowered under a running proxy and a
/// flood of connections, accept fails and backs off (a handful of log lines,
/// not a spin), the established session keeps working, and once the flood
/// is gone the proxy accepts again.
#[tokio::test]
async fn out_of_descriptors_accept_backs_off_and_recovers() {
    let Some((bed, home)) = sso_setup("fd_exhaustion", "faultfd") else {
        return;
    };
    let audit = unique_temp_path("rdsiam-fault-audit");
    let proxy = builder(bed, &home, Route::Plain, &audit)
        .arg("--handshake-timeout", "3s")
        .start();
    let mut kept = raw::login(proxy.addr, "faultfd").await;
    let limit = fds(proxy.pid()) + 4;
    let lowered = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", proxy.pid()))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(lowered.success());
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    }
    let log = proxy.wait_for_log("accept failed", DEADLINE);
    let failures = |log: &str| log.matches("accept failed").count();
    let first = failures(&log);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let more = failures(&proxy.log()) - first;
    assert!(
        more <= 25,
        "{more} accept failures in 2 s: a spin, not a back-off"
    );
    assert_eq!(
        raw::simple_query(&mut kept, "select 'kept'").await,
        ["kept"]
    );
    drop(flood);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = tokio::net::TcpStream::connect(proxy.addr).await.ok()?;
            s.write_all(&raw::startup_packet(
                0,
                &[("user", "faultfd"), ("database", "mylab")],
            ))
            .await
            .ok()?;
            let login = raw::read_until_ready(&mut s).await;
            (login.last().map(|m| m.0) == Some(b'Z')).then_some(s)
        })
        .await;
        if let Ok(Some(mut s)) = attempt {
            assert_eq!(raw::simple_query(&mut s, "select 'back'").await, ["back"]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no session after the flood:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!proxy.log().contains("panicked"), "{}", proxy.log());
}
