//! The diff stage: hash each row, look its key up in the snapshot, classify it, and cut the
//! changes into write batches.
//!
//! Runs on its own thread (never a tokio worker): blocks of framed tuples come in over a bounded
//! channel, each block is hashed and looked up in parallel on rayon (one xxh3-128 call and one
//! redb point get per row, in stream order, which for most tables is key order), and then
//! classified in order on this thread. Changed and added rows are copied into a [`WriteBatch`]
//! that goes to the writers over another bounded channel, so a slow destination stalls this
//! thread, which stalls the reader, which stops reading the socket.
//!
//! Every snapshot entry found marks its slot in a bitset (1 bit per entry); the entries left
//! unmarked after a complete read are the removed rows. A slot marked twice is a duplicate key in
//! the model. A new key met twice in one batch is held back as a duplicate (the statement would
//! fail on it); one met again in a later batch is caught by the snapshot recorder, which finds an
//! entry for a key the diff classified as new.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::mpsc::{Receiver, Sender};

use crate::batch::{BatchBuilder, Sizer, WriteBatch};
use crate::copy::{has_null, Block};
use crate::hash::{key_hash, row_hash};
use crate::model::Mode;
use crate::snapshot::{Entry, Reader, SnapshotError};

/// A set of slots, one bit each.
#[derive(Debug, Default, Clone)]
pub struct Bitset {
    words: Vec<u64>,
}

impl Bitset {
    pub fn with_len(bits: usize) -> Bitset {
        Bitset {
            words: vec![0; bits.div_ceil(64)],
        }
    }
    /// Sets `bit`; false if it was already set.
    #[inline]
    pub fn insert(&mut self, bit: u32) -> bool {
        let (w, b) = ((bit / 64) as usize, bit % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let mask = 1u64 << b;
        let was = self.words[w] & mask != 0;
        self.words[w] |= mask;
        !was
    }
    #[inline]
    pub fn contains(&self, bit: u32) -> bool {
        let w = (bit / 64) as usize;
        w < self.words.len() && self.words[w] & (1u64 << (bit % 64)) != 0
    }
}

#[derive(Debug, Clone)]
pub struct DiffConfig {
    pub mode: Mode,
    pub rewrite_all: bool,
    /// Count only; build no batches.
    pub dry_run: bool,
    /// Seed for the key hashes of new rows (random per run).
    pub seed: u64,
    /// How many sample keys of each kind to keep (dry-run plan, error messages).
    pub samples: usize,
    /// Cut a batch that has waited this long, so sparse changes still flow while reading.
    pub max_batch_age: Duration,
}

/// What the diff saw.
#[derive(Debug, Default)]
pub struct DiffOutcome {
    pub rows: u64,
    pub bytes: u64,
    pub added: u64,
    pub changed: u64,
    pub unchanged: u64,
    /// Rows sent to the writers.
    pub queued: u64,
    /// Snapshot entries seen (distinct slots marked).
    pub seen_entries: u64,
    pub seen: Bitset,
    /// Dry run only: seeded hashes of the keys of added rows, to count duplicates among them
    /// (a real run finds those exactly, when the snapshot records the second copy).
    pub added_hashes: Vec<u64>,
    /// Keys met twice that the snapshot knew (exact).
    pub duplicate_keys: Vec<Vec<u8>>,
    pub duplicates: u64,
    pub null_keys: u64,
    pub null_key_samples: Vec<Vec<u8>>,
    pub sample_added: Vec<Vec<u8>>,
    pub sample_changed: Vec<Vec<u8>>,
    /// The writers stopped taking batches (they failed); the diff stopped early.
    pub writer_gone: bool,
}

/// Runs the diff until the block channel closes. Blocking: call from a dedicated thread.
pub fn run(
    mut blocks: Receiver<Block>,
    out: Sender<WriteBatch>,
    reader: Arc<Reader>,
    slots: u32,
    sizer: Arc<Sizer>,
    cfg: DiffConfig,
) -> Result<DiffOutcome, SnapshotError> {
    let mut o = DiffOutcome {
        seen: Bitset::with_len(slots as usize),
        ..Default::default()
    };
    let max_bytes = sizer.settings().max_bytes;
    let mut builder = BatchBuilder::with_capacity(max_bytes + (256 << 10));
    let mut batch_started = Instant::now();
    let snapshot_empty = reader.is_empty();
    let mut looked: Vec<([u8; 16], Option<Entry>)> = Vec::new();
    // Keys of the new rows in the batch being built: a key twice in one batch would make the
    // whole statement fail (COPY: unique violation; upsert: "cannot affect row a second time").
    let mut batch_keys: HashSet<u64, BuildHasherDefault<IdentityHasher>> = HashSet::default();

    while let Some(block) = blocks.blocking_recv() {
        o.rows += block.rows.len() as u64;
        o.bytes += block.data.len() as u64;
        let data = &block.data[..];
        // Hash and look up in parallel; classification below stays in stream order.
        if snapshot_empty {
            looked.clear();
            looked.par_extend(
                block
                    .rows
                    .par_iter()
                    .map(|r| (row_hash(r.value(data)), None)),
            );
        } else {
            let res: Result<Vec<_>, SnapshotError> = block
                .rows
                .par_iter()
                .map(|r| Ok((row_hash(r.value(data)), reader.get(r.key(data))?)))
                .collect();
            looked = res?;
        }
        for (span, (hash, found)) in block.rows.iter().zip(looked.iter()) {
            let key = span.key(data);
            if has_null(key) {
                o.null_keys += 1;
                if o.null_key_samples.len() < cfg.samples {
                    o.null_key_samples.push(key.to_vec());
                }
                continue;
            }
            match found {
                Some(entry) => {
                    if !o.seen.insert(entry.slot) {
                        o.duplicates += 1;
                        if o.duplicate_keys.len() < 1000 {
                            o.duplicate_keys.push(key.to_vec());
                        }
                        continue;
                    }
                    o.seen_entries += 1;
                    if entry.hash == *hash && !cfg.rewrite_all {
                        o.unchanged += 1;
                    } else {
                        o.changed += 1;
                        if o.sample_changed.len() < cfg.samples {
                            o.sample_changed.push(key.to_vec());
                        }
                        if cfg.mode == Mode::Upsert && !cfg.dry_run {
                            builder.push(&block, span, *hash, Some(entry.slot));
                        }
                    }
                }
                None => {
                    let h = key_hash(key, cfg.seed);
                    if !cfg.dry_run && !batch_keys.insert(h) {
                        o.duplicates += 1;
                        if o.duplicate_keys.len() < 1000 {
                            o.duplicate_keys.push(key.to_vec());
                        }
                        continue;
                    }
                    o.added += 1;
                    if cfg.dry_run {
                        o.added_hashes.push(h);
                    }
                    if o.sample_added.len() < cfg.samples {
                        o.sample_added.push(key.to_vec());
                    }
                    if !cfg.dry_run {
                        builder.push(&block, span, *hash, None);
                    }
                }
            }
            if builder.rows() >= sizer.rows() || builder.bytes() >= max_bytes {
                batch_keys.clear();
                if !send(&out, &mut builder, &mut o) {
                    return Ok(o);
                }
                batch_started = Instant::now();
            }
        }
        if builder.rows() > 0 && batch_started.elapsed() >= cfg.max_batch_age {
            batch_keys.clear();
            if !send(&out, &mut builder, &mut o) {
                return Ok(o);
            }
            batch_started = Instant::now();
        } else if builder.rows() == 0 {
            batch_started = Instant::now();
        }
    }
    if builder.rows() > 0 {
        send(&out, &mut builder, &mut o);
    }
    Ok(o)
}

fn send(out: &Sender<WriteBatch>, builder: &mut BatchBuilder, o: &mut DiffOutcome) -> bool {
    let batch = builder.take();
    o.queued += batch.len() as u64;
    if out.blocking_send(batch).is_err() {
        o.writer_gone = true;
        return false;
    }
    true
}

/// A hasher for keys that are already xxh3 hashes.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | *b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Sorts the added-key hashes and returns the values that occur more than once.
pub fn duplicate_hashes(hashes: &mut [u64]) -> Vec<u64> {
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
    fn bitset_marks_once() {
        let mut b = Bitset::with_len(10);
        assert!(b.insert(3));
        assert!(!b.insert(3));
        assert!(b.insert(200)); // grows
        assert!(b.contains(200));
        assert!(!b.contains(4));
    }

    #[test]
    fn finds_duplicate_hashes() {
        let mut v = vec![5, 1, 5, 3, 5, 1, 9];
        assert_eq!(duplicate_hashes(&mut v), vec![1, 5]);
    }
}
