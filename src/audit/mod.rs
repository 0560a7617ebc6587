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
pub mod event;
pub mod functions;
pub mod limits;
pub mod model;
pub mod record;
pub mod redact;
pub mod search;
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
        }
    }
}

/// The process-wide audit state: configuration and, when on, the sink.
#[derive(Debug)]
pub struct Auditor {
    pub config: AuditConfig,
    pub sink: Option<Arc<Sink>>,
    pub limits: limits::Limits,
}

impl Auditor {
    /// Starts the writer when the mode asks for one.
    pub fn start(config: AuditConfig) -> Result<Self, WriterError> {
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
            })?),
        };
        Ok(Self {
            config,
            sink,
            limits: limits::Limits::default(),
        })
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
}
