//! The virtio-vsock packet header (virtio 1.x §5.10.6, `struct
//! virtio_vsock_hdr`, 44 little-endian bytes) and the constants it uses.
//! Parsing never fails on content: a header is 44 bytes of any value, and
//! the muxer decides what a strange one means.

/// Size of `struct virtio_vsock_hdr` on the wire.
pub const HDR_LEN: usize = 44;

/// The host's context ID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;

/// The only socket type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// Operations (`VIRTIO_VSOCK_OP_*`).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The largest payload one packet may carry (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); a longer `len` is malformed.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// One packet header, in host byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl Header {
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A host-to-guest packet of connection (`host_port`, `guest_port`).
    pub fn to_guest(guest_cid: u64, host_port: u32, guest_port: u32, op: u16) -> Self {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: host_port,
            dst_port: guest_port,
            type_: TYPE_STREAM,
            op,
            ..Default::default()
        }
    }

    /// The RST that answers `self` (a guest packet): addresses swapped.
    pub fn rst_reply(&self) -> Self {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_every_field_in_little_endian() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 1234,
            len: 4096,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(Header::parse(&b), h);
    }

    #[test]
    fn any_44_bytes_parse() {
        let b = [0xffu8; HDR_LEN];
        let h = Header::parse(&b);
        assert_eq!(h.src_cid, u64::MAX);
        assert_eq!(h.op, u16::MAX);
        assert_eq!(h.to_bytes(), b);
    }

    #[test]
    fn rst_reply_swaps_the_addresses() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 5000,
            dst_port: 52,
            op: op::RW,
            len: 10,
            ..Default::default()
        };
        let r = h.rst_reply();
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (2, 3, 52, 5000)
        );
        assert_eq!((r.op, r.type_, r.len), (op::RST, TYPE_STREAM, 0));
    }
}
