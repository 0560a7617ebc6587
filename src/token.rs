//! RDS IAM authentication tokens: a SigV4 presigned `connect` request for
//! service `rds-db`, valid for 900 seconds, without the URL scheme.
//!
//! The bytes match botocore's `generate_db_auth_token` (what the AWS CLI
//! runs) for the same inputs and clock: the parameters are written in its
//! order (operation parameters, then the auth parameters, then the
//! signature); the presigning itself is [`crate::sigv4`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;

use crate::secret::Secret;

/// How long a token is valid; RDS accepts at most 900 seconds.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);

const SERVICE: &str = "rds-db";

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
    // The host header drops the scheme's default port, as HTTP clients do.
    let host_header = if target.port == 443 {
        host.clone()
    } else {
        format!("{host}:{}", target.port)
    };
    // Operation parameters first, then the auth parameters: botocore's order.
    let query = crate::sigv4::presign(
        creds,
        &crate::sigv4::Presign {
            host: &host_header,
            region: target.region,
            service: SERVICE,
            params: &[("Action", "connect"), ("DBUser", target.user)],
            headers: &[],
            expires: TOKEN_LIFETIME.as_secs(),
        },
        now,
    );
    Secret::new(format!("{host}:{}/?{}", target.port, query.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
