#!/bin/busybox sh
# vmplay's /init (written by the vmplay-image crate). In order:
#   1. busybox's applets, /proc, /sys, /dev (devtmpfs), /dev/pts;
#   2. the kernel modules listed in /etc/vmplay/modules, in that
#      (dependency) order;
#   3. ip=CLIENT:SERVER:GATEWAY:NETMASK:HOSTNAME:DEVICE:AUTOCONF:DNS0:DNS1
#      (as the kernel documents it; ip=dhcp asks DHCP) configures eth0;
#   4. then one of:
#      root=DEV|UUID=U|LABEL=L|PARTUUID=P [rootfstype=T] [rootflags=F]
#      [ro|rw] [init=PATH]:
#          mount DEV and switch_root to PATH (default /sbin/init);
#      /etc/vmplay/run exists: run it, then power off;
#      otherwise: an interactive shell on the console (job control), and
#          power off when it exits.
# `poweroff`, `halt` and `reboot` from any shell work: this init is PID 1
# and turns their signals into the real thing.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
set -f

say() { echo "vmplay-init: $*"; }
off() {
    sync
    poweroff -f
}
trap off USR1 USR2
trap 'sync; reboot -f' TERM

mkdir -p /proc /sys /dev /run /tmp /mnt /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
hostname -F /etc/hostname 2>/dev/null
# Firecracker's boot timer (`--boot-timer`): the byte 123 at the start of
# the 32-bit MMIO hole (never RAM); without the device the write is lost.
[ -c /dev/mem ] && devmem 0xc0000000 8 123 2>/dev/null

release=$(uname -r)
if [ -f /etc/vmplay/modules ]; then
    while read -r module; do
        [ -n "$module" ] || continue
        insmod "/lib/modules/$release/$module" || say "cannot load $module"
    done </etc/vmplay/modules
fi

root=
init=/sbin/init
rootfstype=
rootflags=
mode=ro
ip=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    root=*) root=${arg#root=} ;;
    init=*) init=${arg#init=} ;;
    rootfstype=*) rootfstype=${arg#rootfstype=} ;;
    rootflags=*) rootflags=${arg#rootflags=} ;;
    ro) mode=ro ;;
    rw) mode=rw ;;
    ip=*) ip=${arg#ip=} ;;
    esac
done
set +f

# Waits up to $2 tenths of a second for the test `[ $1 ]` to hold.
wait_for() {
    n=0
    while ! eval "[ $1 ]"; do
        n=$((n + 1))
        [ "$n" -gt "$2" ] && return 1
        sleep 0.1
    done
}

ip link set lo up 2>/dev/null
configure_network() {
    case "$1" in
    "" | off | none) return ;;
    dhcp | on | any | both | bootp | rarp) set -- "::::::dhcp" ;;
    esac
    old_ifs=$IFS
    IFS=:
    set -- $1
    IFS=$old_ifs
    client=$1 gateway=$3 netmask=$4 name=$5 device=${6:-eth0} auto=$7 dns0=$8 dns1=$9
    if ! wait_for "-e /sys/class/net/$device" 30; then
        say "ip=: no network interface $device"
        return
    fi
    [ -n "$name" ] && hostname "$name"
    if [ -z "$client" ] || [ "$auto" = dhcp ] || [ "$auto" = on ] || [ "$auto" = any ]; then
        ip link set "$device" up
        udhcpc -i "$device" -n -q -t 5 -T 1 -s /usr/share/udhcpc/default.script >/dev/null 2>&1 ||
            say "no DHCP lease on $device"
        return
    fi
    ifconfig "$device" "$client" ${netmask:+netmask "$netmask"} up
    [ -n "$gateway" ] && route add default gw "$gateway" dev "$device"
    if [ -n "$dns0$dns1" ]; then
        : >/etc/resolv.conf
        for server in $dns0 $dns1; do echo "nameserver $server" >>/etc/resolv.conf; done
    fi
    say "$device has $client"
}
configure_network "$ip"

shell() {
    say "$*"
    setsid cttyhack sh -l </dev/console >/dev/console 2>&1 &
    # A trapped signal (poweroff) interrupts `wait`; the shell's exit ends it.
    wait $!
}

# The partition of a /dev/vd* disk whose PARTUUID is $1: a GPT entry's
# unique GUID, or an MBR disk signature and partition number (SSSSSSSS-NN).
partuuid_device() {
    want=$(echo "$1" | tr A-F a-f)
    for sys in /sys/block/vd*; do
        disk=/dev/${sys##*/}
        [ -b "$disk" ] || continue
        if [ "$(dd if="$disk" bs=8 skip=64 count=1 2>/dev/null)" = "EFI PART" ]; then
            lba=$(hexdump -s 584 -n 4 -e '1/4 "%u"' "$disk")
            count=$(hexdump -s 592 -n 4 -e '1/4 "%u"' "$disk")
            size=$(hexdump -s 596 -n 4 -e '1/4 "%u"' "$disk")
            i=0
            while [ "$i" -lt "$count" ] && [ "$i" -lt 256 ]; do
                guid=$(hexdump -s $((lba * 512 + i * size + 16)) -n 16 \
                    -e '1/4 "%08x" "-" 1/2 "%04x" "-" 1/2 "%04x" "-" 2/1 "%02x" "-" 6/1 "%02x"' "$disk")
                i=$((i + 1))
                [ "$guid" = "$want" ] && echo "$disk$i" && return
            done
        else
            signature=$(hexdump -s 440 -n 4 -e '1/4 "%08x"' "$disk")
            case "$want" in
            "$signature"-??) echo "$disk$((0x${want#*-}))" && return ;;
            esac
        fi
    done
}

if [ -n "$root" ]; then
    case "$root" in
    UUID=* | LABEL=*) device=$(findfs "$root") ;;
    PARTUUID=*)
        wait_for "-n \"\$(partuuid_device ${root#PARTUUID=})\"" 100
        device=$(partuuid_device "${root#PARTUUID=}")
        ;;
    *) device=$root ;;
    esac
    if [ -z "$device" ] || ! wait_for "-b $device" 100; then
        shell "root=$root: no such block device; a shell instead (exit powers off)"
        off
    fi
    mkdir -p /newroot
    if ! mount -o "$mode${rootflags:+,$rootflags}" ${rootfstype:+-t "$rootfstype"} "$device" /newroot; then
        shell "cannot mount $device; a shell instead (exit powers off)"
        off
    fi
    if [ ! -x "/newroot$init" ] && [ ! -L "/newroot$init" ]; then
        shell "$device has no $init; a shell instead (exit powers off)"
        off
    fi
    for fs in dev proc sys; do
        if [ -d "/newroot/$fs" ]; then
            mount --move "/$fs" "/newroot/$fs"
        else
            umount -l "/$fs"
        fi
    done
    exec switch_root /newroot "$init"
fi

if [ -e /etc/vmplay/run ]; then
    if [ -x /etc/vmplay/run ]; then
        /etc/vmplay/run
    else
        sh /etc/vmplay/run
    fi
    say "/etc/vmplay/run exited with status $?"
    off
fi

shell "$(uname -sr); a shell on the console: exit or poweroff stops the VM"
off
