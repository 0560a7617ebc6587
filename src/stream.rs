//! The one stream type that touches client sockets: TCP or unix, plain or
//! TLS. Everything above it works on `AsyncRead + AsyncWrite`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;

/// An accepted socket.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// An accepted socket detached from any event loop, to be moved to
/// another (see [`crate::workers`]).
#[derive(Debug)]
pub enum StdSocket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Socket {
    /// Detaches the socket from the event loop it was accepted on; it
    /// stays non-blocking.
    pub fn into_std(self) -> io::Result<StdSocket> {
        Ok(match self {
            Socket::Tcp(s) => StdSocket::Tcp(s.into_std()?),
            Socket::Unix(s) => StdSocket::Unix(s.into_std()?),
        })
    }
}

impl StdSocket {
    /// Registers the socket with the event loop of the calling task.
    pub fn into_tokio(self) -> io::Result<Socket> {
        Ok(match self {
            StdSocket::Tcp(s) => Socket::Tcp(TcpStream::from_std(s)?),
            StdSocket::Unix(s) => Socket::Unix(UnixStream::from_std(s)?),
        })
    }
}

/// A client connection, before or after the TLS upgrade.
#[derive(Debug)]
pub enum ClientStream {
    Plain(Socket),
    Tls(Box<TlsClient>),
}

impl ClientStream {
    /// A client that finished its TLS handshake.
    pub fn tls(stream: TlsStream<Socket>) -> Self {
        ClientStream::Tls(Box::new(TlsClient(stream)))
    }
}

/// A TLS client connection that always ends with TLS close_notify.
///
/// However a connection ends (a session's end, a refusal, a cancel
/// request answered, a timeout, an error on either side), a TLS client
/// must see close_notify before the TCP close, as PostgreSQL sends it:
/// OpenSSL 3 reports a bare close as "unexpected eof while reading", and
/// libpq 17+ reports a cancel whose connection ended that way as failed.
/// An orderly `shutdown()` sends it on the way; dropping the stream sends
/// it too, so no path can forget (the alert is 24 bytes: a non-blocking
/// send to an idle socket takes it; a socket whose buffer is full gets
/// none, as its peer is not reading anyway).
#[derive(Debug)]
pub struct TlsClient(TlsStream<Socket>);

impl TlsClient {
    pub fn get_ref(&self) -> (&Socket, &rustls::ServerConnection) {
        self.0.get_ref()
    }
}

impl Drop for TlsClient {
    fn drop(&mut self) {
        let (socket, conn) = self.0.get_mut();
        conn.send_close_notify();
        let mut out = RawSend(socket);
        while conn.wants_write() {
            match conn.write_tls(&mut out) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
}

/// Writes straight to the socket with one non-blocking send(2): usable in
/// `Drop`, where nothing can wait for readiness.
struct RawSend<'a>(&'a Socket);

impl io::Write for RawSend<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let sock = match self.0 {
            Socket::Tcp(s) => socket2::SockRef::from(s),
            Socket::Unix(s) => socket2::SockRef::from(s),
        };
        sock.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ClientStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// TLS version and cipher suite, when TLS is on.
    pub fn tls_summary(&self) -> Option<String> {
        match self {
            ClientStream::Plain(_) => None,
            ClientStream::Tls(t) => Some(crate::tls::summary(t.get_ref().1)),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Socket::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Socket::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

macro_rules! delegate_client {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ClientStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            ClientStream::Tls($s) => {
                let $s = Pin::new(&mut $s.0);
                $e
            }
        }
    };
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate_client!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate_client!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_client!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_client!(self, s => s.poll_shutdown(cx))
    }
}
