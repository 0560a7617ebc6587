//! Running the proxy like infrastructure, end to end against the bed:
//! layered configuration, several endpoints, health and metrics, limits,
//! drain on SIGTERM, reload on SIGHUP, `connect` and `doctor`.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::bed::{AwsHome, Bed, sso_setup, unique_temp_path};
use support::proxy::{Proxy, addr_after, clean_pg_env, http_get, metric, run};
use support::raw;
use tokio::io::AsyncWriteExt;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

const DEADLINE: Duration = Duration::from_secs(30);

/// The binary with no inherited RDS_IAM_PROXY_* or PG* settings.
fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RDS_IAM_PROXY_") {
            cmd.env_remove(k);
        }
    }
    clean_pg_env(&mut cmd);
    cmd.stdin(Stdio::null());
    cmd
}

fn write_file(name: &str, text: &str) -> PathBuf {
    let dir = unique_temp_path("rdsiam-ops");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Plaintext (loopback) tokio-postgres session through the proxy; the
/// connection task's end (with its error) comes back through the handle.
async fn session(
    port: u16,
    user: &str,
) -> Result<
    (
        tokio_postgres::Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ),
    tokio_postgres::Error,
> {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user={user} dbname=mylab sslmode=disable connect_timeout=20"
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls).await?;
    Ok((client, tokio::spawn(conn)))
}

/// Polls `f` until it returns Some, with a deadline.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn check_config_layers_flags_over_env_over_file() {
    let file = write_file(
        "proxy.toml",
        "max_connections = 7\nlogin_timeout = \"45s\"\n[[endpoint]]\nname = \"writer\"\nupstream = \"db.cluster-a.eu-west-1.rds.amazonaws.com\"\nlisten = [\"127.0.0.1:6432\"]\n",
    );
    let check = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = binary();
        cmd.arg("--config")
            .arg(&file)
            .arg("--check-config")
            .args(args);
        cmd.envs(env.iter().copied());
        run(&mut cmd)
    };
    let (ok, out, err) = check(&[], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("max_connections = 7\n"), "{out}");
    assert!(out.contains("login_timeout = \"45s\"\n"), "{out}");
    assert!(
        out.contains("handshake_timeout = \"30s\"\n"),
        "default: {out}"
    );
    assert!(out.contains("listen = [\"127.0.0.1:6432\"]"), "{out}");
    assert!(out.contains("region = \"eu-west-1\""), "{out}");
    let (ok, out, _) = check(&[("RDS_IAM_PROXY_MAX_CONNECTIONS", "8")], &[]);
    assert!(
        ok && out.contains("max_connections = 8\n"),
        "env beats file: {out}"
    );
    let (ok, out, _) = check(
        &[("RDS_IAM_PROXY_MAX_CONNECTIONS", "8")],
        &["--max-connections", "9"],
    );
    assert!(
        ok && out.contains("max_connections = 9\n"),
        "flag beats env: {out}"
    );

    // The printed configuration is itself a valid configuration file.
    let (_, printed, _) = check(&[], &[]);
    let again = write_file("again.toml", &printed);
    let (ok, out2, err) = run(binary().arg("--config").arg(&again).arg("--check-config"));
    assert!(ok, "{err}");
    assert_eq!(out2, printed);

    // Mistakes name the key and the file, and exit 1.
    let bad = write_file("bad.toml", "max_conections = 7\n");
    let out = binary()
        .arg("--config")
        .arg(&bad)
        .arg("--check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("max_conections") && err.contains("bad.toml"),
        "{err}"
    );
    let missing = write_file(
        "missing-cert.toml",
        "[[endpoint]]\nupstream = \"db\"\nregion = \"eu-west-1\"\nlisten = [\"127.0.0.1:1\"]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
    );
    let (ok, _, err) = run(binary().arg("--config").arg(&missing).arg("--check-config"));
    assert!(!ok && err.contains("/nonexistent/c.pem"), "{err}");
}

#[test]
fn two_endpoints_in_one_process() {
    let Some((bed, home)) = sso_setup("two_endpoints_in_one_process", "opsmulti") else {
        return;
    };
    let i = &bed.info;
    let endpoint = |name: &str, ca: &Path| {
        format!(
            "[[endpoint]]\nname = \"{name}\"\nupstream = \"{}:{}\"\nconnect_to = \"127.0.0.1:{}\"\nupstream_ca = \"{}\"\nlisten = [\"127.0.0.1:0\"]\n",
            i.endpoint_host,
            i.endpoint_port,
            i.pg_port,
            ca.display()
        )
    };
    let file = write_file(
        "two.toml",
        &[
            endpoint("writer", &i.ca_cert),
            endpoint("reader", &i.ca_cert),
            // Its own options: a CA that does not sign the server.
            endpoint("untrusting", &i.other_ca_cert),
        ]
        .join("\n"),
    );
    let proxy = Proxy::builder(bed, &home)
        .without("--upstream")
        .without("--connect-to")
        .without("--upstream-ca")
        .without("--listen")
        .arg("--config", &file)
        .start();
    let log = eventually("three listeners", || {
        let log = proxy.log();
        (log.matches("listening on ").count() == 3).then_some(log)
    });
    let port_of = |name: &str| {
        log.lines()
            .find(|l| l.contains(&format!("endpoint={name} ")))
            .and_then(|l| addr_after(l, "listening on "))
            .unwrap_or_else(|| panic!("no listener for {name}:\n{log}"))
            .port()
    };
    let psql = |port: u16| {
        let mut cmd = Command::new("psql");
        clean_pg_env(&mut cmd);
        cmd.args([
            &format!("host=127.0.0.1 port={port} user=opsmulti dbname=mylab sslmode=disable"),
            "-X",
            "-A",
            "-t",
            "-c",
            "select current_user",
        ])
        .stdin(Stdio::null());
        run(&mut cmd)
    };
    for name in ["writer", "reader"] {
        let (ok, out, err) = psql(port_of(name));
        assert!(ok, "{name}: {err}\n{}", proxy.log());
        assert_eq!(out.trim(), "opsmulti");
    }
    let (ok, _, err) = psql(port_of("untrusting"));
    assert!(!ok && err.contains("TLS verification"), "{err}");
    let log = proxy.log();
    assert!(log.contains("endpoint=writer"), "{log}");
    assert!(log.contains("endpoint=reader"), "{log}");
}

#[tokio::test]
async fn health_endpoints_and_metrics_follow_what_happens() {
    let Some((bed, home)) = sso_setup("health_endpoints_and_metrics", "opshealth") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home)
        .arg("--admin-listen", "127.0.0.1:0")
        .arg("--max-connections", "1")
        .arg("--worker-threads", "2")
        .start();
    let admin = proxy.admin_addr();
    assert_eq!(http_get(admin, "/startup").0, 200);
    assert_eq!(http_get(admin, "/liveness").0, 200);
    let (status, body) = http_get(admin, "/readiness");
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_get(admin, "/nope").0, 404);
    // Only GET, and a bounded request.
    let raw = |req: &[u8]| {
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let _ = s.write_all(req);
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp
    };
    assert!(raw(b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    assert!(raw(huge.as_bytes()).starts_with("HTTP/1.1 431"));

    let page = http_get(admin, "/metrics").1;
    assert_eq!(metric(&page, "rds_iam_proxy_tokens_signed_total"), 0.0);
    assert_eq!(
        metric(
            &page,
            "rds_iam_proxy_connections_total{outcome=\"session\"}"
        ),
        0.0
    );

    // One session: at the limit of 1, so not ready.
    let (client, conn) = session(proxy.addr.port(), "opshealth").await.unwrap();
    let row = client
        .query_one("select repeat('x', 100000)", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0).len(), 100_000);
    let (status, body) = http_get(admin, "/readiness");
    assert_eq!(status, 503);
    assert!(body.contains("connection limit"), "{body}");
    let page = http_get(admin, "/metrics").1;
    assert_eq!(metric(&page, "rds_iam_proxy_active_connections"), 1.0);
    // The session sits on the first of the two workers.
    assert!(
        page.contains("rds_iam_proxy_worker_sessions{worker=\"1\"} 0\n"),
        "{page}"
    );
    assert_eq!(
        metric(&page, "rds_iam_proxy_worker_sessions{worker=\"0\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &page,
            "rds_iam_proxy_connections_total{outcome=\"session\"}"
        ),
        1.0
    );
    assert_eq!(metric(&page, "rds_iam_proxy_tokens_signed_total"), 1.0);
    assert_eq!(
        metric(&page, "rds_iam_proxy_upstream_login_seconds_count"),
        1.0
    );
    assert!(metric(&page, "rds_iam_proxy_credential_expiry_timestamp_seconds") > 1.0e9);
    drop(client);
    let _ = conn.await;

    // The session's end frees the slot and adds its bytes.
    let page = eventually("the slot is freed", || {
        let page = http_get(admin, "/metrics").1;
        // The worker's count drops just after the connection slot.
        (metric(&page, "rds_iam_proxy_active_connections") == 0.0
            && page.contains("rds_iam_proxy_worker_sessions{worker=\"0\"} 0\n"))
        .then_some(page)
    });
    assert!(metric(&page, "rds_iam_proxy_upstream_to_client_bytes_total") > 100_000.0);
    assert!(metric(&page, "rds_iam_proxy_client_to_upstream_bytes_total") > 20.0);
    assert_eq!(http_get(admin, "/readiness").0, 200);

    // Someone else's user: refused, counted by reason, no token signed.
    let e = session(proxy.addr.port(), "not-opshealth")
        .await
        .err()
        .unwrap();
    assert_eq!(
        e.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    );
    let page = http_get(admin, "/metrics").1;
    assert_eq!(
        metric(
            &page,
            "rds_iam_proxy_connections_total{outcome=\"identity_refused\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &page,
            "rds_iam_proxy_auth_failures_total{reason=\"not_your_user\"}"
        ),
        1.0
    );
    assert_eq!(metric(&page, "rds_iam_proxy_tokens_signed_total"), 1.0);
}

#[test]
fn readiness_needs_credentials() {
    let Some(bed) = Bed::shared("readiness_needs_credentials") else {
        return;
    };
    // An SSO profile whose cache holds no token: no credentials.
    let home = AwsHome::sso_with_cache(bed, "DatabaseAdmin", &serde_json::json!({}));
    let proxy = Proxy::builder(bed, &home)
        .arg("--admin-listen", "127.0.0.1:0")
        .start();
    let admin = proxy.admin_addr();
    assert_eq!(http_get(admin, "/startup").0, 200);
    assert_eq!(http_get(admin, "/liveness").0, 200);
    let (status, body) = http_get(admin, "/readiness");
    assert_eq!(status, 503);
    assert!(body.contains("AWS identity"), "{body}");
}

#[tokio::test]
async fn max_connections_gives_53300_at_once() {
    let Some((bed, home)) = sso_setup("max_connections_gives_53300_at_once", "opslimit") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home)
        .arg("--max-connections", "1")
        .start();
    let (first, conn) = session(proxy.addr.port(), "opslimit").await.unwrap();
    let e = session(proxy.addr.port(), "opslimit").await.err().unwrap();
    assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e}");
    // psql shows it the way PostgreSQL's own refusal looks.
    let (ok, _, err) = run(proxy.psql("opslimit", "").args(["-c", "select 1"]));
    assert!(!ok && err.contains("too many clients"), "{err}");
    // The first session is unaffected; once it ends, a new one gets in.
    first.simple_query("select 1").await.unwrap();
    drop(first);
    let _ = conn.await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        match session(proxy.addr.port(), "opslimit").await {
            Ok(_) => break,
            Err(e) if e.code() == Some(&SqlState::TOO_MANY_CONNECTIONS) => {
                assert!(Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Sockets that never send a startup packet take handshake places, not
/// session slots: with one session slot and three idle sockets open, a
/// real client still logs in (it used to get 53300 from the first idle
/// socket on). Past `--max-handshakes` a socket is closed at once, long
/// before the handshake timeout; the session limit still holds.
#[tokio::test]
async fn idle_sockets_take_no_session_slots() {
    let Some((bed, home)) = sso_setup("idle_sockets_take_no_session_slots", "opsidle") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home)
        .arg("--max-connections", "1")
        .arg("--max-handshakes", "4")
        .arg("--handshake-timeout", "60s")
        .arg("--admin-listen", "127.0.0.1:0")
        .start();
    let admin = proxy.admin_addr();
    let gauge = || {
        metric(
            &http_get(admin, "/metrics").1,
            "rds_iam_proxy_handshakes_in_progress",
        )
    };
    let wait_for = |want: f64| {
        let deadline = Instant::now() + DEADLINE;
        while gauge() != want {
            assert!(
                Instant::now() < deadline,
                "handshakes in progress: {} not {want}",
                gauge()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let idle: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(proxy.addr).unwrap())
        .collect();
    wait_for(3.0);
    let (first, _conn) = session(proxy.addr.port(), "opsidle")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log()));
    first.simple_query("select 1").await.unwrap();
    wait_for(3.0);

    let fourth = std::net::TcpStream::connect(proxy.addr).unwrap();
    wait_for(4.0);
    let mut fifth = std::net::TcpStream::connect(proxy.addr).unwrap();
    fifth.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 16];
    // Closed unanswered (a read that timed out would be an error, not 0).
    assert_eq!(fifth.read(&mut buf).unwrap(), 0);
    let page = http_get(admin, "/metrics").1;
    assert_eq!(
        metric(
            &page,
            "rds_iam_proxy_connections_total{outcome=\"too_many_handshakes\"}"
        ),
        1.0
    );
    // The refusal is counted before its log line is written: wait for it.
    proxy.wait_for_log("--max-handshakes", DEADLINE);

    // Places come back when the sockets go; the one session slot is
    // still taken, so the next client gets 53300 after its startup.
    drop((idle, fourth));
    wait_for(0.0);
    let e = session(proxy.addr.port(), "opsidle").await.err().unwrap();
    assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e}");
    wait_for(0.0);
    first.simple_query("select 1").await.unwrap();
}

#[test]
fn a_silent_client_is_cut_at_the_handshake_timeout() {
    let Some((bed, home)) = sso_setup("a_silent_client_is_cut", "opssilent") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home)
        .arg("--handshake-timeout", "1s")
        .arg("--admin-listen", "127.0.0.1:0")
        .start();
    let admin = proxy.admin_addr();
    let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 16];
    // Saying nothing: the proxy closes the socket (a read that timed out
    // would be an error here, not Ok(0)).
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    let page = http_get(admin, "/metrics").1;
    assert_eq!(
        metric(
            &page,
            "rds_iam_proxy_connections_total{outcome=\"handshake_timeout\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn sigterm_drains_then_ends_sessions_with_57p01() {
    let Some((bed, home)) = sso_setup("sigterm_drains", "opsdrain") else {
        return;
    };
    let mut proxy = Proxy::builder(bed, &home)
        .arg("--max-sigterm-delay", "3s")
        .arg("--admin-listen", "127.0.0.1:0")
        .start();
    let admin = proxy.admin_addr();
    let port = proxy.addr.port();
    let (client, conn) = session(port, "opsdrain").await.unwrap();
    // A psql session, idle at its prompt (stdin stays open).
    let mut psql = Command::new("psql");
    clean_pg_env(&mut psql);
    let mut psql = psql
        .args([
            &format!("host=127.0.0.1 port={port} user=opsdrain dbname=mylab sslmode=disable"),
            "-X",
            "-A",
            "-t",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut psql_in = psql.stdin.take().unwrap();
    writeln!(psql_in, "select 'psql-' || 'up';").unwrap();
    let mut psql_out = BufReader::new(psql.stdout.take().unwrap());
    let mut line = String::new();
    psql_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "psql-up");

    proxy.signal("TERM");
    proxy.wait_for_log("waiting up to 3s", DEADLINE);
    // Draining: no new connections, but sessions carry on.
    assert!(
        session(port, "opsdrain").await.is_err(),
        "a new connection was accepted while draining"
    );
    let (status, body) = http_get(admin, "/readiness");
    assert_eq!(status, 503);
    assert!(body.contains("shutting down"), "{body}");
    assert_eq!(http_get(admin, "/liveness").0, 200);
    let row = client.query_one("select 'still here'", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "still here");

    // After the delay: FATAL 57P01 to every open session.
    let ended = tokio::time::timeout(DEADLINE, conn).await.unwrap().unwrap();
    let e = ended.expect_err("the session should end with an error");
    assert_eq!(e.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{e}");
    let status = proxy.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", proxy.log());
    // psql learns it at its next command.
    writeln!(psql_in, "select 1;").unwrap();
    drop(psql_in);
    let out = psql.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("terminating connection due to administrator command"),
        "{err}"
    );
    let log = proxy.log();
    assert!(
        log.contains("ending the remaining sessions (57P01)"),
        "{log}"
    );
}

/// A logged-in raw session on the proxy.
/// Ending a session in the middle of a result: the rows stop at a row's
/// end and the FATAL follows as a message of its own (before, it was
/// written wherever the relay stood, inside a row, and the client read
/// garbage).
#[tokio::test]
async fn shutdown_mid_result_ends_between_rows() {
    let Some((bed, home)) = sso_setup("shutdown_mid_result", "opsmidrow") else {
        return;
    };
    let mut proxy = Proxy::builder(bed, &home)
        .arg("--max-sigterm-delay", "1s")
        .start();
    let mut s = raw::login(proxy.addr, "opsmidrow").await;
    // Rows of 997 bytes, so row ends never line up with the relay's reads.
    raw::simple_query_send(
        &mut s,
        "select repeat('x', 997) from generate_series(1, 100000000)",
    )
    .await;
    let mut rows = 0u64;
    let last = tokio::time::timeout(DEADLINE, async {
        let mut signalled = false;
        loop {
            let (tag, body) = raw::read_message(&mut s)
                .await
                .expect("the stream ended without an ErrorResponse");
            match tag {
                b'T' => {}
                b'D' => {
                    assert_eq!(body.len(), 2 + 4 + 997, "a cut row");
                    rows += 1;
                    if rows == 1000 && !signalled {
                        proxy.signal("TERM");
                        signalled = true;
                    }
                }
                _ => return (tag, body),
            }
        }
    })
    .await
    .expect("the session did not end");
    assert_eq!(last.0, b'E', "after {rows} rows");
    let (code, message) = raw::error_fields(&last.1);
    assert_eq!(code, "57P01", "{message}");
    assert!(
        raw::read_message(&mut s).await.is_none(),
        "bytes after the FATAL"
    );
    assert_eq!(proxy.wait_exit(DEADLINE).code(), Some(0), "{}", proxy.log());
    assert!(!proxy.log().contains("session cut"), "{}", proxy.log());
}

/// A client that stops inside a message when the proxy ends its session
/// cannot hold it. The inspecting pump (the password guard, on by default)
/// sends the server whole messages only, and the plain relay holds back
/// the start of a short one, so none of a short half message has gone
/// upstream and the session ends cleanly. Of a long one the plain relay has
/// streamed part, so after the grace the server's side is closed without a
/// Terminate spliced into the message; the client, whose side is whole,
/// still gets the FATAL.
#[tokio::test]
async fn shutdown_with_a_client_stuck_inside_a_message() {
    let Some((bed, home)) = sso_setup("shutdown_stuck_client", "opsstuck") else {
        return;
    };
    for (plain_relay, declared, sent) in [(false, 100u32, 3), (true, 100, 3), (true, 10_000, 3_000)]
    {
        let mut builder = Proxy::builder(bed, &home);
        builder = builder.arg("--max-sigterm-delay", "1s");
        if plain_relay {
            builder = builder.env("RDS_IAM_PROXY_ALLOW_PASSWORD_CHANGES", "true");
        }
        let mut proxy = builder.start();
        let mut s = raw::login(proxy.addr, "opsstuck").await;
        // Part of a Query: its header says `declared` bytes, `sent` come.
        let mut half = vec![b'Q'];
        half.extend(declared.to_be_bytes());
        half.extend(std::iter::repeat_n(b's', sent));
        s.write_all(&half).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.signal("TERM");
        let (tag, body) = tokio::time::timeout(DEADLINE, raw::read_message(&mut s))
            .await
            .expect("the proxy did not end the session")
            .expect("no FATAL before the end");
        assert_eq!(tag, b'E');
        assert_eq!(raw::error_fields(&body).0, "57P01");
        assert_eq!(proxy.wait_exit(DEADLINE).code(), Some(0), "{}", proxy.log());
        let log = proxy.log();
        assert_eq!(
            log.contains("session cut by the proxy inside a message"),
            sent > 2048,
            "plain relay {plain_relay}, {sent} of {declared} bytes:\n{log}"
        );
    }
}

/// A second signal cuts the drain short, but the audit trail is still
/// closed: what was queued is written, and audit_stop says the trail ends
/// here (before, the process exited without it, so the end of the trail
/// looked like a crash).
#[test]
fn a_second_sigterm_exits_at_once() {
    let Some((bed, home)) = sso_setup("a_second_sigterm_exits_at_once", "opsdrain2") else {
        return;
    };
    let audit_dir = unique_temp_path("rdsiam-second-signal-audit");
    let mut proxy = Proxy::builder(bed, &home)
        .arg("--max-sigterm-delay", "1h")
        .arg("--audit-mode", "sync")
        .arg("--audit-dir", &audit_dir)
        .start();
    let mut psql = proxy
        .psql("opsdrain2", "")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut psql_in = psql.stdin.take().unwrap();
    writeln!(psql_in, "select 'up';").unwrap();
    let mut line = String::new();
    BufReader::new(psql.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "up");
    proxy.signal("TERM");
    proxy.wait_for_log("waiting up to 3600s", DEADLINE);
    proxy.signal("INT");
    let status = proxy.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(3), "{}", proxy.log());
    drop(psql_in);
    let _ = psql.wait();
    let mut types = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&audit_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            types.push(v["type"].as_str().unwrap().to_owned());
        }
    }
    assert!(types.contains(&"statement".to_owned()), "{types:?}");
    assert_eq!(
        types[types.len() - 2..],
        ["audit_stop", "file_end"],
        "{types:?}"
    );
    let _ = std::fs::remove_dir_all(&audit_dir);
}

/// A local CA and server certificate for localhost, made by the proxy's
/// own generator in a fresh directory.
fn local_ca() -> PathBuf {
    let dir = unique_temp_path("rdsiam-rotate");
    rds_iam_proxy::local_ca::ensure(&dir).unwrap();
    dir
}

fn psql_verify(port: u16, user: &str, ca: &Path) -> (bool, String, String) {
    let mut cmd = Command::new("psql");
    clean_pg_env(&mut cmd);
    cmd.args([
        &format!(
            "host=localhost port={port} user={user} dbname=mylab sslmode=verify-full sslrootcert={}",
            ca.display()
        ),
        "-X",
        "-A",
        "-t",
        "-c",
        "select 'new session'",
    ])
    .stdin(Stdio::null());
    run(&mut cmd)
}

#[tokio::test]
async fn sighup_serves_a_rotated_certificate_while_old_sessions_go_on() {
    let Some((bed, home)) = sso_setup("sighup_rotates_certificates", "opsrotate") else {
        return;
    };
    let (old, new) = (local_ca(), local_ca());
    let live = unique_temp_path("rdsiam-live-cert");
    std::fs::create_dir_all(&live).unwrap();
    let install = |from: &Path| {
        std::fs::copy(from.join("server.crt"), live.join("tls.crt")).unwrap();
        std::fs::copy(from.join("server.key"), live.join("tls.key")).unwrap();
    };
    install(&old);
    let proxy = Proxy::builder(bed, &home)
        .arg("--tls-cert", live.join("tls.crt"))
        .arg("--tls-key", live.join("tls.key"))
        .start();
    let port = proxy.addr.port();
    let (ok, _, err) = psql_verify(port, "opsrotate", &old.join("ca.crt"));
    assert!(ok, "{err}");
    let (client, _conn) = session(port, "opsrotate").await.unwrap();

    install(&new);
    proxy.signal("HUP");
    proxy.wait_for_log("configuration reloaded", DEADLINE);
    let (ok, out, err) = psql_verify(port, "opsrotate", &new.join("ca.crt"));
    assert!(ok, "new certificate not served: {err}\n{}", proxy.log());
    assert_eq!(out.trim(), "new session");
    let (ok, _, _) = psql_verify(port, "opsrotate", &old.join("ca.crt"));
    assert!(!ok, "the old certificate is still served");
    let row = client.query_one("select 'old session'", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "old session");

    // A broken key: refused, the certificate in force stays.
    std::fs::write(live.join("tls.key"), "not a key").unwrap();
    proxy.signal("HUP");
    proxy.wait_for_log("reload refused", DEADLINE);
    let (ok, _, err) = psql_verify(port, "opsrotate", &new.join("ca.crt"));
    assert!(ok, "{err}");
    client.simple_query("select 1").await.unwrap();
    for d in [old, new, live] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A SIGHUP applies what it can and refuses, naming it, a change to a
/// setting built once at start. Before, a reload that turned the audit on
/// logged "configuration reloaded" and audited nothing.
#[tokio::test]
async fn sighup_refuses_start_only_settings_and_applies_the_rest() {
    let Some((bed, home)) = sso_setup("sighup_refuses_start_only_settings", "opsreload") else {
        return;
    };
    let file = unique_temp_path("rdsiam-reload").with_extension("toml");
    let audit_dir = unique_temp_path("rdsiam-reload-audit");
    std::fs::write(&file, "max_connections = 5\n").unwrap();
    let proxy = Proxy::builder(bed, &home).arg("--config", &file).start();
    let port = proxy.addr.port();
    let (first, _conn) = session(port, "opsreload").await.unwrap();

    std::fs::write(
        &file,
        format!(
            "max_connections = 5\nlog_format = \"json\"\n[audit]\nmode = \"sync\"\ndir = \"{}\"\n",
            audit_dir.display()
        ),
    )
    .unwrap();
    proxy.signal("HUP");
    let log = proxy.wait_for_log("reload refused", DEADLINE);
    assert!(
        log.contains("apply only at a restart: audit, log_format"),
        "{log}"
    );
    assert!(!log.contains("configuration reloaded"), "{log}");
    let (second, _conn2) = session(port, "opsreload").await.unwrap();
    second.simple_query("select 1").await.unwrap();
    assert!(!audit_dir.exists(), "an audit trail was started");
    drop(second);

    // A limit does reload: with one session open, a second is now refused.
    std::fs::write(&file, "max_connections = 1\n").unwrap();
    proxy.signal("HUP");
    proxy.wait_for_log("configuration reloaded", DEADLINE);
    let Err(refused) = session(port, "opsreload").await else {
        panic!("a second session got in over the new limit of 1");
    };
    assert_eq!(
        refused.code(),
        Some(&SqlState::TOO_MANY_CONNECTIONS),
        "{refused}"
    );
    first.simple_query("select 1").await.unwrap();
    let _ = std::fs::remove_file(&file);
}

/// Flags for the bed's endpoint; `over` replaces a flag's value.
fn bed_flags(bed: &Bed, over: &[(&str, &str)]) -> Vec<String> {
    let i = &bed.info;
    let mut flags = vec![
        (
            "--upstream",
            format!("{}:{}", i.endpoint_host, i.endpoint_port),
        ),
        ("--connect-to", format!("127.0.0.1:{}", i.pg_port)),
        ("--upstream-ca", i.ca_cert.display().to_string()),
    ];
    for (k, v) in over {
        flags.iter_mut().find(|(f, _)| f == k).unwrap().1 = v.to_string();
    }
    flags
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect()
}

#[test]
fn connect_runs_psql_end_to_end() {
    let Some((bed, home)) = sso_setup("connect_runs_psql_end_to_end", "opsconnect") else {
        return;
    };
    let state = unique_temp_path("rdsiam-connect-state");
    let connect = |cmd: &[&str]| {
        let mut c = binary();
        home.apply(&mut c);
        c.arg("connect")
            .args(bed_flags(bed, &[]))
            .arg("--state-dir")
            .arg(&state)
            .arg("--")
            .args(cmd);
        c.output().unwrap()
    };
    let out = connect(&[
        "psql",
        "-d",
        "mylab",
        "-X",
        "-A",
        "-t",
        "-c",
        "select current_user",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "opsconnect");
    // The command's status is the exit status; the socket is private.
    let out = connect(&[
        "sh",
        "-c",
        "test \"$PGUSER\" = opsconnect && test \"$(stat -c %a \"$PGHOST\")\" = 700 && exit 7",
    ]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(state);
}

#[test]
fn doctor_on_a_healthy_and_a_broken_setup() {
    let Some((bed, home)) = sso_setup("doctor_on_a_healthy_and_a_broken_setup", "opsdoctor") else {
        return;
    };
    let doctor = |home: &AwsHome, over: &[(&str, &str)]| {
        let mut c = binary();
        home.apply(&mut c);
        c.arg("doctor").args(bed_flags(bed, over));
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = doctor(&home, &[]);
    assert_eq!(code, Some(0), "{out}");
    for check in [
        "✓ AWS credentials",
        "✓ identity",
        "database user \"opsdoctor\"",
        "✓ region",
        "✓ DNS",
        "✓ TCP",
        "✓ TLS",
        "✓ token",
    ] {
        assert!(out.contains(check), "{check}: {out}");
    }

    let i = &bed.info;
    let (code, out) = doctor(
        &home,
        &[("--upstream-ca", &i.other_ca_cert.display().to_string())],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("✗ TLS") && out.contains("fix:"), "{out}");

    // A port nothing listens on.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let (code, out) = doctor(&home, &[("--connect-to", &format!("127.0.0.1:{port}"))]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("✗ TCP") && out.contains("- TLS: skipped"),
        "{out}"
    );

    let nobody = AwsHome::sso_with_cache(bed, "DatabaseAdmin", &serde_json::json!({}));
    let (code, out) = doctor(&nobody, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("✗ AWS credentials") && out.contains("aws sso login"),
        "{out}"
    );
    assert!(out.contains("- token: skipped"), "{out}");
}

/// The deployment examples in the docs start as written (as far as this
/// machine can tell without Docker or Kubernetes: their command lines pass
/// `--check-config`), and the unsafe shape they replaced does not.
#[test]
fn documented_container_examples_are_safe_as_written() {
    let state = unique_temp_path("rdsiam-doc-state");
    let check = |args: &[String]| {
        let mut cmd = binary();
        cmd.env("RDS_IAM_PROXY_STATE_DIR", &state)
            .args(args)
            .arg("--check-config");
        run(&mut cmd)
    };
    let root = support::bed::repo_root();
    // The sidecar: every `- --flag=value` of the proxy container.
    let yaml = std::fs::read_to_string(root.join("docs/kubernetes-sidecar.yaml")).unwrap();
    let args: Vec<String> = yaml
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("- --"))
        .map(|a| format!("--{a}"))
        .collect();
    assert!(
        args.iter().any(|a| a.starts_with("--allow-local-user=")),
        "{args:?}"
    );
    let (ok, out, err) = check(&args);
    assert!(ok, "{err}");
    assert!(out.contains("listen = [\"127.0.0.1:5432\"]"), "{out}");
    // docs/operations.md: the `docker run` lines, flags after the image name.
    let ops = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let mut commands = Vec::new();
    let mut current: Option<String> = None;
    for line in ops.lines() {
        let l = line.trim().trim_end_matches('\\').trim();
        match &mut current {
            None if l.starts_with("docker run") => current = Some(l.to_owned()),
            Some(c) => c.push_str(&format!(" {l}")),
            None => {}
        }
        if current.is_some() && !line.trim_end().ends_with('\\') {
            commands.extend(current.take());
        }
    }
    assert_eq!(commands.len(), 2, "{commands:?}");
    for c in &commands {
        let after_image = c.split(" rds-iam-proxy ").nth(1).expect("image name");
        let mut args: Vec<String> = after_image
            .replace("\"$(id -u)\"", "0")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        // No certificate files here: the local CA stands in for them.
        if let Some(i) = args.iter().position(|a| a == "--tls-cert") {
            args.drain(i..i + 4);
        }
        let (ok, _, err) = check(&args);
        assert!(ok, "{c}: {err}");
    }
    // What the Docker example used to say, in local mode: refused.
    let (ok, _, err) = check(&[
        "--upstream".into(),
        "mydb.cluster-abc.eu-west-1.rds.amazonaws.com".into(),
        "--listen".into(),
        "0.0.0.0:5432".into(),
    ]);
    assert!(!ok);
    assert!(err.contains("is not a loopback address"), "{err}");
    let _ = std::fs::remove_dir_all(&state);
}
