//! The user name inside a caller ARN.
//!
//! For an IAM Identity Center session the ARN is
//! `arn:aws:sts::ACCT:assumed-role/AWSReservedSSO_<set>_<hex>/<user name>`:
//! the session name is the Identity Center user name, the value that the
//! `userName` session tag carries.

use thiserror::Error;

/// What kind of principal an ARN names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerArn {
    /// `assumed-role/ROLE/SESSION`.
    AssumedRole { role: String, session: String },
    /// `user/[PATH/]NAME` (long-term IAM user keys).
    User { name: String },
}

impl CallerArn {
    /// The name the person goes by.
    pub fn user_name(&self) -> &str {
        match self {
            CallerArn::AssumedRole { session, .. } => session,
            CallerArn::User { name } => name,
        }
    }

    /// True for an IAM Identity Center permission-set role.
    pub fn is_identity_center(&self) -> bool {
        matches!(self, CallerArn::AssumedRole { role, .. } if role.starts_with("AWSReservedSSO_"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArnError {
    #[error(
        "{0:?} is not an ARN of an assumed role or IAM user; the proxy cannot tell who the person is"
    )]
    Unsupported(String),
}

/// Parses an STS caller ARN.
pub fn parse_caller_arn(arn: &str) -> Result<CallerArn, ArnError> {
    let unsupported = || ArnError::Unsupported(arn.to_owned());
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(_partition), Some(service), Some(_region), Some(_acct), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(unsupported());
    };
    let segments: Vec<&str> = resource.split('/').collect();
    match (service, segments.as_slice()) {
        ("sts", ["assumed-role", role, session]) if !role.is_empty() && !session.is_empty() => {
            Ok(CallerArn::AssumedRole {
                role: (*role).to_owned(),
                session: (*session).to_owned(),
            })
        }
        ("iam", ["user", .., name]) if segments.len() >= 2 && !name.is_empty() => {
            Ok(CallerArn::User {
                name: (*name).to_owned(),
            })
        }
        _ => Err(unsupported()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_center_session() {
        let a = parse_caller_arn(
            "arn:aws:sts::111122223333:assumed-role/AWSReservedSSO_DBA_0123456789abcdef/arianna",
        )
        .unwrap();
        assert_eq!(a.user_name(), "arianna");
        assert!(a.is_identity_center());
    }

    #[test]
    fn other_principals() {
        let a = parse_caller_arn("arn:aws-cn:sts::1:assumed-role/app/i-0abc").unwrap();
        assert_eq!(a.user_name(), "i-0abc");
        assert!(!a.is_identity_center());
        let u = parse_caller_arn("arn:aws:iam::1:user/team/bob").unwrap();
        assert_eq!(u.user_name(), "bob");
        for bad in [
            "arn:aws:iam::1:root",
            "arn:aws:sts::1:federated-user/x",
            "arn:aws:sts::1:assumed-role/r/",
            "not-an-arn",
        ] {
            assert!(parse_caller_arn(bad).is_err(), "{bad}");
        }
    }
}
