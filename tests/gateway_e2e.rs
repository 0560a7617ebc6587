//! Gateway mode end to end: one gateway that holds no AWS credentials,
//! people who each prove who they are with their own SSO session
//! (`rds-iam-proxy gateway-password`), psql with the proof as its
//! password over verify-full TLS, and every refusal the gateway makes
//! before anything reaches the cluster.
//!
//! STS is the bed's GetCallerIdentity stand-in, which recomputes each
//! presigned request's SigV4 signature (moto checks none); the cluster is
//! the bed's PostgreSQL, whose PAM verifier checks the person's own token.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::bed::{AwsHome, Bed, http_json, unique_temp_path};
use support::proxy::{Proxy, http_get, metric, psql_sleep_then_interrupt, run};

const GATEWAY_ID: &str = "bastion.test";
const ACCOUNT: &str = "111122223333";

/// A gateway for the bed's endpoint with no AWS credentials of its own,
/// verifying proofs with the bed's STS stand-in, auditing synchronously.
fn gateway(bed: &Bed, extra: &[(&str, &str)]) -> (Proxy, std::path::PathBuf, AwsHome) {
    let nobody = AwsHome::without_credentials(bed);
    let audit = unique_temp_path("rdsiam-gw-audit");
    let mut b = Proxy::builder(bed, &nobody)
        .subcommand("gateway")
        .arg("--gateway-id", GATEWAY_ID)
        .arg("--trust-account", ACCOUNT)
        .arg("--sts-endpoint-url", &bed.info.sts_verify_url)
        .arg("--audit-mode", "sync")
        .arg("--audit-dir", &audit);
    for (k, v) in extra {
        b = b.arg(k, v);
    }
    (b.start(), audit, nobody)
}

/// `rds-iam-proxy gateway-password` as `home`'s person.
fn proof_as(bed: &Bed, home: &AwsHome, args: &[&str]) -> Result<String, String> {
    let i = &bed.info;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
    home.apply(&mut cmd);
    cmd.arg("gateway-password")
        .arg("--upstream")
        .arg(format!("{}:{}", i.endpoint_host, i.endpoint_port));
    if !args.contains(&"--gateway-id") {
        cmd.args(["--gateway-id", GATEWAY_ID]);
    }
    cmd.args(args);
    let (ok, out, err) = run(&mut cmd);
    if ok {
        Ok(out.trim().to_owned())
    } else {
        Err(err)
    }
}

/// psql through the gateway as `user` with `password`; (ok, stdout, stderr).
fn psql_via(gw: &Proxy, user: &str, password: &str, sql: &str) -> (bool, String, String) {
    let mut cmd = gw.psql(user, "");
    cmd.env("PGPASSWORD", password).args(["-c", sql]);
    run(&mut cmd)
}

/// The requests STS got signed with the access key of `proof` (the tests
/// share one bed and run at once, so each counts its own person's).
fn sts_requests(bed: &Bed, proof: &str) -> usize {
    let key = access_key_of(proof);
    let (status, v) = http_json(&bed.info.sts_verify_url, "GET", "/_bed/sts-requests", None);
    assert_eq!(status, 200);
    v.as_array()
        .expect("a list of requests")
        .iter()
        .filter(|r| r["access_key_id"] == key.as_str())
        .count()
}

fn access_key_of(proof: &str) -> String {
    let after = proof
        .split("X-Amz-Credential=")
        .nth(1)
        .expect("a credential");
    after.split("%2F").next().unwrap().to_owned()
}

fn sessions_started(audit: &std::path::Path) -> Vec<Value> {
    support::audit::records(audit)
        .into_iter()
        .filter(|r| r["type"] == "session_start")
        .collect()
}

/// Two people, one gateway: each logs in as themselves at the same time,
/// each is refused as the other, and the audit names each with the ARN and
/// access key id their proof showed and the gateway's id.
#[test]
fn two_people_share_one_gateway_each_as_themselves() {
    let Some(bed) = Bed::shared("two_people_share_one_gateway_each_as_themselves") else {
        return;
    };
    bed.create_iam_user("arianna");
    bed.create_iam_user("bob");
    let arianna = AwsHome::sso(bed, "arianna", "DatabaseUser");
    let bob = AwsHome::sso(bed, "bob", "DatabaseUser");
    let (gw, audit, _nobody) = gateway(bed, &[]);

    let pa = proof_as(bed, &arianna, &[]).expect("arianna's proof");
    let pb = proof_as(bed, &bob, &[]).expect("bob's proof");
    assert!(pa.starts_with("rds-iam-proxy-proof-v1:"), "{pa}");
    assert!(pa.len() < 4096, "a proof is a few KB at most: {}", pa.len());
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| psql_via(&gw, "arianna", &pa, "select current_user, pg_sleep(0.3)"));
        let b = s.spawn(|| psql_via(&gw, "bob", &pb, "select current_user, pg_sleep(0.3)"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(a.0, "arianna through the gateway: {}\n{}", a.2, gw.log());
    assert!(b.0, "bob through the gateway: {}\n{}", b.2, gw.log());
    assert_eq!(a.1.trim(), "arianna|");
    assert_eq!(b.1.trim(), "bob|");

    // Each as the other: arianna's own proof for user bob.
    let verdicts_before = bed.verifier_lines_for("bob");
    let pa2 = proof_as(bed, &arianna, &[]).unwrap();
    let (ok, _, err) = psql_via(&gw, "bob", &pa2, "select 1");
    assert!(!ok);
    assert!(
        err.contains("the proof's database token is not for user \"bob\""),
        "{err}"
    );
    // And the local check refuses to sign one for bob at all.
    let refused = proof_as(bed, &arianna, &["--user", "bob"]).unwrap_err();
    assert!(refused.contains("\"bob\" is not yours"), "{refused}");
    assert_eq!(
        bed.verifier_lines_for("bob"),
        verdicts_before,
        "nothing reached the cluster"
    );

    let starts = sessions_started(&audit);
    for (person, proof) in [("arianna", &pa), ("bob", &pb)] {
        let s = starts
            .iter()
            .find(|s| s["person"] == person)
            .unwrap_or_else(|| panic!("no session_start for {person}: {starts:?}"));
        assert_eq!(s["identity_source"], "gateway");
        assert_eq!(s["gateway_id"], GATEWAY_ID);
        assert_eq!(s["db_user"], person);
        let arn = s["role_arn"].as_str().unwrap();
        assert!(
            arn.starts_with(&format!(
                "arn:aws:sts::{ACCOUNT}:assumed-role/AWSReservedSSO_DatabaseUser_"
            )) && arn.ends_with(&format!("/{person}")),
            "{arn}"
        );
        let key = s["access_key_id"].as_str().unwrap();
        assert!(
            proof.contains(&format!("X-Amz-Credential={key}%2F")),
            "{key}"
        );
        assert!(s["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    // The proofs and tokens never reach the log.
    let log = gw.log();
    for p in [&pa, &pb, &pa2] {
        let signature = p.rsplit("X-Amz-Signature=").next().unwrap();
        assert!(
            !log.contains(signature),
            "a token's signature is in the log"
        );
    }
}

/// Every way a proof can be wrong is refused with its own message, and
/// none reaches the cluster; the ones the gateway can judge alone do not
/// reach STS either.
#[test]
fn bad_proofs_are_refused_before_the_cluster() {
    let Some(bed) = Bed::shared("bad_proofs_are_refused_before_the_cluster") else {
        return;
    };
    bed.create_iam_user("carla");
    let carla = AwsHome::sso(bed, "carla", "DatabaseUser");
    let (gw, _audit, _nobody) = gateway(bed, &[("--max-failed-proofs-per-source", "100")]);
    let verdicts = bed.verifier_lines_for("carla");
    let fresh = || proof_as(bed, &carla, &[]).expect("carla's proof");
    let refused = |password: &str, why: &str| {
        let (ok, out, err) = psql_via(&gw, "carla", password, "select 1");
        assert!(!ok, "{password} was accepted: {out}");
        assert!(err.contains(why), "expected {why:?}, got {err}");
    };

    // Judged by the gateway alone: STS is not asked.
    refused(
        "hunter2",
        "the password must be a proof of your AWS identity",
    );
    let p = fresh();
    let sts_before = sts_requests(bed, &p);
    refused(
        &p.replacen(
            "Action=GetCallerIdentity",
            "Action=GetCallerIdentity&Action=GetCallerIdentity",
            1,
        ),
        "the gateway refused the proof",
    );
    refused(
        &p.replacen(
            "Version=2011-06-15",
            "Version=2011-06-15&Host=evil.example",
            1,
        ),
        "the gateway refused the proof",
    );
    refused(
        &p.replacen("host%3Bx-rds-iam-proxy-gateway-id%3B", "host%3B", 1),
        "the gateway refused the proof",
    );
    refused(
        &p.replacen("X-Amz-Expires=900", "X-Amz-Expires=3600", 1),
        "the gateway refused the proof",
    );
    let other_host = p.replacen(
        &bed.info.endpoint_host,
        "other.cluster-c0ffee.eu-west-1.rds.amazonaws.com",
        1,
    );
    refused(&other_host, "the gateway refused the proof");
    assert_eq!(
        sts_requests(bed, &p),
        sts_before,
        "STS was asked about proofs the gateway could judge"
    );

    // Judged by STS: a tampered signature, a proof for another gateway id.
    let p = fresh();
    let sig_at = p.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let mut tampered = p.clone();
    let flipped = if &p[sig_at..sig_at + 1] == "0" {
        "1"
    } else {
        "0"
    };
    tampered.replace_range(sig_at..sig_at + 1, flipped);
    refused(&tampered, "AWS STS did not accept the proof");
    let other = proof_as(bed, &carla, &["--gateway-id", "other.gateway"]).unwrap();
    refused(&other, "AWS STS did not accept the proof");

    // Used once: the same good proof a second time.
    let p = fresh();
    let (ok, _, err) = psql_via(&gw, "carla", &p, "select 1");
    assert!(ok, "{err}");
    refused(&p, "this proof of identity was used before");

    // A token signed by other credentials than the proof: carla's proof
    // with the token of another of carla's sessions.
    let carla2 = AwsHome::sso(bed, "carla", "DatabaseUser");
    let p1 = fresh();
    let p2 = proof_as(bed, &carla2, &[]).unwrap();
    let token2 = &p2[p2.find(&bed.info.endpoint_host).unwrap()..];
    let mixed = format!(
        "{}{token2}",
        &p1[..p1.find(&bed.info.endpoint_host).unwrap()]
    );
    refused(&mixed, "the gateway refused the proof");

    // Plaintext: the gateway never takes a proof without TLS.
    let mut cmd = support::bed::psql(&format!(
        "host=127.0.0.1 port={} user=carla dbname=mylab sslmode=disable",
        gw.addr.port()
    ));
    cmd.env("PGPASSWORD", fresh()).args(["-c", "select 1"]);
    let (ok, _, err) = run(&mut cmd);
    assert!(!ok);
    assert!(err.contains("accepts only TLS"), "{err}");

    assert_eq!(
        bed.verifier_lines_for("carla"),
        verdicts + 1,
        "only the one good login reached the cluster"
    );
    let log = gw.log();
    assert!(
        log.contains("reason=token_of_other_credentials")
            || log.contains("RDS token was signed by other credentials"),
        "{log}"
    );
}

/// A gateway that does not trust the person's account refuses them after
/// STS has named them; past the failed-proof limit an address is refused
/// without STS being asked.
#[test]
fn untrusted_accounts_and_too_many_failed_proofs() {
    let Some(bed) = Bed::shared("untrusted_accounts_and_too_many_failed_proofs") else {
        return;
    };
    bed.create_iam_user("dora");
    let dora = AwsHome::sso(bed, "dora", "DatabaseUser");
    let (gw, _audit, _nobody) = gateway(
        bed,
        &[
            ("--trust-account", "999999999999"),
            ("--max-failed-proofs-per-source", "2"),
            ("--admin-listen", "127.0.0.1:0"),
        ],
    );
    let p = proof_as(bed, &dora, &[]).unwrap();
    let (ok, _, err) = psql_via(&gw, "dora", &p, "select 1");
    assert!(!ok);
    assert!(
        err.contains("does not accept people from your AWS role or account"),
        "{err}"
    );
    assert!(
        !err.contains("999999999999") && !err.contains("AWSReservedSSO"),
        "the client learns no trust detail: {err}"
    );
    let (ok, _, err) = psql_via(&gw, "dora", "not a proof", "select 1");
    assert!(!ok, "{err}");
    // Two refusals from 127.0.0.1 this minute: the third is refused at once.
    let p = proof_as(bed, &dora, &[]).unwrap();
    let before = sts_requests(bed, &p);
    let (ok, _, err) = psql_via(&gw, "dora", &p, "select 1");
    assert!(!ok);
    assert!(
        err.contains("too many refused proofs from your address"),
        "{err}"
    );
    assert_eq!(
        sts_requests(bed, &p),
        before,
        "a blocked address reaches STS"
    );
    let (status, page) = http_get(gw.admin_addr(), "/metrics");
    assert_eq!(status, 200);
    for reason in ["untrusted_caller", "not_a_proof", "source_blocked"] {
        let series = format!("rds_iam_proxy_auth_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&page, &series), 1.0, "{series} in\n{page}");
    }
    assert!(!page.contains("dora"), "no per-person labels");
}

/// The local proxy acts for one identity: it refuses to listen where
/// others can reach it, unless told that every client may act as it.
#[test]
fn a_local_proxy_refuses_a_non_loopback_listener() {
    let Some(bed) = Bed::shared("a_local_proxy_refuses_a_non_loopback_listener") else {
        return;
    };
    let home = AwsHome::without_credentials(bed);
    let i = &bed.info;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
    home.apply(&mut cmd);
    cmd.args([
        "--upstream",
        &format!("{}:{}", i.endpoint_host, i.endpoint_port),
        "--listen",
        "0.0.0.0:0",
        "--check-config",
    ]);
    let (ok, _, err) = run(&mut cmd);
    assert!(!ok);
    assert!(err.contains("0.0.0.0:0 is not a loopback address"), "{err}");
    assert!(
        err.contains("rds-iam-proxy gateway") && err.contains("--allow-remote-clients"),
        "{err}"
    );
    cmd.arg("--allow-remote-clients");
    let (ok, out, err) = run(&mut cmd);
    assert!(ok, "{err}");
    assert!(out.contains("allow_remote_clients = true"), "{out}");
}

/// A person's own local proxy with `--gateway`: psql with no password,
/// through the local proxy (which signs the proof and the token with the
/// person's session) and the gateway (which holds no credentials); a
/// cancel (psql's Ctrl-C) travels the same way, through both.
#[test]
fn a_local_proxy_reaches_the_cluster_through_the_gateway() {
    let Some(bed) = Bed::shared("a_local_proxy_reaches_the_cluster_through_the_gateway") else {
        return;
    };
    bed.create_iam_user("erin");
    let erin = AwsHome::sso(bed, "erin", "DatabaseUser");
    let (gw, audit, _nobody) = gateway(bed, &[]);
    let local = Proxy::builder(bed, &erin)
        .without("--connect-to")
        .arg("--gateway", gw.addr.to_string())
        .arg("--gateway-id", GATEWAY_ID)
        .arg("--gateway-ca", gw.ca_cert())
        .start();
    let (ok, out, err) = run(local.psql("erin", "").args(["-c", "select current_user"]));
    assert!(
        ok,
        "{err}\n--- local ---\n{}\n--- gateway ---\n{}",
        local.log(),
        gw.log()
    );
    assert_eq!(out.trim(), "erin");
    // The local check still refuses another person's user before signing.
    let (ok, _, err) = run(local.psql("bob", "").args(["-c", "select 1"]));
    assert!(!ok);
    assert!(err.contains("is not yours"), "{err}");

    let (stderr, lasted) = psql_sleep_then_interrupt(&local, bed, "erin", "gw-cancel-me");
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}\n{}",
        gw.log()
    );
    assert!(lasted < Duration::from_secs(30));
    // Each logs once it has seen its server close, which can be after
    // psql has its answer.
    local.wait_for_log("cancel request forwarded", Duration::from_secs(10));
    gw.wait_for_log("cancel request forwarded", Duration::from_secs(10));

    let starts = sessions_started(&audit);
    assert!(
        starts
            .iter()
            .any(|s| s["person"] == "erin" && s["gateway_id"] == GATEWAY_ID),
        "{starts:?}"
    );
}

/// Two instances of one gateway behind a load balancer: a cancel request
/// that reaches the instance not holding the session is sent on to the
/// one that does (its number is in the key), and cancels the query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_another_gateway_instance_reaches_the_session() {
    let Some(bed) = Bed::shared("a_cancel_sent_to_another_gateway_instance") else {
        return;
    };
    bed.create_iam_user("fay");
    let fay = AwsHome::sso(bed, "fay", "DatabaseUser");
    let (a, _audit_a, _n1) = gateway(bed, &[("--gateway-instance", "1")]);
    let (b, _audit_b, _n2) = gateway(
        bed,
        &[
            ("--gateway-instance", "2"),
            ("--gateway-peer", &format!("1=127.0.0.1:{}", a.addr.port())),
            ("--gateway-peer-ca", a.ca_cert().to_str().unwrap()),
        ],
    );
    let proof = proof_as(bed, &fay, &[]).unwrap();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(a.addr.port())
        .user("fay")
        .dbname("mylab")
        .application_name("peer-cancel-me")
        .password(proof)
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(a.tls_config());
    let (client, conn) = config.connect(tls).await.expect("fay through gateway 1");
    tokio::spawn(conn);
    let cancel = client.cancel_token();
    let sleep = tokio::spawn(async move { client.simple_query("select pg_sleep(60)").await });
    let active = "select count(*) from pg_stat_activity where application_name = 'peer-cancel-me' and state = 'active'";
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::task::block_in_place(|| bed.admin_sql(active)).trim() != "1" {
        assert!(Instant::now() < deadline, "the sleep never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cancel request goes to instance 2, which holds no such session.
    // The session asked for TLS, so its cancel request does too.
    let to_b = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut b_tls = tokio_postgres_rustls::MakeRustlsConnect::new(b.tls_config());
    let b_tls = tokio_postgres::tls::MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(
        &mut b_tls,
        "127.0.0.1",
    )
    .unwrap();
    cancel
        .cancel_query_raw(to_b, b_tls)
        .await
        .expect("cancel request sent");
    let result = tokio::time::timeout(Duration::from_secs(20), sleep)
        .await
        .expect("the sleep was not cancelled within 20 s")
        .unwrap();
    let err = result.expect_err("the sleep was cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
    tokio::task::block_in_place(|| {
        b.wait_for_log(
            "cancel request sent to the gateway instance that issued its key",
            Duration::from_secs(10),
        );
        a.wait_for_log("cancel request forwarded", Duration::from_secs(10));
    });
}
