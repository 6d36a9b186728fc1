//! Fetches Debian's cloud kernel and busybox into the workspace's
//! `guest-assets/debian` (apt-get download; reused when already there) and
//! builds the initramfs the virtio tests boot.

use std::path::PathBuf;
use vmplay_image::{DebianAssets, Entry, Initramfs, MODULE_LIST, RUN_HOOK};

fn cache() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest-assets/debian")
}

/// The assets, or `None` (after saying why) where apt cannot fetch them;
/// with `VMPLAY_REQUIRE_ASSETS` set (CI) that fails instead.
fn assets() -> Option<DebianAssets> {
    match DebianAssets::fetch(&cache(), &mut |line| eprintln!("{line}")) {
        Ok(a) => Some(a),
        Err(e) if std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none() => {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn fetches_the_kernel_and_busybox_and_reuses_them_on_a_second_run() {
    let Some(first) = assets() else { return };
    assert!(first.kernel().is_file());
    assert!(first.busybox().is_file());
    assert!(
        first.kernel_release().ends_with("-cloud-amd64"),
        "{}",
        first.kernel_release()
    );
    assert!(first.kernel_package().contains(first.kernel_release()));
    let mut lines = Vec::new();
    let second = DebianAssets::fetch(&cache(), &mut |l| lines.push(l.to_string())).unwrap();
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("downloading") && !l.contains("unpacking")),
        "{lines:?}"
    );
    assert_eq!(second.kernel(), first.kernel());
    let offline = DebianAssets::open(&cache()).unwrap();
    assert_eq!(offline.kernel_release(), first.kernel_release());
    assert!(cache().join("vmlinuz").exists() && cache().join("busybox").exists());
}

#[test]
fn the_debian_initramfs_holds_busybox_init_and_the_virtio_modules_in_load_order() {
    let Some(assets) = assets() else { return };
    let image =
        Initramfs::debian(&assets)
            .unwrap()
            .file(RUN_HOOK, "#!/bin/sh\necho hello\n", 0o755);
    assert!(matches!(
        image.get("/init"),
        Some(Entry::File { mode: 0o755, .. })
    ));
    assert!(matches!(
        image.get("/bin/busybox"),
        Some(Entry::File { .. })
    ));
    assert!(matches!(
        image.get("/dev/console"),
        Some(Entry::CharDevice {
            major: 5,
            minor: 1,
            ..
        })
    ));
    let Some(Entry::File { data, .. }) = image.get(MODULE_LIST) else {
        panic!("no {MODULE_LIST}")
    };
    let list = String::from_utf8(data.clone()).unwrap();
    let names: Vec<&str> = list
        .lines()
        .map(|l| l.rsplit('/').next().unwrap().trim_end_matches(".ko"))
        .collect();
    let position = |name: &str| names.iter().position(|n| *n == name);
    // Whatever of these the kernel has as modules comes after what it needs.
    for (module, before) in [
        ("virtio_blk", "virtio_ring"),
        ("virtio_net", "net_failover"),
        ("net_failover", "failover"),
        (
            "vmw_vsock_virtio_transport",
            "vmw_vsock_virtio_transport_common",
        ),
        ("vmw_vsock_virtio_transport_common", "vsock"),
        ("virtio_console", "virtio_ring"),
    ] {
        if let (Some(m), Some(b)) = (position(module), position(before)) {
            assert!(b < m, "{before} must load before {module}: {names:?}");
        }
    }
    let tree = vmplay_image::ModuleTree::open(assets.modules_dir()).unwrap();
    for wanted in vmplay_image::GUEST_MODULES {
        let name = vmplay_image::modules::normalize(wanted);
        assert!(
            tree.is_builtin(&name)
                || position(&name.replace('_', "-"))
                    .or(position(&name))
                    .is_some(),
            "{name} is neither built in nor in {names:?}"
        );
    }
    for path in list.lines() {
        let full = format!("/lib/modules/{}/{path}", assets.kernel_release());
        let Some(Entry::File { data, .. }) = image.get(&full) else {
            panic!("{full} is listed but not in the image")
        };
        assert_eq!(&data[..4], b"\x7fELF", "{full} is an uncompressed module");
    }
    let out = std::env::temp_dir().join(format!("vmplay-image-it-{}.cpio", std::process::id()));
    image.write(&out).unwrap();
    let size = std::fs::metadata(&out).unwrap().len();
    std::fs::remove_file(&out).unwrap();
    assert!(size > 1 << 20, "{size} bytes");
}
