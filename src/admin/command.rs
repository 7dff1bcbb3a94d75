//! The command-line side of admin actions: open the store directly, or, when a running
//! server holds it, ask that server through the admin socket; if neither works, say what
//! to do.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::socket::{self, ClientError};
use super::{AdminError, Op, backup};
use crate::clock::rfc3339;
use crate::config::{Config, StorageEngine};
use crate::phone::PhoneParser;
use crate::rotation::{Phase, Rotation, RotationState};
use crate::store::{SledStore, Store, StoreError};

/// Why a command failed; the message is for the operator, the exit status for scripts.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub message: String,
    pub exit_code: u8,
}

fn fail(message: impl Into<String>) -> CommandError {
    CommandError {
        message: message.into(),
        exit_code: 1,
    }
}

impl From<AdminError> for CommandError {
    fn from(e: AdminError) -> Self {
        fail(e.to_string())
    }
}

impl From<anyhow::Error> for CommandError {
    fn from(e: anyhow::Error) -> Self {
        fail(format!("{e:#}"))
    }
}

/// Where the command's action runs.
enum Target {
    /// No server holds the data dir: the store, opened here.
    Direct(Store),
    /// A server holds it: its admin socket.
    Server(PathBuf),
}

async fn open(cfg: &Config) -> Result<Target, CommandError> {
    if cfg.storage.engine == StorageEngine::Postgres {
        // Shared by every instance and locked by none: act on it directly.
        return Ok(Target::Direct(Store::open(cfg).await?));
    }
    let dir = &cfg.storage.data_dir;
    // Never create a store here: a mistyped data_dir should not look like an empty site.
    if !dir.join("db").exists() {
        return Err(fail(format!(
            "no smsauth data in {} (storage.data_dir); check --config",
            dir.display()
        )));
    }
    match SledStore::open_keyed(
        dir,
        cfg.storage.cache_capacity_mb,
        &cfg.memory,
        crate::store::phone_key_file(cfg),
    ) {
        Ok(sled) => Store::embedded(Arc::new(sled), cfg)
            .map(Target::Direct)
            .map_err(|e| fail(format!("cannot open the store in {}: {e}", dir.display()))),
        Err(StoreError::Locked(_)) => Ok(Target::Server(socket::socket_path(dir))),
        Err(e) => Err(fail(format!(
            "cannot open the store in {}: {e}",
            dir.display()
        ))),
    }
}

/// The data dir is held by a process that does not answer on its admin socket.
fn in_use(cfg: &Config, e: &ClientError) -> CommandError {
    fail(format!(
        "the data dir {} is in use by another process (a running smsauth server?) and its admin socket does not answer ({e}). Stop the server (`systemctl stop smsauth`, or Ctrl-C / kill -TERM its process) and run the command again.",
        cfg.storage.data_dir.display()
    ))
}

fn remote(cfg: &Config, e: ClientError) -> CommandError {
    match e {
        e @ ClientError::Unreachable { .. } => in_use(cfg, &e),
        ClientError::Refused { message, .. } => fail(message),
        e @ ClientError::Protocol(_) => fail(e.to_string()),
    }
}

/// `smsauth user ...`: prints the answer, returns the text to print.
pub async fn user(cfg: &Config, op: Op) -> Result<String, CommandError> {
    let answer = match open(cfg).await? {
        Target::Direct(store) => {
            let phones = PhoneParser::new(&cfg.phone).map_err(|e| fail(e.to_string()))?;
            let answer = super::execute(&store, &phones, &op).await;
            drop(store);
            keep_owner(&cfg.storage.data_dir);
            answer?
        }
        Target::Server(sock) => socket::request_op(&sock, &op)
            .await
            .map_err(|e| remote(cfg, e))?,
    };
    Ok(super::render(&answer))
}

/// `smsauth keys rotate-token-key`.
pub async fn rotate_token_key(cfg: &Config) -> Result<String, CommandError> {
    let (rotated, via) = match open(cfg).await? {
        Target::Direct(store) => {
            let keys = crate::signing::SigningKeys::open(
                cfg,
                store.keys.clone(),
                crate::token::Tokens::lifetime(cfg.token.access_ttl_secs),
            )
            .await
            .map_err(|e| fail(format!("cannot read the token signing keys: {e}")))?;
            let (alg, kid) = keys
                .rotate()
                .await
                .map_err(|e| fail(format!("cannot rotate the token signing key: {e}")))?;
            drop(store);
            keep_owner(&cfg.storage.data_dir);
            let rotated = socket::Rotated {
                algorithm: alg.name().to_owned(),
                kid,
                retired_key_verifies_secs: keys.retention_secs(),
            };
            let via = match cfg.storage.engine {
                StorageEngine::Postgres => format!(
                    "running instances sign with it within server.housekeeping_secs ({} s)",
                    cfg.server.housekeeping_secs
                ),
                StorageEngine::Sled => "the server signs with it from its next start".to_owned(),
            };
            (rotated, via)
        }
        Target::Server(sock) => {
            let rotated = socket::request_rotate_token_key(&sock)
                .await
                .map_err(|e| remote(cfg, e))?;
            (rotated, "the running server signs with it now".to_owned())
        }
    };
    Ok(format!(
        "new token signing key {} ({}): {via}; the previous key verifies for {} s more\n",
        rotated.kid, rotated.algorithm, rotated.retired_key_verifies_secs
    ))
}

/// `smsauth keys rotate-phone-key --new-key-file FILE`: starts a rotation to the key in
/// FILE (or finds the one to it running) and follows it until it is done, a line per
/// step. Cut short (Ctrl-C), the rotation goes on in the running server or instances, and
/// a second run follows it again; with no server running, this process does the work.
pub async fn rotate_phone_key(cfg: &Config, file: &Path) -> Result<String, CommandError> {
    let (key_file, own_key_file) = crate::store::phone_key_path(cfg);
    let mut said = None;
    let mut say = |state: &RotationState, behind: &[String]| {
        let mut line = progress(state);
        if !behind.is_empty() {
            line.push_str(&format!(" (waiting for {})", behind.join(", ")));
        }
        if said.as_ref() != Some(&line) {
            println!("{line}");
            said = Some(line);
        }
    };
    let done = match open(cfg).await? {
        Target::Direct(store) => {
            let rotation = Rotation::new(
                store.rotations.clone(),
                store.phones.clone(),
                cfg.code.ttl_secs,
                key_file,
                own_key_file,
            );
            let begun = rotation
                .begin(file)
                .await
                .map_err(|e| fail(format!("cannot rotate the phone key: {e}")))?;
            say(&begun, &[]);
            let done = loop {
                match rotation.tick().await {
                    Ok(Some(state)) => {
                        // Done once every live instance holds the new key alone too, so
                        // that nothing serves under the old key when this says so.
                        let behind = rotation.waiting_for(&state).await;
                        if !state.running() && behind.is_empty() {
                            break state;
                        }
                        say(&state, &behind)
                    }
                    Ok(None) => return Err(fail("the rotation's record is gone from the store")),
                    Err(e) => println!("waiting: {e}"),
                }
                tokio::time::sleep(crate::rotation::POLL).await;
            };
            rotation.leave().await;
            store
                .engine
                .flush()
                .await
                .map_err(|e| fail(e.to_string()))?;
            drop(store);
            keep_owner(&cfg.storage.data_dir);
            done
        }
        Target::Server(sock) => {
            // The server may not read the operator's file (a unit's made-up user): it is
            // handed the key itself, over the socket only it and root can reach.
            let key = crate::privacy::read_key_file(file)
                .map_err(|e| fail(format!("cannot rotate the phone key: {e:#}")))?;
            let begun = socket::request_rotate_phone_key(&sock, &key)
                .await
                .map_err(|e| remote(cfg, e))?;
            say(&begun, &[]);
            loop {
                match socket::request_phone_key_rotation(&sock)
                    .await
                    .map_err(|e| remote(cfg, e))?
                {
                    Some(state) if !state.running() => break state,
                    Some(state) => say(&state, &[]),
                    None => return Err(fail("the rotation's record is gone from the store")),
                }
                tokio::time::sleep(crate::rotation::POLL).await;
            }
        }
    };
    // Whose key file the rotation left behind: the server's (through the socket) or this
    // command's own, as recorded when it began.
    let own = std::path::absolute(cfg.storage.data_dir.join(crate::privacy::DEFAULT_KEY_FILE))
        .ok()
        .map(|p| p.display().to_string());
    let after = if own_key_file && done.from_key_file == own {
        format!(
            "{} now holds the new key; the old key is gone.",
            own.unwrap_or_default()
        )
    } else {
        format!(
            "privacy.phone_key_file ({}) still holds the old key: put the new key in its place \
             on every instance (under systemd, in the file the unit's phone-key credential is \
             loaded from), then destroy the old key. Until then an instance that starts reads \
             the new key from {}.",
            done.from_key_file.as_deref().unwrap_or("?"),
            done.to_key_file
        )
    };
    Ok(format!(
        "phone key rotation done: {} users moved, every record is sealed with phone key {}.\n{after}\n",
        done.moved, done.to
    ))
}

fn progress(state: &RotationState) -> String {
    match state.phase {
        Phase::Loading => format!(
            "rotating the phone key {} -> {}: waiting for every instance to load the new key",
            state.from, state.to
        ),
        Phase::Moving => format!(
            "rotating the phone key {} -> {}: {} users moved (up to id {})",
            state.from, state.to, state.moved, state.cursor
        ),
        Phase::Done => format!("phone key {} is the store's key", state.to),
    }
}

/// Why a backup is refused while the phone key rotates.
pub const ROTATING: &str = "a phone key rotation is running: the store is sealed with two keys \
     until it is done, and a backup names one; back up when `smsauth keys rotate-phone-key` \
     reports it done";

/// `smsauth backup FILE [--include-keys]`.
pub async fn backup(cfg: &Config, file: &Path, include_keys: bool) -> Result<String, CommandError> {
    let (snapshot, keys, via) = match open(cfg).await? {
        Target::Direct(store) => {
            if let Some(state) = store
                .rotations
                .rotation()
                .await
                .map_err(|e| fail(e.to_string()))?
                && state.running()
            {
                return Err(fail(ROTATING));
            }
            let keys = store
                .keys
                .export_keys()
                .await
                .map_err(|e| fail(e.to_string()))?;
            let snapshots = store.snapshots.clone();
            let records =
                tokio::task::spawn_blocking(move || backup::snapshot_records(&*snapshots))
                    .await
                    .map_err(|e| fail(e.to_string()))?
                    .map_err(|e| fail(format!("cannot read the store: {e}")))?;
            (records, keys, "the store")
        }
        Target::Server(sock) => {
            let records = socket::request_snapshot(&sock)
                .await
                .map_err(|e| remote(cfg, e))?;
            let keys = crate::keys::in_dir(&cfg.storage.data_dir)?;
            (records.to_vec(), keys, "the running server")
        }
    };
    let phone_key = if include_keys {
        let path = crate::store::phone_key_file(cfg)
            .map(Path::to_owned)
            .unwrap_or_else(|| cfg.storage.data_dir.join(crate::privacy::DEFAULT_KEY_FILE));
        Some(crate::privacy::read_key_file(&path)?)
    } else {
        None
    };
    let count = backup::write_file(file, &snapshot, &keys, phone_key.as_ref())?;
    let phone_note = if include_keys {
        "the phone key too: anyone with this file reads every phone number"
    } else {
        "not the phone key: keep that file apart, restore needs it"
    };
    Ok(format!(
        "backed up {count} records from {via} to {} (mode 0600: it holds the server's keys; {phone_note})\n",
        file.display()
    ))
}

/// `smsauth migrate`: brings the store's schema to this release's, as a start would, and
/// nothing else; for operators who migrate as a step of its own before a rolling restart.
pub async fn migrate(cfg: &Config) -> Result<String, CommandError> {
    let dir = &cfg.storage.data_dir;
    if cfg.storage.engine == StorageEngine::Sled && !dir.join("db").exists() {
        return Err(fail(format!(
            "no smsauth data in {} (storage.data_dir); check --config",
            dir.display()
        )));
    }
    let store = Store::open(cfg).await.map_err(|e| CommandError {
        exit_code: exit_code(&e),
        message: format!("{e:#}"),
    })?;
    drop(store);
    Ok(format!(
        "the {} store is at this release's schema\n",
        match cfg.storage.engine {
            StorageEngine::Sled => "sled",
            StorageEngine::Postgres => "PostgreSQL",
        }
    ))
}

/// The exit status for a failure to open the store: 2 for a store this release must not
/// touch (a newer schema), as for a refused configuration; 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let refused = e
        .chain()
        .any(|c| matches!(c.downcast_ref::<StoreError>(), Some(StoreError::Schema(_))));
    if refused { 2 } else { 1 }
}

/// `smsauth config check`: what a start checks before it opens the store (the
/// configuration itself was checked as it loaded), then the effective configuration as
/// TOML with every secret masked.
pub fn config_check(cfg: &Config) -> Result<String, CommandError> {
    let refused = |e: anyhow::Error| CommandError {
        message: format!("{e:#}"),
        exit_code: 2,
    };
    PhoneParser::new(&cfg.phone).map_err(|e| refused(e.into()))?;
    crate::sms::Sms::from_config(&cfg.sms).map_err(refused)?;
    crate::password::Passwords::new(&cfg.password).map_err(|e| refused(e.into()))?;
    let shown = toml::to_string(cfg).map_err(|e| refused(e.into()))?;
    Ok(format!(
        "# The configuration is valid. As smsauth reads it, defaults included\n\
         # (secrets shown as {}):\n\n{shown}",
        crate::config::MASKED
    ))
}

/// `smsauth restore FILE`.
pub async fn restore(cfg: &Config, file: &Path) -> Result<String, CommandError> {
    if cfg.storage.engine == StorageEngine::Postgres {
        return restore_shared(cfg, file).await;
    }
    let dir = cfg.storage.data_dir.clone();
    let cache = cfg.storage.cache_capacity_mb;
    let file = file.to_owned();
    let key_file = crate::store::phone_key_file(cfg).map(Path::to_owned);
    let restored = tokio::task::spawn_blocking(move || {
        backup::restore(&file, &dir, cache, key_file.as_deref())
    })
    .await
    .map_err(|e| fail(e.to_string()))??;
    keep_owner(&cfg.storage.data_dir);
    let mut text = format!(
        "restored {} records ({} users) taken at {} into {}\n",
        restored.records,
        restored.users,
        rfc3339(restored.taken_at),
        cfg.storage.data_dir.display()
    );
    if !restored
        .key_files
        .iter()
        .any(|k| k == "token.key" || k == "signing.key")
    {
        text.push_str(
            "note: the backup has no token signing key (token.secret was set): start with the same token.secret, or sessions will not verify\n",
        );
    }
    Ok(text)
}

/// `smsauth restore FILE` into an empty PostgreSQL database (no instance may serve it
/// meanwhile: stop them first).
async fn restore_shared(cfg: &Config, file: &Path) -> Result<String, CommandError> {
    let bytes =
        std::fs::read(file).map_err(|e| fail(format!("cannot read {}: {e}", file.display())))?;
    let parsed = backup::Backup::parse(&bytes)
        .map_err(|e| fail(format!("refusing {}: {e}", file.display())))?;
    let store = Store::open(cfg).await?;
    let source = format!(
        "privacy.phone_key_file ({})",
        cfg.privacy.phone_key_file.display()
    );
    backup::check_phone_key(&parsed, store.phones.key_id(), &source)?;
    let users = store
        .users
        .user_count()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let keys = store
        .keys
        .export_keys()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if users != 0 || !keys.is_empty() {
        return Err(fail(
            "the PostgreSQL database is not empty (it has users or server keys); restore only loads into an empty database: create a new one, point storage.postgres.url at it, and run restore again",
        ));
    }
    let taken_at = parsed.taken_at;
    let records = parsed.records.len();
    let loader = store.clone();
    let key_files = tokio::task::spawn_blocking(move || {
        let parsed = backup::Backup::parse(&bytes).expect("parsed once already");
        backup::load(&parsed, &loader)
    })
    .await
    .map_err(|e| fail(e.to_string()))??;
    let users = store
        .users
        .user_count()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut text = format!(
        "restored {records} records ({users} users) taken at {} into the PostgreSQL database\n",
        rfc3339(taken_at)
    );
    if !key_files
        .iter()
        .any(|k| k == "token.key" || k == "signing.key")
    {
        text.push_str(
            "note: the backup has no token signing key (token.secret was set): start with the same token.secret, or sessions will not verify\n",
        );
    }
    Ok(text)
}

/// After a command wrote into the data dir directly, gives whatever it created to the
/// data dir's owner. An operator runs commands as root, but the server runs as its own
/// user (systemd's DynamicUser), which could not open files left owned by root. Only
/// root can do this; for anyone else it changes nothing.
fn keep_owner(dir: &Path) {
    let Ok(top) = std::fs::metadata(dir) else {
        return;
    };
    let (uid, gid) = (top.uid(), top.gid());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.uid() != uid || meta.gid() != gid {
                let _ = std::os::unix::fs::lchown(&path, Some(uid), Some(gid));
            }
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
}
