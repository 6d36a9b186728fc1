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

/// The guest memory behind bytes `[skip, skip + len)` of `chain`'s
/// device-readable (`writable == false`) or device-writable descriptors,
/// as slices of mapped memory split where guest memory regions end: what
/// a device hands to vectored host I/O. `None` if a descriptor leaves
/// guest memory or the chain holds fewer bytes.
pub fn chain_slices<'a>(
    mem: &'a GuestMemory,
    chain: &Chain<'a>,
    writable: bool,
    mut skip: usize,
    mut len: usize,
) -> Option<Vec<vm_memory::VolatileSlice<'a, ()>>> {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let mut out = Vec::new();
    for d in chain.clone() {
        if len == 0 {
            break;
        }
        if d.is_write_only() != writable {
            continue;
        }
        let dlen = d.len() as usize;
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let take = (dlen - skip).min(len);
        let start = d.addr().0.checked_add(skip as u64)?;
        for slice in mem.get_slices(GuestAddress(start), take) {
            out.push(slice.ok()?);
        }
        skip = 0;
        len -= take;
    }
    (len == 0).then_some(out)
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
