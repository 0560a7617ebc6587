//! `rds-iam-proxy policy`: the IAM policy and SQL that the setup needs.
//!
//! The policy allows `rds-db:connect` only on the database user named by
//! the caller's `userName` session tag, so each person reaches only their
//! own database user, whatever the proxy does.

use crate::cli::PolicyArgs;

pub fn run(args: PolicyArgs) -> anyhow::Result<()> {
    print!(
        "{}",
        render(
            &args.cluster_resource_id,
            args.region.as_deref(),
            args.account.as_deref(),
            &args.users
        )?
    );
    Ok(())
}

/// The policy JSON and the SQL, as one text.
pub fn render(
    resource_id: &str,
    region: Option<&str>,
    account: Option<&str>,
    users: &[String],
) -> anyhow::Result<String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    anyhow::ensure!(
        plain(resource_id),
        "--cluster-resource-id {resource_id:?}: expected an id such as cluster-ABCDEFGHIJKLMNOPQRSTUVWXY0"
    );
    for (flag, v) in [("--region", region), ("--account", account)] {
        if let Some(v) = v {
            anyhow::ensure!(plain(v), "{flag} {v:?} is not valid");
        }
    }
    let arn = format!(
        "arn:aws:rds-db:{}:{}:dbuser:{resource_id}/${{aws:PrincipalTag/userName}}",
        region.unwrap_or("*"),
        account.unwrap_or("*")
    );
    let mut out = format!(
        "# IAM policy for the permission set / role (the userName session tag names the person):\n\
         {{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [\n    {{\n      \"Effect\": \"Allow\",\n      \
         \"Action\": \"rds-db:connect\",\n      \"Resource\": \"{arn}\"\n    }}\n  ]\n}}\n\n\
         # SQL, once per person, as an administrator:\n"
    );
    let placeholder = ["<user name>".to_owned()];
    let users = if users.is_empty() {
        &placeholder[..]
    } else {
        users
    };
    for u in users {
        let ident = format!("\"{}\"", u.replace('"', "\"\""));
        out.push_str(&format!(
            "CREATE USER {ident} WITH LOGIN;\nGRANT rds_iam TO {ident};\n"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_the_tag_and_sql_quotes_users() {
        let t = render(
            "cluster-ABC123",
            Some("eu-west-1"),
            None,
            &["o\"neil".into()],
        )
        .unwrap();
        assert!(t.contains(
            "\"Resource\": \"arn:aws:rds-db:eu-west-1:*:dbuser:cluster-ABC123/${aws:PrincipalTag/userName}\""
        ), "{t}");
        assert!(
            t.contains("CREATE USER \"o\"\"neil\" WITH LOGIN;\nGRANT rds_iam TO \"o\"\"neil\";"),
            "{t}"
        );
        assert!(render("x\"y", None, None, &[]).is_err());
    }
}
