//! Identity end to end with psql against the test bed: each identity
//! source (SSO profile, SAML assertion, workload role), expiry and re-login,
//! refusals before any token is signed, and local peers that are not the
//! proxy's OS user.
//!
//! SAML assertions are generated here and unsigned: moto's
//! AssumeRoleWithSAML reads the Role, RoleSessionName and SessionDuration
//! attributes and checks no signature (real STS does). The bed's token
//! verifier learns the credentials moto minted for the proxy from moto
//! itself, as RDS accepts whatever STS issued.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use support::bed::{AwsHome, Bed, unique_temp_path};
use support::proxy::{Proxy, clean_pg_env, run};

/// Polls `probe` until it returns Some, with a deadline.
fn eventually<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Secrets of the sessions moto minted for `session_name` (what the proxy
/// got from AssumeRole / AssumeRoleWithSAML and must never log).
fn moto_session_secrets(bed: &Bed, session_name: &str) -> Vec<String> {
    let (status, v) =
        support::bed::http_json(&bed.info.moto_url, "GET", "/moto-api/data.json", None);
    assert_eq!(status, 200);
    let secrets: Vec<String> = v["sts"]["AssumedRole"]
        .as_array()
        .expect("moto lists assumed roles")
        .iter()
        .filter(|r| r["session_name"] == session_name)
        .flat_map(|r| [r["secret_access_key"].clone(), r["session_token"].clone()])
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect();
    assert!(
        !secrets.is_empty(),
        "moto minted nothing for {session_name}"
    );
    secrets
}

/// `HH:MM UTC` of an RFC 3339 time, as the proxy prints it (same day).
fn hhmm(rfc3339: &str) -> String {
    let t = rfc3339.split('T').nth(1).expect("a time");
    format!("{} UTC", &t[..5])
}

const SELECT_USER: [&str; 2] = ["-c", "select current_user"];

#[test]
fn sso_expired_login_names_the_profile_and_relogin_is_picked_up_live() {
    let Some(bed) = Bed::shared("sso_expired_login") else {
        return;
    };
    bed.create_iam_user("ivy");
    let cache = bed.sso_login_with("ivy", "DatabaseAdmin", Some(-120), false);
    let home = AwsHome::sso_with_cache(bed, "DatabaseAdmin", &cache);
    // Never signed in: no cache file at all.
    std::fs::remove_file(home.sso_cache_file()).unwrap();
    let proxy = Proxy::builder(bed, &home).start();
    let (ok, _, err) = run(proxy.psql("ivy", "").args(SELECT_USER));
    assert!(!ok, "must be refused");
    assert!(
        err.contains(
            "FATAL:  you are not signed in to AWS SSO for profile \"dev\"; run: aws sso login --profile dev"
        ),
        "{err}\n{}",
        proxy.log()
    );
    // Signed in, but the login expired and cannot be renewed.
    home.write_sso_cache(&cache);
    let expected = format!(
        "your AWS SSO session for profile \"dev\" expired at {}; run: aws sso login --profile dev",
        hhmm(cache["expiresAt"].as_str().unwrap())
    );
    let (ok, _, err) = run(proxy.psql("ivy", "").args(SELECT_USER));
    assert!(!ok, "must be refused");
    assert!(
        err.contains(&format!("FATAL:  {expected}")),
        "{err}\n{}",
        proxy.log()
    );
    assert!(err.contains("without a restart"), "{err}");
    // `aws sso login` again: the next connection works, same proxy process.
    home.write_sso_cache(&bed.sso_login("ivy", "DatabaseAdmin"));
    let (ok, out, err) = run(proxy.psql("ivy", "").args(SELECT_USER));
    assert!(ok, "{err}\n{}", proxy.log());
    assert_eq!(out.trim(), "ivy");
    let log = proxy.log();
    assert!(log.contains(&expected), "{log}");
    assert!(
        !log.contains(cache["accessToken"].as_str().unwrap()),
        "{log}"
    );
}

#[test]
fn sso_token_is_refreshed_through_oidc() {
    let Some(bed) = Bed::shared("sso_token_is_refreshed_through_oidc") else {
        return;
    };
    bed.create_iam_user("jonas");
    // Within aws-config's five-minute refresh window from the start.
    let cache = bed.sso_login_with("jonas", "DatabaseAdmin", Some(120), true);
    let home = AwsHome::sso_with_cache(bed, "DatabaseAdmin", &cache);
    let proxy = Proxy::builder(bed, &home).start();
    let (ok, out, err) = run(proxy.psql("jonas", "").args(SELECT_USER));
    assert!(ok, "{err}\n{}", proxy.log());
    assert_eq!(out.trim(), "jonas");
    let client_id = cache["clientId"].as_str().unwrap();
    let refreshes = bed
        .sso_requests()
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == "/token" && r["client_id"] == client_id)
        .count();
    assert!(refreshes >= 1, "no CreateToken for {client_id}");
    let rewritten = home.read_sso_cache();
    assert_ne!(rewritten["accessToken"], cache["accessToken"]);
    let log = proxy.log();
    for secret in [&rewritten["accessToken"], &cache["refreshToken"]] {
        assert!(!log.contains(secret.as_str().unwrap()), "{log}");
    }
}

#[test]
fn a_non_identity_center_session_is_refused_unless_it_is_a_workload() {
    let Some(bed) = Bed::shared("non_identity_center_session") else {
        return;
    };
    bed.create_iam_user("orders_app");
    bed.create_iam_user("orders_admin");
    let home = AwsHome::assumed_role(bed, "orders-task-role", "orders-7f3a");
    // Default source (SSO): the role session name is not a person.
    let proxy = Proxy::builder(bed, &home).start();
    let (ok, _, err) = run(proxy.psql("orders-7f3a", "").args(SELECT_USER));
    assert!(!ok);
    assert!(
        err.contains("is not an IAM Identity Center session") && err.contains("--identity-source"),
        "{err}\n{}",
        proxy.log()
    );
    drop(proxy);

    let proxy = Proxy::builder(bed, &home)
        .arg("--identity-source", "workload")
        .arg("--allow-db-user", "orders_app")
        .start();
    let banner = proxy.wait_for_log("acting for workload identity", Duration::from_secs(10));
    assert!(
        banner.contains("assumed-role/orders-task-role/orders-7f3a")
            && banner.contains("database users \"orders_app\""),
        "{banner}"
    );
    let (ok, out, err) = run(proxy.psql("orders_app", "").args(SELECT_USER));
    assert!(ok, "{err}\n{}", proxy.log());
    assert_eq!(out.trim(), "orders_app");
    let before = bed.verifier_lines_for("orders_admin");
    let (ok, _, err) = run(proxy.psql("orders_admin", "").args(SELECT_USER));
    assert!(!ok);
    assert!(
        err.contains("database user \"orders_admin\" is not allowed for this workload identity")
            && err.contains("--allow-db-user"),
        "{err}"
    );
    // The allow-list is the operator's: the log has it, the client not.
    assert!(!err.contains("orders_app"), "{err}");
    assert!(
        proxy.log().contains("may use only \"orders_app\""),
        "{}",
        proxy.log()
    );
    assert_eq!(bed.verifier_lines_for("orders_admin"), before);
    // `token` makes the same check.
    let token = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
        home.apply(&mut cmd);
        cmd.args(["token", "--upstream", &bed.info.endpoint_host])
            .args([
                "--identity-source",
                "workload",
                "--allow-db-user",
                "orders_app",
            ])
            .args(extra);
        run(&mut cmd)
    };
    let (ok, out, err) = token(&[]);
    assert!(ok, "{err}");
    assert!(out.contains("Action=connect&DBUser=orders_app&"), "{out}");
    let (ok, out, err) = token(&["--user", "orders_admin"]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("may use only \"orders_app\""), "{err}");
    let log = proxy.log();
    for secret in moto_session_secrets(bed, "orders-7f3a") {
        assert!(!log.contains(&secret), "a secret is in the log:\n{log}");
    }
}

#[test]
fn workload_without_allowed_users_does_not_start() {
    let Some(bed) = Bed::shared("workload_without_allowed_users") else {
        return;
    };
    let home = AwsHome::assumed_role(bed, "orders-task-role", "x");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
    home.apply(&mut cmd);
    cmd.args([
        "--upstream",
        "db.example:5432",
        "--identity-source",
        "workload",
    ]);
    let (ok, _, err) = run(&mut cmd);
    assert!(!ok);
    assert!(err.contains("needs at least one --allow-db-user"), "{err}");
}

const IDP: &str = "arn:aws:iam::123456789012:saml-provider/CorpIdP";

/// A base64 SAML response, unsigned (moto checks no signature).
fn saml_response(roles: &[&str], user_tag: Option<&str>, not_on_or_after: SystemTime) -> String {
    let at = aws_smithy_types::DateTime::from(not_on_or_after)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap();
    let attr = |name: &str, values: &[String]| {
        let v: String = values
            .iter()
            .map(|v| format!("<saml:AttributeValue>{v}</saml:AttributeValue>"))
            .collect();
        format!(
            "<saml:Attribute Name=\"https://aws.amazon.com/SAML/Attributes/{name}\">{v}</saml:Attribute>"
        )
    };
    // One Role attribute per role: moto cannot read a multi-valued one
    // (the proxy reads both forms; see the unit tests in identity::saml).
    let mut attrs: String = roles
        .iter()
        .map(|r| {
            attr(
                "Role",
                &[format!("arn:aws:iam::123456789012:role/{r},{IDP}")],
            )
        })
        .collect();
    attrs.push_str(&attr("RoleSessionName", &["someone@corp.example".into()]));
    attrs.push_str(&attr("SessionDuration", &["3600".into()]));
    if let Some(u) = user_tag {
        attrs.push_str(&attr("PrincipalTag:userName", &[u.to_owned()]));
    }
    let xml = format!(
        "<samlp:Response xmlns:samlp=\"urn:oasis:names:tc:SAML:2.0:protocol\" \
         xmlns:saml=\"urn:oasis:names:tc:SAML:2.0:assertion\"><saml:Assertion>\
         <saml:Subject><saml:SubjectConfirmation Method=\"urn:oasis:names:tc:SAML:2.0:cm:bearer\">\
         <saml:SubjectConfirmationData NotOnOrAfter=\"{at}\" Recipient=\"https://signin.aws.amazon.com/saml\"/>\
         </saml:SubjectConfirmation></saml:Subject><saml:Conditions NotOnOrAfter=\"{at}\"/>\
         <saml:AttributeStatement>{attrs}</saml:AttributeStatement></saml:Assertion></samlp:Response>"
    );
    aws_smithy_types::base64::encode(xml.as_bytes())
}

fn in_minutes(m: u64) -> SystemTime {
    SystemTime::now() + Duration::from_secs(m * 60)
}

fn saml_proxy(bed: &Bed, home: &AwsHome, file: &Path, extra: &[(&str, &str)]) -> Proxy {
    let mut b = Proxy::builder(bed, home)
        .arg("--identity-source", "saml")
        .arg("--saml-assertion-file", file);
    for (k, v) in extra {
        b = b.arg(k, v);
    }
    b.start()
}

#[test]
fn saml_assertion_with_the_user_name_tag() {
    let Some(bed) = Bed::shared("saml_assertion_with_the_user_name_tag") else {
        return;
    };
    bed.create_iam_user("sofia");
    bed.create_iam_user("saml_other");
    let home = AwsHome::without_credentials(bed);
    let file = unique_temp_path("rdsiam-saml");
    let assertion = saml_response(&["DatabaseUsers"], Some("sofia"), in_minutes(5));
    std::fs::write(&file, &assertion).unwrap();
    let proxy = saml_proxy(bed, &home, &file, &[]);
    let banner = proxy.wait_for_log("acting for sofia", Duration::from_secs(10));
    assert!(banner.contains("from SAML assertion"), "{banner}");
    let (ok, out, err) = run(proxy.psql("sofia", "").args(SELECT_USER));
    assert!(ok, "{err}\n{}", proxy.log());
    assert_eq!(out.trim(), "sofia");
    // The tag decides, not RoleSessionName; others are refused before signing.
    let before = bed.verifier_lines_for("saml_other");
    let (ok, _, err) = run(proxy.psql("saml_other", "").args(SELECT_USER));
    assert!(!ok);
    assert!(
        err.contains("is not yours") && err.contains("\"sofia\""),
        "{err}"
    );
    assert_eq!(bed.verifier_lines_for("saml_other"), before);
    let log = proxy.log();
    assert!(
        !log.contains(&assertion[..64]),
        "the assertion is in the log:\n{log}"
    );
    assert!(!log.contains("X-Amz-Signature"), "{log}");
    for secret in moto_session_secrets(bed, "someone@corp.example") {
        assert!(!log.contains(&secret), "a secret is in the log:\n{log}");
    }
    let _ = std::fs::remove_file(&file);
}

#[test]
fn saml_assertions_that_cannot_be_used_are_refused_with_the_reason() {
    let Some(bed) = Bed::shared("saml_assertions_that_cannot_be_used") else {
        return;
    };
    bed.create_iam_user("tomas");
    let home = AwsHome::without_credentials(bed);
    let file = unique_temp_path("rdsiam-saml");
    let write = |a: String| std::fs::write(&file, a).unwrap();

    // No userName tag.
    write(saml_response(&["DatabaseUsers"], None, in_minutes(5)));
    let proxy = saml_proxy(bed, &home, &file, &[]);
    let (ok, _, err) = run(proxy.psql("tomas", "").args(SELECT_USER));
    assert!(!ok);
    assert!(
        err.contains("FATAL:  rds-iam-proxy cannot use its SAML identity")
            && err.contains("carries no PrincipalTag:userName"),
        "{err}\n{}",
        proxy.log()
    );

    // Expired: refused with the time; a fresh assertion in the file is
    // picked up by the running proxy.
    let expired_at = SystemTime::now() - Duration::from_secs(120);
    write(saml_response(&["DatabaseUsers"], Some("tomas"), expired_at));
    let (ok, _, err) = run(proxy.psql("tomas", "").args(SELECT_USER));
    assert!(!ok);
    assert!(err.contains("the SAML assertion expired"), "{err}");
    write(saml_response(
        &["DatabaseUsers"],
        Some("tomas"),
        in_minutes(5),
    ));
    let (ok, out, err) = run(proxy.psql("tomas", "").args(SELECT_USER));
    assert!(ok, "{err}\n{}", proxy.log());
    assert_eq!(out.trim(), "tomas");
    drop(proxy);

    // Several roles and none chosen; then one chosen.
    write(saml_response(
        &["DatabaseUsers", "DatabaseAdmins"],
        Some("tomas"),
        in_minutes(5),
    ));
    let proxy = saml_proxy(bed, &home, &file, &[]);
    let (ok, _, err) = run(proxy.psql("tomas", "").args(SELECT_USER));
    assert!(!ok);
    assert!(
        err.contains("offers several roles") && err.contains("--saml-role"),
        "{err}"
    );
    drop(proxy);
    let proxy = saml_proxy(
        bed,
        &home,
        &file,
        &[(
            "--saml-role",
            "arn:aws:iam::123456789012:role/DatabaseAdmins",
        )],
    );
    let (ok, out, err) = run(proxy.psql("tomas", "").args(SELECT_USER));
    assert!(ok, "{err}\n{}", proxy.log());
    assert_eq!(out.trim(), "tomas");
    assert!(
        proxy.log().contains("role/DatabaseAdmins"),
        "{}",
        proxy.log()
    );
    let _ = std::fs::remove_file(&file);
}

/// psql as the unprivileged `nobody`, over loopback TCP or a unix socket
/// directory, with `sslmode` (at most `require`: nobody cannot read the
/// proxy's CA file).
fn psql_as_nobody(host: &str, port: u16, user: &str, sslmode: &str) -> (bool, String, String) {
    let mut cmd = Command::new("runuser");
    clean_pg_env(&mut cmd);
    let conninfo = format!("host={host} port={port} user={user} dbname=mylab sslmode={sslmode}");
    cmd.args(["-u", "nobody", "--", "psql", &conninfo, "-X", "-A", "-t"])
        .args(SELECT_USER)
        .current_dir("/")
        .env("PGCONNECT_TIMEOUT", "20");
    run(&mut cmd)
}

#[test]
fn another_local_os_user_is_refused_on_loopback_tcp_and_unix_socket() {
    let Some(bed) = Bed::shared("another_local_os_user_is_refused") else {
        return;
    };
    bed.create_iam_user("petra");
    let home = AwsHome::sso(bed, "petra", "DatabaseAdmin");
    let proxy = Proxy::builder(bed, &home).unix_socket().start();
    let dir = proxy.unix_dir.clone().unwrap();
    let socket = dir.join(".s.PGSQL.5432");
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!((mode(&dir), mode(&socket)), (0o700, 0o600));
    let before = bed.verifier_lines_for("petra");

    let (ok, _, err) = psql_as_nobody("127.0.0.1", proxy.addr.port(), "petra", "disable");
    assert!(!ok);
    assert!(
        err.contains("rds-iam-proxy refused this local connection: local OS user \"nobody\" (uid 65534) may not use this proxy")
            && err.contains("--allow-local-user"),
        "{err}\n{}",
        proxy.log()
    );
    // The file modes keep others out; past them (an operator widened them),
    // SO_PEERCRED still does.
    let (ok, _, err) = psql_as_nobody(dir.to_str().unwrap(), 5432, "petra", "disable");
    assert!(!ok && err.contains("Permission denied"), "{err}");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let (ok, _, err) = psql_as_nobody(dir.to_str().unwrap(), 5432, "petra", "disable");
    assert!(!ok);
    assert!(
        err.contains("local OS user \"nobody\" (uid 65534) may not use this proxy"),
        "{err}"
    );
    assert_eq!(bed.verifier_lines_for("petra"), before, "a token was used");
    let log = eventually("two refusals logged", Duration::from_secs(10), || {
        let log = proxy.log();
        (log.matches("local peer refused").count() >= 2).then_some(log)
    });
    assert!(log.contains("uid 65534"), "{log}");
    // The proxy's own user still gets through.
    let (ok, out, err) = run(proxy.psql("petra", "").args(SELECT_USER));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "petra");
    drop(proxy);

    let proxy = Proxy::builder(bed, &home)
        .arg("--allow-local-user", "nobody")
        .start();
    let (ok, out, err) = psql_as_nobody("127.0.0.1", proxy.addr.port(), "petra", "disable");
    assert!(ok, "{err}\n{}", proxy.log());
    assert_eq!(out.trim(), "petra");
}

/// A wildcard listener reached through loopback is a local connection:
/// another local OS user is refused there too, over TLS as over plaintext.
/// (Before, "local" was judged from the listener's address, so `--listen
/// 0.0.0.0:5432` served any local user as the proxy's person over TLS.)
/// The dual-stack `[::]` listener sees 127.0.0.1 as ::ffff:127.0.0.1.
/// (Such a listener now needs --allow-remote-clients to start at all.)
#[test]
fn a_wildcard_listener_checks_local_users_too() {
    let Some(bed) = Bed::shared("a_wildcard_listener_checks_local_users_too") else {
        return;
    };
    bed.create_iam_user("wilma");
    let home = AwsHome::sso(bed, "wilma", "DatabaseAdmin");
    for wildcard in ["0.0.0.0:0", "[::]:0"] {
        let proxy = Proxy::builder(bed, &home)
            .arg("--listen", wildcard)
            .switch("--allow-remote-clients")
            .start();
        let before = bed.verifier_lines_for("wilma");
        for sslmode in ["require", "disable"] {
            let (ok, out, err) = psql_as_nobody("127.0.0.1", proxy.addr.port(), "wilma", sslmode);
            assert!(!ok, "{wildcard} {sslmode}: served nobody: {out}");
            assert!(
                err.contains("local OS user \"nobody\" (uid 65534) may not use this proxy"),
                "{wildcard} {sslmode}: {err}\n{}",
                proxy.log()
            );
        }
        assert_eq!(bed.verifier_lines_for("wilma"), before, "a token was used");
        // The proxy's own user still gets through.
        let (ok, out, err) = run(proxy.psql("wilma", "").args(SELECT_USER));
        assert!(ok, "{wildcard}: {err}");
        assert_eq!(out.trim(), "wilma");
    }
}

/// A local user who writes a StartupMessage and a statement, then closes,
/// leaves a socket the kernel reports as uid 0's. The proxy runs as root
/// here, so judging the peer from what is left after the close let the
/// queued statement run as the proxy's person. Now only live sockets
/// count: a peer with no live socket is refused.
#[test]
fn a_local_client_that_writes_and_closes_is_not_taken_for_root() {
    let Some(bed) = Bed::shared("a_local_client_that_writes_and_closes") else {
        return;
    };
    bed.create_iam_user("wanda");
    let home = AwsHome::sso(bed, "wanda", "DatabaseAdmin");
    let proxy = Proxy::builder(bed, &home).start();
    let before = bed.verifier_lines_for("wanda");
    let script = r#"
import socket, struct, sys
def packet(body):
    return struct.pack("!I", len(body) + 4) + body
startup = packet(struct.pack("!I", 3 << 16) + b"user\0wanda\0database\0mylab\0\0")
sql = b"CREATE TABLE written_by_a_closed_socket_" + sys.argv[2].encode() + b" ()\0"
query = b"Q" + struct.pack("!I", len(sql) + 4) + sql
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(startup + query)
try:
    s.shutdown(socket.SHUT_WR)
except OSError:
    pass  # the proxy already answered and closed
s.close()
"#;
    // The proxy is stopped while the clients connect, write and close (the
    // kernel completes the connections in the listen backlog), so it looks
    // at each peer only after the close, as a busy proxy would.
    let rounds = 5;
    proxy.signal("STOP");
    for i in 0..rounds {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "nobody", "--", "python3", "-c", script])
            .arg(proxy.addr.port().to_string())
            .arg(i.to_string())
            .current_dir("/");
        let (ok, _, err) = run(&mut cmd);
        if !ok {
            proxy.signal("CONT");
        }
        assert!(ok, "{err}");
    }
    std::thread::sleep(Duration::from_millis(200));
    proxy.signal("CONT");
    let log = eventually("every attempt judged", Duration::from_secs(20), || {
        let log = proxy.log();
        let judged =
            log.matches("local peer refused").count() + log.matches("session started").count();
        (judged >= rounds).then_some(log)
    });
    // Answered statements are done by the time the session is logged as ended.
    std::thread::sleep(Duration::from_millis(500));
    let made = bed.admin_sql(
        "SELECT count(*) FROM pg_class WHERE relname LIKE 'written_by_a_closed_socket_%'",
    );
    assert_eq!(
        made.trim(),
        "0",
        "a statement from a closed socket ran\n{log}"
    );
    assert_eq!(bed.verifier_lines_for("wanda"), before, "a token was used");
    assert!(!log.contains("session started"), "{log}");
    eprintln!("LOGDUMP {log}");
}

#[test]
fn whoami_and_policy_print_what_people_need() {
    let Some(bed) = Bed::shared("whoami_and_policy") else {
        return;
    };
    let home = AwsHome::sso(bed, "quinn", "DatabaseAdmin");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
    home.apply(&mut cmd);
    cmd.arg("whoami");
    let (ok, out, err) = run(&mut cmd);
    assert!(ok, "{err}");
    assert!(
        out.contains("identity source: AWS SSO / IAM Identity Center"),
        "{out}"
    );
    assert!(out.contains("user name:       quinn"), "{out}");
    assert!(
        out.contains(&format!("account:         {}", bed.info.account_id)),
        "{out}"
    );
    assert!(
        out.contains("assumed-role/AWSReservedSSO_DatabaseAdmin_"),
        "{out}"
    );
    assert!(out.contains("credentials expire: "), "{out}");
    assert!(
        out.contains("SSO login:       profile dev, expires "),
        "{out}"
    );

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
    cmd.args([
        "policy",
        "--cluster-resource-id",
        "cluster-ABCDEFGHIJKLMNOPQRSTUVWXY0",
        "--user",
        "quinn",
    ]);
    let (ok, out, err) = run(&mut cmd);
    assert!(ok, "{err}");
    assert!(
        out.contains("\"Action\": \"rds-db:connect\"")
            && out
                .contains("dbuser:cluster-ABCDEFGHIJKLMNOPQRSTUVWXY0/${aws:PrincipalTag/userName}")
            && out.contains("CREATE USER \"quinn\" WITH LOGIN;\nGRANT rds_iam TO \"quinn\";"),
        "{out}"
    );
}

#[test]
fn a_login_that_cannot_renew_itself_is_announced_before_it_ends() {
    let Some(bed) = Bed::shared("a_login_that_cannot_renew_itself_is_announced") else {
        return;
    };
    bed.create_iam_user("ulla");
    // Five minutes left, no refresh token: inside the ten-minute warning.
    let cache = bed.sso_login_with("ulla", "DatabaseAdmin", Some(300), false);
    let home = AwsHome::sso_with_cache(bed, "DatabaseAdmin", &cache);
    let proxy = Proxy::builder(bed, &home).start();
    let log = proxy.wait_for_log(
        "your AWS SSO session for profile \"dev\" ends at",
        Duration::from_secs(20),
    );
    assert!(log.contains("run: aws sso login --profile dev"), "{log}");
    // Until then it works.
    let (ok, out, err) = run(proxy.psql("ulla", "").args(SELECT_USER));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "ulla");
}

/// Reads one HTTP/1.1 message (head + Content-Length body); None at EOF.
fn read_http_message(r: &mut impl std::io::BufRead) -> Option<Vec<u8>> {
    let mut msg = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().ok()?;
        }
        msg.extend_from_slice(line.as_bytes());
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).ok()?;
    msg.extend_from_slice(&body);
    Some(msg)
}

/// A relay in front of moto's STS whose responses carry a `Date` that is
/// `skew_secs` ahead of this host: what a proxy host with a slow clock
/// sees. Moto's real responses otherwise, byte for byte.
fn skewed_sts(moto_url: &str, skew_secs: u64) -> String {
    use std::io::{BufReader, Write};
    let target = moto_url.trim_start_matches("http://").to_owned();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let target = target.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut client = client;
                while let Some(request) = read_http_message(&mut reader) {
                    let Ok(mut up) = std::net::TcpStream::connect(&target) else {
                        return;
                    };
                    up.write_all(&request).unwrap();
                    let Some(response) = read_http_message(&mut BufReader::new(up)) else {
                        return;
                    };
                    let date = aws_smithy_types::DateTime::from(
                        SystemTime::now() + Duration::from_secs(skew_secs),
                    )
                    .fmt(aws_smithy_types::date_time::Format::HttpDate)
                    .unwrap();
                    let text = String::from_utf8_lossy(&response);
                    let (head, body) = text.split_once("\r\n\r\n").unwrap();
                    let head: Vec<String> = head
                        .lines()
                        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
                        .map(str::to_owned)
                        .chain([format!("Date: {date}")])
                        .collect();
                    let out = format!("{}\r\n\r\n{body}", head.join("\r\n"));
                    if client.write_all(out.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[test]
fn clock_skew_is_reported_at_start_and_to_a_refused_client() {
    let Some(bed) = Bed::shared("clock_skew_is_reported") else {
        return;
    };
    // An Identity Center user without a database user: the server refuses
    // the login, and the client's hint must name the skew.
    let home = AwsHome::sso(bed, "skewed_nobody_db", "DatabaseAdmin");
    let sts = skewed_sts(&bed.info.moto_url, 600);
    let proxy = Proxy::builder(bed, &home)
        .env("AWS_ENDPOINT_URL_STS", &sts)
        .start();
    let log = proxy.wait_for_log("behind AWS", Duration::from_secs(10));
    assert!(
        log.contains("this host's clock is 600 s behind AWS")
            || log.contains("this host's clock is 599 s behind AWS")
            || log.contains("this host's clock is 601 s behind AWS"),
        "{log}"
    );
    let (ok, _, err) = run(proxy.psql("skewed_nobody_db", "").args(SELECT_USER));
    assert!(!ok);
    assert!(
        err.contains("HINT:") && err.contains("s behind AWS: tokens signed here may be refused"),
        "{err}\n{}",
        proxy.log()
    );
}

#[test]
fn a_revoked_refresh_token_gets_the_same_sign_in_again_message() {
    let Some(bed) = Bed::shared("a_revoked_refresh_token") else {
        return;
    };
    bed.create_iam_user("vera");
    let cache = bed.sso_login_with("vera", "DatabaseAdmin", Some(-120), true);
    bed.revoke_refresh_token(cache["refreshToken"].as_str().unwrap());
    let home = AwsHome::sso_with_cache(bed, "DatabaseAdmin", &cache);
    let proxy = Proxy::builder(bed, &home).start();
    let (ok, _, err) = run(proxy.psql("vera", "").args(SELECT_USER));
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "FATAL:  your AWS SSO session for profile \"dev\" expired at {}; run: aws sso login --profile dev",
            hhmm(cache["expiresAt"].as_str().unwrap())
        )),
        "{err}\n{}",
        proxy.log()
    );
    // The proxy tried to renew it through SSO-OIDC first.
    let client_id = cache["clientId"].as_str().unwrap();
    let tried = bed
        .sso_requests()
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["path"] == "/token" && r["client_id"] == client_id);
    assert!(tried, "no CreateToken attempt for {client_id}");
}

/// A sign-out and a new `aws sso login` while the proxy runs: the next
/// connection uses the new login. The SDK's SSO provider keeps the portal
/// token in memory; before the fix it went on presenting the signed-out
/// one ("UnauthorizedException: Session token not found or invalid")
/// until that token's last five minutes.
#[test]
fn a_new_sso_login_after_a_sign_out_is_picked_up_by_the_next_connection() {
    let Some(bed) = Bed::shared("sso_relogin_after_sign_out") else {
        return;
    };
    bed.create_iam_user("uma");
    // Role credentials good for 30 s: under the one-minute minimum, so each
    // connection asks the portal again with the token it holds.
    let first = bed.sso_login_short_credentials("uma", "DatabaseAdmin", 30);
    let home = AwsHome::sso_with_cache(bed, "DatabaseAdmin", &first);
    let proxy = Proxy::builder(bed, &home).start();
    let (ok, out, err) = run(proxy.psql("uma", "").args(SELECT_USER));
    assert!(ok, "{err}\n{}", proxy.log());
    assert_eq!(out.trim(), "uma");

    // Sign out: the portal forgets the token, the cache file is removed.
    bed.expire_access_token(first["accessToken"].as_str().unwrap());
    std::fs::remove_file(home.sso_cache_file()).unwrap();
    let (ok, _, err) = run(proxy.psql("uma", "").args(SELECT_USER));
    assert!(!ok, "must be refused after the sign-out");
    assert!(
        err.contains("run: aws sso login --profile dev"),
        "{err}\n{}",
        proxy.log()
    );

    // Sign in again: the very next connection works, with the new token.
    let second = bed.sso_login_short_credentials("uma", "DatabaseAdmin", 30);
    home.write_sso_cache(&second);
    let asked_before = bed.sso_requests().as_array().unwrap().len();
    let (ok, out, err) = run(proxy.psql("uma", "").args(SELECT_USER));
    assert!(
        ok,
        "the new login was not picked up: {err}\n{}",
        proxy.log()
    );
    assert_eq!(out.trim(), "uma");
    let requests = bed.sso_requests();
    let since: Vec<_> = requests.as_array().unwrap()[asked_before..]
        .iter()
        .collect();
    assert!(
        since
            .iter()
            .any(|r| r["path"] == "/federation/credentials" && r["user"] == "uma"),
        "no GetRoleCredentials with the new token: {since:?}"
    );
    // And it stays picked up.
    let (ok, _, err) = run(proxy.psql("uma", "").args(SELECT_USER));
    assert!(ok, "{err}\n{}", proxy.log());
}
