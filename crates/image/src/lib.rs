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
//! - [`build_rootfs`]: a Debian root file system (`mmdebstrap` minbase and
//!   the packages asked for) on an ext4 image made with `mkfs.ext4 -d`.
//!
//! It does not boot anything (the `vmplay` binary does) and needs no root
//! privileges, except that `apt-get update` does when apt has no package
//! lists yet, and `mmdebstrap` does where it cannot run unprivileged.

#![forbid(unsafe_code)]

mod debian;
mod error;
mod initramfs;
pub mod modules;
mod rootfs;

pub use debian::{BUSYBOX_PACKAGE, DebianAssets, GUEST_MODULES, KERNEL_METAPACKAGE};
pub use error::ImageError;
pub use initramfs::{
    DEBIAN_INIT, Entry, INIT_SCRIPT, Initramfs, MODULE_LIST, RUN_HOOK, write_atomically,
};
pub use modules::{Module, ModuleTree};
pub use rootfs::{ROOTFS_INIT, RootfsOptions, build_rootfs};
