//! `rds-iam-proxy token`: a token for your own database user, printed to
//! stdout, as `aws rds generate-db-auth-token` would, after the identity
//! check the proxy makes for every connection.

use anyhow::{Context, bail};
use aws_credential_types::Credentials;

use crate::cli::TokenArgs;
use crate::config::{parse_upstream, resolve_region};
use crate::identity::{IdentityError, IdentityService};
use crate::token::{Signer, TokenTarget};

pub async fn run(args: TokenArgs) -> anyhow::Result<()> {
    let signing = authorize(&args).await?;
    let token = Signer::default().sign(&signing.creds, &signing.target());
    // The one place a token leaves the process on purpose.
    println!("{}", token.expose());
    Ok(())
}

/// Credentials that passed the proxy's identity check for one database
/// user at one endpoint.
pub struct Authorized {
    pub creds: Credentials,
    pub host: String,
    pub port: u16,
    pub region: String,
    pub user: String,
}

impl Authorized {
    pub fn target(&self) -> TokenTarget<'_> {
        TokenTarget {
            host: &self.host,
            port: self.port,
            region: &self.region,
            user: &self.user,
        }
    }
}

/// The identity check the proxy makes for every connection, for the user
/// asked for (or the only one allowed), before anything is signed.
pub async fn authorize(args: &TokenArgs) -> anyhow::Result<Authorized> {
    let options = args.aws.identity_options()?;
    let (host, port) = parse_upstream(&args.upstream)?;
    let region = resolve_region(args.aws.region.as_deref(), &host)?;
    let sdk =
        IdentityService::load_sdk_config(args.aws.profile.as_deref(), region.as_deref()).await;
    let region = region
        .or_else(|| sdk.region().map(|r| r.to_string()))
        .context("no AWS region: the endpoint name has none and the AWS configuration sets none; pass --region")?;
    let identity = IdentityService::new(&sdk, options);
    let user = match &args.user {
        Some(u) => u.clone(),
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
    let (creds, _) = identity.authorize(&user).await.map_err(|e| match e {
        IdentityError::NotYourUser { requested, person } => {
            anyhow::anyhow!("database user \"{requested}\" is not yours: you are \"{person}\"")
        }
        other => other.into(),
    })?;
    Ok(Authorized {
        creds,
        host,
        port,
        region,
        user,
    })
}
