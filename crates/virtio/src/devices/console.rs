//! virtio-console (virtio 1.x §5.3): one port, `hvc0` in the guest. What
//! the guest writes goes to stdout or a file; host input (stdin, when no
//! other console reads it) fills the guest's receive buffers. No
//! multiport, no console size, no emergency write.
//!
//! Host input waits in a bounded buffer while the guest gives no receive
//! buffers; when that is full, stdin is not read until the guest catches up.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueT};

use crate::config::ConsoleConfig;
use crate::device::{
    ActivateError, Activation, BACKEND_TOKEN_BASE, GuestRam, Interrupt, VirtioDevice, device_type,
    feature,
};
use crate::queue;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const INPUT_TOKEN: u32 = BACKEND_TOKEN_BASE;
/// Host input held for the guest at most.
const INPUT_MAX: usize = 64 * 1024;
/// Bytes moved per host call, whatever a descriptor claims.
const CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("virtio console: {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("virtio console: stdin: {0}")]
    Stdin(std::io::Error),
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ConsoleCounters {
    /// Guest bytes written out.
    pub tx_bytes: u64,
    /// Host bytes given to the guest.
    pub rx_bytes: u64,
    /// Output the host could not take (it is dropped, the guest goes on).
    pub write_fails: u64,
    /// Descriptor chains that could not be read or written.
    pub bad_descriptors: u64,
}

struct Active {
    ram: GuestRam,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
}

pub struct Console {
    output: Box<dyn Write + Send>,
    input: Option<File>,
    /// Whether `input` is in epoll now.
    input_watched: bool,
    input_eof: bool,
    pending: VecDeque<u8>,
    active: Option<Active>,
    buf: Vec<u8>,
    pub counters: ConsoleCounters,
}

impl Console {
    /// The console a configuration asks for. `stdin_free` says whether
    /// stdin is this console's to read (not COM1's).
    pub fn from_config(config: &ConsoleConfig, stdin_free: bool) -> Result<Self, ConsoleError> {
        match config {
            ConsoleConfig::Stdio => {
                let input = if stdin_free {
                    Some(
                        std::io::stdin()
                            .as_fd_owned()
                            .map_err(ConsoleError::Stdin)?,
                    )
                } else {
                    None
                };
                Ok(Console::new(Box::new(std::io::stdout()), input))
            }
            ConsoleConfig::File(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ConsoleError::Open {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Console::new(Box::new(f), None))
            }
        }
    }

    /// Guest output to `output`; host input read from `input` (read only
    /// when epoll says it is readable, so it may stay blocking).
    pub fn new(output: Box<dyn Write + Send>, input: Option<OwnedFd>) -> Self {
        Console {
            output,
            input: input.map(File::from),
            input_watched: false,
            input_eof: false,
            pending: VecDeque::new(),
            active: None,
            buf: vec![0; CHUNK],
            counters: ConsoleCounters::default(),
        }
    }

    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let (buf, output, counters) = (&mut self.buf, &mut self.output, &mut self.counters);
        let mem = &a.ram.mem;
        queue::drain(&mut a.tx, &a.ram, &a.interrupt, |chain| {
            let Ok(mut r) = chain.reader(mem) else {
                counters.bad_descriptors += 1;
                return Some(0);
            };
            loop {
                let n = match r.read(buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Err(e) = output.write_all(&buf[..n]) {
                    tracing::debug!("virtio console: output: {e}");
                    counters.write_fails += 1;
                }
                counters.tx_bytes += n as u64;
            }
            let _ = output.flush();
            Some(0)
        });
    }

    fn process_rx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while !self.pending.is_empty() {
            let Some(chain) = queue::pop(&mut a.rx, &a.ram, &a.interrupt) else {
                break;
            };
            let head = chain.head_index();
            let n = match chain.clone().writer(&a.ram.mem) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(self.pending.len());
                    let (front, back) = self.pending.as_slices();
                    let k = n.min(front.len());
                    let ok =
                        w.write_all(&front[..k]).is_ok() && w.write_all(&back[..n - k]).is_ok();
                    if ok {
                        self.pending.drain(..n);
                        self.counters.rx_bytes += n as u64;
                        queue::note_writes(&a.ram, &chain);
                        n
                    } else {
                        self.counters.bad_descriptors += 1;
                        0
                    }
                }
                Err(_) => {
                    self.counters.bad_descriptors += 1;
                    0
                }
            };
            if let Err(e) = a.rx.add_used(&a.ram.mem, head, n as u32) {
                tracing::warn!("virtio console: rx queue: {e:?}");
                a.interrupt.set_needs_reset();
                break;
            }
            used = true;
        }
        if used {
            queue::signal_used(&mut a.rx, &a.ram, &a.interrupt);
        }
    }

    /// Reads what the host typed, as far as the buffer has room.
    fn read_input(&mut self) {
        let Some(input) = self.input.as_mut() else {
            return;
        };
        let room = INPUT_MAX - self.pending.len();
        let want = room.min(self.buf.len());
        if want == 0 {
            return;
        }
        match input.read(&mut self.buf[..want]) {
            Ok(0) => self.input_eof = true,
            Ok(n) => self.pending.extend(&self.buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
            Err(e) => {
                tracing::debug!("virtio console: input: {e}");
                self.input_eof = true;
            }
        }
    }

    /// Watches the input while there is room for it.
    fn sync(&mut self, ops: &mut EventOps) {
        let Some(input) = &self.input else {
            return;
        };
        let want = !self.input_eof && self.pending.len() < INPUT_MAX;
        if want == self.input_watched {
            return;
        }
        let fd = input.as_raw_fd();
        if want {
            if let Err(e) = ops.add(Events::with_data_raw(fd, INPUT_TOKEN, EventSet::IN)) {
                // /dev/null or a regular file: nothing to wait for.
                tracing::debug!("virtio console: input cannot be watched: {e:?}");
                self.input_eof = true;
                return;
            }
        } else {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        self.input_watched = want;
    }
}

/// `Stdin::as_fd().try_clone_to_owned()`, named for what it is for.
trait AsFdOwned {
    fn as_fd_owned(&self) -> std::io::Result<OwnedFd>;
}

impl AsFdOwned for std::io::Stdin {
    fn as_fd_owned(&self) -> std::io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned()
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }
    fn features(&self) -> u64 {
        feature::RING_INDIRECT_DESC | feature::RING_EVENT_IDX
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (no VIRTIO_CONSOLE_F_SIZE), max_nr_ports 1, emerg_wr.
        let mut c = [0u8; 12];
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        let mut queues = act.queues.into_iter();
        let rx = queues
            .next()
            .filter(QueueT::ready)
            .ok_or(ActivateError::QueueNotReady(RX))?;
        let tx = queues
            .next()
            .filter(QueueT::ready)
            .ok_or(ActivateError::QueueNotReady(TX))?;
        self.active = Some(Active {
            ram: act.ram,
            rx,
            tx,
            interrupt: act.interrupt,
        });
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn init_backend(&mut self, ops: &mut EventOps) {
        self.sync(ops);
    }
    fn queue_notified(&mut self, index: usize, ops: &mut EventOps) {
        match index {
            TX => self.process_tx(),
            _ => self.process_rx(),
        }
        self.sync(ops);
    }
    fn backend_event(&mut self, token: u32, _events: EventSet, ops: &mut EventOps) {
        if token == INPUT_TOKEN {
            self.read_input();
            self.process_rx();
        }
        self.sync(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmplay_hypervisor::{GuestMemory, IrqLine};

    struct NoIrq;
    impl IrqLine for NoIrq {
        fn pulse(&self) {}
        fn set_level(&self, _: bool) {}
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Queue `q`'s rings at 0x1000 * (1 + 3q); buffers from 1 MiB.
    fn activate(c: &mut Console, mem: &GuestMemory) {
        let mut queues = Vec::new();
        for i in 0..2u64 {
            let base = 0x1000 * (1 + 3 * i);
            let mut q = Queue::new(QUEUE_SIZE).unwrap();
            q.set_size(QUEUE_SIZE);
            q.set_desc_table_address(Some(base as u32), Some(0));
            q.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
            q.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
            q.set_ready(true);
            queues.push(q);
        }
        c.activate(Activation {
            ram: GuestRam::new(mem.clone(), None),
            queues,
            interrupt: Arc::new(Interrupt::new(Arc::new(NoIrq))),
            features: 0,
        })
        .unwrap();
    }

    /// One single-descriptor chain in queue `q` (the `n`th added there).
    fn push(mem: &GuestMemory, q: u64, n: u16, addr: u64, len: u32, write: bool) {
        let base = 0x1000 * (1 + 3 * q);
        let d = GuestAddress(base + 16 * u64::from(n));
        mem.write_obj(addr, d).unwrap();
        mem.write_obj(len, d.unchecked_add(8)).unwrap();
        mem.write_obj(if write { 2u16 } else { 0 }, d.unchecked_add(12))
            .unwrap();
        mem.write_obj(n, GuestAddress(base + 0x1000 + 4 + 2 * u64::from(n)))
            .unwrap();
        mem.write_obj(n + 1, GuestAddress(base + 0x1000 + 2))
            .unwrap();
    }

    fn used_len(mem: &GuestMemory, q: u64, n: u16) -> Option<u32> {
        let used = 0x1000 * (1 + 3 * q) + 0x2000;
        let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
        (idx > n).then(|| {
            mem.read_obj(GuestAddress(used + 4 + 8 * u64::from(n) + 4))
                .unwrap()
        })
    }

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    #[test]
    fn guest_output_reaches_the_host_and_host_input_the_guest() {
        let mem = mem();
        let sink = Sink::default();
        let (host, dev_end) = UnixStream::pair().unwrap();
        let mut c = Console::new(Box::new(sink.clone()), Some(OwnedFd::from(dev_end)));
        activate(&mut c, &mem);
        mem.write_slice(b"hello hvc0\n", GuestAddress(0x10_0000))
            .unwrap();
        push(&mem, TX as u64, 0, 0x10_0000, 11, false);
        c.process_tx();
        assert_eq!(&*sink.0.lock().unwrap(), b"hello hvc0\n");
        assert_eq!(used_len(&mem, TX as u64, 0), Some(0));

        (&host).write_all(b"typed\n").unwrap();
        c.read_input();
        // No receive buffer yet: the input waits.
        c.process_rx();
        assert_eq!(used_len(&mem, RX as u64, 0), None);
        push(&mem, RX as u64, 0, 0x11_0000, 4, true);
        push(&mem, RX as u64, 1, 0x12_0000, 64, true);
        c.process_rx();
        assert_eq!(used_len(&mem, RX as u64, 0), Some(4));
        assert_eq!(used_len(&mem, RX as u64, 1), Some(2));
        let mut got = [0u8; 6];
        mem.read_slice(&mut got[..4], GuestAddress(0x11_0000))
            .unwrap();
        mem.read_slice(&mut got[4..], GuestAddress(0x12_0000))
            .unwrap();
        assert_eq!(&got, b"typed\n");
        assert_eq!((c.counters.tx_bytes, c.counters.rx_bytes), (11, 6));
    }

    #[test]
    fn host_input_is_bounded_while_the_guest_does_not_read() {
        let mem = mem();
        let (host, dev_end) = UnixStream::pair().unwrap();
        host.set_nonblocking(true).unwrap();
        let mut c = Console::new(Box::new(Sink::default()), Some(OwnedFd::from(dev_end)));
        activate(&mut c, &mem);
        let chunk = [b'x'; 4096];
        let mut written = 0;
        while written < 4 * INPUT_MAX {
            match (&host).write(&chunk) {
                Ok(n) => written += n,
                Err(_) => {
                    let before = c.pending.len();
                    c.read_input();
                    if c.pending.len() == before {
                        break;
                    }
                }
            }
        }
        assert_eq!(c.pending.len(), INPUT_MAX);
    }

    #[test]
    fn fuzz_random_descriptors_never_panic() {
        let mem = mem();
        let mut c = Console::new(Box::new(std::io::sink()), None);
        activate(&mut c, &mem);
        c.pending.extend([1u8; 1000]);
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5000 {
            let q = next() % 2;
            let base = 0x1000 * (1 + 3 * q);
            let d = GuestAddress(base + 16 * (next() % 256));
            mem.write_obj(next(), d).unwrap();
            mem.write_obj(next() as u32, d.unchecked_add(8)).unwrap();
            mem.write_obj(next() as u16 & 7, d.unchecked_add(12))
                .unwrap();
            mem.write_obj(next() as u16, d.unchecked_add(14)).unwrap();
            mem.write_obj(
                next() as u16,
                GuestAddress(base + 0x1000 + 4 + 2 * (next() % 256)),
            )
            .unwrap();
            mem.write_obj(next() as u16, GuestAddress(base + 0x1000 + 2))
                .unwrap();
            if q == TX as u64 {
                c.process_tx();
            } else {
                c.pending.extend([2u8; 100]);
                c.pending.truncate(INPUT_MAX);
                c.process_rx();
            }
        }
        assert!(c.pending.len() <= INPUT_MAX);
    }
}
