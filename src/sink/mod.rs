//! The sink stage: destination sessions that apply batches, and the delete pass.
//!
//! - [`destination`]: the seam ([`Destination`]): Postgres, or null in dry runs.
//! - [`postgres`]: the Postgres destination: COPY, staged upsert, deletes.
//! - [`apply`]: one batch through a destination, with retries, reconnects, timeout splitting and
//!   bad-row bisection; committed ranges go to the snapshot recorder.
//! - [`sizer`]: the adaptive batch size.
//!
//! Writers share one bounded queue of batches; each takes the next batch when it is free, so a
//! slow destination leaves batches queued, which stalls the diff, which stalls the reader.

mod apply;
mod destination;
mod postgres;
mod sizer;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};

use crate::batch::{KeyBatch, WriteBatch};
use crate::conn::ConnInfo;
use crate::diff::Bitset;
use crate::error::Error;
use crate::plan::Plan;
use crate::snapshot::{Reader, SnapshotError};
pub(crate) use apply::{ApplyCtx, Rejections, WriteStats};
pub use apply::{Operation, Rejection, RowClass};
pub(crate) use destination::{AnyDestination, Destination, NullDestination};
pub(crate) use postgres::{session_settings, PgDestination, Strategy};
pub use sizer::BatchSettings;
pub(crate) use sizer::{Sizer, SizerStats};

use apply::{apply, pause, Work};
pub(crate) use postgres::feed_in_pieces;

/// Opens the run's writer sessions: `n` Postgres sessions, or one null destination in a dry
/// run. Writers connect before the read starts, so a destination that refuses sessions fails
/// the run before the long read.
pub(crate) async fn open_writers(
    dest: &ConnInfo,
    plan: &Plan,
    strategy: Strategy,
    n: usize,
    dry_run: bool,
) -> Result<Vec<AnyDestination>, Error> {
    if dry_run {
        return Ok(vec![AnyDestination::Null(NullDestination)]);
    }
    let mut writers = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let d = PgDestination::connect(dest, plan, strategy).await?;
        writers.push(AnyDestination::Postgres(Box::new(d)));
    }
    Ok(writers)
}

/// One writer: takes batches from the shared queue until it closes or the run stops, and
/// applies each. A writer that fails stops the run (through the stop token), so the others
/// take no more batches, the diff and the reader stop, and what was committed is recorded.
pub(crate) async fn write_batches(
    mut dest: AnyDestination,
    batches: Arc<Mutex<mpsc::Receiver<WriteBatch>>>,
    ctx: Arc<ApplyCtx>,
    sleep: Duration,
) -> Result<WriteStats, Error> {
    let mut stats = WriteStats::default();
    loop {
        if ctx.stop.is_stopped() {
            return Ok(stats);
        }
        let Some(batch) = batches.lock().await.recv().await else {
            return Ok(stats);
        };
        apply(&mut dest, Work::Rows(&batch), &ctx, &mut stats).await?;
        drop(batch);
        pause(sleep).await;
    }
}

/// What the delete pass did.
pub(crate) struct Deleted {
    pub(crate) stats: WriteStats,
    /// The first removed keys (dry-run plan).
    pub(crate) samples: Vec<Vec<u8>>,
}

/// The rows that left the model.
pub(crate) enum Removed {
    /// The snapshot entries whose slot a complete read did not mark.
    Unseen { reader: Arc<Reader>, seen: Bitset },
    /// Keys already found removed.
    Keys(KeyBatch),
}

impl Removed {
    /// Sends the removed keys in batches of `per_batch`; stops when the receiver is gone.
    fn send(self, per_batch: usize, tx: &mpsc::Sender<KeyBatch>) -> Result<(), SnapshotError> {
        let mut cur = KeyBatch::default();
        let mut push = |key: &[u8]| {
            cur.push(key);
            !(cur.len() >= per_batch && tx.blocking_send(std::mem::take(&mut cur)).is_err())
        };
        match self {
            Removed::Unseen { reader, seen } => {
                reader.scan_slots(|key, slot| seen.contains(slot) || push(key))?;
            }
            Removed::Keys(keys) => {
                let _ = (0..keys.len()).all(|i| push(keys.key(i)));
            }
        }
        if !cur.is_empty() {
            let _ = tx.blocking_send(cur);
        }
        Ok(())
    }
}

/// Deletes the removed rows (`rows` of them) in batches through `dests`, side by side, each
/// committed batch recorded. The keys are produced on a blocking thread (a walk of the snapshot
/// for [`Removed::Unseen`]) and feed the deletes through a bounded channel; each session takes
/// the next batch when it is free, and batches are cut so that every session gets one. The
/// keys are disjoint, so the sessions' deletes never wait on each other's row locks. A session
/// that fails stops the others from taking more batches (what they committed is recorded).
pub(crate) async fn delete_removed(
    dests: Vec<AnyDestination>,
    removed: Removed,
    rows: u64,
    ctx: &ApplyCtx,
    samples: usize,
) -> Result<Deleted, Error> {
    let n = dests.len().max(1) as u64;
    let per_batch = (ctx.sizer.rows() as u64)
        .min(rows.div_ceil(n))
        .clamp(1000, 50_000) as usize;
    let (tx, rx) = mpsc::channel::<KeyBatch>(2 * n as usize);
    let scan = tokio::task::spawn_blocking(move || removed.send(per_batch, &tx));
    let rx = Mutex::new(rx);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let taken = std::sync::Mutex::new(Vec::new());
    let work = dests.into_iter().map(|mut dest| {
        let (rx, failed, taken) = (&rx, &failed, &taken);
        async move {
            let mut stats = WriteStats::default();
            while !failed.load(std::sync::atomic::Ordering::Relaxed) {
                let Some(keys) = rx.lock().await.recv().await else {
                    break;
                };
                {
                    let mut taken = taken.lock().unwrap_or_else(|e| e.into_inner());
                    for i in 0..keys.len().min(samples.saturating_sub(taken.len())) {
                        taken.push(keys.key(i).to_vec());
                    }
                }
                if ctx.stop.is_stopped() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(Error::Interrupted {
                        sync: ctx.sync.clone(),
                        message: "stopped while deleting removed rows; deletes committed so far are recorded, the next run deletes the rest".into(),
                    });
                }
                let done = apply(&mut dest, Work::Deletes(&Arc::new(keys)), ctx, &mut stats).await;
                if done.is_err() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                done?;
            }
            Ok::<_, Error>(stats)
        }
    });
    let done = futures_util::future::join_all(work).await;
    // No session takes another batch: the scan's sends end.
    drop(rx);
    let mut stats = WriteStats::default();
    for d in done {
        stats = stats + d?;
    }
    scan.await.map_err(crate::error::join_err)??;
    Ok(Deleted {
        stats,
        samples: taken.into_inner().unwrap_or_else(|e| e.into_inner()),
    })
}
