//! Staged row records that wait on disk, as sorted runs, to be merged into the state file in
//! one pass.
//!
//! The snapshot thread applies scattered records (random keys: UUIDs, hashes) a stage at a
//! time, in key order. A stage of 16 MiB is a few hundred thousand keys; once the B-tree has
//! more leaves than that, every stage rewrites nearly all of them, so a load of N random keys
//! cost O(N²) page writes (a 6M-row uuid load: 15.5 s of CPU against 5.5 s for 3M rows). The
//! owner now writes a full stage here, sorted, while the entries waiting add up to fewer than the
//! sync's entries, and merges every run into the tree at once when they catch up (or when a
//! control command, a removal or a stale mark needs them applied): the tree is rewritten a
//! bounded number of times per doubling of its size, so the total stays O(N).
//!
//! The file is unnamed (`tempfile::tempfile_in`, beside the state file): a run killed while
//! records wait here leaves nothing behind, and loses nothing the writing mark does not already
//! cover (a crash after writes rebuilds the entries from the target).
//!
//! A key read ([`crate::sync`]) spills keys the same way, without entries: sorted runs of a
//! table's keys, merged, meet the state file's entries in one forward walk.
//!
//! A run is a sequence of records: key length (`u32`, little-endian), key bytes, then (records
//! with entries) the 16-byte row hash, a flag byte and a `u32` slot (flag 0: a new key, no slot
//! yet).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{Committed, Entry, Reader, SnapshotError};

/// Bytes read from a run at a time while merging (one buffer per run).
const READ_CHUNK: usize = 256 << 10;

/// Records handed on at a time by [`Spill::walk`].
const WALK_PART: usize = 64 << 10;

type Record = ([u8; 16], Option<u32>);

/// Sorted runs in an unnamed file, in the order they were appended: each run's byte range.
/// [`Spill`] keeps row records (or keys) in one; the diff keeps a read's rows sorted in another
/// ([`crate::diff`]).
pub(crate) struct Runs {
    file: File,
    runs: Vec<(u64, u64)>,
    end: u64,
}

impl Runs {
    /// An unnamed file in `dir`.
    pub(crate) fn create(dir: &Path) -> io::Result<Runs> {
        Ok(Runs {
            file: tempfile::tempfile_in(dir)?,
            runs: Vec::new(),
            end: 0,
        })
    }

    /// Bytes free to an unprivileged writer on the file's file system.
    pub(crate) fn free_bytes(&self) -> io::Result<u64> {
        use std::os::fd::AsRawFd;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: the descriptor is open for as long as `self.file`, and `fstatvfs` fills `st`
        // when it returns 0.
        let st = unsafe {
            if libc::fstatvfs(self.file.as_raw_fd(), st.as_mut_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            st.assume_init()
        };
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Runs appended.
    pub(crate) fn len(&self) -> usize {
        self.runs.len()
    }

    /// Bytes of all runs.
    pub(crate) fn bytes(&self) -> u64 {
        self.end
    }

    /// Appends one run: `write` writes its records and returns how many bytes they took.
    pub(crate) fn append(
        &mut self,
        write: impl FnOnce(&mut BufWriter<&File>) -> io::Result<u64>,
    ) -> io::Result<()> {
        // From the end of the last whole run: a run that failed half-written is overwritten.
        (&self.file).seek(SeekFrom::Start(self.end))?;
        let mut w = BufWriter::with_capacity(READ_CHUNK, &self.file);
        let bytes = write(&mut w)?;
        w.flush()?;
        self.runs.push((self.end, bytes));
        self.end += bytes;
        Ok(())
    }

    /// Merges the runs in key order: `next` reads a run's next record (its key into the first
    /// buffer, the rest into the second; false at the run's end) and `emit` takes each record
    /// in turn, records of one key in the order their runs were appended, until it returns
    /// false.
    pub(crate) fn merge<T: Default>(
        &self,
        mut next: impl FnMut(&mut RunReader<'_>, &mut Vec<u8>, &mut T) -> io::Result<bool>,
        mut emit: impl FnMut(&[u8], &T) -> bool,
    ) -> io::Result<()> {
        let mut readers: Vec<RunReader<'_>> = self
            .runs
            .iter()
            .map(|&(at, len)| RunReader {
                file: &self.file,
                pos: at,
                end: at + len,
                buf: Vec::new(),
                at: 0,
            })
            .collect();
        let mut heads: Vec<T> = readers.iter().map(|_| T::default()).collect();
        // Ties between runs go to the older one: the heap orders by (key, run), the key's first
        // 16 bytes compared as one integer before the whole key.
        let mut heap = BinaryHeap::with_capacity(readers.len());
        for (i, r) in readers.iter_mut().enumerate() {
            let mut key = Vec::new();
            if next(r, &mut key, &mut heads[i])? {
                heap.push(Reverse((prefix(&key), key, i)));
            }
        }
        while let Some(Reverse((_, mut key, i))) = heap.pop() {
            if !emit(&key, &heads[i]) {
                return Ok(());
            }
            if next(&mut readers[i], &mut key, &mut heads[i])? {
                heap.push(Reverse((prefix(&key), key, i)));
            }
        }
        Ok(())
    }
}

/// A key's first 16 bytes as one big-endian integer, zero-padded: ordering keys by it, then by
/// their bytes, is their byte order, with most comparisons settled by the integer.
pub(crate) fn prefix(key: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    let n = key.len().min(16);
    b[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(b)
}

/// Sorted runs of records (or of keys alone), in the order they were pushed.
pub(crate) struct Spill {
    runs: Runs,
    /// Records in all runs.
    pub(crate) records: u64,
    /// Records carry entries (hash and slot), not only keys.
    entries: bool,
}

impl Spill {
    /// An unnamed file in `dir`, for records with their entries (`entries`) or keys alone.
    pub(crate) fn create(dir: &Path, entries: bool) -> io::Result<Spill> {
        Ok(Spill {
            runs: Runs::create(dir)?,
            records: 0,
            entries,
        })
    }

    /// Appends the records of `c` as one run, in key order (records of one key in their order
    /// in `c`). A spill of keys reads only `c.keys`.
    pub(crate) fn push(&mut self, c: &Committed) -> io::Result<()> {
        let order = c.keys.order(0..c.keys.len());
        let entries = self.entries;
        self.runs.append(|w| {
            let mut bytes = 0u64;
            for &i in &order {
                let key = c.keys.key(i);
                let len = u32::try_from(key.len()).map_err(io::Error::other)?;
                w.write_all(&len.to_le_bytes())?;
                w.write_all(key)?;
                bytes += 4 + key.len() as u64;
                if entries {
                    let (hash, slot) = c.entries[i];
                    w.write_all(&hash)?;
                    w.write_all(&[u8::from(slot.is_some())])?;
                    w.write_all(&slot.unwrap_or(0).to_le_bytes())?;
                    bytes += 16 + 1 + 4;
                }
            }
            Ok(bytes)
        })?;
        self.records += order.len() as u64;
        Ok(())
    }

    /// Merges the runs in key order, records of one key in the order they were pushed, handing
    /// `f` parts of at most `part` records (their entries empty in a spill of keys); stops early
    /// when `f` returns false.
    pub(crate) fn merge(self, part: usize, mut f: impl FnMut(Committed) -> bool) -> io::Result<()> {
        let entries = self.entries;
        let mut out = Committed::default();
        let mut stopped = false;
        self.runs.merge(
            |r, key, head: &mut Record| {
                if r.is_done() {
                    return Ok(false);
                }
                let len = u32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes")) as usize;
                key.clear();
                key.extend_from_slice(r.take(len)?);
                if entries {
                    let rest = r.take(21)?;
                    head.0.copy_from_slice(&rest[..16]);
                    let slot = u32::from_le_bytes(rest[17..21].try_into().expect("4 bytes"));
                    head.1 = (rest[16] == 1).then_some(slot);
                }
                Ok(true)
            },
            |key, &head| {
                out.keys.push(key);
                if entries {
                    out.entries.push(head);
                }
                if out.keys.len() >= part && !f(std::mem::take(&mut out)) {
                    stopped = true;
                }
                !stopped
            },
        )?;
        if !stopped && !out.keys.is_empty() {
            f(out);
        }
        Ok(())
    }
}

impl Spill {
    /// Merges the runs ([`Spill::merge`]) into one stream in key order that meets `reader`'s
    /// entries in one forward walk ([`super::Walk`]): with `beside`, the merge runs on a thread
    /// of its own while this one walks (the two take about as long), else on this thread between
    /// parts. `each` gets every part's keys, entries (empty in a spill of keys) and the entry
    /// found for each key, and stops the walk by returning false; `unmatched` gets every entry
    /// no key matched, up to the last key walked, and the entries past it when the walk went to
    /// the end.
    pub(crate) fn walk(
        self,
        reader: &Reader,
        beside: bool,
        mut each: impl FnMut(&[&[u8]], &[Record], &[Option<Entry>]) -> bool,
        mut unmatched: impl FnMut(&[u8]),
    ) -> Result<(), SnapshotError> {
        let mut walk = reader.walk()?;
        let mut found = Vec::new();
        let mut step = |part: &Committed| {
            let keys: Vec<&[u8]> = (0..part.keys.len()).map(|i| part.keys.key(i)).collect();
            walk.find(&keys, &mut found, &mut unmatched)?;
            Ok::<_, SnapshotError>(each(&keys, &part.entries, &found))
        };
        let io = |e: io::Error| reader.err(format!("reading back sorted runs from disk: {e}"));
        let whole = match beside {
            true => std::thread::scope(|s| {
                let (tx, parts) = std::sync::mpsc::sync_channel::<Committed>(2);
                let merging = s.spawn(move || self.merge(WALK_PART, |part| tx.send(part).is_ok()));
                let mut walked = || {
                    for part in &parts {
                        if !step(&part)? {
                            return Ok(false);
                        }
                    }
                    Ok::<_, SnapshotError>(true)
                };
                let walked = walked();
                // A walk that stopped stops the merge at its next part.
                drop(parts);
                let merged = merging.join().expect("the merge thread panicked");
                let whole = walked?;
                merged.map_err(io)?;
                Ok::<_, SnapshotError>(whole)
            })?,
            false => {
                let mut walked = Ok(true);
                self.merge(WALK_PART, |part| {
                    walked = step(&part);
                    matches!(walked, Ok(true))
                })
                .map_err(io)?;
                walked?
            }
        };
        if whole {
            walk.rest(&mut unmatched)?;
        }
        Ok(())
    }
}

/// Reads one run's bytes, a chunk at a time.
pub(crate) struct RunReader<'a> {
    file: &'a File,
    /// Next byte of the file to read, and the run's end.
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    /// Next byte of `buf` to parse.
    at: usize,
}

impl RunReader<'_> {
    /// True when every byte of the run was taken.
    pub(crate) fn is_done(&self) -> bool {
        self.at == self.buf.len() && self.pos == self.end
    }

    /// The next `n` bytes of the run, reading more of the file when the buffer runs short.
    pub(crate) fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.buf.len() - self.at < n {
            self.buf.drain(..self.at);
            self.at = 0;
            let want = (n - self.buf.len()).max(READ_CHUNK);
            let want = want.min((self.end - self.pos) as usize);
            if self.buf.len() + want < n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "a sorted run ends inside a record",
                ));
            }
            let old = self.buf.len();
            self.buf.resize(old + want, 0);
            self.file.read_exact_at(&mut self.buf[old..], self.pos)?;
            self.pos += want as u64;
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(records: &[(&[u8], u8, Option<u32>)]) -> Committed {
        let mut c = Committed::default();
        for &(k, h, s) in records {
            c.keys.push(k);
            c.entries.push(([h; 16], s));
        }
        c
    }

    /// Runs merge in key order; a key in several runs comes out once per run, oldest first;
    /// parts hold at most `part` records; keys longer than a read chunk survive the trip.
    #[test]
    fn runs_merge_in_key_order_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::create(dir.path(), true).unwrap();
        let long = vec![b'z'; READ_CHUNK + 10];
        let a = committed(&[(b"m", 1, Some(4)), (b"c", 2, None), (b"x", 3, Some(9))]);
        let b = committed(&[(b"c", 5, None), (&long, 6, Some(1)), (b"a", 7, None)]);
        let empty = Committed::default();
        for c in [&a, &empty, &b] {
            spill.push(c).unwrap();
        }
        assert_eq!(spill.records, 6);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the file has no name"
        );
        let mut parts = Vec::new();
        spill
            .merge(4, |c| {
                parts.push(
                    (0..c.keys.len())
                        .map(|i| (c.keys.key(i).to_vec(), c.entries[i].0[0], c.entries[i].1))
                        .collect::<Vec<_>>(),
                );
                true
            })
            .unwrap();
        let want = vec![
            vec![
                (b"a".to_vec(), 7, None),
                (b"c".to_vec(), 2, None),
                (b"c".to_vec(), 5, None),
                (b"m".to_vec(), 1, Some(4)),
            ],
            vec![(b"x".to_vec(), 3, Some(9)), (long.clone(), 6, Some(1))],
        ];
        assert_eq!(parts, want);
    }
}
