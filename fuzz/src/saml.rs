//! The SAML response (src/identity/saml.rs), as an IdP tool writes it:
//! base64 of an XML document.
//!
//! Checks: no panic; the input read as base64 and as XML; the XML read
//! through its own base64 (plain and wrapped at 76 columns, as IdPs and
//! `base64` do) gives the same result as read directly; an assertion that
//! parses obeys what the proxy relies on: each role pair names a role and
//! a SAML provider, `choose` picks only an offered role, never for an
//! expired assertion, and only with a non-empty user name.

use std::time::{Duration, SystemTime};

use rds_iam_proxy::identity::saml::{Assertion, SamlError};

/// A fixed "now" (2026-01-01T00:00:00Z), so a run replays exactly.
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)
}

fn wrapped(b64: &str, width: usize) -> String {
    let mut out = String::with_capacity(b64.len() + b64.len() / width + 1);
    for (i, c) in b64.chars().enumerate() {
        if i > 0 && i % width == 0 {
            out.push_str("\r\n");
        }
        out.push(c);
    }
    out
}

fn check_assertion(a: &Assertion) {
    for (role, provider) in &a.roles {
        assert!(role.contains(":role/"), "{role:?} taken as a role");
        assert!(
            provider.contains(":saml-provider/"),
            "{provider:?} taken as a provider"
        );
    }
    let now = now();
    let expired = a.not_on_or_after.is_some_and(|t| t <= now);
    let mut choices: Vec<Option<&str>> = vec![None, Some("arn:aws:iam::1:role/NotOffered")];
    choices.extend(a.roles.iter().map(|(r, _)| Some(r.as_str())));
    for want in choices {
        match a.choose(want, now) {
            Ok(c) => {
                assert!(!expired, "an expired assertion was chosen");
                assert!(!c.user_name.is_empty());
                assert_eq!(Some(&c.user_name), a.user_name.as_ref());
                assert!(
                    a.roles
                        .iter()
                        .any(|(r, p)| *r == c.role_arn && *p == c.principal_arn),
                    "chose a role that is not offered"
                );
                match want {
                    Some(w) => assert_eq!(c.role_arn, w),
                    None => assert_eq!(a.roles.len(), 1),
                }
                assert_eq!(c.session_duration, a.session_duration);
            }
            Err(SamlError::Expired(when)) => {
                assert!(expired);
                assert!(when.ends_with(" UTC"));
            }
            Err(e) => {
                assert!(!expired, "expiry must be checked first, got {e:?}");
                let _ = e.client_text();
            }
        }
    }
}

pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(a) = Assertion::parse_base64(text) {
        check_assertion(&a);
    }
    let direct = Assertion::parse_xml(text);
    if let Ok(a) = &direct {
        check_assertion(a);
    }
    let b64 = aws_smithy_types::base64::encode(text.as_bytes());
    assert_eq!(
        Assertion::parse_base64(&b64),
        direct,
        "base64 of the XML reads differently"
    );
    assert_eq!(
        Assertion::parse_base64(&wrapped(&b64, 76)),
        direct,
        "wrapped base64 reads differently"
    );
}
