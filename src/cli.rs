//! The command line: `smsauth [serve] [--config FILE]`, and the admin commands
//! (`user ...`, `keys ...`, `backup FILE`, `restore FILE`, `migrate`) on the same
//! configuration's store, and `config check`.

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
    /// Look at and change users (works while the server runs, through its admin socket).
    User {
        #[command(subcommand)]
        action: UserCommand,
    },
    /// The server's keys (works while the server runs, through its admin socket).
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    /// Write a consistent snapshot of the data dir (store and keys) to FILE (mode 0600).
    Backup {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Put the phone key in the backup too. Without it the backup's phone numbers
        /// stay encrypted to whoever holds the file; restore then needs the key file.
        #[arg(long)]
        include_keys: bool,
    },
    /// Load a backup FILE into an empty data dir (the server must not be running).
    Restore {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Bring the store's schema to this release's and exit (a start does this too).
    Migrate,
    /// The configuration, without starting anything.
    Config {
        #[command(subcommand)]
        action: ConfigCommand,
    },
    /// Print the man page (roff), made from this command line's definition.
    Man,
    /// Print the completion script for SHELL (bash, zsh, fish, elvish or powershell).
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

/// The man page of the whole command line, subcommands included.
pub fn man_page() -> Vec<u8> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .expect("writing to memory");
    out
}

/// The completion script of `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "smsauth", &mut out);
    out
}

/// `smsauth config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration as a start would (exit 0, or 2 with the same message),
    /// and print the effective configuration, every secret masked.
    Check,
}

/// `smsauth keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// A new token signing key signs from now on; the old one goes on verifying until the
    /// last token it signed has expired (it stays in the JWKS until then).
    RotateTokenKey,
    /// Re-seal and re-index every stored phone number under the phone key in FILE, while
    /// the server runs (on every instance of a cluster, which must all read FILE at the
    /// same path). Follows the rotation until it is done; the old key may be destroyed
    /// only then. Resumable: run it again to follow it after an interruption.
    RotatePhoneKey {
        /// The new phone key: 32 random bytes, raw or base64, as privacy.phone_key_file.
        #[arg(long, value_name = "FILE")]
        new_key_file: std::path::PathBuf,
    },
}

/// `smsauth user ...`. PHONE takes any form the API accepts (`13812345678`, `+86 138...`).
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// One line per user: id, phone (masked unless --full), nickname, created, last
    /// login, disabled.
    List {
        /// Show every phone number in full (the store keeps them encrypted; this decrypts).
        #[arg(long)]
        full: bool,
    },
    /// One user, with its login methods.
    Show { phone: String },
    /// Refuse the user's logins and sessions until enabled again.
    Disable { phone: String },
    /// Undo disable.
    Enable { phone: String },
    /// Remove the user and its login methods (its id is never reused).
    Delete { phone: String },
    /// End all of the user's sessions.
    Logout { phone: String },
}

impl From<UserCommand> for crate::admin::Op {
    fn from(c: UserCommand) -> Self {
        use crate::admin::Op;
        match c {
            UserCommand::List { full } => Op::List { full },
            UserCommand::Show { phone } => Op::Show { phone },
            UserCommand::Disable { phone } => Op::Disable { phone },
            UserCommand::Enable { phone } => Op::Enable { phone },
            UserCommand::Delete { phone } => Op::Delete { phone },
            UserCommand::Logout { phone } => Op::Logout { phone },
        }
    }
}
