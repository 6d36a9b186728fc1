#!/bin/sh
# busybox udhcpc's hook in vmplay's initramfs: applies a lease to $interface.
case "$1" in
deconfig)
    ifconfig "$interface" 0.0.0.0 up
    ;;
bound | renew)
    ifconfig "$interface" "$ip" ${subnet:+netmask "$subnet"} up
    for gateway in $router; do
        route add default gw "$gateway" dev "$interface"
        break
    done
    if [ -n "$dns" ]; then
        : >/etc/resolv.conf
        for server in $dns; do echo "nameserver $server" >>/etc/resolv.conf; done
    fi
    echo "vmplay-init: $interface has $ip (DHCP)" >/dev/console
    ;;
esac
exit 0
