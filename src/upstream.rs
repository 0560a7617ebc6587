//! The dialing side: resolve, connect, TLS verify-full, log in with the
//! IAM token, and collect what the client must see up to ReadyForQuery.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use zeroize::Zeroize;

use crate::pg::backend::{self, ServerError, auth};
use crate::pg::frame::split_frame;
use crate::pg::startup::{self, CancelKey, ProtocolVersion};
use crate::secret::Secret;

/// Largest message accepted from the server during login.
const MAX_LOGIN_MESSAGE: u32 = 1 << 20;

/// How to reach one Aurora endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The endpoint name: signed into tokens and verified in TLS.
    pub host: String,
    pub port: u16,
    /// Dial this `host:port` instead of resolving `host` (tunnels, tests).
    pub connect_to: Option<String>,
    pub connect_timeout: Duration,
    pub tls: Arc<ClientConfig>,
}

impl Endpoint {
    /// `host:port` as signed into tokens.
    pub fn name(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A ReadyForQuery message: tag, length (5), transaction status.
pub const READY_FOR_QUERY_LEN: usize = 6;

/// A logged-in upstream session.
#[derive(Debug)]
pub struct Upstream {
    pub stream: TlsStream<TcpStream>,
    pub addr: SocketAddr,
    pub backend_start: BackendStart,
    /// The server's cancel key, if it sent one.
    pub backend_key: Option<CancelKey>,
    /// The minor protocol version the server settled on.
    pub minor: u16,
    /// The server's messages from AuthenticationOk to ReadyForQuery, minus
    /// BackendKeyData and NegotiateProtocolVersion, which the proxy rewrites.
    /// Everything the server said after authentication, ending with its
    /// ReadyForQuery ([`READY_FOR_QUERY_LEN`] bytes).
    pub greeting: BytesMut,
    pub tls: String,
}

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connecting to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("the server at {addr} refused TLS (answered {answer:?} to SSLRequest)")]
    TlsRefused { addr: SocketAddr, answer: char },
    #[error("TLS with {host} failed: {source}")]
    Tls { host: String, source: io::Error },
    #[error("the server asked for {method} authentication, not the IAM cleartext token")]
    UnexpectedAuth { method: &'static str },
    #[error("the server refused the login: {} {}", .0.code, .0.message)]
    Refused(ServerError),
    #[error("the server broke the protocol during login: {0}")]
    Protocol(String),
    #[error("the server closed the connection during login")]
    Closed,
    #[error("I/O error with the server during login: {0}")]
    Io(#[from] io::Error),
}

/// Resolves the endpoint now (Aurora failover moves DNS) and connects to
/// the first address that answers.
async fn dial(ep: &Endpoint) -> Result<(TcpStream, SocketAddr), UpstreamError> {
    let target = ep.connect_to.clone().unwrap_or_else(|| ep.name());
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&target)
        .await
        .map_err(|source| UpstreamError::Resolve {
            host: target.clone(),
            source,
        })?
        .collect();
    let mut last = UpstreamError::NoAddress { host: target };
    for addr in addrs {
        match tokio::time::timeout(ep.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                configure_socket(&tcp);
                return Ok((tcp, addr));
            }
            Ok(Err(source)) => last = UpstreamError::Connect { addr, source },
            Err(_) => {
                last = UpstreamError::ConnectTimeout {
                    addr,
                    timeout: ep.connect_timeout,
                }
            }
        }
    }
    Err(last)
}

/// Small messages go out at once, and a writer that went silent after a
/// failover is noticed by keepalives instead of hanging for hours.
fn configure_socket(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(60)));
}

/// When and from where the server's process for this connection began,
/// as the proxy can tell without asking: the join keys with Database
/// Activity Streams (`remoteHost`/`remotePort`, and `sessionId`, whose
/// first half is the backend's start second).
#[derive(Debug, Clone, Copy)]
pub struct BackendStart {
    /// This end of the upstream socket, as the server sees it (unless
    /// something translates addresses in between).
    pub local: Option<SocketAddr>,
    /// The TCP connection was up: the server forks its backend after.
    pub after: SystemTime,
    /// The backend answered the SSLRequest: it was running before.
    pub before: SystemTime,
}

impl BackendStart {
    /// PostgreSQL's session id (`%c`: start time and pid in hex) when the
    /// start window lies within one second of the proxy's clock, else
    /// `None`. An estimate: it assumes the two clocks agree.
    pub fn session_id(&self, pid: i32) -> Option<String> {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());
        let (from, to) = (secs(self.after)?, secs(self.before)?);
        (from == to).then(|| format!("{from:x}.{pid:x}"))
    }
}

/// Opens a TLS session to the endpoint (after SSLRequest/'S').
pub async fn connect_tls(
    ep: &Endpoint,
    addr_hint: Option<SocketAddr>,
) -> Result<(TlsStream<TcpStream>, SocketAddr), UpstreamError> {
    let (stream, addr, _) = connect_tls_timed(ep, addr_hint).await?;
    Ok((stream, addr))
}

/// [`connect_tls`], and when the server's backend started.
pub async fn connect_tls_timed(
    ep: &Endpoint,
    addr_hint: Option<SocketAddr>,
) -> Result<(TlsStream<TcpStream>, SocketAddr, BackendStart), UpstreamError> {
    let (mut tcp, addr) = match addr_hint {
        Some(addr) => {
            let tcp = tokio::time::timeout(ep.connect_timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| UpstreamError::ConnectTimeout {
                    addr,
                    timeout: ep.connect_timeout,
                })?
                .map_err(|source| UpstreamError::Connect { addr, source })?;
            configure_socket(&tcp);
            (tcp, addr)
        }
        None => dial(ep).await?,
    };
    let after = SystemTime::now();
    let local = tcp.local_addr().ok();
    let mut req = BytesMut::new();
    startup::encode_ssl_request(&mut req);
    tcp.write_all(&req).await?;
    // Exactly one byte: anything the server sent after it belongs to the
    // TLS handshake and must not be read as protocol (CVE-2021-23222).
    let mut answer = [0u8; 1];
    if tcp.read(&mut answer).await? == 0 {
        return Err(UpstreamError::Closed);
    }
    let before = SystemTime::now();
    if answer[0] != b'S' {
        return Err(UpstreamError::TlsRefused {
            addr,
            answer: answer[0] as char,
        });
    }
    let name = ServerName::try_from(ep.host.clone()).map_err(|e| UpstreamError::Tls {
        host: ep.host.clone(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let stream = TlsConnector::from(ep.tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|source| UpstreamError::Tls {
            host: ep.host.clone(),
            source,
        })?;
    let start = BackendStart {
        local,
        after,
        before,
    };
    Ok((stream, addr, start))
}

/// Connects and logs in as the startup parameters say, answering the
/// cleartext password request with `token`.
///
/// Not cancel-safe; bound it with a timeout and drop the connection.
pub async fn login(
    ep: &Endpoint,
    params: &[(String, String)],
    version: ProtocolVersion,
    token: &Secret,
) -> Result<Upstream, UpstreamError> {
    let (mut stream, addr, backend_start) = connect_tls_timed(ep, None).await?;
    let tls = crate::tls::summary(stream.get_ref().1);

    let mut out = BytesMut::with_capacity(512);
    startup::encode_startup(
        &mut out,
        version,
        params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    stream.write_all(&out).await?;
    stream.flush().await?;
    let answer = read_login(&mut stream, version, token).await?;
    Ok(Upstream {
        stream,
        addr,
        backend_start,
        backend_key: answer.backend_key,
        minor: answer.minor,
        greeting: answer.greeting,
        tls,
    })
}

/// What the server said between the startup packet and ReadyForQuery.
#[derive(Debug)]
struct LoginAnswer {
    backend_key: Option<CancelKey>,
    minor: u16,
    greeting: BytesMut,
}

/// Reads the server's login messages after the startup packet, answering
/// its one cleartext password request with `token`, up to and including
/// ReadyForQuery.
async fn read_login<S>(
    stream: &mut S,
    version: ProtocolVersion,
    token: &Secret,
) -> Result<LoginAnswer, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(8192);
    let mut greeting = BytesMut::with_capacity(1024);
    let mut backend_key = None;
    let mut minor = version.minor;
    let mut answered = false;
    let mut authenticated = false;
    loop {
        let Some((header, body)) = split_frame(&buf, MAX_LOGIN_MESSAGE)
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?
        else {
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(UpstreamError::Closed);
            }
            continue;
        };
        let frame_len = header.frame_len();
        match header.tag {
            b'R' => match backend::auth_code(body) {
                Some(auth::CLEARTEXT_PASSWORD) if !answered && !authenticated => {
                    // The token's copy in the message is wiped once sent
                    // (or not: it is wiped all the same).
                    let mut message = BytesMut::new();
                    backend::write_password(&mut message, token.expose());
                    let sent = async {
                        stream.write_all(&message).await?;
                        stream.flush().await
                    }
                    .await;
                    message.as_mut().zeroize();
                    sent?;
                    answered = true;
                }
                Some(auth::OK) if !authenticated => {
                    authenticated = true;
                    greeting.extend_from_slice(&buf[..frame_len]);
                }
                Some(code) => {
                    return Err(UpstreamError::UnexpectedAuth {
                        method: auth::name(code),
                    });
                }
                None => {
                    return Err(UpstreamError::Protocol(
                        "short authentication message".into(),
                    ));
                }
            },
            b'E' => return Err(UpstreamError::Refused(backend::parse_error(body))),
            b'v' if !authenticated => {
                minor = backend::parse_negotiate_version(body)
                    .ok_or_else(|| UpstreamError::Protocol("bad NegotiateProtocolVersion".into()))?
                    .min(version.minor);
            }
            b'K' if authenticated => {
                let (pid, secret) = backend::parse_backend_key(body)
                    .ok_or_else(|| UpstreamError::Protocol("bad BackendKeyData".into()))?;
                backend_key = Some(CancelKey {
                    pid,
                    secret: secret.to_vec(),
                });
            }
            b'S' | b'N' if authenticated => greeting.extend_from_slice(&buf[..frame_len]),
            b'N' => greeting.extend_from_slice(&buf[..frame_len]),
            b'Z' if authenticated => {
                // The greeting ends with it and the session start rewrites
                // around it: exactly tag, length 5, status.
                if frame_len != READY_FOR_QUERY_LEN {
                    return Err(UpstreamError::Protocol(format!(
                        "ReadyForQuery of {frame_len} bytes during login"
                    )));
                }
                greeting.extend_from_slice(&buf[..frame_len]);
                let _ = buf.split_to(frame_len);
                if !buf.is_empty() {
                    return Err(UpstreamError::Protocol("data after ReadyForQuery".into()));
                }
                return Ok(LoginAnswer {
                    backend_key,
                    minor,
                    greeting,
                });
            }
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message {:?} during login",
                    other as char
                )));
            }
        }
        let _ = buf.split_to(frame_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Plays a server that asks for the password, checks it, and ends its
    /// greeting with `ready`.
    async fn login_against(ready: Vec<u8>) -> Result<LoginAnswer, UpstreamError> {
        let (mut proxy, mut server) = tokio::io::duplex(4096);
        let token = Secret::new("tok3n".into());
        let version = ProtocolVersion { major: 3, minor: 0 };
        let play = async move {
            server
                .write_all(&msg(b'R', &3u32.to_be_bytes()))
                .await
                .unwrap();
            let mut password = [0u8; 11];
            server.read_exact(&mut password).await.unwrap();
            assert_eq!(&password, b"p\0\0\0\x0atok3n\0");
            let mut rest = msg(b'R', &0u32.to_be_bytes());
            rest.extend(msg(b'S', b"server_version\x0015.4\0"));
            rest.extend(msg(b'K', &[0, 0, 0, 7, 1, 2, 3, 4]));
            rest.extend(ready);
            server.write_all(&rest).await.unwrap();
            server
        };
        let (answer, _server) = tokio::join!(read_login(&mut proxy, version, &token), play);
        answer
    }

    /// The session start cuts the greeting's last 6 bytes off as its
    /// ReadyForQuery: a longer or shorter one is a protocol error at login,
    /// never a wrong cut later.
    #[tokio::test]
    async fn ready_for_query_must_be_six_bytes() {
        let ok = login_against(msg(b'Z', b"I")).await.unwrap();
        assert!(ok.greeting.ends_with(b"Z\0\0\0\x05I"));
        assert_eq!(ok.backend_key.unwrap().pid, 7);
        for bad in [msg(b'Z', b"II"), msg(b'Z', b"")] {
            match login_against(bad).await {
                Err(UpstreamError::Protocol(why)) => {
                    assert!(why.contains("ReadyForQuery of"), "{why}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
