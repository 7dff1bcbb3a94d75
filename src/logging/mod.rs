//! Log output: human-readable by default, one JSON object per line with [log] format =
//! "json". RUST_LOG, when set, overrides [log] level. Lines go out through a writer
//! thread of their own, in batches ([`writer`]).

pub mod writer;

use std::fmt::{self, Write as _};
use std::io::{IsTerminal, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogConfig, LogFormat};

/// Logs to stdout; keep the guard until the end, so a clean stop writes every line.
pub fn init(cfg: &LogConfig) -> writer::LogGuard {
    init_to(
        cfg,
        Box::new(std::io::stdout()),
        std::io::stdout().is_terminal(),
    )
}

/// Logs to `out` (the load benchmark gives /dev/null), in colour if `ansi`.
pub fn init_to(cfg: &LogConfig, out: Box<dyn Write + Send>, ansi: bool) -> writer::LogGuard {
    let json = cfg.format == LogFormat::Json;
    let (sink, guard) = writer::spawn(out, writer::CAPACITY, json);
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&cfg.level))
        // Two clients log what must not reach a log, at debug level: reqwest each
        // response with its full URL, and some of our calls carry a secret in the query
        // (WeChat's app secret, a Ronglian signature); tokio-postgres every statement's
        // parameters (phones, WeChat ids). Their own lines stay off below a warning at
        // every level, RUST_LOG included.
        .add_directive("reqwest=warn".parse().expect("a valid directive"))
        .add_directive("tokio_postgres=warn".parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(sink)
        // Colours only for a person at a terminal, not for journald or a file.
        .with_ansi(ansi);
    match cfg.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.event_format(JsonLines).init(),
    }
    guard
}

/// One JSON object per line: `timestamp` (RFC 3339, microseconds, UTC), `level`, then the
/// event's fields (`message` among them) at the top level, as tracing-subscriber's own
/// JSON format writes them with `flatten_event`. Written straight into the line buffer:
/// that format first gathers the fields into a map of JSON values, which made the log
/// line the largest single cost of a simple request. (smsauth uses no spans.)
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut out: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = jiff::Timestamp::now();
        let level = event.metadata().level();
        write!(out, r#"{{"timestamp":"{now:.6}","level":"{level}""#)?;
        let mut fields = JsonFields {
            out: &mut out,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        out.write_str("}\n")
    }
}

struct JsonFields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result =
                write!(self.out, r#","{}":"#, field.name()).and_then(|()| value(self.out));
        }
    }

    fn string(&mut self, field: &Field, value: impl fmt::Display) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value}")?;
            out.write_char('"')
        });
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.string(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // The message and `%`-fields arrive here; their Debug is their Display.
        self.string(field, format_args!("{value:?}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.string(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        self.field(field, |out| match value.is_finite() {
            true => write!(out, "{value}"),
            false => out.write_str("null"),
        });
    }
}

/// Writes what it is given as the inside of a JSON string.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, c) in s.char_indices() {
            let escape = match c {
                '"' => "\\\"",
                '\\' => "\\\\",
                '\n' => "\\n",
                '\r' => "\\r",
                '\t' => "\\t",
                c if c < ' ' => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            match escape {
                "" => write!(self.0, "\\u{:04x}", c as u32)?,
                e => self.0.write_str(e)?,
            }
            plain = i + c.len_utf8();
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Every line is one JSON object that serde_json reads back with the values given,
    /// whatever characters they hold.
    #[test]
    fn lines_are_json_with_the_fields_at_the_top() {
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || sink.clone())
            .finish();
        let odd = "quote \" backslash \\ newline \n tab \t bell \u{7} 汉字 😀";
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                path = %odd,
                status = 401u16,
                delta = -3i64,
                latency_ms = 0.25,
                nan = f64::NAN,
                created = true,
                "a {} message",
                "formatted"
            );
            tracing::warn!(error = ?Some("x"), "second");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(parsed.len(), 2, "{text}");
        let first = &parsed[0];
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["message"], "a formatted message");
        assert_eq!(first["path"], odd);
        assert_eq!(first["status"], 401);
        assert_eq!(first["delta"], -3);
        assert_eq!(first["latency_ms"], 0.25);
        assert!(first["nan"].is_null());
        assert_eq!(first["created"], true);
        let stamp = first["timestamp"].as_str().unwrap();
        assert!(stamp.parse::<jiff::Timestamp>().is_ok(), "{stamp}");
        assert!(stamp.ends_with('Z') && stamp.len() == 27, "{stamp}");
        assert_eq!(parsed[1]["level"], "WARN");
        assert_eq!(parsed[1]["error"], "Some(\"x\")");
    }
}
