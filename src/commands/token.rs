//! `rds-iam-proxy token`: a token for your own database user, printed to
//! stdout, as `aws rds generate-db-auth-token` would, after the identity
//! check the proxy makes for every connection.

use anyhow::{Context, bail};

use crate::cli::TokenArgs;
use crate::config::{parse_upstream, resolve_region};
use crate::identity::{IdentityError, IdentityService};
use crate::token::{Signer, TokenTarget};

pub async fn run(args: TokenArgs) -> anyhow::Result<()> {
    let options = args.aws.identity_options()?;
    let (host, port) = parse_upstream(&args.upstream)?;
    let region = resolve_region(args.aws.region.as_deref(), &host)?;
    let sdk =
        IdentityService::load_sdk_config(args.aws.profile.as_deref(), region.as_deref()).await;
    let region = region
        .or_else(|| sdk.region().map(|r| r.to_string()))
        .context("no AWS region: the endpoint name has none and the AWS configuration sets none; pass --region")?;
    let identity = IdentityService::new(&sdk, options);
    let user = match args.user {
        Some(u) => u,
        None => {
            let (_, id) = identity.current().await?;
            match identity.db_users(&id).as_slice() {
                [one] => one.clone(),
                several => bail!(
                    "this workload identity may use several database users ({}); choose one with --user",
                    several.join(", ")
                ),
            }
        }
    };
    // The same check as for every proxy connection, before anything is signed.
    let (creds, _) = identity.authorize(&user).await.map_err(|e| match e {
        IdentityError::NotYourUser { requested, person } => {
            anyhow::anyhow!("database user \"{requested}\" is not yours: you are \"{person}\"")
        }
        other => other.into(),
    })?;
    let token = Signer::default().sign(
        &creds,
        &TokenTarget {
            host: &host,
            port,
            region: &region,
            user: &user,
        },
    );
    // The one place a token leaves the process on purpose.
    println!("{}", token.expose());
    Ok(())
}
