use std::io::IsTerminal;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use rds_iam_proxy::cli::{Cli, Command, LogFormat, ProxyArgs};
use rds_iam_proxy::config::{Config, Env};
use tracing_subscriber::EnvFilter;

/// Exit codes: 0 clean shutdown (sessions still open after
/// --max-sigterm-delay were ended with 57P01), 1 start-up, configuration
/// or command failure, 2 usage error (from clap), 3 a second SIGTERM/SIGINT
/// cut the drain short. `connect` exits with its command's status.
fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!(
                "rds-iam-proxy: {}",
                rds_iam_proxy::error::chain_text(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// Ids of the flags given on the command line or in the environment.
fn given_ids(m: &ArgMatches) -> Vec<String> {
    m.ids()
        .filter(|id| {
            matches!(
                m.value_source(id.as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .map(|id| id.to_string())
        .collect()
}

/// The layered configuration for `args` (flags > env > file > defaults).
fn load_config(
    args: &ProxyArgs,
    given: &[String],
    env: &Env,
) -> Result<Config, rds_iam_proxy::config::ConfigError> {
    Config::load(args, &|id| given.iter().any(|g| g == id), env)
}

/// What is read from the environment once, identity inputs included.
fn process_env(args: &ProxyArgs) -> anyhow::Result<Env> {
    Ok(Env::from_process(args.aws.identity_options()?))
}

fn real_main() -> anyhow::Result<u8> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(command) = cli.command {
        let sub = matches
            .subcommand()
            .map(|(_, m)| given_ids(m))
            .unwrap_or_default();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        return match command {
            Command::Audit(c) => {
                init_tracing(cli.proxy.log_format, "warn");
                rds_iam_proxy::commands::audit::run(c)
            }
            Command::Token(args) => {
                init_tracing(cli.proxy.log_format, "info");
                runtime.block_on(rds_iam_proxy::commands::token::run(args))?;
                Ok(0)
            }
            Command::Whoami(args) => {
                init_tracing(cli.proxy.log_format, "warn");
                runtime.block_on(rds_iam_proxy::commands::whoami::run(args))?;
                Ok(0)
            }
            Command::Das(c) => {
                init_tracing(cli.proxy.log_format, "warn");
                runtime.block_on(rds_iam_proxy::commands::das::run(c))
            }
            Command::Policy(args) => {
                rds_iam_proxy::commands::policy::run(args)?;
                Ok(0)
            }
            Command::Connect(args) => {
                let config = load_config(&args.proxy, &sub, &process_env(&args.proxy)?)?;
                if args.proxy.check_config {
                    print!("{}", config.render());
                    return Ok(0);
                }
                // The command owns the terminal: the proxy speaks only of problems.
                init_tracing(config.start.log_format, "warn");
                runtime.block_on(rds_iam_proxy::commands::connect::run(config, args.command))
            }
            Command::Gateway(mut args) => {
                drop(runtime);
                args.proxy.gateway_mode = true;
                run_proxy(args.proxy, sub)
            }
            Command::GatewayPassword(args) => {
                init_tracing(cli.proxy.log_format, "warn");
                runtime.block_on(rds_iam_proxy::commands::gateway_password::run(args))?;
                Ok(0)
            }
            Command::Doctor(args) => {
                // The checklist says what failed; the SDK's own warnings
                // would only repeat it.
                init_tracing(args.proxy.log_format, "error");
                let config = load_config(&args.proxy, &sub, &process_env(&args.proxy)?)?;
                if args.proxy.check_config {
                    print!("{}", config.render());
                    return Ok(0);
                }
                let ok = runtime.block_on(rds_iam_proxy::commands::doctor::run(config));
                Ok(if ok { 0 } else { 1 })
            }
        };
    }
    run_proxy(cli.proxy, given_ids(&matches))
}

/// Runs the proxy (local or gateway mode) until it is stopped.
fn run_proxy(args: ProxyArgs, given: Vec<String>) -> anyhow::Result<u8> {
    let env = process_env(&args)?;
    let config = load_config(&args, &given, &env)?;
    if args.check_config {
        rds_iam_proxy::commands::check_config::run(&config)?;
        print!("{}", config.render());
        return Ok(0);
    }
    init_tracing(config.start.log_format, "info");
    let reloader: rds_iam_proxy::app::Reloader = Box::new(move || load_config(&args, &given, &env));
    // The main thread accepts, serves the admin listener and handles
    // signals; sessions run on the session workers (`--worker-threads`,
    // src/workers.rs), so this needs no thread pool of its own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let code = runtime.block_on(rds_iam_proxy::app::run(config, reloader))?;
    if code != 0 {
        // A second signal: do not wait for tasks still running.
        std::process::exit(code);
    }
    Ok(0)
}

fn init_tracing(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_env("RDS_IAM_PROXY_LOG")
        .unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.fmt_fields(rds_iam_proxy::log_text::fields()).init(),
        LogFormat::Json => builder.json().init(),
    }
}
