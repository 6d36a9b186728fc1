//! Guest images for vmplay.
//!
//! - [`DebianAssets`]: Debian's stock cloud kernel (`linux-image-*-cloud-amd64`)
//!   and `busybox-static`, fetched with `apt-get download` into a cache
//!   directory (reused on the next run) and unpacked with `dpkg-deb`.
//! - [`ModuleTree`]: the kernel's modules, their `.modinfo` dependencies
//!   and the order `insmod` must follow.
//! - [`Initramfs`]: an uncompressed newc archive built in memory. A test
//!   adds its own files to [`Initramfs::debian`]'s image, typically a
//!   script at [`RUN_HOOK`] that the guest's `/init` runs before it powers
//!   off.
//!
//! It does not boot anything (the `vmplay` binary does) and needs no root
//! privileges, except that `apt-get update` does when apt has no package
//! lists yet.

#![forbid(unsafe_code)]

mod debian;
mod error;
mod initramfs;
pub mod modules;

pub use debian::{BUSYBOX_PACKAGE, DebianAssets, GUEST_MODULES, KERNEL_METAPACKAGE};
pub use error::ImageError;
pub use initramfs::{
    DEBIAN_INIT, Entry, INIT_SCRIPT, Initramfs, MODULE_LIST, RUN_HOOK, write_atomically,
};
pub use modules::{Module, ModuleTree};
