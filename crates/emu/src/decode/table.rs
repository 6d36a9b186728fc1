//! The table from iced `Code` to handler, filled once by the instruction
//! families (`isa::register_all`). Nothing matches on `Code` at run time.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use iced_x86::{Code, Instruction, OpKind};

use super::Insn;
use crate::cpu::Cpu;
use crate::cpu::fault::{Fault, Res};

/// An instruction implementation: runs with `cpu.rip` already at the next
/// instruction; returns `Err` to fault or exit (the loop rolls `rip` back).
pub type Handler = fn(&mut Cpu, &Insn) -> Res;

/// Picks a handler at decode time from the full instruction.
pub type Builder = fn(&Instruction) -> Option<Handler>;

#[derive(Clone, Copy)]
enum Entry {
    Empty,
    Fixed(Handler),
    /// Register or memory form, by whether an operand is memory.
    Rm {
        reg: Handler,
        mem: Handler,
    },
    /// As `Rm`, with a separate atomic form for `lock`.
    Rmw {
        reg: Handler,
        mem: Handler,
        locked: Handler,
    },
    Custom(Builder),
}

pub struct Table {
    entries: Vec<Entry>,
    stops: Vec<bool>,
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

impl Table {
    pub fn new() -> Self {
        let n = Code::values().len();
        Table {
            entries: vec![Entry::Empty; n],
            stops: vec![false; n],
        }
    }

    fn set(&mut self, code: Code, e: Entry) {
        self.entries[code as usize] = e;
    }

    /// One handler for every form of `code`.
    pub fn add(&mut self, code: Code, h: Handler) {
        self.set(code, Entry::Fixed(h));
    }

    /// Like [`Table::add`], and the block ends after the instruction
    /// (it changes mode, paging, IF, segments…).
    pub fn add_stop(&mut self, code: Code, h: Handler) {
        self.add(code, h);
        self.stops[code as usize] = true;
    }

    /// Marks `code` as ending its block.
    pub fn stop(&mut self, code: Code) {
        self.stops[code as usize] = true;
    }

    /// Register form and memory form.
    pub fn rm(&mut self, code: Code, reg: Handler, mem: Handler) {
        self.set(code, Entry::Rm { reg, mem });
    }

    /// Register, memory and `lock` memory forms.
    pub fn rmw(&mut self, code: Code, reg: Handler, mem: Handler, locked: Handler) {
        self.set(code, Entry::Rmw { reg, mem, locked });
    }

    /// A builder that chooses from the whole instruction.
    pub fn custom(&mut self, code: Code, b: Builder) {
        self.set(code, Entry::Custom(b));
    }

    pub fn has(&self, code: Code) -> bool {
        !matches!(self.entries[code as usize], Entry::Empty)
    }

    /// The handler for `ins`, and whether it ends its block.
    pub fn resolve(&self, ins: &Instruction) -> (Handler, bool) {
        let code = ins.code();
        if code == Code::INVALID {
            return (super::invalid, true);
        }
        let has_mem = || (0..ins.op_count()).any(|k| ins.op_kind(k) == OpKind::Memory);
        let h = match self.entries[code as usize] {
            Entry::Empty => None,
            Entry::Fixed(h) => Some(h),
            Entry::Rm { reg, mem } => Some(if has_mem() { mem } else { reg }),
            Entry::Rmw { reg, mem, locked } => Some(if !has_mem() {
                reg
            } else if ins.has_lock_prefix() {
                locked
            } else {
                mem
            }),
            Entry::Custom(b) => b(ins),
        };
        match h {
            Some(h) => (h, self.stops[code as usize]),
            None => {
                warn_unimplemented(ins);
                (unimplemented, true)
            }
        }
    }
}

/// The table, built on first use from every family.
pub fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Table::new();
        crate::isa::register_all(&mut t);
        t
    })
}

fn warn_unimplemented(ins: &Instruction) {
    static SEEN: OnceLock<Mutex<HashSet<Code>>> = OnceLock::new();
    let seen = SEEN.get_or_init(|| Mutex::new(HashSet::new()));
    let first = seen
        .lock()
        .map(|mut s| s.insert(ins.code()))
        .unwrap_or(false);
    if first {
        tracing::warn!(
            "vmplay-emu: unimplemented instruction {:?} (\"{}\") at {:#x}: raising #UD",
            ins.code(),
            ins,
            ins.ip()
        );
    }
}

fn unimplemented(_: &mut Cpu, _: &Insn) -> Res {
    Err(Fault::ud())
}
