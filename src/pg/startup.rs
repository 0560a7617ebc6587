//! The untagged packets a client may send first: SSLRequest, GSSENCRequest,
//! CancelRequest and StartupMessage. Each starts with a big-endian `u32`
//! length (counting itself) and a `u32` code.

use bytes::{BufMut, BytesMut};
use thiserror::Error;

/// PostgreSQL's own limit on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: u32 = 10_000;
/// The shortest packet that carries a code.
pub const MIN_STARTUP_LEN: u32 = 8;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

/// Protocol 3.0 and 3.2 are what the proxy speaks (3.1 was never used).
pub const NEWEST_MINOR: u16 = 2;

/// Longest cancel secret that protocol 3.2 allows.
pub const MAX_CANCEL_SECRET: usize = 256;

/// A protocol version as carried in a StartupMessage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

impl ProtocolVersion {
    pub const V3_0: Self = Self { major: 3, minor: 0 };

    fn from_code(code: u32) -> Self {
        Self {
            major: (code >> 16) as u16,
            minor: code as u16,
        }
    }

    fn code(self) -> u32 {
        (u32::from(self.major) << 16) | u32::from(self.minor)
    }
}

/// The key a CancelRequest carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: u32,
    pub secret: Vec<u8>,
}

/// A validated StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// The version the client asked for.
    pub requested: ProtocolVersion,
    /// Parameters in the order sent, `_pq_.` options excluded.
    pub params: Vec<(String, String)>,
    /// `_pq_.` protocol options the client asked for; the proxy knows none.
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    /// The value of parameter `name`, if sent.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The requested database user (always present after validation).
    pub fn user(&self) -> &str {
        self.param("user").unwrap_or_default()
    }

    /// The database, which PostgreSQL defaults to the user name.
    pub fn database(&self) -> &str {
        self.param("database").unwrap_or(self.user())
    }

    /// The version both sides will speak: the client's, capped at ours.
    pub fn negotiated(&self) -> ProtocolVersion {
        ProtocolVersion {
            major: 3,
            minor: self.requested.minor.min(NEWEST_MINOR),
        }
    }

    /// True when PostgreSQL would answer with NegotiateProtocolVersion.
    pub fn needs_negotiation(&self) -> bool {
        self.requested.minor > NEWEST_MINOR || !self.protocol_options.is_empty()
    }
}

/// The first packet of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitialPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// Why a startup packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StartupError {
    #[error("startup packet length {0} is outside {MIN_STARTUP_LEN}..={MAX_STARTUP_LEN}")]
    BadLength(u32),
    #[error("unsupported frontend protocol {}.{}: the proxy speaks 3.0 and 3.2", .0.major, .0.minor)]
    UnsupportedProtocol(ProtocolVersion),
    #[error("invalid cancel request of {0} bytes")]
    BadCancel(usize),
    #[error("invalid startup packet layout: {0}")]
    Layout(&'static str),
    #[error("startup parameter {0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("startup parameter {0:?} appears twice")]
    Duplicate(String),
    #[error("no database user name in the startup packet")]
    NoUser,
}

/// Checks the length prefix of a startup packet before anything is read.
pub fn check_length(prefix: [u8; 4]) -> Result<u32, StartupError> {
    let len = u32::from_be_bytes(prefix);
    if !(MIN_STARTUP_LEN..=MAX_STARTUP_LEN).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    Ok(len)
}

/// Decodes the packet body that follows a length prefix accepted by
/// [`check_length`].
pub fn decode(body: &[u8]) -> Result<InitialPacket, StartupError> {
    let Some((code, rest)) = body.split_first_chunk::<4>() else {
        return Err(StartupError::Layout("missing code"));
    };
    match u32::from_be_bytes(*code) {
        SSL_REQUEST if rest.is_empty() => Ok(InitialPacket::SslRequest),
        GSSENC_REQUEST if rest.is_empty() => Ok(InitialPacket::GssEncRequest),
        SSL_REQUEST | GSSENC_REQUEST => Err(StartupError::Layout("trailing bytes after request")),
        CANCEL_REQUEST => decode_cancel(rest),
        version => decode_startup(ProtocolVersion::from_code(version), rest),
    }
}

fn decode_cancel(rest: &[u8]) -> Result<InitialPacket, StartupError> {
    let bad = || StartupError::BadCancel(rest.len() + 8);
    let (pid, secret) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
    if !(4..=MAX_CANCEL_SECRET).contains(&secret.len()) {
        return Err(bad());
    }
    Ok(InitialPacket::Cancel(CancelKey {
        pid: u32::from_be_bytes(*pid),
        secret: secret.to_vec(),
    }))
}

fn decode_startup(requested: ProtocolVersion, rest: &[u8]) -> Result<InitialPacket, StartupError> {
    if requested.major != 3 {
        return Err(StartupError::UnsupportedProtocol(requested));
    }
    // The parameter list is NUL-terminated name/value strings, ending in an
    // empty name.
    let mut rest = rest;
    let mut params: Vec<(String, String)> = Vec::new();
    let mut protocol_options = Vec::new();
    loop {
        let (name, after) = cstr(rest)?;
        if name.is_empty() {
            if !after.is_empty() {
                return Err(StartupError::Layout("data after the terminator"));
            }
            break;
        }
        let name = utf8(name, "name")?;
        let (value, after) = cstr(after)?;
        let value = utf8(value, &name)?;
        rest = after;
        if params.iter().any(|(k, _)| *k == name) || protocol_options.contains(&name) {
            return Err(StartupError::Duplicate(name));
        }
        if name.starts_with("_pq_.") {
            protocol_options.push(name);
        } else {
            params.push((name, value));
        }
    }
    match params.iter().find(|(k, _)| k == "user") {
        Some((_, user)) if !user.is_empty() => {}
        _ => return Err(StartupError::NoUser),
    }
    Ok(InitialPacket::Startup(StartupMessage {
        requested,
        params,
        protocol_options,
    }))
}

fn cstr(buf: &[u8]) -> Result<(&[u8], &[u8]), StartupError> {
    let nul = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::Layout("expected terminator as last byte"))?;
    Ok((&buf[..nul], &buf[nul + 1..]))
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, StartupError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| StartupError::NotUtf8(what.to_owned()))
}

/// Encodes a StartupMessage with `params` at `version`.
pub fn encode_startup<'a>(
    out: &mut BytesMut,
    version: ProtocolVersion,
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    let start = out.len();
    out.put_u32(0);
    out.put_u32(version.code());
    for (k, v) in params {
        out.put_slice(k.as_bytes());
        out.put_u8(0);
        out.put_slice(v.as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Encodes an SSLRequest.
pub fn encode_ssl_request(out: &mut BytesMut) {
    out.put_u32(8);
    out.put_u32(SSL_REQUEST);
}

/// Encodes a CancelRequest.
pub fn encode_cancel(out: &mut BytesMut, key: &CancelKey) {
    out.put_u32(8 + 4 + key.secret.len() as u32);
    out.put_u32(CANCEL_REQUEST);
    out.put_u32(key.pid);
    out.put_slice(&key.secret);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(packet: &[u8]) -> &[u8] {
        let len = check_length(packet[..4].try_into().unwrap()).unwrap();
        assert_eq!(len as usize, packet.len());
        &packet[4..]
    }

    #[test]
    fn startup_round_trip() {
        let mut out = BytesMut::new();
        let params = [
            ("user", "arianna"),
            ("database", "mylab"),
            ("application_name", "psql"),
        ];
        encode_startup(&mut out, ProtocolVersion::V3_0, params);
        let InitialPacket::Startup(msg) = decode(body(&out)).unwrap() else {
            panic!("not a startup message");
        };
        assert_eq!(msg.user(), "arianna");
        assert_eq!(msg.database(), "mylab");
        assert_eq!(msg.params.len(), 3);
        assert!(!msg.needs_negotiation());
    }

    #[test]
    fn database_defaults_to_user() {
        let mut out = BytesMut::new();
        encode_startup(&mut out, ProtocolVersion::V3_0, [("user", "bob")]);
        let InitialPacket::Startup(msg) = decode(body(&out)).unwrap() else {
            panic!()
        };
        assert_eq!(msg.database(), "bob");
    }

    #[test]
    fn newer_minor_and_options_need_negotiation() {
        let mut out = BytesMut::new();
        let v = ProtocolVersion { major: 3, minor: 9 };
        encode_startup(&mut out, v, [("user", "u"), ("_pq_.compression", "on")]);
        let InitialPacket::Startup(msg) = decode(body(&out)).unwrap() else {
            panic!()
        };
        assert!(msg.needs_negotiation());
        assert_eq!(msg.negotiated(), ProtocolVersion { major: 3, minor: 2 });
        assert_eq!(msg.protocol_options, ["_pq_.compression"]);
        assert_eq!(msg.param("_pq_.compression"), None);
    }

    #[test]
    fn special_requests() {
        let mut out = BytesMut::new();
        encode_ssl_request(&mut out);
        assert_eq!(decode(body(&out)).unwrap(), InitialPacket::SslRequest);
        let key = CancelKey {
            pid: 42,
            secret: vec![1, 2, 3, 4],
        };
        let mut out = BytesMut::new();
        encode_cancel(&mut out, &key);
        assert_eq!(decode(body(&out)).unwrap(), InitialPacket::Cancel(key));
    }

    #[test]
    fn malformed_packets_are_refused() {
        assert_eq!(
            check_length(7u32.to_be_bytes()),
            Err(StartupError::BadLength(7))
        );
        assert_eq!(
            check_length(10_001u32.to_be_bytes()),
            Err(StartupError::BadLength(10_001))
        );
        let v3 = 196_608u32.to_be_bytes();
        let cases: [(&[u8], StartupError); 6] = [
            (
                b"user\0u",
                StartupError::Layout("expected terminator as last byte"),
            ),
            (
                b"user\0u\0\0x\0",
                StartupError::Layout("data after the terminator"),
            ),
            (
                b"user\0u\0x\0",
                StartupError::Layout("expected terminator as last byte"),
            ),
            (
                b"user\0u\0user\0v\0\0",
                StartupError::Duplicate("user".into()),
            ),
            (b"database\0d\0\0", StartupError::NoUser),
            (b"user\0\xff\0\0", StartupError::NotUtf8("user".into())),
        ];
        for (params, want) in cases {
            let mut b = v3.to_vec();
            b.extend_from_slice(params);
            assert_eq!(decode(&b), Err(want), "{params:?}");
        }
        let v2 = 131_072u32.to_be_bytes();
        assert!(matches!(
            decode(&v2),
            Err(StartupError::UnsupportedProtocol(_))
        ));
        assert!(matches!(decode(&[0, 0]), Err(StartupError::Layout(_))));
        let mut cancel = 80_877_102u32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&[0, 0, 0, 1, 9]);
        assert!(matches!(decode(&cancel), Err(StartupError::BadCancel(_))));
    }
}
