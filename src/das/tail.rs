//! `das tail`: every activity event of the stream, one line each, with the
//! person behind the session where the proxy's trail knows it.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::event::Event;
use super::record::{self, DataKeys, RecordError};
use super::stream::{StreamError, StreamReader};
use super::trail::{ProxySession, Sessions, Trail, TrailRecord};

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line: every DAS field, plus the proxy's.
    Json,
    /// Aligned columns for people.
    Text,
}

pub struct TailOptions {
    pub format: Format,
    /// Colour in text output (a terminal, and NO_COLOR unset).
    pub colour: bool,
    pub checkpoint: Option<PathBuf>,
}

/// What a run saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub records: u64,
    pub events: u64,
    pub heartbeats: u64,
    /// Events whose session the trail names (with `--audit-dir`).
    pub matched: u64,
    /// Records skipped, by [`RecordError::kind`].
    pub bad: BTreeMap<&'static str, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Checkpoint(#[from] super::checkpoint::CheckpointError),
    #[error("cannot read the audit trail: {0}")]
    Trail(std::io::Error),
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

/// The proxy's sessions, kept current from its trail.
pub struct Joiner {
    trail: Trail,
    sessions: Sessions,
    last_prune: SystemTime,
}

/// How long an ended session stays joinable: DAS delivers events late
/// (seconds, more in a backlog).
const KEEP_ENDED: Duration = Duration::from_secs(3600);

impl Joiner {
    pub fn new(trail: Trail) -> Self {
        Joiner {
            trail,
            sessions: Sessions::default(),
            last_prune: SystemTime::now(),
        }
    }

    /// Reads what the trail gained since the last call.
    pub fn refresh(&mut self) -> std::io::Result<()> {
        let sessions = &mut self.sessions;
        self.trail.read_new(|r| {
            match r {
                TrailRecord::Start(s) => sessions.add(s),
                TrailRecord::End { key, time } => {
                    sessions.ended(key, time.unwrap_or_else(SystemTime::now));
                }
                TrailRecord::Statement { .. } | TrailRecord::NotExecuted { .. } => {}
            }
            true
        })?;
        let now = SystemTime::now();
        if now.duration_since(self.last_prune).unwrap_or_default() > Duration::from_secs(60) {
            self.sessions.prune(now - KEEP_ENDED);
            self.last_prune = now;
        }
        Ok(())
    }

    pub fn find(&self, e: &Event) -> Option<&std::sync::Arc<ProxySession>> {
        self.sessions.find(e)
    }
}

/// Reads and prints until the stream ends or `stop` resolves. Bad records
/// are reported through `on_bad` and skipped.
pub async fn run(
    reader: &mut StreamReader,
    keys: &impl DataKeys,
    mut joiner: Option<Joiner>,
    opts: &TailOptions,
    out: &mut impl Write,
    mut on_bad: impl FnMut(&str, &str, &RecordError),
    stop: impl Future<Output = ()>,
) -> Result<Counts, TailError> {
    let mut counts = Counts::default();
    tokio::pin!(stop);
    loop {
        let batch = tokio::select! {
            b = reader.next() => b?,
            () = &mut stop => break,
        };
        let Some(batch) = batch else { break };
        if let Some(j) = joiner.as_mut() {
            j.refresh().map_err(TailError::Trail)?;
        }
        for r in &batch.records {
            let opened = match record::open(&r.data, keys).await {
                Ok(b) => b,
                Err(e) => {
                    *counts.bad.entry(e.kind()).or_default() += 1;
                    on_bad(&batch.shard, &r.sequence, &e);
                    continue;
                }
            };
            counts.records += 1;
            counts.heartbeats += opened.heartbeats as u64;
            for e in &opened.events {
                counts.events += 1;
                let who = joiner.as_ref().map(|j| j.find(e));
                if matches!(who, Some(Some(_))) {
                    counts.matched += 1;
                }
                let line = match opts.format {
                    Format::Json => json_line(e, &opened, who),
                    Format::Text => text_line(e, who, opts.colour),
                };
                out.write_all(line.as_bytes()).map_err(TailError::Output)?;
            }
        }
        out.flush().map_err(TailError::Output)?;
        reader.commit(&batch);
        if let Some(path) = &opts.checkpoint {
            reader.checkpoint().save(path)?;
        }
    }
    if let Some(path) = &opts.checkpoint {
        reader.checkpoint().save(path)?;
    }
    Ok(counts)
}

/// The event's own fields, then the proxy's: `through_proxy` (with an
/// audit trail to ask), and for a session it knows `person`,
/// `identity_source`, `role_arn`, `access_key_id`, `proxy_conn` and
/// `proxy_instance`.
pub fn json_line(
    e: &Event,
    batch: &record::Batch,
    who: Option<Option<&std::sync::Arc<ProxySession>>>,
) -> String {
    // The event's own object, then the added fields before its closing
    // brace: no copy of the event is made.
    let mut line = serde_json::to_string(&e.fields).unwrap_or_else(|_| "{}".to_owned());
    line.pop();
    let mut first = e.fields.is_empty();
    let mut add = |line: &mut String, key: &str, value: &Value| {
        if !first {
            line.push(',');
        }
        first = false;
        line.push_str(&Value::String(key.to_owned()).to_string());
        line.push(':');
        line.push_str(&value.to_string());
    };
    for (k, v) in [
        ("clusterId", &batch.cluster_id),
        ("instanceId", &batch.instance_id),
    ] {
        if !e.fields.contains_key(k) && !v.is_empty() {
            add(&mut line, k, &Value::String(v.clone()));
        }
    }
    if let Some(who) = who {
        add(&mut line, "through_proxy", &Value::Bool(who.is_some()));
        if let Some(s) = who {
            for (k, v) in [
                ("person", &s.person),
                ("identity_source", &s.identity_source),
                ("role_arn", &s.role_arn),
                ("access_key_id", &s.access_key_id),
            ] {
                add(&mut line, k, &Value::String(v.clone()));
            }
            add(&mut line, "proxy_conn", &Value::from(s.conn));
            add(
                &mut line,
                "proxy_instance",
                &Value::String(s.instance.to_string()),
            );
        }
    }
    line.push_str("}\n");
    line
}

/// `time  person  user@database  class  text`, one line, control
/// characters shown escaped (statement text is anyone's).
pub fn text_line(
    e: &Event,
    who: Option<Option<&std::sync::Arc<ProxySession>>>,
    colour: bool,
) -> String {
    let paint = |code: &str, s: String| {
        if colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s
        }
    };
    let time: String = e
        .fields
        .get("logTime")
        .and_then(Value::as_str)
        .unwrap_or("")
        .chars()
        .take(23)
        .collect();
    let person = match who {
        None => paint("2", "-".to_owned()),
        Some(None) => paint("1;31", format!("{:<16}", "NOT VIA PROXY")),
        Some(Some(s)) => paint("32", format!("{:<16}", shown(&s.person, 16))),
    };
    let user = format!("{}@{}", shown(e.db_user(), 24), shown(e.database(), 24));
    let what = match e.class() {
        "" => shown(e.command(), 10),
        c => shown(c, 10),
    };
    let text = shown(e.command_text(), 200);
    let text = match e.exit_code() {
        Some(code) => paint("33", format!("{text}  [{code}]")),
        None => text,
    };
    format!("{time:<23}  {person}  {user:<32}  {what:<10}  {text}\n")
}

/// At most `max` characters, control characters escaped.
fn shown(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_add_the_person_to_the_events_own_fields() {
        let e = Event {
            fields: serde_json::from_str(r#"{"class":"READ","commandText":"select \"x\"\n"}"#)
                .unwrap(),
        };
        let batch = record::Batch {
            cluster_id: "cluster-X".into(),
            ..record::Batch::default()
        };
        let s = std::sync::Arc::new(ProxySession {
            instance: std::sync::Arc::from("h:1"),
            conn: 7,
            person: "arianna".into(),
            identity_source: "sso".into(),
            role_arn: "arn".into(),
            access_key_id: "ASIA".into(),
            db_user: String::new(),
            database: String::new(),
            backend_pid: None,
            upstream_local_port: None,
            session_id: None,
            started_after: None,
            started_before: None,
            time: None,
        });
        let line = json_line(&e, &batch, Some(Some(&s)));
        assert!(
            line.ends_with("}\n") && line.matches('\n').count() == 1,
            "{line:?}"
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["commandText"], "select \"x\"\n");
        assert_eq!(v["clusterId"], "cluster-X");
        assert_eq!(
            (v["person"].as_str(), v["proxy_conn"].as_u64()),
            (Some("arianna"), Some(7))
        );
        assert_eq!(v["through_proxy"], true);
        let none = json_line(
            &Event {
                fields: Default::default(),
            },
            &record::Batch::default(),
            Some(None),
        );
        assert_eq!(none, "{\"through_proxy\":false}\n");
        let plain = json_line(&e, &record::Batch::default(), None);
        assert_eq!(
            serde_json::from_str::<Value>(&plain).unwrap(),
            Value::Object(e.fields.clone())
        );
    }

    #[test]
    fn text_lines_escape_what_a_client_wrote() {
        let e = Event {
            fields: serde_json::from_str(
                r#"{"logTime":"2026-12-07 05:06:48.384295+00","dbUserName":"arianna","databaseName":"db","class":"READ","commandText":"select 1;\n\u001b[2Jfake line","exitCode":"42P01"}"#,
            )
            .unwrap(),
        };
        let line = text_line(&e, Some(None), false);
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(!line.contains('\u{1b}'), "{line:?}");
        assert!(
            line.contains("NOT VIA PROXY") && line.contains("[42P01]"),
            "{line:?}"
        );
        assert!(line.starts_with("2026-12-07 05:06:48.384  "), "{line:?}");
    }
}
