//! The host terminal as the guest's serial console: stdin in raw mode,
//! forwarded to the UART on its own thread, with QEMU's escape Ctrl-A x.
//!
//! Raw mode is what QEMU's `-nographic` (`mon:stdio`) sets: no echo, no
//! line editing, no signals (Ctrl-C goes to the guest), no input CR/LF
//! translation, 8-bit clean; but output post-processing (OPOST) stays on,
//! so the host terminal still turns a bare `\n` into a new line.

use std::collections::VecDeque;
use std::io::{self, IsTerminal};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::control::{StopReason, VmControl};
use crate::serial::Serial;

/// The escape prefix, Ctrl-A.
pub const ESCAPE_BYTE: u8 = 0x01;
/// After the prefix, quits the VM.
pub const ESCAPE_QUIT: u8 = b'x';

/// How often an idle forwarder checks whether the VM is stopping.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How soon a forwarder retries when the guest's FIFO is full.
const FIFO_RETRY: Duration = Duration::from_millis(2);
/// Input held while the guest does not read; past this, stdin is not read
/// (the host pipe or terminal buffers the rest), so nothing is lost.
const MAX_HELD: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot read the terminal settings of stdin: {0}")]
    GetAttr(io::Error),
    #[error("cannot put stdin in raw mode: {0}")]
    SetAttr(io::Error),
    #[error("cannot start the stdin forwarding thread: {0}")]
    Spawn(io::Error),
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

/// Reads stdin on its own thread and feeds the bytes to `serial`.
///
/// Handles the escape (Ctrl-A x stops the VM with
/// [`StopReason::ConsoleEscape`]). When the guest's FIFO is full the input
/// is held and retried every few milliseconds, and stdin keeps being read
/// so the escape still works; nothing is dropped. The thread ends at end of
/// input (which does not stop the VM) or once the VM is stopping.
pub fn spawn_stdin_forwarder(
    serial: Arc<Mutex<Serial>>,
    control: Arc<VmControl>,
) -> Result<JoinHandle<()>, ConsoleError> {
    std::thread::Builder::new()
        .name("vmplay-stdin".into())
        .spawn(move || forward(&mut FdInput(libc::STDIN_FILENO), &serial, &control))
        .map_err(ConsoleError::Spawn)
}

/// The result of waiting for input.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    Data(usize),
    Idle,
    Eof,
}

/// A source of console input that can be waited on with a timeout.
trait InputSource {
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Input>;
}

/// A file descriptor (stdin), read directly: std's `Stdin` buffers, and
/// buffered bytes would be invisible to `poll`. Blocking reads are fine
/// since `poll` said there is data; the fd's flags are left alone because
/// the open file description is shared with the parent shell.
struct FdInput(RawFd);

impl InputSource for FdInput {
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Input> {
        let mut fds = libc::pollfd {
            fd: self.0,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is one valid pollfd, and we pass a count of 1.
        let ready = unsafe { libc::poll(&mut fds, 1, ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Input::Idle)
            } else {
                Err(e)
            };
        }
        if ready == 0 {
            return Ok(Input::Idle);
        }
        if fds.revents & libc::POLLNVAL != 0 {
            // Nothing is open on the fd.
            return Ok(Input::Eof);
        }
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => Ok(Input::Idle),
                _ => Err(e),
            };
        }
        Ok(if n == 0 {
            Input::Eof
        } else {
            Input::Data(n as usize)
        })
    }
}

/// The forwarding loop: parse, hold, deliver, until EOF or stop.
fn forward(input: &mut dyn InputSource, serial: &Mutex<Serial>, control: &VmControl) {
    let mut parser = EscapeParser::default();
    let mut held: VecDeque<u8> = VecDeque::new();
    let mut buf = [0u8; 1024];
    let mut eof = false;
    loop {
        if control.is_stopping() {
            return;
        }
        while !held.is_empty() {
            let (front, _) = held.as_slices();
            let n = serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(front);
            if n == 0 {
                break;
            }
            held.drain(..n);
        }
        let timeout = if held.is_empty() {
            IDLE_POLL
        } else {
            FIFO_RETRY
        };
        if eof || held.len() >= MAX_HELD {
            if eof && held.is_empty() {
                tracing::debug!("console input ended");
                return;
            }
            std::thread::sleep(timeout);
            continue;
        }
        match input.read(&mut buf, timeout) {
            Ok(Input::Data(n)) => {
                for &byte in &buf[..n] {
                    match parser.feed(byte) {
                        Step::Hold => {}
                        Step::Send(b) => held.push_back(b),
                        Step::SendTwo(a, b) => held.extend([a, b]),
                        Step::Quit => {
                            control.request_stop(StopReason::ConsoleEscape);
                            return;
                        }
                    }
                }
            }
            Ok(Input::Idle) => {}
            Ok(Input::Eof) => {
                held.extend(parser.finish());
                eof = true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading stdin failed; console input ends");
                held.extend(parser.finish());
                eof = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::serial::tests::CountingIrq;

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

    /// Scripted input: each entry is one `read` result.
    struct Script(VecDeque<Vec<u8>>);

    impl InputSource for Script {
        fn read(&mut self, buf: &mut [u8], _timeout: Duration) -> io::Result<Input> {
            match self.0.pop_front() {
                None => Ok(Input::Eof),
                Some(chunk) if chunk.is_empty() => Ok(Input::Idle),
                Some(chunk) => {
                    buf[..chunk.len()].copy_from_slice(&chunk);
                    Ok(Input::Data(chunk.len()))
                }
            }
        }
    }

    fn serial() -> Arc<Mutex<Serial>> {
        Arc::new(Mutex::new(Serial::new(
            Arc::new(CountingIrq::default()),
            Box::new(io::sink()),
        )))
    }

    fn drain(serial: &Mutex<Serial>) -> Vec<u8> {
        let mut s = serial.lock().unwrap();
        let mut out = vec![];
        let mut b = [0u8];
        loop {
            s.read(5, &mut b);
            if b[0] & 1 == 0 {
                return out;
            }
            s.read(0, &mut b);
            out.push(b[0]);
        }
    }

    #[test]
    fn end_of_input_stops_forwarding_but_not_the_vm() {
        let serial = serial();
        let control = VmControl::new();
        let mut input = Script(VecDeque::from([b"ls\r".to_vec(), vec![], vec![0x01]]));
        forward(&mut input, &serial, &control);
        assert!(!control.is_stopping());
        assert_eq!(drain(&serial), b"ls\r\x01");
    }

    #[test]
    fn ctrl_a_x_stops_the_vm() {
        let serial = serial();
        let control = VmControl::new();
        let mut input = Script(VecDeque::from([
            b"a\x01\x01b\x01".to_vec(),
            b"xyz".to_vec(),
        ]));
        forward(&mut input, &serial, &control);
        assert_eq!(control.reason(), Some(StopReason::ConsoleEscape));
        assert_eq!(drain(&serial), b"a\x01b");
    }

    #[test]
    fn input_beyond_the_fifo_waits_for_the_guest_and_is_not_lost() {
        let serial = serial();
        let control = VmControl::new();
        let text: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let forwarder = {
            let (serial, control, text) = (serial.clone(), control.clone(), text.clone());
            std::thread::spawn(move || {
                let mut input = Script(text.chunks(300).map(<[u8]>::to_vec).collect());
                forward(&mut input, &serial, &control)
            })
        };
        let mut got = vec![];
        while got.len() < text.len() {
            got.extend(drain(&serial));
            std::thread::sleep(Duration::from_millis(1));
        }
        forwarder.join().unwrap();
        assert_eq!(got, text);
    }

    #[test]
    fn escape_works_while_the_guest_is_not_reading() {
        let serial = serial();
        let control = VmControl::new();
        let mut chunks: VecDeque<Vec<u8>> = (0..10).map(|_| vec![b'z'; 100]).collect();
        chunks.push_back(b"\x01x".to_vec());
        forward(&mut Script(chunks), &serial, &control);
        assert_eq!(control.reason(), Some(StopReason::ConsoleEscape));
    }

    #[test]
    fn forwarder_exits_when_the_vm_stops() {
        struct Forever;
        impl InputSource for Forever {
            fn read(&mut self, _: &mut [u8], timeout: Duration) -> io::Result<Input> {
                std::thread::sleep(timeout.min(Duration::from_millis(5)));
                Ok(Input::Idle)
            }
        }
        let serial = serial();
        let control = VmControl::new();
        let t = {
            let (serial, control) = (serial.clone(), control.clone());
            std::thread::spawn(move || forward(&mut Forever, &serial, &control))
        };
        control.request_stop(StopReason::PowerOff);
        t.join().unwrap();
    }

    #[test]
    fn reads_a_pipe_until_it_closes() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let (reader, mut writer) = io::pipe().unwrap();
        let mut input = FdInput(reader.as_raw_fd());
        let mut buf = [0u8; 16];
        let idle = input.read(&mut buf, Duration::from_millis(1)).unwrap();
        assert_eq!(idle, Input::Idle);
        writer.write_all(b"ab").unwrap();
        assert_eq!(input.read(&mut buf, IDLE_POLL).unwrap(), Input::Data(2));
        assert_eq!(&buf[..2], b"ab");
        writer.write_all(b"\x01x").unwrap();
        drop(writer);
        let serial = serial();
        let control = VmControl::new();
        forward(&mut input, &serial, &control);
        assert_eq!(control.reason(), Some(StopReason::ConsoleEscape));
    }

    #[test]
    fn closed_pipe_is_end_of_input() {
        use std::os::fd::AsRawFd;
        let (reader, writer) = io::pipe().unwrap();
        drop(writer);
        let mut input = FdInput(reader.as_raw_fd());
        assert_eq!(input.read(&mut [0; 4], IDLE_POLL).unwrap(), Input::Eof);
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
