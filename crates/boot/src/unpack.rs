//! Host-side decompression of a bzImage payload, so vmplay can boot the
//! ELF vmlinux inside directly and skip the in-guest decompressor.
//!
//! Only the formats distribution kernels use and we can decode with
//! field crates: gzip and LZ4 (the legacy frame `lz4 -l` writes, which
//! the kernel build follows with a 4-byte size trailer).

use std::io::Read;

/// What a payload is compressed with, from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Lz4Legacy,
    Xz,
    Zstd,
    Bzip2,
    Lzma,
    Lzo,
    /// Not compressed, or an encoding vmplay does not recognise.
    Unknown,
}

impl Compression {
    pub fn detect(payload: &[u8]) -> Self {
        match payload {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x02, 0x21, 0x4c, 0x18, ..] => Compression::Lz4Legacy,
            [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Compression::Xz,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            [b'B', b'Z', b'h', ..] => Compression::Bzip2,
            [0x5d, 0x00, 0x00, ..] => Compression::Lzma,
            [0x89, b'L', b'Z', b'O', ..] => Compression::Lzo,
            _ => Compression::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Lz4Legacy => "LZ4",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Lzo => "lzo",
            Compression::Unknown => "an unknown encoding",
        }
    }

    /// Whether [`unpack`] can decode this.
    pub fn supported(self) -> bool {
        matches!(self, Compression::Gzip | Compression::Lz4Legacy)
    }
}

/// Why a payload could not be unpacked. The text completes "bzImage payload: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnpackError {
    #[error("compressed with {}; vmplay unpacks only gzip and LZ4", .0.name())]
    Unsupported(Compression),
    #[error("corrupt {format} data: {reason}")]
    Corrupt {
        format: &'static str,
        reason: String,
    },
    #[error("unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("LZ4 block at offset {offset} of {size} bytes runs past the end ({len} bytes)")]
    Lz4Truncated {
        offset: usize,
        size: usize,
        len: usize,
    },
    #[error("LZ4 data unpacks to {actual} bytes but its size trailer says {expected}")]
    Lz4SizeMismatch { expected: u64, actual: u64 },
}

const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Blocks of a legacy frame decompress to at most 8 MiB each.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Decompresses `payload`; the result may be at most `limit` bytes.
pub fn unpack(payload: &[u8], limit: u64) -> Result<Vec<u8>, UnpackError> {
    match Compression::detect(payload) {
        Compression::Gzip => gunzip(payload, limit),
        Compression::Lz4Legacy => lz4_legacy(payload, limit),
        other => Err(UnpackError::Unsupported(other)),
    }
}

fn gunzip(payload: &[u8], limit: u64) -> Result<Vec<u8>, UnpackError> {
    let mut out = Vec::new();
    // Read one byte past the limit to tell "exactly limit" from "more".
    flate2::read::GzDecoder::new(payload)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| UnpackError::Corrupt {
            format: "gzip",
            reason: e.to_string(),
        })?;
    if out.len() as u64 > limit {
        return Err(UnpackError::TooLarge { limit });
    }
    Ok(out)
}

/// The legacy frame: magic, then blocks of (u32 compressed size, data).
/// A repeated magic starts another frame. The kernel appends the
/// uncompressed size as a final u32, which is not a block header: a
/// 4-byte tail with nothing after it.
fn lz4_legacy(payload: &[u8], limit: u64) -> Result<Vec<u8>, UnpackError> {
    let read_u32 = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().unwrap());
    let mut out: Vec<u8> = Vec::new();
    let mut trailer = None;
    let mut pos = 4;
    while pos + 4 <= payload.len() {
        let word = read_u32(pos);
        if pos + 4 == payload.len() {
            trailer = Some(u64::from(word));
            break;
        }
        pos += 4;
        if word == LZ4_LEGACY_MAGIC {
            continue;
        }
        let size = word as usize;
        if size > payload.len() - pos {
            return Err(UnpackError::Lz4Truncated {
                offset: pos - 4,
                size,
                len: payload.len(),
            });
        }
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(&payload[pos..pos + size], &mut out[start..])
            .map_err(|e| UnpackError::Corrupt {
                format: "LZ4",
                reason: format!("block at offset {}: {e}", pos - 4),
            })?;
        out.truncate(start + n);
        if out.len() as u64 > limit {
            return Err(UnpackError::TooLarge { limit });
        }
        pos += size;
    }
    if pos < payload.len() && trailer.is_none() {
        return Err(UnpackError::Lz4Truncated {
            offset: pos,
            size: 4,
            len: payload.len(),
        });
    }
    if let Some(expected) = trailer
        && expected != out.len() as u64
    {
        return Err(UnpackError::Lz4SizeMismatch {
            expected,
            actual: out.len() as u64,
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// What the kernel build makes with `lz4 -l`: a legacy frame of
    /// independent blocks plus the size trailer.
    pub(crate) fn lz4_legacy_frame(data: &[u8], with_trailer: bool) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let block = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        if with_trailer {
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        }
        out
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 / 13) as u8).collect()
    }

    #[test]
    fn unpacks_lz4_legacy_frame_with_size_trailer() {
        // More than one 8 MiB block, so block boundaries are exercised.
        let data = sample(LZ4_LEGACY_BLOCK + 12345);
        let packed = lz4_legacy_frame(&data, true);
        assert_eq!(Compression::detect(&packed), Compression::Lz4Legacy);
        assert_eq!(unpack(&packed, 1 << 30).unwrap(), data);
    }

    #[test]
    fn unpacks_lz4_legacy_frame_without_trailer() {
        let data = sample(100_000);
        assert_eq!(
            unpack(&lz4_legacy_frame(&data, false), 1 << 30).unwrap(),
            data
        );
    }

    #[test]
    fn rejects_lz4_size_trailer_that_disagrees() {
        let data = sample(5000);
        let mut packed = lz4_legacy_frame(&data, false);
        packed.extend_from_slice(&4999u32.to_le_bytes());
        assert_eq!(
            unpack(&packed, 1 << 30),
            Err(UnpackError::Lz4SizeMismatch {
                expected: 4999,
                actual: 5000
            })
        );
    }

    #[test]
    fn rejects_truncated_lz4_block() {
        let data = sample(100_000);
        let packed = lz4_legacy_frame(&data, true);
        let cut = &packed[..packed.len() - 100];
        assert!(matches!(
            unpack(cut, 1 << 30),
            Err(UnpackError::Lz4Truncated { offset: 4, .. })
        ));
    }

    #[test]
    fn rejects_corrupt_lz4_block() {
        let mut packed = lz4_legacy_frame(&sample(100_000), true);
        // Point a match far before the start of the output.
        let end = packed.len() - 4;
        packed[8..end].fill(0xff);
        let err = unpack(&packed, 1 << 30).unwrap_err();
        assert!(
            matches!(err, UnpackError::Corrupt { format: "LZ4", .. }),
            "{err}"
        );
    }

    #[test]
    fn unpacks_gzip() {
        let data = sample(300_000);
        let packed = gzip(&data);
        assert_eq!(Compression::detect(&packed), Compression::Gzip);
        assert_eq!(unpack(&packed, 1 << 30).unwrap(), data);
    }

    #[test]
    fn rejects_corrupt_gzip() {
        let mut packed = gzip(&sample(300_000));
        let mid = packed.len() / 2;
        packed[mid..].fill(0);
        let err = unpack(&packed, 1 << 30).unwrap_err();
        assert!(
            matches!(err, UnpackError::Corrupt { format: "gzip", .. }),
            "{err}"
        );
    }

    #[test]
    fn refuses_to_unpack_past_the_limit() {
        let data = vec![0u8; 1 << 20];
        assert_eq!(
            unpack(&gzip(&data), 1000),
            Err(UnpackError::TooLarge { limit: 1000 })
        );
        assert_eq!(
            unpack(&lz4_legacy_frame(&data, true), 1000),
            Err(UnpackError::TooLarge { limit: 1000 })
        );
        assert_eq!(unpack(&gzip(&data), 1 << 20).unwrap().len(), 1 << 20);
    }

    #[test]
    fn names_unsupported_compression() {
        let xz = [0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2];
        let err = unpack(&xz, 1 << 20).unwrap_err();
        assert_eq!(err, UnpackError::Unsupported(Compression::Xz));
        assert!(err.to_string().contains("xz"), "{err}");
        let zstd = [0x28, 0xb5, 0x2f, 0xfd, 0];
        assert!(!Compression::detect(&zstd).supported());
    }
}
