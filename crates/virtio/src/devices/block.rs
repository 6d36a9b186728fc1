//! virtio-blk (virtio 1.x §5.2) over a raw image file: read, write,
//! flush (`fdatasync`), GET_ID, discard (punch hole) and write-zeroes
//! (zero range), read-only drives, and a rate limiter. Every request is
//! done before its used entry is published, so once the guest sees a
//! FLUSH complete its data is on the host disk; a host error fails that
//! request with IOERR and the device goes on.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet};
use virtio_queue::Queue;

use crate::config::{CacheType, DriveConfig};
use crate::device::{
    ActivateError, Activation, BACKEND_TOKEN_BASE, GuestRam, Interrupt, VirtioDevice, device_type,
    feature,
};
use crate::queue::{self, Chain};
use crate::rate_limiter::RateLimiter;
use crate::sys::{self, Direction};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Bytes of zeros written per host call where the file system cannot zero
/// a range itself (reads and writes go straight to guest memory).
const CHUNK: usize = 256 * 1024;
/// Most segments in one DISCARD/WRITE_ZEROES request we advertise.
const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Descriptors per request beyond header and status (VIRTIO_BLK_F_SEG_MAX).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The serial GET_ID returns is at most this long.
const ID_BYTES: usize = 20;
const LIMITER_TOKEN: u32 = BACKEND_TOKEN_BASE;

mod features {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

mod request {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("drive {id}: {path}: {source}")]
    Open {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("drive {id}: {path}: {why}")]
    Bad {
        id: String,
        path: PathBuf,
        why: String,
    },
}

/// The backing file and what the guest was told about it.
struct Backing {
    file: File,
    path: PathBuf,
    /// Capacity in sectors, as the config space says.
    sectors: u64,
}

fn open_backing(id: &str, path: &Path, read_only: bool) -> Result<Backing, BlockError> {
    let open_err = |source| BlockError::Open {
        id: id.into(),
        path: path.into(),
        source,
    };
    let bad = |why: String| BlockError::Bad {
        id: id.into(),
        path: path.into(),
        why,
    };
    // Checked before opening: opening a FIFO would block.
    let meta = std::fs::metadata(path).map_err(open_err)?;
    let ft = meta.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(bad("not a regular file or block device".into()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(open_err)?;
    let len = if ft.is_block_device() {
        // A block device's size is where it seeks to at the end.
        use std::io::Seek;
        (&file).seek(std::io::SeekFrom::End(0)).map_err(open_err)?
    } else {
        meta.len()
    };
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(bad(format!(
            "{len} bytes is not a whole number of {SECTOR_SIZE}-byte sectors"
        )));
    }
    if len == 0 {
        return Err(bad("the image is empty".into()));
    }
    Ok(Backing {
        file,
        path: path.into(),
        sectors: len / SECTOR_SIZE,
    })
}

struct Active {
    ram: GuestRam,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// Counters for metrics (Firecracker's `block` group, its names).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct BlockCounters {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_count: u64,
    pub write_count: u64,
    pub flush_count: u64,
    /// Requests the host failed (`VIRTIO_BLK_S_IOERR`).
    #[serde(rename = "execute_fails")]
    pub io_errors: u64,
    #[serde(rename = "invalid_reqs_count")]
    pub invalid_requests: u64,
    #[serde(rename = "rate_limiter_throttled_events")]
    pub rate_limiter_throttled: u64,
    /// PATCHes after boot, and those that failed.
    pub update_count: u64,
    pub update_fails: u64,
}

pub struct Block {
    id: String,
    backing: Backing,
    read_only: bool,
    cache: CacheType,
    limiter: RateLimiter,
    active: Option<Active>,
    pub counters: BlockCounters,
}

/// A request's header (`struct virtio_blk_outhdr`: le32 type, le32
/// reserved, le64 sector).
#[derive(Clone, Copy, Default)]
struct Header {
    kind: u32,
    sector: u64,
}

impl Header {
    const SIZE: usize = 16;
    fn parse(b: [u8; Self::SIZE]) -> Header {
        Header {
            kind: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            sector: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }
}

/// One DISCARD / WRITE_ZEROES segment (le64 sector, le32 count, le32 flags).
#[derive(Clone, Copy, Default)]
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

impl Segment {
    const SIZE: usize = 16;
    fn parse(b: [u8; Self::SIZE]) -> Segment {
        Segment {
            sector: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            num_sectors: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

impl Block {
    pub fn new(config: &DriveConfig) -> Result<Self, BlockError> {
        let backing = open_backing(&config.id, &config.path, config.read_only)?;
        let limiter =
            RateLimiter::new(config.rate_limiter.as_ref(), LIMITER_TOKEN).map_err(|e| {
                BlockError::Bad {
                    id: config.id.clone(),
                    path: config.path.clone(),
                    why: format!("rate limiter timer: {e}"),
                }
            })?;
        Ok(Block {
            id: config.id.clone(),
            backing,
            read_only: config.read_only,
            cache: config.cache,
            limiter,
            active: None,
            counters: Default::default(),
        })
    }

    /// The capacity in sectors the guest sees.
    pub fn sectors(&self) -> u64 {
        self.backing.sectors
    }

    /// Swaps the backing file (Firecracker's PATCH /drives after boot) and
    /// tells the driver the capacity may have changed.
    pub fn replace_backing(&mut self, path: &Path) -> Result<(), BlockError> {
        self.backing = open_backing(&self.id, path, self.read_only)?;
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change();
        }
        Ok(())
    }

    /// Replaces the rate limiter's buckets (PATCH after boot).
    pub fn limiter_mut(&mut self) -> &mut RateLimiter {
        &mut self.limiter
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.backing.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[32] = u8::from(self.cache == CacheType::Writeback);
        c[36..40].copy_from_slice(&(u32::MAX >> 9).to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&(u32::MAX >> 9).to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[56] = 1;
        c
    }

    fn process(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut worker = Worker {
            id: &self.id,
            backing: &self.backing,
            read_only: self.read_only,
            counters: &mut self.counters,
            ram: &a.ram,
        };
        let limiter = &mut self.limiter;
        queue::drain(&mut a.queue, &a.ram, &a.interrupt, |chain| {
            worker.request(chain, limiter)
        });
    }
}

/// The part of the device a request touches (split from `Block` so the
/// queue can be borrowed beside it).
struct Worker<'a> {
    id: &'a str,
    backing: &'a Backing,
    read_only: bool,
    counters: &'a mut BlockCounters,
    ram: &'a GuestRam,
}

impl Worker<'_> {
    /// Serves one request; `None` leaves it queued (rate limited).
    fn request(&mut self, chain: Chain<'_>, limiter: &mut RateLimiter) -> Option<u32> {
        let mem = &self.ram.mem;
        // One walk over the chain serves the header, the data, the status
        // byte and the DMA notes (a 1 MiB request has ~256 descriptors).
        let descs = match queue::Descriptors::walk(mem, &chain) {
            Ok(d) => d,
            Err(e) => return Some(self.invalid(&format!("bad chain: {e}"))),
        };
        let mut raw = [0u8; Header::SIZE];
        if !descs.read(mem, 0, &mut raw) {
            return Some(self.invalid("request shorter than its header"));
        }
        let header = Header::parse(raw);
        let writable = descs.writable();
        if writable == 0 {
            return Some(self.invalid("no status byte"));
        }
        // The status byte is the last writable one; data comes before it
        // (IN) or after the header (OUT).
        let in_len = writable - 1;
        let out_len = descs.readable() - Header::SIZE;
        let bytes = match header.kind {
            request::IN => in_len,
            request::OUT => out_len,
            _ => 0,
        } as u64;
        if !limiter.consume(bytes, 1) {
            self.counters.rate_limiter_throttled += 1;
            return None;
        }
        // Bytes put into the chain before the status byte.
        let mut data_len = 0;
        let status = match header.kind {
            request::IN => {
                let status = self.read(header.sector, &descs, in_len);
                if status == S_OK {
                    data_len = in_len;
                }
                status
            }
            request::OUT => self.write(header.sector, &descs, out_len),
            request::FLUSH => self.flush(),
            request::GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let n = self.id.len().min(ID_BYTES);
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                let n = in_len.min(ID_BYTES);
                if descs.write(mem, 0, &id[..n]) {
                    data_len = n;
                    S_OK
                } else {
                    S_IOERR
                }
            }
            request::DISCARD | request::WRITE_ZEROES => self.discard(header.kind, &descs, out_len),
            other => {
                tracing::debug!("drive {}: unsupported request type {other}", self.id);
                S_UNSUPP
            }
        };
        if status == S_IOERR {
            self.counters.io_errors += 1;
        }
        let wrote_status = descs.write(mem, in_len, &[status]);
        descs.note_writes(self.ram);
        Some((data_len + usize::from(wrote_status)) as u32)
    }

    fn invalid(&mut self, why: &str) -> u32 {
        tracing::debug!("drive {}: bad request: {why}", self.id);
        self.counters.invalid_requests += 1;
        0
    }

    /// Byte range of `len` bytes at `sector`, if it is inside the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(len)?;
        (end <= self.backing.sectors * SECTOR_SIZE).then_some(start)
    }

    /// IN: the file's bytes at `sector` straight into the chain's
    /// writable buffers (all but the status byte), one `preadv`.
    fn read(&mut self, sector: u64, descs: &queue::Descriptors, len: usize) -> u8 {
        let Some(at) = self.range(sector, len as u64) else {
            tracing::debug!(
                "drive {}: read past the end (sector {sector}, {len} bytes)",
                self.id
            );
            return S_IOERR;
        };
        let Some(bufs) = descs.slices(&self.ram.mem, true, 0, len) else {
            return S_IOERR;
        };
        if let Err(e) = sys::file_io_vectored(&self.backing.file, &bufs, at, Direction::FileToGuest)
        {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                tracing::error!(
                    "drive {}: {} is shorter than the {} sectors the guest was given: it shrank while in use",
                    self.id,
                    self.backing.path.display(),
                    self.backing.sectors
                );
            } else {
                tracing::warn!("drive {}: read at {at}: {e}", self.id);
            }
            return S_IOERR;
        }
        self.counters.read_bytes += len as u64;
        self.counters.read_count += 1;
        S_OK
    }

    /// OUT: the chain's readable bytes after the header straight into the
    /// file at `sector`, one `pwritev`.
    fn write(&mut self, sector: u64, descs: &queue::Descriptors, len: usize) -> u8 {
        if self.read_only {
            return S_IOERR;
        }
        let Some(at) = self.range(sector, len as u64) else {
            tracing::debug!(
                "drive {}: write past the end (sector {sector}, {len} bytes)",
                self.id
            );
            return S_IOERR;
        };
        let Some(bufs) = descs.slices(&self.ram.mem, false, Header::SIZE, len) else {
            return S_IOERR;
        };
        if let Err(e) = sys::file_io_vectored(&self.backing.file, &bufs, at, Direction::GuestToFile)
        {
            tracing::warn!("drive {}: write at {at}: {e}", self.id);
            return S_IOERR;
        }
        self.counters.write_bytes += len as u64;
        self.counters.write_count += 1;
        S_OK
    }

    fn flush(&mut self) -> u8 {
        self.counters.flush_count += 1;
        match self.backing.file.sync_data() {
            Ok(()) => S_OK,
            Err(e) => {
                tracing::warn!("drive {}: fdatasync: {e}", self.id);
                S_IOERR
            }
        }
    }

    /// DISCARD / WRITE_ZEROES: `len` bytes of segments after the header.
    fn discard(&mut self, kind: u32, descs: &queue::Descriptors, len: usize) -> u8 {
        if self.read_only {
            return S_IOERR;
        }
        let seg_size = Segment::SIZE;
        let count = len / seg_size;
        if count == 0 || count > MAX_DISCARD_SEGMENTS as usize || !len.is_multiple_of(seg_size) {
            return S_UNSUPP;
        }
        for k in 0..count {
            let mut raw = [0u8; Segment::SIZE];
            if !descs.read(&self.ram.mem, Header::SIZE + k * seg_size, &mut raw) {
                return S_IOERR;
            }
            let seg = Segment::parse(raw);
            let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
            let Some(at) = self.range(seg.sector, len) else {
                return S_IOERR;
            };
            // Discard has no flags; write-zeroes may unmap (bit 0).
            if kind == request::DISCARD && seg.flags != 0 || seg.flags & !1 != 0 {
                return S_UNSUPP;
            }
            let mode = if kind == request::DISCARD || seg.flags & 1 != 0 {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            if let Err(e) = crate::sys::fallocate(&self.backing.file, mode, at, len) {
                if kind == request::DISCARD {
                    // Discard is a hint: a file system that cannot punch holes is no error.
                    tracing::debug!("drive {}: discard: {e}", self.id);
                    continue;
                }
                if let Err(e) = self.zero_by_writing(at, len) {
                    tracing::warn!("drive {}: write-zeroes at {at}: {e}", self.id);
                    return S_IOERR;
                }
            }
        }
        S_OK
    }

    fn zero_by_writing(&mut self, mut at: u64, len: u64) -> std::io::Result<()> {
        let mut left = len;
        // Only where the file system cannot zero a range itself: no buffer
        // is kept for it.
        let zeros = vec![0u8; CHUNK.min(len as usize)];
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            self.backing.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
            left -= n as u64;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn metrics(&self) -> Vec<(&'static str, Vec<(String, u64)>)> {
        vec![("block", crate::device::counter_fields(&self.counters))]
    }
    fn metrics_id(&self) -> Option<&str> {
        Some(&self.id)
    }
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = feature::RING_INDIRECT_DESC
            | feature::RING_EVENT_IDX
            | features::SEG_MAX
            | features::BLK_SIZE;
        if self.read_only {
            f |= features::RO;
        } else {
            f |= features::DISCARD | features::WRITE_ZEROES;
        }
        if self.cache == CacheType::Writeback {
            f |= features::FLUSH;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        let queue = act
            .queues
            .into_iter()
            .next()
            .filter(virtio_queue::QueueT::ready)
            .ok_or(ActivateError::QueueNotReady(0))?;
        self.active = Some(Active {
            ram: act.ram,
            queue,
            interrupt: act.interrupt,
        });
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn init_backend(&mut self, ops: &mut EventOps) {
        self.limiter.register(ops);
    }
    fn queue_notified(&mut self, _index: usize, _ops: &mut EventOps) {
        if !self.limiter.is_throttled() {
            self.process();
        }
    }
    fn backend_event(&mut self, token: u32, _events: EventSet, _ops: &mut EventOps) {
        if self.limiter.is_timer(token) {
            self.limiter.timer_fired();
            self.process();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{DATA_BASE, Rig, fuzz_device};
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};
    use vmplay_devices::BusDeviceSync;

    struct Disk {
        dir: PathBuf,
        path: PathBuf,
    }

    impl Disk {
        fn new(name: &str, bytes: &[u8]) -> Disk {
            let dir = std::env::temp_dir().join(format!(
                "vmplay-blk-{}-{name}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("disk.img");
            std::fs::write(&path, bytes).unwrap();
            Disk { dir, path }
        }
        fn config(&self, read_only: bool) -> DriveConfig {
            DriveConfig {
                id: "rootfs".into(),
                path: self.path.clone(),
                read_only,
                root: false,
                partuuid: None,
                cache: CacheType::Writeback,
                rate_limiter: None,
            }
        }
    }

    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const HDR: u64 = DATA_BASE;
    const BUF: u64 = DATA_BASE + 0x1000;
    const STATUS: u64 = DATA_BASE + 0x800;

    fn rig(disk: &Disk, read_only: bool) -> Rig {
        let block = Block::new(&disk.config(read_only)).unwrap();
        let rig = Rig::new(Arc::new(Mutex::new(block)));
        rig.handshake(feature::RING_EVENT_IDX, &[256]);
        rig
    }

    /// Submits one request and returns (status, used length).
    fn request(
        rig: &mut Rig,
        kind: u32,
        sector: u64,
        data_len: u32,
        device_writes: bool,
    ) -> (u8, u32) {
        rig.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        rig.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        rig.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        rig.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut chain = vec![(HDR, 16, false)];
        if data_len > 0 {
            chain.push((BUF, data_len, device_writes));
        }
        chain.push((STATUS, 1, true));
        let before = rig.used_idx(0);
        rig.push_chain(0, &chain);
        rig.notify(0);
        assert_eq!(rig.used_idx(0), before.wrapping_add(1), "request completed");
        let (_, len) = rig.used_elem(0, before);
        (rig.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    #[test]
    fn reads_and_writes_sectors_of_the_image() {
        let mut image = vec![0u8; 8192];
        image[512..1024].fill(b'r');
        let disk = Disk::new("rw", &image);
        let mut rig = rig(&disk, false);
        assert_eq!(request(&mut rig, request::IN, 1, 512, true), (S_OK, 513));
        let mut got = [0u8; 512];
        rig.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert!(got.iter().all(|&b| b == b'r'));

        rig.mem
            .write_slice(&[b'w'; 1024], GuestAddress(BUF))
            .unwrap();
        assert_eq!(request(&mut rig, request::OUT, 4, 1024, false), (S_OK, 1));
        assert_eq!(request(&mut rig, request::FLUSH, 0, 0, false), (S_OK, 1));
        let on_disk = std::fs::read(&disk.path).unwrap();
        assert!(on_disk[2048..3072].iter().all(|&b| b == b'w'));
        assert!(on_disk[3072..].iter().all(|&b| b == 0));
    }

    /// The spec fixes no framing: a header sharing a descriptor with the
    /// data, data spread over descriptors, the status byte at the end of
    /// the last data descriptor. The bytes go straight between the file
    /// and guest memory, so every split must land where the chain says.
    #[test]
    fn requests_with_any_descriptor_layout_move_the_right_bytes() {
        let image: Vec<u8> = (0..16384u32).map(|i| (i * 7 + i / 512) as u8).collect();
        let disk = Disk::new("layout", &image);
        let mut rig = rig(&disk, false);
        // IN of 3 sectors at sector 2: header alone, then 700 bytes, then
        // 836 data bytes and the status byte in one descriptor.
        rig.mem.write_obj(request::IN, GuestAddress(HDR)).unwrap();
        rig.mem.write_obj(2u64, GuestAddress(HDR + 8)).unwrap();
        let (a, b) = (BUF, BUF + 0x2000);
        let before = rig.used_idx(0);
        rig.push_chain(0, &[(HDR, 16, false), (a, 700, true), (b, 837, true)]);
        rig.notify(0);
        let (_, len) = rig.used_elem(0, before);
        assert_eq!(len, 1537);
        let mut got = vec![0u8; 1536];
        rig.mem
            .read_slice(&mut got[..700], GuestAddress(a))
            .unwrap();
        rig.mem
            .read_slice(&mut got[700..], GuestAddress(b))
            .unwrap();
        assert_eq!(got, image[1024..2560]);
        assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(b + 836)).unwrap(), S_OK);

        // OUT of 2 sectors at sector 20: header and the first 100 data
        // bytes in one descriptor, the rest in a second.
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 13) as u8).collect();
        rig.mem.write_obj(request::OUT, GuestAddress(HDR)).unwrap();
        rig.mem.write_obj(20u64, GuestAddress(HDR + 8)).unwrap();
        rig.mem
            .write_slice(&data[..100], GuestAddress(HDR + 16))
            .unwrap();
        rig.mem.write_slice(&data[100..], GuestAddress(a)).unwrap();
        rig.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let before = rig.used_idx(0);
        rig.push_chain(0, &[(HDR, 116, false), (a, 924, false), (STATUS, 1, true)]);
        rig.notify(0);
        assert_eq!(rig.used_elem(0, before).1, 1);
        assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        let on_disk = std::fs::read(&disk.path).unwrap();
        assert_eq!(on_disk[20 * 512..22 * 512], data[..]);
        assert_eq!(on_disk[..20 * 512], image[..20 * 512]);
        assert_eq!(on_disk[22 * 512..], image[22 * 512..]);
    }

    #[test]
    fn capacity_and_serial_come_from_the_file_and_the_drive_id() {
        let disk = Disk::new("id", &[0u8; 4096]);
        let mut rig = rig(&disk, false);
        let mut cap = [0u8; 8];
        rig.transport.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        assert_eq!(request(&mut rig, request::GET_ID, 0, 20, true), (S_OK, 21));
        let mut id = [0u8; 20];
        rig.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id[..6], b"rootfs");
        assert!(id[6..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_read_only_drive_refuses_writes_and_says_so() {
        let disk = Disk::new("ro", &[7u8; 4096]);
        let mut rig = rig(&disk, true);
        rig.write32(0x14, 0);
        assert_ne!(
            rig.read32(0x10) & features::RO as u32,
            0,
            "VIRTIO_BLK_F_RO offered"
        );
        assert_eq!(request(&mut rig, request::OUT, 0, 512, false).0, S_IOERR);
        assert_eq!(request(&mut rig, request::DISCARD, 0, 0, false).0, S_IOERR);
        assert_eq!(std::fs::read(&disk.path).unwrap(), vec![7u8; 4096]);
        assert_eq!(request(&mut rig, request::IN, 0, 512, true).0, S_OK);
    }

    #[test]
    fn requests_past_the_end_fail_and_the_device_goes_on() {
        let disk = Disk::new("end", &[0u8; 4096]);
        let mut rig = rig(&disk, false);
        assert_eq!(request(&mut rig, request::IN, 8, 512, true).0, S_IOERR);
        assert_eq!(
            request(&mut rig, request::OUT, u64::MAX / 256, 512, false).0,
            S_IOERR
        );
        assert_eq!(request(&mut rig, request::IN, 7, 512, true).0, S_OK);
    }

    #[test]
    fn an_image_that_shrinks_in_use_gives_io_errors_not_a_crash() {
        let disk = Disk::new("shrink", &[1u8; 8192]);
        let mut rig = rig(&disk, false);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.path)
            .unwrap()
            .set_len(1024)
            .unwrap();
        assert_eq!(request(&mut rig, request::IN, 10, 512, true).0, S_IOERR);
        assert_eq!(request(&mut rig, request::IN, 0, 512, true).0, S_OK);
    }

    #[test]
    fn a_host_enospc_fails_that_request_with_ioerr_and_the_device_goes_on() {
        let disk = Disk::new("enospc", &[3u8; 8192]);
        let block = Arc::new(Mutex::new(Block::new(&disk.config(false)).unwrap()));
        let mut rig = Rig::new(block.clone());
        rig.handshake(feature::RING_EVENT_IDX, &[256]);
        // The host's disk fills up: every write now fails with ENOSPC
        // (/dev/full is the kernel's always-full device).
        let full = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/full")
            .unwrap();
        let e = full.write_all_at(&[0u8; 512], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        let image = std::mem::replace(&mut block.lock().unwrap().backing.file, full);
        rig.mem
            .write_slice(&[b'w'; 512], GuestAddress(BUF))
            .unwrap();
        assert_eq!(request(&mut rig, request::OUT, 2, 512, false), (S_IOERR, 1));
        // Only that request failed: the next one is served.
        block.lock().unwrap().backing.file = image;
        assert_eq!(request(&mut rig, request::OUT, 2, 512, false), (S_OK, 1));
        assert_eq!(request(&mut rig, request::IN, 2, 512, true).0, S_OK);
        assert!(
            std::fs::read(&disk.path).unwrap()[1024..1536]
                .iter()
                .all(|&b| b == b'w')
        );
    }

    #[test]
    fn discard_and_write_zeroes_clear_the_range() {
        let disk = Disk::new("zero", &[9u8; 8192]);
        let mut rig = rig(&disk, false);
        let seg = |rig: &Rig, sector: u64, n: u32, flags: u32| {
            rig.mem.write_obj(sector, GuestAddress(BUF)).unwrap();
            rig.mem.write_obj(n, GuestAddress(BUF + 8)).unwrap();
            rig.mem.write_obj(flags, GuestAddress(BUF + 12)).unwrap();
        };
        seg(&rig, 2, 2, 0);
        assert_eq!(
            request(&mut rig, request::WRITE_ZEROES, 0, 16, false).0,
            S_OK
        );
        seg(&rig, 8, 2, 0);
        assert_eq!(request(&mut rig, request::DISCARD, 0, 16, false).0, S_OK);
        let on_disk = std::fs::read(&disk.path).unwrap();
        assert_eq!(on_disk.len(), 8192, "size kept");
        assert!(on_disk[1024..2048].iter().all(|&b| b == 0));
        assert!(on_disk[4096..5120].iter().all(|&b| b == 0));
        assert!(on_disk[..1024].iter().all(|&b| b == 9));
        seg(&rig, 15, 2, 0);
        assert_eq!(
            request(&mut rig, request::WRITE_ZEROES, 0, 16, false).0,
            S_IOERR,
            "past the end"
        );
        assert_eq!(
            request(&mut rig, request::WRITE_ZEROES, 0, 10, false).0,
            S_UNSUPP,
            "ragged segment"
        );
    }

    #[test]
    fn an_unknown_request_type_is_unsupported() {
        let disk = Disk::new("unk", &[0u8; 4096]);
        let mut rig = rig(&disk, false);
        assert_eq!(request(&mut rig, 99, 0, 0, false).0, S_UNSUPP);
    }

    #[test]
    fn refuses_images_that_are_not_whole_sectors_or_not_files() {
        let disk = Disk::new("ragged", &[0u8; 1000]);
        let e = Block::new(&disk.config(false)).err().unwrap().to_string();
        assert!(e.contains("not a whole number of 512-byte sectors"), "{e}");
        let mut c = disk.config(false);
        c.path = disk.dir.clone();
        let e = Block::new(&c).err().unwrap().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        c.path = "/dev/zero".into();
        assert!(Block::new(&c).is_err());
        c.path = disk.dir.join("missing");
        let e = Block::new(&c).err().unwrap().to_string();
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn survives_random_garbage() {
        let disk = Disk::new("fuzz", &[0u8; 65536]);
        let seed = std::env::var("VMPLAY_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0xb10c);
        fuzz_device(
            || Arc::new(Mutex::new(Block::new(&disk.config(false)).unwrap())),
            seed,
            200,
        );
    }
}
