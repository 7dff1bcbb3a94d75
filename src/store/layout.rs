//! The layout of the embedded engine's records, which is also the layout of a backup
//! file's records (`smsauth backup` writes them for either engine): tree names, keys and
//! values. Values are [`super::codec`] encodings of the model's types unless said.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `meta` | name | `schema_version` u32 BE; `next_user_id`, `users_total` u64 BE; others the sled engine's own |
//! | `userid_user` | user id u64 BE | codec user record, phone sealed ([`super::codec::encode_user`]) |
//! | `phone_userid` | the phone's blind index, its 16 bytes ([`crate::privacy::PhoneIndex::bytes`]) | user id u64 BE |
//! | `useridmethod_login` | user id u64 BE, method byte | codec([`crate::model::LoginMethod`]) |
//! | `wechat_userid` | WeChat id bytes | user id u64 BE (valid only while the user's `wechat` method names it) |
//! | `kindkey_grant` | grant kind byte, SHA-256 of the grant's token | expiry unix secs i64 BE, then the grant's bytes |
//! | `phonepurpose_code` | blind index (16 bytes), 0xff, purpose byte | codec([`crate::model::PendingCode`]) |
//! | `jti_exp` | token id bytes | expiry unix secs i64 BE |
//! | `useridsession_session` | user id u64 BE, session id (16 bytes) | codec([`super::SessionRecord`]) |
//! | `hash_refresh` | SHA-256 of a refresh token | codec(user id, session id, expires_at, used_at) |
//! | `counter_count` | counter byte, window i64 BE, subject bytes (a phone's blind index, 16 bytes; empty for the service's budget) | count u64 BE |
//! | `useridtimeseq_activity` | user id u64 BE, unix secs i64 BE, seq u32 BE | codec([`super::ActivityValue`]) |
//!
//! No phone number is kept in the clear (schema 5): `meta/phone_key_id` names the phone
//! key the store is sealed with; the key itself is never in the store. Schema 6 keyed by
//! the short blind index as text (22 characters; schema 5's were 43) and may hold
//! `meta/phone_key_rotation` (a rotation's state, [`crate::rotation`]); schema 7 keys by
//! the index's 16 bytes. A backup's keys are read in every one of these forms.

use super::codec::u64_key;
use super::{GrantKind, PhoneIndex};
use crate::model::{ActivityEvent, Counter, Method, Purpose, UserId};

/// The version of this layout (`meta/schema_version`): the sled engine's schema.
pub const SCHEMA_VERSION: u32 = 7;

pub const META: &str = "meta";
pub const USERS: &str = "userid_user";
pub const PHONES: &str = "phone_userid";
pub const METHODS: &str = "useridmethod_login";
pub const WECHATS: &str = "wechat_userid";
pub const GRANTS: &str = "kindkey_grant";
pub const CODES: &str = "phonepurpose_code";
pub const REVOKED: &str = "jti_exp";
pub const COUNTERS: &str = "counter_count";
pub const SESSIONS: &str = "useridsession_session";
pub const REFRESH: &str = "hash_refresh";
pub const ACTIVITY: &str = "useridtimeseq_activity";
pub const META_SCHEMA: &[u8] = b"schema_version";
pub const META_NEXT_ID: &[u8] = b"next_user_id";
pub const META_USERS: &[u8] = b"users_total";
/// The [`crate::privacy::KeyId`] of the phone key the store is sealed with.
pub const META_PHONE_KEY: &[u8] = b"phone_key_id";

/// Login methods with a stored record, in key order (`sms` is implied, never stored).
pub const STORED_METHODS: [Method; 2] = [Method::Password, Method::Wechat];

pub fn method_byte(method: Method) -> u8 {
    match method {
        Method::Sms => 1,
        Method::Password => 2,
        Method::Wechat => 3,
    }
}

pub fn method_key(id: UserId, method: Method) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&u64_key(id));
    k[8] = method_byte(method);
    k
}

pub fn grant_byte(kind: GrantKind) -> u8 {
    match kind {
        GrantKind::WechatState => 1,
        GrantKind::WechatTicket => 2,
        GrantKind::WechatBind => 3,
    }
}

pub fn grant_key(kind: GrantKind, digest: &[u8; 32]) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = grant_byte(kind);
    k[1..].copy_from_slice(digest);
    k
}

pub fn purpose_byte(p: Purpose) -> u8 {
    match p {
        Purpose::Login => 1,
        Purpose::Register => 2,
        Purpose::ResetPassword => 3,
        Purpose::DeleteAccount => 4,
    }
}

pub fn code_key(phone: &PhoneIndex, purpose: Purpose) -> Vec<u8> {
    let phone = &phone.bytes();
    let mut k = Vec::with_capacity(phone.len() + 2);
    k.extend_from_slice(phone);
    k.push(0xff);
    k.push(purpose_byte(purpose));
    k
}

/// The phone part and purpose of a `phonepurpose_code` key. The phone part is an index
/// ([`PhoneIndex::from_key`]), or a phone in the clear in a store or backup before
/// schema 5.
pub fn parse_code_key(k: &[u8]) -> Option<(&[u8], Purpose)> {
    let (&p, rest) = k.split_last()?;
    let (&sep, phone) = rest.split_last()?;
    if sep != 0xff {
        return None;
    }
    let purpose = Purpose::ALL.into_iter().find(|x| purpose_byte(*x) == p)?;
    Some((phone, purpose))
}

pub fn counter_byte(c: Counter) -> u8 {
    match c {
        Counter::PhoneSendsPerDay => 1,
        Counter::SendsPerDay => 2,
        Counter::PhoneFailuresPerHour => 3,
    }
}

/// The key of a counter: of a phone (`subject` its index's bytes, or before schema 7 its
/// text, before schema 5 the phone itself), or of the whole service (empty).
pub fn counter_key(counter: Counter, window: i64, subject: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + subject.len());
    k.push(counter_byte(counter));
    k.extend_from_slice(&window.to_be_bytes());
    k.extend_from_slice(subject);
    k
}

/// The counter, window and subject of a `counter_count` key.
pub fn parse_counter_key(k: &[u8]) -> Option<(Counter, i64, &[u8])> {
    let (&c, rest) = k.split_first()?;
    let counter = Counter::ALL.into_iter().find(|x| counter_byte(*x) == c)?;
    let window = i64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    Some((counter, window, &rest[8..]))
}

pub fn session_key(user: UserId, id: &super::SessionId) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&u64_key(user));
    k[8..].copy_from_slice(id);
    k
}

/// The key of an activity entry: by user, then time, so a user's entries are one
/// range in time order.
pub fn activity_key(user: UserId, at: i64, seq: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..8].copy_from_slice(&u64_key(user));
    k[8..16].copy_from_slice(&at.to_be_bytes());
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// (user id, time, seq) of a `useridtimeseq_activity` key.
pub fn parse_activity_key(k: &[u8]) -> Option<(UserId, i64, u32)> {
    if k.len() != 20 {
        return None;
    }
    Some((
        u64::from_be_bytes(k[..8].try_into().ok()?),
        i64::from_be_bytes(k[8..16].try_into().ok()?),
        u32::from_be_bytes(k[16..].try_into().ok()?),
    ))
}

pub fn event_byte(e: ActivityEvent) -> u8 {
    match e {
        ActivityEvent::Login => 1,
        ActivityEvent::LoginFailed => 2,
        ActivityEvent::Logout => 3,
        ActivityEvent::PasswordChange => 4,
        ActivityEvent::WechatBind => 5,
    }
}

pub fn event_of(b: u8) -> Option<ActivityEvent> {
    ActivityEvent::ALL.into_iter().find(|e| event_byte(*e) == b)
}

/// The user id of a `useridmethod_login` key.
pub fn method_key_user(k: &[u8]) -> Option<UserId> {
    Some(u64::from_be_bytes(k.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back() {
        let index = crate::privacy::PhoneVault::random().index("+861");
        let k = counter_key(Counter::PhoneFailuresPerHour, -3, &index.bytes());
        assert_eq!(
            parse_counter_key(&k),
            Some((Counter::PhoneFailuresPerHour, -3, &index.bytes()[..]))
        );
        let k = code_key(&index, Purpose::ResetPassword);
        // Short enough for sled to keep inline in a node (22 bytes).
        assert_eq!(k.len(), 18);
        assert_eq!(
            parse_code_key(&k),
            Some((&index.bytes()[..], Purpose::ResetPassword))
        );
        assert_eq!(method_key_user(&method_key(7, Method::Password)), Some(7));
        assert_eq!(
            parse_activity_key(&activity_key(7, 1_700_000_000, 9)),
            Some((7, 1_700_000_000, 9))
        );
        for e in ActivityEvent::ALL {
            assert_eq!(event_of(event_byte(e)), Some(e));
        }
    }
}
