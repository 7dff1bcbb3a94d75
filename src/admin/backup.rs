//! Backups: one file holding a consistent snapshot of the store and the data dir's key
//! files, and its restore into an empty data dir.
//!
//! # Format (version 1)
//!
//! All integers big-endian.
//!
//! ```text
//! file     = header record* trailer
//! header   = "SMSAUTH-BACKUP\n" (15 bytes) | version u16 (= 1) | taken_at i64 (unix secs)
//! record   = 0x01 | name_len u8 | tree name (UTF-8) | key_len u32 | key | value_len u32 | value
//!          | 0x02 | name_len u8 | file name (UTF-8) | len u32 | file content
//! trailer  = 0xFF | record count u64 | SHA-256 of every byte before this digest
//! ```
//!
//! A tree record is one (tree, key, value) of the store exactly as stored (the store
//! layout and value encoding are documented in `store/sled_store.rs`); the store's own
//! `meta/schema_version` travels with them, so a later release restores an older backup
//! and migrates it as it would an older data dir. Records of every tree are included,
//! trees added later (rate-limit counters, ...) too, without a format change. A file
//! record is a key file of the data dir (`token.key`, `code.key`): without them restored
//! sessions and pending codes would not verify. So a backup holds secrets: it is written
//! with mode 0600.
//!
//! The trailer's digest makes any truncation or changed byte an error: restore checks the
//! whole file before it writes anything.
//!
//! Phone numbers travel as the store keeps them, sealed ([`crate::privacy`]), and the
//! store's `meta/phone_key_id` names the key they need. The phone key itself is left out
//! unless asked for (`--include-keys`, a file record `phone.key`): a backup alone then
//! reveals no number, and restore needs the key from where the operator keeps it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::clock::now;
use crate::privacy::{DEFAULT_KEY_FILE, KeyId, PhoneKey};
use crate::store::{SledStore, Snapshots, StoreError};

const MAGIC: &[u8] = b"SMSAUTH-BACKUP\n";
const VERSION: u16 = 1;
const TREE: u8 = 0x01;
const FILE: u8 = 0x02;
const END: u8 = 0xFF;
const HEADER_LEN: usize = MAGIC.len() + 2 + 8;
const TRAILER_LEN: usize = 1 + 8 + 32;

/// The data dir's key files a backup carries (those that exist).
pub const KEY_FILES: [&str; 4] = ["token.key", "code.key", "signing.key", "refresh.key"];
/// Where restore builds the new data dir before moving it into place.
const STAGING: &str = ".restore-partial";

/// One record of a backup, borrowing from the bytes it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Tree {
        tree: &'a str,
        key: &'a [u8],
        value: &'a [u8],
    },
    File {
        name: &'a str,
        content: &'a [u8],
    },
}

/// Appends records in the file format; `finish` adds the header's counterpart, the trailer.
pub struct Writer {
    buf: Vec<u8>,
    count: u64,
}

impl Writer {
    /// A backup file being built, header included.
    pub fn new() -> Writer {
        let mut w = Self::records_only();
        w.buf.extend_from_slice(MAGIC);
        w.buf.extend_from_slice(&VERSION.to_be_bytes());
        w.buf.extend_from_slice(&now().to_be_bytes());
        w
    }

    /// Bare records, no header or trailer: what the admin socket sends for a snapshot.
    pub fn records_only() -> Writer {
        Writer {
            buf: Vec::new(),
            count: 0,
        }
    }

    pub fn tree(&mut self, tree: &str, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        self.buf.push(TREE);
        self.name(tree)?;
        self.bytes(key)?;
        self.bytes(value)?;
        self.count += 1;
        Ok(())
    }

    pub fn file(&mut self, name: &str, content: &[u8]) -> std::io::Result<()> {
        self.buf.push(FILE);
        self.name(name)?;
        self.bytes(content)?;
        self.count += 1;
        Ok(())
    }

    pub fn record(&mut self, r: &Record<'_>) -> std::io::Result<()> {
        match *r {
            Record::Tree { tree, key, value } => self.tree(tree, key, value),
            Record::File { name, content } => self.file(name, content),
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The records written so far, without a trailer.
    pub fn into_records(self) -> Vec<u8> {
        self.buf
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(END);
        self.buf.extend_from_slice(&self.count.to_be_bytes());
        let digest = Sha256::digest(&self.buf);
        self.buf.extend_from_slice(&digest);
        self.buf
    }

    fn name(&mut self, name: &str) -> std::io::Result<()> {
        let len = u8::try_from(name.len())
            .map_err(|_| std::io::Error::other(format!("name too long: {name}")))?;
        self.buf.push(len);
        self.buf.extend_from_slice(name.as_bytes());
        Ok(())
    }

    fn bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(b.len())
            .map_err(|_| std::io::Error::other("record larger than 4 GiB"))?;
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(b);
        Ok(())
    }
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(String);

fn bad(msg: impl Into<String>) -> FormatError {
    FormatError(msg.into())
}

/// A backup file checked end to end: magic, version, digest, every record well formed.
#[derive(Debug)]
pub struct Backup<'a> {
    pub taken_at: i64,
    pub records: Vec<Record<'a>>,
}

impl<'a> Backup<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Backup<'a>, FormatError> {
        if bytes.len() < HEADER_LEN + TRAILER_LEN || !bytes.starts_with(MAGIC) {
            return Err(bad(
                "not an smsauth backup (or cut short before its first record)",
            ));
        }
        let version = u16::from_be_bytes([bytes[MAGIC.len()], bytes[MAGIC.len() + 1]]);
        if version != VERSION {
            return Err(bad(format!(
                "backup format version {version}; this smsauth reads version {VERSION}"
            )));
        }
        let taken_at = i64::from_be_bytes(
            bytes[MAGIC.len() + 2..HEADER_LEN]
                .try_into()
                .expect("8 bytes"),
        );
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != digest {
            return Err(bad(
                "the backup is damaged or incomplete (its checksum does not match)",
            ));
        }
        let (records_bytes, end) = body.split_at(body.len() - 9);
        if end[0] != END {
            return Err(bad("the backup has no end record"));
        }
        let count = u64::from_be_bytes(end[1..].try_into().expect("8 bytes"));
        let records = parse_records(&records_bytes[HEADER_LEN..])?;
        if records.len() as u64 != count {
            return Err(bad(format!(
                "the backup names {count} records but holds {}",
                records.len()
            )));
        }
        Ok(Backup { taken_at, records })
    }
}

/// Parses bare records (the body of a backup, or a snapshot from the admin socket).
pub fn parse_records(mut b: &[u8]) -> Result<Vec<Record<'_>>, FormatError> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], FormatError> {
        if b.len() < n {
            return Err(bad("a record is cut short"));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn name<'a>(b: &mut &'a [u8]) -> Result<&'a str, FormatError> {
        let len = take(b, 1)?[0] as usize;
        std::str::from_utf8(take(b, len)?).map_err(|_| bad("a record name is not UTF-8"))
    }
    fn bytes<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], FormatError> {
        let len = u32::from_be_bytes(take(b, 4)?.try_into().expect("4 bytes")) as usize;
        take(b, len)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let kind = take(&mut b, 1)?[0];
        out.push(match kind {
            TREE => Record::Tree {
                tree: name(&mut b)?,
                key: bytes(&mut b)?,
                value: bytes(&mut b)?,
            },
            FILE => {
                let name = name(&mut b)?;
                if !KEY_FILES.contains(&name) && name != DEFAULT_KEY_FILE {
                    return Err(bad(format!("unexpected file {name:?} in the backup")));
                }
                Record::File {
                    name,
                    content: bytes(&mut b)?,
                }
            }
            other => return Err(bad(format!("unknown record kind {other:#04x}"))),
        });
    }
    Ok(out)
}

/// The store's records, taken as one consistent snapshot (writes wait meanwhile).
/// The one implementation behind both backup paths: the admin socket sends these bytes,
/// and a backup made without a server writes them itself.
pub fn snapshot_records(store: &dyn Snapshots) -> Result<Vec<u8>, StoreError> {
    let mut w = Writer::records_only();
    store.snapshot(&mut |tree, k, v| w.tree(tree, k, v))?;
    Ok(w.into_records())
}

/// Builds the backup file from a store snapshot (bare records) and the server's keys (by
/// name, as [`crate::store::Keys::export_keys`] gives them), and writes it to `file`
/// (mode 0600, replaced atomically). Returns the count of records written. A key travels
/// as the data dir keeps it, `NAME.key` holding its hex, whichever engine kept it.
pub fn write_file(
    file: &Path,
    snapshot: &[u8],
    keys: &[(String, Vec<u8>)],
    phone_key: Option<&[u8; crate::privacy::KEY_BYTES]>,
) -> anyhow::Result<u64> {
    let mut w = Writer::new();
    if let Some(key) = phone_key {
        use base64::Engine as _;
        let text = base64::engine::general_purpose::STANDARD.encode(key);
        w.file(DEFAULT_KEY_FILE, text.as_bytes())?;
    }
    for (name, key) in keys {
        let file_name = format!("{name}.key");
        if !KEY_FILES.contains(&file_name.as_str()) {
            bail!("unexpected server key {name:?}");
        }
        w.file(&file_name, hex::encode(key).as_bytes())?;
    }
    for r in parse_records(snapshot).context("the snapshot is malformed")? {
        w.record(&r)?;
    }
    let count = w.count();
    write_private(file, &w.finish())?;
    Ok(count)
}

/// Writes `bytes` to `path` with mode 0600: into a new file beside it, synced, then
/// renamed over `path`, so a reader never sees half a backup.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| -> anyhow::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Loads a checked backup into a new, empty store of any engine: its records, then its
/// keys. Blocking: run it on a blocking thread.
pub fn load(backup: &Backup<'_>, store: &crate::store::Store) -> anyhow::Result<Vec<String>> {
    let mut key_files = Vec::new();
    for r in &backup.records {
        match *r {
            Record::Tree { tree, key, value } => store.snapshots.import(tree, key, value)?,
            // Never into a shared store: its instances read the key from their own file.
            Record::File { name, .. } if name == DEFAULT_KEY_FILE => {}
            Record::File { name, content } => {
                let hex_text = std::str::from_utf8(content).unwrap_or("").trim();
                let key = hex::decode(hex_text)
                    .with_context(|| format!("the backup's {name} is not a hex key"))?;
                let stem = name.trim_end_matches(".key");
                let rt = tokio::runtime::Handle::current();
                let kept = rt.block_on(store.keys.key_or_insert(stem, key.clone()))?;
                if kept != key {
                    bail!(
                        "the store already has a different {stem} key; restore only into an empty store"
                    );
                }
                key_files.push(name.to_owned());
            }
        }
    }
    Ok(key_files)
}

/// The phone key a backup's records are sealed with; None for an earlier release's
/// backup, whose numbers are in the clear (sealed as they are restored).
pub fn sealed_with(backup: &Backup<'_>) -> anyhow::Result<Option<KeyId>> {
    for r in &backup.records {
        if let Record::Tree { tree, key, value } = *r
            && tree == crate::store::META_TREE
            && key == crate::store::META_PHONE_KEY
        {
            return KeyId::from_bytes(value)
                .map(Some)
                .context("the backup's phone_key_id is malformed");
        }
    }
    Ok(None)
}

/// The phone key a backup carries (taken with `--include-keys`).
pub fn carried_phone_key(
    backup: &Backup<'_>,
) -> anyhow::Result<Option<[u8; crate::privacy::KEY_BYTES]>> {
    for r in &backup.records {
        if let Record::File { name, content } = *r
            && name == DEFAULT_KEY_FILE
        {
            return crate::privacy::parse_key(content)
                .map(Some)
                .context("the backup's phone.key is malformed");
        }
    }
    Ok(None)
}

/// Refuses to restore a backup sealed with another phone key than `have` (the key
/// restore will use), saying which key it needs.
pub fn check_phone_key(backup: &Backup<'_>, have: KeyId, source: &str) -> anyhow::Result<()> {
    match sealed_with(backup)? {
        Some(needed) if needed != have => bail!(
            "the backup's phone numbers are sealed with phone key {needed}, but {source} is phone key {have}: restore with the key the backup was taken with"
        ),
        _ => Ok(()),
    }
}

/// What a restore did.
pub struct Restored {
    pub records: usize,
    pub users: u64,
    pub taken_at: i64,
    pub key_files: Vec<String>,
}

/// Loads the backup `file` into `data_dir`, which must be empty or absent. The whole file
/// is checked first; the new store is then built in `data_dir/.restore-partial`, reopened
/// to prove it sound, and only then moved into place, so a refused or failed restore
/// leaves no store behind.
///
/// The phone key: `phone_key_file` if set, else `data_dir/phone.key` if the operator put
/// it there (the one file an empty data dir may hold), else the one the backup carries,
/// else, for an earlier release's backup with its numbers in the clear, a new one. A
/// backup sealed with a key restore does not have is refused before anything is written.
pub fn restore(
    file: &Path,
    data_dir: &Path,
    cache_capacity_mb: u64,
    phone_key_file: Option<&Path>,
) -> anyhow::Result<Restored> {
    let bytes = fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let backup = Backup::parse(&bytes).with_context(|| format!("refusing {}", file.display()))?;
    check_empty(data_dir)?;
    let in_dir = data_dir.join(DEFAULT_KEY_FILE);
    let given = phone_key_file
        .map(Path::to_owned)
        .or_else(|| in_dir.exists().then_some(in_dir));
    let key_file = match &given {
        Some(path) => {
            let key = crate::privacy::read_key_file(path)?;
            let source = format!("the phone key file {}", path.display());
            check_phone_key(&backup, PhoneKey::new(&key).id(), &source)?;
            KeyFile::Given(path.clone())
        }
        None => match carried_phone_key(&backup)? {
            Some(key) => {
                check_phone_key(&backup, PhoneKey::new(&key).id(), "the key it carries")?;
                KeyFile::Carried(key)
            }
            None => match sealed_with(&backup)? {
                None => KeyFile::New,
                Some(needed) => bail!(
                    "the backup's phone numbers are sealed with phone key {needed}, which it does not carry (it was taken without --include-keys): put that key file at {} or set privacy.phone_key_file to it, and run restore again",
                    data_dir.join(DEFAULT_KEY_FILE).display()
                ),
            },
        },
    };
    let staging = data_dir.join(STAGING);
    let result = build(&backup, &staging, cache_capacity_mb, &key_file);
    let restored = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    // Key files first, the store last: a data dir with a `db` is a complete one.
    for name in &restored.key_files {
        fs::rename(staging.join(name), data_dir.join(name))?;
    }
    fs::rename(staging.join("db"), data_dir.join("db"))?;
    fs::remove_dir(&staging)?;
    fs::File::open(data_dir)?.sync_all()?;
    Ok(restored)
}

fn check_empty(data_dir: &Path) -> anyhow::Result<()> {
    let entries = match fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(data_dir)
                .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
            return Ok(());
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read data dir {}", data_dir.display()));
        }
    };
    let mut found: Vec<String> = Vec::new();
    for e in entries {
        let name = e?.file_name().to_string_lossy().into_owned();
        // Left by a restore that was interrupted: never moved into place, safe to redo.
        // The phone key, put there by the operator for the restore.
        if name != STAGING && name != DEFAULT_KEY_FILE {
            found.push(name);
        }
    }
    if !found.is_empty() {
        found.sort();
        bail!(
            "the data dir {} is not empty (it holds {}); restore only loads into an empty data dir: stop the server, move the old data dir away, and run restore again",
            data_dir.display(),
            found.join(", ")
        );
    }
    Ok(())
}

/// Where a restore's phone key comes from.
enum KeyFile {
    /// A file the operator gave (`privacy.phone_key_file`, or `phone.key` in the data dir).
    Given(std::path::PathBuf),
    /// The backup's own, written into the new data dir.
    Carried([u8; crate::privacy::KEY_BYTES]),
    /// None needed yet (numbers in the clear): a new one, made in the new data dir.
    New,
}

fn build(
    backup: &Backup<'_>,
    staging: &Path,
    cache_capacity_mb: u64,
    key_file: &KeyFile,
) -> anyhow::Result<Restored> {
    let _ = fs::remove_dir_all(staging);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let mut key_files = Vec::new();
    // None: the new data dir's own `phone.key`, written now or made by the open.
    let key_path = match key_file {
        KeyFile::Given(path) => Some(path.as_path()),
        KeyFile::Carried(key) => {
            crate::privacy::create_key_file(&staging.join(DEFAULT_KEY_FILE), key)?;
            key_files.push(DEFAULT_KEY_FILE.to_owned());
            None
        }
        KeyFile::New => {
            key_files.push(DEFAULT_KEY_FILE.to_owned());
            None
        }
    };
    {
        let store = SledStore::open_keyed(
            staging,
            cache_capacity_mb,
            &crate::config::MemoryConfig::default(),
            key_path,
        )?;
        for r in &backup.records {
            match *r {
                Record::Tree { tree, key, value } => store.import(tree, key, value)?,
                Record::File { name, .. } if name == DEFAULT_KEY_FILE => {}
                Record::File { name, content } => {
                    write_private(&staging.join(name), content)?;
                    key_files.push(name.to_owned());
                }
            }
        }
        store.flush_blocking()?;
    }
    // Reopen: runs the schema check and migrations as a server start would.
    let store = SledStore::reopen_keyed(staging, cache_capacity_mb, key_path)
        .context("the restored store does not open")?;
    let (users, listed) = store.user_counts()?;
    if users != listed {
        bail!("the backup is inconsistent: users_total is {users} but it holds {listed} users");
    }
    Ok(Restored {
        records: backup.records.len(),
        users,
        taken_at: backup.taken_at,
        key_files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new();
        w.file("token.key", b"abcd").unwrap();
        w.tree("userid_user", &[0, 1], &[1, 2, 3]).unwrap();
        w.tree("meta", b"users_total", &1u64.to_be_bytes()).unwrap();
        w.finish()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let b = Backup::parse(&bytes).unwrap();
        assert_eq!(b.records.len(), 3);
        assert_eq!(
            b.records[1],
            Record::Tree {
                tree: "userid_user",
                key: &[0, 1],
                value: &[1, 2, 3]
            }
        );
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let bytes = sample();
        for n in 0..bytes.len() {
            assert!(Backup::parse(&bytes[..n]).is_err(), "cut at {n}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Backup::parse(&b).is_err(), "flip at {i}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Backup::parse(&longer).is_err());
    }
}
