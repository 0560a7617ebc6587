//! Start-up and the running service: builds the shared context once
//! (configuration, both TLS configurations, AWS identity, cancel keys),
//! binds the listeners and serves until a shutdown signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::ServerConfig;
use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cancel::CancelRegistry;
use crate::config::{ClientTls, Config};
use crate::identity::IdentityService;
use crate::listener::Listener;
use crate::tls::{self, TlsSetupError};
use crate::token::Signer;
use crate::upstream::Endpoint;

/// State shared by every connection.
#[derive(Debug)]
pub struct AppContext {
    pub config: Arc<Config>,
    pub server_tls: Arc<ServerConfig>,
    pub endpoint: Arc<Endpoint>,
    /// `host:port` of the upstream, for messages.
    pub upstream_name: String,
    pub region: String,
    pub identity: IdentityService,
    pub signer: Signer,
    pub cancels: Arc<CancelRegistry>,
    /// Audit log and password guard.
    pub audit: Arc<crate::audit::Auditor>,
    next_id: AtomicU64,
}

impl AppContext {
    pub fn next_connection_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
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
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::WriterError),
    #[error("cannot listen on {what}: {source}")]
    Bind {
        what: String,
        source: std::io::Error,
    },
}

/// Builds the context: everything that can fail at start-up fails here.
pub async fn build(config: Config) -> Result<AppContext, StartError> {
    let server_tls = match &config.client_tls {
        ClientTls::Files { cert, key } => {
            tls::server_config(cert, key).map_err(StartError::ClientTls)?
        }
        ClientTls::Local { state_dir } => {
            let ca = crate::local_ca::ensure(state_dir)?;
            if ca.created {
                info!(ca = %ca.ca_cert.display(), "created a local CA for client connections");
            }
            info!(
                "clients can verify the proxy with: sslmode=verify-full sslrootcert={}",
                ca.ca_cert.display()
            );
            tls::server_config(&ca.cert, &ca.key).map_err(StartError::ClientTls)?
        }
    };
    let upstream_tls = tls::client_config(&config.upstream_ca).map_err(StartError::UpstreamCa)?;
    let sdk =
        IdentityService::load_sdk_config(config.profile.as_deref(), config.region.as_deref()).await;
    let region = config
        .region
        .clone()
        .or_else(|| sdk.region().map(|r| r.to_string()))
        .ok_or(StartError::NoRegion)?;
    let identity = IdentityService::new(&sdk, config.profile.clone());
    let endpoint = Arc::new(Endpoint {
        host: config.upstream_host.clone(),
        port: config.upstream_port,
        connect_to: config.connect_to.clone(),
        connect_timeout: config.connect_timeout,
        tls: upstream_tls,
    });
    let audit = Arc::new(crate::audit::Auditor::start(config.audit.clone())?);
    Ok(AppContext {
        audit,
        upstream_name: endpoint.name(),
        config: Arc::new(config),
        server_tls,
        endpoint,
        region,
        identity,
        signer: Signer::default(),
        cancels: Arc::new(CancelRegistry::default()),
        next_id: AtomicU64::new(0),
    })
}

/// Binds the listeners, reports who the proxy acts for, and serves until
/// SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), StartError> {
    let ctx = Arc::new(build(config).await?);
    let mut listeners = Vec::new();
    for addr in &ctx.config.listen {
        let l = Listener::tcp(*addr)
            .await
            .map_err(|source| StartError::Bind {
                what: addr.to_string(),
                source,
            })?;
        listeners.push(l);
    }
    if let Some(dir) = &ctx.config.unix_socket {
        let l = Listener::unix(dir, ctx.config.unix_socket_port()).map_err(|source| {
            StartError::Bind {
                what: dir.display().to_string(),
                source,
            }
        })?;
        listeners.push(l);
    }

    match ctx.identity.current().await {
        Ok((_, id)) => info!(
            person = %id.user_name,
            arn = %id.arn,
            upstream = %ctx.upstream_name,
            region = %ctx.region,
            "acting for {} (database user \"{}\")",
            id.arn,
            id.user_name
        ),
        Err(e) => {
            warn!(error = %e, "AWS identity not available yet; connections will be refused until it is")
        }
    }

    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    for l in listeners {
        info!(upstream = %ctx.upstream_name, "listening on {}", l.describe());
        tasks.push(tokio::spawn(l.serve(ctx.clone(), stopped.clone())));
    }
    shutdown_signal().await;
    info!("shutting down");
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    ctx.audit.close();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
