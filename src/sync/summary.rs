//! What a run did, built once from the typed results of its stages: the `--json` summary and
//! the run records of `pgdelta log`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::diff::DiffCounts;
use crate::plan::Plan;
use crate::sink::{Rejection, Rejections, SizerStats, WriteStats};
use crate::source::ReadStats;

/// Every committed batch: (seconds since the start, rows, commit latency in ms).
pub type BatchTimeline = Vec<(f32, u32, f32)>;
/// Rows read over time: (seconds since the start, rows).
pub type ReadTimeline = Vec<(f32, u64)>;

/// What a run did: the `--json` summary, and the run record of a finished run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub sync: String,
    pub target: String,
    pub mode: String,
    pub strategy: String,
    /// How the source was read: `full` (the whole model) or `delta` (rows written since the
    /// last run, a count, and the keys when rows left).
    #[serde(default)]
    pub read_strategy: String,
    /// Why, in words.
    #[serde(default)]
    pub read_strategy_reason: String,
    /// Source sessions that read the model (more than 1: a read split into parts under one
    /// snapshot).
    #[serde(default)]
    pub read_sessions: u32,
    pub dry_run: bool,
    pub full_resync: bool,
    pub rows_read: u64,
    pub bytes_read: u64,
    pub added: u64,
    pub changed: u64,
    pub unchanged: u64,
    pub removed: u64,
    /// Rows of the target recorded into an empty snapshot before the read (a new or lost state
    /// file over a filled target, or `--rebuild-state`); 0 when the snapshot was used as it was.
    pub rebuilt_from_target: u64,
    /// Delta reads that looked for removed rows: the keys read to find them (every key, or
    /// only those of the key ranges that lost rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_read: Option<u64>,
    /// Removed rows deleted from the destination (0 unless deletes are on).
    pub deleted: u64,
    pub rejected: u64,
    /// Of the rejected rows: new rows, changed rows, deletes.
    pub rejected_added: u64,
    pub rejected_changed: u64,
    pub rejected_removed: u64,
    /// The first rejected rows: key, SQLSTATE, message.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected_rows: Vec<Rejection>,
    /// Rows inserted or updated in the destination.
    pub written: u64,
    pub already_present: u64,
    pub duplicate_keys: u64,
    pub null_keys: u64,
    pub batches: u64,
    pub min_batch: usize,
    pub max_batch: usize,
    pub timeouts: u64,
    pub retries: u64,
    pub reconnects: u64,
    /// Effective `statement_timeout` of the writer sessions (None: no limit).
    pub destination_statement_timeout_ms: Option<u64>,
    /// Effective `statement_timeout` of the source read session, as the server shows it.
    pub source_statement_timeout: Option<String>,
    pub duration_s: f64,
    pub rows_per_s: f64,
    pub peak_rss_bytes: u64,
    /// CPU time of this process so far (user + system), seconds.
    pub cpu_s: f64,
    /// Batch commit latency percentiles, ms.
    pub batch_latency_ms_p50: f32,
    pub batch_latency_ms_p95: f32,
    pub batch_latency_ms_p99: f32,
    /// Seconds from the start at which each phase ended.
    pub phases: Phases,
    /// With `RunOptions::timeline`: every batch as (seconds, rows, latency ms), and rows read
    /// over time as (seconds, rows).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub batch_timeline: BatchTimeline,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub read_timeline: ReadTimeline,
    pub notes: Vec<String>,
    /// Dry run: sample keys of each kind.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sample_added: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sample_changed: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sample_removed: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Phases {
    /// The source read ended (connections and planning included).
    pub read_s: f64,
    /// Every upsert/insert batch was committed.
    pub writes_done_s: f64,
    /// Removed rows were found and (with deletes on) deleted, and the snapshot thread had
    /// recorded every row written (the read stage's end).
    pub deletes_done_s: f64,
    /// Delta reads: the count of the model's rows and written rows ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_s: Option<f64>,
    /// Delta reads that read the keys: the key-only read and its lookups ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_read_s: Option<f64>,
}

/// How far a run got, updated by its stages as they go: what a failed run can still report
/// (the audit log's counts of a failed run).
#[derive(Debug, Default)]
pub struct Progress {
    /// Rows read from the source so far.
    pub rows_read: AtomicU64,
    /// Rows the current read is expected to return (the table's statistics for a full read, the
    /// count for a delta read); 0 when unknown.
    pub expected_rows: AtomicU64,
    /// Rows the destination committed (inserted or updated), and deleted.
    pub written: AtomicU64,
    pub deleted: AtomicU64,
    /// Rows rejected: new rows, changed rows, deletes.
    pub rejected_added: AtomicU64,
    pub rejected_changed: AtomicU64,
    pub rejected_removed: AtomicU64,
}

impl Progress {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }

    /// The counts so far, as a failed run reports them.
    pub fn so_far(&self) -> SoFar {
        let get = |v: &AtomicU64| v.load(Ordering::Relaxed);
        SoFar {
            rows_read: get(&self.rows_read),
            written: get(&self.written),
            deleted: get(&self.deleted),
            rejected: get(&self.rejected_added)
                + get(&self.rejected_changed)
                + get(&self.rejected_removed),
        }
    }
}

/// What a run had done when it failed: the `--json` error line's counts. Rows written and
/// deleted were committed by the destination (and recorded in the snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoFar {
    pub rows_read: u64,
    pub written: u64,
    pub deleted: u64,
    pub rejected: u64,
}

/// A run record in the state file (`pgdelta log`): a finished run's summary, or a failed run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RunRecord {
    Failed(FailedRun),
    Finished(Box<Summary>),
}

impl RunRecord {
    pub fn sync(&self) -> &str {
        match self {
            RunRecord::Failed(f) => &f.sync,
            RunRecord::Finished(s) => &s.sync,
        }
    }
}

/// A run that ended with an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedRun {
    pub sync: String,
    pub error: String,
    pub duration_s: f64,
}

/// The typed results a summary is built from.
pub(crate) struct Parts<'a> {
    pub(crate) sync: &'a str,
    pub(crate) plan: &'a Plan,
    pub(crate) mode: &'a str,
    pub(crate) strategy: &'a str,
    pub(crate) read_strategy: &'a str,
    pub(crate) read_strategy_reason: &'a str,
    pub(crate) read_sessions: u32,
    pub(crate) dry_run: bool,
    pub(crate) rewrite_all: bool,
    pub(crate) read: ReadStats,
    pub(crate) counts: DiffCounts,
    /// Duplicate keys in all (found by the diff and by the snapshot).
    pub(crate) duplicates: u64,
    pub(crate) removed: u64,
    pub(crate) rebuilt: u64,
    pub(crate) written: WriteStats,
    pub(crate) rejections: Rejections,
    pub(crate) batches: SizerStats,
    pub(crate) latency_ms: [f32; 3],
    pub(crate) timeouts: (Option<String>, Option<u64>),
    pub(crate) phases: Phases,
    pub(crate) keys_read: Option<u64>,
    pub(crate) timelines: Option<(BatchTimeline, ReadTimeline)>,
    pub(crate) notes: Vec<String>,
    /// Sample keys added, changed, removed.
    pub(crate) samples: [Vec<String>; 3],
}

impl Summary {
    pub(crate) fn build(p: Parts<'_>) -> Summary {
        let duration_s = p.phases.deletes_done_s;
        let [sample_added, sample_changed, sample_removed] = p.samples;
        let (batch_timeline, read_timeline) = p.timelines.unwrap_or_default();
        Summary {
            sync: p.sync.into(),
            target: p.plan.target.clone(),
            mode: p.mode.into(),
            strategy: p.strategy.into(),
            read_strategy: p.read_strategy.into(),
            read_strategy_reason: p.read_strategy_reason.into(),
            read_sessions: p.read_sessions,
            dry_run: p.dry_run,
            full_resync: p.rewrite_all,
            rows_read: p.read.rows,
            bytes_read: p.read.bytes,
            added: p.counts.added,
            changed: p.counts.changed,
            unchanged: p.counts.unchanged,
            removed: p.removed,
            rebuilt_from_target: p.rebuilt,
            keys_read: p.keys_read,
            deleted: p.written.deleted,
            rejected: p.rejections.count,
            rejected_added: p.rejections.added,
            rejected_changed: p.rejections.changed,
            rejected_removed: p.rejections.removed,
            rejected_rows: p.rejections.rows,
            written: p.written.rows,
            already_present: p.written.already_present,
            duplicate_keys: p.duplicates,
            null_keys: p.counts.null_keys,
            batches: p.written.batches,
            min_batch: p.batches.min_batch,
            max_batch: p.batches.max_batch,
            timeouts: p.batches.timeouts,
            retries: p.written.retries,
            reconnects: p.written.reconnects,
            destination_statement_timeout_ms: p.timeouts.1,
            source_statement_timeout: p.timeouts.0,
            duration_s,
            rows_per_s: p.read.rows as f64 / duration_s.max(1e-9),
            peak_rss_bytes: peak_rss_bytes(),
            cpu_s: cpu_seconds(),
            batch_latency_ms_p50: p.latency_ms[0],
            batch_latency_ms_p95: p.latency_ms[1],
            batch_latency_ms_p99: p.latency_ms[2],
            phases: p.phases,
            batch_timeline,
            read_timeline,
            notes: p.notes,
            sample_added,
            sample_changed,
            sample_removed,
        }
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes; 0 when unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// CPU time (user + system) this process used so far, in seconds.
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both kinds of run record read back as their kind, old records included.
    #[test]
    fn run_records_round_trip() {
        let failed = r#"{"sync":"a","error":"boom","duration_s":1.5}"#;
        let finished = r#"{"sync":"b","rows_read":7,"added":3,"duration_s":2.0}"#;
        match serde_json::from_str::<RunRecord>(failed).unwrap() {
            RunRecord::Failed(f) => assert_eq!((f.sync.as_str(), f.error.as_str()), ("a", "boom")),
            other => panic!("{other:?}"),
        }
        match serde_json::from_str::<RunRecord>(finished).unwrap() {
            RunRecord::Finished(s) => {
                assert_eq!((s.sync.as_str(), s.rows_read, s.added), ("b", 7, 3))
            }
            other => panic!("{other:?}"),
        }
    }
}
