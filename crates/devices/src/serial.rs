//! COM1: a 16550A UART, the guest's console.
//!
//! The register model is vm-superio's (the one Firecracker uses); this
//! module connects it to an [`IrqLine`], to the host output, and to the
//! input plumbing in [`console`](crate::console).

use std::convert::Infallible;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_superio::Trigger;
use vm_superio::serial::{Error as UartError, SerialEvents};
use vmplay_hypervisor::IrqLine;

use crate::access::{read_bytes, write_bytes};
use crate::bus::BusDevice;

/// The UART's 8 registers, from the base port.
pub const SERIAL_PORTS: u64 = 8;
/// Transmit holding register (write) / receive buffer (read).
const THR: u64 = 0;
/// Line status register: what a polling driver reads before each byte.
const LSR: u64 = 5;

/// Pending output is written at the latest once it reaches this size...
const FLUSH_BYTES: usize = 4096;
/// ...or once it has waited this long and the guest reads LSR again.
const FLUSH_AGE: Duration = Duration::from_millis(10);

/// Adapts an [`IrqLine`] to vm-superio's [`Trigger`] by pulsing the line.
///
/// A pulse, not a level: vm-superio calls `trigger` when an interrupt
/// condition becomes pending but never says when it clears (an IIR read
/// clears it inside the crate), so a level could not be lowered at the
/// right moment. One pulse per trigger is what Firecracker and Cloud
/// Hypervisor do with an irqfd, and it matches the PC: ISA IRQ 4 is
/// edge-triggered on the 8259 and, by default, on the IOAPIC. Linux's 8250
/// driver loops on IIR until nothing is pending, so it does not lose edges.
struct IrqTrigger(Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.pulse();
        Ok(())
    }
}

/// Holds guest output until a burst ends, so a line costs one host write
/// instead of one per byte.
///
/// vm-superio writes and flushes after every byte, so `flush` here is a
/// no-op; [`Serial`] decides when a burst has ended (see its docs).
/// Host write errors are logged and the bytes dropped: a broken pipe on the
/// host must not stall the guest's console.
struct OutputBuffer {
    sink: Box<dyn Write + Send>,
    pending: Vec<u8>,
    /// When the oldest pending byte arrived.
    since: Option<Instant>,
    /// A host write failed and was reported; quiet until one succeeds.
    failing: bool,
}

impl OutputBuffer {
    fn new(sink: Box<dyn Write + Send>) -> Self {
        Self {
            sink,
            pending: Vec::with_capacity(FLUSH_BYTES),
            since: None,
            failing: false,
        }
    }

    /// Writes every pending byte to the host.
    fn push(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let result = self
            .sink
            .write_all(&self.pending)
            .and_then(|()| self.sink.flush());
        match result {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                tracing::warn!(error = %e, lost = self.pending.len(), "serial output failed; dropping guest output");
                self.failing = true;
            }
            Err(_) => {}
        }
        self.pending.clear();
        self.since = None;
    }

    /// Pushes the pending bytes if the oldest has waited [`FLUSH_AGE`].
    fn push_if_stale(&mut self) {
        if self.since.is_some_and(|t| t.elapsed() >= FLUSH_AGE) {
            self.push();
        }
    }
}

impl Write for OutputBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pending.is_empty() {
            self.since = Some(Instant::now());
        }
        self.pending.extend_from_slice(buf);
        if self.pending.len() >= FLUSH_BYTES || buf.contains(&b'\n') {
            self.push();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for OutputBuffer {
    fn drop(&mut self) {
        self.push();
    }
}

/// A 16550A UART with a 64-byte receive FIFO, at 8 consecutive ports.
///
/// Output goes to the host in bursts: pending bytes are written at a
/// newline, at 4 KiB, when the guest touches any register other than THR
/// (write) or LSR (read) — Linux's 8250 driver writes IER at the end of
/// every console message and every transmit run —, when the guest polls
/// LSR and the oldest pending byte is 10 ms old, before input is queued,
/// on [`Serial::flush_output`], and on drop. A guest that prints a partial
/// line and then never touches the UART again keeps it pending until the
/// machine calls `flush_output` or drops the device.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, UartEvents, OutputBuffer>,
}

/// What the guest did with the UART, as Firecracker's `uart` metrics
/// group counts it (vm-superio's `SerialEvents`).
#[derive(Debug, Default)]
pub struct UartCounters {
    /// Bytes the guest read from the receive buffer.
    pub read_count: std::sync::atomic::AtomicU64,
    /// Bytes the guest wrote that reached the output.
    pub write_count: std::sync::atomic::AtomicU64,
    /// Bytes the guest wrote that the output lost.
    pub missed_write_count: std::sync::atomic::AtomicU64,
}

impl UartCounters {
    /// (field, value) in Firecracker's names.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        vec![
            ("read_count", self.read_count.load(Relaxed)),
            ("write_count", self.write_count.load(Relaxed)),
            ("missed_write_count", self.missed_write_count.load(Relaxed)),
        ]
    }
}

/// Counts the UART's events into [`UartCounters`].
pub struct UartEvents(Arc<UartCounters>);

impl SerialEvents for UartEvents {
    fn buffer_read(&self) {
        self.0
            .read_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn out_byte(&self) {
        self.0
            .write_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.0
            .missed_write_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {}
}

impl Serial {
    /// A UART raising `irq` and writing the guest's output to `output`.
    pub fn new(irq: Arc<dyn IrqLine>, output: Box<dyn Write + Send>) -> Serial {
        Serial {
            uart: vm_superio::Serial::with_events(
                IrqTrigger(irq),
                UartEvents(Arc::default()),
                OutputBuffer::new(output),
            ),
        }
    }

    /// The UART's counters (shared: they keep counting).
    pub fn counters(&self) -> Arc<UartCounters> {
        self.uart.events().0.clone()
    }

    /// Queues host input for the guest. Takes what fits in the receive FIFO
    /// and returns how many bytes that was; the caller keeps the rest and
    /// retries once the guest has read some (nothing is dropped here).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        // Input usually answers output: show the user what the guest said.
        self.flush_output();
        if bytes.is_empty() {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(UartError::FullFifo) => 0,
            // Our trigger cannot fail and enqueueing does no I/O.
            Err(UartError::Trigger(never)) => match never {},
            Err(UartError::IOError(e)) => {
                tracing::warn!(error = %e, "serial input failed");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_space(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Writes any pending guest output to the host now.
    pub fn flush_output(&mut self) {
        self.uart.writer_mut().push();
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |off| {
            if off >= SERIAL_PORTS {
                return 0xff;
            }
            let value = self.uart.read(off as u8);
            if off == LSR {
                self.uart.writer_mut().push_if_stale();
            } else {
                self.flush_output();
            }
            value
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(offset, data, |off, value| {
            if off >= SERIAL_PORTS {
                return;
            }
            // Output errors are handled by OutputBuffer; the trigger is
            // infallible, so nothing can come back here.
            if let Err(e) = self.uart.write(off as u8, value) {
                tracing::warn!(error = %e, "serial register write failed");
            }
            if off != THR {
                self.flush_output();
            }
        });
    }
}

/// Where the guest's serial output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The host's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Nowhere.
    Sink,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot create serial output file {}: {source}", path.display())]
    CreateOutput { path: PathBuf, source: io::Error },
}

impl SerialOutput {
    /// Opens the destination, ready for [`Serial::new`].
    pub fn open(&self) -> Result<Box<dyn Write + Send>, SerialError> {
        Ok(match self {
            SerialOutput::Stdout => Box::new(io::stdout()),
            SerialOutput::File(path) => {
                let file =
                    std::fs::File::create(path).map_err(|source| SerialError::CreateOutput {
                        path: path.clone(),
                        source,
                    })?;
                Box::new(file)
            }
            SerialOutput::Sink => Box::new(io::sink()),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts pulses.
    #[derive(Default)]
    pub(crate) struct CountingIrq(pub(crate) AtomicUsize);

    impl IrqLine for CountingIrq {
        fn pulse(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn set_level(&self, _high: bool) {}
    }

    /// A host output the test can inspect: the bytes and each write call.
    #[derive(Clone, Default)]
    pub(crate) struct Capture(pub(crate) Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut c = self.0.lock().unwrap();
            c.0.extend_from_slice(buf);
            c.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        pub(crate) fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().0.clone()
        }
        fn writes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    fn serial() -> (Serial, Arc<CountingIrq>, Capture) {
        let irq = Arc::new(CountingIrq::default());
        let out = Capture::default();
        (Serial::new(irq.clone(), Box::new(out.clone())), irq, out)
    }

    /// The guest transmits `bytes`, one `out` to THR each.
    fn put(s: &mut Serial, bytes: &[u8]) {
        for &b in bytes {
            s.write(THR, &[b]);
        }
    }

    fn read(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0u8];
        s.read(off, &mut b);
        b[0]
    }

    #[test]
    fn a_line_reaches_the_host_in_one_write() {
        let (mut s, _, out) = serial();
        for &b in b"hello\n" {
            assert_ne!(read(&mut s, LSR) & 0x20, 0, "THR empty");
            s.write(THR, &[b]);
        }
        assert_eq!(out.bytes(), b"hello\n");
        assert_eq!(out.writes(), 1);
    }

    #[test]
    fn partial_line_is_flushed_when_the_guest_writes_ier() {
        let (mut s, _, out) = serial();
        put(&mut s, b"# ");
        assert!(out.bytes().is_empty(), "both bytes still pending");
        s.write(1, &[0]);
        assert_eq!(out.bytes(), b"# ");
    }

    #[test]
    fn partial_line_is_flushed_after_a_while_of_lsr_polling() {
        let (mut s, _, out) = serial();
        put(&mut s, b"$");
        read(&mut s, LSR);
        assert!(out.bytes().is_empty());
        std::thread::sleep(FLUSH_AGE + Duration::from_millis(2));
        read(&mut s, LSR);
        assert_eq!(out.bytes(), b"$");
    }

    #[test]
    fn pending_output_is_flushed_on_drop_and_before_input() {
        let (mut s, _, out) = serial();
        put(&mut s, b"a");
        s.enqueue_input(b"");
        assert_eq!(out.bytes(), b"a");
        put(&mut s, b"b");
        drop(s);
        assert_eq!(out.bytes(), b"ab");
    }

    #[test]
    fn input_respects_fifo_capacity_and_raises_rx_interrupt() {
        let (mut s, irq, _) = serial();
        s.write(1, &[0x01]); // IER: received data available
        let input: Vec<u8> = (0..100).collect();
        let n = s.enqueue_input(&input);
        assert_eq!(n, 64);
        assert_eq!(s.input_space(), 0);
        assert_eq!(s.enqueue_input(&input[n..]), 0);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(read(&mut s, LSR) & 1, 1, "data ready");
        for i in 0..64 {
            assert_eq!(read(&mut s, THR), i);
        }
        assert_eq!(read(&mut s, LSR) & 1, 0);
        assert_eq!(s.enqueue_input(&input[n..]), 36);
        assert_eq!(read(&mut s, THR), 64);
    }

    #[test]
    fn thr_empty_interrupt_pulses_the_line() {
        let (mut s, irq, _) = serial();
        s.write(1, &[0x02]); // IER: THR empty
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(read(&mut s, 2) & 0x0f, 0x02, "IIR says THR empty");
        s.write(THR, b"x");
        assert_eq!(irq.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn wide_access_splits_into_register_bytes() {
        let (mut s, _, out) = serial();
        // A 16-bit write at offset 6 sets MSR (ignored) and the scratch register.
        s.write(6, &[0, 0x5a]);
        assert_eq!(read(&mut s, 7), 0x5a);
        // Bytes past the last register vanish and read as all-ones.
        s.write(7, &[0x11, 0x22]);
        assert_eq!(read(&mut s, 7), 0x11);
        let mut wide = [0u8; 2];
        s.read(7, &mut wide);
        assert_eq!(wide, [0x11, 0xff]);
        assert!(out.bytes().is_empty());
    }

    #[test]
    fn host_write_errors_drop_output_without_failing_the_guest() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut s = Serial::new(Arc::new(CountingIrq::default()), Box::new(Broken));
        put(&mut s, b"lost\n");
        assert_ne!(read(&mut s, LSR) & 0x20, 0);
    }

    #[test]
    fn file_output_error_names_the_path() {
        let path = PathBuf::from("/nonexistent-dir/serial.log");
        let Err(err) = SerialOutput::File(path).open() else {
            panic!("opened a file in a missing directory");
        };
        assert!(
            err.to_string().contains("/nonexistent-dir/serial.log"),
            "{err}"
        );
    }

    #[test]
    fn file_output_is_truncated() {
        let path = std::env::temp_dir().join(format!("vmplay-serial-{}.log", std::process::id()));
        std::fs::write(&path, b"old contents").unwrap();
        let out = SerialOutput::File(path.clone()).open().unwrap();
        let mut s = Serial::new(Arc::new(CountingIrq::default()), out);
        put(&mut s, b"new\n");
        drop(s);
        assert_eq!(std::fs::read(&path).unwrap(), b"new\n");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn survives_random_accesses() {
        let (mut s, _, _) = serial();
        crate::access::fuzz::hammer(&mut s, SERIAL_PORTS, 0x5e41a1, 20_000);
        s.enqueue_input(&[1; 100]);
    }
}
