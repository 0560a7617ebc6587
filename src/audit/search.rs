//! `audit search` and `audit tail`: the statements of the audit trail,
//! with the person, database and outcome of each, filtered, while the
//! hash chain is checked record by record ([`super::chain`]).
//!
//! Built for a year of files: each line is hashed (the chain needs it)
//! and only its fixed head is read (`seq`, `prev`, `type`, `time`, `conn`,
//! `n`, `part`, always written first and in that order); a statement of a
//! session the filter does not want costs no JSON parsing. Session starts
//! (rare) and the statements and outcomes that match are parsed whole.
//! Connection ids start again with each proxy process (`audit_start`).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::Value;

use super::chain::Chain;
use super::event::rfc3339;

/// What to look for. Empty: every statement.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub person: Option<String>,
    pub db_user: Option<String>,
    pub database: Option<String>,
    /// Statements at or after this time...
    pub from: Option<SystemTime>,
    /// ...and before this one.
    pub to: Option<SystemTime>,
    /// Text the statement contains (case-sensitive).
    pub grep: Option<String>,
    pub outcome: Option<OutcomeKind>,
}

/// How a statement ended, as the trail says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutcomeKind {
    /// CommandComplete or an empty query.
    Ok,
    /// An ErrorResponse.
    Error,
    /// The server did not run it (skipped after an error until Sync).
    NotExecuted,
    /// No outcome recorded (the session or the proxy ended first).
    None,
}

/// A statement found, with what became of it.
#[derive(Debug, Clone)]
pub struct Row {
    pub seq: u64,
    pub time: String,
    pub instance: Arc<str>,
    pub session: Arc<Session>,
    pub n: u64,
    pub part: u64,
    pub protocol: String,
    pub text: String,
    pub refused: Option<String>,
    pub outcome: Outcome,
    pub duration_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Not known yet (only while reading).
    Pending,
    Ok {
        tag: String,
        rows: Option<u64>,
    },
    Error {
        sqlstate: String,
        message: String,
    },
    NotExecuted(String),
    None,
}

impl Outcome {
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Ok { .. } => OutcomeKind::Ok,
            Outcome::Error { .. } => OutcomeKind::Error,
            Outcome::NotExecuted(_) => OutcomeKind::NotExecuted,
            Outcome::Pending | Outcome::None => OutcomeKind::None,
        }
    }
}

/// A session as its `session_start` says.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub conn: u64,
    pub person: String,
    pub db_user: String,
    pub database: String,
    pub application_name: String,
    pub client_addr: String,
}

/// A place where the chain does not hold.
#[derive(Debug, Clone)]
pub struct Break {
    pub file: PathBuf,
    pub line: u64,
    pub seq: Option<u64>,
    pub problem: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(s) = self.seq {
            write!(f, " (seq {s})")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Connection ids are small integers: hashing them with SipHash would be
/// most of the cost of skipping a record.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Where a session stands for the filter.
enum Seen {
    Wanted(Arc<Session>),
    NotWanted,
}

/// The search itself: fed every line of every file in order.
pub struct Search {
    filter: Filter,
    from: Option<String>,
    to: Option<String>,
    /// The grep text as it appears inside a JSON string.
    grep_raw: Option<memchr::memmem::Finder<'static>>,
    pub chain: Chain,
    instance: Arc<str>,
    sessions: IdMap<Seen>,
    /// Rows waiting for their outcome, by (conn, n, part): looked up for
    /// every outcome record while any is waiting.
    pending: HashMap<(u64, u64, u64), Row, BuildHasherDefault<IdHasher>>,
    /// Finished rows (outcome known, or never to come), in the order they
    /// finished.
    pub done: Vec<Row>,
    pub breaks: Vec<Break>,
    pub bytes: u64,
}

impl Search {
    pub fn new(filter: Filter) -> Search {
        let grep_raw = filter.grep.as_ref().map(|g| {
            let mut esc = Vec::new();
            super::event::json_str(&mut esc, g.as_bytes());
            let inner = esc[1..esc.len() - 1].to_vec();
            memchr::memmem::Finder::new(&inner).into_owned()
        });
        Search {
            from: filter.from.map(rfc3339),
            to: filter.to.map(rfc3339),
            grep_raw,
            filter,
            chain: Chain::default(),
            instance: Arc::from("?"),
            sessions: IdMap::default(),
            pending: HashMap::default(),
            done: Vec::new(),
            breaks: Vec::new(),
            bytes: 0,
        }
    }

    /// One whole record line, without its end of line.
    pub fn line(&mut self, file: &Path, line_no: u64, line: &[u8]) {
        self.bytes += line.len() as u64 + 1;
        if let Err(link) = self.chain.check(line) {
            self.breaks.push(Break {
                file: file.to_owned(),
                line: line_no,
                seq: link.seq,
                problem: link.problem,
            });
            self.chain.resync(line);
        }
        let Some(h) = head(line) else {
            return;
        };
        match h.ty {
            b"statement" => self.statement(&h, line),
            b"outcome" => self.outcome(&h, line),
            b"session_start" => self.session_start(&h, line),
            b"session_end" => {
                if let Some(conn) = h.conn {
                    self.flush(|&(c, _, _)| c == conn);
                    self.sessions.remove(&conn);
                }
            }
            b"audit_start" => {
                // A new proxy process: its connection ids start again.
                self.flush(|_| true);
                self.sessions.clear();
                if let Ok(v) = serde_json::from_slice::<Value>(line) {
                    self.instance = Arc::from(v["instance"].as_str().unwrap_or("?"));
                }
            }
            _ => {}
        }
    }

    /// Rows still waiting are finished with no outcome (the end of the
    /// files read).
    pub fn finish(&mut self) {
        self.flush(|_| true);
    }

    fn flush(&mut self, which: impl Fn(&(u64, u64, u64)) -> bool) {
        if self.pending.is_empty() {
            return;
        }
        let keys: Vec<_> = self.pending.keys().filter(|k| which(k)).copied().collect();
        let mut rows: Vec<Row> = keys
            .into_iter()
            .filter_map(|k| self.pending.remove(&k))
            .collect();
        rows.sort_by_key(|r| r.seq);
        for mut r in rows {
            r.outcome = Outcome::None;
            self.emit(r);
        }
    }

    fn emit(&mut self, r: Row) {
        if self.filter.outcome.is_none_or(|k| k == r.outcome.kind()) {
            self.done.push(r);
        }
    }

    fn session_start(&mut self, h: &Head, line: &[u8]) {
        let (Some(conn), Ok(v)) = (h.conn, serde_json::from_slice::<Value>(line)) else {
            return;
        };
        let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
        let session = Session {
            conn,
            person: s("person"),
            db_user: s("db_user"),
            database: s("database"),
            application_name: s("application_name"),
            client_addr: s("client_addr"),
        };
        let f = &self.filter;
        let wanted = f.person.as_ref().is_none_or(|p| *p == session.person)
            && f.db_user.as_ref().is_none_or(|u| *u == session.db_user)
            && f.database.as_ref().is_none_or(|d| *d == session.database);
        let seen = if wanted {
            Seen::Wanted(Arc::new(session))
        } else {
            Seen::NotWanted
        };
        self.sessions.insert(conn, seen);
    }

    fn statement(&mut self, h: &Head, line: &[u8]) {
        let Some(conn) = h.conn else {
            return;
        };
        let session = match self.sessions.get(&conn) {
            Some(Seen::Wanted(s)) => s.clone(),
            Some(Seen::NotWanted) => return,
            // Its start is in a file not read: only an unfiltered search
            // shows it.
            None if self.filter.person.is_none()
                && self.filter.db_user.is_none()
                && self.filter.database.is_none() =>
            {
                Arc::new(Session {
                    conn,
                    ..Default::default()
                })
            }
            None => return,
        };
        if self.from.as_ref().is_some_and(|f| h.time < f.as_bytes())
            || self.to.as_ref().is_some_and(|t| h.time >= t.as_bytes())
        {
            return;
        }
        if let Some(g) = &self.grep_raw
            && g.find(line).is_none()
        {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        let text = v["text"].as_str().unwrap_or("").to_owned();
        if let Some(g) = &self.filter.grep
            && !text.contains(g.as_str())
        {
            return;
        }
        let row = Row {
            seq: v["seq"].as_u64().unwrap_or(0),
            time: String::from_utf8_lossy(h.time).into_owned(),
            instance: self.instance.clone(),
            session,
            n: h.n.unwrap_or(0),
            part: h.part.unwrap_or(1),
            protocol: v["protocol"].as_str().unwrap_or("").to_owned(),
            text,
            refused: v["refused"].as_str().map(str::to_owned),
            outcome: Outcome::Pending,
            duration_ms: None,
        };
        self.pending.insert((conn, row.n, row.part), row);
    }

    fn outcome(&mut self, h: &Head, line: &[u8]) {
        let (Some(conn), Some(n), Some(part)) = (h.conn, h.n, h.part) else {
            return;
        };
        if self.pending.is_empty() {
            return;
        }
        // Part 0: the whole message (every part of it).
        let keys: Vec<(u64, u64, u64)> = if part == 0 {
            let mut k: Vec<_> = self
                .pending
                .keys()
                .filter(|&&(c, m, _)| c == conn && m == n)
                .copied()
                .collect();
            k.sort();
            k
        } else if self.pending.contains_key(&(conn, n, part)) {
            vec![(conn, n, part)]
        } else {
            return;
        };
        if keys.is_empty() {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        let outcome = if let Some(state) = v["sqlstate"].as_str() {
            Outcome::Error {
                sqlstate: state.to_owned(),
                message: v["error"].as_str().unwrap_or("").to_owned(),
            }
        } else if let Some(why) = v["not_executed"].as_str() {
            Outcome::NotExecuted(why.to_owned())
        } else {
            Outcome::Ok {
                tag: v["command_tag"].as_str().unwrap_or("").to_owned(),
                rows: v["rows"].as_u64(),
            }
        };
        let end = parse_time_bytes(h.time);
        for k in keys {
            if let Some(mut r) = self.pending.remove(&k) {
                r.duration_ms = match (parse_time_bytes(r.time.as_bytes()), end) {
                    (Some(a), Some(b)) => b.duration_since(a).ok().map(|d| d.as_secs_f64() * 1e3),
                    _ => None,
                };
                r.outcome = outcome.clone();
                self.emit(r);
            }
        }
    }
}

/// A record's `time` (RFC 3339, as the writer writes it).
fn parse_time_bytes(b: &[u8]) -> Option<SystemTime> {
    std::str::from_utf8(b)
        .ok()
        .and_then(crate::das::event::parse_time)
}

/// The fixed head of a record line.
struct Head<'a> {
    ty: &'a [u8],
    time: &'a [u8],
    conn: Option<u64>,
    n: Option<u64>,
    part: Option<u64>,
}

/// Reads `{"seq":N,"prev":"..","v":V,"type":"T","time":"..."` and, when
/// they follow, `"conn"`, `"n"`, `"part"`.
fn head(line: &[u8]) -> Option<Head<'_>> {
    let digits = line.get(7..)?.iter().position(|b| !b.is_ascii_digit())?;
    // seq, then `,"prev":"` + 64 hex + `"`.
    let mut rest = line.get(7 + digits + 9 + 64 + 1..)?;
    rest = rest.strip_prefix(b",\"v\":")?;
    let v_end = rest.iter().position(|b| !b.is_ascii_digit())?;
    rest = rest[v_end..].strip_prefix(b",\"type\":\"")?;
    let ty_end = memchr::memchr(b'"', rest)?;
    let ty = &rest[..ty_end];
    rest = rest[ty_end + 1..].strip_prefix(b",\"time\":\"")?;
    let time_end = memchr::memchr(b'"', rest)?;
    let time = &rest[..time_end];
    rest = &rest[time_end + 1..];
    let mut num = |key: &[u8]| -> Option<u64> {
        let r = rest.strip_prefix(key)?;
        let end = r.iter().position(|b| !b.is_ascii_digit())?;
        if end == 0 || end > 19 {
            return None;
        }
        let v = r[..end]
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        rest = &r[end..];
        Some(v)
    };
    let conn = num(b",\"conn\":");
    let n = conn.and_then(|_| num(b",\"n\":"));
    let part = n.and_then(|_| num(b",\"part\":"));
    Some(Head {
        ty,
        time,
        conn,
        n,
        part,
    })
}

/// Reads whole lines of `file` from `offset`, handing each (without its
/// end of line) and its number to `f`. Returns the offset after the last
/// whole line and whether bytes of an unfinished line follow it.
pub fn read_lines(
    file: &Path,
    offset: u64,
    first_line_no: u64,
    buf: &mut Vec<u8>,
    mut f: impl FnMut(u64, &[u8]),
) -> io::Result<(u64, u64, bool)> {
    use std::io::{Seek, SeekFrom};
    const CHUNK: usize = 4 << 20;
    let mut fh = std::fs::File::open(file)?;
    fh.seek(SeekFrom::Start(offset))?;
    if buf.len() < CHUNK {
        buf.resize(CHUNK, 0);
    }
    let (mut have, mut pos, mut line_no) = (0usize, offset, first_line_no);
    loop {
        if have == buf.len() {
            // One line longer than the buffer: grow it.
            buf.resize(buf.len() * 2, 0);
        }
        let n = fh.read(&mut buf[have..])?;
        if n == 0 {
            return Ok((pos, line_no, have > 0));
        }
        have += n;
        let mut start = 0;
        while let Some(i) = memchr::memchr(b'\n', &buf[start..have]) {
            line_no += 1;
            f(line_no, &buf[start..start + i]);
            start += i + 1;
        }
        pos += start as u64;
        buf.copy_within(start..have, 0);
        have -= start;
    }
}

/// Searches every audit file of `dir`, oldest first. An unfinished last
/// line is a break, except in the newest file (the live one, whose last
/// record may be being written).
pub fn search_dir(dir: &Path, filter: Filter) -> io::Result<Search> {
    let files = super::writer::audit_files(dir)?;
    let mut s = Search::new(filter);
    let mut buf = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let (_, lines, torn) = read_lines(file, 0, 0, &mut buf, |no, line| s.line(file, no, line))?;
        if torn && i + 1 < files.len() {
            s.breaks.push(Break {
                file: file.clone(),
                line: lines + 1,
                seq: None,
                problem: "record is truncated (no end of line): a torn write or a cut file".into(),
            });
        }
    }
    s.finish();
    s.done.sort_by_key(|r| r.seq);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::{
        Event, Outcome as Out, OutcomeKind as OK, Protocol, SessionStart, SmallText, Statement,
        Text,
    };
    use std::time::Duration;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rdsiam-search-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Two people's sessions through the real writer: arianna on payroll
    /// (one good statement, one error), bruno on sales.
    fn write_trail(dir: &Path, t0: SystemTime) {
        let sink = crate::audit::Sink::start(crate::audit::WriterConfig {
            dir: dir.to_owned(),
            rotate_bytes: 1500,
            rotate_age: Duration::from_secs(3600),
            queue_capacity: 1024,
            parameters: false,
            settings: String::new(),
            rotated: None,
        })
        .unwrap();
        let start = |conn, person: &str, db: &str| {
            Event::SessionStart(Box::new(SessionStart {
                conn,
                time: Some(t0),
                person: person.into(),
                db_user: person.into(),
                database: db.into(),
                ..Default::default()
            }))
        };
        let stmt = |conn, n, at: u64, sql: &str| {
            Event::Statement(Box::new(Statement {
                conn,
                time: t0 + Duration::from_secs(at),
                n,
                protocol: Protocol::Simple,
                name: None,
                text: Text::capture(sql.as_bytes(), 1000),
                params: None,
                function_oid: None,
                refused: None,
                judgeable: true,
            }))
        };
        let out = |conn, n, at: u64, result| {
            Event::Outcome(Box::new(Out {
                conn,
                time: t0 + Duration::from_secs(at) + Duration::from_millis(25),
                n,
                part: 1,
                result,
            }))
        };
        for e in [
            start(1, "arianna", "payroll"),
            start(2, "bruno", "sales"),
            stmt(1, 1, 10, "select * from salaries"),
            stmt(2, 1, 11, "select * from salaries"),
            out(
                1,
                1,
                10,
                OK::Complete {
                    tag: SmallText::new(b"SELECT 3"),
                    rows: Some(3),
                },
            ),
            out(
                2,
                1,
                11,
                OK::Complete {
                    tag: SmallText::new(b"SELECT 1"),
                    rows: Some(1),
                },
            ),
            stmt(1, 2, 3600, "delete from \"bonus\" where x = 'a\nb'"),
            out(
                1,
                2,
                3600,
                OK::Error {
                    sqlstate: *b"42501",
                    message: SmallText::new(b"permission denied"),
                },
            ),
            stmt(1, 3, 3700, "select 1"),
        ] {
            let ack = sink.push_durable(e);
            assert!(ack.blocking_recv().unwrap());
        }
        sink.close();
    }

    #[test]
    fn finds_by_person_time_text_and_outcome_across_files() {
        let dir = temp_dir("find");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        write_trail(&dir, t0);
        assert!(crate::audit::writer::audit_files(&dir).unwrap().len() > 1);
        let all = search_dir(&dir, Filter::default()).unwrap();
        assert!(all.breaks.is_empty(), "{:?}", all.breaks);
        assert_eq!(all.done.len(), 4);

        let f = Filter {
            person: Some("arianna".into()),
            ..Default::default()
        };
        let s = search_dir(&dir, f.clone()).unwrap();
        let texts: Vec<&str> = s.done.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "select * from salaries",
                "delete from \"bonus\" where x = 'a\nb'",
                "select 1"
            ]
        );
        assert_eq!(
            s.done[0].outcome,
            Outcome::Ok {
                tag: "SELECT 3".into(),
                rows: Some(3)
            }
        );
        assert_eq!(s.done[0].duration_ms, Some(25.0));
        assert_eq!(s.done[0].session.database, "payroll");
        assert_eq!(s.done[2].outcome, Outcome::None, "no outcome was written");

        let errors = search_dir(
            &dir,
            Filter {
                outcome: Some(OutcomeKind::Error),
                ..f.clone()
            },
        )
        .unwrap();
        assert_eq!(errors.done.len(), 1);
        assert!(
            matches!(&errors.done[0].outcome, Outcome::Error { sqlstate, .. } if sqlstate == "42501")
        );

        // Text with a quote and a line break, as written escaped.
        let grep = search_dir(
            &dir,
            Filter {
                grep: Some("\"bonus\" where x = 'a\nb".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(grep.done.len(), 1);

        let window = search_dir(
            &dir,
            Filter {
                from: Some(t0 + Duration::from_secs(60)),
                to: Some(t0 + Duration::from_secs(3650)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(window.done.len(), 1);
        assert_eq!(window.done[0].session.person, "arianna");

        let none = search_dir(
            &dir,
            Filter {
                database: Some("sales".into()),
                person: Some("arianna".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(none.done.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A changed record is reported where it is, and the search goes on.
    #[test]
    fn a_broken_chain_is_reported_not_hidden() {
        let dir = temp_dir("broken");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        write_trail(&dir, t0);
        let files = crate::audit::writer::audit_files(&dir).unwrap();
        let victim = files
            .iter()
            .find(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .contains("select * from salaries")
            })
            .unwrap();
        let text = std::fs::read_to_string(victim).unwrap();
        std::fs::write(victim, text.replacen("salaries", "salaried", 1)).unwrap();
        let s = search_dir(&dir, Filter::default()).unwrap();
        assert_eq!(s.breaks.len(), 1, "{:?}", s.breaks);
        assert!(
            s.breaks[0].problem.contains("was changed"),
            "{}",
            s.breaks[0]
        );
        assert_eq!(s.done.len(), 4, "every statement still found");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
