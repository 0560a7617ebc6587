//! The audit trail: who ran what, written as hash-chained JSON lines
//! (docs/audit.md has the schema), and the password guard.
//!
//! - [`event`]: the records and their JSON.
//! - [`tap`]: one session's statements, outcomes and guard verdicts, fed by
//!   the forwarding pump ([`crate::gate`]).
//! - [`model`]: what the server does with each client message (skips,
//!   COPY, names), so each outcome lands on the statement that produced it.
//! - [`writer`]: the writer thread: queue, hash chain, rotation, fsync.
//! - [`redact`]: PostgreSQL's parser (libpg_query) for the guard, statement
//!   splitting and password redaction.
//! - [`verify`]: `rds-iam-proxy audit verify`; [`chain`] the hash chain
//!   it checks, record by record.
//! - [`search`]: `rds-iam-proxy audit search` and `audit tail`.
//! - [`limits`]: the memory and parser threads all sessions share.

pub mod chain;
pub mod digest;
pub mod event;
pub mod functions;
pub mod limits;
pub mod model;
pub mod record;
pub mod redact;
pub mod search;
pub mod ship;
pub mod tap;
pub mod verify;
pub mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;

pub use tap::SessionTap;
pub use writer::{AuditStats, Sink, WriterConfig, WriterError};

use event::Event;

/// When a statement's record must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Mode {
    /// No audit log.
    #[default]
    Off,
    /// Queued; forwarding never waits. A full queue drops records (counted
    /// and logged); a crash loses what was queued or unsynced.
    Async,
    /// A statement is forwarded only after its record is fsynced; if the
    /// log cannot be written, statements are refused.
    Sync,
}

/// The audit part of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub mode: Mode,
    /// Directory of the audit files.
    pub dir: Option<PathBuf>,
    /// Refuse CREATE/ALTER ROLE ... PASSWORD (on by default).
    pub password_guard: bool,
    /// Write Bind parameter values (off by default: they can hold personal
    /// data).
    pub parameters: bool,
    /// Prefix the upstream application_name with the person and the
    /// connection id (off by default; a hint, not proof).
    pub stamp_application_name: bool,
    /// Statement text kept per record; longer text is cut and hashed.
    pub max_statement_bytes: usize,
    pub rotate_bytes: u64,
    pub rotate_age: Duration,
    pub queue_capacity: usize,
    /// Sign digests of the trail with this key ([`digest`]) [default: no
    /// digests].
    pub sign_key: Option<SignKey>,
    /// How often a digest is signed (besides each rotation and the stop).
    pub digest_interval: Duration,
    /// Shipping off the host ([`ship`]): sinks, layout, spool bound.
    pub ship: ship::ShipConfig,
    /// A role the digests' KMS key and the sinks are reached as, assumed
    /// with the proxy's credentials [default: the proxy's credentials].
    pub role_arn: Option<String>,
}

/// Where the digest signing key is: `file:PATH` (a P-256 PKCS#8 PEM) or
/// `kms:KEY` (a KMS key id, ARN or alias).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignKey {
    File(PathBuf),
    Kms(String),
}

impl SignKey {
    pub fn parse(v: &str) -> Option<SignKey> {
        match v.split_once(':')? {
            ("file", p) if !p.is_empty() => Some(SignKey::File(PathBuf::from(p))),
            ("kms", k) if !k.is_empty() => Some(SignKey::Kms(k.to_owned())),
            _ => None,
        }
    }
}

impl std::fmt::Display for SignKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignKey::File(p) => write!(f, "file:{}", p.display()),
            SignKey::Kms(k) => write!(f, "kms:{k}"),
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Off,
            dir: None,
            password_guard: true,
            parameters: false,
            stamp_application_name: false,
            max_statement_bytes: 64 * 1024,
            rotate_bytes: 256 * 1024 * 1024,
            rotate_age: Duration::from_secs(24 * 3600),
            queue_capacity: 65_536,
            sign_key: None,
            digest_interval: Duration::from_secs(15 * 60),
            ship: ship::ShipConfig::default(),
            role_arn: None,
        }
    }
}

/// The process-wide audit state: configuration and, when on, the sink.
#[derive(Debug)]
pub struct Auditor {
    pub config: AuditConfig,
    pub sink: Option<Arc<Sink>>,
    pub limits: limits::Limits,
    /// Signed digests, when a key is configured ([`Auditor::start_digests`]).
    digests: std::sync::Mutex<Digests>,
    /// Digests that could not be signed or written.
    pub digest_failures: Arc<std::sync::atomic::AtomicU64>,
    /// The sinks the trail is shipped to, and how far behind they are.
    pub shipping: ship::Shipping,
}

#[derive(Debug, Default)]
struct Digests {
    rotations: Option<tokio::sync::mpsc::UnboundedReceiver<()>>,
    closed: Option<tokio::sync::watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The shipping tasks, told after the last digest.
    ship_closed: Option<tokio::sync::watch::Sender<bool>>,
    ship_tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// How long the stop waits for the last files to be shipped.
const LAST_SHIP_WAIT: Duration = Duration::from_secs(30);

/// How long the stop waits for the last digest (a KMS call) to be signed.
const LAST_DIGEST_WAIT: Duration = Duration::from_secs(15);

impl Auditor {
    /// Starts the writer when the mode asks for one.
    pub fn start(config: AuditConfig) -> Result<Self, WriterError> {
        let (rotated, rotations) = match config.sign_key {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let sink = match (config.mode, &config.dir) {
            (Mode::Off, _) | (_, None) => None,
            (_, Some(dir)) => Some(Sink::start(WriterConfig {
                dir: dir.clone(),
                rotate_bytes: config.rotate_bytes,
                rotate_age: config.rotate_age,
                queue_capacity: config.queue_capacity,
                parameters: config.parameters,
                settings: format!(
                    "mode={:?} parameters={} password_guard={} max_statement_bytes={}",
                    config.mode,
                    config.parameters,
                    config.password_guard,
                    config.max_statement_bytes
                )
                .to_lowercase(),
                rotated,
            })?),
        };
        let shipping = ship::Shipping {
            s3: config.ship.s3_bucket.as_ref().map(|_| Arc::default()),
            kinesis: config.ship.kinesis_stream.as_ref().map(|_| Arc::default()),
            spool_max_bytes: config.ship.spool_max_bytes,
        };
        Ok(Self {
            config,
            sink,
            limits: limits::Limits::default(),
            digests: std::sync::Mutex::new(Digests {
                rotations,
                ..Digests::default()
            }),
            digest_failures: Arc::default(),
            shipping,
        })
    }

    /// Starts the shipping sinks, if any are configured.
    pub fn start_shipping(&self, sdk: &aws_config::SdkConfig) {
        let (Some(dir), Some(_)) = (&self.config.dir, &self.sink) else {
            return;
        };
        let ship = &self.config.ship;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        if let (Some(_), Some(stats)) = (&ship.s3_bucket, &self.shipping.s3) {
            // A custom endpoint (a test double, MinIO) takes path-style
            // addressing; AWS's own takes either.
            let conf = aws_sdk_s3::config::Builder::from(sdk)
                .force_path_style(sdk.endpoint_url().is_some())
                .build();
            let s = ship::S3Shipper::new(
                dir,
                ship.clone(),
                aws_sdk_s3::Client::from_conf(conf),
                stats.clone(),
            );
            tasks.push(tokio::spawn(ship::run_s3(s, rx.clone())));
        }
        if let (Some(_), Some(stats)) = (&ship.kinesis_stream, &self.shipping.kinesis) {
            let k = ship::KinesisShipper::new(
                dir,
                ship,
                aws_sdk_kinesis::Client::new(sdk),
                stats.clone(),
            );
            tasks.push(tokio::spawn(ship::run_kinesis(k, rx)));
        }
        if !tasks.is_empty() {
            tracing::info!(
                instance = %ship.instance_id,
                s3 = ?ship.s3_bucket,
                kinesis = ?ship.kinesis_stream,
                "audit shipping started"
            );
            let mut d = self.digests.lock().unwrap_or_else(|e| e.into_inner());
            d.ship_closed = Some(tx);
            d.ship_tasks = tasks;
        }
    }

    /// The AWS configuration the audit's own calls (KMS Sign, S3, Kinesis)
    /// use: the proxy's, or with `role_arn` a role assumed from it, so
    /// that write access to the audit store need not be the proxy's.
    pub async fn aws_config(&self, sdk: &aws_config::SdkConfig) -> aws_config::SdkConfig {
        let Some(arn) = &self.config.role_arn else {
            return sdk.clone();
        };
        let provider = aws_config::sts::AssumeRoleProvider::builder(arn)
            .session_name("rds-iam-proxy-audit")
            .configure(sdk)
            .build()
            .await;
        sdk.to_builder()
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(provider),
            )
            .build()
    }

    /// Starts signing digests of the trail, if a key is configured: the
    /// key is loaded (a KMS key through `sdk`'s credentials) and the first
    /// digest signed before this returns, so a key that cannot sign stops
    /// the start.
    pub async fn start_digests(
        &self,
        sdk: &aws_config::SdkConfig,
    ) -> Result<(), digest::DigestError> {
        let (Some(spec), Some(dir), Some(_)) =
            (&self.config.sign_key, &self.config.dir, &self.sink)
        else {
            return Ok(());
        };
        let key = match spec {
            SignKey::File(path) => digest::SigningKey::from_file(path)?,
            SignKey::Kms(id) => digest::SigningKey::kms(aws_sdk_kms::Client::new(sdk), id).await?,
        };
        let mut digester = digest::Digester::new(dir, key, writer::instance())?;
        digester.digest("start").await?;
        tracing::info!(
            key = %digester.fingerprint(),
            every = ?self.config.digest_interval,
            "audit digests: signed at start, every interval, at each rotation and at the stop"
        );
        let mut d = self.digests.lock().unwrap_or_else(|e| e.into_inner());
        let rotations = d
            .rotations
            .take()
            .unwrap_or_else(|| tokio::sync::mpsc::unbounded_channel().1);
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        d.closed = Some(closed_tx);
        d.task = Some(tokio::spawn(digest::run(
            digester,
            self.config.digest_interval,
            rotations,
            closed,
            self.digest_failures.clone(),
        )));
        Ok(())
    }

    /// An auditor from its parts (tests, the fuzz targets): no digests.
    pub fn from_parts(
        config: AuditConfig,
        sink: Option<Arc<Sink>>,
        limits: limits::Limits,
    ) -> Self {
        Self {
            config,
            sink,
            limits,
            digests: std::sync::Mutex::default(),
            digest_failures: Arc::default(),
            shipping: ship::Shipping::default(),
        }
    }

    /// An auditor that logs nothing and guards passwords as configured.
    pub fn off(password_guard: bool) -> Self {
        Self {
            config: AuditConfig {
                password_guard,
                ..AuditConfig::default()
            },
            sink: None,
            limits: limits::Limits::default(),
            digests: std::sync::Mutex::default(),
            digest_failures: Arc::default(),
            shipping: ship::Shipping::default(),
        }
    }

    /// Counters for metrics (`None` when nothing is logged).
    pub fn stats(&self) -> Option<&AuditStats> {
        self.sink.as_ref().map(|s| &s.stats)
    }

    /// Records a session-level event. In sync mode waits until it is
    /// durable and returns false if it cannot be written.
    pub async fn record(&self, event: Event) -> bool {
        let Some(sink) = &self.sink else {
            return true;
        };
        match self.config.mode {
            Mode::Sync => sink.push_durable(event).await.unwrap_or(false),
            _ => {
                sink.push(event);
                true
            }
        }
    }

    /// Flushes and closes the log (at shutdown).
    pub fn close(&self) {
        if let Some(s) = &self.sink {
            s.close();
        }
    }

    /// Closes the log, then signs the last digest (covering the
    /// `audit_stop` record) and ships what is left, waiting for each a
    /// bounded time.
    pub async fn close_and_sign(&self) {
        self.close();
        let (closed, task, ship_closed, ship_tasks) = {
            let mut d = self.digests.lock().unwrap_or_else(|e| e.into_inner());
            (
                d.closed.take(),
                d.task.take(),
                d.ship_closed.take(),
                std::mem::take(&mut d.ship_tasks),
            )
        };
        if let (Some(closed), Some(task)) = (closed, task) {
            self.sign_last(closed, task).await;
        }
        if let Some(tx) = ship_closed {
            let _ = tx.send(true);
            let all = futures_join(ship_tasks);
            if tokio::time::timeout(LAST_SHIP_WAIT, all).await.is_err() {
                tracing::error!(
                    "audit shipping did not finish within {}s: what is left is shipped at the next start",
                    LAST_SHIP_WAIT.as_secs()
                );
            }
        }
    }

    async fn sign_last(
        &self,
        closed: tokio::sync::watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    ) {
        let _ = closed.send(true);
        if tokio::time::timeout(LAST_DIGEST_WAIT, task).await.is_err() {
            self.digest_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(
                "the last audit digest was not signed within {}s: the trail's end is covered by the hash chain only",
                LAST_DIGEST_WAIT.as_secs()
            );
        }
    }
}

/// Waits for every task (their results do not matter here).
async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}
