//! `rds-iam-proxy doctor`: the checks a connection depends on, in the
//! order it depends on them, each with the fix when it fails. A check
//! whose prerequisite failed is skipped, not failed again.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;

use crate::app::endpoint_tls;
use crate::config::{Config, EndpointConfig};
use crate::identity::{CachedCredentials, IdentityService};
use crate::token::{Signer, TokenTarget};

/// Credentials closer to expiry than this cannot sign a usable token.
const MIN_LEFT: Duration = Duration::from_secs(60);

/// Bound on each network check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

struct Report {
    failed: bool,
}

impl Report {
    fn ok(&mut self, what: &str, detail: impl AsRef<str>) {
        println!("✓ {what}: {}", detail.as_ref());
    }
    fn fail(&mut self, what: &str, problem: impl AsRef<str>, fix: impl AsRef<str>) {
        self.failed = true;
        println!("✗ {what}: {}\n    fix: {}", problem.as_ref(), fix.as_ref());
    }
    fn skip(&mut self, what: &str, because: &str) {
        println!("- {what}: skipped ({because})");
    }
}

/// Runs every check; true when all passed.
pub async fn run(config: Config) -> bool {
    let mut r = Report { failed: false };
    let login = match &config.start.profile {
        Some(p) => format!("aws sso login --profile {p}"),
        None => "aws sso login (or set AWS_PROFILE / --profile)".to_owned(),
    };
    let first_region = config.endpoints.iter().find_map(|e| e.start.region.clone());
    let sdk =
        IdentityService::load_sdk_config(config.start.profile.as_deref(), first_region.as_deref())
            .await;

    // 1. Credentials.
    let creds = CachedCredentials::new(sdk.credentials_provider());
    let creds_ok = match creds.get().await {
        Ok(c)
            if c.expiry()
                .is_some_and(|e| e <= SystemTime::now() + MIN_LEFT) =>
        {
            r.fail(
                "AWS credentials",
                format!(
                    "found (access key {}), but expired or expiring within a minute",
                    c.access_key_id()
                ),
                format!("sign in again: {login}"),
            );
            None
        }
        Ok(c) => {
            let left = c
                .expiry()
                .and_then(|e| e.duration_since(SystemTime::now()).ok())
                .map_or("do not expire".to_owned(), |d| {
                    format!("expire in {}m", d.as_secs() / 60)
                });
            r.ok(
                "AWS credentials",
                format!("found (access key {}), {left}", c.access_key_id()),
            );
            Some(c)
        }
        Err(e) => {
            r.fail("AWS credentials", e.message, format!("sign in: {login}"));
            None
        }
    };

    // 2. Identity and user name.
    let identity = IdentityService::new(&sdk, config.start.identity.clone());
    let person = if creds_ok.is_some() {
        match identity.current().await {
            Ok((_, id)) => {
                r.ok(
                    "identity",
                    format!("{} -> database user \"{}\"", id.arn, id.user_name),
                );
                Some(id)
            }
            Err(e) => {
                r.fail(
                    "identity",
                    e.to_string(),
                    format!("check that STS is reachable and the session is valid; if it expired: {login}"),
                );
                None
            }
        }
    } else {
        r.skip("identity", "no credentials");
        None
    };

    for e in &config.endpoints {
        if e.start.name == e.upstream_name() {
            println!("endpoint {}:", e.start.name);
        } else {
            println!("endpoint {} ({}):", e.start.name, e.upstream_name());
        }
        check_endpoint(
            &mut r,
            &config,
            e,
            sdk.region().map(|r| r.to_string()),
            &creds_ok,
            &person,
        )
        .await;
    }
    if r.failed {
        println!("some checks failed");
    } else {
        println!("all checks passed");
    }
    !r.failed
}

async fn check_endpoint(
    r: &mut Report,
    config: &Config,
    e: &EndpointConfig,
    sdk_region: Option<String>,
    creds: &Option<aws_credential_types::Credentials>,
    person: &Option<std::sync::Arc<crate::identity::Identity>>,
) {
    // 3. Region.
    let region = match e.start.region.clone().or(sdk_region) {
        Some(reg) => {
            let from = if e.start.region.is_some() {
                "configuration or endpoint name"
            } else {
                "AWS configuration"
            };
            r.ok("region", format!("{reg} (from the {from})"));
            Some(reg)
        }
        None => {
            r.fail(
                "region",
                "the endpoint name has none and the AWS configuration sets none",
                "pass --region (e.g. --region eu-west-1)",
            );
            None
        }
    };

    // 4. DNS.
    let target = e
        .live
        .connect_to
        .clone()
        .unwrap_or_else(|| e.upstream_name());
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        CHECK_TIMEOUT,
        tokio::net::lookup_host(&target),
    )
    .await
    {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(err)) => {
            r.fail(
                    "DNS",
                    format!("cannot resolve {target}: {err}"),
                    "check the endpoint name and this host's DNS (inside a VPC, the cluster's private zone); for a tunnel use --connect-to",
                );
            Vec::new()
        }
        Err(_) => {
            r.fail(
                "DNS",
                format!("no answer for {target} within 10s"),
                "check this host's resolver",
            );
            Vec::new()
        }
    };
    if !addrs.is_empty() {
        let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
        r.ok("DNS", format!("{target} -> {}", list.join(", ")));
    }

    // 5. TCP.
    let mut reached = None;
    if addrs.is_empty() {
        r.skip("TCP", "no address");
    } else {
        let mut last = String::new();
        for a in &addrs {
            match tokio::time::timeout(CHECK_TIMEOUT, TcpStream::connect(a)).await {
                Ok(Ok(_)) => {
                    reached = Some(*a);
                    break;
                }
                Ok(Err(err)) => last = format!("{a}: {err}"),
                Err(_) => last = format!("{a}: no answer within 10s"),
            }
        }
        match reached {
            Some(a) => r.ok("TCP", format!("{a} accepts connections")),
            None => r.fail(
                "TCP",
                last,
                "check security groups and network ACLs (port open from this host), that the cluster is available, or your tunnel",
            ),
        }
    }

    // 6. TLS against the CA bundle and the endpoint name.
    match (reached, endpoint_tls(e, config)) {
        (_, Err(err)) => r.fail(
            "TLS",
            err.to_string(),
            "fix --upstream-ca / --tls-cert / --tls-key",
        ),
        (None, Ok(_)) => r.skip("TLS", "not reachable"),
        (Some(addr), Ok(live)) => {
            match tokio::time::timeout(
                CHECK_TIMEOUT,
                crate::upstream::connect_tls(&live.endpoint, Some(addr)),
            )
            .await
            {
                Ok(Ok((stream, _))) => r.ok(
                    "TLS",
                    format!(
                        "verified {} ({})",
                        e.start.upstream_host,
                        crate::tls::summary(stream.get_ref().1)
                    ),
                ),
                Ok(Err(err)) => r.fail(
                    "TLS",
                    err.to_string(),
                    "the certificate must chain to the Amazon RDS CA bundle (or --upstream-ca) and name the endpoint: connect with the endpoint name, not an IP, and use --connect-to for tunnels",
                ),
                Err(_) => r.fail("TLS", "no TLS session within 10s", "check that this is a PostgreSQL server"),
            }
        }
    }

    // 7. A token signed.
    match (creds, person, &region) {
        (Some(c), Some(p), Some(reg)) => {
            let token = Signer::default().sign(
                c,
                &TokenTarget {
                    host: &e.start.upstream_host,
                    port: e.start.upstream_port,
                    region: reg,
                    user: &p.user_name,
                },
            );
            let expected = format!("{}/?Action=connect&DBUser=", e.upstream_name());
            if token.expose().starts_with(&expected) {
                r.ok(
                    "token",
                    format!(
                        "signed for user \"{}\" ({} bytes, valid 15 minutes)",
                        p.user_name,
                        token.expose().len()
                    ),
                );
            } else {
                r.fail(
                    "token",
                    "the signed token has an unexpected form",
                    "report this as a bug",
                );
            }
        }
        _ => r.skip("token", "needs credentials, identity and region"),
    }
}
