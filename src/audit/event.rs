//! Audit events and their JSON-lines form (schema version 1, documented in
//! docs/audit.md).
//!
//! Events are built on the forwarding path with as little work as possible
//! (borrowed or shared text, fixed-size fields) and turned into JSON by the
//! writer thread. JSON is written by hand: the schema is small and fixed,
//! and every string goes through [`json_str`], so no text a client sends can
//! end a line or a field early.

use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// Schema version written into every record as `"v"`.
pub const SCHEMA_VERSION: u32 = 1;

/// Who the proxy acted for when a session started.
#[derive(Debug, Clone, Default)]
pub struct SessionStart {
    pub conn: u64,
    pub time: Option<SystemTime>,
    /// Where the identity came from: `sso`, `saml` or `workload`.
    pub identity_source: String,
    pub person: String,
    pub role_arn: String,
    pub account: String,
    pub access_key_id: String,
    pub client_addr: String,
    pub client_uid: Option<u32>,
    pub client_tls: Option<String>,
    pub upstream: String,
    pub upstream_addr: String,
    pub upstream_tls: String,
    pub db_user: String,
    pub database: String,
    pub application_name: String,
    /// The server process id from BackendKeyData: the join key with
    /// Database Activity Streams' `pid`.
    pub backend_pid: Option<i32>,
    /// This end of the upstream socket: DAS `remoteHost`/`remotePort`.
    pub upstream_local_addr: Option<std::net::SocketAddr>,
    /// The backend started between these times (proxy clock).
    pub backend_start_window: Option<(SystemTime, SystemTime)>,
    /// DAS `sessionId` (`%c`) as estimated from the window.
    pub session_id: Option<String>,
    /// Gateway mode: the gateway's id (the person, ARN and access key id
    /// above are what the client's proof showed).
    pub gateway_id: Option<String>,
}

/// A refused connection.
#[derive(Debug, Clone, Default)]
pub struct Denial {
    pub conn: u64,
    pub time: Option<SystemTime>,
    pub client_addr: String,
    pub db_user: Option<String>,
    pub database: Option<String>,
    /// Short machine-readable kind, e.g. `identity_mismatch`.
    pub kind: &'static str,
    pub sqlstate: Option<String>,
    pub reason: String,
}

/// How a statement reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// 'Q': one record per statement of the string.
    Simple,
    /// Parse/Bind/Execute: one record per Execute.
    Extended,
    /// 'F' FunctionCall.
    Function,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Function => "function",
        }
    }
}

/// Statement text as captured: shared (a prepared statement's text is
/// reused by every Execute) and possibly cut, with the hash of the whole.
#[derive(Debug, Clone)]
pub struct Text {
    pub bytes: Arc<[u8]>,
    /// Length of the full text.
    pub full_len: usize,
    /// SHA-256 of the full text when `bytes` is only a prefix.
    pub full_sha256: Option<[u8; 32]>,
}

impl Text {
    /// Keeps at most `cap` bytes of `full`, hashing the whole when cut.
    pub fn capture(full: &[u8], cap: usize) -> Self {
        if full.len() <= cap {
            return Text {
                bytes: Arc::from(full),
                full_len: full.len(),
                full_sha256: None,
            };
        }
        Text {
            bytes: Arc::from(&full[..cap]),
            full_len: full.len(),
            full_sha256: Some(Sha256::digest(full).into()),
        }
    }
}

/// A statement sent to the server (or refused by the proxy).
#[derive(Debug, Clone)]
pub struct Statement {
    pub conn: u64,
    pub time: SystemTime,
    /// Per-session number of the Query, Execute or FunctionCall.
    pub n: u64,
    pub protocol: Protocol,
    /// Prepared statement name (extended protocol), empty for unnamed.
    pub name: Option<Arc<[u8]>>,
    pub text: Text,
    /// Bind parameters, only when `--audit-parameters` is on.
    pub params: Option<Vec<Option<String>>>,
    /// Function OID for 'F'.
    pub function_oid: Option<u32>,
    /// Why the proxy refused it, if it did.
    pub refused: Option<&'static str>,
    /// False when the server lexes this text differently from the proxy
    /// (standard_conforming_strings off, or a client encoding whose
    /// characters can hold a quote byte): redaction then withholds a text
    /// that mentions a password.
    pub judgeable: bool,
}

/// What the server answered to one statement.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub conn: u64,
    pub time: SystemTime,
    pub n: u64,
    /// 1-based statement within a multi-statement Query.
    pub part: u32,
    pub result: OutcomeKind,
}

#[derive(Debug, Clone)]
pub enum OutcomeKind {
    /// CommandComplete: the tag and its row count.
    Complete { tag: SmallText, rows: Option<u64> },
    /// EmptyQueryResponse.
    Empty,
    /// ErrorResponse.
    Error {
        sqlstate: [u8; 5],
        message: SmallText,
    },
    /// The server did not run the statement, and why (part 0: the whole
    /// message).
    NotRun(&'static str),
}

/// A short text kept inline (command tags, error messages cut at 240 bytes)
/// so outcomes never allocate.
#[derive(Clone, Copy)]
pub struct SmallText {
    len: u8,
    buf: [u8; 240],
}

impl SmallText {
    pub fn new(b: &[u8]) -> Self {
        let len = b.len().min(240);
        let mut buf = [0; 240];
        buf[..len].copy_from_slice(&b[..len]);
        SmallText {
            len: len as u8,
            buf,
        }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

impl std::fmt::Debug for SmallText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// The end of a session.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    pub conn: u64,
    pub time: SystemTime,
    pub duration_ms: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    /// `client`, `upstream` or `proxy`.
    pub closed_by: &'static str,
    pub reason: String,
}

/// The name of a function a session called by OID (see
/// [`crate::audit::functions`]).
#[derive(Debug, Clone)]
pub struct FunctionName {
    pub conn: u64,
    pub time: SystemTime,
    pub oid: u32,
    /// The name with its argument types; `None`: no function has this OID;
    /// `Err`: the lookup failed, and why.
    pub result: Result<Option<String>, String>,
}

/// Everything the audit log records.
#[derive(Debug, Clone)]
pub enum Event {
    SessionStart(Box<SessionStart>),
    Denial(Box<Denial>),
    Statement(Box<Statement>),
    Outcome(Box<Outcome>),
    SessionEnd(Box<SessionEnd>),
    Function(Box<FunctionName>),
    /// Events lost because the async queue was full (written when the
    /// queue has room again).
    Dropped {
        time: SystemTime,
        count: u64,
    },
}

/// Appends `s` as a JSON string literal. Invalid UTF-8 becomes U+FFFD;
/// control characters, quotes, backslashes and the line separators U+2028/9
/// are escaped, so a record is always exactly one line.
pub fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for chunk in s.utf8_chunks() {
        json_escape_valid(out, chunk.valid().as_bytes());
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.push(b'"');
}

/// Escapes valid UTF-8: copies runs that need no escape in one piece (most
/// SQL is one run), so the cost is a byte test per byte, not a push.
fn json_escape_valid(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut run = 0;
    let mut i = 0;
    while i < s.len() {
        let mut control = *b"\\u0000";
        let (escaped, width): (&[u8], usize) = match s[i] {
            b'"' => (b"\\\"", 1),
            b'\\' => (b"\\\\", 1),
            b'\n' => (b"\\n", 1),
            b'\r' => (b"\\r", 1),
            b'\t' => (b"\\t", 1),
            b if b < 0x20 || b == 0x7f => {
                control[4] = HEX[usize::from(b >> 4)];
                control[5] = HEX[usize::from(b & 15)];
                (&control, 1)
            }
            // U+2028 and U+2029 (E2 80 A8/A9) end a line in some readers.
            0xe2 if s.get(i + 1) == Some(&0x80) && s.get(i + 2) == Some(&0xa8) => (b"\\u2028", 3),
            0xe2 if s.get(i + 1) == Some(&0x80) && s.get(i + 2) == Some(&0xa9) => (b"\\u2029", 3),
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&s[run..i]);
        out.extend_from_slice(escaped);
        i += width;
        run = i;
    }
    out.extend_from_slice(&s[run..]);
}

/// Builds one JSON object field by field.
pub struct Obj<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Obj<'a> {
    /// Continues an object whose `{` and first fields are already in `out`.
    pub fn continue_in(out: &'a mut Vec<u8>) -> Self {
        Obj { out }
    }
    fn key(&mut self, k: &str) {
        self.out.extend_from_slice(b",\"");
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
    }
    pub fn str(&mut self, k: &str, v: impl AsRef<[u8]>) -> &mut Self {
        self.key(k);
        json_str(self.out, v.as_ref());
        self
    }
    pub fn opt_str(&mut self, k: &str, v: Option<impl AsRef<[u8]>>) -> &mut Self {
        match v {
            Some(v) => self.str(k, v),
            None => self.raw(k, "null"),
        }
    }
    pub fn num(&mut self, k: &str, v: impl std::fmt::Display) -> &mut Self {
        self.key(k);
        self.out.extend_from_slice(v.to_string().as_bytes());
        self
    }
    pub fn opt_num(&mut self, k: &str, v: Option<impl std::fmt::Display>) -> &mut Self {
        match v {
            Some(v) => self.num(k, v),
            None => self.raw(k, "null"),
        }
    }
    pub fn raw(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        self.out.extend_from_slice(v.as_bytes());
        self
    }
    pub fn time(&mut self, k: &str, t: SystemTime) -> &mut Self {
        self.str(k, rfc3339(t))
    }
    pub fn close(&mut self) {
        self.out.push(b'}');
    }
}

/// `2026-11-26T19:01:02.123456Z` (UTC, microseconds).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends `bytes` in lowercase hex.
pub fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const H: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(H[usize::from(b >> 4)]);
        out.push(H[usize::from(b & 15)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn strings_cannot_break_a_line() {
        let mut out = Vec::new();
        json_str(&mut out, b"a\"b\\c\nd\re\x00\x1b \xe2\x80\xa8 \xff end");
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "\"a\\\"b\\\\c\\nd\\re\\u0000\\u001b \\u2028 \u{fffd} end\""
        );
        assert!(!s.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "a\"b\\c\nd\re\u{0}\u{1b} \u{2028} \u{fffd} end");
    }

    /// The run-copying escaper writes exactly what escaping character by
    /// character writes, for texts mixing every case.
    #[test]
    fn escaping_matches_char_by_char() {
        fn oracle(out: &mut Vec<u8>, s: &[u8]) {
            out.push(b'"');
            for chunk in s.utf8_chunks() {
                for c in chunk.valid().chars() {
                    match c {
                        '"' => out.extend_from_slice(b"\\\""),
                        '\\' => out.extend_from_slice(b"\\\\"),
                        '\n' => out.extend_from_slice(b"\\n"),
                        '\r' => out.extend_from_slice(b"\\r"),
                        '\t' => out.extend_from_slice(b"\\t"),
                        c if (c as u32) < 0x20
                            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{7f}') =>
                        {
                            out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
                        }
                        c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                if !chunk.invalid().is_empty() {
                    out.extend_from_slice("\u{fffd}".as_bytes());
                }
            }
            out.push(b'"');
        }
        let pieces: [&[u8]; 14] = [
            b"select ",
            b"\"",
            b"\\",
            b"\n",
            b"\r\t",
            b"\x00",
            b"\x1f",
            b"\x7f",
            "\u{2028}".as_bytes(),
            "\u{2029}".as_bytes(),
            "\u{202a}é".as_bytes(),
            b"\xe2\x80",
            b"\xff",
            "日本".as_bytes(),
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let mut t = Vec::new();
            for _ in 0..state % 12 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                t.extend_from_slice(pieces[(state % pieces.len() as u64) as usize]);
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            got.clear();
            want.clear();
            json_str(&mut got, &t);
            oracle(&mut want, &t);
            assert_eq!(got, want, "{t:?}");
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_000_000_123_456);
        assert_eq!(rfc3339(t), "2026-11-30T00:53:20.123456Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn long_text_is_cut_with_hash() {
        let t = Text::capture(b"abcdef", 4);
        assert_eq!(&*t.bytes, b"abcd");
        assert_eq!(t.full_len, 6);
        assert_eq!(t.full_sha256, Some(Sha256::digest(b"abcdef").into()));
        assert!(Text::capture(b"abc", 4).full_sha256.is_none());
    }
}
