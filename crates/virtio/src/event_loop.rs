//! The VMM event loop: one thread that owns device work, as Firecracker's
//! `run_without_api` does. Each device is one event-manager subscriber that
//! watches its queues' notify eventfds and whatever host fds it registers
//! (a TAP, sockets, timers). vCPU threads never do device I/O: a queue
//! notify is an eventfd write, and the device answers here.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::device::VirtioDevice;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Routes a device's events: tokens below its queue count are queue
/// notifies, the rest go to the device's backend handler.
struct DeviceSubscriber {
    device: Arc<Mutex<dyn VirtioDevice>>,
    queue_events: Vec<EventFd>,
}

impl MutEventSubscriber for DeviceSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, fd) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(fd, i as u32, EventSet::IN)) {
                tracing::error!("event loop: cannot watch queue {i}: {e:?}");
            }
        }
        lock(&self.device).init_backend(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        let mut device = lock(&self.device);
        match self.queue_events.get(token as usize) {
            Some(fd) => {
                // Drain first: a notify that races with the work is not lost.
                let _ = fd.read();
                device.queue_notified(token as usize, ops);
            }
            None => device.backend_event(token, events.event_set(), ops),
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops the loop when its eventfd is written.
struct StopSubscriber {
    fd: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!("event loop: cannot watch its stop eventfd: {e:?}");
        }
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.fd.read();
        self.stop.store(true, Ordering::Release);
    }
}

/// Wakes the loop out of `epoll_wait` so it sees a pause request.
struct WakeSubscriber(EventFd);

impl MutEventSubscriber for WakeSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!("event loop: cannot watch its wake eventfd: {e:?}");
        }
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// Pause requests between the VMM and the loop thread.
#[derive(Default)]
struct PauseState {
    /// The VMM wants the loop held.
    requested: bool,
    /// The loop thread is parked: no device work until `requested` clears.
    parked: bool,
    /// The thread has ended.
    finished: bool,
}

#[derive(Default)]
struct Pause {
    state: Mutex<PauseState>,
    changed: Condvar,
}

impl Pause {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// On the loop thread between two rounds: parks while a pause is
    /// requested (or until `stop`).
    fn park_if_requested(&self, stop: &AtomicBool) {
        let mut s = self.lock();
        if !s.requested {
            return;
        }
        s.parked = true;
        self.changed.notify_all();
        while s.requested && !stop.load(Ordering::Acquire) {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked = false;
        self.changed.notify_all();
    }
}

/// Run first on the loop thread, before any device work (where the VMM
/// installs the thread's seccomp filter). If it fails the loop never runs.
pub type LoopThreadHook = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// How long [`EventLoopHandle::pause`] waits for the loop to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("event loop: {0}")]
    Setup(String),
    #[error("event loop thread: {0}")]
    Thread(std::io::Error),
    #[error("event loop thread: {0}")]
    Hook(String),
    #[error("the event loop did not pause within {PAUSE_TIMEOUT:?}")]
    PauseTimeout,
}

/// Collects devices, then runs them on their own thread.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    stop_fd: EventFd,
    stop: Arc<AtomicBool>,
    wake_fd: EventFd,
}

impl EventLoop {
    pub fn new() -> Result<Self, EventLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| EventLoopError::Setup(format!("{e:?}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_fd = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| EventLoopError::Setup(format!("eventfd: {e}")))?;
        let sub = StopSubscriber {
            fd: stop_fd
                .try_clone()
                .map_err(|e| EventLoopError::Setup(format!("eventfd: {e}")))?,
            stop: stop.clone(),
        };
        let sub: Subscriber = Arc::new(Mutex::new(sub));
        manager.add_subscriber(sub);
        let wake_fd = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| EventLoopError::Setup(format!("eventfd: {e}")))?;
        let wake = WakeSubscriber(
            wake_fd
                .try_clone()
                .map_err(|e| EventLoopError::Setup(format!("eventfd: {e}")))?,
        );
        manager.add_subscriber(Arc::new(Mutex::new(wake)) as Subscriber);
        Ok(EventLoop {
            manager,
            stop_fd,
            stop,
            wake_fd,
        })
    }

    /// Hands `device` to the loop; `queue_events` are its queues' notify fds.
    pub fn add_device(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        queue_events: &[EventFd],
    ) -> Result<(), EventLoopError> {
        let queue_events = queue_events
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EventLoopError::Setup(format!("eventfd: {e}")))?;
        self.manager
            .add_subscriber(Arc::new(Mutex::new(DeviceSubscriber {
                device,
                queue_events,
            })) as Subscriber);
        Ok(())
    }

    /// Any other subscriber (the console's stdin, timers of the machine).
    pub fn add_subscriber(&mut self, s: Subscriber) {
        self.manager.add_subscriber(s);
    }

    /// Runs ready events on the caller's thread, waiting at most
    /// `timeout_ms` (tests drive devices synchronously with it).
    pub fn run_once(&mut self, timeout_ms: i32) -> Result<usize, EventLoopError> {
        self.manager
            .run_with_timeout(timeout_ms)
            .map_err(|e| EventLoopError::Setup(format!("{e:?}")))
    }

    /// Starts the thread. Dropping the handle stops and joins it.
    pub fn start(self) -> Result<EventLoopHandle, EventLoopError> {
        self.start_with(None)
    }

    /// [`EventLoop::start`], with `on_thread` run first on the loop thread;
    /// returns once it has run, with its error if it failed.
    pub fn start_with(
        self,
        on_thread: Option<LoopThreadHook>,
    ) -> Result<EventLoopHandle, EventLoopError> {
        let EventLoop {
            mut manager,
            stop_fd,
            stop,
            wake_fd,
        } = self;
        let pause = Arc::new(Pause::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (thread_pause, thread_stop) = (pause.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                let hooked = on_thread.map_or(Ok(()), |hook| hook());
                let failed = hooked.is_err();
                let _ = ready_tx.send(hooked);
                if !failed {
                    let mut poll = PollWindow::from_env();
                    while !thread_stop.load(Ordering::Acquire) {
                        if let Err(e) = poll.run(&mut manager) {
                            // EINTR and friends: the loop goes on; anything
                            // persistent would spin, so slow down and say so.
                            tracing::warn!("event loop: {e:?}");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        thread_pause.park_if_requested(&thread_stop);
                    }
                }
                let mut s = thread_pause.lock();
                s.finished = true;
                thread_pause.changed.notify_all();
            })
            .map_err(EventLoopError::Thread)?;
        let handle = EventLoopHandle {
            stop_fd,
            wake_fd,
            stop,
            pause,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(EventLoopError::Hook(e)),
            Err(_) => Err(EventLoopError::Hook("the thread ended early".into())),
        }
    }
}

/// Adaptive polling of the loop (KVM's halt polling, QEMU's AioContext
/// polling): after events that came soon after the previous ones, the
/// loop looks for the next ones for a while before it sleeps in epoll.
/// A sleeping loop thread's wake-up costs a cross-CPU interrupt (tens of
/// µs where the host is itself a VM), paid on every request of a disk
/// doing one request at a time. The window grows while events come
/// within it and closes after a wait longer than the most it may be, so
/// an idle device costs nothing; the poll yields the CPU every turn. (The
/// emu's halted vCPUs poll the same way, `emu::platform::signal`; the
/// two crates share no home below the seam, which holds only traits and
/// plain data.)
struct PollWindow {
    ns: u64,
    max_ns: u64,
}

/// The first window after a short wait.
const POLL_START_NS: u64 = 10_000;
/// The widest window: a guest's turnaround between two requests of a
/// sequential read, while its request path is still interpreted.
const POLL_MAX_NS: u64 = 1_000_000;

impl PollWindow {
    /// The window of at most `VMPLAY_EVENT_POLL_US` µs if set (0: never
    /// poll), else [`POLL_MAX_NS`].
    fn from_env() -> PollWindow {
        let max_ns = std::env::var("VMPLAY_EVENT_POLL_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(POLL_MAX_NS, |us| us.saturating_mul(1000));
        PollWindow::new(max_ns)
    }

    fn new(max_ns: u64) -> PollWindow {
        PollWindow { ns: 0, max_ns }
    }

    /// Runs one round of events: polls for up to the window, then
    /// sleeps in epoll.
    fn run(&mut self, manager: &mut EventManager<Subscriber>) -> Result<(), event_manager::Error> {
        let start = Instant::now();
        if self.ns > 0 {
            loop {
                if manager.run_with_timeout(0)? > 0 {
                    self.ns = self.grown();
                    return Ok(());
                }
                if start.elapsed().as_nanos() as u64 >= self.ns {
                    break;
                }
                std::thread::yield_now();
            }
        }
        manager.run()?;
        let waited = start.elapsed().as_nanos() as u64;
        self.ns = if waited > self.max_ns {
            0
        } else {
            self.grown()
        };
        Ok(())
    }

    fn grown(&self) -> u64 {
        (self.ns * 2).max(POLL_START_NS).min(self.max_ns)
    }
}

/// The running loop.
pub struct EventLoopHandle {
    stop_fd: EventFd,
    wake_fd: EventFd,
    stop: Arc<AtomicBool>,
    pause: Arc<Pause>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoopHandle {
    /// The loop thread's id, for per-thread policies (seccomp).
    pub fn thread(&self) -> Option<&std::thread::Thread> {
        self.thread.as_ref().map(|t| t.thread())
    }

    /// Holds all device work: returns once the loop thread has finished
    /// its current round and parked. Until [`EventLoopHandle::resume`] no
    /// queue is processed and no host input (TAP, sockets, timers, stdin)
    /// reaches the guest; events that arrive meanwhile wait in epoll.
    pub fn pause(&self) -> Result<(), EventLoopError> {
        let mut s = self.pause.lock();
        s.requested = true;
        let _ = self.wake_fd.write(1);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while !s.parked && !s.finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(EventLoopError::PauseTimeout);
            }
            s = self
                .pause
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets the loop run again; pending events are handled at once.
    pub fn resume(&self) {
        let mut s = self.pause.lock();
        s.requested = false;
        self.pause.changed.notify_all();
    }

    /// Whether the loop thread is parked by [`EventLoopHandle::pause`].
    pub fn is_paused(&self) -> bool {
        self.pause.lock().parked
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        let _ = self.stop_fd.write(1);
        // A parked loop wakes to see the stop.
        self.stop.store(true, Ordering::Release);
        self.resume();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl AsRawFd for EventLoopHandle {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stop_fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the writes to its eventfd.
    struct Counter {
        fd: EventFd,
        seen: Arc<AtomicUsize>,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.fd, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.fd.read();
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn wait_for(what: impl Fn() -> bool) -> bool {
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
    fn the_poll_window_grows_while_events_come_soon_and_closes_after_a_long_wait() {
        let mut manager: EventManager<Subscriber> = EventManager::new().unwrap();
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        manager.add_subscriber(Arc::new(Mutex::new(Counter {
            fd: fd.try_clone().unwrap(),
            seen: seen.clone(),
        })));
        let mut poll = PollWindow::new(50_000_000);
        fd.write(1).unwrap();
        poll.run(&mut manager).unwrap();
        assert_eq!(poll.ns, POLL_START_NS, "a short wait opens the window");
        fd.write(1).unwrap();
        poll.run(&mut manager).unwrap();
        assert_eq!(
            poll.ns,
            2 * POLL_START_NS,
            "an event found by polling widens it"
        );
        let late = fd.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            late.write(1).unwrap();
        });
        poll.run(&mut manager).unwrap();
        writer.join().unwrap();
        assert_eq!(poll.ns, 0, "a wait past the widest window closes it");
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        // A window of at most 0 never opens.
        let mut never = PollWindow::new(0);
        fd.write(1).unwrap();
        never.run(&mut manager).unwrap();
        assert_eq!(never.ns, 0);
        assert_eq!(seen.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn a_paused_loop_handles_nothing_until_resumed() {
        let mut el = EventLoop::new().unwrap();
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        el.add_subscriber(Arc::new(Mutex::new(Counter {
            fd: fd.try_clone().unwrap(),
            seen: seen.clone(),
        })));
        let handle = el.start().unwrap();
        fd.write(1).unwrap();
        assert!(wait_for(|| seen.load(Ordering::SeqCst) == 1));

        handle.pause().unwrap();
        assert!(handle.is_paused());
        fd.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(seen.load(Ordering::SeqCst), 1, "handled while paused");
        // Pausing again is harmless.
        handle.pause().unwrap();

        handle.resume();
        assert!(wait_for(|| seen.load(Ordering::SeqCst) == 2));
        assert!(!handle.is_paused());
        // Dropping a paused loop stops it too.
        handle.pause().unwrap();
        drop(handle);
    }

    #[test]
    fn the_thread_hook_runs_first_and_its_error_is_returned() {
        let el = EventLoop::new().unwrap();
        let e = el
            .start_with(Some(Box::new(|| Err("no filter".into()))))
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "event loop thread: no filter");
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let el = EventLoop::new().unwrap();
        let handle = el
            .start_with(Some(Box::new(move || {
                assert_eq!(std::thread::current().name(), Some("vmm"));
                r.store(true, Ordering::SeqCst);
                Ok(())
            })))
            .unwrap();
        assert!(ran.load(Ordering::SeqCst));
        drop(handle);
    }
}
