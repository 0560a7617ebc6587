//! The gateway proof (src/gateway/proof.rs): what a stranger sends a
//! gateway as its password, read before anything is asked of STS.
//!
//! Checks: no panic and no allocation by a length the input declares; a
//! proof that passes is rebuilt into a request whose query reads back under
//! the same allow-list with the same values, for the fixed STS host of the
//! gateway's region; the token handed on is the input's own last part, and
//! names the expected user; the replay key is a 64-digit hex signature.

use std::time::{Duration, SystemTime};

use rds_iam_proxy::gateway::proof::{self, Expected};
use rds_iam_proxy::sigv4::StrictQuery;

const HOST: &str = "demo.cluster-c0ffee.eu-west-1.rds.amazonaws.com";

pub fn check(data: &[u8]) {
    let want = Expected {
        gateway_id: "bastion.example",
        sts_region: "eu-west-1",
        endpoint_host: HOST,
        endpoint_port: 5432,
        endpoint_region: "eu-west-1",
        db_user: "arianna",
        // 2025-11-26T18:05:00Z: five minutes after the seeds were signed.
        now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_180_300),
    };
    let Ok(c) = proof::check(data, &want) else {
        return;
    };
    assert_eq!(c.sts.host, proof::sts_host("eu-west-1"));
    assert_eq!(c.signature.len(), 64);
    assert!(c.signature.bytes().all(|b| b.is_ascii_hexdigit()));
    let query = c
        .sts
        .path_and_query
        .expose()
        .strip_prefix("/?")
        .expect("a rebuilt query starts with /?");
    let again = StrictQuery::parse(query, proof::STS_KEYS).expect("the rebuilt query reads back");
    assert_eq!(again.get("Action"), Some("GetCallerIdentity"));
    assert_eq!(again.get("X-Amz-Signature"), Some(c.signature.as_str()));
    let input = std::str::from_utf8(data).expect("an accepted proof is UTF-8");
    assert!(
        input.ends_with(c.token.expose()),
        "the token is the input's last part"
    );
    assert!(c.token.expose().contains("DBUser=arianna&"));
    assert!(input.contains(&format!("X-Amz-Credential={}%2F", c.access_key_id)));
}
