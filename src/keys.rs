//! Server keys kept in the data dir: made from the OS CSPRNG on first start, written with
//! 0600 permissions, read back on every later start so sessions and pending codes outlive
//! restarts.

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

/// The keys a server makes: the token signing key and the code HMAC key.
pub const NAMES: [&str; 2] = ["token", "code"];

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
}
