//! Firecracker's logger: `<local time> [<id>:<thread>[:LEVEL][:file:line]] msg`
//! lines to stdout, or to `--log-path` / `PUT /logger`'s `log_path` (a file
//! or FIFO, opened `O_CREAT|O_RDWR|O_NONBLOCK`), at the chosen level.

use crate::schema::{Level, Logger};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

struct State {
    id: String,
    level: Level,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    target: Option<std::fs::File>,
}

static STATE: Mutex<State> = Mutex::new(State {
    id: String::new(),
    level: Level::Info,
    show_level: false,
    show_origin: false,
    module: None,
    target: None,
});

/// The level, readable without the lock (every `tracing` event asks).
static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Whether a line at `level` would be written now.
pub fn enabled(level: Level) -> bool {
    level != Level::Off && level as u8 <= LEVEL.load(Ordering::Relaxed)
}

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The C library reads the time zone (opens /etc/localtime) on its first
/// local-time conversion: this does it now, before any thread has a
/// seccomp filter, not on whichever filtered thread logs first.
pub fn prepare() {
    let _ = local_time();
}

/// Sets the instance id shown in every line.
pub fn set_instance_id(id: &str) {
    state().id = id.to_string();
}

/// Applies a `Logger` body (or the equivalent flags). An omitted level
/// resets to Info; other omitted fields keep their value.
pub fn configure(l: &Logger) -> Result<(), String> {
    prepare();
    let target = match &l.log_path {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| format!("Failed to open target file: {e}"))?,
        ),
        None => None,
    };
    let mut s = state();
    if target.is_some() {
        s.target = target;
    }
    s.level = l.level.unwrap_or(Level::Info);
    LEVEL.store(s.level as u8, Ordering::Relaxed);
    if let Some(v) = l.show_level {
        s.show_level = v;
    }
    if let Some(v) = l.show_log_origin {
        s.show_origin = v;
    }
    if l.module.is_some() {
        s.module = l.module.clone();
    }
    Ok(())
}

#[allow(unsafe_code)]
fn local_time() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    // SAFETY: an all-zero `tm` is a valid value for localtime_r to overwrite.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    unsafe { libc::localtime_r(&ts.tv_sec, &mut tm) };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        ts.tv_nsec
    )
}

/// Writes one line at `level` from `file:line` of `module`.
pub fn log(level: Level, module: &str, file: &str, line: u32, msg: &str) {
    write_line(&mut state(), level, module, file, line, msg);
}

/// [`log`] at Error from a signal handler: gives up (returns false)
/// rather than wait for a thread that holds the logger.
pub fn try_error(msg: &str) -> bool {
    let mut s = match STATE.try_lock() {
        Ok(s) => s,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return false,
    };
    write_line(&mut s, Level::Error, "vmm", file!(), line!(), msg);
    true
}

fn write_line(s: &mut State, level: Level, module: &str, file: &str, line: u32, msg: &str) {
    if level > s.level || level == Level::Off {
        return;
    }
    if let Some(prefix) = &s.module
        && !module.starts_with(prefix.as_str())
    {
        return;
    }
    let thread = std::thread::current();
    let mut tag = format!("{}:{}", s.id, thread.name().unwrap_or("-"));
    if s.show_level {
        tag.push(':');
        tag.push_str(match level {
            Level::Error => "ERROR",
            Level::Warning => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace | Level::Off => "TRACE",
        });
    }
    if s.show_origin {
        tag.push_str(&format!(":{file}:{line}"));
    }
    let text = format!("{} [{tag}] {msg}\n", local_time());
    match s.target.as_mut() {
        Some(f) => {
            let _ = f.write_all(text.as_bytes());
        }
        None => {
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
        }
    }
}

#[track_caller]
fn at(level: Level, msg: &str) {
    let loc = std::panic::Location::caller();
    log(level, "vmm", loc.file(), loc.line(), msg);
}

#[track_caller]
pub fn info(msg: &str) {
    at(Level::Info, msg);
}

#[track_caller]
pub fn warn(msg: &str) {
    at(Level::Warning, msg);
}

#[track_caller]
pub fn error(msg: &str) {
    at(Level::Error, msg);
}

#[track_caller]
pub fn debug(msg: &str) {
    at(Level::Debug, msg);
}
