//! Passwords: argon2id (OWASP parameters by default), stored as PHC strings so parameters
//! can change and old hashes still verify; hashing runs on threads of its own, one per
//! slot of a concurrency cap and at a lower CPU priority, so a flood of password logins
//! queues there instead of starving the async runtime (code logins, /me, /healthz keep
//! their threads and get the CPU first).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::config::PasswordConfig;

pub const MIN_CHARS: usize = 8;
pub const MAX_CHARS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// More requests wait for a hashing slot than the queue holds.
    #[error("too many password checks in progress")]
    Busy,
    #[error("password hashing failed: {0}")]
    Internal(String),
}

/// The outcome of checking a password against a stored hash.
pub struct Checked {
    pub matches: bool,
    /// The stored hash used other parameters than the configured ones: store a new one.
    pub needs_rehash: bool,
}

pub struct Passwords {
    argon: Arc<Argon2<'static>>,
    threads: HashThreads,
    permits: Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
    /// Verified against when there is no real hash, so "no such user" and "no password"
    /// cost what a wrong password costs.
    dummy: String,
}

/// NIST SP 800-63B: length is what counts; no composition rules, any Unicode.
pub fn check_rules(password: &str) -> Result<(), String> {
    let chars = password.chars().count();
    if !(MIN_CHARS..=MAX_CHARS).contains(&chars) {
        return Err(format!(
            "a password must be {MIN_CHARS} to {MAX_CHARS} characters long"
        ));
    }
    if password.chars().all(char::is_whitespace) {
        return Err("a password cannot be only whitespace".into());
    }
    Ok(())
}

/// One hash per core but one (at least one): a hash holds its core for tens of
/// milliseconds, and with every core hashing the async workers wait their turn, so
/// GET /me and code logins slowed down 4x at p99 under a password flood (2 cores).
pub fn default_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

impl Passwords {
    pub fn new(cfg: &PasswordConfig) -> Result<Self, PasswordError> {
        let params = Params::new(cfg.memory_kib, cfg.iterations, cfg.parallelism, None)
            .map_err(|e| PasswordError::Internal(e.to_string()))?;
        let argon = Arc::new(Argon2::new(Algorithm::Argon2id, Version::V0x13, params));
        let slots = if cfg.max_concurrent_hashes == 0 {
            default_slots()
        } else {
            cfg.max_concurrent_hashes
        };
        let dummy = hash_with(&argon, "smsauth dummy password for equal timing")?;
        Ok(Passwords {
            argon,
            threads: HashThreads::start(slots).map_err(|e| {
                PasswordError::Internal(format!("cannot start a hashing thread: {e}"))
            })?,
            permits: Semaphore::new(slots),
            waiting: AtomicUsize::new(0),
            max_waiting: cfg.max_queued_hashes,
            dummy,
        })
    }

    pub async fn hash(&self, password: &str) -> Result<String, PasswordError> {
        let argon = self.argon.clone();
        let password = password.to_owned();
        self.on_hash_threads(move || hash_with(&argon, &password))
            .await?
    }

    /// Checks `password` against `stored`, or against a dummy hash when there is none,
    /// which takes the same time and never matches.
    pub async fn check(
        &self,
        password: &str,
        stored: Option<&str>,
    ) -> Result<Checked, PasswordError> {
        let argon = self.argon.clone();
        let password = password.to_owned();
        let (phc, real) = match stored {
            Some(s) => (s.to_owned(), true),
            None => (self.dummy.clone(), false),
        };
        self.on_hash_threads(move || {
            let Ok(parsed) = PasswordHash::new(&phc) else {
                return Checked {
                    matches: false,
                    needs_rehash: false,
                };
            };
            let matches = argon.verify_password(password.as_bytes(), &parsed).is_ok() && real;
            let needs_rehash = matches
                && Params::try_from(&parsed).map_or(true, |p| {
                    let want = argon.params();
                    (p.m_cost(), p.t_cost(), p.p_cost())
                        != (want.m_cost(), want.t_cost(), want.p_cost())
                });
            Checked {
                matches,
                needs_rehash,
            }
        })
        .await
    }

    /// Runs `work` on a hashing thread once a hashing slot is free; refuses at once
    /// when the queue for slots is full, so memory stays bounded under a flood.
    async fn on_hash_threads<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let _permit = match self.permits.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                let _queued = Queued::join(&self.waiting, self.max_waiting)?;
                self.permits
                    .acquire()
                    .await
                    .map_err(|e| PasswordError::Internal(e.to_string()))?
            }
        };
        self.threads.run(work).await
    }
}

/// How much lower than the request threads the hashing threads run (a nice value).
const HASH_NICE: i32 = 10;

/// Threads that only hash, one per slot, at a lower CPU priority than the threads that
/// answer requests: when password logins keep every slot busy, the scheduler still gives
/// the other requests the CPU first, so a flood of logins slows logins, not the site.
/// (Tokio's blocking pool would not do: a thread's priority cannot be raised back without
/// privileges, and its threads also run other work.)
struct HashThreads {
    jobs: mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl HashThreads {
    fn start(count: usize) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..count {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("smsauth-hash-{i}"))
                .spawn(move || {
                    lower_priority();
                    // Ends when the sender goes, with the Passwords that own it.
                    while let Ok(job) = {
                        let queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
                        queue.recv()
                    } {
                        // A panic drops the job's reply, which its caller sees as an error;
                        // the thread goes on with the next job.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })?;
        }
        Ok(HashThreads { jobs })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = reply.send(work());
            }))
            .map_err(|_| PasswordError::Internal("the hashing threads are gone".into()))?;
        answer
            .await
            .map_err(|_| PasswordError::Internal("a password hash failed".into()))
    }
}

/// Lowers the calling thread's priority. On Linux a nice value belongs to one thread
/// (setpriority with its thread id); elsewhere this would lower the whole process, so
/// it is left alone there.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let me = Some(rustix::thread::gettid());
        let lowered = getpriority_process(me)
            .and_then(|nice| setpriority_process(me, (nice + HASH_NICE).min(19)));
        if let Err(e) = lowered {
            tracing::warn!(error = %e, "could not lower the priority of a hashing thread");
        }
    }
}

/// A place in the queue for a hashing slot; given back on drop, also when the client
/// goes away while waiting.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn join(waiting: &'a AtomicUsize, max: usize) -> Result<Self, PasswordError> {
        if waiting.fetch_add(1, Ordering::SeqCst) >= max {
            waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(PasswordError::Busy);
        }
        Ok(Queued(waiting))
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn hash_with(argon: &Argon2<'_>, password: &str) -> Result<String, PasswordError> {
    argon
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> PasswordConfig {
        PasswordConfig {
            memory_kib: 1024,
            iterations: 1,
            ..Default::default()
        }
    }

    /// The hashing threads run below the priority of the thread that asks.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashing_threads_run_at_a_lower_priority() {
        use rustix::process::getpriority_process;
        use rustix::thread::gettid;
        let p = Passwords::new(&cheap()).unwrap();
        let mine = getpriority_process(Some(gettid())).unwrap();
        let theirs = p
            .on_hash_threads(|| getpriority_process(Some(gettid())).unwrap())
            .await
            .unwrap();
        assert_eq!(theirs, (mine + HASH_NICE).min(19));
    }

    #[test]
    fn rules_count_characters_not_bytes() {
        assert!(check_rules("1234567").is_err());
        assert!(check_rules("12345678").is_ok());
        assert!(check_rules("密码密码密码密码").is_ok()); // 8 characters, 24 bytes
        assert!(check_rules(&"x".repeat(129)).is_err());
        assert!(check_rules(&"é".repeat(128)).is_ok());
        assert!(check_rules("        \t").is_err());
    }

    #[tokio::test]
    async fn hash_verify_and_rehash() {
        let p = Passwords::new(&cheap()).unwrap();
        let phc = p.hash("correct horse").await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{phc}");
        let ok = p.check("correct horse", Some(&phc)).await.unwrap();
        assert!(ok.matches && !ok.needs_rehash);
        assert!(!p.check("wrong horse", Some(&phc)).await.unwrap().matches);
        assert!(!p.check("anything", None).await.unwrap().matches);
        assert!(
            !p.check("correct horse", Some("not a phc string"))
                .await
                .unwrap()
                .matches
        );
        let stronger = Passwords::new(&PasswordConfig {
            iterations: 2,
            ..cheap()
        })
        .unwrap();
        let old = stronger.check("correct horse", Some(&phc)).await.unwrap();
        assert!(old.matches && old.needs_rehash);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let p = Passwords::new(&PasswordConfig {
            max_concurrent_hashes: 1,
            max_queued_hashes: 0,
            ..cheap()
        })
        .unwrap();
        assert!(
            p.hash("whatever1").await.is_ok(),
            "a free slot needs no queue"
        );
        let held = p.permits.acquire().await.unwrap();
        assert!(matches!(
            p.hash("whatever1").await,
            Err(PasswordError::Busy)
        ));
        drop(held);
        assert!(p.hash("whatever1").await.is_ok());
        assert_eq!(p.waiting.load(Ordering::SeqCst), 0);
    }
}
