//! The rows of a large read whose keys come scattered, sorted on disk before they are looked up.
//!
//! Keys in stream order (a heap in key order) are looked up a block at a time, walking the
//! snapshot forward. Scattered keys (random UUIDs) are gathered into windows and looked up
//! sorted ([`super::Window`]), but a window of random keys still touches most leaves of a
//! snapshot larger than itself, so a full read of N random keys walks the snapshot about once per
//! window: a no-change full read of 5.95M uuid rows took 9.3-12.3 s against 1.6 s for its read.
//!
//! Once a read's first block has come scattered ([`crate::batch::scattered`]), against a
//! snapshot of more than [`SortSettings::above`] entries, [`Sorted`] writes every row to an
//! unnamed file beside the state file instead, in sorted runs, and after the read has completed
//! merges them, on a thread of its own, into blocks in key order: the lookups then walk the
//! snapshot once. The changes are written after the read rather than during it. A read that did
//! not complete writes nothing from here: its rows are read again by the next run.
//!
//! The file takes at most half the space free where it is (measured when it is created): past
//! that budget the rest of the read goes through as it comes, to the windows, and the runs
//! already on disk are merged after it. Every row is looked up once either way.
//!
//! A run is a sequence of rows: the tuple's length and the offset of its key's end in it (`u32`,
//! little-endian, each), then the tuple as the COPY stream framed it.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver as SyncReceiver, SyncSender};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::mpsc::Receiver;
use tokio::sync::oneshot;

use crate::copy::{Block, RowSpan};
use crate::snapshot::spill::{prefix, Runs};
use crate::snapshot::SnapshotError;

/// When and where a read's rows are sorted on disk.
#[derive(Debug, Clone)]
pub(crate) struct SortSettings {
    /// Sort only against a snapshot of more entries than this: below it, a few windows cover it.
    pub(crate) above: u64,
    /// Bytes of rows gathered before they go to disk as one sorted run (and the size of the
    /// first window, which decides).
    pub(crate) run_bytes: usize,
    /// Bytes of the blocks the merge hands on.
    pub(crate) block_bytes: usize,
    /// Where the file goes: the state file's directory.
    pub(crate) dir: PathBuf,
    /// Bytes the file may take at most, below half the space free there when it is created.
    pub(crate) max_disk: u64,
    /// The state file, for errors.
    pub(crate) path: String,
}

/// Blocks the merge thread may have ready ahead of the lookups.
const MERGED_AHEAD: usize = 4;

/// What a block of the read did to the run being gathered.
enum Step {
    /// Gathered (or the merge started): take the next.
    More,
    /// Hand this block on.
    Hand(Block),
    /// Nothing more: the end, or an error.
    Stop,
}

/// The read's blocks as the lookups take them: as they come, or sorted through disk.
pub(crate) struct Sorted {
    blocks: Receiver<Block>,
    /// Whether the read completed, sent once it ended: only a complete read's rows are merged.
    read_end: Option<oneshot::Receiver<bool>>,
    settings: Option<SortSettings>,
    state: State,
    /// Why sorting failed; the run fails with it.
    pub(crate) error: Option<SnapshotError>,
    /// Runs and bytes merged, once the rows went through disk.
    pub(crate) merged: Option<(usize, u64)>,
    /// Rows written to disk, and rows the merge handed back: the same number, or the run fails
    /// (the rows not handed back would be taken for removed).
    rows_in: u64,
    rows_out: u64,
    /// Bytes handed to disk, and the most the file may take (set when it is created).
    spilled: u64,
    budget: u64,
}

enum State {
    /// Deciding on the first block.
    Start,
    /// Blocks go through as they come.
    Pass,
    /// Scattered rows gathered toward the next run; `writer` once the first went to disk.
    Gather {
        rows: Gathered,
        writer: Option<RunWriter>,
    },
    /// The disk budget is spent: blocks go through as they come, and the runs on disk are
    /// merged after them.
    Overflow { writer: RunWriter },
    /// The runs merged, a block at a time.
    Merged {
        blocks: SyncReceiver<Block>,
        merging: JoinHandle<io::Result<()>>,
    },
    /// The stream ended.
    Ended,
}

impl Sorted {
    /// The blocks of `blocks`, sorted through disk when `settings` allow it and a snapshot of
    /// `entries` is large enough for it to pay.
    pub(crate) fn new(
        blocks: Receiver<Block>,
        read_end: oneshot::Receiver<bool>,
        settings: Option<SortSettings>,
        entries: u64,
    ) -> Sorted {
        let sort = settings.as_ref().is_some_and(|s| entries > s.above);
        Sorted {
            blocks,
            read_end: Some(read_end),
            settings,
            state: if sort { State::Start } else { State::Pass },
            error: None,
            merged: None,
            rows_in: 0,
            rows_out: 0,
            spilled: 0,
            budget: 0,
        }
    }

    /// Whether blocks wait to be taken: the read's queue holds some, or the runs on disk are
    /// being merged (a merge hands blocks on faster than they are looked up).
    pub(crate) fn queued(&self) -> bool {
        match self.state {
            State::Merged { .. } => true,
            State::Ended => false,
            _ => !self.blocks.is_empty(),
        }
    }

    /// The next block, or `None` at the end of the stream (or of a read that did not complete,
    /// or on an error, which [`Sorted::error`] then holds).
    pub(crate) fn next(&mut self) -> Option<Block> {
        loop {
            let step = match std::mem::replace(&mut self.state, State::Ended) {
                State::Pass => {
                    self.state = State::Pass;
                    return self.blocks.blocking_recv();
                }
                State::Start => {
                    let block = self.blocks.blocking_recv()?;
                    if !crate::batch::scattered(block.rows.len(), |i| {
                        block.rows[i].key(&block.data)
                    }) {
                        self.state = State::Pass;
                        return Some(block);
                    }
                    let mut rows = Gathered::default();
                    rows.push(&block);
                    self.state = State::Gather { rows, writer: None };
                    Step::More
                }
                State::Gather { rows, writer } => match self.blocks.blocking_recv() {
                    Some(block) => self.gather(rows, writer, &block),
                    None => self.end(rows, writer),
                },
                State::Overflow { writer } => match self.blocks.blocking_recv() {
                    Some(block) => {
                        self.state = State::Overflow { writer };
                        Step::Hand(block)
                    }
                    None => self.end(Gathered::default(), Some(writer)),
                },
                State::Merged { blocks, merging } => match blocks.recv() {
                    Ok(block) => {
                        self.rows_out += block.rows.len() as u64;
                        self.state = State::Merged { blocks, merging };
                        Step::Hand(block)
                    }
                    Err(_) => {
                        let merged = merging.join().expect("the merge thread panicked");
                        let (rows_in, rows_out) = (self.rows_in, self.rows_out);
                        let merged = merged.and_then(|()| match rows_out == rows_in {
                            true => Ok(()),
                            false => Err(io::Error::other(format!(
                                "the runs gave back {rows_out} rows of the {rows_in} written"
                            ))),
                        });
                        if let Err(e) = merged {
                            self.fail(e);
                        }
                        Step::Stop
                    }
                },
                State::Ended => Step::Stop,
            };
            match step {
                Step::More => {}
                Step::Hand(block) => return Some(block),
                Step::Stop => return None,
            }
        }
    }

    /// Adds `block` to the run being gathered and hands the run to the writer once it is full.
    /// When no file can be written, hands on what was gathered: the lookups then take the
    /// windows.
    fn gather(&mut self, mut rows: Gathered, writer: Option<RunWriter>, block: &Block) -> Step {
        let s = self.settings.as_ref().expect("sorting has settings");
        rows.push(block);
        if rows.data.len() < s.run_bytes {
            self.state = State::Gather { rows, writer };
            return Step::More;
        }
        let writer = match writer {
            Some(w) => w,
            None => match Runs::create(&s.dir).and_then(|runs| {
                let free = runs.free_bytes()?;
                Ok((RunWriter::start(runs)?, free))
            }) {
                Ok((w, free)) => {
                    self.budget = s.max_disk.min(free / 2);
                    w
                }
                Err(e) => {
                    tracing::warn!(
                        "state file {}: the read's rows cannot be sorted in {} ({e}): they are looked up a window at a time, which costs more for random keys",
                        s.path,
                        s.dir.display()
                    );
                    self.state = State::Pass;
                    return Step::Hand(rows.into_block());
                }
            },
        };
        let bytes = rows.data.len() as u64 + 8 * rows.rows.len() as u64;
        if self.spilled + bytes > self.budget {
            tracing::warn!(
                "state file {}: the read's rows sorted in {} reached {} MiB, half the space free there: the rest of the read is looked up a window at a time, which costs more for random keys",
                s.path,
                s.dir.display(),
                self.spilled >> 20
            );
            // The buffer kept for the next run is not needed any more.
            let _ = writer.empty.try_recv();
            self.state = match self.spilled {
                0 => State::Pass,
                _ => State::Overflow { writer },
            };
            return Step::Hand(rows.into_block());
        }
        self.spilled += bytes;
        self.rows_in += rows.rows.len() as u64;
        match writer.hand(rows) {
            Ok((rows, writer)) => {
                self.state = State::Gather {
                    rows,
                    writer: Some(writer),
                };
                Step::More
            }
            Err(e) => {
                self.fail(e);
                Step::Stop
            }
        }
    }

    /// The end of the read: hands on what was gathered if nothing went to disk, else writes the
    /// last run and, if the read completed, starts the merge.
    fn end(&mut self, rows: Gathered, writer: Option<RunWriter>) -> Step {
        let Some(writer) = writer else {
            return match rows.rows.is_empty() {
                true => Step::Stop,
                false => Step::Hand(rows.into_block()),
            };
        };
        // The last run is short: it goes to disk past the budget, by less than a run.
        self.rows_in += rows.rows.len() as u64;
        let runs = match writer.finish(rows) {
            Ok(runs) => runs,
            Err(e) => {
                self.fail(e);
                return Step::Stop;
            }
        };
        let complete = self
            .read_end
            .take()
            .and_then(|r| r.blocking_recv().ok())
            .unwrap_or(false);
        if !complete {
            return Step::Stop;
        }
        let s = self.settings.as_ref().expect("sorting has settings");
        tracing::debug!(
            runs = runs.len(),
            bytes = runs.bytes(),
            "merging the read's sorted rows"
        );
        self.merged = Some((runs.len(), runs.bytes()));
        let (tx, blocks) = sync_channel(MERGED_AHEAD);
        let block_bytes = s.block_bytes;
        let merging = std::thread::Builder::new()
            .name("pgdelta-merge".into())
            .spawn(move || merge(&runs, block_bytes, |b| tx.send(b).is_ok()));
        match merging {
            Ok(merging) => {
                self.state = State::Merged { blocks, merging };
                Step::More
            }
            Err(e) => {
                self.fail(e);
                Step::Stop
            }
        }
    }

    fn fail(&mut self, e: io::Error) {
        let (path, dir) = match &self.settings {
            Some(s) => (s.path.clone(), s.dir.display().to_string()),
            None => Default::default(),
        };
        let hint = match e.kind() {
            io::ErrorKind::StorageFull => {
                " (a full read of random keys needs about the model's size free there, for the run)"
            }
            _ => "",
        };
        self.error = Some(SnapshotError::Storage {
            path,
            message: format!(
                "sorting the read's rows in a temporary file in {dir}: {e}{hint}; nothing was deleted, and the rows not written are read again next run"
            ),
        });
        self.state = State::Ended;
    }
}

/// Hands `blocks` through a [`Sorted`] that sorts them on disk in `dir` (runs of `run_bytes`,
/// merged blocks of 512 KiB) and returns the rows it handed back, in key order: the criterion
/// bench of this path.
#[doc(hidden)]
pub fn sort_for_bench(blocks: Vec<Block>, dir: &std::path::Path, run_bytes: usize) -> u64 {
    let settings = SortSettings {
        above: 0,
        run_bytes,
        block_bytes: 512 << 10,
        dir: dir.to_path_buf(),
        max_disk: u64::MAX,
        path: "bench".into(),
    };
    let mut sorted = Sorted::over(blocks, true, settings);
    let mut rows = 0;
    while let Some(b) = sorted.next() {
        rows += b.rows.len() as u64;
    }
    assert!(sorted.error.is_none() && sorted.merged.is_some());
    rows
}

impl Sorted {
    /// A [`Sorted`] over `blocks`, queued whole, of a read that ended `complete`, against a
    /// snapshot large enough for `settings` to sort (the bench and the tests).
    fn over(blocks: Vec<Block>, complete: bool, settings: SortSettings) -> Sorted {
        let (tx, rx) = tokio::sync::mpsc::channel(blocks.len().max(1));
        for b in blocks {
            tx.try_send(b).expect("room for every block");
        }
        let (end_tx, end_rx) = oneshot::channel();
        let _ = end_tx.send(complete);
        let entries = settings.above + 1;
        Sorted::new(rx, end_rx, Some(settings), entries)
    }
}

/// The rows of one run being gathered: the read's blocks, copied (a block is a slice of the
/// framer's larger buffers, and holding it would pin the whole buffer).
#[derive(Default)]
struct Gathered {
    data: Vec<u8>,
    rows: Vec<RowSpan>,
}

impl Gathered {
    fn push(&mut self, block: &Block) {
        let base = u32::try_from(self.data.len()).expect("a run is smaller than 4 GiB");
        self.data.extend_from_slice(&block.data);
        self.rows.extend(block.rows.iter().map(|r| RowSpan {
            start: base + r.start,
            key_end: base + r.key_end,
            end: base + r.end,
        }));
    }

    fn clear(&mut self) {
        self.data.clear();
        self.rows.clear();
    }

    fn into_block(self) -> Block {
        Block {
            data: Bytes::from(self.data),
            rows: self.rows,
        }
    }

    /// Appends the rows to `runs` as one run in key order, rows of one key in the order they
    /// came.
    fn write(&self, runs: &mut Runs) -> io::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let key = |i: u32| self.rows[i as usize].key(&self.data);
        // Sorted by the keys' first 16 bytes as one integer, whole keys compared only on a tie,
        // and ties of keys by arrival.
        let mut order: Vec<(u128, u32)> = (0..self.rows.len() as u32)
            .map(|i| (prefix(key(i)), i))
            .collect();
        order.sort_unstable_by(|a, b| {
            (a.0.cmp(&b.0))
                .then_with(|| key(a.1).cmp(key(b.1)))
                .then(a.1.cmp(&b.1))
        });
        runs.append(|w| {
            let mut bytes = 0u64;
            for &(_, i) in &order {
                let r = &self.rows[i as usize];
                let tuple = r.tuple(&self.data);
                w.write_all(&(tuple.len() as u32).to_le_bytes())?;
                w.write_all(&(r.key_end - r.start).to_le_bytes())?;
                w.write_all(tuple)?;
                bytes += 8 + tuple.len() as u64;
            }
            Ok(bytes)
        })
    }
}

/// Sorts full runs and writes them to disk on a thread of its own while the next run gathers:
/// the read does not wait for the sort. At most two runs are in memory: one gathering, one
/// being written (whose buffer comes back for the run after next).
struct RunWriter {
    full: SyncSender<Gathered>,
    empty: SyncReceiver<Gathered>,
    thread: JoinHandle<io::Result<Runs>>,
}

impl RunWriter {
    fn start(runs: Runs) -> io::Result<RunWriter> {
        // A rendezvous: a full run is handed over when the last one is on disk.
        let (full, full_rx) = sync_channel::<Gathered>(0);
        let (empty_tx, empty) = sync_channel::<Gathered>(1);
        let thread = std::thread::Builder::new()
            .name("pgdelta-sort".into())
            .spawn(move || {
                let mut runs = runs;
                for mut rows in full_rx {
                    rows.write(&mut runs)?;
                    rows.clear();
                    let _ = empty_tx.try_send(rows);
                }
                Ok(runs)
            })?;
        Ok(RunWriter {
            full,
            empty,
            thread,
        })
    }

    /// Hands `rows` over (waiting while the run before is written); returns a buffer for the
    /// next run.
    fn hand(self, rows: Gathered) -> io::Result<(Gathered, RunWriter)> {
        if self.full.send(rows).is_err() {
            // The thread stopped on an error.
            return Err(self.finish(Gathered::default()).err().unwrap_or_else(|| {
                io::Error::other("the sort thread stopped before the read ended")
            }));
        }
        let rows = self.empty.try_recv().unwrap_or_default();
        Ok((rows, self))
    }

    /// Writes the last rows and returns the runs on disk.
    fn finish(self, rows: Gathered) -> io::Result<Runs> {
        if !rows.rows.is_empty() {
            // A send that fails finds the thread's error below.
            let _ = self.full.send(rows);
        }
        drop(self.full);
        self.thread.join().expect("the sort thread panicked")
    }
}

/// A run's next row while the runs merge.
#[derive(Default)]
struct Head {
    tuple: Vec<u8>,
    key_end: u32,
}

/// Merges `runs` into blocks of about `block_bytes` in key order, handing each to `send` until
/// it returns false.
fn merge(runs: &Runs, block_bytes: usize, mut send: impl FnMut(Block) -> bool) -> io::Result<()> {
    // Room for the row that crosses the limit, so that a block is not copied as it grows.
    let room = block_bytes + (64 << 10);
    let fresh = || Gathered {
        data: Vec::with_capacity(room),
        rows: Vec::new(),
    };
    let mut out = fresh();
    let mut gone = false;
    runs.merge(
        |r, key, head: &mut Head| {
            if r.is_done() {
                return Ok(false);
            }
            let lens = r.take(8)?;
            let len = u32::from_le_bytes(lens[..4].try_into().expect("4 bytes")) as usize;
            let key_end = u32::from_le_bytes(lens[4..].try_into().expect("4 bytes"));
            if key_end < 2 || key_end as usize > len {
                return Err(io::Error::other(
                    "a sorted row's key lies outside its tuple",
                ));
            }
            head.tuple.clear();
            head.tuple.extend_from_slice(r.take(len)?);
            head.key_end = key_end;
            key.clear();
            key.extend_from_slice(&head.tuple[2..key_end as usize]);
            Ok(true)
        },
        |_, head| {
            let start = out.data.len() as u32;
            out.data.extend_from_slice(&head.tuple);
            out.rows.push(RowSpan {
                start,
                key_end: start + head.key_end,
                end: out.data.len() as u32,
            });
            if out.data.len() >= block_bytes {
                gone = !send(std::mem::replace(&mut out, fresh()).into_block());
            }
            !gone
        },
    )?;
    if !gone && !out.rows.is_empty() {
        send(out.into_block());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of two-field tuples: a key of 8 bytes and a value of 8 bytes, per `(key, value)`.
    fn block(rows: &[(u64, u64)]) -> Block {
        let mut data = Vec::new();
        let mut spans = Vec::new();
        for &(k, v) in rows {
            let start = data.len() as u32;
            data.extend_from_slice(&2u16.to_be_bytes());
            data.extend_from_slice(&8u32.to_be_bytes());
            data.extend_from_slice(&k.to_be_bytes());
            let key_end = data.len() as u32;
            data.extend_from_slice(&8u32.to_be_bytes());
            data.extend_from_slice(&v.to_be_bytes());
            spans.push(RowSpan {
                start,
                key_end,
                end: data.len() as u32,
            });
        }
        Block {
            data: Bytes::from(data),
            rows: spans,
        }
    }

    /// Every row of `blocks` as `(key, value)`, in order.
    fn rows(blocks: &[Block]) -> Vec<(u64, u64)> {
        let int = |b: &[u8]| u64::from_be_bytes(b[4..12].try_into().unwrap());
        blocks
            .iter()
            .flat_map(|b| {
                b.rows
                    .iter()
                    .map(|r| (int(r.key(&b.data)), int(r.value(&b.data))))
            })
            .collect()
    }

    /// Feeds `blocks` to a [`Sorted`] (runs of `run_bytes`, the read's end reported as
    /// `complete`) and returns what it hands on, and the error it kept.
    fn sort(
        blocks: Vec<Block>,
        run_bytes: usize,
        complete: bool,
        dir: &std::path::Path,
    ) -> (Vec<Block>, Option<SnapshotError>) {
        sort_within(blocks, run_bytes, complete, dir, u64::MAX)
    }

    /// [`sort`], the file limited to `max_disk` bytes.
    fn sort_within(
        blocks: Vec<Block>,
        run_bytes: usize,
        complete: bool,
        dir: &std::path::Path,
        max_disk: u64,
    ) -> (Vec<Block>, Option<SnapshotError>) {
        let settings = SortSettings {
            above: 10,
            run_bytes,
            block_bytes: 1000,
            dir: dir.to_path_buf(),
            max_disk,
            path: "state.redb".into(),
        };
        let mut sorted = Sorted::over(blocks, complete, settings);
        let mut out = Vec::new();
        while let Some(b) = sorted.next() {
            out.push(b);
        }
        (out, sorted.error)
    }

    /// 100 rows of scattered keys from `from` (a multiplicative hash), each valued `tag`.
    fn scattered(from: u64, tag: u64) -> Vec<(u64, u64)> {
        (from..from + 100)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 8, tag))
            .collect()
    }

    #[test]
    fn scattered_rows_come_back_sorted_through_disk_duplicates_in_stream_order() {
        let dir = tempfile::tempdir().unwrap();
        // Key 7 three times, in different blocks (and so different runs), in this order.
        let mut input: Vec<Vec<(u64, u64)>> = (0..20).map(|i| scattered(i * 100, i)).collect();
        input[3].push((7, 1));
        input[11].push((7, 2));
        input[19].push((7, 3));
        let blocks: Vec<Block> = input.iter().map(|r| block(r)).collect();
        let size = blocks[0].data.len();
        let (out, err) = sort(blocks, 3 * size, true, dir.path());
        assert!(err.is_none());
        assert!(out.len() > 2, "blocks of about 1000 bytes: {}", out.len());
        let got = rows(&out);
        let mut want: Vec<(u64, u64)> = input.concat();
        // A stable sort by key alone: the expected order, duplicates in stream order.
        want.sort_by_key(|r| r.0);
        assert_eq!(got, want);
        let sevens: Vec<u64> = got.iter().filter(|r| r.0 == 7).map(|r| r.1).collect();
        assert_eq!(sevens, vec![1, 2, 3]);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the file has no name"
        );
    }

    /// Past its disk budget the rest of the read goes through as it comes, and the runs on
    /// disk follow it, merged: every row once.
    #[test]
    fn past_the_disk_budget_the_rest_goes_through_and_the_runs_follow() {
        let dir = tempfile::tempdir().unwrap();
        let input: Vec<Vec<(u64, u64)>> = (0..12).map(|i| scattered(i * 100, i)).collect();
        let blocks: Vec<Block> = input.iter().map(|r| block(r)).collect();
        let size = blocks[0].data.len();
        // Runs of 2 blocks; room for 2 runs (a run takes its bytes and 8 per row).
        let room = 2 * (2 * size as u64 + 8 * 200);
        let (out, err) = sort_within(blocks, 2 * size, true, dir.path(), room);
        assert!(err.is_none());
        let got = rows(&out);
        // Blocks 0-3 went to disk; the run of 4-5 went on, then 6-11 as they came; then the
        // runs, merged.
        let mut disk: Vec<(u64, u64)> = input[..4].concat();
        disk.sort_by_key(|r| r.0);
        let want = [input[4..].concat(), disk].concat();
        assert_eq!(got, want);
        // No room for a first run: everything goes through, nothing on disk.
        let blocks: Vec<Block> = input.iter().map(|r| block(r)).collect();
        let (out, err) = sort_within(blocks, 2 * size, true, dir.path(), 10);
        assert!(err.is_none());
        assert_eq!(rows(&out), input.concat());
    }

    #[test]
    fn a_read_that_did_not_complete_hands_on_nothing_it_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let blocks: Vec<Block> = (0..10).map(|i| block(&scattered(i * 100, i))).collect();
        let size = blocks[0].data.len();
        let (out, err) = sort(blocks, 2 * size, false, dir.path());
        assert!(err.is_none());
        assert!(out.is_empty(), "{} blocks handed on", out.len());
    }

    #[test]
    fn keys_in_order_and_small_reads_pass_without_disk() {
        let dir = tempfile::tempdir().unwrap();
        // Keys in stream order: the blocks as they came.
        let ordered: Vec<(u64, u64)> = (0..300).map(|i| (i, i)).collect();
        let blocks: Vec<Block> = ordered.chunks(100).map(block).collect();
        let (out, _) = sort(blocks, 10, true, dir.path());
        assert_eq!(out.len(), 3);
        assert_eq!(rows(&out), ordered);
        // Scattered, but less than a run: gathered and handed on in stream order, unsorted.
        let input: Vec<Vec<(u64, u64)>> = (0..3).map(|i| scattered(i * 100, i)).collect();
        let blocks: Vec<Block> = input.iter().map(|r| block(r)).collect();
        let (out, err) = sort(blocks, 1 << 20, true, dir.path());
        assert!(err.is_none());
        assert_eq!(out.len(), 1);
        assert_eq!(rows(&out), input.concat());
        // A directory that cannot hold the file: the rows are handed on unsorted, nothing lost.
        let blocks: Vec<Block> = input.iter().map(|r| block(r)).collect();
        let size = blocks[0].data.len();
        let (out, err) = sort(blocks, size, true, &dir.path().join("missing"));
        assert!(err.is_none());
        assert_eq!(rows(&out), input.concat());
    }
}
