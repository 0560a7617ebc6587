//! The first packet a client sends (src/pg/startup.rs), read the way the
//! handshake reads it: a length prefix checked before anything else, then
//! the body.
//!
//! Checks: no panic; a decoded StartupMessage obeys what decode promises
//! (a non-empty user, no duplicate names, `_pq_.` options kept apart) and
//! re-encodes to the very bytes it came from; a CancelRequest and an
//! SSLRequest re-encode to their bytes too.

use bytes::BytesMut;
use rds_iam_proxy::pg::startup::{
    InitialPacket, MAX_CANCEL_SECRET, check_length, decode, encode_cancel, encode_ssl_request,
    encode_startup,
};

pub fn check(data: &[u8]) {
    // The body alone too: decode must stand any body, whatever the length
    // check in front of it lets through.
    let _ = decode(data);
    let Some(prefix) = data.first_chunk::<4>() else {
        return;
    };
    let Ok(len) = check_length(*prefix) else {
        return;
    };
    let Some(packet) = data.get(..len as usize) else {
        return;
    };
    let Ok(initial) = decode(&packet[4..]) else {
        return;
    };
    let mut out = BytesMut::new();
    match initial {
        InitialPacket::SslRequest => {
            encode_ssl_request(&mut out);
            assert_eq!(&out[..], packet, "SSLRequest does not re-encode");
        }
        InitialPacket::GssEncRequest => assert_eq!(packet.len(), 8),
        InitialPacket::Cancel(key) => {
            assert!((4..=MAX_CANCEL_SECRET).contains(&key.secret.len()));
            encode_cancel(&mut out, &key);
            assert_eq!(&out[..], packet, "CancelRequest does not re-encode");
        }
        InitialPacket::Startup(msg) => {
            assert_eq!(msg.requested.major, 3);
            assert!(!msg.user().is_empty(), "startup accepted without a user");
            assert_eq!(msg.param("user"), Some(msg.user()));
            let _ = msg.database();
            let negotiated = msg.negotiated();
            assert!(negotiated.minor <= msg.requested.minor);
            assert!(negotiated.minor <= rds_iam_proxy::pg::startup::NEWEST_MINOR);
            assert_eq!(
                msg.needs_negotiation(),
                negotiated.minor != msg.requested.minor || !msg.protocol_options.is_empty()
            );
            let mut names: Vec<&str> = msg.params.iter().map(|(k, _)| k.as_str()).collect();
            names.extend(msg.protocol_options.iter().map(String::as_str));
            for n in &names {
                assert!(!n.is_empty() && !n.contains('\0'));
            }
            for (k, v) in &msg.params {
                assert!(!k.starts_with("_pq_."), "option {k:?} kept as a parameter");
                assert!(!v.contains('\0'));
            }
            for o in &msg.protocol_options {
                assert!(o.starts_with("_pq_."));
            }
            let mut sorted = names.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), names.len(), "duplicate names accepted");
            // Options' values are dropped, so only a packet without any
            // re-encodes byte for byte.
            if msg.protocol_options.is_empty() {
                encode_startup(
                    &mut out,
                    msg.requested,
                    msg.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                );
                assert_eq!(&out[..], packet, "StartupMessage does not re-encode");
            }
        }
    }
}
