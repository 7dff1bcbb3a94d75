//! smsauth: SMS verification-code login and registration for a small website, in one
//! binary with its own embedded store.
//!
//! The parts, each in its own module:
//! - [`config`]: the TOML file and `SMSAUTH_*` overrides, validated at start;
//! - [`store`]: users, login methods, pending codes and revocations, behind our [`store::Store`] trait (sled);
//! - [`codes`]: verification codes (CSPRNG, keyed hashes, single use, attempts);
//! - [`token`]: JWT sessions and verification tickets, and how they end;
//! - [`sms`]: the senders (`log`, `webhook`);
//! - [`http`]: the hyper server, router and handlers;
//! - [`app`]: the state that ties them together; [`server`]: start-up and shutdown;
//! - [`admin`]: operator commands (users, backup, restore) and the local admin socket.

#![forbid(unsafe_code)]

pub mod activity;
pub mod admin;
pub mod app;
pub mod captcha;
pub mod cli;
pub mod clock;
pub mod codes;
pub mod config;
pub mod error;
pub mod http;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod password;
pub mod phone;
pub mod privacy;
pub mod rotation;
pub mod server;
pub mod sessions;
pub mod sharded;
pub mod signing;
pub mod sms;
pub mod store;
pub mod token;
pub mod wechat;
