//! One Kinesis record of an activity stream, opened: the JSON envelope,
//! the data key KMS unwraps for it, the Encryption SDK message, the gzip
//! inside, and the batch of events (DESIGN.md section 8).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;
use zeroize::Zeroizing;

use super::esdk::{self, EsdkError};
use super::event::Event;

/// Envelope versions DAS is documented to write.
const KNOWN_VERSIONS: &[&str] = &["1.0", "1.1", "1.2"];

/// Why a record was skipped. Each says what was wrong with it; none stops
/// the reader.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("not a JSON activity stream record: {0}")]
    NotJson(String),
    #[error("record type {0:?} is not DatabaseActivityMonitoringRecords")]
    WrongType(String),
    #[error("unknown record version {0:?} (this reader knows 1.0, 1.1 and 1.2)")]
    UnknownVersion(String),
    #[error("the {0} field is not base64")]
    BadBase64(&'static str),
    #[error(
        "KMS did not unwrap the record's data key: {0} (a wrong encryption context: is --cluster-resource-id the stream's cluster? or no kms:Decrypt on the stream's key)"
    )]
    DataKey(String),
    #[error("the encrypted events did not decrypt: {0}")]
    Decrypt(#[source] EsdkError),
    #[error("the decrypted events are not gzip: {0}")]
    Gunzip(#[source] EsdkError),
    #[error("the decrypted batch is not an activity record: {0}")]
    BadBatch(String),
}

impl RecordError {
    /// A short name for counting (`bad_records{kind}` in summaries).
    pub fn kind(&self) -> &'static str {
        match self {
            RecordError::NotJson(_) | RecordError::WrongType(_) | RecordError::BadBase64(_) => {
                "malformed"
            }
            RecordError::UnknownVersion(_) => "unknown_version",
            RecordError::DataKey(_) => "data_key",
            RecordError::Decrypt(_) => "authentication",
            RecordError::Gunzip(_) | RecordError::BadBatch(_) => "payload",
        }
    }
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    ty: String,
    version: String,
    #[serde(rename = "databaseActivityEvents")]
    events: String,
    key: String,
}

/// The events of one record.
#[derive(Debug, Default)]
pub struct Batch {
    pub cluster_id: String,
    pub instance_id: String,
    /// Activity events, in the order DAS wrote them.
    pub events: Vec<Event>,
    /// Heartbeat events, counted and dropped.
    pub heartbeats: usize,
}

/// Unwraps a record's data key (KMS `Decrypt` with the cluster's
/// encryption context, or a stand-in in benchmarks).
pub trait DataKeys: Sync {
    fn unwrap_key(
        &self,
        blob: &[u8],
    ) -> impl Future<Output = Result<Zeroizing<[u8; 32]>, String>> + Send;
}

/// Opens one record: everything is checked before any event is returned.
pub async fn open(data: &[u8], keys: &impl DataKeys) -> Result<Batch, RecordError> {
    let envelope: Envelope =
        serde_json::from_slice(data).map_err(|e| RecordError::NotJson(e.to_string()))?;
    if envelope.ty != "DatabaseActivityMonitoringRecords" {
        return Err(RecordError::WrongType(cut(&envelope.ty)));
    }
    if !KNOWN_VERSIONS.contains(&envelope.version.as_str()) {
        return Err(RecordError::UnknownVersion(cut(&envelope.version)));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let key_blob = b64
        .decode(envelope.key.trim())
        .map_err(|_| RecordError::BadBase64("key"))?;
    let message = b64
        .decode(envelope.events.trim())
        .map_err(|_| RecordError::BadBase64("databaseActivityEvents"))?;
    let key = keys
        .unwrap_key(&key_blob)
        .await
        .map_err(RecordError::DataKey)?;
    let opened = esdk::decrypt(&message, &key).map_err(RecordError::Decrypt)?;
    let json =
        esdk::gunzip_capped(&opened.plaintext, esdk::GUNZIP_CAP).map_err(RecordError::Gunzip)?;
    batch(&json)
}

/// The decrypted, inflated batch.
pub fn batch(json: &[u8]) -> Result<Batch, RecordError> {
    let bad = |m: &str| RecordError::BadBatch(m.to_owned());
    let Value::Object(mut top) =
        serde_json::from_slice(json).map_err(|e| RecordError::BadBatch(e.to_string()))?
    else {
        return Err(bad("not a JSON object"));
    };
    let text = |v: Option<Value>| match v {
        Some(Value::String(s)) => s,
        _ => String::new(),
    };
    let mut out = Batch {
        cluster_id: text(top.remove("clusterId")),
        instance_id: text(top.remove("instanceId")),
        ..Batch::default()
    };
    let Some(Value::Array(list)) = top.remove("databaseActivityEventList") else {
        return Err(bad("no databaseActivityEventList"));
    };
    out.events.reserve(list.len());
    for item in list {
        let Value::Object(fields) = item else {
            return Err(bad("an event that is not an object"));
        };
        match fields.get("type").and_then(Value::as_str) {
            Some("heartbeat") => out.heartbeats += 1,
            _ => out.events.push(Event { fields }),
        }
    }
    Ok(out)
}

/// At most 40 characters of a value that was not what it should be.
fn cut(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Data keys through KMS `Decrypt`, with the encryption context DAS uses
/// (`aws:rds:dbc-id` = the cluster resource id). A few recent keys are
/// kept, wiped when dropped, since consecutive records often share one.
pub struct KmsKeys {
    client: aws_sdk_kms::Client,
    cluster_resource_id: String,
    cache: Mutex<HashMap<Vec<u8>, Zeroizing<[u8; 32]>>>,
}

const KEY_CACHE: usize = 64;

impl KmsKeys {
    pub fn new(client: aws_sdk_kms::Client, cluster_resource_id: String) -> Self {
        KmsKeys {
            client,
            cluster_resource_id,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl DataKeys for KmsKeys {
    async fn unwrap_key(&self, blob: &[u8]) -> Result<Zeroizing<[u8; 32]>, String> {
        if let Some(k) = self.cache.lock().ok().and_then(|c| c.get(blob).cloned()) {
            return Ok(k);
        }
        let out = self
            .client
            .decrypt()
            .ciphertext_blob(aws_smithy_types::Blob::new(blob))
            .encryption_context("aws:rds:dbc-id", &self.cluster_resource_id)
            .send()
            .await
            .map_err(|e| {
                let e = aws_sdk_kms::error::DisplayErrorContext(e).to_string();
                e.chars().take(300).collect::<String>()
            })?;
        let plain = out
            .plaintext()
            .ok_or_else(|| "KMS returned no plaintext".to_owned())?;
        let key: [u8; 32] = plain.as_ref().try_into().map_err(|_| {
            format!(
                "KMS returned {} bytes, not a 32-byte key",
                plain.as_ref().len()
            )
        })?;
        let key = Zeroizing::new(key);
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= KEY_CACHE {
                c.clear();
            }
            c.insert(blob.to_vec(), key.clone());
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoKeys;
    impl DataKeys for NoKeys {
        async fn unwrap_key(&self, _: &[u8]) -> Result<Zeroizing<[u8; 32]>, String> {
            Err("refused".into())
        }
    }

    fn open_now(data: &[u8]) -> Result<Batch, RecordError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(open(data, &NoKeys))
    }

    #[test]
    fn bad_envelopes_say_what_is_wrong() {
        let kind = |d: &[u8]| open_now(d).unwrap_err().kind();
        assert_eq!(kind(b"\x00\x01not json"), "malformed");
        assert_eq!(
            kind(br#"{"type":"Other","version":"1.1","databaseActivityEvents":"","key":""}"#),
            "malformed"
        );
        assert_eq!(
            kind(br#"{"type":"DatabaseActivityMonitoringRecords","version":"9.9","databaseActivityEvents":"","key":""}"#),
            "unknown_version"
        );
        assert_eq!(
            kind(br#"{"type":"DatabaseActivityMonitoringRecords","version":"1.1","databaseActivityEvents":"AA==","key":"%%"}"#),
            "malformed"
        );
        assert_eq!(
            kind(br#"{"type":"DatabaseActivityMonitoringRecords","version":"1.1","databaseActivityEvents":"AA==","key":"AA=="}"#),
            "data_key"
        );
    }

    /// The key the fixtures' data key is (tests/fixtures/das/README.txt):
    /// what KMS would return for the record's `key`.
    struct FixtureKey;
    impl DataKeys for FixtureKey {
        async fn unwrap_key(&self, _: &[u8]) -> Result<Zeroizing<[u8; 32]>, String> {
            let hex = include_str!("../../tests/fixtures/das/data_key.hex").trim();
            let mut key = [0u8; 32];
            for (i, b) in key.iter_mut().enumerate() {
                *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
            }
            Ok(Zeroizing::new(key))
        }
    }

    #[test]
    fn opens_a_record_the_real_encryption_sdk_made() {
        let record = include_bytes!("../../tests/fixtures/das/batch.record.json");
        let want: Value =
            serde_json::from_slice(include_bytes!("../../tests/fixtures/das/batch.json")).unwrap();
        let b = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(open(record, &FixtureKey))
            .unwrap();
        let list = want["databaseActivityEventList"].as_array().unwrap();
        assert_eq!(b.events.len(), list.len());
        assert_eq!(b.cluster_id, want["clusterId"].as_str().unwrap());
        for (got, want) in b.events.iter().zip(list) {
            assert_eq!(&Value::Object(got.fields.clone()), want);
        }
        // A byte changed inside the ciphertext: refused, nothing returned.
        let mut v: Value = serde_json::from_slice(record).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut msg = b64
            .decode(v["databaseActivityEvents"].as_str().unwrap())
            .unwrap();
        let at = msg.len() / 2;
        msg[at] ^= 1;
        v["databaseActivityEvents"] = Value::String(b64.encode(msg));
        let err = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(open(v.to_string().as_bytes(), &FixtureKey))
            .unwrap_err();
        assert_eq!(err.kind(), "authentication", "{err}");
    }

    #[test]
    fn heartbeats_are_counted_and_dropped() {
        let b = batch(
            br#"{"type":"DatabaseActivityMonitoringRecord","clusterId":"cluster-X","instanceId":"db-Y","databaseActivityEventList":[{"type":"heartbeat"},{"type":"record","class":"READ","commandText":"select 1"}]}"#,
        )
        .unwrap();
        assert_eq!((b.heartbeats, b.events.len()), (1, 1));
        assert_eq!(b.cluster_id, "cluster-X");
        assert!(batch(br#"{"databaseActivityEventList":[1]}"#).is_err());
        assert!(batch(br#"[]"#).is_err());
    }
}
