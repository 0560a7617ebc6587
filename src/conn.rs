//! One client connection, start to end. Reads like the lifecycle:
//! negotiate -> startup -> identity -> token -> upstream -> forward.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::{Instrument, info, info_span, warn};

use crate::app::AppContext;
use crate::error::{ConnError, Names};
use crate::handshake::{self, ClientRequest, Negotiated};
use crate::identity::Identity;
use crate::pg::backend;
use crate::pg::startup::StartupMessage;
use crate::stream::{ClientStream, Socket};
use crate::token::TokenTarget;
use crate::upstream::{self, Upstream};

/// Who is on the other end of an accepted socket.
#[derive(Debug, Clone)]
pub struct Peer {
    /// `ip:port`, or `unix` for a unix socket.
    pub addr: String,
    /// Plaintext startup is allowed (loopback and unix listeners only).
    pub plaintext_ok: bool,
}

/// Serves one accepted socket to the end.
pub async fn serve(ctx: Arc<AppContext>, socket: Socket, peer: Peer) {
    let id = ctx.next_connection_id();
    let span = info_span!("conn", id, peer = %peer.addr);
    run(ctx, socket, peer, id).instrument(span).await
}

async fn run(ctx: Arc<AppContext>, socket: Socket, peer: Peer, id: u64) {
    let started = Instant::now();
    let negotiate = handshake::negotiate(socket, &ctx.server_tls, peer.plaintext_ok);
    let Negotiated {
        mut stream,
        request,
    } = match tokio::time::timeout(ctx.config.handshake_timeout, negotiate).await {
        Ok(Ok(n)) => n,
        Ok(Err(failed)) => {
            let e = ConnError::Handshake(failed.error);
            refuse(&ctx, (id, &peer, None), failed.stream, e).await;
            return;
        }
        Err(_) => {
            let e = ConnError::HandshakeTimeout(ctx.config.handshake_timeout);
            refuse(&ctx, (id, &peer, None), None, e).await;
            return;
        }
    };
    let startup = match request {
        ClientRequest::Cancel(key) => {
            match ctx.cancels.cancel(&key).await {
                Ok(true) => info!(pid = key.pid, "cancel request forwarded"),
                Ok(false) => warn!(pid = key.pid, "cancel request with an unknown key ignored"),
                Err(e) => warn!(pid = key.pid, error = %e, "cancel request could not be forwarded"),
            }
            return;
        }
        ClientRequest::Startup(s) => s,
    };
    let user = startup.user().to_owned();
    let database = startup.database().to_owned();
    let span = info_span!("session", user = %user, database = %database);
    async move {
        let (upstream, identity) = match open_session(&ctx, &startup).await {
            Ok(s) => s,
            Err(e) => {
                let who = (id, &peer, Some((user.as_str(), database.as_str())));
                refuse(&ctx, who, Some(stream), e).await;
                return;
            }
        };
        let Upstream {
            stream: mut up,
            addr,
            backend_key,
            minor,
            greeting,
            tls: up_tls,
        } = upstream;

        // Tell the client what it needs: negotiation, greeting, our cancel key.
        let mut out = BytesMut::with_capacity(greeting.len() + 64);
        if startup.requested.minor > minor || !startup.protocol_options.is_empty() {
            backend::write_negotiate_version(&mut out, minor, &startup.protocol_options);
        }
        let (before_ready, ready) = greeting.split_at(greeting.len() - 6);
        out.extend_from_slice(before_ready);
        let backend_pid = backend_key.as_ref().map(|k| k.pid as i32);
        let _registration = backend_key.map(|key| {
            let (proxy_key, reg) = ctx.cancels.register(ctx.endpoint.clone(), addr, key, minor);
            backend::write_backend_key(&mut out, proxy_key.pid, &proxy_key.secret);
            reg
        });
        out.extend_from_slice(ready);
        let start = crate::audit::event::SessionStart {
            conn: id,
            person: identity.user_name.clone(),
            role_arn: identity.arn.clone(),
            account: identity.account.clone(),
            access_key_id: identity.access_key_id.clone(),
            client_addr: peer.addr.clone(),
            client_tls: stream.tls_summary(),
            upstream: ctx.upstream_name.clone(),
            upstream_addr: addr.to_string(),
            upstream_tls: up_tls.clone(),
            db_user: user.clone(),
            database: database.clone(),
            application_name: startup.param("application_name").unwrap_or("").to_owned(),
            backend_pid,
            ..Default::default()
        };
        if !ctx
            .audit
            .record(crate::audit::record::session_start(start))
            .await
        {
            let who = (id, &peer, Some((user.as_str(), database.as_str())));
            refuse(&ctx, who, Some(stream), ConnError::AuditUnavailable).await;
            return;
        }
        if let Err(e) = async {
            stream.write_all(&out).await?;
            stream.flush().await
        }
        .await
        {
            info!(error = %e, "client left before the session started");
            return;
        }
        info!(
            person = %identity.user_name,
            upstream = %addr,
            client_tls = %stream.tls_summary().as_deref().unwrap_or("none"),
            upstream_tls = %up_tls,
            login_ms = started.elapsed().as_millis() as u64,
            "session started"
        );

        let result = if crate::audit::tap::wanted(&ctx.audit) {
            let mut tap = crate::audit::SessionTap::new(id, ctx.audit.clone());
            crate::gate::forward_tapped(&mut stream, &mut up, &mut tap).await
        } else {
            crate::forward::forward(&mut stream, &mut up).await
        };
        ctx.audit
            .record(crate::audit::record::session_end(id, started, &result))
            .await;
        if let Err((_, crate::forward::ForwardError::Audit(why))) = &result {
            let mut out = BytesMut::new();
            backend::write_error(&mut out, &crate::error::audit_fatal(why));
            let _ = stream.write_all(&out).await;
            let _ = stream.shutdown().await;
        }
        match result {
            Ok((traffic, ending)) => info!(
                ?ending,
                bytes_in = traffic.client_to_upstream,
                bytes_out = traffic.upstream_to_client,
                seconds = started.elapsed().as_secs(),
                "session ended"
            ),
            Err((traffic, e)) => info!(
                error = %e,
                bytes_in = traffic.client_to_upstream,
                bytes_out = traffic.upstream_to_client,
                seconds = started.elapsed().as_secs(),
                "session ended with an error"
            ),
        }
    }
    .instrument(span)
    .await
}

/// Identity check, token, upstream login.
async fn open_session(
    ctx: &AppContext,
    startup: &StartupMessage,
) -> Result<(Upstream, Arc<Identity>), ConnError> {
    if startup.param("replication").is_some_and(|v| {
        !matches!(
            v.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    }) {
        return Err(ConnError::Replication);
    }
    let (creds, identity) = ctx.identity.current().await?;
    if startup.user() != identity.user_name {
        return Err(ConnError::NotYourUser {
            requested: startup.user().to_owned(),
            person: identity.user_name.clone(),
        });
    }
    let token = ctx.signer.sign(
        &creds,
        &TokenTarget {
            host: &ctx.endpoint.host,
            port: ctx.endpoint.port,
            region: &ctx.region,
            user: startup.user(),
        },
    );
    let login = upstream::login(&ctx.endpoint, &startup.params, startup.negotiated(), &token);
    let upstream = tokio::time::timeout(ctx.config.login_timeout, login)
        .await
        .map_err(|_| ConnError::LoginTimeout(ctx.config.login_timeout))??;
    Ok((upstream, identity))
}

/// Who was refused: connection id, peer, and the user and database asked
/// for (once the startup was read).
type Who<'a> = (u64, &'a Peer, Option<(&'a str, &'a str)>);

/// Logs and audits the failure and, where possible, tells the client why.
async fn refuse(ctx: &AppContext, who: Who<'_>, stream: Option<ClientStream>, error: ConnError) {
    let names = Names {
        upstream: &ctx.upstream_name,
        profile: ctx.identity.profile(),
    };
    let message = error.to_client(names);
    match &message {
        Some(m) => warn!(error = %error, sqlstate = %m.code, "connection refused"),
        None => info!(error = %error, "connection closed during the handshake"),
    }
    if let Some(m) = &message {
        let (id, peer, user_db) = who;
        let event = crate::audit::record::denial(id, &peer.addr, user_db, &error, Some(&m.code));
        ctx.audit.record(event).await;
    }
    if let (Some(mut stream), Some(m)) = (stream, message) {
        let mut out = BytesMut::new();
        backend::write_error(&mut out, &m);
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
        let _ = stream.shutdown().await;
    }
}
