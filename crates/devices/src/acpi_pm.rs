//! The hardware-reduced ACPI power registers: sleep control, sleep status
//! and reset, one byte each (FADT X_SLEEP_CONTROL_REG, X_SLEEP_STATUS_REG,
//! RESET_REG), so `poweroff` and `reboot` work without a PM1 block.

use std::sync::Arc;

use crate::ports::{ACPI_RESET_VALUE, ACPI_S5_SLP_TYP};

use crate::access::{read_bytes, write_bytes};
use crate::bus::BusDevice;
use crate::control::{StopReason, VmControl};

const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = 1;
const RESET: u64 = 2;

/// SLEEP_CONTROL: SLP_EN starts the transition to SLP_TYP.
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The three registers, at consecutive offsets 0, 1, 2.
pub struct AcpiPm {
    control: Arc<VmControl>,
}

impl AcpiPm {
    pub fn new(control: Arc<VmControl>) -> AcpiPm {
        AcpiPm { control }
    }

    fn sleep_control(&self, value: u8) {
        let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if value & SLP_EN == 0 {
            return;
        }
        if slp_typ == ACPI_S5_SLP_TYP {
            self.control.request_stop(StopReason::PowerOff);
        } else {
            // Only \_S5 is declared; other sleep states are not supported.
            tracing::debug!(slp_typ, "ACPI: ignored sleep request");
        }
    }

    fn reset(&self, value: u8) {
        if value == ACPI_RESET_VALUE {
            self.control.request_stop(StopReason::Reset);
        } else {
            tracing::debug!(value, "ACPI: ignored reset register write");
        }
    }
}

impl BusDevice for AcpiPm {
    /// Everything reads 0: SLP_EN is write-only, and WAK_STS (status bit 7)
    /// would only be set after a wake, which never happens.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |off| if off <= RESET { 0 } else { 0xff });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(offset, data, |off, value| match off {
            SLEEP_CONTROL => self.sleep_control(value),
            // Write-one-to-clear status bits: nothing is ever set.
            SLEEP_STATUS => {}
            RESET => self.reset(value),
            _ => {}
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(offset: u64, data: &[u8]) -> Option<StopReason> {
        let control = VmControl::new();
        AcpiPm::new(control.clone()).write(offset, data);
        control.reason()
    }

    #[test]
    fn slp_en_with_s5_powers_off() {
        let v = SLP_EN | (ACPI_S5_SLP_TYP << SLP_TYP_SHIFT);
        assert_eq!(after(SLEEP_CONTROL, &[v]), Some(StopReason::PowerOff));
    }

    #[test]
    fn other_sleep_types_and_missing_slp_en_are_ignored() {
        assert_eq!(
            after(SLEEP_CONTROL, &[ACPI_S5_SLP_TYP << SLP_TYP_SHIFT]),
            None
        );
        for typ in (0..8).filter(|&t| t != ACPI_S5_SLP_TYP) {
            assert_eq!(
                after(SLEEP_CONTROL, &[SLP_EN | (typ << SLP_TYP_SHIFT)]),
                None
            );
        }
    }

    #[test]
    fn reset_value_resets_and_others_do_not() {
        assert_eq!(after(RESET, &[ACPI_RESET_VALUE]), Some(StopReason::Reset));
        assert_eq!(after(RESET, &[ACPI_RESET_VALUE.wrapping_add(1)]), None);
        // A wide write from offset 0 reaches the reset register too.
        assert_eq!(after(0, &[0, 0, ACPI_RESET_VALUE]), Some(StopReason::Reset));
    }

    #[test]
    fn registers_read_zero() {
        let mut pm = AcpiPm::new(VmControl::new());
        let mut b = [0xaa; 4];
        pm.read(0, &mut b);
        assert_eq!(b, [0, 0, 0, 0xff]);
    }

    #[test]
    fn survives_random_accesses() {
        let mut pm = AcpiPm::new(VmControl::new());
        crate::access::fuzz::hammer(&mut pm, 3, 0x600, 5_000);
    }
}
