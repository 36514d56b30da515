//! Row hashes by slot, in a file beside the state file: a changed row's new hash is written here
//! in place (16 bytes at `16 * (slot + 1)`), where redb would copy and rewrite the B-tree leaf
//! that holds the row's entry.
//!
//! A 1% churn of 10M rows changes about 100k rows scattered over 100k leaves; rewriting their
//! leaves was most of the snapshot thread's work (about 30 µs of CPU per row: the leaf read,
//! copied, written, its old page freed) and it ran after the destination's last commit, so it
//! held the end of the run (docs/performance.md, "Row hashes beside the state file").
//!
//! The file holds only hashes that differ from the entry's own: a slot of all zeros (a hole of
//! the sparse file, or a slot cleared when it was given to a new key or marked stale) means "the
//! hash in the entry". An entry's hash is therefore the file's, when the file has one, else its
//! own ([`HashView::get`]). New keys write their hash into their entry as before; only rows whose
//! key the snapshot already holds (changed rows) go to the file.
//!
//! The file starts with a 16-byte header: [`MAGIC`], then the id the sync's metadata names it by
//! (`hashes` in [`super::SyncMeta`]), so a file from another state file or another sync is never
//! taken for this one. It is named `<state file>.<id>.hashes`.
//!
//! Durability follows the entries': the file is fsynced before every durable commit of the state
//! file, and a run that is killed between its first write and its last record leaves the sync's
//! writing mark set, which makes the next run rebuild the entries (and this file) from the target.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The file's first 8 bytes.
const MAGIC: &[u8; 8] = b"pgdhash1";
/// Bytes before slot 0: the magic and the id.
const HEADER: u64 = 16;
/// The file grows by at least this much (it is sparse: unwritten slots take no disk).
const GROW: u64 = 1 << 20;

/// Where the hash file with id `id` of the state file `state` lives.
pub(super) fn path_for(state: &Path, id: u64) -> PathBuf {
    let name = state.file_name().unwrap_or_default().to_string_lossy();
    state.with_file_name(format!("{name}.{id:016x}.hashes"))
}

/// The id of the hash file named `name`, when it is one of the state file `state`'s
/// ([`path_for`]'s names).
pub(super) fn id_in(state: &Path, name: &str) -> Option<u64> {
    let prefix = format!("{}.", state.file_name()?.to_string_lossy());
    name.strip_prefix(&prefix)?
        .strip_suffix(".hashes")
        .filter(|h| h.len() == 16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
}

/// Removes the hash file `id` of the state file `state`, if it is there.
pub(super) fn remove(state: &Path, id: u64) {
    let path = path_for(state, id);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            "{}: cannot remove it ({e}); it is no longer used",
            path.display()
        ),
    }
}

/// A new random id for a hash file.
pub(super) fn new_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

fn offset(slot: u32) -> u64 {
    HEADER + u64::from(slot) * 16
}

/// Checks that `file` is the hash file `id`; its length when it is.
fn check_header(file: &File, id: u64) -> io::Result<u64> {
    let mut header = [0u8; HEADER as usize];
    file.read_exact_at(&mut header, 0)?;
    if &header[..8] != MAGIC || header[8..] != id.to_le_bytes() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not the row hashes file {id:016x} (its header differs)"),
        ));
    }
    Ok(file.metadata()?.len())
}

/// Whether the hash file `id` at `path` is there and is that file.
pub(super) fn check(path: &Path, id: u64) -> io::Result<()> {
    check_header(&File::open(path)?, id).map(|_| ())
}

/// The snapshot thread's handle on one sync's hash file.
pub(super) struct HashFile {
    file: File,
    len: u64,
    /// Written since the last fsync.
    dirty: bool,
}

impl HashFile {
    /// Creates the file `id` (there must be none).
    pub(super) fn create(path: &Path, id: u64) -> io::Result<HashFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&id.to_le_bytes());
        file.write_all_at(&header, 0)?;
        Ok(HashFile {
            file,
            len: HEADER,
            dirty: true,
        })
    }

    /// Opens the existing file `id`.
    pub(super) fn open(path: &Path, id: u64) -> io::Result<HashFile> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = check_header(&file, id)?;
        Ok(HashFile {
            file,
            len,
            dirty: false,
        })
    }

    /// The hash of the entry in `slot` is `hash` (never all zeros: that is [`HashFile::clear`]).
    pub(super) fn set(&mut self, slot: u32, hash: &[u8; 16]) -> io::Result<()> {
        self.write(slot, hash)
    }

    /// [`HashFile::set`] for many slots: in slot order, each run of consecutive slots in one
    /// write (a full rewrite of rows loaded in key order comes as long runs).
    pub(super) fn set_many(&mut self, items: &mut [(u32, [u8; 16])]) -> io::Result<()> {
        items.sort_unstable_by_key(|&(slot, _)| slot);
        let mut buf = Vec::new();
        let mut i = 0;
        while i < items.len() {
            let first = items[i].0;
            let mut j = i;
            while j + 1 < items.len() && items[j + 1].0 == items[j].0 + 1 {
                j += 1;
            }
            if i == j {
                self.set(first, &items[i].1)?;
            } else {
                buf.clear();
                for (_, h) in &items[i..=j] {
                    buf.extend_from_slice(h);
                }
                self.write(first, &buf)?;
            }
            i = j + 1;
        }
        Ok(())
    }

    fn write(&mut self, slot: u32, bytes: &[u8]) -> io::Result<()> {
        let at = offset(slot);
        let end = at + bytes.len() as u64;
        if end > self.len {
            // Sparse: the slots in between read as zeros ("the entry's own hash").
            let len = end.max(self.len + self.len / 2).next_multiple_of(GROW);
            self.file.set_len(len)?;
            self.len = len;
        }
        self.file.write_all_at(bytes, at)?;
        self.dirty = true;
        Ok(())
    }

    /// The entry in `slot` has its own hash (a new key took the slot, or it was marked stale).
    pub(super) fn clear(&mut self, slot: u32) -> io::Result<()> {
        let at = offset(slot);
        if at + 16 <= self.len {
            self.file.write_all_at(&[0; 16], at)?;
            self.dirty = true;
        }
        Ok(())
    }

    /// Makes what was written durable.
    pub(super) fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }
}

/// A read-only view of one sync's hash file, as long as it was when the view was made (it only
/// grows; slots past the view's end have no hash in the file). Shared by every thread of a
/// [`super::Reader`].
pub(crate) struct HashView {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the view is a read-only shared mapping, unmapped only on drop; reads are volatile
// copies of 16 bytes (see `get`), so sharing it across threads is sound.
unsafe impl Send for HashView {}
unsafe impl Sync for HashView {}

impl HashView {
    /// Maps the hash file `id` at `path`.
    pub(super) fn open(path: &Path, id: u64) -> io::Result<HashView> {
        let file = File::open(path)?;
        let len = usize::try_from(check_header(&file, id)?)
            .map_err(|_| io::Error::other("the row hashes file is larger than memory can map"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: a new read-only shared mapping of a file that is at least `len` (> 0) bytes
        // long; the file is never shortened while it exists (it is only ever grown, or removed,
        // which leaves existing mappings intact).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(HashView {
            ptr: ptr as *const u8,
            len,
        })
    }

    /// The hash the file holds for `slot`, if it holds one.
    #[inline]
    pub(crate) fn get(&self, slot: u32) -> Option<[u8; 16]> {
        let at = usize::try_from(offset(slot)).ok()?;
        if at + 16 > self.len {
            return None;
        }
        // SAFETY: `at + 16` is within the mapping. The snapshot thread may be writing the same
        // slot through the file at this moment (only a row this run recorded, which the diff
        // never looks up again), so the copy is volatile: at worst it sees a mix of the old and
        // new hash, which matches no row (the row is then written again), never undefined memory.
        let hash = unsafe { std::ptr::read_volatile(self.ptr.add(at) as *const [u8; 16]) };
        let page = at >> 12;
        PAGES.with(|p| {
            let (last, n) = p.get();
            if page == last {
                return;
            }
            if n >= RELEASE_PAGES {
                p.set((page, 0));
                self.release();
            } else {
                p.set((page, n + 1));
            }
        });
        (hash != [0; 16]).then_some(hash)
    }

    /// Lets go of the mapped pages: they stay in the page cache, and a later read maps its
    /// page again (a minor fault). Mapped pages count toward the process's resident memory; a
    /// full read maps the whole file, 16 bytes per entry, which would add 160 MB to the peak
    /// RSS of a sync of 10M rows.
    fn release(&self) {
        // SAFETY: the range is exactly the mapping; for a shared file mapping MADV_DONTNEED
        // only drops page table entries (the file's pages and their contents stay), so a
        // concurrent read on another thread faults its page in again and reads the same bytes.
        unsafe {
            libc::madvise(self.ptr as *mut libc::c_void, self.len, libc::MADV_DONTNEED);
        }
    }
}

/// Reads of a new page of a [`HashView`] on each thread between two [`HashView::release`]s. A
/// read in the page of the one before does not count: a full read of rows loaded in key order
/// reads the file in order, 256 slots a page, and releases its pages rarely; scattered reads
/// (a delta's changed rows) each count. Releasing after every 256 reads instead cost a 10M-row
/// full read 1-2.5 s of CPU (page faults again and again on the same pages).
const RELEASE_PAGES: u32 = 2048;

thread_local! {
    /// The page last read on this thread, and the new pages read since the last release.
    static PAGES: std::cell::Cell<(usize, u32)> = const { std::cell::Cell::new((usize::MAX, 0)) };
}

impl Drop for HashView {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `open` made; no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_by_slot_read_back_through_a_view() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("state.redb"), 7);
        assert!(path.ends_with("state.redb.0000000000000007.hashes"));
        let state = dir.path().join("state.redb");
        let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(id_in(&state, &name(&path)), Some(7));
        assert_eq!(id_in(&state, "state.redb.7.hashes"), None);
        assert_eq!(id_in(&state, "other.redb.0000000000000007.hashes"), None);
        let mut f = HashFile::create(&path, 7).unwrap();
        f.set(3, &[3; 16]).unwrap();
        f.set(100_000, &[9; 16]).unwrap();
        let view = HashView::open(&path, 7).unwrap();
        assert_eq!(view.get(3), Some([3; 16]));
        assert_eq!(view.get(100_000), Some([9; 16]));
        assert_eq!(view.get(4), None, "a hole is the entry's own hash");
        assert_eq!(view.get(u32::MAX), None, "past the end");
        // Writes after the view was made are seen where the view reaches.
        f.set(4, &[4; 16]).unwrap();
        f.clear(3).unwrap();
        f.clear(u32::MAX).unwrap();
        assert_eq!((view.get(4), view.get(3)), (Some([4; 16]), None));
        f.set(50_000_000, &[5; 16]).unwrap();
        assert_eq!(view.get(50_000_000), None, "beyond the view's length");
        f.sync().unwrap();
        drop(f);
        let mut again = HashFile::open(&path, 7).unwrap();
        again.set(5, &[1; 16]).unwrap();
        let view = HashView::open(&path, 7).unwrap();
        assert_eq!(view.get(50_000_000), Some([5; 16]));
        assert_eq!(view.get(5), Some([1; 16]));
        assert!(
            HashView::open(&path, 8).is_err(),
            "another id's file is refused"
        );
        assert!(HashFile::open(&path, 8).is_err());
        assert!(
            HashFile::create(&path, 7).is_err(),
            "never created over an existing one"
        );
        assert_ne!(new_id(), new_id());
        let mut many = vec![
            (12, [12; 16]),
            (10, [10; 16]),
            (11, [11; 16]),
            (20, [20; 16]),
        ];
        again.set_many(&mut many).unwrap();
        let view = HashView::open(&path, 7).unwrap();
        for s in [10u32, 11, 12, 20] {
            assert_eq!(view.get(s), Some([s as u8; 16]));
        }
        assert_eq!(view.get(13), None);
    }
}
