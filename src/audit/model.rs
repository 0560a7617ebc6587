//! The server's side of a session as far as the audit needs it: which
//! client messages the server will answer, which it will skip, and which
//! prepared statements and portals exist. Sans I/O: the tap pushes client
//! messages as they are forwarded and feeds server messages as they come
//! back; the model says which statement each outcome belongs to.
//!
//! The rules it follows are PostgreSQL's (protocol documentation and
//! `PostgresMain`):
//! - after an ErrorResponse to an extended-protocol message (Parse, Bind,
//!   Describe, Execute, Close) the server discards every message until
//!   Sync, Query and FunctionCall included; an error in a Query or a
//!   FunctionCall starts no such skip;
//! - in COPY FROM STDIN the server ignores Sync and Flush, and any message
//!   other than CopyData, CopyDone and CopyFail ends the COPY with an
//!   error without being run; outside COPY those three are dropped;
//! - Parse, Bind and Close take effect only when the server confirms them
//!   (ParseComplete, BindComplete, CloseComplete); portals end with their
//!   transaction (ReadyForQuery with status `I`); SQL PREPARE, DEALLOCATE,
//!   DISCARD, DECLARE and CLOSE share the protocol's names.
//!
//! Names are resolved when the client sends a Bind or an Execute, before
//! the server has answered what came before it. That is safe within one
//! Sync segment (if an earlier message fails, the server skips the rest of
//! the segment, the Execute included), but not across segments: so while
//! an earlier segment still has an unconfirmed Parse, Bind or Close, the
//! tap holds the Bind or Execute until it is answered ([`Model::must_wait`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use pg_query::NodeEnum;

use super::event::{OutcomeKind, SmallText, Text};
use crate::pg::messages;

/// A statement the server holds under a name.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub name: Option<Arc<[u8]>>,
    pub text: Text,
    pub refused: bool,
}

/// A portal: the statement it was bound from (`None`: not known to the
/// proxy) and its parameters when they are recorded.
#[derive(Debug, Clone)]
pub struct Portal {
    pub statement: Option<Prepared>,
    pub params: Option<Vec<Option<String>>>,
}

/// An outcome for statement `n` (part `part` of a Query); `n = 0` is an
/// error outside any statement.
#[derive(Debug, Clone)]
pub struct Answer {
    pub n: u64,
    pub part: u32,
    pub kind: OutcomeKind,
}

/// Why a statement the client sent did not run.
pub const SKIPPED: &str = "skipped: an earlier message of the same Sync failed";
pub const DURING_COPY: &str = "not run: sent during COPY FROM STDIN, the server rejects it";

/// One client message the server has not finished with, in stream order.
#[derive(Debug)]
enum Expect {
    Parse {
        seg: u64,
        name: Box<[u8]>,
        value: Prepared,
    },
    Bind {
        seg: u64,
        portal: Box<[u8]>,
        value: Portal,
    },
    Close {
        seg: u64,
        kind: u8,
        name: Box<[u8]>,
    },
    Describe,
    Execute {
        n: u64,
        text: Option<Text>,
    },
    Query {
        n: u64,
        part: u32,
        text: Text,
    },
    Function {
        n: u64,
    },
    Sync,
    /// CopyDone or CopyFail: answered by nothing, but ends a COPY.
    CopyEnd,
    /// A statement the server will not run; its outcome is written when
    /// everything before it is answered.
    NotRun {
        n: u64,
        why: &'static str,
    },
}

impl Expect {
    /// A Parse, Bind or Close: changes names when confirmed.
    fn change_seg(&self) -> Option<u64> {
        match self {
            Expect::Parse { seg, .. } | Expect::Bind { seg, .. } | Expect::Close { seg, .. } => {
                Some(*seg)
            }
            _ => None,
        }
    }

    /// The statement this message carries, if any.
    fn statement(&self) -> Option<u64> {
        match self {
            Expect::Execute { n, .. } | Expect::Query { n, .. } | Expect::Function { n } => {
                Some(*n)
            }
            _ => None,
        }
    }
}

/// A message as the tap pushes it.
#[derive(Debug)]
pub enum Sent {
    Parse { name: Box<[u8]>, value: Prepared },
    Bind { portal: Box<[u8]>, value: Portal },
    Close { kind: u8, name: Box<[u8]> },
    Describe,
    Execute { n: u64, text: Option<Text> },
    Query { n: u64, text: Text },
    Function { n: u64 },
    Sync,
    CopyEnd,
}

/// The lexing settings the server reported (ParameterStatus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lexing {
    pub standard_conforming_strings: bool,
    /// False for the client encodings whose multi-byte characters can
    /// hold a quote or backslash byte (SJIS, BIG5, GBK, UHC, GB18030,
    /// JOHAB): PostgreSQL's lexer then reads the text differently from a
    /// UTF-8 reading of the same bytes.
    pub encoding_safe: bool,
}

impl Default for Lexing {
    fn default() -> Self {
        Self {
            standard_conforming_strings: true,
            encoding_safe: true,
        }
    }
}

impl Lexing {
    /// True when the proxy reads text as the server will.
    pub fn judgeable(self) -> bool {
        self.standard_conforming_strings && self.encoding_safe
    }

    /// Takes a ParameterStatus body into account.
    pub fn observe(&mut self, body: &[u8]) {
        let mut fields = body.split(|&b| b == 0);
        let (Some(name), Some(value)) = (fields.next(), fields.next()) else {
            return;
        };
        if name.eq_ignore_ascii_case(b"standard_conforming_strings") {
            self.standard_conforming_strings = value.eq_ignore_ascii_case(b"on");
        } else if name.eq_ignore_ascii_case(b"client_encoding") {
            let v = value.to_ascii_uppercase();
            self.encoding_safe = !matches!(
                &v[..],
                b"SJIS"
                    | b"SHIFT_JIS_2004"
                    | b"BIG5"
                    | b"GBK"
                    | b"UHC"
                    | b"GB18030"
                    | b"JOHAB"
                    | b"WIN932"
                    | b"WIN936"
                    | b"WIN949"
                    | b"WIN950"
            );
        }
    }
}

/// Most named statements and portals a session may hold in the proxy's
/// maps. Past that, new ones are still forwarded but their text is not
/// kept: an Execute of one is recorded as not known, never as another.
pub const MAX_NAMES: usize = 10_000;

#[derive(Debug, Default)]
pub struct Model {
    queue: VecDeque<Expect>,
    /// What the server holds, as confirmed.
    statements: HashMap<Box<[u8]>, Prepared>,
    portals: HashMap<Box<[u8]>, Portal>,
    /// As the server will hold them once everything sent is answered.
    assumed_statements: HashMap<Box<[u8]>, Option<Prepared>>,
    assumed_portals: HashMap<Box<[u8]>, Option<Portal>>,
    /// Sync segment of the client's next message.
    seg: u64,
    /// Unconfirmed Parse/Bind/Close per segment, oldest first.
    changes: VecDeque<(u64, u32)>,
    pending_binds: usize,
    /// The end of the client's stream is inside a skip until Sync.
    skip_tail: bool,
    /// The end of the client's stream is inside COPY FROM STDIN (started
    /// by an Execute when `copy_extended`).
    copy_tail: bool,
    copy_extended: bool,
    /// Server messages that matched nothing expected (a bug if not 0).
    pub unmatched: u64,
    pub lexing: Lexing,
    /// Keep statement and portal names (off for the password guard alone,
    /// which needs only the skip and COPY states and the lexing settings).
    names: bool,
}

impl Model {
    pub fn new(lexing: Lexing, names: bool) -> Self {
        Self {
            lexing,
            names,
            ..Self::default()
        }
    }

    /// True when a Bind or Execute must wait: an earlier Sync segment
    /// still has a Parse, Bind or Close the server has not answered.
    pub fn must_wait(&self) -> bool {
        self.names
            && !self.skip_tail
            && !self.copy_tail
            && self.changes.front().is_some_and(|&(seg, _)| seg < self.seg)
    }

    /// Nothing sent is still unanswered (a Query or Sync in flight could
    /// change the lexing settings).
    pub fn idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// True when messages the client sends now are skipped by the server
    /// (an error until Sync, or inside COPY where they end it).
    pub fn discarding(&self) -> Option<&'static str> {
        if self.copy_tail {
            Some(DURING_COPY)
        } else if self.skip_tail {
            Some(SKIPPED)
        } else {
            None
        }
    }

    /// The statement a Bind names, as it will be when the Bind runs.
    pub fn statement(&self, name: &[u8]) -> Option<&Prepared> {
        self.assumed_statements.get(name)?.as_ref()
    }

    /// The portal an Execute names.
    pub fn portal(&self, name: &[u8]) -> Option<&Portal> {
        self.assumed_portals.get(name)?.as_ref()
    }

    fn count_change(&mut self) {
        match self.changes.back_mut() {
            Some((seg, n)) if *seg == self.seg => *n += 1,
            _ => self.changes.push_back((self.seg, 1)),
        }
    }

    fn retire_change(&mut self, seg: u64) {
        if let Some(i) = self.changes.iter().position(|&(s, _)| s == seg) {
            self.changes[i].1 -= 1;
            if self.changes[i].1 == 0 {
                self.changes.remove(i);
            }
        }
    }

    /// A client message, as it is forwarded. Returns the reason when the
    /// server will not run the statement it carries.
    pub fn push(&mut self, sent: Sent, out: &mut impl FnMut(Answer)) {
        if self.copy_tail {
            match sent {
                Sent::Sync => return,
                Sent::CopyEnd => {
                    self.copy_tail = false;
                    return;
                }
                other => {
                    // The message that ends the COPY with an error.
                    self.copy_tail = false;
                    self.skip_tail = self.copy_extended;
                    if let Some(n) = sent_statement(&other) {
                        self.queue.push_back(Expect::NotRun {
                            n,
                            why: DURING_COPY,
                        });
                    }
                    self.drain(out);
                    return;
                }
            }
        }
        if self.skip_tail {
            match sent {
                Sent::Sync => self.skip_tail = false,
                Sent::CopyEnd => return,
                other => {
                    if let Some(n) = sent_statement(&other) {
                        self.queue.push_back(Expect::NotRun { n, why: SKIPPED });
                    }
                    self.drain(out);
                    return;
                }
            }
        }
        let e = match sent {
            Sent::Parse { name, value } => {
                self.count_change();
                if self.names && self.assumed_statements.len() < MAX_NAMES
                    || self.assumed_statements.contains_key(&name)
                {
                    self.assumed_statements
                        .insert(name.clone(), Some(value.clone()));
                }
                Expect::Parse {
                    seg: self.seg,
                    name,
                    value,
                }
            }
            Sent::Bind { portal, value } => {
                self.count_change();
                self.pending_binds += 1;
                if self.names && self.assumed_portals.len() < MAX_NAMES
                    || self.assumed_portals.contains_key(&portal)
                {
                    self.assumed_portals
                        .insert(portal.clone(), Some(value.clone()));
                }
                Expect::Bind {
                    seg: self.seg,
                    portal,
                    value,
                }
            }
            Sent::Close { kind, name } => {
                self.count_change();
                match kind {
                    b'S' if self.names => {
                        self.assumed_statements.insert(name.clone(), None);
                    }
                    b'P' => {
                        self.pending_binds += 1;
                        if self.names {
                            self.assumed_portals.insert(name.clone(), None);
                        }
                    }
                    _ => {}
                }
                Expect::Close {
                    seg: self.seg,
                    kind,
                    name,
                }
            }
            Sent::Describe => Expect::Describe,
            Sent::Execute { n, text } => Expect::Execute { n, text },
            Sent::Query { n, text } => {
                // A Query replaces the unnamed statement and portal.
                if self.names {
                    self.assumed_statements.insert(Box::default(), None);
                    self.assumed_portals.insert(Box::default(), None);
                }
                Expect::Query { n, part: 0, text }
            }
            Sent::Function { n } => Expect::Function { n },
            Sent::Sync => {
                self.seg += 1;
                Expect::Sync
            }
            Sent::CopyEnd => Expect::CopyEnd,
        };
        self.queue.push_back(e);
        self.drain(out);
    }

    /// Writes the outcomes of statements that will not run once nothing
    /// before them is unanswered, and drops what needs no answer.
    fn drain(&mut self, out: &mut impl FnMut(Answer)) {
        while let Some(front) = self.queue.front() {
            match *front {
                Expect::CopyEnd => {}
                Expect::NotRun { n, why } => out(Answer {
                    n,
                    part: 0,
                    kind: OutcomeKind::NotRun(why),
                }),
                _ => return,
            }
            self.queue.pop_front();
        }
    }

    /// A server message (its body possibly cut to a prefix).
    pub fn server(&mut self, tag: u8, body: &[u8], out: &mut impl FnMut(Answer)) {
        self.drain(out);
        match tag {
            b'1' | b'2' | b'3' => self.confirm(tag),
            b'T' | b'n' => {
                if matches!(self.queue.front(), Some(Expect::Describe)) {
                    self.queue.pop_front();
                }
            }
            b'C' | b'I' | b's' => self.complete(tag, body, out),
            b'V' => {
                if let Some(&Expect::Function { n }) = self.queue.front() {
                    out(Answer {
                        n,
                        part: 1,
                        kind: OutcomeKind::Complete {
                            tag: SmallText::new(b"FUNCTION CALL"),
                            rows: None,
                        },
                    });
                } else {
                    self.unmatched += 1;
                }
            }
            b'E' => self.error(body, out),
            b'Z' => self.ready(body),
            b'G' => self.copy_in(),
            b'S' => self.lexing.observe(body),
            _ => {}
        }
        self.drain(out);
    }

    fn confirm(&mut self, tag: u8) {
        let matches = matches!(
            (tag, self.queue.front()),
            (b'1', Some(Expect::Parse { .. }))
                | (b'2', Some(Expect::Bind { .. }))
                | (b'3', Some(Expect::Close { .. }))
        );
        if !matches {
            self.unmatched += 1;
            return;
        }
        let Some(e) = self.queue.pop_front() else {
            return;
        };
        if let Some(seg) = e.change_seg() {
            self.retire_change(seg);
        }
        match e {
            Expect::Parse { name, value, .. }
                if self.names && self.statements.len() < MAX_NAMES
                    || self.statements.contains_key(&name) =>
            {
                self.statements.insert(name, value);
            }
            Expect::Bind { portal, value, .. } => {
                self.pending_binds -= 1;
                if self.names && self.portals.len() < MAX_NAMES
                    || self.portals.contains_key(&portal)
                {
                    self.portals.insert(portal, value);
                }
            }
            // A closed name leaves no tombstone once the server agrees.
            Expect::Close { kind, name, .. } => match kind {
                b'S' => {
                    self.statements.remove(&name);
                    if matches!(self.assumed_statements.get(&name), Some(None)) {
                        self.assumed_statements.remove(&name);
                    }
                }
                b'P' => {
                    self.pending_binds -= 1;
                    self.portals.remove(&name);
                    if matches!(self.assumed_portals.get(&name), Some(None)) {
                        self.assumed_portals.remove(&name);
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }

    fn complete(&mut self, tag: u8, body: &[u8], out: &mut impl FnMut(Answer)) {
        let kind = match tag {
            b'C' => {
                let t = messages::command_complete(body).unwrap_or(body);
                OutcomeKind::Complete {
                    tag: SmallText::new(t),
                    rows: messages::tag_rows(t),
                }
            }
            b'I' => OutcomeKind::Empty,
            _ => OutcomeKind::Complete {
                tag: SmallText::new(b"PORTAL SUSPENDED"),
                rows: None,
            },
        };
        let (n, part, text) = match self.queue.front_mut() {
            Some(Expect::Query { n, part, text }) => {
                *part += 1;
                (*n, *part, Some(text.clone()))
            }
            Some(Expect::Execute { n, text }) => {
                let r = (*n, 1, text.take());
                self.queue.pop_front();
                r
            }
            _ => {
                self.unmatched += 1;
                return;
            }
        };
        if tag == b'C' {
            let t = messages::command_complete(body).unwrap_or(body);
            if let (Some(text), Some(effect)) = (text, NameEffect::of_tag(t)) {
                self.sql_effect(effect, &text, part);
            }
        }
        out(Answer { n, part, kind });
    }

    fn error(&mut self, body: &[u8], out: &mut impl FnMut(Answer)) {
        let (code, message) = messages::error_fields(body);
        let mut sqlstate = [b'?'; 5];
        if code.len() == 5 {
            sqlstate.copy_from_slice(code);
        }
        let kind = OutcomeKind::Error {
            sqlstate,
            message: SmallText::new(message),
        };
        match self.queue.front_mut() {
            Some(Expect::Query { n, part, .. }) => {
                *part += 1;
                out(Answer {
                    n: *n,
                    part: *part,
                    kind,
                });
            }
            Some(&mut Expect::Function { n }) => out(Answer { n, part: 1, kind }),
            Some(Expect::Sync) | None => out(Answer {
                n: 0,
                part: 0,
                kind,
            }),
            Some(_) => {
                // An extended-protocol message failed: it, and everything
                // up to the next Sync, is discarded by the server.
                let Some(failed) = self.queue.pop_front() else {
                    return;
                };
                out(Answer {
                    n: failed.statement().unwrap_or(0),
                    part: u32::from(failed.statement().is_some()),
                    kind,
                });
                let mut changed = self.discard(&failed);
                while let Some(e) = self.queue.front() {
                    if matches!(e, Expect::Sync) {
                        break;
                    }
                    let Some(e) = self.queue.pop_front() else {
                        break;
                    };
                    if let Some(n) = e.statement() {
                        out(Answer {
                            n,
                            part: 0,
                            kind: OutcomeKind::NotRun(SKIPPED),
                        });
                    }
                    if let Expect::NotRun { n, why } = e {
                        out(Answer {
                            n,
                            part: 0,
                            kind: OutcomeKind::NotRun(why),
                        });
                    }
                    changed |= self.discard(&e);
                }
                if self.queue.is_empty() {
                    self.skip_tail = true;
                }
                if changed {
                    self.rebuild(true);
                }
            }
        }
    }

    /// Forgets a message the server will not run; true if it would have
    /// changed a name.
    fn discard(&mut self, e: &Expect) -> bool {
        let Some(seg) = e.change_seg() else {
            return false;
        };
        self.retire_change(seg);
        if matches!(e, Expect::Bind { .. } | Expect::Close { kind: b'P', .. }) {
            self.pending_binds -= 1;
        }
        true
    }

    /// Rebuilds the assumed names from the confirmed ones and the changes
    /// still in flight (statements too when `statements`).
    fn rebuild(&mut self, statements: bool) {
        if statements {
            self.assumed_statements = self
                .statements
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect();
        }
        self.assumed_portals = self
            .portals
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        for e in &self.queue {
            match e {
                Expect::Parse { name, value, .. } if statements => {
                    self.assumed_statements
                        .insert(name.clone(), Some(value.clone()));
                }
                Expect::Close {
                    kind: b'S', name, ..
                } if statements => {
                    self.assumed_statements.insert(name.clone(), None);
                }
                Expect::Bind { portal, value, .. } => {
                    self.assumed_portals
                        .insert(portal.clone(), Some(value.clone()));
                }
                Expect::Close {
                    kind: b'P', name, ..
                } => {
                    self.assumed_portals.insert(name.clone(), None);
                }
                Expect::Query { .. } => {
                    if statements {
                        self.assumed_statements.insert(Box::default(), None);
                    }
                    self.assumed_portals.insert(Box::default(), None);
                }
                _ => {}
            }
        }
    }

    fn ready(&mut self, body: &[u8]) {
        loop {
            match self.queue.pop_front() {
                Some(Expect::Query { .. }) => {
                    // The server dropped the unnamed statement and portal
                    // when it ran the Query.
                    self.statements.remove(&b""[..]);
                    self.portals.remove(&b""[..]);
                    if matches!(self.assumed_statements.get(&b""[..]), Some(None)) {
                        self.assumed_statements.remove(&b""[..]);
                    }
                    if matches!(self.assumed_portals.get(&b""[..]), Some(None)) {
                        self.assumed_portals.remove(&b""[..]);
                    }
                    break;
                }
                Some(Expect::Sync | Expect::Function { .. }) => break,
                None => {
                    self.unmatched += 1;
                    break;
                }
                Some(e) => {
                    // Answered by nothing: the model lost track.
                    self.unmatched += 1;
                    self.discard(&e);
                }
            }
        }
        // Outside a transaction block no portal survives.
        if body.first() == Some(&b'I') {
            self.portals.clear();
            if self.pending_binds == 0 {
                self.assumed_portals.clear();
            } else {
                self.rebuild(false);
            }
        }
    }

    /// CopyInResponse: the front message started COPY FROM STDIN. Reads
    /// what the client already sent after it the way the server will.
    fn copy_in(&mut self) {
        let extended = match self.queue.front() {
            Some(Expect::Query { .. }) => false,
            Some(Expect::Execute { .. }) => true,
            _ => {
                self.unmatched += 1;
                return;
            }
        };
        // What follows the COPY: index 1, again after each removal.
        while let Some(next) = self.queue.get(1) {
            match next {
                // Ignored by the server during COPY.
                Expect::Sync => {
                    self.queue.remove(1);
                }
                Expect::CopyEnd => {
                    self.queue.remove(1);
                    return;
                }
                // The message that ends the COPY with an error.
                _ => {
                    if let Some(e) = self.queue.remove(1) {
                        let changed = self.discard(&e);
                        if let Some(n) = e.statement() {
                            let why = DURING_COPY;
                            self.queue.insert(1, Expect::NotRun { n, why });
                        }
                        if changed {
                            self.rebuild(true);
                        }
                    }
                    return;
                }
            }
        }
        self.copy_tail = true;
        self.copy_extended = extended;
    }

    /// Applies a SQL PREPARE, DEALLOCATE, DISCARD, DECLARE or CLOSE that
    /// completed as part `part` of `text`.
    fn sql_effect(&mut self, effect: NameEffect, text: &Text, part: u32) {
        // Parsed here, on the event loop: only text short enough to take
        // well under a millisecond; longer text counts as unreadable.
        let found = (text.full_sha256.is_none()
            && text.bytes.len() <= super::limits::INLINE_PARSE_LIMIT)
            .then(|| std::str::from_utf8(&text.bytes).ok())
            .flatten()
            .and_then(|sql| sql_name_effect(sql, part));
        match found {
            Some(Named::Prepare(name, sql)) => {
                let value = Prepared {
                    name: (!name.is_empty()).then(|| Arc::from(name.as_bytes())),
                    text: Text::capture(sql.as_bytes(), usize::MAX),
                    refused: false,
                };
                if self.statements.len() < MAX_NAMES {
                    self.statements.insert(name.into_bytes().into(), value);
                }
            }
            Some(Named::Deallocate(Some(name))) => {
                self.statements.remove(name.as_bytes());
            }
            Some(Named::Declare(name, sql)) => {
                let value = Portal {
                    statement: Some(Prepared {
                        name: None,
                        text: Text::capture(sql.as_bytes(), usize::MAX),
                        refused: false,
                    }),
                    params: None,
                };
                if self.portals.len() < MAX_NAMES {
                    self.portals.insert(name.into_bytes().into(), value);
                }
            }
            Some(Named::ClosePortal(Some(name))) => {
                self.portals.remove(name.as_bytes());
            }
            Some(Named::Deallocate(None)) => self.statements.clear(),
            Some(Named::ClosePortal(None)) => self.portals.clear(),
            Some(Named::DiscardAll) => {
                self.statements.clear();
                self.portals.clear();
            }
            // Text the proxy cannot read (cut, or not what the tag says):
            // forget what the effect could have touched, so nothing is
            // recorded under a stale name.
            None => match effect {
                NameEffect::Statements => self.statements.clear(),
                NameEffect::Portals => self.portals.clear(),
                NameEffect::All => {
                    self.statements.clear();
                    self.portals.clear();
                }
            },
        }
        self.rebuild(true);
    }

    /// Entries held (for bounds and tests).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

fn sent_statement(s: &Sent) -> Option<u64> {
    match s {
        Sent::Execute { n, .. } | Sent::Query { n, .. } | Sent::Function { n } => Some(*n),
        _ => None,
    }
}

/// Which names a completed SQL command may have changed, by its tag.
#[derive(Debug, Clone, Copy)]
enum NameEffect {
    Statements,
    Portals,
    All,
}

impl NameEffect {
    fn of_tag(tag: &[u8]) -> Option<Self> {
        match tag {
            b"PREPARE" | b"DEALLOCATE" | b"DEALLOCATE ALL" => Some(NameEffect::Statements),
            b"DECLARE CURSOR" | b"CLOSE CURSOR" | b"CLOSE CURSOR ALL" => Some(NameEffect::Portals),
            b"DISCARD ALL" => Some(NameEffect::All),
            _ => None,
        }
    }
}

enum Named {
    Prepare(String, String),
    Deallocate(Option<String>),
    Declare(String, String),
    ClosePortal(Option<String>),
    DiscardAll,
}

/// Reads statement `part` (1-based) of `sql` with PostgreSQL's parser.
fn sql_name_effect(sql: &str, part: u32) -> Option<Named> {
    let parsed = pg_query::parse(sql).ok()?;
    let raw = parsed.protobuf.stmts.get(part.checked_sub(1)? as usize)?;
    let start = usize::try_from(raw.stmt_location).ok()?;
    let len = usize::try_from(raw.stmt_len).ok()?;
    let own = match len {
        0 => sql.get(start..)?,
        _ => sql.get(start..start + len)?,
    }
    .trim()
    .to_owned();
    Some(match raw.stmt.as_ref()?.node.as_ref()? {
        NodeEnum::PrepareStmt(s) => Named::Prepare(s.name.clone(), own),
        NodeEnum::DeallocateStmt(s) if s.name.is_empty() => Named::Deallocate(None),
        NodeEnum::DeallocateStmt(s) => Named::Deallocate(Some(s.name.clone())),
        NodeEnum::DeclareCursorStmt(s) => Named::Declare(s.portalname.clone(), own),
        NodeEnum::ClosePortalStmt(s) if s.portalname.is_empty() => Named::ClosePortal(None),
        NodeEnum::ClosePortalStmt(s) => Named::ClosePortal(Some(s.portalname.clone())),
        NodeEnum::DiscardStmt(s)
            if s.target == pg_query::protobuf::DiscardMode::DiscardAll as i32 =>
        {
            Named::DiscardAll
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model with names, and the answers it gave, as `(n, part, what)`.
    struct Run {
        m: Model,
        answers: Vec<(u64, u32, String)>,
    }

    fn prepared(text: &str) -> Prepared {
        Prepared {
            name: None,
            text: Text::capture(text.as_bytes(), usize::MAX),
            refused: false,
        }
    }

    impl Run {
        fn new() -> Self {
            Run {
                m: Model::new(Lexing::default(), true),
                answers: Vec::new(),
            }
        }
        fn answer(a: Answer) -> (u64, u32, String) {
            let what = match a.kind {
                OutcomeKind::Complete { tag, .. } => String::from_utf8_lossy(tag.as_bytes()).into(),
                OutcomeKind::Empty => "empty".into(),
                OutcomeKind::Error { sqlstate, .. } => String::from_utf8_lossy(&sqlstate).into(),
                OutcomeKind::NotRun(why) if why == SKIPPED => "skipped".into(),
                OutcomeKind::NotRun(_) => "not run".into(),
            };
            (a.n, a.part, what)
        }
        fn push(&mut self, s: Sent) {
            let answers = &mut self.answers;
            self.m.push(s, &mut |a| answers.push(Self::answer(a)));
        }
        fn server(&mut self, tag: u8, body: &[u8]) {
            let answers = &mut self.answers;
            self.m
                .server(tag, body, &mut |a| answers.push(Self::answer(a)));
        }
        fn parse(&mut self, name: &str, text: &str) {
            self.push(Sent::Parse {
                name: name.as_bytes().into(),
                value: prepared(text),
            });
        }
        fn bind(&mut self, portal: &str, statement: &str) {
            let value = Portal {
                statement: self.m.statement(statement.as_bytes()).cloned(),
                params: None,
            };
            self.push(Sent::Bind {
                portal: portal.as_bytes().into(),
                value,
            });
        }
        /// An Execute of `portal`: the text the tap would record.
        fn execute(&mut self, n: u64, portal: &str) -> Option<String> {
            let text = self
                .m
                .portal(portal.as_bytes())
                .and_then(|p| p.statement.as_ref())
                .map(|p| String::from_utf8_lossy(&p.text.bytes).into_owned());
            self.push(Sent::Execute { n, text: None });
            text
        }
        fn query(&mut self, n: u64, text: &str) {
            self.push(Sent::Query {
                n,
                text: Text::capture(text.as_bytes(), usize::MAX),
            });
        }
        fn error(&mut self, code: &str) {
            self.server(b'E', format!("SERROR\0C{code}\0Mx\0\0").as_bytes());
        }
        fn complete(&mut self, tag: &str) {
            self.server(b'C', format!("{tag}\0").as_bytes());
        }
    }

    /// Scenario 1 of the audit-fidelity issue: a Parse the server skipped
    /// after an error does not replace the statement it holds under that
    /// name, whether the error was a failed Bind or a duplicate name.
    #[test]
    fn a_skipped_parse_does_not_rename() {
        for first_error in ["bind", "duplicate"] {
            let mut r = Run::new();
            r.parse("s1", "DELETE FROM payroll");
            if first_error == "bind" {
                r.bind("", "nope");
            } else {
                r.parse("s1", "DELETE FROM payroll");
            }
            r.parse("s1", "SELECT 1");
            r.push(Sent::Sync);
            r.server(b'1', b"");
            r.error(if first_error == "bind" {
                "26000"
            } else {
                "42P05"
            });
            r.server(b'Z', b"I");
            r.bind("", "s1");
            assert_eq!(r.execute(1, "").as_deref(), Some("DELETE FROM payroll"));
            r.push(Sent::Sync);
            r.server(b'2', b"");
            r.complete("DELETE 3");
            r.server(b'Z', b"I");
            assert_eq!(r.answers.last().unwrap(), &(1, 1, "DELETE 3".to_owned()));
            assert_eq!(r.m.queued(), 0);
            assert_eq!(r.m.unmatched, 0);
        }
    }

    /// The same sequence pipelined in one write: the second segment's
    /// Bind must wait, because the first segment's Parse is unanswered.
    #[test]
    fn a_bind_after_an_unanswered_segment_waits() {
        let mut r = Run::new();
        r.parse("s1", "DELETE FROM payroll");
        r.bind("", "nope");
        r.parse("s1", "SELECT 1");
        r.push(Sent::Sync);
        assert!(r.m.must_wait(), "Bind of the next segment must wait");
        r.server(b'1', b"");
        assert!(r.m.must_wait());
        r.error("26000");
        assert!(!r.m.must_wait());
        r.server(b'Z', b"I");
        r.bind("", "s1");
        assert_eq!(r.execute(1, "").as_deref(), Some("DELETE FROM payroll"));
        // Within one segment nothing waits: a failure skips the Execute.
        r.parse("s2", "SELECT 2");
        r.bind("", "s2");
        assert!(!r.m.must_wait());
    }

    /// Scenario 2: `Bind(nope) Query Sync`: the Query is skipped, gets a
    /// not-run outcome, and later outcomes land on their own statements.
    #[test]
    fn outcomes_do_not_shift_after_a_skip() {
        let mut r = Run::new();
        r.bind("", "nope");
        r.query(1, "SELECT 1");
        r.push(Sent::Sync);
        r.query(2, "SELECT 2");
        r.error("26000");
        r.server(b'Z', b"I");
        r.complete("SELECT 1");
        r.server(b'Z', b"I");
        assert_eq!(
            r.answers,
            [
                (0, 0, "26000".to_owned()),
                (1, 0, "skipped".to_owned()),
                (2, 1, "SELECT 1".to_owned())
            ]
        );
        assert_eq!(r.m.unmatched, 0);
    }

    /// A skip that reaches the end of what was sent goes on for messages
    /// the client sends later, until its Sync.
    #[test]
    fn a_skip_continues_into_later_messages() {
        let mut r = Run::new();
        r.parse("", "SELEC 1");
        r.error("42601");
        r.bind("", "");
        r.execute(1, "");
        r.query(2, "SELECT 2");
        r.push(Sent::Sync);
        r.server(b'Z', b"I");
        r.query(3, "SELECT 3");
        r.complete("SELECT 1");
        r.server(b'Z', b"I");
        let got: Vec<_> = r.answers.iter().map(|a| (a.0, a.2.as_str())).collect();
        assert_eq!(
            got,
            [
                (0, "42601"),
                (1, "skipped"),
                (2, "skipped"),
                (3, "SELECT 1")
            ]
        );
    }

    /// An error in a simple Query starts no skip; later parts do not run.
    #[test]
    fn a_query_error_skips_nothing_after_its_ready() {
        let mut r = Run::new();
        r.query(1, "select 1; select 1/0; select 3");
        r.query(2, "select 4");
        r.complete("SELECT 1");
        r.error("22012");
        r.server(b'Z', b"I");
        r.complete("SELECT 1");
        r.server(b'Z', b"I");
        assert_eq!(
            r.answers,
            [
                (1, 1, "SELECT 1".to_owned()),
                (1, 2, "22012".to_owned()),
                (2, 1, "SELECT 1".to_owned())
            ]
        );
    }

    /// COPY FROM STDIN: Syncs inside it are ignored; a Query sent inside
    /// it is not a statement (the server rejects it and ends the COPY).
    #[test]
    fn copy_in_reads_the_client_stream_as_the_server_does() {
        // Data, then a Query the client sent before CopyDone.
        let mut r = Run::new();
        r.query(1, "COPY t FROM STDIN");
        r.query(2, "DELETE FROM payroll");
        r.push(Sent::CopyEnd);
        r.query(3, "SELECT 3");
        r.server(b'G', b"");
        r.error("08P01");
        r.server(b'Z', b"I");
        r.complete("SELECT 1");
        r.server(b'Z', b"I");
        let got: Vec<_> = r.answers.iter().map(|a| (a.0, a.2.as_str())).collect();
        assert_eq!(got, [(1, "08P01"), (2, "not run"), (3, "SELECT 1")]);
        assert_eq!(r.m.unmatched, 0);

        // COPY known before the client's next messages arrive; extended
        // protocol with a Sync sent before the data (libpq does this).
        let mut r = Run::new();
        r.parse("", "COPY t FROM STDIN");
        r.bind("", "");
        r.execute(1, "");
        r.push(Sent::Sync);
        r.server(b'1', b"");
        r.server(b'2', b"");
        r.server(b'G', b"");
        r.push(Sent::CopyEnd);
        r.push(Sent::Sync);
        r.complete("COPY 2");
        r.server(b'Z', b"I");
        r.query(2, "SELECT 2");
        r.complete("SELECT 1");
        r.server(b'Z', b"I");
        let got: Vec<_> = r.answers.iter().map(|a| (a.0, a.2.as_str())).collect();
        assert_eq!(got, [(1, "COPY 2"), (2, "SELECT 1")]);
        assert_eq!((r.m.unmatched, r.m.queued()), (0, 0));

        // In the tail: a Query during a COPY the server already started.
        let mut r = Run::new();
        r.query(1, "COPY t FROM STDIN");
        r.server(b'G', b"");
        r.push(Sent::Sync);
        r.query(2, "DROP TABLE t");
        r.error("08P01");
        r.server(b'Z', b"I");
        r.push(Sent::CopyEnd);
        let got: Vec<_> = r.answers.iter().map(|a| (a.0, a.2.as_str())).collect();
        assert_eq!(got, [(1, "08P01"), (2, "not run")]);
        assert_eq!((r.m.unmatched, r.m.queued()), (0, 0));
    }

    /// Portals end with their transaction; SQL PREPARE, DEALLOCATE and
    /// DECLARE change the same names as the protocol.
    #[test]
    fn sql_names_and_transaction_ends_are_followed() {
        let mut r = Run::new();
        r.parse("s1", "SELECT 1");
        r.bind("p1", "s1");
        r.push(Sent::Sync);
        r.server(b'1', b"");
        r.server(b'2', b"");
        r.server(b'Z', b"I");
        assert!(
            r.m.portal(b"p1").is_none(),
            "portal outlived its transaction"
        );
        r.query(1, "DEALLOCATE s1; PREPARE s1 AS DELETE FROM payroll");
        r.complete("DEALLOCATE");
        r.complete("PREPARE");
        r.server(b'Z', b"I");
        r.bind("", "s1");
        assert_eq!(
            r.execute(2, "").as_deref(),
            Some("PREPARE s1 AS DELETE FROM payroll")
        );
        r.push(Sent::Sync);
        r.server(b'2', b"");
        r.complete("DELETE 1");
        r.server(b'Z', b"I");
        r.query(3, "BEGIN; DECLARE c CURSOR FOR SELECT secret FROM t");
        r.complete("BEGIN");
        r.complete("DECLARE CURSOR");
        r.server(b'Z', b"T");
        assert_eq!(
            r.execute(4, "c").as_deref(),
            Some("DECLARE c CURSOR FOR SELECT secret FROM t")
        );
        r.query(5, "DISCARD ALL");
        r.complete("SELECT 1");
        r.complete("DISCARD ALL");
        r.server(b'Z', b"I");
        assert!(r.m.statement(b"s1").is_none());
        assert_eq!(r.m.unmatched, 0);
    }

    /// A simple Query drops the unnamed statement and portal: an Execute
    /// of the unnamed portal after it is not the earlier Bind's.
    #[test]
    fn a_query_replaces_the_unnamed_statement_and_portal() {
        let mut r = Run::new();
        r.query(1, "BEGIN");
        r.parse("", "DELETE FROM payroll");
        r.bind("", "");
        r.query(2, "SELECT 1");
        assert_eq!(r.execute(3, ""), None);
        r.bind("", "");
        assert_eq!(r.execute(4, ""), None);
        r.push(Sent::Sync);
        r.complete("BEGIN");
        r.server(b'Z', b"T");
        r.server(b'1', b"");
        r.server(b'2', b"");
        r.complete("SELECT 1");
        r.server(b'Z', b"T");
        assert!(r.m.statement(b"").is_none());
        assert!(r.m.portal(b"").is_some_and(|p| p.statement.is_none()));
        assert_eq!(r.m.unmatched, 0);
    }

    /// Names closed and confirmed leave nothing behind, and the maps stop
    /// growing at their bound without recording a wrong text.
    #[test]
    fn names_are_bounded() {
        let mut r = Run::new();
        for i in 0..100 {
            let name = format!("s{i}");
            r.parse(&name, "select 1");
            r.push(Sent::Close {
                kind: b'S',
                name: name.as_bytes().into(),
            });
            r.push(Sent::Sync);
            r.server(b'1', b"");
            r.server(b'3', b"");
            r.server(b'Z', b"I");
        }
        assert_eq!(r.m.assumed_statements.len(), 0);
        assert_eq!(r.m.statements.len(), 0);
        for i in 0..MAX_NAMES + 5 {
            r.parse(&format!("k{i}"), "select 1");
            r.server(b'1', b"");
        }
        assert_eq!(r.m.statements.len(), MAX_NAMES);
        assert!(
            r.m.statement(format!("k{}", MAX_NAMES + 1).as_bytes())
                .is_none()
        );
    }
}
