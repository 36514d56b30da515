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

    /// [`HashFile::set`] for many slots, in slot order. Slots close together go in one write of
    /// the span they cover: the span is read, the slots patched, and the span written back
    /// (what lies between them is written as it was). A churn's changed rows are scattered over
    /// the slots (one in ten at 10% churn), and one write each was one system call per row.
    pub(super) fn set_many(&mut self, items: &mut [(u32, [u8; 16])]) -> io::Result<()> {
        items.sort_unstable_by_key(|&(slot, _)| slot);
        let mut buf = Vec::new();
        let mut rest = &items[..];
        while !rest.is_empty() {
            let n = span_len(rest);
            let (span, more) = rest.split_at(n);
            rest = more;
            let (first, last) = (span[0].0, span[n - 1].0);
            if n == 1 {
                self.set(first, &span[0].1)?;
                continue;
            }
            let bytes = (last - first + 1) as usize * 16;
            buf.clear();
            buf.resize(bytes, 0);
            if span.windows(2).any(|w| w[1].0 - w[0].0 > 1) {
                // Gaps: their bytes as they are (past the file's end, zeros).
                let at = offset(first);
                let have = self.len.saturating_sub(at).min(bytes as u64) as usize;
                self.file.read_exact_at(&mut buf[..have], at)?;
            }
            for (slot, h) in span {
                let at = (slot - first) as usize * 16;
                buf[at..at + 16].copy_from_slice(h);
            }
            self.write(first, &buf)?;
        }
        Ok(())
    }

    /// [`HashFile::clear`] for many slots: zeros written as [`HashFile::set_many`] writes.
    pub(super) fn clear_many(&mut self, slots: &[u32]) -> io::Result<()> {
        let len = self.len;
        let mut items: Vec<(u32, [u8; 16])> = slots
            .iter()
            .filter(|&&s| offset(s) + 16 <= len)
            .map(|&s| (s, [0; 16]))
            .collect();
        self.set_many(&mut items)
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
/// [`super::Reader`]; each walk over many entries reads through a [`HashCursor`] of its own.
///
/// The file is read with `pread`, never mapped: mapped pages count toward the process's
/// resident memory, and the lookups of a full read after rounds of churn (keys in slots freed
/// by removed rows, rows updated out of key order) jumped over the whole file: 53-73 MiB of it
/// were resident at the peak of 10M-row full reads (docs/performance.md, "The hash file read,
/// not mapped").
pub(crate) struct HashView {
    file: File,
    len: u64,
}

impl HashView {
    /// Opens the hash file `id` at `path`.
    pub(super) fn open(path: &Path, id: u64) -> io::Result<HashView> {
        let file = File::open(path)?;
        let len = check_header(&file, id)?;
        Ok(HashView { file, len })
    }

    /// The hash the file holds for `slot`, if it holds one: one read of 16 bytes.
    pub(crate) fn get(&self, slot: u32) -> io::Result<Option<[u8; 16]>> {
        let at = offset(slot);
        if at + 16 > self.len {
            return Ok(None);
        }
        let mut hash = [0u8; 16];
        self.file.read_exact_at(&mut hash, at)?;
        Ok(held(hash))
    }
}

/// Slots at most this many apart (one 4 KiB page of the file) go in one span of
/// [`HashFile::set_many`]: reading and writing back the bytes between them costs less than a
/// system call per slot, and dirties at most the page between two slots besides theirs (the
/// durable commit's `fdatasync` writes every dirty page). On a file of 10M slots, one in 13
/// holding a hash, 1M slots one in ten apart took 68 and 85 ms in spans against 1.17-1.37 s one
/// write each; 100k slots one in a hundred apart, 70-80 ms against 95-103 ms (release build,
/// the machine busy with another build) ...
const SPAN_GAP: u32 = 256;
/// ... up to spans of this many slots (64 KiB).
const SPAN_SLOTS: u32 = 4096;

/// How many of `items` (sorted by slot, at least one) make the first span: neighbouring slots
/// at most [`SPAN_GAP`] apart, all within [`SPAN_SLOTS`] of the first.
fn span_len(items: &[(u32, [u8; 16])]) -> usize {
    let first = items[0].0;
    1 + items
        .windows(2)
        .take_while(|w| w[1].0 - w[0].0 <= SPAN_GAP && w[1].0 - first < SPAN_SLOTS)
        .count()
}

/// A slot of all zeros holds no hash: the entry's own stands.
fn held(hash: [u8; 16]) -> Option<[u8; 16]> {
    (hash != [0; 16]).then_some(hash)
}

/// Bytes of the file a [`HashCursor`] reads at once: 1,024 slots.
const WINDOW: u64 = 16 << 10;

/// Reads slots of a [`HashView`] for one walk. Slots met in order (the entries of rows loaded in
/// key order) are read a window of [`WINDOW`] bytes at a time, one `pread` per 1,024 slots; a slot
/// far from the slot before it (a key that took a freed slot, a row updated out of key order) is
/// read alone, 16 bytes. Memory: one window per cursor, whatever the file's size.
///
/// A window holds the file as it was when the window was read: a hash written since is not seen
/// through it. The diff never looks up a slot its own run has recorded, and a walk outlives no
/// run, so that is never the case that matters.
pub(crate) struct HashCursor<'a> {
    view: Option<&'a HashView>,
    /// The window in `buf` (`u64::MAX`: none).
    window: u64,
    buf: Vec<u8>,
    /// The window of the last slot read alone (`u64::MAX`: none).
    alone: u64,
}

impl<'a> HashCursor<'a> {
    /// A cursor for reads of many slots of `view`, in any order; over no file (`None`), every
    /// slot has the entry's own hash.
    pub(crate) fn over(view: Option<&'a HashView>) -> HashCursor<'a> {
        HashCursor {
            view,
            window: u64::MAX,
            buf: Vec::new(),
            alone: u64::MAX,
        }
    }

    /// The hash the file holds for `slot`, if it holds one.
    #[inline]
    pub(crate) fn get(&mut self, slot: u32) -> io::Result<Option<[u8; 16]>> {
        let Some(view) = self.view else {
            return Ok(None);
        };
        let at = offset(slot);
        if at + 16 > view.len {
            return Ok(None);
        }
        let w = at / WINDOW;
        if w != self.window {
            // The second slot in a window, or the next window of one read whole: slots are
            // coming in order, and the window is read whole. Else this slot alone.
            let in_order = w == self.alone || self.window.checked_add(1) == Some(w);
            if !in_order {
                self.alone = w;
                return view.get(slot);
            }
            let start = w * WINDOW;
            let n = (view.len - start).min(WINDOW) as usize;
            self.buf.resize(n, 0);
            view.file.read_exact_at(&mut self.buf, start)?;
            self.window = w;
        }
        let i = (at - w * WINDOW) as usize;
        let hash: [u8; 16] = self.buf[i..i + 16].try_into().expect("16 bytes");
        Ok(held(hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl HashView {
        fn get_ok(&self, slot: u32) -> Option<[u8; 16]> {
            self.get(slot).unwrap()
        }
    }

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
        assert_eq!(view.get_ok(3), Some([3; 16]));
        assert_eq!(view.get_ok(100_000), Some([9; 16]));
        assert_eq!(view.get_ok(4), None, "a hole is the entry's own hash");
        assert_eq!(view.get_ok(u32::MAX), None, "past the end");
        // Writes after the view was made are seen where the view reaches.
        f.set(4, &[4; 16]).unwrap();
        f.clear(3).unwrap();
        f.clear(u32::MAX).unwrap();
        assert_eq!((view.get_ok(4), view.get_ok(3)), (Some([4; 16]), None));
        f.set(50_000_000, &[5; 16]).unwrap();
        assert_eq!(view.get_ok(50_000_000), None, "beyond the view's length");
        f.sync().unwrap();
        drop(f);
        let mut again = HashFile::open(&path, 7).unwrap();
        again.set(5, &[1; 16]).unwrap();
        let view = HashView::open(&path, 7).unwrap();
        assert_eq!(view.get_ok(50_000_000), Some([5; 16]));
        assert_eq!(view.get_ok(5), Some([1; 16]));
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
            assert_eq!(view.get_ok(s), Some([s as u8; 16]));
        }
        assert_eq!(view.get_ok(13), None);
    }

    /// Slots set many at a time, in spans read and written back whole, leave every other slot as
    /// it was: holes, hashes set before, slots cleared, and past the file's end.
    #[test]
    fn spans_of_slots_change_only_the_slots_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("state.redb"), 2);
        let mut f = HashFile::create(&path, 2).unwrap();
        let mut want = std::collections::BTreeMap::<u32, [u8; 16]>::new();
        let h = |s: u32, round: u8| {
            let mut h = [round; 16];
            h[..4].copy_from_slice(&s.to_le_bytes());
            h
        };
        for round in 1..=4u8 {
            // Every 7th slot, shifted each round, with runs, lone far slots, duplicates of a
            // slot (the last one given is not promised: the same hash here), and spans longer
            // than the cap.
            let step = 3 + 4 * u32::from(round);
            let mut items: Vec<(u32, [u8; 16])> = (u32::from(round)..20_000)
                .step_by(step as usize)
                .chain(30_000..30_050)
                .chain([1_000_000, 5, 5, 10_000_000 + u32::from(round)])
                .map(|s| (s, h(s, round)))
                .collect();
            for &(s, v) in &items {
                want.insert(s, v);
            }
            f.set_many(&mut items).unwrap();
            if round == 2 {
                f.clear_many(&[5, 30_010, 30_012, 700, u32::MAX]).unwrap();
                for s in [5u32, 30_010, 30_012, 700] {
                    want.remove(&s);
                }
            }
        }
        let view = HashView::open(&path, 2).unwrap();
        for s in (0..40_000)
            .chain(999_990..1_000_010)
            .chain(9_999_990..10_000_010)
        {
            assert_eq!(view.get_ok(s), want.get(&s).copied(), "slot {s}");
        }
        // Spans: neighbours within the gap and the cap.
        let items: Vec<(u32, [u8; 16])> = [0u32, 64, 129, 130, 4095, 4096, 9000]
            .map(|s| (s, [1; 16]))
            .to_vec();
        assert_eq!(span_len(&items), 4, "4095 is 3965 after 130");
        assert_eq!(span_len(&items[4..]), 2, "4095 and 4096; 9000 is far");
        let capped: Vec<(u32, [u8; 16])> = (0..5_000).map(|s| (s * 2, [1; 16])).collect();
        assert_eq!(span_len(&capped), 2048, "a span covers at most 4,096 slots");
    }

    /// A cursor answers as point reads do, for slots in order, scattered, at the file's end and
    /// past it, and for a view of no file.
    #[test]
    fn a_cursor_reads_as_point_reads_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("state.redb"), 1);
        let mut f = HashFile::create(&path, 1).unwrap();
        let hash = |s: u32| {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&(s + 1).to_le_bytes());
            h
        };
        // Every third slot of the first 5,000 (several windows), and a few far ones.
        let mut set: Vec<(u32, [u8; 16])> = (0..5_000).step_by(3).map(|s| (s, hash(s))).collect();
        set.extend([70_000u32, 3_333_333, 9_999_999].map(|s| (s, hash(s))));
        f.set_many(&mut set).unwrap();
        f.sync().unwrap();
        let view = HashView::open(&path, 1).unwrap();
        let last = (view.len - HEADER) as u32 / 16;
        let mut order: Vec<u32> = (0..5_100).collect();
        // Scattered, then in order again, then slots near and past the end.
        order.extend([9_999_999, 17, 3_333_333, 4_999, 70_000, 2, 70_001, 0]);
        order.extend(4_000..4_100);
        order.extend([last - 1, last, last + 1, u32::MAX]);
        let mut c = HashCursor::over(Some(&view));
        for &s in &order {
            let want = (s < 5_000 && s % 3 == 0 || [70_000, 3_333_333, 9_999_999].contains(&s))
                .then(|| hash(s));
            assert_eq!(view.get_ok(s), want, "slot {s}");
            assert_eq!(c.get(s).unwrap(), want, "slot {s} through the cursor");
        }
        assert_eq!(HashCursor::over(None).get(3).unwrap(), None);
    }
}
