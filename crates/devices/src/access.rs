//! Splitting wide accesses into byte accesses.
//!
//! The legacy devices have byte-wide registers. A wider port access to an
//! 8-bit ISA device is split by the chipset into byte cycles at successive
//! ports (a 16-bit `in` from 0x70 reads 0x70, then 0x71), and these
//! helpers do the same, so any width a guest uses lands somewhere sane.

/// Fills `data` with one `read(offset)` per byte, at successive offsets.
pub(crate) fn read_bytes(offset: u64, data: &mut [u8], mut read: impl FnMut(u64) -> u8) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = read(offset.wrapping_add(i as u64));
    }
}

/// Calls `write(offset, byte)` for each byte of `data`, at successive offsets.
pub(crate) fn write_bytes(offset: u64, data: &[u8], mut write: impl FnMut(u64, u8)) {
    for (i, &byte) in data.iter().enumerate() {
        write(offset.wrapping_add(i as u64), byte);
    }
}

#[cfg(test)]
pub(crate) mod fuzz {
    //! Throws random accesses at a device: garbage in must never panic.

    use crate::bus::BusDevice;

    /// A seeded xorshift64, so a failure reproduces.
    pub(crate) struct XorShift(u64);

    impl XorShift {
        pub(crate) fn new(seed: u64) -> Self {
            Self(seed.max(1))
        }

        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
    }

    /// `rounds` random reads and writes of width 0..=8 at offsets up to a
    /// few bytes past `len`.
    pub(crate) fn hammer(device: &mut dyn BusDevice, len: u64, seed: u64, rounds: usize) {
        let mut rng = XorShift::new(seed);
        for _ in 0..rounds {
            let width = [0, 1, 1, 1, 2, 3, 4, 8][(rng.next() % 8) as usize];
            let offset = rng.next() % (len + 4);
            let value = rng.next().to_le_bytes();
            if rng.next() & 1 == 0 {
                let mut data = [0u8; 8];
                device.read(offset, &mut data[..width]);
            } else {
                device.write(offset, &value[..width]);
            }
        }
        // A full-range offset too: the bus never sends one, but a device
        // must not do arithmetic on it that can overflow.
        device.write(u64::MAX, &[1, 2]);
        device.read(u64::MAX, &mut [0u8; 2]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_accesses_reach_successive_offsets() {
        let mut data = [0u8; 3];
        read_bytes(5, &mut data, |off| off as u8);
        assert_eq!(data, [5, 6, 7]);
        let mut seen = vec![];
        write_bytes(u64::MAX, &[1, 2], |off, v| seen.push((off, v)));
        assert_eq!(seen, vec![(u64::MAX, 1), (0, 2)]);
    }
}
