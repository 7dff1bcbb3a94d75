//! `smsauth`: parse the command line, load the configuration, run the command.

use std::process::ExitCode;

use clap::Parser;
use smsauth::cli::{Cli, Command};
use smsauth::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("smsauth: {e}");
            return ExitCode::from(2);
        }
    };
    smsauth::logging::init(&cfg.log);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => runtime.block_on(async {
            let server = smsauth::server::Server::bind(cfg).await?;
            server.serve(smsauth::server::termination()).await
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("smsauth: {e:#}");
            ExitCode::FAILURE
        }
    }
}
