//! virtio-blk under Debian's stock kernel on the software CPU: the guest
//! mounts an ext4 image the host made, checks and writes files, syncs and
//! powers off, and the host reads back what it wrote; a read-only drive
//! stays byte-for-byte unchanged; a root drive boots; data the guest synced
//! survives vmplay being killed.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{TempDir, debian_guest, host_tool, run_with_deadline, vmplay_exe};

const BOOT_DEADLINE: Duration = Duration::from_secs(300);
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// An ext4 image of `size_mib` holding `files` (made with `mkfs.ext4 -d`).
fn ext4_image(
    dir: &TempDir,
    name: &str,
    size_mib: u32,
    files: &[(&str, &[u8], u32)],
) -> Option<PathBuf> {
    let mkfs = host_tool("mkfs.ext4")?;
    let tree = dir.path().join(format!("{name}.d"));
    std::fs::create_dir_all(&tree).unwrap();
    for (path, data, mode) in files {
        let p = tree.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    let image = dir.path().join(format!("{name}.img"));
    let out = Command::new(mkfs)
        .args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
        ])
        .arg(&tree)
        .arg(&image)
        .arg(format!("{size_mib}M"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(image)
}

/// `debugfs -R "cat PATH" image`: a file's bytes as the host sees them.
fn debugfs_cat(image: &Path, path: &str) -> Vec<u8> {
    let debugfs = host_tool("debugfs").expect("debugfs");
    let out = Command::new(debugfs)
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn vmplay(kernel: &Path, initrd: &Path, extra: &[String]) -> Command {
    let mut cmd = Command::new(vmplay_exe());
    cmd.args([
        "run", "--accel", "emu", "--memory", "512M", "--serial", "stdio",
    ])
    .arg("--kernel")
    .arg(kernel)
    .arg("--initrd")
    .arg(initrd)
    .args(["--cmdline", CMDLINE])
    .args(extra);
    cmd
}

const EXT4_SCRIPT: &str = r#"#!/bin/sh
mkdir -p /mnt/a
mount -t ext4 /dev/vda /mnt/a || echo "mount failed"
echo "sha $(sha256sum /mnt/a/random.bin | cut -d' ' -f1)"
echo "written in the guest" > /mnt/a/new.txt
dd if=/dev/urandom of=/mnt/a/big.bin bs=64k count=16 2>/dev/null
echo "big $(sha256sum /mnt/a/big.bin | cut -d' ' -f1)"
sync
umount /mnt/a
echo "vdb ro $(cat /sys/block/vdb/ro)"
echo "vda size $(cat /sys/block/vda/size)"
if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; then
    echo "raw write to vdb succeeded"
else
    echo "raw write to vdb refused"
fi
echo "serial $(cat /sys/block/vda/serial 2>/dev/null)"
"#;

#[test]
fn guest_reads_and_writes_an_ext4_drive_and_a_read_only_drive_stays_unchanged() {
    let dir = TempDir::new();
    let random = random_bytes(3 << 20, 0x5eed);
    let Some(disk) = ext4_image(&dir, "data", 64, &[("/random.bin", &random, 0o644)]) else {
        return;
    };
    let Some(ro) = ext4_image(&dir, "ro", 16, &[("/hello", b"read only\n", 0o644)]) else {
        return;
    };
    let ro_before = std::fs::read(&ro).unwrap();
    let Some((kernel, initrd)) = debian_guest(&dir, EXT4_SCRIPT, &[]) else {
        return;
    };
    let cmd = vmplay(
        &kernel,
        &initrd,
        &[
            "--drive".into(),
            format!("path={},id=data0", disk.display()),
            "--drive".into(),
            format!("path={},readonly=on", ro.display()),
        ],
    );
    let run = run_with_deadline(cmd, BOOT_DEADLINE);
    run.assert_no_panic();
    assert_eq!(
        run.code(),
        0,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    let out = &run.stdout;
    assert!(
        out.contains(&format!("sha {}", sha256_hex(&random))),
        "{out}"
    );
    assert!(out.contains("vdb ro 1"), "{out}");
    assert!(out.contains(&format!("vda size {}", 64 * 2048)), "{out}");
    assert!(out.contains("raw write to vdb refused"), "{out}");
    assert!(
        out.contains("serial data0"),
        "GET_ID gives the drive id: {out}"
    );
    assert_eq!(debugfs_cat(&disk, "/new.txt"), b"written in the guest\n");
    let big = debugfs_cat(&disk, "/big.bin");
    assert_eq!(big.len(), 1 << 20);
    assert!(out.contains(&format!("big {}", sha256_hex(&big))), "{out}");
    assert!(
        std::fs::read(&ro).unwrap() == ro_before,
        "the read-only image changed"
    );
}

#[test]
fn a_root_drive_boots_to_its_file_system() {
    let dir = TempDir::new();
    let Some(busybox) = support::debian_asset("busybox") else {
        return;
    };
    let busybox = std::fs::read(busybox).unwrap();
    let init = b"#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
        echo \"root is $(/bin/busybox awk '$2 == \"/\" {print $1, $4}' /proc/mounts | /bin/busybox tail -1)\"\n\
        echo \"marker $(/bin/busybox cat /marker)\"\n\
        /bin/busybox poweroff -f\n";
    let Some(root) = ext4_image(
        &dir,
        "root",
        32,
        &[
            ("/bin/busybox", &busybox, 0o755),
            ("/sbin/init", init, 0o755),
            ("/marker", b"on the root drive", 0o644),
            ("/proc/.keep", b"", 0o644),
        ],
    ) else {
        return;
    };
    let Some((kernel, initrd)) = debian_guest(&dir, "#!/bin/sh\necho 'not switched'\n", &[]) else {
        return;
    };
    let cmd = vmplay(
        &kernel,
        &initrd,
        &["--drive".into(), format!("path={},root=on", root.display())],
    );
    let run = run_with_deadline(cmd, BOOT_DEADLINE);
    run.assert_no_panic();
    assert_eq!(
        run.code(),
        0,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.contains("root is /dev/vda rw"), "{}", run.stdout);
    assert!(
        run.stdout.contains("marker on the root drive"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("not switched"), "{}", run.stdout);
}

#[test]
fn data_the_guest_synced_survives_sigkill() {
    let dir = TempDir::new();
    let Some(disk) = ext4_image(&dir, "kill", 32, &[]) else {
        return;
    };
    let script = r#"#!/bin/sh
mkdir -p /mnt/a
mount -t ext4 /dev/vda /mnt/a
dd if=/dev/urandom of=/mnt/a/payload bs=64k count=8 2>/dev/null
echo "payload $(sha256sum /mnt/a/payload | cut -d' ' -f1)"
sync
echo "synced"
sleep 1000
"#;
    let Some((kernel, initrd)) = debian_guest(&dir, script, &[]) else {
        return;
    };
    let mut child = vmplay(
        &kernel,
        &initrd,
        &["--drive".into(), format!("path={}", disk.display())],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOOT_DEADLINE;
    let mut sha = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!("the guest never said it synced");
        };
        if let Some(s) = line.strip_prefix("payload ") {
            sha = Some(s.trim().to_string());
        }
        if line.trim() == "synced" {
            break;
        }
    }
    // SIGKILL: no orderly shutdown, nothing flushed on the way out.
    child.kill().unwrap();
    child.wait().unwrap();
    let payload = debugfs_cat(&disk, "/payload");
    assert_eq!(payload.len(), 512 * 1024);
    assert_eq!(Some(sha256_hex(&payload)), sha);
}
