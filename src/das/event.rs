//! One activity event as Database Activity Streams writes it, kept whole
//! (every field DAS gives is printed again) with typed views of the fields
//! the proxy joins and compares on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// An activity event (`type: record`) from a decrypted batch.
#[derive(Debug, Clone)]
pub struct Event {
    /// Every field as DAS wrote it.
    pub fields: Map<String, Value>,
}

impl Event {
    fn str(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }

    /// A number DAS may write as a JSON number or as a string.
    fn int(&self, key: &str) -> Option<i64> {
        match self.fields.get(key)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// PostgreSQL's `%c`: hex backend start epoch `.` hex pid.
    pub fn session_id(&self) -> Option<&str> {
        self.str("sessionId").filter(|s| !s.is_empty())
    }

    pub fn pid(&self) -> Option<i64> {
        self.int("pid")
    }

    pub fn remote_host(&self) -> Option<&str> {
        self.str("remoteHost")
    }

    pub fn remote_port(&self) -> Option<u16> {
        self.int("remotePort").and_then(|p| u16::try_from(p).ok())
    }

    pub fn db_user(&self) -> &str {
        self.str("dbUserName").unwrap_or("")
    }

    pub fn database(&self) -> &str {
        self.str("databaseName").unwrap_or("")
    }

    /// `CONNECT`, `DISCONNECT`, `READ`, `WRITE`, `DDL`, ...
    pub fn class(&self) -> &str {
        self.str("class").unwrap_or("")
    }

    pub fn command(&self) -> &str {
        self.str("command").unwrap_or("")
    }

    pub fn command_text(&self) -> &str {
        self.str("commandText").unwrap_or("")
    }

    /// The SQLSTATE of a failed statement; empty or `0` when it ran.
    /// DAS documents the field as a number and writes a SQLSTATE string;
    /// either is taken.
    pub fn exit_code(&self) -> Option<String> {
        match self.fields.get("exitCode")? {
            Value::String(s) if !s.is_empty() && s != "0" && s != "00000" => Some(s.clone()),
            Value::Number(n) if n.as_i64() != Some(0) => Some(n.to_string()),
            _ => None,
        }
    }

    pub fn log_time(&self) -> Option<SystemTime> {
        self.str("logTime").and_then(parse_time)
    }

    /// A statement the server ran or refused (not a connection event).
    pub fn is_statement(&self) -> bool {
        !matches!(
            self.class(),
            "CONNECT" | "DISCONNECT" | "AUTH" | "AUTHENTICATION"
        ) && !self.command_text().is_empty()
    }

    /// The backend start time (whole seconds) written into `sessionId`.
    pub fn session_start_secs(&self) -> Option<u64> {
        let (start, _) = self.session_id()?.split_once('.')?;
        u64::from_str_radix(start, 16).ok()
    }
}

/// Parses the times DAS and the proxy's audit trail write:
/// `2026-12-07 05:06:48.384295+00` (PostgreSQL's form, which DAS uses) and
/// `2026-12-07T05:06:48.384295Z` (RFC 3339), with an offset of `Z`, `+HH`,
/// `+HH:MM` or `+HHMM`, or none (UTC).
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b' ' | b'T') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos: u32 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let kept = &frac[..digits.min(9)];
        nanos = kept.parse::<u32>().ok()? * 10u32.pow(9 - kept.len() as u32);
        rest = &frac[digits..];
    }
    let offset_secs: i64 = match rest {
        "" | "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let digits: String = rest[1..].chars().filter(|c| *c != ':').collect();
            if !(digits.len() == 2 || digits.len() == 4)
                || !digits.bytes().all(|c| c.is_ascii_digit())
            {
                return None;
            }
            let h: i64 = digits[..2].parse().ok()?;
            let m: i64 = if digits.len() == 4 {
                digits[2..].parse().ok()?
            } else {
                0
            };
            sign * (h * 3600 + m * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// well-known algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &str) -> Option<(u64, u32)> {
        parse_time(s).map(|t| {
            let d = t.duration_since(UNIX_EPOCH).unwrap();
            (d.as_secs(), d.subsec_nanos())
        })
    }

    #[test]
    fn both_forms_of_time_read_the_same() {
        // 2026-12-07T05:06:48Z = 1796620008 (date -u -d ... +%s).
        let want = Some((1_796_620_008, 384_295_000));
        assert_eq!(secs("2026-12-07 05:06:48.384295+00"), want);
        assert_eq!(secs("2026-12-07T05:06:48.384295Z"), want);
        assert_eq!(secs("2026-12-07 06:06:48.384295+01:00"), want);
        assert_eq!(secs("2026-12-07 04:36:48.384295-0030"), want);
        assert_eq!(secs("1970-01-01 00:00:00"), Some((0, 0)));
        assert_eq!(secs("2000-02-29 00:00:00Z"), Some((951_782_400, 0)));
        for bad in [
            "",
            "2026-12-07",
            "2026-13-07 05:06:48",
            "2026-12-07 05:06:48.",
            "2026-12-07 05:06:48+0",
            "2026-12-07 05:06:48 UTC",
            "２０２６-12-07 05:06:48",
            "1969-12-31 23:59:59Z",
        ] {
            assert_eq!(secs(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn typed_views_take_numbers_in_either_form() {
        let e = Event {
            fields: serde_json::from_str(
                r#"{"sessionId":"6b163ee8.41f9","pid":"16889","remotePort":45712,"exitCode":"42P01","class":"READ","commandText":"select 1"}"#,
            )
            .unwrap(),
        };
        assert_eq!(e.pid(), Some(16889));
        assert_eq!(e.remote_port(), Some(45712));
        assert_eq!(e.session_start_secs(), Some(0x6b16_3ee8));
        assert_eq!(e.exit_code().as_deref(), Some("42P01"));
        assert!(e.is_statement());
    }
}
