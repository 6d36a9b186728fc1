//! COM1's input on the event loop (`--serial stdio`): stdin is one more
//! fd the `vmm` thread watches, as Firecracker's serial input is. Bytes go
//! through the console escape (Ctrl-A x stops the VM with
//! [`StopReason::ConsoleEscape`], Ctrl-A Ctrl-A sends one Ctrl-A) into
//! the UART's receive FIFO. What does not fit is held and offered again
//! every few milliseconds from a timer; stdin is not read further while
//! [`MAX_HELD`] bytes wait, and nothing is dropped. End of input ends
//! forwarding, not the VM. A stdin epoll cannot watch (a regular file,
//! `/dev/null`) is read from the timer instead. While the loop is paused
//! no input is taken.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;
use vmplay_devices::Serial;
use vmplay_devices::console::{EscapeParser, Step};
use vmplay_devices::control::{StopReason, VmControl};

/// How often held input is offered again (the guest gives no signal when
/// it drains its FIFO).
const RETRY: Duration = Duration::from_millis(2);
/// Input held beyond the FIFO before stdin is left unread.
pub const MAX_HELD: usize = 64 * 1024;

const INPUT: u32 = 0;
const TIMER: u32 = 1;

/// The subscriber: one input fd and one retry timer.
pub struct SerialInput {
    input: File,
    serial: Arc<Mutex<Serial>>,
    control: Arc<VmControl>,
    parser: EscapeParser,
    held: VecDeque<u8>,
    timer: TimerFd,
    timer_armed: bool,
    /// epoll accepts the input fd (a TTY, pipe or socket).
    pollable: bool,
    watched: bool,
    ended: bool,
    buf: Vec<u8>,
}

impl SerialInput {
    /// Forwards the process's stdin to `serial`.
    pub fn stdin(
        serial: Arc<Mutex<Serial>>,
        control: Arc<VmControl>,
    ) -> std::io::Result<SerialInput> {
        let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
        SerialInput::new(fd, serial, control)
    }

    /// Forwards what `input` gives to `serial`.
    pub fn new(
        input: OwnedFd,
        serial: Arc<Mutex<Serial>>,
        control: Arc<VmControl>,
    ) -> std::io::Result<SerialInput> {
        Ok(SerialInput {
            input: File::from(input),
            serial,
            control,
            parser: EscapeParser::default(),
            held: VecDeque::new(),
            timer: TimerFd::new()?,
            timer_armed: false,
            pollable: true,
            watched: false,
            ended: false,
            buf: vec![0; 1024],
        })
    }

    /// Reads once and parses what came.
    fn read_input(&mut self) {
        if self.ended || self.held.len() >= MAX_HELD {
            return;
        }
        let n = match self.input.read(&mut self.buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading stdin failed; console input ends");
                0
            }
        };
        if n == 0 {
            tracing::debug!("console input ended");
            self.held.extend(self.parser.finish());
            self.ended = true;
            return;
        }
        for i in 0..n {
            match self.parser.feed(self.buf[i]) {
                Step::Hold => {}
                Step::Send(b) => self.held.push_back(b),
                Step::SendTwo(a, b) => self.held.extend([a, b]),
                Step::Quit => {
                    self.control.request_stop(StopReason::ConsoleEscape);
                    self.ended = true;
                    return;
                }
            }
        }
    }

    /// Moves held bytes into the UART's FIFO, as many as fit.
    fn deliver(&mut self) {
        while !self.held.is_empty() {
            let (front, _) = self.held.as_slices();
            let n = self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(front);
            if n == 0 {
                break;
            }
            self.held.drain(..n);
        }
    }

    /// Watches stdin while there is room for more, and keeps the timer
    /// armed while bytes wait or an unpollable input has more to give.
    fn sync(&mut self, ops: &mut EventOps) {
        let want = self.pollable && !self.ended && self.held.len() < MAX_HELD;
        if want != self.watched {
            let fd = self.input.as_raw_fd();
            if want {
                match ops.add(Events::with_data_raw(fd, INPUT, EventSet::IN)) {
                    Ok(()) => self.watched = true,
                    Err(e) => {
                        tracing::debug!("console input cannot be watched, polled instead: {e:?}");
                        self.pollable = false;
                    }
                }
            } else {
                let _ = ops.remove(Events::empty_raw(fd));
                self.watched = false;
            }
        }
        let need_timer = !self.held.is_empty() || (!self.pollable && !self.ended);
        if need_timer && !self.timer_armed {
            match self.timer.reset(RETRY, None) {
                Ok(()) => self.timer_armed = true,
                Err(e) => tracing::warn!("console input: cannot arm its timer: {e}"),
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.timer, TIMER, EventSet::IN)) {
            tracing::error!("console input: cannot watch its timer: {e:?}");
        }
        self.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            INPUT => self.read_input(),
            _ => {
                let _ = self.timer.wait();
                self.timer_armed = false;
                if !self.pollable {
                    self.read_input();
                }
            }
        }
        self.deliver();
        self.sync(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventLoop;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;
    use vmplay_devices::BusDevice;

    struct NoIrq;
    impl vmplay_hypervisor::IrqLine for NoIrq {
        fn pulse(&self) {}
        fn set_level(&self, _: bool) {}
    }

    fn serial() -> Arc<Mutex<Serial>> {
        Arc::new(Mutex::new(Serial::new(
            Arc::new(NoIrq),
            Box::new(std::io::sink()),
        )))
    }

    /// What the guest would read from the receive FIFO now.
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

    /// A loop with the forwarder reading the far end of a socket pair.
    fn rig() -> (
        UnixStream,
        Arc<Mutex<Serial>>,
        Arc<VmControl>,
        crate::EventLoopHandle,
    ) {
        let (host, input) = UnixStream::pair().unwrap();
        let serial = serial();
        let control = VmControl::new();
        let mut el = EventLoop::new().unwrap();
        let fwd = SerialInput::new(input.into(), serial.clone(), control.clone()).unwrap();
        el.add_subscriber(Arc::new(Mutex::new(fwd)));
        (host, serial, control, el.start().unwrap())
    }

    fn until(mut what: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn input_reaches_the_fifo_through_the_escape() {
        let (mut host, serial, control, _loop) = rig();
        host.write_all(b"ls\r\x01\x01").unwrap();
        let mut got = Vec::new();
        assert!(until(|| {
            got.extend(drain(&serial));
            got == b"ls\r\x01"
        }));
        // End of input: a dangling Ctrl-A goes as typed; the VM runs on.
        host.write_all(b"\x01").unwrap();
        drop(host);
        assert!(until(|| {
            got.extend(drain(&serial));
            got == b"ls\r\x01\x01"
        }));
        assert!(!control.is_stopping());
    }

    #[test]
    fn ctrl_a_x_stops_the_vm() {
        let (mut host, serial, control, _loop) = rig();
        host.write_all(b"a\x01\x01b\x01").unwrap();
        host.write_all(b"xyz").unwrap();
        assert!(until(|| control.is_stopping()));
        assert_eq!(control.reason(), Some(StopReason::ConsoleEscape));
        assert_eq!(drain(&serial), b"a\x01b");
    }

    #[test]
    fn input_beyond_the_fifo_waits_for_the_guest_and_is_not_lost() {
        let (mut host, serial, _control, _loop) = rig();
        let text: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
        host.write_all(&text).unwrap();
        let mut got = Vec::new();
        assert!(until(|| {
            got.extend(drain(&serial));
            got.len() >= text.len()
        }));
        assert_eq!(got, text);
    }

    #[test]
    fn the_escape_works_while_the_guest_is_not_reading() {
        let (mut host, _serial, control, _loop) = rig();
        host.write_all(&[b'z'; 1000]).unwrap();
        host.write_all(b"\x01x").unwrap();
        assert!(until(|| control.is_stopping()));
        assert_eq!(control.reason(), Some(StopReason::ConsoleEscape));
    }

    #[test]
    fn a_regular_file_is_read_from_the_timer() {
        let path = std::env::temp_dir().join(format!("vmplay-serial-in-{}", std::process::id()));
        std::fs::write(&path, b"from a file\n").unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let serial = serial();
        let mut el = EventLoop::new().unwrap();
        let fwd = SerialInput::new(file.into(), serial.clone(), VmControl::new()).unwrap();
        el.add_subscriber(Arc::new(Mutex::new(fwd)));
        let _loop = el.start().unwrap();
        let mut got = Vec::new();
        assert!(until(|| {
            got.extend(drain(&serial));
            got == b"from a file\n"
        }));
    }
}
