//! `pgdelta verify`: is the target equal to the model, and does the snapshot describe the
//! target? With `--repair`, write the fixes.
//!
//! 1. **Drift.** A scratch snapshot (a temporary state file) is rebuilt from the target, and the
//!    source is diffed against it as a dry run: rows *missing* from the target (added), rows
//!    that *differ* (changed) and *extra* rows the model does not have (removed), with sample
//!    keys. The same stages as a sync, so the comparison is by key and row hash, byte for byte.
//! 2. **Snapshot check.** The sync's own snapshot and the scratch one are walked together in key
//!    order (two sequential scans, no point lookups):
//!    entries whose target row is gone or differs (someone wrote in the target), target rows
//!    the snapshot does not know, and stale entries (rejected rows waiting for a retry).
//! 3. **Repair** (`--repair`, only when there is drift or the snapshot disagrees): a normal sync
//!    that rebuilds the snapshot from the target and propagates deletes, so the fixes go through
//!    the normal writer: batches, retries, rejections and the delete guard.
//!
//! Nothing is written to the target or the state file without `--repair`.

use std::time::Instant;

use serde::Serialize;

use crate::conn::ConnInfo;
use crate::error::Error;
use crate::plan::Plan;
use crate::snapshot::{Reader, Snapshot, STALE_HASH};
use crate::spec::SyncSpec;
use crate::sync::{RunOptions, Summary};

/// How many sample keys of each kind a report keeps.
const SAMPLES: usize = 10;

/// What `verify` found (the `--json` `verify` record).
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub sync: String,
    pub target: String,
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
    let scratch_dir = tempfile::Builder::new()
        .prefix("pgdelta-verify-")
        .tempdir()
        .map_err(|e| Error::Internal(format!("cannot create a scratch directory: {e}")))?;
    // The same page cache as a sync's snapshot: the rebuild inserts, and the diff looks up,
    // every row here, as a sync does in its own.
    let cache = crate::snapshot::DEFAULT_CACHE_BYTES;
    let scratch = Snapshot::open(&scratch_dir.path().join("target.redb"), cache)?;
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
    };
    let drift = crate::sync::run(source, dest, &probe, &dry, &scratch).await?;
    let plan = {
        let src = source.connect("source", &[]).await?;
        let dst = dest.connect("destination", &[]).await?;
        crate::plan::plan(&src, &dst, spec).await?
    };
    let mine = snapshot.reader(&spec.name)?;
    let check = compare(&mine, &scratch.reader(&spec.name)?, &plan)?;
    drop(mine);
    drop(scratch);
    let mut report = VerifyReport {
        sync: spec.name.clone(),
        target: drift.target.clone(),
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
        repair: None,
        duration_s: 0.0,
        peak_rss_bytes: 0,
        cpu_s: 0.0,
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
