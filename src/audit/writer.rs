//! The audit writer: one OS thread that turns events into hash-chained JSON
//! lines, rotates files, and fsyncs.
//!
//! Forwarding tasks never touch the file. They push events into a queue
//! ([`Sink::push`]); the thread takes the whole queue at once, writes it,
//! and (when any event waits for durability) fsyncs once for the batch
//! before acknowledging, so synchronous mode costs one fsync per batch, not
//! per statement (group commit).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::event::{Event, Obj, OutcomeKind, Protocol, SCHEMA_VERSION, hex, json_str, push_hex};
use super::redact;

/// Where and how the log is written.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub dir: PathBuf,
    /// Start a new file once the current one reaches this many bytes.
    pub rotate_bytes: u64,
    /// Start a new file once the current one is this old.
    pub rotate_age: Duration,
    /// Events the queue holds before async mode drops.
    pub queue_capacity: usize,
    /// Bind parameter values are written (off by default).
    pub parameters: bool,
    /// What the `audit_start` record says about the settings in force.
    pub settings: String,
    /// Told after each rotation (the digests sign the closed file).
    pub rotated: Option<tokio::sync::mpsc::UnboundedSender<()>>,
}

/// Counters for metrics and the log. Plain atomics so any exporter can read
/// them.
#[derive(Debug, Default)]
pub struct AuditStats {
    /// Events waiting in the queue.
    pub queue_depth: AtomicU64,
    /// Events dropped because the async queue was full.
    pub dropped: AtomicU64,
    /// Records written.
    pub written: AtomicU64,
    /// Write or fsync failures.
    pub write_errors: AtomicU64,
}

/// An acknowledgement: `true` once the record is durable, `false` when the
/// sink failed.
pub type Ack = oneshot::Sender<bool>;

struct Queue {
    events: VecDeque<(Event, Option<Ack>)>,
    closed: bool,
}

/// The forwarding side's handle on the writer.
#[derive(Debug)]
pub struct Sink {
    queue: Mutex<Queue>,
    wake: Condvar,
    capacity: usize,
    pub stats: AuditStats,
    /// Set when a write or fsync failed and not yet recovered.
    pub failed: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Queue({})", self.events.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("audit directory {dir}: {source}")]
    Dir { dir: PathBuf, source: io::Error },
    #[error("audit file {file}: {source}")]
    File { file: PathBuf, source: io::Error },
}

impl Sink {
    /// Opens the log (continuing the chain of the newest file in the
    /// directory) and starts the writer thread.
    pub fn start(config: WriterConfig) -> Result<Arc<Sink>, WriterError> {
        let mut writer = Writer::open(config.clone())?;
        let sink = Arc::new(Sink {
            queue: Mutex::new(Queue {
                events: VecDeque::with_capacity(config.queue_capacity),
                closed: false,
            }),
            wake: Condvar::new(),
            capacity: config.queue_capacity,
            stats: AuditStats::default(),
            failed: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let s = sink.clone();
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(&s))
            .map_err(|source| WriterError::Dir {
                dir: config.dir.clone(),
                source,
            })?;
        *sink.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(sink)
    }

    /// Queues an event without waiting. Returns false (and counts a drop)
    /// when the queue is full.
    pub fn push(&self, event: Event) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.closed {
            drop(q);
            self.lost_after_close();
            return false;
        }
        if q.events.len() >= self.capacity {
            drop(q);
            let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                warn!(dropped = n + 1, "audit queue full: events dropped");
            }
            return false;
        }
        q.events.push_back((event, None));
        let len = q.events.len();
        self.stats.queue_depth.store(len as u64, Ordering::Relaxed);
        drop(q);
        // The writer takes the whole queue each time it wakes and lingers
        // a millisecond to let records gather: wake it only when it may be
        // asleep, not for every record.
        if len == 1 || len == self.capacity / 2 {
            self.wake.notify_one();
        }
        true
    }

    /// Queues an event that must be durable; the receiver answers once it
    /// is fsynced. Never dropped: each session waits for its own ack, which
    /// bounds the queue by the number of sessions.
    pub fn push_durable(&self, event: Event) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        if self.failed.load(Ordering::Relaxed) {
            let _ = tx.send(false);
            return rx;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.closed {
            drop(q);
            self.lost_after_close();
            let _ = tx.send(false);
            return rx;
        }
        q.events.push_back((event, Some(tx)));
        self.stats
            .queue_depth
            .store(q.events.len() as u64, Ordering::Relaxed);
        drop(q);
        self.wake.notify_one();
        rx
    }

    /// A record that came after the log was closed: counted and logged,
    /// never queued where no one would write it (a sync session is told
    /// no, rather than waiting for ever).
    fn lost_after_close(&self) {
        static LOST: crate::throttle::Throttle =
            crate::throttle::Throttle::new(Duration::from_secs(1));
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(more) = LOST.admit(Instant::now()) {
            error!(
                also_lost = more,
                "audit record after the audit log was closed: lost"
            );
        }
    }

    /// Writes what is queued, closes the file and stops the thread.
    pub fn close(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.wake.notify_one();
        if let Some(h) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// This process, as the audit start and stop records name it:
/// `host:pid`.
pub fn instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
}

/// The head of the chain: the last record's sequence number and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl Head {
    pub const GENESIS: Head = Head {
        seq: 0,
        hash: [0; 32],
    };
}

struct Writer {
    config: WriterConfig,
    file: Option<io::BufWriter<File>>,
    path: PathBuf,
    opened: Instant,
    size: u64,
    head: Head,
    /// The head as of the last successful flush: where the chain goes on
    /// after a failed write.
    durable: Head,
    line: Vec<u8>,
    parts: Vec<(usize, usize)>,
}

impl Writer {
    fn open(config: WriterConfig) -> Result<Self, WriterError> {
        // The trail names people and holds their statements: owner only
        // (a directory that already exists keeps its mode; the files are
        // 0600 whatever the umask).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.dir)
            .map_err(|source| WriterError::Dir {
                dir: config.dir.clone(),
                source,
            })?;
        let (head, previous) = newest_head(&config.dir).map_err(|source| WriterError::Dir {
            dir: config.dir.clone(),
            source,
        })?;
        let mut w = Writer {
            config,
            file: None,
            path: PathBuf::new(),
            opened: Instant::now(),
            size: 0,
            head,
            durable: head,
            line: Vec::with_capacity(4096),
            parts: Vec::new(),
        };
        let settings = w.config.settings.clone();
        w.new_file(previous.as_deref(), "start")
            .and_then(|()| {
                // PCI DSS 10.2: the trail says when auditing starts and
                // stops, by which process, with which settings.
                w.record("audit_start", SystemTime::now(), |o| {
                    o.str("instance", instance())
                        .str("version", env!("CARGO_PKG_VERSION"))
                        .str("settings", &settings);
                })
            })
            .and_then(|()| w.sync())
            .map_err(|source| WriterError::File {
                file: w.path.clone(),
                source,
            })?;
        w.durable = w.head;
        Ok(w)
    }

    /// Opens the next file and writes its `file_start` record, chained to
    /// the head of the previous one.
    fn new_file(&mut self, previous: Option<&Path>, why: &str) -> io::Result<()> {
        let now = SystemTime::now();
        let stamp = super::event::rfc3339(now).replace([':', '-'], "");
        // Time to the microsecond, then the first seq: names sort in order
        // and a retry after a failure never meets an earlier file's name.
        let name = format!(
            "audit-{}-{:08}.jsonl",
            stamp.trim_end_matches('Z').replace('.', ""),
            self.head.seq + 1
        );
        self.path = self.config.dir.join(name);
        let f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        self.file = Some(io::BufWriter::with_capacity(64 * 1024, f));
        self.opened = Instant::now();
        self.size = 0;
        let prev_name = previous
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let started = self
            .record("file_start", now, |o| {
                o.opt_str("previous_file", prev_name.as_deref())
                    .str("reason", why);
            })
            .and_then(|()| self.sync());
        if let Err(e) = started {
            self.file = None;
            self.head = self.durable;
            return Err(e);
        }
        self.durable = self.head;
        // The directory entry must be durable too, or a crash can lose the
        // whole new file.
        if let Ok(d) = File::open(&self.config.dir) {
            let _ = d.sync_all();
        }
        info!(file = %self.path.display(), seq = self.head.seq, "audit file opened");
        Ok(())
    }

    fn rotate(&mut self, why: &str) -> io::Result<()> {
        let next_seq = self.head.seq + 2;
        self.record("file_end", SystemTime::now(), |o| {
            o.num("next_seq", next_seq).str("reason", why);
        })?;
        self.sync()?;
        let old = std::mem::take(&mut self.path);
        self.file = None;
        self.new_file(Some(&old), why)?;
        if let Some(tx) = &self.config.rotated {
            let _ = tx.send(());
        }
        Ok(())
    }

    /// Writes one record: `{"seq":N,"prev":HASH,"v":1,"type":T,"time":..,...}`.
    fn record(
        &mut self,
        ty: &str,
        time: SystemTime,
        fill: impl FnOnce(&mut Obj),
    ) -> io::Result<()> {
        let seq = self.head.seq + 1;
        self.line.clear();
        self.line.extend_from_slice(b"{\"seq\":");
        // Written in place: no allocation per record.
        let _ = write!(self.line, "{seq}");
        self.line.extend_from_slice(b",\"prev\":\"");
        push_hex(&mut self.line, &self.head.hash);
        self.line.push(b'"');
        {
            let mut o = Obj::continue_in(&mut self.line);
            o.num("v", SCHEMA_VERSION)
                .str("type", ty)
                .time("time", time);
            fill(&mut o);
            o.close();
        }
        let hash: [u8; 32] = Sha256::digest(&self.line).into();
        self.line.push(b'\n');
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("no audit file open"))?;
        f.write_all(&self.line)?;
        self.size += self.line.len() as u64;
        self.head = Head { seq, hash };
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("no audit file open"))?;
        f.flush()?;
        f.get_ref().sync_data()
    }

    fn run(&mut self, sink: &Sink) {
        let mut batch = VecDeque::with_capacity(sink.capacity);
        let mut acks = Vec::new();
        let mut dropped_reported = 0u64;
        loop {
            if self.file.is_none() {
                // After a failure: try a new file until the disk takes one.
                let old = self.path.clone();
                if self.new_file(Some(&old), "write error").is_ok() {
                    sink.failed.store(false, Ordering::Relaxed);
                    warn!(file = %self.path.display(), "audit log writing again");
                }
            }
            let closed = {
                let mut q = sink.queue.lock().unwrap_or_else(|e| e.into_inner());
                while q.events.is_empty() && !q.closed {
                    if self.file.is_none() {
                        let (g, _) = sink
                            .wake
                            .wait_timeout(q, Duration::from_millis(100))
                            .unwrap_or_else(|e| e.into_inner());
                        q = g;
                        break;
                    }
                    let timeout = self.config.rotate_age.saturating_sub(self.opened.elapsed());
                    let (g, _) = sink
                        .wake
                        .wait_timeout(q, timeout.max(Duration::from_millis(10)))
                        .unwrap_or_else(|e| e.into_inner());
                    q = g;
                    if q.events.is_empty() && self.opened.elapsed() >= self.config.rotate_age {
                        break;
                    }
                }
                // Async records only: gather for up to a millisecond, so a
                // busy proxy wakes this thread about once per millisecond
                // rather than once per record. A durable record is written
                // at once.
                if !q.closed
                    && !q.events.is_empty()
                    && q.events.len() < sink.capacity / 2
                    && q.events.iter().all(|(_, ack)| ack.is_none())
                {
                    let (g, _) = sink
                        .wake
                        .wait_timeout(q, Duration::from_millis(1))
                        .unwrap_or_else(|e| e.into_inner());
                    q = g;
                }
                std::mem::swap(&mut q.events, &mut batch);
                sink.stats.queue_depth.store(0, Ordering::Relaxed);
                q.closed
            };
            let batch_len = batch.len();
            if self.file.is_none() {
                for (_, ack) in batch.drain(..) {
                    if let Some(a) = ack {
                        let _ = a.send(false);
                    }
                }
                sink.stats
                    .dropped
                    .fetch_add(batch_len as u64, Ordering::Relaxed);
                if closed {
                    return;
                }
                continue;
            }
            let mut result = Ok(());
            let dropped = sink.stats.dropped.load(Ordering::Relaxed);
            if dropped > dropped_reported {
                let count = dropped - dropped_reported;
                dropped_reported = dropped;
                result = self.write_event(&Event::Dropped {
                    time: SystemTime::now(),
                    count,
                });
            }
            for (event, ack) in batch.drain(..) {
                if result.is_ok() {
                    result = self.write_event(&event);
                    if result.is_ok() {
                        sink.stats.written.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Some(a) = ack {
                    acks.push(a);
                }
            }
            if result.is_ok() {
                result = if acks.is_empty() {
                    self.file.as_mut().map_or(Ok(()), |f| f.flush())
                } else {
                    self.sync()
                };
            }
            if result.is_ok() {
                self.durable = self.head;
            }
            if result.is_ok() && self.needs_rotation() {
                result = self.rotate(if self.size >= self.config.rotate_bytes {
                    "size"
                } else {
                    "age"
                });
            }
            let ok = result.is_ok();
            if let Err(e) = result {
                sink.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                if !sink.failed.swap(true, Ordering::Relaxed) {
                    error!(file = %self.path.display(), error = %e, "audit log write failed");
                }
                // Start over in a new file (at the top of the loop) so a
                // half-written line is not continued; the chain goes on
                // from the last record written whole. Records of this
                // batch are lost: count them.
                self.file = None;
                self.head = self.durable;
                sink.stats
                    .dropped
                    .fetch_add(batch_len as u64, Ordering::Relaxed);
            }
            for a in acks.drain(..) {
                let _ = a.send(ok);
            }
            if closed {
                let _ = self.record("audit_stop", SystemTime::now(), |o| {
                    o.str("instance", instance()).str("reason", "shutdown");
                });
                let _ = self.record("file_end", SystemTime::now(), |o| {
                    o.raw("next_seq", "null").str("reason", "shutdown");
                });
                let _ = self.sync();
                info!(file = %self.path.display(), seq = self.head.seq, head = %hex(&self.head.hash), "audit log closed");
                return;
            }
        }
    }

    fn needs_rotation(&self) -> bool {
        self.size >= self.config.rotate_bytes || self.opened.elapsed() >= self.config.rotate_age
    }

    fn write_event(&mut self, event: &Event) -> io::Result<()> {
        match event {
            Event::SessionStart(s) => self.record(
                "session_start",
                s.time.unwrap_or_else(SystemTime::now),
                |o| {
                    o.num("conn", s.conn)
                        .str("identity_source", &s.identity_source)
                        .str("person", &s.person)
                        .str("role_arn", &s.role_arn)
                        .str("account", &s.account)
                        .str("access_key_id", &s.access_key_id)
                        .str("client_addr", &s.client_addr)
                        .opt_num("client_uid", s.client_uid)
                        .opt_str("client_tls", s.client_tls.as_deref())
                        .str("upstream", &s.upstream)
                        .str("upstream_addr", &s.upstream_addr)
                        .str("upstream_tls", &s.upstream_tls)
                        .str("db_user", &s.db_user)
                        .str("database", &s.database)
                        .str("application_name", &s.application_name)
                        .opt_num("backend_pid", s.backend_pid);
                    if let Some(local) = s.upstream_local_addr {
                        o.str("upstream_local_host", local.ip().to_string())
                            .num("upstream_local_port", local.port());
                    }
                    if let Some((after, before)) = s.backend_start_window {
                        o.time("backend_started_after", after)
                            .time("backend_started_before", before);
                    }
                    o.opt_str("session_id", s.session_id.as_deref())
                        .opt_str("gateway_id", s.gateway_id.as_deref());
                },
            ),
            Event::Denial(d) => {
                self.record("denial", d.time.unwrap_or_else(SystemTime::now), |o| {
                    o.num("conn", d.conn)
                        .str("kind", d.kind)
                        .str("client_addr", &d.client_addr)
                        .opt_str("db_user", d.db_user.as_deref())
                        .opt_str("database", d.database.as_deref())
                        .opt_str("sqlstate", d.sqlstate.as_deref())
                        .str("reason", &d.reason);
                })
            }
            Event::Statement(s) => {
                let text: &[u8] = &s.text.bytes;
                let cut = s.text.full_sha256;
                // Split a simple Query into its statements (off the
                // forwarding path: here, in the writer thread).
                self.parts.clear();
                if s.protocol == Protocol::Simple {
                    redact::split(text, &mut self.parts);
                }
                if self.parts.is_empty() {
                    self.parts.push((0, text.len()));
                }
                let count = self.parts.len();
                for i in 0..count {
                    let (a, b) = self.parts[i];
                    let part = &text[a..b];
                    let shown = redact::redact_as(part, s.judgeable);
                    let params = if self.config.parameters {
                        s.params.as_ref()
                    } else {
                        None
                    };
                    self.record("statement", s.time, |o| {
                        o.num("conn", s.conn)
                            .num("n", s.n)
                            .num("part", i + 1)
                            .num("parts", count)
                            .str("protocol", s.protocol.as_str());
                        if let Some(name) = &s.name {
                            o.str("statement_name", name);
                        }
                        if let Some(oid) = s.function_oid {
                            o.num("function_oid", oid);
                        }
                        o.str("text", shown.as_ref());
                        if shown.is_redacted() {
                            o.raw("redacted", "true");
                        }
                        if let Some(h) = cut {
                            o.raw("truncated", "true")
                                .num("full_length", s.text.full_len)
                                .str("full_sha256", hex(&h));
                        }
                        if let Some(params) = params {
                            o.raw("params", &params_json(params));
                        }
                        if let Some(r) = s.refused {
                            o.str("refused", r);
                        }
                    })?;
                }
                Ok(())
            }
            Event::Outcome(r) => self.record("outcome", r.time, |o| {
                o.num("conn", r.conn).num("n", r.n).num("part", r.part);
                match &r.result {
                    OutcomeKind::Complete { tag, rows } => {
                        o.str("command_tag", tag.as_bytes()).opt_num("rows", *rows);
                    }
                    OutcomeKind::Empty => {
                        o.raw("empty", "true");
                    }
                    OutcomeKind::Error { sqlstate, message } => {
                        o.str("sqlstate", sqlstate).str("error", message.as_bytes());
                    }
                    OutcomeKind::NotRun(why) => {
                        o.str("not_executed", why);
                    }
                }
            }),
            Event::SessionEnd(e) => self.record("session_end", e.time, |o| {
                o.num("conn", e.conn)
                    .num("duration_ms", e.duration_ms)
                    .num("bytes_from_client", e.bytes_from_client)
                    .num("bytes_to_client", e.bytes_to_client)
                    .str("closed_by", e.closed_by)
                    .str("reason", &e.reason);
            }),
            Event::Function(f) => self.record("function", f.time, |o| {
                o.num("conn", f.conn).num("function_oid", f.oid);
                match &f.result {
                    Ok(Some(name)) => {
                        o.str("name", name);
                    }
                    Ok(None) => {
                        o.str("error", "no function has this OID");
                    }
                    Err(e) => {
                        o.str("error", e);
                    }
                }
            }),
            Event::Dropped { time, count } => self.record("dropped", *time, |o| {
                o.num("count", count);
            }),
        }
    }
}

fn params_json(params: &[Option<String>]) -> String {
    let mut out = vec![b'['];
    for (i, p) in params.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match p {
            Some(v) => json_str(&mut out, redact::redact_value(v.as_bytes()).as_ref()),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.push(b']');
    String::from_utf8(out).unwrap_or_default()
}

/// The audit files in `dir`, oldest first (names sort by time and sequence).
pub fn audit_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The head of the newest file: its last whole record. A torn last line
/// (a crash mid-write) is left for `audit verify` to report.
fn newest_head(dir: &Path) -> io::Result<(Head, Option<PathBuf>)> {
    let Some(last) = audit_files(dir)?.pop() else {
        return Ok((Head::GENESIS, None));
    };
    let mut head = Head::GENESIS;
    let mut reader = BufReader::new(File::open(&last)?);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            break;
        }
        line.pop();
        if let Some(seq) = super::verify::seq_of(&line) {
            head = Head {
                seq,
                hash: Sha256::digest(&line).into(),
            };
        }
    }
    Ok((head, Some(last)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A writer that never rotates during a test.
    fn small(dir: &Path, settings: &str) -> WriterConfig {
        WriterConfig {
            dir: dir.to_owned(),
            rotate_bytes: 1 << 20,
            rotate_age: Duration::from_secs(3600),
            queue_capacity: 16,
            parameters: false,
            settings: settings.to_owned(),
            rotated: None,
        }
    }

    /// The directory is created owner-only and every file is 0600, whatever
    /// the process umask would give.
    #[test]
    fn audit_files_are_owner_only() {
        let base = std::env::temp_dir().join(format!("rdsiam-modes-{}", std::process::id()));
        let dir = base.join("nested/audit");
        let sink = Sink::start(small(&dir, "")).unwrap();
        sink.close();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let files = audit_files(&dir).unwrap();
        assert!(!files.is_empty());
        for f in files {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
        let _ = std::fs::remove_dir_all(&base);
    }

    /// The trail says when auditing started and stopped, and by whom.
    #[test]
    fn audit_start_and_stop_are_recorded() {
        let dir = std::env::temp_dir().join(format!("rdsiam-startstop-{}", std::process::id()));
        let sink = Sink::start(small(&dir, "mode=sync")).unwrap();
        sink.close();
        let files = audit_files(&dir).unwrap();
        let text = std::fs::read_to_string(&files[0]).unwrap();
        let types: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                if v["type"] == "audit_start" {
                    assert_eq!(v["settings"], "mode=sync");
                    assert!(
                        v["instance"]
                            .as_str()
                            .unwrap()
                            .ends_with(&format!(":{}", std::process::id()))
                    );
                }
                v["type"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            types,
            ["file_start", "audit_start", "audit_stop", "file_end"]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// After close, a record is counted as lost and a durable one is
    /// answered "not written" at once: before, it sat in a queue no thread
    /// read, and a sync session waited for ever.
    #[tokio::test]
    async fn records_after_close_are_refused_not_held() {
        let dir = std::env::temp_dir().join(format!("rdsiam-afterclose-{}", std::process::id()));
        let sink = Sink::start(small(&dir, "")).unwrap();
        sink.close();
        let event = || Event::Dropped {
            time: SystemTime::now(),
            count: 1,
        };
        assert!(!sink.push(event()));
        let answer = tokio::time::timeout(Duration::from_secs(5), sink.push_durable(event())).await;
        assert_eq!(answer.expect("answered at once"), Ok(false));
        assert_eq!(sink.stats.dropped.load(Ordering::Relaxed), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
