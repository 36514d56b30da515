//! The snapshot: a redb file recording what the destination holds, per sync.
//!
//! Layout (format [`FORMAT`]):
//! - `pgdelta/meta`: sync name -> JSON [`SyncMeta`] (format, model fingerprints, next free slot).
//! - `rows/<sync>`: key bytes -> 20 bytes: the 16-byte row hash, then the entry's `u32` slot (LE).
//!   Keys are the raw key fields from the binary COPY stream (length prefixes included), so an
//!   integer key keeps its big-endian, order-preserving form and lookups in stream order touch
//!   redb pages in order.
//! - `free/<sync>`: slots released by deleted entries, reused before new ones are minted.
//! - `pgdelta/runs`: run id (unix microseconds) -> JSON summary of a finished run (`pgdelta log`).
//!
//! Slots give every entry a small dense number, so a run marks the entries it saw in a bitset of
//! one bit per entry; removed rows are the entries whose bit stayed clear. That keeps removed-row
//! detection at 1 bit per row instead of a copy of the key set.
//!
//! Invariant: an entry is written only after the destination committed the row it describes
//! (the [`Recorder`] is fed by the writer after each commit). A crash can only lose entries, which
//! costs a harmless re-write next run; it can never record a row the destination lacks. Only one
//! process may open the file: redb holds an exclusive lock, reported as [`SnapshotError::Locked`].

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{
    Database, DatabaseError, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableError,
};
use serde::{Deserialize, Serialize};

use crate::batch::{KeyBatch, WriteBatch};

/// redb's page cache: lookups in key order need little; it counts toward peak memory.
pub const DEFAULT_CACHE_BYTES: usize = 32 << 20;

/// The on-disk format this build reads and writes.
pub const FORMAT: u32 = 1;

const META: TableDefinition<&str, &str> = TableDefinition::new("pgdelta/meta");
const RUNS: TableDefinition<u64, &str> = TableDefinition::new("pgdelta/runs");
const REJECTED: TableDefinition<&str, &str> = TableDefinition::new("pgdelta/rejected");

type RowsDef<'a> = TableDefinition<'a, &'static [u8], &'static [u8; 20]>;
type FreeDef<'a> = TableDefinition<'a, u32, ()>;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the state file {path} is in use by another pgdelta run; wait for it to finish (only one run may use a state file at a time)")]
    Locked { path: String },
    #[error("cannot open the state file {path}: {message}; if it is damaged, move it aside: the next run re-syncs every row (no data is lost)")]
    Open { path: String, message: String },
    #[error("state file {path}: {message}")]
    Storage { path: String, message: String },
}

/// One snapshot entry: the row hash and the entry's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub hash: [u8; 16],
    pub slot: u32,
}

impl Entry {
    fn encode(&self) -> [u8; 20] {
        let mut v = [0u8; 20];
        v[..16].copy_from_slice(&self.hash);
        v[16..].copy_from_slice(&self.slot.to_le_bytes());
        v
    }
    fn decode(v: &[u8; 20]) -> Entry {
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&v[..16]);
        Entry {
            hash,
            slot: u32::from_le_bytes([v[16], v[17], v[18], v[19]]),
        }
    }
}

/// Per-sync metadata.
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
}

/// What [`Snapshot::begin`] decided for this run.
#[derive(Debug)]
pub struct Begin {
    pub meta: SyncMeta,
    /// Every row found in the snapshot is treated as changed (model changed, or `--full-resync`).
    pub rewrite_all: bool,
    /// Human-readable reasons, printed before the run.
    pub notes: Vec<String>,
}

#[derive(Clone)]
pub struct Snapshot {
    db: Arc<Database>,
    path: String,
}

impl Snapshot {
    /// Opens (or creates) the state file. `cache_bytes` bounds redb's page cache.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Snapshot, SnapshotError> {
        let shown = path.display().to_string();
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() && !parent.exists() {
                std::fs::create_dir_all(parent).map_err(|e| SnapshotError::Open {
                    path: shown.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => SnapshotError::Locked {
                    path: shown.clone(),
                },
                other => SnapshotError::Open {
                    path: shown.clone(),
                    message: other.to_string(),
                },
            })?;
        Ok(Snapshot {
            db: Arc::new(db),
            path: shown,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Storage {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Reads the sync's metadata and decides how this run treats the stored entries:
    /// a new key definition clears them, a new model (or `full_resync`) rewrites every row.
    pub fn begin(
        &self,
        sync: &str,
        key_fp: &str,
        row_fp: &str,
        full_resync: bool,
    ) -> Result<Begin, SnapshotError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut notes = Vec::new();
        let meta = {
            let mut table = txn.open_table(META).map_err(|e| self.err(e))?;
            let old: Option<SyncMeta> = match table.get(sync).map_err(|e| self.err(e))? {
                Some(v) => Some(serde_json::from_str(v.value()).map_err(|e| self.err(e))?),
                None => None,
            };
            let mut meta = match old {
                Some(m) if m.format == FORMAT && m.key_fp == key_fp => m,
                old => {
                    if let Some(m) = &old {
                        notes.push(if m.format != FORMAT {
                            format!("state file format {} is not {FORMAT}: starting this sync's snapshot afresh (full re-sync)", m.format)
                        } else {
                            "the key columns or their types changed: the snapshot is cleared and every row is re-synced; rows that left the model earlier cannot be matched any more, so they are not deleted".into()
                        });
                    }
                    let _ = txn.delete_table(rows_def(&rows_name(sync)));
                    let _ = txn.delete_table(free_def(&free_name(sync)));
                    SyncMeta {
                        format: FORMAT,
                        key_fp: key_fp.into(),
                        row_fp: None,
                        next_slot: 0,
                    }
                }
            };
            if meta.row_fp.is_none() {
                // No entries exist yet under this key: whatever this run records is written
                // under the current model, so an interrupted first run resumes instead of
                // rewriting everything.
                meta.row_fp = Some(row_fp.to_string());
            }
            let json = serde_json::to_string(&meta).map_err(|e| self.err(e))?;
            table.insert(sync, json.as_str()).map_err(|e| self.err(e))?;
            meta
        };
        txn.commit().map_err(|e| self.err(e))?;
        let rewrite_all = if full_resync {
            notes.push("--full-resync: every row is rewritten".into());
            true
        } else {
            match &meta.row_fp {
                Some(fp) if fp == row_fp => false,
                _ => {
                    notes.push("the model changed (query, columns, types or mapping): full re-sync, every row is rewritten".into());
                    true
                }
            }
        };
        Ok(Begin {
            meta,
            rewrite_all,
            notes,
        })
    }

    /// A consistent read view of the sync's entries as of now.
    pub fn reader(&self, sync: &str) -> Result<Reader, SnapshotError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let name = rows_name(sync);
        let table = open_optional(&txn, rows_def(&name), &self.path)?;
        let len = match &table {
            Some(t) => t.len().map_err(|e| self.err(e))?,
            None => 0,
        };
        Ok(Reader {
            table,
            len,
            path: self.path.clone(),
        })
    }

    /// Starts the thread that records committed writes.
    pub fn recorder(&self, sync: &str, meta: SyncMeta) -> Result<Recorder, SnapshotError> {
        let free = {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            let name = free_name(sync);
            let mut v = Vec::new();
            if let Some(t) = open_optional(&txn, free_def(&name), &self.path)? {
                for item in t.iter().map_err(|e| self.err(e))? {
                    let (k, _) = item.map_err(|e| self.err(e))?;
                    v.push(k.value());
                }
            }
            v
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let duplicates = Duplicates::default();
        let state = RecorderState {
            duplicates: duplicates.clone(),
            db: self.db.clone(),
            path: self.path.clone(),
            sync: sync.to_string(),
            meta,
            free,
            stats: RecorderStats::default(),
        };
        let handle = std::thread::Builder::new()
            .name("pgdelta-snapshot".into())
            .spawn(move || state.run(rx))
            .map_err(|e| self.err(e))?;
        Ok(Recorder {
            tx: Some(tx),
            handle: Some(handle),
            duplicates,
        })
    }

    /// Appends a run record (`pgdelta log`).
    pub fn log_run(&self, json: &str) -> Result<u64, SnapshotError> {
        let id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = txn.open_table(RUNS).map_err(|e| self.err(e))?;
            let mut id = id;
            while t.get(id).map_err(|e| self.err(e))?.is_some() {
                id += 1;
            }
            t.insert(id, json).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(id)
    }

    /// Replaces the sync's list of rows the destination rejected in the last run (JSON).
    pub fn set_rejected(&self, sync: &str, json: &str) -> Result<(), SnapshotError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = txn.open_table(REJECTED).map_err(|e| self.err(e))?;
            t.insert(sync, json).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Every sync's rejected rows of its last run, as JSON arrays.
    pub fn rejected(&self) -> Result<Vec<(String, String)>, SnapshotError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let Some(t) = open_optional(&txn, REJECTED, &self.path)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.push((k.value().to_string(), v.value().to_string()));
        }
        Ok(out)
    }

    /// The newest `limit` run records, oldest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<(u64, String)>, SnapshotError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let Some(t) = open_optional(&txn, RUNS, &self.path)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))?.rev().take(limit) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.push((k.value(), v.value().to_string()));
        }
        out.reverse();
        Ok(out)
    }

    /// The metadata of every sync in the file.
    pub fn syncs(&self) -> Result<Vec<(String, SyncMeta, u64)>, SnapshotError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let Some(t) = open_optional(&txn, META, &self.path)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let meta: SyncMeta = serde_json::from_str(v.value()).map_err(|e| self.err(e))?;
            let name = k.value().to_string();
            let len = self.reader(&name)?.len();
            out.push((name, meta, len));
        }
        Ok(out)
    }
}

/// Opens `def` in a read transaction; `None` while no run has created the table yet.
fn open_optional<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
    path: &str,
) -> Result<Option<ReadOnlyTable<K, V>>, SnapshotError> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(SnapshotError::Storage {
            path: path.to_string(),
            message: e.to_string(),
        }),
    }
}

fn rows_name(sync: &str) -> String {
    format!("rows/{sync}")
}
fn free_name(sync: &str) -> String {
    format!("free/{sync}")
}
fn rows_def(name: &str) -> RowsDef<'_> {
    TableDefinition::new(name)
}
fn free_def(name: &str) -> FreeDef<'_> {
    TableDefinition::new(name)
}

/// A read-only view of one sync's entries, shareable across threads.
pub struct Reader {
    table: Option<ReadOnlyTable<&'static [u8], &'static [u8; 20]>>,
    len: u64,
    path: String,
}

impl Reader {
    /// Number of entries in this view.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn get(&self, key: &[u8]) -> Result<Option<Entry>, SnapshotError> {
        let Some(t) = &self.table else {
            return Ok(None);
        };
        match t.get(key) {
            Ok(Some(v)) => Ok(Some(Entry::decode(v.value()))),
            Ok(None) => Ok(None),
            Err(e) => Err(SnapshotError::Storage {
                path: self.path.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// Calls `f` for every entry in key order; stops early when `f` returns false.
    pub fn scan(&self, mut f: impl FnMut(&[u8], Entry) -> bool) -> Result<(), SnapshotError> {
        let Some(t) = &self.table else {
            return Ok(());
        };
        let err = |e: redb::StorageError| SnapshotError::Storage {
            path: self.path.clone(),
            message: e.to_string(),
        };
        for item in t.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            if !f(k.value(), Entry::decode(v.value())) {
                break;
            }
        }
        Ok(())
    }
}

/// A committed change to record.
pub enum Record {
    /// The destination committed these rows (inserted or updated).
    Upserted(Committed),
    /// The destination no longer holds these keys (deleted), or they must be re-evaluated next
    /// run (duplicate keys): drop their entries and free their slots.
    Removed {
        keys: Arc<KeyBatch>,
        rows: Range<usize>,
    },
    /// Commit everything recorded so far, then answer.
    Flush(tokio::sync::oneshot::Sender<Result<(), SnapshotError>>),
}

/// What the snapshot needs of committed rows: keys, hashes and known slots, without the tuples.
#[derive(Debug, Default)]
pub struct Committed {
    pub keys: KeyBatch,
    pub entries: Vec<([u8; 16], Option<u32>)>,
}

impl Committed {
    pub fn from_batch(batch: &WriteBatch, rows: Range<usize>) -> Committed {
        let mut c = Committed {
            keys: KeyBatch::default(),
            entries: Vec::with_capacity(rows.len()),
        };
        for r in &batch.rows[rows] {
            c.keys.push(r.key(&batch.data));
            c.entries.push((r.hash, r.slot));
        }
        c
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RecorderStats {
    pub upserted: u64,
    pub removed: u64,
    pub commits: u64,
}

/// Handle to the snapshot thread. Dropping it without [`Recorder::finish`] still commits what
/// was recorded (the entries describe committed rows, so keeping them is always right).
pub struct Recorder {
    duplicates: Duplicates,
    tx: Option<tokio::sync::mpsc::Sender<Record>>,
    handle: Option<JoinHandle<Result<(SyncMeta, RecorderStats), SnapshotError>>>,
}

impl Recorder {
    /// Queues a record; waits while the thread is behind (backpressure to the writer).
    pub async fn send(&self, rec: Record) -> Result<(), SnapshotError> {
        let tx = self.tx.as_ref().expect("recorder open");
        tx.send(rec).await.map_err(|_| thread_gone())
    }

    /// Commits everything recorded so far.
    pub async fn flush(&self) -> Result<(), SnapshotError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Record::Flush(tx)).await?;
        rx.await.map_err(|_| thread_gone())?
    }

    /// New keys recorded twice in this run (duplicates in the model): the count and up to 1000
    /// of the keys. Complete once everything was recorded ([`Self::flush`]).
    pub fn duplicates(&self) -> (u64, Vec<Vec<u8>>) {
        self.duplicates.lock().expect("not poisoned").clone()
    }

    /// A sender for the writer tasks. All of them must be dropped before [`Recorder::finish`].
    pub fn sender(&self) -> tokio::sync::mpsc::Sender<Record> {
        self.tx.clone().expect("recorder open")
    }

    /// Commits the rest, stops the thread and, when `row_fp` is given (the run succeeded),
    /// stores the model fingerprint so the next run can trust the stored hashes. Blocking.
    pub fn finish(
        mut self,
        snapshot: &Snapshot,
        sync: &str,
        row_fp: Option<&str>,
    ) -> Result<RecorderStats, SnapshotError> {
        self.tx = None;
        let handle = self.handle.take().expect("finish once");
        let (mut meta, stats) = handle.join().map_err(|_| SnapshotError::Storage {
            path: snapshot.path.clone(),
            message: "the snapshot thread panicked".into(),
        })??;
        if let Some(fp) = row_fp {
            meta.row_fp = Some(fp.to_string());
            let txn = snapshot.db.begin_write().map_err(|e| snapshot.err(e))?;
            {
                let mut t = txn.open_table(META).map_err(|e| snapshot.err(e))?;
                let json = serde_json::to_string(&meta).map_err(|e| snapshot.err(e))?;
                t.insert(sync, json.as_str()).map_err(|e| snapshot.err(e))?;
            }
            txn.commit().map_err(|e| snapshot.err(e))?;
        }
        Ok(stats)
    }
}

fn thread_gone() -> SnapshotError {
    SnapshotError::Storage {
        path: String::new(),
        message: "the snapshot thread stopped unexpectedly".into(),
    }
}

/// Joins the thread, which ends once every sender is gone: drop the writers' senders first.
impl Drop for Recorder {
    fn drop(&mut self) {
        // Close our sender so the thread commits what it has and ends.
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

type Duplicates = Arc<std::sync::Mutex<(u64, Vec<Vec<u8>>)>>;

struct RecorderState {
    duplicates: Duplicates,
    db: Arc<Database>,
    path: String,
    sync: String,
    meta: SyncMeta,
    free: Vec<u32>,
    stats: RecorderStats,
}

/// A transaction ends after this many operations, bounding redb's dirty pages in memory (scattered
/// updates can dirty one 4 KiB page each). Such commits are not fsynced ...
const COMMIT_OPS: usize = 10_000;
/// ... but one is made durable at least this often, on a flush, and at the end.
const DURABLE_EVERY: Duration = Duration::from_secs(2);

impl RecorderState {
    fn err(&self, e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Storage {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn run(
        mut self,
        mut rx: tokio::sync::mpsc::Receiver<Record>,
    ) -> Result<(SyncMeta, RecorderStats), SnapshotError> {
        let rows_n = rows_name(&self.sync);
        let free_n = free_name(&self.sync);
        let mut last_durable = Instant::now();
        let mut undurable = false;
        // Wait for work before opening a transaction, so an idle recorder commits nothing.
        while let Some(first) = rx.blocking_recv() {
            let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
            let mut flushes = Vec::new();
            let mut closed = false;
            {
                let mut rows = txn.open_table(rows_def(&rows_n)).map_err(|e| self.err(e))?;
                let mut free = txn.open_table(free_def(&free_n)).map_err(|e| self.err(e))?;
                let mut ops = 0usize;
                let mut next = Some(first);
                while let Some(rec) = next.take() {
                    if let Record::Flush(reply) = rec {
                        flushes.push(reply);
                        break;
                    }
                    ops += self.apply(&mut rows, &mut free, rec)?;
                    if ops >= COMMIT_OPS {
                        break;
                    }
                    // Take what is already queued; commit when the queue runs dry.
                    match rx.try_recv() {
                        Ok(r) => next = Some(r),
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {}
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => closed = true,
                    }
                }
            }
            let durable = !flushes.is_empty() || closed || last_durable.elapsed() >= DURABLE_EVERY;
            txn.set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            })
            .map_err(|e| self.err(e))?;
            if durable {
                last_durable = Instant::now();
            }
            undurable = !durable;
            {
                let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
                let json = serde_json::to_string(&self.meta).map_err(|e| self.err(e))?;
                meta.insert(self.sync.as_str(), json.as_str())
                    .map_err(|e| self.err(e))?;
            }
            let res = txn.commit().map_err(|e| self.err(e));
            self.stats.commits += 1;
            for f in flushes {
                let _ = f.send(res.as_ref().map(|_| ()).map_err(|e| self.err(e)));
            }
            res?;
        }
        if undurable {
            // Persist the last non-durable commits before the thread ends.
            let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
            txn.set_durability(Durability::Immediate)
                .map_err(|e| self.err(e))?;
            txn.commit().map_err(|e| self.err(e))?;
            self.stats.commits += 1;
        }
        Ok((self.meta, self.stats))
    }

    fn apply(
        &mut self,
        rows: &mut redb::Table<&'static [u8], &'static [u8; 20]>,
        free: &mut redb::Table<u32, ()>,
        rec: Record,
    ) -> Result<usize, SnapshotError> {
        match rec {
            Record::Upserted(c) => {
                let n = c.keys.len();
                for (i, &(hash, slot)) in c.entries.iter().enumerate() {
                    let slot = match slot {
                        Some(s) => s,
                        None => self.alloc_slot(free)?,
                    };
                    let entry = Entry { hash, slot };
                    let old = rows
                        .insert(c.keys.key(i), &entry.encode())
                        .map_err(|e| self.err(e))?;
                    if let Some(old) = old {
                        let old = Entry::decode(old.value());
                        if old.slot != slot {
                            // Keep the slot of the first entry from leaking.
                            self.release_slot(free, old.slot)?;
                        }
                        if c.entries[i].1.is_none() {
                            // The diff saw no entry for this key when the run started, so the
                            // entry we replaced was written earlier in this same run: the key
                            // appears twice in the model.
                            let mut d = self.duplicates.lock().expect("not poisoned");
                            d.0 += 1;
                            if d.1.len() < 1000 {
                                d.1.push(c.keys.key(i).to_vec());
                            }
                        }
                    }
                }
                self.stats.upserted += n as u64;
                Ok(n)
            }
            Record::Removed { keys, rows: range } => {
                let n = range.len();
                for i in range {
                    let old = rows.remove(keys.key(i)).map_err(|e| self.err(e))?;
                    if let Some(old) = old {
                        let slot = Entry::decode(old.value()).slot;
                        self.release_slot(free, slot)?;
                        self.stats.removed += 1;
                    }
                }
                Ok(n)
            }
            Record::Flush(_) => unreachable!("handled by the loop"),
        }
    }

    fn alloc_slot(&mut self, free: &mut redb::Table<u32, ()>) -> Result<u32, SnapshotError> {
        if let Some(s) = self.free.pop() {
            free.remove(s).map_err(|e| self.err(e))?;
            return Ok(s);
        }
        let s = self.meta.next_slot;
        self.meta.next_slot = s.checked_add(1).ok_or_else(|| {
            self.err(
                "more than 4 billion snapshot slots: move the state file aside to start afresh",
            )
        })?;
        Ok(s)
    }

    fn release_slot(
        &mut self,
        free: &mut redb::Table<u32, ()>,
        slot: u32,
    ) -> Result<(), SnapshotError> {
        free.insert(slot, ()).map_err(|e| self.err(e))?;
        self.free.push(slot);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_sync<T: Sync + Send>() {}

    #[test]
    fn reader_is_shareable_across_threads() {
        assert_sync::<Reader>();
    }

    #[test]
    fn entry_roundtrip() {
        let e = Entry {
            hash: [7; 16],
            slot: 0xdead_beef,
        };
        assert_eq!(Entry::decode(&e.encode()), e);
    }

    use crate::batch::KeyBatch;
    use std::collections::{BTreeMap, HashSet};

    #[derive(Debug, Clone)]
    enum Op {
        /// Record a committed write of key k with hash h.
        Write(u8, u8),
        /// Record a committed delete of key k.
        Delete(u8),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..40, any::<u8>()).prop_map(|(k, h)| Op::Write(k, h)),
            (0u8..40).prop_map(Op::Delete),
        ]
    }

    proptest::proptest! {
        /// Random runs of writes and deletes through the recorder agree with a BTreeMap, and
        /// every live entry keeps a slot of its own (removed-row detection depends on it).
        #[test]
        fn recorder_agrees_with_a_btreemap(runs in proptest::collection::vec(proptest::collection::vec(op(), 0..30), 1..6)) {
            let dir = std::env::temp_dir().join(format!("pgdelta-model-{}-{}", std::process::id(), crate::retry::jitter().to_bits()));
            std::fs::create_dir_all(&dir).unwrap();
            let snap = Snapshot::open(&dir.join("m.redb"), 1 << 20).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut model: BTreeMap<Vec<u8>, [u8; 16]> = BTreeMap::new();
            for ops in runs {
                let begin = snap.begin("m", "k", "r", false).unwrap();
                let start = snap.reader("m").unwrap();
                let rec = snap.recorder("m", begin.meta).unwrap();
                // As in a real run: every write is recorded before any delete (removed rows
                // are only derived after the read).
                let mut ops = ops;
                ops.sort_by_key(|o| matches!(o, Op::Delete(_)));
                for o in ops {
                    match o {
                        Op::Write(k, h) => {
                            let key = vec![k];
                            let slot = start.get(&key).unwrap().map(|e| e.slot);
                            // Within a run a key is written once (the diff sees each key once).
                            if slot.is_none() && model.contains_key(&key) {
                                continue;
                            }
                            let mut c = Committed::default();
                            c.keys.push(&key);
                            c.entries.push(([h; 16], slot));
                            rt.block_on(rec.send(Record::Upserted(c))).unwrap();
                            model.insert(key, [h; 16]);
                        }
                        Op::Delete(k) => {
                            let mut keys = KeyBatch::default();
                            keys.push(&[k]);
                            rt.block_on(rec.send(Record::Removed { keys: Arc::new(keys), rows: 0..1 })).unwrap();
                            model.remove(&vec![k]);
                        }
                    }
                }
                rec.finish(&snap, "m", Some("r")).unwrap();
                let now = snap.reader("m").unwrap();
                let mut seen = BTreeMap::new();
                let mut slots = HashSet::new();
                now.scan(|k, e| {
                    seen.insert(k.to_vec(), e.hash);
                    assert!(slots.insert(e.slot), "slot {} used twice", e.slot);
                    true
                }).unwrap();
                proptest::prop_assert_eq!(&seen, &model);
                proptest::prop_assert_eq!(now.len(), model.len() as u64);
            }
            drop(snap);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn second_open_is_locked() {
        let dir = std::env::temp_dir().join(format!("pgdelta-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.redb");
        let _a = Snapshot::open(&path, 1 << 20).unwrap();
        let b = Snapshot::open(&path, 1 << 20);
        assert!(matches!(b, Err(SnapshotError::Locked { .. })));
        drop(_a);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
