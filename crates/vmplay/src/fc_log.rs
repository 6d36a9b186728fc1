//! vmplay's own `tracing` events through Firecracker's logger: under the
//! `firecracker` personality every crate's warnings and info lines go
//! where `--log-path` / `PUT /logger` say, at its level, with its
//! `show-level` / `show-log-origin` / `module` settings, in its line
//! format. `VMPLAY_LOG` still adds vmplay's stderr output beside it.

use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use vmplay_api::logger;
use vmplay_api::schema::Level;

fn level(l: &tracing::Level) -> Level {
    match *l {
        tracing::Level::ERROR => Level::Error,
        tracing::Level::WARN => Level::Warning,
        tracing::Level::INFO => Level::Info,
        tracing::Level::DEBUG => Level::Debug,
        tracing::Level::TRACE => Level::Trace,
    }
}

/// Collects an event's message, then its other fields as `name=value`.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

/// Writes each event as one logger line.
struct ToLogger;

impl<S: Subscriber> Layer<S> for ToLogger {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        let mut text = Text::default();
        event.record(&mut text);
        logger::log(
            level(meta.level()),
            meta.module_path().unwrap_or(meta.target()),
            meta.file().unwrap_or("?"),
            meta.line().unwrap_or(0),
            &format!("{}{}", text.message, text.fields),
        );
    }
}

/// The logger's current level, asked for each event (it changes at run
/// time with `PUT /logger`), so callsites are never cached as off.
struct LoggerLevel;

impl<S> Filter<S> for LoggerLevel {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        logger::enabled(level(meta.level()))
    }
    fn callsite_enabled(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }
}

/// Installs the subscriber for the `firecracker` personality.
pub fn init() {
    let stderr = std::env::var_os("VMPLAY_LOG").map(|_| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(
                tracing_subscriber::EnvFilter::try_from_env("VMPLAY_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
    });
    let _ = tracing_subscriber::registry()
        .with(ToLogger.with_filter(LoggerLevel))
        .with(stderr)
        .try_init();
}
