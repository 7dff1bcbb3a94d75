//! Group commit for [`super::SledStore`]: writers that ask for a flush while one is
//! running wait for it and then share the next one, so N concurrent requests cost about
//! two fsyncs, not N.
//!
//! - A finished flush hands the lock to the next waiter in line. Waiters whose writes it
//!   covered return at once; the first one it did not cover flushes for everyone who has
//!   written meanwhile. Waking them one by one lets more writes join each flush: waking
//!   all at once and flushing at once was tried and measured worse (3.5 times the
//!   fdatasyncs, sms-login-new 0.17 of the ceiling against 0.21).
//! - The flush runs on a blocking thread that holds the lock to the end. A request that
//!   is cancelled (its client went away) cannot let go of the lock early, so two flushes
//!   never overlap. sled 0.34's `flush_async` is not used: overlapping calls of it hang
//!   for good (spacejam/sled#1308, fixed only after the last release), and it adds a
//!   hop to sled's own thread pool before ours. The test below fails with the former
//!   flush, which let a cancelled request start the next one early.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::metrics::histogram::Histogram;

use super::StoreError;

pub struct GroupCommit {
    db: sled::Db,
    /// sled's log file. sled's flush writes with `sync_file_range`, which survives a
    /// crash of the process but not of the machine (no disk cache flush, no metadata);
    /// sled fsyncs only from its timer, every 500 ms. fdatasync works on the file, not the
    /// descriptor, so syncing our own handle after each flush makes a 2xx mean "on disk".
    log_file: std::fs::File,
    /// Count of writes applied so far.
    written: AtomicU64,
    /// Count of writes known durable; the lock is held for the whole of a flush.
    durable: Arc<tokio::sync::Mutex<u64>>,
    /// Seconds each flush took (sled's flush and the fdatasync), for /metrics.
    pub(super) flush_seconds: Histogram,
}

/// 0.1 ms to 1 s: an fdatasync on a local SSD is well under a millisecond, on a busy
/// network disk tens of them; past that, durable answers wait.
fn flush_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ])
}

impl GroupCommit {
    pub fn new(db: sled::Db, log_file: std::fs::File) -> Arc<Self> {
        Arc::new(GroupCommit {
            db,
            log_file,
            written: AtomicU64::new(0),
            durable: Arc::new(tokio::sync::Mutex::new(0)),
            flush_seconds: flush_histogram(),
        })
    }

    /// Counts a write just applied; the next flush to start covers it.
    pub fn wrote(&self) {
        self.written.fetch_add(1, Ordering::SeqCst);
    }

    /// Returns once every write counted before the call is on disk.
    pub async fn flush(self: Arc<Self>) -> Result<(), StoreError> {
        let mine = self.written.load(Ordering::SeqCst);
        let mut durable = Arc::clone(&self.durable).lock_owned().await;
        if *durable >= mine {
            return Ok(()); // someone else's flush covered our writes
        }
        // Every write counted here was applied before the flush starts, so it is covered.
        let target = self.written.load(Ordering::SeqCst);
        tokio::task::spawn_blocking(move || {
            self.flush_blocking()?;
            *durable = target;
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Engine(format!("flush: {e}")))?
    }

    /// sled's flush, then fdatasync (see `log_file`). Blocks: from a plain thread only.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        self.db.flush()?;
        self.log_file
            .sync_data()
            .map_err(|e| StoreError::Engine(format!("fdatasync: {e}")))?;
        self.flush_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::SledStore;
    use crate::model::{PendingCode, Purpose};
    use crate::store::{Engine, PendingCodes};

    fn code(n: i64) -> PendingCode {
        PendingCode {
            hash: [n as u8; 32],
            sent_at: n,
            expires_at: n + 300,
            attempts: 0,
        }
    }

    /// Requests are cancelled when their client goes away, flushes included. A cancelled
    /// flush must neither leave its waiters waiting nor start a second flush beside the
    /// one still running: sled 0.34 can hang for good on overlapping flushes, blocking the
    /// runtime's threads, so the run is watched from a plain thread.
    #[test]
    fn cancelled_flushes_leave_nobody_waiting() {
        let (done, finished) = std::sync::mpsc::channel();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(cancel_flushes(&path));
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(Duration::from_secs(60))
            .expect("a flush hung after cancelled ones");
    }

    async fn cancel_flushes(dir: &std::path::Path) {
        let store = Arc::new(SledStore::open(dir, 8).unwrap());
        let writers: Vec<_> = (0..32)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        let phone = store.vault().index(&format!("+86138{w:04}{i:04}"));
                        store
                            .put_code(&phone, Purpose::Login, code(i))
                            .await
                            .unwrap();
                        // Cut off at every stage: before the flush starts, while it runs,
                        // after it ends.
                        let patience = Duration::from_micros((i as u64 * 37 + w) % 400);
                        let _ = tokio::time::timeout(patience, store.flush()).await;
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        store
            .put_code(
                &store.vault().index("+8613800000000"),
                Purpose::Login,
                code(1),
            )
            .await
            .unwrap();
        store.flush().await.unwrap();
    }
}
