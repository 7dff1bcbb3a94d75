//! Storage behind small interfaces of ours, one per concern, each implemented by every
//! engine. [`Store`] holds one of each; handlers and the domain modules (codes, tokens,
//! limits, captcha) talk to these traits and never learn which engine runs.
//!
//! - [`Users`]: accounts and their login methods (sms, password, WeChat);
//! - [`PendingCodes`]: codes sent and not yet used, and [`ResendWaits`] between sends;
//! - [`Counters`]: per-phone and service-wide counts in fixed windows (daily caps,
//!   lockouts) and [`AddressLimits`] per client address;
//! - [`CaptchaAnswers`]: the answers of pending captchas;
//! - [`Sessions`]: login sessions and their refresh tokens, revoked tokens, and the user
//!   a session belongs to;
//! - [`Activity`]: each account's login activity (logins, failed password logins,
//!   logouts, password changes, WeChat bindings), kept for `privacy.activity_retention_days`;
//! - [`Grants`]: short-lived single-use grants (WeChat's OAuth states and tickets);
//! - [`Keys`]: the server's own secrets (code HMAC key, token signing keys);
//! - [`Snapshots`]: the whole store as records, for backups, and their import;
//! - [`Engine`]: durability, readiness and the engine's own figures.
//!
//! Engines: `sled` (embedded, the default: one process owns a data dir; what needs no
//! persistence, such as captchas and per-address limits, stays in that process's memory)
//! and, with `engine = "postgres"`, a PostgreSQL database that any number of instances
//! share, so they act as one. No engine type leaves its module.

mod codec;
mod layout;
mod memory;
mod postgres;
mod sled;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

pub use self::layout::{META as META_TREE, META_PHONE_KEY};
pub use self::sled::SledStore;

use crate::config::{Config, StorageEngine};
use crate::model::{
    ActivityEvent, Counter, LoginMethod, Method, PendingCode, Purpose, User, UserId,
};
pub use crate::privacy::{PhoneIndex, PhoneVault};
pub use crate::rotation::{Phase, RotationState};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Receives one record of a [`Snapshots::snapshot`]: (tree, key, value).
pub type RecordSink<'a> = dyn FnMut(&str, &[u8], &[u8]) -> std::io::Result<()> + 'a;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data dir {0} is in use by another smsauth process; stop it first")]
    Locked(String),
    /// The engine cannot be reached now (a database down or overloaded); the request
    /// may be tried again later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage: {0}")]
    Engine(String),
    #[error("stored record is unreadable: {0}")]
    Corrupt(String),
    /// The store was written by a newer release (or is otherwise not ours to open).
    #[error("{0}")]
    Schema(String),
}

/// How many sends of the daily budget an engine may count ahead of what it has stored:
/// what a crash can cost, at most 1% of the budget and never over 64 sends (a budget of
/// 100 or less is counted exactly).
fn budget_block(limit: u64) -> u64 {
    if limit == 0 {
        64
    } else {
        (limit / 100).clamp(1, 64)
    }
}

/// A finished value as a [`BoxFuture`], for engines whose work is done in the call.
pub fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

/// What a stored login method keeps as its identification: nothing for a password, whose
/// identification is the phone, which the user record holds (sealed).
pub fn stored_identification(method: &LoginMethod) -> &str {
    match method.method {
        Method::Sms | Method::Password => "",
        Method::Wechat => &method.identification,
    }
}

/// A login method as read back: one identified by the phone gets the user's.
pub fn identified(mut method: LoginMethod, user: &User) -> LoginMethod {
    if matches!(method.method, Method::Sms | Method::Password) {
        method.identification.clone_from(&user.phone);
    }
    method
}

/// A user to create; the store gives it its id.
pub struct NewUser<'a> {
    /// E.164: the store keeps it sealed, and finds it by `index`.
    pub phone: &'a str,
    pub index: PhoneIndex,
    /// While the phone key rotates: the index under the rotation's other key. The
    /// account it finds, if any, is the phone's (the create logs in to it instead).
    pub other: Option<PhoneIndex>,
    pub nickname: String,
    pub created_at: i64,
    pub last_login_at: Option<i64>,
    pub avatar_url: Option<String>,
}

/// What binding a WeChat id to an account came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WechatBind {
    /// Bound now, or bound to this account already: the account as stored after it.
    Bound { user: User, created: bool },
    /// The WeChat id belongs to another account.
    Taken,
    /// The account has another WeChat id.
    AlreadyBound,
    /// The account is disabled: nothing was changed.
    Disabled,
    /// There is no such account.
    NoUser,
}

/// One change to a stored user: each is a single atomic update in every engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChange {
    LoggedIn {
        at: i64,
    },
    Nickname(String),
    Disabled(bool),
    Avatar(Option<String>),
    /// Bumps the session generation: every session issued before ends.
    EndSessions,
}

impl UserChange {
    pub fn apply(&self, user: &mut User) {
        match self {
            UserChange::LoggedIn { at } => user.last_login_at = Some(*at),
            UserChange::Nickname(n) => user.nickname.clone_from(n),
            UserChange::Disabled(d) => user.disabled = *d,
            UserChange::Avatar(a) => user.avatar_url.clone_from(a),
            UserChange::EndSessions => user.session_gen = user.session_gen.wrapping_add(1),
        }
    }
}

/// Accounts and their login methods.
pub trait Users: Send + Sync {
    fn user(&self, id: UserId) -> BoxFuture<'_, Result<Option<User>>>;
    /// The account whose phone index entry is `phone`. A request looks a phone up with
    /// [`Users::find_by_phone`], which also finds an account a key rotation has not moved.
    fn user_by_phone<'a>(&'a self, phone: &'a PhoneIndex) -> BoxFuture<'a, Result<Option<User>>>;
    /// Whether the phone index has an entry: one read, not of the user.
    fn has_user<'a>(&'a self, phone: &'a PhoneIndex) -> BoxFuture<'a, Result<bool>>;
    /// The phone's account, under either index while the phone key rotates. The other
    /// index is read first: a rotation writes an account's new entry before it removes
    /// the old one, so a miss there means the new one is in place.
    fn find_by_phone<'a>(
        &'a self,
        phone: &'a crate::phone::IndexedPhone,
    ) -> BoxFuture<'a, Result<Option<User>>> {
        Box::pin(async move {
            if let Some(other) = &phone.other
                && let Some(user) = self.user_by_phone(other).await?
            {
                return Ok(Some(user));
            }
            self.user_by_phone(&phone.index).await
        })
    }
    /// Whether the phone has an account, as [`Users::find_by_phone`] finds it.
    fn phone_has_user<'a>(
        &'a self,
        phone: &'a crate::phone::IndexedPhone,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            if let Some(other) = &phone.other
                && self.has_user(other).await?
            {
                return Ok(true);
            }
            self.has_user(&phone.index).await
        })
    }
    /// Creates the user unless the phone already has one, atomically: of racing calls
    /// for one phone (on any instance) exactly one creates. Returns the user and whether
    /// it was created.
    fn create_user_if_absent<'a>(
        &'a self,
        new: NewUser<'a>,
        methods: &'a [LoginMethod],
    ) -> BoxFuture<'a, Result<(User, bool)>>;
    /// A code login: creates the user as [`Users::create_user_if_absent`] does, and if the
    /// phone had one already, records the login (`new.last_login_at`) unless the account
    /// is disabled. Returns the user as stored after it and whether it was created.
    fn log_in_or_create<'a>(
        &'a self,
        new: NewUser<'a>,
        methods: &'a [LoginMethod],
    ) -> BoxFuture<'a, Result<(User, bool)>>;
    fn update_user(&self, id: UserId, change: UserChange) -> BoxFuture<'_, Result<Option<User>>>;
    /// The user's login methods: `sms` always (every account was made by proving its
    /// phone, so the method is implied by the user record and not stored), then the
    /// stored ones in method order.
    fn login_methods<'a>(&'a self, user: &'a User) -> BoxFuture<'a, Result<Vec<LoginMethod>>>;
    fn put_login_method<'a>(
        &'a self,
        id: UserId,
        method: &'a LoginMethod,
    ) -> BoxFuture<'a, Result<()>>;
    /// Bumps the user's session generation, then stores `method`: a new password is never
    /// in place while the sessions it should end still work, crashes included.
    fn put_login_method_ending_sessions<'a>(
        &'a self,
        id: UserId,
        method: &'a LoginMethod,
    ) -> BoxFuture<'a, Result<Option<User>>>;
    fn user_count(&self) -> BoxFuture<'_, Result<u64>>;
    /// Every user, in id order (admin listing).
    fn users(&self) -> BoxFuture<'_, Result<Vec<User>>>;
    /// Removes the user, its phone index entry, its login methods, its login sessions
    /// with their refresh tokens, and its activity (the account gone for every reader at
    /// once, crashes included; its tokens refused from then on). Ids are never given out
    /// again, so an old token cannot pass for a later user. Counters kept per phone stay.
    /// None if there was no such user.
    fn delete_user(&self, id: UserId) -> BoxFuture<'_, Result<Option<User>>>;

    /// The account a WeChat id is bound to.
    fn user_by_wechat<'a>(&'a self, wechat_id: &'a str) -> BoxFuture<'a, Result<Option<User>>>;
    /// A WeChat login: records it (`at`, and the avatar WeChat gave) on the account bound
    /// to `wechat_id`, unless that account is disabled. The account as stored after it.
    fn log_in_wechat<'a>(
        &'a self,
        wechat_id: &'a str,
        at: i64,
        avatar_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<User>>>;
    /// Binds `wechat_id` to the account of `new.phone` and records the login there
    /// (`new.last_login_at`, `new.avatar_url`); a phone without an account gets one, made
    /// with both methods. One atomic change on every engine, so of racing binds of one
    /// WeChat id (on any instance) one wins and the others are [`WechatBind::Taken`],
    /// and a refused bind leaves nothing behind, not even a new account.
    fn bind_wechat_to_phone<'a>(
        &'a self,
        new: NewUser<'a>,
        wechat_id: &'a str,
    ) -> BoxFuture<'a, Result<WechatBind>>;
    /// Links `wechat_id` to account `id` (asked from a session: not a login), with the
    /// avatar WeChat gave. Atomic as [`Users::bind_wechat_to_phone`].
    fn link_wechat<'a>(
        &'a self,
        id: UserId,
        wechat_id: &'a str,
        avatar_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<WechatBind>>;
    /// Removes the account's WeChat method and its avatar. None if there is no such user.
    fn unlink_wechat(&self, id: UserId) -> BoxFuture<'_, Result<Option<User>>>;
}

/// What checking a code against the pending one found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeCheck {
    /// The right code: it is used up.
    Used,
    /// No live code: none sent, expired, already used, or sent for another purpose.
    Invalid,
    /// A wrong guess at a live code, counted against it.
    Wrong,
    /// The code took `max_attempts` wrong tries and is dead until `expires_at`.
    /// `guessed`: this very try was a wrong guess (the one that killed it).
    Dead { expires_at: i64, guessed: bool },
}

/// Codes sent and not yet used, one per phone (by its blind index) and purpose, kept as
/// keyed hashes.
pub trait PendingCodes: Send + Sync {
    /// Stores the pending code of phone+purpose, replacing any.
    fn put_code<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        purpose: Purpose,
        code: PendingCode,
    ) -> BoxFuture<'a, Result<()>>;
    /// Checks `presented` (the keyed hash of the code given) against the pending code and
    /// uses it up if right, or counts the wrong try. Atomic: of concurrent checks with the
    /// right code, on any instance, exactly one gets [`CodeCheck::Used`].
    fn check_code<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        purpose: Purpose,
        presented: [u8; 32],
        max_attempts: u32,
        now: i64,
    ) -> BoxFuture<'a, Result<CodeCheck>>;
    /// Drops the pending code of phone+purpose (its SMS could not be sent).
    fn discard_code<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<()>>;
    /// Codes sent and not yet used; expired ones may count until the next sweep.
    fn pending_code_count(&self) -> BoxFuture<'_, Result<u64>>;
    /// Deletes every code that expired before `now`. A full pass: for the clean-up.
    fn sweep_codes(&self, now: i64) -> BoxFuture<'_, Result<()>>;
}

/// The wait between two codes to one phone.
pub trait ResendWaits: Send + Sync {
    /// Claims the right to send to `phone` at `now`: Ok(Err(seconds to wait)) inside
    /// `interval` of the last claim. Atomic per phone across instances.
    fn reserve_send<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        now: i64,
        interval: i64,
    ) -> BoxFuture<'a, Result<Result<(), u64>>>;
    /// Gives back a claim whose send failed.
    fn release_send<'a>(&'a self, phone: &'a PhoneIndex) -> BoxFuture<'a, Result<()>>;
    /// Forgets claims older than `interval` (the clean-up).
    fn prune_waits(&self, now: i64, interval: i64) -> BoxFuture<'_, Result<()>>;
}

/// Counts in fixed windows (a UTC day, a clock hour) that outlive restarts. A per-phone
/// counter's subject is the phone's blind index ([`PhoneIndex::as_str`]).
pub trait Counters: Send + Sync {
    /// Adds one to a phone's counter in window `window` unless it has reached `limit` (0:
    /// no limit). Ok(new value), or Err(current value) when at the limit. Atomic.
    fn count_up<'a>(
        &'a self,
        counter: Counter,
        window: i64,
        phone: &'a PhoneIndex,
        limit: u64,
    ) -> BoxFuture<'a, Result<Result<u64, u64>>>;
    /// Takes one back (a send that failed should not cost quota).
    fn count_down<'a>(
        &'a self,
        counter: Counter,
        window: i64,
        phone: &'a PhoneIndex,
    ) -> BoxFuture<'a, Result<()>>;
    fn count<'a>(
        &'a self,
        counter: Counter,
        window: i64,
        phone: &'a PhoneIndex,
    ) -> BoxFuture<'a, Result<u64>>;
    /// One send from the service's daily budget of `limit` (0: none) for day `day`: true
    /// if it was taken. Every send in the service takes one, so engines may count it
    /// ahead of what they store, in blocks of [`budget_block`]; after a crash the budget
    /// may come up short by that much (per instance), never long.
    fn take_budget(&self, day: i64, limit: u64) -> BoxFuture<'_, Result<bool>>;
    /// Gives back a send of the budget that did not happen.
    fn give_back_budget(&self, day: i64) -> BoxFuture<'_, Result<()>>;
    /// Stores what is counted ahead exactly; call it before the final flush.
    fn close_budget(&self) -> BoxFuture<'_, Result<()>>;
    /// Drops counters of windows before `oldest_kept` (per counter kind).
    fn prune_counters<'a>(
        &'a self,
        oldest_kept: &'a (dyn Fn(Counter) -> i64 + Sync),
    ) -> BoxFuture<'a, Result<usize>>;
}

/// Which per-address limit a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressLimit {
    /// Code requests (`limits.ip_per_hour`).
    Send,
    /// Code and password checks (`limits.verify_per_ip_per_minute`).
    Check,
    /// Captchas (`limits.captcha_per_ip_per_minute`).
    Captcha,
}

impl AddressLimit {
    pub const ALL: [AddressLimit; 3] = [
        AddressLimit::Send,
        AddressLimit::Check,
        AddressLimit::Captcha,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AddressLimit::Send => "send",
            AddressLimit::Check => "check",
            AddressLimit::Captcha => "captcha",
        }
    }
}

/// Per-address rate limits (GCRA: a burst of `n`, then one every period/n), with the
/// quotas of `[limits]`.
pub trait AddressLimits: Send + Sync {
    /// Counts one request of `ip`: Ok(Err(seconds to wait)) when over the limit.
    fn check_address(
        &self,
        limit: AddressLimit,
        ip: IpAddr,
    ) -> BoxFuture<'_, Result<Result<(), u64>>>;
    /// Forgets addresses back at their full allowance.
    fn prune_addresses(&self) -> BoxFuture<'_, Result<()>>;
    /// Addresses tracked per limit, for metrics.
    fn tracked_addresses(&self) -> BoxFuture<'_, Result<Vec<(AddressLimit, u64)>>>;
}

/// The answers of pending captchas, each taken at most once.
pub trait CaptchaAnswers: Send + Sync {
    fn put_captcha<'a>(
        &'a self,
        id: &'a str,
        answer: &'a str,
        expires_at: i64,
    ) -> BoxFuture<'a, Result<()>>;
    /// Takes the answer of `id` out, live or not: (answer, expires_at).
    fn take_captcha<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<(String, i64)>>>;
    fn prune_captchas(&self, now: i64) -> BoxFuture<'_, Result<()>>;
}

/// A user with its login methods.
pub type Account = (User, Vec<LoginMethod>);

/// A login session's id: 128 random bits, the `sid` claim of its access tokens.
pub type SessionId = [u8; 16];

/// One login (sms, password or WeChat) and the chain of refresh tokens that follows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionRecord {
    pub id: SessionId,
    pub user_id: UserId,
    /// The user's session generation at the login: a bump (password reset, admin
    /// logout, "log out everywhere") ends the session.
    pub session_gen: u32,
    pub method: crate::model::Method,
    pub created_at: i64,
    pub last_used_at: i64,
    /// When its newest refresh token expires: the session is over then.
    pub expires_at: i64,
    /// The client address, masked (/24, /48).
    pub ip: String,
    /// The client's User-Agent, cut to 200 characters.
    pub user_agent: String,
    pub ended: bool,
}

/// What presenting a refresh token found ([`Sessions::use_refresh`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshUse {
    /// It was live and is used up now, by this call; its successor is stored. The
    /// session as it is after it (`last_used_at`, `expires_at` moved on).
    Rotated(SessionRecord),
    /// It was used before, at `used_at` (by this instance or another); its successor was
    /// stored then. Whether that is a second tab or a thief is the caller's call.
    Used {
        session: SessionRecord,
        used_at: i64,
    },
    /// Unknown, expired, or of a session that has ended or is gone.
    Invalid,
}

/// The revocation entry that ends every access token of session `id` (kept with the
/// token ids of [`Sessions::revoke`]; a jti is bare hex, so the two never meet).
pub fn session_revocation_key(id: &SessionId) -> String {
    format!("sid:{}", hex::encode(id))
}

/// Tokens ended before their expiry, the user a session belongs to, and the login
/// sessions with their refresh tokens (kept as SHA-256 digests only).
pub trait Sessions: Send + Sync {
    /// Stores a new session and its first refresh token (by digest), live until
    /// `session.expires_at`.
    fn create_session<'a>(
        &'a self,
        session: &'a SessionRecord,
        refresh: [u8; 32],
    ) -> BoxFuture<'a, Result<()>>;
    /// Uses up the live refresh token `presented` (a digest) and stores `successor` in
    /// its place, live until `expires_at`, as one atomic step: of racing uses of one
    /// token, on any instance, exactly one gets [`RefreshUse::Rotated`] and the others
    /// [`RefreshUse::Used`].
    fn use_refresh(
        &self,
        presented: [u8; 32],
        successor: [u8; 32],
        now: i64,
        expires_at: i64,
    ) -> BoxFuture<'_, Result<RefreshUse>>;
    /// Every stored session of the user, ended and stale ones included.
    fn user_sessions(&self, user: UserId) -> BoxFuture<'_, Result<Vec<SessionRecord>>>;
    /// Ends session `id` of `user` (refresh tokens refused from now on) and revokes its
    /// access tokens ([`session_revocation_key`]) until `revoke_until`, as one step.
    /// False if there was no such live session.
    fn end_session(
        &self,
        user: UserId,
        id: SessionId,
        revoke_until: i64,
    ) -> BoxFuture<'_, Result<bool>>;
    /// Deletes the sessions that expired or ended before `now` and the refresh tokens
    /// that expired, or whose session is gone.
    fn prune_sessions(&self, now: i64) -> BoxFuture<'_, Result<usize>>;

    /// Marks a token id as used up until `exp`. True if it was not marked before: the
    /// caller that gets true is the one that used it (single-use tickets).
    fn revoke<'a>(&'a self, jti: &'a str, exp: i64) -> BoxFuture<'a, Result<bool>>;
    fn is_revoked<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<bool>>;
    /// The user of a session with token id `jti`, unless the token is revoked, or its
    /// login session (`sid`, a [`session_revocation_key`]) has ended: what an
    /// authenticated request needs, in one read where the engine allows.
    fn session_user<'a>(
        &'a self,
        id: UserId,
        jti: &'a str,
        sid: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<User>>>;
    /// [`Sessions::session_user`] with the user's login methods (as
    /// [`Users::login_methods`] gives them), in one read where the engine allows.
    fn session_account<'a>(
        &'a self,
        id: UserId,
        jti: &'a str,
        sid: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<Account>>>;
    /// Forgets revocations of tokens that have expired anyway.
    fn prune_revocations(&self, now: i64) -> BoxFuture<'_, Result<usize>>;
}

/// One entry of an account's login activity. `(at, seq)` orders a user's entries and
/// names one of them (the API's `id`, and its `?before=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityEntry {
    pub user_id: UserId,
    /// Unix seconds.
    pub at: i64,
    /// Tells apart entries of one user in one second; any value, unique per entry.
    pub seq: u32,
    pub event: ActivityEvent,
    /// How the user logged in (or tried to); None for events without one.
    pub method: Option<Method>,
    /// The client address, masked (/24, /48) as sessions keep it.
    pub ip: String,
    /// The client's User-Agent, cut to 200 characters.
    pub user_agent: String,
}

/// An activity entry's value in the embedded layout (its user, time and seq are its key).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ActivityValue {
    pub event: ActivityEvent,
    pub method: Option<Method>,
    pub ip: String,
    pub user_agent: String,
}

/// Each account's login activity. A deleted account's goes with it
/// ([`Users::delete_user`]).
pub trait Activity: Send + Sync {
    /// Stores an entry; durable after the next flush. An entry of an account that is gone
    /// (deleted meanwhile) may be dropped.
    fn record_activity<'a>(&'a self, entry: &'a ActivityEntry) -> BoxFuture<'a, Result<()>>;
    /// The user's entries before `before` (`(at, seq)`; None: the newest), newest first,
    /// at most `limit`.
    fn activity_page(
        &self,
        user: UserId,
        before: Option<(i64, u32)>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<ActivityEntry>>>;
    /// Deletes every entry older than `oldest_kept` (unix seconds). A full pass: for the
    /// clean-up.
    fn prune_activity(&self, oldest_kept: i64) -> BoxFuture<'_, Result<usize>>;
}

/// What a grant is for; a grant is only found under its own kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantKind {
    /// A WeChat OAuth `state`, from /wechat/start or POST /me/wechat to the callback.
    WechatState,
    /// What the callback learnt of a WeChat user, for /wechat/exchange.
    WechatTicket,
    /// A WeChat user to bind to a phone, for /wechat/bind.
    WechatBind,
}

impl GrantKind {
    pub const ALL: [GrantKind; 3] = [
        GrantKind::WechatState,
        GrantKind::WechatTicket,
        GrantKind::WechatBind,
    ];
}

/// A grant as taken out of the store: its bytes and when it expires (unix seconds).
pub type TakenGrant = (Vec<u8>, i64);

/// Short-lived, single-use grants, kept under a digest of their token: the store never
/// holds a token that would work if copied out of it.
pub trait Grants: Send + Sync {
    fn put_grant<'a>(
        &'a self,
        kind: GrantKind,
        key: [u8; 32],
        value: &'a [u8],
        expires_at: i64,
    ) -> BoxFuture<'a, Result<()>>;
    /// Takes the grant out, live or not: (value, expires_at). Of racing takes of one
    /// grant, on any instance, exactly one gets it.
    fn take_grant(
        &self,
        kind: GrantKind,
        key: [u8; 32],
    ) -> BoxFuture<'_, Result<Option<TakenGrant>>>;
    /// Deletes the grants that expired before `now`.
    fn prune_grants(&self, now: i64) -> BoxFuture<'_, Result<usize>>;
}

/// A server key and its name (`token`, `code`, `signing`).
pub type NamedKey = (String, Vec<u8>);

/// The server's own secrets, made once and shared by every instance of a cluster.
pub trait Keys: Send + Sync {
    /// The key `name`, or `fresh` stored as it if there is none yet. Atomic: instances
    /// starting together all get the same key.
    fn key_or_insert<'a>(&'a self, name: &'a str, fresh: Vec<u8>)
    -> BoxFuture<'a, Result<Vec<u8>>>;
    /// The key `name`, if there is one. Never creates it.
    fn key<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>>>;
    /// Replaces the key `name` by `new` if it is still `current`, as one atomic step: of
    /// instances changing it at once, one wins and the others get false (read it again
    /// and redo their change on what they read).
    fn replace_key<'a>(
        &'a self,
        name: &'a str,
        current: &'a [u8],
        new: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool>>;
    /// Every key kept, by name, for a backup.
    fn export_keys(&self) -> BoxFuture<'_, Result<Vec<NamedKey>>>;
}

/// What a rotation of the phone key keeps in the store ([`crate::rotation`]).
pub trait PhoneRotations: Send + Sync {
    /// The rotation recorded, running or done; None if there never was one.
    fn rotation(&self) -> BoxFuture<'_, Result<Option<RotationState>>>;
    /// Stores `new` if the recorded state is still `expected`; false if another
    /// participant changed it first. A state that is done also records the store as
    /// sealed with its key, in the same write.
    fn swap_rotation<'a>(
        &'a self,
        expected: Option<&'a RotationState>,
        new: &'a RotationState,
    ) -> BoxFuture<'a, Result<bool>>;
    /// Moves up to `limit` users, from id `from` on, to the vault's current key: the
    /// phone re-sealed and the index entry re-keyed, each as one atomic change that a
    /// second run leaves as it is. Returns the id to go on from (None past the last user)
    /// and how many were moved.
    fn move_users(
        &self,
        from: UserId,
        limit: usize,
    ) -> BoxFuture<'_, Result<(Option<UserId>, u64)>>;
    /// The lowest id of a user not sealed with the vault's current key, if any.
    fn first_unmoved(&self) -> BoxFuture<'_, Result<Option<UserId>>>;
    /// Records which rotation phase `instance` holds the keys for (None: no rotation),
    /// and that it is alive now.
    fn report_phase<'a>(
        &'a self,
        instance: &'a str,
        phase: Option<(&'a str, Phase)>,
    ) -> BoxFuture<'a, Result<()>>;
    /// The live instances (heard from within [`crate::rotation::LIVE_SECS`]) that do not
    /// report `phase` or a later one of the rotation to key `to`.
    fn instances_behind<'a>(
        &'a self,
        to: &'a str,
        phase: Phase,
    ) -> BoxFuture<'a, Result<Vec<String>>>;
    /// Takes `instance` off the list (a clean stop).
    fn leave<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, Result<()>>;
}

/// The whole store as records, for `smsauth backup` and `restore`. Blocking: call from a
/// blocking thread.
pub trait Snapshots: Send + Sync {
    /// Hands every stored record to `sink` as (tree, key, value), tree by tree in key
    /// order, as one consistent state (never half of a multi-record change).
    fn snapshot(&self, sink: &mut RecordSink<'_>) -> Result<()>;
    /// Writes one record of a snapshot as it is. Only for restoring into a new, empty
    /// store: it bypasses every rule the other methods keep.
    fn import(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()>;
}

/// The engine as a whole.
pub trait Engine: Send + Sync {
    /// Makes every write made before the call durable. Engines that commit each write
    /// before it returns answer at once. Concurrent flushes are batched into one.
    fn flush(&self) -> BoxFuture<'_, Result<()>>;
    /// Whether the engine answers now (GET /readyz).
    fn ready(&self) -> BoxFuture<'_, Result<()>>;
    /// Bytes on disk, for metrics.
    fn size_on_disk(&self) -> BoxFuture<'_, Result<u64>>;
    /// Periodic work of the engine's own (the sled engine's user-count checkpoint).
    fn maintain(&self) -> BoxFuture<'_, Result<()>>;
    /// Registers the engine's own figures for /metrics (PostgreSQL: its pool and
    /// statements).
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}
    /// Brings them up to date, at scrape time.
    fn observe(&self) {}
}

/// One engine's parts. Cheap to clone; each domain module keeps the parts it uses.
#[derive(Clone)]
pub struct Store {
    pub users: Arc<dyn Users>,
    pub codes: Arc<dyn PendingCodes>,
    pub waits: Arc<dyn ResendWaits>,
    pub counters: Arc<dyn Counters>,
    pub addresses: Arc<dyn AddressLimits>,
    pub captchas: Arc<dyn CaptchaAnswers>,
    pub sessions: Arc<dyn Sessions>,
    pub activity: Arc<dyn Activity>,
    pub grants: Arc<dyn Grants>,
    pub keys: Arc<dyn Keys>,
    pub snapshots: Arc<dyn Snapshots>,
    pub rotations: Arc<dyn PhoneRotations>,
    pub engine: Arc<dyn Engine>,
    /// The phone keys: what the store's phone-keyed records are found by
    /// ([`PhoneVault::index`]).
    pub phones: Arc<PhoneVault>,
}

impl Store {
    /// Opens the configured engine (creating the sled data dir on first start).
    pub async fn open(cfg: &Config) -> anyhow::Result<Store> {
        match cfg.storage.engine {
            StorageEngine::Sled => {
                let sled = SledStore::open_keyed(
                    &cfg.storage.data_dir,
                    cfg.storage.cache_capacity_mb,
                    &cfg.memory,
                    phone_key_file(cfg),
                )?;
                Ok(Self::embedded(Arc::new(sled), cfg)?)
            }
            StorageEngine::Postgres => {
                let file = phone_key_file(cfg).ok_or_else(|| {
                    StoreError::Schema("privacy.phone_key_file is required with PostgreSQL".into())
                })?;
                let key = crate::privacy::read_key_file(file)
                    .map_err(|e| StoreError::Schema(format!("{e:#}")))?;
                let pg = Arc::new(
                    postgres::PgStore::open(
                        &cfg.storage.postgres,
                        &cfg.limits,
                        crate::privacy::PhoneKey::new(&key),
                    )
                    .await?,
                );
                Ok(Store {
                    users: pg.clone(),
                    codes: pg.clone(),
                    waits: pg.clone(),
                    counters: pg.clone(),
                    addresses: pg.clone(),
                    captchas: pg.clone(),
                    sessions: pg.clone(),
                    activity: pg.clone(),
                    grants: pg.clone(),
                    keys: pg.clone(),
                    snapshots: pg.clone(),
                    rotations: pg.clone(),
                    phones: pg.vault(),
                    engine: pg,
                })
            }
        }
    }

    /// The sled engine, with what needs no persistence kept in this process's memory.
    pub fn embedded(sled: Arc<SledStore>, cfg: &Config) -> Result<Store> {
        let now = crate::clock::now();
        let interval = cfg.code.resend_interval_secs as i64;
        let waits = Arc::new(memory::Waits::new(cfg.memory.resend_wait_entries));
        sled.open_codes(now, now - interval, &mut |phone, at| {
            waits.restore(phone, at, now, interval)
        })?;
        Ok(Store {
            users: sled.clone(),
            codes: sled.clone(),
            waits,
            counters: sled.clone(),
            addresses: Arc::new(memory::Addresses::new(&cfg.limits)),
            captchas: Arc::new(memory::Captchas::new(
                std::time::Duration::from_secs(cfg.captcha.ttl_secs),
                cfg.memory.captcha_entries,
            )),
            sessions: sled.clone(),
            activity: sled.clone(),
            grants: sled.clone(),
            keys: sled.clone(),
            snapshots: sled.clone(),
            rotations: sled.clone(),
            phones: sled.vault(),
            engine: sled,
        })
    }
}

/// `privacy.phone_key_file`, if set.
pub fn phone_key_file(cfg: &Config) -> Option<&std::path::Path> {
    Some(cfg.privacy.phone_key_file.as_path()).filter(|p| !p.as_os_str().is_empty())
}

/// The file the phone key is read from, and whether it is the sled data dir's own
/// (`data_dir/phone.key`, made on first start) rather than a configured one.
pub fn phone_key_path(cfg: &Config) -> (std::path::PathBuf, bool) {
    match phone_key_file(cfg) {
        Some(file) => (file.to_owned(), false),
        None => (
            cfg.storage.data_dir.join(crate::privacy::DEFAULT_KEY_FILE),
            true,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_counted_at_most_one_percent_ahead() {
        assert_eq!(budget_block(0), 64);
        assert_eq!(budget_block(100), 1);
        assert_eq!(budget_block(250), 2);
        assert_eq!(budget_block(10_000), 64);
    }
}
