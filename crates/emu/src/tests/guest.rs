//! Test guests: memory, a 64-bit environment (GDT, TSS, IDT, identity
//! page tables) and a run loop that records port output.

use std::sync::Arc;

use iced_x86::code_asm::CodeAssembler;
use vm_memory::{Bytes, GuestAddress};
use vmplay_hypervisor::{CpuState, GuestMemory, Hypervisor, Segment, Vcpu, VcpuExit, Vm, VmSpec};

use crate::{EmuHypervisor, EmuOptions};

pub const MEM: usize = 8 << 20;
pub const GDT: u64 = 0x500;
pub const TSS: u64 = 0x600;
pub const PML4: u64 = 0x10000;
pub const IDT: u64 = 0x13000;
pub const CODE: u64 = 0x10_0000;
pub const STACK: u64 = 0x8_0000;
pub const IST_STACK: u64 = 0x7_0000;
pub const KCODE: u16 = 0x10;
pub const KDATA: u16 = 0x18;
pub const UDATA: u16 = 0x28;
pub const UCODE: u16 = 0x30;
pub const TR: u16 = 0x40;

pub struct Guest {
    pub vm: Arc<dyn Vm>,
    pub mem: GuestMemory,
    pub vcpu: Box<dyn Vcpu>,
}

/// What a run produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes written to COM1 (0x3f8).
    pub serial: Vec<u8>,
    /// Every (port, value) written elsewhere.
    pub ports: Vec<(u16, u64)>,
    pub mmio_writes: Vec<(u64, u64)>,
    pub end: End,
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub enum End {
    #[default]
    Running,
    Halt,
    Shutdown,
    Interrupted,
    Error,
    /// Stopped for the debugger.
    Debug(vmplay_hypervisor::DebugEvent),
}

pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).expect("test memory")
}

impl Guest {
    pub fn new(vcpus: u32) -> Guest {
        let mem = memory();
        let vm = EmuHypervisor::new(EmuOptions::default())
            .create_vm(&VmSpec { vcpus }, &mem)
            .expect("create vm");
        let vcpu = vm.create_vcpu(0).expect("vcpu 0");
        Guest { vm, mem, vcpu }
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("write guest memory");
    }

    pub fn write_u64(&self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    pub fn read_u64(&self, addr: u64) -> u64 {
        let mut b = [0u8; 8];
        self.mem
            .read_slice(&mut b, GuestAddress(addr))
            .expect("read guest memory");
        u64::from_le_bytes(b)
    }

    /// Assembles `f` for `bits` at `ip`, stores it there, returns its size.
    pub fn code(&self, bits: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> usize {
        let mut a = CodeAssembler::new(bits).expect("assembler");
        f(&mut a);
        let bytes = a.assemble(ip).expect("assemble");
        self.write(ip, &bytes);
        bytes.len()
    }

    /// GDT, TSS (RSP0, IST1), identity page tables over 1 GiB with 2 MiB
    /// user-accessible pages, an empty IDT; returns the 64-bit entry state.
    pub fn long_mode(&self, rip: u64) -> CpuState {
        let gdt: [u64; 10] = [
            0,
            0,
            0x00af_9b00_0000_ffff, // 0x10 kernel code 64
            0x00cf_9300_0000_ffff, // 0x18 kernel data
            0x00cf_fb00_0000_ffff, // 0x20 user code 32
            0x00cf_f300_0000_ffff, // 0x28 user data
            0x00af_fb00_0000_ffff, // 0x30 user code 64
            0,
            // 0x40 64-bit TSS at TSS, limit 0x67
            0x0000_8900_0000_0067 | ((TSS & 0xff_ffff) << 16) | (((TSS >> 24) & 0xff) << 56),
            TSS >> 32,
        ];
        for (k, d) in gdt.iter().enumerate() {
            self.write_u64(GDT + 8 * k as u64, *d);
        }
        self.write_u64(TSS + 4, STACK); // RSP0
        self.write_u64(TSS + 0x24, IST_STACK); // IST1
        let pdpt = PML4 + 0x1000;
        let pd = PML4 + 0x2000;
        self.write_u64(PML4, pdpt | 7);
        self.write_u64(pdpt, pd | 7);
        for k in 0..512u64 {
            self.write_u64(pd + 8 * k, (k << 21) | 0x87);
        }
        let code = Segment {
            selector: KCODE,
            type_: 0xb,
            s: true,
            present: true,
            l: true,
            g: true,
            limit: 0xffff_ffff,
            ..Default::default()
        };
        let data = Segment::flat(KDATA, 0x3, false, true);
        CpuState {
            rip,
            rflags: 2,
            cs: code,
            ss: data,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            tr: Segment::tss(TR, TSS, 0x67),
            ldt: Segment::no_ldt(),
            gdt: vmplay_hypervisor::DescriptorTable {
                base: GDT,
                limit: 0x4f,
            },
            idt: vmplay_hypervisor::DescriptorTable {
                base: IDT,
                limit: 0xfff,
            },
            cr0: 0x8005_0033,
            cr3: PML4,
            cr4: 0x220,
            efer: 0xd01,
            gpr: {
                let mut g = [0; 16];
                g[4] = STACK;
                g
            },
            ..Default::default()
        }
    }

    /// Points IDT vector `v` at `handler` (64-bit interrupt gate, DPL 3
    /// so `int n` from ring 3 works, IST `ist`).
    pub fn idt64(&self, v: u8, handler: u64, ist: u8) {
        let lo = (handler & 0xffff)
            | (u64::from(KCODE) << 16)
            | (u64::from(ist) << 32)
            | (0xeeu64 << 40)
            | ((handler >> 16) & 0xffff) << 48;
        self.write_u64(IDT + 16 * u64::from(v), lo);
        self.write_u64(IDT + 16 * u64::from(v) + 8, handler >> 32);
    }

    /// Runs until halt/shutdown or `max` exits, answering port reads with
    /// `answer(port)` and MMIO reads with `mmio(addr)`.
    pub fn run_with(
        &mut self,
        max: usize,
        mut answer: impl FnMut(u16) -> u64,
        mut mmio: impl FnMut(u64) -> u64,
    ) -> Outcome {
        let mut o = Outcome::default();
        for _ in 0..max {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut { port: 0x3f8, data }) => o.serial.push(data[0]),
                Ok(VcpuExit::IoOut { port, data }) => {
                    let mut b = [0u8; 8];
                    b[..data.len()].copy_from_slice(data);
                    o.ports.push((port, u64::from_le_bytes(b)));
                }
                Ok(VcpuExit::IoIn { port, data }) => {
                    let v = answer(port).to_le_bytes();
                    let n = data.len();
                    data.copy_from_slice(&v[..n]);
                }
                Ok(VcpuExit::MmioRead { addr, data }) => {
                    let v = mmio(addr).to_le_bytes();
                    let n = data.len();
                    data.copy_from_slice(&v[..n]);
                }
                Ok(VcpuExit::MmioWrite { addr, data }) => {
                    let mut b = [0u8; 8];
                    b[..data.len()].copy_from_slice(data);
                    o.mmio_writes.push((addr, u64::from_le_bytes(b)));
                }
                Ok(VcpuExit::Halt) => {
                    o.end = End::Halt;
                    return o;
                }
                Ok(VcpuExit::Shutdown) => {
                    o.end = End::Shutdown;
                    return o;
                }
                Ok(VcpuExit::Interrupted) => {
                    o.end = End::Interrupted;
                    return o;
                }
                Ok(VcpuExit::Debug(ev)) => {
                    o.end = End::Debug(ev);
                    return o;
                }
                Ok(VcpuExit::InternalError(_)) | Err(_) => {
                    o.end = End::Error;
                    return o;
                }
            }
        }
        o
    }

    pub fn run(&mut self) -> Outcome {
        self.run_with(10_000, |_| 0, |_| 0)
    }

    pub fn state(&self) -> CpuState {
        self.vcpu.state().expect("state")
    }
}
