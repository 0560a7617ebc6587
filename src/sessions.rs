//! What the status page shows that the metrics do not: the sessions open
//! now (who, as which database user, since when, doing what), the last
//! refused logins and why, and per-minute counts of the last hour.
//!
//! A session is listed once, when it starts, and unlisted by a guard when
//! it ends: one lock each time, never per message. Its live numbers are
//! [`Counters`]: the pump keeps them in a [`Tracker`] of plain integers,
//! fed per message, and publishes them with a few relaxed stores once per
//! wake-up (a clock read only when the state changes), so the forwarding
//! path neither allocates nor locks for them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::pg::frame::Header;

/// Refused logins kept for the page.
pub const REFUSALS_KEPT: usize = 50;
/// Minutes of history the chart covers.
pub const HISTORY_MINUTES: u64 = 60;

/// What a session is doing, as the protocol tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Waiting for the client, outside a transaction.
    Idle = 0,
    /// Waiting for the client, inside a transaction.
    InTransaction = 1,
    /// Waiting for the client, inside a failed transaction.
    FailedTransaction = 2,
    /// The server owes an answer (a ReadyForQuery) to the client.
    Running = 3,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::InTransaction => "in transaction",
            State::FailedTransaction => "in failed transaction",
            State::Running => "running",
        }
    }

    fn from_u8(v: u8) -> State {
        match v {
            1 => State::InTransaction,
            2 => State::FailedTransaction,
            3 => State::Running,
            _ => State::Idle,
        }
    }
}

/// A session's live numbers, written by its pump and read by the page.
#[derive(Debug, Default)]
pub struct Counters {
    /// Queries, Executes and FunctionCalls the client sent.
    statements: AtomicU64,
    bytes_from_client: AtomicU64,
    bytes_to_client: AtomicU64,
    state: AtomicU8,
    /// Unix milliseconds of the last change of state (0: session start).
    state_since_ms: AtomicU64,
}

/// A consistent-enough copy of [`Counters`] (each field read once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub statements: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub state: State,
    pub state_since: Option<SystemTime>,
}

impl Counters {
    pub fn snapshot(&self) -> Snapshot {
        let ms = self.state_since_ms.load(Relaxed);
        Snapshot {
            statements: self.statements.load(Relaxed),
            bytes_from_client: self.bytes_from_client.load(Relaxed),
            bytes_to_client: self.bytes_to_client.load(Relaxed),
            state: State::from_u8(self.state.load(Relaxed)),
            state_since: (ms > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }
}

/// The pump's side of [`Counters`]: plain integers updated per message,
/// published per wake-up.
#[derive(Debug, Default)]
pub struct Tracker {
    statements: u64,
    /// ReadyForQuery messages the server owes (one per Query, Sync and
    /// FunctionCall sent).
    owed: u64,
    /// Transaction status of the last ReadyForQuery.
    tx: u8,
    /// The last server chunk ended right after a ReadyForQuery header: the
    /// next byte is its status.
    status_next: bool,
    shown: Option<State>,
}

impl Tracker {
    /// A client message begins (its header is whole).
    #[inline]
    pub fn client(&mut self, tag: u8) {
        match tag {
            b'Q' | b'F' => {
                self.statements += 1;
                self.owed += 1;
            }
            b'E' => self.statements += 1,
            b'S' => self.owed += 1,
            _ => {}
        }
    }

    /// A server chunk is about to be framed: finishes a ReadyForQuery
    /// whose status byte the last chunk did not hold.
    #[inline]
    pub fn server_chunk(&mut self, chunk: &[u8]) {
        if self.status_next
            && let Some(&status) = chunk.first()
        {
            self.status_next = false;
            self.ready(status);
        }
    }

    /// A server message header, with the part of its body in the same
    /// chunk.
    #[inline]
    pub fn server_header(&mut self, h: Header, body: &[u8]) {
        if h.tag == b'Z' && h.body_len() == 1 {
            match body.first() {
                Some(&status) => self.ready(status),
                None => self.status_next = true,
            }
        }
    }

    /// A ReadyForQuery with its transaction status.
    #[inline]
    pub fn ready(&mut self, status: u8) {
        self.owed = self.owed.saturating_sub(1);
        self.tx = status;
    }

    fn state(&self) -> State {
        if self.owed > 0 {
            return State::Running;
        }
        match self.tx {
            b'T' => State::InTransaction,
            b'E' => State::FailedTransaction,
            _ => State::Idle,
        }
    }

    /// Makes the numbers visible to the page.
    #[inline]
    pub fn publish(&mut self, c: &Counters, from_client: u64, to_client: u64) {
        c.statements.store(self.statements, Relaxed);
        c.bytes_from_client.store(from_client, Relaxed);
        c.bytes_to_client.store(to_client, Relaxed);
        let state = self.state();
        if self.shown != Some(state) {
            if self.shown.is_some() {
                c.state_since_ms.store(unix_ms(SystemTime::now()), Relaxed);
            }
            self.shown = Some(state);
            c.state.store(state as u8, Relaxed);
        }
    }
}

/// Who a session is, as it started.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub conn: u64,
    pub endpoint: String,
    pub person: String,
    pub db_user: String,
    pub database: String,
    pub application_name: String,
    pub client_addr: String,
    /// `None`: plaintext (loopback or unix socket).
    pub client_tls: Option<String>,
    pub started: SystemTime,
}

/// An open session.
#[derive(Debug)]
pub struct LiveSession {
    pub info: SessionInfo,
    pub counters: Counters,
}

/// A refused login, as the page shows it: what the client was told, never
/// the internal detail behind it.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub time: SystemTime,
    pub client_addr: String,
    pub db_user: Option<String>,
    pub database: Option<String>,
    /// The person, when the refusal names one (not your user).
    pub person: Option<String>,
    /// The metrics label: `not_your_user`, `server_refused`, ...
    pub reason: &'static str,
    pub sqlstate: String,
    /// The message the client got.
    pub message: String,
}

/// Counts of one minute of the last hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Minute {
    /// Unix minute.
    pub minute: u64,
    pub sessions: u64,
    pub statements: u64,
}

/// The registry of open sessions, refusals and history.
#[derive(Debug, Default)]
pub struct Registry {
    open: Mutex<BTreeMap<u64, Arc<LiveSession>>>,
    refusals: Mutex<VecDeque<Refusal>>,
    /// Cumulative (sessions started, statements) at the last sample of
    /// each minute, oldest first, and the counts before the oldest (zero
    /// until samples older than the hour are dropped).
    samples: Mutex<Samples>,
    sessions_started: AtomicU64,
    /// Statements of sessions that have ended.
    statements_ended: AtomicU64,
}

#[derive(Debug, Default)]
struct Samples {
    minutes: VecDeque<(u64, u64, u64)>,
    before: (u64, u64),
}

/// Keeps a session listed while it lives.
#[derive(Debug)]
pub struct Listed<'a> {
    registry: &'a Registry,
    pub session: Arc<LiveSession>,
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        let conn = self.session.info.conn;
        self.registry
            .statements_ended
            .fetch_add(self.session.counters.statements.load(Relaxed), Relaxed);
        lock(&self.registry.open).remove(&conn);
    }
}

impl Registry {
    /// Lists a session until the returned guard drops.
    pub fn open(&self, info: SessionInfo) -> Listed<'_> {
        let session = Arc::new(LiveSession {
            info,
            counters: Counters::default(),
        });
        self.sessions_started.fetch_add(1, Relaxed);
        lock(&self.open).insert(session.info.conn, session.clone());
        Listed {
            registry: self,
            session,
        }
    }

    /// The open sessions, by connection id.
    pub fn sessions(&self) -> Vec<Arc<LiveSession>> {
        lock(&self.open).values().cloned().collect()
    }

    /// Notes a refused login; the oldest beyond [`REFUSALS_KEPT`] go.
    pub fn refused(&self, r: Refusal) {
        let mut v = lock(&self.refusals);
        if v.len() == REFUSALS_KEPT {
            v.pop_front();
        }
        v.push_back(r);
    }

    /// The last refusals, newest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        lock(&self.refusals).iter().rev().cloned().collect()
    }

    /// Takes a sample of the cumulative counts for the minute of `now`
    /// (the admin listener does every few seconds, and before it shows
    /// the history).
    pub fn sample(&self, now: SystemTime) {
        let running: u64 = lock(&self.open)
            .values()
            .map(|s| s.counters.statements.load(Relaxed))
            .sum();
        let statements = self.statements_ended.load(Relaxed) + running;
        let sessions = self.sessions_started.load(Relaxed);
        let minute = unix_ms(now) / 60_000;
        let mut s = lock(&self.samples);
        match s.minutes.back_mut() {
            Some(last) if last.0 == minute => *last = (minute, sessions, statements),
            _ => s.minutes.push_back((minute, sessions, statements)),
        }
        while s
            .minutes
            .front()
            .is_some_and(|f| f.0 + HISTORY_MINUTES < minute)
        {
            if let Some((_, sessions, statements)) = s.minutes.pop_front() {
                s.before = (sessions, statements);
            }
        }
    }

    /// New sessions and statements in each of the last
    /// [`HISTORY_MINUTES`] minutes up to `now`'s, oldest first. Counts
    /// since the previous sample go to the minute of the sample that saw
    /// them (the first sample's, since start).
    pub fn history(&self, now: SystemTime) -> Vec<Minute> {
        let this = unix_ms(now) / 60_000;
        let first = this + 1 - HISTORY_MINUTES;
        let s = lock(&self.samples);
        let mut out: Vec<Minute> = (first..=this)
            .map(|minute| Minute {
                minute,
                sessions: 0,
                statements: 0,
            })
            .collect();
        let (mut b_sessions, mut b_statements) = s.before;
        for &(minute, sessions, statements) in s.minutes.iter() {
            if minute >= first && minute <= this {
                let m = &mut out[(minute - first) as usize];
                m.sessions = sessions.saturating_sub(b_sessions);
                m.statements = statements.saturating_sub(b_statements);
            }
            (b_sessions, b_statements) = (sessions, statements);
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(tag: u8, body_len: u32) -> Header {
        Header {
            tag,
            len: body_len + 4,
        }
    }

    /// Query -> running; ReadyForQuery 'T' -> in transaction; an extended
    /// batch is running until its Sync is answered; the status byte of a
    /// ReadyForQuery cut from its header by a chunk boundary still counts.
    #[test]
    fn state_follows_the_protocol() {
        let c = Counters::default();
        let mut t = Tracker::default();
        t.publish(&c, 0, 0);
        assert_eq!(c.snapshot().state, State::Idle);
        assert_eq!(c.snapshot().state_since, None, "unchanged since start");

        t.client(b'Q');
        t.publish(&c, 10, 0);
        let s = c.snapshot();
        assert_eq!(
            (s.state, s.statements, s.bytes_from_client),
            (State::Running, 1, 10)
        );
        assert!(s.state_since.is_some());

        t.server_header(h(b'C', 6), b"BEGIN\0");
        t.server_header(h(b'Z', 1), b"T");
        t.publish(&c, 10, 30);
        assert_eq!(c.snapshot().state, State::InTransaction);

        for tag in *b"PBES" {
            t.client(tag);
        }
        t.publish(&c, 50, 30);
        assert_eq!(c.snapshot().state, State::Running);
        assert_eq!(c.snapshot().statements, 2);
        // The chunk ends right after the header.
        t.server_header(h(b'Z', 1), b"");
        t.publish(&c, 50, 36);
        assert_eq!(c.snapshot().state, State::Running);
        t.server_chunk(b"E");
        t.publish(&c, 50, 36);
        assert_eq!(c.snapshot().state, State::FailedTransaction);
    }

    #[test]
    fn listed_while_the_guard_lives_and_counted_after() {
        let r = Registry::default();
        let info = SessionInfo {
            conn: 7,
            endpoint: "default".into(),
            person: "arianna".into(),
            db_user: "arianna".into(),
            database: "payroll".into(),
            application_name: "psql".into(),
            client_addr: "127.0.0.1:5555".into(),
            client_tls: None,
            started: SystemTime::now(),
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 * 60);
        r.sample(t0);
        {
            let listed = r.open(info);
            let mut t = Tracker::default();
            t.client(b'Q');
            t.client(b'Q');
            t.publish(&listed.session.counters, 0, 0);
            assert_eq!(r.sessions().len(), 1);
        }
        assert!(r.sessions().is_empty());
        r.sample(t0 + Duration::from_secs(61));
        let hist = r.history(t0 + Duration::from_secs(61));
        assert_eq!(hist.len(), HISTORY_MINUTES as usize);
        let last = hist.last().unwrap();
        assert_eq!((last.sessions, last.statements), (1, 2));
        assert!(hist[..hist.len() - 1].iter().all(|m| m.statements == 0));
        // Samples older than the hour go; what they counted stays out.
        let later = t0 + Duration::from_secs(3 * 3600);
        r.sample(later);
        let hist = r.history(later);
        assert!(hist.iter().all(|m| m.statements == 0 && m.sessions == 0));
    }

    #[test]
    fn refusals_keep_the_newest() {
        let r = Registry::default();
        for i in 0..REFUSALS_KEPT + 5 {
            r.refused(Refusal {
                time: SystemTime::now(),
                client_addr: format!("127.0.0.1:{i}"),
                db_user: None,
                database: None,
                person: None,
                reason: "not_your_user",
                sqlstate: "28000".into(),
                message: "no".into(),
            });
        }
        let v = r.refusals();
        assert_eq!(v.len(), REFUSALS_KEPT);
        assert_eq!(v[0].client_addr, format!("127.0.0.1:{}", REFUSALS_KEPT + 4));
    }
}
