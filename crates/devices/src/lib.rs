//! The devices a guest talks to, and the bus that routes accesses to them.
//! Devices know nothing of vCPUs or backends: they see reads and writes at
//! offsets, raise interrupts through `hypervisor::IrqLine`, and ask the
//! machine to stop through [`VmControl`](control::VmControl).

pub mod bus;
pub mod control;
