//! Phone numbers at rest. A phone number is the account name and personal data, so the
//! store never holds one in the clear:
//!
//! - where a number must be read back (the user record), it is sealed with AES-256-GCM
//!   under a fresh random nonce, with the record's own key as associated data, so a
//!   ciphertext copied into another record does not open;
//! - where a number is only looked up (the phone index, pending codes, resend waits,
//!   per-phone counters and the lockout), the store keys it by a blind index, an
//!   HMAC-SHA256 of the E.164 number under a key of its own.
//!
//! Both keys are derived (HKDF-SHA256) from one 32-byte phone key, which lives in a file
//! outside the store (`[privacy] phone_key_file`, or `data_dir/phone.key` with sled), so
//! a copy of the data dir, a backup or a database dump alone reveals no number. The key
//! also has an id, derived the same way, that the store records: a start with another key
//! is refused instead of finding no user and registering every phone anew.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::{Context, bail};
use base64::Engine as _;
use hmac::Mac;
use rand::RngExt;
use sha2::Sha256;

use crate::store::StoreError;

type HmacSha256 = hmac::Hmac<Sha256>;

pub const KEY_BYTES: usize = 32;
/// The name of the key file a sled data dir gets when no `phone_key_file` is set.
pub const DEFAULT_KEY_FILE: &str = "phone.key";

/// The first byte of every sealed number: the layout below.
const SEALED_V1: u8 = 1;
const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;
/// version, key id, nonce, then the ciphertext and its tag.
const SEALED_OVERHEAD: usize = 1 + KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES;
const KEY_ID_BYTES: usize = 8;

/// Which phone key a store or a sealed number was made with: 8 bytes derived from the key,
/// which tell keys apart and reveal nothing of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KEY_ID_BYTES]);

impl KeyId {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<KeyId> {
        Some(KeyId(bytes.try_into().ok()?))
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// The blind index of one phone number: what the store keys the phone's records by.
/// The HMAC's first 16 bytes. 128 bits tell a billion phones apart with a chance of a
/// collision below 10^-20; a longer index only costs: it is a key of the biggest trees,
/// and sled's page cache holds fewer nodes the longer their keys are. With all 32 bytes
/// as text (43 characters, schema 5) those trees outgrew the cache and slowed every
/// write by a fifth; as 22 characters of text (schema 6), send-code by a tenth still.
/// So sled keys by the 16 bytes themselves ([`PhoneIndex::bytes`]; schema 7), which
/// sled also keeps inline in its nodes (up to 22 bytes) rather than in an allocation of
/// their own; PostgreSQL, whose column is text, by their base64url
/// ([`PhoneIndex::as_str`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PhoneIndex([u8; INDEX_CHARS]);

const INDEX_BYTES: usize = 16;
/// base64url without padding of 16 bytes.
const INDEX_CHARS: usize = 22;
/// The index of a schema-5 store: base64url of all 32 bytes of the HMAC. Its first 16
/// bytes are today's index, so it is shortened without the key.
const LONG_INDEX_CHARS: usize = 43;

impl PhoneIndex {
    /// The index as text (base64url): PostgreSQL's key. Kept as text, the form most
    /// callers take, in 22 bytes: the caches keyed by it hold one per phone.
    pub fn as_str(&self) -> &str {
        // base64url is ASCII.
        std::str::from_utf8(&self.0).expect("base64url is ASCII")
    }

    /// The index's 16 bytes: sled's key, and a backup's.
    pub fn bytes(&self) -> [u8; INDEX_BYTES] {
        let mut out = [0u8; INDEX_BYTES];
        let written = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode_slice(self.0, &mut out)
            .expect("an index is 22 characters of base64url");
        debug_assert_eq!(written, INDEX_BYTES);
        out
    }

    /// An index as text (a PostgreSQL row, or a key of schema 5 or 6), the long form of
    /// schema 5 included; None if it is not one.
    pub fn parse(s: &str) -> Option<PhoneIndex> {
        let digest = match s.len() {
            INDEX_CHARS | LONG_INDEX_CHARS => base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .ok()?,
            _ => return None,
        };
        Some(PhoneIndex::of_digest(&digest))
    }

    /// An index as a sled key or a backup record holds it: its 16 bytes, or the text of
    /// schema 5 or 6. None for anything else, a phone in the clear (schema 4) included.
    pub fn from_key(key: &[u8]) -> Option<PhoneIndex> {
        if key.len() == INDEX_BYTES && plain_phone(key).is_none() {
            return Some(PhoneIndex::of_digest(key));
        }
        PhoneIndex::from_text_key(key)
    }

    /// An index as text in a key of schema 5 or 6 (which schema 7 keys by its bytes);
    /// None for any other key, 16 bytes of an index included.
    pub fn from_text_key(key: &[u8]) -> Option<PhoneIndex> {
        PhoneIndex::parse(std::str::from_utf8(key).ok()?)
    }

    fn of_digest(digest: &[u8]) -> PhoneIndex {
        let mut text = [0u8; INDEX_CHARS];
        let written = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode_slice(&digest[..INDEX_BYTES], &mut text)
            .expect("22 characters hold 16 bytes");
        debug_assert_eq!(written, INDEX_CHARS);
        PhoneIndex(text)
    }
}

/// A phone in the clear, as a store or backup before schema 5 keyed records by: `+` and
/// up to 15 digits (E.164). 16 bytes of an index look like one by chance once in 10^23.
pub fn plain_phone(key: &[u8]) -> Option<&str> {
    match key.split_first() {
        Some((b'+', digits))
            if (1..=15).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) =>
        {
            std::str::from_utf8(key).ok()
        }
        _ => None,
    }
}

/// An index is not a secret, but it is not for logs either: it names one person.
impl std::fmt::Debug for PhoneIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PhoneIndex(..)")
    }
}

/// One phone key and what is derived from it.
pub struct PhoneKey {
    id: KeyId,
    cipher: Aes256Gcm,
    index: HmacSha256,
}

impl PhoneKey {
    pub fn new(key: &[u8; KEY_BYTES]) -> PhoneKey {
        let kdf = hkdf::Hkdf::<Sha256>::new(Some(b"smsauth phone key"), key);
        let derive = |info: &[u8]| {
            let mut out = [0u8; 32];
            kdf.expand(info, &mut out)
                .expect("32 bytes is a valid length");
            out
        };
        let enc = derive(b"encryption v1");
        let index = derive(b"blind index v1");
        let id = derive(b"key id v1");
        PhoneKey {
            id: KeyId(id[..KEY_ID_BYTES].try_into().expect("8 bytes")),
            cipher: Aes256Gcm::new_from_slice(&enc).expect("a 32-byte key"),
            index: <HmacSha256 as hmac::KeyInit>::new_from_slice(&index)
                .expect("HMAC takes any key"),
        }
    }

    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> [u8; KEY_BYTES] {
        let mut key = [0u8; KEY_BYTES];
        rand::rng().fill(&mut key[..]);
        key
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The blind index of `e164`.
    pub fn index(&self, e164: &str) -> PhoneIndex {
        let mut mac = self.index.clone();
        mac.update(e164.as_bytes());
        PhoneIndex::of_digest(&mac.finalize().into_bytes())
    }

    /// `e164` sealed for the record `aad` names.
    pub fn seal(&self, e164: &str, aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill(&mut nonce[..]);
        let ciphertext = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: e164.as_bytes(),
                    aad,
                },
            )
            .expect("a phone number is far below AES-GCM's limits");
        let mut out = Vec::with_capacity(SEALED_OVERHEAD + e164.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    fn open(&self, body: &[u8], aad: &[u8]) -> Result<String, StoreError> {
        let (nonce, ciphertext) = body.split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().expect("split at 12");
        let plain = self
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| {
                StoreError::Corrupt(
                    "a sealed phone number does not open with its key: the record was \
                     altered or moved"
                        .into(),
                )
            })?;
        String::from_utf8(plain)
            .map_err(|_| StoreError::Corrupt("a sealed phone number is not text".into()))
    }
}

/// The key id of a sealed number, if it is one.
pub fn sealed_key_id(sealed: &[u8]) -> Option<KeyId> {
    match sealed.split_first() {
        Some((&SEALED_V1, rest)) if rest.len() >= KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES => {
            KeyId::from_bytes(&rest[..KEY_ID_BYTES])
        }
        _ => None,
    }
}

/// The phone keys of a running store, shared by its engine and the modules that look
/// phones up: one key, or two while a rotation ([`crate::rotation`]) runs. Every sealed
/// number names the key that sealed it, so either opens, and a phone is found under
/// either index; seals and new index entries use the current key only.
pub struct PhoneVault {
    // Read on every index, seal and open; written twice per rotation. An uncontended read
    // of a std RwLock is one atomic operation.
    keys: std::sync::RwLock<Keys>,
}

struct Keys {
    current: std::sync::Arc<PhoneKey>,
    other: Option<std::sync::Arc<PhoneKey>>,
}

impl PhoneVault {
    pub fn new(key: PhoneKey) -> std::sync::Arc<PhoneVault> {
        std::sync::Arc::new(PhoneVault {
            keys: std::sync::RwLock::new(Keys {
                current: std::sync::Arc::new(key),
                other: None,
            }),
        })
    }

    /// A vault for a test or a tool that needs any key: a fresh random one.
    pub fn random() -> std::sync::Arc<PhoneVault> {
        Self::new(PhoneKey::new(&PhoneKey::generate()))
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The id of the key that seals and indexes from now on.
    pub fn key_id(&self) -> KeyId {
        self.keys().current.id
    }

    /// The id of a rotation's other key, while one runs.
    pub fn other_key_id(&self) -> Option<KeyId> {
        self.keys().other.as_ref().map(|k| k.id)
    }

    /// The blind index of `e164` under the current key.
    pub fn index(&self, e164: &str) -> PhoneIndex {
        self.keys().current.index(e164)
    }

    /// The blind index of `e164` under the current key, and under the other one while a
    /// rotation runs: a record not moved yet is found by the second.
    pub fn indexes(&self, e164: &str) -> (PhoneIndex, Option<PhoneIndex>) {
        let keys = self.keys();
        (
            keys.current.index(e164),
            keys.other.as_ref().map(|k| k.index(e164)),
        )
    }

    pub fn seal(&self, e164: &str, aad: &[u8]) -> Vec<u8> {
        self.keys().current.seal(e164, aad)
    }

    /// Opens a sealed number; one sealed with a key the vault does not hold is refused,
    /// naming that key.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<String, StoreError> {
        let id = sealed_key_id(sealed)
            .ok_or_else(|| StoreError::Corrupt("not a sealed phone number".into()))?;
        let key = {
            let keys = self.keys();
            if keys.current.id == id {
                keys.current.clone()
            } else if let Some(other) = keys.other.as_ref().filter(|k| k.id == id) {
                other.clone()
            } else {
                return Err(StoreError::Corrupt(format!(
                    "a phone number is sealed with phone key {id}, which is not configured"
                )));
            }
        };
        key.open(&sealed[1 + KEY_ID_BYTES..], aad)
    }

    /// The key that seals and indexes now.
    pub fn current(&self) -> std::sync::Arc<PhoneKey> {
        self.keys().current.clone()
    }

    /// The key of id `id`, if the vault holds it.
    pub fn key(&self, id: KeyId) -> Option<std::sync::Arc<PhoneKey>> {
        let keys = self.keys();
        std::iter::once(&keys.current)
            .chain(&keys.other)
            .find(|k| k.id == id)
            .cloned()
    }

    /// From now on `current` seals and indexes, and `other` (a rotation's other key) only
    /// opens and finds. A rotation's participant sets the keys at every poll; when they
    /// are set already, no write lock stalls the requests that read them.
    pub fn set_arcs(
        &self,
        current: std::sync::Arc<PhoneKey>,
        other: Option<std::sync::Arc<PhoneKey>>,
    ) {
        {
            let keys = self.keys();
            if keys.current.id == current.id
                && keys.other.as_ref().map(|k| k.id) == other.as_ref().map(|k| k.id)
            {
                return;
            }
        }
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.current = current;
        keys.other = other;
    }

    pub fn set_keys(&self, current: PhoneKey, other: Option<PhoneKey>) {
        self.set_arcs(std::sync::Arc::new(current), other.map(std::sync::Arc::new));
    }
}

/// The associated data of a user record's sealed phone: the record's key.
pub fn user_aad(id: crate::model::UserId) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..5].copy_from_slice(b"user:");
    aad[5..].copy_from_slice(&id.to_be_bytes());
    aad
}

/// Reads a phone key file: 32 bytes raw, or their base64 (standard or url-safe, padded
/// or not) or hex, surrounding white space ignored.
pub fn read_key_file(path: &Path) -> anyhow::Result<[u8; KEY_BYTES]> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read phone key file {}", path.display()))?;
    parse_key(&bytes).with_context(|| {
        format!(
            "phone key file {}: expected 32 random bytes, raw or as base64 \
             (e.g. `head -c 32 /dev/urandom | base64 > {}`)",
            path.display(),
            path.display()
        )
    })
}

pub fn parse_key(bytes: &[u8]) -> anyhow::Result<[u8; KEY_BYTES]> {
    if let Ok(raw) = <[u8; KEY_BYTES]>::try_from(bytes) {
        return Ok(raw);
    }
    let text = std::str::from_utf8(bytes).context("not text and not 32 bytes")?;
    let text = text.trim();
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let decoded = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .filter(|k| k.len() == KEY_BYTES)
        .or_else(|| hex::decode(text).ok().filter(|k| k.len() == KEY_BYTES));
    match decoded {
        Some(key) => Ok(key.try_into().expect("32 bytes")),
        None => bail!("it holds {} bytes that are not such a key", bytes.len()),
    }
}

/// Writes a new key file (base64, 0600), failing if the file exists.
pub fn create_key_file(path: &Path, key: &[u8; KEY_BYTES]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create phone key file {}", path.display()))?;
    let mut text = base64::engine::general_purpose::STANDARD.encode(key);
    text.push('\n');
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_number_opens_only_for_its_record_and_key() {
        let vault = PhoneVault::random();
        let sealed = vault.seal("+8613812345678", &user_aad(7));
        assert_eq!(vault.open(&sealed, &user_aad(7)).unwrap(), "+8613812345678");
        assert!(!String::from_utf8_lossy(&sealed).contains("13812345678"));
        // Moved to another record: refused.
        assert!(vault.open(&sealed, &user_aad(8)).is_err());
        // Altered: refused.
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(vault.open(&altered, &user_aad(7)).is_err());
        // Another key: refused, naming the key id.
        let other = PhoneVault::random();
        let err = other.open(&sealed, &user_aad(7)).unwrap_err().to_string();
        assert!(err.contains(&vault.key_id().hex()), "{err}");
        // Every seal has its own nonce.
        assert_ne!(sealed, vault.seal("+8613812345678", &user_aad(7)));
    }

    #[test]
    fn during_a_rotation_both_keys_open_and_the_new_one_seals() {
        let vault = PhoneVault::random();
        let old_id = vault.key_id();
        let (old_index, none) = vault.indexes("+8613812345678");
        assert!(none.is_none());
        let sealed_old = vault.seal("+8613812345678", &user_aad(7));
        let old = vault.current();
        vault.set_arcs(
            std::sync::Arc::new(PhoneKey::new(&PhoneKey::generate())),
            Some(old),
        );
        assert_eq!(vault.other_key_id(), Some(old_id));
        let (new_index, other) = vault.indexes("+8613812345678");
        assert_eq!(other, Some(old_index));
        assert_ne!(new_index, old_index);
        let sealed_new = vault.seal("+8613812345678", &user_aad(7));
        assert_eq!(sealed_key_id(&sealed_new), Some(vault.key_id()));
        for sealed in [&sealed_old, &sealed_new] {
            assert_eq!(vault.open(sealed, &user_aad(7)).unwrap(), "+8613812345678");
        }
        vault.set_arcs(vault.current(), None);
        assert!(vault.open(&sealed_old, &user_aad(7)).is_err());
        assert_eq!(
            vault.open(&sealed_new, &user_aad(7)).unwrap(),
            "+8613812345678"
        );
        assert_eq!(vault.indexes("+8613812345678"), (new_index, None));
    }

    #[test]
    fn the_index_is_stable_and_keyed() {
        let k = PhoneKey::generate();
        let a = PhoneKey::new(&k).index("+8613812345678");
        assert_eq!(a, PhoneKey::new(&k).index("+8613812345678"));
        assert_ne!(a, PhoneKey::new(&k).index("+8613812345679"));
        assert_ne!(
            a,
            PhoneKey::new(&PhoneKey::generate()).index("+8613812345678")
        );
        assert_eq!(a.as_str().len(), 22);
        assert_eq!(PhoneIndex::parse(a.as_str()), Some(a));
        assert_eq!(PhoneIndex::from_key(&a.bytes()), Some(a));
        assert_eq!(PhoneIndex::from_key(a.as_str().as_bytes()), Some(a));
        assert_eq!(PhoneIndex::from_text_key(a.as_str().as_bytes()), Some(a));
        assert_eq!(PhoneIndex::from_text_key(&a.bytes()), None);
        // 16 bytes that are a phone in the clear are not taken for an index.
        assert_eq!(PhoneIndex::from_key(b"+861381234567890"), None);
        assert_eq!(plain_phone(b"+861381234567890"), Some("+861381234567890"));
        // The long form of schema 5 (all 32 bytes) shortens to the same index.
        let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(&{
            let kdf = hkdf::Hkdf::<Sha256>::new(Some(b"smsauth phone key"), &k);
            let mut out = [0u8; 32];
            kdf.expand(b"blind index v1", &mut out).unwrap();
            out
        })
        .unwrap();
        mac.update(b"+8613812345678");
        let long =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        assert_eq!(PhoneIndex::from_text_key(long.as_bytes()), Some(a));
        assert_eq!(PhoneIndex::parse(&long), Some(a));
        assert_eq!(PhoneIndex::from_key(long.as_bytes()), Some(a));
        assert_eq!(PhoneIndex::parse("+8613812345678"), None);
        assert_eq!(PhoneIndex::from_key(b"+8613812345678"), None);
        assert_eq!(format!("{a:?}"), "PhoneIndex(..)");
    }

    #[test]
    fn key_files_are_raw_base64_or_hex() {
        let key = PhoneKey::generate();
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        for text in [
            key.to_vec(),
            format!("{}\n", STANDARD.encode(key)).into_bytes(),
            URL_SAFE_NO_PAD.encode(key).into_bytes(),
            hex::encode(key).into_bytes(),
        ] {
            assert_eq!(parse_key(&text).unwrap(), key);
        }
        assert!(parse_key(b"too short").is_err());
        assert!(parse_key(STANDARD.encode([0u8; 16]).as_bytes()).is_err());
    }
}
