//! Where things go in guest memory and how a kernel gets there: the memory
//! map, the kernel loaders (bzImage, ELF/PVH, multiboot) and ACPI tables.
//! This crate writes guest memory and produces the BSP's entry registers;
//! it never runs anything.

pub mod layout;
