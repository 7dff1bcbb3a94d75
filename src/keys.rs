//! Server keys kept in the data dir: made from the OS CSPRNG on first start, written with
//! 0600 permissions, read back on every later start so sessions and pending codes outlive
//! restarts. The token signing key set (`signing.key`) is replaced whole, atomically,
//! when a key is rotated in or dropped.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use rand::RngExt;

const KEY_BYTES: usize = 32;

/// A fresh random key from the OS CSPRNG.
pub fn fresh() -> Vec<u8> {
    let mut key = vec![0u8; KEY_BYTES];
    rand::rng().fill(&mut key[..]);
    key
}

/// Reads `dir/name`, or creates it with a fresh random key.
pub fn load_or_create(dir: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    load_or_insert(dir, name, fresh())
}

/// Reads `dir/name`, or creates it holding `fresh`.
pub fn load_or_insert(dir: &Path, name: &str, fresh: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(name);
    if let Some(key) = read(&path)? {
        return Ok(key);
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create key file {}", path.display()))?;
    file.write_all(hex::encode(&fresh).as_bytes())?;
    file.sync_all()?;
    Ok(fresh)
}

/// The key in `dir/name`; None if there is no such file.
pub fn load(dir: &Path, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    read(&dir.join(name))
}

/// Replaces `dir/name` by `new` if it holds `current`: into a new 0600 file beside it,
/// synced, renamed over it, so a reader or a crash sees the old key or the new, never
/// half of one. False if it holds something else (or nothing). The caller serializes
/// writers of the same file.
pub fn replace(dir: &Path, name: &str, current: &[u8], new: &[u8]) -> anyhow::Result<bool> {
    let path = dir.join(name);
    if read(&path)?.as_deref() != Some(current) {
        return Ok(false);
    }
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| -> anyhow::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create key file {}", tmp.display()))?;
        file.write_all(hex::encode(new).as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot replace key file {}", path.display()))?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| true)
}

/// The key in the file at `path`; None if there is no such file.
fn read(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read key file {}", path.display()));
        }
    };
    let key = hex::decode(text.trim())
        .with_context(|| format!("key file {} is not hex", path.display()))?;
    if key.len() < KEY_BYTES {
        bail!(
            "key file {} is shorter than {KEY_BYTES} bytes",
            path.display()
        );
    }
    Ok(Some(key))
}

/// The server keys the data dir holds (`NAME.key` files), by name.
pub fn in_dir(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut found = Vec::new();
    for name in NAMES {
        if let Some(key) = read(&dir.join(format!("{name}.key")))? {
            found.push((name.to_owned(), key));
        }
    }
    Ok(found)
}

/// The keys a server keeps: the HS256 token key of stores made before signing key sets
/// (or with `token.algorithm = "HS256"` from then), the code HMAC key, and the token
/// signing key set ([`crate::signing`]).
pub const NAMES: [&str; 3] = ["token", "code", "signing"];

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path(), "k").unwrap();
        let b = load_or_create(dir.path(), "k").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), KEY_BYTES);
        let mode = std::fs::metadata(dir.path().join("k"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn replaced_only_from_the_expected_key_and_still_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path(), "k").unwrap();
        let b = fresh();
        assert!(
            !replace(dir.path(), "k", &b, &b).unwrap(),
            "not what it holds"
        );
        assert!(!replace(dir.path(), "absent", &a, &b).unwrap());
        assert!(replace(dir.path(), "k", &a, &b).unwrap());
        assert_eq!(load(dir.path(), "k").unwrap(), Some(b));
        let mode = std::fs::metadata(dir.path().join("k"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
