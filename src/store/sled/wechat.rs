//! WeChat bindings on sled: the `wechat` login method record of a user, and the
//! `wechat_userid` index that finds the user of a WeChat id.
//!
//! The method record is the commit point of a binding. A bind writes the index entry
//! first, then the record; an unbind removes the record first, then the entry. So a crash
//! can leave only an index entry that no record confirms, and a look-up counts an entry
//! only when the user it names has a `wechat` method naming the same id: a stale entry
//! is harmless, and the next bind of that id simply overwrites it.
//!
//! Every change of a binding holds `wechat_binds`, so checking that neither the WeChat id
//! nor the account is bound elsewhere and binding them is one step.

use std::sync::PoisonError;

use super::SledStore;
use crate::model::{LoginMethod, Method, User, UserId};
use crate::store::codec::{decode, encode, read_u64, u64_key};
use crate::store::layout::method_key;
use crate::store::{NewUser, StoreError, UserChange, WechatBind};

type Result<T> = std::result::Result<T, StoreError>;

pub(super) fn wechat_method(wechat_id: &str) -> LoginMethod {
    LoginMethod {
        method: Method::Wechat,
        identification: wechat_id.to_owned(),
        access_code: None,
    }
}

impl SledStore {
    fn wechat_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded unit holds no state a panic could have left half changed.
        self.wechat_binds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The WeChat id the user's `wechat` method names, if it has one.
    pub(super) fn wechat_of(&self, id: UserId) -> Result<Option<String>> {
        self.methods
            .get(method_key(id, Method::Wechat))?
            .map(|v| decode::<LoginMethod>(&v).map(|m| m.identification))
            .transpose()
    }

    pub(super) fn user_by_wechat_now(&self, wechat_id: &str) -> Result<Option<User>> {
        let Some(id) = self.wechats.get(wechat_id.as_bytes())? else {
            return Ok(None);
        };
        let id = read_u64(&id)?;
        if self.wechat_of(id)?.as_deref() != Some(wechat_id) {
            return Ok(None); // a stale entry (see the module doc)
        }
        self.user_now(id)
    }

    pub(super) fn log_in_wechat_now(
        &self,
        wechat_id: &str,
        at: i64,
        avatar_url: Option<&str>,
    ) -> Result<Option<User>> {
        let Some(user) = self.user_by_wechat_now(wechat_id)? else {
            return Ok(None);
        };
        if user.disabled {
            return Ok(Some(user));
        }
        let _gate = self.write_gate();
        self.record_login(user, Some(at), avatar_url)
    }

    /// Records a login (if `at`) and a changed avatar; the user as stored after.
    fn record_login(
        &self,
        user: User,
        at: Option<i64>,
        avatar_url: Option<&str>,
    ) -> Result<Option<User>> {
        let mut after = Some(user);
        if let Some(at) = at
            && let Some(user) = &after
        {
            after = self.change_user(user.id, &UserChange::LoggedIn { at })?;
        }
        if let Some(user) = &after
            && user.avatar_url.as_deref() != avatar_url
        {
            let avatar = UserChange::Avatar(avatar_url.map(str::to_owned));
            after = self.change_user(user.id, &avatar)?;
        }
        Ok(after)
    }

    pub(super) fn bind_wechat_to_phone_now(
        &self,
        new: NewUser<'_>,
        wechat_id: &str,
    ) -> Result<WechatBind> {
        let _gate = self.write_gate();
        let _binds = self.wechat_lock();
        let owner = self.user_by_wechat_now(wechat_id)?;
        if let Some(owner) = &owner
            && owner.phone != new.phone
        {
            return Ok(WechatBind::Taken);
        }
        if let (Some(user), _) = self.existing_now(&new)? {
            let avatar = new.avatar_url.clone();
            return self.link_locked(user, wechat_id, new.last_login_at, avatar.as_deref());
        }
        // No account for the phone: make it with both methods. The create writes the
        // WeChat index entry before the phone index entry, its commit point.
        let (login_at, avatar) = (new.last_login_at, new.avatar_url.clone());
        let (user, created) = self.create_gated(new, &[wechat_method(wechat_id)])?;
        if created {
            return Ok(WechatBind::Bound { user, created });
        }
        // A code login made the account meanwhile: bind to it.
        self.link_locked(user, wechat_id, login_at, avatar.as_deref())
    }

    pub(super) fn link_wechat_now(
        &self,
        id: UserId,
        wechat_id: &str,
        avatar_url: Option<&str>,
    ) -> Result<WechatBind> {
        let _gate = self.write_gate();
        let _binds = self.wechat_lock();
        let Some(user) = self.user_now(id)? else {
            return Ok(WechatBind::NoUser);
        };
        if let Some(owner) = self.user_by_wechat_now(wechat_id)?
            && owner.id != id
        {
            return Ok(WechatBind::Taken);
        }
        self.link_locked(user, wechat_id, None, avatar_url)
    }

    /// Binds `wechat_id` to `user`, whom no other account's binding stands against; the
    /// caller holds the gate and `wechat_binds`.
    fn link_locked(
        &self,
        user: User,
        wechat_id: &str,
        login_at: Option<i64>,
        avatar_url: Option<&str>,
    ) -> Result<WechatBind> {
        if user.disabled {
            return Ok(WechatBind::Disabled);
        }
        match self.wechat_of(user.id)? {
            Some(bound) if bound != wechat_id => return Ok(WechatBind::AlreadyBound),
            Some(_) => {}
            None => {
                self.wechats
                    .insert(wechat_id.as_bytes(), &u64_key(user.id))?;
                // The commit point (see the module doc).
                self.methods.insert(
                    method_key(user.id, Method::Wechat),
                    encode(&wechat_method(wechat_id)),
                )?;
                self.wrote();
            }
        }
        let user = self
            .record_login(user, login_at, avatar_url)?
            .ok_or_else(|| StoreError::Engine("the account vanished while it was bound".into()))?;
        Ok(WechatBind::Bound {
            user,
            created: false,
        })
    }

    pub(super) fn unlink_wechat_now(&self, id: UserId) -> Result<Option<User>> {
        let _gate = self.write_gate();
        let _binds = self.wechat_lock();
        let Some(user) = self.user_now(id)? else {
            return Ok(None);
        };
        self.unbind_locked(id)?;
        if user.avatar_url.is_none() {
            return Ok(Some(user));
        }
        self.change_user(id, &UserChange::Avatar(None))
    }

    /// Removes the user's binding, if any; the caller holds the gate and `wechat_binds`.
    pub(super) fn unbind_locked(&self, id: UserId) -> Result<()> {
        let Some(wechat_id) = self.wechat_of(id)? else {
            return Ok(());
        };
        // The commit point first, then the index entry, if it is still this user's.
        self.methods.remove(method_key(id, Method::Wechat))?;
        let _ = self.wechats.compare_and_swap(
            wechat_id.as_bytes(),
            Some(&u64_key(id)[..]),
            None as Option<&[u8]>,
        )?;
        self.wrote();
        Ok(())
    }

    /// The lock a deletion takes before its phone lock, so it never runs beside a bind.
    pub(super) fn hold_wechat_binds(&self) -> std::sync::MutexGuard<'_, ()> {
        self.wechat_lock()
    }
}
