//! One client connection, start to end. Reads like the lifecycle:
//! negotiate -> startup -> identity -> token -> upstream -> forward.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::{Instrument, info, info_span, warn};

use crate::activity::{Activity, Idle};
use crate::admission::HandshakePlace;
use crate::app::{AppContext, EndpointContext, EndpointTls, Phase};
use crate::config::Config;
use crate::error::{ConnError, Names, sqlstate};
use crate::gateway::PersonPlace;
use crate::gateway::login::{self, GatewayError};
use crate::handshake::{self, ClientRequest, Negotiated};
use crate::identity::Identity;
use crate::pg::backend;
use crate::pg::backend::{ErrorMessage, Severity};
use crate::pg::startup::StartupMessage;
use crate::stream::{ClientStream, Socket};
use crate::token::TokenTarget;
use crate::upstream::{self, Upstream};

/// The longest a goodbye (an error, a Terminate) may take to write to a
/// peer that does not read.
const FINAL_WRITE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a session the proxy ends (shutdown, idle) may take to reach a
/// message boundary in both directions.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Who is on the other end of an accepted socket.
#[derive(Debug, Clone)]
pub struct Peer {
    /// `ip:port`, or `unix` for a unix socket.
    pub addr: String,
    /// Plaintext startup is allowed (loopback and unix listeners only).
    pub plaintext_ok: bool,
    /// What identifies the local OS user behind the connection.
    pub local: crate::peer::LocalPeer,
}

/// Serves one accepted socket to the end; `place` holds its place among
/// the handshakes until its startup packet is read.
pub async fn serve(
    ctx: Arc<AppContext>,
    ep: Arc<EndpointContext>,
    socket: Socket,
    peer: Peer,
    place: HandshakePlace,
) {
    let id = ctx.next_connection_id();
    let span = info_span!("conn", id, endpoint = %ep.name, peer = %peer.addr);
    async move {
        // Who is behind a local connection is judged now, before any of
        // its bytes is read, while the client's socket is live. A gateway
        // judges every client by its proof instead.
        let verdict = if ctx.gateway.is_some() {
            Ok(())
        } else {
            crate::peer::check(&ctx.peers, &peer.local).await
        };
        run(ctx, ep, socket, peer, verdict, id, place).await
    }
    .instrument(span)
    .await
}

/// TLS negotiation and the startup packet, within the handshake timeout.
/// Failures are answered and counted here.
async fn negotiate(
    ctx: &AppContext,
    ep: &EndpointContext,
    config: &Config,
    live: &EndpointTls,
    socket: Socket,
    peer: &Peer,
    id: u64,
) -> Option<(ClientStream, ClientRequest)> {
    // A gateway's clients send their proof as a password: TLS only.
    let plaintext_ok = peer.plaintext_ok && ctx.gateway.is_none();
    let negotiate = handshake::negotiate(socket, &live.server_tls, plaintext_ok);
    tokio::pin!(negotiate);
    let who = (id, peer, None);
    tokio::select! {
        r = &mut negotiate => match r {
            Ok(Negotiated { stream, request }) => Some((stream, request)),
            Err(failed) => {
                let e = ConnError::Handshake(failed.error);
                refuse(ctx, ep, who, failed.stream, e).await;
                None
            }
        },
        _ = tokio::time::sleep(config.live.handshake_timeout) => {
            // The socket lives in `negotiate` until this returns: counted
            // and logged before the client sees the close.
            let e = ConnError::HandshakeTimeout(config.live.handshake_timeout);
            refuse(ctx, ep, who, None, e).await;
            None
        }
    }
}

async fn forward_cancel(ctx: &AppContext, key: &crate::pg::startup::CancelKey) {
    use crate::throttle::Throttle;
    use std::time::Duration;
    // Anyone who can connect can send cancel requests with made-up keys.
    static UNKNOWN: Throttle = Throttle::new(Duration::from_secs(10));
    static FAILED: Throttle = Throttle::new(Duration::from_secs(10));
    match ctx.cancels.cancel(key).await {
        Ok(true) => {
            ctx.metrics.connection("cancel");
            info!(pid = key.pid, "cancel request forwarded")
        }
        // A key another instance of this gateway issued: send it there.
        // That instance never sends it on (the key names it), so a cancel
        // request crosses at most one hop.
        Ok(false) if let Some(peer) = ctx.gateway.as_ref().and_then(|g| g.peer_for(key)) => {
            match crate::cancel::send(peer, None, key).await {
                Ok(()) => {
                    ctx.metrics.connection("cancel_to_peer");
                    info!(pid = key.pid, peer = %peer.name(), "cancel request sent to the gateway instance that issued its key")
                }
                Err(e) => {
                    ctx.metrics.connection("cancel_failed");
                    if let Some(more) = FAILED.admit(Instant::now()) {
                        warn!(pid = key.pid, peer = %peer.name(), error = %e, not_logged_since = more, "cancel request could not be sent to a peer gateway")
                    }
                }
            }
        }
        Ok(false) => {
            ctx.metrics.connection("cancel_unknown_key");
            if let Some(more) = UNKNOWN.admit(Instant::now()) {
                warn!(
                    pid = key.pid,
                    not_logged_since = more,
                    "cancel request with an unknown key ignored"
                )
            }
        }
        Err(e) => {
            ctx.metrics.connection("cancel_failed");
            if let Some(more) = FAILED.admit(Instant::now()) {
                warn!(pid = key.pid, error = %e, not_logged_since = more, "cancel request could not be forwarded")
            }
        }
    }
}

async fn run(
    ctx: Arc<AppContext>,
    ep: Arc<EndpointContext>,
    socket: Socket,
    peer: Peer,
    verdict: Result<(), crate::peer::PeerRefusal>,
    id: u64,
    place: HandshakePlace,
) {
    let started = Instant::now();
    // One snapshot for the whole connection: a reload never changes a
    // session under way.
    let config = ctx.config.load_full();
    let live = ep.live();
    let negotiated = negotiate(&ctx, &ep, &config, &live, socket, &peer, id).await;
    drop(place);
    let Some((mut stream, request)) = negotiated else {
        return;
    };
    if let Err(refusal) = verdict {
        if let ClientRequest::Cancel(_) = request {
            warn!(error = %refusal, "cancel request from a refused local user ignored");
            return;
        }
        refuse(
            &ctx,
            &ep,
            (id, &peer, None),
            Some(stream),
            ConnError::Peer(refusal),
        )
        .await;
        return;
    }
    let startup = match request {
        ClientRequest::Cancel(key) => {
            forward_cancel(&ctx, &key).await;
            return;
        }
        ClientRequest::Startup(s) => s,
    };
    // A session slot, held to the end of the session.
    let Some(_slot) = ctx.metrics.try_acquire(config.live.max_connections) else {
        let who = (id, &peer, Some((startup.user(), startup.database())));
        let e = ConnError::TooManyConnections(config.live.max_connections);
        refuse(&ctx, &ep, who, Some(stream), e).await;
        return;
    };
    let user = startup.user().to_owned();
    let database = startup.database().to_owned();
    let span = info_span!("session", user = %user, database = %database);
    async move {
        let opened = open_session(
            &ctx,
            &ep,
            &live,
            &config,
            &startup,
            id,
            Some((&mut stream, &peer)),
        )
        .await;
        let (upstream, identity, _person_place) = match opened {
            Ok(s) => s,
            Err(e) => {
                let who = (id, &peer, Some((user.as_str(), database.as_str())));
                refuse(&ctx, &ep, who, Some(stream), e).await;
                return;
            }
        };
        let Upstream {
            stream: mut up,
            addr,
            backend_start,
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
        let (before_ready, ready) =
            greeting.split_at(greeting.len() - upstream::READY_FOR_QUERY_LEN);
        out.extend_from_slice(before_ready);
        let backend_pid = backend_key.as_ref().map(|k| k.pid as i32);
        let _registration = backend_key.map(|key| {
            let (proxy_key, reg) = ctx
                .cancels
                .register(live.endpoint.clone(), addr, key, minor);
            backend::write_backend_key(&mut out, proxy_key.pid, &proxy_key.secret);
            reg
        });
        out.extend_from_slice(ready);
        let start = crate::audit::event::SessionStart {
            conn: id,
            identity_source: identity.source.key().to_owned(),
            person: identity.user_name.clone(),
            role_arn: identity.arn.clone(),
            account: identity.account.clone(),
            access_key_id: identity.access_key_id.clone(),
            client_addr: peer.addr.clone(),
            client_tls: stream.tls_summary(),
            upstream: ep.upstream_name.clone(),
            upstream_addr: addr.to_string(),
            upstream_tls: up_tls.clone(),
            db_user: user.clone(),
            database: database.clone(),
            application_name: startup.param("application_name").unwrap_or("").to_owned(),
            backend_pid,
            upstream_local_addr: backend_start.local,
            backend_start_window: Some((backend_start.after, backend_start.before)),
            session_id: backend_pid.and_then(|pid| backend_start.session_id(pid)),
            gateway_id: ctx.gateway.as_ref().map(|g| g.id.clone()),
            ..Default::default()
        };
        if !ctx
            .audit
            .record(crate::audit::record::session_start(start))
            .await
        {
            let who = (id, &peer, Some((user.as_str(), database.as_str())));
            refuse(&ctx, &ep, who, Some(stream), ConnError::AuditUnavailable).await;
            return;
        }
        if let Err(e) = async {
            stream.write_all(&out).await?;
            stream.flush().await
        }
        .await
        {
            ctx.metrics.connection("client_gone");
            info!(error = %e, "client left before the session started");
            return;
        }
        ctx.metrics.connection("session");
        // Listed on the status page until the session ends.
        let listed = ctx.sessions.open(crate::sessions::SessionInfo {
            conn: id,
            endpoint: ep.name.clone(),
            person: identity.user_name.clone(),
            db_user: user.clone(),
            database: database.clone(),
            application_name: startup.param("application_name").unwrap_or("").to_owned(),
            client_addr: peer.addr.clone(),
            client_tls: stream.tls_summary(),
            started: std::time::SystemTime::now(),
        });
        let counters = &listed.session.counters;
        info!(
            person = %identity.user_name,
            upstream = %addr,
            client_tls = %stream.tls_summary().as_deref().unwrap_or("none"),
            upstream_tls = %up_tls,
            login_ms = started.elapsed().as_millis() as u64,
            "session started"
        );

        // The session runs until it ends, the process ends it (57P01), or
        // it is idle too long (57P05). Activity marks traffic with one
        // relaxed store per read or write, never per message.
        let idle = Idle::default();
        let mut watched = Activity::new(&mut up, &idle);
        let mut phase = ctx.phase.clone();
        let mut tap = crate::audit::tap::wanted(&ctx.audit).then(|| {
            let mut tap = crate::audit::SessionTap::new(id, ctx.audit.clone());
            tap.greeting(&greeting);
            // The lookup logs in again as the session did: a gateway holds
            // no credentials of the person's to do that with.
            if ctx.audit.sink.is_some() && ctx.gateway.is_none() {
                tap.name_functions(function_names(&ctx, &ep, &live, &config, &startup, id));
            }
            tap
        });
        let stop = crate::forward::Stop::default();
        let (ended, cut) = {
            let mut pump = std::pin::pin!(async {
                match tap.as_mut() {
                    // Audit or the password guard: the inspecting pump.
                    Some(tap) => {
                        crate::gate::forward_tapped(&mut stream, &mut watched, tap, &stop, counters)
                            .await
                    }
                    None => {
                        crate::forward::forward(&mut stream, &mut watched, &stop, counters).await
                    }
                }
            });
            let why = tokio::select! {
                r = &mut pump => Ok(r),
                _ = phase.wait_for(|p| *p == Phase::Terminating) => Err((
                    sqlstate::ADMIN_SHUTDOWN,
                    "terminating connection due to administrator command",
                    "rds-iam-proxy is shutting down",
                )),
                _ = idle.expired(config.live.idle_timeout) => Err((
                    sqlstate::IDLE_SESSION_TIMEOUT,
                    "terminating connection due to idle-session timeout",
                    "rds-iam-proxy ends sessions with no traffic for its --idle-timeout",
                )),
            };
            // The proxy ends the session: at the next message boundary in each
            // direction, so that the FATAL and the Terminate are whole messages
            // of their own. A peer that stays inside a message past STOP_GRACE
            // is cut off with neither.
            match why {
                Ok(r) => (Ok(r), false),
                Err(why) => {
                    stop.request();
                    match tokio::time::timeout(STOP_GRACE, &mut pump).await {
                        Ok(Ok((_, crate::forward::Ending::Stopped))) => (Err(why), false),
                        // It ended on its own meanwhile.
                        Ok(r) => (Ok(r), false),
                        Err(_) => (Err(why), true),
                    }
                }
            }
        };
        let end_record = match &ended {
            Ok(result) => crate::audit::record::session_end(id, started, result),
            Err((code, message, _)) => {
                crate::audit::record::session_ended_by_proxy(id, started, code, message)
            }
        };
        ctx.audit.record(end_record).await;
        // A session that ended by itself: the client is told why when the
        // proxy knows something it does not (an audit failure, a lost
        // server) and its side is between messages (see Pipe: a short
        // message the server left unfinished never reached it).
        if let Ok(result) = &ended {
            use crate::forward::{Ending, ForwardError, Side};
            let last_word = match result {
                Err((_, ForwardError::Audit(why))) => Some(crate::error::audit_fatal(why)),
                Ok((_, Ending::UpstreamLost))
                | Err((
                    _,
                    ForwardError::Io {
                        side: Side::Upstream,
                        ..
                    },
                )) => {
                    ctx.metrics.upstream_lost();
                    Some(crate::error::upstream_lost())
                }
                _ => None,
            };
            let last_word = last_word.filter(|_| stop.client_whole());
            let _ = tokio::time::timeout(FINAL_WRITE, async {
                if let Some(m) = last_word {
                    let mut out = BytesMut::new();
                    backend::write_error(&mut out, &m);
                    let _ = stream.write_all(&out).await;
                    let _ = stream.flush().await;
                }
                let _ = stream.shutdown().await;
            })
            .await;
        }
        match ended {
            Ok(Ok((traffic, crate::forward::Ending::UpstreamLost))) => {
                ctx.metrics
                    .session_bytes(traffic.client_to_upstream, traffic.upstream_to_client);
                warn!(
                    bytes_in = traffic.client_to_upstream,
                    bytes_out = traffic.upstream_to_client,
                    seconds = started.elapsed().as_secs(),
                    client_told = stop.client_whole(),
                    "session ended: connection to the server lost (it closed with no message \
                     of the server's)"
                )
            }
            Ok(Ok((traffic, ending))) => {
                ctx.metrics
                    .session_bytes(traffic.client_to_upstream, traffic.upstream_to_client);
                info!(
                    ?ending,
                    bytes_in = traffic.client_to_upstream,
                    bytes_out = traffic.upstream_to_client,
                    seconds = started.elapsed().as_secs(),
                    "session ended"
                )
            }
            Ok(Err((traffic, e))) => {
                ctx.metrics
                    .session_bytes(traffic.client_to_upstream, traffic.upstream_to_client);
                info!(
                    error = %e,
                    bytes_in = traffic.client_to_upstream,
                    bytes_out = traffic.upstream_to_client,
                    seconds = started.elapsed().as_secs(),
                    "session ended with an error"
                )
            }
            Err((code, message, detail)) => {
                // Between messages, the FATAL (the one PostgreSQL sends in
                // the same case) and the Terminate are whole messages. A
                // side still inside a message gets neither: the server
                // drops a half message at end of stream, unrun; a client
                // would read the FATAL as part of a server message.
                let client_whole = !cut || stop.client_whole();
                if cut {
                    warn!(
                        sqlstate = code,
                        seconds = started.elapsed().as_secs(),
                        side = if client_whole { "client" } else { "server" },
                        "session cut by the proxy inside a message \
                         (no message boundary within {STOP_GRACE:?}): {message}"
                    );
                }
                let mut out = BytesMut::new();
                backend::write_error(
                    &mut out,
                    &ErrorMessage {
                        severity: Severity::Fatal,
                        code: code.into(),
                        message: message.into(),
                        detail: Some(detail.into()),
                        hint: None,
                    },
                );
                // A client or server that stopped reading cannot hold the
                // session (and so the shutdown) past FINAL_WRITE.
                let _ = tokio::time::timeout(FINAL_WRITE, async {
                    if client_whole {
                        let _ = stream.write_all(&out).await;
                        let _ = stream.flush().await;
                    }
                    let _ = stream.shutdown().await;
                })
                .await;
                let _ = tokio::time::timeout(FINAL_WRITE, async {
                    if !cut {
                        let _ = up.write_all(&[b'X', 0, 0, 0, 4]).await;
                    }
                    let _ = up.shutdown().await;
                })
                .await;
                info!(
                    sqlstate = code,
                    seconds = started.elapsed().as_secs(),
                    "session ended by the proxy: {message}"
                );
            }
        }
    }
    .instrument(span)
    .await
}

/// The lookups that name the session's FunctionCalls
/// ([`crate::audit::functions`]): a task, counted among the connection
/// tasks, that logs in as the session did (identity check, fresh token)
/// at the first call.
fn function_names(
    ctx: &Arc<AppContext>,
    ep: &Arc<EndpointContext>,
    live: &Arc<EndpointTls>,
    config: &Arc<Config>,
    startup: &StartupMessage,
    id: u64,
) -> crate::audit::functions::Asker {
    use crate::audit::functions;
    let (asker, rx) = functions::channel();
    let mut lookup = startup.clone();
    lookup.params.retain(|(k, _)| k != "application_name");
    lookup.params.push((
        "application_name".to_owned(),
        functions::LOOKUP_APPLICATION_NAME.to_owned(),
    ));
    let (ctx, ep, live, config) = (ctx.clone(), ep.clone(), live.clone(), config.clone());
    ctx.clone().tasks.spawn(async move {
        let open = async {
            match open_session(&ctx, &ep, &live, &config, &lookup, id, None).await {
                Ok((upstream, _, _)) => Ok(upstream.stream),
                Err(e) => {
                    warn!(conn = id, error = %e, "function name lookup: login failed");
                    Err("the lookup connection could not log in (the proxy's log says why)".into())
                }
            }
        };
        functions::serve(id, rx, open, &ctx.audit).await;
    });
    asker
}

/// The client a login may ask for a password (gateway mode).
type Client<'a> = Option<(&'a mut ClientStream, &'a Peer)>;

/// Identity check, token, upstream login. In gateway mode the client is
/// asked for its proof first; the place it holds among the person's
/// sessions comes back with the session.
async fn open_session(
    ctx: &AppContext,
    ep: &EndpointContext,
    live: &EndpointTls,
    config: &Config,
    startup: &StartupMessage,
    id: u64,
    client: Client<'_>,
) -> Result<(Upstream, Arc<Identity>, Option<PersonPlace>), ConnError> {
    if startup.param("replication").is_some_and(|v| {
        !matches!(
            v.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    }) {
        return Err(ConnError::Replication);
    }
    let (token, identity, place) = match &ctx.gateway {
        Some(gw) => {
            let Some((stream, peer)) = client else {
                return Err(GatewayError::NoPassword("no client to ask").into());
            };
            let asking = login::Asking {
                source: peer
                    .addr
                    .parse::<std::net::SocketAddr>()
                    .ok()
                    .map(|a| a.ip()),
                db_user: startup.user(),
                endpoint_host: &live.endpoint.host,
                endpoint_port: live.endpoint.port,
                endpoint_region: &ep.region,
                timeout: config.live.handshake_timeout,
            };
            let admitted = login::admit(gw, stream, asking).await?;
            let (token, identity, place) = admitted.into_session();
            (token, Arc::new(identity), Some(place))
        }
        None => {
            // Before any token exists: may this identity use the requested user?
            let (creds, identity) = ctx.identity.authorize(startup.user()).await?;
            ctx.metrics.observe_credentials(creds.expiry());
            let target = TokenTarget {
                host: &ep.cluster_host,
                port: ep.cluster_port,
                region: &ep.region,
                user: startup.user(),
            };
            // Through a gateway the password is a proof of who signed the
            // token, bound to that gateway; the token inside is the same.
            let password = match &ep.gateway_id {
                Some(gateway_id) => crate::gateway::proof::make(
                    &creds,
                    &crate::gateway::proof::ProofTarget {
                        gateway_id,
                        sts_region: &ep.region,
                        rds: target,
                    },
                    std::time::SystemTime::now(),
                ),
                None => ctx.signer.sign(&creds, &target),
            };
            ctx.metrics.token_signed();
            (password, identity, None)
        }
    };
    let began = Instant::now();
    let stamped;
    let params = if ctx.audit.config.stamp_application_name {
        stamped = stamp_application_name(&startup.params, &identity.user_name, id);
        &stamped
    } else {
        &startup.params
    };
    let login = upstream::login(&live.endpoint, params, startup.negotiated(), &token);
    let upstream = tokio::time::timeout(config.live.login_timeout, login)
        .await
        .map_err(|_| ConnError::LoginTimeout(config.live.login_timeout))??;
    ctx.metrics.upstream_login(began.elapsed());
    Ok((upstream, identity, place))
}

/// The startup parameters with `application_name` prefixed by the person
/// and connection id, cut to the 63 bytes the server keeps (on a
/// character boundary) so the prefix survives.
fn stamp_application_name(
    params: &[(String, String)],
    person: &str,
    id: u64,
) -> Vec<(String, String)> {
    const KEPT: usize = 63;
    let mut out: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "application_name")
        .cloned()
        .collect();
    let given = params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map_or("", |(_, v)| v.as_str());
    let mut name = format!("rds-iam-proxy:{person}:{id}");
    if !given.is_empty() {
        name.push(' ');
        name.push_str(given);
    }
    let mut end = name.len().min(KEPT);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    out.push(("application_name".to_owned(), name));
    out
}

/// Logs the failure and, where possible, tells the client why.
/// Who was refused: connection id, peer, and the user and database asked
/// for (once the startup was read).
type Who<'a> = (u64, &'a Peer, Option<(&'a str, &'a str)>);

/// Logs, counts and audits the failure and, where possible, tells the
/// client why.
async fn refuse(
    ctx: &AppContext,
    ep: &EndpointContext,
    who: Who<'_>,
    stream: Option<ClientStream>,
    error: ConnError,
) {
    ctx.metrics.connection_failed(&error);
    let names = Names {
        upstream: &ep.upstream_name,
        profile: ctx.identity.profile(),
        clock_skew: ctx.identity.clock_skew(),
    };
    let message = error.to_client(names);
    match &message {
        Some(m) => warn!(error = %error, sqlstate = %m.code, "connection refused"),
        None => info!(error = %error, "connection closed during the handshake"),
    }
    if let Some(m) = &message {
        let (_, peer, user_db) = who;
        ctx.sessions.refused(crate::sessions::Refusal {
            time: std::time::SystemTime::now(),
            client_addr: peer.addr.clone(),
            db_user: user_db.map(|(u, _)| u.to_owned()),
            database: user_db.map(|(_, d)| d.to_owned()),
            person: match &error {
                ConnError::Identity(crate::identity::IdentityError::NotYourUser {
                    person, ..
                }) => Some(person.clone()),
                _ => None,
            },
            reason: crate::metrics::refusal_reason(&error),
            sqlstate: m.code.to_string(),
            message: m.message.to_string(),
        });
    }
    if let Some(m) = &message {
        let (id, peer, user_db) = who;
        let event = crate::audit::record::denial(id, &peer.addr, user_db, &error, Some(&m.code));
        ctx.audit.record(event).await;
    }
    if let (Some(mut stream), Some(m)) = (stream, message) {
        let mut out = BytesMut::new();
        backend::write_error(&mut out, &m);
        let _ = tokio::time::timeout(FINAL_WRITE, async {
            let _ = stream.write_all(&out).await;
            let _ = stream.flush().await;
            let _ = stream.shutdown().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::stamp_application_name;

    fn stamped(params: &[(&str, &str)], person: &str) -> String {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let out = stamp_application_name(&params, person, 42);
        assert_eq!(
            out.len(),
            params.len() + usize::from(!params.iter().any(|(k, _)| k == "application_name"))
        );
        out.into_iter()
            .find(|(k, _)| k == "application_name")
            .unwrap()
            .1
    }

    /// The prefix comes first and survives the server's 63-byte cut; the
    /// cut never splits a character.
    #[test]
    fn application_name_stamp_keeps_the_prefix_within_63_bytes() {
        assert_eq!(stamped(&[("user", "ari")], "ari"), "rds-iam-proxy:ari:42");
        assert_eq!(
            stamped(&[("application_name", "psql"), ("user", "ari")], "ari"),
            "rds-iam-proxy:ari:42 psql"
        );
        // "rds-iam-proxy:ar:42 " is 20 bytes, so byte 63 would split an é.
        let long = stamped(&[("application_name", &"é".repeat(40))], "ar");
        assert!(long.len() <= 63, "{}", long.len());
        assert_eq!(long.len(), 62, "the cut falls back to a character boundary");
        assert!(long.starts_with("rds-iam-proxy:ar:42 é"));
    }
}
