//! Architectural x86-64 register state in a backend-neutral form.

use std::fmt;

/// A segment register with its hidden descriptor cache, field for field as
/// the CPU holds it (the same split KVM uses in `kvm_segment`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Descriptor type (4 bits).
    pub type_: u8,
    /// 1 = code/data segment, 0 = system segment.
    pub s: bool,
    pub dpl: u8,
    pub present: bool,
    pub avl: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Default operation size: 1 = 32-bit.
    pub db: bool,
    /// Granularity: limit counted in 4 KiB units in the descriptor.
    pub g: bool,
    /// The register holds no usable segment (a null selector loaded).
    pub unusable: bool,
}

impl Segment {
    /// A flat 4 GiB segment of `type_` with the given mode bits.
    pub fn flat(selector: u16, type_: u8, l: bool, db: bool) -> Self {
        Segment {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            type_,
            s: true,
            dpl: 0,
            present: true,
            avl: false,
            l,
            db,
            g: true,
            unusable: false,
        }
    }

    /// A real-mode segment as the CPU makes it from `selector`.
    pub fn real_mode(selector: u16, code: bool) -> Self {
        Segment {
            selector,
            base: u64::from(selector) << 4,
            limit: 0xffff,
            type_: if code { 0xb } else { 0x3 },
            s: true,
            present: true,
            ..Default::default()
        }
    }

    /// The 64-bit available TSS that a loader points TR at.
    pub fn tss(selector: u16, base: u64, limit: u32) -> Self {
        Segment {
            selector,
            base,
            limit,
            type_: 0xb,
            s: false,
            present: true,
            ..Default::default()
        }
    }

    /// The LDTR with no LDT loaded.
    pub fn no_ldt() -> Self {
        Segment {
            type_: 0x2,
            present: true,
            unusable: true,
            ..Default::default()
        }
    }
}

/// GDTR or IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// The register state the machine loads into a vCPU at boot and reads
/// back for dumps. General registers are in encoding order: rax, rcx, rdx,
/// rbx, rsp, rbp, rsi, rdi, r8..r15.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuState {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    /// x87/MMX/SSE state, as FXSAVE lays it out.
    pub fpu: FpuState,
}

/// The x87, MMX and SSE state (the FXSAVE image, field by field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FpuState {
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word as FXSAVE stores it: bit i set = ST(i)'s register valid.
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub mxcsr: u32,
    /// ST0..ST7 / MM0..MM7 as 80-bit values in the low 10 bytes.
    pub st: [[u8; 16]; 8],
    pub xmm: [u128; 16],
}

impl Default for FpuState {
    /// The state after FNINIT and with MXCSR at its reset value.
    fn default() -> Self {
        FpuState {
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fdp: 0,
            mxcsr: 0x1f80,
            st: [[0; 16]; 8],
            xmm: [0; 16],
        }
    }
}

impl CpuState {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;

    /// The state of an x86 CPU after RESET, before the loaders change it:
    /// real mode, CS:IP = F000:FFF0 with CS base FFFF0000.
    pub fn reset() -> Self {
        let data = Segment::real_mode(0, false);
        CpuState {
            rip: 0xfff0,
            rflags: 0x2,
            cs: Segment {
                base: 0xffff_0000,
                ..Segment::real_mode(0xf000, true)
            },
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: Segment {
                type_: 0x3,
                s: false,
                present: true,
                limit: 0xffff,
                ..Default::default()
            },
            ldt: Segment {
                type_: 0x2,
                s: false,
                present: true,
                limit: 0xffff,
                ..Default::default()
            },
            gdt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: 0x6000_0010,
            ..Default::default()
        }
    }
}

const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

impl fmt::Display for CpuState {
    /// A register dump in the shape QEMU's `info registers` uses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in GPR_NAMES.iter().zip(self.gpr).enumerate() {
            write!(f, "{name:>3}={value:016x}")?;
            f.write_str(if i % 4 == 3 { "\n" } else { " " })?;
        }
        writeln!(f, "rip={:016x} rflags={:08x}", self.rip, self.rflags)?;
        for (name, s) in [
            ("es", &self.es),
            ("cs", &self.cs),
            ("ss", &self.ss),
            ("ds", &self.ds),
            ("fs", &self.fs),
            ("gs", &self.gs),
            ("ldt", &self.ldt),
            ("tr", &self.tr),
        ] {
            writeln!(
                f,
                "{name:<3} ={:04x} {:016x} {:08x} type={:x} s={} dpl={} p={} l={} db={} g={}{}",
                s.selector,
                s.base,
                s.limit,
                s.type_,
                u8::from(s.s),
                s.dpl,
                u8::from(s.present),
                u8::from(s.l),
                u8::from(s.db),
                u8::from(s.g),
                if s.unusable { " unusable" } else { "" }
            )?;
        }
        writeln!(f, "gdt={:016x} {:04x}", self.gdt.base, self.gdt.limit)?;
        writeln!(f, "idt={:016x} {:04x}", self.idt.base, self.idt.limit)?;
        write!(
            f,
            "cr0={:08x} cr2={:016x} cr3={:016x} cr4={:08x} cr8={:x} efer={:x}",
            self.cr0, self.cr2, self.cr3, self.cr4, self.cr8, self.efer
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_state_fetches_from_the_reset_vector() {
        let s = CpuState::reset();
        assert_eq!(s.cs.base + s.rip, 0xffff_fff0);
        assert_eq!(s.cr0 & 1, 0, "reset state is real mode");
    }

    #[test]
    fn dump_names_every_register() {
        let text = CpuState::reset().to_string();
        for name in GPR_NAMES.iter().chain(&["rip", "cr3", "efer", "gdt", "tr"]) {
            assert!(text.contains(name), "{name} missing from dump:\n{text}");
        }
    }
}
