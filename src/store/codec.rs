//! Value encoding: one format-version byte, then bincode (standard config). The version
//! lets a later release tell old records from new ones and migrate them.
//!
//! User records are format 2 since they gained `avatar_url`; a format-1 user (written by
//! an earlier release) still reads, as a user without one. bincode is positional, so a
//! record cannot tell a missing trailing field from a short record: the version byte is
//! what tells them apart, and no store needs rewriting for it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::model::User;

const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;

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

/// A user record, in format 2.
pub fn encode_user(user: &User) -> Vec<u8> {
    let mut out = encode(user);
    out[0] = FORMAT_V2;
    out
}

/// A user record of either format.
pub fn decode_user(bytes: &[u8]) -> Result<User, StoreError> {
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
        Some((&FORMAT_V2, body)) => bincode_body(body),
        Some((&FORMAT_V1, body)) => {
            let v1: UserV1 = bincode_body(body)?;
            Ok(User {
                id: v1.id,
                phone: v1.phone,
                nickname: v1.nickname,
                created_at: v1.created_at,
                last_login_at: v1.last_login_at,
                disabled: v1.disabled,
                session_gen: v1.session_gen,
                avatar_url: None,
            })
        }
        _ => decode(bytes),
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
        let bytes = encode_user(&u);
        assert_eq!(bytes[0], FORMAT_V2);
        assert_eq!(decode_user(&bytes).unwrap(), u);
        let mut other = bytes.clone();
        other[0] = 99;
        assert!(decode_user(&other).is_err());
        assert!(decode_user(&[]).is_err());
    }

    #[test]
    fn a_user_of_format_1_reads_without_an_avatar() {
        // The bytes an earlier release wrote: format 1, the seven fields of its User.
        #[derive(Serialize)]
        struct UserV1<'a>(u64, &'a str, &'a str, i64, Option<i64>, bool, u32);
        let old = encode(&UserV1(7, "+8613812345678", "n", 1, Some(2), true, 3));
        assert_eq!(old[0], FORMAT_V1);
        let user = decode_user(&old).unwrap();
        assert_eq!((user.id, user.disabled, user.session_gen), (7, true, 3));
        assert_eq!(user.avatar_url, None);
    }
}
