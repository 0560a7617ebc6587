//! The IAM Identity Center login behind an SSO profile, read from the same
//! files aws-config reads: `[profile X]` -> `sso_session` (or the legacy
//! `sso_start_url`) -> `~/.aws/sso/cache/<sha1(name)>.json`.
//!
//! aws-config does the signing-in work (GetRoleCredentials, refresh through
//! SSO-OIDC CreateToken); this module only reads the cache file so that the
//! proxy can say, in the profile's own words, when the login ends and what
//! to run. It never opens a browser or starts a login.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha1::{Digest, Sha1};

/// Where a profile's SSO login is cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsoLogin {
    /// The profile name people pass to `aws sso login --profile`.
    pub profile: String,
    pub cache_file: PathBuf,
}

/// What the cache file says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsoState {
    pub expires_at: Option<SystemTime>,
    /// A refresh token is present: aws-config can renew the login itself.
    pub refreshable: bool,
}

impl SsoLogin {
    /// Finds the SSO login of `profile` (None: the profile has no SSO
    /// settings, or the config file cannot be read).
    pub fn locate(config_file: &Path, home: &Path, profile: &str) -> Option<SsoLogin> {
        let text = std::fs::read_to_string(config_file).ok()?;
        let section = if profile == "default" {
            "default".to_owned()
        } else {
            format!("profile {profile}")
        };
        let settings = ini_section(&text, &section);
        let key = settings
            .iter()
            .find(|(k, _)| k == "sso_session")
            .or_else(|| settings.iter().find(|(k, _)| k == "sso_start_url"))
            .map(|(_, v)| v.clone())?;
        let digest = Sha1::digest(key.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Some(SsoLogin {
            profile: profile.to_owned(),
            cache_file: home.join(".aws/sso/cache").join(format!("{hex}.json")),
        })
    }

    /// Reads the cache file; None if it is missing or unreadable.
    pub fn state(&self) -> Option<SsoState> {
        let text = std::fs::read_to_string(&self.cache_file).ok()?;
        Some(SsoState {
            expires_at: json_string(&text, "expiresAt").and_then(|s| parse_rfc3339(&s)),
            refreshable: json_string(&text, "refreshToken").is_some_and(|s| !s.is_empty()),
        })
    }

    /// `aws sso login --profile X`.
    pub fn login_command(&self) -> String {
        login_command(Some(&self.profile))
    }
}

/// The command that signs a person in again.
pub fn login_command(profile: Option<&str>) -> String {
    match profile {
        Some(p) if p != "default" => format!("aws sso login --profile {p}"),
        _ => "aws sso login".to_owned(),
    }
}

/// `HH:MM UTC` for messages (the date too when it is not today).
pub fn utc_hhmm(t: SystemTime, now: SystemTime) -> String {
    let at = time::OffsetDateTime::from(t);
    let today = time::OffsetDateTime::from(now).date();
    if at.date() == today {
        format!("{:02}:{:02} UTC", at.hour(), at.minute())
    } else {
        format!(
            "{}-{:02}-{:02} {:02}:{:02} UTC",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute()
        )
    }
}

/// `key = value` pairs of one `[section]` of an AWS config file.
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.split_whitespace().collect::<Vec<_>>().join(" ") == section;
            continue;
        }
        if inside && let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

/// A top-level string member of a flat JSON object (the SSO cache file);
/// enough for its fixed shape without a JSON crate.
fn json_string(text: &str, key: &str) -> Option<String> {
    let at = text.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].to_owned())
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn locates_the_cache_file_like_aws_config() {
        let dir = std::env::temp_dir().join(format!("rdsiam-sso-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config");
        std::fs::write(
            &config,
            "[default]\nregion = x\n[profile  dba]\nsso_session = corp\n[profile old]\nsso_start_url = https://x/start\n[sso-session corp]\nsso_region = y\n",
        )
        .unwrap();
        let l = SsoLogin::locate(&config, Path::new("/h"), "dba").unwrap();
        assert_eq!(
            l.cache_file,
            Path::new("/h/.aws/sso/cache").join(format!("{}.json", hex_sha1("corp")))
        );
        assert!(SsoLogin::locate(&config, Path::new("/h"), "old").is_some());
        assert!(SsoLogin::locate(&config, Path::new("/h"), "default").is_none());
        assert_eq!(l.login_command(), "aws sso login --profile dba");
        // No cache file (no login yet): nothing to report, no panic.
        assert!(l.state().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn hex_sha1(s: &str) -> String {
        Sha1::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn sha1_is_the_real_one() {
        assert_eq!(hex_sha1("abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
    }

    #[test]
    fn reads_the_cache_file_fields() {
        let t = r#"{"startUrl": "u", "accessToken": "a", "expiresAt": "2026-11-26T14:02:00Z", "refreshToken": "r"}"#;
        let at = parse_rfc3339(&json_string(t, "expiresAt").unwrap()).unwrap();
        assert_eq!(utc_hhmm(at, at), "14:02 UTC");
        assert_eq!(
            utc_hhmm(at, at + Duration::from_secs(86_400)),
            "2026-11-26 14:02 UTC"
        );
        assert_eq!(json_string(t, "refreshToken").as_deref(), Some("r"));
        assert_eq!(json_string(t, "clientSecret"), None);
    }
}
