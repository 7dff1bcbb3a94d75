//! Rotation of the phone key (`smsauth keys rotate-phone-key --new-key-file FILE`): every
//! user record re-sealed and re-indexed under a new key while the server serves, on any
//! number of instances.
//!
//! The store records the rotation ([`RotationState`], never a key: the new key's file is
//! named, and every instance reads it from there), and every instance, and the command
//! line that started it, runs [`Rotation::tick`] every [`POLL`]. Each reports the keys it
//! holds (on PostgreSQL, a row of `smsauth_instances` per instance), and the rotation
//! moves on only when every live instance has caught up:
//!
//! 1. **loading**: each instance loads the new key to open and find with it, and goes on
//!    making records with the old one, so an instance that has not seen the rotation yet
//!    still finds everything;
//! 2. **moving**, once all hold it: each makes records with the new key, and finds them
//!    under either; the instances move the users from the old key to the new, a batch at
//!    a time from a cursor in the state (each move is idempotent, so a batch done twice,
//!    by two instances or after a crash, does no harm);
//! 3. **done**, once every user is moved and the codes sent before the switch have
//!    expired (a code is not moved: it is found under the old index until then): the
//!    store is sealed with the new key alone, and the old key may be destroyed.
//!
//! Short-lived records (pending codes, resend waits, the per-phone counters and the
//! lockout) are never moved: while the rotation runs they are found and counted under both
//! indexes, and when it is done, what the old index still counted is forgotten.
//!
//! Of racing creates of one phone's account on two instances, one making it under the
//! old index and one under the new, exactly one wins: each engine serializes them and
//! checks the other index under the same lock (see the engines).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::now;
use crate::privacy::{KeyId, PhoneKey, PhoneVault, read_key_file};
use crate::store::{PhoneRotations, StoreError};

/// How often each instance looks at the rotation and says which keys it holds.
pub const POLL: Duration = Duration::from_secs(2);
/// An instance not heard from for this long is taken for gone: the rotation no longer
/// waits for it. It must be far above [`POLL`].
pub const LIVE_SECS: i64 = 30;
/// With no rotation, how often an instance says it is alive: a rotation that begins
/// finds it on the list and waits for it, and it sees the rotation at its next poll.
/// Well inside [`LIVE_SECS`]; less often than [`POLL`], since on PostgreSQL each is a
/// write.
const IDLE_REPORT_SECS: i64 = 10;
/// Users moved per batch: one batch is a few milliseconds of the store's time.
const BATCH: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Loading,
    Moving,
    Done,
}

impl Phase {
    /// As an instance reports it: 0 for no rotation.
    pub fn number(self) -> i16 {
        match self {
            Phase::Loading => 1,
            Phase::Moving => 2,
            Phase::Done => 3,
        }
    }
}

/// A rotation as the store records it. Key ids and file names only, never a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationState {
    pub phase: Phase,
    /// Hex key ids.
    pub from: String,
    pub to: String,
    /// Where the old key was read from when the rotation began (a start during the
    /// rotation configured with the new key reads the old one from there).
    pub from_key_file: Option<String>,
    /// Where every instance reads the new key from.
    pub to_key_file: String,
    pub started_at: i64,
    /// When the first instance began making records with the new key.
    pub moving_since: Option<i64>,
    /// Every user with a smaller id is moved.
    pub cursor: u64,
    pub moved: u64,
    pub done_at: Option<i64>,
}

impl RotationState {
    pub fn to_id(&self) -> Result<KeyId, StoreError> {
        parse_id(&self.to)
    }

    pub fn from_id(&self) -> Result<KeyId, StoreError> {
        parse_id(&self.from)
    }

    pub fn running(&self) -> bool {
        self.phase != Phase::Done
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("the state serializes")
    }

    pub fn decode(text: &[u8]) -> Result<RotationState, StoreError> {
        serde_json::from_slice(text)
            .map_err(|e| StoreError::Corrupt(format!("the phone key rotation's state: {e}")))
    }
}

fn parse_id(hex_id: &str) -> Result<KeyId, StoreError> {
    hex::decode(hex_id)
        .ok()
        .and_then(|b| KeyId::from_bytes(&b))
        .ok_or_else(|| StoreError::Corrupt(format!("a phone key id {hex_id:?}")))
}

/// The systemd credential a unit may hand the new key over as. A service that runs as a
/// user made up at start (the packaged units' `DynamicUser`) cannot read a key file in
/// /etc/smsauth; its unit loads the file for it (`LoadCredential=phone-key-next:FILE`),
/// at a path that differs per unit, so the rotation's file name alone would not find it.
pub const NEXT_KEY_CREDENTIAL: &str = "phone-key-next";

fn load(path: &str) -> Result<PhoneKey, StoreError> {
    load_or_credential(path, std::env::var_os("CREDENTIALS_DIRECTORY"))
}

/// The key in `path`, or where that cannot be read, the [`NEXT_KEY_CREDENTIAL`] of the
/// unit's credentials directory.
fn load_or_credential(
    path: &str,
    credentials: Option<std::ffi::OsString>,
) -> Result<PhoneKey, StoreError> {
    let read = |path: &Path| {
        read_key_file(path)
            .map(|k| PhoneKey::new(&k))
            .map_err(|e| StoreError::Schema(format!("{e:#}")))
    };
    read(Path::new(path)).or_else(|e| {
        match credentials
            .map(|dir| Path::new(&dir).join(NEXT_KEY_CREDENTIAL))
            .filter(|credential| credential.exists())
        {
            Some(credential) => read(&credential),
            None => Err(e),
        }
    })
}

/// Sets a vault opened with the configured key to what the store's rotation needs, at
/// start: both keys while one runs, the new one alone when it is done (a start still
/// configured with the old key file reads the new key from the file the rotation
/// named). `stored` is the key id the store says it is sealed with. Refuses a start that
/// cannot have every key the store needs.
pub fn settle_vault(
    vault: &PhoneVault,
    stored: Option<KeyId>,
    rotation: Option<&RotationState>,
) -> Result<(), StoreError> {
    let configured = vault.key_id();
    let Some(state) = rotation else {
        return match stored {
            Some(stored) if stored != configured => Err(wrong_key(configured, stored)),
            _ => Ok(()),
        };
    };
    let (from, to) = (state.from_id()?, state.to_id()?);
    if !state.running() {
        if configured == to {
            return Ok(());
        }
        let key = load(&state.to_key_file).map_err(|e| {
            StoreError::Schema(format!(
                "this store was rotated to phone key {to}, and the configured key is {configured}; \
                 the rotation's key file {} cannot be read ({e}): set privacy.phone_key_file to \
                 the new key",
                state.to_key_file
            ))
        })?;
        if key.id() != to {
            return Err(wrong_key(configured, to));
        }
        tracing::warn!(
            key_file = %state.to_key_file,
            "privacy.phone_key_file still names the phone key this store was rotated away \
             from; the new key is read from the rotation's key file: point \
             privacy.phone_key_file at it"
        );
        vault.set_keys(key, None);
        return Ok(());
    }
    // Running: both keys are needed, whichever is configured.
    let other = if configured == from {
        load(&state.to_key_file)
    } else if configured == to {
        match &state.from_key_file {
            Some(file) => load(file),
            None => Err(StoreError::Schema(
                "the old key's file is not recorded".into(),
            )),
        }
    } else {
        return Err(wrong_key(configured, from));
    };
    let other = other.map_err(|e| {
        StoreError::Schema(format!(
            "a phone key rotation from key {from} to {to} is running, and this instance needs \
             both keys: {e}"
        ))
    })?;
    if other.id() != if configured == from { to } else { from } {
        return Err(StoreError::Schema(format!(
            "the rotation's key file holds key {}, not the key the rotation names",
            other.id()
        )));
    }
    let (this, other) = (vault.current(), Arc::new(other));
    let (from_key, to_key) = if configured == from {
        (this, other)
    } else {
        (other, this)
    };
    match state.phase {
        Phase::Loading => vault.set_arcs(from_key, Some(to_key)),
        _ => vault.set_arcs(to_key, Some(from_key)),
    }
    Ok(())
}

fn wrong_key(configured: KeyId, stored: KeyId) -> StoreError {
    StoreError::Schema(format!(
        "the phone key in privacy.phone_key_file (id {configured}) is not the key this store \
         is sealed with (id {stored}); every instance needs the same key file"
    ))
}

/// What [`Rotation::begin`] refuses.
#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    #[error("{0}")]
    Key(String),
    #[error("the store is sealed with that key already")]
    Same,
    #[error("a rotation to phone key {0} is running: let it finish first")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One participant of rotations: a server instance, or the command line that starts one.
pub struct Rotation {
    store: Arc<dyn PhoneRotations>,
    vault: Arc<PhoneVault>,
    /// This participant's name in the store's list of instances.
    instance: String,
    /// How long a code lives: the rotation is done no sooner than this after the switch.
    code_ttl_secs: i64,
    /// The file this participant read its phone key from: a start configured with the
    /// new key during the rotation reads the old one from there.
    key_file: PathBuf,
    /// Whether that file is the sled data dir's own (no `privacy.phone_key_file`): it
    /// then gets the new key when the rotation is done. A configured file is the
    /// operator's to swap.
    own_key_file: bool,
    /// Whether the data dir's own key file was checked against a finished rotation.
    key_file_settled: std::sync::atomic::AtomicBool,
    /// When this participant last said it is alive with no rotation running.
    idle_reported_at: std::sync::atomic::AtomicI64,
    /// What the last tick reported, so a failure is logged once, not every tick.
    last_error: std::sync::Mutex<Option<String>>,
    /// One step at a time: the poll and an admin request for the state both tick, and
    /// what a tick answers must be what this participant has acted on.
    stepping: tokio::sync::Mutex<()>,
}

impl Rotation {
    pub fn new(
        store: Arc<dyn PhoneRotations>,
        vault: Arc<PhoneVault>,
        code_ttl_secs: u64,
        key_file: PathBuf,
        own_key_file: bool,
    ) -> Rotation {
        let mut id = [0u8; 8];
        rand::RngExt::fill(&mut rand::rng(), &mut id[..]);
        Rotation {
            store,
            vault,
            instance: format!("{}-{}", hostname(), hex::encode(id)),
            code_ttl_secs: code_ttl_secs as i64,
            key_file: std::path::absolute(&key_file).unwrap_or(key_file),
            own_key_file,
            key_file_settled: std::sync::atomic::AtomicBool::new(false),
            idle_reported_at: std::sync::atomic::AtomicI64::new(i64::MIN / 2),
            last_error: std::sync::Mutex::new(None),
            stepping: tokio::sync::Mutex::new(()),
        }
    }

    /// Starts a rotation to the key in `key_file`, or finds the one to it running.
    pub async fn begin(&self, key_file: &Path) -> Result<RotationState, BeginError> {
        let key_file = std::path::absolute(key_file)
            .map_err(|e| BeginError::Key(format!("{}: {e}", key_file.display())))?;
        let key = read_key_file(&key_file)
            .map(|k| PhoneKey::new(&k))
            .map_err(|e| BeginError::Key(format!("{e:#}")))?;
        let current = self.store.rotation().await?;
        if let Some(state) = current.as_ref().filter(|s| s.running()) {
            if state.to_id()? == key.id() {
                return Ok(state.clone());
            }
            return Err(BeginError::Busy(state.to.clone()));
        }
        if key.id() == self.vault.key_id() {
            return Err(BeginError::Same);
        }
        let state = RotationState {
            phase: Phase::Loading,
            from: self.vault.key_id().hex(),
            to: key.id().hex(),
            from_key_file: Some(self.key_file.display().to_string()),
            to_key_file: key_file.display().to_string(),
            started_at: now(),
            moving_since: None,
            cursor: 0,
            moved: 0,
            done_at: None,
        };
        if !self.store.swap_rotation(current.as_ref(), &state).await? {
            return Err(BeginError::Busy("(another start won the race)".into()));
        }
        tracing::info!(from = %state.from, to = %state.to, "phone key rotation started");
        Ok(state)
    }

    /// One step: loads what the state needs, reports it, and moves the rotation on if
    /// every live instance is ready for that. Returns the state after it.
    pub async fn tick(&self) -> Result<Option<RotationState>, StoreError> {
        let _one_at_a_time = self.stepping.lock().await;
        let result = self.step().await;
        let error = result.as_ref().err().map(|e| e.to_string());
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if error != *last {
            match &error {
                Some(e) => {
                    tracing::error!(error = %e, "phone key rotation: this instance cannot take part")
                }
                None if last.is_some() => {
                    tracing::info!("phone key rotation: this instance takes part again")
                }
                None => {}
            }
            *last = error;
        }
        result
    }

    async fn step(&self) -> Result<Option<RotationState>, StoreError> {
        let Some(mut state) = self.store.rotation().await? else {
            self.report(None).await?;
            return Ok(None);
        };
        // Hold what the state needs before saying so. An instance that cannot goes on
        // saying it holds no rotation's keys, so the rotation waits for it (or for it to
        // stop) rather than leave it behind.
        if let Err(e) = self.hold(&state) {
            self.report(None).await?;
            return Err(e);
        }
        self.report(Some((&state.to, state.phase))).await?;
        if state.phase == Phase::Done
            && self.own_key_file
            && !self
                .key_file_settled
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            // A start after a crash between the rotation's end and the key file's
            // replacement finishes the replacement.
            let holds_new = read_key_file(&self.key_file)
                .is_ok_and(|k| PhoneKey::new(&k).id().hex() == state.to);
            if !holds_new {
                self.finish(&state)?;
            }
        }
        loop {
            let next = match state.phase {
                Phase::Done => return Ok(Some(state)),
                Phase::Loading => {
                    if !self.everyone_at(&state, Phase::Loading).await? {
                        return Ok(Some(state));
                    }
                    RotationState {
                        phase: Phase::Moving,
                        moving_since: Some(now()),
                        ..state.clone()
                    }
                }
                Phase::Moving => {
                    if !self.everyone_at(&state, Phase::Moving).await? {
                        return Ok(Some(state));
                    }
                    let (next, moved) = self.store.move_users(state.cursor, BATCH).await?;
                    match next {
                        Some(cursor) => RotationState {
                            cursor,
                            moved: state.moved + moved,
                            ..state.clone()
                        },
                        None => {
                            let since = state.moving_since.unwrap_or(state.started_at);
                            if now() < since + self.code_ttl_secs {
                                // Every user is moved; codes sent before the switch may
                                // still be used under the old index.
                                return Ok(Some(state));
                            }
                            // A create that sealed with the old key just before its
                            // instance switched may have committed behind the cursor.
                            if let Some(first) = self.store.first_unmoved().await? {
                                RotationState {
                                    cursor: first,
                                    ..state.clone()
                                }
                            } else {
                                RotationState {
                                    phase: Phase::Done,
                                    moved: state.moved + moved,
                                    done_at: Some(now()),
                                    ..state.clone()
                                }
                            }
                        }
                    }
                }
            };
            if !self.store.swap_rotation(Some(&state), &next).await? {
                // Another instance moved it on: go on from what it wrote.
                return self.store.rotation().await;
            }
            if next.phase != state.phase {
                tracing::info!(
                    phase = ?next.phase,
                    moved = next.moved,
                    "phone key rotation moved on"
                );
            }
            state = next;
            self.hold(&state)?;
            if state.phase == Phase::Done {
                self.finish(&state)?;
                self.key_file_settled
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            self.report(Some((&state.to, state.phase))).await?;
            tokio::task::yield_now().await;
        }
    }

    /// Says which keys this participant holds. With none running, or one done, at most
    /// every [`IDLE_REPORT_SECS`]; while one runs, at every step.
    async fn report(&self, phase: Option<(&str, Phase)>) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let settled = phase.is_none_or(|(_, p)| p == Phase::Done);
        if settled && now() - self.idle_reported_at.load(SeqCst) < IDLE_REPORT_SECS {
            return Ok(());
        }
        self.store.report_phase(&self.instance, phase).await?;
        // After a running phase the next settled report goes at once.
        let at = if settled { now() } else { i64::MIN / 2 };
        self.idle_reported_at.store(at, SeqCst);
        Ok(())
    }

    /// Whether every live instance reports `phase` (or later) of this rotation.
    async fn everyone_at(&self, state: &RotationState, phase: Phase) -> Result<bool, StoreError> {
        let behind = self.store.instances_behind(&state.to, phase).await?;
        if !behind.is_empty() {
            tracing::debug!(?behind, "phone key rotation waits for instances");
        }
        Ok(behind.is_empty())
    }

    /// Sets the vault to the keys `state` needs, loading the new key if it is not held.
    fn hold(&self, state: &RotationState) -> Result<(), StoreError> {
        let (from, to) = (state.from_id()?, state.to_id()?);
        let to_key = match self.vault.key(to) {
            Some(key) => key,
            None => Arc::new(load(&state.to_key_file)?),
        };
        if to_key.id() != to {
            return Err(StoreError::Schema(format!(
                "{} holds phone key {}, not {to}",
                state.to_key_file,
                to_key.id()
            )));
        }
        match state.phase {
            Phase::Loading | Phase::Moving => {
                let from_key = self.vault.key(from).ok_or_else(|| {
                    StoreError::Schema(format!("this instance does not hold phone key {from}"))
                })?;
                if state.phase == Phase::Loading {
                    self.vault.set_arcs(from_key, Some(to_key));
                } else {
                    self.vault.set_arcs(to_key, Some(from_key));
                }
            }
            Phase::Done => self.vault.set_arcs(to_key, None),
        }
        Ok(())
    }

    /// A sled data dir's own key file gets the new key, so the next start needs nothing
    /// else; a configured key file is the operator's to swap.
    fn finish(&self, state: &RotationState) -> Result<(), StoreError> {
        tracing::info!(to = %state.to, moved = state.moved, "phone key rotation done");
        if !self.own_key_file {
            return Ok(());
        }
        let path = &self.key_file;
        let key = read_key_file(Path::new(&state.to_key_file))
            .map_err(|e| StoreError::Engine(format!("{e:#}")))?;
        let tmp = path.with_extension("key.new");
        let _ = std::fs::remove_file(&tmp);
        crate::privacy::create_key_file(&tmp, &key)
            .and_then(|()| Ok(std::fs::rename(&tmp, path)?))
            .map_err(|e| StoreError::Engine(format!("replace {}: {e:#}", path.display())))?;
        // The copy the server was handed (`handed_key_file`) is no longer needed.
        let handed = handed_key_file(path);
        if Path::new(&state.to_key_file) == handed {
            let _ = std::fs::remove_file(handed);
        }
        Ok(())
    }

    /// The live instances not yet at the rotation's phase: they hold up its next step, or,
    /// once it is done, the end (an instance that still holds the old key).
    pub async fn waiting_for(&self, state: &RotationState) -> Vec<String> {
        let mut behind = self
            .store
            .instances_behind(&state.to, state.phase)
            .await
            .unwrap_or_default();
        behind.retain(|i| *i != self.instance);
        behind
    }

    /// Starts a rotation to `key`, handed over by the command line through the admin
    /// socket (it reads the operator's file; the server may not be able to): kept beside
    /// this participant's key file until the rotation is done, so a restart finds it.
    pub async fn begin_with(
        &self,
        key: &[u8; crate::privacy::KEY_BYTES],
    ) -> Result<RotationState, BeginError> {
        let file = handed_key_file(&self.key_file);
        let same = read_key_file(&file).is_ok_and(|k| k == *key);
        if !same {
            let _ = std::fs::remove_file(&file);
            crate::privacy::create_key_file(&file, key)
                .map_err(|e| BeginError::Key(format!("{e:#}")))?;
        }
        self.begin(&file).await
    }

    /// Takes this participant off the store's list of instances (a clean stop).
    pub async fn leave(&self) {
        let _ = self.store.leave(&self.instance).await;
    }

    /// Ticks every [`POLL`] until `stop` says so.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let _ = self.tick().await;
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.changed() => break,
            }
        }
        self.leave().await;
    }
}

/// Where a key handed over through the admin socket is kept: beside the key file.
fn handed_key_file(key_file: &Path) -> PathBuf {
    key_file.with_extension("key.next")
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "smsauth".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_the_service_cannot_read_is_taken_from_its_credential() {
        let dir = tempfile::tempdir().unwrap();
        let key = PhoneKey::generate();
        crate::privacy::create_key_file(&dir.path().join(NEXT_KEY_CREDENTIAL), &key).unwrap();
        let missing = dir.path().join("elsewhere/phone.key.new");
        let missing = missing.to_str().unwrap();
        let found = load_or_credential(missing, Some(dir.path().into())).unwrap();
        assert_eq!(found.id(), PhoneKey::new(&key).id());
        // Without the credential, the file's own error.
        let err = load_or_credential(missing, None).err().unwrap().to_string();
        assert!(err.contains("elsewhere"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        assert!(load_or_credential(missing, Some(empty.path().into())).is_err());
    }

    #[test]
    fn a_start_during_a_rotation_holds_both_keys_in_the_phase_s_order() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (PhoneKey::generate(), PhoneKey::generate());
        let (old_file, new_file) = (dir.path().join("old.key"), dir.path().join("new.key"));
        crate::privacy::create_key_file(&old_file, &old).unwrap();
        crate::privacy::create_key_file(&new_file, &new).unwrap();
        let (old_id, new_id) = (PhoneKey::new(&old).id(), PhoneKey::new(&new).id());
        let mut state = RotationState {
            phase: Phase::Loading,
            from: old_id.hex(),
            to: new_id.hex(),
            from_key_file: Some(old_file.display().to_string()),
            to_key_file: new_file.display().to_string(),
            started_at: 0,
            moving_since: None,
            cursor: 0,
            moved: 0,
            done_at: None,
        };
        // Loading: the old key seals, whichever key the start was given.
        for configured in [&old, &new] {
            let vault = PhoneVault::new(PhoneKey::new(configured));
            settle_vault(&vault, Some(old_id), Some(&state)).unwrap();
            assert_eq!(
                (vault.key_id(), vault.other_key_id()),
                (old_id, Some(new_id))
            );
        }
        // Moving: the new one.
        state.phase = Phase::Moving;
        let vault = PhoneVault::new(PhoneKey::new(&old));
        settle_vault(&vault, Some(old_id), Some(&state)).unwrap();
        assert_eq!(
            (vault.key_id(), vault.other_key_id()),
            (new_id, Some(old_id))
        );
        // Done: the new one alone, read from the rotation's file by a start that was
        // still given the old key.
        state.phase = Phase::Done;
        let vault = PhoneVault::new(PhoneKey::new(&old));
        settle_vault(&vault, Some(new_id), Some(&state)).unwrap();
        assert_eq!((vault.key_id(), vault.other_key_id()), (new_id, None));
        // Once the rotation's file is gone, only the new key opens the store.
        std::fs::remove_file(&new_file).unwrap();
        let vault = PhoneVault::new(PhoneKey::new(&old));
        assert!(settle_vault(&vault, Some(new_id), Some(&state)).is_err());
        let vault = PhoneVault::new(PhoneKey::new(&new));
        settle_vault(&vault, Some(new_id), Some(&state)).unwrap();
    }
}
