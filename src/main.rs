use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use rds_iam_proxy::cli::{Cli, Command, LogFormat};
use rds_iam_proxy::config::Config;
use tracing_subscriber::EnvFilter;

/// Exit codes: 0 clean shutdown, 1 start-up or command failure, 2 usage
/// error (from clap).
fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rds-iam-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.proxy.log_format);
    if let Some(Command::Audit(c)) = cli.command {
        return rds_iam_proxy::commands::audit::run(c);
    }
    if let Some(command) = cli.command {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        return runtime.block_on(async {
            match command {
                Command::Token(args) => rds_iam_proxy::commands::token::run(args).await,
                Command::Audit(_) => unreachable!("handled above"),
            }
        });
    }
    let home = std::env::var_os("HOME").map(Into::into);
    let xdg = std::env::var_os("XDG_STATE_HOME").map(Into::into);
    let config = Config::from_cli(&cli.proxy, home, xdg)?;
    // Two cores are typical for a proxy host; more threads than cores only
    // add handoffs between them.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(rds_iam_proxy::app::run(config))?;
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("RDS_IAM_PROXY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
