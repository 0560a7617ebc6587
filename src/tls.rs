//! TLS configurations, built once at start-up and shared: the accepting
//! side (clients -> proxy) and the dialing side (proxy -> Aurora).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;

/// The ALPN protocol name of PostgreSQL (required for direct TLS).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Most plaintext in one TLS record sent to a client: 8 KiB, what
/// PostgreSQL itself sends (its send buffer is 8 KiB, one SSL_write each).
///
/// Clients depend on it. libpq keeps at least 8 KiB free before it reads
/// and reads once per PQconsumeInput; a 16 KiB record (the TLS maximum,
/// rustls' default) is then only partly taken, the rest stays decrypted
/// inside OpenSSL where no poll(2) can see it, and a client that waits on
/// the socket (psycopg, sync and async; any event-loop driver) waits for
/// good although every byte has arrived.
pub const CLIENT_RECORD_PLAINTEXT: usize = 8192;

/// rustls counts the 5-byte record header in its fragment size.
const TLS_RECORD_HEADER: usize = 5;

/// The Amazon RDS global CA bundle, embedded (see `certs/README.md`).
pub const RDS_CA_BUNDLE: &[u8] = include_bytes!("../certs/rds-global-bundle.pem");

#[derive(Debug, Error)]
pub enum TlsSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key")]
    NoKey { path: String },
    #[error("{what} is not valid PEM: {source}")]
    Pem {
        what: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("the certificate and key do not form a usable TLS identity: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("CA bundle {what} has no usable certificate")]
    EmptyRoots { what: String },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Loads a certificate chain and its key from PEM files.
pub fn load_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
    let cert_pem = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsSetupError::Pem {
            what: cert.display().to_string(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            path: cert.display().to_string(),
        });
    }
    let key_pem = read(key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsSetupError::NoKey {
        path: key.display().to_string(),
    })?;
    Ok((chain, key))
}

/// The client-facing server configuration: TLS 1.2+, ALPN `postgresql`.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let (chain, key) = load_identity(cert, key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    config.max_fragment_size = Some(CLIENT_RECORD_PLAINTEXT + TLS_RECORD_HEADER);
    Ok(Arc::new(config))
}

/// Where the upstream's trust anchors come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamCa {
    /// The embedded Amazon RDS global bundle.
    RdsBundle,
    /// A PEM file given by the operator.
    File(std::path::PathBuf),
    /// The system's trust store (a gateway's certificate from a public CA).
    System,
}

/// The upstream client configuration: verify-full against `ca`.
pub fn client_config(ca: &UpstreamCa) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let (pem, what) = match ca {
        UpstreamCa::RdsBundle => (
            RDS_CA_BUNDLE.to_vec(),
            "(embedded Amazon RDS bundle)".into(),
        ),
        UpstreamCa::File(p) => (read(p)?, p.display().to_string()),
        UpstreamCa::System => (Vec::new(), "(the system's trust store)".into()),
    };
    let mut roots = RootCertStore::empty();
    if *ca == UpstreamCa::System {
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
    }
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|source| TlsSetupError::Pem {
            what: what.clone(),
            source,
        })?;
        // Skip anchors webpki cannot use rather than failing the bundle.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(TlsSetupError::EmptyRoots { what });
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    config.max_fragment_size = Some(CLIENT_RECORD_PLAINTEXT + TLS_RECORD_HEADER);
    Ok(Arc::new(config))
}

/// The gateway's client configuration for STS (HTTPS): the system's
/// trust store, as the AWS SDK uses. No ALPN: STS speaks HTTP/1.1.
pub fn sts_client_config() -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(TlsSetupError::EmptyRoots {
            what: "(the system's trust store)".into(),
        });
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// "TLSv1.3 TLS13_AES_256_GCM_SHA384"-style summary of a session.
pub fn summary(conn: &rustls::CommonState) -> String {
    let version = conn
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("TLS?");
    let suite = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("?");
    format!("{version} {suite}")
}

/// Fills `buf` with cryptographically secure random bytes.
pub fn random_bytes(buf: &mut [u8]) {
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(buf)
        .expect("the system random number generator works");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_rds_bundle_loads() {
        client_config(&UpstreamCa::RdsBundle).unwrap();
        let n = CertificateDer::pem_slice_iter(RDS_CA_BUNDLE).count();
        assert!(n > 100, "{n} certificates");
    }
}
