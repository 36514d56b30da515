//! What one row is, given its key, its hash and what the snapshot holds for the key: a pure
//! function of those and of the rows met before it in this run. No I/O.
//!
//! - a key with a NULL field is a model error ([`Class::NullKey`]);
//! - a key the snapshot knows is `Unchanged` (same hash) or `Changed`, and marks its entry's
//!   slot as seen; meeting that slot again is a [`Class::Duplicate`];
//! - a key the snapshot does not know is `Added`, unless the same new key is already in the
//!   batch being built (the statement would fail on it): then it is a `Duplicate` too. A new key
//!   met again in a later batch is caught when the snapshot records it twice.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use crate::copy::has_null;
use crate::hash::key_hash;
use crate::snapshot::Entry;

/// What a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    NullKey,
    Unchanged,
    /// Known key, new content: rewrite, keeping the entry's slot.
    Changed {
        slot: u32,
    },
    /// A key the snapshot has never seen.
    Added,
    /// A key met twice in this read: a model error.
    Duplicate,
}

/// A set of slots, one bit each.
#[derive(Debug, Default, Clone)]
pub(crate) struct Bitset {
    words: Vec<u64>,
}

impl Bitset {
    pub(crate) fn with_len(bits: usize) -> Bitset {
        Bitset {
            words: vec![0; bits.div_ceil(64)],
        }
    }
    /// Sets `bit`; false if it was already set.
    #[inline]
    pub(crate) fn insert(&mut self, bit: u32) -> bool {
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
    pub(crate) fn contains(&self, bit: u32) -> bool {
        let w = (bit / 64) as usize;
        w < self.words.len() && self.words[w] & (1u64 << (bit % 64)) != 0
    }
}

/// Classifies the rows of one read, in stream order.
pub(crate) struct Classifier {
    /// Slots of the snapshot entries met so far.
    seen: Bitset,
    seen_entries: u64,
    /// Seeded hashes of the new keys in the batch being built.
    batch_keys: HashSet<u64, BuildHasherDefault<IdentityHasher>>,
    /// Treat every known row as changed (model changed, `--full-resync`).
    rewrite_all: bool,
    /// Seed of the key hashes (random per run, so a collision never repeats).
    seed: u64,
    /// Hold back a new key met twice in one batch. Off in dry runs, which build no batches
    /// and count duplicates among all new keys at the end instead.
    per_batch: bool,
}

impl Classifier {
    /// `slots`: the snapshot's next free slot, the bitset's size.
    pub(crate) fn new(slots: u32, rewrite_all: bool, seed: u64, per_batch: bool) -> Classifier {
        Classifier {
            seen: Bitset::with_len(slots as usize),
            seen_entries: 0,
            batch_keys: HashSet::default(),
            rewrite_all,
            seed,
            per_batch,
        }
    }

    #[inline]
    pub(crate) fn classify(&mut self, key: &[u8], hash: &[u8; 16], found: Option<Entry>) -> Class {
        if has_null(key) {
            return Class::NullKey;
        }
        match found {
            Some(entry) => {
                if !self.seen.insert(entry.slot) {
                    return Class::Duplicate;
                }
                self.seen_entries += 1;
                if entry.hash == *hash && !self.rewrite_all {
                    Class::Unchanged
                } else {
                    Class::Changed { slot: entry.slot }
                }
            }
            None if self.per_batch && !self.batch_keys.insert(key_hash(key, self.seed)) => {
                Class::Duplicate
            }
            None => Class::Added,
        }
    }

    /// The batch being built was sent: its new keys no longer collide with later ones here.
    pub(crate) fn batch_sent(&mut self) {
        self.batch_keys.clear();
    }

    /// The seeded hash of a key (dry runs count duplicate new keys with it).
    pub(crate) fn key_hash(&self, key: &[u8]) -> u64 {
        key_hash(key, self.seed)
    }

    /// The slots met, and how many.
    pub(crate) fn into_seen(self) -> (Bitset, u64) {
        (self.seen, self.seen_entries)
    }
}

/// A hasher for keys that are already xxh3 hashes.
#[derive(Default)]
pub(crate) struct IdentityHasher(u64);

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn bitset_marks_once() {
        let mut b = Bitset::with_len(10);
        assert!(b.insert(3));
        assert!(!b.insert(3));
        assert!(b.insert(200)); // grows
        assert!(b.contains(200));
        assert!(!b.contains(4));
    }

    fn key(k: u8) -> Vec<u8> {
        let mut v = 1i32.to_be_bytes().to_vec();
        v.push(k);
        v
    }

    #[test]
    fn classes() {
        let e = |hash: u8, slot| {
            Some(Entry {
                hash: [hash; 16],
                slot,
            })
        };
        let mut c = Classifier::new(4, false, 7, true);
        assert_eq!(c.classify(&key(1), &[1; 16], e(1, 0)), Class::Unchanged);
        assert_eq!(
            c.classify(&key(2), &[9; 16], e(2, 1)),
            Class::Changed { slot: 1 }
        );
        assert_eq!(c.classify(&key(1), &[1; 16], e(1, 0)), Class::Duplicate);
        assert_eq!(c.classify(&key(5), &[5; 16], None), Class::Added);
        assert_eq!(c.classify(&key(5), &[5; 16], None), Class::Duplicate);
        c.batch_sent();
        assert_eq!(c.classify(&key(5), &[5; 16], None), Class::Added);
        assert_eq!(
            c.classify(&(-1i32).to_be_bytes(), &[0; 16], None),
            Class::NullKey
        );
        let (seen, n) = c.into_seen();
        assert_eq!(n, 2);
        assert!(seen.contains(0) && seen.contains(1) && !seen.contains(2));
        let mut all = Classifier::new(1, true, 7, true);
        assert_eq!(
            all.classify(&key(1), &[1; 16], e(1, 0)),
            Class::Changed { slot: 0 }
        );
    }

    proptest::proptest! {
        /// Random reads against a random snapshot, batches cut at random: the classifier agrees
        /// with a plain model that keeps sets of keys instead of bits and hashes.
        #[test]
        fn agrees_with_a_model(
            snapshot in proptest::collection::btree_map(0u8..50, 0u8..4, 0..40),
            rows in proptest::collection::vec((0u8..60, 0u8..4, proptest::bool::weighted(0.1)), 0..120),
            rewrite_all: bool,
        ) {
            let entries: BTreeMap<u8, Entry> = snapshot
                .iter()
                .enumerate()
                .map(|(slot, (&k, &h))| (k, Entry { hash: [h; 16], slot: slot as u32 }))
                .collect();
            let mut c = Classifier::new(entries.len() as u32, rewrite_all, 42, true);
            let mut seen_known = BTreeSet::new();
            let mut batch_new = BTreeSet::new();
            for (k, h, cut) in rows {
                if cut {
                    c.batch_sent();
                    batch_new.clear();
                }
                let found = entries.get(&k).copied();
                let expect = match found {
                    Some(_) if !seen_known.insert(k) => Class::Duplicate,
                    Some(e) if e.hash == [h; 16] && !rewrite_all => Class::Unchanged,
                    Some(e) => Class::Changed { slot: e.slot },
                    None if !batch_new.insert(k) => Class::Duplicate,
                    None => Class::Added,
                };
                proptest::prop_assert_eq!(c.classify(&key(k), &[h; 16], found), expect);
            }
            let (seen, n) = c.into_seen();
            proptest::prop_assert_eq!(n, seen_known.len() as u64);
            for (k, e) in &entries {
                proptest::prop_assert_eq!(seen.contains(e.slot), seen_known.contains(k));
            }
        }
    }
}
