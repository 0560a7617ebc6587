//! Gateway settings: the `gateway` subcommand's flags, the `[gateway]`
//! table, and the validated [`GatewayConfig`] (flag over file over default,
//! like every other setting).

use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::cli::parse_duration;
use crate::config::{ConfigError, Given, pick, pick_duration};

/// Roles trusted when none are given: IAM Identity Center permission
/// sets, whose trust policy admits federation alone, so that the session
/// name is the person's Identity Center user name.
pub const DEFAULT_TRUSTED_ROLE: &str = "AWSReservedSSO_*";

/// The gateway's flags (`rds-iam-proxy gateway`).
#[derive(Debug, Clone, Args, Default)]
#[command(next_help_heading = "Gateway mode (rds-iam-proxy gateway)")]
pub struct GatewayArgs {
    /// The gateway's id, which every proof is signed for. In gateway mode
    /// (required): this gateway's, the name clients reach it by (the name
    /// in its certificate). With --gateway: the id to sign for [default:
    /// the --gateway host].
    #[arg(long, env = "RDS_IAM_PROXY_GATEWAY_ID", value_name = "ID")]
    pub gateway_id: Option<String>,

    /// An AWS account (12 digits) whose people may log in through the
    /// gateway; repeat for several. Required in gateway mode.
    #[arg(
        long,
        env = "RDS_IAM_PROXY_TRUST_ACCOUNT",
        value_name = "ACCOUNT_ID",
        value_delimiter = ','
    )]
    pub trust_account: Vec<String>,

    /// A role people may come from: an exact role name, or a prefix ending
    /// in `*`; repeat for several [default: AWSReservedSSO_* (IAM Identity
    /// Center permission sets)]. The person is the role session's name, so
    /// trust only roles whose session name the person cannot choose.
    #[arg(
        long,
        env = "RDS_IAM_PROXY_TRUST_ROLE",
        value_name = "ROLE",
        value_delimiter = ','
    )]
    pub trust_role: Vec<String>,

    /// The region whose STS endpoint verifies proofs [default: the first
    /// endpoint's region]. Clients sign their proofs for it.
    #[arg(long, env = "RDS_IAM_PROXY_STS_REGION", value_name = "REGION")]
    pub sts_region: Option<String>,

    /// Dial this URL for STS instead of https://sts.REGION.amazonaws.com
    /// (an interface VPC endpoint; http:// only for a local test bed). The
    /// request still names the regional STS host, which the signature
    /// covers.
    #[arg(long, env = "RDS_IAM_PROXY_STS_ENDPOINT_URL", value_name = "URL")]
    pub sts_endpoint_url: Option<String>,

    /// Time STS has to answer a proof.
    #[arg(long, env = "RDS_IAM_PROXY_STS_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub sts_timeout: Duration,

    /// Most sessions at once for one person (53300 beyond it).
    #[arg(
        long,
        env = "RDS_IAM_PROXY_MAX_SESSIONS_PER_PERSON",
        value_name = "N",
        default_value_t = DEFAULT_MAX_SESSIONS_PER_PERSON
    )]
    pub max_sessions_per_person: usize,

    /// Most refused proofs from one client address per minute; beyond it
    /// that address is refused at once, without asking STS.
    #[arg(
        long,
        env = "RDS_IAM_PROXY_MAX_FAILED_PROOFS_PER_SOURCE",
        value_name = "N",
        default_value_t = DEFAULT_MAX_FAILED_PROOFS_PER_SOURCE
    )]
    pub max_failed_proofs_per_source: u32,

    #[command(flatten)]
    pub peers: PeerArgs,
}

/// Cancel requests across gateway instances: `--gateway-instance`,
/// `--gateway-peer`, `--gateway-peer-ca` (flattened into [`GatewayArgs`]).
#[derive(Debug, Clone, Args, Default)]
pub struct PeerArgs {
    /// This gateway's number among its peers (1-255), written into the
    /// cancel keys it issues so that a peer receiving a cancel request can
    /// send it here.
    #[arg(long, env = "RDS_IAM_PROXY_GATEWAY_INSTANCE", value_name = "N")]
    pub gateway_instance: Option<u8>,

    /// Another instance of this gateway, as N=HOST:PORT (its
    /// --gateway-instance and where it listens); repeat for several. A
    /// cancel request for one of its sessions is sent there over TLS.
    #[arg(
        long,
        env = "RDS_IAM_PROXY_GATEWAY_PEER",
        value_name = "N=HOST:PORT",
        value_delimiter = ','
    )]
    pub gateway_peer: Vec<String>,

    /// PEM bundle of CAs trusted for the peers' certificates [default: the
    /// system's trust store].
    #[arg(long, env = "RDS_IAM_PROXY_GATEWAY_PEER_CA", value_name = "PEM")]
    pub gateway_peer_ca: Option<std::path::PathBuf>,
}

/// The `[gateway]` table: the flags above without their prefix.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub id: Option<String>,
    pub trust_accounts: Option<Vec<String>>,
    pub trust_roles: Option<Vec<String>>,
    pub sts_region: Option<String>,
    pub sts_endpoint_url: Option<String>,
    pub sts_timeout: Option<String>,
    pub max_sessions_per_person: Option<usize>,
    pub max_failed_proofs_per_source: Option<u32>,
    pub instance: Option<u8>,
    pub peers: Option<Vec<String>>,
    pub peer_ca: Option<std::path::PathBuf>,
}

/// Another instance of the same gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub instance: u8,
    pub host: String,
    pub port: u16,
}

/// Gateway mode's validated settings. All start-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub id: String,
    pub trust_accounts: Vec<String>,
    pub trust_roles: Vec<String>,
    /// `None`: the first endpoint's region, known once the AWS
    /// configuration is loaded.
    pub sts_region: Option<String>,
    pub sts_endpoint_url: Option<String>,
    pub sts_timeout: Duration,
    pub max_sessions_per_person: usize,
    pub max_failed_proofs_per_source: u32,
    /// This instance's number, when keys name instances.
    pub instance: Option<u8>,
    pub peers: Vec<Peer>,
    pub peer_ca: crate::tls::UpstreamCa,
}

/// The gateway-only flags that were set (a defaulted one counts when it
/// was given with another value): without gateway mode they are an error,
/// not ignored.
fn server_flags_set(cli: &GatewayArgs) -> Option<&'static str> {
    [
        ("trust_account", !cli.trust_account.is_empty()),
        ("trust_role", !cli.trust_role.is_empty()),
        ("sts_region", cli.sts_region.is_some()),
        ("sts_endpoint_url", cli.sts_endpoint_url.is_some()),
        ("sts_timeout", cli.sts_timeout != DEFAULT_STS_TIMEOUT),
        (
            "max_sessions_per_person",
            cli.max_sessions_per_person != DEFAULT_MAX_SESSIONS_PER_PERSON,
        ),
        (
            "max_failed_proofs_per_source",
            cli.max_failed_proofs_per_source != DEFAULT_MAX_FAILED_PROOFS_PER_SOURCE,
        ),
        ("gateway_instance", cli.peers.gateway_instance.is_some()),
        ("gateway_peer", !cli.peers.gateway_peer.is_empty()),
        ("gateway_peer_ca", cli.peers.gateway_peer_ca.is_some()),
    ]
    .into_iter()
    .find_map(|(flag, set)| set.then_some(flag))
}

const DEFAULT_STS_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MAX_SESSIONS_PER_PERSON: usize = 20;
const DEFAULT_MAX_FAILED_PROOFS_PER_SOURCE: u32 = 10;

/// Merges the gateway flags over the `[gateway]` table. `mode` is true for
/// `rds-iam-proxy gateway`; otherwise neither may be given.
pub fn merge(
    mode: bool,
    cli: &GatewayArgs,
    given: Given<'_>,
    file: Option<&GatewayFile>,
    fk: &dyn Fn(&str) -> String,
) -> Result<Option<GatewayConfig>, ConfigError> {
    if !mode {
        if let Some(flag) = server_flags_set(cli) {
            return Err(ConfigError::Conflict {
                key: format!("--{}", flag.replace('_', "-")),
                problem: "applies to gateway mode only: run `rds-iam-proxy gateway`".into(),
            });
        }
        if file.is_some() {
            return Err(ConfigError::Conflict {
                key: fk("[gateway]"),
                problem: "the [gateway] table applies to gateway mode only: run `rds-iam-proxy gateway`, or remove the table".into(),
            });
        }
        return Ok(None);
    }
    let f = file.cloned().unwrap_or_default();
    let list = |flag: &str, cli: &[String], file: Option<Vec<String>>| {
        if given(flag) || file.is_none() {
            cli.to_vec()
        } else {
            file.unwrap_or_default()
        }
    };
    let id = match (&cli.gateway_id, f.id) {
        (Some(id), _) => id.clone(),
        (None, Some(id)) => id,
        (None, None) => {
            return Err(ConfigError::Conflict {
                key: "--gateway-id".into(),
                problem: "gateway mode needs this gateway's id: the name clients reach it by, which their proofs are signed for".into(),
            });
        }
    };
    if id.is_empty() || id.len() > 255 || id.bytes().any(|b| !(b.is_ascii_graphic())) {
        return Err(ConfigError::BadValue {
            key: fk("gateway_id"),
            value: id,
            problem: "one word of printable ASCII, at most 255 bytes (a host name)".into(),
        });
    }
    let trust_accounts = list("trust_account", &cli.trust_account, f.trust_accounts);
    if trust_accounts.is_empty() {
        return Err(ConfigError::Conflict {
            key: "--trust-account".into(),
            problem: "gateway mode needs at least one AWS account whose people may log in".into(),
        });
    }
    if let Some(bad) = trust_accounts
        .iter()
        .find(|a| a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(ConfigError::BadValue {
            key: fk("trust_accounts"),
            value: bad.clone(),
            problem: "an AWS account id is 12 digits".into(),
        });
    }
    let mut trust_roles = list("trust_role", &cli.trust_role, f.trust_roles);
    if trust_roles.is_empty() {
        trust_roles.push(DEFAULT_TRUSTED_ROLE.into());
    }
    if let Some(bad) = trust_roles.iter().find(|r| {
        let name = r.strip_suffix('*').unwrap_or(r);
        name.is_empty()
            || name.contains('*')
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
    }) {
        return Err(ConfigError::BadValue {
            key: fk("trust_roles"),
            value: bad.clone(),
            problem: "a role name, or a non-empty prefix of one followed by *".into(),
        });
    }
    let sts_region = cli.sts_region.clone().or(f.sts_region);
    let sts_endpoint_url = cli.sts_endpoint_url.clone().or(f.sts_endpoint_url);
    if let Some(url) = &sts_endpoint_url {
        super::sts::Dial::parse(url).map_err(|problem| ConfigError::BadValue {
            key: fk("sts_endpoint_url"),
            value: url.clone(),
            problem,
        })?;
    }
    let sts_timeout = pick_duration(
        given("sts_timeout"),
        cli.sts_timeout,
        f.sts_timeout.as_ref(),
        &|| fk("sts_timeout"),
    )?;
    let max_sessions_per_person = pick(
        given("max_sessions_per_person"),
        cli.max_sessions_per_person,
        f.max_sessions_per_person,
    );
    let max_failed_proofs_per_source = pick(
        given("max_failed_proofs_per_source"),
        cli.max_failed_proofs_per_source,
        f.max_failed_proofs_per_source,
    );
    for (key, zero) in [
        ("sts_timeout", sts_timeout.is_zero()),
        ("max_sessions_per_person", max_sessions_per_person == 0),
        (
            "max_failed_proofs_per_source",
            max_failed_proofs_per_source == 0,
        ),
    ] {
        if zero {
            return Err(ConfigError::BadValue {
                key: fk(key),
                value: "0".into(),
                problem: "must be more than zero".into(),
            });
        }
    }
    let instance = cli.peers.gateway_instance.or(f.instance);
    let peers = list("gateway_peer", &cli.peers.gateway_peer, f.peers)
        .iter()
        .map(|p| parse_peer(p).ok_or(p))
        .collect::<Result<Vec<Peer>, _>>()
        .map_err(|bad| ConfigError::BadValue {
            key: fk("peers"),
            value: bad.clone(),
            problem: "expected N=HOST:PORT, N the peer's --gateway-instance (1-255)".into(),
        })?;
    match instance {
        Some(0) => {
            return Err(ConfigError::BadValue {
                key: fk("instance"),
                value: "0".into(),
                problem: "instances are numbered 1 to 255".into(),
            });
        }
        None if !peers.is_empty() => {
            return Err(ConfigError::Conflict {
                key: "--gateway-peer".into(),
                problem: "needs this gateway's own --gateway-instance, which its cancel keys carry"
                    .into(),
            });
        }
        _ => {}
    }
    for (i, p) in peers.iter().enumerate() {
        if Some(p.instance) == instance || peers[..i].iter().any(|q| q.instance == p.instance) {
            return Err(ConfigError::BadValue {
                key: fk("peers"),
                value: format!("{}={}:{}", p.instance, p.host, p.port),
                problem: "each instance number once, and not this gateway's own".into(),
            });
        }
    }
    let peer_ca = match cli.peers.gateway_peer_ca.clone().or(f.peer_ca) {
        Some(p) => crate::tls::UpstreamCa::File(p),
        None => crate::tls::UpstreamCa::System,
    };
    Ok(Some(GatewayConfig {
        instance,
        peers,
        peer_ca,
        id,
        trust_accounts,
        trust_roles,
        sts_region,
        sts_endpoint_url,
        sts_timeout,
        max_sessions_per_person,
        max_failed_proofs_per_source,
    }))
}

/// `N=HOST:PORT`.
fn parse_peer(s: &str) -> Option<Peer> {
    let (n, addr) = s.split_once('=')?;
    let instance: u8 = n.trim().parse().ok().filter(|n| *n > 0)?;
    let (host, port) = addr.trim().rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| Peer {
        instance,
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// The `[gateway]` table of `--print-config`.
pub fn to_file(g: &GatewayConfig) -> GatewayFile {
    GatewayFile {
        id: Some(g.id.clone()),
        trust_accounts: Some(g.trust_accounts.clone()),
        trust_roles: Some(g.trust_roles.clone()),
        sts_region: g.sts_region.clone(),
        sts_endpoint_url: g.sts_endpoint_url.clone(),
        sts_timeout: Some(crate::config::duration_text(g.sts_timeout)),
        max_sessions_per_person: Some(g.max_sessions_per_person),
        max_failed_proofs_per_source: Some(g.max_failed_proofs_per_source),
        instance: g.instance,
        peers: (!g.peers.is_empty()).then(|| {
            g.peers
                .iter()
                .map(|p| format!("{}={}:{}", p.instance, p.host, p.port))
                .collect()
        }),
        peer_ca: match &g.peer_ca {
            crate::tls::UpstreamCa::File(p) => Some(p.clone()),
            crate::tls::UpstreamCa::RdsBundle | crate::tls::UpstreamCa::System => None,
        },
    }
}
