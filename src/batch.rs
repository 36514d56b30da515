//! Batches of changes on their way from the diff to the destination.
//!
//! A [`WriteBatch`] holds whole tuples exactly as the source sent them, back to back, so a
//! destination can stream any contiguous run of rows into a binary COPY without re-encoding.
//! Each [`BatchRow`] carries what the snapshot needs once the destination has committed the row.
//! [`cut`] decides when the batch being built goes: on rows, bytes or age, whichever comes first.

use std::ops::Range;
use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;

use crate::copy::{Block, RowSpan};
use crate::pool::BufPool;

/// One row of a [`WriteBatch`].
#[derive(Debug, Clone, Copy)]
pub struct BatchRow {
    pub start: u32,
    pub key_end: u32,
    pub end: u32,
    pub hash: [u8; 16],
    /// The snapshot slot when the key is already known (a changed row); `None` for a new key.
    pub slot: Option<u32>,
}

impl BatchRow {
    pub fn key<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        &data[self.start as usize + 2..self.key_end as usize]
    }
}

/// Tuples to insert or upsert.
#[derive(Debug, Default)]
pub struct WriteBatch {
    pub data: Bytes,
    pub rows: Vec<BatchRow>,
}

impl WriteBatch {
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// The tuples of rows `range`, contiguous in `data`.
    pub fn tuples(&self, range: std::ops::Range<usize>) -> Bytes {
        if range.is_empty() {
            return Bytes::new();
        }
        let s = self.rows[range.start].start as usize;
        let e = self.rows[range.end - 1].end as usize;
        self.data.slice(s..e)
    }
}

/// Collects rows into a [`WriteBatch`].
pub struct BatchBuilder {
    data: Vec<u8>,
    rows: Vec<BatchRow>,
    /// Where batch buffers come from and go back to.
    pool: Arc<BufPool>,
}

/// Batch buffers a builder keeps for reuse: enough for the batches queued to and held by the
/// writers (2 queued, 2 writers, by default) to come back and be used again.
const KEEP_BATCHES: usize = 4;

impl BatchBuilder {
    /// A builder whose buffers are allocated at `capacity` bytes (pages are only touched as
    /// rows arrive), instead of growing by doubling and copying, and reused once the batch made
    /// from one is dropped.
    pub fn with_capacity(capacity: usize) -> BatchBuilder {
        BatchBuilder {
            data: Vec::new(),
            rows: Vec::new(),
            pool: BufPool::new(capacity, KEEP_BATCHES),
        }
    }

    pub fn push(&mut self, block: &Block, span: &RowSpan, hash: [u8; 16], slot: Option<u32>) {
        let tuple = span.tuple(&block.data);
        if self.data.capacity() == 0 {
            self.data = self.pool.take();
        }
        let start = self.data.len() as u32;
        self.data.extend_from_slice(tuple);
        self.rows.push(BatchRow {
            start,
            key_end: start + (span.key_end - span.start),
            end: start + tuple.len() as u32,
            hash,
            slot,
        });
    }
    pub fn rows(&self) -> usize {
        self.rows.len()
    }
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
    pub fn take(&mut self) -> WriteBatch {
        // The next batch's rows start with room for about as many as this one's, instead of
        // doubling from none (which left up to twice a batch's rows allocated).
        let next = self.rows.len() + self.rows.len() / 8;
        WriteBatch {
            data: self.pool.freeze(std::mem::take(&mut self.data)),
            rows: std::mem::replace(&mut self.rows, Vec::with_capacity(next)),
        }
    }
}

/// Keys to delete (or to forget in the snapshot), as raw key bytes back to back.
#[derive(Debug, Default, Clone)]
pub struct KeyBatch {
    pub data: Vec<u8>,
    pub ends: Vec<u32>,
}

impl KeyBatch {
    pub fn push(&mut self, key: &[u8]) {
        self.data.extend_from_slice(key);
        self.ends.push(self.data.len() as u32);
    }
    pub fn len(&self) -> usize {
        self.ends.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
    pub fn key(&self, i: usize) -> &[u8] {
        let s = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.data[s..self.ends[i] as usize]
    }
    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
    }
    /// The indexes of `range`, in key order (stable: equal keys keep their order). A batch's
    /// rows come in the order the source read them, which after scattered updates is not key
    /// order; applied in key order, neighbouring keys share B-tree pages and paths, so redb
    /// reads and copies each page once per batch instead of hopping across the tree.
    pub(crate) fn order(&self, range: Range<usize>) -> Vec<usize> {
        let mut order: Vec<usize> = range.collect();
        if !order.is_sorted_by_key(|&i| self.key(i)) {
            // Stable: equal keys stay in index order. A batch of a split read is a few ascending
            // runs (one per part), which this sort finds and merges in linear time.
            order.sort_by_key(|&i| self.key(i));
        }
        order
    }
}

/// True when `n` keys (`key(i)` the i-th, in stream order) come scattered: ascending runs
/// shorter than 4 keys on average, among at least 64. Random keys such as UUIDs give runs of
/// about 2. A heap in key order gives long runs, and after updates still long ones: an update
/// that stays on its page (HOT) puts the new version at the page's end, one key out of order
/// among neighbours (5.2% of the keys of a 10M-row table after 13 rounds of 1% updates,
/// measured: runs of about 19), and the keys of a page stay close together, so a block's
/// sorted keys still walk the snapshot forward. Lookups and writes of scattered keys each touch
/// a redb page of their own unless they are gathered and sorted first.
pub(crate) fn scattered<'a>(n: usize, key: impl Fn(usize) -> &'a [u8]) -> bool {
    let runs = 1 + (1..n).filter(|&i| key(i) < key(i - 1)).count();
    n >= 64 && runs * 4 > n
}

/// Why a batch was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// It reached the batch size the sizer asks for.
    Rows,
    /// It reached the byte cap (memory bound).
    Bytes,
    /// It waited long enough: sparse changes still flow while the read goes on.
    Age,
}

/// The limits a batch is cut at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CutLimits {
    pub(crate) rows: usize,
    pub(crate) bytes: usize,
    pub(crate) age: Duration,
}

/// Whether a batch of `rows` rows and `bytes` bytes, `age` old, goes now. `at_block_end`: age
/// only counts between source blocks, so a batch is never cut for age in the middle of one.
pub(crate) fn cut(
    rows: usize,
    bytes: usize,
    age: Duration,
    at_block_end: bool,
    limits: &CutLimits,
) -> Option<Cut> {
    if rows == 0 {
        None
    } else if rows >= limits.rows {
        Some(Cut::Rows)
    } else if bytes >= limits.bytes {
        Some(Cut::Bytes)
    } else if at_block_end && age >= limits.age {
        Some(Cut::Age)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys of a heap after updates (each page's updated rows moved to its end) are in order;
    /// random keys are scattered.
    #[test]
    fn updated_heaps_are_in_order_and_random_keys_scattered() {
        let keys = |v: &[u64]| -> Vec<[u8; 8]> { v.iter().map(|k| k.to_be_bytes()).collect() };
        let check = |v: &[[u8; 8]]| scattered(v.len(), |i| &v[i][..]);
        // Pages of 30 rows, a third of each page's rows updated (moved to the page's end).
        let mut heap = Vec::new();
        for page in 0..100u64 {
            let rows: Vec<u64> = (page * 30..page * 30 + 30).collect();
            let (moved, stayed): (Vec<u64>, Vec<u64>) = rows.iter().partition(|&&k| k % 3 == 0);
            heap.extend(stayed);
            heap.extend(moved);
        }
        assert!(!check(&keys(&heap)));
        assert!(!check(&keys(&(0..3000).collect::<Vec<_>>())));
        // A multiplicative hash: keys in no order.
        let random: Vec<u64> = (0..3000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        assert!(check(&keys(&random)));
        // Too few keys to judge.
        assert!(!check(&keys(&random[..63])));
    }

    #[test]
    fn key_batch_indexes() {
        let mut k = KeyBatch::default();
        k.push(b"ab");
        k.push(b"");
        k.push(b"cde");
        assert_eq!(k.key(0), b"ab");
        assert_eq!(k.key(1), b"");
        assert_eq!(k.key(2), b"cde");
    }

    #[test]
    fn batches_cut_on_rows_bytes_or_age() {
        let l = CutLimits {
            rows: 100,
            bytes: 1000,
            age: Duration::from_secs(1),
        };
        let young = Duration::from_millis(10);
        let old = Duration::from_secs(2);
        assert_eq!(cut(0, 5000, old, true, &l), None, "empty batches never go");
        assert_eq!(cut(100, 10, young, false, &l), Some(Cut::Rows));
        assert_eq!(cut(5, 1000, young, false, &l), Some(Cut::Bytes));
        assert_eq!(cut(5, 10, old, false, &l), None, "not mid-block");
        assert_eq!(cut(5, 10, old, true, &l), Some(Cut::Age));
        assert_eq!(cut(5, 10, young, true, &l), None);
    }

    proptest::proptest! {
        /// Whatever the sizes, a batch at or over a limit goes, and one under every limit stays.
        #[test]
        fn cut_respects_every_limit(rows in 0usize..300, bytes in 0usize..3000, age_ms in 0u64..3000, end: bool) {
            let l = CutLimits { rows: 100, bytes: 1000, age: Duration::from_secs(1) };
            let age = Duration::from_millis(age_ms);
            let c = cut(rows, bytes, age, end, &l);
            let over = rows > 0 && (rows >= l.rows || bytes >= l.bytes || (end && age >= l.age));
            proptest::prop_assert_eq!(c.is_some(), over);
        }
    }
}
