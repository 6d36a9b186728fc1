//! The translation tier: hot 64-bit blocks of the block cache compiled
//! to host x86-64 (same-ISA), run from a per-vCPU executable arena.
//!
//! * A block is translated once the interpreter has run it
//!   [`JitConfig::threshold`] times; cold code stays interpreted, and any
//!   instruction the code generator does not handle runs through its
//!   interpreter handler from the translated code, so the tiers agree by
//!   construction wherever the translation does not do the work itself.
//! * Validity is the block cache's: a translation checks its page's code
//!   generation at its head (a write to the page, by any vCPU or device,
//!   makes it leave). Direct jumps are chained through a slot the
//!   dispatcher fills ([`Jit::link`]); one to another page also checks
//!   the TLB epoch it was linked under. Calls push a return frame on the
//!   host stack, so the matching `ret` returns with a host `ret`.
//! * Translating costs ~30 µs a trace. Optionally
//!   ([`JitConfig::background`]) a vCPU hands hot blocks to its own
//!   compiler thread and goes on interpreting them; the finished code is
//!   installed the next time the block runs. By default, and always under
//!   co-simulation, blocks are compiled in line.
//! * `emit.rs` generates code, `helpers.rs` is what that code calls,
//!   `code.rs` owns executable memory (the only unsafe boundary),
//!   `verify.rs` runs translated blocks against the interpreter.

pub(crate) mod asm;
pub(crate) mod code;
pub(crate) mod emit;
pub(crate) mod encode;
pub(crate) mod helpers;
pub(crate) mod regs;
pub(crate) mod verify;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction};

use crate::cpu::Cpu;
use crate::decode::Insn;
use crate::decode::cache::Block;

/// Which tiers run guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tier {
    /// Interpreter only.
    Interp,
    /// Interpreter for cold code, translation for hot 64-bit blocks.
    #[default]
    Jit,
}

impl std::str::FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "interp" => Ok(Tier::Interp),
            "jit" => Ok(Tier::Jit),
            _ => Err(format!("unknown emu tier {s:?} (expected interp or jit)")),
        }
    }
}

/// The translation tier's settings for one VM.
#[derive(Debug, Clone, Copy)]
pub struct JitConfig {
    pub tier: Tier,
    /// Interpreted runs before a block is translated.
    pub threshold: u64,
    /// Interpreted runs before a block is queued for translation in the
    /// vCPU's idle time (while the guest halts, e.g. waiting for a disk):
    /// warm code is made ready before it is hot, at no cost to a busy
    /// guest. At or above `threshold`: off.
    pub idle_threshold: u64,
    /// Co-simulation: how many runs of each translated block are checked
    /// against the interpreter (0: off; `u64::MAX`: every run).
    pub verify_runs: u64,
    /// Translate on a compiler thread beside each vCPU (the vCPU goes on
    /// interpreting a hot block until its code is ready) instead of in
    /// line: less wall time, more CPU time (see `DESIGN.md`). Off under
    /// co-simulation, which checks a block's first runs.
    pub background: bool,
}

impl Default for JitConfig {
    fn default() -> Self {
        JitConfig {
            tier: Tier::Jit,
            threshold: 32,
            idle_threshold: 8,
            verify_runs: 0,
            background: false,
        }
    }
}

impl JitConfig {
    /// The defaults, overridden by `VMPLAY_EMU_TIER` (`interp`/`jit`),
    /// `VMPLAY_EMU_JIT_THRESHOLD` and `VMPLAY_EMU_JIT_IDLE_THRESHOLD`
    /// (runs) and `VMPLAY_EMU_VERIFY`
    /// (`1`: check each block's first 32 runs, `all`, or a number), and
    /// `VMPLAY_EMU_JIT_BACKGROUND=1` for the compiler thread.
    pub fn from_env(tier: Option<Tier>) -> Result<JitConfig, String> {
        let mut c = JitConfig::default();
        if let Ok(v) = std::env::var("VMPLAY_EMU_JIT_BACKGROUND") {
            c.background = match v.as_str() {
                "0" => false,
                "1" => true,
                _ => return Err(format!("VMPLAY_EMU_JIT_BACKGROUND: expected 0 or 1: {v:?}")),
            };
        }
        if let Ok(v) = std::env::var("VMPLAY_EMU_TIER") {
            c.tier = v.parse()?;
        }
        if let Some(t) = tier {
            c.tier = t;
        }
        if let Ok(v) = std::env::var("VMPLAY_EMU_JIT_THRESHOLD") {
            c.threshold = v
                .parse()
                .map_err(|_| format!("VMPLAY_EMU_JIT_THRESHOLD: not a number: {v:?}"))?;
        }
        if let Ok(v) = std::env::var("VMPLAY_EMU_JIT_IDLE_THRESHOLD") {
            c.idle_threshold = v
                .parse()
                .map_err(|_| format!("VMPLAY_EMU_JIT_IDLE_THRESHOLD: not a number: {v:?}"))?;
        }
        if let Ok(v) = std::env::var("VMPLAY_EMU_VERIFY") {
            c.verify_runs = match v.as_str() {
                "" | "0" => 0,
                "1" => 32,
                "all" => u64::MAX,
                n => n
                    .parse()
                    .map_err(|_| format!("VMPLAY_EMU_VERIFY: expected 1, all or a count: {v:?}"))?,
            };
        }
        Ok(c)
    }
}

/// Counters, printed at the end of a run with `RUST_LOG=debug` and read
/// by tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct JitStats {
    pub compiled: u64,
    pub failed: u64,
    pub native: u64,
    pub fallback: u64,
    pub resets: u64,
    pub compile_ns: u64,
    /// Of those, the translations the guest waited for (made in line
    /// when a block turned hot), and their time.
    pub in_line: u64,
    pub in_line_ns: u64,
    /// Entries from the dispatcher.
    pub entries: u64,
    /// Of the exits back to it, those through a chain slot not yet linked.
    pub exits_unlinked: u64,
    pub verified: u64,
    pub mismatches: u64,
}

/// Counters of all vCPUs of a VM (tests read them).
#[derive(Debug, Default)]
pub struct JitTotals {
    pub translated: std::sync::atomic::AtomicU64,
    pub verified: std::sync::atomic::AtomicU64,
    pub mismatches: std::sync::atomic::AtomicU64,
}

/// Arena size per vCPU: at ~0.5-1 KiB per block, room for tens of
/// thousands of hot blocks before a reset.
const ARENA: usize = 64 << 20;

/// Entries of the indirect-branch target cache.
pub const TARGETS: usize = 1 << 14;

/// One target-cache entry: translated code for guest `rip` entered under
/// TLB `epoch` (the same linear→physical mapping) starts at `head` (flags
/// lazy) or `head_spill` (flags parked in EDX).
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct Target {
    pub rip: u64,
    pub epoch: u64,
    pub head: u64,
    pub head_spill: u64,
}

/// The target-cache slot of a guest RIP (the generated probe computes the
/// same).
pub fn target_slot(rip: u64) -> usize {
    ((rip ^ (rip >> 12)) as usize) & (TARGETS - 1)
}

/// The arena and how many times it was reset (code made for an earlier
/// generation is never installed).
struct Arena {
    code: code::CodeArena,
    generation: u64,
}

/// A block for the compiler thread: its guest instructions and what the
/// code embeds.
struct Job {
    serial: u64,
    code: GuestCode,
    generation_word: (u64, u32),
    attention: u64,
    chain: bool,
}

/// What the compiler thread made of a [`Job`].
struct Done {
    serial: u64,
    insns: Box<[Insn]>,
    outcome: Result<Translation, Failure>,
    ns: u64,
}

/// A translation in the arena, ready to install.
struct Translation {
    at: u64,
    /// Its size in bytes.
    len: usize,
    emitted: emit::Emitted,
    verifiable: bool,
    /// The arena generation it was appended in.
    generation: u64,
}

enum Failure {
    /// The code generator refused the block: it stays interpreted.
    Refused(String),
    /// No room in this arena generation: the vCPU must reset the arena.
    Full(u64),
}

/// A vCPU's compiler thread and the channels to it.
struct Compiler {
    jobs: Option<mpsc::SyncSender<Job>>,
    done: mpsc::Receiver<Done>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Finished translations whose block has not run since, by serial.
    ready: HashMap<u64, Done, BySerial>,
    /// Bumped whenever `ready` is emptied (a block queued in an earlier
    /// round may have lost its result, so it is queued again).
    round: u32,
}

/// Warm blocks waiting for the vCPU's idle time, and what it made of
/// them (installed when the block next runs).
/// Hashing for maps keyed by block serial numbers (distinct counters):
/// one multiply, where the default SipHash was a visible cost of every
/// interpreted run of a warm block.
type BySerial = std::hash::BuildHasherDefault<SerialHasher>;

#[derive(Default)]
struct SerialHasher(u64);

impl std::hash::Hasher for SerialHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A queued job, and when its block is expected to turn hot.
struct Queued {
    job: Job,
    /// Of its newest entries in `order` and `urgent`.
    stamp: u64,
    /// The block's runs and the vCPU's instruction count when it was
    /// queued or last ran on a REQUEUE_EVERY boundary.
    runs: u64,
    at: u64,
    /// The instruction count by which, at its recent rate, the block
    /// reaches the in-line threshold; [`UNKNOWN`] before a second sighting.
    deadline: u64,
}

/// The deadline of a job seen once (after every timed one).
const UNKNOWN: u64 = u64::MAX / 4;
/// The deadline of a job whose block cooled (after every other).
const COOLED: u64 = u64::MAX / 2;

/// Whether an entry (`serial`, `stamp`) of the queue's orders is its
/// job's newest (else the job was taken or seen again since).
fn current(jobs: &HashMap<u64, Queued, BySerial>, serial: u64, stamp: u64) -> bool {
    jobs.get(&serial).is_some_and(|q| q.stamp == stamp)
}

struct IdleQueue {
    /// Queued jobs by block serial.
    jobs: HashMap<u64, Queued, BySerial>,
    /// (serial, stamp) from the least to the most recently queued or
    /// run, for dropping; an entry whose job was taken, or superseded by
    /// a later sighting (another stamp), is skipped.
    order: std::collections::VecDeque<(u64, u64)>,
    /// (deadline, !stamp, serial), earliest deadline first, then newest
    /// (entries skipped as in `order`): idle time takes the block that
    /// would otherwise be translated in line soonest. Newest-first alone
    /// let the hottest blocks of a disk benchmark's first pass, queued
    /// first, wait under cooler ones until ~200 turned hot at once.
    urgent: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u64, u64)>>,
    /// The next stamp.
    stamp: u64,
    /// Byte buffers of finished or dropped jobs, for the next ones: a
    /// boot queues tens of thousands of jobs and drops most, and a fresh
    /// allocation each was a sixth of the vCPU's translation work.
    spare: Vec<Box<[u8]>>,
    ready: HashMap<u64, Done, BySerial>,
    /// As [`Compiler::round`].
    round: u32,
}

impl IdleQueue {
    fn new() -> IdleQueue {
        IdleQueue {
            jobs: HashMap::default(),
            order: std::collections::VecDeque::new(),
            urgent: std::collections::BinaryHeap::new(),
            stamp: 0,
            spare: Vec::new(),
            ready: HashMap::default(),
            round: 1,
        }
    }

    /// Queues `job`, whose block has run `runs` times by instruction
    /// count `now`. A full queue drops its least recently seen job: warm
    /// code the guest has left behind (a boot with little idle time
    /// fills the queue, and the next workload's code would wait for it
    /// to drain; it was 512 stale jobs when a disk benchmark began). A
    /// dropped job's block is queued again if it runs on
    /// ([`Jit::compile`]), or translated in line if it turns hot first.
    fn push(&mut self, job: Job, runs: u64, now: u64) {
        if self.jobs.len() >= QUEUE
            && let Some(oldest) = self.pop_oldest()
        {
            self.recycle(oldest);
        }
        let serial = job.serial;
        let q = Queued {
            job,
            stamp: 0,
            runs,
            at: now,
            deadline: UNKNOWN,
        };
        if let Some(old) = self.jobs.insert(serial, q) {
            self.recycle(old.job);
        }
        self.enter(serial);
    }

    /// Block `serial` ran again (`runs` times by `now`): its deadline
    /// from its rate since the last sighting, and it becomes the most
    /// recently seen. `false` if it has no job queued.
    fn touch(&mut self, serial: u64, runs: u64, now: u64, threshold: u64) -> bool {
        let Some(q) = self.jobs.get_mut(&serial) else {
            return false;
        };
        let (dr, dt) = (runs.saturating_sub(q.runs), now.saturating_sub(q.at));
        let left = threshold.saturating_sub(runs);
        if let Some(wait) = dt.saturating_mul(left).checked_div(dr) {
            q.deadline = now.saturating_add(wait).min(UNKNOWN - 1);
        }
        (q.runs, q.at) = (runs, now);
        self.enter(serial);
        true
    }

    /// New entries for `serial`'s job (queued or seen again).
    fn enter(&mut self, serial: u64) {
        self.compact();
        let stamp = self.stamp;
        self.stamp += 1;
        let Some(q) = self.jobs.get_mut(&serial) else {
            return;
        };
        q.stamp = stamp;
        self.order.push_back((serial, stamp));
        self.urgent
            .push(std::cmp::Reverse((q.deadline, !stamp, serial)));
    }

    /// Drops superseded entries once they outnumber the jobs.
    fn compact(&mut self) {
        let jobs = &self.jobs;
        if self.order.len() >= 2 * QUEUE {
            self.order
                .retain(|(serial, stamp)| current(jobs, *serial, *stamp));
        }
        if self.urgent.len() >= 2 * QUEUE {
            self.urgent
                .retain(|std::cmp::Reverse((_, stamp, serial))| current(jobs, *serial, !stamp));
        }
    }

    /// The job whose block is due soonest at instruction count `now`
    /// (one whose deadline passed without it turning hot has cooled:
    /// after the rest, newest first; jobs left over from boot would
    /// otherwise come first).
    fn pop_next(&mut self, now: u64) -> Option<Job> {
        while let Some(std::cmp::Reverse((deadline, inv, serial))) = self.urgent.pop() {
            if !current(&self.jobs, serial, !inv) {
                continue;
            }
            if deadline < now {
                self.urgent.push(std::cmp::Reverse((COOLED, inv, serial)));
                continue;
            }
            return self.jobs.remove(&serial).map(|q| q.job);
        }
        None
    }

    fn pop_oldest(&mut self) -> Option<Job> {
        while let Some((serial, stamp)) = self.order.pop_front() {
            if current(&self.jobs, serial, stamp) {
                return self.jobs.remove(&serial).map(|q| q.job);
            }
        }
        None
    }

    /// The queued job of block `serial`, taken out (the block turned hot
    /// first): a look-up, where a search of the queue was a twentieth of
    /// the vCPU's translation work.
    fn take(&mut self, serial: u64) -> Option<Job> {
        self.jobs.remove(&serial).map(|q| q.job)
    }

    /// Keeps `job`'s byte buffer for a later job.
    fn recycle(&mut self, job: Job) {
        if self.spare.len() < QUEUE {
            self.spare.push(job.code.bytes);
        }
    }

    fn forget_all(&mut self) {
        for (_, q) in std::mem::take(&mut self.jobs) {
            self.recycle(q.job);
        }
        self.order.clear();
        self.urgent.clear();
        self.ready.clear();
        self.round += 1;
    }
}

/// How often (in runs) a warm queued block's job is timed again (or
/// queued again, if it was dropped): every 4 runs cost a Debian boot
/// ~4% in queue work, every 8 nothing measurable.
const REQUEUE_EVERY: u64 = 8;

/// Most finished translations kept for blocks that have not run since
/// (blocks the cache dropped never will).
const READY_MAX: usize = 1 << 14;

/// Jobs waiting for the compiler at most (a full channel to the compiler
/// thread leaves the block to be queued on a later run; the idle queue
/// drops its oldest job instead).
const QUEUE: usize = 512;

pub struct Jit {
    /// Shared with the compiler thread, which appends; the vCPU patches
    /// links and resets.
    arena: Arc<Mutex<Arena>>,
    /// Returns and indirect jumps in translated code look their target up
    /// here before going back to the dispatcher; the dispatcher fills it.
    /// Boxed: its address is in `Cpu::jit_targets`.
    targets: Box<[Target]>,
    /// Interpreter forms of translated instructions, pointed at by the
    /// code; freed with the arena.
    insns: Vec<Box<[Insn]>>,
    /// Shared routines at the arena's start (kept across resets).
    thunks: emit::Thunks,
    compiler: Option<Compiler>,
    idle: IdleQueue,
    pub config: JitConfig,
    pub stats: JitStats,
}

impl Jit {
    pub fn new(config: JitConfig) -> Option<Jit> {
        if config.tier != Tier::Jit {
            return None;
        }
        let made = code::CodeArena::new(ARENA)
            .map_err(|e| e.to_string())
            .and_then(|mut arena| {
                let (bytes, thunks) = emit::Thunks::assemble(arena.next_addr())?;
                arena.push(&bytes).ok_or("arena too small")?;
                arena.keep();
                Ok((arena, thunks))
            });
        match made {
            Ok((code, thunks)) => {
                let arena = Arc::new(Mutex::new(Arena {
                    code,
                    generation: 0,
                }));
                let compiler = (config.background && config.verify_runs == 0)
                    .then(|| Compiler::start(arena.clone(), thunks))
                    .flatten();
                Some(Jit {
                    arena,
                    targets: vec![Target::default(); TARGETS].into_boxed_slice(),
                    insns: Vec::new(),
                    thunks,
                    compiler,
                    idle: IdleQueue::new(),
                    config,
                    stats: JitStats::default(),
                })
            }
            Err(e) => {
                tracing::warn!(
                    "emu: no executable memory for the translation tier ({e}); interpreting only"
                );
                None
            }
        }
    }

    fn arena(&self) -> MutexGuard<'_, Arena> {
        // A panic elsewhere cannot leave the arena half-written: pushes
        // copy whole translations.
        self.arena.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Translates `block`, which starts at the current RIP in 64-bit
    /// code. `false` if it is not translated now (it stays interpreted;
    /// with the background compiler, until its code is ready).
    /// `clear_all` is called when the arena had to be reset: every block
    /// must forget its translation.
    pub fn compile(&mut self, cpu: &Cpu, block: &mut Block, clear_all: impl FnOnce()) -> bool {
        if self.compiler.is_some() {
            return self.compile_in_background(cpu, block, clear_all);
        }
        // Only a block queued this round can have code waiting (asked on
        // every interpreted run of a warm block, so no hashing otherwise).
        let queued = block.jit_queued == self.idle.round;
        if queued && let Some(d) = self.idle.ready.remove(&block.serial()) {
            return self.install_or_reset(cpu, block, d, clear_all);
        }
        if block.runs < self.config.threshold {
            // Warm: queued for idle time. Every REQUEUE_EVERY runs after,
            // its job's deadline is set from its rate (`IdleQueue::touch`),
            // or it is queued again if a full queue dropped it: a disk
            // benchmark's first pass queued blocks faster than idle time
            // took them, and ~390 whose jobs had been dropped were later
            // translated in line, some while the queue stood empty.
            let dropped = queued
                && block.runs.is_multiple_of(REQUEUE_EVERY)
                && !self.idle.touch(
                    block.serial(),
                    block.runs,
                    cpu.icount,
                    self.config.threshold,
                );
            if !queued || dropped {
                let Some(job) = self.job(cpu, block) else {
                    return false;
                };
                self.idle.push(job, block.runs, cpu.icount);
                block.jit_queued = self.idle.round;
            }
            return false;
        }
        let t0 = std::time::Instant::now();
        // Hot before idle time came: translated now, in line, from the
        // bytes copied when it was queued (the block is unchanged since:
        // it is still current).
        let serial = block.serial();
        let waiting = if queued { self.idle.take(serial) } else { None };
        let Some(job) = waiting.or_else(|| self.job(cpu, block)) else {
            return false;
        };
        let done = translate(&self.arena, &self.thunks, &job, t0);
        self.idle.recycle(job);
        self.stats.in_line += 1;
        self.stats.in_line_ns += done.ns;
        self.install_or_reset(cpu, block, done, clear_all)
    }

    /// Installs `done`; a full arena is reset (and `clear_all` called).
    fn install_or_reset(
        &mut self,
        cpu: &Cpu,
        block: &mut Block,
        done: Done,
        clear_all: impl FnOnce(),
    ) -> bool {
        match self.install(cpu, block, done) {
            Installed::Yes => true,
            Installed::No => false,
            Installed::Full => {
                self.reset_arena();
                clear_all();
                false
            }
        }
    }

    /// Translates queued warm blocks while `idle()` holds (the vCPU is
    /// halted with nothing to do). `true` if the arena had to be reset:
    /// every block must forget its translation.
    /// `now` is the vCPU's instruction count.
    pub fn translate_while_idle(&mut self, now: u64, idle: impl Fn() -> bool) -> bool {
        while idle() {
            let Some(job) = self.idle.pop_next(now) else {
                break;
            };
            let done = translate(&self.arena, &self.thunks, &job, std::time::Instant::now());
            self.idle.recycle(job);
            match done.outcome {
                Err(Failure::Full(_)) => {
                    self.reset_arena();
                    return true;
                }
                _ => {
                    if self.idle.ready.len() >= READY_MAX {
                        self.idle.ready.clear();
                        self.idle.round += 1;
                    }
                    self.idle.ready.insert(done.serial, done);
                }
            }
        }
        false
    }

    /// The background path of [`Jit::compile`]: installs the block's
    /// finished code, or queues the block.
    fn compile_in_background(
        &mut self,
        cpu: &Cpu,
        block: &mut Block,
        clear_all: impl FnOnce(),
    ) -> bool {
        let generation = self.arena().generation;
        let Some(c) = self.compiler.as_mut() else {
            return false;
        };
        let mut full = false;
        while let Ok(d) = c.done.try_recv() {
            match d.outcome {
                Err(Failure::Full(g)) => full |= g == generation,
                _ => {
                    if c.ready.len() >= READY_MAX {
                        c.ready.clear();
                        c.round += 1;
                    }
                    c.ready.insert(d.serial, d);
                }
            }
        }
        if full {
            // Everything made so far goes with the arena; blocks queued
            // since are queued again when they next run.
            self.reset_arena();
            clear_all();
            return false;
        }
        if let Some(d) = c.ready.remove(&block.serial()) {
            return match self.install(cpu, block, d) {
                Installed::Yes => true,
                Installed::No | Installed::Full => false,
            };
        }
        if block.jit_queued == c.round {
            return false;
        }
        let Some(job) = self.job(cpu, block) else {
            return false;
        };
        let Some(c) = self.compiler.as_mut() else {
            return false;
        };
        match c.jobs.as_ref().map(|j| j.try_send(job)) {
            Some(Ok(())) => block.jit_queued = c.round,
            // Queue full: ask again on a later run.
            Some(Err(mpsc::TrySendError::Full(_))) => {}
            // The thread is gone: compile in line from now on.
            Some(Err(mpsc::TrySendError::Disconnected(_))) | None => self.compiler = None,
        }
        false
    }

    /// `block` decoded again for translation; `None` (and the block
    /// left to the interpreter for good) if it cannot be.
    fn job(&mut self, cpu: &Cpu, block: &mut Block) -> Option<Job> {
        let Some(code) = GuestCode::copy(cpu, block, self.idle.spare.pop()) else {
            self.stats.failed += 1;
            block.jit_tried = true;
            return None;
        };
        Some(Job {
            serial: block.serial(),
            code,
            generation_word: block.generation_word(&cpu.vm.code),
            attention: &cpu.vm.platform.signals[cpu.id as usize].attention as *const _ as u64,
            chain: self.config.verify_runs == 0,
        })
    }

    /// Makes `done` the translation of `block` if it is one for it in
    /// the current arena.
    fn install(&mut self, cpu: &Cpu, block: &mut Block, done: Done) -> Installed {
        self.stats.compile_ns += done.ns;
        // Whatever the outcome, the block no longer waits for the compiler.
        block.jit_queued = 0;
        let t = match done.outcome {
            Ok(t) => t,
            Err(Failure::Full(_)) => return Installed::Full,
            Err(Failure::Refused(err)) => {
                tracing::debug!("emu jit: block at {:#x} not translated: {err}", cpu.rip());
                #[cfg(test)]
                eprintln!("emu jit: block at {:#x} not translated: {err}", cpu.rip());
                self.stats.failed += 1;
                block.jit_tried = true;
                return Installed::No;
            }
        };
        if t.generation != self.arena().generation || done.serial != block.serial() {
            return Installed::No;
        }
        let e = t.emitted;
        perf_map::note(t.at, t.len, cpu.rip());
        block.set_jit(t.at + e.head, t.at + e.head, t.at + e.head_spill);
        block.jit_verifiable = t.verifiable;
        block.jit_undefined_flags = e.undefined;
        self.insns.push(done.insns);
        self.stats.compiled += 1;
        cpu.vm
            .jit_totals
            .translated
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.native += e.native as u64;
        self.stats.fallback += e.fallback as u64;
        Installed::Yes
    }

    /// Full: every translation goes (the caller makes every block forget
    /// its own) and the arena starts over; hot blocks are translated
    /// again.
    fn reset_arena(&mut self) {
        self.stats.resets += 1;
        self.targets.fill(Target::default());
        {
            let mut a = self.arena();
            a.code.reset();
            a.generation += 1;
        }
        self.insns.clear();
        self.idle.forget_all();
        if let Some(c) = self.compiler.as_mut() {
            c.ready.clear();
            c.round += 1;
        }
    }

    /// Empties the target cache.
    pub fn forget_targets(&mut self) {
        self.targets.fill(Target::default());
    }

    /// Where the target cache lives (for `Cpu::jit_targets`).
    pub fn targets_addr(&self) -> usize {
        self.targets.as_ptr() as usize
    }

    /// Remembers that guest `rip` under TLB `epoch` is translated by
    /// `block`.
    pub fn note_target(&mut self, rip: u64, epoch: u32, block: &Block) {
        self.targets[target_slot(rip)] = Target {
            rip,
            epoch: u64::from(epoch),
            head: block.jit_head,
            head_spill: block.jit_head_spill,
        };
    }

    /// Points the exit `jmp rel32` at `site` to `head`; for an exit to
    /// another page, also stamps it (the `mov eax, imm32` at `epoch.0`)
    /// with the code epoch the target's mapping was seen under.
    pub fn link(&mut self, site: u64, head: u64, epoch: Option<(u64, u32)>) {
        let rel = head.wrapping_sub(site + 5) as i64;
        let Ok(rel) = i32::try_from(rel) else {
            return;
        };
        let mut a = self.arena();
        a.code.patch_u32(site + 1, rel as u32);
        if let Some((at, e)) = epoch {
            a.code.patch_u32(at + 1, e);
        }
    }

    /// Runs translated code from `entry`; returns a `helpers` exit code.
    pub fn enter(&mut self, entry: u64, cpu: &mut Cpu) -> u64 {
        self.stats.entries += 1;
        // SAFETY: `entry` was produced by `compile` into this arena and
        // the arena has not been reset since (a reset clears every
        // block's entry first); the `Insn`s it points at live in
        // `self.insns`, the code map and signals in `cpu.vm`.
        unsafe { code::CodeArena::enter(self.thunks.enter, entry, cpu) }
    }
}

impl Drop for Jit {
    fn drop(&mut self) {
        perf_map::flush();
    }
}

/// Whether [`Jit::install`] installed a translation.
enum Installed {
    Yes,
    No,
    /// The arena is full: reset it.
    Full,
}

impl Compiler {
    /// Starts the compiler thread for one vCPU's arena; `None` if the host
    /// cannot make a thread (the vCPU compiles in line).
    fn start(arena: Arc<Mutex<Arena>>, thunks: emit::Thunks) -> Option<Compiler> {
        let (jobs, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let (tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("emu-jit".into())
            .spawn(move || {
                for job in rx {
                    let t0 = std::time::Instant::now();
                    if tx.send(translate(&arena, &thunks, &job, t0)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| tracing::warn!("emu jit: no compiler thread ({e}); compiling in line"))
            .ok()?;
        Some(Compiler {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            ready: HashMap::default(),
            round: 1,
        })
    }
}

impl Drop for Compiler {
    fn drop(&mut self) {
        // Closing the queue ends the thread after its current job.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Generates `job`'s code and appends it to the arena (on the compiler
/// thread, or in line). The code is made for the address it lands at:
/// if the vCPU reset the arena meanwhile, it is made again.
fn translate(
    arena: &Mutex<Arena>,
    thunks: &emit::Thunks,
    job: &Job,
    t0: std::time::Instant,
) -> Done {
    thread_local! {
        static DECODED: std::cell::RefCell<(Vec<Instruction>, Vec<Insn>)> =
            std::cell::RefCell::new((Vec::with_capacity(MAX_TRACE), Vec::with_capacity(MAX_TRACE)));
    }
    DECODED.with(|d| {
        let (ins, scratch) = &mut *d.borrow_mut();
        if !job.code.decode_into(ins, scratch) {
            return Done {
                serial: job.serial,
                insns: Box::default(),
                outcome: Err(Failure::Refused("its bytes no longer decode".into())),
                ns: t0.elapsed().as_nanos() as u64,
            };
        }
        // The translation keeps its interpreter forms (its code points
        // at them): one exact allocation.
        let insns: Box<[Insn]> = scratch.as_slice().into();
        translate_decoded(arena, thunks, job, ins, insns, t0)
    })
}

/// [`translate`] once the job is decoded.
fn translate_decoded(
    arena: &Mutex<Arena>,
    thunks: &emit::Thunks,
    job: &Job,
    ins: &[Instruction],
    insns: Box<[Insn]>,
    t0: std::time::Instant,
) -> Done {
    let lock = || arena.lock().unwrap_or_else(|e| e.into_inner());
    let outcome = loop {
        let (base, generation) = {
            let a = lock();
            (a.code.next_addr(), a.generation)
        };
        let e = match emit::compile(
            ins,
            &insns,
            job.generation_word,
            job.attention,
            base,
            job.chain,
            thunks,
        ) {
            Ok(e) => e,
            Err(err) => break Err(Failure::Refused(err)),
        };
        let mut a = lock();
        if a.generation != generation || a.code.next_addr() != base {
            continue;
        }
        let Some(at) = a.code.push(&e.bytes) else {
            break Err(Failure::Full(generation));
        };
        drop(a);
        let mut e = e;
        let len = e.bytes.len();
        if tracing::enabled!(tracing::Level::TRACE) || dump_wanted() {
            dump(ins, &e.bytes, at);
        }
        // In the arena now; the copy need not wait for the install.
        emit::recycle(std::mem::take(&mut e.bytes));
        // Results that differ between two runs (the clock, random
        // numbers) or stores the undo log does not see (the string
        // instructions' page-sized fast paths).
        let verifiable = ins.iter().all(|i| {
            !matches!(
                i.mnemonic(),
                iced_x86::Mnemonic::Rdtsc
                    | iced_x86::Mnemonic::Rdtscp
                    | iced_x86::Mnemonic::Rdrand
                    | iced_x86::Mnemonic::Rdseed
                    | iced_x86::Mnemonic::Rdpid
            ) && !i.is_string_instruction()
        });
        break Ok(Translation {
            at,
            len,
            emitted: e,
            verifiable,
            generation,
        });
    };
    Done {
        serial: job.serial,
        insns,
        outcome,
        ns: t0.elapsed().as_nanos() as u64,
    }
}

/// `VMPLAY_EMU_PERF_MAP=1`: each translation is named in
/// `/tmp/perf-<pid>.map` (perf's JIT symbol file) by the guest address
/// it starts at, so `perf report` shows which guest code the time goes
/// to (`guest_<rip>`; the guest's `/proc/kallsyms` names those).
mod perf_map {
    use std::io::{BufWriter, Write};
    use std::sync::{LazyLock, Mutex};

    type Map = Mutex<BufWriter<std::fs::File>>;

    static MAP: LazyLock<Option<Map>> = LazyLock::new(|| {
        std::env::var_os("VMPLAY_EMU_PERF_MAP")?;
        let path = format!("/tmp/perf-{}.map", std::process::id());
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => Some(Mutex::new(BufWriter::new(f))),
            Err(e) => {
                tracing::warn!("emu jit: no perf map at {path}: {e}");
                None
            }
        }
    });

    fn map() -> Option<std::sync::MutexGuard<'static, BufWriter<std::fs::File>>> {
        let m = MAP.as_ref()?;
        Some(m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Names the `len` bytes of code at `at`, translated from `rip`
    /// (buffered: one write per translation was a tenth of a profiled
    /// vCPU's time).
    pub fn note(at: u64, len: usize, rip: u64) {
        if let Some(mut f) = map() {
            let _ = writeln!(f, "{at:x} {len:x} guest_{rip:x}");
        }
    }

    /// Writes out what is buffered (a vCPU's translation tier ends).
    pub fn flush() {
        if let Some(mut f) = map() {
            let _ = f.flush();
        }
    }
}

/// `VMPLAY_EMU_JIT_DUMP` set: print each translation to stderr.
fn dump_wanted() -> bool {
    static WANTED: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| std::env::var_os("VMPLAY_EMU_JIT_DUMP").is_some());
    *WANTED
}

/// A translation's guest and host code, for `RUST_LOG=trace`.
fn dump(ins: &[Instruction], bytes: &[u8], at: u64) {
    use iced_x86::{Formatter, IntelFormatter};
    let mut f = IntelFormatter::new();
    let mut text = String::new();
    for i in ins {
        text.push_str(&format!("  guest {:#x}: ", i.ip()));
        f.format(i, &mut text);
        text.push('\n');
    }
    let mut d = Decoder::with_ip(64, bytes, at, DecoderOptions::NONE);
    // A slow path's site record (data) follows `lea rax, [record]; jmp`.
    let mut record = None;
    while d.can_decode() {
        let i = d.decode();
        text.push_str(&format!("    {:#x}: ", i.ip()));
        f.format(&i, &mut text);
        text.push('\n');
        if i.code() == iced_x86::Code::Lea_r64_m && i.is_ip_rel_memory_operand() {
            record = Some(i.ip_rel_memory_address());
        } else if i.mnemonic() == iced_x86::Mnemonic::Jmp && record == Some(i.next_ip()) {
            let skip = d.position() + helpers::Site::BYTES;
            text.push_str(&format!("    {:#x}: (site record)\n", i.next_ip()));
            if d.set_position(skip).is_err() {
                break;
            }
            d.set_ip(i.next_ip() + helpers::Site::BYTES as u64);
            record = None;
        } else {
            record = None;
        }
    }
    tracing::trace!("emu jit: translated\n{text}");
    if dump_wanted() {
        eprintln!("emu jit: translated\n{text}");
    }
}

/// Most guest instructions in one translation.
const MAX_TRACE: usize = 96;

/// Decodes `block`'s guest instructions again (the block cache keeps only
/// the interpreter's forms), with their interpreter forms unfused; then,
/// within the same page (one generation word covers it all), on past the
/// block's end while it ends in a conditional branch or `sti`: the
/// fall-through blocks join the translation (a trace), so the path
/// through them needs no block entry. Also what co-simulation replays.
pub(crate) fn decode_again(cpu: &Cpu, block: &Block) -> Option<(Vec<Instruction>, Box<[Insn]>)> {
    GuestCode::copy(cpu, block, None)?.decode()
}

/// A block's guest bytes, and the rest of its page a trace may run on
/// into, copied when the block is queued: decoding waits for the
/// translation (idle time, or never for a job the queue drops).
struct GuestCode {
    rip: u64,
    /// The block's own bytes (a trace may decode past them).
    len: usize,
    /// Of `bytes` (always [`COPY`] long, so buffers are reused), those
    /// copied.
    avail: usize,
    bytes: Box<[u8]>,
}

/// The most bytes a trace decodes.
const COPY: usize = MAX_TRACE * 15;

impl GuestCode {
    /// `None` if the block is not one translation can take (empty, or
    /// crossing its page). `spare`: a buffer to reuse.
    fn copy(cpu: &Cpu, block: &Block, spare: Option<Box<[u8]>>) -> Option<GuestCode> {
        let (host, len) = block.code_bytes();
        if len == 0 || len > crate::decode::cache::MAX_BLOCK * 15 {
            return None;
        }
        let rip = cpu.rip();
        let page_left = 0x1000 - (rip & 0xfff) as usize;
        if len > page_left {
            return None;
        }
        let avail = page_left.min(COPY);
        let mut bytes = spare
            .filter(|b| b.len() == COPY)
            .unwrap_or_else(|| vec![0u8; COPY].into_boxed_slice());
        // SAFETY: the block's bytes, and the rest of its page after them,
        // are inside one RAM page (the cache decoded the block there), and
        // `bytes` holds COPY >= avail; other vCPUs may write them
        // concurrently, which the generation check at the translation's
        // head catches.
        unsafe { std::ptr::copy_nonoverlapping(host, bytes.as_mut_ptr(), avail) };
        Some(GuestCode {
            rip,
            len,
            avail,
            bytes,
        })
    }

    /// The instructions (iced's, for the code generator, and the
    /// interpreter's, for its calls); `None` if the block's own bytes no
    /// longer decode.
    fn decode(&self) -> Option<(Vec<Instruction>, Box<[Insn]>)> {
        let (mut ins, mut insns) = (Vec::new(), Vec::new());
        self.decode_into(&mut ins, &mut insns)
            .then(|| (ins, insns.into_boxed_slice()))
    }

    /// [`GuestCode::decode`] into cleared vectors (a translation's
    /// scratch: growing fresh ones was a quarter of a decode); `false`
    /// if the block's own bytes no longer decode.
    fn decode_into(&self, ins: &mut Vec<Instruction>, insns: &mut Vec<Insn>) -> bool {
        ins.clear();
        insns.clear();
        let (rip, len) = (self.rip, self.len);
        let mut d = Decoder::with_ip(64, &self.bytes[..self.avail], rip, DecoderOptions::NONE);
        let t = crate::decode::table::table();
        while d.can_decode() {
            let i = d.decode();
            let inside = ((i.ip() - rip) as usize) < len;
            if i.is_invalid() {
                if inside {
                    return false;
                }
                break;
            }
            let (h, stop) = t.resolve(&i);
            insns.push(Insn::build(&i, h));
            ins.push(i);
            if (i.next_ip() - rip) as usize >= len {
                let goes_on =
                    (!stop && i.flow_control() == FlowControl::Next) || emit::continues_trace(&i);
                if !goes_on || ins.len() >= MAX_TRACE {
                    break;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests;
