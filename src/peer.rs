//! Which local OS user is on the other end of a loopback or unix connection.
//!
//! On a shared laptop or bastion any local process that can reach the
//! listener would act as the person running the proxy. So, by default, only
//! the OS user that runs the proxy may connect over a unix socket or a
//! loopback TCP address. Unix sockets report the peer through SO_PEERCRED;
//! for loopback TCP the peer's socket is in this network namespace, and the
//! kernel tells its owner's uid through sock_diag (one exact lookup by
//! address and ports over a netlink socket). `/proc/net/tcp{,6}` holds the
//! same and is the fallback, but reading it walks every socket on the host:
//! about 10 ms with 500 sockets, against tens of microseconds for sock_diag. Connections to non-loopback
//! addresses come from other hosts and are not checked here (TLS is
//! required for them).
//!
//! The check runs when the connection is accepted, before any byte of it
//! is read, and only a live socket counts: one still open in a process
//! (its inode is not 0) and not in TIME_WAIT. A client that closes its
//! end is no longer anyone's, and the kernel reports uid 0 for what is
//! left of it; such a connection is refused, never judged as root. Nothing
//! here blocks a session worker: the netlink reply is read without
//! blocking, and the `/proc` fallback and `/etc/passwd` run on the
//! blocking pool.

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

/// Refuses a local peer that the policy does not allow. For loopback TCP
/// this is one sock_diag round trip (about 25 us), once per connection, in
/// the connection's task rather than the accept loop, before the
/// connection's first byte is read.
pub async fn check(policy: &PeerPolicy, peer: &LocalPeer) -> Result<(), PeerRefusal> {
    if *policy == PeerPolicy::Any {
        return Ok(());
    }
    let uid = match peer {
        LocalPeer::Remote => return Ok(()),
        LocalPeer::Unix { uid } => *uid,
        LocalPeer::Tcp { peer, local } => match tcp_peer_uid(*peer, *local).await {
            Ok(uid) => uid,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up the local user behind a loopback connection");
                None
            }
        },
    };
    match uid {
        Some(uid) if policy.allows(uid) => Ok(()),
        Some(uid) => {
            let user = tokio::task::spawn_blocking(move || user_label(uid))
                .await
                .unwrap_or_else(|_| format!("uid {uid}"));
            Err(PeerRefusal::OtherUser {
                user,
                owner: policy.owner(),
            })
        }
        None => Err(PeerRefusal::Unknown),
    }
}

/// Who may connect over loopback TCP and unix sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Any local user (the operator chose `--allow-local-user any`).
    Any,
    /// These uids only (the proxy's own first), and how to name the
    /// proxy's own user in messages (read once, at start).
    Uids { uids: Vec<u32>, owner: String },
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
        let owner = user_label(own_uid);
        Ok(PeerPolicy::Uids { uids, owner })
    }

    pub fn allows(&self, uid: u32) -> bool {
        match self {
            PeerPolicy::Any => true,
            PeerPolicy::Uids { uids, .. } => uids.contains(&uid),
        }
    }

    /// The proxy's own user, for messages.
    fn owner(&self) -> String {
        match self {
            PeerPolicy::Uids { owner, .. } => owner.clone(),
            PeerPolicy::Any => "another user".into(),
        }
    }

    /// For the start-up log.
    pub fn describe(&self) -> String {
        match self {
            PeerPolicy::Any => "any local user".into(),
            PeerPolicy::Uids { uids, .. } => {
                let names: Vec<String> = uids.iter().map(|&uid| user_label(uid)).collect();
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
    #[error(
        "the OS user behind this local connection cannot be determined (the client closed its end, or the kernel does not tell)"
    )]
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
/// the live socket whose local address is the peer's and whose remote
/// address is ours. `None` if there is none (the client already closed,
/// or it is not local).
pub async fn tcp_peer_uid(peer: SocketAddr, local: SocketAddr) -> io::Result<Option<u32>> {
    match sock_diag_uid(peer, local).await {
        Ok(found) => return Ok(found),
        Err(e) => tracing::debug!(error = %e, "sock_diag lookup failed; reading /proc/net/tcp"),
    }
    tokio::task::spawn_blocking(move || proc_net_tcp_uid(peer, local))
        .await
        .map_err(io::Error::other)?
}

/// Whether the fast lookup (sock_diag over netlink) works here; when it
/// does not (a seccomp or systemd address-family filter without
/// AF_NETLINK, say), every loopback connection reads `/proc/net/tcp`.
pub async fn fast_path_error() -> Option<io::Error> {
    let nowhere: SocketAddr = "127.0.0.1:1".parse().expect("valid address");
    sock_diag_uid(nowhere, nowhere).await.err()
}

fn proc_net_tcp_uid(peer: SocketAddr, local: SocketAddr) -> io::Result<Option<u32>> {
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

/// TCP states (the kernel's numbering) in which a socket can belong to a
/// process that still holds it. TIME_WAIT (6), CLOSE (7), LISTEN (10) and
/// the SYN_RECV states (3, 12) are left out: what the kernel keeps of those
/// has no owner, and it reports uid 0 for it.
const LIVE_STATES: [u8; 6] = [
    1,  // ESTABLISHED
    4,  // FIN_WAIT1
    5,  // FIN_WAIT2
    8,  // CLOSE_WAIT
    9,  // LAST_ACK
    11, // CLOSING
];

/// A socket's owner counts only if it is live: in a live state and still
/// open in some process (an orphaned socket's inode is 0).
fn live_owner(state: u8, uid: u32, inode: u64) -> Option<u32> {
    (LIVE_STATES.contains(&state) && inode != 0).then_some(uid)
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const AF_NETLINK: i32 = 16;
const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const IPPROTO_TCP: u8 = 6;
const NLMSG_HDR: usize = 16;
/// nlmsghdr + inet_diag_req_v2 (family, protocol, ext, pad, states, sockid).
const REQUEST_LEN: usize = NLMSG_HDR + 8 + SOCKID_LEN;
/// inet_diag_sockid: sport, dport (big endian), src[4], dst[4], if, cookie[2].
const SOCKID_LEN: usize = 48;
/// Offset of idiag_uid in a reply: header, family/state/timer/retrans,
/// sockid, expires/rqueue/wqueue.
const UID_AT: usize = NLMSG_HDR + 4 + SOCKID_LEN + 12;

/// The sock_diag request for the socket whose local end is `peer` and whose
/// remote end is `local` (the client's socket).
fn sock_diag_request(peer: SocketAddr, local: SocketAddr) -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    r[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    r[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
    let req = &mut r[NLMSG_HDR..];
    req[0] = if peer.is_ipv4() { AF_INET } else { AF_INET6 };
    req[1] = IPPROTO_TCP;
    let states = LIVE_STATES.iter().fold(0u32, |m, s| m | 1 << s);
    req[4..8].copy_from_slice(&states.to_ne_bytes());
    let id = &mut req[8..];
    id[0..2].copy_from_slice(&peer.port().to_be_bytes());
    id[2..4].copy_from_slice(&local.port().to_be_bytes());
    let addr = |ip: IpAddr| -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&v4.octets());
                b
            }
            IpAddr::V6(v6) => v6.octets(),
        }
    };
    id[4..20].copy_from_slice(&addr(peer.ip()));
    id[20..36].copy_from_slice(&addr(local.ip()));
    // Interface 0 (any); cookie INET_DIAG_NOCOOKIE: look up by address.
    id[40..48].copy_from_slice(&[0xff; 8]);
    r
}

/// The uid in a sock_diag reply; `Ok(None)` for "no such live socket".
fn parse_sock_diag_reply(reply: &[u8]) -> io::Result<Option<u32>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short sock_diag reply");
    let word = |at: usize| -> io::Result<[u8; 4]> {
        let b = reply.get(at..at + 4).ok_or_else(bad)?;
        Ok([b[0], b[1], b[2], b[3]])
    };
    let kind = reply.get(4..6).ok_or_else(bad)?;
    let kind = u16::from_ne_bytes([kind[0], kind[1]]);
    if kind == NLMSG_ERROR {
        let errno = i32::from_ne_bytes(word(NLMSG_HDR)?);
        return match -errno {
            2 => Ok(None), // ENOENT: the client is gone
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(bad());
    }
    let state = *reply.get(NLMSG_HDR + 1).ok_or_else(bad)?;
    let uid = u32::from_ne_bytes(word(UID_AT)?);
    let inode = u32::from_ne_bytes(word(UID_AT + 4)?);
    Ok(live_owner(state, uid, inode.into()))
}

/// How long the kernel may take to answer (it answers within the send in
/// practice).
const SOCK_DIAG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// One exact sock_diag lookup, without blocking the thread. A netlink
/// socket sends to the kernel by default, so no address (and no `unsafe`)
/// is needed. The kernel handles the request inside the send and queues
/// its reply there, so the first non-blocking read finds it; should it
/// not, the read is retried every millisecond from the event loop, never
/// by blocking the worker.
async fn sock_diag_uid(peer: SocketAddr, local: SocketAddr) -> io::Result<Option<u32>> {
    use std::io::Read;
    let sock = socket2::Socket::new(
        socket2::Domain::from(AF_NETLINK),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::from(NETLINK_SOCK_DIAG)),
    )?;
    sock.set_nonblocking(true)?;
    sock.send(&sock_diag_request(peer, local))?;
    let mut buf = [0u8; 512];
    let began = std::time::Instant::now();
    loop {
        match (&sock).read(&mut buf) {
            Ok(n) => return parse_sock_diag_reply(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if began.elapsed() > SOCK_DIAG_TIMEOUT {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no sock_diag reply",
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Scans a `/proc/net/tcp{,6}` table: `sl local rem st tx:rx tr:when
/// retrnsmt uid timeout inode ...`, for the live socket from `peer` to
/// `local`.
fn find_owner(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let mut f = line.split_whitespace();
        let (_sl, l, r, st) = (f.next()?, f.next()?, f.next()?, f.next()?);
        let uid = f.nth(3)?.parse().ok()?;
        let inode = f.nth(1)?.parse().ok()?;
        let state = u8::from_str_radix(st, 16).ok()?;
        if !(same_addr(parse_addr(l)?, peer) && same_addr(parse_addr(r)?, local)) {
            return None;
        }
        live_owner(state, uid, inode)
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

    /// What the kernel keeps of a closed client socket (TIME_WAIT, or a
    /// FIN_WAIT2 orphan with inode 0) has uid 0 and is no one's.
    #[test]
    fn dead_sockets_have_no_owner() {
        let word = |b: [u8; 4]| format!("{:08X}", u32::from_ne_bytes(b));
        let lo = word([127, 0, 0, 1]);
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {lo}:D431 {lo}:1538 06 00000000:00000000 03:00001770 00000000     0        0 0\n\
             1: {lo}:D432 {lo}:1538 05 00000000:00000000 00:00000000 00000000  1000        0 0\n\
             2: {lo}:D433 {lo}:1538 05 00000000:00000000 00:00000000 00000000  1000        0 77\n"
        );
        let proxy: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let at = |port: u16| SocketAddr::new([127, 0, 0, 1].into(), port);
        assert_eq!(find_owner(&table, at(0xD431), proxy), None, "TIME_WAIT");
        assert_eq!(find_owner(&table, at(0xD432), proxy), None, "orphan");
        assert_eq!(
            find_owner(&table, at(0xD433), proxy),
            Some(1000),
            "half-closed, still open"
        );
        assert_eq!(live_owner(1, 0, 5), Some(0));
        assert_eq!(live_owner(6, 0, 5), None);
    }

    /// A client that connects, writes and closes before the proxy looks is
    /// not found by either lookup: before the fix both reported uid 0 for
    /// its leftover socket, and a proxy running as root let it in.
    #[tokio::test]
    async fn a_client_that_closed_is_no_one() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = l.local_addr().unwrap();
        let mut c = std::net::TcpStream::connect(local).unwrap();
        c.write_all(b"queued bytes").unwrap();
        drop(c);
        let (_s, peer) = l.accept().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(sock_diag_uid(peer, local).await.unwrap(), None);
        assert_eq!(proc_net_tcp_uid(peer, local).unwrap(), None);
        let policy = PeerPolicy::from_allow_list(own_uid().unwrap(), &["0".into()]).unwrap();
        let refused = check(&policy, &LocalPeer::Tcp { peer, local }).await;
        assert_eq!(refused, Err(PeerRefusal::Unknown));
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

    #[tokio::test]
    async fn real_connection_is_found_with_our_uid() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let own = Some(own_uid().unwrap());
        let local = l.local_addr().unwrap();
        assert_eq!(sock_diag_uid(peer, local).await.unwrap(), own);
        assert_eq!(proc_net_tcp_uid(peer, local).unwrap(), own);
        assert_eq!(tcp_peer_uid(peer, local).await.unwrap(), own);
        // A socket that does not exist is not found, rather than an error.
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(sock_diag_uid(gone, local).await.unwrap(), None);
        // IPv6 loopback, where the host has it.
        if let Ok(l6) = std::net::TcpListener::bind("[::1]:0") {
            let _c = std::net::TcpStream::connect(l6.local_addr().unwrap()).unwrap();
            let (_s, peer6) = l6.accept().unwrap();
            assert_eq!(
                sock_diag_uid(peer6, l6.local_addr().unwrap())
                    .await
                    .unwrap(),
                own
            );
            assert_eq!(
                proc_net_tcp_uid(peer6, l6.local_addr().unwrap()).unwrap(),
                own
            );
        }
    }

    #[tokio::test]
    async fn policy_from_allow_list() {
        let p = PeerPolicy::from_allow_list(1000, &[]).unwrap();
        assert!(p.allows(1000) && !p.allows(0));
        let p = PeerPolicy::from_allow_list(1000, &["0".into(), "root".into()]).unwrap();
        assert!(matches!(p, PeerPolicy::Uids { ref uids, .. } if uids == &[1000, 0]));
        assert!(
            PeerPolicy::from_allow_list(1, &["any".into()])
                .unwrap()
                .allows(7)
        );
        assert!(fast_path_error().await.is_none(), "sock_diag works here");
        assert!(matches!(
            PeerPolicy::from_allow_list(1, &["no-such-user-here".into()]),
            Err(PeerError::UnknownUser(_))
        ));
    }
}
