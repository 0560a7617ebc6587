//! Message bodies (src/pg/backend.rs: what the proxy reads from the
//! server during login; src/pg/messages.rs: what the audit reads from both
//! sides). Every parser gets the input as a body: in the proxy each is
//! handed whatever body the peer framed, so each must stand any bytes.
//!
//! Checks: no panic; each parser agrees with the layout it reads (codes
//! and lengths), what the proxy writes reads back the same (ErrorResponse,
//! BackendKeyData, NegotiateProtocolVersion), and the audit's cheap
//! `error_fields` agrees with `parse_error` on a well-formed ErrorResponse.

use bytes::BytesMut;
use rds_iam_proxy::audit::model::Lexing;
use rds_iam_proxy::pg::backend::{
    self, ErrorMessage, Severity, auth, parse_backend_key, parse_error, parse_negotiate_version,
};
use rds_iam_proxy::pg::frame::{MAX_CLIENT_MESSAGE, split_frame};
use rds_iam_proxy::pg::messages;
use rds_iam_proxy::pg::startup::MAX_CANCEL_SECRET;

/// The body of the single message in `out`.
fn body_of(out: &[u8], tag: u8) -> &[u8] {
    let (h, body) = split_frame(out, MAX_CLIENT_MESSAGE)
        .expect("written message has a valid header")
        .expect("written message is complete");
    assert_eq!(h.tag, tag);
    assert_eq!(
        h.frame_len(),
        out.len(),
        "written message has trailing bytes"
    );
    body
}

fn server(body: &[u8]) {
    // ErrorResponse / NoticeResponse, and the same fields written back.
    let e = parse_error(body);
    let m = ErrorMessage {
        severity: Severity::Fatal,
        code: e.code.clone().into(),
        message: e.message.clone(),
        detail: e.detail.clone(),
        hint: e.hint.clone(),
    };
    let mut out = BytesMut::new();
    backend::write_error(&mut out, &m);
    let written = body_of(&out, b'E');
    let again = parse_error(written);
    assert_eq!(again.severity, "FATAL");
    assert_eq!(
        (&again.code, &again.message, &again.detail, &again.hint),
        (&e.code, &e.message, &e.detail, &e.hint),
        "ErrorResponse does not read back"
    );
    let (code, message) = messages::error_fields(written);
    assert_eq!(code, e.code.as_bytes(), "error_fields code");
    assert_eq!(message, e.message.as_bytes(), "error_fields message");
    let _ = messages::error_fields(body);

    // Authentication request.
    match backend::auth_code(body) {
        Some(code) => {
            assert_eq!(code.to_be_bytes(), body[..4]);
            let _ = auth::name(code);
        }
        None => assert!(body.len() < 4),
    }

    // BackendKeyData.
    match parse_backend_key(body) {
        Some((pid, secret)) => {
            assert!((4..=MAX_CANCEL_SECRET).contains(&secret.len()));
            assert_eq!(secret.len() + 4, body.len());
            let mut out = BytesMut::new();
            backend::write_backend_key(&mut out, pid, secret);
            assert_eq!(
                body_of(&out, b'K'),
                body,
                "BackendKeyData does not read back"
            );
        }
        None => assert!(!(8..=MAX_CANCEL_SECRET + 4).contains(&body.len())),
    }

    // NegotiateProtocolVersion.
    if let Some(minor) = parse_negotiate_version(body) {
        assert_eq!(
            u32::from_be_bytes(body[..4].try_into().unwrap()),
            (3 << 16) | u32::from(minor)
        );
        let mut out = BytesMut::new();
        backend::write_negotiate_version(&mut out, minor, &["_pq_.x".to_owned()]);
        assert_eq!(parse_negotiate_version(body_of(&out, b'v')), Some(minor));
    }

    // CommandComplete and its row count.
    if let Ok(tag) = messages::command_complete(body) {
        assert!(!tag.contains(&0));
        if let Some(n) = messages::tag_rows(tag) {
            // The last word, all digits, after at least one other byte
            // ("SELECT 007" counts 7).
            let last_word = tag.rsplit(|&b| b == b' ').next().unwrap();
            assert!(last_word.iter().all(u8::is_ascii_digit) && last_word.len() < tag.len());
            assert_eq!(
                std::str::from_utf8(last_word).unwrap().parse::<u64>().ok(),
                Some(n)
            );
        }
    }

    // ParameterStatus: the lexing settings the guard follows.
    let mut lexing = Lexing::default();
    lexing.observe(body);
    let _ = lexing.judgeable();
}

fn client(body: &[u8]) {
    if let Ok(q) = messages::query(body) {
        assert!(!q.contains(&0) && q.len() < body.len());
    }
    if let Ok((name, text)) = messages::parse(body) {
        assert!(!name.contains(&0) && !text.contains(&0));
        assert!(name.len() + text.len() + 2 <= body.len());
    }
    if let Ok(b) = messages::bind(body) {
        assert!(!b.portal.contains(&0) && !b.statement.contains(&0));
        bind_params(&b, body);
    }
    if let Ok(p) = messages::execute(body) {
        assert!(!p.contains(&0));
    }
    if let Ok((_kind, name)) = messages::close(body) {
        assert!(!name.contains(&0));
    }
    match messages::function_call(body) {
        Ok(oid) => assert_eq!(oid.to_be_bytes(), body[..4]),
        Err(_) => assert!(body.len() < 4),
    }
    if let Ok((oid, args)) = messages::function_call_args(body) {
        assert_eq!(messages::function_call(body), Ok(oid));
        bind_params(&args, body);
    }
}

/// The parameter values lie inside the body, one per declared parameter
/// at most.
fn bind_params(b: &messages::Bind<'_>, body: &[u8]) {
    let range = body.as_ptr_range();
    let mut n = 0usize;
    for p in b.params() {
        n += 1;
        if let Some((v, _text)) = p {
            let r = v.as_ptr_range();
            assert!(v.is_empty() || (range.start <= r.start && r.end <= range.end));
        }
    }
    assert!(n <= usize::from(b.param_count()));
}

pub fn check(data: &[u8]) {
    server(data);
    client(data);
}
