//! Accesses the machine answers: MMIO outside RAM and the platform, and
//! port I/O the platform does not own.
//!
//! Reads abort the instruction with [`Stop::Exit`]; once the machine has
//! filled the data, the instruction runs again and its accesses are
//! replayed from `log` in order. Writes are posted (queued) and delivered
//! by the next `run()` calls before the guest continues.

use std::collections::VecDeque;

use crate::cpu::fault::{Res, Stop};

/// An access waiting for the machine's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    MmioRead { addr: u64, len: usize },
    PortIn { port: u16, len: usize },
}

/// A write to deliver to the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    Mmio {
        addr: u64,
        data: [u8; 8],
        len: usize,
    },
    PortOut {
        port: u16,
        data: [u8; 8],
        len: usize,
    },
}

#[derive(Debug, Default)]
pub struct IoCtl {
    /// Answers (reads) and markers (writes) of the current instruction.
    pub log: Vec<u64>,
    pub pos: usize,
    pub pending: Option<Pending>,
    pub posted: VecDeque<Posted>,
}

impl IoCtl {
    /// A read the machine answers: replayed if already answered.
    pub fn read(&mut self, req: Pending) -> Res<u64> {
        if let Some(&v) = self.log.get(self.pos) {
            self.pos += 1;
            return Ok(v);
        }
        self.pending = Some(req);
        Err(Stop::Exit)
    }

    /// A write for the machine: queued once even if the instruction reruns.
    pub fn write(&mut self, w: Posted) {
        if self.pos < self.log.len() {
            self.pos += 1;
            return;
        }
        self.posted.push_back(w);
        self.log.push(0);
        self.pos += 1;
    }

    /// The instruction finished (or faulted): forget its accesses.
    #[inline]
    pub fn retire(&mut self) {
        self.log.clear();
        self.pos = 0;
    }
}
