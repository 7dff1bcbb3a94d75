//! The `[sms]` section: which provider delivers codes, with its keys, templates and
//! secrets. Kept apart from the rest of the configuration because it grows with every
//! provider and changes for different reasons.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, err};
use crate::model::Purpose;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Log,
    Webhook,
    Aliyun,
    Ronglian,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Log => "log",
            Provider::Webhook => "webhook",
            Provider::Aliyun => "aliyun",
            Provider::Ronglian => "ronglian",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmsConfig {
    pub provider: Provider,
    /// Every code is this value instead of a random one. Only with the `log` provider:
    /// it exists for load tests, and would be a master key anywhere else.
    pub fixed_code: String,
    /// Budget for one send, retries included.
    pub timeout_secs: u64,
    /// Extra attempts after a transport failure (connect error, timeout, 5xx, the
    /// gateway's account-wide throttling), within `timeout_secs`. A provider's answer
    /// about the message itself is never retried: it would only repeat.
    pub retries: u32,
    pub webhook: WebhookConfig,
    pub aliyun: AliyunConfig,
    pub ronglian: RonglianConfig,
}

impl Default for SmsConfig {
    fn default() -> Self {
        Self {
            provider: Provider::Log,
            fixed_code: String::new(),
            timeout_secs: 5,
            retries: 2,
            webhook: WebhookConfig::default(),
            aliyun: AliyunConfig::default(),
            ronglian: RonglianConfig::default(),
        }
    }
}

impl SmsConfig {
    /// Reads `*_file` secrets (systemd `LoadCredential=` hands them over as files) into
    /// their keys, so everything after start-up sees one `Secret` however it was given.
    pub(super) fn load_secret_files(&mut self) -> Result<(), ConfigError> {
        read_secret_file(
            "sms.aliyun",
            "access_key_secret",
            &mut self.aliyun.access_key_secret,
            &self.aliyun.access_key_secret_file,
        )?;
        read_secret_file(
            "sms.ronglian",
            "auth_token",
            &mut self.ronglian.auth_token,
            &self.ronglian.auth_token_file,
        )
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let key = |k: &str, why: &str| err(format!("configuration key `{k}`: {why}"));
        if self.retries > 10 {
            return Err(key("sms.retries", "must be at most 10"));
        }
        let required = |k: &str, v: &str| {
            if v.trim().is_empty() {
                Err(key(
                    k,
                    &format!(
                        "required with sms.provider = \"{}\"",
                        self.provider.as_str()
                    ),
                ))
            } else {
                Ok(())
            }
        };
        let url = |k: &str, v: &str| {
            if v.starts_with("http://") || v.starts_with("https://") {
                Ok(())
            } else {
                Err(key(k, "expected an https:// URL"))
            }
        };
        match self.provider {
            Provider::Log | Provider::Webhook => {}
            Provider::Aliyun => {
                let a = &self.aliyun;
                required("sms.aliyun.access_key_id", &a.access_key_id)?;
                if a.access_key_secret.is_empty() {
                    return Err(key(
                        "sms.aliyun.access_key_secret",
                        "required with sms.provider = \"aliyun\" (or sms.aliyun.access_key_secret_file)",
                    ));
                }
                required("sms.aliyun.sign_name", &a.sign_name)?;
                a.template_code
                    .validate("sms.aliyun.template_code", self.provider)?;
                url("sms.aliyun.endpoint", &a.endpoint)?;
                required("sms.aliyun.region", &a.region)?;
            }
            Provider::Ronglian => {
                let r = &self.ronglian;
                required("sms.ronglian.account_sid", &r.account_sid)?;
                if r.auth_token.is_empty() {
                    return Err(key(
                        "sms.ronglian.auth_token",
                        "required with sms.provider = \"ronglian\" (or sms.ronglian.auth_token_file)",
                    ));
                }
                required("sms.ronglian.app_id", &r.app_id)?;
                r.template_id
                    .validate("sms.ronglian.template_id", self.provider)?;
                url("sms.ronglian.base_url", &r.base_url)?;
            }
        }
        Ok(())
    }
}

/// `secret` from `file` when `file` is set; both set is refused, since which one wins
/// would be a guess. The error names the key and the path, never the contents.
pub(super) fn read_secret_file(
    section: &str,
    name: &str,
    secret: &mut Secret,
    file: &Path,
) -> Result<(), ConfigError> {
    if file.as_os_str().is_empty() {
        return Ok(());
    }
    if !secret.is_empty() {
        return Err(err(format!(
            "configuration keys `{section}.{name}` and `{section}.{name}_file`: set one, not both"
        )));
    }
    let text = std::fs::read_to_string(file).map_err(|e| {
        err(format!(
            "configuration key `{section}.{name}_file`: cannot read {}: {e}",
            file.display()
        ))
    })?;
    // Files written by `echo` or an editor end in a newline that is not part of the secret.
    let value = text.trim_end_matches(['\r', '\n']);
    if value.is_empty() {
        return Err(err(format!(
            "configuration key `{section}.{name}_file`: {} is empty",
            file.display()
        )));
    }
    *secret = Secret::new(value);
    Ok(())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// Key of the `X-Smsauth-Signature` HMAC, so the receiver can tell our requests apart.
    pub secret: Secret,
}

/// Alibaba Cloud SMS (dysmsapi SendSms), signed with an AccessKey pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AliyunConfig {
    pub access_key_id: String,
    pub access_key_secret: Secret,
    /// A file holding `access_key_secret`, instead of writing it here.
    pub access_key_secret_file: PathBuf,
    /// The approved signature (签名) shown in front of each message.
    pub sign_name: String,
    pub template_code: Templates,
    pub endpoint: String,
    pub region: String,
}

impl Default for AliyunConfig {
    fn default() -> Self {
        Self {
            access_key_id: String::new(),
            access_key_secret: Secret::default(),
            access_key_secret_file: PathBuf::new(),
            sign_name: String::new(),
            template_code: Templates::default(),
            endpoint: "https://dysmsapi.aliyuncs.com/".into(),
            region: "cn-hangzhou".into(),
        }
    }
}

/// Ronglian Cloud (容联云通讯, cloopen) template SMS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RonglianConfig {
    pub account_sid: String,
    pub auth_token: Secret,
    /// A file holding `auth_token`, instead of writing it here.
    pub auth_token_file: PathBuf,
    pub app_id: String,
    pub template_id: Templates,
    pub base_url: String,
}

impl Default for RonglianConfig {
    fn default() -> Self {
        Self {
            account_sid: String::new(),
            auth_token: Secret::default(),
            auth_token_file: PathBuf::new(),
            app_id: String::new(),
            template_id: Templates::default(),
            base_url: "https://app.cloopen.com:8883".into(),
        }
    }
}

/// A provider template: one for every purpose, or one per purpose, since providers
/// approve each wording separately and a site may word a registration differently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Templates {
    All(String),
    PerPurpose(PurposeTemplates),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PurposeTemplates {
    pub login: String,
    pub register: String,
    pub reset_password: String,
    /// Optional: without it, account deletion codes go out with the `login` template.
    pub delete_account: String,
}

impl Default for Templates {
    fn default() -> Self {
        Templates::All(String::new())
    }
}

impl Templates {
    pub fn get(&self, purpose: Purpose) -> &str {
        match self {
            Templates::All(t) => t,
            Templates::PerPurpose(p) => match purpose {
                Purpose::Login => &p.login,
                Purpose::Register => &p.register,
                Purpose::ResetPassword => &p.reset_password,
                Purpose::DeleteAccount if p.delete_account.trim().is_empty() => &p.login,
                Purpose::DeleteAccount => &p.delete_account,
            },
        }
    }

    /// Every purpose needs a template: a code that cannot be sent is a failure at the
    /// worst moment (a user resetting a password), so it is refused at start instead.
    fn validate(&self, key: &str, provider: Provider) -> Result<(), ConfigError> {
        for purpose in Purpose::ALL {
            if self.get(purpose).trim().is_empty() {
                let key = match self {
                    Templates::All(_) => key.to_owned(),
                    Templates::PerPurpose(_) => format!("{key}.{}", purpose.as_str()),
                };
                return Err(err(format!(
                    "configuration key `{key}`: required with sms.provider = \"{}\" (one template, or a table with login, register and reset_password)",
                    provider.as_str()
                )));
            }
        }
        Ok(())
    }
}
