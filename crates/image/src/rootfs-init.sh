#!/bin/sh
# vmplay's init for a Debian root file system (/sbin/vmplay-init, written by
# the vmplay-image crate; /sbin/init points here unless a package brought
# its own). PID 1 after the initramfs switched root: /dev, /proc and /sys
# came along, eth0 is configured already. It mounts what is left, starts a
# root shell on the console (bash with job control), and powers off when the
# shell exits. `poweroff`, `reboot` and `halt` (busybox's) signal this
# script, which does the real thing.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
off() {
    sync
    mount -o remount,ro / 2>/dev/null
    busybox poweroff -f
}
trap off USR1 USR2
trap 'sync; mount -o remount,ro / 2>/dev/null; busybox reboot -f' TERM

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mountpoint -q /dev/pts || mount -t devpts devpts /dev/pts
mountpoint -q /run || mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mountpoint -q /tmp || mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
[ -f /etc/hostname ] && hostname "$(cat /etc/hostname)"
ip link set lo up 2>/dev/null || busybox ip link set lo up

shell=/bin/bash
[ -x "$shell" ] || shell=/bin/sh
echo "vmplay-init: $(uname -sr), Debian $(cat /etc/debian_version); a root shell on the console: exit or poweroff stops the VM"
busybox setsid busybox cttyhack "$shell" -l </dev/console >/dev/console 2>&1 &
wait $!
off
