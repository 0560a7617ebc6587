//! Start-up and the running service.
//!
//! State is split in two: [`AppContext`] is process-wide (configuration,
//! AWS identity, cancel keys, metrics, the connection limit, the shutdown
//! phase, the set of connection tasks); [`EndpointContext`] is one per
//! `[[endpoint]]` (its upstream, region, and the TLS configurations that
//! SIGHUP swaps). A connection takes a snapshot of both when it starts, so
//! a reload never touches an established session.
//!
//! Lifecycle: bind everything, tell systemd READY=1, then serve until a
//! signal. SIGHUP reloads; SIGTERM/SIGINT stop accepting, let sessions run
//! up to `max_sigterm_delay`, end the rest with FATAL 57P01 and return; a
//! second SIGTERM/SIGINT exits at once with [`EXIT_FORCED`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::cancel::CancelRegistry;
use crate::config::{ClientTls, Config, ConfigError, EndpointConfig};
use crate::identity::IdentityService;
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::peer::{PeerError, PeerPolicy};
use crate::tls::{self, TlsSetupError};
use crate::token::Signer;
use crate::upstream::Endpoint;

/// Warn this long before an SSO login that cannot renew itself ends.
const EXPIRY_WARNING: Duration = Duration::from_secs(10 * 60);

/// Exit code after a second SIGTERM/SIGINT cut the drain short.
pub const EXIT_FORCED: i32 = 3;

/// How long sessions ended with 57P01 get to go before the process exits.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// Where the process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Not accepting; sessions finish on their own.
    Draining,
    /// Sessions are being ended with 57P01.
    Terminating,
}

/// Process-wide state shared by every connection.
#[derive(Debug)]
pub struct AppContext {
    /// The configuration in force; SIGHUP swaps it.
    pub config: ArcSwap<Config>,
    pub identity: IdentityService,
    pub signer: Signer,
    pub cancels: Arc<CancelRegistry>,
    /// Which local OS users may connect over loopback TCP and unix sockets.
    pub peers: PeerPolicy,
    pub metrics: Arc<Metrics>,
    pub phase: watch::Receiver<Phase>,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// All listeners are bound.
    pub started: AtomicBool,
    /// Audit log and password guard.
    pub audit: Arc<crate::audit::Auditor>,
    /// The threads that carry sessions.
    pub workers: crate::workers::SessionWorkers,
    /// Gateway mode: each client proves who they are; `None` for the
    /// local proxy, which acts for its own identity.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
    /// Open sessions, recent refusals and the last hour, for the status
    /// page.
    pub sessions: crate::sessions::Registry,
    next_id: AtomicU64,
}

impl AppContext {
    pub fn next_connection_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// One endpoint's state.
#[derive(Debug)]
pub struct EndpointContext {
    /// Name in logs and metrics.
    pub name: String,
    /// `host:port` of the upstream, for messages.
    pub upstream_name: String,
    /// The cluster endpoint tokens are signed for (the upstream's name,
    /// or the cluster behind the gateway).
    pub cluster_host: String,
    pub cluster_port: u16,
    /// Through a gateway: the id proofs are signed for.
    pub gateway_id: Option<String>,
    pub region: String,
    live: ArcSwap<EndpointTls>,
}

/// What SIGHUP replaces: both TLS configurations and the dialing options.
#[derive(Debug)]
pub struct EndpointTls {
    pub server_tls: Arc<ServerConfig>,
    pub endpoint: Arc<Endpoint>,
}

impl EndpointContext {
    /// The TLS configurations in force now.
    pub fn live(&self) -> Arc<EndpointTls> {
        self.live.load_full()
    }
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error("client-facing TLS: {0}")]
    ClientTls(TlsSetupError),
    #[error("upstream CA bundle: {0}")]
    UpstreamCa(TlsSetupError),
    #[error("local CA: {0}")]
    LocalCa(#[from] crate::local_ca::LocalCaError),
    #[error(
        "no AWS region: the endpoint name does not contain one and the AWS configuration sets none; pass --region"
    )]
    NoRegion,
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::WriterError),
    #[error("audit digests: {0}")]
    Digests(#[from] crate::audit::digest::DigestError),
    #[error("STS for gateway proofs: {0}")]
    StsTls(TlsSetupError),
    #[error("CA bundle for the gateway's peers (--gateway-peer-ca): {0}")]
    PeerCa(TlsSetupError),
    #[error("cannot start the session worker threads: {0}")]
    Workers(std::io::Error),
    #[error("cannot listen on {what}: {error}")]
    Bind { what: String, error: std::io::Error },
}

/// Loads an endpoint's TLS configurations (at start and on SIGHUP).
pub fn endpoint_tls(e: &EndpointConfig, config: &Config) -> Result<EndpointTls, StartError> {
    let server_tls = match &e.live.client_tls {
        ClientTls::Files { cert, key } => {
            tls::server_config(cert, key).map_err(StartError::ClientTls)?
        }
        ClientTls::Local { state_dir } => {
            let ca = crate::local_ca::ensure(state_dir)?;
            if ca.created {
                info!(ca = %ca.ca_cert.display(), "created a local CA for client connections");
            }
            tls::server_config(&ca.cert, &ca.key).map_err(StartError::ClientTls)?
        }
    };
    // Through a gateway, the gateway is the upstream the proxy dials and
    // verifies; tokens are still signed for the cluster (EndpointContext).
    let endpoint = match &e.start.gateway {
        Some(g) => Endpoint {
            host: g.host.clone(),
            port: g.port,
            connect_to: None,
            connect_timeout: config.live.connect_timeout,
            tls: tls::client_config(&g.ca).map_err(StartError::UpstreamCa)?,
        },
        None => Endpoint {
            host: e.start.upstream_host.clone(),
            port: e.start.upstream_port,
            connect_to: e.live.connect_to.clone(),
            connect_timeout: config.live.connect_timeout,
            tls: tls::client_config(&e.live.upstream_ca).map_err(StartError::UpstreamCa)?,
        },
    };
    Ok(EndpointTls {
        server_tls,
        endpoint: Arc::new(endpoint),
    })
}

/// Builds the contexts: everything that can fail at start-up, except
/// binding, fails here.
pub async fn build(
    config: Config,
) -> Result<
    (
        Arc<AppContext>,
        Vec<Arc<EndpointContext>>,
        watch::Sender<Phase>,
    ),
    StartError,
> {
    let first_region = config.endpoints.iter().find_map(|e| e.start.region.clone());
    let sdk =
        IdentityService::load_sdk_config(config.start.profile.as_deref(), first_region.as_deref())
            .await;
    let mut endpoints = Vec::new();
    for e in &config.endpoints {
        let region = e
            .start
            .region
            .clone()
            .or_else(|| sdk.region().map(|r| r.to_string()))
            .ok_or(StartError::NoRegion)?;
        let live = endpoint_tls(e, &config)?;
        if let ClientTls::Local { state_dir } = &e.live.client_tls {
            info!(
                endpoint = %e.start.name,
                "clients can verify the proxy with: sslmode=verify-full sslrootcert={}",
                state_dir.join("ca.crt").display()
            );
        }
        endpoints.push(Arc::new(EndpointContext {
            name: e.start.name.clone(),
            upstream_name: match &e.start.gateway {
                Some(g) => format!(
                    "{} (through the gateway {}:{})",
                    e.upstream_name(),
                    g.host,
                    g.port
                ),
                None => e.upstream_name(),
            },
            cluster_host: e.start.upstream_host.clone(),
            cluster_port: e.start.upstream_port,
            gateway_id: e.start.gateway.as_ref().map(|g| g.id.clone()),
            region,
            live: ArcSwap::from_pointee(live),
        }));
    }
    let gateway = match &config.start.gateway {
        Some(g) => {
            let sts_region = match &g.sts_region {
                Some(r) => r.clone(),
                None => endpoints[0].region.clone(),
            };
            let plain = g
                .sts_endpoint_url
                .as_deref()
                .is_some_and(|u| u.starts_with("http://"));
            let tls = if plain {
                None
            } else {
                Some(tls::sts_client_config().map_err(StartError::StsTls)?)
            };
            let peers = if g.peers.is_empty() {
                Vec::new()
            } else {
                let peer_tls = tls::client_config(&g.peer_ca).map_err(StartError::PeerCa)?;
                g.peers
                    .iter()
                    .map(|p| {
                        let endpoint = Endpoint {
                            host: p.host.clone(),
                            port: p.port,
                            connect_to: None,
                            connect_timeout: config.live.connect_timeout,
                            tls: peer_tls.clone(),
                        };
                        (p.instance, Arc::new(endpoint))
                    })
                    .collect()
            };
            Some(Arc::new(crate::gateway::Gateway::new(
                g, sts_region, tls, peers,
            )))
        }
        None => None,
    };
    let instance = config.start.gateway.as_ref().and_then(|g| g.instance);
    let peers =
        PeerPolicy::from_allow_list(crate::peer::own_uid()?, &config.start.allow_local_users)?;
    let audit = Arc::new(crate::audit::Auditor::start(config.start.audit.clone())?);
    let audit_sdk = audit.aws_config(&sdk).await;
    audit.start_digests(&audit_sdk).await?;
    audit.start_shipping(&audit_sdk);
    let identity = IdentityService::new(&sdk, config.start.identity.clone());
    let (phase_tx, phase) = watch::channel(Phase::Running);
    let workers = crate::workers::SessionWorkers::start(config.start.worker_threads)
        .map_err(StartError::Workers)?;
    let app = Arc::new(AppContext {
        config: ArcSwap::from_pointee(config),
        identity,
        signer: Signer::default(),
        cancels: Arc::new(CancelRegistry::for_instance(instance)),
        peers,
        audit,
        metrics: Arc::new(Metrics::default()),
        phase,
        tasks: TaskTracker::new(),
        workers,
        gateway,
        sessions: Default::default(),
        started: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
    });
    Ok((app, endpoints, phase_tx))
}

/// A started proxy: listeners bound and accepting.
pub struct Server {
    pub app: Arc<AppContext>,
    pub endpoints: Vec<Arc<EndpointContext>>,
    phase: watch::Sender<Phase>,
    accept_loops: Vec<tokio::task::JoinHandle<()>>,
    /// Where the admin listener is, when on.
    pub admin_addr: Option<std::net::SocketAddr>,
}

impl Server {
    /// Builds, binds every listener and starts accepting.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let (app, endpoints, phase) = build(config).await?;
        let config = app.config.load_full();
        let mut bound = Vec::new();
        for (e, ep) in config.endpoints.iter().zip(&endpoints) {
            for addr in &e.start.listen {
                let l = Listener::tcp(*addr)
                    .await
                    .map_err(|error| StartError::Bind {
                        what: addr.to_string(),
                        error,
                    })?;
                bound.push((l, ep.clone()));
            }
            if let Some(dir) = &e.start.unix_socket {
                let l = Listener::unix(dir, e.unix_socket_port()).map_err(|error| {
                    StartError::Bind {
                        what: dir.display().to_string(),
                        error,
                    }
                })?;
                bound.push((l, ep.clone()));
            }
        }
        let admin_addr = match config.start.admin_listen {
            Some(listen) => {
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|source| StartError::Bind {
                        what: format!("{listen} (admin)"),
                        error: source,
                    })?;
                let addr = l.local_addr().ok();
                if !listen.ip().is_loopback() {
                    warn!(admin = %listen, "the admin listener is not on loopback: anyone who can reach it sees the metrics and the status page (who is connected, from where)");
                }
                // Not "listening on": that phrase announces client listeners.
                info!("admin HTTP on {}", addr.unwrap_or(listen));
                tokio::spawn(crate::admin::serve(l, app.clone(), endpoints.clone()));
                addr
            }
            None => None,
        };

        crate::banner::log(&app, &endpoints).await;
        let loopback_tcp = bound
            .iter()
            .any(|(l, _)| matches!(l, Listener::Tcp(t) if t.local_addr().is_ok_and(|a| a.ip().is_loopback())));
        if loopback_tcp
            && app.peers != PeerPolicy::Any
            && let Some(e) = crate::peer::fast_path_error().await
        {
            warn!(
                error = %e,
                "the kernel's socket lookup (sock_diag over netlink) is not available: each loopback connection's user is found by reading /proc/net/tcp, slow with many sockets; allow AF_NETLINK (systemd: RestrictAddressFamilies)"
            );
        }
        // Lives as long as the process: warns before an SSO login that
        // cannot renew itself ends.
        if app.gateway.is_none() {
            tokio::spawn({
                let app = app.clone();
                async move { app.identity.watch_expiry(EXPIRY_WARNING).await }
            });
        }

        let mut accept_loops = Vec::new();
        for (l, ep) in bound {
            info!(
                endpoint = %ep.name,
                upstream = %ep.upstream_name,
                region = %ep.region,
                "listening on {}",
                l.describe()
            );
            accept_loops.push(tokio::spawn(l.serve(app.clone(), ep)));
        }
        app.started.store(true, Ordering::Release);
        Ok(Server {
            app,
            endpoints,
            phase,
            accept_loops,
            admin_addr,
        })
    }

    /// Re-reads the configuration and swaps what can change without
    /// touching established sessions: TLS files, CA bundles, timeouts,
    /// limits ([`crate::reloadable`] says which). A reload that changes a
    /// start-only setting, or fails to load, is refused and the old
    /// configuration stays.
    pub fn reload(&self, new: Result<Config, ConfigError>) -> Result<(), String> {
        let new = new.map_err(|e| e.to_string())?;
        let old = self.app.config.load_full();
        let restart_only = crate::reloadable::start_only_changes(&old, &new);
        if !restart_only.is_empty() {
            return Err(format!(
                "changed settings that apply only at a restart: {}; restart the proxy to change them (nothing was reloaded)",
                restart_only.join(", ")
            ));
        }
        let mut live = Vec::new();
        for e in &new.endpoints {
            live.push(
                endpoint_tls(e, &new)
                    .map_err(|err| format!("endpoint {:?}: {err}", e.start.name))?,
            );
        }
        for (ep, l) in self.endpoints.iter().zip(live) {
            ep.live.store(Arc::new(l));
        }
        self.app.config.store(Arc::new(new));
        Ok(())
    }

    /// Stops accepting, waits up to `max_sigterm_delay` for sessions (or
    /// until `hurry` resolves), then ends the rest with 57P01.
    pub async fn shutdown(mut self, hurry: impl std::future::Future<Output = ()>) -> bool {
        let _ = self.phase.send(Phase::Draining);
        for t in std::mem::take(&mut self.accept_loops) {
            let _ = t.await;
        }
        self.app.tasks.close();
        let delay = self.app.config.load().live.max_sigterm_delay;
        let open = self.app.tasks.len();
        if open > 0 {
            info!(
                open,
                "waiting up to {}s for sessions to finish",
                delay.as_secs()
            );
        }
        tokio::pin!(hurry);
        let forced = tokio::select! {
            _ = self.app.tasks.wait() => false,
            _ = tokio::time::sleep(delay) => false,
            _ = &mut hurry => true,
        };
        if forced {
            self.close_audit().await;
            return true;
        }
        if !self.app.tasks.is_empty() {
            info!(
                open = self.app.tasks.len(),
                "ending the remaining sessions (57P01)"
            );
            let _ = self.phase.send(Phase::Terminating);
            let forced = tokio::select! {
                _ = self.app.tasks.wait() => false,
                _ = tokio::time::sleep(TERMINATE_GRACE) => false,
                _ = &mut hurry => true,
            };
            if forced {
                self.close_audit().await;
                return true;
            }
        }
        self.close_audit().await;
        false
    }

    /// Writes what the audit trail holds, then audit_stop, and closes it;
    /// also when a second signal cuts the drain short. A session still
    /// open then has no end record: said here, and any record it makes
    /// later is counted as lost (never queued for no one).
    async fn close_audit(&self) {
        let open = self.app.tasks.len();
        if open > 0 && self.app.audit.sink.is_some() {
            error!(
                open,
                "closing the audit log while sessions are still open: their end is not recorded"
            );
        }
        self.app.audit.close_and_sign().await;
    }
}

/// Re-reads the configuration for SIGHUP.
pub type Reloader = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Runs the proxy until SIGTERM/SIGINT. Returns the exit code.
pub async fn run(config: Config, reloader: Reloader) -> Result<i32, StartError> {
    // Handlers first, so a signal during start-up is not the default
    // action (which would kill the process without a drain).
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let server = Server::start(config).await?;
    crate::systemd::notify("READY=1");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                crate::systemd::notify("RELOADING=1");
                match server.reload(reloader()) {
                    Ok(()) => {
                        server.app.metrics.reload("ok");
                        info!("configuration reloaded; established sessions are unchanged");
                    }
                    Err(e) => {
                        server.app.metrics.reload("failed");
                        error!(error = %e, "reload refused; the old configuration stays in force");
                    }
                }
                crate::systemd::notify("READY=1");
            }
        }
    }
    info!("shutting down: no new connections");
    crate::systemd::notify("STOPPING=1");
    let second = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    if server.shutdown(second).await {
        warn!("second signal: exiting at once");
        return Ok(EXIT_FORCED);
    }
    info!("stopped");
    Ok(0)
}
