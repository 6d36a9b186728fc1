//! The host terminal as the guest's serial console: stdin in raw mode,
//! and QEMU's escape Ctrl-A x. The forwarding itself runs on the VMM
//! event loop (`vmplay_virtio::serial_input`).
//!
//! Raw mode is what QEMU's `-nographic` (`mon:stdio`) sets: no echo, no
//! line editing, no signals (Ctrl-C goes to the guest), no input CR/LF
//! translation, 8-bit clean; but output post-processing (OPOST) stays on,
//! so the host terminal still turns a bare `\n` into a new line.

use std::io::{self, IsTerminal};
use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// The escape prefix, Ctrl-A.
pub const ESCAPE_BYTE: u8 = 0x01;
/// After the prefix, quits the VM.
pub const ESCAPE_QUIT: u8 = b'x';

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot read the terminal settings of stdin: {0}")]
    GetAttr(io::Error),
    #[error("cannot put stdin in raw mode: {0}")]
    SetAttr(io::Error),
    #[error("cannot forward stdin to the console: {0}")]
    Stdin(io::Error),
}

/// The terminal settings stdin had before the first [`RawTerminal::enter`].
static SAVED: OnceLock<libc::termios> = OnceLock::new();
/// Whether stdin is in raw mode now.
static RAW: AtomicBool = AtomicBool::new(false);

/// Keeps stdin in raw mode while alive; restores it on drop.
#[must_use = "the terminal is restored when the guard drops"]
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal; otherwise does nothing
    /// (the guard is then inert).
    pub fn enter() -> Result<RawTerminal, ConsoleError> {
        if !io::stdin().is_terminal() {
            return Ok(RawTerminal { active: false });
        }
        let current = get_termios(libc::STDIN_FILENO).map_err(ConsoleError::GetAttr)?;
        // The first original wins: entering twice must not save raw mode.
        let original = *SAVED.get_or_init(|| current);
        set_termios(libc::STDIN_FILENO, &raw_termios(&original)).map_err(ConsoleError::SetAttr)?;
        RAW.store(true, Ordering::Release);
        Ok(RawTerminal { active: true })
    }

    /// True if stdin is a terminal and was put in raw mode.
    pub fn is_active(&self) -> bool {
        self.active
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.active {
            restore();
        }
    }
}

/// Restores stdin's original terminal settings if raw mode is on.
///
/// Idempotent, and usable from any exit path: a panic hook, the signal
/// thread, or even a signal handler (it only does an atomic swap, a
/// lock-free read and `tcsetattr`, which is async-signal-safe).
pub fn restore() {
    if RAW.swap(false, Ordering::AcqRel)
        && let Some(original) = SAVED.get()
        && let Err(e) = set_termios(libc::STDIN_FILENO, original)
    {
        tracing::warn!(error = %e, "cannot restore the terminal settings of stdin");
    }
}

/// `original` with QEMU's `-nographic` raw mode applied (see the module docs).
fn raw_termios(original: &libc::termios) -> libc::termios {
    let mut raw = *original;
    raw.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    raw.c_oflag |= libc::OPOST;
    raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN | libc::ISIG);
    raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
    raw.c_cflag |= libc::CS8;
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    raw
}

fn get_termios(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain old data; all-zeroes is a valid value that
    // tcgetattr overwrites.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is only queried (a bad one makes the call fail); `t` is
    // a valid, writable termios.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

fn set_termios(fd: RawFd, t: &libc::termios) -> io::Result<()> {
    // SAFETY: `t` points to a valid termios that tcsetattr only reads; a
    // bad `fd` makes it fail with an error, not misbehave.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What one input byte means, after the escape prefix is taken into account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to send yet (a Ctrl-A that may start an escape).
    Hold,
    /// Send this byte to the guest.
    Send(u8),
    /// Send these two bytes (Ctrl-A followed by a byte that is no command).
    SendTwo(u8, u8),
    /// The user asked to quit.
    Quit,
}

/// The console escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A,
/// Ctrl-A followed by anything else sends both bytes.
#[derive(Debug, Default, Clone)]
pub struct EscapeParser {
    after_prefix: bool,
}

impl EscapeParser {
    pub fn feed(&mut self, byte: u8) -> Step {
        if !self.after_prefix {
            if byte == ESCAPE_BYTE {
                self.after_prefix = true;
                return Step::Hold;
            }
            return Step::Send(byte);
        }
        self.after_prefix = false;
        match byte {
            ESCAPE_QUIT => Step::Quit,
            ESCAPE_BYTE => Step::Send(ESCAPE_BYTE),
            other => Step::SendTwo(ESCAPE_BYTE, other),
        }
    }

    /// At end of input: a dangling Ctrl-A is sent as typed.
    pub fn finish(&mut self) -> Option<u8> {
        std::mem::take(&mut self.after_prefix).then_some(ESCAPE_BYTE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_quits_and_doubles_send_one_prefix() {
        let mut p = EscapeParser::default();
        assert_eq!(p.feed(b'a'), Step::Send(b'a'));
        assert_eq!(p.feed(0x01), Step::Hold);
        assert_eq!(p.feed(0x01), Step::Send(0x01));
        assert_eq!(p.feed(0x01), Step::Hold);
        assert_eq!(p.feed(b'c'), Step::SendTwo(0x01, b'c'));
        assert_eq!(p.feed(b'x'), Step::Send(b'x'), "x alone is just x");
        assert_eq!(p.feed(0x01), Step::Hold);
        assert_eq!(p.feed(b'x'), Step::Quit);
    }

    #[test]
    fn dangling_prefix_is_sent_at_end_of_input() {
        let mut p = EscapeParser::default();
        assert_eq!(p.finish(), None);
        p.feed(0x01);
        assert_eq!(p.finish(), Some(0x01));
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn raw_mode_is_qemus_nographic_mode() {
        // SAFETY: termios is plain old data.
        let mut cooked: libc::termios = unsafe { std::mem::zeroed() };
        cooked.c_iflag = libc::ICRNL | libc::IXON | libc::BRKINT;
        cooked.c_oflag = libc::OPOST | libc::ONLCR;
        cooked.c_lflag = libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN;
        cooked.c_cflag = libc::CS7 | libc::PARENB | libc::CREAD;
        let raw = raw_termios(&cooked);
        assert_eq!(raw.c_iflag, 0, "no CR/LF mapping, no flow control");
        assert_eq!(
            raw.c_oflag,
            libc::OPOST | libc::ONLCR,
            "output processing kept"
        );
        assert_eq!(raw.c_lflag, 0, "no echo, line editing or signals");
        assert_eq!(raw.c_cflag, libc::CS8 | libc::CREAD);
        assert_eq!((raw.c_cc[libc::VMIN], raw.c_cc[libc::VTIME]), (1, 0));
    }

    #[test]
    fn termios_round_trips_on_a_pty() {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: the out-pointers are valid; null name/termios/winsize
        // are allowed.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let original = get_termios(slave).unwrap();
        assert_ne!(original.c_lflag & libc::ICANON, 0, "a new pty is cooked");
        set_termios(slave, &raw_termios(&original)).unwrap();
        assert_eq!(
            get_termios(slave).unwrap().c_lflag & (libc::ICANON | libc::ECHO),
            0
        );
        set_termios(slave, &original).unwrap();
        assert_ne!(get_termios(slave).unwrap().c_lflag & libc::ICANON, 0);
        // SAFETY: both fds were opened above and are not used again.
        unsafe {
            libc::close(master);
            libc::close(slave);
        }
        assert!(get_termios(slave).is_err(), "closed fd is an error");
    }

    #[test]
    fn restore_without_raw_mode_is_a_no_op() {
        restore();
        restore();
        assert!(!RAW.load(Ordering::Acquire));
    }
}
