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
//! Adding a feature's options: give the feature a `#[derive(Args)]` struct
//! flattened into `ProxyArgs`, a `#[derive(Deserialize)]` table struct added
//! to [`FileConfig`] as an `Option<...>` field (a top-level `[feature]`
//! table; unknown keys stay errors because every struct is
//! `deny_unknown_fields`), a validated sub-struct of [`Config`] built in
//! [`Config::load`] with the same flag-over-file rule (see `pick`), and a
//! section in [`Config::render`].

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::cli::{LogFormat, ProxyArgs, parse_duration};
use crate::identity::{IdentityOptions, OptionsError};
use crate::tls::UpstreamCa;

/// Default PostgreSQL port.
pub const DEFAULT_PORT: u16 = 5432;

/// Which flags were given on the command line or through the environment
/// (by clap argument id, e.g. `"listen"`), as opposed to left at default.
pub type Given<'a> = &'a dyn Fn(&str) -> bool;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// One or more endpoints, each with its own listeners.
    pub endpoints: Vec<EndpointConfig>,
    /// AWS profile [default: the standard chain].
    pub profile: Option<String>,
    /// Identity source and its settings (read once at start-up: a SAML
    /// assertion may come from stdin, so a reload keeps these).
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
    /// The admin HTTP listener [default: off].
    pub admin: Option<AdminConfig>,
    pub log_format: LogFormat,
    /// Threads that carry sessions, each with its own event loop [default:
    /// half the CPUs, at least one]. Command line and environment only;
    /// read once at start-up (a reload keeps the running workers).
    pub worker_threads: usize,
    /// The file this came from, re-read on SIGHUP.
    pub file: Option<PathBuf>,
}

/// One Aurora endpoint and where the proxy listens for it.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    /// Name in logs and metrics [default: the upstream HOST:PORT].
    pub name: String,
    /// Endpoint name (lowercase) that tokens are signed for and TLS checks.
    pub upstream_host: String,
    pub upstream_port: u16,
    /// Address dialled instead of the endpoint name, if any.
    pub connect_to: Option<String>,
    pub upstream_ca: UpstreamCa,
    /// Region from the configuration or the endpoint name; `None` means
    /// "ask the AWS configuration".
    pub region: Option<String>,
    pub listen: Vec<SocketAddr>,
    /// Directory for the unix socket.
    pub unix_socket: Option<PathBuf>,
    pub client_tls: ClientTls,
    /// Reach the cluster through an rds-iam-proxy gateway, if any.
    pub gateway: Option<ViaGateway>,
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

/// The admin HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// /readiness also opens TCP+TLS to every upstream.
    pub upstream_check: bool,
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

/// The TOML file. Every table denies unknown keys so a typo is an error,
/// not a silently ignored setting.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub handshake_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub login_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub max_handshakes: Option<usize>,
    pub max_handshakes_per_source: Option<usize>,
    pub max_sigterm_delay: Option<String>,
    pub log_format: Option<String>,
    pub admin: Option<AdminFile>,
    pub audit: Option<AuditFile>,
    pub allow_remote_clients: Option<bool>,
    pub gateway: Option<crate::gateway::config::GatewayFile>,
    #[serde(default)]
    pub endpoint: Vec<EndpointFile>,
}

/// The `[audit]` table: the `--audit-*` flags without their prefix.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    pub mode: Option<String>,
    pub dir: Option<PathBuf>,
    pub parameters: Option<bool>,
    pub stamp_application_name: Option<bool>,
    pub max_statement: Option<usize>,
    pub rotate_size: Option<u64>,
    pub rotate_age: Option<String>,
    pub queue: Option<usize>,
    pub allow_password_changes: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: String,
    pub upstream_check: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    pub name: Option<String>,
    pub upstream: Option<String>,
    pub listen: Option<Vec<String>>,
    pub unix_socket: Option<PathBuf>,
    pub connect_to: Option<String>,
    pub upstream_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub region: Option<String>,
    pub gateway: Option<String>,
    pub gateway_id: Option<String>,
    pub gateway_ca: Option<PathBuf>,
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

/// Half the CPUs, at least one. The proxy shares its machine with its
/// clients (psql, the application it is a sidecar of, PostgreSQL in the
/// benchmarks), and a worker with more sessions gathers more work per
/// wake-up: on 2 cores under pgbench, one worker spent 29-31 us of CPU per
/// transaction against 35-37 us for two (docs/PERFORMANCE.md).
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Flags that describe one endpoint.
const ENDPOINT_FLAGS: &[&str] = &[
    "upstream",
    "listen",
    "unix_socket",
    "connect_to",
    "upstream_ca",
    "tls_cert",
    "tls_key",
    "gateway",
    "gateway_ca",
];

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

    /// Merges flags over a parsed file and validates the result.
    pub fn merge(
        cli: &ProxyArgs,
        given: Given<'_>,
        file: Option<(PathBuf, FileConfig)>,
        env: &Env,
    ) -> Result<Self, ConfigError> {
        let (path, f) = match file {
            Some((p, f)) => (Some(p), f),
            None => (None, FileConfig::default()),
        };
        let fk = |key: &str| match &path {
            Some(p) => format!("{key} in {}", p.display()),
            None => key.to_owned(),
        };
        let duration =
            |flag: &str, flag_value: Duration, file_value: &Option<String>| match file_value {
                Some(v) if !given(flag) => {
                    parse_duration(v).map_err(|problem| ConfigError::BadValue {
                        key: fk(flag),
                        value: v.clone(),
                        problem,
                    })
                }
                _ => Ok(flag_value),
            };
        let handshake_timeout = duration(
            "handshake_timeout",
            cli.handshake_timeout,
            &f.handshake_timeout,
        )?;
        let connect_timeout = duration("connect_timeout", cli.connect_timeout, &f.connect_timeout)?;
        let login_timeout = duration("login_timeout", cli.login_timeout, &f.login_timeout)?;
        let max_sigterm_delay = duration(
            "max_sigterm_delay",
            cli.max_sigterm_delay,
            &f.max_sigterm_delay,
        )?;
        let idle_timeout = match (&cli.idle_timeout, &f.idle_timeout) {
            (Some(d), _) => Some(*d),
            (None, Some(v)) => {
                Some(parse_duration(v).map_err(|problem| ConfigError::BadValue {
                    key: fk("idle_timeout"),
                    value: v.clone(),
                    problem,
                })?)
            }
            (None, None) => None,
        }
        .filter(|d| !d.is_zero());
        for (key, d) in [
            ("handshake_timeout", handshake_timeout),
            ("connect_timeout", connect_timeout),
            ("login_timeout", login_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::BadValue {
                    key: key.into(),
                    value: "0".into(),
                    problem: "must be more than zero".into(),
                });
            }
        }
        let max_connections = pick(
            given("max_connections"),
            cli.max_connections,
            f.max_connections,
        );
        let max_handshakes = pick(
            given("max_handshakes"),
            cli.max_handshakes,
            f.max_handshakes,
        );
        let max_handshakes_per_source = pick(
            given("max_handshakes_per_source"),
            cli.max_handshakes_per_source,
            f.max_handshakes_per_source,
        );
        for (key, n) in [
            ("max_connections", max_connections),
            ("max_handshakes", max_handshakes),
            ("max_handshakes_per_source", max_handshakes_per_source),
        ] {
            if n == 0 {
                return Err(ConfigError::BadValue {
                    key: key.into(),
                    value: "0".into(),
                    problem: "must be at least 1".into(),
                });
            }
        }
        let log_format = match (&f.log_format, given("log_format")) {
            (Some(v), false) => match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::BadValue {
                        key: fk("log_format"),
                        value: v.clone(),
                        problem: "use \"text\" or \"json\"".into(),
                    });
                }
            },
            _ => cli.log_format,
        };
        let admin = match (&cli.admin_listen, &f.admin) {
            (Some(l), file_admin) => Some(AdminConfig {
                listen: parse_admin_listen("--admin-listen", l)?,
                upstream_check: cli.admin_upstream_check
                    || file_admin.as_ref().and_then(|a| a.upstream_check) == Some(true),
            }),
            (None, Some(a)) => Some(AdminConfig {
                listen: parse_admin_listen(&fk("admin.listen"), &a.listen)?,
                upstream_check: cli.admin_upstream_check || a.upstream_check == Some(true),
            }),
            (None, None) => None,
        };
        let profile = cli.aws.profile.clone().or(f.profile.clone());
        let global_region = match (&cli.aws.region, &f.region) {
            (Some(r), _) => Some(("--region".to_owned(), r.clone())),
            (None, Some(r)) => Some((fk("region"), r.clone())),
            (None, None) => None,
        };
        let state_dir = cli
            .state_dir
            .clone()
            .or(f.state_dir.clone())
            .unwrap_or_else(|| {
                crate::local_ca::default_state_dir(env.xdg_state_home.clone(), env.home.clone())
            });

        // Endpoints: the flags make one, or override the file's only one.
        let endpoint_flags_given = ENDPOINT_FLAGS.iter().any(|k| given(k))
            && (cli.upstream.is_some() || !f.endpoint.is_empty());
        let mut files = f.endpoint;
        if files.len() > 1 && endpoint_flags_given {
            let flags: Vec<String> = ENDPOINT_FLAGS
                .iter()
                .filter(|k| given(k))
                .map(|k| format!("--{}", k.replace('_', "-")))
                .collect();
            return Err(ConfigError::Conflict {
                key: flags.join(", "),
                problem: format!(
                    "the file has {} [[endpoint]] tables; endpoint flags apply only to a single endpoint: set these in the file instead",
                    files.len()
                ),
            });
        }
        if files.is_empty() {
            files.push(EndpointFile::default());
        }
        let single = files.len() == 1;
        let mut endpoints = Vec::with_capacity(files.len());
        for (i, e) in files.into_iter().enumerate() {
            let key = |k: &str| match &path {
                Some(p) => format!("endpoint[{}].{k} in {}", i + 1, p.display()),
                None => format!("--{}", k.replace('_', "-")),
            };
            // A flag wins over the file only when the flag was given; with
            // no file value the flag's default applies.
            let flag = |id: &str| single && given(id);
            let upstream = match (&cli.upstream, &e.upstream) {
                (Some(u), _) if flag("upstream") || e.upstream.is_none() => {
                    ("--upstream".to_owned(), u.clone())
                }
                (_, Some(u)) => (key("upstream"), u.clone()),
                (_, None) => return Err(ConfigError::NoUpstream),
            };
            let (host, port) = split_host_port(&upstream.1, DEFAULT_PORT)
                .ok_or_else(|| ConfigError::BadUpstream(upstream.0.clone(), upstream.1.clone()))?;
            let host = host.to_ascii_lowercase();
            let connect_to = match (&cli.connect_to, &e.connect_to) {
                (Some(c), _) if flag("connect_to") || e.connect_to.is_none() => {
                    Some(("--connect-to".to_owned(), c.clone()))
                }
                (_, Some(c)) => Some((key("connect_to"), c.clone())),
                _ => None,
            };
            if let Some((k, c)) = &connect_to
                && split_host_port(c, 0).is_none_or(|(_, p)| p == 0)
            {
                return Err(ConfigError::BadConnectTo(k.clone(), c.clone()));
            }
            let region = match (&e.region, &global_region) {
                (Some(r), _) if !(single && given("region")) => Some((key("region"), r.clone())),
                (_, Some(g)) => Some(g.clone()),
                _ => None,
            };
            let region = match region {
                Some((k, r)) if !valid_region(&r) => return Err(ConfigError::BadRegion(k, r)),
                Some((_, r)) => Some(r),
                None => region_from_host(&host),
            };
            let listen = match &e.listen {
                Some(list) if !flag("listen") => list
                    .iter()
                    .map(|a| {
                        a.parse().map_err(|_| ConfigError::BadValue {
                            key: key("listen"),
                            value: a.clone(),
                            problem: "expected IP:PORT, e.g. 127.0.0.1:5432".into(),
                        })
                    })
                    .collect::<Result<Vec<SocketAddr>, _>>()?,
                // A file endpoint that names only a unix socket listens only there.
                None if !flag("listen") && path.is_some() && e.unix_socket.is_some() => Vec::new(),
                None if !flag("listen") && !single => Vec::new(),
                _ => cli.listen.clone(),
            };
            let unix_socket = if flag("unix_socket") || e.unix_socket.is_none() {
                if single {
                    cli.unix_socket.clone()
                } else {
                    None
                }
            } else {
                e.unix_socket.clone()
            };
            if listen.is_empty() && unix_socket.is_none() {
                return Err(ConfigError::NoListener(match &path {
                    Some(p) => format!("endpoint[{}] in {}", i + 1, p.display()),
                    None => "command line".into(),
                }));
            }
            let upstream_ca = match (&cli.upstream_ca, &e.upstream_ca) {
                (Some(c), _) if flag("upstream_ca") || e.upstream_ca.is_none() => {
                    UpstreamCa::File(c.clone())
                }
                (_, Some(c)) => UpstreamCa::File(c.clone()),
                _ => UpstreamCa::RdsBundle,
            };
            let (cert, key_file) = if flag("tls_cert") || (e.tls_cert.is_none() && single) {
                (cli.tls_cert.clone(), cli.tls_key.clone())
            } else {
                (e.tls_cert.clone(), e.tls_key.clone())
            };
            let client_tls = match (cert, key_file) {
                (Some(cert), Some(key)) => ClientTls::Files { cert, key },
                (None, None) => ClientTls::Local {
                    state_dir: state_dir.clone(),
                },
                _ => {
                    return Err(ConfigError::Conflict {
                        key: key("tls_cert"),
                        problem: "tls_cert and tls_key go together: give both or neither".into(),
                    });
                }
            };
            let gateway = match (&cli.gateway, &e.gateway) {
                (Some(g), _) if flag("gateway") || e.gateway.is_none() => {
                    Some(("--gateway".to_owned(), g.clone()))
                }
                (_, Some(g)) => Some((key("gateway"), g.clone())),
                _ => None,
            };
            let gateway = match gateway {
                None => None,
                Some(_) if cli.gateway_mode => {
                    return Err(ConfigError::Conflict {
                        key: key("gateway"),
                        problem:
                            "a gateway dials the cluster itself: --gateway is for a local proxy"
                                .into(),
                    });
                }
                Some(_) if connect_to.is_some() => {
                    return Err(ConfigError::Conflict {
                        key: key("gateway"),
                        problem: "dials the gateway, so --connect-to has no place beside it".into(),
                    });
                }
                Some((k, g)) => {
                    let (gh, gp) = split_host_port(&g, DEFAULT_PORT)
                        .ok_or_else(|| ConfigError::BadUpstream(k.clone(), g.clone()))?;
                    let id =
                        if single && cli.gateway_server.gateway_id.is_some() && given("gateway_id")
                        {
                            cli.gateway_server.gateway_id.clone()
                        } else {
                            e.gateway_id
                                .clone()
                                .or_else(|| cli.gateway_server.gateway_id.clone())
                        }
                        .unwrap_or_else(|| gh.to_ascii_lowercase());
                    let ca = match (&cli.gateway_ca, &e.gateway_ca) {
                        (Some(c), _) if flag("gateway_ca") || e.gateway_ca.is_none() => {
                            UpstreamCa::File(c.clone())
                        }
                        (_, Some(c)) => UpstreamCa::File(c.clone()),
                        _ => UpstreamCa::System,
                    };
                    Some(ViaGateway {
                        host: gh.to_ascii_lowercase(),
                        port: gp,
                        id,
                        ca,
                    })
                }
            };
            let name = e.name.clone().unwrap_or_else(|| format!("{host}:{port}"));
            endpoints.push(EndpointConfig {
                name,
                upstream_host: host,
                upstream_port: port,
                connect_to: connect_to.map(|(_, c)| c),
                upstream_ca,
                region,
                listen,
                unix_socket,
                client_tls,
                gateway,
            });
        }
        check_distinct(&endpoints, path.as_deref())?;
        if cli.gateway_mode
            && let Some(e) = endpoints.iter().find(|e| e.unix_socket.is_some())
        {
            return Err(ConfigError::Conflict {
                key: format!("endpoint {:?}: unix_socket", e.name),
                problem:
                    "a gateway takes proofs over TLS only, and libpq uses no TLS on unix sockets"
                        .into(),
            });
        }
        if !cli.gateway_mode
            && cli.gateway_server.gateway_id.is_some()
            && endpoints.iter().all(|e| e.gateway.is_none())
        {
            return Err(ConfigError::Conflict {
                key: "--gateway-id".into(),
                problem: "applies with --gateway (the id to sign for) or in gateway mode (rds-iam-proxy gateway)".into(),
            });
        }
        let audit = merge_audit(cli, given, f.audit.as_ref(), &fk)?;
        let gateway = crate::gateway::config::merge(
            cli.gateway_mode,
            &cli.gateway_server,
            given,
            f.gateway.as_ref(),
            &fk,
        )?;
        let allow_remote_clients = pick(
            given("allow_remote_clients"),
            cli.allow_remote_clients,
            f.allow_remote_clients,
        );
        if gateway.is_some() && allow_remote_clients {
            return Err(ConfigError::Conflict {
                key: fk("allow_remote_clients"),
                problem: "applies to the local proxy only: a gateway serves remote clients, each with a proof of who they are".into(),
            });
        }
        // Local mode acts for one identity: a listener others can reach
        // would hand it to them, unless the operator says so.
        if gateway.is_none() && !allow_remote_clients {
            for (i, e) in endpoints.iter().enumerate() {
                if let Some(addr) = e.listen.iter().find(|a| !a.ip().is_loopback()) {
                    let key = match &path {
                        Some(p) if !given("listen") => {
                            format!("endpoint[{}].listen in {}", i + 1, p.display())
                        }
                        _ => "--listen".into(),
                    };
                    return Err(ConfigError::RemoteListener { key, addr: *addr });
                }
            }
        }
        Ok(Config {
            allow_remote_clients,
            gateway,
            audit,
            endpoints,
            identity: IdentityOptions {
                profile: profile.clone(),
                ..env.identity.clone()
            },
            allow_local_users: cli.allow_local_user.clone(),
            profile,
            handshake_timeout,
            connect_timeout,
            login_timeout,
            idle_timeout,
            max_connections,
            max_handshakes,
            max_handshakes_per_source,
            max_sigterm_delay,
            admin,
            log_format,
            worker_threads: cli
                .worker_threads
                .map_or_else(default_worker_threads, |n| n.get()),
            file: path,
        })
    }

    /// The effective configuration as a TOML file (valid input for
    /// `--config`). Nothing secret is held in the configuration: keys are
    /// files, shown by path.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let q = toml_string;
        let d = |d: Duration| {
            if d.subsec_millis() != 0 {
                format!("\"{}ms\"", d.as_millis())
            } else {
                format!("\"{}s\"", d.as_secs())
            }
        };
        let _ = writeln!(s, "# effective configuration of rds-iam-proxy");
        if let Some(p) = &self.profile {
            let _ = writeln!(s, "profile = {}", q(p));
        }
        let _ = writeln!(s, "handshake_timeout = {}", d(self.handshake_timeout));
        let _ = writeln!(s, "connect_timeout = {}", d(self.connect_timeout));
        let _ = writeln!(s, "login_timeout = {}", d(self.login_timeout));
        match self.idle_timeout {
            Some(t) => {
                let _ = writeln!(s, "idle_timeout = {}", d(t));
            }
            None => {
                let _ = writeln!(s, "# idle_timeout: off");
            }
        }
        let _ = writeln!(s, "max_connections = {}", self.max_connections);
        let _ = writeln!(s, "max_handshakes = {}", self.max_handshakes);
        let _ = writeln!(
            s,
            "max_handshakes_per_source = {}",
            self.max_handshakes_per_source
        );
        let _ = writeln!(
            s,
            "# worker_threads: {} (--worker-threads or RDS_IAM_PROXY_WORKER_THREADS only)",
            self.worker_threads
        );
        let _ = writeln!(s, "max_sigterm_delay = {}", d(self.max_sigterm_delay));
        if self.allow_remote_clients {
            let _ = writeln!(s, "allow_remote_clients = true");
        }
        // One directory for every endpoint's local CA (merge gives them all
        // the same): said once at the top, or a reload of this text would
        // fall back to the default.
        if let Some(dir) = self.endpoints.iter().find_map(|e| match &e.client_tls {
            ClientTls::Local { state_dir } => Some(state_dir),
            ClientTls::Files { .. } => None,
        }) {
            let _ = writeln!(s, "state_dir = {}", q(&dir.display().to_string()));
        }
        let _ = writeln!(
            s,
            "log_format = {}",
            q(match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            })
        );
        match &self.admin {
            Some(a) => {
                let _ = writeln!(
                    s,
                    "\n[admin]\nlisten = {}\nupstream_check = {}",
                    q(&a.listen.to_string()),
                    a.upstream_check
                );
            }
            None => {
                let _ = writeln!(s, "# admin listener: off");
            }
        }
        let a = &self.audit;
        let mode = clap::ValueEnum::to_possible_value(&a.mode)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default();
        let _ = writeln!(s, "\n[audit]\nmode = {}", q(&mode));
        if let Some(dir) = &a.dir {
            let _ = writeln!(s, "dir = {}", q(&dir.display().to_string()));
        }
        let _ = writeln!(
            s,
            "parameters = {}\nstamp_application_name = {}\nmax_statement = {}\nrotate_size = {}\nrotate_age = {}\nqueue = {}\nallow_password_changes = {}",
            a.parameters,
            a.stamp_application_name,
            a.max_statement_bytes,
            a.rotate_bytes / (1024 * 1024),
            d(a.rotate_age),
            a.queue_capacity,
            !a.password_guard
        );
        if let Some(g) = &self.gateway {
            crate::gateway::config::render(g, &mut s, &q);
        }
        for e in &self.endpoints {
            let _ = writeln!(s, "\n[[endpoint]]\nname = {}", q(&e.name));
            let _ = writeln!(
                s,
                "upstream = {}",
                q(&format!("{}:{}", e.upstream_host, e.upstream_port))
            );
            match &e.region {
                Some(r) => {
                    let _ = writeln!(s, "region = {}", q(r));
                }
                None => {
                    let _ = writeln!(s, "# region: from the AWS configuration");
                }
            }
            let listen: Vec<String> = e.listen.iter().map(|a| q(&a.to_string())).collect();
            let _ = writeln!(s, "listen = [{}]", listen.join(", "));
            if let Some(u) = &e.unix_socket {
                let _ = writeln!(s, "unix_socket = {}", q(&u.display().to_string()));
            }
            if let Some(c) = &e.connect_to {
                let _ = writeln!(s, "connect_to = {}", q(c));
            }
            if let Some(g) = &e.gateway {
                let _ = writeln!(s, "gateway = {}", q(&format!("{}:{}", g.host, g.port)));
                let _ = writeln!(s, "gateway_id = {}", q(&g.id));
                if let UpstreamCa::File(p) = &g.ca {
                    let _ = writeln!(s, "gateway_ca = {}", q(&p.display().to_string()));
                }
            }
            match &e.upstream_ca {
                UpstreamCa::File(p) => {
                    let _ = writeln!(s, "upstream_ca = {}", q(&p.display().to_string()));
                }
                UpstreamCa::RdsBundle => {
                    let _ = writeln!(s, "# upstream_ca: the embedded Amazon RDS bundle");
                }
                UpstreamCa::System => {
                    let _ = writeln!(s, "# upstream_ca: the system's trust store");
                }
            }
            match &e.client_tls {
                ClientTls::Files { cert, key } => {
                    let _ = writeln!(
                        s,
                        "tls_cert = {}\ntls_key = {}",
                        q(&cert.display().to_string()),
                        q(&key.display().to_string())
                    );
                }
                // The local CA's directory is the top-level state_dir.
                ClientTls::Local { .. } => {}
            }
        }
        s
    }

    /// Shorthand for the first endpoint (the only one from the flags).
    pub fn first(&self) -> &EndpointConfig {
        &self.endpoints[0]
    }
}

impl EndpointConfig {
    /// The port in the unix socket's file name.
    pub fn unix_socket_port(&self) -> u16 {
        match self.listen.first() {
            Some(a) if a.port() != 0 => a.port(),
            _ => DEFAULT_PORT,
        }
    }

    /// `host:port` as signed into tokens.
    pub fn upstream_name(&self) -> String {
        format!("{}:{}", self.upstream_host, self.upstream_port)
    }
}

/// A flag's value when given, else the file's, else the flag's default.
/// `--audit-*` flags over the `[audit]` table.
fn merge_audit(
    cli: &ProxyArgs,
    given: Given<'_>,
    file: Option<&AuditFile>,
    fk: &dyn Fn(&str) -> String,
) -> Result<crate::audit::AuditConfig, ConfigError> {
    use clap::ValueEnum;
    let a = &cli.audit;
    let empty = AuditFile::default();
    let t = file.unwrap_or(&empty);
    let mode = match (&t.mode, given("mode")) {
        (Some(v), false) => {
            crate::audit::Mode::from_str(v, true).map_err(|_| ConfigError::BadValue {
                key: fk("audit.mode"),
                value: v.clone(),
                problem: "use \"off\", \"async\" or \"sync\"".into(),
            })?
        }
        _ => a.mode,
    };
    let rotate_age = match (&t.rotate_age, given("rotate_age")) {
        (Some(v), false) => parse_duration(v).map_err(|problem| ConfigError::BadValue {
            key: fk("audit.rotate_age"),
            value: v.clone(),
            problem,
        })?,
        _ => a.rotate_age,
    };
    let dir = pick(given("dir"), a.dir.clone(), t.dir.clone().map(Some));
    if mode != crate::audit::Mode::Off && dir.is_none() {
        return Err(ConfigError::NoAuditDir);
    }
    let allow_password_changes = pick(
        given("allow_password_changes"),
        a.allow_password_changes,
        t.allow_password_changes,
    );
    Ok(crate::audit::AuditConfig {
        mode,
        dir,
        password_guard: !allow_password_changes,
        parameters: pick(given("parameters"), a.parameters, t.parameters),
        stamp_application_name: pick(
            given("stamp_application_name"),
            a.stamp_application_name,
            t.stamp_application_name,
        ),
        max_statement_bytes: pick(given("max_statement"), a.max_statement, t.max_statement).max(64),
        rotate_bytes: pick(given("rotate_mib"), a.rotate_mib, t.rotate_size).max(1) * 1024 * 1024,
        rotate_age: rotate_age.max(Duration::from_secs(1)),
        queue_capacity: pick(given("queue"), a.queue, t.queue).max(16),
    })
}

/// `v` as a TOML basic string: `"`, `\\` and control characters escaped
/// the TOML way (Rust's `{:?}` writes `\u{1b}`, which TOML refuses).
fn toml_string(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub(crate) fn pick<T>(flag_given: bool, flag: T, file: Option<T>) -> T {
    match file {
        Some(v) if !flag_given => v,
        _ => flag,
    }
}

pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::ParseFile {
        path: path.display().to_string(),
        message: e.to_string().trim_end().to_owned(),
    })
}

fn parse_admin_listen(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(port) = v.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    v.parse().map_err(|_| ConfigError::BadValue {
        key: key.to_owned(),
        value: v.to_owned(),
        problem: "expected PORT (on 127.0.0.1) or IP:PORT".into(),
    })
}

/// Two endpoints may not share a name, a TCP address or a socket file.
fn check_distinct(endpoints: &[EndpointConfig], path: Option<&Path>) -> Result<(), ConfigError> {
    let at = |i: usize, k: &str| match path {
        Some(p) => format!("endpoint[{}].{k} in {}", i + 1, p.display()),
        None => k.to_owned(),
    };
    for (i, a) in endpoints.iter().enumerate() {
        for b in &endpoints[..i] {
            if a.name == b.name {
                return Err(ConfigError::Conflict {
                    key: at(i, "name"),
                    problem: format!(
                        "{:?} is used twice: give each endpoint its own name",
                        a.name
                    ),
                });
            }
            if let Some(addr) = a
                .listen
                .iter()
                .find(|x| x.port() != 0 && b.listen.contains(x))
            {
                return Err(ConfigError::Conflict {
                    key: at(i, "listen"),
                    problem: format!("{addr} is also endpoint {:?}'s address", b.name),
                });
            }
            if a.unix_socket.is_some()
                && a.unix_socket == b.unix_socket
                && a.unix_socket_port() == b.unix_socket_port()
            {
                return Err(ConfigError::Conflict {
                    key: at(i, "unix_socket"),
                    problem: format!(
                        "same socket file .s.PGSQL.{} as endpoint {:?}: use another directory or give listen a different port",
                        a.unix_socket_port(),
                        b.name
                    ),
                });
            }
        }
    }
    Ok(())
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
mod tests {
    use super::*;
    use clap::parser::ValueSource;
    use clap::{CommandFactory, FromArgMatches};

    fn cli(args: &[&str]) -> ProxyArgs {
        <crate::cli::Cli as clap::Parser>::try_parse_from([&["rds-iam-proxy"], args].concat())
            .unwrap()
            .proxy
    }

    /// Parses like main does (defaults told apart from given values) and
    /// merges `toml` as the file. Environment variables are covered by the
    /// binary's tests (tests/ops.rs): clap reads the real environment.
    /// `rds-iam-proxy gateway ARGS`, flags over an optional file.
    fn load_gateway(args: &[&str], toml: Option<&str>) -> Result<Config, ConfigError> {
        load(&[&["gateway"], args].concat(), toml)
    }

    /// Gateway mode and the local proxy's --gateway: what each needs, what
    /// belongs to the other, and the listener rule of local mode.
    #[test]
    fn gateway_settings_on_both_sides() {
        const UP: &str = "db.cluster-a.eu-west-1.rds.amazonaws.com";
        // Gateway side: id and a trusted account are required; defaults.
        let g = load_gateway(
            &[
                "--upstream",
                UP,
                "--listen",
                "0.0.0.0:5432",
                "--gateway-id",
                "bastion",
                "--trust-account",
                "111122223333",
            ],
            None,
        )
        .unwrap();
        let gw = g.gateway.as_ref().unwrap();
        assert_eq!(gw.trust_roles, ["AWSReservedSSO_*"]);
        assert_eq!(gw.sts_region, None);
        let err =
            load_gateway(&["--upstream", UP, "--trust-account", "111122223333"], None).unwrap_err();
        assert!(err.to_string().contains("--gateway-id"), "{err}");
        let err = load_gateway(&["--upstream", UP, "--gateway-id", "b"], None).unwrap_err();
        assert!(err.to_string().contains("--trust-account"), "{err}");
        let err = load_gateway(
            &[
                "--upstream",
                UP,
                "--gateway-id",
                "b",
                "--trust-account",
                "1234",
            ],
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("12 digits"), "{err}");
        // The file's [gateway] table, under the flags.
        let g = load_gateway(
            &["--upstream", UP, "--trust-role", "Exact"],
            Some("[gateway]\nid = \"bastion\"\ntrust_accounts = [\"111122223333\"]\ntrust_roles = [\"AWSReservedSSO_DBA*\"]\n"),
        )
        .unwrap();
        assert_eq!(g.gateway.as_ref().unwrap().trust_roles, ["Exact"]);
        assert!(
            g.render().contains("[gateway]\nid = \"bastion\""),
            "{}",
            g.render()
        );
        // A gateway does not chain to another.
        let err = load_gateway(
            &[
                "--upstream",
                UP,
                "--gateway-id",
                "b",
                "--trust-account",
                "111122223333",
                "--gateway",
                "x:1",
            ],
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("a gateway dials the cluster itself"),
            "{err}"
        );

        // Local side: gateway-server settings are refused, the hop is read.
        let err = load(&["--upstream", UP, "--trust-account", "111122223333"], None).unwrap_err();
        assert!(err.to_string().contains("rds-iam-proxy gateway"), "{err}");
        let err = load(&["--upstream", UP], Some("[gateway]\nid = \"x\"\n")).unwrap_err();
        assert!(err.to_string().contains("[gateway]"), "{err}");
        let c = load(
            &["--upstream", UP, "--gateway", "Bastion.example:6432"],
            None,
        )
        .unwrap();
        let hop = c.first().gateway.as_ref().unwrap();
        assert_eq!(
            (hop.host.as_str(), hop.port, hop.id.as_str()),
            ("bastion.example", 6432, "bastion.example")
        );
        assert_eq!(hop.ca, UpstreamCa::System);
        let c = load(
            &["--upstream", UP, "--gateway", "b:1", "--gateway-id", "gw-1"],
            None,
        )
        .unwrap();
        assert_eq!(c.first().gateway.as_ref().unwrap().id, "gw-1");
        let err = load(
            &[
                "--upstream",
                UP,
                "--gateway",
                "b:1",
                "--connect-to",
                "127.0.0.1:5",
            ],
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("--connect-to"), "{err}");
        let err = load(&["--upstream", UP, "--gateway-id", "gw-1"], None).unwrap_err();
        assert!(err.to_string().contains("applies with --gateway"), "{err}");

        // Local mode listens where others cannot reach it, unless told.
        for addr in ["0.0.0.0:5432", "[::]:5432", "10.1.2.3:5432"] {
            let err = load(&["--upstream", UP, "--listen", addr], None).unwrap_err();
            assert!(
                matches!(err, ConfigError::RemoteListener { .. }),
                "{addr}: {err}"
            );
        }
        let err = load(
            &["--upstream", UP],
            Some("[[endpoint]]\nlisten = [\"0.0.0.0:5432\"]\n"),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("endpoint[1].listen in /etc/p.toml"),
            "{err}"
        );
        let c = load(
            &[
                "--upstream",
                UP,
                "--listen",
                "0.0.0.0:5432",
                "--allow-remote-clients",
            ],
            None,
        )
        .unwrap();
        assert!(c.allow_remote_clients);
        assert!(c.render().contains("allow_remote_clients = true"));
        let err = load_gateway(
            &[
                "--upstream",
                UP,
                "--gateway-id",
                "b",
                "--trust-account",
                "111122223333",
                "--allow-remote-clients",
            ],
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("local proxy only"), "{err}");
    }

    /// Flags over an optional file, as main() loads them; `gateway` as the
    /// first argument runs the gateway subcommand.
    fn load(args: &[&str], toml: Option<&str>) -> Result<Config, ConfigError> {
        let mut cmd = crate::cli::Cli::command();
        let argv = [&["rds-iam-proxy"], args].concat();
        let top = cmd.try_get_matches_from_mut(argv).unwrap();
        let parsed = crate::cli::Cli::from_arg_matches(&top).unwrap();
        let (m, proxy) = match parsed.command {
            Some(crate::cli::Command::Gateway(mut g)) => {
                g.proxy.gateway_mode = true;
                (top.subcommand_matches("gateway").unwrap(), g.proxy)
            }
            _ => (&top, parsed.proxy),
        };
        let given = |id: &str| {
            matches!(
                m.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        let path = Path::new("/etc/p.toml");
        let file = match toml {
            Some(t) => Some((path.to_owned(), parse_file(path, t)?)),
            None => None,
        };
        Config::merge(&proxy, &given, file, &Env::default())
    }

    /// Found by the config fuzz target: the rendering left the local CA's
    /// directory in a comment, so it read back as the default.
    #[test]
    fn state_dir_reads_back_from_the_rendering() {
        let c = load(&["--upstream", "db.x"], Some("state_dir = \"/srv/ca\"\n")).unwrap();
        let local = ClientTls::Local {
            state_dir: PathBuf::from("/srv/ca"),
        };
        assert_eq!(c.first().client_tls, local);
        let again = load(&[], Some(&c.render())).unwrap();
        assert_eq!(again.first().client_tls, local);
        // Also a path with characters TOML must escape.
        let odd = "state_dir = \"/srv/c\\ea \\\"q\\\" \\\\ \\t\"\n";
        let c = load(&["--upstream", "db.x"], Some(odd)).unwrap();
        let again = load(&[], Some(&c.render())).unwrap();
        assert_eq!(again.first().client_tls, c.first().client_tls);
        let ClientTls::Local { state_dir } = &c.first().client_tls else {
            panic!("not the local CA");
        };
        assert_eq!(state_dir, Path::new("/srv/c\u{1b}a \"q\" \\ \t"));
    }

    #[test]
    fn audit_table_under_the_flags() {
        let toml = "[audit]\nmode = \"sync\"\ndir = \"/var/log/rip\"\nrotate_age = \"1h\"\nallow_password_changes = true\n";
        let c = load(&["--upstream", "db.x"], Some(toml)).unwrap();
        assert_eq!(c.audit.mode, crate::audit::Mode::Sync);
        assert_eq!(c.audit.dir.as_deref(), Some(Path::new("/var/log/rip")));
        assert_eq!(c.audit.rotate_age, Duration::from_secs(3600));
        assert!(!c.audit.password_guard);
        // A flag beats the file.
        let c = load(&["--upstream", "db.x", "--audit-mode", "async"], Some(toml)).unwrap();
        assert_eq!(c.audit.mode, crate::audit::Mode::Async);
        // The effective configuration reads back as the same.
        let again = load(&[], Some(&c.render())).unwrap();
        assert_eq!(again.audit, c.audit);
        let e = load(&["--upstream", "db.x"], Some("[audit]\nmode = \"loud\"\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "audit.mode in /etc/p.toml \"loud\": use \"off\", \"async\" or \"sync\""
        );
        let e = load(&["--upstream", "db.x"], Some("[audit]\nmode = \"async\"\n")).unwrap_err();
        assert_eq!(e, ConfigError::NoAuditDir);
        assert!(load(&["--upstream", "db.x"], Some("[audit]\nfsync = true\n")).is_err());
    }

    #[test]
    fn region_comes_from_the_endpoint() {
        let h = "demo.cluster-c0ffee.eu-west-1.rds.amazonaws.com";
        assert_eq!(region_from_host(h).as_deref(), Some("eu-west-1"));
        assert_eq!(
            region_from_host("x.cluster-ro-abc.cn-north-1.rds.amazonaws.com.cn").as_deref(),
            Some("cn-north-1")
        );
        assert_eq!(
            region_from_host("us-gov-west-1.rds.amazonaws.com").as_deref(),
            Some("us-gov-west-1")
        );
        assert_eq!(region_from_host("db.internal.example"), None);
    }

    #[test]
    fn upstream_defaults_and_overrides() {
        let c = Config::from_cli(
            &cli(&["--upstream", "Demo.cluster-x.eu-west-1.rds.amazonaws.com"]),
            None,
            None,
        )
        .unwrap();
        let e = c.first();
        assert_eq!(
            e.upstream_host,
            "demo.cluster-x.eu-west-1.rds.amazonaws.com"
        );
        assert_eq!(e.upstream_port, 5432);
        assert_eq!(e.region.as_deref(), Some("eu-west-1"));
        assert_eq!(e.listen, ["127.0.0.1:5432".parse().unwrap()]);
        let c = Config::from_cli(
            &cli(&["--upstream", "db.example:6000", "--region", "us-east-2"]),
            Some("/home/a".into()),
            None,
        )
        .unwrap();
        let e = c.first();
        assert_eq!(
            (e.upstream_port, e.region.as_deref()),
            (6000, Some("us-east-2"))
        );
        assert!(
            matches!(e.client_tls, ClientTls::Local { ref state_dir } if state_dir.ends_with(".local/state/rds-iam-proxy"))
        );
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = Config::from_cli(&cli(&["--upstream", "db:notaport"]), None, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--upstream \"db:notaport\": expected HOST or HOST:PORT"
        );
        let e = Config::from_cli(
            &cli(&["--upstream", "db", "--region", "Europe"]),
            None,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::BadRegion(..)));
        let e = Config::from_cli(
            &cli(&["--upstream", "db", "--connect-to", "127.0.0.1"]),
            None,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::BadConnectTo(..)));
    }

    const FILE: &str = r#"
max_connections = 7
handshake_timeout = "3s"
[admin]
listen = "9999"
[[endpoint]]
upstream = "db.cluster-a.eu-west-1.rds.amazonaws.com"
listen = ["127.0.0.1:6432"]
"#;

    #[test]
    fn flags_beat_file_beats_defaults() {
        // File only: its values replace the defaults.
        let c = load(&[], Some(FILE)).unwrap();
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.handshake_timeout, Duration::from_secs(3));
        assert_eq!(c.login_timeout, Duration::from_secs(30), "default");
        assert_eq!(c.first().listen, ["127.0.0.1:6432".parse().unwrap()]);
        assert_eq!(
            c.admin.as_ref().unwrap().listen,
            "127.0.0.1:9999".parse().unwrap()
        );
        // A flag beats the file.
        let c = load(
            &["--max-connections", "9", "--listen", "127.0.0.1:7000"],
            Some(FILE),
        )
        .unwrap();
        assert_eq!(c.max_connections, 9);
        assert_eq!(c.first().listen, ["127.0.0.1:7000".parse().unwrap()]);
        assert_eq!(
            c.first().upstream_host,
            "db.cluster-a.eu-west-1.rds.amazonaws.com"
        );
    }

    #[test]
    fn file_errors_name_the_key_and_the_fix() {
        let e = load(&[], Some("max_conections = 3\n")).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("/etc/p.toml")
                && m.contains("max_conections")
                && m.contains("unknown field"),
            "{m}"
        );
        let e = load(
            &[],
            Some("[[endpoint]]\nupstream = \"db\"\nlisten = [\"localhost:5432\"]\n"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "endpoint[1].listen in /etc/p.toml \"localhost:5432\": expected IP:PORT, e.g. 127.0.0.1:5432"
        );
        let e = load(
            &[],
            Some("idle_timeout = \"2 weeks\"\n[[endpoint]]\nupstream = \"db\"\n"),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("idle_timeout in /etc/p.toml \"2 weeks\""),
            "{e}"
        );
        let e = load(&[], Some("[[endpoint]]\nlisten = [\"127.0.0.1:1\"]\n")).unwrap_err();
        assert_eq!(e, ConfigError::NoUpstream);
    }

    #[test]
    fn two_endpoints_and_their_conflicts() {
        let two = r#"
[[endpoint]]
name = "writer"
upstream = "db.cluster-a.eu-west-1.rds.amazonaws.com"
listen = ["127.0.0.1:5432"]
[[endpoint]]
name = "reader"
upstream = "db.cluster-ro-a.eu-west-1.rds.amazonaws.com"
listen = ["127.0.0.1:5433"]
unix_socket = "/run/p"
"#;
        let c = load(&[], Some(two)).unwrap();
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.endpoints[1].name, "reader");
        assert_eq!(c.endpoints[1].unix_socket_port(), 5433);
        assert_eq!(c.endpoints[0].unix_socket, None);
        // The rendering reads back as the same configuration.
        let again = load(&[], Some(&c.render())).unwrap();
        assert_eq!(again.endpoints, c.endpoints);
        assert_eq!(again.max_connections, c.max_connections);

        let e = load(&["--listen", "127.0.0.1:1"], Some(two)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--listen: the file has 2 [[endpoint]] tables"),
            "{e}"
        );
        let e = load(&[], Some(&two.replace("5433", "5432"))).unwrap_err();
        assert!(
            e.to_string().contains("endpoint[2].listen") && e.to_string().contains("writer"),
            "{e}"
        );
        let e = load(&[], Some(&two.replace("\"reader\"", "\"writer\""))).unwrap_err();
        assert!(e.to_string().contains("endpoint[2].name"), "{e}");
    }

    /// A reload names every start-only setting it would change, and lets
    /// the reloadable ones through.
    #[test]
    fn start_only_settings_are_named_on_reload() {
        let base = "max_connections = 5\nhandshake_timeout = \"3s\"\n[audit]\nmode = \"off\"\n";
        let running = load(&["--upstream", "db.x"], Some(base)).unwrap();
        let changes = |toml: &str, args: &[&str]| {
            let new = load(&[&["--upstream", "db.x"], args].concat(), Some(toml)).unwrap();
            crate::reloadable::start_only_changes(&running, &new)
        };
        let reloadable = "max_connections = 1\nhandshake_timeout = \"9s\"\nidle_timeout = \"1h\"\n[audit]\nmode = \"off\"\n";
        assert_eq!(
            changes(reloadable, &["--connect-to", "127.0.0.1:1"]),
            Vec::<String>::new()
        );
        let audit = "max_connections = 5\n[audit]\nmode = \"sync\"\ndir = \"/var/log/rip\"\n";
        assert_eq!(changes(audit, &[]), ["audit"]);
        assert_eq!(
            changes(
                base,
                &[
                    "--profile",
                    "other",
                    "--allow-local-user",
                    "0",
                    "--listen",
                    "127.0.0.1:7777"
                ]
            ),
            [
                "profile",
                "allow_local_users",
                "endpoint \"db.x:5432\": listen"
            ]
        );
    }
}
