//! Applying one batch to the destination, whatever the destination throws back.
//!
//! [`apply`] drives a [`Destination`] over a batch of rows (or of keys to delete) and carries out
//! [`crate::retry::action`] for every failure:
//! - connection loss, admin shutdown: back off, reconnect, retry the same rows;
//! - deadlock, serialization failure, lock timeout: back off, retry the same rows;
//! - statement timeout, statement too big: tell the batch sizer, retry the rows as two halves;
//! - data and constraint errors: bisect until the bad rows stand alone, write the good ones,
//!   reject the bad ones (key, SQLSTATE, message) and leave them out of the snapshot, so the
//!   next run retries them;
//! - anything else: stop the run.
//!
//! Each range of rows that commits is handed to the snapshot recorder right away, so the
//! snapshot only ever describes committed rows. Delivery is at-least-once: a commit whose
//! acknowledgement was lost is retried, which every [`Destination`] tolerates.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::batch::{KeyBatch, WriteBatch};
use crate::error::{Error, PgErrorKind};
use crate::plan::Plan;
use crate::retry::{action, hint, jitter, Action, RetryPolicy};
use crate::snapshot::{Committed, Recorder};
use crate::sync::stop::{Stop, StopReason};
use crate::sync::Progress;

use super::destination::{Destination, WriteFailure};
use super::sizer::Sizer;

/// What the destination refused to do with a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Write,
    Delete,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Write => "write",
            Operation::Delete => "delete",
        })
    }
}

/// What a rejected row was to the diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowClass {
    /// A key the snapshot did not know.
    Added,
    /// A known key with new content.
    Changed,
    /// A row that left the model (a delete).
    Removed,
}

/// A row the destination refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rejection {
    pub key: String,
    /// The key as a JSON object (`{"id": 42}`), for programs and the audit tables.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub key_json: serde_json::Value,
    /// What the row was to the diff (absent in records written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<RowClass>,
    pub sqlstate: String,
    pub message: String,
    pub operation: Operation,
    /// The key's raw bytes (the delta read re-reads rejected rows by key); not serialized.
    #[serde(skip)]
    pub(crate) raw_key: Vec<u8>,
}

/// Rejections of one run, shared by its writers.
#[derive(Debug, Default, Clone)]
pub(crate) struct Rejections {
    pub(crate) count: u64,
    /// Of those: new rows, changed rows, deletes.
    pub(crate) added: u64,
    pub(crate) changed: u64,
    pub(crate) removed: u64,
    /// The first rejections, for reports (all of them are counted).
    pub(crate) rows: Vec<Rejection>,
}

/// Rejections logged one by one as they happen; the rest only in the summary and state file.
const LOG_REJECTED: u64 = 10;

/// At most this many rejected rows are kept for reports.
const KEEP_REJECTED: usize = 1000;

/// What every writer of a run shares.
pub(crate) struct ApplyCtx {
    pub(crate) sync: String,
    pub(crate) plan: Arc<Plan>,
    /// `None` in dry runs: nothing is recorded.
    pub(crate) recorder: Option<Recorder>,
    pub(crate) sizer: Arc<Sizer>,
    pub(crate) policy: RetryPolicy,
    pub(crate) max_rejected: u64,
    pub(crate) rejections: Mutex<Rejections>,
    pub(crate) stop: Stop,
    /// The audit's change log (`changes = "all"`): every row written, deleted or rejected.
    pub(crate) changes: Option<crate::audit::ChangeLog>,
    /// How far the run got (shared with the source read and the caller).
    pub(crate) progress: Arc<Progress>,
}

impl ApplyCtx {
    fn write_error(&self, f: &WriteFailure, note: &str) -> Error {
        Error::Write {
            sync: self.sync.clone(),
            table: self.plan.target.clone(),
            message: format!("{}{note}; {}", f.message, hint(f.kind)),
            kind: f.kind,
        }
    }

    /// Stops the run because this writer failed, and returns the error to report.
    fn fail(&self, e: Error) -> Error {
        self.stop.stop(StopReason::WriterFailed);
        e
    }

    pub(crate) fn rejections(&self) -> Rejections {
        self.rejections.lock().expect("not poisoned").clone()
    }

    async fn record<T>(
        &self,
        rec: impl std::future::Future<Output = Result<T, crate::snapshot::SnapshotError>>,
    ) -> Result<T, Error> {
        rec.await.map_err(|e| self.fail(e.into()))
    }
}

/// Counters of one writer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteStats {
    pub(crate) rows: u64,
    pub(crate) already_present: u64,
    pub(crate) deleted: u64,
    pub(crate) batches: u64,
    pub(crate) retries: u64,
    pub(crate) reconnects: u64,
    pub(crate) splits: u64,
    pub(crate) timeouts: u64,
}

impl std::ops::Add for WriteStats {
    type Output = WriteStats;
    fn add(self, o: WriteStats) -> WriteStats {
        WriteStats {
            rows: self.rows + o.rows,
            already_present: self.already_present + o.already_present,
            deleted: self.deleted + o.deleted,
            batches: self.batches + o.batches,
            retries: self.retries + o.retries,
            reconnects: self.reconnects + o.reconnects,
            splits: self.splits + o.splits,
            timeouts: self.timeouts + o.timeouts,
        }
    }
}

/// The work of one batch.
#[derive(Clone, Copy)]
pub(crate) enum Work<'a> {
    Rows(&'a WriteBatch),
    Deletes(&'a Arc<KeyBatch>),
}

impl Work<'_> {
    fn len(&self) -> usize {
        match self {
            Work::Rows(b) => b.len(),
            Work::Deletes(k) => k.len(),
        }
    }
    fn key(&self, i: usize) -> &[u8] {
        match self {
            Work::Rows(b) => b.rows[i].key(&b.data),
            Work::Deletes(k) => k.key(i),
        }
    }
}

/// Applies `work` through `dest`, retrying, splitting and bisecting as the failures call for.
/// The recorder is told before the first attempt, and once every row is accounted for:
/// committed and recorded, rejected, or (when the run fails) known not to have committed.
pub(crate) async fn apply<D: Destination>(
    dest: &mut D,
    work: Work<'_>,
    ctx: &ApplyCtx,
    stats: &mut WriteStats,
) -> Result<(), Error> {
    let pending = match &ctx.recorder {
        Some(r) => Some(ctx.record(r.begin_write()).await?),
        None => None,
    };
    let mut in_doubt = false;
    let result = apply_ranges(dest, work, ctx, stats, &mut in_doubt).await;
    // A failure the server never answered (the session dropped) may have come after its
    // commit, and a record that failed came after one: those writes stay unaccounted for.
    if let (Some(p), false) = (pending, result.is_err() && in_doubt) {
        p.accounted();
    }
    result
}

/// [`apply`]'s retries; sets `in_doubt` when an attempt may have committed without a record.
async fn apply_ranges<D: Destination>(
    dest: &mut D,
    work: Work<'_>,
    ctx: &ApplyCtx,
    stats: &mut WriteStats,
    in_doubt: &mut bool,
) -> Result<(), Error> {
    // Left halves are pushed last, so rows are applied in order.
    let mut stack = Vec::with_capacity(8);
    stack.push(0..work.len());
    while let Some(range) = stack.pop() {
        if range.is_empty() {
            continue;
        }
        let mut attempts = 0u32;
        let mut first_failure: Option<Instant> = None;
        loop {
            let t0 = Instant::now();
            let f = match attempt(dest, work, range.clone(), ctx, stats).await {
                Ok(()) => {
                    ctx.sizer.committed(range.len(), t0.elapsed());
                    break;
                }
                Err(Attempt::Fatal(e)) => {
                    *in_doubt = true;
                    return Err(e);
                }
                Err(Attempt::Failed(f)) => f,
            };
            *in_doubt |= f.sqlstate.is_none();
            let act = action(f.kind);
            if f.kind == PgErrorKind::StatementTimeout {
                stats.timeouts += 1;
                ctx.sizer.timed_out(range.len());
            }
            match act {
                Action::Fail => return Err(ctx.fail(ctx.write_error(&f, ""))),
                Action::Split | Action::Bisect if range.len() > 1 => {
                    let mid = range.start + range.len() / 2;
                    stack.push(mid..range.end);
                    stack.push(range.start..mid);
                    stats.splits += 1;
                    break;
                }
                Action::Bisect => {
                    reject(ctx, work, range.start, &f).await?;
                    break;
                }
                Action::Split | Action::Retry | Action::Reconnect => {
                    attempts += 1;
                    let since = *first_failure.get_or_insert_with(Instant::now);
                    if ctx.stop.is_stopped() {
                        return Err(ctx.fail(ctx.write_error(&f, " (interrupted while retrying)")));
                    }
                    if !ctx.policy.allows(attempts, since.elapsed()) {
                        if act == Action::Split {
                            // A single row that times out every time is a bad row.
                            reject(ctx, work, range.start, &f).await?;
                            break;
                        }
                        let note = format!(
                            " (gave up after {attempts} attempts over {:.0}s)",
                            since.elapsed().as_secs_f64()
                        );
                        return Err(ctx.fail(ctx.write_error(&f, &note)));
                    }
                    stats.retries += 1;
                    tracing::warn!(
                        "sync '{}': {} on {} row(s); retry {attempts} of {}",
                        ctx.sync,
                        f.message,
                        range.len(),
                        ctx.policy.max_attempts - 1
                    );
                    tokio::time::sleep(ctx.policy.delay(attempts, jitter())).await;
                    if act == Action::Reconnect || f.closed || dest.is_closed() {
                        reconnect(dest, ctx, &mut attempts, since, stats).await?;
                    }
                }
            }
        }
    }
    Ok(())
}

enum Attempt {
    /// The destination refused: decide what to do with the failure.
    Failed(WriteFailure),
    /// Recording failed: the run stops.
    Fatal(Error),
}

/// One attempt at `range`: on commit, counts it and hands it to the recorder.
async fn attempt<D: Destination>(
    dest: &mut D,
    work: Work<'_>,
    range: std::ops::Range<usize>,
    ctx: &ApplyCtx,
    stats: &mut WriteStats,
) -> Result<(), Attempt> {
    match work {
        Work::Rows(b) => {
            let done = dest
                .write(b, range.clone())
                .await
                .map_err(Attempt::Failed)?;
            stats.batches += 1;
            stats.rows += done.rows;
            stats.already_present += done.already_present;
            ctx.progress.written.fetch_add(done.rows, Ordering::Relaxed);
            if let Some(log) = &ctx.changes {
                log.written(&ctx.plan, b, range.clone()).await;
            }
            if let Some(r) = &ctx.recorder {
                let rec = r.record(Committed::from_batch(b, range));
                ctx.record(rec).await.map_err(Attempt::Fatal)?;
            }
        }
        Work::Deletes(k) => {
            let done = dest
                .delete(k, range.clone())
                .await
                .map_err(Attempt::Failed)?;
            stats.batches += 1;
            stats.deleted += done;
            ctx.progress.deleted.fetch_add(done, Ordering::Relaxed);
            if let Some(log) = &ctx.changes {
                log.deleted(&ctx.plan, k, range.clone()).await;
            }
            if let Some(r) = &ctx.recorder {
                let rec = r.remove(k.clone(), range);
                ctx.record(rec).await.map_err(Attempt::Fatal)?;
            }
        }
    }
    Ok(())
}

/// Reconnects, backing off while the server is still unreachable.
async fn reconnect<D: Destination>(
    dest: &mut D,
    ctx: &ApplyCtx,
    attempts: &mut u32,
    since: Instant,
    stats: &mut WriteStats,
) -> Result<(), Error> {
    loop {
        match dest.reconnect().await {
            Ok(()) => {
                stats.reconnects += 1;
                if let Some(t) = dest.statement_timeout() {
                    ctx.sizer.limit_latency(t);
                }
                return Ok(());
            }
            Err(e) => {
                *attempts += 1;
                if ctx.stop.is_stopped() || !ctx.policy.allows(*attempts, since.elapsed()) {
                    return Err(ctx.fail(e));
                }
                tracing::warn!("sync '{}': reconnecting: {e}", ctx.sync);
                tokio::time::sleep(ctx.policy.delay(*attempts, jitter())).await;
            }
        }
    }
}

/// Reports row `i` of `work` as rejected; a changed row's snapshot entry is marked stale so
/// the next run retries it. Fails the run past `max_rejected`.
async fn reject(ctx: &ApplyCtx, work: Work<'_>, i: usize, f: &WriteFailure) -> Result<(), Error> {
    let key = ctx.plan.describe_key(work.key(i));
    let key_json = ctx.plan.key_json(work.key(i));
    let class = match work {
        Work::Rows(b) if b.rows[i].slot.is_some() => RowClass::Changed,
        Work::Rows(_) => RowClass::Added,
        Work::Deletes(_) => RowClass::Removed,
    };
    if let Some(log) = &ctx.changes {
        log.rejected(key_json.clone(), class).await;
    }
    let operation = match work {
        Work::Rows(_) => Operation::Write,
        Work::Deletes(_) => Operation::Delete,
    };
    if let (Work::Rows(b), Some(rec)) = (work, &ctx.recorder) {
        let r = &b.rows[i];
        if let Some(slot) = r.slot {
            ctx.record(rec.mark_stale(r.key(&b.data), slot)).await?;
        }
    }
    let count = {
        let mut rej = ctx.rejections.lock().expect("not poisoned");
        rej.count += 1;
        let (mine, shared) = match class {
            RowClass::Added => (&mut rej.added, &ctx.progress.rejected_added),
            RowClass::Changed => (&mut rej.changed, &ctx.progress.rejected_changed),
            RowClass::Removed => (&mut rej.removed, &ctx.progress.rejected_removed),
        };
        *mine += 1;
        shared.fetch_add(1, Ordering::Relaxed);
        match rej.count {
            ..=LOG_REJECTED => tracing::warn!(
                "sync '{}': rejected {operation} of row {key}: {}",
                ctx.sync,
                f.message
            ),
            n if n == LOG_REJECTED + 1 => tracing::warn!(
                "sync '{}': more rows rejected; the summary and `pgdelta log --rejected` list them",
                ctx.sync
            ),
            _ => {}
        }
        if rej.rows.len() < KEEP_REJECTED {
            rej.rows.push(Rejection {
                key,
                key_json,
                class: Some(class),
                sqlstate: f.sqlstate.clone().unwrap_or_default(),
                message: f.message.clone(),
                operation,
                raw_key: work.key(i).to_vec(),
            });
        }
        rej.count
    };
    if count > ctx.max_rejected {
        return Err(ctx.fail(Error::TooManyRejected {
            sync: ctx.sync.clone(),
            table: ctx.plan.target.clone(),
            rejected: count,
            max: ctx.max_rejected,
        }));
    }
    Ok(())
}

/// Waits between batches when the user asked for a pause.
pub(crate) async fn pause(sleep: Duration) {
    if !sleep.is_zero() {
        tokio::time::sleep(sleep).await;
    }
}

#[cfg(test)]
mod tests {
    //! `apply` against a scripted destination: bisection, timeout splitting, retries and
    //! reconnects in milliseconds, without a server.

    use super::*;
    use crate::batch::BatchBuilder;
    use crate::copy::{encode, frame_all};
    use crate::sink::destination::Written;
    use crate::sink::sizer::BatchSettings;
    use std::collections::{BTreeSet, VecDeque};
    use std::ops::Range;

    /// A destination that commits rows (by key) unless the script says otherwise: a batch that
    /// holds a bad key fails as a constraint violation, a batch over `max_rows` times out, and
    /// `faults` are returned first, one per call.
    #[derive(Default)]
    struct Scripted {
        bad: BTreeSet<i64>,
        max_rows: Option<usize>,
        faults: VecDeque<WriteFailure>,
        committed: Vec<i64>,
        deleted: Vec<i64>,
        calls: usize,
        reconnects: usize,
        closed: bool,
    }

    fn failure(kind: PgErrorKind, sqlstate: &str) -> WriteFailure {
        WriteFailure {
            kind,
            sqlstate: Some(sqlstate.into()),
            message: format!("scripted {sqlstate}"),
            closed: kind == PgErrorKind::Connection,
        }
    }

    fn key_of(k: &[u8]) -> i64 {
        i64::from_be_bytes(k[4..12].try_into().unwrap())
    }

    impl Scripted {
        fn check(&mut self, keys: Vec<i64>) -> Result<Vec<i64>, WriteFailure> {
            self.calls += 1;
            if self.closed {
                return Err(failure(PgErrorKind::Connection, "08006"));
            }
            if let Some(f) = self.faults.pop_front() {
                self.closed = f.closed;
                return Err(f);
            }
            if self.max_rows.is_some_and(|m| keys.len() > m) {
                return Err(failure(PgErrorKind::StatementTimeout, "57014"));
            }
            if keys.iter().any(|k| self.bad.contains(k)) {
                return Err(failure(PgErrorKind::Data, "23514"));
            }
            Ok(keys)
        }
    }

    impl Destination for Scripted {
        async fn write(
            &mut self,
            b: &WriteBatch,
            rows: Range<usize>,
        ) -> Result<Written, WriteFailure> {
            let keys = b.rows[rows]
                .iter()
                .map(|r| key_of(r.key(&b.data)))
                .collect();
            let keys = self.check(keys)?;
            self.committed.extend(&keys);
            Ok(Written {
                rows: keys.len() as u64,
                already_present: 0,
            })
        }
        async fn delete(&mut self, k: &KeyBatch, rows: Range<usize>) -> Result<u64, WriteFailure> {
            let keys = self.check(rows.map(|i| key_of(k.key(i))).collect())?;
            self.deleted.extend(&keys);
            Ok(keys.len() as u64)
        }
        async fn reconnect(&mut self) -> Result<(), Error> {
            self.reconnects += 1;
            self.closed = false;
            Ok(())
        }
        fn statement_timeout(&self) -> Option<Duration> {
            None
        }
        fn is_closed(&self) -> bool {
            self.closed
        }
    }

    fn batch(keys: Range<i64>) -> WriteBatch {
        let vals: Vec<[u8; 8]> = keys.clone().map(|k| k.to_be_bytes()).collect();
        let stream = encode(vals.iter().map(|v| vec![Some(&v[..]), Some(&b"x"[..])]));
        let block = frame_all(&stream, 2, 1).unwrap();
        let mut b = BatchBuilder::with_capacity(stream.len());
        for r in &block.rows {
            b.push(&block, r, [1; 16], None);
        }
        b.take()
    }

    fn ctx(max_rejected: u64) -> ApplyCtx {
        ApplyCtx {
            sync: "t".into(),
            plan: Arc::new(Plan::for_tests(&["id:bigint", "v:text"], 1)),
            recorder: None,
            sizer: Arc::new(Sizer::new(BatchSettings::default())),
            policy: RetryPolicy {
                base: Duration::from_millis(1),
                cap: Duration::from_millis(2),
                ..Default::default()
            },
            max_rejected,
            rejections: Default::default(),
            stop: Stop::default(),
            changes: None,
            progress: Default::default(),
        }
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Bad rows are bisected out: every good row lands once, in order; each bad row is
    /// rejected with its key and SQLSTATE.
    #[test]
    fn bisection_writes_good_rows_and_rejects_bad_ones() {
        let mut d = Scripted {
            bad: [3, 17, 18, 99].into(),
            ..Default::default()
        };
        let c = ctx(100);
        let b = batch(0..100);
        let mut stats = WriteStats::default();
        run(apply(&mut d, Work::Rows(&b), &c, &mut stats)).unwrap();
        let good: Vec<i64> = (0..100).filter(|k| ![3, 17, 18, 99].contains(k)).collect();
        assert_eq!(d.committed, good);
        let rej = c.rejections();
        assert_eq!(rej.count, 4);
        let keys: Vec<&str> = rej.rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["id=3", "id=17", "id=18", "id=99"]);
        assert!(rej.rows.iter().all(|r| r.sqlstate == "23514"));
        assert_eq!(stats.rows, 96);
        assert!(!c.stop.is_stopped());
    }

    /// Statement timeouts split the range until it fits, and the sizer learns the limit.
    #[test]
    fn timeouts_split_until_batches_fit() {
        let mut d = Scripted {
            max_rows: Some(10),
            ..Default::default()
        };
        let c = ctx(0);
        let b = batch(0..100);
        let mut stats = WriteStats::default();
        run(apply(&mut d, Work::Rows(&b), &c, &mut stats)).unwrap();
        assert_eq!(d.committed, (0..100).collect::<Vec<_>>());
        assert!(stats.timeouts >= 3, "{stats:?}");
        assert_eq!(c.rejections().count, 0);
        assert!(c.sizer.rows() <= 50, "sizer at {}", c.sizer.rows());
    }

    /// A lost connection is retried on a new session; a deadlock on the same one.
    #[test]
    fn transient_failures_are_retried() {
        let mut d = Scripted {
            faults: [
                failure(PgErrorKind::Connection, "57P01"),
                failure(PgErrorKind::Transient, "40P01"),
            ]
            .into(),
            ..Default::default()
        };
        let c = ctx(0);
        let keys = {
            let mut k = KeyBatch::default();
            for i in 0..5i64 {
                let mut key = 8i32.to_be_bytes().to_vec();
                key.extend(i.to_be_bytes());
                k.push(&key);
            }
            Arc::new(k)
        };
        let mut stats = WriteStats::default();
        run(apply(&mut d, Work::Deletes(&keys), &c, &mut stats)).unwrap();
        assert_eq!(d.deleted, vec![0, 1, 2, 3, 4]);
        assert_eq!((stats.retries, stats.reconnects, d.reconnects), (2, 1, 1));
    }

    fn write_fails(d: &mut Scripted, b: &WriteBatch, c: &ApplyCtx) -> Error {
        run(apply(d, Work::Rows(b), c, &mut WriteStats::default())).unwrap_err()
    }

    /// A fatal error stops the run (and every other writer, through the stop token); so does
    /// a retry budget spent, and one rejection too many.
    #[test]
    fn fatal_errors_and_spent_budgets_stop_the_run() {
        let c = ctx(0);
        let b = batch(0..4);
        let mut d = Scripted {
            faults: [failure(PgErrorKind::Fatal, "42501")].into(),
            ..Default::default()
        };
        let e = write_fails(&mut d, &b, &c);
        assert!(e.to_string().contains("42501"), "{e}");
        assert_eq!(c.stop.reason(), Some(StopReason::WriterFailed));

        let c = ctx(0);
        let mut d = Scripted {
            faults: std::iter::repeat_n(failure(PgErrorKind::Transient, "40001"), 20).collect(),
            ..Default::default()
        };
        let e = write_fails(&mut d, &b, &c);
        assert!(e.to_string().contains("gave up after 10 attempts"), "{e}");
        assert!(d.committed.is_empty());

        let c = ctx(1);
        let mut d = Scripted {
            bad: [0, 2].into(),
            ..Default::default()
        };
        let e = write_fails(&mut d, &b, &c);
        assert!(
            matches!(e, Error::TooManyRejected { rejected: 2, .. }),
            "{e}"
        );
    }
}
