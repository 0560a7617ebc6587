//! Framing of tagged protocol messages: one tag byte, then a big-endian
//! `u32` length that counts itself but not the tag.

use thiserror::Error;

/// Bytes in a message header (tag + length).
pub const HEADER_LEN: usize = 5;

/// Largest message PostgreSQL itself accepts from a client (1 GiB - 1).
pub const MAX_CLIENT_MESSAGE: u32 = 0x3fff_ffff;

/// The header of one tagged message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type byte, e.g. `b'Q'`.
    pub tag: u8,
    /// Length field as sent: body length + 4.
    pub len: u32,
}

impl Header {
    /// Length of the body that follows the header.
    pub fn body_len(&self) -> usize {
        self.len as usize - 4
    }

    /// Length of the whole frame, header included.
    pub fn frame_len(&self) -> usize {
        self.len as usize + 1
    }
}

/// A header whose length field cannot be right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The length field is below 4, which cannot even cover itself.
    #[error("message {tag:?} declares length {len}, below the minimum of 4")]
    TooShort { tag: char, len: u32 },
    /// The length field exceeds the limit for this stream.
    #[error("message {tag:?} declares length {len}, above the limit of {max}")]
    TooLong { tag: char, len: u32, max: u32 },
}

/// Reads and checks a header from the first five bytes of `buf`.
pub fn parse_header(buf: &[u8], max_len: u32) -> Result<Option<Header>, FrameError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let tag = h[0];
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    if len < 4 {
        return Err(FrameError::TooShort {
            tag: tag as char,
            len,
        });
    }
    if len > max_len {
        return Err(FrameError::TooLong {
            tag: tag as char,
            len,
            max: max_len,
        });
    }
    Ok(Some(Header { tag, len }))
}

/// Returns the complete frame at the front of `buf`, as its header and body.
pub fn split_frame(buf: &[u8], max_len: u32) -> Result<Option<(Header, &[u8])>, FrameError> {
    let Some(header) = parse_header(buf, max_len)? else {
        return Ok(None);
    };
    match buf.get(HEADER_LEN..header.frame_len()) {
        Some(body) => Ok(Some((header, body))),
        None => Ok(None),
    }
}

/// Assembles one header from bytes that arrive in arbitrary chunks; shared
/// by every streaming reader of tagged messages.
#[derive(Debug, Clone)]
pub struct HeaderReader {
    max_len: u32,
    header: [u8; HEADER_LEN],
    have: usize,
}

impl HeaderReader {
    /// A reader that rejects messages longer than `max_len`.
    pub fn new(max_len: u32) -> Self {
        Self {
            max_len,
            header: [0; HEADER_LEN],
            have: 0,
        }
    }

    /// True when no header byte is pending.
    pub fn is_empty(&self) -> bool {
        self.have == 0
    }

    /// Header bytes taken so far of a header not yet complete.
    pub fn have(&self) -> usize {
        self.have
    }

    /// Header bytes still to come once one has started; 0 between messages.
    pub fn missing(&self) -> usize {
        if self.have == 0 {
            0
        } else {
            HEADER_LEN - self.have
        }
    }

    /// Takes header bytes from the front of `chunk`, advancing it; returns
    /// the header once all five bytes are in.
    pub fn take(&mut self, chunk: &mut &[u8]) -> Result<Option<Header>, FrameError> {
        let take = (HEADER_LEN - self.have).min(chunk.len());
        self.header[self.have..self.have + take].copy_from_slice(&chunk[..take]);
        self.have += take;
        *chunk = &chunk[take..];
        if self.have < HEADER_LEN {
            return Ok(None);
        }
        self.have = 0;
        parse_header(&self.header, self.max_len)
    }
}

/// Follows message boundaries through a byte stream that arrives in
/// arbitrary chunks, without buffering message bodies.
///
/// The forwarding path feeds every chunk it relays; the scanner reports each
/// header as it completes, so a later stage can act per message while the
/// bytes themselves are forwarded untouched.
#[derive(Debug, Clone)]
pub struct Scanner {
    header: HeaderReader,
    remaining: usize,
    /// Length (header included) of the message being fed, and its tag.
    len: usize,
    tag: u8,
}

impl Scanner {
    /// A scanner that rejects messages longer than `max_len`.
    pub fn new(max_len: u32) -> Self {
        Self {
            header: HeaderReader::new(max_len),
            remaining: 0,
            len: 0,
            tag: 0,
        }
    }

    /// Bytes of the unfinished message fed so far; 0 between messages.
    pub fn partial(&self) -> usize {
        if self.remaining > 0 {
            self.len - self.remaining
        } else {
            self.header.have()
        }
    }

    /// The tag of the last message whose header was complete (0 before any).
    pub fn last_tag(&self) -> u8 {
        self.tag
    }

    /// True when the stream is between two messages.
    pub fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.remaining == 0
    }

    /// Most bytes that can be read without passing the end of the current
    /// message (its header first, then its body); 0 between messages.
    pub fn to_boundary(&self) -> usize {
        if self.remaining > 0 {
            self.remaining
        } else {
            self.header.missing()
        }
    }

    /// Consumes `chunk`, calling `on_header` for every header completed in it.
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        mut on_header: impl FnMut(Header),
    ) -> Result<(), FrameError> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = self.take_body(chunk.len());
                chunk = &chunk[n..];
            } else if let Some(header) = self.take_header(&mut chunk)? {
                on_header(header);
            }
        }
        Ok(())
    }

    /// Like [`Scanner::feed`], also handing `on_header` the part of the
    /// message's body that follows its header in this chunk (possibly
    /// empty): enough to read a short message such as ReadyForQuery
    /// without buffering.
    pub fn feed_peek(
        &mut self,
        mut chunk: &[u8],
        mut on_header: impl FnMut(Header, &[u8]),
    ) -> Result<(), FrameError> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = self.take_body(chunk.len());
                chunk = &chunk[n..];
            } else if let Some(header) = self.take_header(&mut chunk)? {
                on_header(header, &chunk[..header.body_len().min(chunk.len())]);
            }
        }
        Ok(())
    }

    /// Between bodies: takes header bytes from the front of `chunk`
    /// (advancing it) and, once the header is whole, starts its message
    /// and returns the header.
    pub(crate) fn take_header(&mut self, chunk: &mut &[u8]) -> Result<Option<Header>, FrameError> {
        debug_assert_eq!(self.remaining, 0);
        let header = self.header.take(chunk)?;
        if let Some(h) = header {
            self.remaining = h.body_len();
            self.len = h.frame_len();
            self.tag = h.tag;
        }
        Ok(header)
    }

    /// Takes up to `available` bytes of the current body; returns how many.
    pub(crate) fn take_body(&mut self, available: usize) -> usize {
        let n = self.remaining.min(available);
        self.remaining -= n;
        n
    }

    /// Body bytes of the current message still to come.
    pub(crate) fn remaining(&self) -> usize {
        self.remaining
    }
}

/// Appends a message with `tag`, writing the body through `body`, and fills
/// in the length afterwards.
pub fn write_message(out: &mut bytes::BytesMut, tag: u8, body: impl FnOnce(&mut bytes::BytesMut)) {
    use bytes::BufMut;
    out.put_u8(tag);
    let len_at = out.len();
    out.put_u32(0);
    body(out);
    let len = (out.len() - len_at) as u32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        write_message(&mut out, tag, |b| b.extend_from_slice(body));
        out.to_vec()
    }

    #[test]
    fn split_needs_whole_frame() {
        let m = msg(b'Q', b"select 1\0");
        for cut in 0..m.len() {
            assert_eq!(split_frame(&m[..cut], MAX_CLIENT_MESSAGE).unwrap(), None);
        }
        let (h, body) = split_frame(&m, MAX_CLIENT_MESSAGE).unwrap().unwrap();
        assert_eq!(h.tag, b'Q');
        assert_eq!(body, b"select 1\0");
    }

    #[test]
    fn bad_lengths_are_errors() {
        assert!(matches!(
            parse_header(&[b'Q', 0, 0, 0, 3], 100),
            Err(FrameError::TooShort { len: 3, .. })
        ));
        assert!(matches!(
            parse_header(&[b'Q', 0, 0, 1, 0], 100),
            Err(FrameError::TooLong { len: 256, .. })
        ));
    }

    #[test]
    fn scanner_finds_every_header_in_any_chunking() {
        let mut stream = Vec::new();
        stream.extend(msg(b'P', b"\0select $1\0\0\0"));
        stream.extend(msg(b'B', &[0; 12]));
        stream.extend(msg(b'E', b"\0\0\0\0\0"));
        stream.extend(msg(b'S', b""));
        for chunk_size in 1..stream.len() {
            let mut scanner = Scanner::new(MAX_CLIENT_MESSAGE);
            let mut tags = Vec::new();
            for chunk in stream.chunks(chunk_size) {
                scanner.feed(chunk, |h| tags.push(h.tag)).unwrap();
            }
            assert_eq!(tags, b"PBES", "chunk size {chunk_size}");
            assert!(scanner.at_boundary());
        }
    }

    /// The peeked body is the message's own bytes, cut at the chunk's end.
    #[test]
    fn peek_sees_the_body_in_the_same_chunk() {
        let mut stream = msg(b'C', b"SELECT 1\0");
        stream.extend(msg(b'Z', b"T"));
        for chunk_size in 1..=stream.len() {
            let mut scanner = Scanner::new(MAX_CLIENT_MESSAGE);
            let mut seen = Vec::new();
            for chunk in stream.chunks(chunk_size) {
                scanner
                    .feed_peek(chunk, |h, body| seen.push((h.tag, body.to_vec())))
                    .unwrap();
            }
            assert_eq!(seen.len(), 2);
            assert!(b"SELECT 1\0".starts_with(&seen[0].1));
            assert!(b"T".starts_with(&seen[1].1), "chunk size {chunk_size}");
        }
    }

    #[test]
    fn scanner_rejects_oversized() {
        let mut scanner = Scanner::new(16);
        let err = scanner.feed(&msg(b'Q', &[b'x'; 20]), |_| {}).unwrap_err();
        assert!(matches!(err, FrameError::TooLong { len: 24, .. }));
    }
}
