//! Ships the audit trail off the host: each closed audit file, each
//! digest and the digests' public key to S3 (under Object Lock when asked),
//! and every record, as it is written, to a Kinesis data stream (whole
//! records packed, one per line, into Kinesis records of up to 256 KiB).
//!
//! The spool is the trail itself: the local files are written as before
//! (a statement in sync mode waits for the local fsync, never for a remote
//! sink), and each sink keeps in the audit directory how far it has got
//! (`.shipped-s3`: the names uploaded; `.shipped-kinesis`: a file and an
//! offset), written after each success. A sink that is down leaves its
//! files waiting; shipping resumes when it answers again, and after a
//! restart, kill -9 included. What a restart can repeat: an S3 upload
//! whose name was not yet noted is checked with HeadObject first and not
//! repeated; Kinesis records sent but not yet noted are sent again (each
//! carries its `seq`, so a consumer drops repeats).
//!
//! S3 layout (docs/audit.md has an Athena table over it):
//! `PREFIX/instance=ID/date=YYYY-MM-DD/audit-....jsonl` and
//! `.../digest-....json`; `PREFIX/instance=ID/digest-public-key.pem`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::{error, info, warn};

use super::digest::{PUBLIC_KEY_FILE, digest_files};
use super::event::hex;
use super::writer::audit_files;

/// S3 Object Lock retention mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LockMode {
    /// Nobody, root included, can shorten the retention or delete.
    Compliance,
    /// Users with s3:BypassGovernanceRetention can.
    Governance,
}

/// Where and how the trail is shipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShipConfig {
    /// This instance's name in the S3 layout and the Kinesis partition key.
    pub instance_id: String,
    pub s3_bucket: Option<String>,
    /// Key prefix, `""` or ending in `/`.
    pub s3_prefix: String,
    /// Object Lock mode and retention period for each object.
    pub s3_lock: Option<(LockMode, Duration)>,
    pub kinesis_stream: Option<String>,
    /// Unshipped bytes beyond which /readiness says not ready.
    pub spool_max_bytes: u64,
}

/// One sink's counters (metrics, /readiness, the log).
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Bytes of the trail not yet shipped.
    pub pending_bytes: AtomicU64,
    /// Age in seconds of the oldest unshipped data.
    pub oldest_pending_secs: AtomicU64,
    /// Bytes shipped since start.
    pub shipped_bytes: AtomicU64,
    /// Objects (S3) or records (Kinesis) shipped since start.
    pub shipped_items: AtomicU64,
    /// Failed calls since start.
    pub failures: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl SinkStats {
    fn failed(&self, sink: &str, what: String) {
        self.failures.fetch_add(1, Relaxed);
        static LOG: crate::throttle::Throttle =
            crate::throttle::Throttle::new(Duration::from_secs(10));
        if let Some(more) = LOG.admit(std::time::Instant::now()) {
            warn!(
                sink,
                also_failed = more,
                "audit shipping failed (will retry): {what}"
            );
        }
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(what);
        }
    }
}

/// A metric: name, kind, help, and how to read it from a sink's stats.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&SinkStats) -> u64,
);

/// The running sinks.
#[derive(Debug, Default)]
pub struct Shipping {
    pub s3: Option<Arc<SinkStats>>,
    pub kinesis: Option<Arc<SinkStats>>,
    pub spool_max_bytes: u64,
}

impl Shipping {
    /// Why the trail is too far behind, if it is.
    pub fn behind(&self) -> Option<String> {
        for (name, s) in [("S3", &self.s3), ("Kinesis", &self.kinesis)] {
            let Some(s) = s else { continue };
            let pending = s.pending_bytes.load(Relaxed);
            if self.spool_max_bytes > 0 && pending > self.spool_max_bytes {
                return Some(format!(
                    "audit shipping to {name} is behind: {} MiB not shipped (limit {} MiB)",
                    pending >> 20,
                    self.spool_max_bytes >> 20
                ));
            }
        }
        None
    }

    /// Prometheus lines for the sinks.
    pub fn render(&self, s: &mut String, prefix: &str) {
        use std::fmt::Write as _;
        let sinks: Vec<(&str, &Arc<SinkStats>)> = [("s3", &self.s3), ("kinesis", &self.kinesis)]
            .into_iter()
            .filter_map(|(n, s)| Some((n, s.as_ref()?)))
            .collect();
        if sinks.is_empty() {
            return;
        }
        let series: [Series; 5] = [
            (
                "audit_ship_pending_bytes",
                "gauge",
                "Audit trail bytes not yet shipped, by sink.",
                |s| s.pending_bytes.load(Relaxed),
            ),
            (
                "audit_ship_oldest_pending_seconds",
                "gauge",
                "Age of the oldest audit data not yet shipped, by sink.",
                |s| s.oldest_pending_secs.load(Relaxed),
            ),
            (
                "audit_shipped_bytes_total",
                "counter",
                "Audit trail bytes shipped, by sink.",
                |s| s.shipped_bytes.load(Relaxed),
            ),
            (
                "audit_shipped_items_total",
                "counter",
                "Objects (s3) or records (kinesis) shipped.",
                |s| s.shipped_items.load(Relaxed),
            ),
            (
                "audit_ship_failures_total",
                "counter",
                "Failed shipping calls, by sink (each is retried).",
                |s| s.failures.load(Relaxed),
            ),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(
                s,
                "# HELP {prefix}_{name} {help}\n# TYPE {prefix}_{name} {kind}"
            );
            for (sink, st) in &sinks {
                let _ = writeln!(s, "{prefix}_{name}{{sink=\"{sink}\"}} {}", get(st));
            }
        }
    }
}

/// `YYYY-MM-DD` from an audit or digest file name (`audit-20261207T...`).
fn date_of(name: &str) -> Option<String> {
    let rest = name.split_once('-')?.1;
    let d = rest.get(..8)?;
    d.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..8]))
}

/// The object key of a file in the layout.
pub fn object_key(config: &ShipConfig, name: &str) -> String {
    let base = format!("{}instance={}/", config.s3_prefix, config.instance_id);
    match date_of(name) {
        Some(date) if name != PUBLIC_KEY_FILE => format!("{base}date={date}/{name}"),
        _ => format!("{base}{name}"),
    }
}

const S3_STATE: &str = ".shipped-s3";
const KINESIS_STATE: &str = ".shipped-kinesis";

fn age_secs(path: &Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map_or(0, |d| d.as_secs())
}

/// Ships closed files to S3.
pub struct S3Shipper {
    dir: PathBuf,
    config: ShipConfig,
    client: aws_sdk_s3::Client,
    shipped: BTreeSet<String>,
    stats: Arc<SinkStats>,
}

impl S3Shipper {
    pub fn new(
        dir: &Path,
        config: ShipConfig,
        client: aws_sdk_s3::Client,
        stats: Arc<SinkStats>,
    ) -> Self {
        let shipped = std::fs::read_to_string(dir.join(S3_STATE))
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default();
        S3Shipper {
            dir: dir.to_owned(),
            config,
            client,
            shipped,
            stats,
        }
    }

    /// What is ready to go, oldest first: every audit file but the one
    /// being written (all of them once the trail is `closed`), every
    /// digest, and the public key under its content's hash.
    fn ready(&self, closed: bool) -> std::io::Result<Vec<(String, PathBuf)>> {
        let mut audit = audit_files(&self.dir)?;
        if !closed {
            audit.pop();
        }
        let mut out: Vec<(String, PathBuf)> = Vec::new();
        let pem = self.dir.join(PUBLIC_KEY_FILE);
        if let Ok(text) = std::fs::read(&pem) {
            out.push((
                format!("{PUBLIC_KEY_FILE}:{}", hex(&Sha256::digest(&text))),
                pem,
            ));
        }
        for p in audit.into_iter().chain(digest_files(&self.dir)?) {
            if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                out.push((n.to_owned(), p.clone()));
            }
        }
        out.retain(|(n, _)| !self.shipped.contains(n));
        Ok(out)
    }

    /// One pass: uploads what is ready, in order, stopping at the first
    /// failure (the next pass starts there). True if nothing is left.
    pub async fn pass(&mut self, closed: bool) -> bool {
        let ready = match self.ready(closed) {
            Ok(r) => r,
            Err(e) => {
                self.stats
                    .failed("s3", format!("cannot list {}: {e}", self.dir.display()));
                return false;
            }
        };
        let pending: u64 = ready
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        self.stats.pending_bytes.store(pending, Relaxed);
        self.stats
            .oldest_pending_secs
            .store(ready.first().map_or(0, |(_, p)| age_secs(p)), Relaxed);
        for (name, path) in ready {
            match self.upload(&name, &path).await {
                Ok(bytes) => {
                    if let Err(e) = self.note(&name) {
                        self.stats
                            .failed("s3", format!("cannot note {name} as shipped: {e}"));
                        return false;
                    }
                    self.stats.shipped_items.fetch_add(1, Relaxed);
                    self.stats.shipped_bytes.fetch_add(bytes, Relaxed);
                    let left = self.stats.pending_bytes.load(Relaxed).saturating_sub(bytes);
                    self.stats.pending_bytes.store(left, Relaxed);
                }
                Err(e) => {
                    self.stats.failed("s3", format!("{name}: {e}"));
                    return false;
                }
            }
        }
        self.stats.pending_bytes.store(0, Relaxed);
        self.stats.oldest_pending_secs.store(0, Relaxed);
        true
    }

    async fn upload(&self, name: &str, path: &Path) -> Result<u64, String> {
        let file_name = name.split(':').next().unwrap_or(name);
        let key = object_key(&self.config, file_name);
        let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        let bucket = self.config.s3_bucket.as_deref().unwrap_or_default();
        // Uploaded before a crash but not noted: not again (with Object
        // Lock a second put would be a second version).
        if let Ok(head) = self
            .client
            .head_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            && head.content_length() == Some(len as i64)
            && file_name != PUBLIC_KEY_FILE
        {
            return Ok(0);
        }
        // Streamed from the file: a 256 MiB file is not held in memory.
        let body = aws_sdk_s3::primitives::ByteStream::from_path(path)
            .await
            .map_err(|e| e.to_string())?;
        let mut put = self
            .client
            .put_object()
            .bucket(bucket)
            .key(&key)
            .content_type(if file_name.ends_with(".pem") {
                "application/x-pem-file"
            } else {
                "application/x-ndjson"
            })
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
            .content_length(len as i64)
            .body(body);
        if let Some((mode, period)) = self.config.s3_lock {
            put = put
                .object_lock_mode(match mode {
                    LockMode::Compliance => aws_sdk_s3::types::ObjectLockMode::Compliance,
                    LockMode::Governance => aws_sdk_s3::types::ObjectLockMode::Governance,
                })
                .object_lock_retain_until_date(aws_smithy_types::DateTime::from(
                    SystemTime::now() + period,
                ));
        }
        put.send()
            .await
            .map_err(|e| aws_sdk_s3::error::DisplayErrorContext(e).to_string())?;
        info!(key, bytes = len, "audit file shipped to S3");
        Ok(len)
    }

    fn note(&mut self, name: &str) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(S3_STATE))?;
        writeln!(f, "{name}")?;
        f.sync_data()?;
        self.shipped.insert(name.to_owned());
        Ok(())
    }
}

/// Where the Kinesis sink is in the trail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    file: String,
    offset: u64,
}

/// Kinesis PutRecords limits: 500 records, 5 MiB a call, 1 MiB a record.
/// Audit records are packed whole, newline-separated, into Kinesis
/// records of up to `ENTRY_BYTES`: one entry per ~1,000 audit records
/// instead of one each, which is most of the cost on both sides.
const BATCH_ENTRIES: usize = 500;
const BATCH_BYTES: usize = 4 << 20;
const ENTRY_BYTES: usize = 256 << 10;
const MAX_RECORD: usize = 1 << 20;

/// Whole records of one file, packed: its name, and each Kinesis entry
/// with the file offset after it.
type Batch = (String, Vec<(Vec<u8>, u64)>);

/// Ships every record to a Kinesis data stream, as it is written.
pub struct KinesisShipper {
    dir: PathBuf,
    stream: String,
    partition_key: String,
    client: aws_sdk_kinesis::Client,
    at: Position,
    stats: Arc<SinkStats>,
}

impl KinesisShipper {
    pub fn new(
        dir: &Path,
        config: &ShipConfig,
        client: aws_sdk_kinesis::Client,
        stats: Arc<SinkStats>,
    ) -> Self {
        let at = std::fs::read(dir.join(KINESIS_STATE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        KinesisShipper {
            dir: dir.to_owned(),
            stream: config.kinesis_stream.clone().unwrap_or_default(),
            partition_key: config.instance_id.clone(),
            client,
            at,
            stats,
        }
    }

    /// The next whole records from the position on: (file, offset after
    /// them, the records).
    fn next_batch(&self) -> std::io::Result<Option<Batch>> {
        let files = audit_files(&self.dir)?;
        let mut pending = 0u64;
        let mut batch: Option<Batch> = None;
        let mut oldest = 0;
        for path in files {
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            if !self.at.file.is_empty() && name < self.at.file {
                continue;
            }
            let start = if name == self.at.file {
                self.at.offset
            } else {
                0
            };
            let len = std::fs::metadata(&path)?.len();
            if len <= start {
                continue;
            }
            pending += len - start;
            if oldest == 0 {
                oldest = age_secs(&path);
            }
            if batch.is_some() {
                continue;
            }
            let mut f = BufReader::new(std::fs::File::open(&path)?);
            f.seek(SeekFrom::Start(start))?;
            let mut entries: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut entry = Vec::new();
            let (mut offset, mut bytes) = (start, 0usize);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = (&mut f)
                    .take(MAX_RECORD as u64)
                    .read_until(b'\n', &mut line)?;
                if n == MAX_RECORD && line.last() != Some(&b'\n') {
                    // Longer than a Kinesis record can be: skipped here
                    // (it is in the files and in S3), never stuck on.
                    let mut rest = Vec::new();
                    let more = f.read_until(b'\n', &mut rest)?;
                    if rest.last() != Some(&b'\n') {
                        break;
                    }
                    offset += (n + more) as u64;
                    self.stats.failed(
                        "kinesis",
                        format!(
                            "a record of {} bytes is over Kinesis's 1 MiB: not sent",
                            n + more
                        ),
                    );
                    continue;
                }
                if n == 0 || line.last() != Some(&b'\n') {
                    break;
                }
                if !entry.is_empty() && entry.len() + n > ENTRY_BYTES {
                    entries.push((std::mem::take(&mut entry), offset));
                    if entries.len() == BATCH_ENTRIES || bytes >= BATCH_BYTES {
                        break;
                    }
                }
                entry.extend_from_slice(&line);
                offset += n as u64;
                bytes += n;
            }
            if !entry.is_empty() {
                entries.push((entry, offset));
            }
            if !entries.is_empty() {
                batch = Some((name, entries));
            } else if offset > start {
                batch = Some((name, vec![(Vec::new(), offset)]));
            }
        }
        self.stats.pending_bytes.store(pending, Relaxed);
        self.stats.oldest_pending_secs.store(oldest, Relaxed);
        Ok(batch)
    }

    /// Sends what has been written since the last pass. True if nothing
    /// is left.
    pub async fn pass(&mut self) -> bool {
        loop {
            let batch = match self.next_batch() {
                Ok(Some(b)) => b,
                Ok(None) => return true,
                Err(e) => {
                    self.stats.failed(
                        "kinesis",
                        format!("cannot read {}: {e}", self.dir.display()),
                    );
                    return false;
                }
            };
            let (file, entries) = batch;
            let send: Vec<_> = entries
                .iter()
                .filter(|(data, _)| !data.is_empty())
                .filter_map(|(data, _)| {
                    aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                        .partition_key(&self.partition_key)
                        .data(aws_smithy_types::Blob::new(data.clone()))
                        .build()
                        .ok()
                })
                .collect();
            let accepted = if send.is_empty() {
                entries.len()
            } else {
                let answer = self
                    .client
                    .put_records()
                    .stream_name(&self.stream)
                    .set_records(Some(send))
                    .send()
                    .await;
                let out = match answer {
                    Ok(o) => o,
                    Err(e) => {
                        self.stats.failed(
                            "kinesis",
                            aws_sdk_kinesis::error::DisplayErrorContext(e).to_string(),
                        );
                        return false;
                    }
                };
                // Entries go on in order: the position moves past the
                // longest run that was accepted; the rest is sent again.
                out.records()
                    .iter()
                    .position(|r| r.error_code().is_some())
                    .unwrap_or(entries.len())
            };
            let Some(end) = accepted.checked_sub(1).map(|i| entries[i].1) else {
                self.stats.failed(
                    "kinesis",
                    "the first entry of a batch was refused: sent again".into(),
                );
                return false;
            };
            let start = if file == self.at.file {
                self.at.offset
            } else {
                0
            };
            let next = Position {
                file: file.clone(),
                offset: end,
            };
            if let Err(e) = save_position(&self.dir, &next) {
                self.stats
                    .failed("kinesis", format!("cannot note the position: {e}"));
                return false;
            }
            self.at = next;
            let lines: u64 = entries[..accepted]
                .iter()
                .map(|(d, _)| d.iter().filter(|b| **b == b'\n').count() as u64)
                .sum();
            self.stats.shipped_items.fetch_add(lines, Relaxed);
            self.stats.shipped_bytes.fetch_add(end - start, Relaxed);
            if accepted < entries.len() {
                self.stats.failed(
                    "kinesis",
                    format!(
                        "{} of {} entries refused (throughput?): they are sent again",
                        entries.len() - accepted,
                        entries.len()
                    ),
                );
                return false;
            }
        }
    }
}

fn save_position(dir: &Path, at: &Position) -> std::io::Result<()> {
    let tmp = dir.join(format!("{KINESIS_STATE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(at).map_err(std::io::Error::other)?)?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join(KINESIS_STATE))
}

/// How often the sinks look for new data, and the longest back-off after
/// failures.
const POLL: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Runs a sink until the trail is closed, then ships what is left (the
/// last file included) with a bounded wait.
pub async fn run_s3(mut s: S3Shipper, mut closed: tokio::sync::watch::Receiver<bool>) {
    let mut backoff = POLL;
    loop {
        let done = s.pass(false).await;
        backoff = if done {
            POLL
        } else {
            (backoff * 2).min(MAX_BACKOFF)
        };
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            r = closed.changed() => if r.is_err() || *closed.borrow() { break },
        }
    }
    if !s.pass(true).await {
        error!("audit files left unshipped at the stop: they are shipped at the next start");
    }
}

pub async fn run_kinesis(mut k: KinesisShipper, mut closed: tokio::sync::watch::Receiver<bool>) {
    let mut backoff = POLL;
    loop {
        let done = k.pass().await;
        backoff = if done {
            POLL
        } else {
            (backoff * 2).min(MAX_BACKOFF)
        };
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            r = closed.changed() => if r.is_err() || *closed.borrow() { break },
        }
    }
    if !k.pass().await {
        error!("audit records left unshipped at the stop: they are sent at the next start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_partitions_by_instance_and_date() {
        let c = ShipConfig {
            instance_id: "bastion-1".into(),
            s3_bucket: Some("b".into()),
            s3_prefix: "audit/".into(),
            s3_lock: None,
            kinesis_stream: None,
            spool_max_bytes: 0,
        };
        assert_eq!(
            object_key(&c, "audit-20261207T065135400351-00000001.jsonl"),
            "audit/instance=bastion-1/date=2026-12-07/audit-20261207T065135400351-00000001.jsonl"
        );
        assert_eq!(
            object_key(&c, "digest-20261207T065239071679-00000001.json"),
            "audit/instance=bastion-1/date=2026-12-07/digest-20261207T065239071679-00000001.json"
        );
        assert_eq!(
            object_key(&c, PUBLIC_KEY_FILE),
            "audit/instance=bastion-1/digest-public-key.pem"
        );
    }
}
