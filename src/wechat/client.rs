//! WeChat's side of the login: the authorize URL the browser is sent to, then the code
//! exchanged for an access token and the user's profile (WeChat's 网站应用微信登录 and
//! 网页授权 documents: `/sns/oauth2/access_token` and `/sns/userinfo`).
//!
//! The app secret travels in the query string of the exchange, so no URL of these calls
//! ever reaches a log: reqwest's own lines are off (see `logging`), and its errors are
//! taken without their URL. WeChat's access and refresh tokens are used for the one
//! user-info call and dropped; they are never stored.

use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use super::{WechatError, WechatProfile};
use crate::config::{WechatConfig, WechatFlow, WechatIdentity};

/// RFC 3986 unreserved characters stay; everything else in a query value is encoded.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode(value: &str) -> percent_encoding::PercentEncode<'_> {
    utf8_percent_encode(value, QUERY_VALUE)
}

/// WeChat's `errcode`s that smsauth tells apart.
const BUSY: i64 = -1;
const INVALID_CODE: i64 = 40029;
const CODE_USED: i64 = 40163;
const CODE_EXPIRED: i64 = 42003;
const INVALID_APPID: i64 = 40013;
const INVALID_SECRET: i64 = 40125;

pub struct WechatClient {
    http: reqwest::Client,
    cfg: WechatConfig,
}

/// Every answer of WeChat's API: the fields of a success, or `errcode` and `errmsg`.
/// WeChat sends JSON as `text/plain`, so the body is parsed whatever its type says.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    errcode: i64,
    #[serde(default)]
    errmsg: String,
    access_token: Option<String>,
    openid: Option<String>,
    unionid: Option<String>,
    nickname: Option<String>,
    headimgurl: Option<String>,
}

impl WechatClient {
    pub fn new(cfg: &WechatConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            // WeChat's API never redirects; a redirect would be someone else's answer.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(WechatClient {
            http,
            cfg: cfg.clone(),
        })
    }

    /// Where the browser goes to scan (or, inside WeChat, to agree).
    pub fn authorize_url(&self, state: &str) -> String {
        let (path, scope) = match self.cfg.flow {
            WechatFlow::Qrconnect => ("/connect/qrconnect", "snsapi_login"),
            WechatFlow::Oauth2 => ("/connect/oauth2/authorize", "snsapi_userinfo"),
        };
        format!(
            "{}{path}?appid={}&redirect_uri={}&response_type=code&scope={scope}&state={}#wechat_redirect",
            self.cfg.open_base_url.trim_end_matches('/'),
            encode(&self.cfg.app_id),
            encode(&self.cfg.redirect_uri),
            encode(state),
        )
    }

    /// The WeChat user behind an authorization `code`: the code exchanged, then the
    /// profile read, both within `timeout_secs`.
    pub async fn user_for_code(&self, code: &str) -> Result<WechatProfile, WechatError> {
        let budget = Duration::from_secs(self.cfg.timeout_secs);
        match tokio::time::timeout(budget, self.exchange_and_read(code)).await {
            Ok(result) => result,
            Err(_) => Err(WechatError::Failed(format!(
                "WeChat did not answer within wechat.timeout_secs = {}",
                self.cfg.timeout_secs
            ))),
        }
    }

    async fn exchange_and_read(&self, code: &str) -> Result<WechatProfile, WechatError> {
        let api = self.cfg.api_base_url.trim_end_matches('/');
        let exchange = format!(
            "{api}/sns/oauth2/access_token?appid={}&secret={}&code={}&grant_type=authorization_code",
            encode(&self.cfg.app_id),
            encode(self.cfg.app_secret.expose()),
            encode(code),
        );
        let token = self.call(&exchange, "access_token").await?;
        let (Some(access_token), Some(openid)) = (token.access_token, token.openid) else {
            return Err(WechatError::Failed(
                "WeChat's access_token answer had no access_token or openid".into(),
            ));
        };
        let info_url = format!(
            "{api}/sns/userinfo?access_token={}&openid={}&lang=zh_CN",
            encode(&access_token),
            encode(&openid),
        );
        let info = self.call(&info_url, "userinfo").await?;
        drop(access_token); // used for this one call, never kept
        let unionid = info.unionid.or(token.unionid);
        let id = match self.cfg.identity {
            WechatIdentity::Openid => openid,
            WechatIdentity::Unionid => unionid.ok_or(WechatError::Config(
                "WeChat gave no unionid: bind the app to an open platform account, or set wechat.identity = \"openid\"",
            ))?,
        };
        Ok(WechatProfile {
            id,
            nickname: info.nickname.unwrap_or_default(),
            avatar_url: info
                .headimgurl
                .filter(|u| u.starts_with("https://") || u.starts_with("http://")),
        })
    }

    /// One GET of WeChat's API, tried once more when WeChat says it is busy (-1).
    async fn call(&self, url: &str, what: &'static str) -> Result<Answer, WechatError> {
        let mut busy = false;
        loop {
            let answer = self.get(url, what).await?;
            match answer.errcode {
                0 => return Ok(answer),
                BUSY if !busy => busy = true,
                BUSY => {
                    return Err(WechatError::Failed(format!(
                        "WeChat's {what} was busy twice (-1)"
                    )));
                }
                INVALID_CODE | CODE_USED | CODE_EXPIRED => {
                    return Err(WechatError::CodeInvalid(answer.errcode));
                }
                INVALID_APPID => {
                    return Err(WechatError::Config("WeChat refused wechat.app_id (40013)"));
                }
                INVALID_SECRET => {
                    return Err(WechatError::Config(
                        "WeChat refused wechat.app_secret (40125)",
                    ));
                }
                other => {
                    return Err(WechatError::Failed(format!(
                        "WeChat's {what} answered {other}: {}",
                        short(&answer.errmsg)
                    )));
                }
            }
        }
    }

    async fn get(&self, url: &str, what: &'static str) -> Result<Answer, WechatError> {
        let fail = |e: reqwest::Error| {
            WechatError::Failed(format!("WeChat's {what}: {}", e.without_url()))
        };
        let resp = self.http.get(url).send().await.map_err(fail)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(fail)?;
        if !status.is_success() {
            return Err(WechatError::Failed(format!(
                "WeChat's {what} answered HTTP {status}"
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|e| WechatError::Failed(format!("WeChat's {what} answer is not JSON: {e}")))
    }
}

/// WeChat's `errmsg`, cut to one short line: it ends with a request id and a hint, and
/// is only ever for the log.
fn short(message: &str) -> String {
    message
        .chars()
        .take(120)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn client(flow: WechatFlow) -> WechatClient {
        let cfg = WechatConfig {
            enabled: true,
            app_id: "wx0123456789abcdef".into(),
            app_secret: Secret::new("s"),
            redirect_uri: "https://login.example.com/api/v1/auth/wechat/callback".into(),
            flow,
            ..WechatConfig::default()
        };
        WechatClient::new(&cfg).unwrap()
    }

    #[test]
    fn authorize_urls_follow_wechats_documents() {
        assert_eq!(
            client(WechatFlow::Qrconnect).authorize_url("abc123"),
            "https://open.weixin.qq.com/connect/qrconnect?appid=wx0123456789abcdef\
             &redirect_uri=https%3A%2F%2Flogin.example.com%2Fapi%2Fv1%2Fauth%2Fwechat%2Fcallback\
             &response_type=code&scope=snsapi_login&state=abc123#wechat_redirect"
        );
        let oauth2 = client(WechatFlow::Oauth2).authorize_url("abc123");
        assert!(oauth2.starts_with("https://open.weixin.qq.com/connect/oauth2/authorize?"));
        assert!(oauth2.contains("&scope=snsapi_userinfo&"));
    }
}
