//! The start-up banner: who the proxy acts for, from which source, until
//! when, to which endpoint, and which local users may connect.

use std::time::SystemTime;

use tracing::{info, warn};

use std::sync::Arc;

use crate::app::{AppContext, EndpointContext};
use crate::identity::{Identity, SourceKind, sso};

/// One line a person can read, plus the fields for machines.
pub async fn log(ctx: &AppContext, endpoints: &[Arc<EndpointContext>]) {
    let source = ctx.identity.kind();
    let upstream = endpoints
        .iter()
        .map(|e| e.upstream_name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let region = endpoints
        .iter()
        .map(|e| e.region.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(g) = &ctx.gateway {
        // A gateway acts for nobody: it holds no credentials to ask about.
        let t = &g.verifier.trust;
        info!(
            gateway_id = %g.id,
            sts_region = %g.sts_region,
            trust_accounts = %t.accounts.join(","),
            trust_roles = %t.roles.join(","),
            upstream = %upstream,
            "gateway {} for {upstream}: each client proves who they are with their own AWS session \
             (rds-iam-proxy gateway-password, or a local rds-iam-proxy --gateway); people from roles {} \
             of accounts {}, verified with STS in {}",
            g.id,
            t.roles.join(", "),
            t.accounts.join(", "),
            g.sts_region
        );
        return;
    }
    match ctx.identity.current().await {
        Ok((creds, id)) => {
            ctx.metrics.observe_credentials(creds.expiry());
            let users = ctx.identity.db_users(&id);
            info!(
                source = source.as_str(),
                person = %id.user_name,
                arn = %id.arn,
                account = %id.account,
                upstream = %upstream,
                region = %region,
                local_users = %ctx.peers.describe(),
                "{}",
                describe(&id, &users, &upstream, SystemTime::now())
            );
            if let Some(skew) = ctx.identity.clock_skew() {
                warn!(
                    skew_s = skew,
                    "{}: the database may refuse tokens signed here; fix the clock (NTP)",
                    crate::identity::skew::describe(skew)
                );
            }
        }
        Err(e) => warn!(
            source = source.as_str(),
            upstream = %upstream,
            error = %e,
            "AWS identity not available yet; connections will be refused until it is"
        ),
    }
}

/// `acting for ...` in words.
pub fn describe(id: &Identity, db_users: &[String], upstream: &str, now: SystemTime) -> String {
    let until = match id.expires {
        Some(t) => format!("credentials until {}", sso::utc_hhmm(t, now)),
        None => "long-term credentials".to_owned(),
    };
    match id.source {
        SourceKind::Workload => format!(
            "acting for workload identity {} ({}), database users {}, {until}, to {upstream}",
            id.arn,
            id.source.as_str(),
            db_users
                .iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => format!(
            "acting for {} (database user \"{}\") from {} {}, {until}, to {upstream}",
            id.user_name,
            id.user_name,
            id.source.as_str(),
            id.arn
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn says_who_from_where_until_when() {
        let now = UNIX_EPOCH + Duration::from_secs(1_795_701_720); // 2026-11-26 14:02 UTC
        let mut id = Identity {
            source: SourceKind::Sso,
            user_name: "arianna".into(),
            arn: "arn:aws:sts::1:assumed-role/AWSReservedSSO_Dba_0123456789abcdef/arianna".into(),
            account: "1".into(),
            access_key_id: "ASIA".into(),
            expires: Some(now + Duration::from_secs(3600)),
        };
        let s = describe(&id, &["arianna".into()], "db:5432", now);
        assert_eq!(
            s,
            "acting for arianna (database user \"arianna\") from AWS SSO / IAM Identity Center \
             arn:aws:sts::1:assumed-role/AWSReservedSSO_Dba_0123456789abcdef/arianna, \
             credentials until 15:02 UTC, to db:5432"
        );
        id.source = SourceKind::Workload;
        id.expires = None;
        let s = describe(&id, &["app".into(), "app_ro".into()], "db:5432", now);
        assert!(s.starts_with("acting for workload identity arn:"), "{s}");
        assert!(
            s.contains("database users \"app\", \"app_ro\", long-term credentials"),
            "{s}"
        );
    }
}
