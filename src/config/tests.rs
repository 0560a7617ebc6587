use super::*;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use std::path::Path;

fn cli(args: &[&str]) -> ProxyArgs {
    <crate::cli::Cli as clap::Parser>::try_parse_from([&["rds-iam-proxy"], args].concat())
        .unwrap()
        .proxy
}

/// Parses like main does (defaults told apart from given values) and
/// merges `toml` as the file. Environment variables are covered by the
/// binary's tests (tests/ops.rs): clap reads the real environment.
/// `rds-iam-proxy gateway ARGS`, flags over an optional file.
fn load_gateway(args: &[&str], toml: Option<&str>) -> Result<Config, ConfigError> {
    load(&[&["gateway"], args].concat(), toml)
}

/// Gateway mode and the local proxy's --gateway: what each needs, what
/// belongs to the other, and the listener rule of local mode.
#[test]
fn gateway_settings_on_both_sides() {
    const UP: &str = "db.cluster-a.eu-west-1.rds.amazonaws.com";
    // Gateway side: id and a trusted account are required; defaults.
    let g = load_gateway(
        &[
            "--upstream",
            UP,
            "--listen",
            "0.0.0.0:5432",
            "--gateway-id",
            "bastion",
            "--trust-account",
            "111122223333",
        ],
        None,
    )
    .unwrap();
    let gw = g.start.gateway.as_ref().unwrap();
    assert_eq!(gw.trust_roles, ["AWSReservedSSO_*"]);
    assert_eq!(gw.sts_region, None);
    let err =
        load_gateway(&["--upstream", UP, "--trust-account", "111122223333"], None).unwrap_err();
    assert!(err.to_string().contains("--gateway-id"), "{err}");
    let err = load_gateway(&["--upstream", UP, "--gateway-id", "b"], None).unwrap_err();
    assert!(err.to_string().contains("--trust-account"), "{err}");
    let err = load_gateway(
        &[
            "--upstream",
            UP,
            "--gateway-id",
            "b",
            "--trust-account",
            "1234",
        ],
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("12 digits"), "{err}");
    // The file's [gateway] table, under the flags.
    let g = load_gateway(
            &["--upstream", UP, "--trust-role", "Exact"],
            Some("[gateway]\nid = \"bastion\"\ntrust_accounts = [\"111122223333\"]\ntrust_roles = [\"AWSReservedSSO_DBA*\"]\n"),
        )
        .unwrap();
    assert_eq!(g.start.gateway.as_ref().unwrap().trust_roles, ["Exact"]);
    assert!(
        g.render().contains("[gateway]\nid = \"bastion\""),
        "{}",
        g.render()
    );
    // A gateway does not chain to another.
    let err = load_gateway(
        &[
            "--upstream",
            UP,
            "--gateway-id",
            "b",
            "--trust-account",
            "111122223333",
            "--gateway",
            "x:1",
        ],
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("a gateway dials the cluster itself"),
        "{err}"
    );

    // Local side: gateway-server settings are refused, the hop is read.
    let err = load(&["--upstream", UP, "--trust-account", "111122223333"], None).unwrap_err();
    assert!(err.to_string().contains("rds-iam-proxy gateway"), "{err}");
    let err = load(&["--upstream", UP], Some("[gateway]\nid = \"x\"\n")).unwrap_err();
    assert!(err.to_string().contains("[gateway]"), "{err}");
    let c = load(
        &["--upstream", UP, "--gateway", "Bastion.example:6432"],
        None,
    )
    .unwrap();
    let hop = c.first().start.gateway.as_ref().unwrap();
    assert_eq!(
        (hop.host.as_str(), hop.port, hop.id.as_str()),
        ("bastion.example", 6432, "bastion.example")
    );
    assert_eq!(hop.ca, UpstreamCa::System);
    let c = load(
        &["--upstream", UP, "--gateway", "b:1", "--gateway-id", "gw-1"],
        None,
    )
    .unwrap();
    assert_eq!(c.first().start.gateway.as_ref().unwrap().id, "gw-1");
    let err = load(
        &[
            "--upstream",
            UP,
            "--gateway",
            "b:1",
            "--connect-to",
            "127.0.0.1:5",
        ],
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("--connect-to"), "{err}");
    let err = load(&["--upstream", UP, "--gateway-id", "gw-1"], None).unwrap_err();
    assert!(err.to_string().contains("applies with --gateway"), "{err}");

    // Local mode listens where others cannot reach it, unless told.
    for addr in ["0.0.0.0:5432", "[::]:5432", "10.1.2.3:5432"] {
        let err = load(&["--upstream", UP, "--listen", addr], None).unwrap_err();
        assert!(
            matches!(err, ConfigError::RemoteListener { .. }),
            "{addr}: {err}"
        );
    }
    let err = load(
        &["--upstream", UP],
        Some("[[endpoint]]\nlisten = [\"0.0.0.0:5432\"]\n"),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("endpoint[1].listen in /etc/p.toml"),
        "{err}"
    );
    let c = load(
        &[
            "--upstream",
            UP,
            "--listen",
            "0.0.0.0:5432",
            "--allow-remote-clients",
        ],
        None,
    )
    .unwrap();
    assert!(c.start.allow_remote_clients);
    assert!(c.render().contains("allow_remote_clients = true"));
    let err = load_gateway(
        &[
            "--upstream",
            UP,
            "--gateway-id",
            "b",
            "--trust-account",
            "111122223333",
            "--allow-remote-clients",
        ],
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("local proxy only"), "{err}");
}

/// Flags over an optional file, as main() loads them; `gateway` as the
/// first argument runs the gateway subcommand.
fn load(args: &[&str], toml: Option<&str>) -> Result<Config, ConfigError> {
    let mut cmd = crate::cli::Cli::command();
    let argv = [&["rds-iam-proxy"], args].concat();
    let top = cmd.try_get_matches_from_mut(argv).unwrap();
    let parsed = crate::cli::Cli::from_arg_matches(&top).unwrap();
    let (m, proxy) = match parsed.command {
        Some(crate::cli::Command::Gateway(mut g)) => {
            g.proxy.gateway_mode = true;
            (top.subcommand_matches("gateway").unwrap(), g.proxy)
        }
        _ => (&top, parsed.proxy),
    };
    let given = |id: &str| {
        matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let path = Path::new("/etc/p.toml");
    let file = match toml {
        Some(t) => Some((path.to_owned(), parse_file(path, t)?)),
        None => None,
    };
    Config::merge(&proxy, &given, file, &Env::default())
}

/// Found by the config fuzz target: the rendering left the local CA's
/// directory in a comment, so it read back as the default.
#[test]
fn state_dir_reads_back_from_the_rendering() {
    let c = load(&["--upstream", "db.x"], Some("state_dir = \"/srv/ca\"\n")).unwrap();
    let local = ClientTls::Local {
        state_dir: PathBuf::from("/srv/ca"),
    };
    assert_eq!(c.first().live.client_tls, local);
    let again = load(&[], Some(&c.render())).unwrap();
    assert_eq!(again.first().live.client_tls, local);
    // Also a path with characters TOML must escape.
    let odd = "state_dir = \"/srv/c\\ea \\\"q\\\" \\\\ \\t\"\n";
    let c = load(&["--upstream", "db.x"], Some(odd)).unwrap();
    let again = load(&[], Some(&c.render())).unwrap();
    assert_eq!(again.first().live.client_tls, c.first().live.client_tls);
    let ClientTls::Local { state_dir } = &c.first().live.client_tls else {
        panic!("not the local CA");
    };
    assert_eq!(state_dir, Path::new("/srv/c\u{1b}a \"q\" \\ \t"));
}

#[test]
fn audit_table_under_the_flags() {
    let toml = "[audit]\nmode = \"sync\"\ndir = \"/var/log/rip\"\nrotate_age = \"1h\"\nallow_password_changes = true\n";
    let c = load(&["--upstream", "db.x"], Some(toml)).unwrap();
    assert_eq!(c.start.audit.mode, crate::audit::Mode::Sync);
    assert_eq!(
        c.start.audit.dir.as_deref(),
        Some(Path::new("/var/log/rip"))
    );
    assert_eq!(c.start.audit.rotate_age, Duration::from_secs(3600));
    assert!(!c.start.audit.password_guard);
    // A flag beats the file.
    let c = load(&["--upstream", "db.x", "--audit-mode", "async"], Some(toml)).unwrap();
    assert_eq!(c.start.audit.mode, crate::audit::Mode::Async);
    // The effective configuration reads back as the same.
    let again = load(&[], Some(&c.render())).unwrap();
    assert_eq!(again.start.audit, c.start.audit);
    let e = load(&["--upstream", "db.x"], Some("[audit]\nmode = \"loud\"\n")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "audit.mode in /etc/p.toml \"loud\": use \"off\", \"async\" or \"sync\""
    );
    let e = load(&["--upstream", "db.x"], Some("[audit]\nmode = \"async\"\n")).unwrap_err();
    assert_eq!(e, ConfigError::NoAuditDir);
    assert!(load(&["--upstream", "db.x"], Some("[audit]\nfsync = true\n")).is_err());
}

#[test]
fn region_comes_from_the_endpoint() {
    let h = "demo.cluster-c0ffee.eu-west-1.rds.amazonaws.com";
    assert_eq!(region_from_host(h).as_deref(), Some("eu-west-1"));
    assert_eq!(
        region_from_host("x.cluster-ro-abc.cn-north-1.rds.amazonaws.com.cn").as_deref(),
        Some("cn-north-1")
    );
    assert_eq!(
        region_from_host("us-gov-west-1.rds.amazonaws.com").as_deref(),
        Some("us-gov-west-1")
    );
    assert_eq!(region_from_host("db.internal.example"), None);
}

#[test]
fn upstream_defaults_and_overrides() {
    let c = Config::from_cli(
        &cli(&["--upstream", "Demo.cluster-x.eu-west-1.rds.amazonaws.com"]),
        None,
        None,
    )
    .unwrap();
    let e = c.first();
    assert_eq!(
        e.start.upstream_host,
        "demo.cluster-x.eu-west-1.rds.amazonaws.com"
    );
    assert_eq!(e.start.upstream_port, 5432);
    assert_eq!(e.start.region.as_deref(), Some("eu-west-1"));
    assert_eq!(e.start.listen, ["127.0.0.1:5432".parse().unwrap()]);
    let c = Config::from_cli(
        &cli(&["--upstream", "db.example:6000", "--region", "us-east-2"]),
        Some("/home/a".into()),
        None,
    )
    .unwrap();
    let e = c.first();
    assert_eq!(
        (e.start.upstream_port, e.start.region.as_deref()),
        (6000, Some("us-east-2"))
    );
    assert!(
        matches!(e.live.client_tls, ClientTls::Local { ref state_dir } if state_dir.ends_with(".local/state/rds-iam-proxy"))
    );
}

#[test]
fn bad_values_name_the_flag() {
    let e = Config::from_cli(&cli(&["--upstream", "db:notaport"]), None, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--upstream \"db:notaport\": expected HOST or HOST:PORT"
    );
    let e = Config::from_cli(
        &cli(&["--upstream", "db", "--region", "Europe"]),
        None,
        None,
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::BadRegion(..)));
    let e = Config::from_cli(
        &cli(&["--upstream", "db", "--connect-to", "127.0.0.1"]),
        None,
        None,
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::BadConnectTo(..)));
}

const FILE: &str = r#"
max_connections = 7
handshake_timeout = "3s"
[admin]
listen = "9999"
[[endpoint]]
upstream = "db.cluster-a.eu-west-1.rds.amazonaws.com"
listen = ["127.0.0.1:6432"]
"#;

#[test]
fn flags_beat_file_beats_defaults() {
    // File only: its values replace the defaults.
    let c = load(&[], Some(FILE)).unwrap();
    assert_eq!(c.live.max_connections, 7);
    assert_eq!(c.live.handshake_timeout, Duration::from_secs(3));
    assert_eq!(c.live.login_timeout, Duration::from_secs(30), "default");
    assert_eq!(c.first().start.listen, ["127.0.0.1:6432".parse().unwrap()]);
    assert_eq!(
        c.start.admin_listen.unwrap(),
        "127.0.0.1:9999".parse().unwrap()
    );
    // A flag beats the file.
    let c = load(
        &["--max-connections", "9", "--listen", "127.0.0.1:7000"],
        Some(FILE),
    )
    .unwrap();
    assert_eq!(c.live.max_connections, 9);
    assert_eq!(c.first().start.listen, ["127.0.0.1:7000".parse().unwrap()]);
    assert_eq!(
        c.first().start.upstream_host,
        "db.cluster-a.eu-west-1.rds.amazonaws.com"
    );
}

#[test]
fn file_errors_name_the_key_and_the_fix() {
    let e = load(&[], Some("max_conections = 3\n")).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("/etc/p.toml") && m.contains("max_conections") && m.contains("unknown field"),
        "{m}"
    );
    let e = load(
        &[],
        Some("[[endpoint]]\nupstream = \"db\"\nlisten = [\"localhost:5432\"]\n"),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "endpoint[1].listen in /etc/p.toml \"localhost:5432\": expected IP:PORT, e.g. 127.0.0.1:5432"
    );
    let e = load(
        &[],
        Some("idle_timeout = \"2 weeks\"\n[[endpoint]]\nupstream = \"db\"\n"),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("idle_timeout in /etc/p.toml \"2 weeks\""),
        "{e}"
    );
    let e = load(&[], Some("[[endpoint]]\nlisten = [\"127.0.0.1:1\"]\n")).unwrap_err();
    assert_eq!(e, ConfigError::NoUpstream);
}

#[test]
fn two_endpoints_and_their_conflicts() {
    let two = r#"
[[endpoint]]
name = "writer"
upstream = "db.cluster-a.eu-west-1.rds.amazonaws.com"
listen = ["127.0.0.1:5432"]
[[endpoint]]
name = "reader"
upstream = "db.cluster-ro-a.eu-west-1.rds.amazonaws.com"
listen = ["127.0.0.1:5433"]
unix_socket = "/run/p"
"#;
    let c = load(&[], Some(two)).unwrap();
    assert_eq!(c.endpoints.len(), 2);
    assert_eq!(c.endpoints[1].start.name, "reader");
    assert_eq!(c.endpoints[1].unix_socket_port(), 5433);
    assert_eq!(c.endpoints[0].start.unix_socket, None);
    // The rendering reads back as the same configuration.
    let again = load(&[], Some(&c.render())).unwrap();
    assert_eq!(again.endpoints, c.endpoints);
    assert_eq!(again.live.max_connections, c.live.max_connections);

    let e = load(&["--listen", "127.0.0.1:1"], Some(two)).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("--listen: the file has 2 [[endpoint]] tables"),
        "{e}"
    );
    let e = load(&[], Some(&two.replace("5433", "5432"))).unwrap_err();
    assert!(
        e.to_string().contains("endpoint[2].listen") && e.to_string().contains("writer"),
        "{e}"
    );
    let e = load(&[], Some(&two.replace("\"reader\"", "\"writer\""))).unwrap_err();
    assert!(e.to_string().contains("endpoint[2].name"), "{e}");
}

/// A reload names every start-only setting it would change, and lets
/// the reloadable ones through.
#[test]
fn start_only_settings_are_named_on_reload() {
    let base = "max_connections = 5\nhandshake_timeout = \"3s\"\n[audit]\nmode = \"off\"\n";
    let running = load(&["--upstream", "db.x"], Some(base)).unwrap();
    let changes = |toml: &str, args: &[&str]| {
        let new = load(&[&["--upstream", "db.x"], args].concat(), Some(toml)).unwrap();
        crate::reloadable::start_only_changes(&running, &new)
    };
    let reloadable = "max_connections = 1\nhandshake_timeout = \"9s\"\nidle_timeout = \"1h\"\n[audit]\nmode = \"off\"\n";
    assert_eq!(
        changes(reloadable, &["--connect-to", "127.0.0.1:1"]),
        Vec::<String>::new()
    );
    let audit = "max_connections = 5\n[audit]\nmode = \"sync\"\ndir = \"/var/log/rip\"\n";
    assert_eq!(changes(audit, &[]), ["audit"]);
    assert_eq!(
        changes(
            base,
            &[
                "--profile",
                "other",
                "--allow-local-user",
                "0",
                "--listen",
                "127.0.0.1:7777"
            ]
        ),
        [
            "allow_local_users",
            "endpoint \"db.x:5432\": listen",
            "profile"
        ]
    );
    // Keys inside a table are named by their dotted path; a reloadable
    // key beside them is not named.
    let admin = |listen: &str, check: bool| {
        format!("{base}[admin]\nlisten = \"{listen}\"\nupstream_check = {check}\n")
    };
    let with_admin = load(
        &["--upstream", "db.x"],
        Some(&admin("127.0.0.1:9000", false)),
    )
    .unwrap();
    let moved = load(
        &["--upstream", "db.x"],
        Some(&admin("127.0.0.1:9001", true)),
    )
    .unwrap();
    assert_eq!(
        crate::reloadable::start_only_changes(&with_admin, &moved),
        ["admin.listen"]
    );
    let checked = load(
        &["--upstream", "db.x"],
        Some(&admin("127.0.0.1:9000", true)),
    )
    .unwrap();
    assert!(crate::reloadable::start_only_changes(&with_admin, &checked).is_empty());
    assert!(checked.live.admin_upstream_check);
    let endpoints = |second: &str| {
        format!("[[endpoint]]\nupstream = \"db.x\"\nlisten = [\"127.0.0.1:5432\"]\n{second}")
    };
    let two = load(
        &[],
        Some(&endpoints(
            "[[endpoint]]\nupstream = \"db.y\"\nlisten = [\"127.0.0.1:5433\"]\n",
        )),
    )
    .unwrap();
    let second_moved = load(
            &[],
            Some(&endpoints(
                "[[endpoint]]\nupstream = \"db.y\"\nlisten = [\"127.0.0.1:5434\"]\nconnect_to = \"10.0.0.1:5432\"\n",
            )),
        )
        .unwrap();
    assert_eq!(
        crate::reloadable::start_only_changes(&two, &second_moved),
        ["endpoint \"db.y:5432\": listen"]
    );
    let one = load(&[], Some(&endpoints(""))).unwrap();
    assert_eq!(
        crate::reloadable::start_only_changes(&two, &one),
        ["the endpoints (2 now, 1 in the new configuration)"]
    );
}

#[test]
fn digest_signing_settings_read_and_render_back() {
    let toml = "[audit]\nmode = \"async\"\ndir = \"/var/log/rip\"\nsign_key = \"kms:alias/audit-digests\"\ndigest_interval = \"5m\"\n";
    let c = load(&["--upstream", "db.x"], Some(toml)).unwrap();
    assert_eq!(
        c.start.audit.sign_key,
        Some(crate::audit::SignKey::Kms("alias/audit-digests".into()))
    );
    assert_eq!(c.start.audit.digest_interval, Duration::from_secs(300));
    assert_eq!(load(&["--upstream", "db.x"], Some(&c.render())).unwrap(), c);
    let flag = load(
        &[
            "--upstream",
            "db.x",
            "--audit-sign-key",
            "file:/etc/rip/key.pem",
        ],
        Some(toml),
    )
    .unwrap();
    assert_eq!(
        flag.start.audit.sign_key,
        Some(crate::audit::SignKey::File("/etc/rip/key.pem".into()))
    );
    let bad = load(
        &["--upstream", "db.x"],
        Some(&toml.replace("kms:alias/audit-digests", "alias/audit-digests")),
    )
    .unwrap_err();
    assert!(
        bad.to_string().contains("audit.sign_key in /etc/p.toml"),
        "{bad}"
    );
    let off = load(
        &["--upstream", "db.x"],
        Some("[audit]\nsign_key = \"file:/k.pem\"\n"),
    )
    .unwrap_err();
    assert!(off.to_string().contains("needs --audit-mode"), "{off}");
}

/// The `[audit]` table of the reference in docs/configuration.md loads
/// as it stands (the reference as a whole lists keys that exclude each
/// other, e.g. `gateway` beside `connect_to`).
#[test]
fn the_documented_audit_table_loads() {
    let doc = include_str!("../../docs/configuration.md");
    let start = doc.find("\n[audit]").expect("an [audit] table");
    let end = start + doc[start..].find("\n[[endpoint]]").expect("its end");
    let text = format!("{}\n[[endpoint]]\nupstream = \"db.x\"\n", &doc[start..end]);
    let c = load(&[], Some(&text)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.start.audit.mode, crate::audit::Mode::Sync);
    assert!(c.start.audit.sign_key.is_some() && c.start.audit.ship.s3_bucket.is_some());
    assert_eq!(
        c.start.audit.ship.s3_lock,
        Some((
            crate::audit::ship::LockMode::Compliance,
            Duration::from_secs(2555 * 86_400)
        ))
    );
    assert_eq!(load(&[], Some(&c.render())).unwrap(), c);
}

#[test]
fn a_duration_in_the_file_that_does_not_parse_names_its_key() {
    for (table, key) in [
        ("", "handshake_timeout"),
        ("[audit]\nmode = \"async\"\ndir = \"/a\"\n", "rotate_age"),
        (
            "[audit]\nmode = \"async\"\ndir = \"/a\"\n",
            "digest_interval",
        ),
        ("[audit]\nmode = \"async\"\ndir = \"/a\"\n", "s3_retention"),
    ] {
        let toml = format!("{table}{key} = \"soon\"\n");
        let e = load(&["--upstream", "db.x"], Some(&toml))
            .unwrap_err()
            .to_string();
        let name = if table.is_empty() {
            key.to_owned()
        } else {
            format!("audit.{key}")
        };
        assert!(
            e.starts_with(&format!("{name} in /etc/p.toml \"soon\"")),
            "{e}"
        );
    }
    // A flag given wins, and the file's text is not read.
    let c = load(
        &["--upstream", "db.x", "--handshake-timeout", "7s"],
        Some("handshake_timeout = \"soon\"\n"),
    )
    .unwrap();
    assert_eq!(c.live.handshake_timeout, Duration::from_secs(7));
}
