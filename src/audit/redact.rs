//! What the SQL says, read with PostgreSQL's own parser (libpg_query): the
//! password guard, statement splitting and redaction.
//!
//! Every function first looks for the word `password` (or `;` for
//! splitting) with a plain byte scan, so the parser runs only for the rare
//! statements that may need it.

use std::borrow::Cow;

use pg_query::NodeEnum;

/// True if `text` contains `password` in any letter case.
///
/// Runs on every statement the guard sees, so it jumps between the `p`s
/// with memchr's vectorised search instead of comparing at every byte
/// (about 10 instructions per byte before).
pub fn mentions_password(text: &[u8]) -> bool {
    memchr::memchr2_iter(b'p', b'P', text).any(|i| {
        text.get(i..i + 8)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"password"))
    })
}

/// True if any statement in `text` sets a role's password: CREATE/ALTER
/// ROLE, USER or GROUP with a PASSWORD option (ENCRYPTED or not, NULL
/// included). Text the parser rejects is not a password change the server
/// would run (same grammar), so it is false.
pub fn is_password_change(text: &[u8]) -> bool {
    if !mentions_password(text) {
        return false;
    }
    let sql = String::from_utf8_lossy(text);
    let Ok(parsed) = pg_query::parse(&sql) else {
        return false;
    };
    parsed.protobuf.stmts.iter().any(|raw| {
        let options = match raw.stmt.as_ref().and_then(|n| n.node.as_ref()) {
            Some(NodeEnum::CreateRoleStmt(s)) => &s.options,
            Some(NodeEnum::AlterRoleStmt(s)) => &s.options,
            _ => return false,
        };
        options.iter().any(|o| {
            matches!(&o.node, Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case("password"))
        })
    })
}

/// Splits a simple Query's text into its statements as byte ranges, the
/// way the server does. Leaves `out` empty for a single statement or text
/// the parser rejects (the server then runs none of it).
pub fn split(text: &[u8], out: &mut Vec<(usize, usize)>) {
    out.clear();
    // Most statements end with a semicolon and have none before it
    // (pgbench, most drivers): one statement, no parser needed (it costs
    // about 10,000 instructions a statement).
    let body = text
        .iter()
        .rposition(|b| !matches!(b, b';' | b' ' | b'\t' | b'\n' | b'\r'))
        .map_or(&text[..0], |end| &text[..=end]);
    if !body.contains(&b';') {
        return;
    }
    let Ok(sql) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(parts) = pg_query::split_with_parser(sql) else {
        return;
    };
    if parts.len() < 2 {
        return;
    }
    let base = sql.as_ptr() as usize;
    for p in parts {
        let t = p.trim_start();
        let start = t.as_ptr() as usize - base;
        out.push((start, start + t.len()));
    }
}

/// Statement text as written to the log.
pub enum Shown<'a> {
    Plain(&'a [u8]),
    Redacted(Cow<'static, str>),
}

impl Shown<'_> {
    pub fn is_redacted(&self) -> bool {
        matches!(self, Shown::Redacted(_))
    }
}

impl AsRef<[u8]> for Shown<'_> {
    fn as_ref(&self) -> &[u8] {
        match self {
            Shown::Plain(b) => b,
            Shown::Redacted(s) => s.as_bytes(),
        }
    }
}

/// The text with every literal replaced by `$n` if it mentions a password
/// (CREATE/ALTER ROLE, user mappings, dblink connection strings...). Text
/// the parser cannot read is withheld whole rather than risk a secret.
pub fn redact(text: &[u8]) -> Shown<'_> {
    if !mentions_password(text) {
        return Shown::Plain(text);
    }
    match std::str::from_utf8(text)
        .ok()
        .and_then(|s| pg_query::normalize(s).ok())
    {
        Some(n) if !leaks_literal(&n) => Shown::Redacted(Cow::Owned(n)),
        _ => Shown::Redacted(Cow::Borrowed(
            "<withheld: mentions a password and could not be parsed>",
        )),
    }
}

/// A normalized text still holding a quoted literal (normalize leaves
/// some utility-statement options alone) is not safe to show.
fn leaks_literal(normalized: &str) -> bool {
    normalized.contains('\'') || normalized.contains("$$")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised search agrees with a comparison at every byte, on
    /// the edges (start, end, a `p` too near the end) and on many mixed
    /// texts from a fixed pseudo-random sequence.
    #[test]
    fn mentions_password_matches_a_byte_by_byte_search() {
        let naive = |t: &[u8]| t.windows(8).any(|w| w.eq_ignore_ascii_case(b"password"));
        for t in [
            &b"password"[..],
            b"x PASSWORD",
            b"PassWord x",
            b"passwor",
            b"ppppassword",
            b"select 1 from p",
            b"pAsSwOrD\xff\xfe",
            b"",
        ] {
            assert_eq!(mentions_password(t), naive(t), "{t:?}");
        }
        // Texts glued from pieces of the word, so that hits and near
        // misses both occur often.
        let pieces: [&[u8]; 8] = [
            b"pass",
            b"PASS",
            b"word",
            b"Word",
            b"p",
            b"x ",
            b"pas",
            b"\xc3\xa9",
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut hits = 0;
        for _ in 0..5000 {
            let mut t = Vec::new();
            for _ in 0..next() % 9 {
                t.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
            }
            let want = naive(&t);
            hits += usize::from(want);
            assert_eq!(mentions_password(&t), want, "{t:?}");
        }
        // Both answers were exercised.
        assert!(hits > 100 && hits < 4900, "{hits} hits");
    }

    #[test]
    fn finds_every_form_of_password_change() {
        for sql in [
            "ALTER USER alice PASSWORD 'SCRAM-SHA-256$4096:abc$def:ghi'",
            "alter role alice with encrypted password 'x'",
            "CREATE ROLE bob LOGIN PASSWORD 'secret'",
            "create user bob password 'secret' valid until 'infinity'",
            "ALTER ROLE CURRENT_USER PASSWORD NULL",
            "create group g with password 'p'",
            "select 1; ALTER USER alice PASSWORD 'p'; select 2",
            "/* hi */ AlTeR   uSeR \"Alice\"\n PaSsWoRd 'p'",
        ] {
            assert!(is_password_change(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "select 'password'",
            "create table t (password text)",
            "ALTER ROLE alice VALID UNTIL 'infinity'",
            "select 1",
            "ALTER USER alice PASSWORD", // a syntax error: the server runs nothing
            "DO $$BEGIN EXECUTE 'ALTER USER a PASSWORD ''x'''; END$$",
        ] {
            assert!(!is_password_change(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn redacts_secrets_and_keeps_the_rest() {
        let shown = redact(b"ALTER USER alice PASSWORD 'SCRAM-SHA-256$4096:abc$def:ghi'");
        let s = std::str::from_utf8(shown.as_ref()).unwrap();
        assert!(shown.is_redacted());
        assert!(!s.contains("SCRAM"), "{s}");
        assert!(s.contains("alice"), "{s}");
        let s =
            redact(b"CREATE USER MAPPING FOR x SERVER s OPTIONS (user 'u', password 'hunter2')");
        assert!(!std::str::from_utf8(s.as_ref()).unwrap().contains("hunter2"));
        assert!(matches!(redact(b"select 1"), Shown::Plain(b"select 1")));
        let s = redact(b"password 'oops' not sql");
        assert!(!std::str::from_utf8(s.as_ref()).unwrap().contains("oops"));
    }

    #[test]
    fn splits_like_the_server() {
        let text = b"select 1; select ';' ;select 2";
        let mut out = Vec::new();
        split(text, &mut out);
        let parts: Vec<&[u8]> = out.iter().map(|&(a, b)| &text[a..b]).collect();
        assert_eq!(parts, [&b"select 1"[..], b"select ';' ", b"select 2"]);
        split(b"select 1;", &mut out);
        assert!(out.is_empty());
        split(b"select 1; nonsense here", &mut out);
        assert!(out.is_empty());
        // Trailing semicolons and white space end one statement.
        split(b"SELECT abalance FROM t WHERE aid = 1; ;\n", &mut out);
        assert!(out.is_empty());
        split(b";;", &mut out);
        assert!(out.is_empty());
        // A semicolon before the end still goes to the parser.
        let text = b"select 1;\n;select 2;\n";
        split(text, &mut out);
        let parts: Vec<&[u8]> = out.iter().map(|&(a, b)| &text[a..b]).collect();
        assert_eq!(parts, [&b"select 1"[..], b"select 2"]);
    }
}
