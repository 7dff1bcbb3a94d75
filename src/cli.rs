//! The command line: `smsauth [serve] [--config FILE]`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "smsauth",
    version,
    about = "SMS verification-code login and registration for small websites"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Configuration file (TOML). Without one, embedded defaults apply.
    #[arg(long, global = true, env = crate::config::ENV_CONFIG_FILE, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default).
    Serve,
}
