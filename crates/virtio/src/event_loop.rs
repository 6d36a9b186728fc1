//! The VMM event loop: one thread that owns device work, as Firecracker's
//! `run_without_api` does. Each device is one event-manager subscriber that
//! watches its queues' notify eventfds and whatever host fds it registers
//! (a TAP, sockets, timers). vCPU threads never do device I/O: a queue
//! notify is an eventfd write, and the device answers here.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("event loop: {0}")]
    Setup(String),
    #[error("event loop thread: {0}")]
    Thread(std::io::Error),
}

/// Collects devices, then runs them on their own thread.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    stop_fd: EventFd,
    stop: Arc<AtomicBool>,
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
        Ok(EventLoop {
            manager,
            stop_fd,
            stop,
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
        let EventLoop {
            mut manager,
            stop_fd,
            stop,
        } = self;
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        // EINTR and friends: the loop goes on; anything
                        // persistent would spin, so slow down and say so.
                        tracing::warn!("event loop: {e:?}");
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            })
            .map_err(EventLoopError::Thread)?;
        Ok(EventLoopHandle {
            stop_fd,
            thread: Some(thread),
        })
    }
}

/// The running loop.
pub struct EventLoopHandle {
    stop_fd: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoopHandle {
    /// The loop thread's id, for per-thread policies (seccomp).
    pub fn thread(&self) -> Option<&std::thread::Thread> {
        self.thread.as_ref().map(|t| t.thread())
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        let _ = self.stop_fd.write(1);
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
