//! The validated configuration, built once at start-up (and again on
//! SIGHUP) and then shared read-only.
//!
//! Layers, highest first: command-line flags, `RDS_IAM_PROXY_*` variables
//! (clap reads both), the TOML file named by `--config`, built-in defaults.
//! Clap tells which flags were really given ([`Given`]); a flag left at its
//! default does not hide the file's value.
//!
//! The file (docs/configuration.md has the full reference):
//!
//! ```toml
//! max_connections = 200          # process-wide keys at the top
//! [admin]
//! listen = "127.0.0.1:9090"
//! [[endpoint]]                   # one table per Aurora endpoint
//! name = "writer"
//! upstream = "db.cluster-abc.eu-west-1.rds.amazonaws.com"
//! listen = ["127.0.0.1:5432"]
//! ```
//!
//! Adding a feature's options: docs/configuration.md. In short, a
//! `#[derive(Args)]` struct flattened into `ProxyArgs`; a table struct in
//! [`FileConfig`] (the one schema the file is read and rendered with,
//! [`file`]); a validated sub-struct built in [`merge`] with the
//! flag-over-file rule ([`pick`]), placed in [`Config::start`] or
//! [`Config::live`] by when it takes effect.

mod file;
mod merge;

pub(crate) use file::duration_text;
pub use file::{AdminFile, AuditFile, EndpointFile, FileConfig, parse_file};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::cli::{LogFormat, ProxyArgs};
use crate::identity::{IdentityOptions, OptionsError};
use crate::tls::UpstreamCa;

/// Default PostgreSQL port.
pub const DEFAULT_PORT: u16 = 5432;

/// Which flags were given on the command line or through the environment
/// (by clap argument id, e.g. `"listen"`), as opposed to left at default.
pub type Given<'a> = &'a dyn Fn(&str) -> bool;

/// The proxy's settings, split by when they take effect: the type says
/// which settings a SIGHUP applies ([`Reloadable`], [`EndpointLive`]) and
/// which are built once at start-up ([`StartOnly`], [`EndpointStart`]). A
/// reload swaps only the reloadable halves, and refuses a new
/// configuration whose start-only halves differ ([`crate::reloadable`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub start: StartOnly,
    pub live: Reloadable,
    /// One or more endpoints, each with its own listeners.
    pub endpoints: Vec<EndpointConfig>,
    /// The file this came from, re-read on SIGHUP.
    pub file: Option<PathBuf>,
}

/// Settings built into the running proxy at start-up: listeners, the
/// identity source, the audit writer, the session workers. Changing one
/// takes a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct StartOnly {
    /// AWS profile [default: the standard chain].
    pub profile: Option<String>,
    /// Identity source and its settings (read once at start-up: a SAML
    /// assertion may come from stdin).
    pub identity: IdentityOptions,
    /// `--allow-local-user` values (names, uids or `any`), resolved at start.
    pub allow_local_users: Vec<String>,
    /// Local mode: serve clients on non-loopback listeners, as this
    /// proxy's identity [default: false; such a listener refuses to start].
    pub allow_remote_clients: bool,
    /// Gateway mode (`rds-iam-proxy gateway`) and its settings; `None` for
    /// the local proxy.
    pub gateway: Option<crate::gateway::config::GatewayConfig>,
    /// Audit log and password guard.
    pub audit: crate::audit::AuditConfig,
    /// The admin HTTP listener's address [default: off].
    pub admin_listen: Option<SocketAddr>,
    /// Text or JSON log lines.
    pub log_format: LogFormat,
    /// Threads that carry sessions, each with its own event loop [default:
    /// half the CPUs, at least one]. Command line and environment only.
    pub worker_threads: usize,
}

/// Settings a SIGHUP applies: new connections see the new values, sessions
/// under way keep what they started with.
#[derive(Debug, Clone, PartialEq)]
pub struct Reloadable {
    /// Time a client has to finish TLS and send its startup packet.
    pub handshake_timeout: Duration,
    /// Time allowed for the TCP connection to the upstream.
    pub connect_timeout: Duration,
    /// Time allowed for the whole upstream login.
    pub login_timeout: Duration,
    /// Sessions silent both ways this long are ended [default: never].
    pub idle_timeout: Option<Duration>,
    /// Most client sessions at once (startup read), all endpoints together.
    pub max_connections: usize,
    /// Most sockets at once still in TLS or startup, all endpoints.
    pub max_handshakes: usize,
    /// Most of those from one remote address.
    pub max_handshakes_per_source: usize,
    /// Drain time after SIGTERM before sessions get 57P01.
    pub max_sigterm_delay: Duration,
    /// /readiness also opens TCP+TLS to every upstream.
    pub admin_upstream_check: bool,
}

/// One Aurora endpoint and where the proxy listens for it.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    pub start: EndpointStart,
    pub live: EndpointLive,
}

/// An endpoint's identity and listeners, fixed at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStart {
    /// Name in logs and metrics [default: the upstream HOST:PORT].
    pub name: String,
    /// Endpoint name (lowercase) that tokens are signed for and TLS checks.
    pub upstream_host: String,
    pub upstream_port: u16,
    /// Region from the configuration or the endpoint name; `None` means
    /// "ask the AWS configuration".
    pub region: Option<String>,
    pub listen: Vec<SocketAddr>,
    /// Directory for the unix socket.
    pub unix_socket: Option<PathBuf>,
    /// Reach the cluster through an rds-iam-proxy gateway, if any.
    pub gateway: Option<ViaGateway>,
}

/// An endpoint's certificates and dial address, which a SIGHUP re-reads.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointLive {
    /// Address dialled instead of the endpoint name, if any.
    pub connect_to: Option<String>,
    pub upstream_ca: UpstreamCa,
    pub client_tls: ClientTls,
}

/// The gateway a local proxy reaches its cluster through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViaGateway {
    pub host: String,
    pub port: u16,
    /// The id proofs are signed for [default: `host`].
    pub id: String,
    /// CAs for the gateway's certificate [default: the system's store].
    pub ca: UpstreamCa,
}

/// The certificate shown to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientTls {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Generate (once) and use a local CA in this state directory.
    Local {
        state_dir: PathBuf,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "--upstream is required: the Aurora endpoint name, e.g. mydb.cluster-abc.eu-west-1.rds.amazonaws.com (or an [[endpoint]] table in --config)"
    )]
    NoUpstream,
    #[error("{0} {1:?}: expected HOST or HOST:PORT")]
    BadUpstream(String, String),
    #[error("{0} {1:?}: expected HOST:PORT")]
    BadConnectTo(String, String),
    #[error("{0} {1:?} does not look like an AWS region (e.g. eu-west-1)")]
    BadRegion(String, String),
    #[error("{0}: no listen address: give listen or unix_socket (--listen / --unix-socket)")]
    NoListener(String),
    #[error("{key} {value:?}: {problem}")]
    BadValue {
        key: String,
        value: String,
        problem: String,
    },
    #[error("{key}: {problem}")]
    Conflict { key: String, problem: String },
    #[error("cannot read the configuration file {path}: {message}")]
    ReadFile { path: String, message: String },
    #[error("configuration file {path}: {message}")]
    ParseFile { path: String, message: String },
    #[error(transparent)]
    Identity(#[from] OptionsError),
    #[error("--audit-mode async|sync needs --audit-dir DIR (audit.mode / audit.dir in the file)")]
    NoAuditDir,
    #[error(
        "{key} {addr} is not a loopback address: anyone who can reach it would use this proxy's AWS identity \
         as their own. For a proxy several people share, run `rds-iam-proxy gateway` (each person proves \
         who they are); for a sidecar whose network only its application reaches, pass \
         --allow-remote-clients (allow_remote_clients = true)"
    )]
    RemoteListener { key: String, addr: SocketAddr },
}

/// Facts from the process's environment, passed in so loading stays
/// testable and so what is read once stays read once.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub home: Option<PathBuf>,
    pub xdg_state_home: Option<PathBuf>,
    /// The identity options, read once at start-up (a SAML assertion may
    /// come from stdin); a SIGHUP reload keeps them.
    pub identity: IdentityOptions,
}

impl Env {
    pub fn from_process(identity: IdentityOptions) -> Self {
        Env {
            home: std::env::var_os("HOME").map(Into::into),
            xdg_state_home: std::env::var_os("XDG_STATE_HOME").map(Into::into),
            identity,
        }
    }
}

impl Config {
    /// The command line alone, every flag taken as given (no file).
    pub fn from_cli(
        cli: &ProxyArgs,
        home: Option<PathBuf>,
        xdg_state_home: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        Self::load(
            cli,
            &|_| true,
            &Env {
                home,
                xdg_state_home,
                identity: cli.aws.identity_options()?,
            },
        )
    }

    /// Reads `--config` (if any) and merges it under the flags.
    pub fn load(cli: &ProxyArgs, given: Given<'_>, env: &Env) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::ReadFile {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                Some((path.clone(), parse_file(path, &text)?))
            }
            None => None,
        };
        Self::merge(cli, given, file, env)
    }

    /// Shorthand for the first endpoint (the only one from the flags).
    pub fn first(&self) -> &EndpointConfig {
        &self.endpoints[0]
    }
}

impl EndpointConfig {
    /// The port in the unix socket's file name.
    pub fn unix_socket_port(&self) -> u16 {
        match self.start.listen.first() {
            Some(a) if a.port() != 0 => a.port(),
            _ => DEFAULT_PORT,
        }
    }

    /// `host:port` as signed into tokens.
    pub fn upstream_name(&self) -> String {
        format!("{}:{}", self.start.upstream_host, self.start.upstream_port)
    }
}

/// A flag's value when given, else the file's, else the flag's default.
pub(crate) fn pick<T>(flag_given: bool, flag: T, file: Option<T>) -> T {
    match file {
        Some(v) if !flag_given => v,
        _ => flag,
    }
}

/// [`pick`] for a duration the file writes as text (`"30s"`): a file value
/// that does not parse is an error naming `key` (`audit.rotate_age in
/// FILE`), unless the flag was given.
pub(crate) fn pick_duration(
    flag_given: bool,
    flag: Duration,
    file: Option<&String>,
    key: &dyn Fn() -> String,
) -> Result<Duration, ConfigError> {
    match file {
        Some(v) if !flag_given => {
            crate::cli::parse_duration(v).map_err(|problem| ConfigError::BadValue {
                key: key(),
                value: v.clone(),
                problem,
            })
        }
        _ => Ok(flag),
    }
}

/// The endpoint name (lowercase) and port of an `--upstream` value.
pub fn parse_upstream(value: &str) -> Result<(String, u16), ConfigError> {
    let (host, port) = split_host_port(value, DEFAULT_PORT)
        .ok_or_else(|| ConfigError::BadUpstream("--upstream".into(), value.to_owned()))?;
    Ok((host.to_ascii_lowercase(), port))
}

/// `--region` if given (checked), else the region in the endpoint name;
/// `None` leaves it to the AWS configuration.
pub fn resolve_region(flag: Option<&str>, host: &str) -> Result<Option<String>, ConfigError> {
    match flag {
        Some(r) if !valid_region(r) => Err(ConfigError::BadRegion("--region".into(), r.to_owned())),
        Some(r) => Ok(Some(r.to_owned())),
        None => Ok(region_from_host(host)),
    }
}

/// Splits `host[:port]`; `[v6]:port` is accepted too.
fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after.strip_prefix(':') {
            Some(p) => (h, p.parse().ok()?),
            None if after.is_empty() => (h, default_port),
            None => return None,
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (s, default_port),
        }
    };
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    ok.then(|| (host.to_owned(), port))
}

/// `*.REGION.rds.amazonaws.com` and the China partition's
/// `*.REGION.rds.amazonaws.com.cn`.
pub fn region_from_host(host: &str) -> Option<String> {
    let host = host.trim_end_matches('.');
    let rest = host
        .strip_suffix(".rds.amazonaws.com")
        .or_else(|| host.strip_suffix(".rds.amazonaws.com.cn"))?;
    let region = rest.rsplit('.').next()?;
    valid_region(region).then(|| region.to_owned())
}

fn valid_region(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && parts
            .last()
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests;
