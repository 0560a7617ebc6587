//! `rds-iam-proxy whoami`: who the proxy would act for, after the same
//! identity check the proxy makes.

use std::time::SystemTime;

use crate::cli::WhoamiArgs;
use crate::identity::{IdentityService, SourceKind, skew, sso};

pub async fn run(args: WhoamiArgs) -> anyhow::Result<()> {
    let options = args.aws.identity_options()?;
    let sdk =
        IdentityService::load_sdk_config(args.aws.profile.as_deref(), args.aws.region.as_deref())
            .await;
    let identity = IdentityService::new(&sdk, options);
    let (_, id) = identity.current().await?;
    let now = SystemTime::now();
    println!("identity source: {}", id.source.as_str());
    match id.source {
        SourceKind::Workload => println!("user name:       (none: workload identity)"),
        _ => println!("user name:       {}", id.user_name),
    }
    println!("database users:  {}", identity.db_users(&id).join(", "));
    println!("arn:             {}", id.arn);
    println!("account:         {}", id.account);
    match id.expires {
        Some(t) => println!("credentials expire: {}", sso::utc_hhmm(t, now)),
        None => println!("credentials expire: never (long-term keys)"),
    }
    if let Some(login) = identity.sso_login()
        && let Some(state) = login.state()
        && let Some(at) = state.expires_at
    {
        println!(
            "SSO login:       profile {}, expires {}{}",
            login.profile,
            sso::utc_hhmm(at, now),
            if state.refreshable {
                " (renewed automatically)"
            } else {
                ""
            }
        );
    }
    if let Some(s) = identity.clock_skew() {
        println!(
            "warning:         {}; tokens may be refused",
            skew::describe(s)
        );
    }
    Ok(())
}
