//! The configuration file (src/config.rs): TOML text parsed into the
//! file's tables (`parse_file`), then merged under the command line and
//! validated (`Config::merge`), as `--config FILE` does.
//!
//! Each input is merged three times: under a bare command line, under one
//! that gives `--upstream` and `--listen` (flags that override a single
//! file endpoint and conflict with several), and as `rds-iam-proxy gateway`
//! (the `[gateway]` table applies only there).
//!
//! Checks: no panic; an accepted configuration holds what validation
//! promises (a listener per endpoint, distinct names, non-zero timeouts
//! and limits, an audit directory when auditing); and `Config::render`,
//! which says it prints the effective configuration as valid `--config`
//! input, gives text that parses and merges back to the same
//! configuration.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use rds_iam_proxy::audit::Mode;
use rds_iam_proxy::cli::{Cli, ProxyArgs};
use rds_iam_proxy::config::{Config, Env, parse_file};

const PATH: &str = "/etc/rds-iam-proxy/proxy.toml";

/// A parsed command line and the ids of the flags it gave.
struct Line {
    args: ProxyArgs,
    given: HashSet<String>,
}

fn line(argv: &[&str]) -> Line {
    let mut cmd = Cli::command();
    let m = cmd
        .try_get_matches_from_mut(argv)
        .expect("fixed command line parses");
    let args = Cli::from_arg_matches(&m).expect("matches").proxy;
    let given = m
        .ids()
        .filter(|id| {
            matches!(
                m.value_source(id.as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .map(|id| id.as_str().to_owned())
        .collect();
    Line { args, given }
}

/// `rds-iam-proxy gateway` with no flags: the file says the rest.
fn gateway_line() -> Line {
    let mut cmd = Cli::command();
    let m = cmd
        .try_get_matches_from_mut(["rds-iam-proxy", "gateway"])
        .expect("fixed command line parses");
    let Some(rds_iam_proxy::cli::Command::Gateway(g)) =
        Cli::from_arg_matches(&m).expect("matches").command
    else {
        panic!("parsed as the gateway subcommand");
    };
    let mut args = g.proxy;
    args.gateway_mode = true;
    Line {
        args,
        given: HashSet::new(),
    }
}

fn lines() -> &'static [Line; 3] {
    static LINES: OnceLock<[Line; 3]> = OnceLock::new();
    LINES.get_or_init(|| {
        [
            line(&["rds-iam-proxy"]),
            line(&[
                "rds-iam-proxy",
                "--upstream",
                "db.cluster-abc.eu-west-1.rds.amazonaws.com",
                "--listen",
                "127.0.0.1:6432",
            ]),
            gateway_line(),
        ]
    })
}

fn env() -> Env {
    Env {
        home: Some(PathBuf::from("/home/fuzz")),
        xdg_state_home: None,
        identity: Default::default(),
    }
}

fn merge(l: &Line, text: &str) -> Option<Config> {
    let path = Path::new(PATH);
    let file = parse_file(path, text).ok()?;
    let given = |id: &str| l.given.contains(id);
    Config::merge(&l.args, &given, Some((path.to_owned(), file)), &env()).ok()
}

fn validated(c: &Config) {
    assert!(!c.endpoints.is_empty());
    for (i, e) in c.endpoints.iter().enumerate() {
        assert!(
            !e.start.listen.is_empty() || e.start.unix_socket.is_some(),
            "endpoint without listener"
        );
        assert!(!e.start.upstream_host.is_empty());
        assert_eq!(e.start.upstream_host, e.start.upstream_host.to_ascii_lowercase());
        for other in &c.endpoints[..i] {
            assert_ne!(e.start.name, other.start.name, "two endpoints share a name");
        }
        let _ = (e.unix_socket_port(), e.upstream_name());
    }
    let live = &c.live;
    assert!(!live.handshake_timeout.is_zero());
    assert!(!live.connect_timeout.is_zero());
    assert!(!live.login_timeout.is_zero());
    assert!(live.idle_timeout.is_none_or(|d| !d.is_zero()));
    assert!(
        live.max_connections >= 1 && live.max_handshakes >= 1 && live.max_handshakes_per_source >= 1
    );
    let a = &c.start.audit;
    assert!(
        a.mode == Mode::Off || a.dir.is_some(),
        "auditing without a directory"
    );
    assert!(a.max_statement_bytes >= 64);
    assert!(a.rotate_bytes >= 1024 * 1024 && a.rotate_bytes % (1024 * 1024) == 0);
    assert!(a.queue_capacity >= 16);
    assert!(a.rotate_age.as_secs() >= 1);
    match &c.start.gateway {
        Some(g) => {
            assert!(!g.id.is_empty() && !g.trust_accounts.is_empty() && !g.trust_roles.is_empty());
            assert!(
                !c.start.allow_remote_clients
                    && c.endpoints.iter().all(|e| e.start.gateway.is_none())
            );
            assert!(g.peers.is_empty() || g.instance.is_some());
        }
        None => assert!(
            c.start.allow_remote_clients
                || c.endpoints
                    .iter()
                    .all(|e| e.start.listen.iter().all(|a| a.ip().is_loopback())),
            "local mode listening where others reach it"
        ),
    }
}

pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for l in lines() {
        let Some(c) = merge(l, text) else {
            continue;
        };
        validated(&c);
        let rendered = c.render();
        let path = Path::new(PATH);
        if let Err(e) = parse_file(path, &rendered) {
            panic!("render() is not valid TOML: {e}\n{rendered}");
        }
        match merge(l, &rendered) {
            Some(again) => {
                assert_eq!(again, c, "render() does not read back\n{rendered}");
                // What reads back the same is no reason to refuse a reload.
                let changes = rds_iam_proxy::reloadable::start_only_changes(&c, &again);
                assert!(changes.is_empty(), "a reload of the same text is refused: {changes:?}");
            }
            None => {
                let given = |id: &str| l.given.contains(id);
                let err = Config::merge(
                    &l.args,
                    &given,
                    Some((path.to_owned(), parse_file(path, &rendered).unwrap())),
                    &env(),
                );
                panic!("render() is refused: {err:?}\n{rendered}");
            }
        }
    }
}
