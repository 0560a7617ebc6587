//! Self-tests of the offline test bed from the Rust side: the bed starts,
//! IAM users can be created, and the IAM Identity Center stand-in serves the
//! real aws-config SSO profile flow (GetRoleCredentials, CreateToken refresh).
//!
//! aws-config reads HOME and AWS_* from the process environment, which a
//! test must not change (`set_var` is unsafe and racy under the test
//! harness). So each SSO check re-runs this test binary as a child with the
//! AwsHome environment, running only the ignored `aws_probe` test.

mod support;

use std::process::Command;

use support::bed::{AwsHome, Bed, sha1_hex};

const PROBE_ENV: &str = "RDSIAM_BED_AWS_PROBE";

#[test]
fn sha1_names_the_sso_cache_file_like_aws_config() {
    // Values from aws-config's own cache tests and sha1sum.
    assert_eq!(sha1_hex(b"dev"), "34c6fceca75e456f25e7e99531e2425c6c1de443");
    assert_eq!(
        sha1_hex(b"admin"),
        "d033e22ae348aeb5660fc2140aec35850c4da997"
    );
    assert_eq!(
        sha1_hex(b"https://d-92671207e4.awsapps.com/start"),
        "13f9d35043871d073ab260e020f0ffde092cb14b"
    );
    assert_eq!(
        sha1_hex(&[b'a'; 200]),
        "e61cfffe0d9195a525fc6cf06ca2d77119c24a40"
    );
}

#[test]
fn bed_starts_and_creates_iam_users() {
    let Some(bed) = Bed::shared("bed_starts_and_creates_iam_users") else {
        return;
    };
    bed.create_iam_user("selftest_iam");
    bed.create_iam_user("selftest_iam"); // idempotent
    let out = bed.admin_sql(
        "SELECT pg_has_role('selftest_iam', 'rds_iam', 'member'), \
         has_database_privilege('selftest_iam', 'mylab', 'CONNECT')",
    );
    assert_eq!(out.trim(), "t|t");

    // Without a token the IAM user is refused by PAM, like on RDS.
    let out = bed
        .psql("selftest_iam", "not-a-token")
        .args(["-c", "select 1"])
        .output()
        .expect("run psql");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FATAL:  PAM authentication failed for user \"selftest_iam\""),
        "{stderr}"
    );
}

/// Runs `aws_probe` in a child process with `home`'s environment.
fn probe(home: &AwsHome) -> Result<String, String> {
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    cmd.args([
        "--ignored",
        "--exact",
        "aws_probe",
        "--nocapture",
        "--test-threads=1",
    ]);
    home.apply(&mut cmd);
    cmd.env(PROBE_ENV, "1");
    let out = cmd.output().expect("run probe");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // With --nocapture the harness prints "test aws_probe ... " on the same line.
    match stdout.lines().find_map(|l| l.split_once("PROBE_ARN=")) {
        Some((_, arn)) if out.status.success() => Ok(arn.trim().to_owned()),
        _ => Err(format!("{stdout}\n{stderr}")),
    }
}

fn sso_paths_for(bed: &Bed, user: &str) -> Vec<String> {
    bed.sso_requests()
        .as_array()
        .expect("requests list")
        .iter()
        .filter(|r| r["user"].as_str() == Some(user))
        .map(|r| r["path"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn assert_identity_center_arn(bed: &Bed, arn: &str, permission_set: &str, user: &str) {
    let prefix = format!(
        "arn:aws:sts::{}:assumed-role/AWSReservedSSO_{permission_set}_",
        bed.info.account_id
    );
    let rest = arn.strip_prefix(&prefix).unwrap_or_else(|| panic!("{arn}"));
    let (hex, session) = rest.split_once('/').unwrap_or_else(|| panic!("{arn}"));
    assert_eq!(hex.len(), 16, "{arn}");
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{arn}");
    assert_eq!(session, user, "{arn}");
}

#[test]
fn sso_profile_resolves_to_identity_center_role_session() {
    let Some(bed) = Bed::shared("sso_profile_resolves_to_identity_center_role_session") else {
        return;
    };
    let home = AwsHome::sso(bed, "arianna", "DatabaseAdmin");
    let arn = probe(&home).unwrap_or_else(|e| panic!("probe failed:\n{e}"));
    assert_identity_center_arn(bed, &arn, "DatabaseAdmin", "arianna");
    // A fresh token needs no refresh: one GetRoleCredentials, no CreateToken.
    assert_eq!(sso_paths_for(bed, "arianna"), ["/federation/credentials"]);
}

#[test]
fn sso_token_close_to_expiry_is_refreshed_with_create_token() {
    let Some(bed) = Bed::shared("sso_token_close_to_expiry_is_refreshed_with_create_token") else {
        return;
    };
    // aws-config refreshes when the token expires within 5 minutes.
    let cache = bed.sso_login_with("bianca", "DatabaseAdmin", Some(120), true);
    let home = AwsHome::sso_with_cache(bed, "DatabaseAdmin", &cache);
    let arn = probe(&home).unwrap_or_else(|e| panic!("probe failed:\n{e}"));
    assert_identity_center_arn(bed, &arn, "DatabaseAdmin", "bianca");
    assert_eq!(
        sso_paths_for(bed, "bianca"),
        ["/token", "/federation/credentials"]
    );
    let rewritten = home.read_sso_cache();
    assert_ne!(
        rewritten["accessToken"], cache["accessToken"],
        "cache file not rewritten"
    );
    assert_ne!(
        rewritten["refreshToken"], cache["refreshToken"],
        "rotated refresh token not saved"
    );
}

#[test]
fn expired_unrefreshable_sso_token_asks_for_sso_login() {
    let Some(bed) = Bed::shared("expired_unrefreshable_sso_token_asks_for_sso_login") else {
        return;
    };
    let cache = bed.sso_login_with("carla", "DatabaseAdmin", Some(-60), false);
    let home = AwsHome::sso_with_cache(bed, "DatabaseAdmin", &cache);
    let err = probe(&home).expect_err("an expired token without refresh must fail");
    assert!(err.contains("expired"), "{err}");
    assert!(sso_paths_for(bed, "carla").is_empty());
}

#[test]
fn revoked_refresh_token_with_expired_access_token_fails() {
    let Some(bed) = Bed::shared("revoked_refresh_token_with_expired_access_token_fails") else {
        return;
    };
    let cache = bed.sso_login_with("dora", "DatabaseAdmin", Some(-60), true);
    bed.revoke_refresh_token(cache["refreshToken"].as_str().expect("refresh token"));
    let home = AwsHome::sso_with_cache(bed, "DatabaseAdmin", &cache);
    let err = probe(&home).expect_err("no valid token anywhere: must fail");
    // aws-config tries CreateToken (invalid_grant), then presents the expired
    // token, which GetRoleCredentials refuses.
    let requests = bed.sso_requests();
    let token_calls = requests
        .as_array()
        .expect("list")
        .iter()
        .filter(|r| r["path"] == "/token" && r["client_id"] == cache["clientId"])
        .count();
    assert_eq!(
        token_calls, 1,
        "expected one CreateToken attempt; probe said:\n{err}"
    );
    assert!(err.contains("UnauthorizedException"), "{err}");
}

#[test]
fn static_session_keys_resolve_to_assumed_role() {
    let Some(bed) = Bed::shared("static_session_keys_resolve_to_assumed_role") else {
        return;
    };
    let creds = bed.mint_credentials("erik", "DatabaseUser");
    let home = AwsHome::static_keys(bed, &creds);
    let arn = probe(&home).unwrap_or_else(|e| panic!("probe failed:\n{e}"));
    assert_identity_center_arn(bed, &arn, "DatabaseUser", "erik");
}

/// Child side of `probe`: resolves credentials the way the proxy does (the
/// default chain from the environment) and asks STS who they are.
#[test]
#[ignore = "helper: run by the SSO tests in a child process with a prepared environment"]
fn aws_probe() {
    if std::env::var_os(PROBE_ENV).is_none() {
        eprintln!("aws_probe only runs as a child of the bed self-tests");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let sts = aws_sdk_sts::Client::new(&config);
        match sts.get_caller_identity().send().await {
            Ok(out) => println!("PROBE_ARN={}", out.arn().unwrap_or_default()),
            Err(e) => panic!(
                "GetCallerIdentity failed: {}",
                aws_sdk_sts::error::DisplayErrorContext(&e)
            ),
        }
    });
}
