//! The gateway proof: what a person's machine sends a gateway as its
//! PostgreSQL password, and the gateway's reading of it (sans I/O).
//!
//! Version 1, one line of text with no spaces (about 3 KB with a session
//! token, so any libpq client can send it as a password):
//!
//! ```text
//! rds-iam-proxy-proof-v1:<nonce>:<STS query>:<RDS auth token>
//! ```
//!
//! - `<nonce>`: 32 lowercase hex digits, fresh for each proof.
//! - `<STS query>`: a presigned `sts:GetCallerIdentity` (`GET /`, query
//!   string SigV4) for the regional STS endpoint, whose signed headers are
//!   `host`, `x-rds-iam-proxy-gateway-id` (the gateway's id) and
//!   `x-rds-iam-proxy-nonce` (the nonce). Made with the person's own
//!   credentials; the gateway replays it to STS with both headers, and STS
//!   checks the signature and names the caller. The nonce makes each
//!   proof's signature unique: two proofs signed in the same second (the
//!   resolution of `X-Amz-Date`) would otherwise be one, and the second
//!   would be refused as a replay.
//! - `<RDS auth token>`: an ordinary RDS IAM token (`HOST:PORT/?Action=connect&...`)
//!   for the requested database user, signed by the same credentials. The
//!   gateway logs in with it; the cluster's IAM policy still decides.
//!
//! The nonce and the query never hold a raw `:` (SigV4 percent-encodes
//! it), so the token is everything after the third `:`.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use thiserror::Error;

use crate::secret::Secret;
use crate::sigv4::{self, QueryError, StrictQuery};
use crate::token::TokenTarget;

/// What a version-1 proof starts with.
pub const PREFIX: &str = "rds-iam-proxy-proof-v1:";
/// The signed header that binds a proof to one gateway.
pub const GATEWAY_ID_HEADER: &str = "x-rds-iam-proxy-gateway-id";
/// The signed header that makes each proof unique.
pub const NONCE_HEADER: &str = "x-rds-iam-proxy-nonce";
/// Hex digits of a nonce (128 random bits).
const NONCE_LEN: usize = 32;
/// The longest proof read (two presigned requests with a session token
/// are about 3 KB).
pub const MAX_LEN: usize = 8192;
/// How old a proof's signature may be (STS's own limit for a presigned
/// request is 15 minutes).
pub const MAX_AGE: Duration = Duration::from_secs(900);
/// How far in the future a proof's signature time may be (the clock skew
/// AWS itself tolerates).
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// `X-Amz-Expires` of the GetCallerIdentity request; at most this is accepted.
pub const STS_EXPIRES: u64 = 900;

const STS_ACTION: &str = "GetCallerIdentity";
const STS_VERSION: &str = "2011-06-15";
/// The query keys a GetCallerIdentity proof may carry, each once.
pub const STS_KEYS: &[&str] = &[
    "Action",
    "Version",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
];
/// The query keys of an RDS auth token, each once.
const RDS_KEYS: &[&str] = &[
    "Action",
    "DBUser",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
];

/// The STS host of a region: where a proof's signature is valid, and the
/// only place a gateway sends it.
pub fn sts_host(region: &str) -> String {
    if region.starts_with("cn-") {
        format!("sts.{region}.amazonaws.com.cn")
    } else {
        format!("sts.{region}.amazonaws.com")
    }
}

/// What a proof is for.
#[derive(Debug, Clone, Copy)]
pub struct ProofTarget<'a> {
    /// The gateway's id (by default the name in its certificate).
    pub gateway_id: &'a str,
    /// The region whose STS endpoint the gateway asks.
    pub sts_region: &'a str,
    /// The cluster endpoint, database user and signing region of the token.
    pub rds: TokenTarget<'a>,
}

/// Makes a proof with the person's own credentials as of `now`.
pub fn make(creds: &Credentials, target: &ProofTarget<'_>, now: SystemTime) -> Secret {
    let mut random = [0u8; NONCE_LEN / 2];
    crate::tls::random_bytes(&mut random);
    let nonce = sigv4::hex(&random);
    let host = sts_host(target.sts_region);
    let query = sigv4::presign(
        creds,
        &sigv4::Presign {
            host: &host,
            region: target.sts_region,
            service: "sts",
            params: &[("Action", STS_ACTION), ("Version", STS_VERSION)],
            headers: &[
                (GATEWAY_ID_HEADER, target.gateway_id),
                (NONCE_HEADER, &nonce),
            ],
            expires: STS_EXPIRES,
        },
        now,
    );
    let token = crate::token::sign_at(creds, &target.rds, now);
    Secret::new(format!(
        "{PREFIX}{nonce}:{}:{}",
        query.as_str(),
        token.expose()
    ))
}

/// What the gateway expects of a proof.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub gateway_id: &'a str,
    pub sts_region: &'a str,
    /// The endpoint name and port clients target (the token's host).
    pub endpoint_host: &'a str,
    pub endpoint_port: u16,
    /// The token's signing region.
    pub endpoint_region: &'a str,
    /// The database user asked for in the startup packet.
    pub db_user: &'a str,
    pub now: SystemTime,
}

/// A proof that passed every check the gateway can make alone. STS must
/// still confirm it ([`StsCall`]).
#[derive(Debug)]
pub struct Checked {
    /// The request to send STS, rebuilt from the validated parts.
    /// The gateway sends its own id in the signed header: a proof made for
    /// another gateway has a signature that STS refuses.
    pub sts: StsCall,
    /// The access key that signed both requests.
    pub access_key_id: String,
    /// The STS request's signature: the proof's identity for the replay set.
    pub signature: String,
    /// When the proof was signed; it may be replayed until MAX_AGE after.
    pub signed_at: SystemTime,
    /// The RDS token, as the client sent it.
    pub token: Secret,
}

/// The GetCallerIdentity request the gateway sends: host and path fixed by
/// the gateway, the query rebuilt from allow-listed parts (never a host,
/// path or scheme of the client's).
#[derive(Debug)]
pub struct StsCall {
    /// `sts.REGION.amazonaws.com`: also the `host` header.
    pub host: String,
    /// `/?...`; holds the session token.
    pub path_and_query: Secret,
    /// The gateway's id, sent in [`GATEWAY_ID_HEADER`].
    pub gateway_id: String,
    /// The proof's nonce, sent in [`NONCE_HEADER`].
    pub nonce: String,
}

/// Why a proof was refused before STS was asked. Every variant is
/// logged; the client is told only that its proof was refused, and what
/// to run.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProofError {
    #[error("no gateway proof: the password is not a rds-iam-proxy proof")]
    NotAProof,
    #[error("the proof is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("the proof is not in the version-1 layout")]
    Layout,
    #[error("GetCallerIdentity part: {0}")]
    StsQuery(QueryError),
    #[error("RDS token part: {0}")]
    TokenQuery(QueryError),
    #[error("GetCallerIdentity part: {0}")]
    Sts(&'static str),
    #[error("RDS token part: {0}")]
    Token(&'static str),
    #[error("the proof was signed in region {got:?}; this gateway verifies with STS in {want:?}")]
    OtherStsRegion { got: String, want: String },
    #[error("the proof was signed more than 15 minutes ago")]
    Expired,
    #[error("the proof is signed in the future (clock skew over 5 minutes)")]
    Future,
    #[error("the RDS token has expired")]
    TokenExpired,
    #[error("the RDS token is for database user {got:?}, not the requested {want:?}")]
    OtherUser { got: String, want: String },
    #[error("the RDS token is for endpoint {0:?}, not this gateway's endpoint")]
    OtherEndpoint(String),
    #[error("the RDS token was signed by other credentials than the proof of identity")]
    OtherCredentials,
}

/// Checks a proof against what this gateway expects, without I/O.
pub fn check(password: &[u8], want: &Expected<'_>) -> Result<Checked, ProofError> {
    if password.len() > MAX_LEN {
        return Err(ProofError::TooLong);
    }
    let text = std::str::from_utf8(password).map_err(|_| ProofError::NotAProof)?;
    let rest = text.strip_prefix(PREFIX).ok_or(ProofError::NotAProof)?;
    let (nonce, rest) = rest.split_once(':').ok_or(ProofError::Layout)?;
    if nonce.len() != NONCE_LEN
        || !nonce
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(ProofError::Layout);
    }
    let (sts_query, token) = rest.split_once(':').ok_or(ProofError::Layout)?;
    let sts = StrictQuery::parse(sts_query, STS_KEYS).map_err(ProofError::StsQuery)?;
    let q = |k| sts.require(k).map_err(ProofError::StsQuery);
    if q("Action")? != STS_ACTION || q("Version")? != STS_VERSION {
        return Err(ProofError::Sts("not a GetCallerIdentity request"));
    }
    if q("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" {
        return Err(ProofError::Sts("unknown signing algorithm"));
    }
    let signed_headers = format!("host;{GATEWAY_ID_HEADER};{NONCE_HEADER}");
    if q("X-Amz-SignedHeaders")? != signed_headers {
        return Err(ProofError::Sts(
            "the signed headers must be exactly host, x-rds-iam-proxy-gateway-id and x-rds-iam-proxy-nonce",
        ));
    }
    let signature = q("X-Amz-Signature")?;
    if signature.len() != 64
        || !signature
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(ProofError::Sts("malformed signature"));
    }
    let expires: u64 = q("X-Amz-Expires")?
        .parse()
        .map_err(|_| ProofError::Sts("malformed X-Amz-Expires"))?;
    if expires == 0 || expires > STS_EXPIRES {
        return Err(ProofError::Sts("X-Amz-Expires must be 1 to 900 seconds"));
    }
    let signed_at =
        sigv4::parse_amz_date(q("X-Amz-Date")?).ok_or(ProofError::Sts("malformed X-Amz-Date"))?;
    fresh(signed_at, want.now)?;
    let scope = Scope::parse(q("X-Amz-Credential")?, "sts", q("X-Amz-Date")?)
        .ok_or(ProofError::Sts("malformed X-Amz-Credential"))?;
    if scope.region != want.sts_region {
        return Err(ProofError::OtherStsRegion {
            got: scope.region.to_owned(),
            want: want.sts_region.to_owned(),
        });
    }
    let checked_token = check_token(
        token,
        want,
        scope.access_key_id,
        sts.get("X-Amz-Security-Token"),
    )?;

    // Rebuilt in a fixed order from the values read (the signature covers
    // the canonical, sorted form, so order does not matter to STS).
    let pairs: Vec<(&str, &str)> = STS_KEYS
        .iter()
        .filter_map(|k| sts.get(k).map(|v| (*k, v)))
        .collect();
    let query = sigv4::encode_pairs(pairs);
    Ok(Checked {
        sts: StsCall {
            host: sts_host(want.sts_region),
            path_and_query: Secret::new(format!("/?{}", query.as_str())),
            gateway_id: want.gateway_id.to_owned(),
            nonce: nonce.to_owned(),
        },
        access_key_id: scope.access_key_id.to_owned(),
        signature: signature.to_owned(),
        signed_at,
        token: checked_token,
    })
}

/// A signature time within MAX_AGE before `now` and MAX_SKEW after.
fn fresh(signed_at: SystemTime, now: SystemTime) -> Result<(), ProofError> {
    match now.duration_since(signed_at) {
        Ok(age) if age > MAX_AGE => Err(ProofError::Expired),
        Ok(_) => Ok(()),
        Err(ahead) if ahead.duration() > MAX_SKEW => Err(ProofError::Future),
        Err(_) => Ok(()),
    }
}

/// The RDS token: for this endpoint and user, signed by the proof's key
/// and session, not expired.
fn check_token(
    token: &str,
    want: &Expected<'_>,
    access_key_id: &str,
    session_token: Option<&str>,
) -> Result<Secret, ProofError> {
    let (host_port, query) = token
        .split_once("/?")
        .ok_or(ProofError::Token("not an RDS auth token"))?;
    let expected = format!("{}:{}", want.endpoint_host, want.endpoint_port);
    if !host_port.eq_ignore_ascii_case(&expected) {
        return Err(ProofError::OtherEndpoint(
            host_port.chars().take(255).collect(),
        ));
    }
    let q = StrictQuery::parse(query, RDS_KEYS).map_err(ProofError::TokenQuery)?;
    let get = |k| q.require(k).map_err(ProofError::TokenQuery);
    if get("Action")? != "connect" {
        return Err(ProofError::Token("not a connect token"));
    }
    if get("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" || get("X-Amz-SignedHeaders")? != "host" {
        return Err(ProofError::Token("not signed as RDS signs tokens"));
    }
    let user = get("DBUser")?;
    if user != want.db_user {
        return Err(ProofError::OtherUser {
            got: user.chars().take(63).collect(),
            want: want.db_user.to_owned(),
        });
    }
    let date = get("X-Amz-Date")?;
    let scope = Scope::parse(get("X-Amz-Credential")?, "rds-db", date)
        .ok_or(ProofError::Token("malformed X-Amz-Credential"))?;
    if scope.region != want.endpoint_region {
        return Err(ProofError::Token(
            "signed for another region than the endpoint's",
        ));
    }
    if scope.access_key_id != access_key_id || q.get("X-Amz-Security-Token") != session_token {
        return Err(ProofError::OtherCredentials);
    }
    let signed_at = sigv4::parse_amz_date(date).ok_or(ProofError::Token("malformed X-Amz-Date"))?;
    let expires: u64 = get("X-Amz-Expires")?
        .parse()
        .map_err(|_| ProofError::Token("malformed X-Amz-Expires"))?;
    if expires > crate::token::TOKEN_LIFETIME.as_secs() {
        return Err(ProofError::Token("X-Amz-Expires over 900 seconds"));
    }
    if signed_at + Duration::from_secs(expires) <= want.now {
        return Err(ProofError::TokenExpired);
    }
    fresh(signed_at, want.now).map_err(|e| match e {
        ProofError::Expired => ProofError::TokenExpired,
        e => e,
    })?;
    Ok(Secret::new(token.to_owned()))
}

/// `AKID/YYYYMMDD/REGION/SERVICE/aws4_request`.
struct Scope<'a> {
    access_key_id: &'a str,
    region: &'a str,
}

impl<'a> Scope<'a> {
    fn parse(credential: &'a str, service: &str, amz_date: &str) -> Option<Self> {
        let mut parts = credential.split('/');
        let (Some(akid), Some(date), Some(region), Some(svc), Some("aws4_request"), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let akid_ok = (16..=128).contains(&akid.len())
            && akid
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        let region_ok = !region.is_empty()
            && region.len() <= 32
            && region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        (akid_ok && region_ok && svc == service && amz_date.get(..8) == Some(date)).then_some(
            Self {
                access_key_id: akid,
                region,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: u64 = 1_764_180_000;
    const HOST: &str = "demo.cluster-c0ffee.eu-west-1.rds.amazonaws.com";

    fn creds(akid: &str) -> Credentials {
        Credentials::new(
            akid,
            "secret",
            Some("FwoGZXIvYXdzEJr//token=".into()),
            None,
            "t",
        )
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn target<'a>(gateway_id: &'a str, user: &'a str) -> ProofTarget<'a> {
        ProofTarget {
            gateway_id,
            sts_region: "eu-west-1",
            rds: TokenTarget {
                host: HOST,
                port: 5432,
                region: "eu-west-1",
                user,
            },
        }
    }

    fn expected(user: &str, now: u64) -> Expected<'_> {
        Expected {
            gateway_id: "bastion.example",
            sts_region: "eu-west-1",
            endpoint_host: HOST,
            endpoint_port: 5432,
            endpoint_region: "eu-west-1",
            db_user: user,
            now: at(now),
        }
    }

    fn proof(user: &str) -> String {
        make(
            &creds("ASIAEXAMPLEKEY000001"),
            &target("bastion.example", user),
            at(AT),
        )
        .expose()
        .to_owned()
    }

    #[test]
    fn a_proof_reads_back_and_is_rebuilt_for_the_fixed_sts_host() {
        let p = proof("arianna");
        assert!(p.len() < 2048, "{}", p.len());
        assert!(!p.contains(' '));
        let c = check(p.as_bytes(), &expected("arianna", AT + 60)).unwrap();
        assert_eq!(c.access_key_id, "ASIAEXAMPLEKEY000001");
        assert_eq!(c.sts.host, "sts.eu-west-1.amazonaws.com");
        assert_eq!(c.signed_at, at(AT));
        let q = c.sts.path_and_query.expose();
        assert!(
            q.starts_with("/?Action=GetCallerIdentity&Version=2011-06-15&"),
            "{q}"
        );
        assert!(
            q.contains(
                "X-Amz-SignedHeaders=host%3Bx-rds-iam-proxy-gateway-id%3Bx-rds-iam-proxy-nonce"
            ),
            "{q}"
        );
        assert_eq!(c.sts.nonce.len(), 32);
        // Two proofs in the same second differ (the nonce): neither is
        // taken for a replay of the other.
        let again = proof("arianna");
        let c2 = check(again.as_bytes(), &expected("arianna", AT + 60)).unwrap();
        assert_ne!(c.signature, c2.signature);
        assert!(q.contains(&format!("X-Amz-Signature={}", c.signature)));
        assert!(
            c.token
                .expose()
                .starts_with(&format!("{HOST}:5432/?Action=connect&DBUser=arianna&"))
        );
    }

    /// Each rule, on a proof that differs from a good one in one way.
    #[test]
    fn every_check_refuses_its_case() {
        let good = proof("arianna");
        let (nonce, rest) = good[PREFIX.len()..].split_once(':').unwrap();
        let (sts, token) = rest.split_once(':').unwrap();
        let with = |sts: &str, token: &str| format!("{PREFIX}{nonce}:{sts}:{token}");
        assert_eq!(
            check(
                good.replacen(nonce, "not-a-nonce", 1).as_bytes(),
                &expected("arianna", AT)
            )
            .unwrap_err(),
            ProofError::Layout
        );
        let refused =
            |p: &str, user: &str, now: u64| check(p.as_bytes(), &expected(user, now)).unwrap_err();

        assert_eq!(refused("hunter2", "arianna", AT), ProofError::NotAProof);
        assert_eq!(
            refused(&"x".repeat(MAX_LEN + 1), "arianna", AT),
            ProofError::TooLong
        );
        assert_eq!(
            refused(&format!("{PREFIX}abc"), "arianna", AT),
            ProofError::Layout
        );
        // Duplicated and extra query keys (CVE-2022-2385 class).
        assert_eq!(
            refused(
                &with(&format!("{sts}&Action=GetCallerIdentity"), token),
                "arianna",
                AT
            ),
            ProofError::StsQuery(QueryError::Duplicate("Action".into()))
        );
        assert!(matches!(
            refused(
                &with(&format!("Host=evil.example&{sts}"), token),
                "arianna",
                AT
            ),
            ProofError::StsQuery(QueryError::Unexpected(_))
        ));
        // Another action.
        assert!(matches!(
            refused(
                &with(&sts.replace("GetCallerIdentity", "AssumeRole"), token),
                "arianna",
                AT
            ),
            ProofError::Sts(_)
        ));
        // The gateway-id header left out of the signed headers.
        assert!(matches!(
            refused(
                &with(
                    &sts.replace("host%3Bx-rds-iam-proxy-gateway-id%3B", "host%3B"),
                    token
                ),
                "arianna",
                AT
            ),
            ProofError::Sts(_)
        ));
        // Expires over 900.
        assert!(matches!(
            refused(
                &with(
                    &sts.replace("X-Amz-Expires=900", "X-Amz-Expires=3600"),
                    token
                ),
                "arianna",
                AT
            ),
            ProofError::Sts(_)
        ));
        // Too old, and too far ahead.
        assert_eq!(refused(&good, "arianna", AT + 901), ProofError::Expired);
        assert_eq!(refused(&good, "arianna", AT - 301), ProofError::Future);
        assert!(check(good.as_bytes(), &expected("arianna", AT - 299)).is_ok());
        // Another STS region.
        let other = make(
            &creds("ASIAEXAMPLEKEY000001"),
            &ProofTarget {
                sts_region: "us-east-1",
                ..target("bastion.example", "arianna")
            },
            at(AT),
        );
        assert!(matches!(
            refused(other.expose(), "arianna", AT),
            ProofError::OtherStsRegion { .. }
        ));
        // A token for another user than the one asked for.
        assert_eq!(
            refused(&good, "bob", AT),
            ProofError::OtherUser {
                got: "arianna".into(),
                want: "bob".into()
            }
        );
        // A token signed by other credentials than the proof.
        let bobs = proof_with("ASIAEXAMPLEKEY000002", "arianna");
        let bob_token = bobs[PREFIX.len()..].splitn(3, ':').nth(2).unwrap();
        assert_eq!(
            refused(&with(sts, bob_token), "arianna", AT),
            ProofError::OtherCredentials
        );
        // A token for another endpoint.
        assert!(matches!(
            refused(
                &with(sts, &token.replace("demo.cluster", "other.cluster")),
                "arianna",
                AT
            ),
            ProofError::OtherEndpoint(_)
        ));
        // A token with a duplicated DBUser.
        assert!(matches!(
            refused(
                &with(
                    sts,
                    &token.replace("DBUser=arianna", "DBUser=arianna&DBUser=bob")
                ),
                "arianna",
                AT
            ),
            ProofError::TokenQuery(_)
        ));
    }

    fn proof_with(akid: &str, user: &str) -> String {
        make(&creds(akid), &target("bastion.example", user), at(AT))
            .expose()
            .to_owned()
    }

    #[test]
    fn sts_hosts() {
        assert_eq!(sts_host("eu-west-1"), "sts.eu-west-1.amazonaws.com");
        assert_eq!(sts_host("cn-north-1"), "sts.cn-north-1.amazonaws.com.cn");
    }
}
