//! The client side of a connection's first seconds: SSLRequest,
//! GSSENCRequest, direct TLS, CancelRequest, then the StartupMessage.
//!
//! Packets are read with exact reads on the bare socket, never through a
//! buffer: bytes a client sends after an SSLRequest and before the TLS
//! handshake stay in the kernel and are fed to the TLS handshake, which
//! rejects them. They are never taken as protocol messages (the
//! CVE-2021-23214 family of attacks).

use std::sync::Arc;

use rustls::ServerConfig;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use crate::pg::startup::{self, CancelKey, InitialPacket, StartupError, StartupMessage};
use crate::stream::{ClientStream, Socket};
use crate::tls::ALPN_POSTGRESQL;

/// TLS starts with a handshake record: content type 22.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// SSLRequest and GSSENCRequest may each come once before the startup.
const MAX_NEGOTIATION_ROUNDS: usize = 3;

/// What the client wants.
#[derive(Debug)]
pub enum ClientRequest {
    /// A session: its validated StartupMessage.
    Startup(StartupMessage),
    /// Cancel the query of another session.
    Cancel(CancelKey),
}

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("client closed the connection during the handshake")]
    ClientGone,
    #[error("client I/O error during the handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake with the client failed: {0}")]
    Tls(std::io::Error),
    #[error("invalid startup packet: {0}")]
    Startup(#[from] StartupError),
    #[error("client sent an SSLRequest inside TLS")]
    SslRequestInsideTls,
    #[error("client sent a GSSENCRequest after TLS was set up")]
    GssAfterTls,
    #[error("too many negotiation requests")]
    TooManyRounds,
    #[error("direct TLS connection without ALPN \"postgresql\"")]
    DirectTlsWithoutAlpn,
    #[error("plaintext connection refused on a non-local listener")]
    PlaintextRefused,
}

/// A connection after negotiation.
#[derive(Debug)]
pub struct Negotiated {
    pub stream: ClientStream,
    pub request: ClientRequest,
}

/// A failed negotiation, with the stream when it can still carry an error.
#[derive(Debug)]
pub struct Failed {
    pub stream: Option<ClientStream>,
    pub error: HandshakeError,
}

/// Negotiates encryption and reads the first real request.
///
/// Not cancel-safe: dropping it mid-way leaves the client half negotiated;
/// callers drop the whole connection with it.
pub async fn negotiate(
    socket: Socket,
    tls: &Arc<ServerConfig>,
    plaintext_ok: bool,
) -> Result<Negotiated, Failed> {
    let direct_tls = match &socket {
        Socket::Tcp(tcp) => {
            let mut first = [0u8; 1];
            match tcp.peek(&mut first).await {
                Ok(0) => return Err(fail(None, HandshakeError::ClientGone)),
                Ok(_) => first[0] == TLS_HANDSHAKE_RECORD,
                Err(e) => return Err(fail(None, e.into())),
            }
        }
        Socket::Unix(_) => false,
    };
    let mut stream = if direct_tls {
        let tls_stream = accept_tls(socket, tls).await?;
        let alpn_ok = tls_stream.get_ref().1.alpn_protocol() == Some(ALPN_POSTGRESQL);
        let stream = ClientStream::Tls(Box::new(tls_stream));
        if !alpn_ok {
            return Err(fail(Some(stream), HandshakeError::DirectTlsWithoutAlpn));
        }
        stream
    } else {
        ClientStream::Plain(socket)
    };

    for _ in 0..MAX_NEGOTIATION_ROUNDS {
        let packet = match read_packet(&mut stream).await {
            Ok(p) => p,
            Err(e) => return Err(fail(Some(stream), e)),
        };
        match packet {
            InitialPacket::SslRequest => {
                let ClientStream::Plain(mut socket) = stream else {
                    return Err(fail(Some(stream), HandshakeError::SslRequestInsideTls));
                };
                if let Err(e) = socket.write_all(b"S").await {
                    return Err(fail(None, e.into()));
                }
                stream = ClientStream::Tls(Box::new(accept_tls(socket, tls).await?));
            }
            InitialPacket::GssEncRequest => {
                if stream.is_tls() {
                    return Err(fail(Some(stream), HandshakeError::GssAfterTls));
                }
                // No GSSAPI encryption here; libpq then tries TLS or plain.
                if let Err(e) = stream.write_all(b"N").await {
                    return Err(fail(None, e.into()));
                }
            }
            InitialPacket::Cancel(key) => {
                return Ok(Negotiated {
                    stream,
                    request: ClientRequest::Cancel(key),
                });
            }
            InitialPacket::Startup(msg) => {
                if !stream.is_tls() && !plaintext_ok {
                    return Err(fail(Some(stream), HandshakeError::PlaintextRefused));
                }
                return Ok(Negotiated {
                    stream,
                    request: ClientRequest::Startup(msg),
                });
            }
        }
    }
    Err(fail(Some(stream), HandshakeError::TooManyRounds))
}

fn fail(stream: Option<ClientStream>, error: HandshakeError) -> Failed {
    Failed { stream, error }
}

async fn accept_tls(
    socket: Socket,
    tls: &Arc<ServerConfig>,
) -> Result<tokio_rustls::server::TlsStream<Socket>, Failed> {
    TlsAcceptor::from(tls.clone())
        .accept(socket)
        .await
        .map_err(|e| fail(None, HandshakeError::Tls(e)))
}

/// Reads one length-prefixed startup packet; the length is checked against
/// PostgreSQL's limit before the body is allocated.
async fn read_packet(stream: &mut ClientStream) -> Result<InitialPacket, HandshakeError> {
    let mut len = [0u8; 4];
    read_exact(stream, &mut len).await?;
    let len = startup::check_length(len)?;
    let mut body = vec![0u8; len as usize - 4];
    read_exact(stream, &mut body).await?;
    Ok(startup::decode(&body)?)
}

async fn read_exact(stream: &mut ClientStream, buf: &mut [u8]) -> Result<(), HandshakeError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HandshakeError::ClientGone),
        Err(e) => Err(e.into()),
    }
}
