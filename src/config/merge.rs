//! Flags over the file over defaults, then validation: [`Config::merge`].
//! A flag wins over the file only when it was given ([`super::Given`]);
//! every error names where the value came from (`--flag`, or
//! `key in FILE`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::cli::{LogFormat, ProxyArgs, parse_duration};

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
        let duration = |flag: &str, flag_value: Duration, file_value: &Option<String>| {
            pick_duration(given(flag), flag_value, file_value.as_ref(), &|| fk(flag))
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
        let admin_listen = match (&cli.admin_listen, &f.admin) {
            (Some(l), _) => Some(parse_admin_listen("--admin-listen", l)?),
            (None, Some(a)) => Some(parse_admin_listen(&fk("admin.listen"), &a.listen)?),
            (None, None) => None,
        };
        let admin_upstream_check = cli.admin_upstream_check
            || f.admin.as_ref().and_then(|a| a.upstream_check) == Some(true);
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
                start: EndpointStart {
                    name,
                    upstream_host: host,
                    upstream_port: port,
                    region,
                    listen,
                    unix_socket,
                    gateway,
                },
                live: EndpointLive {
                    connect_to: connect_to.map(|(_, c)| c),
                    upstream_ca,
                    client_tls,
                },
            });
        }
        check_distinct(&endpoints, path.as_deref())?;
        if cli.gateway_mode
            && let Some(e) = endpoints.iter().find(|e| e.start.unix_socket.is_some())
        {
            return Err(ConfigError::Conflict {
                key: format!("endpoint {:?}: unix_socket", e.start.name),
                problem:
                    "a gateway takes proofs over TLS only, and libpq uses no TLS on unix sockets"
                        .into(),
            });
        }
        if !cli.gateway_mode
            && cli.gateway_server.gateway_id.is_some()
            && endpoints.iter().all(|e| e.start.gateway.is_none())
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
                if let Some(addr) = e.start.listen.iter().find(|a| !a.ip().is_loopback()) {
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
            start: StartOnly {
                identity: IdentityOptions {
                    profile: profile.clone(),
                    ..env.identity.clone()
                },
                profile,
                allow_local_users: cli.allow_local_user.clone(),
                allow_remote_clients,
                gateway,
                audit,
                admin_listen,
                log_format,
                worker_threads: cli
                    .worker_threads
                    .map_or_else(default_worker_threads, |n| n.get()),
            },
            live: Reloadable {
                handshake_timeout,
                connect_timeout,
                login_timeout,
                idle_timeout,
                max_connections,
                max_handshakes,
                max_handshakes_per_source,
                max_sigterm_delay,
                admin_upstream_check,
            },
            endpoints,
            file: path,
        })
    }
}

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
    let rotate_age = pick_duration(
        given("rotate_age"),
        a.rotate_age,
        t.rotate_age.as_ref(),
        &|| fk("audit.rotate_age"),
    )?;
    let dir = pick(given("dir"), a.dir.clone(), t.dir.clone().map(Some));
    if mode != crate::audit::Mode::Off && dir.is_none() {
        return Err(ConfigError::NoAuditDir);
    }
    let digest_interval = pick_duration(
        given("digest_interval"),
        a.digest_interval,
        t.digest_interval.as_ref(),
        &|| fk("audit.digest_interval"),
    )?;
    let sign_key = match (&a.sign_key, &t.sign_key) {
        (Some(v), _) if given("sign_key") => Some(("--audit-sign-key".to_owned(), v)),
        (_, Some(v)) => Some((fk("audit.sign_key"), v)),
        (Some(v), None) => Some(("--audit-sign-key".to_owned(), v)),
        (None, None) => None,
    };
    let sign_key = match sign_key {
        None => None,
        Some((key, v)) => Some(crate::audit::SignKey::parse(v).ok_or_else(|| {
            ConfigError::BadValue {
                key,
                value: v.clone(),
                problem: "expected kms:KEY (a KMS key id, ARN or alias) or file:PATH (a P-256 private key in PEM)".into(),
            }
        })?),
    };
    if sign_key.is_some() && mode == crate::audit::Mode::Off {
        return Err(ConfigError::Conflict {
            key: fk("audit.sign_key"),
            problem: "signs the audit trail's digests: it needs --audit-mode async|sync".into(),
        });
    }
    let ship = merge_ship(a, given, t, fk)?;
    if mode == crate::audit::Mode::Off
        && (ship.s3_bucket.is_some() || ship.kinesis_stream.is_some())
    {
        return Err(ConfigError::Conflict {
            key: fk("audit.s3_bucket / audit.kinesis_stream"),
            problem: "ships the audit trail: it needs --audit-mode async|sync".into(),
        });
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
        sign_key,
        digest_interval: digest_interval.max(Duration::from_secs(1)),
        ship,
        role_arn: pick(
            given("role_arn"),
            a.role_arn.clone(),
            t.role_arn.clone().map(Some),
        ),
        queue_capacity: pick(given("queue"), a.queue, t.queue).max(16),
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
            if a.start.name == b.start.name {
                return Err(ConfigError::Conflict {
                    key: at(i, "name"),
                    problem: format!(
                        "{:?} is used twice: give each endpoint its own name",
                        a.start.name
                    ),
                });
            }
            if let Some(addr) = a
                .start
                .listen
                .iter()
                .find(|x| x.port() != 0 && b.start.listen.contains(x))
            {
                return Err(ConfigError::Conflict {
                    key: at(i, "listen"),
                    problem: format!("{addr} is also endpoint {:?}'s address", b.start.name),
                });
            }
            if a.start.unix_socket.is_some()
                && a.start.unix_socket == b.start.unix_socket
                && a.unix_socket_port() == b.unix_socket_port()
            {
                return Err(ConfigError::Conflict {
                    key: at(i, "unix_socket"),
                    problem: format!(
                        "same socket file .s.PGSQL.{} as endpoint {:?}: use another directory or give listen a different port",
                        a.unix_socket_port(),
                        b.start.name
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The shipping flags over the `[audit]` table's shipping keys.
fn merge_ship(
    a: &crate::cli::AuditArgs,
    given: Given<'_>,
    t: &AuditFile,
    fk: &dyn Fn(&str) -> String,
) -> Result<crate::audit::ship::ShipConfig, ConfigError> {
    use clap::ValueEnum as _;
    let lock_mode = match (&t.s3_lock_mode, given("s3_lock_mode")) {
        (Some(v), false) => Some(crate::audit::ship::LockMode::from_str(v, true).map_err(
            |_| ConfigError::BadValue {
                key: fk("audit.s3_lock_mode"),
                value: v.clone(),
                problem: "use \"compliance\" or \"governance\"".into(),
            },
        )?),
        _ => a.s3_lock_mode,
    };
    let retention = pick_duration(
        given("s3_retention"),
        a.s3_retention,
        t.s3_retention.as_ref(),
        &|| fk("audit.s3_retention"),
    )?;
    let mut prefix = pick(given("s3_prefix"), a.s3_prefix.clone(), t.s3_prefix.clone());
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    let instance_id = pick(
        given("instance_id"),
        a.instance_id.clone(),
        t.instance_id.clone().map(Some),
    )
    .unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    });
    if instance_id.is_empty()
        || !instance_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ConfigError::BadValue {
            key: fk("audit.instance_id"),
            value: instance_id,
            problem: "letters, digits, '-', '_' and '.' only: it names the instance in S3 keys"
                .into(),
        });
    }
    Ok(crate::audit::ship::ShipConfig {
        instance_id,
        s3_bucket: pick(
            given("s3_bucket"),
            a.s3_bucket.clone(),
            t.s3_bucket.clone().map(Some),
        ),
        s3_prefix: prefix,
        s3_lock: lock_mode.map(|m| (m, retention.max(Duration::from_secs(1)))),
        kinesis_stream: pick(
            given("kinesis_stream"),
            a.kinesis_stream.clone(),
            t.kinesis_stream.clone().map(Some),
        ),
        spool_max_bytes: pick(given("spool_max_mib"), a.spool_max_mib, t.spool_max) << 20,
    })
}
