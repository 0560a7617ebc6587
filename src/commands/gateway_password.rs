//! `rds-iam-proxy gateway-password`: a fresh gateway proof (see
//! [`crate::gateway::proof`]) printed to stdout, for one connection through
//! a gateway by any client that takes a password, after the identity
//! check the proxy makes for every connection.

use std::time::SystemTime;

use crate::cli::GatewayPasswordArgs;
use crate::gateway::proof::{self, ProofTarget};

pub async fn run(args: GatewayPasswordArgs) -> anyhow::Result<()> {
    let signing = super::token::authorize(&args.token).await?;
    let sts_region = args.sts_region.as_deref().unwrap_or(&signing.region);
    let proof = proof::make(
        &signing.creds,
        &ProofTarget {
            gateway_id: &args.gateway_id,
            sts_region,
            rds: signing.target(),
        },
        SystemTime::now(),
    );
    // The one place a proof leaves the process on purpose.
    println!("{}", proof.expose());
    Ok(())
}
