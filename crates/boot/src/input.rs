//! Files the user names (kernel, initrd): only a regular file is read, and
//! only one no larger than the limit (guest memory), both checked before a
//! byte is read, so `--kernel /dev/zero`, a directory or a FIFO is refused
//! at once instead of read until the host runs out of memory (or forever).

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Why a named file is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputFileProblem {
    #[error("not a regular file but {0}")]
    NotRegular(&'static str),
    #[error("{size} bytes is larger than guest memory ({limit} bytes)")]
    TooLarge { size: u64, limit: u64 },
}

/// What the path names, for the message, if it is not a regular file.
fn not_regular(kind: std::fs::FileType) -> Option<&'static str> {
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    }
}

/// Checks `path` (following symlinks) without opening it: a regular file
/// of at most `limit` bytes. Returns its size.
pub fn check(path: &Path, limit: u64) -> Result<u64, CheckError> {
    let meta = std::fs::metadata(path).map_err(CheckError::Io)?;
    if let Some(what) = not_regular(meta.file_type()) {
        return Err(CheckError::Problem(InputFileProblem::NotRegular(what)));
    }
    if meta.len() > limit {
        return Err(CheckError::Problem(InputFileProblem::TooLarge {
            size: meta.len(),
            limit,
        }));
    }
    Ok(meta.len())
}

/// [`check`], then reads the file, never more than `limit` bytes even if
/// it grows meanwhile (and checking the opened file again, in case the
/// path was swapped between the check and the open).
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, CheckError> {
    check(path, limit)?;
    let file = std::fs::File::open(path).map_err(CheckError::Io)?;
    let meta = file.metadata().map_err(CheckError::Io)?;
    if let Some(what) = not_regular(meta.file_type()) {
        return Err(CheckError::Problem(InputFileProblem::NotRegular(what)));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len().min(limit)).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(CheckError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(CheckError::Problem(InputFileProblem::TooLarge {
            size: bytes.len() as u64,
            limit,
        }));
    }
    Ok(bytes)
}

/// [`check`]'s and [`read`]'s failure: the OS said no, or the file is refused.
#[derive(Debug)]
pub enum CheckError {
    Io(std::io::Error),
    Problem(InputFileProblem),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(r: Result<impl std::fmt::Debug, CheckError>) -> InputFileProblem {
        match r {
            Err(CheckError::Problem(p)) => p,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn refuses_a_directory_a_device_and_a_fifo_without_reading() {
        assert_eq!(
            problem(read(Path::new("/"), 1 << 20)),
            InputFileProblem::NotRegular("a directory")
        );
        assert_eq!(
            problem(read(Path::new("/dev/zero"), 1 << 20)),
            InputFileProblem::NotRegular("a character device")
        );
        let fifo = std::env::temp_dir().join(format!("vmplay-input-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            // Opening a FIFO would block until a writer came: it must not be opened.
            assert_eq!(
                problem(read(&fifo, 1 << 20)),
                InputFileProblem::NotRegular("a FIFO")
            );
            std::fs::remove_file(&fifo).unwrap();
        }
    }

    #[test]
    fn refuses_a_file_larger_than_the_limit_and_reads_one_that_fits() {
        let path = std::env::temp_dir().join(format!("vmplay-input-big-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 4097]).unwrap();
        assert_eq!(
            problem(read(&path, 4096)),
            InputFileProblem::TooLarge {
                size: 4097,
                limit: 4096
            }
        );
        assert_eq!(read(&path, 4097).unwrap().len(), 4097);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(read(&path, 1), Err(CheckError::Io(_))));
    }
}
