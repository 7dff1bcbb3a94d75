//! `[wechat]`: WeChat login (网站应用微信登录, or 网页授权 inside WeChat's own browser).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, err};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WechatConfig {
    /// Off: every WeChat route answers 404.
    pub enabled: bool,
    pub app_id: String,
    pub app_secret: Secret,
    /// A file holding `app_secret` (systemd's LoadCredential=, for instance).
    pub app_secret_file: PathBuf,
    pub flow: WechatFlow,
    /// The public URL of smsauth's callback, exactly as registered with WeChat.
    pub redirect_uri: String,
    pub identity: WechatIdentity,
    pub open_base_url: String,
    pub api_base_url: String,
    /// The budget of the code exchange and the user-info call together.
    pub timeout_secs: u64,
}

impl Default for WechatConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            app_id: String::new(),
            app_secret: Secret::default(),
            app_secret_file: PathBuf::new(),
            flow: WechatFlow::Qrconnect,
            redirect_uri: String::new(),
            identity: WechatIdentity::Unionid,
            open_base_url: "https://open.weixin.qq.com".into(),
            api_base_url: "https://api.weixin.qq.com".into(),
            timeout_secs: 5,
        }
    }
}

/// Which of WeChat's authorize pages the browser is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WechatFlow {
    /// A website application: the visitor scans a QR code (`snsapi_login`).
    Qrconnect,
    /// An official account's web page, opened inside WeChat (`snsapi_userinfo`).
    Oauth2,
}

/// What identifies a WeChat user to smsauth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WechatIdentity {
    /// The same for every app of one open-platform account; a user without one is refused.
    Unionid,
    /// Per app: right when the site has only this one WeChat app.
    Openid,
}

impl WechatConfig {
    pub(super) fn load_secret_file(&mut self) -> Result<(), ConfigError> {
        super::sms::read_secret_file(
            "wechat",
            "app_secret",
            &mut self.app_secret,
            &self.app_secret_file.clone(),
        )
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let key = |k: &str, why: &str| err(format!("configuration key `wechat.{k}`: {why}"));
        let url = |k: &str, v: &str| {
            if v.starts_with("http://") || v.starts_with("https://") {
                Ok(())
            } else {
                Err(key(k, "an http:// or https:// URL is required"))
            }
        };
        url("open_base_url", &self.open_base_url)?;
        url("api_base_url", &self.api_base_url)?;
        if self.timeout_secs == 0 {
            return Err(key("timeout_secs", "must be at least 1"));
        }
        if !self.enabled {
            return Ok(());
        }
        if self.app_id.trim().is_empty() {
            return Err(key("app_id", "required with wechat.enabled = true"));
        }
        if self.app_secret.is_empty() {
            return Err(key(
                "app_secret",
                "required with wechat.enabled = true (or wechat.app_secret_file)",
            ));
        }
        if self.redirect_uri.trim().is_empty() {
            return Err(key("redirect_uri", "required with wechat.enabled = true"));
        }
        url("redirect_uri", &self.redirect_uri)
    }
}
