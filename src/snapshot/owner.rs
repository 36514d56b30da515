//! The snapshot thread: the only writer of the state file.
//!
//! Every change to the file arrives here as a typed [`Command`] over a bounded channel, from the
//! orchestrator (begin a run, settle it, finish it, log it) and from the writers (rows the
//! destination committed, keys it deleted, rows it rejected). redb writes are synchronous and
//! serial, so they run on this one thread and never on a tokio worker.
//!
//! Row records are grouped into transactions of at most [`COMMIT_OPS`] operations that are not
//! fsynced, with a durable commit at least every [`DURABLE_EVERY`] and when the thread ends. Of
//! the control commands, three commit durably (each makes every commit before it durable): the
//! writing mark, before the run's first write to the destination; a run's log record, its
//! durable end; and a run's start when it lets hash files go (they are removed only then). The
//! others (start, switch to a full read, settle, finish, close, rejected rows) are carried by the
//! next durable commit: a crash before it leaves the file as it was before them, which is either
//! the state before a run that wrote nothing, or a run that wrote with its writing mark set. A
//! no-change run makes one durable commit, where it made six (docs/performance.md, "Fewer
//! fsyncs per run"). Batches whose keys come scattered (random keys such as UUIDs) are first
//! staged in memory, up to [`STAGE_BYTES`], and applied in key order (before any control
//! command, and before a removal or stale mark of the same sync); a full stage that is small
//! beside the sync's entries waits on disk instead, sorted, to be merged with the next ones
//! ([`super::spill`]). An entry is never written
//! before the destination committed its row, because the writers send records only after the
//! destination acknowledged the commit. Losing
//! a non-durable commit in a crash loses entries of rows the destination holds, which a re-write
//! does not always repair (the source may delete such a row, or change it back, before the
//! next run): the sync's writing mark ([`super::SyncMeta::writing`]), durable before the run's
//! first write, makes the next run rebuild the entries from the target.
//!
//! A storage error while recording a run's rows fails that run (its [`Recorder`] refuses further
//! records and reports the error) without taking down the thread.
//!
//! [`Recorder`]: super::Recorder

use std::collections::HashMap;
use std::ops::{Bound, Range};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction,
};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::format::{
    free_def, free_name, old_ranges_name, ranges_def, ranges_name, readable, rows_def, rows_name,
    Entry, SyncMeta, FORMAT, META, REJECTED, RUNS, STALE_HASH,
};
use super::hashes::{self, HashFile};
use super::spill::Spill;
use super::{Begin, BeginOptions, Committed, Gate, RecorderStats, Settled, SnapshotError};
use crate::batch::KeyBatch;
use crate::delta::Basis;
use crate::key_ranges::{self, RangeSpec, PER_RANGE};

/// A transaction ends after this many operations, bounding redb's dirty pages in memory
/// (scattered updates can dirty one 4 KiB page each). Such commits are not fsynced ...
const COMMIT_OPS: usize = 10_000;
/// ... but one is made durable at least this often, and at the end.
const DURABLE_EVERY: Duration = Duration::from_secs(2);

/// Row records of committed rows are staged in memory up to this many bytes (keys and
/// entries), then applied in key order, a transaction per [`COMMIT_OPS`]: rows arrive in the
/// source's order, which for random keys (UUIDs, hashes) scatters them over the whole B-tree,
/// one page read, copied and written per row; a sorted window of many batches shares pages
/// (see docs/performance.md, "Random keys"). Staging delays entries, never loses a guarantee:
/// every control command (settle, finish, close, ...) applies them first, and a crash before
/// that is a crash after writes, which the writing mark turns into a rebuild.
const STAGE_BYTES: usize = 16 << 20;

/// Keys kept for reports of duplicate keys (all of them are counted).
const KEEP_DUPLICATES: usize = 1000;

type Reply<T> = oneshot::Sender<Result<T, SnapshotError>>;

/// What the snapshot thread can be asked to do.
pub(super) enum Command {
    /// Start a run of `sync`: check the fingerprints, decide whether every row is rewritten.
    Begin {
        sync: Arc<str>,
        key_fp: String,
        row_fp: String,
        how: BeginOptions,
        failed: Arc<OnceLock<String>>,
        gate: Arc<Gate>,
        reply: Reply<Begin>,
    },
    /// The run is about to write to the destination for the first time: mark the sync as
    /// writing, durably ([`SyncMeta::writing`]).
    Writing { sync: Arc<str>, reply: Reply<()> },
    /// The run (the one `gate` belongs to) ends without finishing: clear the writing mark when
    /// every write it began is accounted for.
    Close {
        sync: Arc<str>,
        gate: Arc<Gate>,
        reply: Reply<()>,
    },
    /// The destination committed these rows (inserted or updated).
    Record { sync: Arc<str>, rows: Committed },
    /// The destination no longer holds these keys: drop their entries, free their slots.
    Remove {
        sync: Arc<str>,
        keys: Arc<KeyBatch>,
        rows: Range<usize>,
    },
    /// The destination rejected a changed row: keep the entry's slot, make the next run rewrite it.
    MarkStale {
        sync: Arc<str>,
        key: Vec<u8>,
        slot: u32,
    },
    /// Every record of the run is in: forget the duplicate keys (`forget`, found by the diff,
    /// and new keys recorded twice, found here), commit durably, report what was found here.
    Settle {
        sync: Arc<str>,
        forget: Vec<Vec<u8>>,
        reply: Reply<Settled>,
    },
    /// The run ends: with `row_fp`, every stored hash is now computed under that model.
    Finish {
        sync: Arc<str>,
        row_fp: Option<String>,
        basis: Option<Basis>,
        reply: Reply<RecorderStats>,
    },
    /// Forget the recorded basis of change-aware reads now (a full read began: until it
    /// completes, the next run reads in full too).
    DropBasis { sync: Arc<str>, reply: Reply<()> },
    /// Append a run record (JSON).
    LogRun { json: String, reply: Reply<u64> },
    /// Replace a sync's list of rejected rows (JSON).
    SetRejections {
        sync: String,
        json: String,
        reply: Reply<()>,
    },
}

impl Command {
    fn is_row_record(&self) -> bool {
        matches!(
            self,
            Command::Record { .. } | Command::Remove { .. } | Command::MarkStale { .. }
        )
    }
}

/// What the thread keeps for a run between `Begin` and `Finish`.
struct RunState {
    meta: SyncMeta,
    /// Free slots, reused before new ones are minted.
    free: Vec<u32>,
    /// New keys recorded twice in this run: the count and the first keys.
    duplicates: (u64, Vec<Vec<u8>>),
    stats: RecorderStats,
    /// Set when recording failed; the run's `Recorder` then refuses further records.
    failed: Arc<OnceLock<String>>,
    /// The run's destination writes not yet accounted for.
    gate: Arc<Gate>,
    /// A dry run: its metadata is never saved.
    dry: bool,
    /// [`Owner::durable`] before the run's start.
    durable_from: u64,
}

pub(super) struct Owner {
    pub(super) db: Arc<Database>,
    pub(super) path: String,
    runs: HashMap<Arc<str>, RunState>,
    /// Row records not yet applied, per sync ([`STAGE_BYTES`]).
    staged: HashMap<Arc<str>, Committed>,
    /// Older staged records of a sync, sorted runs on disk: applied before `staged`.
    spilled: HashMap<Arc<str>, Spill>,
    /// Where spill files go (the state file's directory).
    dir: PathBuf,
    /// The state file (hash files are named after it).
    file: PathBuf,
    /// The syncs' hash files opened so far ([`hashes`]).
    hashes: HashMap<Arc<str>, HashFile>,
    /// A spill file could not be written: stages are applied when full, as before spilling.
    no_spill: bool,
    /// [`STAGE_BYTES`], smaller in tests.
    pub(super) stage_limit: usize,
    last_durable: Instant,
    /// A commit since the last durable one was not fsynced.
    undurable: bool,
    /// Durable commits made.
    durable: u64,
}

impl Owner {
    pub(super) fn new(db: Arc<Database>, path: String, file: PathBuf) -> Owner {
        Owner {
            db,
            path,
            runs: HashMap::new(),
            staged: HashMap::new(),
            spilled: HashMap::new(),
            dir: super::dir_of(&file).to_path_buf(),
            file,
            hashes: HashMap::new(),
            no_spill: false,
            stage_limit: STAGE_BYTES,
            last_durable: Instant::now(),
            undurable: false,
            durable: 0,
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Storage {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Serves commands until every sender is gone, then makes the last commits durable.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut next: Option<Command> = None;
        loop {
            let cmd = match next.take() {
                Some(c) => c,
                None => match rx.blocking_recv() {
                    Some(c) => c,
                    None => break,
                },
            };
            next = if cmd.is_row_record() {
                self.record(cmd, &mut rx)
            } else {
                self.apply_staged(None);
                self.control(cmd);
                None
            };
        }
        self.apply_staged(None);
        if self.undurable {
            if let Err(e) = self.durable_commit(|_| Ok(())) {
                tracing::warn!("state file {}: final commit failed: {e}", self.path);
            }
        }
    }

    /// Stages `first` and the records queued behind it while their keys are scattered
    /// ([`STAGE_BYTES`], [`scattered`]), then writes the next row records in one transaction
    /// (a removal or stale mark of a sync with staged records after those). Returns a command
    /// met in the queue, to be served next.
    fn record(&mut self, first: Command, rx: &mut mpsc::Receiver<Command>) -> Option<Command> {
        let mut first = Some(first);
        while let Some(Command::Record { .. }) = first {
            let Some(Command::Record { sync, rows }) = first.take() else {
                unreachable!("matched above")
            };
            if !scattered(&rows.keys) && !self.waiting(&sync) {
                // Keys in long ascending runs (a stream in key order, or a few of them) share
                // pages as they are: written now, as they come.
                first = Some(Command::Record { sync, rows });
                break;
            }
            self.stage(sync, rows);
            if self.staged.values().map(staged_size).sum::<usize>() >= self.stage_limit {
                self.stage_full();
            }
            first = rx.try_recv().ok();
        }
        let first = first?;
        if !first.is_row_record() {
            return Some(first);
        }
        if matches!(first, Command::Record { .. }) {
            return self.write_now(first, rx);
        }
        if let Some(sync) = row_sync(&first).filter(|s| self.waiting(s)) {
            let sync = sync.clone();
            self.apply_staged(Some(&sync));
        }
        self.write_now(first, rx)
    }

    /// Writes `first` and the row records queued behind it that need no staging in one
    /// transaction. Returns a command met in the queue, to be served next.
    fn write_now(&mut self, first: Command, rx: &mut mpsc::Receiver<Command>) -> Option<Command> {
        let txn = match self.db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                self.fail_runs(&[first], &self.err(e));
                return None;
            }
        };
        let mut touched: Vec<Arc<str>> = Vec::new();
        let mut ops = 0usize;
        let mut closed = false;
        let mut control = None;
        let mut next = None;
        let mut cmd = Some(first);
        let mut result = Ok(());
        while let Some(c) = cmd.take() {
            let sync = row_sync(&c).expect("only row records are grouped").clone();
            if !touched.contains(&sync) {
                touched.push(sync.clone());
            }
            match self.apply(&txn, c) {
                Ok(n) => ops += n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if ops >= COMMIT_OPS {
                break;
            }
            // Take what is already queued; commit when the queue runs dry. Records of
            // scattered keys, and any record of a sync with staged records, go through
            // `record` (staged first, or after the staged ones).
            match rx.try_recv() {
                Ok(c) if c.is_row_record() => {
                    let waits = row_sync(&c).is_some_and(|s| self.waiting(s))
                        || matches!(&c, Command::Record { rows, .. } if scattered(&rows.keys));
                    match waits {
                        true => {
                            next = Some(c);
                            break;
                        }
                        false => cmd = Some(c),
                    }
                }
                Ok(c) => control = Some(c),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => closed = true,
            }
        }
        // A control command that follows commits as durably as it needs to.
        self.end_txn(txn, &touched, result, closed);
        control.or(next)
    }

    /// Commits a transaction of row records of the `touched` syncs (with their metadata):
    /// durably when `durable`, or when the last durable commit is [`DURABLE_EVERY`] old. A
    /// failure fails those syncs' runs.
    fn end_txn(
        &mut self,
        mut txn: WriteTransaction,
        touched: &[Arc<str>],
        result: Result<(), SnapshotError>,
        durable: bool,
    ) {
        let durable = durable || self.last_durable.elapsed() >= DURABLE_EVERY;
        let committed = result.and_then(|()| {
            self.write_meta(&txn, touched)?;
            self.commit(&mut txn, durable)?;
            txn.commit().map_err(|e| self.err(e))
        });
        match committed {
            Ok(()) => {
                self.committed(durable);
                for s in touched {
                    if let Some(run) = self.runs.get_mut(s) {
                        run.stats.commits += 1;
                    }
                }
            }
            Err(e) => {
                for s in touched {
                    self.fail_run(s, &e);
                }
            }
        }
    }

    /// Adds a batch of committed rows to the sync's staged records (see [`STAGE_BYTES`]).
    fn stage(&mut self, sync: Arc<str>, rows: Committed) {
        if !self.runs.contains_key(&sync) {
            tracing::warn!(
                "state file {}: rows recorded for sync '{sync}', which has no run going: ignored",
                self.path
            );
            return;
        }
        match self.staged.get_mut(&sync) {
            Some(c) => {
                for i in 0..rows.keys.len() {
                    c.keys.push(rows.keys.key(i));
                }
                c.entries.extend_from_slice(&rows.entries);
            }
            None => {
                self.staged.insert(sync, rows);
            }
        }
    }

    /// True when records of `sync` wait to be applied (staged, or spilled to disk).
    fn waiting(&self, sync: &str) -> bool {
        self.staged.contains_key(sync) || self.spilled.contains_key(sync)
    }

    /// The stage is full. A sync's staged records go to disk, sorted, while all that wait of
    /// it are fewer than its entries: applied now, they would rewrite most of the B-tree's
    /// leaves for a fraction of its size ([`super::spill`]). Otherwise they are applied, with
    /// those on disk.
    fn stage_full(&mut self) {
        let syncs: Vec<Arc<str>> = self.staged.keys().cloned().collect();
        for sync in syncs {
            let waiting = self.staged.get(&sync).map_or(0, |c| c.entries.len() as u64)
                + self.spilled.get(&sync).map_or(0, |s| s.records);
            if !self.no_spill && waiting < self.entries(&sync) && self.spill(&sync) {
                continue;
            }
            self.apply_staged(Some(&sync));
        }
    }

    /// The sync's entries in the file (0 when they cannot be counted: the records are then
    /// applied, as they would be without spilling).
    fn entries(&self, sync: &str) -> u64 {
        let count = || -> Result<u64, redb::Error> {
            let txn = self.db.begin_read()?;
            match txn.open_table(rows_def(&rows_name(sync))) {
                Ok(t) => Ok(t.len()?),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                Err(e) => Err(e.into()),
            }
        };
        count().unwrap_or(0)
    }

    /// Moves the sync's staged records to its spill file, as one sorted run. False when the
    /// file cannot be written: the records stay staged, and no stage is spilled again.
    fn spill(&mut self, sync: &Arc<str>) -> bool {
        let Some(c) = self.staged.get(sync) else {
            return true;
        };
        let pushed = match self.spilled.get_mut(sync) {
            Some(s) => s.push(c),
            None => Spill::create(&self.dir, true).and_then(|mut s| {
                s.push(c)?;
                self.spilled.insert(sync.clone(), s);
                Ok(())
            }),
        };
        match pushed {
            Ok(()) => {
                self.staged.remove(sync);
                if let Some(run) = self.runs.get_mut(sync) {
                    run.stats.spilled += 1;
                }
                true
            }
            Err(e) => {
                tracing::warn!(
                    "state file {}: staged records cannot wait in {} ({e}); they are applied as they come, which costs more CPU for random keys",
                    self.path,
                    self.dir.display()
                );
                self.no_spill = true;
                false
            }
        }
    }

    /// Applies the waiting records of `only` (or of every sync) in key order, a transaction per
    /// [`COMMIT_OPS`] records, each a contiguous stretch of the key space: those on disk merged
    /// with the staged ones, which are newer (records of one key are applied in the order they
    /// came).
    fn apply_staged(&mut self, only: Option<&Arc<str>>) {
        let syncs: Vec<Arc<str>> = match only {
            Some(s) => vec![s.clone()],
            None => self
                .staged
                .keys()
                .chain(self.spilled.keys())
                .cloned()
                .collect(),
        };
        for sync in syncs {
            if let Some(mut spill) = self.spilled.remove(&sync) {
                // One pass over the tree: the staged records join the merge as its newest run
                // (applied after it, should the file refuse them).
                if let Some(c) = self.staged.get(&sync) {
                    if spill.push(c).is_ok() {
                        self.staged.remove(&sync);
                    }
                }
                let mut applied = true;
                let merged = spill.merge(COMMIT_OPS, |part| {
                    applied = self.apply_part(&sync, part);
                    applied
                });
                if let Err(e) = merged {
                    let e = self.err(format!("reading staged records back: {e}"));
                    self.fail_run(&sync, &e);
                    applied = false;
                }
                if !applied {
                    self.staged.remove(&sync);
                    continue;
                }
            }
            let Some(c) = self.staged.remove(&sync) else {
                continue;
            };
            let order = c.keys.order(0..c.keys.len());
            for chunk in order.chunks(COMMIT_OPS) {
                let mut part = Committed {
                    keys: KeyBatch::default(),
                    entries: Vec::with_capacity(chunk.len()),
                };
                for &i in chunk {
                    part.keys.push(c.keys.key(i));
                    part.entries.push(c.entries[i]);
                }
                if !self.apply_part(&sync, part) {
                    break;
                }
            }
        }
    }

    /// Applies one part of a sync's records (in key order) in a transaction of its own; false
    /// when that failed (the run is failed).
    fn apply_part(&mut self, sync: &Arc<str>, part: Committed) -> bool {
        let txn = match self.db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                let e = self.err(e);
                self.fail_run(sync, &e);
                return false;
            }
        };
        let cmd = Command::Record {
            sync: sync.clone(),
            rows: part,
        };
        let result = self.apply(&txn, cmd).map(|_| ());
        let applied = result.is_ok();
        self.end_txn(txn, std::slice::from_ref(sync), result, false);
        applied
    }

    /// Fails the run of `sync`: its `Recorder` refuses further records and reports `e`.
    fn fail_run(&self, sync: &str, e: &SnapshotError) {
        if let Some(run) = self.runs.get(sync) {
            let _ = run.failed.set(e.to_string());
        }
    }

    fn fail_runs(&self, cmds: &[Command], e: &SnapshotError) {
        for sync in cmds.iter().filter_map(row_sync) {
            self.fail_run(sync, e);
        }
    }

    /// Sets how `txn` commits; a durable commit first makes the hash files durable.
    fn commit(&mut self, txn: &mut WriteTransaction, durable: bool) -> Result<(), SnapshotError> {
        if durable {
            for (sync, f) in &mut self.hashes {
                if let Err(e) = f.sync() {
                    let e = format!("the row hashes file of sync '{sync}': {e}");
                    return Err(self.err(e));
                }
            }
        }
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(|e| self.err(e))
    }

    fn write_meta(&self, txn: &WriteTransaction, syncs: &[Arc<str>]) -> Result<(), SnapshotError> {
        let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
        for s in syncs {
            if let Some(run) = self.runs.get(s) {
                let json = serde_json::to_string(&run.meta).map_err(|e| self.err(e))?;
                meta.insert(&**s, json.as_str()).map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Applies one row record; returns the operations it made.
    fn apply(&mut self, txn: &WriteTransaction, cmd: Command) -> Result<usize, SnapshotError> {
        let path = self.path.clone();
        let err = |e: &dyn std::fmt::Display| SnapshotError::Storage {
            path: path.clone(),
            message: e.to_string(),
        };
        let (sync, cmd) = match cmd {
            Command::Record { ref sync, .. }
            | Command::Remove { ref sync, .. }
            | Command::MarkStale { ref sync, .. } => (sync.clone(), cmd),
            _ => unreachable!("only row records are applied"),
        };
        let Some(run) = self.runs.get_mut(&sync) else {
            return Err(err(&format!("no run of sync '{sync}' was begun")));
        };
        let (state, hash_files) = (&self.file, &mut self.hashes);
        // Runs `op` on the sync's hash file (made first, with `create`); nothing when it has none.
        let mut with_file =
            |meta: &mut SyncMeta,
             create: bool,
             op: &mut dyn FnMut(&mut HashFile) -> std::io::Result<()>| {
                hash_file(hash_files, state, &sync, meta, create)
                    .and_then(|f| f.map_or(Ok(()), op))
                    .map_err(|e| err(&format!("the row hashes file of sync '{sync}': {e}")))
            };
        let rows_n = rows_name(&sync);
        let free_n = free_name(&sync);
        let mut rows = txn.open_table(rows_def(&rows_n)).map_err(|e| err(&e))?;
        let mut free = txn.open_table(free_def(&free_n)).map_err(|e| err(&e))?;
        let spec = run.meta.ranges;
        let mut slots = Slots {
            run,
            free: &mut free,
            err: &err,
        };
        // Entries added (+1) and removed (-1), by key range, with their offsets in the range
        // (wrapping), written to `key_ranges/<sync>` below. A key not in the spec's form (never
        // seen: the key fingerprint fixes its type) drops the tallies rather than leave them
        // wrong.
        let (mut changes, mut broken): (key_ranges::Counts, bool) = (Vec::new(), false);
        let mut count = |key: &[u8], add: bool| {
            let Some(spec) = spec else { return };
            let Some(v) = spec.value(key) else {
                broken = true;
                return;
            };
            let (r, t) = spec.tally_of(v);
            // Keys come mostly in key order: runs in one range add up here.
            key_ranges::bump(&mut changes, r, if add { t } else { t.neg() });
        };
        let done = match cmd {
            Command::Record { rows: c, .. } => {
                // Rows whose key the snapshot holds (changed rows) keep their entry: their new
                // hash goes to the hash file, in place.
                // (A hash of all zeros, which no row has in practice, would read as "the
                // entry's own": it goes to the entry.)
                let in_file = |&(hash, slot): &([u8; 16], Option<u32>)| {
                    slot.filter(|_| hash != STALE_HASH).map(|s| (s, hash))
                };
                let mut changed: Vec<(u32, [u8; 16])> =
                    c.entries.iter().filter_map(in_file).collect();
                if !changed.is_empty() {
                    with_file(&mut slots.run.meta, true, &mut |f| f.set_many(&mut changed))?;
                }
                // The entries to write, in key order, with their slots (minted or reused).
                let mut todo: Vec<(usize, [u8; 20])> = Vec::new();
                let mut reused_slots: Vec<u32> = Vec::new();
                for i in c.keys.order(0..c.keys.len()) {
                    if in_file(&c.entries[i]).is_some() {
                        continue;
                    }
                    let (hash, slot) = c.entries[i];
                    // A slot minted now was never written in the hash file; a reused one may
                    // hold the hash of the key that had it, and the entry's own hash holds.
                    let (slot, reused) = match slot {
                        Some(s) => (s, true),
                        None => {
                            let reused = !slots.run.free.is_empty();
                            (slots.alloc()?, reused)
                        }
                    };
                    if reused {
                        reused_slots.push(slot);
                    }
                    todo.push((i, Entry { hash, slot }.encode()));
                }
                if !reused_slots.is_empty() {
                    with_file(&mut slots.run.meta, false, &mut |f| {
                        f.clear_many(&reused_slots)
                    })?;
                }
                // Long runs of new keys that fall between the same two entries (a load: all
                // of a batch's keys of one part of the read) go in through a cursor, which
                // writes a run into the tree at once; the rest one insert each. Where runs came
                // short, the next keys go in one by one without looking (1, 2, 4, ... up to
                // 256 of them), so scattered keys do not pay a look per key.
                let (mut next, mut one_by_one, mut backoff) = (0, 0, 1);
                while next < todo.len() {
                    if next >= one_by_one {
                        let run = insert_run(&mut rows, &todo[next..], |i| c.keys.key(i))
                            .map_err(|e| err(&e))?;
                        if let Some(n) = run {
                            for &(i, _) in &todo[next..next + n] {
                                count(c.keys.key(i), true);
                            }
                            (next, backoff) = (next + n, 1);
                            continue;
                        }
                        one_by_one = next + backoff;
                        backoff = (backoff * 2).min(256);
                    }
                    let (i, ref entry) = todo[next];
                    next += 1;
                    let key = c.keys.key(i);
                    let slot = Entry::decode(entry).slot;
                    let old = rows
                        .insert(key, entry)
                        .map_err(|e| err(&e))?
                        .map(|v| Entry::decode(v.value()));
                    let Some(old) = old else {
                        count(key, true);
                        continue;
                    };
                    if old.slot != slot {
                        // Keep the slot of the replaced entry from leaking.
                        slots.release(old.slot)?;
                    }
                    if c.entries[i].1.is_none() {
                        // The diff saw no entry for this key when the run started, so the
                        // entry replaced here was written earlier in this same run: the key
                        // appears twice in the model.
                        let d = &mut slots.run.duplicates;
                        d.0 += 1;
                        if d.1.len() < KEEP_DUPLICATES {
                            d.1.push(key.to_vec());
                        }
                    }
                }
                slots.run.stats.upserted += c.keys.len() as u64;
                c.keys.len()
            }
            Command::Remove { keys, rows: r, .. } => {
                let n = r.len();
                for i in keys.order(r) {
                    if let Some(old) = rows.remove(keys.key(i)).map_err(|e| err(&e))? {
                        slots.release(Entry::decode(old.value()).slot)?;
                        slots.run.stats.removed += 1;
                        count(keys.key(i), false);
                    }
                }
                n
            }
            Command::MarkStale { key, slot, .. } => {
                // The entry's own (stale) hash holds, not one the hash file may have.
                with_file(&mut slots.run.meta, false, &mut |f| f.clear(slot))?;
                let stale = Entry {
                    hash: STALE_HASH,
                    slot,
                };
                let old = rows
                    .insert(key.as_slice(), &stale.encode())
                    .map_err(|e| err(&e))?;
                if old.is_none() {
                    count(&key, true);
                }
                1
            }
            _ => unreachable!("only row records are applied"),
        };
        let ranges_n = ranges_name(&sync);
        if broken {
            txn.delete_table(ranges_def(&ranges_n))
                .map_err(|e| err(&e))?;
            if let Some(run) = self.runs.get_mut(&sync) {
                run.meta.ranges = None;
            }
        } else if !changes.is_empty() {
            let mut ranges = txn.open_table(ranges_def(&ranges_n)).map_err(|e| err(&e))?;
            add_counts(&mut ranges, changes).map_err(|e| err(&e))?;
        }
        Ok(done)
    }

    /// Serves a control command (after the staged row records), committed as durably as the
    /// module's introduction says.
    fn control(&mut self, cmd: Command) {
        match cmd {
            Command::Begin {
                sync,
                key_fp,
                row_fp,
                how,
                failed,
                gate,
                reply,
            } => {
                let r = self.begin(&sync, &key_fp, &row_fp, how, (failed, gate));
                let _ = reply.send(r);
            }
            Command::Writing { sync, reply } => {
                let _ = reply.send(self.mark_writing(&sync));
            }
            Command::Close { sync, gate, reply } => {
                let _ = reply.send(self.close(&sync, &gate));
            }
            Command::Settle {
                sync,
                forget,
                reply,
            } => {
                let _ = reply.send(self.settle(&sync, forget));
            }
            Command::Finish {
                sync,
                row_fp,
                basis,
                reply,
            } => {
                let _ = reply.send(self.finish(&sync, row_fp, basis));
            }
            Command::DropBasis { sync, reply } => {
                let _ = reply.send(self.drop_basis(&sync));
            }
            Command::LogRun { json, reply } => {
                let _ = reply.send(self.log_run(&json));
            }
            Command::SetRejections { sync, json, reply } => {
                let r = self.quick_commit(|txn| {
                    let mut t = txn.open_table(REJECTED)?;
                    t.insert(sync.as_str(), json.as_str())?;
                    Ok(())
                });
                let _ = reply.send(r);
            }
            _ => unreachable!("row records are grouped by `record`"),
        }
    }

    /// Runs `f` in a write transaction committed durably.
    fn durable_commit<T>(
        &mut self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, SnapshotError> {
        self.commit_with(f, |_| true)
    }

    /// Runs `f` in a write transaction committed without an fsync (the next durable commit
    /// carries it).
    fn quick_commit<T>(
        &mut self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, SnapshotError> {
        self.commit_with(f, |_| false)
    }

    /// Runs `f` in a write transaction and commits it, durably when `durable` says so of what
    /// `f` returned.
    fn commit_with<T>(
        &mut self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, redb::Error>,
        durable: impl FnOnce(&T) -> bool,
    ) -> Result<T, SnapshotError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let v = f(&txn).map_err(|e| self.err(e))?;
        let durable = durable(&v);
        self.commit(&mut txn, durable)?;
        txn.commit().map_err(|e| self.err(e))?;
        self.committed(durable);
        Ok(v)
    }

    /// Notes a commit: a durable one makes every commit before it durable.
    fn committed(&mut self, durable: bool) {
        if durable {
            self.undurable = false;
            self.last_durable = Instant::now();
            self.durable += 1;
        } else {
            self.undurable = true;
        }
    }

    /// Runs `f` in a write transaction that is aborted: what it would change, without changing
    /// it (a dry run's start).
    fn trial<T>(
        &mut self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, SnapshotError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let v = f(&txn).map_err(|e| self.err(e))?;
        txn.abort().map_err(|e| self.err(e))?;
        Ok(v)
    }

    /// Reads the sync's metadata and decides how the run treats the stored entries: a new key
    /// definition (or format, or `how.clear`) clears them, a new model (or `how.full_resync`)
    /// rewrites every row.
    fn begin(
        &mut self,
        sync: &Arc<str>,
        key_fp: &str,
        row_fp: &str,
        how: BeginOptions,
        (failed, gate): (Arc<OnceLock<String>>, Arc<Gate>),
    ) -> Result<Begin, SnapshotError> {
        let mut notes = Vec::new();
        let mut cleared = false;
        // The handle is opened again from the metadata this decides.
        self.hashes.remove(sync);
        let durable_from = self.durable;
        let state = self.file.clone();
        let decide = |txn: &WriteTransaction| {
            // Hash files of entries cleared here: removed once that is durably committed.
            let mut dropped: Vec<u64> = Vec::new();
            let mut table = txn.open_table(META)?;
            let old: Option<SyncMeta> = match table.get(&**sync)? {
                Some(v) => Some(serde_json::from_str(v.value()).map_err(storage)?),
                None => None,
            };
            let mut meta = match old {
                Some(m) if readable(m.format) && m.key_fp == key_fp && !how.clear => m,
                old => {
                    if let Some(m) = &old {
                        notes.push(if how.clear {
                            "--rebuild-state: the snapshot's entries were cleared, to be rebuilt from the target".into()
                        } else if !readable(m.format) {
                            format!("state file format {} is not {FORMAT}: starting this sync's snapshot afresh", m.format)
                        } else {
                            "the key columns or their types changed: the snapshot's entries were cleared (they are rebuilt from the target when it has rows)".into()
                        });
                        dropped.extend(m.hashes);
                    }
                    cleared |= clear_entries(txn, sync)?;
                    SyncMeta {
                        format: FORMAT,
                        key_fp: key_fp.into(),
                        ..SyncMeta::default()
                    }
                }
            };
            meta.format = FORMAT;
            if let Some(id) = meta.hashes {
                let path = hashes::path_for(&state, id);
                if let Err(e) = hashes::check(&path, id) {
                    // The entries' hashes are the file's where it has one: without it, the
                    // entries describe the target as it was before the rows it held changed.
                    notes.push(format!("this sync's row hashes file {} cannot be used ({e}): the snapshot's entries are rebuilt from the target", path.display()));
                    cleared |= clear_all(txn, sync, &mut meta, &mut dropped)?;
                }
            }
            if meta.writing {
                // The last run was killed (or its recording failed) after writing: its last
                // entries may be lost while the destination kept the rows.
                notes.push("the last run of this sync ended before it recorded every row it wrote (it was killed, or its state file failed): the snapshot's entries are rebuilt from the target".into());
                cleared |= clear_all(txn, sync, &mut meta, &mut dropped)?;
                meta.writing = false;
            }
            // The entries are rebuilt from the target when there are none, or when the last
            // rebuild did not complete (a partial one is thrown away and started over); not for
            // a full re-sync, which rewrites every row anyway.
            let entries = txn.open_table(rows_def(&rows_name(sync)))?.len()?;
            if how.target_has_rows && !how.full_resync && (entries == 0 || meta.rebuild_pending) {
                if entries > 0 {
                    notes.push("the last rebuild of the snapshot from the target did not complete: rebuilding it again".into());
                    cleared |= clear_all(txn, sync, &mut meta, &mut dropped)?;
                }
                meta.rebuild_pending = true;
            }
            meta.ranges = reconcile_ranges(txn, sync, meta.ranges, how.ranges)?;
            if meta.row_fp.is_none() {
                // No entries exist yet under this key: whatever this run records is written under
                // the current model, so an interrupted first run resumes instead of rewriting.
                meta.row_fp = Some(row_fp.to_string());
            }
            let json = serde_json::to_string(&meta).map_err(storage)?;
            table.insert(&**sync, json.as_str())?;
            let mut free = Vec::new();
            let free_n = free_name(sync);
            for item in txn.open_table(free_def(&free_n))?.iter()? {
                free.push(item?.0.value());
            }
            Ok((meta, free, dropped))
        };
        // A dry run decides the same in a transaction it throws away: it writes nothing. A
        // run's start is committed without an fsync unless hash files are let go: those are
        // removed only once no crash can bring back the entries that point into them.
        let (meta, free) = match how.dry_run {
            true => {
                let (meta, free, _) = self.trial(decide)?;
                (meta, free)
            }
            false => {
                let (meta, free, dropped) =
                    self.commit_with(decide, |(_, _, dropped)| !dropped.is_empty())?;
                for id in dropped {
                    hashes::remove(&self.file, id);
                }
                (meta, free)
            }
        };
        let rebuild = meta.rebuild_pending && how.target_has_rows && !how.full_resync;
        let rewrite_all = if how.full_resync {
            notes.push("--full-resync: every row is rewritten".into());
            true
        } else if meta.row_fp.as_deref() != Some(row_fp) {
            notes.push("the model changed (query, columns, types or mapping): full re-sync, every row is rewritten".into());
            true
        } else {
            false
        };
        self.runs.insert(
            sync.clone(),
            RunState {
                meta: meta.clone(),
                free,
                duplicates: (0, Vec::new()),
                stats: RecorderStats::default(),
                failed,
                gate,
                dry: how.dry_run,
                durable_from,
            },
        );
        Ok(Begin {
            basis: meta.basis.clone(),
            next_slot: meta.next_slot,
            rewrite_all,
            rebuild,
            scratch: how.dry_run && (cleared || rebuild),
            notes,
        })
    }

    fn run_failed(&self, sync: &str) -> Result<(), SnapshotError> {
        match self.runs.get(sync).and_then(|r| r.failed.get()) {
            Some(m) => Err(self.err(m)),
            None => Ok(()),
        }
    }

    fn settle(&mut self, sync: &Arc<str>, forget: Vec<Vec<u8>>) -> Result<Settled, SnapshotError> {
        self.run_failed(sync)?;
        let (count, found) = match self.runs.get_mut(sync) {
            Some(run) => std::mem::take(&mut run.duplicates),
            None => return Err(self.err(format!("no run of sync '{sync}' was begun"))),
        };
        let mut keys = KeyBatch::default();
        for k in forget.iter().chain(found.iter()) {
            keys.push(k);
        }
        if !keys.is_empty() {
            let n = keys.len();
            let cmd = Command::Remove {
                sync: sync.clone(),
                keys: Arc::new(keys),
                rows: 0..n,
            };
            let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
            self.apply(&txn, cmd)?;
            self.write_meta(&txn, std::slice::from_ref(sync))?;
            self.commit(&mut txn, false)?;
            txn.commit().map_err(|e| self.err(e))?;
            self.committed(false);
        }
        Ok(Settled {
            duplicates: count,
            duplicate_keys: found,
        })
    }

    /// Changes the metadata of a run that is going, and saves it (durably when `durable`).
    fn update_meta(
        &mut self,
        sync: &Arc<str>,
        durable: bool,
        change: impl FnOnce(&mut SyncMeta),
    ) -> Result<(), SnapshotError> {
        self.run_failed(sync)?;
        let Some(run) = self.runs.get_mut(sync) else {
            return Err(self.err(format!("no run of sync '{sync}' was begun")));
        };
        change(&mut run.meta);
        if run.dry {
            return Err(self.err(format!("a dry run of sync '{sync}' writes nothing")));
        }
        let meta = run.meta.clone();
        self.save_meta(sync, &meta, durable)
    }

    fn save_meta(
        &mut self,
        sync: &str,
        meta: &SyncMeta,
        durable: bool,
    ) -> Result<(), SnapshotError> {
        let json = serde_json::to_string(meta).map_err(|e| self.err(e))?;
        let save = |txn: &WriteTransaction| {
            txn.open_table(META)?.insert(sync, json.as_str())?;
            Ok(())
        };
        self.commit_with(save, |_| durable)
    }

    /// Not durable: a write to the destination is preceded by the durable writing mark, which
    /// carries this; a crash before it leaves the state file as it was before the run.
    fn drop_basis(&mut self, sync: &Arc<str>) -> Result<(), SnapshotError> {
        self.update_meta(sync, false, |m| m.basis = None)
    }

    /// Durable before the run's first write to the destination.
    fn mark_writing(&mut self, sync: &Arc<str>) -> Result<(), SnapshotError> {
        self.update_meta(sync, true, |m| m.writing = true)
    }

    fn finish(
        &mut self,
        sync: &Arc<str>,
        row_fp: Option<String>,
        basis: Option<Basis>,
    ) -> Result<RecorderStats, SnapshotError> {
        self.run_failed(sync)?;
        let Some(mut run) = self.runs.remove(sync) else {
            return Err(self.err(format!("no run of sync '{sync}' was begun")));
        };
        if row_fp.is_some() {
            // A completed run: a rebuild it began is complete too.
            run.meta.row_fp = row_fp;
            run.meta.rebuild_pending = false;
            run.meta.basis = basis;
        }
        if run.gate.close() {
            run.meta.writing = false;
        }
        if !run.dry {
            // Not durable: the run's log record follows, durably (a crash before it leaves the
            // writing mark of a run that wrote, and the entries are rebuilt from the target).
            self.save_meta(sync, &run.meta, false)?;
            run.stats.commits += 1;
        }
        run.stats.durable = self.durable - run.durable_from;
        Ok(run.stats)
    }

    /// Ends the run `gate` belongs to, if it is still going (it did not finish): its writing
    /// mark is cleared when every write it began is accounted for.
    fn close(&mut self, sync: &Arc<str>, gate: &Arc<Gate>) -> Result<(), SnapshotError> {
        if !self
            .runs
            .get(sync)
            .is_some_and(|r| Arc::ptr_eq(&r.gate, gate))
        {
            return Ok(());
        }
        let mut run = self.runs.remove(sync).expect("checked above");
        if !run.gate.close() || run.failed.get().is_some() || !run.meta.writing || run.dry {
            return Ok(());
        }
        run.meta.writing = false;
        self.save_meta(sync, &run.meta, false)
    }

    fn log_run(&mut self, json: &str) -> Result<u64, SnapshotError> {
        let id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.durable_commit(|txn| {
            let mut t = txn.open_table(RUNS)?;
            let mut id = id;
            while t.get(id)?.is_some() {
                id += 1;
            }
            t.insert(id, json)?;
            Ok(id)
        })
    }
}

/// Keys in a run shorter than this go in one insert each: a cursor's run costs about as much
/// as 32 inserts into one gap, and pays off from about 100 (docs/performance.md, "Cheaper
/// loads").
const MIN_RUN: usize = 64;

/// Inserts the leading entries of `todo` (in ascending key order; `key(i)` is the key of the
/// `i` in each pair) that fall before the table's first entry at or past the first of them,
/// through one cursor, when they are at least [`MIN_RUN`] strictly ascending new keys: returns
/// how many, or `None` (and nothing written) for a shorter run, a first key the table holds,
/// or a key equal to the one before it.
fn insert_run<'k>(
    rows: &mut redb::Table<&'static [u8], &'static [u8; 20]>,
    todo: &[(usize, [u8; 20])],
    key: impl Fn(usize) -> &'k [u8],
) -> Result<Option<usize>, redb::Error> {
    if todo.len() < MIN_RUN {
        return Ok(None);
    }
    let mut cursor = rows.lower_bound_mut(Bound::Included(key(todo[0].0)))?;
    let run = {
        let bound = cursor.peek_next()?;
        let below = |k: &[u8]| bound.as_ref().is_none_or(|(b, _)| k < b.value());
        let mut n = 0;
        while n < todo.len()
            && below(key(todo[n].0))
            && (n == 0 || key(todo[n - 1].0) < key(todo[n].0))
        {
            n += 1;
        }
        n
    };
    if run < MIN_RUN {
        cursor.close()?;
        return Ok(None);
    }
    for &(i, ref entry) in &todo[..run] {
        if let Err(e) = cursor.insert_before(key(i), entry) {
            // Cannot happen for keys checked above; the cursor's error is the one to report.
            let _ = cursor.close();
            return Err(e.into());
        }
    }
    cursor.close()?;
    Ok(Some(run))
}

/// True when a batch's keys are scattered ([`crate::batch::scattered`]: ascending runs shorter
/// than 4 keys on average, as random keys such as UUIDs give; a stream in key order, or a few
/// interleaved, gives long runs).
fn scattered(keys: &KeyBatch) -> bool {
    crate::batch::scattered(keys.len(), |i| keys.key(i))
}

/// The bytes a batch of staged records holds.
fn staged_size(c: &Committed) -> usize {
    c.keys.data.len()
        + c.keys.ends.len() * 4
        + c.entries.len() * std::mem::size_of::<([u8; 16], Option<u32>)>()
}

/// The sync a row record is for.
fn row_sync(c: &Command) -> Option<&Arc<str>> {
    match c {
        Command::Record { sync, .. }
        | Command::Remove { sync, .. }
        | Command::MarkStale { sync, .. } => Some(sync),
        _ => None,
    }
}

/// The sync's hash file: opened on first use, or (with `create`, when the sync has none)
/// created and named in `meta`, which the transaction saves. `None` when the sync has none.
fn hash_file<'a>(
    files: &'a mut HashMap<Arc<str>, HashFile>,
    state: &Path,
    sync: &Arc<str>,
    meta: &mut SyncMeta,
    create: bool,
) -> std::io::Result<Option<&'a mut HashFile>> {
    if !files.contains_key(sync) {
        let f = match meta.hashes {
            Some(id) => HashFile::open(&hashes::path_for(state, id), id)?,
            None if create => {
                let id = hashes::new_id();
                let f = HashFile::create(&hashes::path_for(state, id), id)?;
                meta.hashes = Some(id);
                f
            }
            None => return Ok(None),
        };
        files.insert(sync.clone(), f);
    }
    Ok(files.get_mut(sync))
}

/// [`clear_entries`], and the metadata that goes with them: slots start over, the hash file
/// (noted in `dropped`) is let go.
fn clear_all(
    txn: &WriteTransaction,
    sync: &str,
    meta: &mut SyncMeta,
    dropped: &mut Vec<u64>,
) -> Result<bool, redb::Error> {
    meta.next_slot = 0;
    dropped.extend(meta.hashes.take());
    clear_entries(txn, sync)
}

/// Drops a sync's entries, free slots and tallies per key range; true when it had entries.
fn clear_entries(txn: &WriteTransaction, sync: &str) -> Result<bool, redb::Error> {
    let had = txn.open_table(rows_def(&rows_name(sync)))?.len()? > 0;
    let _ = txn.delete_table(rows_def(&rows_name(sync)));
    let _ = txn.delete_table(free_def(&free_name(sync)));
    let _ = txn.delete_table(ranges_def(&ranges_name(sync)));
    let _ = txn.delete_table(ranges_def(&old_ranges_name(sync)));
    Ok(had)
}

/// Applies the changes (tallies of keys added, and [`key_ranges::Tally::neg`] of keys removed)
/// to the tallies; a range left with no entry is dropped.
fn add_counts(
    ranges: &mut redb::Table<'_, i64, super::format::RangeValue>,
    changes: key_ranges::Counts,
) -> Result<(), redb::Error> {
    for (r, d) in key_ranges::merge(changes) {
        if d == key_ranges::Tally::default() {
            continue;
        }
        let (n, sum) = ranges.get(r)?.map_or((0, 0), |v| v.value());
        // `d.n` wraps: read as signed, it is the entries added less removed.
        match n.checked_add_signed(d.n as i64).filter(|&n| n > 0) {
            Some(n) => {
                ranges.insert(r, (n, sum.wrapping_add(d.sum)))?;
            }
            None => {
                ranges.remove(r)?;
            }
        }
    }
    Ok(())
}

/// The key ranges the sync's entries are tallied by from this run on. The recorded tallies are
/// kept while they fit: the same key width, counts that add up to the entries, and an entry's
/// range holding within 4 times [`PER_RANGE`] entries (or few entries in all). Otherwise they
/// are rebuilt, cut where an entry's range holds nearest [`PER_RANGE`] entries (two walks of
/// the entries), or, with no entries yet, cut as `proposed` (from the source's key spread). No
/// proposal (a model whose key is not one integer with a unique index): no counts.
fn reconcile_ranges(
    txn: &WriteTransaction,
    sync: &str,
    recorded: Option<RangeSpec>,
    proposed: Option<RangeSpec>,
) -> Result<Option<RangeSpec>, redb::Error> {
    let name = ranges_name(sync);
    let _ = txn.delete_table(ranges_def(&old_ranges_name(sync)));
    let Some(proposed) = proposed else {
        let _ = txn.delete_table(ranges_def(&name));
        return Ok(None);
    };
    let rows = txn.open_table(rows_def(&rows_name(sync)))?;
    let entries = rows.len()?;
    if let Some(rec) = recorded.filter(|r| r.width == proposed.width) {
        let counts = txn.open_table(ranges_def(&name))?;
        let (mut n, mut sq) = (0u64, 0f64);
        for item in counts.iter()? {
            let c = item?.1.value().0;
            n += c;
            sq += (c as f64) * (c as f64);
        }
        let held = if n == 0 { PER_RANGE } else { sq / n as f64 };
        let fits = (PER_RANGE / 4.0..=PER_RANGE * 4.0).contains(&held) || n < 4096;
        if n == entries && fits {
            return Ok(Some(rec));
        }
    }
    txn.delete_table(ranges_def(&name))?;
    let mut table = txn.open_table(ranges_def(&name))?;
    if entries == 0 {
        return Ok(Some(proposed));
    }
    let Some(shift) = best_shift(&rows, proposed.width)? else {
        drop(table);
        txn.delete_table(ranges_def(&name))?;
        return Ok(None);
    };
    let spec = RangeSpec { shift, ..proposed };
    tracing::info!(
        "sync '{sync}': counting the snapshot's {entries} entries per key range (ranges of 2^{shift} values; recorded: {recorded:?}), once"
    );
    let mut counts: key_ranges::Counts = Vec::new();
    for item in rows.iter()? {
        if let Some(v) = spec.value(item?.0.value()) {
            let (r, t) = spec.tally_of(v);
            key_ranges::bump(&mut counts, r, t);
        }
    }
    // A walk in byte order meets the negative keys' ranges after the positive ones.
    for (r, t) in key_ranges::merge(counts) {
        table.insert(r, (t.n, t.sum))?;
    }
    Ok(Some(spec))
}

/// The shift at which an entry's range holds nearest [`PER_RANGE`] entries (weighted by
/// entries), from one walk of the entries in key order; `None` when a key is not an integer of
/// `width` bytes. For each shift, the walk adds up the squared lengths of the runs of keys
/// sharing a range; a key that starts no new range at one shift starts none at any coarser one,
/// so each key costs only the shifts where it does.
fn best_shift(
    rows: &redb::Table<'_, &'static [u8], &'static [u8; 20]>,
    width: u8,
) -> Result<Option<u32>, redb::Error> {
    const SHIFTS: usize = 63;
    let values = RangeSpec { width, shift: 0 };
    let (mut start, mut sq) = ([0u64; SHIFTS], [0f64; SHIFTS]);
    let (mut n, mut last) = (0u64, None::<i64>);
    for item in rows.iter()? {
        let Some(v) = values.value(item?.0.value()) else {
            return Ok(None);
        };
        if let Some(p) = last {
            let mut s = 0;
            while s < SHIFTS && (p >> s) != (v >> s) {
                let len = (n - start[s]) as f64;
                sq[s] += len * len;
                start[s] = n;
                s += 1;
            }
        }
        last = Some(v);
        n += 1;
    }
    if n == 0 {
        return Ok(None);
    }
    let held = |s: usize| {
        let len = (n - start[s]) as f64;
        (sq[s] + len * len) / n as f64
    };
    let miss = |s: usize| (held(s) / PER_RANGE).log2().abs();
    Ok((0..SHIFTS)
        .min_by(|&a, &b| miss(a).total_cmp(&miss(b)))
        .map(|s| s as u32))
}

/// Slot allocation for one run, inside one transaction.
struct Slots<'a, 't, E: Fn(&dyn std::fmt::Display) -> SnapshotError> {
    run: &'a mut RunState,
    free: &'a mut redb::Table<'t, u32, ()>,
    err: &'a E,
}

impl<E: Fn(&dyn std::fmt::Display) -> SnapshotError> Slots<'_, '_, E> {
    fn alloc(&mut self) -> Result<u32, SnapshotError> {
        if let Some(s) = self.run.free.pop() {
            self.free.remove(s).map_err(|e| (self.err)(&e))?;
            return Ok(s);
        }
        let s = self.run.meta.next_slot;
        self.run.meta.next_slot = s.checked_add(1).ok_or_else(|| {
            (self.err)(
                &"more than 4 billion snapshot slots: move the state file aside to start afresh",
            )
        })?;
        Ok(s)
    }

    fn release(&mut self, slot: u32) -> Result<(), SnapshotError> {
        self.free.insert(slot, ()).map_err(|e| (self.err)(&e))?;
        self.run.free.push(slot);
        Ok(())
    }
}

/// Wraps a non-redb failure (JSON) inside a closure that returns redb errors.
fn storage(e: impl std::fmt::Display) -> redb::Error {
    redb::Error::Corrupted(e.to_string())
}
