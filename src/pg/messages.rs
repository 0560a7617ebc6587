//! Bodies of the few messages the audit inspects, sans I/O.
//!
//! Each function takes the body of one complete message (after the
//! five-byte header) and borrows from it; none allocates. A body that does
//! not hold what its type promises is a [`BodyError`], never a panic.

use thiserror::Error;

use crate::pg::frame::{FrameError, Scanner};

/// A message body that ends early or lacks a terminator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("malformed {tag:?} message body")]
pub struct BodyError {
    pub tag: char,
}

fn err(tag: u8) -> BodyError {
    BodyError { tag: tag as char }
}

/// Splits a NUL-terminated string off the front of `body`.
fn cstr(body: &[u8], tag: u8) -> Result<(&[u8], &[u8]), BodyError> {
    let nul = body.iter().position(|&b| b == 0).ok_or(err(tag))?;
    Ok((&body[..nul], &body[nul + 1..]))
}

fn u16_at(body: &[u8], tag: u8) -> Result<(u16, &[u8]), BodyError> {
    let b = body.get(..2).ok_or(err(tag))?;
    Ok((u16::from_be_bytes([b[0], b[1]]), &body[2..]))
}

fn i32_at(body: &[u8], tag: u8) -> Result<(i32, &[u8]), BodyError> {
    let b = body.get(..4).ok_or(err(tag))?;
    Ok((i32::from_be_bytes([b[0], b[1], b[2], b[3]]), &body[4..]))
}

/// 'Q' Query: the query string.
pub fn query(body: &[u8]) -> Result<&[u8], BodyError> {
    Ok(cstr(body, b'Q')?.0)
}

/// 'P' Parse: statement name and query text (parameter types ignored).
pub fn parse(body: &[u8]) -> Result<(&[u8], &[u8]), BodyError> {
    let (name, rest) = cstr(body, b'P')?;
    let (text, _) = cstr(rest, b'P')?;
    Ok((name, text))
}

/// 'B' Bind, as far as the audit needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// Parameter format codes (0 = text, 1 = binary), as sent.
    formats: &'a [u8],
    /// Number of parameter values and the bytes holding them.
    params: u16,
    values: &'a [u8],
}

impl<'a> Bind<'a> {
    /// Each parameter: `None` for SQL NULL, else its bytes and whether the
    /// format is text. Stops at the first value that runs past the body
    /// (a truncated capture) and at the first that has no format code (a
    /// malformed message: the server refuses it, the proxy only stops
    /// reading it).
    pub fn params(&self) -> impl Iterator<Item = Option<(&'a [u8], bool)>> + '_ {
        let mut rest = self.values;
        (0..self.params as usize).map_while(move |i| {
            let text = self.format_is_text(i)?;
            let (len, r) = i32_at(rest, b'B').ok()?;
            if len < 0 {
                rest = r;
                return Some(None);
            }
            let v = r.get(..len as usize)?;
            rest = &r[len as usize..];
            Some(Some((v, text)))
        })
    }

    /// PostgreSQL's rule: no format codes, all text; one, for every
    /// parameter; else one per parameter. None when the code is missing.
    fn format_is_text(&self, i: usize) -> Option<bool> {
        let at = match self.formats.len() / 2 {
            0 => return Some(true),
            1 => 0,
            _ => 2 * i,
        };
        let code = self.formats.get(at..at + 2)?;
        Some(u16::from_be_bytes([code[0], code[1]]) == 0)
    }

    pub fn param_count(&self) -> u16 {
        self.params
    }
}

/// 'B' Bind: portal, statement and the parameters (values may be cut off
/// when the body is a capped prefix).
pub fn bind(body: &[u8]) -> Result<Bind<'_>, BodyError> {
    let (portal, rest) = cstr(body, b'B')?;
    let (statement, rest) = cstr(rest, b'B')?;
    let (formats, params, values) = value_list(rest, b'B')?;
    Ok(Bind {
        portal,
        statement,
        formats,
        params,
        values,
    })
}

/// The format codes and values that Bind and FunctionCall share: format
/// codes (as sent), the value count and the bytes holding the values.
fn value_list(rest: &[u8], tag: u8) -> Result<(&[u8], u16, &[u8]), BodyError> {
    let (nf, rest) = u16_at(rest, tag)?;
    let flen = nf as usize * 2;
    let formats = rest.get(..flen).unwrap_or(rest);
    let rest = rest.get(flen..).unwrap_or(&[]);
    let (params, values) = u16_at(rest, tag).unwrap_or((0, &[]));
    Ok((formats, params, values))
}

/// 'E' Execute: portal name.
pub fn execute(body: &[u8]) -> Result<&[u8], BodyError> {
    Ok(cstr(body, b'E')?.0)
}

/// 'C' Close (client): `b'S'` or `b'P'` and the name.
pub fn close(body: &[u8]) -> Result<(u8, &[u8]), BodyError> {
    let (&kind, rest) = body.split_first().ok_or(err(b'C'))?;
    Ok((kind, cstr(rest, b'C')?.0))
}

/// 'F' FunctionCall: the function's OID.
pub fn function_call(body: &[u8]) -> Result<u32, BodyError> {
    Ok(i32_at(body, b'F')?.0 as u32)
}

/// 'F' FunctionCall: the OID and the arguments, which have Bind's layout
/// (format codes, then values); the returned Bind has empty names.
pub fn function_call_args(body: &[u8]) -> Result<(u32, Bind<'_>), BodyError> {
    let (oid, rest) = i32_at(body, b'F')?;
    let (formats, params, values) = value_list(rest, b'F')?;
    Ok((
        oid as u32,
        Bind {
            portal: b"",
            statement: b"",
            formats,
            params,
            values,
        },
    ))
}

/// 'C' CommandComplete (server): the command tag.
pub fn command_complete(body: &[u8]) -> Result<&[u8], BodyError> {
    Ok(cstr(body, b'C')?.0)
}

/// The row count at the end of a command tag (`SELECT 3`, `INSERT 0 5`).
pub fn tag_rows(tag: &[u8]) -> Option<u64> {
    let last = tag.rsplit(|&b| b == b' ').next()?;
    if last.is_empty() || !last.iter().all(u8::is_ascii_digit) || last.len() == tag.len() {
        return None;
    }
    std::str::from_utf8(last).ok()?.parse().ok()
}

/// 'E' ErrorResponse: SQLSTATE and primary message (either may be empty
/// in a capped prefix).
pub fn error_fields(body: &[u8]) -> (&[u8], &[u8]) {
    let (mut code, mut message) = (&[][..], &[][..]);
    let mut rest = body;
    while let Some((&field, r)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let (value, r) = match cstr(r, b'E') {
            Ok(v) => v,
            Err(_) => (r, &[][..]),
        };
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = r;
    }
    (code, message)
}

/// Builds a whole 'Q' message for `sql` into `out`.
pub fn write_query(out: &mut Vec<u8>, sql: &str) {
    out.push(b'Q');
    out.extend_from_slice(&(sql.len() as u32 + 5).to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
}

/// Builds a whole 'P' message naming `name` for `sql`, no parameter types.
pub fn write_parse(out: &mut Vec<u8>, name: &[u8], sql: &str) {
    out.push(b'P');
    let len = 4 + name.len() + 1 + sql.len() + 1 + 2;
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(name);
    out.push(0);
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out.extend_from_slice(&[0, 0]);
}

/// Follows message boundaries like [`Scanner`] (whose position it keeps:
/// see [`Capture::scanner`]) and also keeps the first bytes of the bodies
/// of chosen message types, in one buffer reused for the whole stream.
#[derive(Debug, Clone)]
pub struct Capture {
    scanner: Scanner,
    /// Body bytes still to copy into `body`; `None` when this message is
    /// not wanted.
    keep: Option<usize>,
    body: Vec<u8>,
}

impl Capture {
    /// Capture never keeps more than `max_keep` bytes of a body.
    pub fn new(max_len: u32, max_keep: usize) -> Self {
        Self {
            scanner: Scanner::new(max_len),
            keep: None,
            body: Vec::with_capacity(max_keep),
        }
    }

    /// Where the stream stands (boundary, unfinished message, last tag).
    pub fn scanner(&self) -> &Scanner {
        &self.scanner
    }

    /// Consumes `chunk`. `wanted(tag)` says how many body bytes to keep
    /// (`None`: not wanted); `on_message(tag, prefix)` runs once each wanted
    /// message has fully passed.
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        wanted: impl Fn(u8) -> Option<usize>,
        mut on_message: impl FnMut(u8, &[u8]),
    ) -> Result<(), FrameError> {
        while !chunk.is_empty() {
            if self.scanner.remaining() > 0 {
                let take = self.scanner.take_body(chunk.len());
                if let Some(keep) = self.keep {
                    let k = keep.min(take);
                    self.body.extend_from_slice(&chunk[..k]);
                    self.keep = Some(keep - k);
                }
                chunk = &chunk[take..];
                if self.scanner.remaining() == 0 && self.keep.is_some() {
                    on_message(self.scanner.last_tag(), &self.body);
                }
                continue;
            }
            if let Some(header) = self.scanner.take_header(&mut chunk)? {
                self.keep = wanted(header.tag).map(|k| k.min(self.body.capacity()));
                self.body.clear();
                if header.body_len() == 0 && self.keep.is_some() {
                    on_message(header.tag, &[]);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::frame::{MAX_CLIENT_MESSAGE, split_frame, write_message};
    use bytes::BufMut;

    fn frame(tag: u8, body: impl FnOnce(&mut bytes::BytesMut)) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        write_message(&mut out, tag, body);
        out.to_vec()
    }

    fn body(m: &[u8]) -> &[u8] {
        split_frame(m, MAX_CLIENT_MESSAGE).unwrap().unwrap().1
    }

    #[test]
    fn query_and_parse_round_trip() {
        let mut q = Vec::new();
        write_query(&mut q, "select 1; select 2");
        assert_eq!(query(body(&q)).unwrap(), b"select 1; select 2");
        let mut p = Vec::new();
        write_parse(&mut p, b"s1", "select $1");
        assert_eq!(parse(body(&p)).unwrap(), (&b"s1"[..], &b"select $1"[..]));
        assert!(query(b"no terminator").is_err());
        assert!(parse(b"name\0").is_err());
    }

    #[test]
    fn bind_reads_names_and_params() {
        let m = frame(b'B', |b| {
            b.put_slice(b"p\0s1\0");
            b.put_u16(1);
            b.put_u16(0);
            b.put_u16(3);
            b.put_i32(2);
            b.put_slice(b"42");
            b.put_i32(-1);
            b.put_i32(1);
            b.put_slice(b"x");
            b.put_u16(0);
        });
        let b = bind(body(&m)).unwrap();
        assert_eq!((b.portal, b.statement), (&b"p"[..], &b"s1"[..]));
        let params: Vec<_> = b.params().collect();
        assert_eq!(
            params,
            [Some((&b"42"[..], true)), None, Some((&b"x"[..], true))]
        );
        // A capped prefix still yields the names and the complete values.
        let cut = &body(&m)[..17];
        let b = bind(cut).unwrap();
        assert_eq!(b.statement, b"s1");
        assert_eq!(b.params().count(), 1);
    }

    /// Malformed format lists (more parameters than codes, an odd cut)
    /// never panic: reading stops where the message stops making sense.
    #[test]
    fn malformed_bind_formats_do_not_panic() {
        // Two format codes, three parameters.
        let m = frame(b'B', |b| {
            b.put_slice(b"\0\0");
            b.put_u16(2);
            b.put_u16(0);
            b.put_u16(1);
            b.put_u16(3);
            for _ in 0..3 {
                b.put_i32(1);
                b.put_slice(b"v");
            }
            b.put_u16(0);
        });
        let b = bind(body(&m)).unwrap();
        let params: Vec<_> = b.params().collect();
        assert_eq!(params, [Some((&b"v"[..], true)), Some((&b"v"[..], false))]);
        // Every prefix and every declared count, with one to four codes.
        for codes in 1..=4u16 {
            let m = frame(b'B', |b| {
                b.put_slice(b"p\0s\0");
                b.put_u16(codes);
                for _ in 0..codes {
                    b.put_u16(1);
                }
                b.put_u16(9);
                for _ in 0..9 {
                    b.put_i32(2);
                    b.put_slice(b"ab");
                }
            });
            for cut in 0..=body(&m).len() {
                if let Ok(b) = bind(&body(&m)[..cut]) {
                    assert!(b.params().count() <= 9);
                }
            }
        }
    }

    #[test]
    fn small_messages() {
        assert_eq!(execute(b"portal\0\0\0\0\0").unwrap(), b"portal");
        assert_eq!(close(b"Sname\0").unwrap(), (b'S', &b"name"[..]));
        assert_eq!(function_call(&[0, 0, 4, 210, 0, 0]).unwrap(), 1234);
        assert!(function_call(&[0]).is_err());
        // oid 1234, one text format, two arguments ('ab', NULL), result text.
        let f = [
            0, 0, 4, 210, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, b'a', b'b', 255, 255, 255, 255, 0, 0,
        ];
        let (oid, args) = function_call_args(&f).unwrap();
        assert_eq!(oid, 1234);
        let got: Vec<_> = args.params().collect();
        assert_eq!(got, [Some((&b"ab"[..], true)), None]);
        assert_eq!(command_complete(b"INSERT 0 5\0").unwrap(), b"INSERT 0 5");
        assert_eq!(tag_rows(b"INSERT 0 5"), Some(5));
        assert_eq!(tag_rows(b"SELECT 3"), Some(3));
        assert_eq!(tag_rows(b"CREATE TABLE"), None);
        assert_eq!(tag_rows(b"42"), None);
        let (code, msg) = error_fields(b"SERROR\0C42501\0Mno\0\0");
        assert_eq!((code, msg), (&b"42501"[..], &b"no"[..]));
        // Cut in the middle of a field: what is there is kept.
        assert_eq!(error_fields(b"C42501\0Mpart").1, b"part");
    }

    #[test]
    fn capture_keeps_prefixes_in_any_chunking() {
        let mut stream = Vec::new();
        stream.extend(frame(b'D', |b| b.put_slice(&[7; 100])));
        stream.extend(frame(b'C', |b| b.put_slice(b"SELECT 1\0")));
        stream.extend(frame(b'E', |b| b.put_slice(&[b'M'; 50])));
        stream.extend(frame(b'Z', |b| b.put_u8(b'I')));
        for chunk_size in 1..stream.len() {
            let mut c = Capture::new(MAX_CLIENT_MESSAGE, 16);
            let mut got = Vec::new();
            for chunk in stream.chunks(chunk_size) {
                c.feed(
                    chunk,
                    |t| (t != b'D').then_some(16),
                    |t, b| got.push((t, b.to_vec())),
                )
                .unwrap();
            }
            assert_eq!(
                got,
                [
                    (b'C', b"SELECT 1\0".to_vec()),
                    (b'E', vec![b'M'; 16]),
                    (b'Z', b"I".to_vec())
                ],
                "chunk size {chunk_size}"
            );
        }
    }
}
