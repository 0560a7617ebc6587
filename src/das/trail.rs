//! The proxy's own audit trail, read for joining with an activity stream:
//! the sessions it opened (who, and the keys DAS knows them by) and the
//! statements it forwarded. Files are read oldest first and followed as
//! they grow, so `das tail` learns of a session that starts while it runs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read as _, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::event::{Event, parse_time};

/// A session the proxy opened, as its `session_start` record says.
#[derive(Debug, Clone)]
pub struct ProxySession {
    /// `host:pid` of the proxy process that wrote it.
    pub instance: Arc<str>,
    pub conn: u64,
    pub person: String,
    pub identity_source: String,
    pub role_arn: String,
    pub access_key_id: String,
    pub db_user: String,
    pub database: String,
    pub backend_pid: Option<i64>,
    pub upstream_local_port: Option<u16>,
    pub session_id: Option<String>,
    pub started_after: Option<SystemTime>,
    pub started_before: Option<SystemTime>,
    pub time: Option<SystemTime>,
}

/// A record of the trail that matters to a join.
#[derive(Debug)]
pub enum TrailRecord {
    Start(Arc<ProxySession>),
    /// A statement forwarded to the server (refused ones are not).
    Statement {
        key: SessionKey,
        n: u64,
        part: u64,
        parts: u64,
        time: Option<SystemTime>,
        text: String,
    },
    /// The server did not run message `n` (`not_executed`).
    NotExecuted {
        key: SessionKey,
        n: u64,
    },
    End {
        key: SessionKey,
        time: Option<SystemTime>,
    },
}

/// A session's identity across proxy processes: instance and connection.
pub type SessionKey = (Arc<str>, u64);

/// Reads the audit files of one directory, remembering how far.
pub struct Trail {
    dir: PathBuf,
    /// Files already opened, with the offset read up to and whether they
    /// are done (read to the end after a newer file appeared: rotated
    /// files do not grow).
    offsets: Vec<(PathBuf, u64, bool)>,
    instance: Arc<str>,
    line: Vec<u8>,
}

/// Longest record line read; the proxy writes far less (statement text is
/// capped by `--audit-max-statement`).
const MAX_LINE: usize = 16 << 20;

impl Trail {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        // Fails now, with the reason, if the directory cannot be read.
        crate::audit::writer::audit_files(dir)?;
        Ok(Trail {
            dir: dir.to_owned(),
            offsets: Vec::new(),
            instance: Arc::from("?"),
            line: Vec::new(),
        })
    }

    /// Reads every whole record appended since the last call, oldest file
    /// first, handing each one of interest to `f`. Reading stops early
    /// (to be resumed by the next call) when `f` returns false.
    pub fn read_new(&mut self, mut f: impl FnMut(TrailRecord) -> bool) -> std::io::Result<()> {
        let files = crate::audit::writer::audit_files(&self.dir)?;
        let newest = files.len().saturating_sub(1);
        for (at, path) in files.into_iter().enumerate() {
            let i = match self.offsets.iter().position(|(p, _, _)| *p == path) {
                Some(i) => i,
                None => {
                    self.offsets.push((path.clone(), 0, false));
                    self.offsets.len() - 1
                }
            };
            if self.offsets[i].2 {
                continue;
            }
            let mut file = BufReader::new(File::open(&path)?);
            file.seek(SeekFrom::Start(self.offsets[i].1))?;
            loop {
                self.line.clear();
                let n = (&mut file)
                    .take(MAX_LINE as u64 + 1)
                    .read_until(b'\n', &mut self.line)?;
                if n == 0 || self.line.last() != Some(&b'\n') {
                    // The end, or a record still being written: next time.
                    if n == 0 && at < newest {
                        self.offsets[i].2 = true;
                    }
                    break;
                }
                self.offsets[i].1 += n as u64;
                let Some(record) = self.parse() else {
                    continue;
                };
                if !f(record) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn parse(&mut self) -> Option<TrailRecord> {
        let v: Value = serde_json::from_slice(&self.line).ok()?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        let t = |k: &str| v.get(k).and_then(Value::as_str).and_then(parse_time);
        let key = || -> Option<SessionKey> { Some((self.instance.clone(), n("conn")?)) };
        match v.get("type")?.as_str()? {
            "audit_start" => {
                self.instance = Arc::from(s("instance"));
                None
            }
            "session_start" => Some(TrailRecord::Start(Arc::new(ProxySession {
                instance: self.instance.clone(),
                conn: n("conn")?,
                person: s("person"),
                identity_source: s("identity_source"),
                role_arn: s("role_arn"),
                access_key_id: s("access_key_id"),
                db_user: s("db_user"),
                database: s("database"),
                backend_pid: v.get("backend_pid").and_then(Value::as_i64),
                upstream_local_port: n("upstream_local_port").and_then(|p| u16::try_from(p).ok()),
                session_id: v
                    .get("session_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                started_after: t("backend_started_after"),
                started_before: t("backend_started_before"),
                time: t("time"),
            }))),
            "statement" if v.get("refused").is_none_or(Value::is_null) => {
                Some(TrailRecord::Statement {
                    key: key()?,
                    n: n("n")?,
                    part: n("part").unwrap_or(1),
                    parts: n("parts").unwrap_or(1),
                    time: t("time"),
                    text: s("text"),
                })
            }
            "outcome" if v.get("not_executed").is_some_and(|x| !x.is_null()) => {
                Some(TrailRecord::NotExecuted {
                    key: key()?,
                    n: n("n")?,
                })
            }
            "session_end" => Some(TrailRecord::End {
                key: key()?,
                time: t("time"),
            }),
            _ => None,
        }
    }
}

/// The proxy's sessions, found by what a DAS event carries.
#[derive(Default)]
pub struct Sessions {
    by_pid: HashMap<i64, Vec<Arc<ProxySession>>>,
    ended: HashMap<SessionKey, SystemTime>,
}

impl Sessions {
    pub fn add(&mut self, s: Arc<ProxySession>) {
        if let Some(pid) = s.backend_pid {
            self.by_pid.entry(pid).or_default().push(s);
        }
    }

    pub fn ended(&mut self, key: SessionKey, at: SystemTime) {
        self.ended.insert(key, at);
    }

    /// The proxy session an event belongs to: same server pid, and, where
    /// both sides know them, the same client port (the proxy's end of its
    /// upstream socket) and a backend start time that agrees with the
    /// event's `sessionId`. A pid is reused over time; the port and the
    /// start time tell the sessions that had it apart.
    pub fn find(&self, e: &Event) -> Option<&Arc<ProxySession>> {
        let candidates = self.by_pid.get(&e.pid()?)?;
        candidates.iter().rev().find(|s| agrees(s, e))
    }

    /// Forgets sessions that ended before `before`.
    pub fn prune(&mut self, before: SystemTime) {
        let gone: Vec<SessionKey> = self
            .ended
            .iter()
            .filter(|(_, t)| **t < before)
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            self.ended.remove(&key);
            for list in self.by_pid.values_mut() {
                list.retain(|s| !(s.conn == key.1 && s.instance == key.0));
            }
        }
        self.by_pid.retain(|_, l| !l.is_empty());
    }

    pub fn len(&self) -> usize {
        self.by_pid.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }
}

fn agrees(s: &ProxySession, e: &Event) -> bool {
    if let (Some(a), Some(b)) = (s.upstream_local_port, e.remote_port())
        && a != b
    {
        return false;
    }
    if let (Some(ours), Some(theirs)) = (&s.session_id, e.session_id()) {
        return ours == theirs;
    }
    // The window the backend started in, widened by a second each way
    // for the whole seconds in `sessionId`.
    if let (Some(start), Some(after), Some(before)) =
        (e.session_start_secs(), s.started_after, s.started_before)
    {
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs()
        };
        return secs(after).saturating_sub(1) <= start && start <= secs(before) + 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> Event {
        Event {
            fields: serde_json::from_str(json).unwrap(),
        }
    }

    fn session(conn: u64, pid: i64, port: u16, session_id: Option<&str>) -> Arc<ProxySession> {
        Arc::new(ProxySession {
            instance: Arc::from("h:1"),
            conn,
            person: format!("p{conn}"),
            identity_source: "sso".into(),
            role_arn: String::new(),
            access_key_id: String::new(),
            db_user: String::new(),
            database: String::new(),
            backend_pid: Some(pid),
            upstream_local_port: Some(port),
            session_id: session_id.map(str::to_owned),
            started_after: None,
            started_before: None,
            time: None,
        })
    }

    #[test]
    fn a_reused_pid_is_told_apart_by_port_and_start() {
        let mut s = Sessions::default();
        s.add(session(1, 77, 40000, Some("6b160000.4d")));
        s.add(session(2, 77, 40001, Some("6b160100.4d")));
        let find = |json: &str| s.find(&event(json)).map(|x| x.conn);
        assert_eq!(
            find(r#"{"pid":77,"remotePort":40000,"sessionId":"6b160000.4d"}"#),
            Some(1)
        );
        assert_eq!(
            find(r#"{"pid":77,"remotePort":40001,"sessionId":"6b160100.4d"}"#),
            Some(2)
        );
        // Right pid, another port: somebody else (e.g. a direct login).
        assert_eq!(
            find(r#"{"pid":77,"remotePort":5555,"sessionId":"6b160100.4d"}"#),
            None
        );
        assert_eq!(find(r#"{"pid":78,"remotePort":40000}"#), None);
        // Same pid and port, another start: not ours.
        assert_eq!(
            find(r#"{"pid":77,"remotePort":40000,"sessionId":"6b170000.4d"}"#),
            None
        );
        s.ended((Arc::from("h:1"), 1), SystemTime::UNIX_EPOCH);
        s.prune(SystemTime::UNIX_EPOCH + Duration::from_secs(1));
        assert_eq!(s.len(), 1);
    }
}
