//! Applying one batch to the destination, whatever the destination throws back.
//!
//! [`apply`] drives a [`Writer`] over a batch of rows (or of keys to delete) and carries out
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
//! acknowledgement was lost is retried, which the writer's statements tolerate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::batch::{KeyBatch, Sizer, WriteBatch};
use crate::error::{classify, pg_message, Error, PgErrorKind};
use crate::model::Plan;
use crate::retry::{action, hint, jitter, Action, RetryPolicy};
use crate::snapshot::{Committed, Record};
use crate::writer::Writer;

/// A row the destination refused.
#[derive(Debug, Clone, Serialize)]
pub struct RejectedRow {
    pub key: String,
    pub sqlstate: String,
    pub message: String,
    /// `write` or `delete`.
    pub operation: &'static str,
}

/// Rejections of one run, shared by its writers.
#[derive(Debug, Default)]
pub struct Rejections {
    pub count: u64,
    /// The first rejections, for reports (all of them are counted).
    pub rows: Vec<RejectedRow>,
}

/// Rejections logged one by one as they happen; the rest only in the summary and state file.
const LOG_REJECTED: u64 = 10;

/// At most this many rejected rows are kept for reports.
const KEEP_REJECTED: usize = 1000;

/// What every writer of a run shares.
pub struct ApplyCtx {
    pub sync: String,
    pub plan: Arc<Plan>,
    pub recorder: mpsc::Sender<Record>,
    pub sizer: Arc<Sizer>,
    pub policy: RetryPolicy,
    pub max_rejected: u64,
    pub rejections: Arc<Mutex<Rejections>>,
    /// Set by any writer that failed: the others stop taking work.
    pub failed: Arc<AtomicBool>,
    /// Set on SIGINT/SIGTERM: give up retrying.
    pub shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl ApplyCtx {
    pub fn shutting_down(&self) -> bool {
        self.shutdown.as_ref().is_some_and(|s| *s.borrow())
    }

    fn write_error(&self, e: &tokio_postgres::Error, note: &str) -> Error {
        let kind = classify(e);
        Error::Write {
            sync: self.sync.clone(),
            table: self.plan.target.clone(),
            message: format!("{}{note}; {}", pg_message(e), hint(kind)),
            kind,
        }
    }
}

/// Counters of one writer.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriteStats {
    pub rows: u64,
    pub already_present: u64,
    pub deleted: u64,
    pub batches: u64,
    pub retries: u64,
    pub reconnects: u64,
    pub splits: u64,
    pub timeouts: u64,
}

impl WriteStats {
    pub fn merge(self, o: WriteStats) -> WriteStats {
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
pub enum Work<'a> {
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
            Work::Rows(b) => {
                let r = &b.rows[i];
                r.key(&b.data)
            }
            Work::Deletes(k) => k.key(i),
        }
    }
}

/// Applies `work` through `w`, retrying, splitting and bisecting as the failures call for.
pub async fn apply(
    w: &mut Writer,
    work: Work<'_>,
    ctx: &ApplyCtx,
    stats: &mut WriteStats,
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
            let res = match work {
                Work::Rows(b) => w
                    .write(b, range.clone())
                    .await
                    .map(|d| (d.rows, d.already_present)),
                Work::Deletes(k) => w.delete(k, range.clone()).await.map(|d| (d, 0)),
            };
            let e = match res {
                Ok((done, present)) => {
                    ctx.sizer.committed(range.len(), t0.elapsed());
                    stats.batches += 1;
                    match work {
                        Work::Rows(b) => {
                            stats.rows += done;
                            stats.already_present += present;
                            record(
                                ctx,
                                Record::Upserted(Committed::from_batch(b, range.clone())),
                            )
                            .await?;
                        }
                        Work::Deletes(k) => {
                            stats.deleted += done;
                            record(
                                ctx,
                                Record::Removed {
                                    keys: k.clone(),
                                    rows: range.clone(),
                                },
                            )
                            .await?;
                        }
                    }
                    break;
                }
                Err(e) => e,
            };
            let kind = classify(&e);
            let act = action(kind);
            if kind == PgErrorKind::StatementTimeout {
                stats.timeouts += 1;
                ctx.sizer.timed_out(range.len());
            }
            match act {
                Action::Fail => {
                    ctx.failed.store(true, Ordering::Relaxed);
                    return Err(ctx.write_error(&e, ""));
                }
                Action::Split | Action::Bisect if range.len() > 1 => {
                    let mid = range.start + range.len() / 2;
                    stack.push(mid..range.end);
                    stack.push(range.start..mid);
                    stats.splits += 1;
                    break;
                }
                Action::Bisect => {
                    reject(ctx, work, range.start, &e).await?;
                    break;
                }
                Action::Split | Action::Retry | Action::Reconnect => {
                    attempts += 1;
                    let since = *first_failure.get_or_insert_with(Instant::now);
                    if ctx.shutting_down() {
                        ctx.failed.store(true, Ordering::Relaxed);
                        return Err(ctx.write_error(&e, " (interrupted while retrying)"));
                    }
                    if !ctx.policy.allows(attempts, since.elapsed()) {
                        if act == Action::Split {
                            // A single row that times out every time is a bad row.
                            reject(ctx, work, range.start, &e).await?;
                            break;
                        }
                        ctx.failed.store(true, Ordering::Relaxed);
                        return Err(ctx.write_error(
                            &e,
                            &format!(
                                " (gave up after {attempts} attempts over {:.0}s)",
                                since.elapsed().as_secs_f64()
                            ),
                        ));
                    }
                    stats.retries += 1;
                    tracing::warn!(
                        "sync '{}': {} on {} row(s); retry {attempts} of {}",
                        ctx.sync,
                        pg_message(&e),
                        range.len(),
                        ctx.policy.max_attempts - 1
                    );
                    tokio::time::sleep(ctx.policy.delay(attempts, jitter())).await;
                    if act == Action::Reconnect || e.is_closed() || w.client().is_closed() {
                        reconnect(w, ctx, &mut attempts, since, stats).await?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Reconnects, backing off while the server is still unreachable.
async fn reconnect(
    w: &mut Writer,
    ctx: &ApplyCtx,
    attempts: &mut u32,
    since: Instant,
    stats: &mut WriteStats,
) -> Result<(), Error> {
    loop {
        match w.reconnect().await {
            Ok(()) => {
                stats.reconnects += 1;
                if let Some(t) = w.statement_timeout() {
                    ctx.sizer.limit_latency(t);
                }
                return Ok(());
            }
            Err(e) => {
                *attempts += 1;
                if ctx.shutting_down() || !ctx.policy.allows(*attempts, since.elapsed()) {
                    ctx.failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                tracing::warn!("sync '{}': reconnecting: {e}", ctx.sync);
                tokio::time::sleep(ctx.policy.delay(*attempts, jitter())).await;
            }
        }
    }
}

async fn record(ctx: &ApplyCtx, rec: Record) -> Result<(), Error> {
    ctx.recorder.send(rec).await.map_err(|_| {
        ctx.failed.store(true, Ordering::Relaxed);
        Error::Internal("the snapshot thread stopped".into())
    })
}

/// Reports row `i` of `work` as rejected; a changed row's snapshot entry is marked stale so
/// the next run retries it. Fails the run past `max_rejected`.
async fn reject(
    ctx: &ApplyCtx,
    work: Work<'_>,
    i: usize,
    e: &tokio_postgres::Error,
) -> Result<(), Error> {
    let key = ctx.plan.describe_key(work.key(i));
    let (sqlstate, message) = match e.as_db_error() {
        Some(db) => (db.code().code().to_string(), pg_message(e)),
        None => (String::new(), pg_message(e)),
    };
    let operation = match work {
        Work::Rows(_) => "write",
        Work::Deletes(_) => "delete",
    };
    if let Work::Rows(b) = work {
        let r = &b.rows[i];
        if let Some(slot) = r.slot {
            let mut stale = Committed::default();
            stale.keys.push(r.key(&b.data));
            stale.entries.push((STALE_HASH, Some(slot)));
            record(ctx, Record::Upserted(stale)).await?;
        }
    }
    let count = {
        let mut rej = ctx.rejections.lock().expect("not poisoned");
        rej.count += 1;
        if rej.rows.len() < KEEP_REJECTED {
            rej.rows.push(RejectedRow {
                key,
                sqlstate,
                message,
                operation,
            });
        }
        match rej.count {
            ..=LOG_REJECTED => tracing::warn!(
                "sync '{}': rejected {operation} of row {}: {}",
                ctx.sync,
                rej.rows.last().map(|r| r.key.as_str()).unwrap_or(""),
                rej.rows.last().map(|r| r.message.as_str()).unwrap_or("")
            ),
            n if n == LOG_REJECTED + 1 => tracing::warn!(
                "sync '{}': more rows rejected; the summary and `pgdelta log --rejected` list them",
                ctx.sync
            ),
            _ => {}
        }
        rej.count
    };
    if count > ctx.max_rejected {
        ctx.failed.store(true, Ordering::Relaxed);
        return Err(Error::TooManyRejected {
            sync: ctx.sync.clone(),
            table: ctx.plan.target.clone(),
            rejected: count,
            max: ctx.max_rejected,
        });
    }
    Ok(())
}

/// The hash recorded for a row the destination rejected: no row hashes to it in practice, so
/// the next run sees the row as changed and tries again, while the entry keeps its slot (and
/// with it removed-row detection).
pub const STALE_HASH: [u8; 16] = [0; 16];

/// Waits between batches when the user asked for a pause.
pub async fn pause(sleep: Duration) {
    if !sleep.is_zero() {
        tokio::time::sleep(sleep).await;
    }
}
