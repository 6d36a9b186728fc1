//! `EmuVcpu`: the seam's `Vcpu` over the interpreter. Turns the loop's
//! events into `VcpuExit`s and completes MMIO/port reads on the next run.

use std::sync::Arc;

use vmplay_hypervisor::{CpuState, GuestDebug, IoEventAddress, Result, Vcpu, VcpuExit, VcpuKicker};

use crate::cpu::{Cpu, RunState};
use crate::decode::cache::BlockCache;
use crate::exec::{self, Event};
use crate::mem::io::{Pending, Posted};
use crate::platform::signal;
use crate::vm::VmShared;

pub struct EmuVcpu {
    cpu: Cpu,
    cache: BlockCache,
    buf: [u8; 8],
    /// The read the machine is answering in `buf`.
    answering: Option<Pending>,
}

impl EmuVcpu {
    pub fn new(vm: Arc<VmShared>, id: u32) -> Self {
        let mut cpu = Cpu::new(vm, id);
        if id != 0 {
            cpu.run_state = RunState::WaitForSipi;
        }
        let mut cache = BlockCache::new();
        cache.jit = crate::jit::Jit::new(cpu.vm.jit_config());
        cpu.jit_targets = cache.jit.as_ref().map_or(0, |j| j.targets_addr());
        EmuVcpu {
            cpu,
            cache,
            buf: [0; 8],
            answering: None,
        }
    }

    /// Instructions retired so far (for measurements).
    pub fn instructions(&self) -> u64 {
        self.cpu.icount
    }

    /// The next posted write that is not an ioevent's: those signal their
    /// eventfd here and never leave the vCPU.
    fn next_posted(&mut self) -> Option<Posted> {
        while let Some(w) = self.cpu.io.posted.pop_front() {
            let (addr, data) = match &w {
                Posted::Mmio { addr, data, len } => (IoEventAddress::Mmio(*addr), &data[..*len]),
                Posted::PortOut { port, data, len } => (IoEventAddress::Pio(*port), &data[..*len]),
            };
            let events = self
                .cpu
                .vm
                .ioevents
                .read()
                .unwrap_or_else(|e| e.into_inner());
            match events.iter().find(|e| e.matches(addr, data)) {
                Some(e) => {
                    if let Err(err) = e.fd.write(1) {
                        tracing::warn!("ioevent eventfd write failed: {err}");
                    }
                }
                None => return Some(w),
            }
        }
        None
    }

    fn posted_exit(&mut self, w: Posted) -> VcpuExit<'_> {
        match w {
            Posted::Mmio { addr, data, len } => {
                self.buf = data;
                VcpuExit::MmioWrite {
                    addr,
                    data: &self.buf[..len],
                }
            }
            Posted::PortOut { port, data, len } => {
                self.buf = data;
                VcpuExit::IoOut {
                    port,
                    data: &self.buf[..len],
                }
            }
        }
    }
}

impl Vcpu for EmuVcpu {
    fn id(&self) -> u32 {
        self.cpu.id
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        if let Some(p) = self.answering.take() {
            let len = match p {
                Pending::MmioRead { len, .. } | Pending::PortIn { len, .. } => len,
            };
            let mut b = [0u8; 8];
            b[..len].copy_from_slice(&self.buf[..len]);
            self.cpu.io.log.push(u64::from_le_bytes(b));
            self.cpu.io.pending = None;
        }
        self.cpu.io.pos = 0;
        if let Some(w) = self.next_posted() {
            return Ok(self.posted_exit(w));
        }
        match exec::run(&mut self.cpu, &mut self.cache) {
            Event::Io => {
                if let Some(w) = self.next_posted() {
                    return Ok(self.posted_exit(w));
                }
                match self.cpu.io.pending {
                    Some(p @ Pending::MmioRead { addr, len }) => {
                        self.answering = Some(p);
                        self.buf = [0xff; 8];
                        Ok(VcpuExit::MmioRead {
                            addr,
                            data: &mut self.buf[..len],
                        })
                    }
                    Some(p @ Pending::PortIn { port, len }) => {
                        self.answering = Some(p);
                        self.buf = [0xff; 8];
                        Ok(VcpuExit::IoIn {
                            port,
                            data: &mut self.buf[..len],
                        })
                    }
                    None => Ok(VcpuExit::Interrupted),
                }
            }
            Event::Halt => Ok(VcpuExit::Halt),
            Event::Shutdown => {
                crate::trace::note(&self.cpu, "triple fault: shutdown");
                Ok(VcpuExit::Shutdown)
            }
            Event::Interrupted => Ok(VcpuExit::Interrupted),
            Event::Debug(ev) => Ok(VcpuExit::Debug(ev)),
        }
    }

    fn state(&self) -> Result<CpuState> {
        Ok(self.cpu.save_state())
    }

    fn set_state(&mut self, state: &CpuState) -> Result<()> {
        self.cpu.load_state(state);
        // The VMM may have rewritten code behind the CPU's back.
        self.cache.clear();
        self.cache.forget_page();
        self.cpu
            .vm
            .platform
            .set_tpr(self.cpu.id, (state.cr8 as u8 & 0xf) << 4);
        self.cpu.shutdown = false;
        self.cpu.io = Default::default();
        self.answering = None;
        Ok(())
    }

    fn set_guest_debug(&mut self, debug: &GuestDebug) -> Result<()> {
        crate::debug::set(&mut self.cpu, debug)?;
        // Blocks may link past a breakpoint: start afresh from lookups.
        self.cache.forget_page();
        Ok(())
    }

    fn translate_gva(&self, gva: u64) -> Result<Option<u64>> {
        Ok(self.cpu.peek_translate(gva))
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(Kicker {
            vm: self.cpu.vm.clone(),
            id: self.cpu.id as usize,
        })
    }
}

impl Drop for EmuVcpu {
    fn drop(&mut self) {
        tracing::debug!(
            vcpu = self.cpu.id,
            instructions = self.cpu.icount,
            blocks_decoded = self.cache.blocks_decoded,
            redecoded_stale = self.cache.redecoded_stale,
            instructions_decoded = self.cache.decoded,
            slow_lookups = self.cache.slow_lookups,
            interpreted = self.cache.interpreted,
            tlb_flushes = self.cpu.tlb.epoch(),
            "emu vCPU statistics"
        );
        if let Some(jit) = &self.cache.jit {
            let s = jit.stats;
            tracing::debug!(
                vcpu = self.cpu.id,
                translated = s.compiled,
                untranslatable = s.failed,
                native_instructions = s.native,
                fallback_instructions = s.fallback,
                arena_resets = s.resets,
                translate_ms = s.compile_ns / 1_000_000,
                translated_in_line = s.in_line,
                in_line_ms = s.in_line_ns / 1_000_000,
                entries = s.entries,
                exits_unlinked = s.exits_unlinked,
                "emu translation tier statistics"
            );
            if jit.config.verify_runs != 0 && self.cpu.vm.platform.signals.len() > 1 {
                tracing::warn!(
                    "emu verify: off: co-simulation needs a single vCPU, this VM has {}",
                    self.cpu.vm.platform.signals.len()
                );
            } else if jit.config.verify_runs != 0 {
                // Tests and CI read this line: the co-simulation verdict.
                tracing::warn!(
                    "emu verify: vCPU {}: {} translated block runs checked against the interpreter, {} differed",
                    self.cpu.id,
                    s.verified,
                    s.mismatches
                );
            }
        }
    }
}

struct Kicker {
    vm: Arc<VmShared>,
    id: usize,
}

impl VcpuKicker for Kicker {
    fn kick(&self) {
        self.vm.platform.signals[self.id].raise(signal::KICK);
    }
}
