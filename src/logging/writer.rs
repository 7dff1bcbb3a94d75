//! The log's own writer. A line is formatted on the thread that logs it and appended to
//! a bounded buffer in memory; one thread of its own writes what has gathered, in one
//! system call per batch, so no request waits on stdout (a pipe to journald, a file)
//! and a busy second costs a hundred writes instead of one per request.
//!
//! The writer is woken only by the first line after it has gone idle (or by a buffer
//! filling up); it then lets lines gather for [`GATHER`] before it writes. Waking it for
//! every line cost as much as writing each one: on a machine with one core to spare, the
//! writer ran at once for each line and never saw a batch. A crash loses at most that
//! last moment of lines; a clean stop loses none.
//!
//! When the reader falls behind and the buffer is full, new lines are dropped, never
//! waited for: they are counted (`smsauth_log_lines_dropped_total`), and once the buffer
//! has room again one line says how many were lost. A clean stop writes out every line
//! ([`LogGuard`]).

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Lines waiting to be written, at most: about 7,000 request lines, a third of a second
/// at full speed on a small machine. Memory stays bounded whatever the reader does.
pub const CAPACITY: usize = 1 << 20;
/// How long the writer lets lines gather once there are some.
const GATHER: Duration = Duration::from_millis(10);

/// Lines dropped since the process started, for /metrics. Process-wide, as the log is.
static DROPPED: AtomicU64 = AtomicU64::new(0);

const DROPPED_NOTICE: &str = "log lines were dropped: the log's reader fell behind";

pub fn dropped_total() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Dropped since the last notice was written.
    dropped: u64,
    closed: bool,
    /// The writer waits for a signal (it found nothing to write); otherwise it wakes by
    /// itself within [`GATHER`] and nobody need signal it.
    idle: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when `pending` gains bytes while the writer is idle, fills past half,
    /// or closes.
    filled: Condvar,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves whole lines in the buffer.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What tracing-subscriber writes each formatted line into.
#[derive(Clone)]
pub struct LineSink {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it has written every line.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The sink and the thread that writes what it gathers to `out`, keeping at most
/// `capacity` bytes waiting.
/// `json`: the notice of dropped lines is a JSON line, else a line of text.
pub fn spawn(out: Box<dyn Write + Send>, capacity: usize, json: bool) -> (LineSink, LogGuard) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        filled: Condvar::new(),
        capacity,
    });
    let writer = shared.clone();
    let thread = std::thread::Builder::new()
        .name("smsauth-log".into())
        .spawn(move || write_batches(&writer, out, json))
        .expect("the log writer thread starts");
    (
        LineSink {
            shared: shared.clone(),
        },
        LogGuard {
            shared,
            thread: Some(thread),
        },
    )
}

fn write_batches(shared: &Shared, mut out: Box<dyn Write + Send>, json: bool) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        let dropped = {
            let mut pending = shared.lock();
            while pending.bytes.is_empty() && pending.dropped == 0 && !pending.closed {
                pending.idle = true;
                pending = shared
                    .filled
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            pending.idle = false;
            if pending.bytes.is_empty() && pending.dropped == 0 {
                return; // closed, and every line is out
            }
            // Let more lines join this batch, unless the buffer fills or the log closes.
            if !pending.closed && pending.bytes.len() < shared.capacity / 2 {
                pending = shared
                    .filled
                    .wait_timeout(pending, GATHER)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut batch, &mut pending.bytes);
            std::mem::take(&mut pending.dropped)
        };
        if dropped > 0 {
            // Said after the lines that did fit, which came before the drops.
            let now = jiff::Timestamp::now();
            let notice = match json {
                true => format!(
                    "{{\"timestamp\":\"{now:.6}\",\"level\":\"WARN\",\"message\":\"{DROPPED_NOTICE}\",\"dropped\":{dropped}}}\n"
                ),
                false => format!("{now:.6}  WARN {DROPPED_NOTICE} dropped={dropped}\n"),
            };
            batch.extend_from_slice(notice.as_bytes());
        }
        // A log that cannot be written has nowhere to report it: the lines are lost.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > 4 * shared.capacity {
            batch.shrink_to(64 * 1024);
        }
    }
}

impl Write for LineSink {
    /// Takes one whole line (tracing-subscriber writes each event in one call), or drops
    /// it if it does not fit.
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = self.shared.lock();
        if pending.bytes.len() + line.len() > self.shared.capacity {
            pending.dropped += 1;
            DROPPED.fetch_add(1, Ordering::Relaxed);
        } else {
            let half = self.shared.capacity / 2;
            let was_below_half = pending.bytes.len() < half;
            pending.bytes.extend_from_slice(line);
            let wake = pending.idle || (was_below_half && pending.bytes.len() >= half);
            pending.idle = false;
            drop(pending);
            if wake {
                self.shared.filled.notify_one();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(()) // the writer thread flushes each batch
    }
}

impl<'a> MakeWriter<'a> for LineSink {
    type Writer = LineSink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.filled.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An output that holds each write until the test lets it through.
    struct Gated {
        written: Arc<Mutex<Vec<u8>>>,
        gate: mpsc::Receiver<()>,
    }

    impl Write for Gated {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _ = self.gate.recv();
            self.written.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_costs_dropped_lines_never_a_wait_and_the_log_says_so() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let (open, gate) = mpsc::channel();
        let out = Gated {
            written: written.clone(),
            gate,
        };
        let (mut sink, guard) = spawn(Box::new(out), 100, true);
        let before = dropped_total();
        // The first line goes to the writer thread, which then waits at the gate; the
        // next ones fill the buffer, and the rest are dropped at once.
        sink.write_all(b"first line\n").unwrap();
        while !sink.shared.lock().bytes.is_empty() {
            std::thread::yield_now();
        }
        for i in 0..20 {
            sink.write_all(format!("line {i:02} of ten bytes\n").as_bytes())
                .unwrap();
        }
        let kept = 100 / "line 00 of ten bytes\n".len();
        assert_eq!(sink.shared.lock().dropped, (20 - kept) as u64);
        assert!(dropped_total() >= before + (20 - kept) as u64);
        for _ in 0..10 {
            let _ = open.send(());
        }
        drop(guard); // a clean stop: everything kept is written, then the notice
        let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "first line");
        assert_eq!(lines.len(), 1 + kept + 1, "{text}");
        let notice: serde_json::Value = serde_json::from_str(lines[kept + 1]).unwrap();
        assert_eq!(notice["dropped"], (20 - kept) as u64);
    }
}
