//! The snapshot: a redb file recording what the destination holds, per sync.
//!
//! - [`format`]: the on-disk format (tables, entries, stale entries, invariants), in one place.
//! - [`owner`]: the snapshot thread, the only writer of the file, driven by typed commands.
//! - this module: [`Snapshot`], the handle (reads happen here, in read transactions on any
//!   thread; every write is a command to the thread), and [`Recorder`], one run's handle for
//!   recording what the destination committed.
//!
//! Only one process may open a state file: redb holds an exclusive lock, reported as
//! [`SnapshotError::Locked`].

mod format;
mod hashes;
mod owner;
pub(crate) mod spill;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use redb::{
    Database, DatabaseError, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableError,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::batch::{KeyBatch, WriteBatch};
use crate::key_ranges::{self, RangeSpec};
pub(crate) use format::STALE_HASH;
use format::{ranges_def, ranges_name, rows_def, rows_name, META, REJECTED, RUNS};
pub use format::{Entry, SyncMeta};
use owner::{Command, Owner};

/// redb's page cache: lookups in key order need little; it counts toward peak memory.
pub const DEFAULT_CACHE_BYTES: usize = 32 << 20;

/// Commands queued for the snapshot thread; a full queue makes writers wait (backpressure).
const COMMAND_QUEUE: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the state file {path} is in use by another pgdelta run; wait for it to finish (only one run may use a state file at a time)")]
    Locked { path: String },
    #[error("cannot open the state file {path}: {message}; if it is damaged, move it aside: the next run rebuilds it from the target (no data is lost)")]
    Open { path: String, message: String },
    #[error("state file {path}: {message}")]
    Storage { path: String, message: String },
}

/// What the start of a run decided.
#[derive(Debug)]
pub(crate) struct Begin {
    /// The basis of change-aware reads the last completed read left, if any.
    pub(crate) basis: Option<crate::delta::Basis>,
    /// Slots below this may be in use: the size of the run's "seen" bitset.
    pub(crate) next_slot: u32,
    /// Every row found in the snapshot is treated as changed (model changed, or `--full-resync`).
    pub(crate) rewrite_all: bool,
    /// Rebuild the (now empty) entries from the target before the read.
    pub(crate) rebuild: bool,
    /// A dry run whose real run would clear the entries or rebuild them from the target: the
    /// dry run cannot use the file's entries (and writes nothing), so it runs against a
    /// [`Snapshot::scratch`] file instead.
    pub(crate) scratch: bool,
    /// Human-readable reasons, printed before the run.
    pub(crate) notes: Vec<String>,
}

/// How a run treats the stored entries.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BeginOptions {
    /// Treat every stored row as changed (`--full-resync`).
    pub(crate) full_resync: bool,
    /// Clear the entries (`--rebuild-state`): the run rebuilds them from the target.
    pub(crate) clear: bool,
    /// The target holds rows: with no entries (or a rebuild that never completed), the entries
    /// are rebuilt from it.
    pub(crate) target_has_rows: bool,
    /// Count the entries per key range, cut like this unless the recorded counts still fit
    /// (see [`crate::key_ranges`]); `None`: no counts.
    pub(crate) ranges: Option<crate::key_ranges::RangeSpec>,
    /// A dry run: decide as a run would, write nothing (see [`Begin::scratch`]).
    pub(crate) dry_run: bool,
}

/// What settling a run found: new keys the run recorded twice (duplicates in the model).
/// Their entries, and those of the duplicates the diff found, are gone from the snapshot.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    pub(crate) duplicates: u64,
    /// The first of those keys, for the report.
    pub(crate) duplicate_keys: Vec<Vec<u8>>,
}

/// What a run's recorder did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RecorderStats {
    pub(crate) upserted: u64,
    pub(crate) removed: u64,
    pub(crate) commits: u64,
    /// Commits of the state file fsynced from the run's start to its finish (any sync's).
    pub(crate) durable: u64,
    /// Stages of scattered records that waited on disk, sorted, before being merged in.
    pub(crate) spilled: u64,
}

/// What the snapshot needs of committed rows: keys, hashes and known slots, without the tuples.
#[derive(Debug, Default)]
pub struct Committed {
    pub(crate) keys: KeyBatch,
    pub(crate) entries: Vec<([u8; 16], Option<u32>)>,
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

struct Inner {
    db: Arc<Database>,
    path: String,
    file: std::path::PathBuf,
    cache_bytes: usize,
    /// A [`Scratch`] file: dry runs may write it.
    scratch: bool,
    tx: Option<mpsc::Sender<Command>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    /// Closes the command queue and waits for the thread to make its last commits durable.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = h.join();
        }
    }
}

/// The directory a state file is in.
fn dir_of(file: &Path) -> &Path {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// How the names of a state file's scratch directories begin: `.<file name>.scratch-`.
fn scratch_prefix(file: &Path) -> String {
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    format!(".{name}.scratch-")
}

/// Removes the scratch directories of the state file `file` that a killed run left behind. Only
/// a process holding the state file's lock makes them, and the caller holds it now, so any
/// found is stale (a dropped [`Scratch`] removes its own).
fn remove_stale_scratch(file: &Path) {
    let prefix = scratch_prefix(file);
    let Ok(entries) = std::fs::read_dir(dir_of(file)) else {
        return;
    };
    for e in entries.flatten() {
        let stale = e.file_name().to_string_lossy().starts_with(&prefix)
            && e.file_type().is_ok_and(|t| t.is_dir());
        if !stale {
            continue;
        }
        let dir = e.path();
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(
                "removed {}, the scratch state file of a pgdelta run that was killed",
                dir.display()
            ),
            Err(err) => tracing::warn!(
                "cannot remove {}, the scratch state file of a pgdelta run that was killed: {err}; remove it by hand",
                dir.display()
            ),
        }
    }
}

/// A throwaway state file ([`Snapshot::scratch`]): the directory goes when this is dropped.
pub(crate) struct Scratch {
    pub(crate) snapshot: Snapshot,
    _dir: tempfile::TempDir,
}

/// A state file opened by [`Snapshot::open_existing`]: the file, or an empty stand-in for it.
pub struct Opened {
    snapshot: Snapshot,
    /// The stand-in's directory, when no state file existed (dropped after the snapshot).
    stand_in: Option<tempfile::TempDir>,
}

impl Opened {
    /// True when no state file existed and an empty one stands in for it.
    pub fn is_stand_in(&self) -> bool {
        self.stand_in.is_some()
    }
}

impl From<Snapshot> for Opened {
    fn from(snapshot: Snapshot) -> Opened {
        Opened {
            snapshot,
            stand_in: None,
        }
    }
}

impl std::ops::Deref for Opened {
    type Target = Snapshot;
    fn deref(&self) -> &Snapshot {
        &self.snapshot
    }
}

/// An open state file. Clones share the file and its snapshot thread.
#[derive(Clone)]
pub struct Snapshot {
    inner: Arc<Inner>,
}

impl Snapshot {
    /// Opens (or creates) the state file and starts its snapshot thread. `cache_bytes` bounds
    /// redb's page cache.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Snapshot, SnapshotError> {
        Snapshot::open_with(path, cache_bytes, None, false)
    }

    /// [`Snapshot::open`] with a smaller staging limit for scattered records than a run's
    /// 16 MiB, for benchmarks and tests: a stage of `stage_bytes` over N entries does what
    /// 16 MiB does over proportionally more, in less time.
    #[doc(hidden)]
    pub fn open_with_stage(
        path: &Path,
        cache_bytes: usize,
        stage_bytes: usize,
    ) -> Result<Snapshot, SnapshotError> {
        Snapshot::open_with(path, cache_bytes, Some(stage_bytes), false)
    }

    /// [`Snapshot::open`], with the snapshot thread's staging limit (tests make it small), and
    /// whether the file is a [`Scratch`] one.
    fn open_with(
        path: &Path,
        cache_bytes: usize,
        stage_limit: Option<usize>,
        scratch: bool,
    ) -> Result<Snapshot, SnapshotError> {
        let shown = path.display().to_string();
        let open_err = |message: String| SnapshotError::Open {
            path: shown.clone(),
            message,
        };
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() && !parent.exists() {
                std::fs::create_dir_all(parent).map_err(|e| open_err(e.to_string()))?;
            }
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| open_failed(&shown, e))?;
        remove_stale_scratch(path);
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let mut owner = Owner::new(db.clone(), shown.clone(), path.to_path_buf());
        if let Some(limit) = stage_limit {
            owner.stage_limit = limit;
        }
        let thread = std::thread::Builder::new()
            .name("pgdelta-snapshot".into())
            .spawn(move || owner.run(rx))
            .map_err(|e| open_err(e.to_string()))?;
        let snapshot = Snapshot {
            inner: Arc::new(Inner {
                db,
                path: shown,
                file: path.to_path_buf(),
                cache_bytes,
                scratch,
                tx: Some(tx),
                thread: Mutex::new(Some(thread)),
            }),
        };
        snapshot.remove_orphan_hashes();
        Ok(snapshot)
    }

    /// Removes the hash files of this state file that no sync names (a run killed after it
    /// made one and before it saved the sync's metadata leaves one behind). Only the process
    /// holding the state file's lock makes or uses them, and this one holds it; its snapshot
    /// thread has no command yet.
    fn remove_orphan_hashes(&self) {
        let mut named = Vec::new();
        // A sync whose metadata cannot be read may name a file: nothing is removed then.
        let read = self.scan_table(META, |_, v| {
            let m: SyncMeta = serde_json::from_str(v).map_err(|e| self.err(e))?;
            named.extend(m.hashes);
            Ok(())
        });
        let file = &self.inner.file;
        let (Ok(()), Ok(entries)) = (read, std::fs::read_dir(dir_of(file))) else {
            return;
        };
        for e in entries.flatten() {
            let id = hashes::id_in(file, &e.file_name().to_string_lossy());
            if let Some(id) = id.filter(|id| !named.contains(id)) {
                hashes::remove(file, id);
            }
        }
    }

    /// Opens the state file at `path` for a command that must leave no file behind where none
    /// was (a dry run, `check`, `log`, `verify` without `--repair`). When no file is there, an
    /// empty state file in a new directory under the system's temporary directory stands in for
    /// it (and a dry run's rebuild from the target goes beside it), removed when the [`Opened`]
    /// is dropped. Not beside `path`: scratch directories there belong to the process holding
    /// that file's lock, and this one does not hold it.
    pub fn open_existing(path: &Path, cache_bytes: usize) -> Result<Opened, SnapshotError> {
        if path.exists() {
            return Snapshot::open(path, cache_bytes).map(Opened::from);
        }
        let open_err = |message: String| SnapshotError::Open {
            path: path.display().to_string(),
            message: format!("no file there, and no empty one can stand in for it: {message}"),
        };
        let dir = tempfile::Builder::new()
            .prefix("pgdelta-no-state-")
            .tempdir()
            .map_err(|e| open_err(e.to_string()))?;
        let snapshot = Snapshot::open(&dir.path().join("state.redb"), cache_bytes)
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Opened {
            snapshot,
            stand_in: Some(dir),
        })
    }

    /// The directory the state file is in (where temporary files of its runs go).
    pub(crate) fn dir(&self) -> PathBuf {
        dir_of(&self.inner.file).to_path_buf()
    }

    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// True for a [`Scratch`] file, which dry runs may write (their rebuilds go there).
    pub(crate) fn is_scratch(&self) -> bool {
        self.inner.scratch
    }

    /// A new, empty state file in a directory of its own beside this one (the same file system,
    /// which has room for what this one holds), removed when the [`Scratch`] is dropped: where
    /// a dry run rebuilds entries it may not write here (and `verify` rebuilds the target's).
    pub(crate) fn scratch(&self) -> Result<Scratch, SnapshotError> {
        let file = &self.inner.file;
        let prefix = scratch_prefix(file);
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir_in(dir_of(file))
            .map_err(|e| SnapshotError::Open {
                path: dir_of(file)
                    .join(format!("{prefix}*"))
                    .display()
                    .to_string(),
                message: e.to_string(),
            })?;
        let file = dir.path().join("state.redb");
        let snapshot = Snapshot::open_with(&file, self.inner.cache_bytes, None, true)?;
        Ok(Scratch {
            snapshot,
            _dir: dir,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Storage {
            path: self.inner.path.clone(),
            message: e.to_string(),
        }
    }

    /// Sends a command and waits for its reply.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SnapshotError>>) -> Command,
    ) -> Result<T, SnapshotError> {
        ask(&self.inner, make).await
    }

    /// Starts a run of `sync`: checks the stored fingerprints against the model's (a new key
    /// definition clears the entries; a new model, or `full_resync`, rewrites every row) and
    /// returns the run's [`Recorder`].
    pub(crate) async fn begin(
        &self,
        sync: &str,
        key_fp: &str,
        row_fp: &str,
        how: BeginOptions,
    ) -> Result<(Begin, Recorder), SnapshotError> {
        let sync: Arc<str> = Arc::from(sync);
        let failed = Arc::new(OnceLock::new());
        let gate = Arc::new(Gate::default());
        let begin = self
            .ask(|reply| Command::Begin {
                sync: sync.clone(),
                key_fp: key_fp.into(),
                row_fp: row_fp.into(),
                how,
                failed: failed.clone(),
                gate: gate.clone(),
                reply,
            })
            .await?;
        let recorder = Recorder {
            inner: self.inner.clone(),
            sync,
            failed,
            gate,
        };
        Ok((begin, recorder))
    }

    /// Appends a run record (`pgdelta log`); returns its id.
    pub(crate) async fn log_run<T: Serialize>(&self, record: &T) -> Result<u64, SnapshotError> {
        let json = serde_json::to_string(record).map_err(|e| self.err(e))?;
        self.ask(|reply| Command::LogRun { json, reply }).await
    }

    /// Replaces the sync's list of rows the destination rejected in its last run.
    pub(crate) async fn set_rejections<T: Serialize>(
        &self,
        sync: &str,
        rows: &[T],
    ) -> Result<(), SnapshotError> {
        let json = serde_json::to_string(rows).map_err(|e| self.err(e))?;
        let sync = sync.to_string();
        self.ask(|reply| Command::SetRejections { sync, json, reply })
            .await
    }

    /// A consistent read view of the sync's entries as of now.
    pub fn reader(&self, sync: &str) -> Result<Reader, SnapshotError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.err(e))?;
        let name = rows_name(sync);
        let table = open_optional(&txn, rows_def(&name), &self.inner.path)?;
        let len = match &table {
            Some(t) => t.len().map_err(|e| self.err(e))?,
            None => 0,
        };
        let meta = match open_optional(&txn, META, &self.inner.path)? {
            Some(meta) => match meta.get(sync).map_err(|e| self.err(e))? {
                Some(v) => {
                    Some(serde_json::from_str::<SyncMeta>(v.value()).map_err(|e| self.err(e))?)
                }
                None => None,
            },
            None => None,
        };
        let (spec, hash_file) = meta.map_or((None, None), |m| (m.ranges, m.hashes));
        let hashes = match hash_file.filter(|_| table.is_some()) {
            Some(id) => {
                let path = hashes::path_for(&self.inner.file, id);
                Some(hashes::HashView::open(&path, id).map_err(|e| {
                    self.err(format!(
                        "sync '{sync}': its row hashes file {} cannot be read ({e}); the next run of the sync rebuilds the snapshot's entries from the target",
                        path.display()
                    ))
                })?)
            }
            None => None,
        };
        let ranges = match spec {
            Some(spec) => open_optional(&txn, ranges_def(&ranges_name(sync)), &self.inner.path)?
                .map(|t| (spec, t)),
            None => None,
        };
        Ok(Reader {
            table,
            hashes,
            ranges,
            len,
            path: self.inner.path.clone(),
        })
    }

    /// Every sync's rejected rows of its last run.
    pub fn rejections<T: DeserializeOwned>(&self) -> Result<Vec<(String, Vec<T>)>, SnapshotError> {
        let mut out = Vec::new();
        self.scan_table(REJECTED, |k, v| {
            let rows = serde_json::from_str(v).map_err(|e| self.err(e))?;
            out.push((k.to_string(), rows));
            Ok(())
        })?;
        Ok(out)
    }

    /// The newest `limit` run records, oldest first. Records this build cannot read (written
    /// by another version) are skipped.
    pub fn runs<T: DeserializeOwned>(&self, limit: usize) -> Result<Vec<(u64, T)>, SnapshotError> {
        let mut out = Vec::new();
        if limit > 0 {
            self.runs_back(|id, record| {
                out.push((id, record));
                out.len() < limit
            })?;
        }
        out.reverse();
        Ok(out)
    }

    /// Walks the run log newest first, calling `f(run id, record)` until it returns false.
    /// Records this build cannot read are skipped.
    pub fn runs_back<T: DeserializeOwned>(
        &self,
        mut f: impl FnMut(u64, T) -> bool,
    ) -> Result<(), SnapshotError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.err(e))?;
        let Some(t) = open_optional(&txn, RUNS, &self.inner.path)? else {
            return Ok(());
        };
        for item in t.iter().map_err(|e| self.err(e))?.rev() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if let Ok(record) = serde_json::from_str(v.value()) {
                if !f(k.value(), record) {
                    break;
                }
            }
        }
        Ok(())
    }

    /// The metadata and entry count of every sync in the file.
    pub fn syncs(&self) -> Result<Vec<(String, SyncMeta, u64)>, SnapshotError> {
        let mut metas = Vec::new();
        self.scan_table(META, |k, v| {
            let meta: SyncMeta = serde_json::from_str(v).map_err(|e| self.err(e))?;
            metas.push((k.to_string(), meta));
            Ok(())
        })?;
        metas
            .into_iter()
            .map(|(name, meta)| {
                let len = self.reader(&name)?.len();
                Ok((name, meta, len))
            })
            .collect()
    }

    /// Calls `f` for every row of a `name -> JSON` table.
    fn scan_table(
        &self,
        def: TableDefinition<&str, &str>,
        mut f: impl FnMut(&str, &str) -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.err(e))?;
        let Some(t) = open_optional(&txn, def, &self.inner.path)? else {
            return Ok(());
        };
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            f(k.value(), v.value())?;
        }
        Ok(())
    }
}

async fn send(inner: &Inner, cmd: Command) -> Result<(), SnapshotError> {
    let tx = inner.tx.as_ref().ok_or_else(|| thread_gone(&inner.path))?;
    tx.send(cmd).await.map_err(|_| thread_gone(&inner.path))
}

/// Sends a command and waits for its reply.
async fn ask<T>(
    inner: &Inner,
    make: impl FnOnce(oneshot::Sender<Result<T, SnapshotError>>) -> Command,
) -> Result<T, SnapshotError> {
    let (reply, rx) = oneshot::channel();
    send(inner, make(reply)).await?;
    rx.await.map_err(|_| thread_gone(&inner.path))?
}

fn thread_gone(path: &str) -> SnapshotError {
    SnapshotError::Storage {
        path: path.to_string(),
        message: "the snapshot thread stopped unexpectedly".into(),
    }
}

/// One run's handle for recording what the destination committed. Cheap to clone (one per
/// writer). Every record waits while the snapshot thread is behind: backpressure to the writers.
#[derive(Clone)]
pub(crate) struct Recorder {
    inner: Arc<Inner>,
    sync: Arc<str>,
    /// Set by the snapshot thread when recording this run failed.
    failed: Arc<OnceLock<String>>,
    gate: Arc<Gate>,
}

/// A run's destination writes that are not yet accounted for, shared by its recorders and the
/// snapshot thread. A write is accounted for once what it committed is recorded (or it is known
/// not to have committed). The run's end closes the gate: no write begins after it, and the
/// sync's [`SyncMeta::writing`] mark is cleared only if every write that began was accounted for.
#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    /// The sync was marked as writing (durably), before the run's first write.
    marked: tokio::sync::OnceCell<()>,
}

#[derive(Default)]
struct GateState {
    /// The run ended: no write may begin.
    closed: bool,
    /// Writes begun and not yet accounted for.
    open: u64,
}

impl Gate {
    /// Closes the gate; true when every write that began was accounted for.
    fn close(&self) -> bool {
        let mut s = self.state.lock().expect("not poisoned");
        s.closed = true;
        s.open == 0
    }
}

/// A destination write under way: [`PendingWrite::accounted`] once its outcome is recorded or
/// it is known not to have committed. Dropped without that, it stays unaccounted for, and the
/// next run rebuilds the sync's entries from the target.
#[must_use]
pub(crate) struct PendingWrite {
    gate: Arc<Gate>,
}

impl PendingWrite {
    pub(crate) fn accounted(self) {
        self.gate.state.lock().expect("not poisoned").open -= 1;
    }
}

impl Recorder {
    /// Refuses to go on once recording this run failed.
    fn check(&self) -> Result<(), SnapshotError> {
        match self.failed.get() {
            Some(m) => Err(SnapshotError::Storage {
                path: self.inner.path.clone(),
                message: m.clone(),
            }),
            None => Ok(()),
        }
    }

    async fn send(&self, cmd: Command) -> Result<(), SnapshotError> {
        self.check()?;
        send(&self.inner, cmd).await
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SnapshotError>>) -> Command,
    ) -> Result<T, SnapshotError> {
        self.check()?;
        ask(&self.inner, make).await
    }

    /// A destination write is about to begin. Before the run's first, the sync is marked durably
    /// as writing ([`SyncMeta::writing`]): a crash from then on, before the run ends with every
    /// write recorded, makes the next run rebuild the entries from the target, since entries
    /// recorded after the last durable commit are lost in a crash while the destination kept
    /// the rows (a row the source then deletes, or changes back, would otherwise stay wrong).
    pub(crate) async fn begin_write(&self) -> Result<PendingWrite, SnapshotError> {
        self.gate
            .marked
            .get_or_try_init(|| async {
                let sync = self.sync.clone();
                self.ask(|reply| Command::Writing { sync, reply }).await
            })
            .await?;
        let mut s = self.gate.state.lock().expect("not poisoned");
        if s.closed {
            return Err(SnapshotError::Storage {
                path: self.inner.path.clone(),
                message: format!(
                    "the run of sync '{}' has ended: no write may begin",
                    self.sync
                ),
            });
        }
        s.open += 1;
        Ok(PendingWrite {
            gate: self.gate.clone(),
        })
    }

    /// Ends a run that will not finish (it failed or was stopped) after every writer stopped:
    /// when every write that began is accounted for, the sync's writing mark is cleared, so the
    /// next run trusts the entries; otherwise it stays, and the next run rebuilds them. A run
    /// already finished is left as it is. Sent even when recording failed: the snapshot thread
    /// then keeps the mark.
    pub(crate) async fn close(&self) -> Result<(), SnapshotError> {
        let (sync, gate) = (self.sync.clone(), self.gate.clone());
        ask(&self.inner, |reply| Command::Close { sync, gate, reply }).await
    }

    /// The destination committed these rows.
    pub(crate) async fn record(&self, rows: Committed) -> Result<(), SnapshotError> {
        let sync = self.sync.clone();
        self.send(Command::Record { sync, rows }).await
    }

    /// The destination deleted keys `rows` of `keys`.
    pub(crate) async fn remove(
        &self,
        keys: Arc<KeyBatch>,
        rows: Range<usize>,
    ) -> Result<(), SnapshotError> {
        let sync = self.sync.clone();
        self.send(Command::Remove { sync, keys, rows }).await
    }

    /// The destination rejected the changed row with this key and slot: rewrite it next run.
    pub(crate) async fn mark_stale(&self, key: &[u8], slot: u32) -> Result<(), SnapshotError> {
        let (sync, key) = (self.sync.clone(), key.to_vec());
        self.send(Command::MarkStale { sync, key, slot }).await
    }

    /// Every record of the run was sent: forgets duplicate keys (`forget`, found by the diff, and
    /// new keys recorded twice, found by the snapshot thread). The commit is not fsynced: the
    /// run's log record, or the thread's end, makes it durable.
    pub(crate) async fn settle(&self, forget: Vec<Vec<u8>>) -> Result<Settled, SnapshotError> {
        let sync = self.sync.clone();
        self.ask(|reply| Command::Settle {
            sync,
            forget,
            reply,
        })
        .await
    }

    /// Ends the run. With `row_fp` (the run completed), the stored hashes are trusted to have
    /// been computed under that model from now on.
    /// `basis` replaces the recorded one when the run completed (`row_fp` given).
    pub(crate) async fn finish(
        self,
        row_fp: Option<String>,
        basis: Option<crate::delta::Basis>,
    ) -> Result<RecorderStats, SnapshotError> {
        let sync = self.sync.clone();
        self.ask(|reply| Command::Finish {
            sync,
            row_fp,
            basis,
            reply,
        })
        .await
    }

    /// Forgets the recorded basis of change-aware reads (a full read begins).
    pub(crate) async fn drop_basis(&self) -> Result<(), SnapshotError> {
        let sync = self.sync.clone();
        self.ask(|reply| Command::DropBasis { sync, reply }).await
    }
}

/// Records every row of `batch` as committed, `per_record` rows at a time (as the writers hand
/// over committed ranges), in a run of `sync` that then finishes trusted: the state after a
/// first sync, for benchmarks of the recording and lookup paths.
pub async fn seed_for_bench(
    snapshot: &Snapshot,
    sync: &str,
    batch: &WriteBatch,
    per_record: usize,
) -> Result<(), SnapshotError> {
    let (_, rec) = snapshot
        .begin(sync, "bench", "bench", BeginOptions::default())
        .await?;
    let mut at = 0;
    while at < batch.len() {
        let end = (at + per_record.max(1)).min(batch.len());
        rec.record(Committed::from_batch(batch, at..end)).await?;
        at = end;
    }
    rec.finish(Some("bench".into()), None).await?;
    Ok(())
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

type Rows<'a> = redb::Range<'a, &'static [u8], &'static [u8; 20]>;
type Row<'a> = (
    redb::AccessGuard<'a, &'static [u8]>,
    redb::AccessGuard<'a, &'static [u8; 20]>,
);

fn rows(r: &Reader) -> Result<Option<Rows<'_>>, redb::StorageError> {
    r.table.as_ref().map(|t| t.iter()).transpose()
}

fn step<'a>(it: &mut Option<Rows<'a>>) -> Result<Option<Row<'a>>, redb::StorageError> {
    it.as_mut().and_then(|r| r.next()).transpose()
}

/// A forward walk of a [`Reader`]'s entries against keys that come in ascending order.
pub(crate) struct Walk<'a> {
    reader: &'a Reader,
    hashes: hashes::HashCursor<'a>,
    rows: Option<Rows<'a>>,
    /// The entry the walk is at.
    at: Option<Row<'a>>,
    /// A key matched the entry the walk is at.
    matched: bool,
}

impl Walk<'_> {
    /// Looks up `keys` (ascending, and not below the keys of earlier calls): `out` gets one
    /// answer per key, and `unmatched` each entry the walk passes that no key matched.
    pub(crate) fn find(
        &mut self,
        keys: &[&[u8]],
        out: &mut Vec<Option<Entry>>,
        mut unmatched: impl FnMut(&[u8]),
    ) -> Result<(), SnapshotError> {
        out.clear();
        for &key in keys {
            let found = loop {
                let Some((k, v)) = &self.at else { break None };
                match k.value().cmp(key) {
                    std::cmp::Ordering::Less => {
                        if !self.matched {
                            unmatched(k.value());
                        }
                        self.next()?;
                    }
                    std::cmp::Ordering::Equal => {
                        self.matched = true;
                        break Some(self.reader.entry(v.value(), &mut self.hashes)?);
                    }
                    std::cmp::Ordering::Greater => break None,
                }
            };
            out.push(found);
        }
        Ok(())
    }

    /// Calls `unmatched` for the entries after the last key.
    pub(crate) fn rest(mut self, mut unmatched: impl FnMut(&[u8])) -> Result<(), SnapshotError> {
        while let Some((k, _)) = &self.at {
            if !self.matched {
                unmatched(k.value());
            }
            self.next()?;
        }
        Ok(())
    }

    fn next(&mut self) -> Result<(), SnapshotError> {
        self.at = step(&mut self.rows).map_err(|e| self.reader.err(e))?;
        self.matched = false;
        Ok(())
    }
}

/// A read-only view of one sync's entries, shareable across threads.
pub struct Reader {
    table: Option<ReadOnlyTable<&'static [u8], &'static [u8; 20]>>,
    /// The sync's hash file, whose hashes supersede the entries' own ([`hashes`]).
    hashes: Option<hashes::HashView>,
    /// The entries per key range, and how the ranges are cut.
    ranges: Option<(RangeSpec, ReadOnlyTable<i64, format::RangeValue>)>,
    len: u64,
    path: String,
}

impl Reader {
    fn err(&self, e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Storage {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// The entry a stored value describes: its slot, and its hash (the hash file's, read
    /// through `hashes`, when that has one for the slot).
    #[inline]
    fn entry(
        &self,
        v: &[u8; 20],
        hashes: &mut hashes::HashCursor<'_>,
    ) -> Result<Entry, SnapshotError> {
        let mut e = Entry::decode(v);
        if let Some(h) = hashes.get(e.slot).map_err(|e| self.hash_err(e))? {
            e.hash = h;
        }
        Ok(e)
    }

    /// A cursor over this view's hash file, for a walk over many entries.
    fn hash_cursor(&self) -> hashes::HashCursor<'_> {
        hashes::HashCursor::over(self.hashes.as_ref())
    }

    fn hash_err(&self, e: std::io::Error) -> SnapshotError {
        self.err(format!(
            "its row hashes file cannot be read ({e}); the next run of the sync rebuilds the snapshot's entries from the target"
        ))
    }

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
            // A new cursor reads its first slot alone: one read of 16 bytes.
            Ok(Some(v)) => Ok(Some(self.entry(v.value(), &mut self.hash_cursor())?)),
            Ok(None) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Looks up `keys` in any order: sorted, then walked forward ([`Reader::get_sorted`]): in
    /// two halves on rayon when `parallel`, else in one walk. `out[i]` answers `keys[i]`.
    pub(crate) fn get_many(
        &self,
        keys: &[&[u8]],
        out: &mut Vec<Option<Entry>>,
        parallel: bool,
    ) -> Result<(), SnapshotError> {
        out.clear();
        if self.table.is_none() {
            out.resize(keys.len(), None);
            return Ok(());
        }
        // Stable sort: quick on the runs a heap in key order gives.
        let mut order: Vec<u32> = (0..keys.len() as u32).collect();
        order.sort_by_key(|&i| keys[i as usize]);
        let sorted: Vec<&[u8]> = order.iter().map(|&i| keys[i as usize]).collect();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        if parallel {
            let (a, b) = sorted.split_at(sorted.len() / 2);
            let (ra, rb) =
                rayon::join(|| self.get_sorted(a, &mut x), || self.get_sorted(b, &mut y));
            ra?;
            rb?;
        } else {
            self.get_sorted(&sorted, &mut x)?;
        }
        out.resize(keys.len(), None);
        for (&i, e) in order.iter().zip(x.into_iter().chain(y)) {
            out[i as usize] = e;
        }
        Ok(())
    }

    /// Looks up `keys`, given in ascending byte order, with one forward walk of the table: a
    /// key near the previous one costs a step along the leaf, not a descent from the root and
    /// a page read per key (what 10M point lookups spend their time on). A key far ahead of the
    /// walk seeks. `out` gets one answer per key, in the same order.
    pub(crate) fn get_sorted(
        &self,
        keys: &[&[u8]],
        out: &mut Vec<Option<Entry>>,
    ) -> Result<(), SnapshotError> {
        /// Steps along the table before a seek is cheaper: many while keys come densely (a
        /// full read, a key read), few once a key needed a seek (a sparse delta).
        const DENSE_STEPS: u32 = 32;
        const SPARSE_STEPS: u32 = 2;
        out.clear();
        out.reserve(keys.len());
        let (Some(t), Some(first)) = (&self.table, keys.first()) else {
            out.resize(keys.len(), None);
            return Ok(());
        };
        let err = |e: redb::StorageError| self.err(e);
        let mut walk = t.range::<&[u8]>(*first..).map_err(err)?;
        let mut at = walk.next().transpose().map_err(err)?;
        let mut budget = DENSE_STEPS;
        let mut hashes = self.hash_cursor();
        for &key in keys {
            let mut steps = 0;
            let found = loop {
                let Some((k, v)) = &at else { break None };
                match k.value().cmp(key) {
                    std::cmp::Ordering::Less => {
                        steps += 1;
                        if steps > budget {
                            walk = t.range::<&[u8]>(key..).map_err(err)?;
                            budget = SPARSE_STEPS;
                            steps = 0;
                        }
                        at = walk.next().transpose().map_err(err)?;
                    }
                    std::cmp::Ordering::Equal => break Some(self.entry(v.value(), &mut hashes)?),
                    std::cmp::Ordering::Greater => break None,
                }
            };
            if steps > 0 && steps <= SPARSE_STEPS {
                budget = DENSE_STEPS;
            }
            out.push(found);
        }
        Ok(())
    }

    /// A walk of every entry in key order, to meet a stream of keys in ascending order
    /// ([`Walk::find`]) and name the entries none of them matched.
    pub(crate) fn walk(&self) -> Result<Walk<'_>, SnapshotError> {
        let mut rows = rows(self).map_err(|e| self.err(e))?;
        let at = step(&mut rows).map_err(|e| self.err(e))?;
        Ok(Walk {
            reader: self,
            hashes: self.hash_cursor(),
            rows,
            at,
            matched: false,
        })
    }

    /// Walks this view and `other` together in key order (both are sorted by key bytes), calling
    /// `f(key, entry here, entry there)` once per key found in either; stops early when `f`
    /// returns false. Two sequential scans, no point lookups.
    pub(crate) fn merge_with(
        &self,
        other: &Reader,
        mut f: impl FnMut(&[u8], Option<Entry>, Option<Entry>) -> bool,
    ) -> Result<(), SnapshotError> {
        let err = |e: redb::StorageError| self.err(e);
        let (mut a, mut b) = (rows(self).map_err(err)?, rows(other).map_err(err)?);
        let (mut x, mut y) = (step(&mut a).map_err(err)?, step(&mut b).map_err(err)?);
        let (mut ha, mut hb) = (self.hash_cursor(), other.hash_cursor());
        loop {
            let order = match (&x, &y) {
                (None, None) => break,
                (Some((ka, _)), Some((kb, _))) => ka.value().cmp(kb.value()),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
            };
            let here = match (&x, order) {
                (Some((k, v)), std::cmp::Ordering::Less | std::cmp::Ordering::Equal) => {
                    Some((k.value(), self.entry(v.value(), &mut ha)?))
                }
                _ => None,
            };
            let there = match (&y, order) {
                (Some((k, v)), std::cmp::Ordering::Greater | std::cmp::Ordering::Equal) => {
                    Some((k.value(), other.entry(v.value(), &mut hb)?))
                }
                _ => None,
            };
            let key = here
                .or(there)
                .map(|(k, _)| k)
                .expect("one side has an entry");
            if !f(key, here.map(|(_, e)| e), there.map(|(_, e)| e)) {
                break;
            }
            if order != std::cmp::Ordering::Greater {
                x = step(&mut a).map_err(err)?;
            }
            if order != std::cmp::Ordering::Less {
                y = step(&mut b).map_err(err)?;
            }
        }
        Ok(())
    }

    /// How the entries are counted per key range, if they are.
    pub(crate) fn range_spec(&self) -> Option<RangeSpec> {
        self.ranges.as_ref().map(|r| r.0)
    }

    /// The entries per key range in this view (how many, and their offsets' sum), sorted by
    /// range.
    pub(crate) fn range_counts(&self) -> Result<Option<key_ranges::Counts>, SnapshotError> {
        let Some((_, t)) = &self.ranges else {
            return Ok(None);
        };
        let err = |e: redb::StorageError| self.err(e);
        let mut out = Vec::with_capacity(t.len().map_err(err)? as usize);
        for item in t.iter().map_err(err)? {
            let (r, v) = item.map_err(err)?;
            let (n, sum) = v.value();
            out.push((r.value(), key_ranges::Tally { n, sum }));
        }
        Ok(Some(out))
    }

    /// Calls `f` for every entry with a key in `lo..=hi` (byte order), in key order.
    pub(crate) fn scan_range(
        &self,
        lo: &[u8],
        hi: &[u8],
        mut f: impl FnMut(&[u8], Entry),
    ) -> Result<(), SnapshotError> {
        let Some(t) = &self.table else {
            return Ok(());
        };
        let err = |e: redb::StorageError| self.err(e);
        let mut hashes = self.hash_cursor();
        for item in t.range::<&[u8]>(lo..=hi).map_err(err)? {
            let (k, v) = item.map_err(err)?;
            f(k.value(), self.entry(v.value(), &mut hashes)?);
        }
        Ok(())
    }

    /// Calls `f` with every entry's key and slot, in key order; stops early when `f` returns
    /// false. Reads no hash (the hash file stays untouched).
    pub(crate) fn scan_slots(
        &self,
        mut f: impl FnMut(&[u8], u32) -> bool,
    ) -> Result<(), SnapshotError> {
        self.scan_stored(|k, v| f(k, Entry::decode(v).slot))
    }

    /// Calls `f` for every entry in key order; stops early when `f` returns false.
    pub fn scan(&self, mut f: impl FnMut(&[u8], Entry) -> bool) -> Result<(), SnapshotError> {
        let mut hashes = self.hash_cursor();
        let mut failed = None;
        self.scan_stored(|k, v| match self.entry(v, &mut hashes) {
            Ok(e) => f(k, e),
            Err(e) => {
                failed = Some(e);
                false
            }
        })?;
        failed.map_or(Ok(()), Err)
    }

    /// Calls `f` with every entry's key and stored value, in key order, until it returns false.
    fn scan_stored(
        &self,
        mut f: impl FnMut(&[u8], &[u8; 20]) -> bool,
    ) -> Result<(), SnapshotError> {
        let Some(t) = &self.table else {
            return Ok(());
        };
        let err = |e: redb::StorageError| self.err(e);
        for item in t.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            if !f(k.value(), v.value()) {
                break;
            }
        }
        Ok(())
    }
}

/// Why redb could not open the state file `path`: [`SnapshotError::Locked`] when another
/// process holds it.
fn open_failed(path: &str, e: DatabaseError) -> SnapshotError {
    match e {
        DatabaseError::DatabaseAlreadyOpen => SnapshotError::Locked { path: path.into() },
        other => SnapshotError::Open {
            path: path.into(),
            message: other.to_string(),
        },
    }
}

/// redb's page cache while [`compact`] runs (redb's default is 1 GiB).
const COMPACT_CACHE_BYTES: usize = 64 << 20;

/// What [`compact`] did to a state file.
#[derive(Debug, Clone, Serialize)]
pub struct Compacted {
    pub path: String,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub duration_s: f64,
}

/// Compacts the state file at `path` in place (redb's `Database::compact`): its live pages move
/// to the front of the file and the free space behind them is cut off. A run frees pages as it
/// rewrites the B-tree, and redb keeps the file at its largest size; a load of random keys
/// (UUIDs) leaves a file several times larger than its entries. Needs the file to itself:
/// [`SnapshotError::Locked`] while a run holds it. Each step is a durable commit, so a crash
/// leaves the file as it was before that step; no entry is lost.
pub fn compact(path: &Path) -> Result<Compacted, SnapshotError> {
    let shown = path.display().to_string();
    let storage = |message: String| SnapshotError::Storage {
        path: shown.clone(),
        message,
    };
    let size = || {
        std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| storage(e.to_string()))
    };
    if !path.is_file() {
        return Err(SnapshotError::Open {
            path: shown.clone(),
            message: "no state file there; give --state (or `state` in the config) the file the syncs use".into(),
        });
    }
    let started = std::time::Instant::now();
    let bytes_before = size()?;
    let mut db = Database::builder()
        .set_cache_size(COMPACT_CACHE_BYTES)
        .open(path)
        .map_err(|e| open_failed(&shown, e))?;
    db.compact()
        .map_err(|e| storage(format!("compaction failed: {e}")))?;
    drop(db);
    Ok(Compacted {
        bytes_before,
        bytes_after: size()?,
        duration_s: started.elapsed().as_secs_f64(),
        path: shown,
    })
}

/// Helpers for the tests of modules that read a snapshot.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    use tokio::runtime::Runtime;
    use tokio::sync::mpsc;

    use super::{BeginOptions, Committed, Recorder, Snapshot};
    use crate::copy::Block;

    /// A snapshot at `path` with a run of sync `sync` begun: the snapshot, the runtime its
    /// recorder's commands are awaited on, and the recorder.
    pub(crate) fn begun(path: &Path, sync: &str) -> (Snapshot, Runtime, Recorder) {
        let snap = Snapshot::open(path, 1 << 20).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (_, rec) = rt
            .block_on(snap.begin(sync, "k", "r", BeginOptions::default()))
            .unwrap();
        (snap, rt, rec)
    }

    /// A snapshot at `path` whose sync `sync` holds the records of `c`, as after a first run.
    pub(crate) fn seeded(path: &Path, sync: &str, c: Committed) -> Snapshot {
        let (snap, rt, rec) = begun(path, sync);
        rt.block_on(rec.record(c)).unwrap();
        rt.block_on(rec.settle(Vec::new())).unwrap();
        rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
        snap
    }

    /// A closed channel holding `blocks`: a read that has ended.
    pub(crate) fn ended_read(blocks: Vec<Block>) -> mpsc::Receiver<Block> {
        let (tx, rx) = mpsc::channel(blocks.len() + 1);
        for b in blocks {
            tx.try_send(b).unwrap();
        }
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};

    fn assert_sync<T: Sync + Send>() {}

    /// The raw key of a bigint value, as binary COPY sends it.
    fn int8_key(v: i64) -> Vec<u8> {
        let mut k = 8u32.to_be_bytes().to_vec();
        k.extend_from_slice(&v.to_be_bytes());
        k
    }

    /// Every entry's key and hash; panics when two entries share a slot (removed-row detection
    /// depends on each entry having one of its own).
    fn entries(r: &Reader) -> BTreeMap<Vec<u8>, [u8; 16]> {
        let mut got = BTreeMap::new();
        let mut slots = HashSet::new();
        r.scan(|k, e| {
            got.insert(k.to_vec(), e.hash);
            assert!(slots.insert(e.slot), "slot {} used twice", e.slot);
            true
        })
        .unwrap();
        got
    }

    /// Changed rows' hashes go to the sync's hash file, which the readers see; one no sync
    /// names is removed when the state file is opened; a missing one makes the next run clear
    /// the entries (to rebuild them from the target) and fails a reader with the fix.
    #[test]
    fn changed_rows_go_to_the_hash_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.redb");
        let mut c = Committed::default();
        for v in 0..100 {
            c.keys.push(&int8_key(v));
            c.entries.push(([1; 16], None));
        }
        let snap = testing::seeded(&path, "h", c);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let hash_files = || -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(".hashes"))
                .collect();
            v.sort();
            v
        };
        assert!(
            hash_files().is_empty(),
            "new keys keep their hash in the entry"
        );
        let (_, rec) = rt
            .block_on(snap.begin("h", "k", "r", BeginOptions::default()))
            .unwrap();
        let start = snap.reader("h").unwrap();
        let mut c = Committed::default();
        for v in [7, 3, 50] {
            let k = int8_key(v);
            c.keys.push(&k);
            c.entries
                .push(([2; 16], Some(start.get(&k).unwrap().unwrap().slot)));
        }
        rt.block_on(rec.record(c)).unwrap();
        rt.block_on(rec.mark_stale(
            &int8_key(50),
            start.get(&int8_key(50)).unwrap().unwrap().slot,
        ))
        .unwrap();
        rt.block_on(rec.settle(Vec::new())).unwrap();
        rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
        let files = hash_files();
        assert_eq!(files.len(), 1);
        let now = snap.reader("h").unwrap();
        let hash = |v: i64| now.get(&int8_key(v)).unwrap().unwrap().hash;
        assert_eq!((hash(7), hash(3), hash(4)), ([2; 16], [2; 16], [1; 16]));
        assert_eq!(
            hash(50),
            STALE_HASH,
            "a stale mark supersedes the file's hash"
        );
        drop((now, start, snap));

        let orphan = dir.path().join("h.redb.00000000000000ff.hashes");
        std::fs::write(&orphan, b"left by a killed run").unwrap();
        let snap = Snapshot::open(&path, 1 << 20).unwrap();
        assert!(!orphan.exists(), "a hash file no sync names is removed");
        assert_eq!(hash_files(), files, "the named one stays");

        std::fs::remove_file(&files[0]).unwrap();
        let e = snap
            .reader("h")
            .err()
            .expect("no reader without the hash file");
        assert!(
            e.to_string().contains("rebuilds the snapshot's entries"),
            "{e}"
        );
        let how = BeginOptions {
            target_has_rows: true,
            ..BeginOptions::default()
        };
        let (begun, rec) = rt.block_on(snap.begin("h", "k", "r", how)).unwrap();
        assert!(begun.rebuild, "the entries are rebuilt from the target");
        assert!(
            begun.notes.iter().any(|n| n.contains("row hashes file")),
            "{:?}",
            begun.notes
        );
        assert!(snap.reader("h").unwrap().is_empty());
        drop(rec);
    }

    #[test]
    fn reader_is_shareable_across_threads() {
        assert_sync::<Reader>();
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Record a committed write of key k with hash h.
        Write(u8, u8),
        /// Record a committed delete of key k.
        Delete(u8),
        /// The destination rejected the changed row k.
        Reject(u8),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..40, any::<u8>()).prop_map(|(k, h)| Op::Write(k, h)),
            (0u8..40).prop_map(Op::Delete),
            (0u8..40).prop_map(Op::Reject),
        ]
    }

    proptest::proptest! {
        /// Random runs of writes, rejections and deletes through the snapshot thread agree with a
        /// BTreeMap, and every live entry keeps a slot of its own (removed-row detection depends
        /// on it).
        #[test]
        fn recorder_agrees_with_a_btreemap(runs in proptest::collection::vec((proptest::collection::vec(op(), 0..30), proptest::option::of((0u8..6, 60u8..130))), 1..6)) {
            let dir = tempfile::tempdir().unwrap();
            let snap = Snapshot::open(&dir.path().join("m.redb"), 1 << 20).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut model: BTreeMap<Vec<u8>, [u8; 16]> = BTreeMap::new();
            // Integer keys (some negative), counted per range of 4 values in two runs of three;
            // the third drops the counts, and the next rebuilds them.
            let key = |k: u8| {
                let mut v = 4u32.to_be_bytes().to_vec();
                v.extend_from_slice(&(i32::from(k) - 20).to_be_bytes());
                v
            };
            let spec = RangeSpec { width: 4, shift: 2 };
            for (run, (ops, load)) in runs.into_iter().enumerate() {
                let how = BeginOptions {
                    ranges: (run % 3 != 2).then_some(spec),
                    ..BeginOptions::default()
                };
                let (_, rec) = rt.block_on(snap.begin("m", "k", "r", how)).unwrap();
                let start = snap.reader("m").unwrap();
                // A load first: one record of a run of keys (in descending order; new ones
                // written through a cursor when the run is long enough, known ones changed),
                // overlapping earlier runs' loads.
                if let Some((from, len)) = load {
                    let mut c = Committed::default();
                    for v in (0..i32::from(len)).rev().map(|j| 1000 + i32::from(from) * 50 + j) {
                        let mut k = 4u32.to_be_bytes().to_vec();
                        k.extend_from_slice(&v.to_be_bytes());
                        let slot = start.get(&k).unwrap().map(|e| e.slot);
                        c.keys.push(&k);
                        c.entries.push(([from + 1; 16], slot));
                        model.insert(k, [from + 1; 16]);
                    }
                    rt.block_on(rec.record(c)).unwrap();
                }
                // As in a real run: every write is recorded before any delete (removed rows
                // are only derived after the read).
                let mut ops = ops;
                ops.sort_by_key(|o| matches!(o, Op::Delete(_)));
                let mut written = HashSet::new();
                // Writes go in records of several keys (in no order), as writers send them.
                let mut pending = Committed::default();
                let flush = |pending: &mut Committed| {
                    if !pending.keys.is_empty() {
                        rt.block_on(rec.record(std::mem::take(pending))).unwrap();
                    }
                };
                for (i, o) in ops.into_iter().enumerate() {
                    if !matches!(o, Op::Write(..)) || i % 7 == 6 {
                        flush(&mut pending);
                    }
                    let (Op::Write(k, _) | Op::Reject(k) | Op::Delete(k)) = o;
                    // Within a run the diff meets each key once.
                    if !matches!(o, Op::Delete(_)) && !written.insert(k) {
                        continue;
                    }
                    match o {
                        Op::Write(k, h) => {
                            let key = key(k);
                            let slot = start.get(&key).unwrap().map(|e| e.slot);
                            pending.keys.push(&key);
                            pending.entries.push(([h; 16], slot));
                            model.insert(key, [h; 16]);
                        }
                        Op::Reject(k) => {
                            let key = key(k);
                            if let Some(e) = start.get(&key).unwrap() {
                                rt.block_on(rec.mark_stale(&key, e.slot)).unwrap();
                                model.insert(key, STALE_HASH);
                            }
                        }
                        Op::Delete(k) => {
                            let mut keys = KeyBatch::default();
                            keys.push(&key(k));
                            rt.block_on(rec.remove(Arc::new(keys), 0..1)).unwrap();
                            model.remove(&key(k));
                        }
                    }
                }
                flush(&mut pending);
                let settled = rt.block_on(rec.settle(Vec::new())).unwrap();
                proptest::prop_assert_eq!(settled.duplicates, 0);
                rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
                let now = snap.reader("m").unwrap();
                let seen = entries(&now);
                proptest::prop_assert_eq!(&seen, &model);
                proptest::prop_assert_eq!(now.len(), model.len() as u64);
                // The counts follow the entries, cut as proposed or as a rebuild chose.
                let cut = now.range_spec();
                proptest::prop_assert_eq!(cut.map(|c| c.width), (run % 3 != 2).then_some(4));
                let want = cut.map(|c| {
                    let values: Vec<i64> = model.keys().map(|k| c.value(k).unwrap()).collect();
                    key_ranges::tally(&c, &values)
                });
                proptest::prop_assert_eq!(now.range_counts().unwrap(), want);
            }
        }
    }

    /// Batches of scattered keys are staged and applied in key order, some when the staging
    /// limit is reached, the rest before the removals and the settle that follow them; once the
    /// entries outnumber a stage, full stages wait on disk and are merged back: the entries,
    /// their slots, the duplicate found across batches and the counts per key range all come
    /// out as if every record had been applied as it came, and no spill file is left.
    #[test]
    fn scattered_records_are_staged_and_agree_with_a_btreemap() {
        let dir = tempfile::tempdir().unwrap();
        let snap = Snapshot::open_with(&dir.path().join("s.redb"), 1 << 20, Some(64 << 10), false)
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let key = int8_key;
        let spec = RangeSpec { width: 8, shift: 3 };
        let how = BeginOptions {
            ranges: Some(spec),
            ..BeginOptions::default()
        };
        let mut model: BTreeMap<Vec<u8>, [u8; 16]> = BTreeMap::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 200_000) as i64 - 100_000
        };
        for run in 0..3u8 {
            let (_, rec) = rt.block_on(snap.begin("s", "k", "r", how)).unwrap();
            let start = snap.reader("s").unwrap();
            let mut seen = HashSet::new();
            let mut dup: Option<i64> = None;
            for b in 0..20 {
                let mut c = Committed::default();
                while c.keys.len() < 500 {
                    let v = random();
                    if !seen.insert(v) {
                        continue;
                    }
                    let k = key(v);
                    let slot = start.get(&k).unwrap().map(|e| e.slot);
                    let h = [run.wrapping_add(v as u8); 16];
                    c.keys.push(&k);
                    c.entries.push((h, slot));
                    model.insert(k, h);
                }
                if b == 15 {
                    // A new key of batch 3 again: the model has it twice.
                    let v = dup.unwrap();
                    c.keys.push(&key(v));
                    c.entries.push(([7; 16], None));
                }
                if b == 3 {
                    let v = (0..)
                        .map(|_| random())
                        .find(|v| !seen.contains(v) && start.get(&key(*v)).unwrap().is_none())
                        .unwrap();
                    seen.insert(v);
                    c.keys.push(&key(v));
                    c.entries.push(([3; 16], None));
                    dup = Some(v);
                }
                rt.block_on(rec.record(c)).unwrap();
                if b == 10 {
                    // Removals of keys recorded in this run and before, among the staged ones.
                    let mut gone = KeyBatch::default();
                    for k in model
                        .keys()
                        .step_by(97)
                        .take(60)
                        .cloned()
                        .collect::<Vec<_>>()
                    {
                        gone.push(&k);
                        model.remove(&k);
                    }
                    let n = gone.len();
                    rt.block_on(rec.remove(Arc::new(gone), 0..n)).unwrap();
                }
            }
            let settled = rt.block_on(rec.settle(Vec::new())).unwrap();
            let v = dup.unwrap();
            assert_eq!(settled.duplicates, 1, "run {run}");
            assert_eq!(settled.duplicate_keys, vec![key(v)]);
            let stats = rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
            if run > 0 {
                // The stages are small beside the entries: they waited on disk and were merged.
                assert!(stats.spilled > 0, "run {run}: nothing spilled");
            }
            drop(start);
            let now = snap.reader("s").unwrap();
            let got = entries(&now);
            // The duplicate key's entries are gone (it is re-checked next run).
            model.remove(&key(v));
            let wrong = got.iter().filter(|(k, h)| model.get(*k) != Some(h)).count();
            assert!(
                wrong == 0 && got.len() == model.len(),
                "run {run}: {} entries, {} expected, {wrong} wrong",
                got.len(),
                model.len()
            );
            let values: Vec<i64> = model.keys().map(|k| spec.value(k).unwrap()).collect();
            let want = key_ranges::tally(&now.range_spec().unwrap(), &values);
            assert_eq!(now.range_counts().unwrap(), Some(want), "run {run}");
            // No spill file is left; the hash file of the changed rows stays.
            let files: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !(n.starts_with("s.redb.") && n.ends_with(".hashes")))
                .collect();
            assert_eq!(files, vec!["s.redb".to_string()]);
        }
    }

    /// Counts per key range begin with the proposed cut while there are no entries; the next
    /// run re-cuts them where an entry's range holds about 32 entries (dense keys and a few far
    /// outliers: the outliers do not widen the dense keys' ranges).
    #[test]
    fn counts_are_recut_to_hold_about_32_entries() {
        let dir = tempfile::tempdir().unwrap();
        let snap = Snapshot::open(&dir.path().join("r.redb"), 1 << 20).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let key = int8_key;
        let how = BeginOptions {
            ranges: Some(RangeSpec { width: 8, shift: 0 }),
            ..BeginOptions::default()
        };
        let (_, rec) = rt.block_on(snap.begin("r", "k", "r", how)).unwrap();
        let mut c = Committed::default();
        for v in (0..8192).chain((0..16).map(|i| (1 << 40) + (i << 30))) {
            c.keys.push(&key(v));
            c.entries.push(([1; 16], None));
        }
        rt.block_on(rec.record(c)).unwrap();
        rt.block_on(rec.settle(Vec::new())).unwrap();
        rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
        let r = snap.reader("r").unwrap();
        assert_eq!(r.range_spec().map(|s| s.shift), Some(0));
        assert_eq!(r.range_counts().unwrap().map(|c| c.len()), Some(8208));
        drop(r);
        let (_, rec) = rt.block_on(snap.begin("r", "k", "r", how)).unwrap();
        rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
        let r = snap.reader("r").unwrap();
        assert_eq!(r.range_spec().map(|s| s.shift), Some(5));
        let counts = r.range_counts().unwrap().unwrap();
        assert_eq!(counts.len(), 256 + 16);
        assert_eq!(counts.iter().map(|c| c.1.n).sum::<u64>(), 8208);
        // Each range's sum of offsets: 0 + 1 + ... + 31 for the dense keys, 0 for each outlier
        // (alone at the start of its range).
        let sums: Vec<u64> = counts.iter().map(|c| c.1.sum).collect();
        assert_eq!(sums.iter().filter(|&&s| s == 496).count(), 256);
        assert_eq!(sums.iter().filter(|&&s| s == 0).count(), 16);
    }

    /// A new key recorded twice in one run is a duplicate in the model: settling reports it and
    /// forgets its entry, as it forgets the keys the diff found twice.
    #[test]
    fn settle_reports_and_forgets_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let (snap, rt, rec) = testing::begun(&dir.path().join("d.redb"), "d");
        for key in [b"a", b"b", b"a", b"c"] {
            let mut c = Committed::default();
            c.keys.push(key);
            c.entries.push(([1; 16], None));
            rt.block_on(rec.record(c)).unwrap();
        }
        let settled = rt.block_on(rec.settle(vec![b"c".to_vec()])).unwrap();
        assert_eq!(settled.duplicates, 1);
        assert_eq!(settled.duplicate_keys, vec![b"a".to_vec()]);
        rt.block_on(rec.finish(None, None)).unwrap();
        let r = snap.reader("d").unwrap();
        assert_eq!(r.len(), 1);
        assert!(r.get(b"b").unwrap().is_some());
    }

    /// One record of many new keys, in no order, among and after the entries it meets, one of
    /// them recorded earlier in the run and one twice in it: every new key gets an entry of
    /// its own slot (written through a cursor, a run at a time), and the keys met twice are
    /// reported and forgotten as duplicates.
    #[test]
    fn a_record_of_scattered_new_keys_goes_in_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (snap, rt, rec) = testing::begun(&dir.path().join("n.redb"), "n");
        let key = |k: u32| k.to_be_bytes();
        let record = |keys: &[u32]| {
            let mut c = Committed::default();
            for &k in keys {
                c.keys.push(&key(k));
                c.entries.push(([(k as u8).wrapping_add(1); 16], None));
            }
            rt.block_on(rec.record(c)).unwrap();
        };
        // Runs long enough for a cursor: 1000.. (then appended after), 500.. (between 30 and
        // 1000) and 2000.. (past the end), with scattered keys around them.
        let first: Vec<u32> = [10, 20, 30].into_iter().chain(1000..1100).collect();
        record(&first);
        let mut second: Vec<u32> = vec![35, 5, 15, 20, 25, 15, 40, 41, 1, 29, 31, 1050];
        second.extend((2000..2100).rev());
        second.extend(500..600);
        second.extend([1100, 1101]);
        record(&second);
        let settled = rt.block_on(rec.settle(Vec::new())).unwrap();
        assert_eq!(settled.duplicates, 3);
        let mut dups = settled.duplicate_keys.clone();
        dups.sort();
        assert_eq!(
            dups,
            vec![key(15).to_vec(), key(20).to_vec(), key(1050).to_vec()]
        );
        rt.block_on(rec.finish(None, None)).unwrap();
        let r = snap.reader("n").unwrap();
        let got = entries(&r);
        let want: BTreeMap<Vec<u8>, [u8; 16]> = [1, 5, 10, 25, 29, 30, 31, 35, 40, 41]
            .into_iter()
            .chain((500..600).chain(1000..1102).chain(2000..2100))
            .filter(|&k| k != 1050)
            .map(|k| (key(k).to_vec(), [(k as u8).wrapping_add(1); 16]))
            .collect();
        assert_eq!(got, want);
        assert_eq!(r.len(), want.len() as u64);
    }

    /// A run's control commands are not fsynced but for the writing mark, before its first
    /// write: a run that writes nothing makes no durable commit, one that writes makes one.
    /// What they committed is there when the file is opened again.
    #[test]
    fn only_the_writing_mark_is_fsynced_within_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.redb");
        let how = BeginOptions::default();
        let one = |key: &[u8]| {
            let mut c = Committed::default();
            c.keys.push(key);
            c.entries.push(([7; 16], None));
            c
        };
        {
            let (snap, rt, rec) = testing::begun(&path, "f");
            rt.block_on(rec.record(one(b"a"))).unwrap();
            rt.block_on(rec.settle(Vec::new())).unwrap();
            let stats = rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
            assert_eq!((stats.upserted, stats.durable), (1, 0));

            let (_, rec) = rt.block_on(snap.begin("f", "k", "r", how)).unwrap();
            let p = rt.block_on(rec.begin_write()).unwrap();
            rt.block_on(rec.record(one(b"b"))).unwrap();
            p.accounted();
            rt.block_on(rec.settle(Vec::new())).unwrap();
            let stats = rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
            assert_eq!((stats.upserted, stats.durable), (1, 1));
        }
        let snap = Snapshot::open(&path, 1 << 20).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (b, _rec) = rt.block_on(snap.begin("f", "k", "r", how)).unwrap();
        assert!(!b.rewrite_all && !b.rebuild, "{:?}", b.notes);
        let r = snap.reader("f").unwrap();
        assert_eq!(r.len(), 2);
        assert!(r.get(b"a").unwrap().is_some() && r.get(b"b").unwrap().is_some());
        let syncs = snap.syncs().unwrap();
        assert!(!syncs.iter().find(|(n, ..)| n == "f").unwrap().1.writing);
    }

    /// A run that began a destination write and did not account for it (killed, or its write
    /// in doubt) leaves the sync marked, and the next run rebuilds the entries from the target;
    /// a run that accounted for every write, finished or not, leaves the entries trusted.
    #[test]
    fn a_write_left_unaccounted_for_rebuilds_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.redb");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let how = BeginOptions {
            target_has_rows: true,
            ..Default::default()
        };
        let record = |rec: &Recorder, key: &[u8]| {
            let p = rt.block_on(rec.begin_write()).unwrap();
            let mut c = Committed::default();
            c.keys.push(key);
            c.entries.push(([1; 16], None));
            rt.block_on(rec.record(c)).unwrap();
            p.accounted();
        };
        let meta = |snap: &Snapshot| {
            let syncs = snap.syncs().unwrap();
            syncs.into_iter().find(|(n, ..)| n == "w").unwrap().1
        };
        {
            let snap = Snapshot::open(&path, 1 << 20).unwrap();
            let (_, rec) = rt.block_on(snap.begin("w", "k", "r", how)).unwrap();
            record(&rec, b"a");
            assert!(meta(&snap).writing, "marked before the first write");
            rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
            assert!(!meta(&snap).writing, "cleared by a run that finished");
            // A failed run that accounted for its writes: closed, still trusted.
            let (b, rec) = rt.block_on(snap.begin("w", "k", "r", how)).unwrap();
            assert!(!b.rebuild);
            record(&rec, b"b");
            rt.block_on(rec.close()).unwrap();
            assert!(!meta(&snap).writing);
            assert!(
                rt.block_on(rec.begin_write()).is_err(),
                "closed: no write begins"
            );
            // A write begun and never accounted for (in doubt, or the process died).
            let (b, rec) = rt.block_on(snap.begin("w", "k", "r", how)).unwrap();
            assert!(!b.rebuild);
            record(&rec, b"c");
            let lost = rt.block_on(rec.begin_write()).unwrap();
            drop(lost);
            rt.block_on(rec.close()).unwrap();
            assert!(meta(&snap).writing, "kept: a write is unaccounted for");
            assert_eq!(snap.reader("w").unwrap().len(), 3);
        }
        let snap = Snapshot::open(&path, 1 << 20).unwrap();
        let (b, rec) = rt.block_on(snap.begin("w", "k", "r", how)).unwrap();
        assert!(b.rebuild, "{:?}", b.notes);
        assert!(b
            .notes
            .iter()
            .any(|n| n.contains("before it recorded every row it wrote")));
        assert!(
            snap.reader("w").unwrap().is_empty(),
            "the entries are rebuilt"
        );
        assert!(!meta(&snap).writing, "until this run writes");
        rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
        // Without rows in the target, the entries are cleared and nothing is rebuilt.
        let (_, rec) = rt.block_on(snap.begin("w", "k", "r", how)).unwrap();
        drop(rt.block_on(rec.begin_write()).unwrap());
        rt.block_on(rec.close()).unwrap();
        let (b, _) = rt
            .block_on(snap.begin("w", "k", "r", BeginOptions::default()))
            .unwrap();
        assert!(!b.rebuild && b.notes.iter().any(|n| n.contains("before it recorded")));
    }

    /// A rebuild that began is redone by every run until one completes; a completed one is not.
    #[test]
    fn an_unfinished_rebuild_is_started_over() {
        let dir = tempfile::tempdir().unwrap();
        let snap = Snapshot::open(&dir.path().join("r.redb"), 1 << 20).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let how = BeginOptions {
            target_has_rows: true,
            ..Default::default()
        };
        let record = |rec: &Recorder, key: &[u8]| {
            let mut c = Committed::default();
            c.keys.push(key);
            c.entries.push(([1; 16], None));
            rt.block_on(rec.record(c)).unwrap();
        };
        let (b, rec) = rt.block_on(snap.begin("r", "k", "r", how)).unwrap();
        assert!(b.rebuild);
        record(&rec, b"a");
        rt.block_on(rec.finish(None, None)).unwrap(); // broke off
        let (b, rec) = rt.block_on(snap.begin("r", "k", "r", how)).unwrap();
        assert!(b.rebuild, "a partial rebuild is not trusted");
        assert!(
            b.notes.iter().any(|n| n.contains("did not complete")),
            "{:?}",
            b.notes
        );
        assert!(snap.reader("r").unwrap().is_empty(), "and is thrown away");
        record(&rec, b"a");
        record(&rec, b"b");
        rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
        let (b, rec) = rt.block_on(snap.begin("r", "k", "r", how)).unwrap();
        assert!(!b.rebuild);
        assert_eq!(snap.reader("r").unwrap().len(), 2);
        rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
        // Without rows in the target there is nothing to rebuild from.
        let (b, _) = rt
            .block_on(snap.begin("s", "k", "r", BeginOptions::default()))
            .unwrap();
        assert!(!b.rebuild);
    }

    /// Sorted lookups (the forward walk, and in any order) answer as point lookups do.
    #[test]
    fn sorted_lookups_answer_as_point_lookups() {
        let dir = tempfile::tempdir().unwrap();
        let (snap, rt, rec) = testing::begun(&dir.path().join("g.redb"), "s");
        // Every third key of 0..3000, so lookups meet gaps, runs and long jumps.
        let stored: Vec<[u8; 2]> = (0u16..3000).step_by(3).map(|k| k.to_be_bytes()).collect();
        let mut c = Committed::default();
        for k in &stored {
            c.keys.push(k);
            c.entries.push(([k[1]; 16], None));
        }
        rt.block_on(rec.record(c)).unwrap();
        rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
        let reader = snap.reader("s").unwrap();
        let mut x = 7u32;
        let mut wanted: Vec<[u8; 2]> = (0..2000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                // Mostly near neighbours, some far: both the step and the seek paths.
                let k = if x % 10 == 0 {
                    x >> 16
                } else {
                    (x >> 20) % 400
                };
                (k as u16 % 3100).to_be_bytes()
            })
            .collect();
        wanted.sort();
        let keys: Vec<&[u8]> = wanted.iter().map(|k| k.as_slice()).collect();
        let mut out = Vec::new();
        reader.get_sorted(&keys, &mut out).unwrap();
        let expected: Vec<_> = keys.iter().map(|k| reader.get(k).unwrap()).collect();
        assert_eq!(out, expected);
        let mut shuffled = keys.clone();
        shuffled.reverse();
        shuffled.swap(3, 1500);
        reader.get_many(&shuffled, &mut out, true).unwrap();
        let parallel = out.clone();
        reader.get_many(&shuffled, &mut out, false).unwrap();
        assert_eq!(out, parallel);
        let expected: Vec<_> = shuffled.iter().map(|k| reader.get(k).unwrap()).collect();
        assert_eq!(out, expected);
        assert!(out.iter().any(|e| e.is_some()) && out.iter().any(|e| e.is_none()));
        out.push(None);
        reader.get_sorted(&[], &mut out).unwrap();
        assert!(out.is_empty());
    }

    /// The merge walk meets every key of either view once, in key order, with both entries.
    #[test]
    fn merge_walks_two_views_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let snap = Snapshot::open(&dir.path().join("w.redb"), 1 << 20).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for (sync, keys) in [
            ("a", [1u8, 3, 4, 9].as_slice()),
            ("b", [2u8, 3, 9, 10].as_slice()),
        ] {
            let (_, rec) = rt
                .block_on(snap.begin(sync, "k", "r", BeginOptions::default()))
                .unwrap();
            let mut c = Committed::default();
            for &k in keys {
                c.keys.push(&[k]);
                c.entries.push(([k; 16], None));
            }
            rt.block_on(rec.record(c)).unwrap();
            rt.block_on(rec.finish(Some("r".into()), None)).unwrap();
        }
        let mut seen = Vec::new();
        snap.reader("a")
            .unwrap()
            .merge_with(&snap.reader("b").unwrap(), |k, x, y| {
                seen.push((k[0], x.is_some(), y.is_some()));
                true
            })
            .unwrap();
        assert_eq!(
            seen,
            [
                (1, true, false),
                (2, false, true),
                (3, true, true),
                (4, true, false),
                (9, true, true),
                (10, false, true)
            ]
        );
    }

    #[test]
    fn second_open_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _a = Snapshot::open(&path, 1 << 20).unwrap();
        let b = Snapshot::open(&path, 1 << 20);
        assert!(matches!(b, Err(SnapshotError::Locked { .. })));
    }

    /// Run records round-trip as types; a record this build cannot read is skipped.
    #[test]
    fn run_log_is_typed() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct R {
            n: u32,
        }
        let dir = tempfile::tempdir().unwrap();
        let snap = Snapshot::open(&dir.path().join("l.redb"), 1 << 20).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for n in 0..3 {
            rt.block_on(snap.log_run(&R { n })).unwrap();
        }
        rt.block_on(snap.log_run(&"not an R")).unwrap();
        let runs: Vec<(u64, R)> = snap.runs(2).unwrap();
        assert_eq!(
            runs.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
            vec![R { n: 1 }, R { n: 2 }]
        );
    }
}
