//! Forwarding after login: both directions in one task, each through a
//! reused buffer (4 KiB, 16 KiB once a read fills it; no allocation per
//! message), with backpressure (a side is read only when its previous
//! bytes were written) and half-close.
//!
//! Client -> upstream bytes pass through a [`Scanner`] that follows message
//! boundaries, so a malformed stream is stopped and each message can be
//! acted on; the bytes themselves are forwarded untouched.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::pg::frame::{FrameError, MAX_CLIENT_MESSAGE, Scanner};
use crate::sessions::{Counters, Tracker};

/// Per-direction buffer once a session moves bulk data: one full TLS
/// record.
pub const BUF_SIZE: usize = 16 * 1024;
/// Per-direction buffer to start with: enough for the requests and
/// answers of ordinary statements, so an idle session holds 4 KiB per
/// direction instead of 16 (memory per idle session is a target). A read
/// that fills it grows it to [`BUF_SIZE`] for the rest of the session.
pub(crate) const START_BUF_SIZE: usize = 4 * 1024;

/// Which side of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("{side} I/O error: {source}")]
    Io { side: Side, source: io::Error },
    #[error("client sent a malformed message: {0}")]
    ClientProtocol(#[from] FrameError),
    #[error("audit: {0}")]
    Audit(&'static str),
}

/// How a forwarded session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client sent Terminate.
    ClientTerminated,
    /// The client closed without Terminate.
    ClientClosed,
    /// The server closed first, after a message of its own (a FATAL error,
    /// e.g. at its shutdown).
    UpstreamClosed,
    /// The server's stream ended with no last message from the server (a
    /// reset, a crash, a network cut, inside a message or between two): the
    /// client has not been told why.
    UpstreamLost,
    /// The proxy asked it to stop ([`Stop`]) and both directions reached
    /// a message boundary: an ErrorResponse to the client and a Terminate
    /// to the server may follow as whole messages.
    Stopped,
}

/// Asks a running pump to stop at the next message boundary in each
/// direction: a message already begun is finished (bytes are read only up
/// to its end), none is begun after it. The session task raises it and
/// polls the pump on; the pump then ends with [`Ending::Stopped`].
#[derive(Debug, Default)]
pub struct Stop {
    requested: AtomicBool,
    client_whole: AtomicBool,
}

impl Stop {
    pub fn request(&self) {
        self.requested.store(true, Ordering::Relaxed);
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// The client has been sent whole messages only, so a message of the
    /// proxy's own can still follow. Noted while stopping and when the pump
    /// ends (the session task reads it after either).
    pub fn client_whole(&self) -> bool {
        self.client_whole.load(Ordering::Relaxed)
    }

    pub(crate) fn note_client_whole(&self, whole: bool) {
        self.client_whole.store(whole, Ordering::Relaxed);
    }
}

/// The result of a pump's run: its traffic, and who ended the session.
pub(crate) fn finish(
    traffic: Traffic,
    result: Result<(), ForwardError>,
    client_terminated: bool,
    client_done: bool,
    stopped: bool,
    server_said_why: bool,
) -> Result<(Traffic, Ending), (Traffic, ForwardError)> {
    match result {
        Ok(()) if stopped => Ok((traffic, Ending::Stopped)),
        Ok(()) if client_terminated => Ok((traffic, Ending::ClientTerminated)),
        Ok(()) if client_done => Ok((traffic, Ending::ClientClosed)),
        Ok(()) if server_said_why => Ok((traffic, Ending::UpstreamClosed)),
        Ok(()) => Ok((traffic, Ending::UpstreamLost)),
        Err(e) => Err((traffic, e)),
    }
}

/// Totals of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    pub client_messages: u64,
}

/// One direction's buffer. Bytes are written as they arrive, except the
/// start of a message that has not fully arrived: while it fits in half the
/// buffer it is held back until its end is in. The far side then holds
/// whole messages only, wherever this side stops (a reset, a stall, the
/// proxy ending the session), so the proxy can still tell it why in a
/// message of its own. A longer message streams as it comes.
pub(crate) struct Pipe {
    buf: Vec<u8>,
    /// The last read filled the buffer: grow it before the next.
    filled: bool,
    pos: usize,
    end: usize,
    /// The last `hold` bytes before `end` wait for the rest of their message.
    hold: usize,
    /// Bytes of the unfinished message read so far, as the framing said.
    partial: usize,
    eof: bool,
    pub(crate) done: bool,
    /// At the end of the stream, shut the writing side down (half-close).
    /// The server's stream ending ends the session, and the session task
    /// may still owe the client a last message: that pipe leaves it open.
    pub(crate) half_close: bool,
    need_flush: bool,
    pub(crate) bytes: u64,
    /// Most bytes the next read may take (stopping at a boundary; see
    /// [`Stop`]); `None`: as many as fit. A capped read sets it to 0, so
    /// the caller sets it afresh from its framing before the next.
    pub(crate) cap: Option<usize>,
}

impl Pipe {
    pub(crate) fn new() -> Self {
        Self {
            buf: vec![0; START_BUF_SIZE],
            filled: false,
            pos: 0,
            end: 0,
            hold: 0,
            partial: 0,
            eof: false,
            done: false,
            half_close: true,
            need_flush: false,
            bytes: 0,
            cap: None,
        }
    }

    /// Every byte written ends a message, and nothing else is waiting to be
    /// written: the far side is between messages.
    pub(crate) fn whole(&self) -> bool {
        self.pos + self.hold == self.end && self.partial == self.hold
    }

    /// Moves bytes from `r` to `w` until `r` ends (then shuts `w` down if
    /// `half_close`) or either side would block. `inspect` sees every chunk
    /// before it is written and says how many bytes of an unfinished message
    /// the stream has had so far (0 at a boundary).
    pub(crate) fn poll_pump<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        from: Side,
        mut inspect: impl FnMut(&[u8]) -> Result<usize, ForwardError>,
    ) -> Poll<Result<(), ForwardError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let to = match from {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        };
        let werr = |source| ForwardError::Io { side: to, source };
        loop {
            if self.pos + self.hold == self.end && !self.eof {
                // Keep a held message's start at the front; read after it.
                if self.pos > 0 {
                    self.buf.copy_within(self.pos..self.end, 0);
                    self.end -= self.pos;
                    self.pos = 0;
                }
                if self.filled && self.buf.len() < BUF_SIZE {
                    self.buf.resize(BUF_SIZE, 0);
                }
                let free = self.buf.len() - self.end;
                let room = match self.cap {
                    None => free,
                    Some(0) => return Poll::Ready(Ok(())),
                    Some(n) => n.min(free),
                };
                let start = self.end;
                let mut rb = ReadBuf::new(&mut self.buf[start..start + room]);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.filled = start + n == self.buf.len();
                        if self.cap.is_some() {
                            self.cap = Some(0);
                        }
                        if n == 0 {
                            self.eof = true;
                        } else {
                            self.end = start + n;
                            self.partial = inspect(&self.buf[start..self.end])?;
                            // Hold a message's start only while all of it is
                            // here and it leaves half the buffer to read into.
                            let unwritten = self.end - self.pos;
                            self.hold = if self.partial <= unwritten
                                && self.partial <= self.buf.len() / 2
                            {
                                self.partial
                            } else {
                                0
                            };
                        }
                    }
                    // A peer that vanishes without TLS close_notify has
                    // still ended its side.
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.eof = true;
                    }
                    Poll::Ready(Err(source)) => {
                        return Poll::Ready(Err(ForwardError::Io { side: from, source }));
                    }
                    Poll::Pending => {
                        // Nothing more to read now: push out what was written.
                        if self.need_flush {
                            ready!(w.as_mut().poll_flush(cx)).map_err(werr)?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos + self.hold < self.end {
                let n = ready!(
                    w.as_mut()
                        .poll_write(cx, &self.buf[self.pos..self.end - self.hold])
                )
                .map_err(werr)?;
                if n == 0 {
                    return Poll::Ready(Err(werr(io::ErrorKind::WriteZero.into())));
                }
                self.pos += n;
                self.bytes += n as u64;
                self.need_flush = true;
            }
            if self.eof {
                // A held message's start is dropped: its end never came.
                ready!(w.as_mut().poll_flush(cx)).map_err(werr)?;
                if self.half_close {
                    // The other side may still have bytes to send.
                    let _ = ready!(w.as_mut().poll_shutdown(cx));
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// The server's stream ended after a message of its own that says why
/// (an ErrorResponse), not cut short or silent.
pub(crate) fn server_said_why(at_boundary: bool, last_tag: u8) -> bool {
    at_boundary && last_tag == b'E'
}

/// A server stream the proxy could not frame.
pub(crate) fn server_protocol(e: FrameError) -> ForwardError {
    ForwardError::Io {
        side: Side::Upstream,
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

/// Forwards until the session ends or, once `stop` is raised, until both
/// directions are between messages. Returns the traffic and how it ended.
///
/// Dropping it mid-message leaves either side with part of a message:
/// raise `stop` and poll it on instead (the session task bounds how long).
pub async fn forward<C, U>(
    client: &mut C,
    upstream: &mut U,
    stop: &Stop,
    live: &Counters,
) -> Result<(Traffic, Ending), (Traffic, ForwardError)>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Pipe::new();
    let mut down = Pipe::new();
    down.half_close = false;
    let mut scanner = Scanner::new(MAX_CLIENT_MESSAGE);
    // The server's boundaries, so a stop never cuts one of its messages.
    let mut server = Scanner::new(u32::MAX);
    let mut messages = 0u64;
    let mut terminated = false;
    let mut stopped = false;
    let mut tracker = Tracker::default();

    let result = poll_fn(|cx| {
        let r = 'poll: loop {
            let stopping = stop.requested();
            if stopping {
                up.cap = Some(scanner.to_boundary());
                down.cap = Some(server.to_boundary());
            }
            let before = (up.bytes, down.bytes, up.done);
            if !up.done {
                let inspect = |chunk: &[u8]| {
                    scanner.feed(chunk, |h| {
                        messages += 1;
                        tracker.client(h.tag);
                        if h.tag == b'X' {
                            terminated = true;
                        }
                    })?;
                    Ok(scanner.partial())
                };
                if let Poll::Ready(r) = up.poll_pump(
                    cx,
                    Pin::new(&mut *client),
                    Pin::new(&mut *upstream),
                    Side::Client,
                    inspect,
                ) && let Err(e) = r
                {
                    break 'poll Poll::Ready(Err(e));
                }
            }
            if !down.done
                && let Poll::Ready(r) = down.poll_pump(
                    cx,
                    Pin::new(&mut *upstream),
                    Pin::new(&mut *client),
                    Side::Upstream,
                    |chunk| {
                        tracker.server_chunk(chunk);
                        server
                            .feed_peek(chunk, |h, body| tracker.server_header(h, body))
                            .map_err(server_protocol)?;
                        Ok(server.partial())
                    },
                )
                && let Err(e) = r
            {
                break 'poll Poll::Ready(Err(e));
            }
            // The server's side ending ends the session; the client's side
            // ending waits for the server to finish answering.
            if down.done {
                break 'poll Poll::Ready(Ok(()));
            }
            if stopping {
                let client_quiet = up.done || up.whole();
                let client_whole = down.whole();
                stop.note_client_whole(client_whole);
                if client_quiet && client_whole {
                    stopped = true;
                    break 'poll Poll::Ready(Ok(()));
                }
                // Bytes moved under a cap: take the cap afresh. (A pipe whose
                // cap is 0 returns at once, which is no progress.)
                if (up.bytes, down.bytes, up.done) != before {
                    continue;
                }
            }
            break 'poll Poll::Pending;
        };
        // Once per wake-up, not per message.
        tracker.publish(live, up.bytes, down.bytes);
        r
    })
    .await;

    stop.note_client_whole(down.whole());
    let traffic = Traffic {
        client_to_upstream: up.bytes,
        upstream_to_client: down.bytes,
        client_messages: messages,
    };
    let said_why = server_said_why(server.at_boundary(), server.last_tag());
    finish(traffic, result, terminated, up.done, stopped, said_why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        crate::pg::frame::write_message(&mut out, tag, |b| b.extend_from_slice(body));
        out.to_vec()
    }

    /// Pumps everything `from` holds into a sink until `from` ends.
    async fn pump_all(pipe: &mut Pipe, from: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut sink = Vec::new();
        poll_fn(|cx| {
            pipe.poll_pump(
                cx,
                Pin::new(&mut *from),
                Pin::new(&mut sink),
                Side::Upstream,
                |_| Ok(0),
            )
        })
        .await
        .unwrap();
        sink
    }

    /// Small traffic keeps the small buffer; a read that fills it grows it
    /// to one TLS record, and every byte still arrives in order.
    #[tokio::test]
    async fn buffer_grows_only_for_bulk() {
        let (mut far, mut near) = tokio::io::duplex(64 * 1024);
        far.write_all(b"hello").await.unwrap();
        drop(far);
        let mut pipe = Pipe::new();
        assert_eq!(pump_all(&mut pipe, &mut near).await, b"hello");
        assert_eq!(pipe.buf.len(), START_BUF_SIZE);

        let bulk: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let (mut far, mut near) = tokio::io::duplex(64 * 1024);
        far.write_all(&bulk).await.unwrap();
        drop(far);
        let mut pipe = Pipe::new();
        assert!(pump_all(&mut pipe, &mut near).await == bulk);
        assert_eq!(pipe.buf.len(), BUF_SIZE);
    }

    #[tokio::test]
    async fn relays_both_ways_and_sees_terminate() {
        let (mut client, mut proxy_client) = tokio::io::duplex(64);
        let (mut proxy_up, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(async move {
            forward(
                &mut proxy_client,
                &mut proxy_up,
                &Stop::default(),
                &Counters::default(),
            )
            .await
        });

        let query = msg(b'Q', b"select 1\0");
        client.write_all(&query).await.unwrap();
        let mut got = vec![0; query.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, query);

        // A reply larger than every buffer on the way arrives whole.
        let reply: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let writer = tokio::spawn(async move {
            server.write_all(&reply).await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            server.shutdown().await.unwrap();
            (reply, rest)
        });
        let mut got = vec![0; 200_000];
        client.read_exact(&mut got).await.unwrap();
        client.write_all(&msg(b'X', b"")).await.unwrap();
        client.shutdown().await.unwrap();
        let (reply, rest) = writer.await.unwrap();
        assert_eq!(got, reply);
        assert_eq!(rest, msg(b'X', b""));

        let (traffic, ending) = task.await.unwrap().unwrap();
        assert_eq!(ending, Ending::ClientTerminated);
        assert_eq!(traffic.client_messages, 2);
        assert_eq!(traffic.upstream_to_client, 200_000);
    }

    /// A stop finishes the message each side has begun, and begins none:
    /// the client's half-sent Query reaches the server whole and the next
    /// one not at all; the server's half-sent DataRow, too long to hold
    /// back, reaches the client whole and the next one not at all.
    #[tokio::test]
    async fn stop_waits_for_the_messages_in_flight() {
        let (mut client, mut proxy_client) = tokio::io::duplex(16 * 1024);
        let (mut proxy_up, mut server) = tokio::io::duplex(16 * 1024);
        let stop = std::sync::Arc::new(Stop::default());
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                forward(
                    &mut proxy_client,
                    &mut proxy_up,
                    &stop,
                    &Counters::default(),
                )
                .await
            }
        });
        let long = format!("select '{}'\0", "q".repeat(3000));
        let first = msg(b'Q', long.as_bytes());
        let row = msg(b'D', &[&b"\0\x01\0\0\x0b\xb8"[..], &[b'r'; 3000]].concat());
        client.write_all(&first[..2500]).await.unwrap();
        server.write_all(&row[..2500]).await.unwrap();
        let mut got = vec![0; 2500];
        server.read_exact(&mut got).await.unwrap();
        let mut got = vec![0; 2500];
        client.read_exact(&mut got).await.unwrap();

        stop.request();
        let mut more = first[2500..].to_vec();
        more.extend(msg(b'Q', b"select 2\0"));
        client.write_all(&more).await.unwrap();
        let mut more = row[2500..].to_vec();
        more.extend(msg(b'D', b"\0\x01\0\0\0\x03def"));
        server.write_all(&more).await.unwrap();

        let (_, ending) = task.await.unwrap().unwrap();
        assert_eq!(ending, Ending::Stopped);
        assert!(stop.client_whole());
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest == first[2500..],
            "the server got more than the first Query"
        );
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest == row[2500..],
            "the client got more than the first DataRow"
        );
    }

    /// The start of a short message is held until its end arrives, so a
    /// side that stops inside one leaves the other between messages: a stop
    /// is immediate, and neither side gets any of the unfinished message.
    #[tokio::test]
    async fn short_unfinished_messages_are_held_back() {
        let (mut client, mut proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_up, mut server) = tokio::io::duplex(1024);
        let stop = Stop::default();
        let counters = Counters::default();
        let query = msg(b'Q', b"select 1\0");
        let row = msg(b'D', b"\0\x01\0\0\0\x03abc");
        let mut sent = row.clone();
        sent.extend(&row[..6]);
        server.write_all(&sent).await.unwrap();
        client.write_all(&query[..7]).await.unwrap();
        let ending = {
            let mut pump =
                std::pin::pin!(forward(&mut proxy_client, &mut proxy_up, &stop, &counters));
            let idle = tokio::time::timeout(std::time::Duration::from_millis(100), &mut pump).await;
            assert!(idle.is_err(), "the pump ended by itself");
            stop.request();
            let (_, ending) = tokio::time::timeout(std::time::Duration::from_secs(5), pump)
                .await
                .expect("a stop with only held bytes in flight is immediate")
                .unwrap();
            ending
        };
        assert_eq!(ending, Ending::Stopped);
        assert!(stop.client_whole());
        drop(proxy_client);
        drop(proxy_up);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, row, "the client got part of the second row");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "the server got part of the query: {got:?}");
    }

    /// A server stream that ends with no ErrorResponse last, inside a
    /// message or between two, is a lost connection, and the client holds
    /// whole messages only; one that ends after an ErrorResponse is closed.
    #[tokio::test]
    async fn a_server_that_vanishes_is_told_from_one_that_says_why() {
        let row = msg(b'D', b"\0\x01\0\0\0\x03abc");
        let fatal = msg(b'E', b"SFATAL\0C57P01\0Mbye\0\0");
        for (sent, expect, ending) in [
            (
                [&row[..], &row[..4]].concat(),
                row.clone(),
                Ending::UpstreamLost,
            ),
            (row.clone(), row.clone(), Ending::UpstreamLost),
            (
                [&row[..], &fatal].concat(),
                [&row[..], &fatal].concat(),
                Ending::UpstreamClosed,
            ),
        ] {
            let (mut client, mut proxy_client) = tokio::io::duplex(1024);
            let (mut proxy_up, mut server) = tokio::io::duplex(1024);
            let stop = Stop::default();
            server.write_all(&sent).await.unwrap();
            drop(server);
            let (_, got_ending) = forward(
                &mut proxy_client,
                &mut proxy_up,
                &stop,
                &Counters::default(),
            )
            .await
            .unwrap();
            assert_eq!(got_ending, ending);
            assert!(stop.client_whole());
            drop(proxy_client);
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, expect);
        }
    }

    /// Between messages on both sides, a stop ends the pump at once.
    #[tokio::test]
    async fn stop_between_messages_is_immediate() {
        let (mut client, mut proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_up, mut server) = tokio::io::duplex(1024);
        let stop = Stop::default();
        let counters = Counters::default();
        let mut pump = std::pin::pin!(forward(&mut proxy_client, &mut proxy_up, &stop, &counters));
        client.write_all(&msg(b'Q', b"select 1\0")).await.unwrap();
        let idle = tokio::time::timeout(std::time::Duration::from_millis(100), &mut pump).await;
        assert!(idle.is_err(), "the pump ended by itself");
        stop.request();
        let (traffic, ending) = tokio::time::timeout(std::time::Duration::from_secs(5), pump)
            .await
            .expect("a stop between messages ends the pump")
            .unwrap();
        assert_eq!(ending, Ending::Stopped);
        assert_eq!(traffic.client_messages, 1);
        let mut got = vec![0; 14];
        server.read_exact(&mut got).await.unwrap();
    }

    #[tokio::test]
    async fn malformed_client_stream_is_stopped() {
        let (mut client, mut proxy_client) = tokio::io::duplex(64);
        let (mut proxy_up, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(async move {
            forward(
                &mut proxy_client,
                &mut proxy_up,
                &Stop::default(),
                &Counters::default(),
            )
            .await
        });
        client.write_all(&[b'Q', 0, 0, 0, 1]).await.unwrap();
        let (_, err) = task.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                ForwardError::ClientProtocol(FrameError::TooShort { .. })
            ),
            "{err}"
        );
        // Nothing of the bad message reached the server.
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }
}
