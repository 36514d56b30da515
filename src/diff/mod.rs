//! The diff stage: hash each row, look its key up in the snapshot, classify it, and cut the
//! changes into write batches.
//!
//! Runs on its own thread (never a tokio worker): blocks of framed tuples come in over a bounded
//! channel, each block is hashed and looked up (one xxh3-128 call per row; the block's keys
//! sorted and looked up by a forward walk of the snapshot, [`Reader::get_many`]), on this thread
//! while the diff keeps up with the read and in parallel on rayon once blocks queue up
//! ([`look_up_stream`]), and then classified in order on this thread ([`classify`]). Blocks of scattered keys (UUIDs)
//! are gathered into a [`Window`] of up to 32 MiB first and looked up together, so that their
//! sorted keys share the snapshot's pages. Changed and added rows are copied into a
//! [`WriteBatch`] that goes to the writers over another bounded channel, so a slow destination
//! stalls this thread, which stalls the reader, which stops reading the socket.
//!
//! Every snapshot entry found marks its slot in a bitset (1 bit per entry); the entries left
//! unmarked after a complete read are the removed rows.

mod classify;
mod sort;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rayon::prelude::*;
use tokio::sync::mpsc::{Receiver, Sender};
use tokio::sync::oneshot;

use crate::batch::{cut, BatchBuilder, CutLimits, WriteBatch};
use crate::copy::{Block, RowSpan};
use crate::hash::row_hash;
use crate::key_ranges::{self, RangeSpec};
use crate::sink::Sizer;
use crate::snapshot::{Entry, Reader, SnapshotError};
use crate::spec::Mode;
pub(crate) use classify::Bitset;
use classify::{Class, Classifier};
#[doc(hidden)]
pub use sort::sort_for_bench;
pub(crate) use sort::SortSettings;
use sort::Sorted;

#[derive(Debug, Clone)]
pub(crate) struct DiffConfig {
    pub(crate) mode: Mode,
    pub(crate) rewrite_all: bool,
    /// Count only; build no batches.
    pub(crate) dry_run: bool,
    /// The snapshot's next free slot: the size of the "seen" bitset.
    pub(crate) slots: u32,
    /// Seed for the key hashes of new rows (random per run).
    pub(crate) seed: u64,
    /// How many sample keys of each kind to keep (dry-run plan, error messages).
    pub(crate) samples: usize,
    /// Cut a batch that has waited this long, so sparse changes still flow while reading.
    pub(crate) max_batch_age: Duration,
    /// Note the key range of every added row (a delta read that may look for removed rows
    /// by key ranges).
    pub(crate) ranges: Option<RangeSpec>,
    /// Tally the keys of the snapshot entries met per key range of this spec (a full read
    /// whose removed rows may then be found in the ranges that lost entries, without a scan
    /// of every entry).
    pub(crate) seen_ranges: Option<RangeSpec>,
    /// Sort a large read of scattered keys on disk before looking it up ([`sort`]).
    pub(crate) sort: Option<SortSettings>,
}

/// Rows of each class.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiffCounts {
    pub(crate) added: u64,
    pub(crate) changed: u64,
    pub(crate) unchanged: u64,
    pub(crate) duplicates: u64,
    pub(crate) null_keys: u64,
}

impl DiffCounts {
    /// Every row classified, whatever its class.
    pub(crate) fn rows(&self) -> u64 {
        self.added + self.changed + self.unchanged + self.duplicates + self.null_keys
    }
}

/// What the diff saw.
#[derive(Debug, Default)]
pub(crate) struct DiffOutcome {
    pub(crate) counts: DiffCounts,
    /// Snapshot entries seen (distinct slots marked), and which.
    pub(crate) seen_entries: u64,
    pub(crate) seen: Bitset,
    /// Dry run only: seeded hashes of the keys of added rows, to count duplicates among them
    /// (a real run finds those exactly, when the snapshot records the second copy).
    pub(crate) added_hashes: Vec<u64>,
    /// Keys met twice (the first 1000).
    pub(crate) duplicate_keys: Vec<Vec<u8>>,
    pub(crate) null_key_samples: Vec<Vec<u8>>,
    pub(crate) sample_added: Vec<Vec<u8>>,
    pub(crate) sample_changed: Vec<Vec<u8>>,
    /// With [`DiffConfig::ranges`]: the key of each added row, as an integer (`None` once a
    /// key was not in the ranges' form).
    pub(crate) added_keys: Option<Vec<i64>>,
    /// With [`DiffConfig::seen_ranges`]: the keys of the entries met, tallied per range, in
    /// the order met (`None` once a key was not in the ranges' form).
    pub(crate) seen_counts: Option<key_ranges::Counts>,
    /// The read's rows went through disk, sorted ([`sort`]): in how many runs, of how many bytes.
    pub(crate) sorted: Option<(usize, u64)>,
}

const KEEP_DUPLICATES: usize = 1000;

/// Runs the diff until the block channel closes, or until the writers stop taking batches (they
/// failed or the run was stopped: the run's stop token says which). `read_end` says, once the
/// read has ended, whether it completed: a read sorted on disk ([`sort`]) is looked up only
/// then. Blocking: call it from a dedicated thread.
pub(crate) fn run(
    blocks: Receiver<Block>,
    read_end: oneshot::Receiver<bool>,
    out: Sender<WriteBatch>,
    reader: Arc<Reader>,
    sizer: Arc<Sizer>,
    cfg: DiffConfig,
) -> Result<DiffOutcome, SnapshotError> {
    let max_bytes = sizer.settings().max_bytes;
    let mut d = Diff {
        o: DiffOutcome {
            added_keys: cfg.ranges.as_ref().map(|_| Vec::new()),
            seen_counts: cfg.seen_ranges.as_ref().map(|_| Vec::new()),
            ..DiffOutcome::default()
        },
        classifier: Classifier::new(cfg.slots, cfg.rewrite_all, cfg.seed, !cfg.dry_run),
        builder: BatchBuilder::with_capacity(max_bytes + (256 << 10)),
        write_changed: cfg.mode == Mode::Upsert && !cfg.dry_run,
        cfg,
    };
    let mut batch_started = Instant::now();
    let mut blocks = Sorted::new(blocks, read_end, d.cfg.sort.clone(), reader.len());
    let ended = look_up_stream(
        || blocks.next().map(|b| (b, blocks.queued())),
        &reader,
        |block, looked| {
            Ok::<_, SnapshotError>(d.block(block, looked, &out, &sizer, &mut batch_started))
        },
    )?;
    if let Some(e) = blocks.error.take() {
        return Err(e);
    }
    d.o.sorted = blocks.merged;
    if !ended {
        return Ok(d.o);
    }
    if d.builder.rows() > 0 {
        d.send(&out);
    }
    (d.o.seen, d.o.seen_entries) = d.classifier.into_seen();
    Ok(d.o)
}

/// Blocks whose keys come scattered (random keys such as UUIDs, [`crate::batch::scattered`]) are
/// looked up together, about this many bytes of them at a time: sorted, the keys of many blocks
/// share the snapshot's leaf pages, where one block's keys each land on a page of their own
/// (and every lookup is a page read once the state file outgrows redb's cache). Keys in stream
/// order (a heap in key order) are looked up a block at a time and hold nothing more.
///
/// Measured on a 5M-row uuid table (docs/performance.md, "Random keys"): 32 MiB cut a no-change
/// full read from 18-22 s to 12-14 s and added about 70 MiB to the peak RSS.
const LOOKUP_WINDOW_BYTES: usize = 32 << 20;

/// Gathers blocks of scattered keys so that their keys are looked up together.
struct Window {
    blocks: Vec<Block>,
    bytes: usize,
    /// Gather until the blocks hold this many bytes; 0 gathers nothing (an empty snapshot has
    /// nothing to look up).
    limit: usize,
}

impl Window {
    fn new(limit: usize) -> Window {
        Window {
            blocks: Vec::new(),
            bytes: 0,
            limit,
        }
    }

    /// Takes the next block and returns the blocks to look up now, in stream order: none while
    /// it gathers, all it holds once they reach the limit, or this block alone when its keys
    /// are in order and nothing is gathered. A block that joins the window is copied into a
    /// buffer of its own size: the framer's blocks are slices of larger buffers, and holding
    /// one would pin the whole buffer.
    fn push(&mut self, block: Block) -> Vec<Block> {
        let gather = self.limit > 0
            && (!self.blocks.is_empty()
                || crate::batch::scattered(block.rows.len(), |i| block.rows[i].key(&block.data)));
        if !gather {
            return vec![block];
        }
        self.bytes += block.data.len();
        self.blocks.push(Block {
            data: Bytes::copy_from_slice(&block.data),
            rows: block.rows,
        });
        if self.bytes < self.limit {
            return Vec::new();
        }
        self.finish()
    }

    /// The blocks still held (at the end of the stream).
    fn finish(&mut self) -> Vec<Block> {
        self.bytes = 0;
        std::mem::take(&mut self.blocks)
    }
}

/// The diff's state between rows.
struct Diff {
    o: DiffOutcome,
    classifier: Classifier,
    builder: BatchBuilder,
    /// Upsert mode writes changed rows; insert mode only new keys.
    write_changed: bool,
    cfg: DiffConfig,
}

impl Diff {
    /// Classifies one row, counts it, samples its key, and queues it for writing if it goes.
    #[inline]
    fn row(&mut self, block: &Block, span: &RowSpan, hash: &[u8; 16], found: Option<Entry>) {
        let (o, samples) = (&mut self.o, self.cfg.samples);
        let key = span.key(&block.data);
        let class = self.classifier.classify(key, hash, found);
        if let (Class::Unchanged | Class::Changed { .. }, Some(spec)) =
            (class, &self.cfg.seen_ranges)
        {
            if let Some(counts) = &mut o.seen_counts {
                match spec.value(key) {
                    Some(v) => {
                        let (r, t) = spec.tally_of(v);
                        key_ranges::bump(counts, r, t);
                    }
                    None => o.seen_counts = None,
                }
            }
        }
        match class {
            Class::Unchanged => o.counts.unchanged += 1,
            Class::Changed { slot } => {
                o.counts.changed += 1;
                sample(&mut o.sample_changed, key, samples);
                if self.write_changed {
                    self.builder.push(block, span, *hash, Some(slot));
                }
            }
            Class::Added => {
                o.counts.added += 1;
                sample(&mut o.sample_added, key, samples);
                if let (Some(spec), Some(keys)) = (&self.cfg.ranges, &mut o.added_keys) {
                    match spec.value(key) {
                        Some(v) => keys.push(v),
                        None => o.added_keys = None,
                    }
                }
                if self.cfg.dry_run {
                    o.added_hashes.push(self.classifier.key_hash(key));
                } else {
                    self.builder.push(block, span, *hash, None);
                }
            }
            Class::Duplicate => {
                o.counts.duplicates += 1;
                sample(&mut o.duplicate_keys, key, KEEP_DUPLICATES);
            }
            Class::NullKey => {
                o.counts.null_keys += 1;
                sample(&mut o.null_key_samples, key, samples);
            }
        }
    }

    /// Classifies a block's rows (`looked`: each row's hash and entry), cutting batches as they
    /// fill (and, after the block, one that has waited too long); false when the writers are
    /// gone.
    fn block(
        &mut self,
        block: &Block,
        looked: &[Looked],
        out: &Sender<WriteBatch>,
        sizer: &Sizer,
        batch_started: &mut Instant,
    ) -> bool {
        let mut limits = CutLimits {
            rows: sizer.rows(),
            bytes: sizer.settings().max_bytes,
            age: self.cfg.max_batch_age,
        };
        for (span, (hash, found)) in block.rows.iter().zip(looked) {
            self.row(block, span, hash, *found);
            // Age is only looked at between blocks: a clock read per row costs.
            let (rows, bytes) = (self.builder.rows(), self.builder.bytes());
            if cut(rows, bytes, Duration::ZERO, false, &limits).is_some() {
                if !self.send(out) {
                    return false;
                }
                *batch_started = Instant::now();
                limits.rows = sizer.rows();
            }
        }
        let (rows, bytes) = (self.builder.rows(), self.builder.bytes());
        if cut(rows, bytes, batch_started.elapsed(), true, &limits).is_some() && !self.send(out) {
            return false;
        }
        if self.builder.rows() == 0 {
            *batch_started = Instant::now();
        }
        true
    }

    /// Sends the batch being built; false when the writers are gone.
    fn send(&mut self, out: &Sender<WriteBatch>) -> bool {
        self.classifier.batch_sent();
        out.blocking_send(self.builder.take()).is_ok()
    }
}

/// A row's hash and its snapshot entry, if it has one.
pub(crate) type Looked = ([u8; 16], Option<Entry>);

/// Takes blocks from `next` until it returns `None`, hashes every row and looks its key up in the
/// snapshot (blocks of scattered keys gathered into a [`Window`] first), and hands each block
/// with its rows' [`Looked`] to `each`, in stream order. Returns false when `each` did (and
/// stopped it), true when the stream ended.
///
/// `next` also says whether more blocks wait behind the one it returns. A block with none
/// behind it is hashed and looked up on this thread: the lookups keep up with the read, and
/// handing a block (512 KiB, some 2,000 rows) to rayon and back costs more than it saves
/// (its idle workers spin in `sched_yield`, on cores a source backend needs when both share
/// a machine). Once blocks queue up, or a window of them is gathered, the work goes to rayon.
pub(crate) fn look_up_stream<E: From<SnapshotError>>(
    mut next: impl FnMut() -> Option<(Block, bool)>,
    reader: &Reader,
    mut each: impl FnMut(&Block, &[Looked]) -> Result<bool, E>,
) -> Result<bool, E> {
    let mut looked = Vec::new();
    let mut window = Window::new(if reader.is_empty() {
        0
    } else {
        LOOKUP_WINDOW_BYTES
    });
    loop {
        let (ready, queued, done) = match next() {
            Some((block, queued)) => (window.push(block), queued, false),
            None => (window.finish(), false, true),
        };
        if !ready.is_empty() {
            let parallel = queued || ready.len() > 1;
            lookup_many(&ready, reader, &mut looked, parallel)?;
            let mut looked = &looked[..];
            for block in &ready {
                let (here, rest) = looked.split_at(block.rows.len());
                looked = rest;
                if !each(block, here)? {
                    return Ok(false);
                }
            }
        }
        if done {
            return Ok(true);
        }
    }
}

/// Hashes every row of `blocks` and looks its key up in the snapshot, the keys of all the
/// blocks sorted and looked up together, on rayon when `parallel`, else on this thread;
/// `looked` receives them in stream order.
fn lookup_many(
    blocks: &[Block],
    reader: &Reader,
    looked: &mut Vec<Looked>,
    parallel: bool,
) -> Result<(), SnapshotError> {
    let par_rows = || {
        blocks
            .par_iter()
            .flat_map_iter(|b| b.rows.iter().map(move |r| (r, &b.data[..])))
    };
    let rows = || {
        blocks
            .iter()
            .flat_map(|b| b.rows.iter().map(move |r| (r, &b.data[..])))
    };
    let hash = |(r, data): (&RowSpan, &[u8])| row_hash(r.value(data));
    looked.clear();
    if reader.is_empty() {
        match parallel {
            true => looked.par_extend(par_rows().map(|row| (hash(row), None))),
            false => looked.extend(rows().map(|row| (hash(row), None))),
        }
        return Ok(());
    }
    let keys: Vec<&[u8]> = rows().map(|(r, data)| r.key(data)).collect();
    let mut found = Vec::new();
    let hashes: Vec<[u8; 16]> = match parallel {
        true => {
            let (hashes, res) = rayon::join(
                || par_rows().map(hash).collect(),
                || reader.get_many(&keys, &mut found, true),
            );
            res?;
            hashes
        }
        false => {
            reader.get_many(&keys, &mut found, false)?;
            rows().map(hash).collect()
        }
    };
    looked.extend(hashes.into_iter().zip(found));
    Ok(())
}

fn sample(into: &mut Vec<Vec<u8>>, key: &[u8], keep: usize) {
    if into.len() < keep {
        into.push(key.to_vec());
    }
}

/// Sorts the added-key hashes and returns the values that occur more than once.
pub(crate) fn duplicate_hashes(hashes: &mut [u64]) -> Vec<u64> {
    hashes.par_sort_unstable();
    let mut dups: Vec<u64> = hashes
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    dups.dedup();
    dups
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of one-field tuples whose keys are `keys`, 8 bytes each.
    fn block(keys: impl IntoIterator<Item = u64>) -> Block {
        let mut data = Vec::new();
        let mut rows = Vec::new();
        for k in keys {
            let start = data.len() as u32;
            data.extend_from_slice(&1u16.to_be_bytes());
            data.extend_from_slice(&k.to_be_bytes());
            let end = data.len() as u32;
            rows.push(RowSpan {
                start,
                key_end: end,
                end,
            });
        }
        Block {
            data: Bytes::from(data),
            rows,
        }
    }

    /// 100 keys in no order (a multiplicative hash of `from..from + 100`).
    fn scattered_block(from: u64) -> Block {
        block((from..from + 100).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
    }

    /// Hashes and lookups on this thread answer as they do on rayon, for keys in order, keys
    /// in no order, and several blocks at once; and the hashes are each row's.
    #[test]
    fn lookups_on_this_thread_answer_as_on_rayon() {
        use crate::snapshot::{testing::seeded, Committed, Snapshot};
        let blocks = vec![block(0..1500), scattered_block(7), block(3000..3100)];
        let dir = tempfile::tempdir().unwrap();
        // Every other row of each block has an entry, with a hash of its own.
        let mut c = Committed::default();
        let mut keys: Vec<&[u8]> = blocks
            .iter()
            .flat_map(|b| b.rows.iter().step_by(2).map(|r| r.key(&b.data)))
            .collect();
        keys.sort();
        for (i, k) in keys.iter().enumerate() {
            c.keys.push(k);
            c.entries.push(([i as u8; 16], None));
        }
        let snap = seeded(&dir.path().join("l.redb"), "s", c);
        let reader = snap.reader("s").unwrap();
        let empty = Snapshot::open(&dir.path().join("e.redb"), 1 << 20).unwrap();
        let empty = empty.reader("s").unwrap();
        for reader in [&reader, &empty] {
            for group in [&blocks[..1], &blocks[1..2], &blocks[..]] {
                let (mut serial, mut parallel) = (Vec::new(), Vec::new());
                lookup_many(group, reader, &mut serial, false).unwrap();
                lookup_many(group, reader, &mut parallel, true).unwrap();
                assert_eq!(serial, parallel);
                let rows: Vec<_> = group
                    .iter()
                    .flat_map(|b| b.rows.iter().map(move |r| (b, r)))
                    .collect();
                assert_eq!(serial.len(), rows.len());
                for ((b, r), (hash, found)) in rows.iter().zip(&serial) {
                    assert_eq!(*hash, row_hash(r.value(&b.data)));
                    assert_eq!(*found, reader.get(r.key(&b.data)).unwrap());
                }
            }
        }
        let found = |g: &[Block]| {
            let mut out = Vec::new();
            lookup_many(g, &reader, &mut out, false).unwrap();
            out.iter().filter(|(_, e)| e.is_some()).count()
        };
        assert_eq!(found(&blocks), keys.len());
    }

    fn firsts(blocks: &[Block]) -> Vec<u64> {
        blocks
            .iter()
            .map(|b| u64::from_be_bytes(b.rows[0].key(&b.data).try_into().unwrap()))
            .collect()
    }

    #[test]
    fn window_gathers_scattered_blocks_until_its_limit() {
        let size = scattered_block(0).data.len();
        let mut w = Window::new(3 * size);
        // Keys in order pass straight through while nothing is gathered.
        assert_eq!(firsts(&w.push(block(0..100))), vec![0]);
        assert!(w.push(scattered_block(0)).is_empty());
        // Once a window is open, every block joins it, in stream order.
        assert!(w.push(block(500..600)).is_empty());
        let out = w.push(scattered_block(1000));
        assert_eq!(out.len(), 3);
        assert_eq!(firsts(&out)[1], 500);
        assert_eq!(out[2].rows.len(), 100);
        assert_eq!(out[2].data, scattered_block(1000).data);
        // A full window starts over; the end of the stream takes what is left.
        assert!(w.push(scattered_block(2000)).is_empty());
        assert_eq!(w.finish().len(), 1);
        assert!(w.finish().is_empty());
        assert_eq!(firsts(&w.push(block(7..107))), vec![7]);
    }

    #[test]
    fn window_of_zero_gathers_nothing() {
        let mut w = Window::new(0);
        assert_eq!(w.push(scattered_block(0)).len(), 1);
        assert!(w.finish().is_empty());
    }

    #[test]
    fn finds_duplicate_hashes() {
        let mut v = vec![5, 1, 5, 3, 5, 1, 9];
        assert_eq!(duplicate_hashes(&mut v), vec![1, 5]);
    }
}
