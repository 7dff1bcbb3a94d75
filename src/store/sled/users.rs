//! [`Users`] on sled: see the module doc of the engine for the order of multi-key changes.

use std::sync::atomic::Ordering;

use super::SledStore;
use crate::model::{LoginMethod, Method, User, UserId};
use crate::store::codec::{decode, decode_user, encode, encode_user, read_u64, u64_key};
use crate::store::layout::{STORED_METHODS, method_key};
use crate::store::{
    BoxFuture, NewUser, PhoneIndex, StoreError, UserChange, Users, WechatBind, identified, ready,
    stored_identification,
};

type Result<T> = std::result::Result<T, StoreError>;

impl SledStore {
    pub(super) fn user_now(&self, id: UserId) -> Result<Option<User>> {
        let miss = match self.cached.get(id) {
            Ok(user) => return Ok(Some(user)),
            Err(miss) => miss,
        };
        let user: Option<User> = self
            .users
            .get(u64_key(id))?
            .map(|v| decode_user(&v, &self.vault))
            .transpose()?;
        if let Some(user) = &user {
            self.cached.fill(user, miss);
        }
        Ok(user)
    }

    fn user_by_phone_now(&self, phone: &PhoneIndex) -> Result<Option<User>> {
        match self.phones.get(phone.bytes())? {
            Some(id) => self.user_now(read_u64(&id)?),
            None => Ok(None),
        }
    }

    /// The account of a phone about to be created, under the index of either key while
    /// the phone key rotates; and the index to create it under. Read under the phone's
    /// lock, which a rotation's move of the entry also takes. The indexes are the vault's
    /// now, not the caller's: a request that began before a rotation's switch must not
    /// make the account under the key the rotation left.
    pub(super) fn existing_now(&self, new: &NewUser<'_>) -> Result<(Option<User>, PhoneIndex)> {
        let (index, other) = self.vault.indexes(new.phone);
        for index in other.iter().chain([&index]) {
            if let Some(user) = self.user_by_phone_now(index)? {
                return Ok((Some(user), *index));
            }
        }
        Ok((None, index))
    }

    fn create_now(&self, new: NewUser<'_>, methods: &[LoginMethod]) -> Result<(User, bool)> {
        // Most calls are logins of existing users: two plain reads, no lock.
        if let Some(user) = self.user_by_phone_now(&new.index)? {
            return Ok((user, false));
        }
        let _gate = self.write_gate();
        self.create_gated(new, methods)
    }

    /// [`Self::create_now`] for a caller that holds the write gate.
    pub(super) fn create_gated(
        &self,
        new: NewUser<'_>,
        methods: &[LoginMethod],
    ) -> Result<(User, bool)> {
        // By the number, not its index: while the phone key rotates, two creates of one
        // phone may hold different indexes. The locks live in memory only.
        let _phone = self.phone_locks.lock(new.phone);
        let (existing, index) = self.existing_now(&new)?;
        if let Some(user) = existing {
            return Ok((user, false));
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let user = User {
            id,
            phone: new.phone.to_owned(),
            nickname: new.nickname,
            created_at: new.created_at,
            last_login_at: new.last_login_at,
            disabled: false,
            session_gen: 0,
            avatar_url: new.avatar_url,
        };
        self.users
            .insert(u64_key(id), encode_user(&user, &self.vault))?;
        for m in methods.iter().filter(|m| m.method != Method::Sms) {
            if m.method == Method::Wechat {
                // Before its method record (see `wechat`), and both before the commit point.
                self.wechats
                    .insert(m.identification.as_bytes(), &u64_key(id))?;
            }
            self.methods
                .insert(method_key(id, m.method), encode_method(m))?;
        }
        // The commit point (see the module doc).
        self.phones.insert(index.bytes(), &u64_key(id))?;
        self.users_total.fetch_add(1, Ordering::SeqCst);
        self.wrote();
        Ok((user, true))
    }

    pub(super) fn login_methods_now(&self, user: &User) -> Result<Vec<LoginMethod>> {
        let mut found = vec![LoginMethod {
            method: Method::Sms,
            identification: user.phone.clone(),
            access_code: None,
        }];
        // Point reads of the few possible keys: in sled a prefix scan costs several times
        // a get, and GET /me reads this on every call.
        for method in STORED_METHODS {
            if let Some(v) = self.methods.get(method_key(user.id, method))? {
                found.push(identified(decode(&v)?, user));
            }
        }
        Ok(found)
    }

    fn put_method_now(&self, id: UserId, method: &LoginMethod) -> Result<()> {
        if method.method == Method::Sms {
            return Ok(()); // implied
        }
        let _gate = self.write_gate();
        self.methods
            .insert(method_key(id, method.method), encode_method(method))?;
        self.wrote();
        Ok(())
    }

    fn put_method_ending_sessions_now(
        &self,
        id: UserId,
        method: &LoginMethod,
    ) -> Result<Option<User>> {
        let _gate = self.write_gate();
        // Sessions end first: a crash between the two writes leaves the old password with
        // its sessions ended (the caller got no answer and tries again), never the new
        // password with the old sessions still working.
        let Some(user) = self.change_user(id, &UserChange::EndSessions)? else {
            return Ok(None);
        };
        self.methods
            .insert(method_key(id, method.method), encode_method(method))?;
        self.wrote();
        Ok(Some(user))
    }

    fn delete_now(&self, id: UserId) -> Result<Option<User>> {
        let deleted = self.delete_locked(id)?;
        if deleted.is_some() {
            // Dead already (their sessions are gone); this removes their records.
            super::blocking(|| self.erase_refresh_tokens(id))?;
        }
        Ok(deleted)
    }

    fn delete_locked(&self, id: UserId) -> Result<Option<User>> {
        // No refresh moves a session on (writing it back) while its user is deleted;
        // taken before the gate, as a refresh takes them.
        let _refreshes = self.hold_refreshes();
        let _gate = self.write_gate();
        let Some(user) = self.user_now(id)? else {
            return Ok(None);
        };
        let _binds = self.hold_wechat_binds();
        let (index, other) = self.vault.indexes(&user.phone);
        let _phone = self.phone_locks.lock(user.phone.as_str());
        // Unbound before the commit point: a WeChat login never finds an account whose
        // deletion a crash cut short.
        self.unbind_locked(id)?;
        // Its sessions and activity too: a crash before the commit point leaves the
        // account logged out, never a deleted account's records behind.
        self.erase_sessions(id)?;
        self.erase_activity(id)?;
        // Recorded first, so the id is never given out again even if it was the highest.
        let next = self.next_id.load(Ordering::SeqCst);
        self.meta.insert(super::META_NEXT_ID, &u64_key(next))?;
        self.list_deletion(id)?;
        // Removing the index entry is the commit point: from here the user is gone. While
        // the phone key rotates, the entry may still be under the other key (or, cut
        // short by a crash, under both); the other one goes first.
        let mut indexed = false;
        for index in other.iter().chain([&index]) {
            indexed |= self
                .phones
                .compare_and_swap(index.bytes(), Some(&u64_key(id)[..]), None as Option<&[u8]>)?
                .is_ok();
        }
        if indexed {
            self.users_total.fetch_sub(1, Ordering::SeqCst);
        }
        for method in STORED_METHODS {
            self.methods.remove(method_key(id, method))?;
        }
        self.users.remove(u64_key(id))?;
        self.cached.forget(id);
        self.wrote();
        Ok(Some(user))
    }
}

impl Users for SledStore {
    fn user(&self, id: UserId) -> BoxFuture<'_, Result<Option<User>>> {
        ready(self.user_now(id))
    }

    fn user_by_phone<'a>(&'a self, phone: &'a PhoneIndex) -> BoxFuture<'a, Result<Option<User>>> {
        ready(self.user_by_phone_now(phone))
    }

    fn has_user<'a>(&'a self, phone: &'a PhoneIndex) -> BoxFuture<'a, Result<bool>> {
        ready(self.phones.contains_key(phone.bytes()).map_err(Into::into))
    }

    fn create_user_if_absent<'a>(
        &'a self,
        new: NewUser<'a>,
        methods: &'a [LoginMethod],
    ) -> BoxFuture<'a, Result<(User, bool)>> {
        ready(self.create_now(new, methods))
    }

    fn log_in_or_create<'a>(
        &'a self,
        new: NewUser<'a>,
        methods: &'a [LoginMethod],
    ) -> BoxFuture<'a, Result<(User, bool)>> {
        let at = new.last_login_at;
        ready((|| {
            let (user, created) = self.create_now(new, methods)?;
            let Some(at) = at.filter(|_| !created && !user.disabled) else {
                return Ok((user, created));
            };
            let _gate = self.write_gate();
            let user = self
                .change_user(user.id, &UserChange::LoggedIn { at })?
                .ok_or_else(|| {
                    StoreError::Engine("the account was deleted during its login".into())
                })?;
            Ok((user, false))
        })())
    }

    fn update_user(&self, id: UserId, change: UserChange) -> BoxFuture<'_, Result<Option<User>>> {
        let _gate = self.write_gate();
        ready(self.change_user(id, &change))
    }

    fn login_methods<'a>(&'a self, user: &'a User) -> BoxFuture<'a, Result<Vec<LoginMethod>>> {
        ready(self.login_methods_now(user))
    }

    fn put_login_method<'a>(
        &'a self,
        id: UserId,
        method: &'a LoginMethod,
    ) -> BoxFuture<'a, Result<()>> {
        ready(self.put_method_now(id, method))
    }

    fn put_login_method_ending_sessions<'a>(
        &'a self,
        id: UserId,
        method: &'a LoginMethod,
    ) -> BoxFuture<'a, Result<Option<User>>> {
        ready(self.put_method_ending_sessions_now(id, method))
    }

    fn user_count(&self) -> BoxFuture<'_, Result<u64>> {
        ready(Ok(self.users_total.load(Ordering::SeqCst)))
    }

    fn users(&self) -> BoxFuture<'_, Result<Vec<User>>> {
        ready(super::blocking(|| {
            self.users
                .iter()
                .map(|kv| decode_user(&kv?.1, &self.vault))
                .collect()
        }))
    }

    fn delete_user(&self, id: UserId) -> BoxFuture<'_, Result<Option<User>>> {
        ready(self.delete_now(id))
    }

    fn user_by_wechat<'a>(&'a self, wechat_id: &'a str) -> BoxFuture<'a, Result<Option<User>>> {
        ready(self.user_by_wechat_now(wechat_id))
    }

    fn log_in_wechat<'a>(
        &'a self,
        wechat_id: &'a str,
        at: i64,
        avatar_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<User>>> {
        ready(self.log_in_wechat_now(wechat_id, at, avatar_url))
    }

    fn bind_wechat_to_phone<'a>(
        &'a self,
        new: NewUser<'a>,
        wechat_id: &'a str,
    ) -> BoxFuture<'a, Result<WechatBind>> {
        ready(self.bind_wechat_to_phone_now(new, wechat_id))
    }

    fn link_wechat<'a>(
        &'a self,
        id: UserId,
        wechat_id: &'a str,
        avatar_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<WechatBind>> {
        ready(self.link_wechat_now(id, wechat_id, avatar_url))
    }

    fn unlink_wechat(&self, id: UserId) -> BoxFuture<'_, Result<Option<User>>> {
        ready(self.unlink_wechat_now(id))
    }
}

/// A login method record: a password's identification (the phone) is left out, since
/// the user record holds it sealed.
pub(super) fn encode_method(method: &LoginMethod) -> Vec<u8> {
    encode(&LoginMethod {
        method: method.method,
        identification: stored_identification(method).to_owned(),
        access_code: method.access_code.clone(),
    })
}
