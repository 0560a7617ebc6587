//! The proxy end to end against the test bed, with real clients: psql,
//! pgbench, tokio-postgres and a raw client for what real ones never send.

mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use support::bed::{AwsHome, Bed, sso_setup};
use support::proxy::{Proxy, clean_pg_env, psql_sleep_then_interrupt, run};
use support::raw;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SSL_CHECK: &str =
    "select current_user || '|' || (select ssl from pg_stat_ssl where pid = pg_backend_pid())";

#[test]
fn psql_through_proxy_with_every_sslmode() {
    let Some((bed, home)) = sso_setup("psql_through_proxy_with_every_sslmode", "arianna") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    for mode in [
        "sslmode=disable",
        "sslmode=prefer",
        "sslmode=require",
        "sslmode=verify-full",
    ] {
        let (ok, out, err) = run(proxy.psql("arianna", mode).args(["-c", SSL_CHECK]));
        assert!(ok, "{mode}: {err}\n{}", proxy.log());
        // The upstream leg is TLS whatever the client chose.
        assert_eq!(out.trim(), "arianna|true", "{mode}");
    }
    let log = proxy.log();
    assert_eq!(log.matches("session started").count(), 4, "{log}");
    assert_eq!(
        log.matches("client_tls=none").count(),
        1,
        "only sslmode=disable is plaintext:\n{log}"
    );
    assert!(log.contains("client_tls=TLSv1_3"), "{log}");
}

#[test]
fn unix_socket_and_application_name_reach_the_server() {
    let Some((bed, home)) = sso_setup(
        "unix_socket_and_application_name_reach_the_server",
        "arianna",
    ) else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).unix_socket().start();
    let dir = proxy.unix_dir.clone().unwrap();
    let mut cmd = std::process::Command::new("psql");
    clean_pg_env(&mut cmd);
    let conninfo = format!(
        "host={} port=5432 user=arianna dbname=mylab application_name=e2e-app",
        dir.display()
    );
    let (ok, out, err) = run(cmd.args([
        conninfo.as_str(),
        "-X",
        "-A",
        "-t",
        "-c",
        "select current_setting('application_name')",
    ]));
    assert!(ok, "{err}\n{}", proxy.log());
    assert_eq!(out.trim(), "e2e-app");
    let mode = std::fs::metadata(dir.join(".s.PGSQL.5432")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
}

#[tokio::test]
async fn tokio_postgres_extended_protocol() {
    let Some((bed, home)) = sso_setup("tokio_postgres_extended_protocol", "arianna") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    let client = proxy.tokio_pg("arianna").await.unwrap();
    let stmt = client
        .prepare("select $1::int + $2::int, current_user")
        .await
        .unwrap();
    for i in 0..20 {
        let row = client.query_one(&stmt, &[&i, &1000]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1000);
        assert_eq!(row.get::<_, String>(1), "arianna");
    }
    let rows = client
        .query("select g from generate_series(1, 5000) g", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 5000);
    assert_eq!(rows[4999].get::<_, i32>(0), 5000);
}

#[tokio::test]
async fn someone_elses_user_is_refused_before_any_token_is_signed() {
    let Some((bed, home)) = sso_setup(
        "someone_elses_user_is_refused_before_any_token_is_signed",
        "arianna",
    ) else {
        return;
    };
    bed.create_iam_user("mallory_target");
    let proxy = Proxy::builder(bed, &home).start();
    let before = bed.verifier_lines_for("mallory_target");
    let err = proxy
        .tokio_pg("mallory_target")
        .await
        .expect_err("must be refused");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    );
    assert!(
        db.message().contains("\"mallory_target\"") && db.message().contains("\"arianna\""),
        "{}",
        db.message()
    );
    assert_eq!(db.hint(), Some("connect as user \"arianna\""));
    // Nothing reached the database for that user.
    assert_eq!(bed.verifier_lines_for("mallory_target"), before);
    let log = proxy.wait_for_log("connection refused", Duration::from_secs(10));
    assert!(!log.contains("session started"), "{log}");
}

#[test]
fn session_token_credentials_and_no_secret_in_logs() {
    let Some(bed) = Bed::shared("session_token_credentials_and_no_secret_in_logs") else {
        return;
    };
    bed.create_iam_user("carol");
    let creds = bed.mint_credentials("carol", "ReadOnly");
    let secret = creds.secret_access_key.clone();
    let session_token = creds
        .session_token
        .clone()
        .expect("minted credentials carry a session token");
    let home = AwsHome::static_keys(bed, &creds);
    let proxy = Proxy::builder(bed, &home).start();
    let (ok, out, err) = run(proxy.psql("carol", "").args(["-c", "select current_user"]));
    assert!(ok, "{err}\n{}", proxy.log());
    assert_eq!(out.trim(), "carol");
    let (ok, _, err) = run(proxy.psql("carol", "").args(["-c", "select 1/0"]));
    assert!(!ok && err.contains("division by zero"), "{err}");
    let log = proxy.log();
    assert!(log.contains("session started"), "{log}");
    for needle in [
        "X-Amz-Signature",
        "X-Amz-Security-Token",
        "Action=connect",
        secret.as_str(),
        session_token.as_str(),
    ] {
        assert!(!log.contains(needle), "the log contains {needle:?}:\n{log}");
    }
}

/// pgbench through `proxy` as `user`, TLS verify-full to the proxy's CA.
fn pgbench_cmd(proxy: &Proxy, user: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("pgbench");
    clean_pg_env(&mut cmd);
    cmd.env("PGHOST", "127.0.0.1")
        .env("PGPORT", proxy.addr.port().to_string())
        .env("PGUSER", user)
        .env("PGDATABASE", "mylab")
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", proxy.ca_cert());
    cmd
}

#[test]
fn pgbench_through_proxy() {
    let Some((bed, home)) = sso_setup("pgbench_through_proxy", "benchuser") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    let pgbench = |args: &[&str]| run(pgbench_cmd(&proxy, "benchuser").args(args));
    let (ok, _, err) = pgbench(&["-i", "-q", "-s", "1"]);
    assert!(ok, "pgbench -i: {err}\n{}", proxy.log());
    for mode in ["simple", "extended", "prepared"] {
        let (ok, out, err) = pgbench(&["-c", "4", "-j", "2", "-t", "50", "-M", mode]);
        assert!(ok, "{mode}: {err}");
        assert!(
            out.contains("number of transactions actually processed: 200/200"),
            "{mode}: {out}"
        );
        assert!(
            out.contains("number of failed transactions: 0"),
            "{mode}: {out}"
        );
    }
    // A new connection for every transaction: each one a fresh IAM login.
    let (ok, out, err) = pgbench(&["-C", "-c", "2", "-t", "10", "-S"]);
    assert!(ok, "-C: {err}");
    assert!(out.contains("processed: 20/20"), "{out}");
}

#[tokio::test]
async fn upstream_unreachable_is_08001() {
    let Some((bed, home)) = sso_setup("upstream_unreachable_is_08001", "arianna") else {
        return;
    };
    // A port nobody listens on: bind, note, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = Proxy::builder(bed, &home)
        .arg("--connect-to", format!("127.0.0.1:{port}"))
        .start();
    let err = proxy.tokio_pg("arianna").await.expect_err("must fail");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
    );
    assert!(
        db.message().contains("cannot reach the database endpoint"),
        "{}",
        db.message()
    );
}

#[tokio::test]
async fn upstream_certificate_must_match_ca_and_name() {
    let Some((bed, home)) = sso_setup("upstream_certificate_must_match_ca_and_name", "tlscheck")
    else {
        return;
    };
    let accepted_before = bed.verifier_lines_for("tlscheck");
    // The server's certificate is not from this CA.
    let proxy = Proxy::builder(bed, &home)
        .arg("--upstream-ca", &bed.info.other_ca_cert)
        .start();
    let err = proxy.tokio_pg("tlscheck").await.expect_err("must fail");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "08001");
    assert!(
        db.message().contains("TLS verification"),
        "{}",
        db.message()
    );
    // Why verification failed is for the operator's log, not the client.
    assert!(!db.message().contains("UnknownIssuer"), "{}", db.message());
    proxy.wait_for_log("UnknownIssuer", Duration::from_secs(5));
    drop(proxy);
    // The right CA, but the endpoint name is not on the certificate.
    let proxy = Proxy::builder(bed, &home)
        .arg(
            "--upstream",
            "other.cluster-c0ffee.eu-west-1.rds.amazonaws.com:5432",
        )
        .start();
    let err = proxy.tokio_pg("tlscheck").await.expect_err("must fail");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "08001");
    assert!(
        !db.message().contains("not valid for name"),
        "{}",
        db.message()
    );
    proxy.wait_for_log("not valid for name", Duration::from_secs(5));
    // No token was offered to a server that failed verification.
    assert_eq!(bed.verifier_lines_for("tlscheck"), accepted_before);
}

#[test]
fn psql_cancel_reaches_the_right_session() {
    let Some((bed, home)) = sso_setup("psql_cancel_reaches_the_right_session", "arianna") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    let (stderr, lasted) = psql_sleep_then_interrupt(&proxy, bed, "arianna", "cancel-me");
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}\n{}",
        proxy.log()
    );
    assert!(
        lasted < Duration::from_secs(30),
        "cancel did not end the 60 s sleep"
    );
    // Logged once the server closed, which can be after psql's answer.
    proxy.wait_for_log("cancel request forwarded", Duration::from_secs(10));
}

#[tokio::test]
async fn unknown_cancel_keys_are_ignored() {
    let Some((bed, home)) = sso_setup("unknown_cancel_keys_are_ignored", "arianna") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    let client = proxy.tokio_pg("arianna").await.unwrap();
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // The right pid with a guessed secret, as a hostile local process would.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut cancel = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    cancel.extend_from_slice(&(pid as u32).to_be_bytes());
    cancel.extend_from_slice(&[1, 2, 3, 4]);
    s.write_all(&cancel).await.unwrap();
    proxy.wait_for_log(
        "cancel request with an unknown key ignored",
        Duration::from_secs(10),
    );
    // The session's query runs to completion.
    let row = client
        .query_one("select pg_sleep(0.3)::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "");
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn large_result_streams_with_flat_memory() {
    let Some((bed, home)) = sso_setup("large_result_streams_with_flat_memory", "arianna") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    // Warm up (TLS, identity) so the baseline includes the fixed costs.
    let (ok, _, err) = run(proxy.psql("arianna", "").args(["-c", "select 1"]));
    assert!(ok, "{err}");
    let baseline = vm_hwm_kib(proxy.pid());
    const ROWS: u64 = 250_000;
    let mut child = proxy
        .psql("arianna", "")
        .args([
            "-c",
            &format!("copy (select repeat('x', 1000) from generate_series(1, {ROWS})) to stdout"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let total = std::io::copy(&mut stdout, &mut std::io::sink()).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(total, ROWS * 1001, "every byte arrived");
    let peak = vm_hwm_kib(proxy.pid());
    // 250 MB went through; the proxy's peak grew by less than 16 MiB.
    assert!(
        peak < baseline + 16 * 1024,
        "peak {peak} KiB vs baseline {baseline} KiB"
    );
}

/// A non-loopback address of this host for a test to connect through:
/// added to `lo`, so only inside a private network namespace (only `lo`
/// in it, as scripts/test.sh runs the tests); `None` elsewhere.
fn non_loopback_address() -> Option<&'static str> {
    const ADDR: &str = "10.99.0.1";
    // Asked over netlink: /sys/class/net shows the namespace that mounted it.
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .ok()?;
    let links: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        })
        .collect();
    if links != ["lo"] {
        eprintln!("SKIPPED: needs a private network namespace (found links {links:?})");
        return None;
    }
    // "File exists" when another test added it first.
    let _ = std::process::Command::new("ip")
        .args(["addr", "add", &format!("{ADDR}/32"), "dev", "lo"])
        .stderr(std::process::Stdio::null())
        .status();
    Some(ADDR)
}

/// A connection that is not local (it reached the proxy at a non-loopback
/// address of the host) must use TLS; the same wildcard listener reached
/// through loopback is a local connection, where plaintext is allowed.
#[tokio::test]
async fn plaintext_is_refused_on_a_non_loopback_connection() {
    let Some((bed, home)) = sso_setup(
        "plaintext_is_refused_on_a_non_loopback_connection",
        "arianna",
    ) else {
        return;
    };
    let Some(remote) = non_loopback_address() else {
        return;
    };
    let proxy = Proxy::builder(bed, &home)
        .arg("--listen", "0.0.0.0:0")
        .switch("--allow-remote-clients")
        .start();
    let port = proxy.addr.port();
    let (ok, _, err) = run(proxy
        .psql(
            "arianna",
            &format!("host={remote} port={port} sslmode=disable"),
        )
        .args(["-c", "select 1"]));
    assert!(!ok);
    assert!(err.contains("accepts only TLS connections"), "{err}");
    let (ok, out, err) = run(proxy
        .psql(
            "arianna",
            &format!("host={remote} port={port} sslmode=require"),
        )
        .args(["-c", "select 7"]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "7");
    let (ok, out, err) = run(proxy
        .psql(
            "arianna",
            &format!("host=127.0.0.1 port={port} sslmode=disable"),
        )
        .args(["-c", "select 8"]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "8");
}

#[tokio::test]
async fn bytes_after_ssl_request_are_never_processed() {
    let Some((bed, home)) = sso_setup("bytes_after_ssl_request_are_never_processed", "arianna")
    else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut packet = raw::SSL_REQUEST.to_vec();
    packet.extend(raw::startup_packet(
        0,
        &[("user", "arianna"), ("database", "mylab")],
    ));
    s.write_all(&packet).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    // The injected startup packet is fed to the TLS handshake, which fails.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(!rest.contains(&b'R'), "no authentication message: {rest:?}");
    let log = proxy.wait_for_log(
        "TLS handshake with the client failed",
        Duration::from_secs(10),
    );
    assert!(!log.contains("session started"), "{log}");
}

#[tokio::test]
async fn malformed_startups_get_protocol_errors() {
    let Some((bed, home)) = sso_setup("malformed_startups_get_protocol_errors", "arianna") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            10_001u32.to_be_bytes().to_vec(),
            "08P01",
            "startup packet length 10001",
        ),
        (
            raw::startup_packet(0, &[("database", "mylab")]),
            "08P01",
            "no database user name",
        ),
        (
            raw::startup_packet(0, &[("user", "arianna"), ("user", "bob")]),
            "08P01",
            "appears twice",
        ),
        (
            [0, 0, 0, 8, 0, 2, 0, 0].to_vec(),
            "08P01",
            "unsupported frontend protocol 2.0",
        ),
        (
            raw::startup_packet(0, &[("user", "arianna"), ("replication", "database")]),
            "0A000",
            "replication connections are not supported",
        ),
    ];
    for (packet, code, text) in cases {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&packet).await.unwrap();
        let (tag, body) = raw::read_message(&mut s).await.expect("an answer");
        assert_eq!(tag, b'E', "{text}");
        let (got_code, message) = raw::error_fields(&body);
        assert_eq!(got_code, code, "{message}");
        assert!(message.contains(text), "{message}");
    }
}

#[tokio::test]
async fn newer_protocol_versions_are_negotiated_down() {
    let Some((bed, home)) = sso_setup("newer_protocol_versions_are_negotiated_down", "arianna")
    else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&raw::startup_packet(
        9,
        &[
            ("user", "arianna"),
            ("database", "mylab"),
            ("_pq_.fancy", "on"),
        ],
    ))
    .await
    .unwrap();
    let msgs = raw::read_until_ready(&mut s).await;
    let tags: Vec<u8> = msgs.iter().map(|(t, _)| *t).collect();
    if let Some((b'E', body)) = msgs.first() {
        panic!("refused: {:?}\n{}", raw::error_fields(body), proxy.log());
    }
    assert_eq!(tags.first(), Some(&b'v'), "{tags:?}");
    let v = &msgs[0].1;
    // PostgreSQL 15 speaks 3.0; the unknown option is reported back.
    assert_eq!(&v[..8], &[0, 3, 0, 0, 0, 0, 0, 1]);
    assert_eq!(&v[8..], b"_pq_.fancy\0");
    assert!(
        tags.contains(&b'K') && tags.last() == Some(&b'Z'),
        "{tags:?}"
    );
    assert_eq!(
        raw::simple_query(&mut s, "select current_user").await,
        ["arianna"]
    );
}

#[tokio::test]
async fn direct_tls_needs_alpn() {
    let Some((bed, home)) = sso_setup("direct_tls_needs_alpn", "arianna") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    // With ALPN "postgresql", as PostgreSQL 17's sslnegotiation=direct does.
    let mut config = proxy.tls_config();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    tls.write_all(&raw::startup_packet(
        0,
        &[("user", "arianna"), ("database", "mylab")],
    ))
    .await
    .unwrap();
    let msgs = raw::read_until_ready(&mut tls).await;
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "{msgs:?}");
    assert_eq!(raw::simple_query(&mut tls, "select 40 + 2").await, ["42"]);
    // Without ALPN the proxy refuses, as PostgreSQL does.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(proxy.tls_config()))
        .connect(name, tcp)
        .await
        .unwrap();
    let (tag, body) = raw::read_message(&mut tls).await.expect("an error");
    assert_eq!(tag, b'E');
    let (code, message) = raw::error_fields(&body);
    assert_eq!(code, "08P01");
    assert!(message.contains("ALPN"), "{message}");
}

#[test]
fn token_subcommand_prints_a_token_the_database_accepts() {
    let Some((bed, home)) = sso_setup(
        "token_subcommand_prints_a_token_the_database_accepts",
        "arianna",
    ) else {
        return;
    };
    let token_cmd = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
        home.apply(&mut cmd);
        cmd.args([
            "token",
            "--upstream",
            &format!("{}:5432", bed.info.endpoint_host),
        ])
        .args(extra);
        run(&mut cmd)
    };
    let (ok, token, err) = token_cmd(&[]);
    assert!(ok, "{err}");
    let token = token.trim();
    assert!(
        token.starts_with(&format!(
            "{}:5432/?Action=connect&DBUser=arianna&",
            bed.info.endpoint_host
        )),
        "{token}"
    );
    // The printed token logs in directly, as `aws rds generate-db-auth-token` output would.
    let (ok, out, err) = run(bed
        .psql("arianna", token)
        .args(["-c", "select current_user"]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "arianna");
    let (ok, out, err) = token_cmd(&["--user", "bob"]);
    assert!(!ok && out.is_empty());
    assert!(err.contains("database user \"bob\" is not yours"), "{err}");
}

/// psql's own client-side features through the proxy: `\copy` both ways
/// with many rows (the file comes back byte for byte) and `\watch`.
#[test]
fn psql_copy_both_ways_and_watch() {
    let Some((bed, home)) = sso_setup("psql_copy_both_ways_and_watch", "arianna") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    let dir = support::bed::unique_temp_path("psql-copy");
    std::fs::create_dir_all(&dir).unwrap();
    let (out_file, back_file) = (dir.join("out.tsv"), dir.join("back.tsv"));
    let script = format!(
        "\\set ON_ERROR_STOP 0\n\
         \\copy (select i, md5(i::text), repeat('z', i % 700) from generate_series(1, 60000) i) to '{out}'\n\
         create temp table c (i int, m text, z text);\n\
         \\copy c from '{out}'\n\
         select count(*) || '|' || sum(i) from c;\n\
         \\copy (select * from c order by i) to '{back}'\n\
         create temp sequence s;\n\
         select 'round ' || nextval('s') || ' ' || 1 / (3 - currval('s')) \\watch 0.1\n",
        out = out_file.display(),
        back = back_file.display()
    );
    let script_file = dir.join("script.sql");
    std::fs::write(&script_file, script).unwrap();
    let (_, out, err) = run(proxy.psql("arianna", "").arg("-f").arg(&script_file));
    assert!(
        out.contains("60000|1800030000"),
        "{out}\n{err}\n{}",
        proxy.log()
    );
    let (sent, back) = (
        std::fs::read(&out_file).unwrap(),
        std::fs::read(&back_file).unwrap(),
    );
    assert!(
        sent.len() > 20_000_000 && sent == back,
        "the \\copy round trip changed the data"
    );
    // \watch ran twice, then the division by zero ended it.
    assert!(
        out.contains("round 1 0") && out.contains("round 2 1"),
        "{out}"
    );
    assert!(err.contains("division by zero"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// pgbench's pipeline mode: many queries before one Sync.
#[test]
fn pgbench_pipeline_mode_through_proxy() {
    let Some((bed, home)) = sso_setup("pgbench_pipeline_mode_through_proxy", "benchuser") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home).start();
    let script = support::bed::unique_temp_path("pipeline.sql");
    std::fs::write(
        &script,
        "\\startpipeline\nselect 1;\nselect :client_id;\nselect repeat('p', 20000);\nselect pg_sleep(0);\n\\endpipeline\n",
    )
    .unwrap();
    let (ok, out, err) = run(pgbench_cmd(&proxy, "benchuser")
        .args(["-n", "-M", "extended", "-c", "2", "-t", "100", "-f"])
        .arg(&script));
    assert!(ok, "{err}\n{}", proxy.log());
    assert!(out.contains("processed: 200/200"), "{out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    std::fs::remove_file(&script).unwrap();
}

/// Past the connection limit, cancel requests are still forwarded (they
/// free capacity), but only from a local user who may use the proxy: the
/// over-limit path used to skip the check. With the right key, `nobody`'s
/// request is ignored and the statement runs on; the same request from the
/// proxy's own user (root here) cancels it.
#[tokio::test]
async fn over_the_limit_cancel_requests_pass_the_local_user_check() {
    let Some((bed, home)) = sso_setup("over_the_limit_cancel_requests", "arianna") else {
        return;
    };
    let proxy = Proxy::builder(bed, &home)
        .arg("--max-connections", "1")
        .start();
    // Plaintext is allowed on loopback: the raw client reads the key.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let startup = raw::startup_packet(0, &[("user", "arianna"), ("database", "mylab")]);
    s.write_all(&startup).await.unwrap();
    let greeting = raw::read_until_ready(&mut s).await;
    let key = greeting
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .map(|(_, body)| body.clone())
        .unwrap_or_else(|| panic!("no BackendKeyData: {greeting:?}\n{}", proxy.log()));
    let send_cancel = |as_user: &'static str| {
        let mut request = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        request.extend_from_slice(&key);
        let hex: String = request.iter().map(|b| format!("{b:02x}")).collect();
        let script = "import socket, sys\n\
            s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n\
            s.sendall(bytes.fromhex(sys.argv[2]))\n\
            s.settimeout(20)\n\
            s.recv(1)\n";
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", as_user, "--", "python3", "-c", script])
            .arg(proxy.addr.port().to_string())
            .arg(hex)
            .current_dir("/");
        let (ok, _, err) = run(&mut cmd);
        assert!(ok, "{err}");
    };
    let query = |sql: &str| {
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        msg
    };
    let outcome = |answer: &[(u8, Vec<u8>)]| {
        answer
            .iter()
            .find(|(tag, _)| *tag == b'E')
            .map(|(_, body)| raw::error_fields(body).0)
    };

    s.write_all(&query("select pg_sleep(2)")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_cancel("nobody");
    let answer = raw::read_until_ready(&mut s).await;
    assert_eq!(
        outcome(&answer),
        None,
        "nobody's cancel request was forwarded\n{}",
        proxy.log()
    );
    assert!(
        proxy
            .log()
            .contains("cancel request from a refused local user ignored")
    );

    s.write_all(&query("select pg_sleep(30)")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_cancel("root");
    let answer = raw::read_until_ready(&mut s).await;
    assert_eq!(
        outcome(&answer).as_deref(),
        Some("57014"),
        "{}",
        proxy.log()
    );
}
