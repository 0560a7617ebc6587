//! What a client is told when its connection fails.
//!
//! This is an allowlist: every connection error maps to a SQLSTATE and a
//! message that says what happened and what to do. Internal detail goes to
//! the log only: credential providers' and STS's error chains, role and
//! session ARNs, the workload's allowed users, file paths, certificate
//! contents. The messages below are written here, never copied from an
//! error that carries such detail (the one exception is the server's own
//! login refusal, which PostgreSQL sends to any client).

use thiserror::Error;

use crate::forward::ForwardError;
use crate::gateway::GatewayRefusal;
use crate::gateway::login::GatewayError;
use crate::handshake::HandshakeError;
use crate::identity::IdentityError;
use crate::peer::PeerRefusal;
use crate::pg::backend::{ErrorMessage, Severity};
use crate::upstream::UpstreamError;

/// Everything that can end a connection early.
#[derive(Debug, Error)]
pub enum ConnError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("the handshake took longer than {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("too many connections (limit {0})")]
    TooManyConnections(usize),
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("local peer refused: {0}")]
    Peer(PeerRefusal),
    #[error("replication connections are not supported")]
    Replication,
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("the upstream login took longer than {0:?}")]
    LoginTimeout(std::time::Duration),
    #[error("forwarding: {0}")]
    Forward(#[from] ForwardError),
    #[error("the audit log cannot be written (synchronous audit)")]
    AuditUnavailable,
    #[error("gateway: {0}")]
    Gateway(#[from] GatewayError),
}

/// SQLSTATEs the proxy uses.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CANNOT_CONNECT: &str = "08001";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const REJECTED_CONNECTION: &str = "08004";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
}

fn fatal(code: &'static str, message: impl Into<String>, hint: Option<String>) -> ErrorMessage {
    ErrorMessage {
        severity: Severity::Fatal,
        code: code.into(),
        message: message.into(),
        detail: None,
        hint,
    }
}

/// Context for the messages: names the client already knows.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    pub upstream: &'a str,
    pub profile: Option<&'a str>,
    /// AWS time minus local time, in seconds, when it is large enough to
    /// get tokens refused.
    pub clock_skew: Option<i64>,
}

impl ConnError {
    /// The ErrorResponse for the client, or `None` when the client cannot
    /// be told anything (it left, or TLS never came up).
    pub fn to_client(&self, names: Names<'_>) -> Option<ErrorMessage> {
        use sqlstate::*;
        let login = crate::identity::sso::login_command(names.profile);
        Some(match self {
            ConnError::Handshake(e) => match e {
                HandshakeError::ClientGone | HandshakeError::Io(_) | HandshakeError::Tls(_) => return None,
                HandshakeError::PlaintextRefused => fatal(
                    INVALID_AUTHORIZATION,
                    "this proxy accepts only TLS connections, except over loopback",
                    Some("connect with sslmode=require, or sslmode=verify-full with the proxy's CA as sslrootcert".into()),
                ),
                HandshakeError::DirectTlsWithoutAlpn => fatal(
                    PROTOCOL_VIOLATION,
                    "direct TLS connection without ALPN \"postgresql\"",
                    Some("use a client that sends ALPN (libpq 17 or later) or sslnegotiation=postgres".into()),
                ),
                HandshakeError::Startup(s) => fatal(PROTOCOL_VIOLATION, s.to_string(), None),
                other => fatal(PROTOCOL_VIOLATION, other.to_string(), None),
            },
            ConnError::HandshakeTimeout(_) => fatal(
                PROTOCOL_VIOLATION,
                "the client did not finish the startup in time",
                None,
            ),
            ConnError::TooManyConnections(limit) => fatal(
                TOO_MANY_CONNECTIONS,
                format!("sorry, too many clients already: rds-iam-proxy is at its limit of {limit} connections"),
                Some("try again later; the operator can raise --max-connections".into()),
            ),
            ConnError::Identity(e) => match e {
                IdentityError::Credentials(_) => fatal(
                    INVALID_AUTHORIZATION,
                    "rds-iam-proxy has no usable AWS credentials",
                    Some(format!("sign in again (for SSO: {login}), then reconnect; the proxy picks the new session up without a restart; its log says what the credential source answered")),
                ),
                IdentityError::CallerIdentity(_) | IdentityError::IncompleteCaller => fatal(
                    INVALID_AUTHORIZATION,
                    "rds-iam-proxy could not confirm your AWS identity with STS",
                    Some(format!("check the proxy's log; if your session expired, run: {login}")),
                ),
                IdentityError::Arn(_) => fatal(
                    INVALID_AUTHORIZATION,
                    "the proxy's AWS identity is not an assumed role or IAM user, so it cannot tell which person you are",
                    Some("sign in with an SSO profile or SAML; the proxy's log names the identity".into()),
                ),
                IdentityError::SsoExpired { .. } | IdentityError::SsoNotSignedIn { .. } => fatal(
                    INVALID_AUTHORIZATION,
                    e.to_string(),
                    Some("the proxy picks the new login up without a restart; connections already open continue".into()),
                ),
                IdentityError::Saml(s) => fatal(
                    INVALID_AUTHORIZATION,
                    format!("rds-iam-proxy cannot use its SAML identity: {}", s.client_text()),
                    Some("the proxy's log has the details".into()),
                ),
                IdentityError::NotIdentityCenter { .. } => fatal(
                    INVALID_AUTHORIZATION,
                    "the proxy's AWS session is not an IAM Identity Center session, so it does not say which person you are",
                    Some("sign in with an SSO profile, or start the proxy with --identity-source saml or workload; its log names the session".into()),
                ),
                IdentityError::NotYourUser { requested, person } => fatal(
                    INVALID_AUTHORIZATION,
                    format!("database user \"{requested}\" is not yours: this proxy acts for AWS user \"{person}\""),
                    Some(format!("connect as user \"{person}\"")),
                ),
                IdentityError::NotAllowed { requested, .. } => fatal(
                    INVALID_AUTHORIZATION,
                    format!("database user \"{requested}\" is not allowed for this workload identity"),
                    Some("connect as a database user the operator allowed with --allow-db-user (the proxy's log lists them)".into()),
                ),
            },
            ConnError::Peer(r) => fatal(
                INVALID_AUTHORIZATION,
                format!("rds-iam-proxy refused this local connection: {r}"),
                Some("each person runs their own proxy; its operator can allow others with --allow-local-user".into()),
            ),
            ConnError::Replication => fatal(
                FEATURE_NOT_SUPPORTED,
                "replication connections are not supported through rds-iam-proxy",
                None,
            ),
            ConnError::Upstream(e) => {
                let mut m = upstream_message(e, names.upstream)?;
                if let (Some(skew), UpstreamError::Refused(_)) = (names.clock_skew, e) {
                    let note = format!("{}: tokens signed here may be refused; fix the clock (NTP)", crate::identity::skew::describe(skew));
                    m.hint = Some(match m.hint.take() {
                        Some(h) => format!("{h}; {note}"),
                        None => note,
                    });
                }
                m
            }
            ConnError::LoginTimeout(t) => fatal(
                CANNOT_CONNECT,
                format!("logging in to {} took longer than {}s", names.upstream, t.as_secs()),
                Some("check that the cluster is available and reachable from this host".into()),
            ),
            ConnError::Forward(_) => return None,
            ConnError::AuditUnavailable => fatal(
                "58030",
                "rds-iam-proxy cannot write its audit log, and audits synchronously: sessions are refused until it can",
                Some("ask the operator to check the proxy's audit directory (disk full?)".into()),
            ),
            ConnError::Gateway(e) => gateway_message(e)?,
        })
    }
}

/// The FATAL sent when synchronous audit closes a session.
pub fn audit_fatal(why: &str) -> ErrorMessage {
    fatal(
        "58030",
        why,
        Some("ask the operator to check the proxy's audit directory (disk full?)".into()),
    )
}

/// The FATAL sent when the connection to the server is lost mid-session
/// (reset, cut, or closed with no word from the server).
pub fn upstream_lost() -> ErrorMessage {
    fatal(
        sqlstate::CONNECTION_FAILURE,
        "connection to the database server was lost",
        Some(
            "the statement in progress may or may not have completed; reconnect and check. \
             If it keeps happening, check the server and the network between rds-iam-proxy \
             and it (the proxy's log says more)"
                .into(),
        ),
    )
}

/// What a gateway's client is told: the kind of refusal and what to run,
/// never the proof's fields, the trusted roles or accounts, or STS's text.
fn gateway_message(e: &GatewayError) -> Option<ErrorMessage> {
    use crate::gateway::StsError;
    use sqlstate::*;
    let fresh = "get a fresh proof for this connection: PGPASSWORD=$(rds-iam-proxy gateway-password \
                 --upstream ENDPOINT --gateway-id GATEWAY), or connect through a local \
                 rds-iam-proxy --gateway; the gateway's log says why it refused";
    Some(match e {
        GatewayError::Refused(r) => match r {
            GatewayRefusal::Proof(crate::gateway::ProofError::NotAProof) => fatal(
                INVALID_PASSWORD,
                "this is a rds-iam-proxy gateway: the password must be a proof of your AWS identity",
                Some(fresh.into()),
            ),
            GatewayRefusal::Proof(crate::gateway::ProofError::OtherUser { want, .. }) => fatal(
                INVALID_PASSWORD,
                format!("the proof's database token is not for user \"{want}\""),
                Some(format!("make the proof for the user you connect as (--user {want})")),
            ),
            GatewayRefusal::Proof(
                crate::gateway::ProofError::Expired | crate::gateway::ProofError::TokenExpired,
            ) => fatal(
                INVALID_PASSWORD,
                "the proof of identity has expired (proofs last 15 minutes)",
                Some(fresh.into()),
            ),
            GatewayRefusal::Proof(_) => fatal(
                INVALID_PASSWORD,
                "the gateway refused the proof of identity",
                Some(fresh.into()),
            ),
            GatewayRefusal::Replay(crate::gateway::Replay::Seen) => fatal(
                INVALID_PASSWORD,
                "this proof of identity was used before: each proof logs in once",
                Some(fresh.into()),
            ),
            GatewayRefusal::Replay(crate::gateway::Replay::Full) => fatal(
                REJECTED_CONNECTION,
                "the gateway is taking more logins than it can check right now",
                Some("try again in a minute".into()),
            ),
            GatewayRefusal::Sts(StsError::Refused { .. }) => fatal(
                INVALID_PASSWORD,
                "AWS STS did not accept the proof of identity",
                Some(
                    "your AWS session may have ended (sign in again: aws sso login), or the \
                     proof was made for another gateway id; then get a fresh proof"
                        .into(),
                ),
            ),
            GatewayRefusal::Sts(_) => fatal(
                CANNOT_CONNECT,
                "the gateway could not check the proof of identity with AWS STS",
                Some("try again; if it persists, tell the gateway's operator".into()),
            ),
            GatewayRefusal::Untrusted { .. } => fatal(
                INVALID_AUTHORIZATION,
                "this gateway does not accept people from your AWS role or account",
                Some("sign in with a permission set of an account the gateway trusts (its operator knows which)".into()),
            ),
            GatewayRefusal::NotYourUser { requested, person } => fatal(
                INVALID_AUTHORIZATION,
                format!("database user \"{requested}\" is not yours: your AWS session is \"{person}\""),
                Some(format!("connect as user \"{person}\"")),
            ),
        },
        GatewayError::SourceBlocked(_) => fatal(
            REJECTED_CONNECTION,
            "too many refused proofs from your address in the last minute",
            Some("wait a minute, then connect with a fresh proof".into()),
        ),
        GatewayError::TooManySessions { limit, .. } => fatal(
            TOO_MANY_CONNECTIONS,
            format!("you already have {limit} sessions through this gateway, its limit per person"),
            Some("close sessions you no longer use, or ask the operator to raise --max-sessions-per-person".into()),
        ),
        GatewayError::NoPassword(_) => fatal(
            PROTOCOL_VIOLATION,
            "expected a password message carrying a proof of your AWS identity",
            Some(fresh.into()),
        ),
        GatewayError::Timeout(_) => fatal(
            PROTOCOL_VIOLATION,
            "the client did not send its proof in time",
            None,
        ),
        GatewayError::ClientGone => return None,
    })
}

fn upstream_message(e: &UpstreamError, upstream: &str) -> Option<ErrorMessage> {
    use sqlstate::*;
    let unreachable = |what: String| {
        fatal(
            CANNOT_CONNECT,
            what,
            Some(
                "check the endpoint name, DNS, security groups and any tunnel (--connect-to)"
                    .into(),
            ),
        )
    };
    Some(match e {
        UpstreamError::Resolve { .. } | UpstreamError::NoAddress { .. } => {
            unreachable(format!("cannot resolve the database endpoint {upstream}"))
        }
        UpstreamError::Connect { source, .. } => {
            unreachable(format!("cannot reach the database endpoint {upstream}: {source}"))
        }
        UpstreamError::ConnectTimeout { timeout, .. } => unreachable(format!(
            "connecting to the database endpoint {upstream} timed out after {}s",
            timeout.as_secs()
        )),
        UpstreamError::TlsRefused { .. } => fatal(
            CANNOT_CONNECT,
            format!("the database at {upstream} does not offer TLS; rds-iam-proxy never sends a token without it"),
            None,
        ),
        UpstreamError::Tls { .. } => fatal(
            CANNOT_CONNECT,
            format!("TLS verification of {upstream} failed"),
            Some("the server certificate must chain to the Amazon RDS CA bundle (or --upstream-ca) and name the endpoint; the proxy's log says why it did not".into()),
        ),
        UpstreamError::UnexpectedAuth { method } => fatal(
            INVALID_AUTHORIZATION,
            format!("the database asked for {method} authentication instead of an IAM token"),
            Some("grant the database user the rds_iam role: GRANT rds_iam TO <user>".into()),
        ),
        UpstreamError::Refused(server) => {
            // The server's SQLSTATE reaches the client unchanged when it is one.
            let code = if server.code.len() == 5 && server.code.bytes().all(|b| b.is_ascii_alphanumeric()) {
                server.code.clone().into()
            } else {
                INVALID_AUTHORIZATION.into()
            };
            let hint = server.hint.clone().or_else(|| {
                server.message.contains("PAM authentication failed").then(|| {
                    "the IAM token was refused: check that the database user exists and is granted rds_iam, \
                     that your IAM policy allows rds-db:connect on this user, and that this host's clock is right"
                        .to_owned()
                })
            });
            ErrorMessage {
                severity: Severity::Fatal,
                code,
                message: server.message.clone(),
                detail: server.detail.clone(),
                hint,
            }
        }
        UpstreamError::Protocol(_) | UpstreamError::Closed | UpstreamError::Io(_) => fatal(
            CONNECTION_FAILURE,
            format!("the connection to {upstream} failed during login"),
            Some("try again; if it persists, check the proxy's log".into()),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CredentialsUnavailable;
    use crate::identity::saml::SamlError;

    /// The class: an error that carries internal detail (an error chain,
    /// an ARN, a path, the allow-list, a certificate) must not hand it to
    /// the client. Every such variant is built with marked detail, and no
    /// marker may reach the message, detail or hint.
    #[test]
    fn internal_detail_never_reaches_the_client() {
        const MARK: &str = "SECRETMARK";
        let arn = format!("arn:aws:iam::123456789012:role/{MARK}");
        let io = || std::io::Error::other(format!("chain: {MARK}"));
        let addr: std::net::SocketAddr = "10.1.2.3:5432".parse().unwrap();
        let cases: Vec<ConnError> = vec![
            IdentityError::Credentials(CredentialsUnavailable {
                message: format!("the SSO provider said: {MARK}"),
            })
            .into(),
            IdentityError::CallerIdentity(format!("AccessDenied for {arn}")).into(),
            IdentityError::Arn(crate::identity::ArnError::Unsupported(arn.clone())).into(),
            IdentityError::NotIdentityCenter { arn: arn.clone() }.into(),
            IdentityError::NotAllowed {
                requested: "mallory".into(),
                allowed: vec![format!("{MARK}_app")],
            }
            .into(),
            IdentityError::Saml(SamlError::Read {
                from: format!("/home/{MARK}/assertion"),
                reason: MARK.into(),
            })
            .into(),
            IdentityError::Saml(SamlError::Xml(MARK.into())).into(),
            IdentityError::Saml(SamlError::Expired(MARK.into())).into(),
            IdentityError::Saml(SamlError::SeveralRoles(vec![arn.clone(), arn.clone()])).into(),
            IdentityError::Saml(SamlError::RoleNotOffered(arn.clone())).into(),
            IdentityError::Saml(SamlError::Sts(format!("{arn} is not authorized"))).into(),
            UpstreamError::Resolve {
                host: format!("{MARK}.internal"),
                source: io(),
            }
            .into(),
            UpstreamError::NoAddress {
                host: format!("{MARK}.internal"),
            }
            .into(),
            UpstreamError::Tls {
                host: "x".into(),
                source: io(),
            }
            .into(),
            UpstreamError::Protocol(MARK.into()).into(),
            UpstreamError::Io(io()).into(),
            UpstreamError::ConnectTimeout {
                addr,
                timeout: std::time::Duration::from_secs(1),
            }
            .into(),
        ];
        let names = Names {
            upstream: "db.example:5432",
            profile: Some("dev"),
            clock_skew: None,
        };
        for e in cases {
            let m = e.to_client(names).unwrap();
            let told = format!("{} | {:?} | {:?}", m.message, m.detail, m.hint);
            assert!(!told.contains(MARK), "{e:?} tells the client: {told}");
            assert!(!told.contains("123456789012"), "{e:?}: {told}");
            assert!(!told.contains("10.1.2.3"), "{e:?}: {told}");
            // The log keeps the detail.
            assert!(
                e.to_string().contains(MARK)
                    || e.to_string().contains("123456789012")
                    || e.to_string().contains("10.1.2.3"),
                "{e:?} lost its detail for the log: {e}"
            );
        }
    }

    #[test]
    fn mismatch_names_both_users() {
        let e = ConnError::Identity(IdentityError::NotYourUser {
            requested: "bob".into(),
            person: "arianna".into(),
        });
        let m = e
            .to_client(Names {
                upstream: "x:5432",
                profile: None,
                clock_skew: None,
            })
            .unwrap();
        assert_eq!(m.code, "28000");
        assert!(m.message.contains("\"bob\"") && m.message.contains("\"arianna\""));
    }
}

/// An error and its causes on one line, for a person at a terminal: each
/// cause after the first is added unless the text so far already says it
/// (many messages carry their cause's text, `cannot read X: <io error>`,
/// and the chain would print it twice).
pub fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod chain_tests {
    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = crate::audit::verify::VerifyError::Read {
            file: "/tmp/x".into(),
            source: io,
        };
        let any = anyhow::Error::from(e).context("checking the trail");
        let text = super::chain_text(any.as_ref());
        assert_eq!(
            text,
            "checking the trail: cannot read /tmp/x: No such file or directory"
        );
    }
}
