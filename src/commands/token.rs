//! `rds-iam-proxy token`: a token for your own database user, printed to
//! stdout, as `aws rds generate-db-auth-token` would, after the identity
//! check the proxy makes for every connection.

use anyhow::{Context, bail};

use crate::cli::TokenArgs;
use crate::config::{parse_upstream, resolve_region};
use crate::identity::IdentityService;
use crate::token::{Signer, TokenTarget};

pub async fn run(args: TokenArgs) -> anyhow::Result<()> {
    let (host, port) = parse_upstream(&args.upstream)?;
    let region = resolve_region(args.aws.region.as_deref(), &host)?;
    let sdk =
        IdentityService::load_sdk_config(args.aws.profile.as_deref(), region.as_deref()).await;
    let region = region
        .or_else(|| sdk.region().map(|r| r.to_string()))
        .context("no AWS region: the endpoint name has none and the AWS configuration sets none; pass --region")?;
    let identity = IdentityService::new(&sdk, args.aws.profile.clone());
    let (creds, id) = identity.current().await?;
    let user = args.user.unwrap_or_else(|| id.user_name.clone());
    if user != id.user_name {
        bail!(
            "database user \"{user}\" is not yours: you are \"{}\" ({})",
            id.user_name,
            id.arn
        );
    }
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
