//! The i8042 PS/2 controller, for its reset line and so Linux's probe
//! completes quickly and cleanly.
//!
//! Modelled: the controller itself (command byte, self-test, interface
//! test, port enable/disable, output port, AUX loopback, the output
//! buffer and status), and, when built [`I8042::with_irq`], a minimal
//! keyboard on IRQ 1. Not modelled: a mouse. What Linux's `i8042` driver sees:
//! - the controller self-test (0xaa) passes with 0x55;
//! - the AUX port cannot be enabled (0xa8 leaves CTR bit 5 set, as on a
//!   controller without a mouse port), so `i8042_check_aux` fails in a
//!   few milliseconds and no AUX/mux port is registered — rather than
//!   after a 250 ms wait for an AUX interrupt that would never come;
//! - the KBD port is registered; with IRQ 1 wired (the machine's i8042) a
//!   keyboard ACKs every command and identifies as MF2 (0xab 0x83), so
//!   `atkbd` binds; without it, nothing answers and `atkbd` finds none.
//!
//! Keyboard input: [`I8042::send_ctrl_alt_del`] queues the key presses of
//! Ctrl-Alt-Del (Firecracker's `SendCtrlAltDel`) as a keyboard would send
//! them, in scancode set 1 while the guest has translation on (CTR bit 6)
//! and set 2 otherwise, with an IRQ 1 per byte while the guest has the
//! keyboard interrupt on (CTR bit 0).
//!
//! Reset: command 0xfe (or any 0xf0-0xff pulse with bit 0 clear, or an
//! output-port write with bit 0 clear) stops the VM with
//! [`StopReason::Reset`].

use std::collections::VecDeque;
use std::sync::Arc;

use vmplay_hypervisor::IrqLine;

use crate::access::{read_bytes, write_bytes};
use crate::bus::BusDevice;
use crate::control::{StopReason, VmControl};

/// Offsets from the data port (0x60): data at 0, status/command at 4.
const DATA: u64 = 0;
const COMMAND: u64 = 4;

/// Status register bits.
const STS_OBF: u8 = 0x01;
const STS_SYS: u8 = 0x04;
/// The last write went to the command port.
const STS_CMD: u8 = 0x08;
/// Keyboard not inhibited (the key lock is open).
const STS_UNLOCKED: u8 = 0x10;
const STS_AUXDATA: u8 = 0x20;

/// Controller command byte (CTR) bits.
const CTR_KBDINT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_XLATE: u8 = 0x40;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
/// What a BIOS leaves: KBD interrupt on, system flag, AUX off, translation.
const CTR_DEFAULT: u8 = 0x65;

/// Output port: bit 0 holds the CPU out of reset, bit 1 is the A20 gate.
const OUT_RESET: u8 = 0x01;
const OUT_A20: u8 = 0x02;

/// Where the next data-port write goes, after a command that takes an
/// argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Ram(u8),
    OutputPort,
    /// Into the output buffer, as if from the keyboard (0xd2).
    KbdOutput,
    /// Into the output buffer, as if from the AUX port (0xd3, loopback).
    AuxOutput,
    /// To the AUX device (0xd4).
    AuxDevice,
}

/// Room for keyboard bytes the guest has not read yet (Firecracker's 16).
const KBD_QUEUE: usize = 16;

/// Ctrl-Alt-Del as make codes: L-Ctrl, L-Alt, Delete.
const CTRL_ALT_DEL_SET2: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
const CTRL_ALT_DEL_SET1: [u8; 4] = [0x1d, 0x38, 0xe0, 0x53];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum I8042Error {
    #[error("i8042 internal buffer full.")]
    BufferFull,
}

/// The i8042 controller at 0x60 (data) and 0x64 (status/command).
pub struct I8042 {
    control: Arc<VmControl>,
    /// IRQ 1, raised for keyboard bytes.
    irq: Option<Arc<dyn IrqLine>>,
    /// Keyboard bytes waiting for the output buffer.
    kbd: VecDeque<u8>,
    /// Controller RAM; byte 0 is the command byte (CTR).
    ram: [u8; 32],
    output_port: u8,
    /// The output buffer: one byte, and whether it came from the AUX side.
    output: Option<(u8, bool)>,
    pending: Option<Pending>,
    last_write_was_command: bool,
}

impl I8042 {
    pub fn new(control: Arc<VmControl>) -> I8042 {
        let mut ram = [0; 32];
        ram[0] = CTR_DEFAULT;
        I8042 {
            control,
            irq: None,
            kbd: VecDeque::with_capacity(KBD_QUEUE),
            ram,
            output_port: OUT_RESET | OUT_A20,
            output: None,
            pending: None,
            last_write_was_command: false,
        }
    }

    /// The controller with its keyboard interrupt on `irq` (GSI 1).
    pub fn with_irq(control: Arc<VmControl>, irq: Arc<dyn IrqLine>) -> I8042 {
        I8042 {
            irq: Some(irq),
            ..I8042::new(control)
        }
    }

    /// Queues the keyboard's Ctrl-Alt-Del: four bytes, one interrupt each.
    /// Queued even while the guest has the keyboard interrupt off.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if self.kbd.len() + 4 > KBD_QUEUE {
            return Err(I8042Error::BufferFull);
        }
        let codes = if self.ram[0] & CTR_XLATE != 0 {
            CTRL_ALT_DEL_SET1
        } else {
            CTRL_ALT_DEL_SET2
        };
        self.kbd.extend(codes);
        self.feed_keyboard();
        Ok(())
    }

    /// A byte for the keyboard (present when the controller has IRQ 1):
    /// it acknowledges everything, as Firecracker's does, and answers the
    /// identify and reset commands as an MF2 keyboard, so Linux's `atkbd`
    /// finds it and Ctrl-Alt-Del can be pressed.
    fn keyboard_command(&mut self, value: u8) {
        let answer: &[u8] = match value {
            // Echo.
            0xee => &[0xee],
            // Identify: ACK, MF2 keyboard.
            0xf2 => &[0xfa, 0xab, 0x83],
            // Reset: ACK, self-test passed.
            0xff => &[0xfa, 0xaa],
            _ => &[0xfa],
        };
        if self.kbd.len() + answer.len() <= KBD_QUEUE {
            self.kbd.extend(answer);
        }
        self.feed_keyboard();
    }

    /// Moves the next keyboard byte into an empty output buffer.
    fn feed_keyboard(&mut self) {
        if self.output.is_some() {
            return;
        }
        if let Some(byte) = self.kbd.pop_front() {
            self.output = Some((byte, false));
            if self.ram[0] & CTR_KBDINT != 0
                && let Some(irq) = &self.irq
            {
                irq.pulse();
            }
        }
    }

    fn status(&self) -> u8 {
        let mut status = STS_UNLOCKED;
        if self.ram[0] & CTR_SYS != 0 {
            status |= STS_SYS;
        }
        if self.last_write_was_command {
            status |= STS_CMD;
        }
        if let Some((_, aux)) = self.output {
            status |= STS_OBF;
            if aux {
                status |= STS_AUXDATA;
            }
        }
        status
    }

    /// Places a byte in the output buffer. The real controller has a single
    /// output register, so a response nobody read is replaced.
    fn respond(&mut self, byte: u8) {
        self.output = Some((byte, false));
    }

    fn set_ctr(&mut self, value: u8) {
        // There is no mouse port to enable.
        self.ram[0] = value | CTR_AUXDIS;
    }

    fn write_output_port(&mut self, value: u8) {
        self.output_port = value;
        if value & OUT_RESET == 0 {
            self.reset("output port reset line low");
        }
    }

    fn reset(&self, why: &str) {
        tracing::debug!(why, "i8042 resets the machine");
        self.control.request_stop(StopReason::Reset);
    }

    fn command(&mut self, cmd: u8) {
        self.pending = None;
        match cmd {
            0x20..=0x3f => self.respond(self.ram[usize::from(cmd & 0x1f)]),
            0x60..=0x7f => self.pending = Some(Pending::Ram(cmd & 0x1f)),
            // Password installed? No.
            0xa4 => self.respond(0xf1),
            0xa7 => self.ram[0] |= CTR_AUXDIS,
            // Enable AUX: there is none, so the bit stays set.
            0xa8 => {}
            // AUX interface test: lines fine (nothing attached to them).
            0xa9 => self.respond(0x00),
            0xaa => self.respond(0x55),
            0xab => self.respond(0x00),
            0xad => self.ram[0] |= CTR_KBDDIS,
            0xae => self.ram[0] &= !CTR_KBDDIS,
            // Input port: keyboard not inhibited.
            0xc0 => self.respond(0x80),
            0xd0 => self.respond(self.output_port),
            0xd1 => self.pending = Some(Pending::OutputPort),
            0xd2 => self.pending = Some(Pending::KbdOutput),
            0xd3 => self.pending = Some(Pending::AuxOutput),
            0xd4 => self.pending = Some(Pending::AuxDevice),
            0xdd => self.output_port &= !OUT_A20,
            0xdf => self.output_port |= OUT_A20,
            // Test inputs: clock and data lines low.
            0xe0 => self.respond(0x00),
            // Pulse output lines: those whose bit is 0. Bit 0 is reset.
            0xf0..=0xff => {
                if cmd & OUT_RESET == 0 {
                    self.reset("pulse of the reset line");
                }
            }
            _ => tracing::debug!(cmd = format_args!("{cmd:#04x}"), "i8042: ignored command"),
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(Pending::Ram(0)) => self.set_ctr(value),
            Some(Pending::Ram(i)) => self.ram[usize::from(i)] = value,
            Some(Pending::OutputPort) => self.write_output_port(value),
            Some(Pending::KbdOutput) => self.output = Some((value, false)),
            // AUX loopback is the controller's own: it works without a mouse.
            Some(Pending::AuxOutput) => self.output = Some((value, true)),
            None if self.irq.is_some() => self.keyboard_command(value),
            Some(Pending::AuxDevice) | None => {
                // To a keyboard or mouse that is not there.
                tracing::trace!(value, "i8042: byte for an absent device");
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |off| match off {
            DATA => {
                let byte = self.output.take().map_or(0, |(byte, _)| byte);
                self.feed_keyboard();
                byte
            }
            COMMAND => self.status(),
            // 0x61-0x63 are not the controller's.
            _ => 0xff,
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(offset, data, |off, value| match off {
            DATA => {
                self.last_write_was_command = false;
                self.data(value);
            }
            COMMAND => {
                self.last_write_was_command = true;
                self.command(value);
            }
            _ => {}
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i8042() -> (I8042, Arc<VmControl>) {
        let control = VmControl::new();
        (I8042::new(control.clone()), control)
    }

    fn status(d: &mut I8042) -> u8 {
        let mut b = [0];
        d.read(COMMAND, &mut b);
        b[0]
    }

    fn data(d: &mut I8042) -> u8 {
        let mut b = [0];
        d.read(DATA, &mut b);
        b[0]
    }

    /// Linux's `i8042_command`: wait for IBF clear, write the command and
    /// its argument, then wait for OBF and read the answer, if any.
    fn command(d: &mut I8042, cmd: u8, arg: Option<u8>, answers: bool) -> Option<(u8, u8)> {
        assert_eq!(status(d) & 0x02, 0, "input buffer never stays full");
        d.write(COMMAND, &[cmd]);
        if let Some(arg) = arg {
            d.write(DATA, &[arg]);
        }
        if !answers {
            return None;
        }
        let s = status(d);
        (s & STS_OBF != 0).then(|| (s, data(d)))
    }

    #[test]
    fn command_0xfe_resets_the_machine() {
        let (mut d, control) = i8042();
        d.write(COMMAND, &[0xfe]);
        assert_eq!(control.reason(), Some(StopReason::Reset));
    }

    #[test]
    fn output_port_write_with_reset_bit_low_resets() {
        let (mut d, control) = i8042();
        assert_eq!(command(&mut d, 0xd0, None, true).unwrap().1, 0x03);
        command(&mut d, 0xd1, Some(0x03), false);
        assert!(!control.is_stopping());
        command(&mut d, 0xd1, Some(0x02), false);
        assert_eq!(control.reason(), Some(StopReason::Reset));
    }

    #[test]
    fn pulses_that_spare_the_reset_line_do_nothing() {
        let (mut d, control) = i8042();
        d.write(COMMAND, &[0xff]);
        assert!(!control.is_stopping());
    }

    #[test]
    fn idle_status_has_no_data_and_data_reads_zero() {
        let (mut d, _) = i8042();
        let s = status(&mut d);
        assert_eq!(s & (STS_OBF | STS_AUXDATA | 0x02), 0);
        assert_eq!(s & STS_SYS, STS_SYS);
        assert_eq!(data(&mut d), 0);
    }

    #[test]
    fn linux_probe_finds_the_controller_but_no_aux_port() {
        let (mut d, control) = i8042();
        // i8042_flush: nothing queued.
        assert_eq!(status(&mut d) & STS_OBF, 0);
        // i8042_controller_selftest.
        assert_eq!(command(&mut d, 0xaa, None, true).unwrap().1, 0x55);
        // i8042_controller_init: read the CTR (twice, must agree), write it back.
        let ctr = command(&mut d, 0x20, None, true).unwrap().1;
        assert_eq!(command(&mut d, 0x20, None, true).unwrap().1, ctr);
        let ctr = (ctr & !0x01) | CTR_KBDDIS;
        command(&mut d, 0x60, Some(ctr), false);
        assert_eq!(command(&mut d, 0x20, None, true).unwrap().1, ctr);
        // i8042_check_aux: the loopback echoes with the AUX flag...
        let (s, echo) = command(&mut d, 0xd3, Some(0x5a), true).unwrap();
        assert_eq!((s & STS_AUXDATA, echo), (STS_AUXDATA, 0x5a));
        // ...disabling AUX sets CTR bit 5, enabling cannot clear it: no AUX.
        command(&mut d, 0xa7, None, false);
        assert_ne!(command(&mut d, 0x20, None, true).unwrap().1 & CTR_AUXDIS, 0);
        command(&mut d, 0xa8, None, false);
        assert_ne!(command(&mut d, 0x20, None, true).unwrap().1 & CTR_AUXDIS, 0);
        // Interface test and KBD port enable still work.
        assert_eq!(command(&mut d, 0xab, None, true).unwrap().1, 0x00);
        command(&mut d, 0xae, None, false);
        assert_eq!(command(&mut d, 0x20, None, true).unwrap().1 & CTR_KBDDIS, 0);
        command(&mut d, 0xad, None, false);
        assert_ne!(command(&mut d, 0x20, None, true).unwrap().1 & CTR_KBDDIS, 0);
        // A byte for the (absent) keyboard is swallowed.
        d.write(DATA, &[0xf2]);
        assert_eq!(status(&mut d) & STS_OBF, 0);
        assert!(!control.is_stopping());
    }

    #[test]
    fn status_tracks_command_and_data_writes() {
        let (mut d, _) = i8042();
        d.write(COMMAND, &[0xa7]);
        assert_ne!(status(&mut d) & STS_CMD, 0);
        command(&mut d, 0xd2, Some(0x42), false);
        let s = status(&mut d);
        assert_eq!(s & (STS_CMD | STS_OBF | STS_AUXDATA), STS_OBF);
        assert_eq!(data(&mut d), 0x42);
    }

    #[test]
    fn wide_write_from_the_data_port_reaches_the_command_port() {
        let (mut d, control) = i8042();
        // Bytes 1-3 fall on 0x61-0x63 (ignored), byte 4 on 0x64.
        d.write(DATA, &[0, 0, 0, 0, 0xfe, 0, 0, 0]);
        assert_eq!(control.reason(), Some(StopReason::Reset));
        let mut wide = [0u8; 2];
        d.read(1, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    struct CountPulses(std::sync::atomic::AtomicUsize);
    impl IrqLine for CountPulses {
        fn pulse(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        fn set_level(&self, _: bool) {}
    }

    #[test]
    fn ctrl_alt_del_arrives_as_four_bytes_with_an_irq_each() {
        let control = VmControl::new();
        let irq = Arc::new(CountPulses(Default::default()));
        let mut d = I8042::with_irq(control, irq.clone());
        // Translation on (the BIOS default): set 1.
        d.send_ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        while status(&mut d) & STS_OBF != 0 {
            got.push(data(&mut d));
        }
        assert_eq!(got, CTRL_ALT_DEL_SET1);
        assert_eq!(irq.0.load(std::sync::atomic::Ordering::SeqCst), 4);
        // Translation and interrupts off: set 2, no IRQ.
        command(&mut d, 0x60, Some(0x04), false);
        d.send_ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        while status(&mut d) & STS_OBF != 0 {
            got.push(data(&mut d));
        }
        assert_eq!(got, CTRL_ALT_DEL_SET2);
        assert_eq!(irq.0.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[test]
    fn the_keyboard_identifies_as_mf2_when_wired_to_irq_1() {
        let control = VmControl::new();
        let irq = Arc::new(CountPulses(Default::default()));
        let mut d = I8042::with_irq(control, irq);
        d.write(DATA, &[0xf2]);
        let mut got = Vec::new();
        while status(&mut d) & STS_OBF != 0 {
            got.push(data(&mut d));
        }
        assert_eq!(got, [0xfa, 0xab, 0x83]);
        d.write(DATA, &[0xed]);
        assert_eq!(data(&mut d), 0xfa);
    }

    #[test]
    fn a_full_keyboard_buffer_refuses_more_keys() {
        let (mut d, _) = i8042();
        for _ in 0..4 {
            d.send_ctrl_alt_del().unwrap();
        }
        assert_eq!(d.send_ctrl_alt_del(), Err(I8042Error::BufferFull));
    }

    #[test]
    fn survives_random_accesses() {
        let (mut d, _) = i8042();
        crate::access::fuzz::hammer(&mut d, 5, 0x8042, 20_000);
    }
}
