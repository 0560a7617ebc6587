//! Which local OS user is on the other end of a loopback or unix connection.
//!
//! On a shared laptop or bastion any local process that can reach the
//! listener would act as the person running the proxy. So, by default, only
//! the OS user that runs the proxy may connect over a unix socket or a
//! loopback TCP address. Unix sockets report the peer through SO_PEERCRED;
//! for loopback TCP the peer's socket is in this network namespace's
//! `/proc/net/tcp{,6}`, with its owner's uid. Connections to non-loopback
//! addresses come from other hosts and are not checked here (TLS is
//! required for them).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;

use thiserror::Error;

/// How to learn the OS user behind a connection.
#[derive(Debug, Clone)]
pub enum LocalPeer {
    /// From another host: not checked.
    Remote,
    /// Loopback TCP: the peer's socket is in this namespace's tables.
    Tcp { peer: SocketAddr, local: SocketAddr },
    /// Unix socket: SO_PEERCRED, read at accept.
    Unix { uid: Option<u32> },
}

/// Refuses a local peer that the policy does not allow. Reads
/// `/proc/net/tcp{,6}` for loopback TCP (a few microseconds per hundred
/// sockets), called once per connection, off the accept loop.
pub fn check(policy: &PeerPolicy, peer: &LocalPeer) -> Result<(), PeerRefusal> {
    if *policy == PeerPolicy::Any {
        return Ok(());
    }
    let uid = match peer {
        LocalPeer::Remote => return Ok(()),
        LocalPeer::Unix { uid } => *uid,
        LocalPeer::Tcp { peer, local } => tcp_peer_uid(*peer, *local).ok().flatten(),
    };
    match uid {
        Some(uid) if policy.allows(uid) => Ok(()),
        Some(uid) => Err(PeerRefusal::OtherUser {
            user: user_label(uid),
            owner: policy.owner(),
        }),
        None => Err(PeerRefusal::Unknown),
    }
}

/// Who may connect over loopback TCP and unix sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Any local user (the operator chose `--allow-local-user any`).
    Any,
    /// These uids only (always including the proxy's own).
    Uids(Vec<u32>),
}

impl PeerPolicy {
    /// The default, plus the users named in `allow` (names, uids or `any`).
    pub fn from_allow_list(own_uid: u32, allow: &[String]) -> Result<Self, PeerError> {
        if allow.iter().any(|a| a == "any") {
            return Ok(PeerPolicy::Any);
        }
        let mut uids = vec![own_uid];
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        for a in allow {
            let uid = match a.parse::<u32>() {
                Ok(uid) => uid,
                Err(_) => uid_of(&passwd, a).ok_or_else(|| PeerError::UnknownUser(a.clone()))?,
            };
            if !uids.contains(&uid) {
                uids.push(uid);
            }
        }
        Ok(PeerPolicy::Uids(uids))
    }

    pub fn allows(&self, uid: u32) -> bool {
        match self {
            PeerPolicy::Any => true,
            PeerPolicy::Uids(u) => u.contains(&uid),
        }
    }

    /// The proxy's own user, for messages.
    fn owner(&self) -> String {
        match self {
            PeerPolicy::Uids(u) if !u.is_empty() => user_label(u[0]),
            _ => "another user".into(),
        }
    }

    /// For the start-up log.
    pub fn describe(&self) -> String {
        match self {
            PeerPolicy::Any => "any local user".into(),
            PeerPolicy::Uids(u) => {
                let names: Vec<String> = u.iter().map(|&uid| user_label(uid)).collect();
                names.join(", ")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PeerError {
    #[error("--allow-local-user {0:?}: no such OS user (give a user name, a uid, or \"any\")")]
    UnknownUser(String),
    #[error("cannot tell which OS user the proxy runs as: {0}")]
    OwnUid(String),
}

/// Why a local peer was refused (logged, and told to the client).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PeerRefusal {
    #[error("local OS user {user} may not use this proxy (it runs as {owner})")]
    OtherUser { user: String, owner: String },
    #[error("the OS user behind this local connection cannot be determined")]
    Unknown,
}

/// The effective uid of this process (the owner of `/proc/self`), without
/// FFI.
pub fn own_uid() -> Result<u32, PeerError> {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| PeerError::OwnUid(e.to_string()))
}

/// `name (uid N)`, or `uid N` for a uid without a passwd entry.
pub fn user_label(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    match name_of(&passwd, uid) {
        Some(n) => format!("\"{n}\" (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = (&str, u32)> {
    passwd.lines().filter_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let uid = f.nth(1)?.parse().ok()?;
        Some((name, uid))
    })
}

fn uid_of(passwd: &str, name: &str) -> Option<u32> {
    passwd_entries(passwd)
        .find(|(n, _)| *n == name)
        .map(|(_, u)| u)
}

fn name_of(passwd: &str, uid: u32) -> Option<&str> {
    passwd_entries(passwd)
        .find(|(_, u)| *u == uid)
        .map(|(n, _)| n)
}

/// The uid owning the client end of an accepted loopback TCP connection:
/// the socket whose local address is the peer's and whose remote address is
/// ours. `None` if it is gone (the client already closed) or not local.
pub fn tcp_peer_uid(peer: SocketAddr, local: SocketAddr) -> io::Result<Option<u32>> {
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Some(uid) = find_owner(&text, peer, local) {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

/// Scans a `/proc/net/tcp{,6}` table: `sl local rem st tx:rx tr:when
/// retrnsmt uid ...`.
fn find_owner(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let mut f = line.split_whitespace();
        let (_sl, l, r) = (f.next()?, f.next()?, f.next()?);
        let uid = f.nth(4)?;
        (same_addr(parse_addr(l)?, peer) && same_addr(parse_addr(r)?, local))
            .then(|| uid.parse().ok())
            .flatten()
    })
}

/// IPv4-mapped IPv6 and IPv4 are the same endpoint.
fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canon(a.ip()) == canon(b.ip())
}

/// `0100007F:1F90` (IPv4) or 32 hex digits + port (IPv6). Each 32-bit word
/// is printed as the number the kernel holds in memory, so its bytes are in
/// native order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_client_end_of_a_loopback_connection() {
        let word = |b: [u8; 4]| format!("{:08X}", u32::from_ne_bytes(b));
        let lo = word([127, 0, 0, 1]);
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {lo}:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n\
             1: {lo}:1538 {lo}:D431 01 00000000:00000000 00:00000000 00000000     0        0 2\n\
             2: {lo}:D431 {lo}:1538 01 00000000:00000000 00:00000000 00000000 65534        0 3\n"
        );
        let proxy: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        assert_eq!(find_owner(&table, client, proxy), Some(65534));
        assert_eq!(find_owner(&table, proxy, client), Some(0));
        let other: SocketAddr = "127.0.0.1:54322".parse().unwrap();
        assert_eq!(find_owner(&table, other, proxy), None);
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        let mut hex = String::new();
        for w in Ipv6Addr::LOCALHOST.octets().chunks(4) {
            hex.push_str(&format!(
                "{:08X}",
                u32::from_ne_bytes([w[0], w[1], w[2], w[3]])
            ));
        }
        let a = parse_addr(&format!("{hex}:0050")).unwrap();
        assert_eq!(a, "[::1]:80".parse().unwrap());
        assert!(same_addr(
            "[::ffff:127.0.0.1]:5".parse().unwrap(),
            "127.0.0.1:5".parse().unwrap()
        ));
        assert_eq!(parse_addr("zz:0050"), None);
        assert_eq!(parse_addr("0100007F"), None);
    }

    #[test]
    fn real_connection_is_found_with_our_uid() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let uid = tcp_peer_uid(peer, l.local_addr().unwrap()).unwrap();
        assert_eq!(uid, Some(own_uid().unwrap()));
    }

    #[test]
    fn policy_from_allow_list() {
        let p = PeerPolicy::from_allow_list(1000, &[]).unwrap();
        assert!(p.allows(1000) && !p.allows(0));
        let p = PeerPolicy::from_allow_list(1000, &["0".into(), "root".into()]).unwrap();
        assert_eq!(p, PeerPolicy::Uids(vec![1000, 0]));
        assert!(
            PeerPolicy::from_allow_list(1, &["any".into()])
                .unwrap()
                .allows(7)
        );
        assert!(matches!(
            PeerPolicy::from_allow_list(1, &["no-such-user-here".into()]),
            Err(PeerError::UnknownUser(_))
        ));
    }
}
