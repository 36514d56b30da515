//! `pgdelta verify`: is the target equal to the model, and does the snapshot describe the
//! target? With `--repair`, write the fixes.
//!
//! 1. **Drift, by the snapshot** (when the sync's snapshot holds entries hashed under this
//!    model). The source model and the target's synced columns are read at once, each by its
//!    own binary COPY, and every row of each is hashed and looked up in the snapshot, which
//!    neither read changes. A row whose hash equals its entry's is the entry's row; only the
//!    rows that do not match (keys the snapshot lacks, hashes that differ) are kept, with their
//!    hashes. Equality is transitive, so a key both sides match is equal on both; the kept rows
//!    are compared directly; an entry one side met and the other did not is a row missing from
//!    (or extra in) the target. No scratch state, no write: two reads and one lookup per row.
//!    Too many unmatched rows (a stale snapshot), a duplicate or a NULL key fall back to 2.
//! 2. **Drift, by a rebuild.** A scratch snapshot (a temporary state file in a directory of its
//!    own beside the sync's, removed afterwards) is rebuilt from the target, and the source is
//!    diffed against it as a dry run: rows *missing* from the target (added), rows that *differ*
//!    (changed) and *extra* rows the model does not have (removed), with sample keys. The same
//!    stages as a sync, so the comparison is by key and row hash, byte for byte; the sync's
//!    snapshot and the scratch one are then walked together in key order for the snapshot
//!    check.
//! 3. **Snapshot check**: entries whose target row is gone or differs (someone wrote in the
//!    target), target rows the snapshot does not know, and stale entries (rejected rows waiting
//!    for a retry).
//! 4. **Repair** (`--repair`, only when there is drift or the snapshot disagrees): a normal sync
//!    that rebuilds the snapshot from the target and propagates deletes, so the fixes go through
//!    the normal writer: batches, retries, rejections and the delete guard.
//!
//! Nothing is written to the target or the state file without `--repair`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::conn::ConnInfo;
use crate::copy::{has_null, Block};
use crate::diff::{self, Bitset};
use crate::error::Error;
use crate::hash::row_hash;
use crate::plan::Plan;
use crate::snapshot::spill::Spill;
use crate::snapshot::{Committed, Entry, Reader, Snapshot, SnapshotError, STALE_HASH};
use crate::source::{read_into, Read, ReadEnd, ReadOf};
use crate::spec::SyncSpec;
use crate::sync::stop::{Stop, StopReason};
use crate::sync::{PipelineSettings, RunOptions, Summary};

/// How many sample keys of each kind a report keeps.
const SAMPLES: usize = 10;

/// Unmatched rows one side of a comparison by the snapshot may keep (about 100 bytes each)
/// before verify falls back to a rebuild: a snapshot this far from the tables is no help.
const MAX_UNMATCHED: usize = 1_000_000;

/// What `verify` found (the `--json` `verify` record).
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub sync: String,
    pub target: String,
    /// How source and target were compared: `snapshot` (both read at once, each row looked
    /// up in the sync's snapshot) or `rebuild` (a scratch snapshot rebuilt from the target).
    pub compared_by: String,
    /// Why the comparison was by a rebuild, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Rows in the model (the source read).
    pub source_rows: u64,
    /// Rows in the target.
    pub target_rows: u64,
    /// In the model, not in the target.
    pub missing: u64,
    /// In both, with different values in the synced columns.
    pub different: u64,
    /// In the target, not in the model.
    pub extra: u64,
    pub sample_missing: Vec<String>,
    pub sample_different: Vec<String>,
    pub sample_extra: Vec<String>,
    /// The sync's snapshot against the target.
    pub snapshot: SnapshotCheck,
    /// No drift and the snapshot agrees with the target.
    pub equal: bool,
    /// With `--repair`: what the repairing run did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<Summary>,
    pub duration_s: f64,
    pub peak_rss_bytes: u64,
    /// CPU time of this process (user + system), seconds.
    pub cpu_s: f64,
}

/// The sync's snapshot compared with the target.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotCheck {
    pub entries: u64,
    /// Entries whose hash equals the target row's.
    pub matching: u64,
    /// Entries whose target row differs (the target was written by someone else).
    pub differing: u64,
    /// Entries whose row is not in the target (deleted by someone else).
    pub gone_from_target: u64,
    /// Target rows the snapshot has no entry for.
    pub unknown_to_snapshot: u64,
    /// Entries of rows the destination rejected, waiting to be retried (expected to differ).
    pub stale: u64,
    pub sample_differing: Vec<String>,
    pub sample_gone: Vec<String>,
    pub sample_unknown: Vec<String>,
}

impl SnapshotCheck {
    pub fn agrees(&self) -> bool {
        self.differing == 0 && self.gone_from_target == 0 && self.unknown_to_snapshot == 0
    }
}

/// Verifies one sync; repairs it with `repair`. `opts.shutdown` stops it like a sync.
pub async fn verify(
    source: &ConnInfo,
    dest: &ConnInfo,
    spec: &SyncSpec,
    opts: &RunOptions,
    snapshot: &Snapshot,
    repair: bool,
) -> Result<VerifyReport, Error> {
    let started = Instant::now();
    let plan = {
        let src = source.connect("source", &[]).await?;
        let dst = dest.connect("destination", &[]).await?;
        Arc::new(crate::plan::plan(&src, &dst, spec).await?)
    };
    let by_snapshot = match usable(snapshot, spec, &plan)? {
        Ok(reader) => by_snapshot(source, dest, spec, opts, &plan, (reader, snapshot)).await?,
        Err(why) => Err(why),
    };
    let mut report = match by_snapshot {
        Ok(report) => report,
        Err(why) => {
            tracing::info!("sync '{}': verify compares by a rebuild: {why}", spec.name);
            let mut r = by_rebuild(source, dest, spec, opts, snapshot, &plan).await?;
            r.note = Some(why);
            r
        }
    };
    if repair && !report.equal {
        let mut fix = spec.clone();
        fix.delete = true;
        let run = RunOptions {
            rebuild_state: true,
            dry_run: false,
            full_resync: false,
            full_read: true,
            ..opts.clone()
        };
        report.repair = Some(crate::sync::run(source, dest, &fix, &run, snapshot).await?);
    }
    report.duration_s = started.elapsed().as_secs_f64();
    report.peak_rss_bytes = crate::sync::peak_rss_bytes();
    report.cpu_s = crate::sync::cpu_seconds();
    Ok(report)
}

/// The sync's snapshot, when its entries were hashed under this model (else why not).
fn usable(
    snapshot: &Snapshot,
    spec: &SyncSpec,
    plan: &Plan,
) -> Result<Result<Reader, String>, Error> {
    let meta = snapshot
        .syncs()?
        .into_iter()
        .find(|(name, _, _)| *name == spec.name);
    let why = match meta {
        None => "the state file has no snapshot of this sync".to_string(),
        Some((_, _, 0)) => "the sync's snapshot has no entries".into(),
        Some((_, m, _)) if m.rebuild_pending => {
            "the sync's snapshot is a rebuild that did not finish".into()
        }
        Some((_, m, _)) if m.key_fp != plan.key_fp || m.row_fp.as_deref() != Some(&plan.row_fp) => {
            "the sync's snapshot was recorded under another model (its hashes cannot be compared)"
                .into()
        }
        Some(_) => return Ok(Ok(snapshot.reader(&spec.name)?)),
    };
    Ok(Err(why))
}

/// Step 2 of the module doc: a scratch snapshot rebuilt from the target, the source diffed
/// against it as a dry run, and the two snapshots walked together.
async fn by_rebuild(
    source: &ConnInfo,
    dest: &ConnInfo,
    spec: &SyncSpec,
    opts: &RunOptions,
    snapshot: &Snapshot,
    plan: &Plan,
) -> Result<VerifyReport, Error> {
    // Beside the state file, with its page cache: the rebuild inserts, and the diff looks up,
    // every row here, as a sync does in its own.
    let scratch = snapshot.scratch()?;
    let scratch = &scratch.snapshot;
    // A dry run against a snapshot rebuilt from the target: the drift, nothing written. The
    // delete guard is for writes; here removed rows are only counted.
    let mut probe = spec.clone();
    probe.delete = false;
    let dry = RunOptions {
        dry_run: true,
        rebuild_state: true,
        full_resync: false,
        full_read: true,
        progress: opts.progress,
        timeline: false,
        shutdown: opts.shutdown.clone(),
        // Nothing is written: no audit log for the probe.
        audit: None,
        order: None,
    };
    let drift = crate::sync::run(source, dest, &probe, &dry, scratch).await?;
    let mine = snapshot.reader(&spec.name)?;
    let check = compare(&mine, &scratch.reader(&spec.name)?, plan)?;
    Ok(VerifyReport {
        sync: spec.name.clone(),
        target: drift.target.clone(),
        compared_by: "rebuild".into(),
        source_rows: drift.rows_read,
        target_rows: drift.rebuilt_from_target,
        missing: drift.added,
        different: drift.changed,
        extra: drift.removed,
        sample_missing: drift.sample_added.clone(),
        sample_different: drift.sample_changed.clone(),
        sample_extra: drift.sample_removed.clone(),
        equal: drift.added + drift.changed + drift.removed == 0 && check.agrees(),
        snapshot: check,
        ..Default::default()
    })
}

/// A row of one side that its snapshot entry does not vouch for.
#[derive(Clone, Copy)]
struct Unmatched {
    hash: [u8; 16],
    /// The entry's slot and whether it is stale; `None`: the snapshot has no such key.
    entry: Option<(u32, bool)>,
}

/// What reading one side and looking every row up in the snapshot found.
#[derive(Default)]
struct Side {
    rows: u64,
    /// Slots of the entries met (whatever the row's hash).
    seen: Bitset,
    seen_entries: u64,
    unmatched: HashMap<Vec<u8>, Unmatched>,
    /// Why this side cannot be compared by the snapshot (a duplicate or NULL key, too many
    /// unmatched rows).
    problem: Option<String>,
}

/// The snapshot both sides are looked up in, and where the state file is (rows a side writes
/// to disk go beside it).
struct Against {
    reader: Arc<Reader>,
    dir: PathBuf,
    path: String,
}

/// Reads `copy` from `conn` and looks every row up in the snapshot.
async fn read_side(
    conn: &ConnInfo,
    role: &'static str,
    of: ReadOf,
    copy: String,
    spec: &SyncSpec,
    plan: &Arc<Plan>,
    against: &Arc<Against>,
    stop: &Stop,
) -> Result<Side, Error> {
    let pipe = PipelineSettings::default();
    let settings = crate::source::session_settings(spec.read_timeout);
    let client = Arc::new(conn.connect_reader(role, &settings).await?);
    let read = Read {
        conn: conn.clone(),
        clients: vec![client],
        prelude: Vec::new(),
        copies: vec![copy],
        newest_last: false,
        of,
    };
    let against = against.clone();
    let (stats, side) = read_into(
        read,
        plan.clone(),
        (pipe.block_queue, pipe.block_bytes),
        spec.name.clone(),
        stop.clone(),
        move |rx| {
            let merge = (MERGE_ABOVE, MERGE_WINDOW_BYTES);
            look_up(rx, &against.reader, &against.dir, &against.path, merge)
        },
    )
    .await?;
    let side = side?;
    let stats = stats?;
    if stats.end != ReadEnd::Complete && side.problem.is_none() {
        return Err(Error::Interrupted {
            sync: spec.name.clone(),
            message: "verify was stopped before it read both tables; nothing was written".into(),
        });
    }
    Ok(side)
}

/// Looks up every row of the blocks in the snapshot; keeps the rows it does not vouch for.
/// Returns early (closing the channel, which ends the read) on a problem. Rows whose keys come
/// scattered (random UUIDs), against a snapshot of more than [`MERGE_ABOVE`] entries, are
/// looked up by [`look_up_merged`].
fn look_up(
    mut rx: mpsc::Receiver<Block>,
    reader: &Reader,
    dir: &Path,
    path: &str,
    (merge_above, window_bytes): (u64, usize),
) -> Result<Side, Error> {
    let mut side = Side {
        seen: Bitset::with_len(reader.len() as usize),
        ..Default::default()
    };
    let mut first = rx.blocking_recv();
    let scattered = first
        .as_ref()
        .is_some_and(|b| crate::batch::scattered(b.rows.len(), |i| b.rows[i].key(&b.data)));
    if scattered && reader.len() > merge_above {
        match Spill::create(dir, true) {
            Ok(spill) => {
                let input = (first, rx, window_bytes);
                return look_up_merged(input, reader, spill, path, side);
            }
            Err(e) => tracing::warn!(
                "state file {path}: verify cannot write its rows' keys to {} ({e}): it looks them up a window at a time, which costs more for random keys",
                dir.display()
            ),
        }
    }
    diff::look_up_stream(
        || {
            let block = first.take().or_else(|| rx.blocking_recv())?;
            Some((block, !rx.is_empty()))
        },
        reader,
        |block, looked| {
            for (span, &(hash, found)) in block.rows.iter().zip(looked) {
                if !check(&mut side, span.key(&block.data), hash, found) {
                    return Ok(false);
                }
            }
            Ok::<_, Error>(true)
        },
    )?;
    Ok(side)
}

/// Verify looks rows up through sorted runs on disk ([`look_up_merged`]) when their keys come
/// scattered and the snapshot holds more than this many entries; below it, a few windows of
/// rows cover the snapshot.
const MERGE_ABOVE: u64 = 500_000;

/// Bytes of keys and hashes gathered before they go to disk, sorted.
const MERGE_WINDOW_BYTES: usize = 16 << 20;

/// Looks up a side whose keys come scattered: every row's key and hash go to disk in sorted runs
/// ([`Spill`]), merged after the read into one stream in key order that meets the snapshot's
/// entries in one forward walk. A window of scattered keys looked up on its own walks most of a
/// large snapshot, so looking the rows up window by window costs windows x entries.
fn look_up_merged(
    (mut first, mut rx, window_bytes): (Option<Block>, mpsc::Receiver<Block>, usize),
    reader: &Reader,
    mut spill: Spill,
    path: &str,
    mut side: Side,
) -> Result<Side, Error> {
    let io = |e: std::io::Error| SnapshotError::Storage {
        path: path.to_string(),
        message: format!("verify's rows on disk: {e}"),
    };
    let mut window = Committed::default();
    while let Some(block) = first.take().or_else(|| rx.blocking_recv()) {
        let hashes: Vec<[u8; 16]> = block
            .rows
            .par_iter()
            .map(|r| row_hash(r.value(&block.data)))
            .collect();
        for (r, hash) in block.rows.iter().zip(hashes) {
            window.keys.push(r.key(&block.data));
            window.entries.push((hash, None));
        }
        if window.keys.data.len() + 24 * window.entries.len() >= window_bytes {
            spill.push(&std::mem::take(&mut window)).map_err(io)?;
        }
    }
    drop(rx);
    spill.push(&window).map_err(io)?;
    let checked = |keys: &[&[u8]], entries: &[([u8; 16], Option<u32>)], found: &[Option<_>]| {
        (0..keys.len()).all(|i| check(&mut side, keys[i], entries[i].0, found[i]))
    };
    // Both sides walk at once: a merge thread each measured no faster, and 35-40 MiB larger.
    spill.walk(reader, false, checked, |_| {})?;
    Ok(side)
}

/// Takes one row of a side (its key, its hash and the snapshot's entry for the key): counts it,
/// marks the entry, keeps the row when the entry does not vouch for it. False on a problem.
fn check(side: &mut Side, key: &[u8], hash: [u8; 16], found: Option<Entry>) -> bool {
    side.rows += 1;
    let unmatched = match found {
        _ if has_null(key) => {
            side.problem = Some("a key is NULL".into());
            return false;
        }
        Some(e) => {
            if !side.seen.insert(e.slot) {
                side.problem = Some("a key occurs twice".into());
                return false;
            }
            side.seen_entries += 1;
            if e.hash == hash {
                return true;
            }
            Unmatched {
                hash,
                entry: Some((e.slot, e.hash == STALE_HASH)),
            }
        }
        None => Unmatched { hash, entry: None },
    };
    if side.unmatched.insert(key.to_vec(), unmatched).is_some() {
        side.problem = Some("a key occurs twice".into());
        return false;
    }
    if side.unmatched.len() > MAX_UNMATCHED {
        side.problem = Some(format!(
            "more than {MAX_UNMATCHED} rows of one side differ from the sync's snapshot"
        ));
        return false;
    }
    true
}

/// Step 1 of the module doc. `Err(why)` when the snapshot cannot settle it.
async fn by_snapshot(
    source: &ConnInfo,
    dest: &ConnInfo,
    spec: &SyncSpec,
    opts: &RunOptions,
    plan: &Arc<Plan>,
    (reader, snapshot): (Reader, &Snapshot),
) -> Result<Result<VerifyReport, String>, Error> {
    let against = Arc::new(Against {
        reader: Arc::new(reader),
        dir: snapshot.dir(),
        path: snapshot.path().to_string(),
    });
    let reader = &against.reader;
    let stop = Stop::child_of(&opts.shutdown);
    let select = match &plan.table {
        Some(t) => t.select(&t.list(), None),
        None => plan.select.clone(),
    };
    let copy = |select: &str| format!("COPY ({select}) TO STDOUT (FORMAT binary)");
    // A side that fails stops the other; its error is the one reported.
    let (against_ref, stop_ref) = (&against, &stop);
    let side = |conn, role, of, copy| async move {
        let r = read_side(conn, role, of, copy, spec, plan, against_ref, stop_ref).await;
        if r.is_err() {
            stop_ref.stop(StopReason::WriterFailed);
        }
        r
    };
    let (s, t) = tokio::join!(
        side(source, "source", ReadOf::Source, copy(&select)),
        side(
            dest,
            "destination",
            ReadOf::TargetCheck,
            plan.target_copy_sql()
        ),
    );
    let (s, t) = match (s, t) {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e @ Error::Interrupted { .. }), Err(f)) => {
            return Err(if stop.reason() == Some(StopReason::Interrupted) {
                e
            } else {
                f
            })
        }
        (Err(e), _) | (_, Err(e)) => return Err(e),
    };
    if let Some(p) = s
        .problem
        .as_ref()
        .map(|p| format!("in the model, {p}"))
        .or_else(|| t.problem.as_ref().map(|p| format!("in the target, {p}")))
    {
        return Ok(Err(p));
    }
    Ok(Ok(tally(spec, plan, reader, &s, &t)?))
}

/// The sample keys of one kind: the first [`SAMPLES`] in key order, whatever order they come in.
#[derive(Default)]
struct Samples(Vec<Vec<u8>>);

impl Samples {
    fn add(&mut self, key: &[u8]) {
        self.0.push(key.to_vec());
        if self.0.len() >= 8 * SAMPLES {
            self.trim();
        }
    }
    fn trim(&mut self) {
        self.0.sort_unstable();
        self.0.dedup();
        self.0.truncate(SAMPLES);
    }
    fn describe(mut self, plan: &Plan) -> Vec<String> {
        self.trim();
        self.0.iter().map(|k| plan.describe_key(k)).collect()
    }
}

/// The report from the two sides.
fn tally(
    spec: &SyncSpec,
    plan: &Plan,
    reader: &Reader,
    s: &Side,
    t: &Side,
) -> Result<VerifyReport, Error> {
    let (mut missing, mut different, mut extra) = (0u64, 0u64, 0u64);
    let (mut sm, mut sd, mut se) = (Samples::default(), Samples::default(), Samples::default());
    // Rows the source does not match: compared with the target's row for that key.
    for (key, u) in &s.unmatched {
        let other = match u.entry {
            // An entry the target did not meet: the row is missing there (counted below).
            Some((slot, _)) if !t.seen.contains(slot) => continue,
            // The target's row is the entry's unless the target did not match it either.
            Some(_) => t.unmatched.get(key).map(|o| o.hash),
            None => match t.unmatched.get(key) {
                Some(o) => Some(o.hash),
                None => {
                    missing += 1;
                    sm.add(key);
                    continue;
                }
            },
        };
        if other != Some(u.hash) {
            different += 1;
            sd.add(key);
        }
    }
    let mut c = SnapshotCheck {
        entries: reader.len(),
        ..Default::default()
    };
    let (mut cd, mut cu, mut cg) = (Samples::default(), Samples::default(), Samples::default());
    // Rows the target does not match: the snapshot check, and drift the loop above left.
    for (key, u) in &t.unmatched {
        match u.entry {
            None => {
                c.unknown_to_snapshot += 1;
                cu.add(key);
                if !s.unmatched.contains_key(key) {
                    extra += 1;
                    se.add(key);
                }
            }
            Some((slot, stale)) => {
                if stale {
                    c.stale += 1;
                } else {
                    c.differing += 1;
                    cd.add(key);
                }
                if !s.seen.contains(slot) {
                    extra += 1;
                    se.add(key);
                } else if !s.unmatched.contains_key(key) {
                    // The source's row is the entry's, the target's is not.
                    different += 1;
                    sd.add(key);
                }
            }
        }
    }
    c.matching = t.seen_entries - (c.differing + c.stale);
    c.gone_from_target = reader.len() - t.seen_entries;
    // Entries one side met and the other did not: one walk of the snapshot, only when there
    // are any.
    if s.seen_entries < reader.len() || t.seen_entries < reader.len() {
        reader.scan_slots(|key, slot| {
            let (in_s, in_t) = (s.seen.contains(slot), t.seen.contains(slot));
            if !in_t {
                cg.add(key);
                if in_s {
                    missing += 1;
                    sm.add(key);
                }
            } else if !in_s && !t.unmatched.contains_key(key) {
                // Matched in the target, absent from the model (unmatched ones are counted above).
                extra += 1;
                se.add(key);
            }
            true
        })?;
    }
    c.sample_differing = cd.describe(plan);
    c.sample_unknown = cu.describe(plan);
    c.sample_gone = cg.describe(plan);
    let equal = missing + different + extra == 0 && c.agrees();
    Ok(VerifyReport {
        sync: spec.name.clone(),
        target: plan.target.clone(),
        compared_by: "snapshot".into(),
        source_rows: s.rows,
        target_rows: t.rows,
        missing,
        different,
        extra,
        sample_missing: sm.describe(plan),
        sample_different: sd.describe(plan),
        sample_extra: se.describe(plan),
        snapshot: c,
        equal,
        ..Default::default()
    })
}

/// Walks the sync's snapshot and the one rebuilt from the target together in key order.
fn compare(mine: &Reader, target: &Reader, plan: &Plan) -> Result<SnapshotCheck, Error> {
    let mut c = SnapshotCheck {
        entries: mine.len(),
        ..Default::default()
    };
    mine.merge_with(target, |key, m, t| {
        match (m, t) {
            (Some(m), Some(t)) if m.hash == t.hash => c.matching += 1,
            (Some(m), Some(_)) if m.hash == STALE_HASH => c.stale += 1,
            (Some(_), Some(_)) => {
                c.differing += 1;
                sample(&mut c.sample_differing, || plan.describe_key(key));
            }
            (Some(_), None) => {
                c.gone_from_target += 1;
                sample(&mut c.sample_gone, || plan.describe_key(key));
            }
            (None, Some(_)) => {
                c.unknown_to_snapshot += 1;
                sample(&mut c.sample_unknown, || plan.describe_key(key));
            }
            (None, None) => {}
        }
        true
    })?;
    Ok(c)
}

fn sample(into: &mut Vec<String>, key: impl FnOnce() -> String) {
    if into.len() < SAMPLES {
        into.push(key());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::{encode, frame_all};
    use crate::snapshot::testing::{ended_read, seeded};

    /// A uuid-like key field's bytes (16), scattered by `i`.
    fn key(i: u64) -> Vec<u8> {
        let mut k = i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes().to_vec();
        k.extend_from_slice(&i.to_be_bytes());
        k
    }

    /// Blocks of 100 two-column tuples: the key `i` names and a value, `b"v"` unless `drift`
    /// says otherwise.
    fn blocks(ids: &[u64], drift: impl Fn(u64) -> bool) -> Vec<Block> {
        ids.chunks(100)
            .map(|c| {
                let rows: Vec<(Vec<u8>, &[u8])> = c
                    .iter()
                    .map(|&i| (key(i), if drift(i) { &b"w"[..] } else { &b"v"[..] }))
                    .collect();
                let stream = encode(rows.iter().map(|(k, v)| vec![Some(&k[..]), Some(*v)]));
                frame_all(&stream, 2, 1).unwrap()
            })
            .collect()
    }

    fn side(reader: &Reader, dir: &Path, blocks: Vec<Block>, merge: (u64, usize)) -> Side {
        look_up(ended_read(blocks), reader, dir, "v.redb", merge).unwrap()
    }

    /// A side looked up through sorted runs on disk finds what the windows find: the rows, the
    /// entries met, the rows the snapshot does not vouch for (changed, unknown), a key twice.
    #[test]
    fn rows_merged_from_disk_match_the_windows() {
        let dir = tempfile::tempdir().unwrap();
        // The snapshot: 3,000 rows of value "v".
        let block = &blocks(&(0..3_000).collect::<Vec<_>>(), |_| false);
        let mut c = Committed::default();
        for b in block {
            for r in &b.rows {
                c.keys.push(r.key(&b.data));
                c.entries.push((row_hash(r.value(&b.data)), None));
            }
        }
        let snap = seeded(&dir.path().join("v.redb"), "v", c);
        let reader = snap.reader("v").unwrap();
        // The side: 2,500 of them (every 7th drifted) and 200 the snapshot lacks.
        let ids: Vec<u64> = (500..3_000).chain(9_000..9_200).collect();
        let drift = |i: u64| i % 7 == 0;
        let merged = side(&reader, dir.path(), blocks(&ids, drift), (0, 4 << 10));
        let windows = side(&reader, dir.path(), blocks(&ids, drift), (u64::MAX, 0));
        let drifted = (500..3_000).filter(|&i| drift(i)).count();
        for s in [&merged, &windows] {
            assert_eq!((s.rows, s.seen_entries), (2_700, 2_500));
            assert_eq!(s.unmatched.len(), drifted + 200);
            assert_eq!(s.problem, None);
        }
        let unmatched = |s: &Side| {
            let mut u: Vec<_> = s
                .unmatched
                .iter()
                .map(|(k, u)| (k.clone(), u.hash, u.entry))
                .collect();
            u.sort();
            u
        };
        assert_eq!(unmatched(&merged), unmatched(&windows));
        let seen = |s: &Side| (0..3_000).filter(|&i| s.seen.contains(i)).count();
        assert_eq!((seen(&merged), seen(&windows)), (2_500, 2_500));
        let mut twice = ids.clone();
        twice.insert(1_000, 1_234);
        let s = side(&reader, dir.path(), blocks(&twice, drift), (0, 4 << 10));
        assert_eq!(s.problem.as_deref(), Some("a key occurs twice"));
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "only the state file is left");
    }
}
