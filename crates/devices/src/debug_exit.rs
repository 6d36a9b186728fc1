//! QEMU's `isa-debug-exit` (iobase 0xf4, iosize 4): test guests write a
//! value to end the VM, and vmplay exits with status `(value << 1) | 1`.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::control::{StopReason, VmControl};

/// Stops the VM with [`StopReason::DebugExit`] on any write.
pub struct DebugExit {
    control: Arc<VmControl>,
}

impl DebugExit {
    pub fn new(control: Arc<VmControl>) -> DebugExit {
        DebugExit { control }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// Like QEMU, any offset in the window counts and the value is the
    /// whole access, little endian. Only 1 to 4 bytes make a port access;
    /// anything else is not a debug-exit write and is ignored.
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if !(1..=4).contains(&data.len()) {
            tracing::debug!(len = data.len(), "debug-exit: ignored write width");
            return;
        }
        let mut value = [0u8; 4];
        value[..data.len()].copy_from_slice(data);
        self.control
            .request_stop(StopReason::DebugExit(u32::from_le_bytes(value)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit_value(offset: u64, data: &[u8]) -> Option<StopReason> {
        let control = VmControl::new();
        DebugExit::new(control.clone()).write(offset, data);
        control.reason()
    }

    #[test]
    fn writes_of_each_width_stop_with_their_value() {
        assert_eq!(exit_value(0, &[0x10]), Some(StopReason::DebugExit(0x10)));
        assert_eq!(
            exit_value(0, &[0x34, 0x12]),
            Some(StopReason::DebugExit(0x1234))
        );
        assert_eq!(
            exit_value(0, &[0x78, 0x56, 0x34, 0x12]),
            Some(StopReason::DebugExit(0x1234_5678))
        );
        assert_eq!(exit_value(3, &[0]), Some(StopReason::DebugExit(0)));
        assert_eq!(
            exit_value(0, &[0x10]).unwrap().exit_code(),
            0x21,
            "QEMU's exit status"
        );
    }

    #[test]
    fn odd_widths_are_ignored_and_reads_are_all_ones() {
        assert_eq!(exit_value(0, &[]), None);
        assert_eq!(exit_value(0, &[1; 8]), None);
        let mut d = DebugExit::new(VmControl::new());
        let mut b = [0u8; 4];
        d.read(0, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn survives_random_accesses() {
        let mut d = DebugExit::new(VmControl::new());
        crate::access::fuzz::hammer(&mut d, 4, 0xf4, 5_000);
    }
}
