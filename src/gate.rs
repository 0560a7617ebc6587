//! Forwarding with the audit or the password guard on: the client ->
//! upstream pump holds each statement-bearing message until the
//! [`SessionTap`] has judged it, and the upstream -> client pump reports
//! outcomes to the tap. Used instead of [`crate::forward::forward`] only
//! then, so a proxy with both off does no per-message work.
//!
//! Client side, per message:
//! - Query and Parse are held whole (up to [`HOLD_LIMIT`]) so the guard can
//!   read all of their text before a byte is forwarded; the tap may have
//!   them replaced, or (sync audit) forwarded only once their record is
//!   durable.
//! - Bind, Execute, Close, FunctionCall and Sync are judged on their first
//!   [`PREFIX`] bytes; the rest streams.
//! - Everything else (CopyData, ...) streams untouched.
//!
//! The buffer is reused. It starts at 4 KiB, grows to 16 KiB the first
//! time a read fills it, grows further only for a Query or Parse longer
//! than that and shrinks back after. All state lives in [`Gate`], so the
//! future is cancel-safe in the same sense as `forward`.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::audit::SessionTap;
use crate::audit::tap::Verdict;
use crate::forward::{Ending, ForwardError, Pipe, Side, Traffic};
use crate::pg::frame::{HEADER_LEN, MAX_CLIENT_MESSAGE, parse_header};
use crate::pg::messages::{self, Capture};

use crate::forward::{BUF_SIZE, START_BUF_SIZE};
/// Longest Query or Parse the gate holds; longer ones are refused.
pub const HOLD_LIMIT: usize = 16 * 1024 * 1024;
/// Bytes of a Bind or FunctionCall body the tap sees.
const PREFIX: usize = 8 * 1024;
/// Bytes of a server message body the tap sees (error messages, tags).
pub const SERVER_PREFIX: usize = 1024;

struct Gate {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// `buf[start..cleared]` may be written.
    cleared: usize,
    /// Bytes of the current message still to forward as they arrive.
    stream_left: usize,
    /// Bytes of the current (replaced) message still to drop.
    skip_left: usize,
    inject: Vec<u8>,
    inject_pos: usize,
    /// A held message waiting for its record: its tag and length.
    wait: Option<(oneshot::Receiver<bool>, u8, usize)>,
    eof: bool,
    done: bool,
    need_flush: bool,
    bytes: u64,
    messages: u64,
    terminated: bool,
}

impl Gate {
    fn new() -> Self {
        Self {
            buf: vec![0; START_BUF_SIZE],
            start: 0,
            end: 0,
            cleared: 0,
            stream_left: 0,
            skip_left: 0,
            inject: Vec::new(),
            inject_pos: 0,
            wait: None,
            eof: false,
            done: false,
            need_flush: false,
            bytes: 0,
            messages: 0,
            terminated: false,
        }
    }

    fn apply(&mut self, verdict: Verdict, tag: u8, frame_len: usize) -> Result<(), ForwardError> {
        match verdict {
            Verdict::Forward => self.stream_left = frame_len,
            Verdict::Replace => {
                self.skip_left = frame_len;
                self.inject_pos = 0;
            }
            Verdict::Wait(rx) => self.wait = Some((rx, tag, frame_len)),
            Verdict::Close(why) => return Err(ForwardError::Audit(why)),
        }
        Ok(())
    }

    /// Decides on the message starting at `cleared`, if enough of it is
    /// here. Returns the bytes needed when it is not.
    fn judge(&mut self, tap: &mut SessionTap) -> Result<Option<usize>, ForwardError> {
        let Some(h) = parse_header(&self.buf[self.cleared..self.end], MAX_CLIENT_MESSAGE)? else {
            return Ok(Some(HEADER_LEN));
        };
        let frame_len = h.frame_len();
        let need = match h.tag {
            b'Q' | b'P' => frame_len,
            b'B' | b'E' | b'C' | b'F' | b'S' => frame_len.min(HEADER_LEN + PREFIX),
            _ => 0,
        };
        if need > HOLD_LIMIT {
            self.messages += 1;
            self.inject.clear();
            let sql = format!(
                "DO $rds_iam_proxy$BEGIN RAISE EXCEPTION USING ERRCODE = '54000', MESSAGE = \
                 'statement of {frame_len} bytes is longer than the {HOLD_LIMIT} bytes rds-iam-proxy can audit'; END$rds_iam_proxy$"
            );
            if h.tag == b'Q' {
                messages::write_query(&mut self.inject, &sql);
            } else {
                messages::write_parse(&mut self.inject, b"", &sql);
            }
            self.skip_left = frame_len;
            self.inject_pos = 0;
            return Ok(None);
        }
        if self.end - self.cleared < need {
            return Ok(Some(need));
        }
        self.messages += 1;
        if need == 0 {
            if h.tag == b'X' {
                self.terminated = true;
            }
            self.stream_left = frame_len;
            return Ok(None);
        }
        let body = &self.buf[self.cleared + HEADER_LEN..self.cleared + need];
        let verdict = tap.client_message(h.tag, body, need == frame_len, &mut self.inject);
        self.apply(verdict, h.tag, frame_len)?;
        Ok(None)
    }

    fn poll_pump<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        tap: &mut SessionTap,
    ) -> Poll<Result<(), ForwardError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let werr = |source| ForwardError::Io {
            side: Side::Upstream,
            source,
        };
        loop {
            // Order on the wire: bytes approved before a replacement, the
            // replacement, then what follows.
            if self.start < self.cleared {
                let n = ready!(
                    w.as_mut()
                        .poll_write(cx, &self.buf[self.start..self.cleared])
                )
                .map_err(werr)?;
                if n == 0 {
                    return Poll::Ready(Err(werr(io::ErrorKind::WriteZero.into())));
                }
                self.start += n;
                self.bytes += n as u64;
                self.need_flush = true;
                continue;
            }
            if self.inject_pos < self.inject.len() {
                let n = ready!(w.as_mut().poll_write(cx, &self.inject[self.inject_pos..]))
                    .map_err(werr)?;
                if n == 0 {
                    return Poll::Ready(Err(werr(io::ErrorKind::WriteZero.into())));
                }
                self.inject_pos += n;
                self.need_flush = true;
                continue;
            }
            if let Some((rx, tag, frame_len)) = &mut self.wait {
                let (tag, frame_len) = (*tag, *frame_len);
                let ok = match Pin::new(rx).poll(cx) {
                    Poll::Ready(r) => r.unwrap_or(false),
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(w.as_mut().poll_flush(cx)).map_err(werr)?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                };
                self.wait = None;
                if ok {
                    self.stream_left = frame_len;
                } else {
                    let verdict = tap.sink_failed(tag, &mut self.inject);
                    self.apply(verdict, tag, frame_len)?;
                }
                continue;
            }
            if self.skip_left > 0 && self.end > self.cleared {
                let n = self.skip_left.min(self.end - self.cleared);
                self.cleared += n;
                self.start = self.cleared;
                self.skip_left -= n;
                continue;
            }
            // Approve every message already here, so they leave in one
            // write (one TLS record) as they came.
            let mut need = HEADER_LEN;
            while self.wait.is_none()
                && self.skip_left == 0
                && self.inject_pos >= self.inject.len()
                && self.end > self.cleared
            {
                if self.stream_left > 0 {
                    let n = self.stream_left.min(self.end - self.cleared);
                    self.cleared += n;
                    self.stream_left -= n;
                    continue;
                }
                match self.judge(tap)? {
                    None => {}
                    Some(n) => {
                        need = n;
                        break;
                    }
                }
            }
            if self.start < self.cleared
                || self.inject_pos < self.inject.len()
                || self.wait.is_some()
                || (self.skip_left > 0 && self.end > self.cleared)
            {
                continue;
            }
            // Nothing more can be decided: read.
            if self.eof {
                ready!(w.as_mut().poll_flush(cx)).map_err(werr)?;
                let _ = ready!(w.as_mut().poll_shutdown(cx));
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            self.make_room(need);
            let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
            match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.eof = true;
                    }
                    self.end += n;
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.eof = true;
                }
                Poll::Ready(Err(source)) => {
                    return Poll::Ready(Err(ForwardError::Io {
                        side: Side::Client,
                        source,
                    }));
                }
                Poll::Pending => {
                    if self.need_flush {
                        ready!(w.as_mut().poll_flush(cx)).map_err(werr)?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Makes room to read, keeping `buf[start..end]` (all of it undecided
    /// or in-flight) and room for a message of `need` bytes.
    fn make_room(&mut self, need: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.cleared = 0;
            if self.buf.len() > 4 * BUF_SIZE {
                self.buf.truncate(BUF_SIZE);
                self.buf.shrink_to(BUF_SIZE);
            }
        }
        // A read filled the small starting buffer: this session sends
        // more than ordinary statements (COPY FROM, long batches).
        if self.end == self.buf.len() && self.buf.len() < BUF_SIZE {
            self.buf.resize(BUF_SIZE, 0);
        }
        if self.end < self.buf.len() && self.start + need <= self.buf.len() {
            return;
        }
        // Move what is pending to the front, then grow for a long message.
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.cleared -= self.start;
        self.start = 0;
        if need > self.buf.len() {
            self.buf.resize(need, 0);
        }
    }
}

/// Like [`crate::forward::forward`], with the tap in the path.
pub async fn forward_tapped<C, U>(
    client: &mut C,
    upstream: &mut U,
    tap: &mut SessionTap,
) -> Result<(Traffic, Ending), (Traffic, ForwardError)>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Gate::new();
    let mut down = Pipe::new();
    let mut capture = Capture::new(u32::MAX, SERVER_PREFIX);
    let logging = tap.logs();

    let result = poll_fn(|cx| {
        if !up.done
            && let Poll::Ready(r) =
                up.poll_pump(cx, Pin::new(&mut *client), Pin::new(&mut *upstream), tap)
        {
            r?;
        }
        if !down.done {
            let inspect = |chunk: &[u8]| {
                if logging {
                    capture
                        .feed(chunk, server_wanted, |t, b| tap.server_message(t, b))
                        .map_err(|e| ForwardError::Io {
                            side: Side::Upstream,
                            source: io::Error::new(io::ErrorKind::InvalidData, e),
                        })?;
                }
                Ok(())
            };
            if let Poll::Ready(r) = down.poll_pump(
                cx,
                Pin::new(&mut *upstream),
                Pin::new(&mut *client),
                Side::Upstream,
                inspect,
            ) {
                r?;
            }
        }
        if down.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;

    let traffic = Traffic {
        client_to_upstream: up.bytes,
        upstream_to_client: down.bytes,
        client_messages: up.messages,
    };
    crate::forward::finish(traffic, result, up.terminated, up.done)
}

/// Which server messages the audit reads, and how much of each: the ones
/// that end a statement or a transaction (tags, errors, ReadyForQuery).
pub fn server_wanted(tag: u8) -> Option<usize> {
    match tag {
        b'C' | b'E' | b'Z' | b'I' | b'V' | b's' => Some(SERVER_PREFIX),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tap::GUARD_SQL;
    use crate::audit::{AuditConfig, Auditor};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn q(sql: &str) -> Vec<u8> {
        let mut v = Vec::new();
        messages::write_query(&mut v, sql);
        v
    }

    /// Pipelined: allowed, refused, allowed, a long one, then Terminate;
    /// the server sees them in order with the refused one replaced.
    #[tokio::test]
    async fn refuses_in_place_and_keeps_order() {
        let (mut client, mut proxy_client) = tokio::io::duplex(64);
        let (mut proxy_up, mut server) = tokio::io::duplex(64);
        let auditor = Arc::new(Auditor {
            config: AuditConfig::default(),
            sink: None,
        });
        let task = tokio::spawn(async move {
            let mut tap = SessionTap::new(1, auditor);
            let r = forward_tapped(&mut proxy_client, &mut proxy_up, &mut tap).await;
            (r, tap.refused)
        });
        let long = format!("select '{}'", "x".repeat(100_000));
        let mut sent = Vec::new();
        sent.extend(q("select 1"));
        sent.extend(q("ALTER USER me PASSWORD 'SCRAM-SHA-256$4096:s$k:v'"));
        sent.extend(q("select 2"));
        sent.extend(q(&long));
        sent.extend([b'X', 0, 0, 0, 4]);
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        let mut expect = Vec::new();
        expect.extend(q("select 1"));
        expect.extend(q(GUARD_SQL));
        expect.extend(q("select 2"));
        expect.extend(q(&long));
        expect.extend([b'X', 0, 0, 0, 4]);
        assert_eq!(got.len(), expect.len());
        assert!(got == expect, "server saw different bytes");
        drop(server);
        writer.await.unwrap();
        let (r, refused) = task.await.unwrap();
        let (traffic, ending) = r.unwrap();
        assert_eq!(refused, 1);
        assert_eq!(ending, Ending::ClientTerminated);
        assert_eq!(traffic.client_messages, 5);
    }
}
