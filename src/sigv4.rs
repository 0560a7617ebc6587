//! SigV4 query-string presigning, and the strict reading of a presigned
//! query that the gateway does.
//!
//! Two presigned requests come from here: the RDS auth token (`rds-db`
//! `connect`, [`crate::token`]) and the gateway proof's
//! `sts:GetCallerIdentity` ([`crate::gateway::proof`]). Key derivation and
//! the HMAC come from `aws-sigv4`; the canonical request is written here
//! because the token's bytes must match botocore's to the byte (parameter
//! order included), which a generic signer does not promise.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::sign::v4::{calculate_signature, generate_signing_key};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// One request to presign with `GET /`.
#[derive(Debug, Clone, Copy)]
pub struct Presign<'a> {
    /// The `host` header as the client sends it (`name` or `name:port`).
    pub host: &'a str,
    pub region: &'a str,
    pub service: &'a str,
    /// The operation's parameters, written first and in this order.
    pub params: &'a [(&'a str, &'a str)],
    /// Signed headers besides `host`: lowercase names, sorted, each after
    /// `host` in byte order.
    pub headers: &'a [(&'a str, &'a str)],
    /// `X-Amz-Expires`, seconds.
    pub expires: u64,
}

/// The presigned query string (no `?`), with `X-Amz-Signature` last, as
/// botocore writes it. It holds the session token: wiped when dropped.
pub fn presign(creds: &Credentials, p: &Presign<'_>, now: SystemTime) -> Zeroizing<String> {
    let (date, datetime) = amz_dates(now);
    let scope = format!("{date}/{}/{}/aws4_request", p.region, p.service);
    let credential = format!("{}/{scope}", creds.access_key_id());
    let mut signed_headers = String::from("host");
    for (name, _) in p.headers {
        signed_headers.push(';');
        signed_headers.push_str(name);
    }
    let expires = p.expires.to_string();
    let mut all: Vec<(&str, &str)> = p.params.to_vec();
    all.extend([
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", credential.as_str()),
        ("X-Amz-Date", datetime.as_str()),
        ("X-Amz-Expires", expires.as_str()),
        ("X-Amz-SignedHeaders", signed_headers.as_str()),
    ]);
    if let Some(token) = creds.session_token() {
        all.push(("X-Amz-Security-Token", token));
    }
    let query = encode_pairs(all.iter().copied());
    let signature = signature(
        creds.secret_access_key(),
        now,
        p,
        &scope,
        &datetime,
        &all,
        &signed_headers,
    );
    let mut out = query;
    out.push_str("&X-Amz-Signature=");
    out.push_str(&signature);
    out
}

/// The signature of a presigned `GET /` with these query parameters
/// (`X-Amz-Signature` not among them).
fn signature(
    secret: &str,
    now: SystemTime,
    p: &Presign<'_>,
    scope: &str,
    datetime: &str,
    params: &[(&str, &str)],
    signed_headers: &str,
) -> String {
    // The canonical query sorts by encoded name (then value).
    let mut encoded: Vec<(String, String)> =
        params.iter().map(|(k, v)| (encode(k), encode(v))).collect();
    encoded.sort();
    let mut canonical = Zeroizing::new(String::with_capacity(2048));
    canonical.push_str("GET\n/\n");
    for (i, (k, v)) in encoded.iter().enumerate() {
        if i > 0 {
            canonical.push('&');
        }
        canonical.push_str(k);
        canonical.push('=');
        canonical.push_str(v);
    }
    canonical.push_str("\nhost:");
    canonical.push_str(p.host);
    canonical.push('\n');
    for (name, value) in p.headers {
        canonical.push_str(name);
        canonical.push(':');
        canonical.push_str(value.trim());
        canonical.push('\n');
    }
    canonical.push('\n');
    canonical.push_str(signed_headers);
    canonical.push('\n');
    canonical.push_str(EMPTY_SHA256);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{datetime}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let key = generate_signing_key(secret, now, p.region, p.service);
    calculate_signature(key, string_to_sign.as_bytes())
}

/// `name=value&...`, each percent-encoded.
pub fn encode_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(2048));
    for (i, (k, v)) in pairs.into_iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(&mut out, k);
        out.push('=');
        encode_into(&mut out, v);
    }
    out
}

/// `YYYYMMDD` and `YYYYMMDDTHHMMSSZ` in UTC.
pub fn amz_dates(now: SystemTime) -> (String, String) {
    let t = time::OffsetDateTime::from(now);
    let date = format!("{:04}{:02}{:02}", t.year(), u8::from(t.month()), t.day());
    let datetime = format!("{date}T{:02}{:02}{:02}Z", t.hour(), t.minute(), t.second());
    (date, datetime)
}

/// Reads `YYYYMMDDTHHMMSSZ`.
pub fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let month = time::Month::try_from(u8::try_from(digits(4..6)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(digits(0..4)?).ok()?,
        month,
        u8::try_from(digits(6..8)?).ok()?,
    )
    .ok()?;
    let clock = time::Time::from_hms(
        u8::try_from(digits(9..11)?).ok()?,
        u8::try_from(digits(11..13)?).ok()?,
        u8::try_from(digits(13..15)?).ok()?,
    )
    .ok()?;
    Some(
        time::PrimitiveDateTime::new(date, clock)
            .assume_utc()
            .into(),
    )
}

/// RFC 3986 percent-encoding: everything but unreserved characters.
pub fn encode_into(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

fn encode(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    encode_into(&mut s, value);
    s
}

pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// Why a query string was not read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QueryError {
    #[error("query parameter {0:?} is not allowed here")]
    Unexpected(String),
    #[error("query parameter {0:?} appears more than once")]
    Duplicate(String),
    #[error("query parameter {0:?} is missing")]
    Missing(&'static str),
    #[error("a query parameter is not percent-encoded UTF-8")]
    Encoding,
}

/// A query read against an allow-list: each allowed name at most once,
/// no other name (the CVE-2022-2385 class: a duplicated parameter must not
/// change what is read). Values are percent-decoded.
#[derive(Debug)]
pub struct StrictQuery {
    values: Vec<(&'static str, Zeroizing<String>)>,
}

impl StrictQuery {
    pub fn parse(query: &str, allowed: &[&'static str]) -> Result<Self, QueryError> {
        let mut values: Vec<(&'static str, Zeroizing<String>)> = Vec::new();
        // Each allowed name at most once: `values` never outgrows `allowed`.
        for pair in query.split('&') {
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(raw_name)?;
            let Some(&known) = allowed.iter().find(|a| **a == name.as_str()) else {
                return Err(QueryError::Unexpected(truncated(&name)));
            };
            if values.iter().any(|(k, _)| *k == known) {
                return Err(QueryError::Duplicate(known.to_owned()));
            }
            values.push((known, decode(raw_value)?));
        }
        Ok(Self { values })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn require(&self, name: &'static str) -> Result<&str, QueryError> {
        self.get(name).ok_or(QueryError::Missing(name))
    }

    /// The parameters as read, in their order.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.values.iter().map(|(k, v)| (*k, v.as_str()))
    }
}

/// A name for a message: at most 40 characters of it.
fn truncated(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Percent-decoding; `+` is not a space here (SigV4 encodes a space as %20).
fn decode(s: &str) -> Result<Zeroizing<String>, QueryError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3).ok_or(QueryError::Encoding)?;
            let v = std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(QueryError::Encoding)?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Zeroizing::new)
        .map_err(|_| QueryError::Encoding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percent_encoding_keeps_only_unreserved() {
        let mut s = String::new();
        encode_into(&mut s, "a.b-c_d~e f/g+h@é");
        assert_eq!(s, "a.b-c_d~e%20f%2Fg%2Bh%40%C3%A9");
        assert_eq!(decode(&s).unwrap().as_str(), "a.b-c_d~e f/g+h@é");
    }

    #[test]
    fn dates_read_back() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_180_000);
        let (_, datetime) = amz_dates(at);
        assert_eq!(datetime, "20251126T180000Z");
        assert_eq!(parse_amz_date(&datetime), Some(at));
        for bad in [
            "20251126T180000",
            "2025112XT180000Z",
            "20251326T180000Z",
            "20251126T250000Z",
            "+0251126T180000Z",
            "",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn strict_query_takes_each_allowed_name_once() {
        const ALLOWED: &[&str] = &["Action", "DBUser"];
        let q = StrictQuery::parse("Action=connect&DBUser=ari%20anna", ALLOWED).unwrap();
        assert_eq!(q.get("DBUser"), Some("ari anna"));
        assert_eq!(
            StrictQuery::parse("Action=a&Action=b", ALLOWED).unwrap_err(),
            QueryError::Duplicate("Action".into())
        );
        // Encoded names are the same name.
        assert_eq!(
            StrictQuery::parse("Action=a&%41ction=b", ALLOWED).unwrap_err(),
            QueryError::Duplicate("Action".into())
        );
        assert!(matches!(
            StrictQuery::parse("Action=a&Other=b", ALLOWED),
            Err(QueryError::Unexpected(_))
        ));
        assert_eq!(
            StrictQuery::parse("Action=a&DBUser=b&DBUser=c", ALLOWED).unwrap_err(),
            QueryError::Duplicate("DBUser".into())
        );
        assert_eq!(
            StrictQuery::parse("Action=%zz", ALLOWED).unwrap_err(),
            QueryError::Encoding
        );
        assert_eq!(
            StrictQuery::parse("Action=%ff", ALLOWED).unwrap_err(),
            QueryError::Encoding
        );
        assert_eq!(
            StrictQuery::parse("Action=%4", ALLOWED).unwrap_err(),
            QueryError::Encoding
        );
    }
}
