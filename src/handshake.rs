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
        let stream = ClientStream::tls(tls_stream);
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
                stream = ClientStream::tls(accept_tls(socket, tls).await?);
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

#[cfg(test)]
mod tests {
    //! Stage tests over a real socket pair, with a generated certificate.

    use super::*;
    use crate::pg::startup::ProtocolVersion;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    fn server_tls() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let dir = std::env::temp_dir().join(format!(
            "rip-handshake-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let ca = crate::local_ca::ensure(&dir).unwrap();
        let server = crate::tls::server_config(&ca.cert, &ca.key).unwrap();
        let client =
            crate::tls::client_config(&crate::tls::UpstreamCa::File(ca.ca_cert.clone())).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        (server, client)
    }

    fn startup(user: &str) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        startup::encode_startup(&mut out, ProtocolVersion::V3_0, [("user", user)]);
        out.to_vec()
    }

    fn ssl_request() -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        startup::encode_ssl_request(&mut out);
        out.to_vec()
    }

    fn spawn(
        plaintext_ok: bool,
    ) -> (
        UnixStream,
        Arc<rustls::ClientConfig>,
        tokio::task::JoinHandle<Result<Negotiated, Failed>>,
    ) {
        let (server_tls, client_tls) = server_tls();
        let (client, server) = UnixStream::pair().unwrap();
        let task = tokio::spawn(async move {
            negotiate(Socket::Unix(server), &server_tls, plaintext_ok).await
        });
        (client, client_tls, task)
    }

    #[tokio::test]
    async fn ssl_request_then_startup_over_tls() {
        let (n, _tls) = tls_session().await;
        assert!(n.stream.is_tls());
        let ClientRequest::Startup(msg) = n.request else {
            panic!()
        };
        assert_eq!(msg.user(), "arianna");
        // The ALPN offered by the client is accepted, not required.
        assert!(n.stream.tls_summary().unwrap().starts_with("TLSv1_3"));
    }

    #[tokio::test]
    async fn gssenc_is_declined_then_plaintext_startup() {
        let (mut client, _, task) = spawn(true);
        client
            .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
            .await
            .unwrap();
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        client.write_all(&startup("bob")).await.unwrap();
        let n = task.await.unwrap().unwrap();
        assert!(!n.stream.is_tls());
        assert!(matches!(n.request, ClientRequest::Startup(ref m) if m.user() == "bob"));
    }

    #[tokio::test]
    async fn plaintext_refused_where_not_allowed() {
        let (mut client, _, task) = spawn(false);
        client.write_all(&startup("bob")).await.unwrap();
        let failed = task.await.unwrap().unwrap_err();
        assert!(matches!(failed.error, HandshakeError::PlaintextRefused));
        assert!(failed.stream.is_some(), "the error can still be sent");
    }

    #[tokio::test]
    async fn bytes_sent_before_tls_go_to_the_tls_handshake() {
        let (mut client, _, task) = spawn(true);
        // SSLRequest and a plaintext startup in one write: the second packet
        // must never be read as a startup message.
        let mut both = ssl_request();
        both.extend(startup("mallory"));
        client.write_all(&both).await.unwrap();
        let failed = task.await.unwrap().unwrap_err();
        assert!(
            matches!(failed.error, HandshakeError::Tls(_)),
            "{:?}",
            failed.error
        );
    }

    #[tokio::test]
    async fn cancel_request_is_returned() {
        let (mut client, _, task) = spawn(false);
        let mut out = bytes::BytesMut::new();
        let key = startup::CancelKey {
            pid: 77,
            secret: vec![1, 2, 3, 4],
        };
        startup::encode_cancel(&mut out, &key);
        client.write_all(&out).await.unwrap();
        let n = task.await.unwrap().unwrap();
        assert!(matches!(n.request, ClientRequest::Cancel(k) if k == key));
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_reading_the_body() {
        let (mut client, _, task) = spawn(true);
        client.write_all(&1_000_000u32.to_be_bytes()).await.unwrap();
        let failed = task.await.unwrap().unwrap_err();
        assert!(matches!(
            failed.error,
            HandshakeError::Startup(StartupError::BadLength(1_000_000))
        ));
    }

    #[tokio::test]
    async fn negotiation_rounds_are_bounded() {
        let (mut client, _, task) = spawn(true);
        for _ in 0..MAX_NEGOTIATION_ROUNDS {
            client
                .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
                .await
                .unwrap();
        }
        let failed = task.await.unwrap().unwrap_err();
        assert!(matches!(failed.error, HandshakeError::TooManyRounds));
    }

    #[tokio::test]
    async fn client_leaving_is_not_an_error_to_report() {
        let (client, _, task) = spawn(true);
        drop(client);
        let failed = task.await.unwrap().unwrap_err();
        assert!(matches!(failed.error, HandshakeError::ClientGone));
    }

    /// SSLRequest, TLS, startup for "arianna": what negotiate() returns,
    /// and the client's end.
    async fn tls_session() -> (Negotiated, tokio_rustls::client::TlsStream<UnixStream>) {
        let (mut client, client_tls, task) = spawn(false);
        client.write_all(&ssl_request()).await.unwrap();
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"S");
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client_tls)
            .connect(name, client)
            .await
            .unwrap();
        tls.write_all(&startup("arianna")).await.unwrap();
        tls.flush().await.unwrap();
        (task.await.unwrap().unwrap(), tls)
    }

    /// A TLS client connection dropped without shutdown (a cancel request
    /// answered, a refusal, any error path) still ends with close_notify:
    /// the client sees a clean end, not "unexpected eof" (what libpq 17+
    /// reported as a failed cancel).
    #[tokio::test]
    async fn a_dropped_tls_client_connection_ends_with_close_notify() {
        let (Negotiated { stream, .. }, mut tls) = tls_session().await;
        drop(stream);
        let mut rest = Vec::new();
        let read = tls.read_to_end(&mut rest).await;
        assert!(read.is_ok(), "client saw {read:?}, not close_notify");
        assert!(rest.is_empty());
    }

    /// What a libpq client does with what the proxy sends: take one TLS
    /// record per socket readiness and read it into the 8 KiB it keeps
    /// free. Nothing may stay decrypted behind, where poll(2) cannot see
    /// it (psycopg then waited for good on bulk results).
    #[tokio::test]
    async fn records_to_clients_fit_the_8k_that_libpq_reads() {
        let (Negotiated { mut stream, .. }, tls) = tls_session().await;
        let (raw, mut conn) = tls.into_inner();
        let bulk: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        // The forwarder writes 16 KiB at a time.
        for chunk in bulk.chunks(crate::forward::BUF_SIZE) {
            stream.write_all(chunk).await.unwrap();
        }
        stream.flush().await.unwrap();
        drop(stream);
        let mut wire = Vec::new();
        let mut raw = raw;
        raw.read_to_end(&mut wire).await.unwrap();

        let mut got = Vec::new();
        let mut at = 0;
        while at + 5 <= wire.len() {
            let len = u16::from_be_bytes([wire[at + 3], wire[at + 4]]) as usize;
            let mut record = &wire[at..at + 5 + len];
            at += 5 + len;
            while !record.is_empty() {
                conn.read_tls(&mut record).unwrap();
            }
            let state = conn.process_new_packets().unwrap();
            let mut buf = [0u8; 8192];
            let n = match std::io::Read::read(&mut conn.reader(), &mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => panic!("{e}"),
            };
            got.extend_from_slice(&buf[..n]);
            let left = state.plaintext_bytes_to_read() - n;
            assert_eq!(left, 0, "a record left {left} bytes behind an 8 KiB read");
        }
        assert!(got == bulk, "every byte arrives, in order");
    }
}
