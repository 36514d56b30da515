//! The state file's on-disk format: the one place it is written down.
//!
//! One redb file per state path, format [`FORMAT`]. Tables:
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `pgdelta/meta` | sync name | JSON [`SyncMeta`]: format, key fingerprint, model fingerprint, next slot |
//! | `rows/<sync>` | raw key bytes | 20 bytes: 16-byte row hash, then the entry's `u32` slot (little-endian); the hash is superseded by the sync's hash file when that has one for the slot |
//! | `free/<sync>` | slot (`u32`) | `()`: slots of removed entries, reused before new ones are minted |
//! | `key_ranges/<sync>` | key range (`i64`) | `(u64, u64)`: entries whose key falls in the range, and the sum of their keys' offsets in it, wrapping (one integer key only; see below) |
//! | `pgdelta/runs` | run id (unix µs, bumped on collision) | JSON run record (`pgdelta log`) |
//! | `pgdelta/rejected` | sync name | JSON list of the rows the destination rejected in the sync's last run |
//!
//! Beside the redb file, each sync that has recorded a changed row has a **hash file**,
//! `<state file>.<id>.hashes` ([`super::hashes`]): 16 bytes per slot, the hash of a changed
//! row written in place, so that a changed row costs no B-tree leaf rewrite. An entry's hash is
//! the file's for its slot when that is not all zeros, else the entry's own. `hashes` in the
//! sync's metadata names the file; a sync whose file is missing (or is another's) has its
//! entries rebuilt from the target, as after a crash.
//!
//! Keys are the raw key fields of the binary COPY tuple, 4-byte length prefixes included, so a
//! composite key is unambiguous, and an integer key keeps its big-endian, order-preserving form:
//! lookups in stream order (usually key order) touch redb pages in order.
//!
//! Every entry carries a dense *slot*: a run marks the slot of each entry it meets in a bitset
//! (1 bit per entry), and the entries whose bit stayed clear after a complete read are the
//! removed rows.
//!
//! **Rebuilt entries.** When a sync has no entries and its target has rows, the entries are
//! rebuilt from the target (the rows it holds, hashed as source rows are). `rebuild_pending` in
//! the sync's metadata is set when that starts and cleared by the first run that completes, so
//! a rebuild that broke off is thrown away and started over, never taken for a whole one.
//!
//! **The writing mark.** `writing` in the sync's metadata is set, durably, before a run's first
//! destination write and cleared when the run ends with every write it began recorded (or known
//! not to have committed). A run that finds it set clears the entries and rebuilds them from the
//! target: the last run was killed after writes whose entries, in a non-durable commit, may be
//! lost while the destination kept the rows.
//!
//! **Stale entries.** A row hash of all zeros ([`STALE_HASH`]) marks an entry whose row the
//! destination rejected on its last write: no real row hashes to it, so the next run sees the row
//! as changed and writes it again, while the entry keeps its slot (and with it removed-row
//! detection). A new row that was rejected gets no entry at all.
//!
//! **Key ranges.** For a model with one integer key, the entries are also counted per range of
//! `2^shift` key values (`ranges` in the sync's metadata gives the width and the shift), with
//! the sum of their offsets in the range (`key - first key of the range`), in the same write
//! transaction as every entry added or removed, so the tallies always match the entries of the
//! same read view. A delta read compares them with the source's rows per range to find the rows
//! that left without reading every key ([`crate::key_ranges`]). A file written by a build
//! without them has no `ranges` in its metadata (and any build that writes entries rewrites the
//! metadata), so the tallies are rebuilt rather than trusted; the counts without sums of earlier
//! builds (`ranges/<sync>`, `u64` values) are dropped and rebuilt the same way.
//!
//! Invariants: an entry describes a row the destination committed (written only after the
//! destination acknowledged the commit); the state file is a cache of the destination, so
//! losing it costs a full re-sync, never wrong data.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

/// The on-disk format this build writes: 2 adds the hash file. Format 1 (no hash file) is read
/// as it is and becomes 2 when the sync's metadata is next saved; a build of format 1 clears the
/// entries of a format 2 sync (it would not know to read the hash file) and rebuilds them.
pub(crate) const FORMAT: u32 = 2;

/// The formats this build reads.
pub(crate) fn readable(format: u32) -> bool {
    format == 1 || format == FORMAT
}

pub(super) const META: TableDefinition<&str, &str> = TableDefinition::new("pgdelta/meta");
pub(super) const RUNS: TableDefinition<u64, &str> = TableDefinition::new("pgdelta/runs");
pub(super) const REJECTED: TableDefinition<&str, &str> = TableDefinition::new("pgdelta/rejected");

pub(super) type RowsDef<'a> = TableDefinition<'a, &'static [u8], &'static [u8; 20]>;
pub(super) type FreeDef<'a> = TableDefinition<'a, u32, ()>;
/// The value of one key range: its entries and the wrapping sum of their keys' offsets.
pub(super) type RangeValue = (u64, u64);
pub(super) type RangesDef<'a> = TableDefinition<'a, i64, RangeValue>;

/// The hash of a stale entry (see the module doc).
pub(crate) const STALE_HASH: [u8; 16] = [0; 16];

pub(super) fn rows_name(sync: &str) -> String {
    format!("rows/{sync}")
}
pub(super) fn free_name(sync: &str) -> String {
    format!("free/{sync}")
}
pub(super) fn ranges_name(sync: &str) -> String {
    format!("key_ranges/{sync}")
}
/// The counts without sums that builds before `key_ranges/<sync>` kept (only ever deleted:
/// deleting goes by the name alone).
pub(super) fn old_ranges_name(sync: &str) -> String {
    format!("ranges/{sync}")
}
pub(super) fn ranges_def(name: &str) -> RangesDef<'_> {
    TableDefinition::new(name)
}
pub(super) fn rows_def(name: &str) -> RowsDef<'_> {
    TableDefinition::new(name)
}
pub(super) fn free_def(name: &str) -> FreeDef<'_> {
    TableDefinition::new(name)
}

/// One snapshot entry: the row hash and the entry's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub hash: [u8; 16],
    pub slot: u32,
}

impl Entry {
    pub(super) fn encode(&self) -> [u8; 20] {
        let mut v = [0u8; 20];
        v[..16].copy_from_slice(&self.hash);
        v[16..].copy_from_slice(&self.slot.to_le_bytes());
        v
    }
    pub(super) fn decode(v: &[u8; 20]) -> Entry {
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&v[..16]);
        Entry {
            hash,
            slot: u32::from_le_bytes([v[16], v[17], v[18], v[19]]),
        }
    }
}

/// Per-sync metadata (`pgdelta/meta`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SyncMeta {
    pub format: u32,
    /// Fingerprint of the key columns and their types: a change invalidates every stored key.
    pub key_fp: String,
    /// Fingerprint of the model every stored hash was computed under. Set when the first run
    /// under a key starts; after a model change, updated only once a run under the new model
    /// completed (until then every row is rewritten).
    pub row_fp: Option<String>,
    /// The next never-used slot.
    pub next_slot: u32,
    /// A rebuild of the entries from the target began and no run completed since: the next run
    /// clears the entries and rebuilds them again. (Absent in files written before it existed.)
    #[serde(default)]
    pub rebuild_pending: bool,
    /// A run began writing to the destination and has not yet recorded every write: set
    /// durably before a run's first write, cleared when the run ends with every write it began
    /// recorded (or known not to have committed). Found set when a run begins, the last run was
    /// killed (or its recording failed) after writes that entries lost in the crash may not
    /// show, so the entries are rebuilt from the target. (Absent in files written before it.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub writing: bool,
    /// What the last completed read of a table model leaves for change-aware reads; absent
    /// when the next run must read in full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) basis: Option<crate::delta::Basis>,
    /// The id of the sync's hash file, once it has one ([`super::hashes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) hashes: Option<u64>,
    /// How `ranges/<sync>` counts the entries, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ranges: Option<crate::key_ranges::RangeSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_roundtrip() {
        let e = Entry {
            hash: [7; 16],
            slot: 0xdead_beef,
        };
        assert_eq!(Entry::decode(&e.encode()), e);
    }
}
