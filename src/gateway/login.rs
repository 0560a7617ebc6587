//! A client's login at the gateway: ask for the password, read the proof
//! in it, verify it, and hand back the person and their token.
//!
//! Nothing reaches the cluster before this has succeeded.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Expected, Gateway, GatewayRefusal, PersonPlace, Proven, StsError};
use crate::pg::frame::{HEADER_LEN, parse_header};
use crate::stream::ClientStream;

/// Why a gateway login failed. The client is told the kind (error.rs);
/// the log gets the rest.
#[derive(Debug, Error)]
pub enum GatewayError {
    #[error(transparent)]
    Refused(#[from] GatewayRefusal),
    #[error("too many refused proofs from {0} in the last minute")]
    SourceBlocked(IpAddr),
    #[error("{person:?} already has {limit} sessions through this gateway")]
    TooManySessions { person: String, limit: usize },
    #[error("the client did not send a password message: {0}")]
    NoPassword(&'static str),
    #[error("the client sent no password within {0:?}")]
    Timeout(Duration),
    #[error("the client left before sending its proof")]
    ClientGone,
}

impl GatewayError {
    /// The label of `rds_iam_proxy_gateway_refusals_total`: kinds, never
    /// people (no per-person label cardinality).
    pub fn reason(&self) -> &'static str {
        use super::proof::ProofError as P;
        match self {
            GatewayError::Refused(r) => match r {
                GatewayRefusal::Proof(P::NotAProof | P::TooLong | P::Layout) => "not_a_proof",
                GatewayRefusal::Proof(P::Expired | P::Future | P::TokenExpired) => "expired",
                GatewayRefusal::Proof(P::OtherUser { .. }) => "token_for_another_user",
                GatewayRefusal::Proof(P::OtherCredentials) => "token_of_other_credentials",
                GatewayRefusal::Proof(P::OtherEndpoint(_)) => "token_for_another_endpoint",
                GatewayRefusal::Proof(P::OtherStsRegion { .. }) => "proof_for_another_gateway",
                GatewayRefusal::Proof(_) => "malformed_proof",
                GatewayRefusal::Replay(super::Replay::Seen) => "replayed",
                GatewayRefusal::Replay(super::Replay::Full) => "replay_set_full",
                GatewayRefusal::Sts(StsError::Refused { .. }) => "sts_refused",
                GatewayRefusal::Sts(_) => "sts_unavailable",
                GatewayRefusal::Untrusted { .. } => "untrusted_caller",
                GatewayRefusal::NotYourUser { .. } => "not_your_user",
            },
            GatewayError::SourceBlocked(_) => "source_blocked",
            GatewayError::TooManySessions { .. } => "too_many_sessions_for_person",
            GatewayError::NoPassword(_) | GatewayError::Timeout(_) | GatewayError::ClientGone => {
                "no_proof"
            }
        }
    }

    /// A refusal that counts against the client's address (its proof was
    /// wrong), as opposed to a limit or STS being unreachable.
    fn counts_as_failed_proof(&self) -> bool {
        matches!(
            self,
            GatewayError::Refused(
                GatewayRefusal::Proof(_)
                    | GatewayRefusal::Replay(super::Replay::Seen)
                    | GatewayRefusal::Sts(StsError::Refused { .. })
                    | GatewayRefusal::Untrusted { .. }
                    | GatewayRefusal::NotYourUser { .. }
            ) | GatewayError::NoPassword(_)
        )
    }
}

/// Who logged in, and the place they hold among their sessions.
#[derive(Debug)]
pub struct Admitted {
    pub proven: Proven,
    pub place: PersonPlace,
}

impl Admitted {
    /// The person's token, their identity as the session and its audit
    /// records name it, and their place among their sessions.
    pub fn into_session(
        self,
    ) -> (
        crate::secret::Secret,
        crate::identity::Identity,
        PersonPlace,
    ) {
        let p = self.proven;
        tracing::info!(
            person = %p.person,
            arn = %p.caller.arn,
            access_key_id = %p.access_key_id,
            "gateway proof accepted"
        );
        let identity = crate::identity::Identity {
            source: crate::identity::SourceKind::Gateway,
            user_name: p.person,
            arn: p.caller.arn,
            account: p.caller.account,
            access_key_id: p.access_key_id,
            expires: None,
        };
        (p.token, identity, self.place)
    }
}

/// What the connection knows when it asks for the proof.
#[derive(Debug, Clone, Copy)]
pub struct Asking<'a> {
    pub source: Option<IpAddr>,
    pub db_user: &'a str,
    pub endpoint_host: &'a str,
    pub endpoint_port: u16,
    pub endpoint_region: &'a str,
    pub timeout: Duration,
}

/// Asks the client for its proof and verifies it.
pub async fn admit(
    gw: &Gateway,
    stream: &mut ClientStream,
    asking: Asking<'_>,
) -> Result<Admitted, GatewayError> {
    let now = Instant::now();
    if let Some(ip) = asking.source
        && gw
            .failures
            .blocked(ip, gw.max_failed_proofs_per_source, now)
    {
        return Err(GatewayError::SourceBlocked(ip));
    }
    let result: Result<Admitted, GatewayError> = async {
        let password = tokio::time::timeout(asking.timeout, read_password(stream))
            .await
            .map_err(|_| GatewayError::Timeout(asking.timeout))??;
        let want = Expected {
            gateway_id: &gw.id,
            sts_region: &gw.sts_region,
            endpoint_host: asking.endpoint_host,
            endpoint_port: asking.endpoint_port,
            endpoint_region: asking.endpoint_region,
            db_user: asking.db_user,
            now: SystemTime::now(),
        };
        let proven = gw.verifier.verify(&password, &want).await?;
        let place = gw
            .sessions
            .enter(&proven.person, gw.max_sessions_per_person)
            .ok_or_else(|| GatewayError::TooManySessions {
                person: proven.person.clone(),
                limit: gw.max_sessions_per_person,
            })?;
        Ok(Admitted { proven, place })
    }
    .await;
    if let (Err(e), Some(ip)) = (&result, asking.source)
        && e.counts_as_failed_proof()
    {
        gw.failures.refused(ip, Instant::now());
    }
    result
}

/// Sends AuthenticationCleartextPassword and reads the PasswordMessage,
/// at most a proof's length (the length is checked before anything is
/// read into memory). The bytes are wiped when dropped.
async fn read_password(
    stream: &mut ClientStream,
) -> Result<zeroize::Zeroizing<Vec<u8>>, GatewayError> {
    let gone = |_| GatewayError::ClientGone;
    let mut out = BytesMut::with_capacity(9);
    crate::pg::backend::write_auth_request(&mut out, crate::pg::backend::auth::CLEARTEXT_PASSWORD);
    stream.write_all(&out).await.map_err(gone)?;
    stream.flush().await.map_err(gone)?;
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header).await.map_err(gone)?;
    // The password is a C string: the proof plus its terminating NUL.
    let max = u32::try_from(super::proof::MAX_LEN + 1 + 4).unwrap_or(u32::MAX);
    let h = parse_header(&header, max)
        .map_err(|_| GatewayError::NoPassword("the message is longer than any proof"))?
        .ok_or(GatewayError::NoPassword("short header"))?;
    if h.tag != b'p' {
        return Err(GatewayError::NoPassword("expected a PasswordMessage"));
    }
    let mut body = zeroize::Zeroizing::new(vec![0u8; h.body_len()]);
    stream.read_exact(&mut body).await.map_err(gone)?;
    match body.iter().position(|&b| b == 0) {
        Some(end) if end + 1 == body.len() => {
            body.truncate(end);
            Ok(body)
        }
        _ => Err(GatewayError::NoPassword("the password is not one C string")),
    }
}
