//! The running service's state: every part, built once from the configuration and shared
//! by reference with each request. No globals, so a test process can run several.

use std::sync::Arc;

use anyhow::Context;

use crate::activity::ActivityLog;
use crate::captcha::Captchas;
use crate::codes::Codes;
use crate::config::Config;
use crate::keys;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::password::Passwords;
use crate::phone::PhoneParser;
use crate::rotation::Rotation;
use crate::sessions::LoginSessions;
use crate::signing::SigningKeys;
use crate::sms::Sms;
use crate::store::Store;
use crate::token::Tokens;
use crate::wechat::Wechat;

pub struct App {
    pub cfg: Config,
    pub store: Store,
    pub phones: PhoneParser,
    pub codes: Codes,
    pub tokens: Tokens,
    pub sessions: LoginSessions,
    /// Each account's login activity.
    pub activity: ActivityLog,
    pub passwords: Passwords,
    pub captchas: Captchas,
    pub limits: Limits,
    pub sms: Sms,
    /// None when `wechat.enabled` is off.
    pub wechat: Option<Wechat>,
    pub metrics: Metrics,
    /// This instance's part in rotations of the phone key.
    pub rotation: Arc<Rotation>,
}

impl App {
    /// Opens the store (creating the data dir and the keys on first start) and builds
    /// every part.
    pub async fn open(cfg: Config) -> anyhow::Result<Arc<App>> {
        let dir = &cfg.storage.data_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        let store = Store::open(&cfg).await?;
        let signing = SigningKeys::open(
            &cfg,
            store.keys.clone(),
            Tokens::lifetime(cfg.token.access_ttl_secs),
        )
        .await
        .context("loading the token signing keys")?;
        let code_key = store.keys.key_or_insert("code", keys::fresh()).await?;
        let fixed = Some(cfg.sms.fixed_code.clone()).filter(|c| !c.is_empty());
        let codes = Codes::new(
            cfg.code.clone(),
            fixed,
            code_key,
            store.codes.clone(),
            store.waits.clone(),
        );
        let tokens = Tokens::new(signing, &cfg.token, store.sessions.clone())
            .remembering(cfg.memory.token_cache_entries);
        let refresh_key = store.keys.key_or_insert("refresh", keys::fresh()).await?;
        let sessions = LoginSessions::new(store.sessions.clone(), refresh_key, &cfg.token);
        let activity = ActivityLog::new(store.activity.clone(), &cfg.privacy);
        let phones = PhoneParser::new(&cfg.phone)?;
        let sms = Sms::from_config(&cfg.sms)?;
        let passwords = Passwords::new(&cfg.password)?;
        let captchas = Captchas::new(&cfg.captcha, store.captchas.clone());
        let limits = Limits::new(&cfg.limits, store.counters.clone(), store.addresses.clone());
        let wechat = Wechat::from_config(&cfg.wechat, store.grants.clone())?;
        let metrics = Metrics::new(Some(&*store.engine));
        let (key_file, own_key_file) = crate::store::phone_key_path(&cfg);
        let rotation = Arc::new(Rotation::new(
            store.rotations.clone(),
            store.phones.clone(),
            cfg.code.ttl_secs,
            key_file,
            own_key_file,
        ));
        // Said before serving, so a rotation running elsewhere waits for this instance.
        let _ = rotation.tick().await;
        Ok(Arc::new(App {
            rotation,
            store,
            phones,
            codes,
            tokens,
            sessions,
            activity,
            passwords,
            captchas,
            limits,
            sms,
            wechat,
            cfg,
            metrics,
        }))
    }

    /// Periodic clean-up: revocations of expired tokens, expired codes, captchas and WeChat
    /// grants, idle limiter entries, counters of past windows, login activity past its
    /// retention, retired signing keys whose
    /// tokens have all expired (and a fresh read of the signing keys, which another
    /// instance may have rotated), and the engine's own upkeep.
    pub async fn housekeeping(&self) {
        if let Err(e) = self.tokens.refresh_keys().await {
            tracing::warn!(error = %e, "refreshing the token signing keys failed");
        }
        if let Err(e) = self.codes.housekeeping().await {
            tracing::warn!(error = %e, "sweeping expired codes failed");
        }
        if let Err(e) = self.captchas.prune().await {
            tracing::warn!(error = %e, "pruning captchas failed");
        }
        if let Err(e) = self.limits.prune().await {
            tracing::warn!(error = %e, "pruning counters failed");
        }
        match self.tokens.prune().await {
            Ok(n) if n > 0 => tracing::debug!(pruned = n, "expired revocations pruned"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning revocations failed"),
        }
        match self.sessions.prune(crate::clock::now()).await {
            Ok(n) if n > 0 => tracing::debug!(pruned = n, "ended and expired sessions pruned"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning sessions failed"),
        }
        match self.activity.prune(crate::clock::now()).await {
            Ok(n) if n > 0 => {
                tracing::debug!(pruned = n, "login activity past its retention pruned")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning login activity failed"),
        }
        if let Some(wechat) = &self.wechat
            && let Err(e) = wechat.prune(crate::clock::now()).await
        {
            tracing::warn!(error = %e, "pruning WeChat grants failed");
        }
        if let Err(e) = self.store.engine.maintain().await {
            tracing::warn!(error = %e, "store upkeep failed");
        }
    }
}
