//! The validated configuration, built once from the command line and then
//! shared read-only as `Arc<Config>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::cli::{LogFormat, ProxyArgs};
use crate::tls::UpstreamCa;

/// Default PostgreSQL port.
pub const DEFAULT_PORT: u16 = 5432;

#[derive(Debug, Clone)]
pub struct Config {
    /// Endpoint name (lowercase) that tokens are signed for and TLS checks.
    pub upstream_host: String,
    pub upstream_port: u16,
    /// Address dialled instead of the endpoint name, if any.
    pub connect_to: Option<String>,
    pub upstream_ca: UpstreamCa,
    /// Region from --region or the endpoint name; `None` means "ask the
    /// AWS configuration".
    pub region: Option<String>,
    pub profile: Option<String>,
    pub listen: Vec<SocketAddr>,
    /// Directory for the unix socket.
    pub unix_socket: Option<PathBuf>,
    pub client_tls: ClientTls,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub login_timeout: Duration,
    pub log_format: LogFormat,
    /// Audit log and password guard.
    pub audit: crate::audit::AuditConfig,
}

/// The certificate shown to clients.
#[derive(Debug, Clone)]
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
        "--upstream is required: the Aurora endpoint name, e.g. mydb.cluster-abc.eu-west-1.rds.amazonaws.com"
    )]
    NoUpstream,
    #[error("--upstream {0:?}: expected HOST or HOST:PORT")]
    BadUpstream(String),
    #[error("--connect-to {0:?}: expected HOST:PORT")]
    BadConnectTo(String),
    #[error("--region {0:?} does not look like an AWS region (e.g. eu-west-1)")]
    BadRegion(String),
    #[error("no listen address: give --listen or --unix-socket")]
    NoListener,
    #[error("--audit-mode async|sync needs --audit-dir DIR")]
    NoAuditDir,
}

impl Config {
    /// Validates the command line. `home`/`xdg_state_home` come from the
    /// environment and are passed in so this stays pure.
    pub fn from_cli(
        cli: &ProxyArgs,
        home: Option<PathBuf>,
        xdg_state_home: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        let upstream = cli.upstream.as_deref().ok_or(ConfigError::NoUpstream)?;
        let (host, port) = parse_upstream(upstream)?;
        if let Some(c) = &cli.connect_to
            && split_host_port(c, 0).is_none_or(|(_, p)| p == 0)
        {
            return Err(ConfigError::BadConnectTo(c.clone()));
        }
        let region = resolve_region(cli.aws.region.as_deref(), &host)?;
        if cli.listen.is_empty() && cli.unix_socket.is_none() {
            return Err(ConfigError::NoListener);
        }
        let client_tls = match (&cli.tls_cert, &cli.tls_key) {
            (Some(cert), Some(key)) => ClientTls::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => ClientTls::Local {
                state_dir: cli
                    .state_dir
                    .clone()
                    .unwrap_or_else(|| crate::local_ca::default_state_dir(xdg_state_home, home)),
            },
        };
        let a = &cli.audit;
        if a.mode != crate::audit::Mode::Off && a.dir.is_none() {
            return Err(ConfigError::NoAuditDir);
        }
        let audit = crate::audit::AuditConfig {
            mode: a.mode,
            dir: a.dir.clone(),
            password_guard: !a.allow_password_changes,
            parameters: a.parameters,
            max_statement_bytes: a.max_statement.max(64),
            rotate_bytes: a.rotate_mib.max(1) * 1024 * 1024,
            rotate_age: a.rotate_age.max(std::time::Duration::from_secs(1)),
            queue_capacity: a.queue.max(16),
        };
        Ok(Config {
            audit,
            region,
            upstream_host: host,
            upstream_port: port,
            connect_to: cli.connect_to.clone(),
            upstream_ca: match &cli.upstream_ca {
                Some(p) => UpstreamCa::File(p.clone()),
                None => UpstreamCa::RdsBundle,
            },
            profile: cli.aws.profile.clone(),
            listen: cli.listen.clone(),
            unix_socket: cli.unix_socket.clone(),
            client_tls,
            handshake_timeout: cli.handshake_timeout,
            connect_timeout: cli.connect_timeout,
            login_timeout: cli.login_timeout,
            log_format: cli.log_format,
        })
    }

    /// The port in the unix socket's file name.
    pub fn unix_socket_port(&self) -> u16 {
        match self.listen.first() {
            Some(a) if a.port() != 0 => a.port(),
            _ => DEFAULT_PORT,
        }
    }
}

/// The endpoint name (lowercase) and port of an `--upstream` value.
pub fn parse_upstream(value: &str) -> Result<(String, u16), ConfigError> {
    let (host, port) = split_host_port(value, DEFAULT_PORT)
        .ok_or_else(|| ConfigError::BadUpstream(value.to_owned()))?;
    Ok((host.to_ascii_lowercase(), port))
}

/// `--region` if given (checked), else the region in the endpoint name;
/// `None` leaves it to the AWS configuration.
pub fn resolve_region(flag: Option<&str>, host: &str) -> Result<Option<String>, ConfigError> {
    match flag {
        Some(r) if !valid_region(r) => Err(ConfigError::BadRegion(r.to_owned())),
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
    use clap::Parser;

    fn cli(args: &[&str]) -> ProxyArgs {
        crate::cli::Cli::try_parse_from([&["rds-iam-proxy"], args].concat())
            .unwrap()
            .proxy
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
        assert_eq!(
            c.upstream_host,
            "demo.cluster-x.eu-west-1.rds.amazonaws.com"
        );
        assert_eq!(c.upstream_port, 5432);
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.listen, ["127.0.0.1:5432".parse().unwrap()]);
        let c = Config::from_cli(
            &cli(&["--upstream", "db.example:6000", "--region", "us-east-2"]),
            Some("/home/a".into()),
            None,
        )
        .unwrap();
        assert_eq!(
            (c.upstream_port, c.region.as_deref()),
            (6000, Some("us-east-2"))
        );
        assert!(
            matches!(c.client_tls, ClientTls::Local { ref state_dir } if state_dir.ends_with(".local/state/rds-iam-proxy"))
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
        assert!(matches!(e, ConfigError::BadRegion(_)));
        let e = Config::from_cli(
            &cli(&["--upstream", "db", "--connect-to", "127.0.0.1"]),
            None,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::BadConnectTo(_)));
    }
}
