//! The diff stage: hash each row, look its key up in the snapshot, classify it, and cut the
//! changes into write batches.
//!
//! Runs on its own thread (never a tokio worker): blocks of framed tuples come in over a bounded
//! channel, each block is hashed and looked up in parallel on rayon (one xxh3-128 call and one
//! redb point get per row, in stream order, which for most tables is key order), and then
//! classified in order on this thread ([`classify`]). Changed and added rows are copied into a
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
use crate::copy::Block;
use crate::hash::row_hash;
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
    let mut o = DiffOutcome::default();
    let mut classifier = Classifier::new(cfg.slots, cfg.rewrite_all, cfg.seed, !cfg.dry_run);
    let max_bytes = sizer.settings().max_bytes;
    let mut builder = BatchBuilder::with_capacity(max_bytes + (256 << 10));
    let mut batch_started = Instant::now();
    let mut looked = Vec::new();
    let write_changed = cfg.mode == Mode::Upsert && !cfg.dry_run;

    while let Some(block) = blocks.blocking_recv() {
        lookup(&block, &reader, &mut looked)?;
        let data = &block.data[..];
        let mut limits = CutLimits {
            rows: sizer.rows(),
            bytes: max_bytes,
            age: cfg.max_batch_age,
        };
        for (span, (hash, found)) in block.rows.iter().zip(looked.iter()) {
            let key = span.key(data);
            match classifier.classify(key, hash, *found) {
                Class::Unchanged => o.counts.unchanged += 1,
                Class::Changed { slot } => {
                    o.counts.changed += 1;
                    sample(&mut o.sample_changed, key, cfg.samples);
                    if write_changed {
                        builder.push(&block, span, *hash, Some(slot));
                    }
                }
                Class::Added => {
                    o.counts.added += 1;
                    sample(&mut o.sample_added, key, cfg.samples);
                    if cfg.dry_run {
                        o.added_hashes.push(classifier.key_hash(key));
                    } else {
                        builder.push(&block, span, *hash, None);
                    }
                }
                Class::Duplicate => {
                    o.counts.duplicates += 1;
                    sample(&mut o.duplicate_keys, key, KEEP_DUPLICATES);
                }
                Class::NullKey => {
                    o.counts.null_keys += 1;
                    sample(&mut o.null_key_samples, key, cfg.samples);
                }
            }
            // Age is only looked at between blocks: a clock read per row costs.
            if cut(
                builder.rows(),
                builder.bytes(),
                Duration::ZERO,
                false,
                &limits,
            )
            .is_some()
            {
                classifier.batch_sent();
                if out.blocking_send(builder.take()).is_err() {
                    return Ok(o);
                }
                batch_started = Instant::now();
                limits.rows = sizer.rows();
            }
        }
        let age = batch_started.elapsed();
        if cut(builder.rows(), builder.bytes(), age, true, &limits).is_some() {
            classifier.batch_sent();
            if out.blocking_send(builder.take()).is_err() {
                return Ok(o);
            }
        }
        if builder.rows() == 0 {
            batch_started = Instant::now();
        }
    }
    if builder.rows() > 0 {
        let _ = out.blocking_send(builder.take());
    }
    (o.seen, o.seen_entries) = classifier.into_seen();
    Ok(o)
}

/// Hashes every row of `block` and looks its key up in the snapshot, in parallel; `looked`
/// receives (hash, entry) in stream order.
fn lookup(
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
    let res: Result<Vec<_>, SnapshotError> = block
        .rows
        .par_iter()
        .map(|r| Ok((row_hash(r.value(data)), reader.get(r.key(data))?)))
        .collect();
    *looked = res?;
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
