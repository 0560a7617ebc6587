//! `--check-config`: beyond the configuration's own validation, load every
//! certificate, key and CA bundle it names, so a bad file is found before
//! a deploy rather than at the first connection. Nothing is written: a
//! local CA that does not exist yet is reported, not created.

use anyhow::Context;

use crate::config::{ClientTls, Config};
use crate::tls::{self, UpstreamCa};

pub fn run(config: &Config) -> anyhow::Result<()> {
    for e in &config.endpoints {
        if let ClientTls::Files { cert, key } = &e.live.client_tls {
            tls::server_config(cert, key)
                .with_context(|| format!("endpoint {:?}: tls_cert/tls_key", e.start.name))?;
        }
        if let UpstreamCa::File(_) = &e.live.upstream_ca {
            tls::client_config(&e.live.upstream_ca)
                .with_context(|| format!("endpoint {:?}: upstream_ca", e.start.name))?;
        }
    }
    Ok(())
}
