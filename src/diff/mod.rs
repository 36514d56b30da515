//! The diff stage: hash each row, look its key up in the snapshot, classify it, and cut the
//! changes into write batches.
//!
//! Runs on its own thread (never a tokio worker): blocks of framed tuples come in over a bounded
//! channel, each block is hashed and looked up in parallel on rayon (one xxh3-128 call per row;
//! the block's keys sorted and looked up by a forward walk of the snapshot, [`Reader::get_many`]),
//! and then classified in order on this thread ([`classify`]). Changed and added rows are copied into a
//! [`WriteBatch`] that goes to the writers over another bounded channel, so a slow destination
//! stalls this thread, which stalls the reader, which stops reading the socket.
//!
//! Every snapshot entry found marks its slot in a bitset (1 bit per entry); the entries left
//! unmarked after a complete read are the removed rows.

mod classify;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::mpsc::{Receiver, Sender};

use crate::batch::{cut, BatchBuilder, CutLimits, WriteBatch};
use crate::copy::{Block, RowSpan};
use crate::hash::row_hash;
use crate::key_ranges::RangeSpec;
use crate::sink::Sizer;
use crate::snapshot::{Entry, Reader, SnapshotError};
use crate::spec::Mode;
pub(crate) use classify::Bitset;
use classify::{Class, Classifier};

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
}

const KEEP_DUPLICATES: usize = 1000;

/// Runs the diff until the block channel closes, or until the writers stop taking batches (they
/// failed or the run was stopped: the run's stop token says which). Blocking: call it from a
/// dedicated thread.
pub(crate) fn run(
    mut blocks: Receiver<Block>,
    out: Sender<WriteBatch>,
    reader: Arc<Reader>,
    sizer: Arc<Sizer>,
    cfg: DiffConfig,
) -> Result<DiffOutcome, SnapshotError> {
    let max_bytes = sizer.settings().max_bytes;
    let mut d = Diff {
        o: DiffOutcome {
            added_keys: cfg.ranges.as_ref().map(|_| Vec::new()),
            ..DiffOutcome::default()
        },
        classifier: Classifier::new(cfg.slots, cfg.rewrite_all, cfg.seed, !cfg.dry_run),
        builder: BatchBuilder::with_capacity(max_bytes + (256 << 10)),
        write_changed: cfg.mode == Mode::Upsert && !cfg.dry_run,
        cfg,
    };
    let mut batch_started = Instant::now();
    let mut looked = Vec::new();
    while let Some(block) = blocks.blocking_recv() {
        lookup(&block, &reader, &mut looked)?;
        let mut limits = CutLimits {
            rows: sizer.rows(),
            bytes: max_bytes,
            age: d.cfg.max_batch_age,
        };
        for (span, (hash, found)) in block.rows.iter().zip(looked.iter()) {
            d.row(&block, span, hash, *found);
            // Age is only looked at between blocks: a clock read per row costs.
            let (rows, bytes) = (d.builder.rows(), d.builder.bytes());
            if cut(rows, bytes, Duration::ZERO, false, &limits).is_some() {
                if !d.send(&out) {
                    return Ok(d.o);
                }
                batch_started = Instant::now();
                limits.rows = sizer.rows();
            }
        }
        let (rows, bytes) = (d.builder.rows(), d.builder.bytes());
        if cut(rows, bytes, batch_started.elapsed(), true, &limits).is_some() && !d.send(&out) {
            return Ok(d.o);
        }
        if d.builder.rows() == 0 {
            batch_started = Instant::now();
        }
    }
    if d.builder.rows() > 0 {
        d.send(&out);
    }
    (d.o.seen, d.o.seen_entries) = d.classifier.into_seen();
    Ok(d.o)
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
        match self.classifier.classify(key, hash, found) {
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

    /// Sends the batch being built; false when the writers are gone.
    fn send(&mut self, out: &Sender<WriteBatch>) -> bool {
        self.classifier.batch_sent();
        out.blocking_send(self.builder.take()).is_ok()
    }
}

/// Hashes every row of `block` and looks its key up in the snapshot, in parallel; `looked`
/// receives (hash, entry) in stream order.
pub(crate) fn lookup(
    block: &Block,
    reader: &Reader,
    looked: &mut Vec<([u8; 16], Option<Entry>)>,
) -> Result<(), SnapshotError> {
    let data = &block.data[..];
    looked.clear();
    if reader.is_empty() {
        looked.par_extend(
            block
                .rows
                .par_iter()
                .map(|r| (row_hash(r.value(data)), None)),
        );
        return Ok(());
    }
    let keys: Vec<&[u8]> = block.rows.iter().map(|r| r.key(data)).collect();
    let mut found = Vec::new();
    let (hashes, res) = rayon::join(
        || -> Vec<[u8; 16]> {
            block
                .rows
                .par_iter()
                .map(|r| row_hash(r.value(data)))
                .collect()
        },
        || reader.get_many(&keys, &mut found),
    );
    res?;
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

    #[test]
    fn finds_duplicate_hashes() {
        let mut v = vec![5, 1, 5, 3, 5, 1, 9];
        assert_eq!(duplicate_hashes(&mut v), vec![1, 5]);
    }
}
