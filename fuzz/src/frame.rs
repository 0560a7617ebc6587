//! Message framing (src/pg/frame.rs, and the `Capture` of
//! src/pg/messages.rs that the gate runs on the server's bytes): the same
//! stream cut into chunks in any way must yield the same frames as when it
//! is read whole with `split_frame`.
//!
//! Input: byte 0 picks the length limit, byte 1 what `Capture` keeps,
//! bytes 2..10 seed the random chunkings; the rest is the stream.
//!
//! Checks, for the whole stream, every split point in two (every one up to
//! 256 bytes, 48 of them beyond), byte-by-byte feeding and a few random
//! chunkings: the `Scanner` reports the headers the reference walk finds,
//! fails with the same error at the same frame, and says `at_boundary`
//! exactly when the stream ends between frames; `partial` (Scanner and
//! Capture alike) is the number of bytes of the unfinished frame at the end
//! and `last_tag` the tag of the last complete header; `Capture` reports each
//! complete wanted message with the first `min(wanted, max_keep)` bytes of
//! its body, never more than `max_keep`.

use rds_iam_proxy::pg::frame::{
    FrameError, HEADER_LEN, Header, MAX_CLIENT_MESSAGE, Scanner, parse_header, split_frame,
};
use rds_iam_proxy::pg::messages::Capture;

use crate::Rng;

/// What a correct reader finds in the whole stream.
#[derive(Debug, PartialEq)]
struct Found {
    headers: Vec<Header>,
    /// Complete messages Capture should report: tag and kept prefix.
    captured: Vec<(u8, Vec<u8>)>,
    error: Option<FrameError>,
    at_boundary: bool,
    /// Bytes of the frame the stream ends inside (0 on an error).
    partial: usize,
    last_tag: u8,
}

struct Setup {
    max_len: u32,
    max_keep: usize,
    want_sel: u8,
}

impl Setup {
    fn wanted(&self, tag: u8) -> Option<usize> {
        match tag.wrapping_add(self.want_sel) % 3 {
            0 => None,
            1 => Some(0),
            _ => Some(usize::from(self.want_sel) * 3),
        }
    }
}

/// The reference: `parse_header` and `split_frame` at each frame start.
fn reference(stream: &[u8], s: &Setup) -> Found {
    let mut f = Found {
        headers: Vec::new(),
        captured: Vec::new(),
        error: None,
        at_boundary: false,
        partial: 0,
        last_tag: 0,
    };
    let mut pos = 0usize;
    loop {
        let here = &stream[pos..];
        match parse_header(here, s.max_len) {
            Err(e) => {
                assert_eq!(split_frame(here, s.max_len), Err(e));
                f.error = Some(e);
                f.last_tag = 0;
                return f;
            }
            Ok(None) => {
                assert!(here.len() < HEADER_LEN);
                assert_eq!(split_frame(here, s.max_len), Ok(None));
                f.at_boundary = here.is_empty();
                f.partial = here.len();
                return f;
            }
            Ok(Some(h)) => {
                assert!(h.len >= 4 && h.len <= s.max_len);
                assert_eq!(h.frame_len(), h.body_len() + HEADER_LEN);
                f.headers.push(h);
                f.last_tag = h.tag;
                match split_frame(here, s.max_len).expect("header parsed above") {
                    Some((h2, body)) => {
                        assert_eq!(h2, h);
                        assert_eq!(body, &here[HEADER_LEN..h.frame_len()]);
                        if let Some(k) = s.wanted(h.tag) {
                            let keep = k.min(s.max_keep).min(body.len());
                            f.captured.push((h.tag, body[..keep].to_vec()));
                        }
                    }
                    None => {
                        // The stream ends inside this frame.
                        assert!(here.len() < h.frame_len());
                        f.partial = here.len();
                        return f;
                    }
                }
                pos += h.frame_len();
            }
        }
    }
}

/// Feeds `chunks` to a fresh Scanner and a fresh Capture.
fn feed<'a>(chunks: impl Iterator<Item = &'a [u8]> + Clone, s: &Setup) -> Found {
    let mut scanner = Scanner::new(s.max_len);
    let mut headers = Vec::new();
    let mut error = None;
    for c in chunks.clone() {
        if let Err(e) = scanner.feed(c, |h| headers.push(h)) {
            error = Some(e);
            break;
        }
    }
    let mut capture = Capture::new(s.max_len, s.max_keep);
    let mut captured = Vec::new();
    let mut capture_error = None;
    for c in chunks {
        let r = capture.feed(
            c,
            |t| s.wanted(t),
            |t, b| {
                assert!(b.len() <= s.max_keep, "Capture kept more than max_keep");
                captured.push((t, b.to_vec()));
            },
        );
        if let Err(e) = r {
            capture_error = Some(e);
            break;
        }
    }
    assert_eq!(error, capture_error, "Scanner and Capture disagree");
    if error.is_none() {
        assert_eq!(
            scanner.partial(),
            capture.scanner().partial(),
            "partial: Scanner and Capture disagree"
        );
        assert_eq!(
            scanner.last_tag(),
            capture.scanner().last_tag(),
            "last_tag: Scanner and Capture disagree"
        );
    }
    Found {
        headers,
        captured,
        error,
        at_boundary: error.is_none() && scanner.at_boundary(),
        partial: if error.is_none() {
            scanner.partial()
        } else {
            0
        },
        last_tag: if error.is_none() {
            scanner.last_tag()
        } else {
            0
        },
    }
}

pub fn check(data: &[u8]) {
    let Some((&[limit, keep, ..], _)) = data.split_first_chunk::<2>() else {
        return;
    };
    let seed = data.get(2..10).unwrap_or(&[]);
    let stream = data.get(10..).unwrap_or(&[]);
    let s = Setup {
        max_len: match limit % 4 {
            0 => MAX_CLIENT_MESSAGE,
            1 => u32::MAX,
            2 => 4 + u32::from(limit >> 2),
            _ => 4096,
        },
        max_keep: match keep % 4 {
            0 => 0,
            1 => 1,
            2 => usize::from(keep >> 2),
            _ => 1024,
        },
        want_sel: keep >> 2,
    };
    let want = reference(stream, &s);
    let whole = feed(std::iter::once(stream), &s);
    assert_eq!(whole, want, "whole stream");
    assert_eq!(feed(stream.chunks(1), &s), want, "byte by byte");
    let mut rng = Rng::new(seed);
    let cuts: Vec<usize> = if stream.len() <= 256 {
        (0..=stream.len()).collect()
    } else {
        (0..48)
            .map(|_| rng.next() as usize % (stream.len() + 1))
            .collect()
    };
    for at in cuts {
        let (a, b) = stream.split_at(at);
        assert_eq!(feed([a, b].into_iter(), &s), want, "split at {at}");
    }
    for _ in 0..4 {
        let max = rng.size(64);
        let mut chunks = Vec::new();
        let mut rest = stream;
        while !rest.is_empty() {
            let (a, b) = rest.split_at(rng.size(max).min(rest.len()));
            chunks.push(a);
            rest = b;
        }
        assert_eq!(
            feed(chunks.iter().copied(), &s),
            want,
            "chunks {:?}",
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>()
        );
    }
}
