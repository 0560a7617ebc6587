//! One session's view of its statements: what the client asked to run
//! (with prepared statements and portals resolved to their text), what the
//! server answered, and the password guard's verdicts.
//!
//! The forwarding pump calls [`SessionTap::client_message`] for each
//! inspected client message before forwarding it and
//! [`SessionTap::server_message`] for each inspected server message. State
//! is a few maps and one queue, reused for the whole session.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::oneshot;

use super::event::{Event, Outcome, OutcomeKind, Protocol, SmallText, Statement, Text};
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
}

/// The SQL sent in place of a refused password change: the server raises
/// the error itself, so it arrives in order with everything pipelined
/// before and after it, and the transaction state is exactly the one an
/// error in that statement would leave.
pub const GUARD_SQL: &str = "DO $rds_iam_proxy$BEGIN RAISE EXCEPTION USING ERRCODE = '42501', \
    MESSAGE = 'password changes are not allowed through rds-iam-proxy', \
    HINT = 'IAM authentication is the only way in; passwords stay unset.'; END$rds_iam_proxy$";

/// Sent in place of a statement whose audit record could not be written
/// in synchronous mode.
pub const SINK_FAILED_SQL: &str = "DO $rds_iam_proxy$BEGIN RAISE EXCEPTION USING ERRCODE = '58030', \
    MESSAGE = 'statement refused: rds-iam-proxy cannot write its audit log', \
    HINT = 'the proxy audits synchronously and fails closed; the operator must check the audit directory (disk full?)'; END$rds_iam_proxy$";

pub const SINK_FAILED_FATAL: &str =
    "rds-iam-proxy cannot write its audit log and audits synchronously: the session is closed";

#[derive(Debug, Clone)]
struct Prepared {
    name: Option<Arc<[u8]>>,
    text: Text,
    refused: bool,
}

#[derive(Debug, Clone)]
struct Portal {
    statement: Option<Prepared>,
    params: Option<Vec<Option<String>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// A Query: outcomes count parts until ReadyForQuery.
    Simple {
        n: u64,
        part: u32,
    },
    /// An Execute: one outcome, or none if an earlier error discarded it.
    Exec {
        n: u64,
    },
    Function {
        n: u64,
    },
    Sync,
}

/// Per-session audit state.
#[derive(Debug)]
pub struct SessionTap {
    conn: u64,
    auditor: Arc<Auditor>,
    n: u64,
    statements: HashMap<Box<[u8]>, Prepared>,
    unnamed: Option<Prepared>,
    portals: HashMap<Box<[u8]>, Portal>,
    unnamed_portal: Option<Portal>,
    pending: VecDeque<Pending>,
    /// Refused statements (for the session end and tests).
    pub refused: u64,
}

impl SessionTap {
    pub fn new(conn: u64, auditor: Arc<Auditor>) -> Self {
        Self {
            conn,
            auditor,
            n: 0,
            statements: HashMap::new(),
            unnamed: None,
            portals: HashMap::new(),
            unnamed_portal: None,
            pending: VecDeque::with_capacity(64),
            refused: 0,
        }
    }

    /// True when records are written (not only the guard).
    pub fn logs(&self) -> bool {
        self.logging()
    }

    fn logging(&self) -> bool {
        self.auditor.sink.is_some()
    }

    fn guard_refuses(&self, text: &[u8]) -> bool {
        self.auditor.config.password_guard && redact::is_password_change(text)
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
        }
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
        match tag {
            b'Q' => {
                let Ok(text) = messages::query(body) else {
                    return Verdict::Forward;
                };
                let refuse = self.guard_refuses(text);
                if refuse {
                    self.refused += 1;
                }
                // With the guard alone nothing reads the text or the
                // outcomes (the pump feeds server messages only when
                // logging), so nothing is recorded or queued.
                let wait = if self.logging() {
                    let mut st = self.statement(Protocol::Simple, Text::capture(text, cap));
                    if refuse {
                        st.refused = Some("password change");
                    }
                    let n = st.n;
                    let wait = self.emit(st);
                    self.pending.push_back(Pending::Simple { n, part: 0 });
                    wait
                } else {
                    None
                };
                if refuse {
                    inject.clear();
                    messages::write_query(inject, GUARD_SQL);
                    return Verdict::Replace;
                }
                wait.map_or(Verdict::Forward, Verdict::Wait)
            }
            b'P' => {
                let Ok((name, text)) = messages::parse(body) else {
                    return Verdict::Forward;
                };
                let refused = self.guard_refuses(text);
                if self.logging() || refused {
                    let prepared = Prepared {
                        name: (!name.is_empty()).then(|| Arc::from(name)),
                        text: Text::capture(text, cap),
                        refused,
                    };
                    if name.is_empty() {
                        self.unnamed = Some(prepared);
                    } else {
                        self.statements.insert(name.into(), prepared);
                    }
                }
                if refused {
                    self.refused += 1;
                    inject.clear();
                    messages::write_parse(inject, name, GUARD_SQL);
                    return Verdict::Replace;
                }
                Verdict::Forward
            }
            b'B' if self.logging() => {
                if let Ok(b) = messages::bind(body) {
                    let statement = if b.statement.is_empty() {
                        self.unnamed.clone()
                    } else {
                        self.statements.get(b.statement).cloned()
                    };
                    let params = self.auditor.config.parameters.then(|| {
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
                    });
                    let portal = Portal { statement, params };
                    if b.portal.is_empty() {
                        self.unnamed_portal = Some(portal);
                    } else {
                        self.portals.insert(b.portal.into(), portal);
                    }
                }
                Verdict::Forward
            }
            b'E' if self.logging() => {
                let portal = match messages::execute(body) {
                    Ok([]) => self.unnamed_portal.clone(),
                    Ok(p) => self.portals.get(p).cloned(),
                    Err(_) => None,
                };
                let (prepared, params) = match portal {
                    Some(Portal { statement, params }) => (statement, params),
                    None => (None, None),
                };
                let text = match &prepared {
                    Some(p) => p.text.clone(),
                    None => Text::capture(b"<unknown portal>", cap),
                };
                let mut st = self.statement(Protocol::Extended, text);
                if let Some(p) = &prepared {
                    st.name = p.name.clone();
                    if p.refused {
                        st.refused = Some("password change");
                    }
                }
                st.params = params;
                let n = st.n;
                self.pending.push_back(Pending::Exec { n });
                self.emit(st).map_or(Verdict::Forward, Verdict::Wait)
            }
            b'F' if self.logging() => {
                let mut st = self.statement(Protocol::Function, Text::capture(b"", cap));
                st.function_oid = messages::function_call(body).ok();
                let n = st.n;
                self.pending.push_back(Pending::Function { n });
                self.emit(st).map_or(Verdict::Forward, Verdict::Wait)
            }
            b'C' if self.logging() => {
                if let Ok((kind, name)) = messages::close(body) {
                    match (kind, name.is_empty()) {
                        (b'S', true) => self.unnamed = None,
                        (b'S', false) => {
                            self.statements.remove(name);
                        }
                        (b'P', true) => self.unnamed_portal = None,
                        (b'P', false) => {
                            self.portals.remove(name);
                        }
                        _ => {}
                    }
                }
                Verdict::Forward
            }
            b'S' if self.logging() => {
                self.pending.push_back(Pending::Sync);
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
        let Some(sink) = self.auditor.sink.as_ref() else {
            return;
        };
        let result = match tag {
            b'C' => {
                let t = messages::command_complete(body).unwrap_or(body);
                OutcomeKind::Complete {
                    tag: SmallText::new(t),
                    rows: messages::tag_rows(t),
                }
            }
            b'I' => OutcomeKind::Empty,
            b'V' => OutcomeKind::Complete {
                tag: SmallText::new(b"FUNCTION CALL"),
                rows: None,
            },
            b's' => OutcomeKind::Complete {
                tag: SmallText::new(b"PORTAL SUSPENDED"),
                rows: None,
            },
            b'E' => {
                let (code, message) = messages::error_fields(body);
                let mut sqlstate = [b'?'; 5];
                if code.len() == 5 {
                    sqlstate.copy_from_slice(code);
                }
                OutcomeKind::Error {
                    sqlstate,
                    message: SmallText::new(message),
                }
            }
            b'Z' => {
                // Everything up to the Sync, Query or FunctionCall this
                // answers is finished; Executes still queued were
                // discarded after an error.
                while let Some(p) = self.pending.pop_front() {
                    if !matches!(p, Pending::Exec { .. }) {
                        break;
                    }
                }
                return;
            }
            _ => return,
        };
        let is_error = matches!(result, OutcomeKind::Error { .. });
        let (n, part) = match self.pending.front_mut() {
            Some(Pending::Simple { n, part }) => {
                *part += 1;
                (*n, *part)
            }
            Some(&mut Pending::Exec { n }) => {
                self.pending.pop_front();
                if is_error {
                    // The server skips the rest until Sync: those Executes
                    // get no outcome.
                    while matches!(self.pending.front(), Some(Pending::Exec { .. })) {
                        self.pending.pop_front();
                    }
                }
                (n, 1)
            }
            Some(&mut Pending::Function { n }) => (n, 1),
            // An error outside any statement (e.g. a Bind error before
            // Sync with no Execute, or a FATAL): recorded with n = 0.
            _ if is_error => (0, 0),
            _ => return,
        };
        sink.push(Event::Outcome(Box::new(Outcome {
            conn: self.conn,
            time: SystemTime::now(),
            n,
            part,
            result,
        })));
    }
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
        let auditor = Arc::new(Auditor {
            config: AuditConfig::default(),
            sink: None,
        });
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
        q.clear();
        messages::write_query(&mut q, "select 1; ALTER USER me PASSWORD 'SCRAM-SHA-256$x'");
        assert!(matches!(
            t.client_message(b'Q', &q[5..], true, &mut inject),
            Verdict::Replace
        ));
        let mut expect = Vec::new();
        messages::write_query(&mut expect, GUARD_SQL);
        assert_eq!(inject, expect);
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

    /// The guard alone keeps no state per statement: a long session of
    /// simple queries must not grow the outcome queue nobody drains.
    #[test]
    fn guard_alone_keeps_nothing_per_statement() {
        let mut t = tap();
        let mut inject = Vec::new();
        let mut q = Vec::new();
        messages::write_query(&mut q, "select 1");
        for _ in 0..10_000 {
            assert!(matches!(
                t.client_message(b'Q', &q[5..], true, &mut inject),
                Verdict::Forward
            ));
        }
        assert_eq!(t.pending.len(), 0);
        assert_eq!(t.n, 0);
        assert!(inject.is_empty());
    }
}
