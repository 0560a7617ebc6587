//! The client-facing certificate used when the operator gives none: a
//! local CA and a `localhost` certificate, made on first run in the state
//! directory and reused afterwards, so clients can pin the CA once with
//! `sslrootcert=.../ca.crt sslmode=verify-full`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LocalCaError {
    #[error("cannot create {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot generate the local certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Paths of the generated files.
#[derive(Debug, Clone)]
pub struct LocalCa {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// True when this run created the files.
    pub created: bool,
}

/// Returns the local CA files in `dir`, creating them if absent.
pub fn ensure(dir: &Path) -> Result<LocalCa, LocalCaError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| LocalCaError::Io { path, source }
    };
    let ca = LocalCa {
        ca_cert: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        created: false,
    };
    if ca.ca_cert.exists() && ca.cert.exists() && ca.key.exists() {
        return Ok(ca);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "rds-iam-proxy local CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let issuer = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    params.distinguished_name = dn;
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    // The CA key is not kept: a new CA is made if the files are removed.
    write_file(&ca.ca_cert, issuer.pem().as_bytes(), 0o644).map_err(io(&ca.ca_cert))?;
    write_file(&ca.key, key.serialize_pem().as_bytes(), 0o600).map_err(io(&ca.key))?;
    write_file(&ca.cert, cert.pem().as_bytes(), 0o644).map_err(io(&ca.cert))?;
    Ok(LocalCa {
        created: true,
        ..ca
    })
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(tmp, path)
}

/// The default state directory: `$XDG_STATE_HOME/rds-iam-proxy`, else
/// `~/.local/state/rds-iam-proxy`.
pub fn default_state_dir(xdg_state_home: Option<PathBuf>, home: Option<PathBuf>) -> PathBuf {
    match (xdg_state_home, home) {
        (Some(x), _) if x.is_absolute() => x.join("rds-iam-proxy"),
        (_, Some(h)) => h.join(".local/state/rds-iam-proxy"),
        _ => PathBuf::from("/var/lib/rds-iam-proxy"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_reuses() {
        let dir = std::env::temp_dir().join(format!("rip-localca-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = ensure(&dir).unwrap();
        assert!(first.created);
        let ca_pem = fs::read(&first.ca_cert).unwrap();
        let second = ensure(&dir).unwrap();
        assert!(!second.created);
        assert_eq!(fs::read(&second.ca_cert).unwrap(), ca_pem);
        // The generated identity is accepted by rustls.
        crate::tls::server_config(&second.cert, &second.key).unwrap();
        let mode = fs::metadata(&second.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
