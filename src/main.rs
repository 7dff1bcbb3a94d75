//! `smsauth`: parse the command line, load the configuration, run the command.

use std::process::ExitCode;

use clap::Parser;
use smsauth::admin::command;
use smsauth::cli::{Cli, Command, ConfigCommand, KeysCommand};
use smsauth::config::Config;

/// jemalloc, not glibc's malloc: under load, glibc's arena locks were half the futex calls
/// of a registration (memory freed by another thread than the one that took it: sled's
/// epoch-based reclamation, hyper's buffers), and each contended one a context switch.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Made from the command line alone: no configuration is read for these.
    let generated = match &cli.command {
        Some(Command::Man) => Some(smsauth::cli::man_page()),
        Some(Command::Completions { shell }) => Some(smsauth::cli::completions(*shell)),
        _ => None,
    };
    if let Some(text) = generated {
        use std::io::Write;
        return match std::io::stdout().write_all(&text) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    let cfg = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("smsauth: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    // Admin commands print their answer or their refusal; they write no log.
    let admin = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => return serve(&runtime, cfg),
        Command::User { action } => runtime.block_on(command::user(&cfg, action.into())),
        Command::Keys {
            action: KeysCommand::RotateTokenKey,
        } => runtime.block_on(command::rotate_token_key(&cfg)),
        Command::Keys {
            action: KeysCommand::RotatePhoneKey { new_key_file },
        } => runtime.block_on(command::rotate_phone_key(&cfg, &new_key_file)),
        Command::Backup { file, include_keys } => {
            runtime.block_on(command::backup(&cfg, &file, include_keys))
        }
        Command::Restore { file } => runtime.block_on(command::restore(&cfg, &file)),
        Command::Migrate => runtime.block_on(command::migrate(&cfg)),
        Command::Config {
            action: ConfigCommand::Check,
        } => command::config_check(&cfg),
        // Printed before the configuration was read.
        Command::Man | Command::Completions { .. } => Ok(String::new()),
    };
    match admin {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smsauth: {e}");
            ExitCode::from(e.exit_code)
        }
    }
}

fn serve(runtime: &tokio::runtime::Runtime, cfg: Config) -> ExitCode {
    // Dropped last: every line logged, the final ones included, is written out.
    let _log = smsauth::logging::init(&cfg.log);
    let result = runtime.block_on(async {
        let server = smsauth::server::Server::bind(cfg).await?;
        server.serve(smsauth::server::termination()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("smsauth: {e:#}");
            ExitCode::from(command::exit_code(&e))
        }
    }
}
