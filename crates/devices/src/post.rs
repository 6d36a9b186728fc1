//! Port 0x80, the POST code port. Linux writes it for I/O delays
//! (`io_delay`), so it must exist, quietly, rather than log as unhandled.

use crate::bus::BusDevice;

/// Swallows writes; reads as all-ones, like an empty ISA port.
#[derive(Debug, Default, Clone, Copy)]
pub struct PostPort;

impl BusDevice for PostPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        tracing::trace!(?data, "POST code");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_all_ones_whatever_was_written() {
        let mut p = PostPort;
        p.write(0, &[0x12, 0x34]);
        let mut b = [0u8; 2];
        p.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn survives_random_accesses() {
        crate::access::fuzz::hammer(&mut PostPort, 1, 0x80, 1_000);
    }
}
