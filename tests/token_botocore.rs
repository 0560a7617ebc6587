//! Tokens are byte-identical to botocore's `generate_db_auth_token` (what
//! `aws rds generate-db-auth-token` runs) for the same credentials,
//! endpoint, user, region and clock.

use std::process::Command;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use rds_iam_proxy::token::{TokenTarget, sign_at};

const BOTOCORE_TOKEN: &str = r#"
import datetime, json, sys
from unittest import mock
import botocore.session
session = botocore.session.Session()
for case in json.loads(sys.argv[1]):
    session.set_credentials(case["akid"], case["secret"], case.get("token"))
    client = session.create_client("rds", region_name=case["region"])
    at = datetime.datetime.fromtimestamp(case["epoch"], datetime.timezone.utc).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=at):
        print(client.generate_db_auth_token(case["host"], case["port"], case["user"], case["region"]))
"#;

/// One token per case, from one Python process.
fn botocore(cases: &serde_json::Value) -> Vec<String> {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup-test-env.sh",
        python.display()
    );
    let out = Command::new(python)
        .args(["-c", BOTOCORE_TOKEN, &cases.to_string()])
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn tokens_match_botocore_byte_for_byte() {
    let users = [
        "arianna",
        "jean.dupont@example.com",
        "o'brien",
        "Ärger Ümlaut",
        "a+b/c=d&e%f~g_h-i.j",
        "x y",
    ];
    let sessions: [Option<&str>; 2] = [
        None,
        Some("IQoJb3JpZ2luX2VjEHkaCWV1LXdlc3QtMSJHMEUCIQ+long/session+token=="),
    ];
    let hosts = [
        (
            "demo.cluster-c0ffee.eu-west-1.rds.amazonaws.com",
            5432,
            "eu-west-1",
        ),
        (
            "db.cluster-ro-abc.cn-north-1.rds.amazonaws.com.cn",
            6543,
            "cn-north-1",
        ),
        ("my-db.internal", 443, "us-east-1"),
    ];
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for user in users {
        for token in sessions {
            for (host, port, region) in hosts {
                let epoch = 1_795_000_000 + cases.len() as u64 * 3_607;
                let case = serde_json::json!({
                    "akid": "ASIAEXAMPLEKEY123456", "secret": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                    "token": token, "region": region, "host": host, "port": port, "user": user, "epoch": epoch,
                });
                let creds = Credentials::new(
                    "ASIAEXAMPLEKEY123456",
                    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                    token.map(str::to_owned),
                    None,
                    "test",
                );
                let target = TokenTarget {
                    host,
                    port,
                    region,
                    user,
                };
                ours.push(sign_at(
                    &creds,
                    &target,
                    SystemTime::UNIX_EPOCH + Duration::from_secs(epoch),
                ));
                cases.push(case);
            }
        }
    }
    let theirs = botocore(&serde_json::Value::Array(cases.clone()));
    assert_eq!(theirs.len(), 36);
    for ((case, ours), theirs) in cases.iter().zip(&ours).zip(&theirs) {
        assert_eq!(ours.expose(), theirs, "case {case}");
    }
}
