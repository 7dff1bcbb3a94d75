//! Configuration: embedded defaults, then the TOML file, then `SMSAUTH_SECTION__KEY`
//! environment variables, then validation. Anything wrong stops start-up with a message
//! that names the key, variable or file (the binary exits with status 2).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod memory;
mod privacy;
mod sms;
mod wechat;

pub use memory::MemoryConfig;
pub use privacy::PrivacyConfig;
pub use sms::{
    AliyunConfig, Provider, PurposeTemplates, RonglianConfig, SmsConfig, Templates, WebhookConfig,
};
pub use wechat::{WechatConfig, WechatFlow, WechatIdentity};

/// Moves keys given under a former name ([`Config::FORMER_KEYS`]) to their new one; the
/// warnings to log. Both names at once is an error: which one was meant?
fn rename_former_keys(table: &mut toml::Table) -> Result<Vec<String>, ConfigError> {
    let mut warnings = Vec::new();
    for (section, former, new) in Config::FORMER_KEYS {
        let Some(toml::Value::Table(t)) = table.get_mut(*section) else {
            continue;
        };
        let Some(value) = t.remove(*former) else {
            continue;
        };
        if t.contains_key(*new) {
            return Err(err(format!(
                "configuration key `{section}.{former}` is the former name of `{section}.{new}`; give only `{section}.{new}`"
            )));
        }
        t.insert((*new).to_owned(), value);
        warnings.push(format!(
            "configuration key `{section}.{former}` is now called `{section}.{new}`; the old name still works for now"
        ));
    }
    Ok(warnings)
}

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "SMSAUTH_";
/// The one `SMSAUTH_` variable that is not a key: the config file's path.
pub const ENV_CONFIG_FILE: &str = "SMSAUTH_CONFIG";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub token: TokenConfig,
    pub code: CodeConfig,
    pub phone: PhoneConfig,
    pub sms: SmsConfig,
    pub password: PasswordConfig,
    pub captcha: CaptchaConfig,
    pub limits: LimitsConfig,
    pub memory: MemoryConfig,
    pub privacy: PrivacyConfig,
    pub wechat: WechatConfig,
    pub log: LogConfig,
    /// What start-up should warn about: keys read under a former name.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port (tests use it).
    pub listen: String,
    /// Take the client address from X-Real-IP / X-Forwarded-For. Only behind a proxy
    /// that sets them, or any client could pick its own address.
    pub trust_proxy: bool,
    /// Largest request body accepted; larger ones get 413 before they are read.
    pub max_body_bytes: usize,
    /// Seconds between housekeeping passes: expired codes, revocations and grants swept,
    /// retired signing keys dropped, and the signing key set read again from the store (so
    /// an instance signs with a key another instance rotated in within this time).
    pub housekeeping_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            trust_proxy: false,
            max_body_bytes: 16 * 1024,
            housekeeping_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// The instance's own directory: sled's files with the sled engine, the admin socket
    /// with either.
    pub data_dir: PathBuf,
    /// sled's page cache. sled's own default is 1 GiB, far more than a small site needs.
    pub cache_capacity_mb: u64,
    pub engine: StorageEngine,
    pub postgres: PostgresConfig,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            cache_capacity_mb: 8,
            engine: StorageEngine::Sled,
            postgres: PostgresConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageEngine {
    /// Embedded, one process per data dir (the default).
    Sled,
    /// A PostgreSQL database shared by any number of instances.
    Postgres,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`; a secret (it may hold a password).
    pub url: Secret,
    /// A file holding the URL instead (systemd's LoadCredential=, for instance).
    pub url_file: PathBuf,
    /// Connections each instance keeps at most.
    pub pool_size: usize,
    /// How long a start waits for the database to answer before it gives up.
    pub connect_timeout_secs: u64,
    /// The longest one statement may run; past it the request answers 503.
    pub statement_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://smsauth@127.0.0.1:5432/smsauth"),
            url_file: PathBuf::new(),
            pool_size: 16,
            connect_timeout_secs: 30,
            statement_timeout_ms: 2000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// How tokens are signed. Unset: as the store's current key does, and ES256 for a new
    /// store (HS256 for one that already has an HS256 key, or with `secret` set).
    pub algorithm: TokenAlgorithm,
    /// HS256 key. Empty: a random one is made on first start and kept in data_dir.
    pub secret: Secret,
    /// Access token lifetime (`ttl_secs` before refresh tokens came; still read under
    /// that name, with a warning at start).
    pub access_ttl_secs: u64,
    /// How long a refresh token stays usable; each refresh hands out a new one.
    pub refresh_ttl_secs: u64,
    /// A used refresh token presented again within this many seconds gets the same
    /// successor (two tabs refreshing at once); later it counts as stolen and ends the
    /// session.
    pub refresh_reuse_interval_secs: u64,
    pub issuer: String,
    /// Also hand the session to browsers as a cookie (HttpOnly, SameSite=Lax), which the
    /// nginx `auth_request` check reads; state-changing requests authenticated by it must
    /// come from the same origin.
    pub cookie: bool,
    pub cookie_name: String,
    /// Empty: the cookie belongs to the exact host that set it.
    pub cookie_domain: String,
    /// Send the cookie over HTTPS only. Browsers treat http://localhost as secure too.
    pub cookie_secure: bool,
}

/// `token.algorithm`. The names are the JWT `alg` values, which clients depend on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenAlgorithm {
    /// Not set: keep the store's current algorithm; ES256 for a new store.
    #[default]
    #[serde(rename = "")]
    Unset,
    /// ECDSA on P-256 with SHA-256: public keys in the JWKS.
    ES256,
    /// Ed25519: public keys in the JWKS.
    EdDSA,
    /// HMAC-SHA-256 with a shared secret, never published.
    HS256,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            algorithm: TokenAlgorithm::Unset,
            secret: Secret::default(),
            access_ttl_secs: 3600,
            refresh_ttl_secs: 2_592_000,
            refresh_reuse_interval_secs: 10,
            issuer: "smsauth".into(),
            cookie: false,
            cookie_name: "smsauth_session".into(),
            cookie_domain: String::new(),
            cookie_secure: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CodeConfig {
    pub length: u32,
    pub ttl_secs: u64,
    pub resend_interval_secs: u64,
    pub max_attempts: u32,
}

impl Default for CodeConfig {
    fn default() -> Self {
        Self {
            length: 6,
            ttl_secs: 300,
            resend_interval_secs: 60,
            max_attempts: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhoneConfig {
    /// Regular expression a national number must match (ASCII digits only are ever accepted).
    pub pattern: String,
    /// Country calling code, without "+"; numbers are stored as "+<country_code><national>".
    pub country_code: String,
}

impl Default for PhoneConfig {
    fn default() -> Self {
        Self {
            pattern: r"^1[3-9]\d{9}$".into(),
            country_code: "86".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PasswordConfig {
    /// argon2id memory cost in KiB; with `iterations` and `parallelism`, OWASP's minimum.
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// Hashes computed at once; 0 means one per CPU core but one (at least one), so
    /// hashing never takes every core from the requests that do not hash.
    pub max_concurrent_hashes: usize,
    /// Requests that may wait for a hashing slot; past that, 429 at once.
    pub max_queued_hashes: usize,
}

impl Default for PasswordConfig {
    fn default() -> Self {
        Self {
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
            max_concurrent_hashes: 0,
            max_queued_hashes: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptchaConfig {
    /// POST /sms/code needs a solved image captcha.
    pub required: bool,
    pub ttl_secs: u64,
    /// Characters per captcha, 4 to 6.
    pub length: u32,
}

impl Default for CaptchaConfig {
    fn default() -> Self {
        Self {
            required: false,
            ttl_secs: 300,
            length: 5,
        }
    }
}

/// Abuse limits; 0 turns a limit off. Per-phone limits are keyed by the E.164 number.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Codes sent to one phone per UTC day (persisted).
    pub phone_per_day: u64,
    /// Codes requested from one client address per hour (GCRA: burst, then steady).
    pub ip_per_hour: u32,
    /// Codes sent by the whole service per UTC day (persisted): a ceiling on the SMS bill.
    pub global_per_day: u64,
    /// Code and password checks from one client address per minute.
    pub verify_per_ip_per_minute: u32,
    /// Captchas made for one client address per minute.
    pub captcha_per_ip_per_minute: u32,
    /// Wrong codes for one phone per clock hour before it is locked for the rest of that
    /// hour, whatever code it holds (persisted).
    pub phone_failures_per_hour: u64,
    /// Client addresses tracked per in-memory limiter; past it, idle ones are dropped
    /// (and, if all are busy, all of them), so a flood cannot grow memory without bound.
    pub max_tracked_ips: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            phone_per_day: 10,
            ip_per_hour: 20,
            global_per_day: 10_000,
            verify_per_ip_per_minute: 60,
            captcha_per_ip_per_minute: 30,
            phone_failures_per_hour: 20,
            max_tracked_ips: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as "info" or "smsauth=debug"; RUST_LOG wins when set.
    pub level: String,
    /// One line per request (at info). Off for a site whose nginx logs every request.
    pub requests: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            requests: true,
        }
    }
}

/// A configuration string that must never reach a log: `Debug` prints only whether it is
/// set, and so does `Serialize` (`smsauth config check` prints the configuration).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

/// What a set secret shows as wherever the configuration is printed.
pub const MASKED: &str = "********";

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { MASKED })
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "<set>" })
    }
}

/// Why the configuration was refused; the text names the key, variable or file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

impl Config {
    /// Defaults, overlaid by `file` (if any) and by `SMSAUTH_*` variables from `env`, then validated.
    /// The keys' former names, each read as its new one (a warning at start says so):
    /// (table, former, new).
    pub const FORMER_KEYS: &[(&'static str, &'static str, &'static str)] =
        &[("token", "ttl_secs", "access_ttl_secs")];

    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            None => toml::Table::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err(format!("cannot read config file {}: {e}", path.display())))?;
                text.parse::<toml::Table>()
                    .map_err(|e| err(format!("config file {}: {e}", path.display())))?
            }
        };
        apply_env(&mut table, env)?;
        let warnings = rename_former_keys(&mut table)?;
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let path = e.path().to_string();
                if path == "." {
                    err(format!("configuration: {}", e.inner()))
                } else {
                    err(format!("configuration key `{path}`: {}", e.inner()))
                }
            })?;
        config.warnings = warnings;
        config.sms.load_secret_files()?;
        config.wechat.load_secret_file()?;
        if !config.storage.postgres.url_file.as_os_str().is_empty() {
            // The file replaces the default URL; only an explicit `url` conflicts with it.
            let explicit = std::mem::take(&mut config.storage.postgres.url);
            let default = PostgresConfig::default().url;
            if explicit != default {
                config.storage.postgres.url = explicit;
            }
            sms::read_secret_file(
                "storage.postgres",
                "url",
                &mut config.storage.postgres.url,
                &config.storage.postgres.url_file.clone(),
            )?;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        // validate() has parsed it already.
        self.server
            .listen
            .parse()
            .expect("validated listen address")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let key = |k: &str, why: &str| err(format!("configuration key `{k}`: {why}"));
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return Err(key(
                "server.listen",
                "expected an address like 127.0.0.1:8080",
            ));
        }
        if self.server.max_body_bytes < 256 {
            return Err(key("server.max_body_bytes", "must be at least 256"));
        }
        if self.storage.cache_capacity_mb == 0 {
            return Err(key("storage.cache_capacity_mb", "must be at least 1"));
        }
        self.memory.validate()?;
        if self.storage.engine == StorageEngine::Postgres
            && self.privacy.phone_key_file.as_os_str().is_empty()
        {
            return Err(key(
                "privacy.phone_key_file",
                "required with storage.engine = \"postgres\": the phone key is never kept in \
                 the database, so every instance reads it from this file (32 random bytes, \
                 e.g. `head -c 32 /dev/urandom | base64 > /etc/smsauth/phone.key`)",
            ));
        }
        let pg = &self.storage.postgres;
        if pg.pool_size == 0 {
            return Err(key("storage.postgres.pool_size", "must be at least 1"));
        }
        if pg.statement_timeout_ms == 0 {
            return Err(key(
                "storage.postgres.statement_timeout_ms",
                "must be at least 1",
            ));
        }
        let secret_len = self.token.secret.expose().len();
        if secret_len != 0 && secret_len < 32 {
            return Err(key(
                "token.secret",
                "must be empty (generated) or at least 32 characters",
            ));
        }
        if self.token.access_ttl_secs == 0 {
            return Err(key("token.access_ttl_secs", "must be at least 1"));
        }
        if self.token.refresh_ttl_secs == 0 {
            return Err(key("token.refresh_ttl_secs", "must be at least 1"));
        }
        if self.server.housekeeping_secs == 0 {
            return Err(key("server.housekeeping_secs", "must be at least 1"));
        }
        if self.privacy.activity_retention_days == 0 {
            return Err(key("privacy.activity_retention_days", "must be at least 1"));
        }
        let cookie_safe = |v: &str| {
            v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if self.token.cookie_name.is_empty() || !cookie_safe(&self.token.cookie_name) {
            return Err(key(
                "token.cookie_name",
                "letters, digits, '-', '_' and '.' only",
            ));
        }
        if !cookie_safe(&self.token.cookie_domain) {
            return Err(key(
                "token.cookie_domain",
                "a domain name like \"example.com\", or empty",
            ));
        }
        if self.token.issuer.is_empty() {
            return Err(key("token.issuer", "must not be empty"));
        }
        if !(4..=10).contains(&self.code.length) {
            return Err(key("code.length", "must be between 4 and 10"));
        }
        if self.code.ttl_secs == 0 {
            return Err(key("code.ttl_secs", "must be at least 1"));
        }
        if self.code.max_attempts == 0 {
            return Err(key("code.max_attempts", "must be at least 1"));
        }
        if let Err(e) = regex::Regex::new(&self.phone.pattern) {
            return Err(key(
                "phone.pattern",
                &format!("not a valid regular expression: {e}"),
            ));
        }
        let cc = &self.phone.country_code;
        if cc.is_empty()
            || cc.len() > 3
            || !cc.bytes().all(|b| b.is_ascii_digit())
            || cc.starts_with('0')
        {
            return Err(key(
                "phone.country_code",
                "expected 1 to 3 digits without \"+\", like \"86\"",
            ));
        }
        if !self.sms.fixed_code.is_empty() {
            if self.sms.provider != Provider::Log {
                return Err(key(
                    "sms.fixed_code",
                    "only allowed with sms.provider = \"log\" (it is for load tests)",
                ));
            }
            let code = &self.sms.fixed_code;
            if code.len() != self.code.length as usize || !code.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(key("sms.fixed_code", "must be code.length ASCII digits"));
            }
        }
        if self.sms.timeout_secs == 0 {
            return Err(key("sms.timeout_secs", "must be at least 1"));
        }
        self.sms.validate()?;
        self.wechat.validate()?;
        if self.sms.provider == Provider::Webhook {
            let url = &self.sms.webhook.url;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(key(
                    "sms.webhook.url",
                    "an http:// or https:// URL is required with the webhook provider",
                ));
            }
            if self.sms.webhook.secret.is_empty() {
                return Err(key(
                    "sms.webhook.secret",
                    "required with the webhook provider",
                ));
            }
        }
        if !(4..=6).contains(&self.captcha.length) {
            return Err(key("captcha.length", "must be between 4 and 6"));
        }
        if self.captcha.ttl_secs == 0 {
            return Err(key("captcha.ttl_secs", "must be at least 1"));
        }
        if self.limits.max_tracked_ips < 100 {
            return Err(key("limits.max_tracked_ips", "must be at least 100"));
        }
        let pw = &self.password;
        if argon2::Params::new(pw.memory_kib, pw.iterations, pw.parallelism, None).is_err() {
            return Err(key(
                "password.memory_kib",
                "argon2 refuses these parameters (memory_kib >= 8 * parallelism, iterations >= 1, parallelism >= 1)",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(key(
                "log.level",
                "not a valid filter such as \"info\" or \"smsauth=debug\"",
            ));
        }
        Ok(())
    }
}

/// Overlays `SMSAUTH_SECTION__KEY=value` variables onto the parsed file. A value is typed
/// by the key's default (so `SMSAUTH_SMS__FIXED_CODE=123456` stays a string); keys with no
/// default are parsed as a TOML value, or kept as a string.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Value::try_from(Config::default()).expect("defaults serialize");
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != ENV_CONFIG_FILE)
        .collect();
    vars.sort(); // deterministic when two variables name the same key
    let vars_set: std::collections::HashSet<String> = vars.iter().map(|(k, _)| k.clone()).collect();
    for (name, raw) in vars {
        let rest = &name[ENV_PREFIX.len()..];
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
            return Err(err(format!(
                "environment variable {name}: not a configuration key (expected {ENV_PREFIX}SECTION__KEY, e.g. SMSAUTH_SERVER__LISTEN)"
            )));
        }
        let lookup = |path: &[String]| {
            let mut node = Some(&defaults);
            for p in path {
                node = node.and_then(|d| d.get(p));
            }
            node
        };
        let mut default = lookup(&path);
        let mut raw = raw;
        let mut path = path;
        // SMSAUTH_SECTION__KEY_FILE=/path: the key's value is that file's content (a
        // secret from systemd's LoadCredential=, for instance), trailing newline dropped.
        if default.is_none() {
            let last = path.last().expect("at least two parts");
            if let Some(key) = last.strip_suffix("_file") {
                let mut target = path.clone();
                *target.last_mut().expect("at least two parts") = key.to_owned();
                if let Some(d) = lookup(&target) {
                    let direct = name.strip_suffix("_FILE").unwrap_or(&name);
                    if vars_set.contains(direct) {
                        return Err(err(format!("set {direct} or {name}, not both")));
                    }
                    raw = std::fs::read_to_string(&raw)
                        .map_err(|e| {
                            err(format!(
                                "environment variable {name}: cannot read {raw}: {e}"
                            ))
                        })?
                        .trim_end_matches(['\n', '\r'])
                        .to_owned();
                    default = Some(d);
                    path = target;
                }
            }
        }
        let value = match default {
            Some(toml::Value::String(_)) => toml::Value::String(raw),
            Some(_) | None => parse_toml_value(&raw).unwrap_or(toml::Value::String(raw)),
        };
        let (last, sections) = path.split_last().expect("at least two parts");
        let mut node = &mut *table;
        for section in sections {
            let entry = node
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = entry.as_table_mut().ok_or_else(|| {
                err(format!(
                    "environment variable {name}: `{section}` is not a section"
                ))
            })?;
        }
        node.insert(last.clone(), value);
    }
    Ok(())
}

fn parse_toml_value(raw: &str) -> Option<toml::Value> {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()?
        .remove("v")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Purpose;

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, []).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.code.length, 6);
        assert_eq!(c.sms.provider, Provider::Log);
    }

    #[test]
    fn env_overrides_file_and_is_typed_by_default() {
        let c = load_str(
            "[server]\nlisten = \"127.0.0.1:9000\"\n",
            &[
                ("SMSAUTH_SERVER__LISTEN", "127.0.0.1:9001"),
                ("SMSAUTH_SERVER__TRUST_PROXY", "true"),
                ("SMSAUTH_SMS__FIXED_CODE", "000123"),
                ("SMSAUTH_CODE__TTL_SECS", "42"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9001");
        assert!(c.server.trust_proxy);
        assert_eq!(c.sms.fixed_code, "000123");
        assert_eq!(c.code.ttl_secs, 42);
    }

    #[test]
    fn a_key_file_variable_reads_the_value_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("token-secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef-from-file\n").unwrap();
        let path = secret.to_str().unwrap();
        let c = load_str("", &[("SMSAUTH_TOKEN__SECRET_FILE", path)]).unwrap();
        assert_eq!(
            c.token.secret.expose(),
            "0123456789abcdef0123456789abcdef-from-file"
        );
        let e = load_str(
            "",
            &[
                ("SMSAUTH_TOKEN__SECRET_FILE", path),
                ("SMSAUTH_TOKEN__SECRET", "0123456789abcdef0123456789abcdef"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not both"), "{e}");
        let e = load_str("", &[("SMSAUTH_TOKEN__SECRET_FILE", "/nonexistent/s")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SMSAUTH_TOKEN__SECRET_FILE") && e.contains("/nonexistent/s"),
            "{e}"
        );
        // A key that does not exist stays unknown, _FILE or not.
        let e = load_str("", &[("SMSAUTH_TOKEN__NOPE_FILE", path)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope_file"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load_str("[server]\nlisten_addr = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen_addr"), "{e}");
        let e = load_str("", &[("SMSAUTH_CODE__LENGHT", "6")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lenght"), "{e}");
    }

    #[test]
    fn bad_value_is_named() {
        let e = load_str("[code]\nttl_secs = \"soon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("code.ttl_secs"), "{e}");
        let e = load_str("[server]\nlisten = \"nowhere\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.listen"), "{e}");
        let e = load_str("[phone]\npattern = \"(\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("phone.pattern"), "{e}");
    }

    #[test]
    fn fixed_code_only_with_log_provider() {
        let e = load_str(
            "[sms]\nprovider = \"webhook\"\nfixed_code = \"123456\"\n[sms.webhook]\nurl = \"http://x\"\nsecret = \"s\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sms.fixed_code"), "{e}");
        assert!(load_str("[sms]\nfixed_code = \"123456\"\n", &[]).is_ok());
    }

    const ALIYUN: &str =
        "[sms]\nprovider = \"aliyun\"\n[sms.aliyun]\naccess_key_id = \"id\"\nsign_name = \"n\"\n";

    #[test]
    fn templates_are_one_string_or_one_per_purpose() {
        let c = load_str(
            &format!("{ALIYUN}access_key_secret = \"s\"\ntemplate_code = \"SMS_1\"\n"),
            &[],
        )
        .unwrap();
        for p in Purpose::ALL {
            assert_eq!(c.sms.aliyun.template_code.get(p), "SMS_1");
        }
        let c = load_str(
            &format!("{ALIYUN}access_key_secret = \"s\"\n[sms.aliyun.template_code]\nlogin = \"SMS_1\"\nregister = \"SMS_2\"\nreset_password = \"SMS_3\"\n"),
            &[],
        )
        .unwrap();
        let t = &c.sms.aliyun.template_code;
        // Without its own template, a deletion code goes out with the login one.
        assert_eq!(
            Purpose::ALL.map(|p| t.get(p)),
            ["SMS_1", "SMS_2", "SMS_3", "SMS_1"]
        );
        let c = load_str(
            &format!("{ALIYUN}access_key_secret = \"s\"\n[sms.aliyun.template_code]\nlogin = \"SMS_1\"\nregister = \"SMS_2\"\nreset_password = \"SMS_3\"\ndelete_account = \"SMS_4\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.sms.aliyun.template_code.get(Purpose::DeleteAccount),
            "SMS_4"
        );
        // A purpose left out, or one that does not exist, is named.
        let e = load_str(
            &format!("{ALIYUN}access_key_secret = \"s\"\ntemplate_code = {{ login = \"SMS_1\", register = \"SMS_2\" }}\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sms.aliyun.template_code.reset_password"), "{e}");
        let e = load_str(
            &format!(
                "{ALIYUN}access_key_secret = \"s\"\ntemplate_code = {{ signup = \"SMS_1\" }}\n"
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sms.aliyun.template_code"), "{e}");
    }

    #[test]
    fn provider_secrets_from_env_or_file_never_debug_print() {
        let c = load_str(
            &format!("{ALIYUN}template_code = \"SMS_1\"\n"),
            &[("SMSAUTH_SMS__ALIYUN__ACCESS_KEY_SECRET", "env-hush")],
        )
        .unwrap();
        assert_eq!(c.sms.aliyun.access_key_secret.expose(), "env-hush");
        assert!(!format!("{c:?}").contains("env-hush"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "file-hush\r\n").unwrap();
        let ronglian = format!(
            "[sms]\nprovider = \"ronglian\"\n[sms.ronglian]\naccount_sid = \"s\"\napp_id = \"a\"\ntemplate_id = \"1\"\nauth_token_file = \"{}\"\n",
            file.display()
        );
        let c = load_str(&ronglian, &[]).unwrap();
        assert_eq!(c.sms.ronglian.auth_token.expose(), "file-hush");
        assert!(!format!("{c:?}").contains("file-hush"));

        // Both given: refused rather than guess which one wins.
        let e = load_str(
            &ronglian,
            &[("SMSAUTH_SMS__RONGLIAN__AUTH_TOKEN", "env-hush")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sms.ronglian.auth_token_file"), "{e}");
        assert!(!e.contains("hush"), "{e}");
        std::fs::write(&file, "\n").unwrap();
        let e = load_str(&ronglian, &[]).unwrap_err().to_string();
        assert!(e.contains("sms.ronglian.auth_token_file"), "{e}");
    }

    #[test]
    fn the_wechat_secret_comes_from_the_file_the_env_or_its_file_never_debug_printed() {
        const WECHAT: &str =
            "[wechat]\nenabled = true\napp_id = \"wx1\"\nredirect_uri = \"https://a.example/cb\"\n";
        let c = load_str(WECHAT, &[("SMSAUTH_WECHAT__APP_SECRET", "env-hush")]).unwrap();
        assert_eq!(c.wechat.app_secret.expose(), "env-hush");
        assert!(!format!("{c:?}").contains("env-hush"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wechat-secret");
        std::fs::write(&file, "file-hush\n").unwrap();
        let with_file = format!("{WECHAT}app_secret_file = \"{}\"\n", file.display());
        let c = load_str(&with_file, &[]).unwrap();
        assert_eq!(c.wechat.app_secret.expose(), "file-hush");
        assert!(!format!("{c:?}").contains("file-hush"));
        let path = file.to_str().unwrap();
        let c = load_str(WECHAT, &[("SMSAUTH_WECHAT__APP_SECRET_FILE", path)]).unwrap();
        assert_eq!(c.wechat.app_secret.expose(), "file-hush");

        let e = load_str(&with_file, &[("SMSAUTH_WECHAT__APP_SECRET", "env-hush")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("wechat.app_secret_file"), "{e}");
        assert!(!e.contains("hush"), "{e}");
        // Off, nothing is required.
        assert!(load_str("[wechat]\nenabled = false\n", &[]).is_ok());
    }

    #[test]
    fn fixed_code_is_refused_with_real_providers() {
        let e = load_str(
            &format!("{ALIYUN}access_key_secret = \"s\"\ntemplate_code = \"SMS_1\"\n"),
            &[("SMSAUTH_SMS__FIXED_CODE", "123456")],
        );
        let e = e.unwrap_err().to_string();
        assert!(e.contains("sms.fixed_code"), "{e}");
    }

    #[test]
    fn retries_are_bounded() {
        let e = load_str("[sms]\nretries = 11\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sms.retries"), "{e}");
    }

    #[test]
    fn memory_bounds_are_read_and_too_small_ones_named() {
        let cfg = load_str("[memory]\ncode_cache_entries = 5000\n", &[]).unwrap();
        assert_eq!(cfg.memory.code_cache_entries, 5000);
        let e = load_str("", &[("SMSAUTH_MEMORY__RESEND_WAIT_ENTRIES", "10")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory.resend_wait_entries"), "{e}");
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let c = load_str(
            "",
            &[(
                "SMSAUTH_TOKEN__SECRET",
                "0123456789abcdef0123456789abcdef-hush",
            )],
        )
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hush"), "{dbg}");
    }

    /// config.example.toml documents every key with its default: uncommented, it must
    /// parse, and give exactly the defaults.
    #[test]
    fn example_file_shows_every_key_with_its_default() {
        let example = include_str!("../../config.example.toml");
        let uncommented: String = example
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| !k.contains(' ')) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = load_str(&uncommented, &[]).unwrap();
        let shown = toml::Value::try_from(&c).unwrap();
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        assert_eq!(shown, defaults);
        // And every default key is in the file.
        fn keys(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
            if let Some(t) = v.as_table() {
                for (k, v) in t {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    if v.is_table() {
                        keys(v, &path, out)
                    } else {
                        out.push(path)
                    }
                }
            }
        }
        let mut all = Vec::new();
        keys(&defaults, "", &mut all);
        let parsed: toml::Table = uncommented.parse().unwrap();
        for key in all {
            let mut node = Some(&parsed);
            let parts: Vec<&str> = key.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                node = node.and_then(|n| n.get(*p)).and_then(|v| v.as_table());
            }
            assert!(
                node.is_some_and(|n| n.contains_key(*parts.last().unwrap())),
                "{key} is not in config.example.toml"
            );
        }
    }

    #[test]
    fn unreadable_file_is_named() {
        let e = Config::load(Some(Path::new("/nonexistent/smsauth.toml")), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/smsauth.toml"), "{e}");
    }
}
