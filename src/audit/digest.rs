//! Signed digests of the audit trail: integrity a third party can check
//! without trusting the host (DESIGN.md section 9).
//!
//! The hash chain proves order, but whoever can write the files can
//! rewrite a record and recompute every hash after it. A digest, written
//! periodically, at each rotation and when the trail is closed, names the
//! audit files (with the SHA-256 of each one's first `bytes` bytes, whole
//! records only) that grew since the previous digest, the chain head, and
//! the previous digest's signature, and is signed with an asymmetric key
//! the host need not hold (a KMS key) or a local key file. `rds-iam-proxy
//! audit verify --public-key` then detects a rewritten file even with the
//! chain recomputed, a missing file, a missing or reordered digest, and a
//! digest signed by another key.
//!
//! A digest file (`digest-<time>-<NNNNNNNN>.json`) is one JSON object:
//! `{"body": "<the digest, as JSON text>", "signature": "<base64 DER
//! ECDSA P-256 / SHA-256 over the body's UTF-8 bytes>"}`. The body is
//! carried as text so that any verifier checks exactly the signed bytes,
//! with no canonical form to agree on (docs/audit.md shows an openssl
//! check). Records written after the newest digest are protected by the
//! chain only: the digest interval is that window.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::event::{hex, rfc3339};
use super::verify::seq_of;

/// The one signature algorithm: what both KMS (`ECC_NIST_P256`,
/// `ECDSA_SHA_256`) and a local key file give.
pub const ALGORITHM: &str = "ECDSA_P256_SHA256";

/// DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1,
/// an uncompressed 65-byte point follows).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("cannot read the signing key {path}: {message}")]
    KeyFile { path: PathBuf, message: String },
    #[error(
        "the signing key {0} is not a P-256 (prime256v1) private key in PKCS#8 PEM; make one with: openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out KEY.pem"
    )]
    KeyType(String),
    #[error("KMS key {key}: {message}")]
    Kms { key: String, message: String },
    #[error("cannot write the digest in {dir}: {source}")]
    Write {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the audit files in {dir}: {source}")]
    Read {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The key digests are signed with.
pub enum SigningKey {
    File {
        pair: EcdsaKeyPair,
        spki: Vec<u8>,
    },
    Kms {
        client: aws_sdk_kms::Client,
        key_id: String,
        spki: Vec<u8>,
    },
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.fingerprint())
    }
}

impl SigningKey {
    /// A PKCS#8 PEM file holding a P-256 private key.
    pub fn from_file(path: &Path) -> Result<Self, DigestError> {
        use rustls_pki_types::pem::PemObject as _;
        let key =
            rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(path).map_err(|e| match e {
                rustls_pki_types::pem::Error::Io(io) => DigestError::KeyFile {
                    path: path.to_owned(),
                    message: io.to_string(),
                },
                // No `PRIVATE KEY` block (an `EC PRIVATE KEY` is SEC 1, not
                // PKCS#8), or not PEM at all.
                _ => DigestError::KeyType(path.display().to_string()),
            })?;
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            key.secret_pkcs8_der(),
        )
        .map_err(|_| DigestError::KeyType(path.display().to_string()))?;
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        Ok(SigningKey::File { pair, spki })
    }

    /// A KMS key (`ECC_NIST_P256`, usage `SIGN_VERIFY`), by id, ARN or
    /// alias; its public key is fetched once.
    pub async fn kms(client: aws_sdk_kms::Client, key_id: &str) -> Result<Self, DigestError> {
        let kms = |message: String| DigestError::Kms {
            key: key_id.to_owned(),
            message,
        };
        let out = client
            .get_public_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| kms(aws_sdk_kms::error::DisplayErrorContext(e).to_string()))?;
        let spki = out
            .public_key()
            .map(|b| b.as_ref().to_vec())
            .ok_or_else(|| kms("GetPublicKey returned no key".into()))?;
        // The key itself says what it is (the answer's KeySpec may be
        // absent): a P-256 SubjectPublicKeyInfo.
        if spki.len() != P256_SPKI_PREFIX.len() + 65 || !spki.starts_with(&P256_SPKI_PREFIX) {
            return Err(kms(format!(
                "not an ECC_NIST_P256 key (key spec {}); digests need one: aws kms create-key --key-spec ECC_NIST_P256 --key-usage SIGN_VERIFY",
                out.key_spec().map_or("not given", |s| s.as_str())
            )));
        }
        Ok(SigningKey::Kms {
            client,
            key_id: key_id.to_owned(),
            spki,
        })
    }

    fn spki(&self) -> &[u8] {
        match self {
            SigningKey::File { spki, .. } | SigningKey::Kms { spki, .. } => spki,
        }
    }

    /// SHA-256 of the public key's DER SubjectPublicKeyInfo, in hex: how
    /// a digest names its key.
    pub fn fingerprint(&self) -> String {
        hex(&Sha256::digest(self.spki()))
    }

    /// The public key as PEM, for `audit verify --public-key`.
    pub fn public_pem(&self) -> String {
        pem("PUBLIC KEY", self.spki())
    }

    /// A DER ECDSA P-256 signature over SHA-256 of `body`.
    pub async fn sign(&self, body: &[u8]) -> Result<Vec<u8>, DigestError> {
        match self {
            SigningKey::File { pair, .. } => pair
                .sign(&aws_lc_rs::rand::SystemRandom::new(), body)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| DigestError::KeyType("(signing failed)".into())),
            SigningKey::Kms { client, key_id, .. } => {
                // KMS takes a message of up to 4 KiB whole (RAW), a longer
                // one as its SHA-256 (DIGEST); either way the signature is
                // ECDSA-SHA256 over the body.
                let (message, kind) = if body.len() <= 4096 {
                    (body.to_vec(), aws_sdk_kms::types::MessageType::Raw)
                } else {
                    (
                        Sha256::digest(body).to_vec(),
                        aws_sdk_kms::types::MessageType::Digest,
                    )
                };
                let out = client
                    .sign()
                    .key_id(key_id)
                    .message(aws_smithy_types::Blob::new(message))
                    .message_type(kind)
                    .signing_algorithm(aws_sdk_kms::types::SigningAlgorithmSpec::EcdsaSha256)
                    .send()
                    .await
                    .map_err(|e| DigestError::Kms {
                        key: key_id.clone(),
                        message: aws_sdk_kms::error::DisplayErrorContext(e).to_string(),
                    })?;
                out.signature()
                    .map(|s| s.as_ref().to_vec())
                    .ok_or_else(|| DigestError::Kms {
                        key: key_id.clone(),
                        message: "Sign returned no signature".into(),
                    })
            }
        }
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or(""));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// One audit file as a digest covers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Covered {
    pub file: String,
    /// The first `bytes` bytes (whole records) are covered.
    pub bytes: u64,
    pub sha256: String,
    /// The seq of the last record covered.
    pub last_seq: Option<u64>,
}

/// What a digest says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    pub v: u32,
    #[serde(rename = "type")]
    pub ty: String,
    pub instance: String,
    pub digest_seq: u64,
    pub time: String,
    /// `interval`, `rotation`, `start` or `stop`.
    pub reason: String,
    pub files: Vec<Covered>,
    /// The last record covered: its seq and the SHA-256 of its line.
    pub chain_head: Option<(u64, String)>,
    /// The previous digest: its seq and signature (base64).
    pub previous: Option<(u64, String)>,
    pub key: String,
    pub algorithm: String,
}

/// A digest file as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    pub body: String,
    pub signature: String,
}

/// The digest files in `dir`, by name (which sorts by time, then seq).
pub fn digest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("digest-") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The public key file written beside the digests.
pub const PUBLIC_KEY_FILE: &str = "digest-public-key.pem";

/// Per file: how far digests have covered it, and the hash state there
/// (`None` for a file an earlier run's digest covered whole: it is hashed
/// again only if it grew, so a restart does not read the whole trail).
struct Progress {
    bytes: u64,
    hasher: Option<Sha256>,
    last_seq: Option<u64>,
    last_line_hash: Option<[u8; 32]>,
}

/// Makes the digests of one audit directory.
pub struct Digester {
    dir: PathBuf,
    key: SigningKey,
    instance: String,
    progress: BTreeMap<String, Progress>,
    digest_seq: u64,
    previous: Option<(u64, String)>,
}

/// Largest digest file read back.
const MAX_DIGEST: u64 = 16 << 20;

fn read_signed(path: &Path) -> std::io::Result<Signed> {
    let f = std::fs::File::open(path)?;
    let mut text = Vec::new();
    f.take(MAX_DIGEST).read_to_end(&mut text)?;
    serde_json::from_slice(&text).map_err(std::io::Error::other)
}

impl Digester {
    /// Picks up where the directory's newest digest left off (its seq and
    /// signature); files are hashed again from their start.
    pub fn new(dir: &Path, key: SigningKey, instance: String) -> Result<Self, DigestError> {
        let read = |source| DigestError::Read {
            dir: dir.to_owned(),
            source,
        };
        let mut previous = None;
        let mut progress = BTreeMap::new();
        for path in digest_files(dir).map_err(read)? {
            let signed = read_signed(&path).map_err(read)?;
            let body: Body =
                serde_json::from_str(&signed.body).map_err(|e| read(std::io::Error::other(e)))?;
            for c in body.files {
                progress.insert(
                    c.file,
                    Progress {
                        bytes: c.bytes,
                        hasher: None,
                        last_seq: c.last_seq,
                        last_line_hash: None,
                    },
                );
            }
            previous = Some((body.digest_seq, signed.signature));
        }
        let pem_path = dir.join(PUBLIC_KEY_FILE);
        std::fs::write(&pem_path, key.public_pem()).map_err(|source| DigestError::Write {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(Digester {
            dir: dir.to_owned(),
            key,
            instance,
            progress,
            digest_seq: previous.as_ref().map_or(0, |p| p.0),
            previous,
        })
    }

    pub fn fingerprint(&self) -> String {
        self.key.fingerprint()
    }

    /// Reads what each audit file gained (whole records only).
    fn advance(&mut self) -> std::io::Result<Vec<Covered>> {
        let mut out = Vec::new();
        for path in super::writer::audit_files(&self.dir)? {
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            let p = self.progress.entry(name.clone()).or_insert(Progress {
                bytes: 0,
                hasher: Some(Sha256::new()),
                last_seq: None,
                last_line_hash: None,
            });
            let len = std::fs::metadata(&path)?.len();
            if p.hasher.is_none() {
                if len <= p.bytes {
                    continue;
                }
                // Covered by an earlier run, and grown since: the hash
                // state is rebuilt from the start.
                *p = Progress {
                    bytes: 0,
                    hasher: Some(Sha256::new()),
                    last_seq: None,
                    last_line_hash: None,
                };
            }
            let mut f = BufReader::new(std::fs::File::open(&path)?);
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(p.bytes))?;
            let hasher = p.hasher.get_or_insert_with(Sha256::new);
            let mut line = Vec::new();
            let mut grew = false;
            loop {
                line.clear();
                let n = f.read_until(b'\n', &mut line)?;
                if n == 0 || line.last() != Some(&b'\n') {
                    break;
                }
                hasher.update(&line);
                p.bytes += n as u64;
                p.last_seq = seq_of(&line).or(p.last_seq);
                p.last_line_hash = Some(Sha256::digest(&line[..line.len() - 1]).into());
                grew = true;
            }
            if grew {
                out.push(Covered {
                    file: name,
                    bytes: p.bytes,
                    sha256: hex(&hasher.clone().finalize()),
                    last_seq: p.last_seq,
                });
            }
        }
        Ok(out)
    }

    /// Writes the next digest if any file grew (or always, at `start` and
    /// `stop`, so each run's bounds are signed); its path.
    pub async fn digest(&mut self, reason: &str) -> Result<Option<PathBuf>, DigestError> {
        let files = self.advance().map_err(|source| DigestError::Read {
            dir: self.dir.clone(),
            source,
        })?;
        if files.is_empty() && !matches!(reason, "start" | "stop") {
            return Ok(None);
        }
        let head = self
            .progress
            .values()
            .filter_map(|p| Some((p.last_seq?, p.last_line_hash?)))
            .max_by_key(|(seq, _)| *seq)
            .map(|(seq, h)| (seq, hex(&h)));
        let now = SystemTime::now();
        let body = Body {
            v: 1,
            ty: "audit_digest".into(),
            instance: self.instance.clone(),
            digest_seq: self.digest_seq + 1,
            time: rfc3339(now),
            reason: reason.into(),
            files,
            chain_head: head,
            previous: self.previous.clone(),
            key: self.key.fingerprint(),
            algorithm: ALGORITHM.into(),
        };
        let text = serde_json::to_string(&body).map_err(|e| DigestError::Write {
            dir: self.dir.clone(),
            source: std::io::Error::other(e),
        })?;
        let signature =
            base64::engine::general_purpose::STANDARD.encode(self.key.sign(text.as_bytes()).await?);
        let signed = serde_json::to_string(&Signed {
            body: text,
            signature: signature.clone(),
        })
        .unwrap_or_default();
        let stamp = rfc3339(now).replace([':', '-', '.'], "");
        let path = self.dir.join(format!(
            "digest-{}-{:08}.json",
            stamp.trim_end_matches('Z'),
            body.digest_seq
        ));
        write_durably(&path, signed.as_bytes()).map_err(|source| DigestError::Write {
            dir: self.dir.clone(),
            source,
        })?;
        self.digest_seq = body.digest_seq;
        self.previous = Some((body.digest_seq, signature));
        Ok(Some(path))
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    if let Some(d) = path.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// Runs until `stop` says so: a digest at start, every `interval`, after
/// each rotation the writer reports, and a last one when the trail is
/// closed. Failures are logged and counted, never fatal: the trail goes
/// on, and the next digest covers what this one would have.
pub async fn run(
    mut digester: Digester,
    interval: Duration,
    mut rotations: tokio::sync::mpsc::UnboundedReceiver<()>,
    mut closed: tokio::sync::watch::Receiver<bool>,
    failures: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let once = |result: Result<Option<PathBuf>, DigestError>| match result {
        Ok(Some(path)) => tracing::info!(file = %path.display(), "audit digest signed"),
        Ok(None) => {}
        Err(e) => {
            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!("audit digest not written: {e}");
        }
    };
    once(digester.digest("start").await);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => once(digester.digest("interval").await),
            Some(()) = rotations.recv() => once(digester.digest("rotation").await),
            r = closed.changed() => {
                if r.is_err() || *closed.borrow() {
                    once(digester.digest("stop").await);
                    return;
                }
            }
        }
    }
}

/// What a clean check of the digests found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestSummary {
    pub digests: u64,
    pub key: String,
    /// The newest digest's time and the last seq it covers.
    pub newest: Option<(String, Option<u64>)>,
    pub files_covered: usize,
    /// Audit files that grew after the newest digest (chain only).
    pub beyond: Vec<String>,
}

/// Checks every digest in `dir` against `public_key_pem` and the audit
/// files: the problems found, each saying what is wrong and where.
pub fn check(dir: &Path, public_key_pem: &[u8]) -> Result<DigestSummary, Vec<String>> {
    use rustls_pki_types::pem::PemObject as _;
    let spki = match rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(public_key_pem) {
        Ok(k) => k.as_ref().to_vec(),
        Err(e) => return Err(vec![format!("the public key is not a PEM PUBLIC KEY: {e}")]),
    };
    let fingerprint = hex(&Sha256::digest(&spki));
    let key = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &spki);
    let mut problems = Vec::new();
    let files = match digest_files(dir) {
        Ok(f) => f,
        Err(e) => return Err(vec![format!("cannot list {}: {e}", dir.display())]),
    };
    let mut digests: Vec<(PathBuf, Body, String)> = Vec::new();
    for path in &files {
        let name = path.display();
        let signed = match read_signed(path) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("{name}: not a digest file: {e}"));
                continue;
            }
        };
        let sig = match base64::engine::general_purpose::STANDARD.decode(&signed.signature) {
            Ok(s) => s,
            Err(_) => {
                problems.push(format!("{name}: the signature is not base64"));
                continue;
            }
        };
        if key.verify(signed.body.as_bytes(), &sig).is_err() {
            problems.push(format!(
                "{name}: the signature does not verify with the given key (key {fingerprint}): the digest was changed, or signed by another key"
            ));
            continue;
        }
        match serde_json::from_str::<Body>(&signed.body) {
            Ok(b) => digests.push((path.clone(), b, signed.signature)),
            Err(e) => problems.push(format!("{name}: signed, but not a digest body: {e}")),
        }
    }
    // The chain of digests: seq 1, 2, 3... each naming the one before.
    let mut expected_seq = 1;
    let mut previous: Option<(u64, String)> = None;
    for (path, body, sig) in &digests {
        let name = path.display();
        if body.digest_seq != expected_seq {
            problems.push(if body.digest_seq > expected_seq {
                format!(
                    "{name}: digest {} follows digest {}: digest(s) {}..={} are missing",
                    body.digest_seq,
                    expected_seq - 1,
                    expected_seq,
                    body.digest_seq - 1
                )
            } else {
                format!(
                    "{name}: digest {} is out of order (after digest {})",
                    body.digest_seq,
                    expected_seq - 1
                )
            });
        } else if body.previous != previous {
            problems.push(format!(
                "{name}: digest {} does not name the signature of digest {} before it: the digests were reordered or replaced",
                body.digest_seq,
                expected_seq - 1
            ));
        }
        expected_seq = body.digest_seq + 1;
        previous = Some((body.digest_seq, sig.clone()));
    }
    // Each file as far as the newest digest that names it.
    let mut newest: BTreeMap<&str, (&Covered, u64)> = BTreeMap::new();
    for (_, body, _) in &digests {
        for c in &body.files {
            let e = newest
                .entry(c.file.as_str())
                .or_insert((c, body.digest_seq));
            if c.bytes >= e.0.bytes {
                *e = (c, body.digest_seq);
            }
        }
    }
    for (file, (c, seq)) in &newest {
        if file.contains('/') || !file.starts_with("audit-") {
            problems.push(format!(
                "digest {seq} names {file:?}, which is not an audit file name"
            ));
            continue;
        }
        let path = dir.join(file);
        match prefix_sha256(&path, c.bytes) {
            Ok(Some(h)) if h == c.sha256 => {}
            Ok(Some(_)) => problems.push(format!(
                "{}: its first {} bytes are not what digest {seq} signed: the file was rewritten after it was signed",
                path.display(),
                c.bytes
            )),
            Ok(None) => problems.push(format!(
                "{}: shorter than the {} bytes digest {seq} signed: records were removed",
                path.display(),
                c.bytes
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => problems.push(format!(
                "{}: named by digest {seq}, but missing",
                path.display()
            )),
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    // Audit files no digest names, older than the newest one named.
    let audit = super::writer::audit_files(dir).unwrap_or_default();
    let last_named = newest.keys().next_back().map(|s| s.to_string());
    let mut beyond = Vec::new();
    for path in &audit {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        match newest.get(name) {
            Some((c, _)) if c.bytes < len => beyond.push(name.to_owned()),
            Some(_) => {}
            None if last_named.as_deref().is_some_and(|l| name < l) => problems.push(format!(
                "{}: in no digest, though later files are: it was added, or a digest is missing",
                path.display()
            )),
            None => beyond.push(name.to_owned()),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let newest_digest = digests
        .last()
        .map(|(_, b, _)| (b.time.clone(), b.chain_head.as_ref().map(|(seq, _)| *seq)));
    Ok(DigestSummary {
        digests: digests.len() as u64,
        key: fingerprint,
        newest: newest_digest,
        files_covered: newest.len(),
        beyond,
    })
}

/// SHA-256 of the first `bytes` bytes of `path`; `None` if it is shorter.
fn prefix_sha256(path: &Path, bytes: u64) -> std::io::Result<Option<String>> {
    let f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut r = BufReader::with_capacity(1 << 16, f.take(bytes));
    let mut n = 0u64;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        h.update(buf);
        let len = buf.len();
        n += len as u64;
        r.consume(len);
    }
    Ok((n == bytes).then(|| hex(&h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path, name: &str) -> PathBuf {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let der =
            EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, pem("PRIVATE KEY", der.as_ref())).unwrap();
        path
    }

    fn append(path: &Path, seqs: std::ops::Range<u64>) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        for s in seqs {
            writeln!(
                f,
                r#"{{"seq":{s},"prev":"{}","v":1,"type":"statement"}}"#,
                "0".repeat(64)
            )
            .unwrap();
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        let _ = std::fs::remove_dir_all(to);
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_key_file_that_cannot_sign_says_how_to_make_one() {
        let dir = std::env::temp_dir().join(format!("rip-digest-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a key\n").unwrap();
        let e = SigningKey::from_file(&junk).unwrap_err().to_string();
        assert!(e.contains("openssl genpkey -algorithm EC"), "{e}");
        let e = SigningKey::from_file(&dir.join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read the signing key"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn digests_detect_what_the_chain_cannot() {
        let root = std::env::temp_dir().join(format!("rip-digest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("trail");
        std::fs::create_dir_all(&dir).unwrap();
        let keys = root.join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let a = dir.join("audit-20270101T000000000000-00000001.jsonl");
        let b = dir.join("audit-20270101T010000000000-00000011.jsonl");
        append(&a, 1..6);
        let key = SigningKey::from_file(&key_file(&keys, "k.pem")).unwrap();
        let public = key.public_pem();
        let mut d = Digester::new(&dir, key, "h:1".into()).unwrap();
        let first = run(d.digest("start")).unwrap().unwrap();
        append(&a, 6..11);
        append(&b, 11..15);
        run(d.digest("rotation")).unwrap().unwrap();
        // Nothing grew: no digest on a tick.
        assert_eq!(run(d.digest("interval")).unwrap(), None);
        append(&b, 15..20);
        let third = run(d.digest("interval")).unwrap().unwrap();
        // A torn last line is not covered yet.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&b)
            .unwrap()
            .write_all(b"{\"seq\":20")
            .unwrap();
        let ok = check(&dir, public.as_bytes()).unwrap();
        assert_eq!((ok.digests, ok.files_covered), (3, 2));
        assert_eq!(ok.newest.as_ref().unwrap().1, Some(19));
        assert_eq!(ok.beyond, [b.file_name().unwrap().to_str().unwrap()]);
        assert_eq!(
            std::fs::read_to_string(dir.join(PUBLIC_KEY_FILE)).unwrap(),
            public
        );

        let broken = |what: &str, damage: &dyn Fn(&Path)| -> Vec<String> {
            let copy = root.join(what);
            copy_dir(&dir, &copy);
            damage(&copy);
            let problems = check(&copy, public.as_bytes()).expect_err(what);
            let _ = std::fs::remove_dir_all(&copy);
            problems
        };
        let name = |p: &Path| p.file_name().unwrap().to_owned();
        // A record rewritten, even with a recomputed chain.
        let p = broken("rewritten", &|c| {
            let f = c.join(name(&a));
            let text = std::fs::read_to_string(&f)
                .unwrap()
                .replace("\"seq\":3,", "\"seq\":3 ,");
            std::fs::write(&f, text).unwrap();
        });
        assert!(p[0].contains("rewritten after it was signed"), "{p:?}");
        let p = broken("missing-file", &|c| {
            std::fs::remove_file(c.join(name(&a))).unwrap()
        });
        assert!(p[0].contains("but missing"), "{p:?}");
        let p = broken("truncated", &|c| {
            let f = c.join(name(&b));
            let text = std::fs::read(&f).unwrap();
            std::fs::write(&f, &text[..text.len() / 2]).unwrap();
        });
        assert!(p[0].contains("records were removed"), "{p:?}");
        let p = broken("missing-digest", &|c| {
            let second = digest_files(c).unwrap()[1].clone();
            std::fs::remove_file(second).unwrap();
        });
        assert!(p[0].contains("digest(s) 2..=2 are missing"), "{p:?}");
        let p = broken("reordered", &|c| {
            // The third digest renamed to sort before the first.
            let third_name = name(&third);
            let renamed = c.join(format!("digest-0{}", &third_name.to_str().unwrap()[7..]));
            std::fs::rename(c.join(third_name), renamed).unwrap();
        });
        assert!(
            p.iter()
                .any(|m| m.contains("out of order") || m.contains("missing")),
            "{p:?}"
        );
        let other = SigningKey::from_file(&key_file(&keys, "other.pem")).unwrap();
        let p = broken("other-key", &|c| {
            let f = c.join(name(&first));
            let signed = read_signed(&f).unwrap();
            let sig = run(other.sign(signed.body.as_bytes())).unwrap();
            let forged = Signed {
                body: signed.body,
                signature: base64::engine::general_purpose::STANDARD.encode(sig),
            };
            std::fs::write(&f, serde_json::to_string(&forged).unwrap()).unwrap();
        });
        assert!(p[0].contains("does not verify with the given key"), "{p:?}");
        let p = broken("unlisted-file", &|c| {
            append(&c.join("audit-20270101T003000000000-00000006.jsonl"), 1..2);
        });
        assert!(p[0].contains("in no digest"), "{p:?}");
        // The key given is checked, not the one in the directory.
        let wrong = other.public_pem();
        assert!(check(&dir, wrong.as_bytes()).is_err());

        // A new digester goes on with the chain.
        let key = SigningKey::from_file(&keys.join("k.pem")).unwrap();
        let mut again = Digester::new(&dir, key, "h:2".into()).unwrap();
        run(again.digest("start")).unwrap().unwrap();
        assert_eq!(check(&dir, public.as_bytes()).unwrap().digests, 4);
        let _ = std::fs::remove_dir_all(&root);
    }
}
