//! The stack against a second smoltcp stack playing the guest: frames
//! shuttle between them as between the driver and the device.

use super::*;
use crate::config::MmdsVersion;
use serde_json::json;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use vmplay_devices::mmds::Mmds;

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
const GUEST_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);
const MMDS_IP: Ipv4Address = Ipv4Address::new(169, 254, 169, 254);

fn config(version: MmdsVersion) -> MmdsNetConfig {
    let mut store = Mmds::default();
    store
        .put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "big": "y".repeat(40000)}}}))
        .unwrap();
    MmdsNetConfig {
        store: Arc::new(Mutex::new(store)),
        tokens: Arc::default(),
        ipv4: Ipv4Addr::new(169, 254, 169, 254),
        version,
        imds_compat: false,
    }
}

/// The guest: a smoltcp interface whose frames go to the MMDS stack.
struct Guest {
    iface: Interface,
    sockets: SocketSet<'static>,
    frames: Frames,
    epoch: StdInstant,
}

impl Guest {
    fn new() -> Guest {
        let mut frames = Frames::default();
        let c = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        let mut iface = Interface::new(c, &mut frames, Instant::ZERO);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(GUEST_IP.into(), 24));
        });
        // Like `ip route add 169.254.169.254 dev eth0`: on-link.
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(Ipv4Address::new(169, 254, 0, 1).into(), 16));
        });
        Guest {
            iface,
            sockets: SocketSet::new(Vec::new()),
            frames,
            epoch: StdInstant::now(),
        }
    }

    fn connect(&mut self, port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 4096]),
            tcp::SocketBuffer::new(vec![0; 128 * 1024]),
        );
        s.connect(self.iface.context(), (MMDS_IP, PORT), port)
            .unwrap();
        self.sockets.add(s)
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }
}

/// Moves frames both ways until both stacks are quiet.
fn shuttle(guest: &mut Guest, mmds: &mut MmdsStack) {
    for _ in 0..2000 {
        let now = guest.now();
        guest.iface.poll(now, &mut guest.frames, &mut guest.sockets);
        let mut moved = false;
        while let Some(f) = guest.frames.to_guest.pop_front() {
            moved = true;
            // What the device does with a frame the driver sent.
            match mmds.classify(&f) {
                Verdict::Mmds => mmds.push(&f),
                v => panic!("a frame for MMDS was classified {v:?}"),
            }
        }
        mmds.poll();
        let mut buf = vec![0; MTU];
        while let Some(n) = mmds.pop(&mut buf) {
            moved = true;
            guest.frames.from_guest.push_back(buf[..n].to_vec());
        }
        if !moved {
            return;
        }
    }
    panic!("the stacks never went quiet");
}

fn exchange(guest: &mut Guest, mmds: &mut MmdsStack, port: u16, request: &str) -> String {
    let h = guest.connect(port);
    // Real time passes: the guest stack waits after its first ARP request.
    let deadline = StdInstant::now() + std::time::Duration::from_secs(10);
    while guest.sockets.get::<tcp::Socket>(h).state() != tcp::State::Established {
        assert!(StdInstant::now() < deadline, "never connected");
        shuttle(guest, mmds);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    guest
        .sockets
        .get_mut::<tcp::Socket>(h)
        .send_slice(request.as_bytes())
        .unwrap();
    let mut got = Vec::new();
    loop {
        assert!(StdInstant::now() < deadline, "no whole answer: {got:?}");
        shuttle(guest, mmds);
        let s = guest.sockets.get_mut::<tcp::Socket>(h);
        while s.can_recv() {
            let mut buf = [0u8; 4096];
            let n = s.recv_slice(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        if !s.may_recv() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    guest.sockets.get_mut::<tcp::Socket>(h).close();
    shuttle(guest, mmds);
    String::from_utf8(got).unwrap()
}

#[test]
fn a_guest_tcp_stack_gets_metadata_over_arp_and_tcp() {
    let mut mmds = MmdsStack::new(config(MmdsVersion::V1)).unwrap();
    let mut guest = Guest::new();
    let reply = exchange(
        &mut guest,
        &mut mmds,
        40000,
        "GET /latest/meta-data/ami-id HTTP/1.0\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nami-1"), "{reply}");
    // Larger than one segment and than the socket buffer's first fill.
    let reply = exchange(
        &mut guest,
        &mut mmds,
        40001,
        "GET /latest/meta-data/big HTTP/1.0\r\n\r\n",
    );
    assert!(reply.ends_with(&"y".repeat(40000)), "{}", reply.len());
    assert_eq!(mmds.counters.rx_count, 2);
    assert_eq!(mmds.counters.connections_created, 2);
}

#[test]
fn v2_token_round_trip_over_one_kept_alive_connection() {
    let mut mmds = MmdsStack::new(config(MmdsVersion::V2)).unwrap();
    let mut guest = Guest::new();
    let reply = exchange(
        &mut guest,
        &mut mmds,
        40010,
        "PUT /latest/api/token HTTP/1.1\r\nConnection: close\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
    );
    let token = reply.split("\r\n\r\n").nth(1).unwrap().to_string();
    assert_eq!(token.len(), 64, "{reply}");
    let reply = exchange(
        &mut guest,
        &mut mmds,
        40011,
        &format!(
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n\
             GET /latest/meta-data/ami-id HTTP/1.1\r\nConnection: close\r\n\r\n"
        ),
    );
    let answers: Vec<&str> = reply.matches("HTTP/1.1 ").collect();
    assert_eq!(answers.len(), 2, "{reply}");
    assert!(reply.contains("\r\n\r\nami-1HTTP/1.1 401"), "{reply}");
}

#[test]
fn only_arp_and_tcp_port_80_for_the_address_are_taken() {
    let mmds = MmdsStack::new(config(MmdsVersion::V1)).unwrap();
    let mut frame = vec![0u8; 14 + 20 + 20];
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut frame[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&GUEST_IP.octets());
    ip[16..20].copy_from_slice(&MMDS_IP.octets());
    frame[34 + 2..34 + 4].copy_from_slice(&80u16.to_be_bytes());
    frame[34 + 12] = 0x50;
    assert_eq!(mmds.classify(&frame), Verdict::Mmds);
    frame[34 + 2..34 + 4].copy_from_slice(&22u16.to_be_bytes());
    assert_eq!(mmds.classify(&frame), Verdict::Pass);
    frame[14 + 9] = 17; // UDP to the address
    assert_eq!(mmds.classify(&frame), Verdict::Drop);
    frame[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 1]);
    assert_eq!(mmds.classify(&frame), Verdict::Pass);
    assert_eq!(mmds.classify(&[0u8; 5]), Verdict::Pass);
}

#[test]
fn garbage_frames_and_connection_floods_stay_bounded() {
    let mut mmds = MmdsStack::new(config(MmdsVersion::V1)).unwrap();
    let mut rng = 0x1234_5678_u64;
    for _ in 0..5000 {
        let mut f = vec![0u8; 60];
        for b in f.iter_mut() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            *b = rng as u8;
        }
        mmds.push(&f);
        mmds.poll();
        let mut buf = vec![0; MTU];
        while mmds.pop(&mut buf).is_some() {}
    }
    // Many guests' worth of connections: never more than the bound.
    let mut guest = Guest::new();
    for port in 0..100 {
        guest.connect(41000 + port);
    }
    shuttle(&mut guest, &mut mmds);
    assert!(mmds.connections.len() <= MAX_CONNECTIONS);
    assert!(mmds.frames.from_guest.len() <= MAX_QUEUED);
}
