//! One session's view of its statements: what the client asked to run
//! (with prepared statements and portals resolved to their text), what the
//! server answered, and the password guard's verdicts.
//!
//! The forwarding pump calls [`SessionTap::client_message`] for each
//! inspected client message before forwarding it and
//! [`SessionTap::server_message`] for each inspected server message. What
//! the server does with each message (skips, COPY, which names exist) is
//! the [`Model`]'s job; the tap decides what to record and what to refuse.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use tokio::sync::oneshot;

use super::event::{Event, Outcome, Protocol, Statement, Text};
use super::limits::INLINE_PARSE_LIMIT;
use super::model::{Answer, Lexing, Model, Portal, Prepared, Sent};
use super::{Auditor, Mode, redact};
use crate::pg::messages;

/// What the pump does with an inspected client message.
#[derive(Debug)]
pub enum Verdict {
    Forward,
    /// Forward the bytes the tap wrote into `inject` instead.
    Replace,
    /// Forward once the receiver says the record is durable; on `false`
    /// ask [`SessionTap::sink_failed`].
    Wait(oneshot::Receiver<bool>),
    /// End the session with this FATAL message to the client.
    Close(&'static str),
    /// Not yet: judge the message again once the server has answered more
    /// (the model cannot yet tell what it will run, or how it will lex it).
    Hold,
}

/// The SQL sent in place of a refused password change: the server raises
/// the error itself, so it arrives in order with everything pipelined
/// before and after it, and the transaction state is exactly the one an
/// error in that statement would leave.
pub const GUARD_SQL: &str = "DO $rds_iam_proxy$BEGIN RAISE EXCEPTION USING ERRCODE = '42501', \
    MESSAGE = 'password changes are not allowed through rds-iam-proxy', \
    HINT = 'IAM authentication is the only way in; passwords stay unset.'; END$rds_iam_proxy$";

/// Sent in place of a statement that mentions a password but that the
/// guard cannot read the way the server will (a parse failure, or lexing
/// settings it cannot follow): refused rather than forwarded unchecked.
pub const GUARD_UNREADABLE_SQL: &str = "DO $rds_iam_proxy$BEGIN RAISE EXCEPTION USING ERRCODE = '42501', \
    MESSAGE = 'statement refused: it mentions a password and rds-iam-proxy cannot read it the way the server would', \
    HINT = 'check the syntax; with standard_conforming_strings off or a client encoding such as SJIS or BIG5 the password guard cannot judge a statement that mentions a password'; END$rds_iam_proxy$";

/// Sent in place of a statement whose audit record could not be written
/// in synchronous mode.
pub const SINK_FAILED_SQL: &str = "DO $rds_iam_proxy$BEGIN RAISE EXCEPTION USING ERRCODE = '58030', \
    MESSAGE = 'statement refused: rds-iam-proxy cannot write its audit log', \
    HINT = 'the proxy audits synchronously and fails closed; the operator must check the audit directory (disk full?)'; END$rds_iam_proxy$";

pub const SINK_FAILED_FATAL: &str =
    "rds-iam-proxy cannot write its audit log and audits synchronously: the session is closed";

/// Text recorded for an Execute or Bind whose statement the proxy does
/// not know (prepared before its maps could hold it, or a SQL cursor it
/// could not read): never another statement's text.
const UNKNOWN_STATEMENT: &[u8] = b"<statement not known to rds-iam-proxy>";

/// Answers a session may be owed before its next message is held.
pub const MAX_OUTSTANDING: usize = 100_000;

/// Why a Query or Parse was refused before it was held whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Longer than the gate ever holds ([`crate::gate::HOLD_LIMIT`]).
    TooLong,
    /// The memory all sessions share for long statements is in use.
    NoMemory,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::TooLong => "too long to audit",
            Refusal::NoMemory => "proxy memory for long statements in use",
        }
    }

    /// The statement the server runs instead: it raises the error.
    fn sql(self, len: usize) -> String {
        let (code, message, hint) = match self {
            Refusal::TooLong => (
                "54000",
                format!(
                    "statement of {len} bytes is longer than the {} bytes rds-iam-proxy can audit",
                    crate::gate::HOLD_LIMIT
                ),
                "send it in parts, or load large values with COPY or as parameters",
            ),
            Refusal::NoMemory => (
                "53000",
                format!(
                    "statement of {len} bytes refused: rds-iam-proxy is holding as many long statements as it may"
                ),
                "retry shortly; the operator can see this as rds_iam_proxy_audit_hold_refused_total",
            ),
        };
        format!(
            "DO $rds_iam_proxy$BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', \
             MESSAGE = '{message}', HINT = '{hint}'; END$rds_iam_proxy$"
        )
    }
}

/// A long text the guard has handed to a parser thread.
#[derive(Debug)]
struct ParseJob {
    len: usize,
    rx: oneshot::Receiver<Option<bool>>,
    done: Option<Option<bool>>,
}

/// Per-session audit state.
#[derive(Debug)]
pub struct SessionTap {
    conn: u64,
    auditor: Arc<Auditor>,
    n: u64,
    model: Model,
    /// The text the guard alone keeps (none), shared so that a statement
    /// costs no allocation.
    no_text: Text,
    /// Refused statements (for the session end and tests).
    pub refused: u64,
    /// The guard's parse of a long text, off the event loop.
    job: Option<ParseJob>,
    /// Where FunctionCall OIDs go to be named (see [`super::functions`]).
    functions: Option<super::functions::Asker>,
}

/// The guard's reading of one statement text.
enum Guard {
    Pass,
    /// A password change: refused.
    Change,
    /// Mentions a password and cannot be read as the server will.
    Unreadable,
}

impl SessionTap {
    pub fn new(conn: u64, auditor: Arc<Auditor>) -> Self {
        let names = auditor.sink.is_some();
        Self {
            conn,
            auditor,
            n: 0,
            model: Model::new(Lexing::default(), names),
            no_text: Text::capture(b"", 0),
            refused: 0,
            job: None,
            functions: None,
        }
    }

    /// Names the functions of this session's FunctionCalls through `asker`.
    pub fn name_functions(&mut self, asker: super::functions::Asker) {
        self.functions = Some(asker);
    }

    pub fn auditor(&self) -> &Arc<Auditor> {
        &self.auditor
    }

    /// The ParameterStatus messages of the login (lexing settings).
    pub fn greeting(&mut self, greeting: &[u8]) {
        let mut capture = messages::Capture::new(u32::MAX, 1024);
        let _ = capture.feed(
            greeting,
            |t| (t == b'S').then_some(1024),
            |_, b| self.model.lexing.observe(b),
        );
    }

    fn logging(&self) -> bool {
        self.auditor.sink.is_some()
    }

    /// The guard's verdict on `text`, or `None` while a parser thread
    /// reads it (the message is held; [`SessionTap::poll_parse`] says
    /// when to judge it again).
    fn guard(&mut self, text: &[u8]) -> Option<Guard> {
        if !self.auditor.config.password_guard || !redact::mentions_password(text) {
            return Some(Guard::Pass);
        }
        if !self.model.lexing.judgeable() {
            return Some(Guard::Unreadable);
        }
        let change = if text.len() <= INLINE_PARSE_LIMIT {
            redact::password_change(text)
        } else {
            self.parse_off_loop(text)?
        };
        Some(match change {
            Some(true) => Guard::Change,
            Some(false) => Guard::Pass,
            None => Guard::Unreadable,
        })
    }

    /// The parse of a long text on a blocking thread: its result once
    /// done, else `None` (started now, or still running). The gate judges
    /// the same message again, so the job is matched by length.
    fn parse_off_loop(&mut self, text: &[u8]) -> Option<Option<bool>> {
        if let Some(job) = &mut self.job
            && job.len == text.len()
        {
            let done = job.done.take()?;
            self.job = None;
            return Some(done);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Some(redact::password_change(text));
        };
        let (tx, rx) = oneshot::channel();
        let owned = text.to_vec();
        let parsers = self.auditor.limits.parsers.clone();
        self.auditor
            .limits
            .off_loop_parses
            .fetch_add(1, Ordering::Relaxed);
        runtime.spawn(async move {
            let Ok(permit) = parsers.acquire_owned().await else {
                return;
            };
            let change = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                redact::password_change(&owned)
            })
            .await
            .unwrap_or(None);
            let _ = tx.send(change);
        });
        self.job = Some(ParseJob {
            len: text.len(),
            rx,
            done: None,
        });
        None
    }

    /// Ready once a parse started by the guard has finished (the held
    /// message can be judged again); pending otherwise.
    pub fn poll_parse(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(job) = &mut self.job else {
            return Poll::Pending;
        };
        if job.done.is_some() {
            return Poll::Pending;
        }
        let change = ready!(Pin::new(&mut job.rx).poll(cx));
        // A parser task that ended without an answer: unreadable.
        job.done = Some(change.unwrap_or(None));
        Poll::Ready(())
    }

    /// A Query or Parse the gate will not hold (see [`Refusal`]): recorded
    /// as refused, told to the model, and replaced in `inject` by an
    /// error the server raises in its place. `prefix` is what arrived of
    /// the body.
    pub fn refuse_long(
        &mut self,
        tag: u8,
        prefix: &[u8],
        frame_len: usize,
        why: Refusal,
        inject: &mut Vec<u8>,
    ) {
        self.refused += 1;
        let sql = why.sql(frame_len);
        let text = Text::capture(
            format!("<statement of {frame_len} bytes not held by rds-iam-proxy>").as_bytes(),
            usize::MAX,
        );
        inject.clear();
        if tag == b'Q' {
            let mut n = 0;
            if self.logging() {
                let mut st = self.statement(Protocol::Simple, text.clone());
                st.refused = Some(why.reason());
                n = st.n;
                // Nothing to wait for: the server runs only the error.
                let _ = self.emit(st);
            }
            self.push(Sent::Query { n, text });
            messages::write_query(inject, &sql);
        } else {
            // The statement name comes first in the body; keep it, so the
            // server refuses the Parse under the name the client used.
            let name = prefix
                .iter()
                .position(|&b| b == 0)
                .map_or(&b""[..], |end| &prefix[..end]);
            self.push(Sent::Parse {
                name: name.into(),
                value: Prepared {
                    name: (!name.is_empty()).then(|| Arc::from(name)),
                    text,
                    refused: true,
                },
            });
            messages::write_parse(inject, name, &sql);
        }
    }

    /// Hands a statement to the sink: queued (async), or with a wait for
    /// durability (sync).
    fn emit(&mut self, statement: Statement) -> Option<oneshot::Receiver<bool>> {
        let sink = self.auditor.sink.as_ref()?;
        let event = Event::Statement(Box::new(statement));
        match self.auditor.config.mode {
            Mode::Sync => Some(sink.push_durable(event)),
            _ => {
                sink.push(event);
                None
            }
        }
    }

    fn statement(&mut self, protocol: Protocol, text: Text) -> Statement {
        self.n += 1;
        Statement {
            conn: self.conn,
            time: SystemTime::now(),
            n: self.n,
            protocol,
            name: None,
            text,
            params: None,
            function_oid: None,
            refused: None,
            judgeable: self.model.lexing.judgeable(),
        }
    }

    /// Pushes a message into the model and writes the outcomes it yields.
    fn push(&mut self, sent: Sent) {
        let (sink, conn) = (self.auditor.sink.as_deref(), self.conn);
        self.model.push(sent, &mut |a| write_answer(sink, conn, a));
    }

    /// The parameters of a Bind or FunctionCall as recorded.
    fn params(&self, b: &messages::Bind<'_>, complete: bool) -> Option<Vec<Option<String>>> {
        self.auditor.config.parameters.then(|| {
            b.params()
                .map(|p| {
                    p.map(|(v, text)| {
                        if text {
                            String::from_utf8_lossy(v).into_owned()
                        } else {
                            format!("<binary {} bytes>", v.len())
                        }
                    })
                })
                .chain((!complete).then(|| Some("<cut>".to_owned())))
                .collect()
        })
    }

    /// A client message, complete or (`complete == false`) a prefix of a
    /// long Bind or FunctionCall.
    pub fn client_message(
        &mut self,
        tag: u8,
        body: &[u8],
        complete: bool,
        inject: &mut Vec<u8>,
    ) -> Verdict {
        let cap = self.auditor.config.max_statement_bytes;
        let logging = self.logging();
        // Flow control: a client that pipelines without reading waits for
        // the server's answers once this many are outstanding. CopyDone
        // and CopyFail pass, as does anything inside COPY FROM STDIN: a
        // COPY's own answer waits for what the client sends.
        if self.model.queued() >= MAX_OUTSTANDING
            && !matches!(tag, b'c' | b'f')
            && self.model.discarding() != Some(super::model::DURING_COPY)
        {
            return Verdict::Hold;
        }
        match tag {
            b'Q' | b'P' => {
                let parsed = if tag == b'Q' {
                    messages::query(body).map(|t| (&b""[..], t))
                } else {
                    messages::parse(body)
                };
                // The server refuses a malformed message itself.
                let Ok((name, text)) = parsed else {
                    return Verdict::Forward;
                };
                // What runs before this could change how the server lexes
                // it: judge a text that mentions a password only once
                // everything before it is answered.
                if self.auditor.config.password_guard
                    && !self.model.idle()
                    && self.model.discarding().is_none()
                    && redact::mentions_password(text)
                {
                    return Verdict::Hold;
                }
                let Some(guard) = self.guard(text) else {
                    return Verdict::Hold;
                };
                let refused = match guard {
                    Guard::Pass => None,
                    Guard::Change => Some("password change"),
                    Guard::Unreadable => Some("unreadable text mentioning a password"),
                };
                let mut wait = None;
                if tag == b'Q' {
                    let text = if logging {
                        Text::capture(text, cap)
                    } else {
                        self.no_text.clone()
                    };
                    let mut n = 0;
                    if logging {
                        let mut st = self.statement(Protocol::Simple, text.clone());
                        st.refused = refused;
                        n = st.n;
                        // A statement the server will not run needs no wait.
                        let runs = self.model.discarding().is_none();
                        wait = self.emit(st).filter(|_| runs);
                    }
                    self.push(Sent::Query { n, text });
                } else {
                    let value = Prepared {
                        name: (!name.is_empty()).then(|| Arc::from(name)),
                        text: if logging {
                            Text::capture(text, cap)
                        } else {
                            self.no_text.clone()
                        },
                        refused: refused.is_some(),
                    };
                    self.push(Sent::Parse {
                        name: name.into(),
                        value,
                    });
                }
                if refused.is_some() {
                    self.refused += 1;
                    let sql = match guard {
                        Guard::Change => GUARD_SQL,
                        _ => GUARD_UNREADABLE_SQL,
                    };
                    inject.clear();
                    if tag == b'Q' {
                        messages::write_query(inject, sql);
                    } else {
                        messages::write_parse(inject, name, sql);
                    }
                    return Verdict::Replace;
                }
                wait.map_or(Verdict::Forward, Verdict::Wait)
            }
            b'B' => {
                if self.model.must_wait() {
                    return Verdict::Hold;
                }
                let Ok(b) = messages::bind(body) else {
                    return Verdict::Forward;
                };
                let value = Portal {
                    statement: self.model.statement(b.statement).cloned(),
                    params: if logging {
                        self.params(&b, complete)
                    } else {
                        None
                    },
                };
                self.push(Sent::Bind {
                    portal: b.portal.into(),
                    value,
                });
                Verdict::Forward
            }
            b'E' => {
                if self.model.must_wait() {
                    return Verdict::Hold;
                }
                if !logging {
                    self.push(Sent::Execute { n: 0, text: None });
                    return Verdict::Forward;
                }
                let portal = messages::execute(body)
                    .ok()
                    .and_then(|p| self.model.portal(p))
                    .cloned();
                let (prepared, params) = match portal {
                    Some(Portal { statement, params }) => (statement, params),
                    None => (None, None),
                };
                let text = match &prepared {
                    Some(p) => p.text.clone(),
                    None => Text::capture(UNKNOWN_STATEMENT, cap),
                };
                let mut st = self.statement(Protocol::Extended, text.clone());
                if let Some(p) = &prepared {
                    st.name = p.name.clone();
                    if p.refused {
                        st.refused = Some("password change");
                    }
                }
                st.params = params;
                let n = st.n;
                let runs = self.model.discarding().is_none();
                let wait = self.emit(st).filter(|_| runs);
                self.push(Sent::Execute {
                    n,
                    text: prepared.map(|p| p.text),
                });
                wait.map_or(Verdict::Forward, Verdict::Wait)
            }
            b'F' => {
                if !logging {
                    self.push(Sent::Function { n: 0 });
                    return Verdict::Forward;
                }
                let mut st = self.statement(Protocol::Function, Text::capture(b"", cap));
                if let Ok((oid, args)) = messages::function_call_args(body) {
                    st.function_oid = Some(oid);
                    if let Some(asker) = &mut self.functions {
                        asker.ask(oid);
                    }
                    st.params = self.params(&args, complete);
                }
                let n = st.n;
                let runs = self.model.discarding().is_none();
                let wait = self.emit(st).filter(|_| runs);
                self.push(Sent::Function { n });
                wait.map_or(Verdict::Forward, Verdict::Wait)
            }
            b'C' => {
                if let Ok((kind, name)) = messages::close(body) {
                    self.push(Sent::Close {
                        kind,
                        name: name.into(),
                    });
                }
                Verdict::Forward
            }
            b'D' => {
                self.push(Sent::Describe);
                Verdict::Forward
            }
            b'S' => {
                self.push(Sent::Sync);
                Verdict::Forward
            }
            b'c' | b'f' => {
                self.push(Sent::CopyEnd);
                Verdict::Forward
            }
            _ => Verdict::Forward,
        }
    }

    /// The record of a held message could not be made durable.
    pub fn sink_failed(&mut self, tag: u8, inject: &mut Vec<u8>) -> Verdict {
        self.refused += 1;
        match tag {
            b'Q' => {
                inject.clear();
                messages::write_query(inject, SINK_FAILED_SQL);
                Verdict::Replace
            }
            _ => Verdict::Close(SINK_FAILED_FATAL),
        }
    }

    /// A server message (its body possibly cut to a prefix).
    pub fn server_message(&mut self, tag: u8, body: &[u8]) {
        let (sink, conn) = (self.auditor.sink.as_deref(), self.conn);
        self.model
            .server(tag, body, &mut |a| write_answer(sink, conn, a));
    }
}

fn write_answer(sink: Option<&super::Sink>, conn: u64, a: Answer) {
    // The guard alone records nothing.
    let Some(sink) = sink else {
        return;
    };
    sink.push(Event::Outcome(Box::new(Outcome {
        conn,
        time: SystemTime::now(),
        n: a.n,
        part: a.part,
        result: a.kind,
    })));
}

/// Whether a tap is needed at all for this auditor.
pub fn wanted(auditor: &Auditor) -> bool {
    auditor.sink.is_some() || auditor.config.password_guard
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditConfig;

    fn tap() -> SessionTap {
        let auditor = Arc::new(Auditor::from_parts(
            AuditConfig::default(),
            None,
            Default::default(),
        ));
        SessionTap::new(1, auditor)
    }

    #[test]
    fn guard_replaces_password_changes_in_both_protocols() {
        let mut t = tap();
        let mut inject = Vec::new();
        let mut q = Vec::new();
        messages::write_query(&mut q, "select 1");
        assert!(matches!(
            t.client_message(b'Q', &q[5..], true, &mut inject),
            Verdict::Forward
        ));
        t.server_message(b'C', b"SELECT 1\0");
        t.server_message(b'Z', b"I");
        q.clear();
        messages::write_query(&mut q, "select 1; ALTER USER me PASSWORD 'SCRAM-SHA-256$x'");
        assert!(matches!(
            t.client_message(b'Q', &q[5..], true, &mut inject),
            Verdict::Replace
        ));
        let mut expect = Vec::new();
        messages::write_query(&mut expect, GUARD_SQL);
        assert_eq!(inject, expect);
        t.server_message(b'E', b"C42501\0Mrefused\0\0");
        t.server_message(b'Z', b"I");
        let mut p = Vec::new();
        messages::write_parse(&mut p, b"s1", "alter role me password 'x'");
        assert!(matches!(
            t.client_message(b'P', &p[5..], true, &mut inject),
            Verdict::Replace
        ));
        expect.clear();
        messages::write_parse(&mut expect, b"s1", GUARD_SQL);
        assert_eq!(inject, expect);
        assert_eq!(t.refused, 2);
    }

    /// The guard alone keeps no records and no names: a long session of
    /// answered queries leaves nothing queued.
    #[test]
    fn guard_alone_keeps_nothing_per_statement() {
        let mut t = tap();
        let mut inject = Vec::new();
        let mut q = Vec::new();
        messages::write_query(&mut q, "select 1");
        let mut p = Vec::new();
        messages::write_parse(&mut p, b"", "select 1");
        for _ in 0..10_000 {
            assert!(matches!(
                t.client_message(b'Q', &q[5..], true, &mut inject),
                Verdict::Forward
            ));
            t.client_message(b'P', &p[5..], true, &mut inject);
            t.server_message(b'C', b"SELECT 1\0");
            t.server_message(b'Z', b"I");
            t.server_message(b'1', b"");
        }
        assert_eq!(t.model.queued(), 0);
        assert_eq!(t.model.unmatched, 0);
        assert_eq!(t.n, 0);
        assert!(inject.is_empty());
    }

    /// A statement that mentions a password waits until what was sent
    /// before it is answered (it could change how the server lexes), and
    /// is refused when the server reports standard_conforming_strings off.
    #[test]
    fn guard_judges_with_the_servers_lexing() {
        let mut t = tap();
        let mut inject = Vec::new();
        let mut q = Vec::new();
        messages::write_query(&mut q, "set standard_conforming_strings = off");
        t.client_message(b'Q', &q[5..], true, &mut inject);
        let mut q2 = Vec::new();
        let tricky = r"SELECT '\' , ' ; CREATE ROLE x LOGIN PASSWORD $$pw$$ ; SELECT '--'";
        messages::write_query(&mut q2, tricky);
        assert!(matches!(
            t.client_message(b'Q', &q2[5..], true, &mut inject),
            Verdict::Hold
        ));
        t.server_message(b'S', b"standard_conforming_strings\0off\0");
        t.server_message(b'C', b"SET\0");
        t.server_message(b'Z', b"I");
        assert!(matches!(
            t.client_message(b'Q', &q2[5..], true, &mut inject),
            Verdict::Replace
        ));
        let mut expect = Vec::new();
        messages::write_query(&mut expect, GUARD_UNREADABLE_SQL);
        assert_eq!(inject, expect);
        // Back on: the same text is one statement with a literal.
        t.server_message(b'C', b"DO\0");
        t.server_message(b'Z', b"I");
        t.server_message(b'S', b"standard_conforming_strings\0on\0");
        assert!(matches!(
            t.client_message(b'Q', &q2[5..], true, &mut inject),
            Verdict::Forward
        ));
    }

    /// Text that mentions a password and that the parser cannot read is
    /// refused, not forwarded unchecked.
    #[test]
    fn guard_refuses_what_it_cannot_read() {
        let mut t = tap();
        let mut inject = Vec::new();
        let deep = format!(
            "select {}1{} -- password",
            "abs(".repeat(500),
            ")".repeat(500)
        );
        for sql in ["ALTER USER alice PASSWORD", deep.as_str()] {
            let mut q = Vec::new();
            messages::write_query(&mut q, sql);
            assert!(
                matches!(
                    t.client_message(b'Q', &q[5..], true, &mut inject),
                    Verdict::Replace
                ),
                "{}",
                &sql[..40.min(sql.len())]
            );
            t.server_message(b'E', b"C42501\0Mrefused\0\0");
            t.server_message(b'Z', b"I");
        }
    }

    /// A Query or Parse refused before it is held still reaches the
    /// model: the server's answer to its replacement matches it.
    #[test]
    fn refused_long_statements_are_told_to_the_model() {
        let mut t = tap();
        let mut inject = Vec::new();
        t.refuse_long(b'Q', b"select", 20_000_000, Refusal::TooLong, &mut inject);
        assert!(String::from_utf8_lossy(&inject).contains("'54000'"));
        t.server_message(b'E', b"C54000\0Mtoo long\0\0");
        t.server_message(b'Z', b"I");
        t.refuse_long(
            b'P',
            b"s1\0select",
            3_000_000,
            Refusal::NoMemory,
            &mut inject,
        );
        let mut expect = Vec::new();
        messages::write_parse(&mut expect, b"s1", &Refusal::NoMemory.sql(3_000_000));
        assert_eq!(inject, expect);
        // The server skips the rest until Sync.
        t.server_message(b'E', b"C53000\0Mno memory\0\0");
        // Execute of the unnamed portal, no row limit.
        t.client_message(b'E', b"\0\0\0\0\0", true, &mut inject);
        t.client_message(b'S', b"", true, &mut inject);
        t.server_message(b'Z', b"I");
        assert_eq!(t.model.queued(), 0);
        assert_eq!(t.model.unmatched, 0);
        assert_eq!(t.refused, 2);
    }

    /// A client that pipelines without reading is held once the server
    /// owes it MAX_OUTSTANDING answers, and goes on as answers arrive.
    #[test]
    fn outstanding_answers_are_bounded() {
        let mut t = tap();
        let mut inject = Vec::new();
        for _ in 0..MAX_OUTSTANDING {
            assert!(matches!(
                t.client_message(b'S', b"", true, &mut inject),
                Verdict::Forward
            ));
        }
        assert!(matches!(
            t.client_message(b'S', b"", true, &mut inject),
            Verdict::Hold
        ));
        assert!(
            matches!(
                t.client_message(b'c', b"", true, &mut inject),
                Verdict::Forward
            ),
            "CopyDone is never held"
        );
        // Its entry counts too: two answers make room for one more.
        t.server_message(b'Z', b"I");
        assert!(matches!(
            t.client_message(b'S', b"", true, &mut inject),
            Verdict::Hold
        ));
        t.server_message(b'Z', b"I");
        assert!(matches!(
            t.client_message(b'S', b"", true, &mut inject),
            Verdict::Forward
        ));
    }
}
