//! Operator actions: `smsauth user ...`, `smsauth backup`, `smsauth restore`.
//!
//! Each action is implemented once, here, on a [`Store`]. The command line runs it on the
//! store directly when no server holds the data dir; when one does (sled allows one
//! process per data dir), the command asks the running server to run the same function
//! through its local admin socket ([`socket`]). [`command`] is that command-line side.

pub mod backup;
pub mod command;
pub mod socket;

use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;
use crate::model::User;
use crate::phone::PhoneParser;
use crate::store::{Store, StoreError, UserChange};

/// One user action, as the command line names it and the admin socket carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Every user; phones masked unless `full`.
    List {
        #[serde(default)]
        full: bool,
    },
    Show {
        phone: String,
    },
    Disable {
        phone: String,
    },
    Enable {
        phone: String,
    },
    Delete {
        phone: String,
    },
    Logout {
        phone: String,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::List { .. } => "list",
            Op::Show { .. } => "show",
            Op::Disable { .. } => "disable",
            Op::Enable { .. } => "enable",
            Op::Delete { .. } => "delete",
            Op::Logout { .. } => "logout",
        }
    }

    fn phone(&self) -> Option<&str> {
        match self {
            Op::List { .. } => None,
            Op::Show { phone }
            | Op::Disable { phone }
            | Op::Enable { phone }
            | Op::Delete { phone }
            | Op::Logout { phone } => Some(phone),
        }
    }
}

/// A user as an operator sees it. Never a secret: login methods show how, not with what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// The stored record itself (it holds no secret); flattened, so the socket's JSON
    /// lists its fields beside `login_methods`.
    #[serde(flatten)]
    pub user: User,
    /// Filled by `show` only (the list would pay one scan per user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_methods: Option<Vec<MethodInfo>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodInfo {
    pub method: String,
    pub identification: String,
}

impl From<&User> for UserInfo {
    fn from(u: &User) -> Self {
        UserInfo {
            user: u.clone(),
            login_methods: None,
        }
    }
}

/// What an action answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    Users {
        users: Vec<UserInfo>,
    },
    User {
        user: UserInfo,
    },
    /// A change was made (or was already in place: `changed` false).
    Done {
        user: UserInfo,
        done: String,
        changed: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("not a valid phone number: {0:?}")]
    InvalidPhone(String),
    #[error("no such user: {0}")]
    NoSuchUser(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AdminError {
    /// Stable name, carried over the admin socket.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::InvalidPhone(_) => "invalid_phone",
            AdminError::NoSuchUser(_) => "no_such_user",
            AdminError::Store(_) => "internal",
        }
    }
}

/// Runs one user action and makes its change durable before answering.
pub async fn execute(store: &Store, phones: &PhoneParser, op: &Op) -> Result<Answer, AdminError> {
    let Some(input) = op.phone() else {
        let full = matches!(op, Op::List { full: true });
        let users = store
            .users
            .users()
            .await?
            .into_iter()
            .map(|mut user| {
                if !full {
                    user.phone = crate::phone::mask(&user.phone);
                }
                UserInfo::from(&user)
            })
            .collect();
        return Ok(Answer::Users { users });
    };
    let phone = phones
        .parse(input)
        .ok_or_else(|| AdminError::InvalidPhone(input.to_owned()))?;
    let phone = crate::phone::IndexedPhone::new(phone, &store.phones);
    let user = store
        .users
        .find_by_phone(&phone)
        .await?
        .ok_or_else(|| AdminError::NoSuchUser(phone.to_string()))?;
    let set_disabled = async |to: bool| -> Result<Answer, AdminError> {
        let changed = user.disabled != to;
        let user = store
            .users
            .update_user(user.id, UserChange::Disabled(to))
            .await?
            .ok_or_else(|| AdminError::NoSuchUser(phone.to_string()))?;
        let done = if to { "disabled" } else { "enabled" };
        Ok(Answer::Done {
            user: (&user).into(),
            done: done.into(),
            changed,
        })
    };
    let answer = match op {
        Op::List { .. } => unreachable!("handled above"),
        Op::Show { .. } => {
            let mut info = UserInfo::from(&user);
            let mut methods: Vec<MethodInfo> = store
                .users
                .login_methods(&user)
                .await?
                .into_iter()
                .map(|m| MethodInfo {
                    method: m.method.as_str().into(),
                    // A WeChat id is the key to an account's WeChat login elsewhere too:
                    // the operator sees enough to tell two apart, not the whole id.
                    identification: match m.method {
                        crate::model::Method::Wechat => crate::wechat::mask_id(&m.identification),
                        _ => m.identification,
                    },
                })
                .collect();
            methods.sort_by(|a, b| a.method.cmp(&b.method));
            info.login_methods = Some(methods);
            return Ok(Answer::User { user: info });
        }
        Op::Disable { .. } => set_disabled(true).await?,
        Op::Enable { .. } => set_disabled(false).await?,
        Op::Logout { .. } => {
            // Every session token carries the generation it was issued under; a bump
            // makes all of them stale at once (authenticate() compares).
            let user = store
                .users
                .update_user(user.id, UserChange::EndSessions)
                .await?
                .ok_or_else(|| AdminError::NoSuchUser(phone.to_string()))?;
            Answer::Done {
                user: (&user).into(),
                done: "logged out of every session".into(),
                changed: true,
            }
        }
        Op::Delete { .. } => {
            let user = store
                .users
                .delete_user(user.id)
                .await?
                .ok_or_else(|| AdminError::NoSuchUser(phone.to_string()))?;
            Answer::Done {
                user: (&user).into(),
                done: "deleted".into(),
                changed: true,
            }
        }
    };
    store.engine.flush().await?;
    Ok(answer)
}

/// The answer as the command line prints it: a tab-separated table for `list` (header
/// first, so `column -t -s $'\t'` lines it up), `key: value` lines for `show`.
pub fn render(answer: &Answer) -> String {
    let when = |t: Option<i64>| t.map(rfc3339).unwrap_or_else(|| "never".into());
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    match answer {
        Answer::Users { users } => {
            let mut out = String::from("id\tphone\tnickname\tcreated\tlast_login\tdisabled\n");
            for UserInfo { user: u, .. } in users {
                out.push_str(&format!(
                    "{}\t{}\t{}\t{}\t{}\t{}\n",
                    u.id,
                    u.phone,
                    u.nickname.replace(['\t', '\n'], " "),
                    rfc3339(u.created_at),
                    when(u.last_login_at),
                    yes_no(u.disabled)
                ));
            }
            out
        }
        Answer::User { user: info } => {
            let u = &info.user;
            let mut out = format!(
                "id:            {}\nphone:         {}\nnickname:      {}\ncreated:       {}\nlast login:    {}\ndisabled:      {}\nsession gen:   {}\nlogin methods:",
                u.id,
                u.phone,
                u.nickname,
                rfc3339(u.created_at),
                when(u.last_login_at),
                yes_no(u.disabled),
                u.session_gen,
            );
            let methods = info.login_methods.as_deref().unwrap_or_default();
            if methods.is_empty() {
                out.push_str(" none");
            }
            for m in methods {
                out.push_str(&format!(" {} ({})", m.method, m.identification));
            }
            out.push('\n');
            out
        }
        Answer::Done {
            user,
            done,
            changed,
        } => {
            let already = if *changed { "" } else { "already " };
            format!(
                "user {} ({}) {already}{done}\n",
                user.user.id, user.user.phone
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_travel_as_tagged_json() {
        let op = Op::Disable {
            phone: "13812345678".into(),
        };
        let json = serde_json::to_string(&op).unwrap();
        assert_eq!(json, r#"{"op":"disable","phone":"13812345678"}"#);
        assert_eq!(serde_json::from_str::<Op>(&json).unwrap(), op);
        assert_eq!(
            serde_json::from_str::<Op>(r#"{"op":"list"}"#).unwrap(),
            Op::List { full: false }
        );
    }

    #[test]
    fn a_user_travels_the_socket_as_flat_json() {
        let user = User {
            id: 3,
            phone: "+8613812345678".into(),
            nickname: "n".into(),
            created_at: 1,
            last_login_at: Some(2),
            disabled: false,
            session_gen: 4,
            avatar_url: None,
        };
        let answer = Answer::User {
            user: UserInfo {
                user: user.clone(),
                login_methods: Some(vec![]),
            },
        };
        let json = serde_json::to_value(&answer).unwrap();
        assert_eq!(json["user"]["phone"], "+8613812345678");
        assert_eq!(json["user"]["session_gen"], 4);
        assert_eq!(json["user"]["login_methods"], serde_json::json!([]));
        assert_eq!(serde_json::from_value::<Answer>(json).unwrap(), answer);
    }

    #[test]
    fn list_renders_one_line_per_user_with_a_header() {
        let u = UserInfo {
            user: User {
                id: 7,
                phone: "+8613812345678".into(),
                nickname: "a\tb".into(),
                created_at: 0,
                last_login_at: None,
                disabled: true,
                session_gen: 0,
                avatar_url: None,
            },
            login_methods: None,
        };
        let text = render(&Answer::Users { users: vec![u] });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[1],
            "7\t+8613812345678\ta b\t1970-01-01T00:00:00Z\tnever\tyes"
        );
    }
}
