//! Queue helpers every device uses: drain the available ring with
//! notification suppression (EVENT_IDX or the flags), hand each chain to
//! the device, publish the used entries, interrupt only when the driver
//! asked. A ring the driver corrupted puts the device in NEEDS_RESET
//! instead of taking the VMM down.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use crate::device::{GuestRam, Interrupt};
use vmplay_hypervisor::GuestMemory;

/// A descriptor chain borrowed from guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemory>;

/// A chain's descriptors, walked once and each checked to lie in guest
/// memory: the device-readable ones are one byte stream, the
/// device-writable ones another. Devices that move much data per chain
/// (block) use this instead of `virtio_queue`'s `Reader`/`Writer`, which
/// walk the chain and map every descriptor again for each use.
pub struct Descriptors {
    /// (guest address, length, device-writable)
    list: Vec<(u64, u32, bool)>,
    readable: usize,
    writable: usize,
}

impl Descriptors {
    /// Walks `chain` (which itself stops at loops, over-long chains and bad
    /// indirect tables); an error names a descriptor outside guest memory
    /// or lengths that overflow.
    pub fn walk(mem: &GuestMemory, chain: &Chain<'_>) -> Result<Descriptors, String> {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        let mut d = Descriptors {
            list: Vec::new(),
            readable: 0,
            writable: 0,
        };
        for desc in chain.clone() {
            let (addr, len, w) = (desc.addr().0, desc.len(), desc.is_write_only());
            for slice in mem.get_slices(GuestAddress(addr), len as usize) {
                slice.map_err(|e| format!("descriptor {addr:#x}+{len}: {e}"))?;
            }
            let total = if w { &mut d.writable } else { &mut d.readable };
            *total = total
                .checked_add(len as usize)
                .ok_or("descriptor lengths overflow")?;
            d.list.push((addr, len, w));
        }
        Ok(d)
    }

    /// Bytes in the device-readable descriptors.
    pub fn readable(&self) -> usize {
        self.readable
    }

    /// Bytes in the device-writable descriptors.
    pub fn writable(&self) -> usize {
        self.writable
    }

    /// The guest memory behind bytes `[skip, skip + len)` of the readable
    /// (`writable == false`) or writable stream, split where guest memory
    /// regions end: what vectored host I/O takes. `None` if the stream is
    /// shorter.
    pub fn slices<'m>(
        &self,
        mem: &'m GuestMemory,
        writable: bool,
        mut skip: usize,
        mut len: usize,
    ) -> Option<Vec<vm_memory::VolatileSlice<'m, ()>>> {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        let mut out = Vec::with_capacity(self.list.len());
        for &(addr, dlen, w) in &self.list {
            if len == 0 {
                break;
            }
            if w != writable {
                continue;
            }
            let dlen = dlen as usize;
            if skip >= dlen {
                skip -= dlen;
                continue;
            }
            let take = (dlen - skip).min(len);
            let start = addr.checked_add(skip as u64)?;
            for slice in mem.get_slices(GuestAddress(start), take) {
                out.push(slice.ok()?);
            }
            skip = 0;
            len -= take;
        }
        (len == 0).then_some(out)
    }

    /// Copies readable bytes `[skip, skip + buf.len())` into `buf`.
    pub fn read(&self, mem: &GuestMemory, skip: usize, buf: &mut [u8]) -> bool {
        let Some(slices) = self.slices(mem, false, skip, buf.len()) else {
            return false;
        };
        let mut at = 0;
        for s in slices {
            s.copy_to(&mut buf[at..at + s.len()]);
            at += s.len();
        }
        true
    }

    /// Copies `data` into writable bytes `[skip, skip + data.len())`.
    pub fn write(&self, mem: &GuestMemory, skip: usize, data: &[u8]) -> bool {
        let Some(slices) = self.slices(mem, true, skip, data.len()) else {
            return false;
        };
        let mut at = 0;
        for s in slices {
            s.copy_from(&data[at..at + s.len()]);
            at += s.len();
        }
        true
    }

    /// Records every writable descriptor as written (for the DMA
    /// observer), as [`note_writes`] does.
    pub fn note_writes(&self, ram: &GuestRam) {
        for &(addr, len, w) in &self.list {
            if w {
                ram.written(addr, len.into());
            }
        }
    }
}

/// Records every device-writable range of `chain` as written (for the DMA
/// observer), whatever the device put there.
pub fn note_writes(ram: &GuestRam, chain: &Chain<'_>) {
    for d in chain.clone().writable() {
        ram.written(d.addr().0, d.len().into());
    }
}

/// Pops every available chain and completes it with the length `handle`
/// returns (bytes written into the chain). `None` from `handle` leaves the
/// chain unused and stops (the backend cannot take more now; the chain is
/// pushed back and retried on the next call). Returns whether any chain
/// was completed.
pub fn drain(
    queue: &mut Queue,
    ram: &GuestRam,
    interrupt: &Interrupt,
    mut handle: impl FnMut(Chain<'_>) -> Option<u32>,
) -> bool {
    let mem = &ram.mem;
    let mut used_any = false;
    let mut result = || -> Result<(), virtio_queue::Error> {
        loop {
            queue.disable_notification(mem)?;
            let mut stalled = false;
            while let Some(chain) = queue.iter(mem)?.next() {
                let head = chain.head_index();
                match handle(chain) {
                    Some(len) => {
                        queue.add_used(mem, head, len)?;
                        used_any = true;
                    }
                    None => {
                        queue.go_to_previous_position();
                        stalled = true;
                        break;
                    }
                }
            }
            if stalled {
                queue.enable_notification(mem)?;
                return Ok(());
            }
            if !queue.enable_notification(mem)? {
                return Ok(());
            }
        }
    };
    let outcome = result();
    if let Err(e) = outcome {
        tracing::warn!("virtio queue: {e:?}");
        interrupt.set_needs_reset();
    }
    if used_any {
        signal_used(queue, ram, interrupt);
    }
    used_any
}

/// Interrupts the driver if it wants to hear about new used entries.
pub fn signal_used(queue: &mut Queue, ram: &GuestRam, interrupt: &Interrupt) {
    match queue.needs_notification(&ram.mem) {
        Ok(true) => interrupt.signal_used(),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!("virtio queue: {e:?}");
            interrupt.set_needs_reset();
        }
    }
}

/// Puts one chain in the used ring and interrupts if needed (devices that
/// complete chains outside [`drain`], e.g. receive paths).
pub fn complete(queue: &mut Queue, ram: &GuestRam, interrupt: &Interrupt, head: u16, len: u32) {
    if let Err(e) = queue.add_used(&ram.mem, head, len) {
        tracing::warn!("virtio queue: {e:?}");
        interrupt.set_needs_reset();
        return;
    }
    signal_used(queue, ram, interrupt);
}

/// Pops the next available chain, if any, for devices that fill buffers as
/// host data arrives (net receive, vsock receive, console input).
pub fn pop<'a>(queue: &mut Queue, ram: &'a GuestRam, interrupt: &Interrupt) -> Option<Chain<'a>> {
    match queue.pop_descriptor_chain(&ram.mem) {
        Some(c) => Some(c),
        None => {
            // Re-arm notifications, then look once more: the driver may have
            // added a buffer between the pop and the enable.
            match queue.enable_notification(&ram.mem) {
                Ok(true) => queue.pop_descriptor_chain(&ram.mem),
                Ok(false) => None,
                Err(e) => {
                    tracing::warn!("virtio queue: {e:?}");
                    interrupt.set_needs_reset();
                    None
                }
            }
        }
    }
}
