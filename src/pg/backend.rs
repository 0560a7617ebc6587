//! Server messages: the few the proxy writes (errors, negotiation, keys,
//! the password answer) and the few it reads during the upstream login.

use bytes::{BufMut, BytesMut};

use super::frame::write_message;

/// How bad an error is; FATAL ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An ErrorResponse the proxy composes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMessage {
    pub severity: Severity,
    /// Five-character SQLSTATE.
    pub code: std::borrow::Cow<'static, str>,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// Appends an ErrorResponse.
pub fn write_error(out: &mut BytesMut, e: &ErrorMessage) {
    write_message(out, b'E', |b| {
        field(b, b'S', e.severity.as_str());
        field(b, b'V', e.severity.as_str());
        field(b, b'C', &e.code);
        field(b, b'M', &e.message);
        if let Some(d) = &e.detail {
            field(b, b'D', d);
        }
        if let Some(h) = &e.hint {
            field(b, b'H', h);
        }
        b.put_u8(0);
    });
}

fn field(b: &mut BytesMut, code: u8, value: &str) {
    b.put_u8(code);
    // A NUL inside a value would end the field early on the client.
    b.extend(value.bytes().filter(|&c| c != 0));
    b.put_u8(0);
}

/// Appends NegotiateProtocolVersion: the newest version supported and the
/// protocol options not recognised. The version goes out as the full code
/// (major << 16 | minor), as PostgreSQL sends it and libpq reads it.
pub fn write_negotiate_version(out: &mut BytesMut, minor: u16, unrecognised: &[String]) {
    write_message(out, b'v', |b| {
        b.put_u32((3 << 16) | u32::from(minor));
        b.put_u32(unrecognised.len() as u32);
        for o in unrecognised {
            b.put_slice(o.as_bytes());
            b.put_u8(0);
        }
    });
}

/// Appends BackendKeyData.
pub fn write_backend_key(out: &mut BytesMut, pid: u32, secret: &[u8]) {
    write_message(out, b'K', |b| {
        b.put_u32(pid);
        b.put_slice(secret);
    });
}

/// Appends an authentication request (`AuthenticationXxx` with no data,
/// e.g. [`auth::CLEARTEXT_PASSWORD`]).
pub fn write_auth_request(out: &mut BytesMut, code: u32) {
    write_message(out, b'R', |b| b.put_u32(code));
}

/// Appends a PasswordMessage carrying `password`.
pub fn write_password(out: &mut BytesMut, password: &str) {
    write_message(out, b'p', |b| {
        b.put_slice(password.as_bytes());
        b.put_u8(0);
    });
}

/// The authentication request code of an 'R' message body.
pub fn auth_code(body: &[u8]) -> Option<u32> {
    body.first_chunk::<4>().map(|c| u32::from_be_bytes(*c))
}

/// Authentication request codes (`AuthenticationXxx`).
pub mod auth {
    pub const OK: u32 = 0;
    pub const CLEARTEXT_PASSWORD: u32 = 3;

    /// A name for a code, for error messages.
    pub fn name(code: u32) -> &'static str {
        match code {
            0 => "ok",
            2 => "Kerberos V5",
            3 => "cleartext password",
            5 => "MD5 password",
            7 => "GSSAPI",
            8 => "GSSAPI continue",
            9 => "SSPI",
            10 => "SASL (SCRAM)",
            11 => "SASL continue",
            12 => "SASL final",
            _ => "unknown",
        }
    }
}

/// The (pid, secret) of a BackendKeyData body.
pub fn parse_backend_key(body: &[u8]) -> Option<(u32, &[u8])> {
    let (pid, secret) = body.split_first_chunk::<4>()?;
    if !(4..=super::startup::MAX_CANCEL_SECRET).contains(&secret.len()) {
        return None;
    }
    Some((u32::from_be_bytes(*pid), secret))
}

/// The newest minor version in a NegotiateProtocolVersion body, whose
/// first field is a full protocol code of major version 3.
pub fn parse_negotiate_version(body: &[u8]) -> Option<u16> {
    let code = u32::from_be_bytes(*body.first_chunk::<4>()?);
    (code >> 16 == 3).then_some(code as u16)
}

/// The fields of an ErrorResponse or NoticeResponse body, as sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// Reads the fields of an ErrorResponse body; malformed fields are skipped.
pub fn parse_error(body: &[u8]) -> ServerError {
    let mut e = ServerError::default();
    for f in body.split(|&b| b == 0) {
        let Some((&code, value)) = f.split_first() else {
            continue;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match code {
            b'V' => e.severity = value,
            b'S' if e.severity.is_empty() => e.severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            _ => {}
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::frame::{MAX_CLIENT_MESSAGE, split_frame};

    #[test]
    fn error_round_trip() {
        let e = ErrorMessage {
            severity: Severity::Fatal,
            code: "28000".into(),
            message: "no\0pe".into(),
            detail: None,
            hint: Some("run aws sso login".into()),
        };
        let mut out = BytesMut::new();
        write_error(&mut out, &e);
        let (h, body) = split_frame(&out, MAX_CLIENT_MESSAGE).unwrap().unwrap();
        assert_eq!(h.tag, b'E');
        assert_eq!(h.frame_len(), out.len());
        let parsed = parse_error(body);
        assert_eq!(parsed.severity, "FATAL");
        assert_eq!(parsed.code, "28000");
        assert_eq!(parsed.message, "nope");
        assert_eq!(parsed.hint.as_deref(), Some("run aws sso login"));
    }

    #[test]
    fn key_data_round_trip() {
        let mut out = BytesMut::new();
        write_backend_key(&mut out, 7, &[9; 32]);
        let (_, body) = split_frame(&out, 100).unwrap().unwrap();
        assert_eq!(parse_backend_key(body), Some((7, &[9u8; 32][..])));
        assert_eq!(parse_backend_key(&[0, 0, 0, 1, 2]), None);
    }

    #[test]
    fn negotiate_version_layout() {
        let mut out = BytesMut::new();
        write_negotiate_version(&mut out, 2, &["_pq_.x".into()]);
        assert_eq!(&out[..], b"v\0\0\0\x13\0\x03\0\x02\0\0\0\x01_pq_.x\0");
        assert_eq!(parse_negotiate_version(&out[5..]), Some(2));
        assert_eq!(parse_negotiate_version(&[0, 0, 0, 2]), None);
    }
}
