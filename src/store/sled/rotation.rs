//! [`PhoneRotations`] on sled. One process holds a sled store, so there is one instance:
//! the list of instances is this process alone, and the barriers of a rotation pass at
//! once. The state is `meta/phone_key_rotation` (JSON, no key).
//!
//! Moving a user: under the phone's lock (the one a create takes, by the number), the
//! index entry under the new key is written, then the record is re-sealed, then the entry
//! under the old key goes. Each step is idempotent and each prefix leaves the user found (under either
//! index) and readable (with either key), so a move cut short by a crash is finished by
//! the next run over that user.

use super::SledStore;
use crate::model::UserId;
use crate::privacy::sealed_key_id;
use crate::rotation::{Phase, RotationState};
use crate::store::codec::{decode_sealed_user, encode_user, read_u64, u64_key};
use crate::store::layout::META_PHONE_KEY;
use crate::store::{BoxFuture, PhoneRotations, StoreError, ready};

type Result<T> = std::result::Result<T, StoreError>;

pub(super) const META_ROTATION: &[u8] = b"phone_key_rotation";

pub(super) fn stored_rotation(meta: &sled::Tree) -> Result<Option<RotationState>> {
    meta.get(META_ROTATION)?
        .map(|v| RotationState::decode(&v))
        .transpose()
}

impl SledStore {
    fn swap_rotation_now(
        &self,
        expected: Option<&RotationState>,
        new: &RotationState,
    ) -> Result<bool> {
        let _gate = self.write_gate();
        let expected = expected.map(RotationState::encode);
        let swapped = self.meta.compare_and_swap(
            META_ROTATION,
            expected.as_deref().map(str::as_bytes),
            Some(new.encode().as_bytes()),
        )?;
        if swapped.is_err() {
            return Ok(false);
        }
        if new.phase == Phase::Done {
            // After the state: a crash between the two leaves a done rotation and the old
            // id, which a start settles the same way (the rotation names the new key).
            self.meta.insert(META_PHONE_KEY, &new.to_id()?.0[..])?;
        }
        self.wrote();
        Ok(true)
    }

    pub(super) fn move_users_now(
        &self,
        from: UserId,
        limit: usize,
    ) -> Result<(Option<UserId>, u64)> {
        let current = self.vault.key_id();
        let mut moved = 0;
        let mut next = None;
        let _gate = self.write_gate();
        for kv in self.users.range(u64_key(from)..).take(limit) {
            let (k, v) = kv?;
            let id = read_u64(&k)?;
            next = Some(id + 1);
            let (_, sealed) = decode_sealed_user(&v)?;
            let phone = self.vault.open(sealed, &crate::privacy::user_aad(id))?;
            let _phone = self.phone_locks.lock(phone.as_str());
            let (index, other) = self.vault.indexes(&phone);
            let key = u64_key(id);
            let Some(other) = other else { continue };
            // A record under neither index (an orphan of a create or deletion a crash cut
            // short, which the engine's recovery removes) is re-sealed but not indexed.
            let under_other = self.phones.get(other.bytes())?.as_deref() == Some(&key[..]);
            let under_current = self.phones.get(index.bytes())?.as_deref() == Some(&key[..]);
            if under_other && !under_current {
                self.phones.insert(index.bytes(), &key[..])?;
            }
            if sealed_key_id(sealed) != Some(current) {
                let mut failure = None;
                self.users.fetch_and_update(key, |old| {
                    let old = old?;
                    match decode_sealed_user(old) {
                        Ok((user, sealed)) if sealed_key_id(sealed) != Some(current) => {
                            let user = crate::model::User {
                                phone: phone.clone(),
                                ..user
                            };
                            Some(encode_user(&user, &self.vault))
                        }
                        Ok(_) => Some(old.to_vec()),
                        Err(e) => {
                            failure = Some(e);
                            Some(old.to_vec())
                        }
                    }
                })?;
                if let Some(e) = failure {
                    return Err(e);
                }
                moved += 1;
            }
            if under_other {
                let _ = self.phones.compare_and_swap(
                    other.bytes(),
                    Some(&key[..]),
                    None as Option<&[u8]>,
                )?;
            }
        }
        if moved > 0 {
            self.wrote();
        }
        Ok((next, moved))
    }

    pub(super) fn first_unmoved_now(&self) -> Result<Option<UserId>> {
        let current = self.vault.key_id();
        for kv in self.users.iter() {
            let (k, v) = kv?;
            let (_, sealed) = decode_sealed_user(&v)?;
            if sealed_key_id(sealed) != Some(current) {
                return Ok(Some(read_u64(&k)?));
            }
        }
        Ok(None)
    }
}

impl PhoneRotations for SledStore {
    fn rotation(&self) -> BoxFuture<'_, Result<Option<RotationState>>> {
        ready(stored_rotation(&self.meta))
    }

    fn swap_rotation<'a>(
        &'a self,
        expected: Option<&'a RotationState>,
        new: &'a RotationState,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let swapped = self.swap_rotation_now(expected, new)?;
            // Durable before anyone acts on it.
            std::sync::Arc::clone(&self.commit).flush().await?;
            Ok(swapped)
        })
    }

    fn move_users(
        &self,
        from: UserId,
        limit: usize,
    ) -> BoxFuture<'_, Result<(Option<UserId>, u64)>> {
        Box::pin(async move {
            let moved = super::blocking(|| self.move_users_now(from, limit))?;
            std::sync::Arc::clone(&self.commit).flush().await?;
            Ok(moved)
        })
    }

    fn first_unmoved(&self) -> BoxFuture<'_, Result<Option<UserId>>> {
        ready(super::blocking(|| self.first_unmoved_now()))
    }

    fn report_phase<'a>(
        &'a self,
        _instance: &'a str,
        _phase: Option<(&'a str, Phase)>,
    ) -> BoxFuture<'a, Result<()>> {
        ready(Ok(())) // the one instance: nobody waits for it
    }

    fn instances_behind<'a>(
        &'a self,
        _to: &'a str,
        _phase: Phase,
    ) -> BoxFuture<'a, Result<Vec<String>>> {
        ready(Ok(Vec::new()))
    }

    fn leave<'a>(&'a self, _instance: &'a str) -> BoxFuture<'a, Result<()>> {
        ready(Ok(()))
    }
}
