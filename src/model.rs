//! The records smsauth keeps, shared by the modules that work on them and the store that
//! keeps them. Stored positionally (bincode): never reorder fields without a migration.

use serde::{Deserialize, Serialize};

pub type UserId = u64;

/// An account. The phone (E.164) is unique: the store keeps a phone -> id index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub phone: String,
    pub nickname: String,
    /// Unix seconds.
    pub created_at: i64,
    pub last_login_at: Option<i64>,
    pub disabled: bool,
    /// Carried in every session token; bumping it ends all of the user's sessions at once
    /// (password reset, admin logout) without listing tokens.
    pub session_gen: u32,
    /// The picture WeChat gave at the last WeChat login or link; cleared by an unlink.
    /// Added in record format 2 (see `store::codec`).
    pub avatar_url: Option<String>,
}

/// How a user may log in, as seed 000's `user_login_method` table: one row per method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginMethod {
    pub method: Method,
    /// What identifies the user for this method: the phone for `sms` and `password`, the
    /// WeChat id (unionid or openid, per `wechat.identity`) for `wechat`.
    pub identification: String,
    /// The secret to check, if the method has one: a PHC argon2id string for `password`.
    pub access_code: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Method {
    Sms,
    Password,
    Wechat,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Sms => "sms",
            Method::Password => "password",
            Method::Wechat => "wechat",
        }
    }
}

/// What a verification code is for; a code only works for the purpose it was sent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Login,
    Register,
    ResetPassword,
    /// Proves the phone before its account is erased (POST /me/delete).
    DeleteAccount,
}

impl Purpose {
    pub const ALL: [Purpose; 4] = [
        Purpose::Login,
        Purpose::Register,
        Purpose::ResetPassword,
        Purpose::DeleteAccount,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Login => "login",
            Purpose::Register => "register",
            Purpose::ResetPassword => "reset_password",
            Purpose::DeleteAccount => "delete_account",
        }
    }
}

/// What an entry of an account's login activity records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActivityEvent {
    /// A login by any method (registrations included).
    Login,
    /// A wrong password for the account's phone.
    LoginFailed,
    Logout,
    /// A new password (reset by code): every session ended with it.
    PasswordChange,
    /// A WeChat id bound to the account (at a WeChat login, or linked from a session).
    WechatBind,
}

impl ActivityEvent {
    pub const ALL: [ActivityEvent; 5] = [
        ActivityEvent::Login,
        ActivityEvent::LoginFailed,
        ActivityEvent::Logout,
        ActivityEvent::PasswordChange,
        ActivityEvent::WechatBind,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ActivityEvent::Login => "login",
            ActivityEvent::LoginFailed => "login_failed",
            ActivityEvent::Logout => "logout",
            ActivityEvent::PasswordChange => "password_change",
            ActivityEvent::WechatBind => "wechat_bind",
        }
    }
}

/// A code that was sent and not yet used. Only its keyed hash is kept, never the digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCode {
    /// HMAC-SHA256(code key, phone | purpose | code).
    pub hash: [u8; 32],
    pub sent_at: i64,
    pub expires_at: i64,
    /// Wrong tries so far; at `code.max_attempts` the code is dead until it expires.
    pub attempts: u32,
}

/// What a persisted counter counts. Counters live in fixed windows (a UTC day, a clock
/// hour) so they outlive restarts and old windows can simply be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Codes sent to one phone in a day.
    PhoneSendsPerDay,
    /// Codes sent by the service in a day (subject "").
    SendsPerDay,
    /// Wrong codes tried for one phone in an hour.
    PhoneFailuresPerHour,
}

impl Counter {
    pub const ALL: [Counter; 3] = [
        Counter::PhoneSendsPerDay,
        Counter::SendsPerDay,
        Counter::PhoneFailuresPerHour,
    ];

    /// Length of the counter's window in seconds.
    pub fn window_secs(self) -> i64 {
        match self {
            Counter::PhoneSendsPerDay | Counter::SendsPerDay => 86_400,
            Counter::PhoneFailuresPerHour => 3_600,
        }
    }
}
