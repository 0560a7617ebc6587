//! `das reconcile`: the activity stream and the proxy's trail over one
//! window, side by side. Every DAS session is either a proxy session or
//! reported as not through the proxy; every statement one side saw and the
//! other did not is reported; the rest is a per-person summary.
//!
//! Memory stays flat where the data allows: the trail is read only as far
//! as the stream has got (plus a margin), a session is compared and
//! forgotten once it has ended on both sides, and what a session keeps is
//! one counter per distinct statement text (a hash, and the text of the
//! first few that do not balance for the report).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::event::Event;
use super::record::{self, DataKeys, RecordError};
use super::stream::StreamReader;
use super::tail::TailError;
use super::trail::{ProxySession, SessionKey, Sessions, Trail, TrailRecord};

/// How far apart the proxy's clock and the server's may be, and how late
/// DAS may deliver an event, before a statement counts as missing.
pub const MARGIN: Duration = Duration::from_secs(60);

/// Most findings of each kind listed one by one (all are counted).
const MAX_LISTED: usize = 1000;

/// A DAS session with no proxy session behind it.
#[derive(Debug, Clone, Serialize)]
pub struct Bypass {
    pub session_id: String,
    pub db_user: String,
    pub database: String,
    pub remote_host: String,
    pub remote_port: Option<u16>,
    pub client_application: String,
    pub first_seen: String,
    pub first_statement: Option<String>,
    pub statements: u64,
}

/// A statement one side saw and the other did not.
#[derive(Debug, Clone, Serialize)]
pub struct Missing {
    pub person: String,
    pub db_user: String,
    pub session_id: Option<String>,
    pub proxy_conn: Option<u64>,
    pub time: String,
    pub text: String,
    /// How many more times than the other side.
    pub count: u64,
}

/// Per person (and database user): what the stream saw them do.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PersonCounts {
    pub sessions: u64,
    pub statements: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub records: u64,
    pub events: u64,
    pub heartbeats: u64,
    pub bad_records: BTreeMap<&'static str, u64>,
    pub das_sessions: u64,
    pub through_proxy: u64,
    pub not_through_proxy: Vec<Bypass>,
    pub not_through_proxy_count: u64,
    pub missing_from_stream: Vec<Missing>,
    pub missing_from_stream_count: u64,
    pub missing_from_trail: Vec<Missing>,
    pub missing_from_trail_count: u64,
    /// Keyed `person (db_user)`.
    pub per_person: BTreeMap<String, PersonCounts>,
}

impl Report {
    /// Sessions, statements and records nobody can account for.
    pub fn unexplained(&self) -> u64 {
        self.not_through_proxy_count
            + self.missing_from_stream_count
            + self.missing_from_trail_count
            + self.bad_records.values().sum::<u64>()
    }
}

/// One statement text's balance in a session: +1 per proxy record, -1 per
/// DAS event.
#[derive(Default)]
struct Balance {
    count: i64,
    /// For the report: the text and time of the first occurrence.
    example: Option<(String, SystemTime)>,
}

#[derive(Default)]
struct ProxyState {
    session: Option<Arc<ProxySession>>,
    statements: HashMap<u64, Balance>,
    /// Parts of a multi-statement Query, joined until the last arrives.
    parts: HashMap<u64, (u64, String, Option<SystemTime>)>,
    /// Hashes by message number, to undo what the server did not run.
    by_n: HashMap<u64, u64>,
    ended: Option<SystemTime>,
    das_session: Option<String>,
}

struct DasOnly {
    bypass: Bypass,
    last: SystemTime,
}

pub struct Reconciler {
    from: SystemTime,
    to: SystemTime,
    trail: Trail,
    held: Option<TrailRecord>,
    sessions: Sessions,
    proxy: HashMap<SessionKey, ProxyState>,
    das_only: HashMap<String, DasOnly>,
    /// DAS sessions seen, to count each once.
    das_seen: HashMap<String, Option<SessionKey>>,
    watermark: SystemTime,
    report: Report,
}

fn in_window(t: SystemTime, from: SystemTime, to: SystemTime, margin: Duration) -> bool {
    t + margin >= from && t <= to + margin
}

/// The text as compared: what the proxy's trail would show for it
/// (secret values redacted the same way), without whitespace or `;`, so
/// that a Query of several statements, which the trail splits, compares
/// equal to the one text the server logs for it.
fn normalized(text: &str) -> String {
    let shown = crate::audit::redact::redact(text.as_bytes());
    String::from_utf8_lossy(shown.as_ref())
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ';')
        .collect()
}

fn hash(s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

fn time_text(t: SystemTime) -> String {
    crate::audit::event::rfc3339(t)
}

/// At most 500 characters, secrets redacted: findings are printed.
fn shown(text: &str) -> String {
    let shown = crate::audit::redact::redact(text.as_bytes());
    String::from_utf8_lossy(shown.as_ref())
        .chars()
        .take(500)
        .collect()
}

impl Reconciler {
    pub fn new(trail: Trail, from: SystemTime, to: SystemTime) -> Self {
        Reconciler {
            from,
            to,
            trail,
            held: None,
            sessions: Sessions::default(),
            proxy: HashMap::new(),
            das_only: HashMap::new(),
            das_seen: HashMap::new(),
            watermark: SystemTime::UNIX_EPOCH,
            report: Report::default(),
        }
    }

    /// Reads the trail up to `until`.
    fn read_trail(&mut self, until: SystemTime) -> std::io::Result<()> {
        if let Some(r) = self.held.take() {
            if record_time(&r).is_some_and(|t| t > until) {
                self.held = Some(r);
                return Ok(());
            }
            self.trail_record(r);
        }
        let mut held = None;
        let mut records = Vec::new();
        self.trail.read_new(|r| {
            if record_time(&r).is_some_and(|t| t > until) {
                held = Some(r);
                return false;
            }
            records.push(r);
            // Bounded steps, so memory follows the window, not the file.
            records.len() < 10_000
        })?;
        for r in records {
            self.trail_record(r);
        }
        self.held = held;
        Ok(())
    }

    fn trail_record(&mut self, r: TrailRecord) {
        let (from, to) = (self.from, self.to);
        match r {
            TrailRecord::Start(s) => {
                let key = (s.instance.clone(), s.conn);
                self.sessions.add(s.clone());
                self.proxy.entry(key).or_default().session = Some(s);
            }
            TrailRecord::Statement {
                key,
                n,
                part,
                parts,
                time,
                text,
            } => {
                let Some(t) = time.filter(|t| in_window(*t, from, to, MARGIN)) else {
                    return;
                };
                let st = self.proxy.entry(key).or_default();
                let joined = st.parts.entry(n).or_insert((0, String::new(), Some(t)));
                joined.0 += 1;
                joined.1.push_str(&normalized(&text));
                if part < parts {
                    return;
                }
                let (_, norm, first) = st.parts.remove(&n).unwrap_or_default();
                let h = hash(&norm);
                st.by_n.insert(n, h);
                let b = st.statements.entry(h).or_default();
                b.count += 1;
                if b.example.is_none() {
                    b.example = Some((shown(&text), first.unwrap_or(t)));
                }
            }
            TrailRecord::NotExecuted { key, n } => {
                if let Some(st) = self.proxy.get_mut(&key)
                    && let Some(h) = st.by_n.remove(&n)
                    && let Some(b) = st.statements.get_mut(&h)
                {
                    b.count -= 1;
                }
            }
            TrailRecord::End { key, time } => {
                self.proxy.entry(key.clone()).or_default().ended =
                    Some(time.unwrap_or(SystemTime::UNIX_EPOCH));
                self.sessions
                    .ended(key, time.unwrap_or(SystemTime::UNIX_EPOCH));
            }
        }
    }

    /// One DAS event.
    fn event(&mut self, e: &Event) {
        let Some(t) = e.log_time() else { return };
        if t > self.watermark {
            self.watermark = t;
        }
        if !in_window(t, self.from, self.to, MARGIN) {
            return;
        }
        // DAS always writes sessionId; without one, pid and port stand in.
        let sid = match e.session_id() {
            Some(s) => s.to_owned(),
            None => format!(
                "pid {} port {}",
                e.pid().unwrap_or(0),
                e.remote_port().unwrap_or(0)
            ),
        };
        let key = match self.das_seen.get(&sid) {
            Some(k) => k.clone(),
            None => {
                let key = self.sessions.find(e).map(|s| (s.instance.clone(), s.conn));
                if t >= self.from && t <= self.to {
                    self.report.das_sessions += 1;
                }
                self.das_seen.insert(sid.clone(), key.clone());
                if let Some(k) = &key {
                    let st = self.proxy.entry(k.clone()).or_default();
                    st.das_session = Some(sid.clone());
                    if let Some(s) = &st.session {
                        self.report.through_proxy += 1;
                        self.report
                            .per_person
                            .entry(person_key(s))
                            .or_default()
                            .sessions += 1;
                    }
                }
                key
            }
        };
        let statement = e.is_statement();
        match key {
            Some(k) => {
                if !statement {
                    return;
                }
                let st = self.proxy.entry(k).or_default();
                if let Some(s) = &st.session {
                    self.report
                        .per_person
                        .entry(person_key(s))
                        .or_default()
                        .statements += 1;
                }
                let b = st
                    .statements
                    .entry(hash(&normalized(e.command_text())))
                    .or_default();
                b.count -= 1;
                if b.example.is_none() {
                    b.example = Some((shown(e.command_text()), t));
                }
            }
            None => {
                // A session is reported by what it did inside the window;
                // the margins only complete what it did there.
                if !self.das_only.contains_key(&sid) && (t < self.from || t > self.to) {
                    return;
                }
                let d = self.das_only.entry(sid.clone()).or_insert_with(|| DasOnly {
                    bypass: Bypass {
                        session_id: sid,
                        db_user: e.db_user().to_owned(),
                        database: e.database().to_owned(),
                        remote_host: e.remote_host().unwrap_or("").to_owned(),
                        remote_port: e.remote_port(),
                        client_application: e
                            .fields
                            .get("clientApplication")
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                        first_seen: time_text(t),
                        first_statement: None,
                        statements: 0,
                    },
                    last: t,
                });
                d.last = d.last.max(t);
                if statement {
                    d.bypass.statements += 1;
                    if d.bypass.first_statement.is_none() {
                        d.bypass.first_statement = Some(shown(e.command_text()));
                    }
                }
            }
        }
    }

    /// Compares and forgets the sessions that are over on both sides
    /// (`all`: every session, at the end).
    fn settle(&mut self, all: bool) {
        let horizon = self
            .watermark
            .checked_sub(MARGIN)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let done: Vec<SessionKey> = self
            .proxy
            .iter()
            .filter(|(_, st)| all || st.ended.is_some_and(|t| t < horizon))
            .map(|(k, _)| k.clone())
            .collect();
        for key in done {
            let Some(st) = self.proxy.remove(&key) else {
                continue;
            };
            if let Some(sid) = &st.das_session {
                self.das_seen.remove(sid);
            }
            self.compare(&key, st);
        }
        let gone: Vec<String> = self
            .das_only
            .iter()
            .filter(|(_, d)| all || d.last < horizon)
            .map(|(k, _)| k.clone())
            .collect();
        for sid in gone {
            let Some(d) = self.das_only.remove(&sid) else {
                continue;
            };
            self.das_seen.remove(&sid);
            self.report.not_through_proxy_count += 1;
            if self.report.not_through_proxy.len() < MAX_LISTED {
                self.report.not_through_proxy.push(d.bypass);
            }
        }
        if !all {
            self.sessions.prune(
                horizon
                    .checked_sub(MARGIN)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            );
        }
    }

    fn compare(&mut self, key: &SessionKey, st: ProxyState) {
        let (person, db_user) = match &st.session {
            Some(s) => (s.person.clone(), s.db_user.clone()),
            None => (String::new(), String::new()),
        };
        for b in st.statements.into_values() {
            let Some((text, t)) = b.example else { continue };
            if b.count == 0 || t < self.from || t > self.to {
                continue;
            }
            let m = Missing {
                person: person.clone(),
                db_user: db_user.clone(),
                session_id: st.das_session.clone(),
                proxy_conn: Some(key.1),
                time: time_text(t),
                text,
                count: b.count.unsigned_abs(),
            };
            let (list, count) = if b.count > 0 {
                (
                    &mut self.report.missing_from_stream,
                    &mut self.report.missing_from_stream_count,
                )
            } else {
                (
                    &mut self.report.missing_from_trail,
                    &mut self.report.missing_from_trail_count,
                )
            };
            *count += m.count;
            if list.len() < MAX_LISTED {
                list.push(m);
            }
        }
    }

    /// Reads the stream until it has nothing more (or is past the window),
    /// then settles every session.
    pub async fn run(
        mut self,
        reader: &mut StreamReader,
        keys: &impl DataKeys,
        mut on_bad: impl FnMut(&str, &str, &RecordError),
    ) -> Result<Report, TailError> {
        self.begin().map_err(TailError::Trail)?;
        let past_window = self.to + MARGIN;
        while let Some(batch) = reader.next_or_idle().await? {
            let mut events = Vec::new();
            for r in &batch.records {
                match record::open(&r.data, keys).await {
                    Ok(b) => {
                        self.report.records += 1;
                        self.report.heartbeats += b.heartbeats as u64;
                        events.extend(b.events);
                    }
                    Err(e) => {
                        *self.report.bad_records.entry(e.kind()).or_default() += 1;
                        on_bad(&batch.shard, &r.sequence, &e);
                    }
                }
            }
            self.feed(&events).map_err(TailError::Trail)?;
            reader.commit(&batch);
            if batch
                .records
                .last()
                .and_then(|r| r.arrival)
                .is_some_and(|t| t > past_window + MARGIN)
            {
                reader.finish_shard(&batch.shard);
            }
        }
        self.finish().map_err(TailError::Trail)
    }

    /// Reads the trail up to the window's start (less the margin).
    pub fn begin(&mut self) -> std::io::Result<()> {
        self.read_trail(
            self.from
                .checked_sub(MARGIN)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        )
    }

    /// One batch of activity events: the trail is read as far as they
    /// reach (and a margin), they are counted, and the sessions over on
    /// both sides are compared and forgotten.
    pub fn feed(&mut self, events: &[Event]) -> std::io::Result<()> {
        let reach = events
            .iter()
            .filter_map(Event::log_time)
            .max()
            .unwrap_or(self.watermark);
        self.read_trail((reach + MARGIN).min(self.to + MARGIN))?;
        for e in events {
            self.report.events += 1;
            self.event(e);
        }
        self.settle(false);
        Ok(())
    }

    /// The rest of the trail's window, every session settled: the report.
    pub fn finish(mut self) -> std::io::Result<Report> {
        self.read_trail(self.to + MARGIN)?;
        self.settle(true);
        Ok(self.report)
    }
}

fn record_time(r: &TrailRecord) -> Option<SystemTime> {
    match r {
        TrailRecord::Start(s) => s.time,
        TrailRecord::Statement { time, .. } | TrailRecord::End { time, .. } => *time,
        TrailRecord::NotExecuted { .. } => None,
    }
}

fn person_key(s: &ProxySession) -> String {
    format!("{} ({})", s.person, s.db_user)
}

/// The report for people.
pub fn text(r: &Report, stream: &str, from: SystemTime, to: SystemTime) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Activity stream {stream}, {} to {}",
        time_text(from),
        time_text(to)
    );
    let _ = writeln!(
        s,
        "Read {} records ({} activity events, {} heartbeats); {} sessions in the stream, {} through the proxy, {} not.",
        r.records,
        r.events,
        r.heartbeats,
        r.das_sessions,
        r.through_proxy,
        r.not_through_proxy_count
    );
    if !r.per_person.is_empty() {
        let _ = writeln!(
            s,
            "\n{:<40} {:>9} {:>11}",
            "person (database user)", "sessions", "statements"
        );
        for (who, c) in &r.per_person {
            let _ = writeln!(s, "{who:<40} {:>9} {:>11}", c.sessions, c.statements);
        }
    }
    if r.not_through_proxy_count > 0 {
        let _ = writeln!(
            s,
            "\nNOT THROUGH THE PROXY: {} session(s)",
            r.not_through_proxy_count
        );
        for b in &r.not_through_proxy {
            let _ = writeln!(
                s,
                "  {}  sessionId {}  user {:?} database {:?} from {}:{}  application {:?}  {} statement(s); first: {}",
                b.first_seen,
                b.session_id,
                b.db_user,
                b.database,
                b.remote_host,
                b.remote_port.map_or("?".into(), |p| p.to_string()),
                b.client_application,
                b.statements,
                b.first_statement.as_deref().unwrap_or("(none)")
            );
        }
    }
    for (title, list, count) in [
        (
            "IN THE PROXY'S TRAIL, NOT IN THE STREAM",
            &r.missing_from_stream,
            r.missing_from_stream_count,
        ),
        (
            "IN THE STREAM, NOT IN THE PROXY'S TRAIL",
            &r.missing_from_trail,
            r.missing_from_trail_count,
        ),
    ] {
        if count == 0 {
            continue;
        }
        let _ = writeln!(s, "\n{title}: {count} statement(s)");
        for m in list {
            let _ = writeln!(
                s,
                "  {}  {} ({})  conn {}  sessionId {}  x{}: {}",
                m.time,
                m.person,
                m.db_user,
                m.proxy_conn.map_or("?".into(), |c| c.to_string()),
                m.session_id.as_deref().unwrap_or("?"),
                m.count,
                m.text
            );
        }
    }
    if !r.bad_records.is_empty() {
        let list: Vec<String> = r
            .bad_records
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(s, "\nRECORDS THAT DID NOT OPEN: {}", list.join(", "));
    }
    let _ = writeln!(
        s,
        "\n{}",
        match r.unexplained() {
            0 => "Everything in the window is explained.".to_owned(),
            n => format!("{n} unexplained (exit status 1)."),
        }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::rfc3339;

    fn event(json: serde_json::Value) -> Event {
        let serde_json::Value::Object(fields) = json else {
            panic!("not an object")
        };
        Event { fields }
    }

    #[test]
    fn every_session_and_statement_is_accounted_for() {
        let dir = std::env::temp_dir().join(format!("rip-reconcile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |ms: u64| rfc3339(t0 + Duration::from_millis(ms));
        let lines = [
            format!(
                r#"{{"type":"audit_start","time":"{}","instance":"h:1"}}"#,
                at(0)
            ),
            format!(
                r#"{{"type":"session_start","time":"{}","conn":1,"person":"arianna","identity_source":"sso","db_user":"arianna","backend_pid":100,"upstream_local_port":5000}}"#,
                at(1)
            ),
            format!(
                r#"{{"type":"statement","time":"{}","conn":1,"n":1,"part":1,"parts":1,"text":"select 1"}}"#,
                at(2)
            ),
            format!(
                r#"{{"type":"statement","time":"{}","conn":1,"n":2,"part":1,"parts":2,"text":"select 2"}}"#,
                at(3)
            ),
            format!(
                r#"{{"type":"statement","time":"{}","conn":1,"n":2,"part":2,"parts":2,"text":"select  3"}}"#,
                at(3)
            ),
            format!(
                r#"{{"type":"statement","time":"{}","conn":1,"n":3,"part":1,"parts":1,"text":"alter role x password '<redacted>'","redacted":true}}"#,
                at(4)
            ),
            format!(
                r#"{{"type":"statement","time":"{}","conn":1,"n":4,"part":1,"parts":1,"text":"select 4"}}"#,
                at(5)
            ),
            format!(
                r#"{{"type":"outcome","time":"{}","conn":1,"n":4,"part":0,"not_executed":"skipped after an earlier error"}}"#,
                at(5)
            ),
            format!(
                r#"{{"type":"statement","time":"{}","conn":1,"n":5,"part":1,"parts":1,"text":"create role y password 'p'","refused":"password change"}}"#,
                at(6)
            ),
            format!(
                r#"{{"type":"statement","time":"{}","conn":1,"n":6,"part":1,"parts":1,"text":"select 5"}}"#,
                at(7)
            ),
            format!(r#"{{"type":"session_end","time":"{}","conn":1}}"#, at(9)),
        ];
        std::fs::write(
            dir.join("audit-20270115T080000000000-00000001.jsonl"),
            lines.join("\n") + "\n",
        )
        .unwrap();
        let ours = |ms: u64, class: &str, text: &str| {
            event(
                serde_json::json!({"pid": 100, "remotePort": "5000", "sessionId": "6b49d200.64",
                "dbUserName": "arianna", "class": class, "commandText": text, "logTime": at(ms)}),
            )
        };
        let events = [
            ours(1, "CONNECT", ""),
            ours(2, "READ", "select 1"),
            ours(3, "READ", "select 2;\nselect 3;"),
            ours(4, "ROLE", "alter role x password 'secret'"),
            ours(8, "READ", "select 6"),
            event(
                serde_json::json!({"pid": 200, "remotePort": 6000, "sessionId": "6b49d200.c8",
                "dbUserName": "master", "class": "CONNECT", "logTime": at(4)}),
            ),
            event(
                serde_json::json!({"pid": 200, "remotePort": 6000, "sessionId": "6b49d200.c8",
                "dbUserName": "master", "class": "READ", "commandText": "select 42", "logTime": at(5)}),
            ),
        ];
        let mut r = Reconciler::new(Trail::open(&dir).unwrap(), t0, t0 + Duration::from_secs(10));
        r.begin().unwrap();
        r.feed(&events).unwrap();
        let report = r.finish().unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        assert_eq!((report.das_sessions, report.through_proxy), (2, 1));
        assert_eq!(report.not_through_proxy_count, 1);
        let bypass = &report.not_through_proxy[0];
        assert_eq!(bypass.db_user, "master");
        assert_eq!(bypass.first_statement.as_deref(), Some("select 42"));
        assert_eq!(bypass.remote_port, Some(6000));
        // Not run by the server (n = 4) and refused by the proxy (n = 5):
        // not expected in the stream. Redacted and multi-statement texts
        // compare equal.
        let texts = |m: &[Missing]| m.iter().map(|m| m.text.clone()).collect::<Vec<_>>();
        assert_eq!(texts(&report.missing_from_stream), ["select 5"]);
        assert_eq!(texts(&report.missing_from_trail), ["select 6"]);
        assert_eq!(report.missing_from_trail[0].person, "arianna");
        let p = &report.per_person["arianna (arianna)"];
        assert_eq!((p.sessions, p.statements), (1, 4));
        assert_eq!(report.unexplained(), 3);
        let text = text(&report, "s", t0, t0 + Duration::from_secs(10));
        assert!(
            text.contains("NOT THROUGH THE PROXY: 1 session(s)"),
            "{text}"
        );
        assert!(text.contains("3 unexplained"), "{text}");
    }
}
