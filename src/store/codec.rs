//! Value encoding: one format-version byte, then bincode (standard config). The version
//! lets a later release tell old records from new ones and migrate them.
//!
//! User records are format 2 since they gained `avatar_url`; a format-1 user (written by
//! an earlier release) still reads, as a user without one. bincode is positional, so a
//! record cannot tell a missing trailing field from a short record: the version byte is
//! what tells them apart, and no store needs rewriting for it.
//!
//! Format 3 (schema 5) holds the phone sealed ([`crate::privacy`]) under the record's
//! key: a store of an earlier release is rewritten to it at the first open
//! (`store::sled` migration 4 to 5); formats 1 and 2, with the phone in the clear, are
//! read only by that migration.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::model::User;
use crate::privacy::{PhoneVault, user_aad};

const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;
const FORMAT_V3: u8 = 3;

/// A user as format 3 stores it: [`User`] with the phone sealed.
#[derive(Serialize, Deserialize)]
struct SealedUser<'a> {
    id: u64,
    #[serde(borrow)]
    phone: &'a [u8],
    nickname: std::borrow::Cow<'a, str>,
    created_at: i64,
    last_login_at: Option<i64>,
    disabled: bool,
    session_gen: u32,
    avatar_url: Option<std::borrow::Cow<'a, str>>,
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_V1];
    // Encoding our own plain structs into a Vec cannot fail.
    let body =
        bincode::serde::encode_to_vec(value, bincode::config::standard()).expect("record encodes");
    out.extend_from_slice(&body);
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => bincode_body(body),
        Some((v, _)) => Err(StoreError::Corrupt(format!("unknown record format {v}"))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
}

/// A user record, in format 3: the phone sealed under the current phone key.
pub fn encode_user(user: &User, vault: &PhoneVault) -> Vec<u8> {
    let sealed = vault.seal(&user.phone, &user_aad(user.id));
    encode_sealed_user(user, &sealed)
}

/// A user record in format 3 with `sealed`, the user's phone as sealed already.
pub fn encode_sealed_user(user: &User, sealed: &[u8]) -> Vec<u8> {
    let record = SealedUser {
        id: user.id,
        phone: sealed,
        nickname: user.nickname.as_str().into(),
        created_at: user.created_at,
        last_login_at: user.last_login_at,
        disabled: user.disabled,
        session_gen: user.session_gen,
        avatar_url: user.avatar_url.as_deref().map(Into::into),
    };
    let mut out = encode(&record);
    out[0] = FORMAT_V3;
    out
}

/// A user record as an earlier release wrote it (format 2, the phone in the clear): for
/// tests of the migration.
#[cfg(test)]
pub fn encode_plain_user(user: &User) -> Vec<u8> {
    let mut out = encode(user);
    out[0] = FORMAT_V2;
    out
}

/// A user record of format 3, its phone opened.
pub fn decode_user(bytes: &[u8], vault: &PhoneVault) -> Result<User, StoreError> {
    let (user, sealed) = decode_sealed_user(bytes)?;
    let phone = vault.open(sealed, &user_aad(user.id))?;
    Ok(User { phone, ..user })
}

/// A user record of format 3 as stored: the user without its phone, and the phone
/// sealed. For a change that leaves the phone alone, and for readers without the key.
pub fn decode_sealed_user(bytes: &[u8]) -> Result<(User, &[u8]), StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_V3, body)) => {
            let r: SealedUser<'_> =
                bincode::serde::borrow_decode_from_slice(body, bincode::config::standard())
                    .map(|(v, _)| v)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let user = User {
                id: r.id,
                phone: String::new(),
                nickname: r.nickname.into_owned(),
                created_at: r.created_at,
                last_login_at: r.last_login_at,
                disabled: r.disabled,
                session_gen: r.session_gen,
                avatar_url: r.avatar_url.map(std::borrow::Cow::into_owned),
            };
            Ok((user, r.phone))
        }
        Some((&(FORMAT_V1 | FORMAT_V2), _)) => Err(StoreError::Corrupt(
            "a user record with its phone in the clear, after the migration that seals them".into(),
        )),
        _ => Err(StoreError::Corrupt("not a user record".into())),
    }
}

/// A user record of format 1 or 2 (an earlier release's, phone in the clear), or None
/// for one of format 3: for the migration that seals them.
pub fn decode_plain_user(bytes: &[u8]) -> Result<Option<User>, StoreError> {
    /// A user as format 1 stored it.
    #[derive(Deserialize)]
    struct UserV1 {
        id: u64,
        phone: String,
        nickname: String,
        created_at: i64,
        last_login_at: Option<i64>,
        disabled: bool,
        session_gen: u32,
    }
    match bytes.split_first() {
        Some((&FORMAT_V3, _)) => Ok(None),
        Some((&FORMAT_V2, body)) => bincode_body(body).map(Some),
        Some((&FORMAT_V1, body)) => {
            let v1: UserV1 = bincode_body(body)?;
            Ok(Some(User {
                id: v1.id,
                phone: v1.phone,
                nickname: v1.nickname,
                created_at: v1.created_at,
                last_login_at: v1.last_login_at,
                disabled: v1.disabled,
                session_gen: v1.session_gen,
                avatar_url: None,
            }))
        }
        _ => Err(StoreError::Corrupt("not a user record".into())),
    }
}

fn bincode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub fn read_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("bad integer".into()))
}

pub fn read_i64(bytes: &[u8]) -> Result<i64, StoreError> {
    bytes
        .try_into()
        .map(i64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("bad integer".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::User;

    #[test]
    fn round_trip_and_version() {
        let u = User {
            id: 7,
            phone: "+8613812345678".into(),
            nickname: "n".into(),
            created_at: 1,
            last_login_at: Some(2),
            disabled: false,
            session_gen: 3,
            avatar_url: Some("https://thirdwx.qlogo.cn/a/132".into()),
        };
        let vault = PhoneVault::random();
        let bytes = encode_user(&u, &vault);
        assert_eq!(bytes[0], FORMAT_V3);
        assert_eq!(decode_user(&bytes, &vault).unwrap(), u);
        assert!(!String::from_utf8_lossy(&bytes).contains("13812345678"));
        let (bare, sealed) = decode_sealed_user(&bytes).unwrap();
        assert_eq!(bare.phone, "");
        assert_eq!(
            decode_user(&encode_sealed_user(&u, sealed), &vault).unwrap(),
            u
        );
        assert_eq!(decode_plain_user(&bytes).unwrap(), None);
        let mut other = bytes.clone();
        other[0] = 99;
        assert!(decode_user(&other, &vault).is_err());
        assert!(decode_user(&[], &vault).is_err());
        // Another key does not open it.
        let stranger = PhoneVault::random();
        assert!(decode_user(&bytes, &stranger).is_err());
    }

    #[test]
    fn a_user_of_format_1_reads_without_an_avatar() {
        // The bytes an earlier release wrote: format 1, the seven fields of its User.
        #[derive(Serialize)]
        struct UserV1<'a>(u64, &'a str, &'a str, i64, Option<i64>, bool, u32);
        let old = encode(&UserV1(7, "+8613812345678", "n", 1, Some(2), true, 3));
        assert_eq!(old[0], FORMAT_V1);
        let user = decode_plain_user(&old).unwrap().unwrap();
        assert_eq!((user.id, user.disabled, user.session_gen), (7, true, 3));
        assert_eq!(user.phone, "+8613812345678");
        assert_eq!(user.avatar_url, None);
    }
}
