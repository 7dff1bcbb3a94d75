//! [`Grants`] on sled: `kindkey_grant`, whose values are the expiry then the grant. A
//! take is one `remove`, which sled makes atomic: of racing takes, one gets the value.

use super::SledStore;
use crate::store::codec::read_i64;
use crate::store::layout::grant_key;
use crate::store::{BoxFuture, GrantKind, Grants, StoreError, ready};

type Result<T> = std::result::Result<T, StoreError>;

impl SledStore {
    fn put_grant_now(
        &self,
        kind: GrantKind,
        key: [u8; 32],
        value: &[u8],
        expires_at: i64,
    ) -> Result<()> {
        let _gate = self.write_gate();
        let mut stored = Vec::with_capacity(8 + value.len());
        stored.extend_from_slice(&expires_at.to_be_bytes());
        stored.extend_from_slice(value);
        self.grants.insert(grant_key(kind, &key), stored)?;
        self.wrote();
        Ok(())
    }

    fn take_grant_now(&self, kind: GrantKind, key: [u8; 32]) -> Result<Option<(Vec<u8>, i64)>> {
        let _gate = self.write_gate();
        let Some(stored) = self.grants.remove(grant_key(kind, &key))? else {
            return Ok(None);
        };
        self.wrote();
        split_grant(&stored).map(Some)
    }

    fn prune_grants_now(&self, now: i64) -> Result<usize> {
        let _gate = self.write_gate();
        let mut pruned = 0;
        for kv in self.grants.iter() {
            let (k, v) = kv?;
            if split_grant(&v)?.1 < now {
                self.grants.remove(k)?;
                pruned += 1;
            }
        }
        if pruned > 0 {
            self.wrote();
        }
        Ok(pruned)
    }
}

fn split_grant(stored: &[u8]) -> Result<(Vec<u8>, i64)> {
    if stored.len() < 8 {
        return Err(StoreError::Corrupt("grant record".into()));
    }
    let (exp, value) = stored.split_at(8);
    Ok((value.to_vec(), read_i64(exp)?))
}

impl Grants for SledStore {
    fn put_grant<'a>(
        &'a self,
        kind: GrantKind,
        key: [u8; 32],
        value: &'a [u8],
        expires_at: i64,
    ) -> BoxFuture<'a, Result<()>> {
        ready(self.put_grant_now(kind, key, value, expires_at))
    }

    fn take_grant(
        &self,
        kind: GrantKind,
        key: [u8; 32],
    ) -> BoxFuture<'_, Result<Option<crate::store::TakenGrant>>> {
        ready(self.take_grant_now(kind, key))
    }

    fn prune_grants(&self, now: i64) -> BoxFuture<'_, Result<usize>> {
        ready(super::blocking(|| self.prune_grants_now(now)))
    }
}
