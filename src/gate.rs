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
//! - Bind, Execute, Close, Describe, FunctionCall, Sync, CopyDone and
//!   CopyFail are judged on their first [`PREFIX`] bytes; the rest
//!   streams.
//! - Everything else (CopyData, ...) streams untouched.
//!
//! The buffer is reused. It starts at 4 KiB, grows to 16 KiB the first
//! time a read fills it, grows further only for a Query or Parse longer
//! than that (as its bytes arrive, within a budget all sessions share:
//! [`crate::audit::limits`]) and shrinks back after. All state lives in [`Gate`], so the
//! future is cancel-safe in the same sense as `forward`.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::audit::tap::{Refusal, Verdict};
use crate::audit::{Auditor, SessionTap};
use crate::forward::{Ending, ForwardError, Pipe, Side, Stop, Traffic, server_protocol};
use crate::pg::frame::{HEADER_LEN, Header, MAX_CLIENT_MESSAGE, parse_header};
use crate::pg::messages::Capture;
use crate::sessions::{Counters, Tracker};

use crate::forward::{BUF_SIZE, START_BUF_SIZE};
/// Longest Query or Parse the gate holds; longer ones are refused.
pub const HOLD_LIMIT: usize = 16 * 1024 * 1024;
/// Bytes of a Bind or FunctionCall body the tap sees.
const PREFIX: usize = 8 * 1024;
/// Bytes of a server message body the tap sees (error messages, tags).
pub const SERVER_PREFIX: usize = 1024;

/// Bytes of a client message the gate holds before judging it: a whole
/// Query or Parse, the head of anything the server answers or that ends a
/// COPY, nothing of the rest (forwarded as it streams).
pub fn bytes_to_judge(h: &Header) -> usize {
    match h.tag {
        b'Q' | b'P' => h.frame_len(),
        b'B' | b'E' | b'C' | b'F' | b'S' | b'D' | b'c' | b'f' => {
            h.frame_len().min(HEADER_LEN + PREFIX)
        }
        _ => 0,
    }
}

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
    /// The message at `cleared` waits for the server to answer what came
    /// before it ([`Verdict::Hold`]); judged again after server messages.
    held: bool,
    /// A Flush was sent for the held message already.
    hold_flushed: bool,
    eof: bool,
    done: bool,
    /// Judge no further message ([`Stop`]): finish the one being
    /// forwarded, and leave what follows unread or unsent.
    stopping: bool,
    need_flush: bool,
    /// Bytes of `buf` past [`BUF_SIZE`], taken from the shared budget.
    reserved: usize,
    auditor: Arc<Auditor>,
    bytes: u64,
    messages: u64,
    terminated: bool,
    /// The session's live numbers for the status page.
    tracker: Tracker,
}

/// A Flush message: sent upstream when a message is held, so the server
/// delivers the answers it has buffered (it sends its output on its own
/// only at ReadyForQuery). It has no answer of its own.
const FLUSH: [u8; 5] = [b'H', 0, 0, 0, 4];

impl Gate {
    fn new(auditor: Arc<Auditor>) -> Self {
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
            held: false,
            hold_flushed: false,
            eof: false,
            done: false,
            stopping: false,
            need_flush: false,
            reserved: 0,
            auditor,
            bytes: 0,
            messages: 0,
            terminated: false,
            tracker: Tracker::default(),
        }
    }

    /// Nothing of a message is half sent: every byte approved is written,
    /// no message is being streamed, dropped or waits for its record. A
    /// held message has sent nothing yet.
    fn between_messages(&self) -> bool {
        self.start == self.cleared
            && self.inject_pos >= self.inject.len()
            && self.stream_left == 0
            && self.skip_left == 0
            && self.wait.is_none()
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
            Verdict::Hold => {
                self.held = true;
                if !self.hold_flushed {
                    self.hold_flushed = true;
                    self.inject.clear();
                    self.inject.extend_from_slice(&FLUSH);
                    self.inject_pos = 0;
                }
            }
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
        let need = bytes_to_judge(&h);
        if need > HOLD_LIMIT {
            self.refuse_long(tap, h.tag, frame_len, Refusal::TooLong);
            return Ok(None);
        }
        if self.end - self.cleared < need {
            return Ok(Some(need));
        }
        self.messages += 1;
        if need == 0 {
            self.tracker.client(h.tag);
            if h.tag == b'X' {
                self.terminated = true;
            }
            self.stream_left = frame_len;
            return Ok(None);
        }
        let body = &self.buf[self.cleared + HEADER_LEN..self.cleared + need];
        let verdict = tap.client_message(h.tag, body, need == frame_len, &mut self.inject);
        if matches!(verdict, Verdict::Hold) {
            self.messages -= 1;
        } else {
            self.hold_flushed = false;
            self.tracker.client(h.tag);
        }
        self.apply(verdict, h.tag, frame_len)?;
        Ok(None)
    }

    /// Refuses the Query or Parse at `cleared` without holding it: the
    /// tap records it and writes what the server runs instead (an error
    /// raised in place), and its bytes are dropped as they arrive.
    fn refuse_long(&mut self, tap: &mut SessionTap, tag: u8, frame_len: usize, why: Refusal) {
        self.messages += 1;
        self.tracker.client(tag);
        let here = &self.buf[self.cleared..self.end];
        let prefix = &here[HEADER_LEN.min(here.len())..];
        tap.refuse_long(tag, prefix, frame_len, why, &mut self.inject);
        self.skip_left = frame_len;
        self.inject_pos = 0;
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
            if self.stopping && self.between_messages() {
                return Poll::Ready(Ok(()));
            }
            if self.held {
                // Woken again once server messages arrived (see
                // `forward_tapped`), with `held` cleared, or once the
                // tap's parse of a long text is done.
                if tap.poll_parse(cx).is_ready() {
                    self.held = false;
                    continue;
                }
                if self.need_flush {
                    ready!(w.as_mut().poll_flush(cx)).map_err(werr)?;
                    self.need_flush = false;
                }
                return Poll::Pending;
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
                && !self.held
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
                if self.stopping {
                    break;
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
                || self.held
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
            if !self.make_room(need) {
                // Only a Query or Parse, judged above, asks for more
                // than the buffer: its header is here.
                let h = parse_header(&self.buf[self.cleared..self.end], MAX_CLIENT_MESSAGE)?
                    .ok_or_else(|| ForwardError::Io {
                        side: Side::Client,
                        source: io::Error::other("no header for a held message"),
                    })?;
                self.refuse_long(tap, h.tag, h.frame_len(), Refusal::NoMemory);
                continue;
            }
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
    /// or in-flight) for a message of `need` bytes. A long message grows
    /// the buffer as its bytes arrive (doubling), never by its declared
    /// length alone; growth past [`BUF_SIZE`] is taken from the budget
    /// all sessions share. Returns false when the budget is spent.
    fn make_room(&mut self, need: usize) -> bool {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.cleared = 0;
            if self.buf.len() > BUF_SIZE {
                self.resize(BUF_SIZE);
                self.buf.shrink_to(BUF_SIZE);
            }
        }
        // A read filled the small starting buffer: this session sends
        // more than ordinary statements (COPY FROM, long batches).
        if self.end == self.buf.len() && self.buf.len() < BUF_SIZE {
            self.buf.resize(BUF_SIZE, 0);
        }
        if self.end < self.buf.len() && self.start + need <= self.buf.len() {
            return true;
        }
        // Move what is pending to the front, then grow for a long message
        // once what is here fills the buffer.
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.cleared -= self.start;
        self.start = 0;
        if self.end == self.buf.len() && need > self.buf.len() {
            let to = need.min(self.buf.len() * 2);
            if !self.resize(to) {
                return false;
            }
        }
        true
    }

    /// Resizes the buffer, taking or giving back the bytes past
    /// [`BUF_SIZE`] from the shared budget.
    fn resize(&mut self, to: usize) -> bool {
        let want = to.saturating_sub(BUF_SIZE);
        if want > self.reserved {
            let budget = &self.auditor.limits.hold;
            if !budget.try_take(want - self.reserved) {
                budget.refused.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        } else {
            self.auditor.limits.hold.give(self.reserved - want);
        }
        self.reserved = want;
        self.buf.resize(to, 0);
        true
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.auditor.limits.hold.give(self.reserved);
    }
}

/// Like [`crate::forward::forward`], with the tap in the path.
pub async fn forward_tapped<C, U>(
    client: &mut C,
    upstream: &mut U,
    tap: &mut SessionTap,
    stop: &Stop,
    live: &Counters,
) -> Result<(Traffic, Ending), (Traffic, ForwardError)>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Gate::new(tap.auditor().clone());
    let mut down = Pipe::new();
    down.half_close = false;
    let mut capture = Capture::new(u32::MAX, SERVER_PREFIX);

    let mut stopped = false;
    let result = poll_fn(|cx| {
        let r = 'poll: loop {
            let stopping = stop.requested();
            if stopping {
                up.stopping = true;
                down.cap = Some(capture.scanner().to_boundary());
            }
            let before = (up.bytes, down.bytes, up.done);
            if !up.done
                && let Poll::Ready(r) =
                    up.poll_pump(cx, Pin::new(&mut *client), Pin::new(&mut *upstream), tap)
                && let Err(e) = r
            {
                break 'poll Poll::Ready(Err(e));
            }
            let mut answered = false;
            if !down.done {
                let tracker = &mut up.tracker;
                let inspect = |chunk: &[u8]| {
                    answered = true;
                    capture
                        .feed(chunk, server_wanted, |t, b| {
                            if t == b'Z'
                                && let Some(&status) = b.first()
                            {
                                tracker.ready(status);
                            }
                            tap.server_message(t, b)
                        })
                        .map_err(server_protocol)?;
                    Ok(capture.scanner().partial())
                };
                if let Poll::Ready(r) = down.poll_pump(
                    cx,
                    Pin::new(&mut *upstream),
                    Pin::new(&mut *client),
                    Side::Upstream,
                    inspect,
                ) && let Err(e) = r
                {
                    break 'poll Poll::Ready(Err(e));
                }
            }
            if down.done {
                break 'poll Poll::Ready(Ok(()));
            }
            if stopping {
                let client_quiet = up.done || up.between_messages();
                stop.note_client_whole(down.whole());
                if client_quiet && down.whole() {
                    stopped = true;
                    break 'poll Poll::Ready(Ok(()));
                }
                // Bytes moved under a cap: take the cap afresh.
                if (up.bytes, down.bytes, up.done) != before {
                    continue;
                }
            }
            // A held message is judged again once the server has said more.
            if up.held && answered {
                up.held = false;
                continue;
            }
            break 'poll Poll::Pending;
        };
        // Once per wake-up, not per message.
        up.tracker.publish(live, up.bytes, down.bytes);
        r
    })
    .await;

    stop.note_client_whole(down.whole());
    let traffic = Traffic {
        client_to_upstream: up.bytes,
        upstream_to_client: down.bytes,
        client_messages: up.messages,
    };
    let said_why = crate::forward::server_said_why(
        capture.scanner().to_boundary() == 0,
        capture.scanner().last_tag(),
    );
    crate::forward::finish(traffic, result, up.terminated, up.done, stopped, said_why)
}

/// Which server messages the tap reads, and how much of each: those that
/// answer a client message or change how the server reads the next ones
/// (ParameterStatus). Rows, copy data, notices and notifications pass.
pub fn server_wanted(tag: u8) -> Option<usize> {
    match tag {
        b'C' | b'E' | b'Z' | b'S' => Some(SERVER_PREFIX),
        b'1' | b'2' | b'3' | b'T' | b'n' | b'I' | b'V' | b's' | b'G' => Some(0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditConfig;
    use crate::audit::limits::HOLD_BUDGET;
    use crate::audit::tap::GUARD_SQL;
    use crate::pg::messages;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn q(sql: &str) -> Vec<u8> {
        let mut v = Vec::new();
        messages::write_query(&mut v, sql);
        v
    }

    /// Pipelined: allowed, refused, allowed, a long one, then Terminate;
    /// the server sees them in order with the refused one replaced (and
    /// judged only once what came before it was answered).
    #[tokio::test]
    async fn refuses_in_place_and_keeps_order() {
        let long = format!("select '{}'", "x".repeat(100_000));
        let mut sent = Vec::new();
        sent.extend(q("select 1"));
        sent.extend(q("ALTER USER me PASSWORD 'SCRAM-SHA-256$4096:s$k:v'"));
        sent.extend(q("select 2"));
        sent.extend(q(&long));
        sent.extend([b'X', 0, 0, 0, 4]);
        // Tiny pipes: every write and read is partial.
        let (got, r, refused) = through(auditor(HOLD_BUDGET), sent, 64).await;
        let mut expect = Vec::new();
        expect.extend(q("select 1"));
        expect.extend(FLUSH);
        expect.extend(q(GUARD_SQL));
        expect.extend(q("select 2"));
        expect.extend(q(&long));
        expect.extend([b'X', 0, 0, 0, 4]);
        let got = wire(&got);
        assert_eq!(got.len(), expect.len());
        assert!(got == expect, "server saw different bytes");
        let (traffic, ending) = r.unwrap();
        assert_eq!(refused, 1);
        assert_eq!(ending, Ending::ClientTerminated);
        assert_eq!(traffic.client_messages, 5);
    }

    /// Reads frames until the proxy closes, answering each Query with
    /// CommandComplete and ReadyForQuery; returns what arrived.
    async fn answer_queries(mut server: tokio::io::DuplexStream) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        loop {
            let mut header = [0u8; 5];
            if server.read_exact(&mut header).await.is_err() {
                return got;
            }
            let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
            let mut body = vec![0; len - 4];
            server.read_exact(&mut body).await.unwrap();
            if header[0] == b'Q' {
                let mut answer = Vec::new();
                answer.extend([b'C', 0, 0, 0, 13]);
                answer.extend(b"SELECT 1\0");
                answer.extend([b'Z', 0, 0, 0, 5, b'I']);
                server.write_all(&answer).await.unwrap();
            }
            got.push((header[0], body));
        }
    }

    /// Frames back as the bytes on the wire.
    fn wire(frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, body) in frames {
            out.push(*tag);
            out.extend((body.len() as u32 + 4).to_be_bytes());
            out.extend(body);
        }
        out
    }

    fn auditor(hold_bytes: usize) -> Arc<Auditor> {
        Arc::new(Auditor::from_parts(
            AuditConfig::default(),
            None,
            crate::audit::limits::Limits::new(hold_bytes),
        ))
    }

    type Session =
        tokio::task::JoinHandle<(Result<(Traffic, Ending), (Traffic, ForwardError)>, u64)>;

    /// A gate between two pipes of `size` bytes: the client's end, the
    /// server's end, and the session (its result and refusals).
    fn spawn_gate(
        auditor: Arc<Auditor>,
        size: usize,
    ) -> (tokio::io::DuplexStream, tokio::io::DuplexStream, Session) {
        let (client, mut proxy_client) = tokio::io::duplex(size);
        let (mut proxy_up, server) = tokio::io::duplex(size);
        let task = tokio::spawn(async move {
            let mut tap = SessionTap::new(1, auditor);
            let r = forward_tapped(
                &mut proxy_client,
                &mut proxy_up,
                &mut tap,
                &Stop::default(),
                &Counters::default(),
            )
            .await;
            (r, tap.refused)
        });
        (client, server, task)
    }

    /// The client's bytes through a gate to a server that answers each
    /// Query: what the server saw, the session's result, its refusals.
    async fn through(
        auditor: Arc<Auditor>,
        sent: Vec<u8>,
        size: usize,
    ) -> (
        Vec<(u8, Vec<u8>)>,
        Result<(Traffic, Ending), (Traffic, ForwardError)>,
        u64,
    ) {
        let (mut client, server, task) = spawn_gate(auditor, size);
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest).await;
        });
        let got = answer_queries(server).await;
        writer.await.unwrap();
        let (r, refused) = task.await.unwrap();
        (got, r, refused)
    }

    /// A stop sends nothing of a message the gate has not judged (a
    /// Query still arriving is held whole, so none of it has gone), and
    /// finishes the server's message in flight (one too long to hold back).
    #[tokio::test]
    async fn stop_sends_no_part_of_a_message() {
        let (mut client, mut proxy_client) = tokio::io::duplex(16 * 1024);
        let (mut proxy_up, mut server) = tokio::io::duplex(16 * 1024);
        let stop = Arc::new(Stop::default());
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut tap = SessionTap::new(1, auditor(HOLD_BUDGET));
                forward_tapped(
                    &mut proxy_client,
                    &mut proxy_up,
                    &mut tap,
                    &stop,
                    &Counters::default(),
                )
                .await
            }
        });
        let first = q("select 1");
        let mut row = Vec::new();
        row.extend([b'D', 0, 0, 0x0b, 0xc2, 0, 1, 0, 0, 0x0b, 0xb8]);
        row.extend([b'r'; 3000]);
        client.write_all(&first[..7]).await.unwrap();
        server.write_all(&row[..2500]).await.unwrap();
        let mut got = vec![0; 2500];
        client.read_exact(&mut got).await.unwrap();
        stop.request();
        client.write_all(&first[7..]).await.unwrap();
        server.write_all(&row[2500..]).await.unwrap();
        server.write_all(&row).await.unwrap();
        let (_, ending) = task.await.unwrap().unwrap();
        assert_eq!(ending, Ending::Stopped);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the server got {rest:?}");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest == row[2500..],
            "the client got more than the first DataRow"
        );
    }

    /// A Query that declares 16 MiB and sends 40 KiB costs about 40 KiB,
    /// not 16 MiB; everything is given back when the session ends.
    #[tokio::test]
    async fn a_long_statement_grows_the_buffer_as_it_arrives() {
        let auditor = auditor(HOLD_BUDGET);
        let (mut client, server, task) = spawn_gate(auditor.clone(), 64 * 1024);
        let declared = (HOLD_LIMIT - 1) as u32;
        let mut part = vec![b'Q'];
        part.extend(declared.to_be_bytes());
        part.extend(vec![b' '; 40 * 1024]);
        client.write_all(&part).await.unwrap();
        let hold = &auditor.limits.hold;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while hold.used() == 0 {
            assert!(std::time::Instant::now() < deadline, "the gate never grew");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let used = hold.used();
        assert!(used <= 2 * 40 * 1024, "{used} bytes held for 40 KiB");
        drop(client);
        drop(server);
        let _ = task.await.unwrap();
        assert_eq!(hold.used(), 0, "given back at the end of the session");
    }

    /// Past the shared budget a long statement is refused in place
    /// (53000) and the session goes on; the budget comes back.
    #[tokio::test]
    async fn a_statement_past_the_shared_budget_is_refused_in_place() {
        let auditor = auditor(1024 * 1024);
        let big = format!("select '{}'", "x".repeat(2 * 1024 * 1024));
        let fits = format!("select '{}'", "y".repeat(512 * 1024));
        let mut sent = q(&big);
        sent.extend(q(&fits));
        sent.extend(q("select 3"));
        let (got, _, _) = through(auditor.clone(), sent, 64 * 1024).await;
        let texts: Vec<String> = got
            .iter()
            .map(|(t, b)| {
                let s = String::from_utf8_lossy(b);
                format!("{} {}", *t as char, &s[..s.len().min(60)])
            })
            .collect();
        assert_eq!(got.len(), 3, "{texts:?}");
        let refused = String::from_utf8_lossy(&got[0].1);
        assert!(refused.contains("ERRCODE = '53000'"), "{refused}");
        assert!(
            refused.contains("statement of 2097167 bytes refused"),
            "{refused}"
        );
        assert_eq!(got[1].1, q(&fits)[5..], "the next long statement whole");
        assert_eq!(got[2].1, q("select 3")[5..]);
        assert_eq!(auditor.limits.hold.used(), 0);
        assert_eq!(auditor.limits.hold.refused.load(Ordering::Relaxed), 1);
    }

    /// A long text that mentions a password is read on a parser thread:
    /// a password change is refused, anything else forwarded as sent.
    #[tokio::test]
    async fn long_texts_are_parsed_off_the_event_loop() {
        let auditor = auditor(HOLD_BUDGET);
        let pad = "-".repeat(100 * 1024);
        let change = format!("ALTER ROLE me PASSWORD 'pw' -- {pad}");
        let other = format!("select 'no password here' -- {pad}");
        let mut sent = q(&change);
        sent.extend(q(&other));
        let (got, _, _) = through(auditor.clone(), sent, 64 * 1024).await;
        let queries: Vec<&Vec<u8>> = got
            .iter()
            .filter(|(t, _)| *t == b'Q')
            .map(|(_, b)| b)
            .collect();
        assert_eq!(queries.len(), 2);
        assert_eq!(queries[0][..], q(GUARD_SQL)[5..]);
        assert_eq!(queries[1][..], q(&other)[5..]);
        assert_eq!(auditor.limits.off_loop_parses.load(Ordering::Relaxed), 2);
    }
}
