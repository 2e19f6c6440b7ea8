//! The outbox's current segment written through a shared memory map, so that recording an
//! accepted message costs the broker thread a `memcpy` instead of a `write()` system call.
//!
//! Same guarantee as `write()`: the bytes of a `MAP_SHARED` mapping are the file's page cache, so
//! once copied they belong to the kernel and survive `kill -9` and any crash of the broker; the
//! syncer's `fdatasync` writes back the mapped pages exactly like written ones (Linux has one page
//! cache for both), so the power-loss window is unchanged.
//!
//! What `write()` did for free and this must do itself:
//! - *Space is reserved before a page is touched.* A store into a mapped page the file system
//!   cannot back raises SIGBUS, which would kill the broker; `fallocate` reserves each window
//!   first, so a full disk is an error returned here (the message is refused), never a signal.
//!   Only file systems that honour that reservation for mapped writes are mapped ([`supported`]);
//!   elsewhere (copy-on-write file systems, network file systems) the outbox keeps `write()`.
//! - *The file grows by a window at a time*, zero-filled beyond the last record. The outbox's
//!   recovery reads a zero tail as space not yet written, and a clean stop trims it.
//!
//! What it cannot do as `write()` does: report a disk that fails to *read*. A store into the
//! partly written page at the end of the log, after that page was written back and evicted,
//! first reads it back; an I/O error there is a SIGBUS, which stops the broker (where `write()`
//! would have refused the message with EIO). Nothing acknowledged is lost either way (the pages
//! already written are on disk or in the page cache); a broker on a failing disk stops instead of
//! refusing. Fresh reserved pages are never read (unwritten extents read as zeros).
//!
//! Only this module and the plugin's FFI shim contain `unsafe` code: mapping a file is unsafe
//! because another process could truncate or rewrite it under us. The outbox directory is locked
//! against a second broker or plugin instance and must be writable by the broker's user alone
//! (SECURITY.md); a process that can truncate segments can already destroy the outbox.

use memmap2::{MmapMut, MmapOptions};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// How much of the file is reserved and mapped at a time (a record larger than this gets a
/// window of its own size, rounded up).
pub const WINDOW: u64 = 4 << 20;

/// File systems where `fallocate` guarantees a later store into the reserved range needs no
/// allocation: ext2/3/4, XFS, tmpfs.
const MAPPABLE: [i64; 3] = [0xEF53, 0x5846_5342, 0x0102_1994];

/// Whether the outbox in `dir` may be written through a mapping.
pub fn supported(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else { return false };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` is a statfs the call fills in.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: statfs returned 0, so it filled `st` (and it was zeroed before anyway).
    let f_type = unsafe { st.assume_init() }.f_type;
    // `f_type`'s width differs between architectures (i64 here).
    #[allow(clippy::unnecessary_cast)]
    let f_type = f_type as i64;
    MAPPABLE.contains(&f_type)
}

/// The mapped part of the current segment: file offsets `base..base + map.len()`.
pub struct Window {
    map: MmapMut,
    base: u64,
}

impl Window {
    /// Copies `bytes` to `file` at offset `at` through the window in `slot`, first moving the
    /// window (reserving the space) when it does not cover them. An error leaves nothing written.
    pub fn write(slot: &mut Option<Window>, file: &File, at: u64, bytes: &[u8]) -> io::Result<()> {
        let len = bytes.len() as u64;
        let covered = |w: &Window| at >= w.base && at + len <= w.base + w.map.len() as u64;
        if !slot.as_ref().is_some_and(covered) {
            *slot = None;
            let size = len.div_ceil(WINDOW).max(1) * WINDOW;
            reserve(file, at, size)?;
            // SAFETY: the file is a segment of a locked outbox, opened read-write, and
            // `at..at + size` was just allocated to it; nothing else maps or truncates it (see
            // the module comment). memmap2 aligns the offset to a page itself.
            let map = unsafe { MmapOptions::new().offset(at).len(size as usize).map_mut(file)? };
            *slot = Some(Window { map, base: at });
        }
        match slot {
            Some(w) => {
                let from = (at - w.base) as usize;
                w.map[from..from + bytes.len()].copy_from_slice(bytes);
                Ok(())
            }
            None => Err(io::Error::other("no outbox window")),
        }
    }
}

/// Allocates `at..at + len` of `file` (growing it, zero-filled), so that stores into a mapping of
/// that range cannot fault for want of space.
fn reserve(file: &File, at: u64, len: u64) -> io::Result<()> {
    let (Ok(at), Ok(len)) = (libc::off_t::try_from(at), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "outbox offset out of range"));
    };
    // SAFETY: a valid descriptor of an open file; fallocate only changes that file.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, at, len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn rw(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap()
    }

    #[test]
    fn bytes_written_through_the_window_are_in_the_file_at_once() {
        let dir = tempfile::tempdir().unwrap();
        assert!(supported(dir.path()), "the test directory's file system should be mappable");
        let f = rw(&dir.path().join("seg"));
        let mut w = None;
        Window::write(&mut w, &f, 100, b"hello").unwrap();
        // Read through another descriptor, without unmapping or syncing: the page cache.
        let mut got = [0u8; 5];
        rw(&dir.path().join("seg")).read_exact_at(&mut got, 100).unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(f.metadata().unwrap().len(), 100 + WINDOW, "grown by one zero-filled window");
    }

    #[test]
    fn a_write_past_the_window_moves_it_and_a_large_one_gets_its_own_size() {
        let dir = tempfile::tempdir().unwrap();
        let f = rw(&dir.path().join("seg"));
        let mut w = None;
        let big = vec![7u8; WINDOW as usize + 10];
        Window::write(&mut w, &f, WINDOW - 3, b"abcdef").unwrap();
        Window::write(&mut w, &f, 2 * WINDOW + 3, &big).unwrap();
        let mut got = vec![0u8; 6];
        f.read_exact_at(&mut got, WINDOW - 3).unwrap();
        assert_eq!(got, b"abcdef");
        let mut got = vec![0u8; big.len()];
        f.read_exact_at(&mut got, 2 * WINDOW + 3).unwrap();
        assert_eq!(got, big);
        assert_eq!(f.metadata().unwrap().len(), 2 * WINDOW + 3 + 2 * WINDOW);
    }

    #[test]
    fn space_that_cannot_be_reserved_is_an_error_before_anything_is_mapped() {
        // Past the file system's largest file (16 TiB on ext4): fallocate refuses, as it does
        // with ENOSPC on a full disk, and nothing may have been mapped or stored.
        let dir = tempfile::tempdir().unwrap();
        let f = rw(&dir.path().join("seg"));
        let mut w = None;
        Window::write(&mut w, &f, 0, b"first").unwrap();
        let e = Window::write(&mut w, &f, 1 << 50, b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");
        assert!(w.is_none(), "the old window is gone and no new one was made");
        assert_eq!(f.metadata().unwrap().len(), WINDOW, "the file did not grow");
        // The positive control: the next write that can be reserved goes through.
        Window::write(&mut w, &f, 5, b"again").unwrap();
        let mut got = [0u8; 10];
        f.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"firstagain");
    }

    #[test]
    fn only_file_systems_that_honour_the_reservation_are_mapped() {
        assert!(supported(Path::new("/dev/shm")) || !Path::new("/dev/shm").exists(), "tmpfs");
        assert!(!supported(Path::new("/proc")), "procfs");
        assert!(!supported(Path::new("/no/such/dir")));
    }
}
