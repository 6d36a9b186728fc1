//! The `workloads` initramfs: Debian's static busybox, the applet links
//! the workloads use, and an `/init` that runs the workloads named on the
//! kernel command line (`vmplay_run=sh,sha256,...`), times each with the
//! guest clock (`/proc/uptime`, 10 ms steps) and powers the VM off.
//! Written as an uncompressed newc cpio (vmplay-image's writer), so the
//! kernel does not inflate it.

/// The workloads `/init` knows, in the order they run, with what each does.
pub const WORKLOADS: &[(&str, &str)] = &[
    ("sh", "busybox sh arithmetic loop, 20000 iterations"),
    ("sha256", "sha256sum of 16 MiB"),
    ("gzip", "gzip -c of 8 MiB"),
    ("fork", "300 x fork+exec of /bin/true"),
    ("files", "2000 x small file write + read"),
];

/// Applets `/init` calls, each a symlink to /bin/busybox.
const APPLETS: &[&str] = &[
    "sh",
    "mount",
    "poweroff",
    "true",
    "cat",
    "head",
    "sha256sum",
    "gzip",
    "rm",
    "echo",
];

/// The init script. Each timed workload prints
/// `vmplay-workload NAME MS` on the console; the untimed preparation
/// (building the data files from copies of the busybox binary, real
/// machine code rather than zeros) happens before its clock starts.
const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
read -r cmdline < /proc/cmdline
run=none
for w in $cmdline; do
    case "$w" in vmplay_run=*) run="${w#vmplay_run=}" ;; esac
done
# centiseconds since boot, without forking: uptime is "S.CC"
cs() { read -r up idle < /proc/uptime; s=${up%.*}; c=${up#*.}; now=$((s * 100 + 1$c - 100)); }
begin() { cs; t0=$now; }
end() { cs; echo "vmplay-workload $1 $(( (now - t0) * 10 ))"; }
data() {
    i=0; : > /tmp/src
    while [ $i -lt 9 ]; do cat /bin/busybox >> /tmp/src; i=$((i + 1)); done
    head -c $1 /tmp/src > /tmp/data; rm /tmp/src
}
IFS_SAVE="$IFS"; IFS=,; set -- $run; IFS="$IFS_SAVE"
for w in "$@"; do
    case "$w" in
    sh)
        begin; i=0; while [ $i -lt 20000 ]; do i=$((i + 1)); done; end sh ;;
    sha256)
        data 16777216; begin; sha256sum /tmp/data > /dev/null; end sha256; rm /tmp/data ;;
    gzip)
        data 8388608; begin; gzip -c /tmp/data > /dev/null; end gzip; rm /tmp/data ;;
    fork)
        begin; i=0; while [ $i -lt 300 ]; do /bin/true; i=$((i + 1)); done; end fork ;;
    files)
        begin; i=0; while [ $i -lt 2000 ]; do echo "line $i" > /tmp/small; read -r x < /tmp/small; i=$((i + 1)); done; end files ;;
    info)
        mount -t sysfs sys /sys
        for f in /sys/devices/system/cpu/vulnerabilities/*; do echo "vmplay-info ${f##*/}: $(cat $f)"; done ;;
    prep16) data 16777216; rm /tmp/data ;;
    prep8) data 8388608; rm /tmp/data ;;
    none) ;;
    *) echo "vmplay-workload $w unknown" ;;
    esac
done
echo "vmplay-workload done"
poweroff -f
"#;

/// The initramfs around `busybox` (the static binary's bytes), written by
/// vmplay-image's newc writer.
pub fn build(busybox: &[u8]) -> Result<Vec<u8>, vmplay_image::ImageError> {
    let mut image = vmplay_image::Initramfs::new();
    for d in ["/bin", "/dev", "/proc", "/sys", "/tmp"] {
        image = image.dir(d, 0o755);
    }
    image = image.file("/bin/busybox", busybox, 0o755);
    for a in APPLETS {
        image = image.symlink(&format!("/bin/{a}"), "busybox");
    }
    image.file("/init", INIT, 0o755).to_bytes()
}

/// Parses the console lines `vmplay-workload NAME MS` into (name, ms).
pub fn parse_times(console: &str) -> Vec<(String, f64)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("vmplay-workload ")?;
            let mut it = rest.split_whitespace();
            let name = it.next()?;
            let ms = it.next()?.parse::<f64>().ok()?;
            Some((name.to_string(), ms))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_newc_with_init_and_trailer() {
        let a = build(b"\x7fELF-ish").unwrap();
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("bin/busybox\0"));
        assert!(text.contains("init\0"));
        assert!(text.contains("#!/bin/sh\nmount -t proc"));
        assert!(text.contains("TRAILER!!!"));
        // The busybox entry's size field is the binary's length.
        let at = text.find("bin/busybox\0").unwrap();
        let size_field = &text[at - 110 + 54..at - 110 + 62];
        assert_eq!(u32::from_str_radix(size_field, 16).unwrap(), 8);
    }

    #[test]
    fn parses_workload_lines_and_ignores_the_rest() {
        let t = parse_times("boot noise\nvmplay-workload sh 1230\r\nvmplay-workload done\n");
        assert_eq!(t, vec![("sh".to_string(), 1230.0)]);
    }
}
