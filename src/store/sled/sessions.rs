//! [`Sessions`] on sled: revoked token ids (and ended sessions' revocation keys) in
//! `jti_exp`, mirrored in memory at open so that the check on every authenticated
//! request is a map lookup; login sessions in `useridsession_session`, refresh tokens
//! by digest in `hash_refresh`.

use std::sync::PoisonError;

use super::SledStore;
use crate::model::{User, UserId};
use crate::store::codec::{decode, encode, read_i64, u64_key};
use crate::store::layout::session_key;
use crate::store::{
    BoxFuture, RefreshUse, SessionId, SessionRecord, Sessions, StoreError, ready,
    session_revocation_key,
};

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

    /// Whether the token `jti` of login session `sid` (a revocation key) is refused.
    fn is_refused_now(&self, jti: &str, sid: Option<&str>) -> bool {
        let ids = self
            .revoked_ids
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        ids.contains_key(jti) || sid.is_some_and(|s| ids.contains_key(s))
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

    fn session_user<'a>(
        &'a self,
        id: UserId,
        jti: &'a str,
        sid: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<User>>> {
        if self.is_refused_now(jti, sid) {
            return ready(Ok(None));
        }
        ready(self.user_now(id))
    }

    fn session_account<'a>(
        &'a self,
        id: UserId,
        jti: &'a str,
        sid: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<crate::store::Account>>> {
        if self.is_refused_now(jti, sid) {
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

    fn create_session<'a>(
        &'a self,
        session: &'a SessionRecord,
        refresh: [u8; 32],
    ) -> BoxFuture<'a, Result<()>> {
        ready(self.create_session_now(session, refresh))
    }

    fn use_refresh(
        &self,
        presented: [u8; 32],
        successor: [u8; 32],
        now: i64,
        expires_at: i64,
    ) -> BoxFuture<'_, Result<RefreshUse>> {
        ready(self.use_refresh_now(presented, successor, now, expires_at))
    }

    fn user_sessions(&self, user: UserId) -> BoxFuture<'_, Result<Vec<SessionRecord>>> {
        ready(self.user_sessions_now(user))
    }

    fn end_session(
        &self,
        user: UserId,
        id: SessionId,
        revoke_until: i64,
    ) -> BoxFuture<'_, Result<bool>> {
        ready(self.end_session_now(user, id, revoke_until))
    }

    fn prune_sessions(&self, now: i64) -> BoxFuture<'_, Result<usize>> {
        ready(super::blocking(|| self.prune_sessions_now(now)))
    }
}

/// A refresh token's record in `hash_refresh`.
#[derive(serde::Serialize, serde::Deserialize)]
struct RefreshRecord {
    user_id: UserId,
    session_id: SessionId,
    expires_at: i64,
    used_at: Option<i64>,
}

impl SledStore {
    fn create_session_now(&self, session: &SessionRecord, refresh: [u8; 32]) -> Result<()> {
        let _gate = self.write_gate();
        let token = RefreshRecord {
            user_id: session.user_id,
            session_id: session.id,
            expires_at: session.expires_at,
            used_at: None,
        };
        // The session first: a token is only ever found with its session there.
        self.sessions
            .insert(session_key(session.user_id, &session.id), encode(session))?;
        self.refresh.insert(refresh, encode(&token))?;
        self.wrote();
        Ok(())
    }

    fn session_now(&self, user: UserId, id: &SessionId) -> Result<Option<SessionRecord>> {
        self.sessions
            .get(session_key(user, id))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Under `refresh_lock`, so no other use of any refresh token runs between the read
    /// and the writes. The successor and the session's new times are written before the
    /// presented token is marked used, the commit point: after a crash in between, the
    /// token is still live and its retry (whose successor is derived from it, so the
    /// same) writes them again.
    fn use_refresh_now(
        &self,
        presented: [u8; 32],
        successor: [u8; 32],
        now: i64,
        expires_at: i64,
    ) -> Result<RefreshUse> {
        let _one = self
            .refresh_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let _gate = self.write_gate();
        let Some(v) = self.refresh.get(presented)? else {
            return Ok(RefreshUse::Invalid);
        };
        let mut token: RefreshRecord = decode(&v)?;
        if token.expires_at < now {
            return Ok(RefreshUse::Invalid);
        }
        let Some(mut session) = self.session_now(token.user_id, &token.session_id)? else {
            return Ok(RefreshUse::Invalid);
        };
        if session.ended {
            return Ok(RefreshUse::Invalid);
        }
        if let Some(used_at) = token.used_at {
            return Ok(RefreshUse::Used { session, used_at });
        }
        let next = RefreshRecord {
            user_id: token.user_id,
            session_id: token.session_id,
            expires_at,
            used_at: None,
        };
        self.refresh.insert(successor, encode(&next))?;
        session.last_used_at = now;
        session.expires_at = expires_at;
        self.sessions
            .insert(session_key(session.user_id, &session.id), encode(&session))?;
        token.used_at = Some(now);
        self.refresh.insert(presented, encode(&token))?;
        self.wrote();
        Ok(RefreshUse::Rotated(session))
    }

    fn user_sessions_now(&self, user: UserId) -> Result<Vec<SessionRecord>> {
        self.sessions
            .scan_prefix(u64_key(user))
            .map(|kv| decode(&kv?.1))
            .collect()
    }

    /// The revocation is written first: once the session shows as ended, its access
    /// tokens are refused too, crashes included.
    fn end_session_now(&self, user: UserId, id: SessionId, revoke_until: i64) -> Result<bool> {
        let _one = self
            .refresh_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(mut session) = self.session_now(user, &id)? else {
            return Ok(false);
        };
        if session.ended {
            return Ok(false);
        }
        self.revoke_now(&session_revocation_key(&id), revoke_until)?;
        let _gate = self.write_gate();
        session.ended = true;
        self.sessions
            .insert(session_key(user, &id), encode(&session))?;
        self.wrote();
        Ok(true)
    }

    /// Held while a user is deleted: see [`SledStore::delete_now`].
    pub(super) fn hold_refreshes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.refresh_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes every session of `user`, ended or not: its refresh tokens are refused from
    /// then on. The caller holds the write gate and [`Self::hold_refreshes`].
    pub(super) fn erase_sessions(&self, user: UserId) -> Result<()> {
        for k in self.sessions.scan_prefix(u64_key(user)).keys() {
            self.sessions.remove(k?)?;
        }
        Ok(())
    }

    /// Removes the refresh tokens of `user` (a scan of every token: for a deletion).
    pub(super) fn erase_refresh_tokens(&self, user: UserId) -> Result<()> {
        let _gate = self.write_gate();
        for kv in self.refresh.iter() {
            let (k, v) = kv?;
            let token: RefreshRecord = decode(&v)?;
            if token.user_id == user {
                self.refresh.remove(k)?;
            }
        }
        self.wrote();
        Ok(())
    }

    fn prune_sessions_now(&self, now: i64) -> Result<usize> {
        let _gate = self.write_gate();
        let mut pruned = 0;
        for kv in self.sessions.iter() {
            let (k, v) = kv?;
            let session: SessionRecord = decode(&v)?;
            if session.ended || session.expires_at < now {
                self.sessions.remove(k)?;
                pruned += 1;
            }
        }
        for kv in self.refresh.iter() {
            let (k, v) = kv?;
            let token: RefreshRecord = decode(&v)?;
            if token.expires_at < now
                || !self
                    .sessions
                    .contains_key(session_key(token.user_id, &token.session_id))?
            {
                self.refresh.remove(k)?;
                pruned += 1;
            }
        }
        if pruned > 0 {
            self.wrote();
        }
        Ok(pruned)
    }
}
