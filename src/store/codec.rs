//! Value encoding: one format-version byte, then bincode (standard config). The version
//! lets a later release tell old records from new ones and migrate them.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;

const FORMAT_V1: u8 = 1;

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
        Some((&FORMAT_V1, body)) => {
            bincode::serde::decode_from_slice(body, bincode::config::standard())
                .map(|(v, _)| v)
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        }
        Some((v, _)) => Err(StoreError::Corrupt(format!("unknown record format {v}"))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
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
        };
        let bytes = encode(&u);
        assert_eq!(bytes[0], FORMAT_V1);
        assert_eq!(decode::<User>(&bytes).unwrap(), u);
        let mut other = bytes.clone();
        other[0] = 99;
        assert!(decode::<User>(&other).is_err());
        assert!(decode::<User>(&[]).is_err());
    }
}
