//! Builders for the session-level records, so the connection code only
//! says what happened.

use std::time::{Instant, SystemTime};

use super::event::{Denial, Event, SessionEnd, SessionStart};
use crate::error::ConnError;
use crate::forward::{Ending, ForwardError, Traffic};
use crate::gateway::login::GatewayError;
use crate::handshake::HandshakeError;
use crate::identity::IdentityError;

/// A refused connection. `user`/`database` are what the client asked for.
pub fn denial(
    conn: u64,
    client_addr: &str,
    user_db: Option<(&str, &str)>,
    error: &ConnError,
    sqlstate: Option<&str>,
) -> Event {
    let kind = match error {
        ConnError::Handshake(HandshakeError::PlaintextRefused) => "refused_peer",
        ConnError::Handshake(_) | ConnError::HandshakeTimeout(_) => "protocol_violation",
        ConnError::Identity(IdentityError::Credentials(_))
        | ConnError::Identity(IdentityError::SsoExpired { .. })
        | ConnError::Identity(IdentityError::SsoNotSignedIn { .. }) => "no_credentials",
        ConnError::Identity(
            IdentityError::NotYourUser { .. } | IdentityError::NotAllowed { .. },
        ) => "identity_mismatch",
        ConnError::Identity(_) => "identity_unconfirmed",
        ConnError::Peer(_) => "refused_peer",
        ConnError::TooManyConnections(_) => "too_many_connections",
        ConnError::Replication => "unsupported",
        ConnError::Upstream(crate::upstream::UpstreamError::Refused(_)) => "authentication_failed",
        ConnError::Upstream(_) | ConnError::LoginTimeout(_) => "upstream_unavailable",
        ConnError::AuditUnavailable => "audit_unavailable",
        ConnError::Forward(_) => "protocol_violation",
        ConnError::Gateway(
            GatewayError::TooManySessions { .. } | GatewayError::SourceBlocked(_),
        ) => "too_many_connections",
        ConnError::Gateway(GatewayError::Refused(
            crate::gateway::GatewayRefusal::NotYourUser { .. },
        )) => "identity_mismatch",
        ConnError::Gateway(_) => "gateway_proof_refused",
    };
    Event::Denial(Box::new(Denial {
        conn,
        time: Some(SystemTime::now()),
        client_addr: client_addr.to_owned(),
        db_user: user_db.map(|(u, _)| u.to_owned()),
        database: user_db.map(|(_, d)| d.to_owned()),
        kind,
        sqlstate: sqlstate.map(str::to_owned),
        reason: error.to_string(),
    }))
}

/// Boxes a session start.
pub fn session_start(start: SessionStart) -> Event {
    Event::SessionStart(Box::new(SessionStart {
        time: Some(SystemTime::now()),
        ..start
    }))
}

/// A session the proxy ended itself (shutdown 57P01, idle 57P05).
pub fn session_ended_by_proxy(conn: u64, started: Instant, sqlstate: &str, message: &str) -> Event {
    Event::SessionEnd(Box::new(SessionEnd {
        conn,
        time: SystemTime::now(),
        duration_ms: started.elapsed().as_millis() as u64,
        bytes_from_client: 0,
        bytes_to_client: 0,
        closed_by: "proxy",
        reason: format!("{sqlstate} {message}"),
    }))
}

/// The end of a forwarded session.
pub fn session_end(
    conn: u64,
    started: Instant,
    result: &Result<(Traffic, Ending), (Traffic, ForwardError)>,
) -> Event {
    let (traffic, closed_by, reason) = match result {
        Ok((t, Ending::ClientTerminated)) => (t, "client", "terminate".to_owned()),
        Ok((t, Ending::ClientClosed)) => (t, "client", "closed without terminate".to_owned()),
        Ok((t, Ending::UpstreamClosed)) => (t, "upstream", "server closed".to_owned()),
        Ok((t, Ending::UpstreamLost)) => (
            t,
            "upstream",
            "connection to the server lost (no last message from it)".to_owned(),
        ),
        Ok((t, Ending::Stopped)) => (t, "proxy", "stopped".to_owned()),
        Err((t, e @ ForwardError::Io { side, .. })) => (
            t,
            match side {
                crate::forward::Side::Client => "client",
                crate::forward::Side::Upstream => "upstream",
            },
            e.to_string(),
        ),
        Err((t, e)) => (t, "proxy", e.to_string()),
    };
    Event::SessionEnd(Box::new(SessionEnd {
        conn,
        time: SystemTime::now(),
        duration_ms: started.elapsed().as_millis() as u64,
        bytes_from_client: traffic.client_to_upstream,
        bytes_to_client: traffic.upstream_to_client,
        closed_by,
        reason,
    }))
}
