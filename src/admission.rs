//! Admission of accepted sockets before anything is known about them.
//!
//! A socket is a handshake from accept until its startup packet is read
//! (or the handshake timeout ends it). Handshakes are bounded on their
//! own, in all and per remote source address, so that idle or slow
//! sockets cannot take the places of sessions: a session slot
//! (`max_connections`) is taken only once a startup packet has arrived.
//!
//! Loopback and unix sockets count toward the overall bound only: every
//! local user shares 127.0.0.1, and the local peer check, not the
//! address, tells them apart.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Where a handshake comes from, for the per-source bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A client on another machine.
    Remote(IpAddr),
    /// Loopback TCP or a unix socket.
    Local,
}

impl Source {
    /// The source of a TCP peer address.
    pub fn of(addr: IpAddr) -> Self {
        if addr.is_loopback() {
            Source::Local
        } else {
            Source::Remote(addr)
        }
    }
}

/// Why a handshake was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max_handshakes` are in progress.
    All(usize),
    /// `max_handshakes_per_source` are in progress from this address.
    Source(IpAddr, usize),
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::All(n) => write!(f, "{n} handshakes in progress (--max-handshakes)"),
            Full::Source(ip, n) => write!(
                f,
                "{n} handshakes in progress from {ip} (--max-handshakes-per-source)"
            ),
        }
    }
}

/// The handshakes in progress. Touched once at accept and once when the
/// startup packet is read, under a short lock; the map holds only
/// sources with a handshake in progress, so it is bounded by
/// `max_handshakes`.
#[derive(Debug, Default)]
pub struct Handshakes {
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    remote: HashMap<IpAddr, usize>,
}

/// A place among the handshakes in progress, given back on drop.
#[derive(Debug)]
pub struct HandshakePlace {
    owner: Arc<Handshakes>,
    source: Source,
}

impl Handshakes {
    /// Takes a place for a handshake from `source` unless `max` are in
    /// progress, or `per_source` from the same remote address.
    pub fn enter(
        self: &Arc<Self>,
        source: Source,
        max: usize,
        per_source: usize,
    ) -> Result<HandshakePlace, Full> {
        let mut counts = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= max {
            return Err(Full::All(max));
        }
        if let Source::Remote(ip) = source {
            let n = counts.remote.entry(ip).or_insert(0);
            if *n >= per_source {
                return Err(Full::Source(ip, per_source));
            }
            *n += 1;
        }
        counts.total += 1;
        Ok(HandshakePlace {
            owner: self.clone(),
            source,
        })
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for HandshakePlace {
    fn drop(&mut self) {
        let mut counts = self
            .owner
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.total -= 1;
        if let Source::Remote(ip) = self.source
            && let Some(n) = counts.remote.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                counts.remote.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// One address cannot take more than its share; others still get in;
    /// the overall bound holds for local and remote alike; places come
    /// back on drop and the map forgets sources with none.
    #[test]
    fn bounds_hold_in_all_and_per_source_and_free_on_drop() {
        let h = Arc::new(Handshakes::default());
        let a = Source::of(ip("203.0.113.7"));
        let b = Source::of(ip("198.51.100.2"));
        assert_eq!(Source::of(ip("127.0.0.1")), Source::Local);
        assert_eq!(Source::of(ip("::1")), Source::Local);

        let from_a: Vec<_> = (0..2).map(|_| h.enter(a, 5, 2).unwrap()).collect();
        assert_eq!(
            h.enter(a, 5, 2).unwrap_err(),
            Full::Source(ip("203.0.113.7"), 2)
        );
        let from_b = h.enter(b, 5, 2).unwrap();
        // Local sockets have no per-source share, only the overall bound.
        let local: Vec<_> = (0..2)
            .map(|_| h.enter(Source::Local, 5, 2).unwrap())
            .collect();
        assert_eq!(h.in_progress(), 5);
        assert_eq!(h.enter(Source::Local, 5, 2).unwrap_err(), Full::All(5));
        assert_eq!(h.enter(b, 5, 2).unwrap_err(), Full::All(5));

        drop(from_a);
        assert_eq!(h.in_progress(), 3);
        let again = h.enter(a, 5, 2).unwrap();
        drop((again, from_b, local));
        assert_eq!(h.in_progress(), 0);
        assert!(h.inner.lock().unwrap().remote.is_empty());
    }
}
