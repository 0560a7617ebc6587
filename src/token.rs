//! RDS IAM authentication tokens: a SigV4 presigned `connect` request for
//! service `rds-db`, valid for 900 seconds, without the URL scheme.
//!
//! The bytes match botocore's `generate_db_auth_token` (what the AWS CLI
//! runs) for the same inputs and clock: the parameters are written in its
//! order (operation parameters, then the auth parameters, then the
//! signature). Key derivation and the HMAC come from `aws-sigv4`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::sign::v4::{calculate_signature, generate_signing_key};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// How long a token is valid; RDS accepts at most 900 seconds.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);

const SERVICE: &str = "rds-db";
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Where time comes from, so tests can sign at a fixed instant.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// What a token is for.
#[derive(Debug, Clone, Copy)]
pub struct TokenTarget<'a> {
    /// The endpoint name the client targets (not the address dialled).
    pub host: &'a str,
    pub port: u16,
    pub region: &'a str,
    /// The database user.
    pub user: &'a str,
}

/// Signs tokens with an injectable clock.
#[derive(Debug, Clone)]
pub struct Signer {
    clock: Arc<dyn Clock>,
}

impl Default for Signer {
    fn default() -> Self {
        Self::new(Arc::new(SystemClock))
    }
}

impl Signer {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { clock }
    }

    /// Signs a token for `target` with `creds` at the clock's current time.
    pub fn sign(&self, creds: &Credentials, target: &TokenTarget<'_>) -> Secret {
        sign_at(creds, target, self.clock.now())
    }
}

/// Signs a token for `target` with `creds` as of `now`.
pub fn sign_at(creds: &Credentials, target: &TokenTarget<'_>, now: SystemTime) -> Secret {
    let host = target.host.to_ascii_lowercase();
    let (date, datetime) = amz_dates(now);
    let scope = format!("{date}/{}/{SERVICE}/aws4_request", target.region);
    let credential = format!("{}/{scope}", creds.access_key_id());
    let expires = TOKEN_LIFETIME.as_secs();

    // Operation parameters first, then the auth parameters: botocore's order.
    // The session token is in these strings: wiped when they go.
    let mut query = Zeroizing::new(String::with_capacity(1600));
    query.push_str("Action=connect&DBUser=");
    encode_into(&mut query, target.user);
    query.push_str("&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=");
    encode_into(&mut query, &credential);
    query.push_str("&X-Amz-Date=");
    query.push_str(&datetime);
    query.push_str(&format!(
        "&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host"
    ));
    if let Some(token) = creds.session_token() {
        query.push_str("&X-Amz-Security-Token=");
        encode_into(&mut query, token);
    }

    // The canonical query sorts by name; only the security token moves.
    let mut canonical_query = Zeroizing::new(String::with_capacity(query.len()));
    canonical_query.push_str("Action=connect&DBUser=");
    encode_into(&mut canonical_query, target.user);
    canonical_query.push_str("&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=");
    encode_into(&mut canonical_query, &credential);
    canonical_query.push_str("&X-Amz-Date=");
    canonical_query.push_str(&datetime);
    canonical_query.push_str(&format!("&X-Amz-Expires={expires}"));
    if let Some(token) = creds.session_token() {
        canonical_query.push_str("&X-Amz-Security-Token=");
        encode_into(&mut canonical_query, token);
    }
    canonical_query.push_str("&X-Amz-SignedHeaders=host");

    // The host header drops the scheme's default port, as HTTP clients do.
    let host_header = if target.port == 443 {
        host.clone()
    } else {
        format!("{host}:{}", target.port)
    };
    let canonical_request = Zeroizing::new(format!(
        "GET\n/\n{}\nhost:{host_header}\n\nhost\n{EMPTY_SHA256}",
        canonical_query.as_str()
    ));
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{datetime}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let key = generate_signing_key(creds.secret_access_key(), now, target.region, SERVICE);
    let signature = calculate_signature(key, string_to_sign.as_bytes());

    Secret::new(format!(
        "{host}:{}/?{}&X-Amz-Signature={signature}",
        target.port,
        query.as_str()
    ))
}

/// `YYYYMMDD` and `YYYYMMDDTHHMMSSZ` in UTC.
fn amz_dates(now: SystemTime) -> (String, String) {
    let t = time::OffsetDateTime::from(now);
    let date = format!("{:04}{:02}{:02}", t.year(), u8::from(t.month()), t.day());
    let datetime = format!("{date}T{:02}{:02}{:02}Z", t.hour(), t.minute(), t.second());
    (date, datetime)
}

/// RFC 3986 percent-encoding: everything but unreserved characters.
fn encode_into(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_only_unreserved() {
        let mut s = String::new();
        encode_into(&mut s, "a.b-c_d~e f/g+h@é");
        assert_eq!(s, "a.b-c_d~e%20f%2Fg%2Bh%40%C3%A9");
    }

    #[test]
    fn token_layout() {
        let creds = Credentials::new(
            "AKIDEXAMPLE",
            "secret",
            Some("tok/en=".into()),
            None,
            "test",
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_180_000);
        let target = TokenTarget {
            host: "Demo.cluster-x.eu-west-1.rds.amazonaws.com",
            port: 5432,
            region: "eu-west-1",
            user: "ari anna",
        };
        let token = sign_at(&creds, &target, at);
        let t = token.expose();
        assert!(
            t.starts_with(
                "demo.cluster-x.eu-west-1.rds.amazonaws.com:5432/?Action=connect&DBUser=ari%20anna&\
             X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20251126%2F\
             eu-west-1%2Frds-db%2Faws4_request&X-Amz-Date=20251126T180000Z&X-Amz-Expires=900&\
             X-Amz-SignedHeaders=host&X-Amz-Security-Token=tok%2Fen%3D&X-Amz-Signature="
            ),
            "{t}"
        );
        // Same inputs, same bytes; another second, another signature.
        assert_eq!(sign_at(&creds, &target, at), token);
        assert_ne!(sign_at(&creds, &target, at + Duration::from_secs(1)), token);
    }
}
