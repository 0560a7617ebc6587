//! Reads every shard of an activity stream's Kinesis stream in order:
//! a shard's records in sequence, and a child shard (after a split or a
//! merge) only once each of its parents has been read to its end, so that
//! the events of one session never come out of order.
//!
//! Positions live in a [`Checkpoint`]; the caller moves it with
//! [`StreamReader::commit`] after it has handled a batch, so what has not
//! been handled is read again after a restart.
//!
//! [`StreamReader::next`] is cancel-safe: a batch is taken into the
//! reader's state only after the call that fetched it has returned.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kinesis::types::ShardIteratorType;

use super::checkpoint::{Checkpoint, Mark};

/// Where a shard that no checkpoint mentions is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest record the stream keeps (24 h for DAS).
    TrimHorizon,
    /// Only what arrives from now on.
    Latest,
    /// Records that arrived at or after this time.
    At(SystemTime),
}

/// One record as Kinesis gave it.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub sequence: String,
    pub data: Vec<u8>,
    pub arrival: Option<SystemTime>,
}

/// A batch from one shard.
#[derive(Debug)]
pub struct Batch {
    pub shard: String,
    pub records: Vec<Fetched>,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "no Kinesis stream {0:?}: is the activity stream started for this cluster (aws rds describe-db-clusters shows ActivityStreamStatus), and is the region right?"
    )]
    NoStream(String),
    #[error("Kinesis {call} failed: {message}")]
    Call { call: &'static str, message: String },
}

#[derive(Debug)]
struct Shard {
    parents: Vec<String>,
    iterator: Option<String>,
    /// Do not poll before this (empty answers, throttling).
    not_before: Instant,
    /// The last answer was empty and nothing was behind.
    caught_up: bool,
}

/// Reads the shards of one stream.
pub struct StreamReader {
    client: aws_sdk_kinesis::Client,
    stream: String,
    start: Start,
    checkpoint: Checkpoint,
    shards: BTreeMap<String, Shard>,
    /// Round-robin position.
    cursor: Option<String>,
    poll: Duration,
    limit: i32,
    listed: bool,
}

fn call_error<E: std::error::Error + Send + Sync + 'static>(
    call: &'static str,
    e: aws_sdk_kinesis::error::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> StreamError {
    let message = aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string();
    StreamError::Call {
        call,
        message: message.chars().take(400).collect(),
    }
}

impl StreamReader {
    pub fn new(
        client: aws_sdk_kinesis::Client,
        stream: String,
        start: Start,
        checkpoint: Checkpoint,
        poll: Duration,
    ) -> Self {
        StreamReader {
            client,
            stream,
            start,
            checkpoint,
            shards: BTreeMap::new(),
            cursor: None,
            poll,
            limit: 1000,
            listed: false,
        }
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Every readable shard has answered empty with nothing behind: what
    /// the stream held when asked has been read.
    pub fn caught_up(&self) -> bool {
        self.listed
            && self
                .shards
                .iter()
                .filter(|(id, _)| self.readable(id))
                .all(|(_, s)| s.caught_up)
    }

    /// Records the batch as handled: a restart reads after it.
    pub fn commit(&mut self, batch: &Batch) {
        if let Some(last) = batch.records.last() {
            self.checkpoint
                .shards
                .entry(batch.shard.clone())
                .or_default()
                .after = Some(last.sequence.clone());
        }
    }

    fn finished(&self, id: &str) -> bool {
        self.checkpoint.shards.get(id).is_some_and(|m| m.finished)
    }

    /// Not finished, and every parent still listed has been finished.
    fn readable(&self, id: &str) -> bool {
        let Some(s) = self.shards.get(id) else {
            return false;
        };
        !self.finished(id)
            && s.parents
                .iter()
                .all(|p| self.finished(p) || !self.shards.contains_key(p))
    }

    async fn list(&mut self) -> Result<(), StreamError> {
        let mut token: Option<String> = None;
        let mut seen = BTreeMap::new();
        loop {
            let mut req = self.client.list_shards();
            req = match &token {
                Some(t) => req.next_token(t),
                None => req.stream_name(&self.stream),
            };
            let out = req.send().await.map_err(|e| {
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception())
                {
                    StreamError::NoStream(self.stream.clone())
                } else {
                    call_error("ListShards", e)
                }
            })?;
            for s in out.shards() {
                let parents = [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                    .into_iter()
                    .flatten()
                    .map(str::to_owned)
                    .collect();
                let closed = s
                    .sequence_number_range()
                    .and_then(|r| r.ending_sequence_number())
                    .is_some();
                seen.insert(s.shard_id().to_owned(), (parents, closed));
            }
            match out.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => break,
            }
        }
        let first = !self.listed;
        for (id, (parents, closed)) in seen {
            // Reading from "now": a shard already closed holds nothing new.
            if first
                && closed
                && self.start == Start::Latest
                && !self.checkpoint.shards.contains_key(&id)
            {
                self.checkpoint.shards.insert(
                    id.clone(),
                    Mark {
                        after: None,
                        finished: true,
                    },
                );
            }
            self.shards.entry(id).or_insert_with(|| Shard {
                parents,
                iterator: None,
                not_before: Instant::now(),
                caught_up: false,
            });
        }
        self.listed = true;
        Ok(())
    }

    async fn iterator(&self, id: &str) -> Result<String, StreamError> {
        let mut req = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(id);
        let mark = self.checkpoint.shards.get(id);
        let parents_read = self.shards.get(id).is_some_and(|s| {
            !s.parents.is_empty()
                && s.parents
                    .iter()
                    .any(|p| self.checkpoint.shards.contains_key(p))
        });
        req = match (mark.and_then(|m| m.after.as_deref()), self.start) {
            (Some(seq), _) => req
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            // A child of a shard this reader has followed: all of it.
            _ if parents_read => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
            (None, Start::TrimHorizon) => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
            (None, Start::Latest) => req.shard_iterator_type(ShardIteratorType::Latest),
            (None, Start::At(t)) => req
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(aws_smithy_types::DateTime::from(t)),
        };
        let out = req
            .send()
            .await
            .map_err(|e| call_error("GetShardIterator", e))?;
        out.shard_iterator()
            .map(str::to_owned)
            .ok_or_else(|| StreamError::Call {
                call: "GetShardIterator",
                message: "no iterator in the answer".into(),
            })
    }

    /// The next non-empty batch, waiting for one as long as it takes.
    /// `Ok(None)` when every shard has been read to its end (the stream
    /// was closed).
    pub async fn next(&mut self) -> Result<Option<Batch>, StreamError> {
        self.next_batch(false).await
    }

    /// Like [`StreamReader::next`], but `Ok(None)` as soon as every
    /// readable shard has nothing more: what the stream held when asked.
    pub async fn next_or_idle(&mut self) -> Result<Option<Batch>, StreamError> {
        self.next_batch(true).await
    }

    /// Reads no more of this shard (a caller past its window).
    pub fn finish_shard(&mut self, id: &str) {
        if let Some(s) = self.shards.get_mut(id) {
            s.caught_up = true;
            s.not_before = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        }
    }

    async fn next_batch(&mut self, stop_idle: bool) -> Result<Option<Batch>, StreamError> {
        loop {
            if !self.listed {
                self.list().await?;
            }
            if stop_idle && self.caught_up() {
                return Ok(None);
            }
            let ready: Vec<String> = self
                .shards
                .keys()
                .filter(|id| self.readable(id))
                .cloned()
                .collect();
            if ready.is_empty() {
                if self.shards.keys().all(|id| self.finished(id)) {
                    return Ok(None);
                }
                // Children whose parents are not listed yet: look again.
                tokio::time::sleep(self.poll).await;
                self.list().await?;
                continue;
            }
            // Round robin from after the last shard served.
            let at = self
                .cursor
                .as_ref()
                .and_then(|c| ready.iter().position(|id| id > c))
                .unwrap_or(0);
            let id = ready[at].clone();
            self.cursor = Some(id.clone());
            let wait = self.shards[&id]
                .not_before
                .saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                // The soonest shard decides the sleep.
                let soonest = ready
                    .iter()
                    .map(|r| self.shards[r].not_before)
                    .min()
                    .unwrap_or_else(Instant::now);
                tokio::time::sleep_until(soonest.into()).await;
                if soonest < self.shards[&id].not_before {
                    continue;
                }
            }
            if let Some(b) = self.poll_shard(&id).await? {
                return Ok(Some(b));
            }
        }
    }

    async fn poll_shard(&mut self, id: &str) -> Result<Option<Batch>, StreamError> {
        let iterator = match self.shards[id].iterator.clone() {
            Some(it) => it,
            None => self.iterator(id).await?,
        };
        let answer = self
            .client
            .get_records()
            .shard_iterator(&iterator)
            .limit(self.limit)
            .send()
            .await;
        let out = match answer {
            Ok(out) => out,
            Err(e) => {
                let service = e.as_service_error();
                let retry = service.is_some_and(|s| {
                    s.is_expired_iterator_exception()
                        || s.is_provisioned_throughput_exceeded_exception()
                        || s.is_kms_throttling_exception()
                });
                if !retry {
                    return Err(call_error("GetRecords", e));
                }
                // Start again from the checkpoint after a pause.
                let s = self.shards.get_mut(id).expect("listed shard");
                s.iterator = None;
                s.not_before = Instant::now() + self.poll.max(Duration::from_millis(200));
                return Ok(None);
            }
        };
        let records: Vec<Fetched> = out
            .records()
            .iter()
            .map(|r| Fetched {
                sequence: r.sequence_number().to_owned(),
                data: r.data().as_ref().to_vec(),
                arrival: r
                    .approximate_arrival_timestamp()
                    .and_then(|t| SystemTime::try_from(*t).ok()),
            })
            .collect();
        let behind = out.millis_behind_latest().unwrap_or(0);
        let next = out.next_shard_iterator().map(str::to_owned);
        let now = Instant::now();
        let s = self.shards.get_mut(id).expect("listed shard");
        s.caught_up = records.is_empty() && behind == 0;
        s.not_before = if records.is_empty() {
            now + self.poll
        } else {
            now
        };
        match next {
            Some(it) => s.iterator = Some(it),
            None => {
                // Read to its end: its children may start. The mark waits
                // for the caller's commit only if records came with it.
                s.iterator = None;
                let mark = self.checkpoint.shards.entry(id.to_owned()).or_default();
                mark.finished = true;
                if let Some(last) = records.last() {
                    mark.after = Some(last.sequence.clone());
                }
                self.list().await?;
            }
        }
        Ok((!records.is_empty()).then(|| Batch {
            shard: id.to_owned(),
            records,
        }))
    }
}
