//! [`Sessions`] on sled: revoked token ids in `jti_exp`, mirrored in memory at open so
//! that the check on every authenticated request is a map lookup.

use std::sync::PoisonError;

use super::SledStore;
use crate::model::{User, UserId};
use crate::store::codec::read_i64;
use crate::store::{BoxFuture, Sessions, StoreError, ready};

type Result<T> = std::result::Result<T, StoreError>;

impl SledStore {
    pub(super) fn load_revocations(&self) -> Result<()> {
        let mut ids = self
            .revoked_ids
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for kv in self.revoked.iter() {
            let (k, v) = kv?;
            ids.insert(String::from_utf8_lossy(&k).into_owned(), read_i64(&v)?);
        }
        Ok(())
    }

    fn is_revoked_now(&self, jti: &str) -> bool {
        self.revoked_ids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(jti)
    }

    fn revoke_now(&self, jti: &str, exp: i64) -> Result<bool> {
        let _gate = self.write_gate();
        let fresh = self
            .revoked
            .compare_and_swap(
                jti.as_bytes(),
                None as Option<&[u8]>,
                Some(&exp.to_be_bytes()),
            )?
            .is_ok();
        if fresh {
            self.wrote();
        }
        self.revoked_ids
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(jti.to_owned(), exp);
        Ok(fresh)
    }

    fn prune_revocations_now(&self, now: i64) -> Result<usize> {
        self.revoked_ids
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, exp| *exp >= now);
        let _gate = self.write_gate();
        let mut pruned = 0;
        for kv in self.revoked.iter() {
            let (k, v) = kv?;
            if read_i64(&v)? < now {
                self.revoked.remove(k)?;
                pruned += 1;
            }
        }
        if pruned > 0 {
            self.wrote();
        }
        Ok(pruned)
    }
}

impl Sessions for SledStore {
    fn revoke<'a>(&'a self, jti: &'a str, exp: i64) -> BoxFuture<'a, Result<bool>> {
        ready(self.revoke_now(jti, exp))
    }

    fn is_revoked<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<bool>> {
        ready(Ok(self.is_revoked_now(jti)))
    }

    fn session_user<'a>(&'a self, id: UserId, jti: &'a str) -> BoxFuture<'a, Result<Option<User>>> {
        if self.is_revoked_now(jti) {
            return ready(Ok(None));
        }
        ready(self.user_now(id))
    }

    fn session_account<'a>(
        &'a self,
        id: UserId,
        jti: &'a str,
    ) -> BoxFuture<'a, Result<Option<crate::store::Account>>> {
        if self.is_revoked_now(jti) {
            return ready(Ok(None));
        }
        ready((|| {
            let Some(user) = self.user_now(id)? else {
                return Ok(None);
            };
            let methods = self.login_methods_now(&user)?;
            Ok(Some((user, methods)))
        })())
    }

    fn prune_revocations(&self, now: i64) -> BoxFuture<'_, Result<usize>> {
        ready(super::blocking(|| self.prune_revocations_now(now)))
    }
}
