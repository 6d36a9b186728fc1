//! The gdbstub `Target` over a [`Debuggable`] VM, and one gdb session.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::time::Duration;

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::outputln;
use gdbstub::stub::{DisconnectReason, GdbStub, MultiThreadStopReason, run_blocking};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind as GdbWatchKind,
};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use vmplay_hypervisor::{DebugEvent, GuestDebug, WatchKind, Watchpoint};

use crate::arch::{Regs, VmplayX86_64};
use crate::{Debuggable, VmEvent, regs};

/// How often a running VM's stub looks at the connection (Ctrl-C).
const POLL: Duration = Duration::from_millis(10);

/// How a session ended.
pub(crate) enum SessionEnd {
    /// gdb detached (or went away): the VM runs on; another gdb may attach.
    Detached,
    /// The VM is gone (exited or killed).
    Over,
}

/// The debugger's side of the VM: breakpoints as gdb set them, what each
/// vCPU was last told, and the resume plan gdb's `vCont` made.
pub struct GdbTarget {
    vm: Box<dyn Debuggable>,
    debug: GuestDebug,
    /// What each vCPU was last given (sent again only on change).
    applied: Vec<Option<GuestDebug>>,
    /// The vCPU gdb asked to single-step, if any.
    step: Option<u32>,
    /// The vCPUs gdb asked to continue (all of them unless `locked`).
    continuing: Vec<u32>,
    /// gdb's scheduler locking: only the vCPUs named run.
    locked: bool,
    /// Stops that came while reporting another: reported before resuming.
    pending: VecDeque<(u32, DebugEvent)>,
    /// The vCPU of the last stop (Ctrl-C reports it).
    last: u32,
    exited: Option<u8>,
}

fn tid(vcpu: u32) -> Tid {
    NonZeroUsize::new(vcpu as usize + 1).unwrap_or(NonZeroUsize::MIN)
}

fn vcpu_of(tid: Tid) -> u32 {
    (tid.get() - 1) as u32
}

fn non_fatal<E>(e: String) -> TargetError<E> {
    tracing::debug!("gdb: {e}");
    TargetError::NonFatal
}

impl GdbTarget {
    pub fn new(vm: Box<dyn Debuggable>) -> GdbTarget {
        let n = vm.vcpu_count() as usize;
        GdbTarget {
            vm,
            debug: GuestDebug::default(),
            applied: vec![None; n],
            step: None,
            continuing: Vec::new(),
            locked: false,
            pending: VecDeque::new(),
            last: 0,
            exited: None,
        }
    }

    /// Gives every vCPU the current breakpoints (and `step` its step).
    fn apply(&mut self) -> Result<(), String> {
        for v in 0..self.vm.vcpu_count() {
            let mut want = self.debug.clone();
            want.single_step = self.step == Some(v);
            let never_set = self.applied[v as usize].is_none() && want.is_empty();
            if !never_set && self.applied[v as usize].as_ref() != Some(&want) {
                self.vm.set_guest_debug(v, &want)?;
                self.applied[v as usize] = Some(want);
            }
        }
        Ok(())
    }

    /// One gdb connection: stop the VM, serve gdb until it detaches or the
    /// VM is gone.
    pub(crate) fn session(
        &mut self,
        conn: Box<dyn ConnectionExt<Error = std::io::Error>>,
    ) -> SessionEnd {
        if self.exited.is_some() {
            return SessionEnd::Over;
        }
        if let Err(e) = self.vm.pause_all() {
            tracing::warn!("gdb: cannot stop the VM: {e}");
            return SessionEnd::Over;
        }
        // A stop that raced with the last detach is nobody's any more.
        while let Some(VmEvent::Debug { .. }) = self.vm.wait_event(Duration::ZERO) {}
        self.step = None;
        let stub = GdbStub::new(conn);
        let end = match stub.run_blocking::<EventLoop>(self) {
            Ok(DisconnectReason::Disconnect) => SessionEnd::Detached,
            Ok(DisconnectReason::TargetExited(_)) | Ok(DisconnectReason::TargetTerminated(_)) => {
                return SessionEnd::Over;
            }
            Ok(DisconnectReason::Kill) => {
                self.vm.kill();
                return SessionEnd::Over;
            }
            Err(e) => {
                tracing::warn!("gdb: session ended: {e}");
                SessionEnd::Detached
            }
        };
        if self.exited.is_some() {
            return SessionEnd::Over;
        }
        // Detached: no breakpoints left behind, the guest runs on.
        self.debug = GuestDebug::default();
        self.step = None;
        self.pending.clear();
        if let Err(e) = self.apply() {
            tracing::warn!("gdb: cannot clear the breakpoints after detach: {e}");
        }
        if let Err(e) = self.vm.resume_all() {
            tracing::warn!("gdb: cannot resume the VM after detach: {e}");
        }
        end
    }

    fn stop_reason(&self, vcpu: u32, event: DebugEvent) -> MultiThreadStopReason<u64> {
        let tid = tid(vcpu);
        match event {
            DebugEvent::Step => MultiThreadStopReason::SignalWithThread {
                tid,
                signal: Signal::SIGTRAP,
            },
            DebugEvent::SwBreakpoint => MultiThreadStopReason::SwBreak(tid),
            DebugEvent::HwBreakpoint => MultiThreadStopReason::HwBreak(tid),
            DebugEvent::Watchpoint { addr, kind } => MultiThreadStopReason::Watch {
                tid,
                kind: match kind {
                    WatchKind::Write => GdbWatchKind::Write,
                    WatchKind::Read => GdbWatchKind::Read,
                    WatchKind::ReadWrite => GdbWatchKind::ReadWrite,
                },
                addr,
            },
        }
    }

    /// A vCPU stopped: stop the rest, keep other stops for later.
    fn stopped(
        &mut self,
        vcpu: u32,
        event: DebugEvent,
    ) -> Result<MultiThreadStopReason<u64>, String> {
        self.stop_all()?;
        self.last = vcpu;
        Ok(self.stop_reason(vcpu, event))
    }
}

impl GdbTarget {
    /// Stops every vCPU; stops that raced with this one are kept for the
    /// next resume, which reports them instead of running.
    fn stop_all(&mut self) -> Result<(), String> {
        self.vm.pause_all()?;
        while let Some(VmEvent::Debug { vcpu, event }) = self.vm.wait_event(Duration::ZERO) {
            self.pending.push_back((vcpu, event));
        }
        self.step = None;
        Ok(())
    }
}

impl Target for GdbTarget {
    type Arch = VmplayX86_64;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    // gdb must ask for breakpoints (Z0), never plant int3 through memory
    // writes: the backend decides how to stop.
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl MultiThreadBase for GdbTarget {
    fn read_registers(&mut self, regs: &mut Regs, tid: Tid) -> TargetResult<(), Self> {
        let s = self.vm.state(vcpu_of(tid)).map_err(non_fatal)?;
        regs::to_gdb(&s, regs);
        Ok(())
    }

    fn write_registers(&mut self, regs: &Regs, tid: Tid) -> TargetResult<(), Self> {
        let v = vcpu_of(tid);
        let mut s = self.vm.state(v).map_err(non_fatal)?;
        regs::from_gdb(regs, &mut s);
        self.vm.set_state(v, &s).map_err(non_fatal)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        match self.vm.read_virt(vcpu_of(tid), start, data) {
            Ok(0) if !data.is_empty() => Err(TargetError::NonFatal),
            Ok(n) => Ok(n),
            Err(e) => Err(non_fatal(e)),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        self.vm
            .write_virt(vcpu_of(tid), start, data)
            .map_err(non_fatal)
    }

    fn list_active_threads(&mut self, active: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        for v in 0..self.vm.vcpu_count() {
            active(tid(v));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for GdbTarget {
    fn resume(&mut self) -> Result<(), Self::Error> {
        if !self.pending.is_empty() {
            // Another vCPU already stopped: report that first.
            return Ok(());
        }
        self.apply()?;
        tracing::debug!(step = ?self.step, locked = self.locked, "gdb: resuming the VM");
        // A step runs its vCPU alone (as QEMU does): the others stay put.
        if let Some(v) = self.step {
            return self.vm.resume_one(v);
        }
        if self.locked {
            for v in std::mem::take(&mut self.continuing) {
                self.vm.resume_one(v)?;
            }
            return Ok(());
        }
        self.vm.resume_all()
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.step = None;
        self.continuing.clear();
        self.locked = false;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        self.continuing.push(vcpu_of(tid));
        Ok(())
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSchedulerLocking for GdbTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        self.locked = true;
        Ok(())
    }
}

impl MultiThreadSingleStep for GdbTarget {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        self.step = Some(vcpu_of(tid));
        Ok(())
    }
}

impl Breakpoints for GdbTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

/// Adds `x` to `list` (false if it was there); removes it (false if not).
fn add<T: PartialEq>(list: &mut Vec<T>, x: T) -> bool {
    if list.contains(&x) {
        return false;
    }
    list.push(x);
    true
}

fn remove<T: PartialEq>(list: &mut Vec<T>, x: &T) -> bool {
    let before = list.len();
    list.retain(|y| y != x);
    list.len() != before
}

impl GdbTarget {
    /// Adds with `change` and gives every vCPU the result at once: a
    /// backend that cannot do it says so now, and gdb hears "cannot
    /// insert" (not a broken session at the next continue).
    fn try_add(&mut self, change: impl FnOnce(&mut GuestDebug) -> bool) -> bool {
        let before = self.debug.clone();
        if !change(&mut self.debug) {
            return false;
        }
        if let Err(e) = self.apply() {
            tracing::info!("gdb: the backend refused: {e}");
            self.debug = before;
            let _ = self.apply();
            return false;
        }
        true
    }
}

impl SwBreakpoint for GdbTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.try_add(|d| add(&mut d.sw_breakpoints, addr)))
    }
    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(remove(&mut self.debug.sw_breakpoints, &addr))
    }
}

/// x86 has four debug address registers; the stub keeps to that on every backend.
const HW_SLOTS: usize = 4;

impl GdbTarget {
    fn hw_used(&self) -> usize {
        self.debug.hw_breakpoints.len() + self.debug.watchpoints.len()
    }
}

impl HwBreakpoint for GdbTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.hw_used() >= HW_SLOTS {
            return Ok(false);
        }
        Ok(self.try_add(|d| add(&mut d.hw_breakpoints, addr)))
    }
    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(remove(&mut self.debug.hw_breakpoints, &addr))
    }
}

fn watchpoint(addr: u64, len: u64, kind: GdbWatchKind) -> Watchpoint {
    Watchpoint {
        addr,
        len,
        kind: match kind {
            GdbWatchKind::Write => WatchKind::Write,
            GdbWatchKind::Read => WatchKind::Read,
            GdbWatchKind::ReadWrite => WatchKind::ReadWrite,
        },
    }
}

impl HwWatchpoint for GdbTarget {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        if self.hw_used() >= HW_SLOTS || !matches!(len, 1 | 2 | 4 | 8) {
            return Ok(false);
        }
        let w = watchpoint(addr, len, kind);
        Ok(self.try_add(|d| add(&mut d.watchpoints, w)))
    }
    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        Ok(remove(
            &mut self.debug.watchpoints,
            &watchpoint(addr, len, kind),
        ))
    }
}

impl MonitorCmd for GdbTarget {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), Self::Error> {
        let text = String::from_utf8_lossy(cmd);
        let words: Vec<&str> = text.split_whitespace().collect();
        let num = |s: &str| {
            let s = s.trim_start_matches("0x");
            u64::from_str_radix(s, 16).ok()
        };
        match words.as_slice() {
            // `monitor xp ADDR [LEN]`: guest-physical bytes in hex (QEMU's xp).
            ["xp", addr, rest @ ..] => {
                let (Some(addr), Some(len)) =
                    (num(addr), rest.first().map_or(Some(16), |l| num(l)))
                else {
                    outputln!(out, "usage: monitor xp PHYS_ADDR_HEX [LEN_HEX]");
                    return Ok(());
                };
                let mut buf = vec![0u8; len.min(4096) as usize];
                match self.vm.read_phys(addr, &mut buf) {
                    Ok(n) => {
                        for (i, line) in buf[..n].chunks(16).enumerate() {
                            let hex: Vec<String> =
                                line.iter().map(|b| format!("{b:02x}")).collect();
                            outputln!(
                                out,
                                "{:016x}: {}",
                                addr.wrapping_add(16 * i as u64),
                                hex.join(" ")
                            );
                        }
                        if n < buf.len() {
                            outputln!(out, "(not RAM from {:#x})", addr.wrapping_add(n as u64));
                        }
                    }
                    Err(e) => outputln!(out, "error: {e}"),
                }
            }
            ["info", "registers"] | ["regs"] => match self.vm.state(self.last) {
                Ok(s) => outputln!(out, "{s}"),
                Err(e) => outputln!(out, "error: {e}"),
            },
            _ => {
                outputln!(out, "vmplay monitor commands:");
                outputln!(out, "  xp PHYS_ADDR [LEN]   guest-physical memory, hex");
                outputln!(
                    out,
                    "  regs                 full register dump (segments, CRs, EFER)"
                );
            }
        }
        Ok(())
    }
}

enum EventLoop {}

impl run_blocking::BlockingEventLoop for EventLoop {
    type Target = GdbTarget;
    type Connection = Box<dyn ConnectionExt<Error = std::io::Error>>;
    type StopReason = MultiThreadStopReason<u64>;

    #[allow(clippy::type_complexity)]
    fn wait_for_stop_reason(
        target: &mut GdbTarget,
        conn: &mut Self::Connection,
    ) -> Result<
        run_blocking::Event<Self::StopReason>,
        run_blocking::WaitForStopReasonError<String, <Self::Connection as Connection>::Error>,
    > {
        use run_blocking::{Event, WaitForStopReasonError as E};
        if let Some((vcpu, event)) = target.pending.pop_front() {
            target.last = vcpu;
            target.step = None;
            return Ok(Event::TargetStopped(target.stop_reason(vcpu, event)));
        }
        loop {
            match target.vm.wait_event(POLL) {
                Some(VmEvent::Debug { vcpu, event }) => {
                    let reason = target.stopped(vcpu, event).map_err(E::Target)?;
                    return Ok(Event::TargetStopped(reason));
                }
                Some(VmEvent::Exited(code)) => {
                    target.exited = Some(code);
                    return Ok(Event::TargetStopped(MultiThreadStopReason::Exited(code)));
                }
                None => {}
            }
            if conn.peek().map_err(E::Connection)?.is_some() {
                let byte = conn.read().map_err(E::Connection)?;
                return Ok(Event::IncomingData(byte));
            }
        }
    }

    fn on_interrupt(target: &mut GdbTarget) -> Result<Option<Self::StopReason>, String> {
        target.stop_all()?;
        Ok(Some(MultiThreadStopReason::SignalWithThread {
            tid: tid(target.last),
            signal: Signal::SIGINT,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use gdbstub::stub::run_blocking::{BlockingEventLoop, Event};
    use vmplay_hypervisor::CpuState;

    use super::*;

    /// A VM that records what the stub asks and replays scripted events.
    struct Mock {
        log: Arc<Mutex<Vec<String>>>,
        events: VecDeque<VmEvent>,
        refuse_watchpoints: bool,
    }

    impl Debuggable for Mock {
        fn vcpu_count(&self) -> u32 {
            2
        }
        fn pause_all(&mut self) -> Result<(), String> {
            self.log.lock().unwrap().push("pause_all".into());
            Ok(())
        }
        fn resume_all(&mut self) -> Result<(), String> {
            self.log.lock().unwrap().push("resume_all".into());
            Ok(())
        }
        fn resume_one(&mut self, vcpu: u32) -> Result<(), String> {
            self.log.lock().unwrap().push(format!("resume_one {vcpu}"));
            Ok(())
        }
        fn state(&mut self, _: u32) -> Result<CpuState, String> {
            Ok(CpuState::default())
        }
        fn set_state(&mut self, _: u32, _: &CpuState) -> Result<(), String> {
            Ok(())
        }
        fn read_virt(&mut self, _: u32, _: u64, _: &mut [u8]) -> Result<usize, String> {
            Ok(0)
        }
        fn write_virt(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), String> {
            Ok(())
        }
        fn read_phys(&mut self, _: u64, _: &mut [u8]) -> Result<usize, String> {
            Ok(0)
        }
        fn set_guest_debug(&mut self, vcpu: u32, d: &GuestDebug) -> Result<(), String> {
            if self.refuse_watchpoints && !d.watchpoints.is_empty() {
                return Err("no watchpoints here".into());
            }
            self.log.lock().unwrap().push(format!(
                "debug {vcpu} step={} sw={:x?}",
                d.single_step, d.sw_breakpoints
            ));
            Ok(())
        }
        fn wait_event(&mut self, _: Duration) -> Option<VmEvent> {
            self.events.pop_front()
        }
        fn kill(&mut self) {}
    }

    /// A gdb that sends nothing while the VM runs.
    struct Quiet;

    impl Connection for Quiet {
        type Error = std::io::Error;
        fn write(&mut self, _: u8) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl ConnectionExt for Quiet {
        fn read(&mut self) -> std::io::Result<u8> {
            Err(std::io::ErrorKind::UnexpectedEof.into())
        }
        fn peek(&mut self) -> std::io::Result<Option<u8>> {
            Ok(None)
        }
    }

    fn target(events: Vec<VmEvent>) -> (GdbTarget, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mock = Mock {
            log: log.clone(),
            events: events.into(),
            refuse_watchpoints: true,
        };
        (GdbTarget::new(Box::new(mock)), log)
    }

    fn wait(t: &mut GdbTarget) -> MultiThreadStopReason<u64> {
        let mut conn: Box<dyn ConnectionExt<Error = std::io::Error>> = Box::new(Quiet);
        match EventLoop::wait_for_stop_reason(t, &mut conn) {
            Ok(Event::TargetStopped(r)) => r,
            _ => panic!("expected a stop"),
        }
    }

    fn tid_of(v: u32) -> Tid {
        tid(v)
    }

    #[test]
    fn a_stop_that_raced_is_reported_before_running_again() {
        let bp = DebugEvent::SwBreakpoint;
        let (mut t, log) = target(vec![
            VmEvent::Debug { vcpu: 0, event: bp },
            VmEvent::Debug { vcpu: 1, event: bp },
        ]);
        assert_eq!(wait(&mut t), MultiThreadStopReason::SwBreak(tid_of(0)));
        assert_eq!(log.lock().unwrap().as_slice(), ["pause_all"]);
        log.lock().unwrap().clear();
        t.resume().unwrap();
        assert!(
            log.lock().unwrap().is_empty(),
            "vCPU 1's stop is still unreported"
        );
        assert_eq!(wait(&mut t), MultiThreadStopReason::SwBreak(tid_of(1)));
        t.resume().unwrap();
        assert_eq!(log.lock().unwrap().as_slice(), ["resume_all"]);
    }

    #[test]
    fn a_step_runs_its_vcpu_alone_with_the_breakpoints() {
        let (mut t, log) = target(vec![VmEvent::Debug {
            vcpu: 1,
            event: DebugEvent::Step,
        }]);
        assert!(matches!(t.add_sw_breakpoint(0x1000, 1), Ok(true)));
        t.clear_resume_actions().unwrap();
        t.set_resume_action_step(tid_of(1), None).unwrap();
        t.resume().unwrap();
        assert_eq!(
            log.lock().unwrap().as_slice(),
            [
                "debug 0 step=false sw=[1000]",
                "debug 1 step=false sw=[1000]",
                "debug 1 step=true sw=[1000]",
                "resume_one 1",
            ]
        );
        assert_eq!(
            wait(&mut t),
            MultiThreadStopReason::SignalWithThread {
                tid: tid_of(1),
                signal: Signal::SIGTRAP
            }
        );
    }

    #[test]
    fn a_refused_watchpoint_is_cannot_insert_not_a_broken_session() {
        let (mut t, _) = target(vec![]);
        assert!(matches!(
            t.add_hw_watchpoint(0x2000, 8, GdbWatchKind::Write),
            Ok(false)
        ));
        assert!(t.debug.watchpoints.is_empty());
        assert!(
            matches!(
                t.add_hw_watchpoint(0x2000, 3, GdbWatchKind::Write),
                Ok(false)
            ),
            "odd lengths are refused"
        );
        t.resume().unwrap();
    }
}
