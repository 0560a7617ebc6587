//! One session's audit tap (src/audit/tap.rs and the model behind it, in
//! src/audit/model.rs) fed the way the forwarding pump (src/gate.rs) feeds
//! it: client bytes framed and judged message by message before they
//! would be forwarded, server bytes through the same `Capture` the pump
//! runs, the two directions interleaved as the input says.
//!
//! Input: byte 0 holds the settings (bits 0-1: guard only, async or sync
//! audit; bit 2: password guard off; bit 3: parameters logged; bit 4:
//! statement text cut at 64 bytes; bit 5: the first server chunk is the
//! login greeting; bit 6: the memory for long statements is spent). Then
//! chunks: one byte (bit 7: from the server, else from the client; bits
//! 0-6: length) and that many bytes.
//!
//! Auditing uses the crate's own writer, started in a temporary directory
//! and closed at once: records are built as in production and refused by
//! the closed queue, so nothing grows on disk, and a synchronous wait is
//! answered "not written" at once (its path: `sink_failed`).
//!
//! Checks, beyond no panic:
//! - the tap never ends a session from `client_message` (only a failed
//!   synchronous record does, through `sink_failed`);
//! - only a password-mentioning Query or Parse is ever replaced or held
//!   (Bind and Execute may be held too, waiting for names), and only with
//!   the guard on; a wait happens only in synchronous mode and is answered
//!   at once by the closed writer;
//! - every replacement is one whole message of the tag it replaces,
//!   carrying one of the tap's own refusal statements, and a replaced
//!   Parse keeps the client's statement name;
//! - `refused` counts exactly the replacements;
//! - what the writer does with a statement's text (split it into
//!   statements, redact each) stays inside the text and redacting twice
//!   changes nothing more.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rds_iam_proxy::audit::limits::Limits;
use rds_iam_proxy::audit::tap::{
    GUARD_SQL, GUARD_UNREADABLE_SQL, Refusal, SINK_FAILED_SQL, Verdict,
};
use rds_iam_proxy::audit::{AuditConfig, Auditor, Mode, SessionTap, Sink, WriterConfig, redact};
use rds_iam_proxy::forward::BUF_SIZE;
use rds_iam_proxy::gate::{HOLD_LIMIT, SERVER_PREFIX, bytes_to_judge, server_wanted};
use rds_iam_proxy::pg::frame::{HEADER_LEN, MAX_CLIENT_MESSAGE, parse_header, split_frame};
use rds_iam_proxy::pg::messages::{self, Capture};

/// The crate's audit writer, started once and closed at once.
fn closed_sink() -> Arc<Sink> {
    static SINK: OnceLock<Arc<Sink>> = OnceLock::new();
    SINK.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("rds-iam-proxy-fuzz-audit-{}", std::process::id()));
        let sink = Sink::start(WriterConfig {
            dir: dir.clone(),
            rotate_bytes: 1 << 20,
            rotate_age: Duration::from_secs(3600),
            queue_capacity: 16,
            parameters: true,
            settings: "fuzz".into(),
            rotated: None,
        })
        .expect("audit writer starts in the temp dir");
        sink.close();
        let _ = std::fs::remove_dir_all(&dir);
        sink
    })
    .clone()
}

struct Setup {
    mode: Mode,
    guard: bool,
    greeting: bool,
    no_budget: bool,
}

fn auditor(settings: u8) -> (Arc<Auditor>, Setup) {
    let mode = match settings & 3 {
        0 => Mode::Off,
        1 | 3 => Mode::Async,
        _ => Mode::Sync,
    };
    let guard = settings & 4 == 0;
    let config = AuditConfig {
        mode,
        password_guard: guard,
        parameters: settings & 8 != 0,
        max_statement_bytes: if settings & 16 != 0 { 64 } else { 64 * 1024 },
        ..AuditConfig::default()
    };
    let sink = (mode != Mode::Off).then(closed_sink);
    let auditor = Arc::new(Auditor::from_parts(config, sink, Limits::default()));
    let setup = Setup {
        mode,
        guard,
        greeting: settings & 32 != 0,
        no_budget: settings & 64 != 0,
    };
    (auditor, setup)
}

/// The session is over (a framing error, or the tap closed it).
struct End;

/// The client -> server side of the gate, sans I/O.
struct Client {
    /// Bytes not yet decided on.
    buf: Vec<u8>,
    /// Bytes of the current message to pass untouched.
    stream_left: usize,
    /// Bytes of the current (replaced) message to drop.
    skip_left: usize,
    /// Waiting for the server to answer more.
    held: bool,
    inject: Vec<u8>,
    /// Replacements seen: what `refused` must count.
    refused: u64,
}

/// The single whole message in `inject`.
fn injected(inject: &[u8], tag: u8) -> &[u8] {
    let (h, body) = split_frame(inject, MAX_CLIENT_MESSAGE)
        .expect("replacement has a valid header")
        .expect("replacement is whole");
    assert_eq!(h.tag, tag, "replacement of another type");
    assert_eq!(
        h.frame_len(),
        inject.len(),
        "replacement has trailing bytes"
    );
    body
}

/// The statement text of a Query or Parse body and the Parse's name.
fn statement(tag: u8, body: &[u8]) -> Option<(&[u8], &[u8])> {
    if tag == b'Q' {
        messages::query(body).ok().map(|t| (&b""[..], t))
    } else {
        messages::parse(body).ok()
    }
}

/// What the writer does with a statement's text before it is logged.
fn writer_view(text: &[u8]) {
    let mut parts = Vec::new();
    redact::split(text, &mut parts);
    let mut last = 0;
    for &(start, end) in &parts {
        assert!(
            last <= start && start <= end && end <= text.len(),
            "{parts:?}"
        );
        last = end;
    }
    if parts.is_empty() {
        parts.push((0, text.len()));
    }
    for (start, end) in parts {
        let part = &text[start..end];
        let once = redact::redact_as(part, true);
        if !redact::mentions_password(part) && !redact::mentions_postgres_uri(part) {
            assert!(!once.is_redacted());
        }
        if let redact::Shown::Redacted(r) = &once
            && r != redact::WITHHELD
        {
            let twice = redact::redact(r.as_bytes());
            assert_eq!(
                twice.as_ref(),
                r.as_bytes(),
                "redacting the redacted text changes it again"
            );
        }
        let _ = redact::redact_as(part, false);
    }
}

impl Client {
    fn refuse(&mut self, tap: &mut SessionTap, tag: u8, frame_len: usize, why: Refusal) {
        let prefix = &self.buf[HEADER_LEN.min(self.buf.len())..];
        tap.refuse_long(tag, prefix, frame_len, why, &mut self.inject);
        self.refused += 1;
        let body = injected(&self.inject, tag);
        let (name, text) = statement(tag, body).expect("refusal is a Query or Parse");
        let code: &[u8] = match why {
            Refusal::TooLong => b"'54000'",
            Refusal::NoMemory => b"'53000'",
        };
        assert!(text.windows(code.len()).any(|w| w == code));
        if tag == b'P' {
            let want = prefix
                .iter()
                .position(|&b| b == 0)
                .map_or(&b""[..], |end| &prefix[..end]);
            assert_eq!(name, want, "refused Parse renamed");
        }
        self.skip_left = frame_len;
    }

    /// Decides on every message whose bytes are here, as the gate does.
    fn pump(&mut self, tap: &mut SessionTap, s: &Setup) -> Result<(), End> {
        loop {
            if self.held {
                return Ok(());
            }
            for left in [&mut self.skip_left, &mut self.stream_left] {
                if *left > 0 {
                    let n = (*left).min(self.buf.len());
                    self.buf.drain(..n);
                    *left -= n;
                    if *left > 0 {
                        return Ok(());
                    }
                }
            }
            let h = match parse_header(&self.buf, MAX_CLIENT_MESSAGE) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(_) => return Err(End),
            };
            let frame_len = h.frame_len();
            let need = bytes_to_judge(&h);
            if need > HOLD_LIMIT {
                self.refuse(tap, h.tag, frame_len, Refusal::TooLong);
                continue;
            }
            if s.no_budget && need > BUF_SIZE {
                self.refuse(tap, h.tag, frame_len, Refusal::NoMemory);
                continue;
            }
            if self.buf.len() < need {
                return Ok(());
            }
            if need == 0 {
                self.stream_left = frame_len;
                continue;
            }
            let body = &self.buf[HEADER_LEN..need];
            let complete = need == frame_len;
            let stmt = match h.tag {
                b'Q' | b'P' => statement(h.tag, body),
                _ => None,
            };
            let mentions = stmt.is_some_and(|(_, t)| redact::mentions_password(t));
            if let Some((_, text)) = stmt {
                writer_view(text);
            }
            let verdict = tap.client_message(h.tag, body, complete, &mut self.inject);
            match verdict {
                Verdict::Forward => self.stream_left = frame_len,
                Verdict::Replace => {
                    assert!(s.guard, "replaced with the guard off");
                    assert!(mentions, "replaced a statement that mentions no password");
                    let (name, _) = stmt.expect("mentions a password, so it was read");
                    let name = name.to_vec();
                    let body = injected(&self.inject, h.tag);
                    let (new_name, text) = statement(h.tag, body).expect("replacement reads");
                    assert_eq!(new_name, &name[..], "replaced Parse renamed");
                    assert!(
                        text == GUARD_SQL.as_bytes() || text == GUARD_UNREADABLE_SQL.as_bytes(),
                        "replaced by an unknown statement"
                    );
                    self.refused += 1;
                    self.skip_left = frame_len;
                }
                Verdict::Wait(mut rx) => {
                    assert_eq!(s.mode, Mode::Sync, "waited for a record outside sync mode");
                    let written = rx.try_recv();
                    assert_eq!(written, Ok(false), "closed writer did not answer at once");
                    self.refused += 1;
                    match tap.sink_failed(h.tag, &mut self.inject) {
                        Verdict::Replace => {
                            assert_eq!(h.tag, b'Q');
                            let body = injected(&self.inject, b'Q');
                            assert_eq!(messages::query(body), Ok(SINK_FAILED_SQL.as_bytes()));
                            self.skip_left = frame_len;
                        }
                        Verdict::Close(_) => {
                            assert_ne!(h.tag, b'Q');
                            return Err(End);
                        }
                        other => panic!("sink_failed answered {other:?}"),
                    }
                }
                Verdict::Close(why) => panic!("client_message closed the session: {why}"),
                Verdict::Hold => {
                    match h.tag {
                        b'Q' | b'P' => assert!(
                            s.guard && mentions,
                            "held a statement that needs no judging"
                        ),
                        b'B' | b'E' => {}
                        t => panic!("held a {:?} message", t as char),
                    }
                    self.held = true;
                }
            }
        }
    }
}

pub fn check(data: &[u8]) {
    let Some((&settings, mut rest)) = data.split_first() else {
        return;
    };
    let (auditor, s) = auditor(settings);
    let mut tap = SessionTap::new(1, auditor);
    let mut client = Client {
        buf: Vec::new(),
        stream_left: 0,
        skip_left: 0,
        held: false,
        inject: Vec::new(),
        refused: 0,
    };
    let mut server = Capture::new(u32::MAX, SERVER_PREFIX);
    let mut greeting = s.greeting;
    while let Some((&head, r)) = rest.split_first() {
        let (chunk, r) = r.split_at((head & 0x7f).min(r.len() as u8) as usize);
        rest = r;
        if head & 0x80 == 0 {
            client.buf.extend_from_slice(chunk);
        } else if std::mem::take(&mut greeting) {
            tap.greeting(chunk);
            continue;
        } else if !chunk.is_empty() {
            if server
                .feed(chunk, server_wanted, |t, b| tap.server_message(t, b))
                .is_err()
            {
                break;
            }
            client.held = false;
        }
        if client.pump(&mut tap, &s).is_err() {
            break;
        }
    }
    assert_eq!(tap.refused, client.refused, "refused miscounted");
}
