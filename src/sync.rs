//! One sync run, end to end: plan, read, diff, write, record, delete, report.
//!
//! ```text
//! source COPY (tokio task) --blocks--> diff (own thread + rayon) --batches--> writer (tokio task)
//!        ^ stops reading the socket when the bounded queues are full      |  commit
//!                                                                         v
//!                                            recorder (own thread, redb): key -> row hash
//! ```
//! Removed rows are derived after the read, and only when the read completed (the COPY trailer
//! was seen). Duplicate or NULL keys are model errors: those keys are reported, left out of the
//! snapshot (so they are re-evaluated next run), and the run applies no deletes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::apply::{apply, pause, ApplyCtx, RejectedRow, Work, WriteStats};
use crate::batch::{KeyBatch, Sizer, WriteBatch};
use crate::conn::ConnInfo;
use crate::copy::{Block, Framer};
use crate::diff::{self, DiffConfig, DiffOutcome};
use crate::error::{pg_message, Error};
use crate::model::{plan, Plan, SyncSpec};
use crate::snapshot::{Reader, Record, Snapshot};
use crate::writer::{Strategy, Writer};

/// Options of one invocation, shared by every sync it runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub dry_run: bool,
    pub full_resync: bool,
    /// Print progress lines on stderr while running.
    pub progress: bool,
    /// Becomes true on SIGINT/SIGTERM: stop reading, finish the queued batches, record them.
    pub shutdown: Option<tokio::sync::watch::Receiver<bool>>,
    /// Put the batch and read timelines in the summary (benchmarks, reports).
    pub timeline: bool,
}

/// Tunables of the pipeline itself (not of a sync).
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Framed blocks are cut at this many bytes.
    pub block_bytes: usize,
    /// Blocks queued between reader and diff.
    pub block_queue: usize,
    /// Batches queued between diff and writer.
    pub batch_queue: usize,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            block_bytes: 512 << 10,
            block_queue: 8,
            batch_queue: 2,
        }
    }
}

/// What a run did: the `--json` summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub sync: String,
    pub target: String,
    pub mode: String,
    pub strategy: String,
    pub dry_run: bool,
    pub full_resync: bool,
    pub rows_read: u64,
    pub bytes_read: u64,
    pub added: u64,
    pub changed: u64,
    pub unchanged: u64,
    pub removed: u64,
    /// Removed rows deleted from the destination (0 unless deletes are on).
    pub deleted: u64,
    pub rejected: u64,
    /// The first rejected rows: key, SQLSTATE, message.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected_rows: Vec<RejectedRow>,
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
    pub batch_timeline: Vec<(f32, u32, f32)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub read_timeline: Vec<(f32, u64)>,
    pub notes: Vec<String>,
    /// Dry run: sample keys of each kind.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sample_added: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sample_changed: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sample_removed: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    /// The source read ended (connections and planning included).
    pub read_s: f64,
    /// Every upsert/insert batch was committed.
    pub writes_done_s: f64,
    /// Removed rows were found and (with deletes on) deleted.
    pub deletes_done_s: f64,
}

/// Runs one sync. The caller opens the snapshot (holding its lock for the whole invocation).
pub async fn run(
    source: &ConnInfo,
    dest: &ConnInfo,
    spec: &SyncSpec,
    opts: &RunOptions,
    snapshot: &Snapshot,
) -> Result<Summary, Error> {
    let started = Instant::now();
    let pipe = PipelineSettings::default();
    let result = run_with(source, dest, spec, opts, snapshot, &pipe).await;
    if let Err(e) = &result {
        // Failed runs belong in the history too (`pgdelta log`).
        if !opts.dry_run {
            let record = serde_json::json!({
                "sync": spec.name,
                "error": e.to_string(),
                "duration_s": started.elapsed().as_secs_f64(),
            });
            let _ = snapshot.log_run(&record.to_string());
        }
    }
    result
}

pub async fn run_with(
    source: &ConnInfo,
    dest: &ConnInfo,
    spec: &SyncSpec,
    opts: &RunOptions,
    snapshot: &Snapshot,
    pipe: &PipelineSettings,
) -> Result<Summary, Error> {
    let started = Instant::now();
    let name = spec.name.clone();
    let read_timeout = match spec.read_timeout {
        Some(d) => format!("{}ms", d.as_millis().max(1)),
        None => "0".into(),
    };
    let src = source
        .connect(
            "source",
            &[
                ("statement_timeout", read_timeout),
                ("idle_in_transaction_session_timeout", "0".into()),
            ],
        )
        .await?;
    let control = dest
        .connect("destination", &crate::writer::session_settings())
        .await?;
    let plan = Arc::new(plan(&src, &control, spec).await?);
    drop(control);
    for n in &plan.notes {
        tracing::info!("sync '{name}': {n}");
    }
    let source_timeout = crate::conn::show(&src, "statement_timeout").await.ok();

    let begin = snapshot.begin(&name, &plan.key_fp, &plan.row_fp, opts.full_resync)?;
    for n in &begin.notes {
        tracing::warn!("sync '{name}': {n}");
    }
    let reader = Arc::new(snapshot.reader(&name)?);
    let strategy = Strategy::choose(spec.mode, plan.target_empty, reader.is_empty());
    let sizer = Arc::new(Sizer::new(spec.batch));
    let recorder = snapshot.recorder(&name, begin.meta.clone())?;

    let mut summary = Summary {
        sync: name.clone(),
        target: plan.target.clone(),
        mode: spec.mode.as_str().into(),
        strategy: serde_json::to_value(strategy)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        dry_run: opts.dry_run,
        full_resync: begin.rewrite_all,
        source_statement_timeout: source_timeout,
        notes: plan
            .notes
            .iter()
            .chain(begin.notes.iter())
            .cloned()
            .collect(),
        ..Default::default()
    };

    let ctx = Arc::new(ApplyCtx {
        sync: name.clone(),
        plan: plan.clone(),
        recorder: recorder.sender(),
        sizer: sizer.clone(),
        policy: spec.retry,
        max_rejected: spec.max_rejected,
        rejections: Default::default(),
        failed: Default::default(),
        shutdown: opts.shutdown.clone(),
    });

    // Writers connect first: a destination that refuses sessions fails the run before the
    // long read starts.
    let writers = if opts.dry_run {
        vec![None]
    } else {
        let mut v = Vec::new();
        for _ in 0..spec.batch.writers.max(1) {
            let w = Writer::connect(dest, &plan, strategy).await?;
            if let Some(t) = w.statement_timeout() {
                sizer.limit_latency(t);
                summary.destination_statement_timeout_ms = Some(t.as_millis() as u64);
            }
            v.push(Some(w));
        }
        v
    };

    // --- the pipeline ---
    let (block_tx, block_rx) = mpsc::channel::<Block>(pipe.block_queue);
    let (batch_tx, batch_rx) = mpsc::channel::<WriteBatch>(pipe.batch_queue);
    let rows_read = Arc::new(AtomicU64::new(0));

    let read_task = tokio::spawn(
        SourceRead {
            source: source.clone(),
            client: src,
            plan: plan.clone(),
            out: block_tx,
            rows_read: rows_read.clone(),
            block_bytes: pipe.block_bytes,
            sync: name.clone(),
            shutdown: opts.shutdown.clone(),
        }
        .run(),
    );

    let diff_cfg = DiffConfig {
        mode: spec.mode,
        rewrite_all: begin.rewrite_all,
        dry_run: opts.dry_run,
        seed: random_seed(),
        samples: if opts.dry_run { 10 } else { 5 },
        max_batch_age: Duration::from_secs(1),
    };
    let diff_task = {
        let reader = reader.clone();
        let sizer = sizer.clone();
        let slots = begin.meta.next_slot;
        let cfg = diff_cfg.clone();
        tokio::task::spawn_blocking(move || {
            diff::run(block_rx, batch_tx, reader, slots, sizer, cfg)
        })
    };

    let batches = Arc::new(tokio::sync::Mutex::new(batch_rx));
    let write_tasks: Vec<_> = writers
        .into_iter()
        .map(|w| {
            tokio::spawn(write_batches(
                w,
                batches.clone(),
                ctx.clone(),
                spec.batch.sleep,
            ))
        })
        .collect();
    drop(batches);

    let read_timeline = Arc::new(std::sync::Mutex::new(Vec::new()));
    let progress = (opts.progress || opts.timeline).then(|| {
        let rows_read = rows_read.clone();
        let name = name.clone();
        let timeline = read_timeline.clone();
        let print = opts.progress;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            for i in 1u64.. {
                tick.tick().await;
                let n = rows_read.load(Ordering::Relaxed);
                let t = started.elapsed().as_secs_f64();
                timeline.lock().expect("not poisoned").push((t as f32, n));
                if print && i % 10 == 0 {
                    eprintln!(
                        "pgdelta: sync '{name}': {n} rows read ({:.0} rows/s)",
                        n as f64 / t
                    );
                }
            }
        })
    });

    let read_result = read_task.await.map_err(join_err)?;
    summary.phases.read_s = started.elapsed().as_secs_f64();
    let diff_result = diff_task.await.map_err(join_err)?;
    let mut write_result: Result<WriteStats, Error> = Ok(WriteStats::default());
    for t in write_tasks {
        let r = t.await.map_err(join_err)?;
        write_result = match (write_result, r) {
            (Ok(a), Ok(b)) => Ok(a.merge(b)),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        };
    }
    if let Some(p) = progress {
        p.abort();
    }
    summary.phases.writes_done_s = started.elapsed().as_secs_f64();
    fill_rejections(&mut summary, &ctx);

    // Errors, most specific first: a writer failure stops the diff, which stops the reader.
    // Everything committed so far is recorded (the recorder commits what it has on drop).
    let mut written = match write_result {
        Ok(w) => w,
        Err(e) => {
            save_rejections(snapshot, &name, &summary);
            return Err(e);
        }
    };
    let mut outcome = diff_result?;
    let read = read_result?;
    if ctx.shutting_down() {
        return Err(Error::Interrupted {
            sync: name,
            message: format!(
                "stopped after reading {} rows; {} rows written and recorded, no deletes applied; the next run resumes",
                read.rows, written.rows
            ),
        });
    }
    if !read.complete {
        return Err(match read.interrupted {
            true => Error::Interrupted {
                sync: name,
                message: format!(
                    "stopped reading after {} rows; {} rows written and recorded, no deletes applied; the next run resumes",
                    read.rows, written.rows
                ),
            },
            false => Error::Internal("the source read stopped early without an error".into()),
        });
    }
    summary.rows_read = read.rows;
    summary.bytes_read = read.bytes;
    fill_counts(&mut summary, &outcome, &plan);

    // --- model errors: duplicate and NULL keys ---
    let mut model_errors = Vec::new();
    let mut forget = KeyBatch::default();
    for k in &outcome.duplicate_keys {
        forget.push(k);
    }
    let mut duplicate_names: Vec<String> = outcome
        .duplicate_keys
        .iter()
        .map(|k| plan.describe_key(k))
        .collect();
    if opts.dry_run {
        summary.duplicate_keys += diff::duplicate_hashes(&mut outcome.added_hashes).len() as u64;
    } else {
        // New keys written twice are found by the recorder, once it has recorded everything.
        recorder.flush().await?;
        let (count, keys) = recorder.duplicates();
        summary.duplicate_keys += count;
        for k in keys {
            duplicate_names.push(plan.describe_key(&k));
            forget.push(&k);
        }
    }
    if summary.duplicate_keys > 0 {
        duplicate_names.sort();
        duplicate_names.dedup();
        model_errors.push(format!(
            "{} key(s) appear more than once in the source model: {}{}; the key must be unique in the model (fix the query or the key); these keys were left out of the snapshot and are re-checked next run",
            summary.duplicate_keys,
            duplicate_names.iter().take(10).cloned().collect::<Vec<_>>().join("; "),
            if duplicate_names.len() > 10 { "; ..." } else { "" }
        ));
    }
    if outcome.null_keys > 0 {
        let samples: Vec<String> = outcome
            .null_key_samples
            .iter()
            .map(|k| plan.describe_key(k))
            .collect();
        model_errors.push(format!(
            "{} row(s) have a NULL key ({}); they were not written: filter them out of the model or choose non-null key columns",
            outcome.null_keys,
            samples.join("; ")
        ));
    }
    if !forget.is_empty() && !opts.dry_run {
        let n = forget.len();
        recorder
            .send(Record::Removed {
                keys: Arc::new(forget),
                rows: 0..n,
            })
            .await?;
    }

    // --- removed rows: snapshot entries not seen in this complete read ---
    let removed = reader.len().saturating_sub(outcome.seen_entries);
    summary.removed = removed;
    if removed > 0 && model_errors.is_empty() {
        let do_delete = spec.delete && !opts.dry_run;
        let over_guard = spec.delete
            && !reader.is_empty()
            && removed as f64 > spec.max_delete_ratio * reader.len() as f64;
        if over_guard {
            return Err(Error::DeleteGuard {
                sync: name,
                message: format!(
                    "this run would delete {removed} of {} synced rows ({:.1}%), more than the delete guard allows ({:.0}%); nothing was deleted. If the source really lost those rows, run again with --max-delete-ratio {:.2} (or max_delete_ratio in the config)",
                    reader.len(),
                    100.0 * removed as f64 / reader.len() as f64,
                    100.0 * spec.max_delete_ratio,
                    (removed as f64 / reader.len() as f64 + 0.01).min(1.0)
                ),
            });
        }
        if do_delete || opts.dry_run {
            let samples = delete_removed(
                dest,
                &reader,
                &outcome,
                &ctx,
                do_delete,
                if opts.dry_run { 10 } else { 0 },
                &mut written,
            )
            .await;
            fill_rejections(&mut summary, &ctx);
            let samples = match samples {
                Ok(s) => s,
                Err(e) => {
                    save_rejections(snapshot, &name, &summary);
                    return Err(e);
                }
            };
            summary.sample_removed = samples.iter().map(|k| plan.describe_key(k)).collect();
        } else {
            summary.notes.push(format!(
                "{removed} row(s) left the model and were kept in the destination (deletes are off; use --delete to propagate them)"
            ));
        }
    }
    drop(reader);
    summary.phases.deletes_done_s = started.elapsed().as_secs_f64();
    summary.written = written.rows;
    summary.deleted = written.deleted;
    summary.already_present = written.already_present;
    summary.batches = written.batches;
    summary.retries = written.retries;
    summary.reconnects = written.reconnects;

    // The read completed and every write committed: every stored hash is now computed under
    // this model (keys with model errors were dropped from the snapshot above, rejected rows
    // carry a stale hash).
    let trusted = !opts.dry_run;
    let fp = plan.row_fp.clone();
    let sync_name = name.clone();
    let snap = snapshot.clone();
    drop(ctx);
    let rec_stats = tokio::task::spawn_blocking(move || {
        recorder.finish(&snap, &sync_name, trusted.then_some(fp.as_str()))
    })
    .await
    .map_err(join_err)??;
    tracing::debug!(?rec_stats, "snapshot recorded");

    let st = sizer.stats();
    summary.min_batch = st.min_batch;
    summary.max_batch = st.max_batch;
    summary.timeouts = st.timeouts;
    summary.duration_s = started.elapsed().as_secs_f64();
    summary.rows_per_s = summary.rows_read as f64 / summary.duration_s.max(1e-9);
    summary.peak_rss_bytes = peak_rss_bytes();
    summary.cpu_s = cpu_seconds();
    [
        summary.batch_latency_ms_p50,
        summary.batch_latency_ms_p95,
        summary.batch_latency_ms_p99,
    ] = sizer.latency_percentiles();
    if opts.timeline {
        summary.batch_timeline = sizer.log();
        summary.read_timeline = read_timeline.lock().expect("not poisoned").clone();
        summary
            .read_timeline
            .push((summary.phases.read_s as f32, summary.rows_read));
    }
    if !opts.dry_run {
        save_rejections(snapshot, &name, &summary);
        if let Ok(json) = serde_json::to_string(&summary) {
            snapshot.log_run(&json)?;
        }
    }
    if !model_errors.is_empty() {
        return Err(Error::Model {
            sync: name,
            message: format!(
                "{}; no rows were deleted in this run",
                model_errors.join(". ")
            ),
        });
    }
    Ok(summary)
}

fn fill_rejections(summary: &mut Summary, ctx: &ApplyCtx) {
    let rej = ctx.rejections.lock().expect("not poisoned");
    summary.rejected = rej.count;
    summary.rejected_rows = rej.rows.clone();
}

/// Replaces the sync's list of rejected rows in the state file (`pgdelta log --rejected`).
fn save_rejections(snapshot: &Snapshot, sync: &str, summary: &Summary) {
    let json = serde_json::to_string(&summary.rejected_rows).unwrap_or_else(|_| "[]".into());
    if let Err(e) = snapshot.set_rejected(sync, &json) {
        tracing::warn!("sync '{sync}': cannot save the rejected rows: {e}");
    }
}

fn fill_counts(s: &mut Summary, o: &DiffOutcome, plan: &Plan) {
    s.added = o.added;
    s.changed = o.changed;
    s.unchanged = o.unchanged;
    s.duplicate_keys = o.duplicates;
    s.null_keys = o.null_keys;
    s.sample_added = o
        .sample_added
        .iter()
        .map(|k| plan.describe_key(k))
        .collect();
    s.sample_changed = o
        .sample_changed
        .iter()
        .map(|k| plan.describe_key(k))
        .collect();
}

struct ReadStats {
    rows: u64,
    bytes: u64,
    /// The trailer was seen: the read is complete and may produce deletes.
    complete: bool,
    interrupted: bool,
}

/// The source read: its session, where blocks go, and when to stop.
struct SourceRead {
    source: ConnInfo,
    client: tokio_postgres::Client,
    plan: Arc<Plan>,
    out: mpsc::Sender<Block>,
    rows_read: Arc<AtomicU64>,
    block_bytes: usize,
    sync: String,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl SourceRead {
    /// Streams the source COPY into framed blocks. `complete` only when the stream ended with
    /// its trailer; on shutdown the query is cancelled on the server.
    async fn run(self) -> Result<ReadStats, Error> {
        let SourceRead {
            source,
            client: src,
            plan,
            out,
            rows_read,
            block_bytes,
            sync,
            mut shutdown,
        } = self;

        let read_err = |e: tokio_postgres::Error| Error::SourceRead {
            sync: sync.clone(),
            message: pg_message(&e),
        };
        let stream = src.copy_out(&plan.copy_out_sql()).await.map_err(read_err)?;
        futures_util::pin_mut!(stream);
        let mut framer = Framer::new(plan.columns.len() as u16, plan.nkey as u16, block_bytes);
        let frame_err = |e| Error::Frame {
            sync: sync.clone(),
            source: e,
        };
        let mut stats = ReadStats {
            rows: 0,
            bytes: 0,
            complete: false,
            interrupted: false,
        };
        loop {
            let next = match shutdown.as_mut() {
                Some(sd) => tokio::select! {
                    n = stream.next() => n,
                    _ = wait_true(sd) => {
                        let _ = source.cancel(&src.cancel_token()).await;
                        stats.interrupted = true;
                        return Ok(stats);
                    }
                },
                None => stream.next().await,
            };
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(read_err)?;
            stats.bytes += chunk.len() as u64;
            framer.push(&chunk).map_err(frame_err)?;
            while let Some(block) = framer.take_block() {
                stats.rows += block.rows.len() as u64;
                rows_read.store(stats.rows, Ordering::Relaxed);
                if out.send(block).await.is_err() {
                    // The diff stopped (the writers failed): their error is the one to report.
                    return Ok(stats);
                }
            }
        }
        let last = framer.finish().map_err(frame_err)?;
        stats.rows += last.rows.len() as u64;
        rows_read.store(stats.rows, Ordering::Relaxed);
        if !last.rows.is_empty() && out.send(last).await.is_err() {
            return Ok(stats);
        }
        stats.complete = true;
        Ok(stats)
    }
}

/// Resolves once the watched flag is true (never, if its sender is gone).
async fn wait_true(rx: &mut tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One writer: takes batches from the shared queue until it closes, applies each (with
/// retries, splitting and bad-row isolation), and stops as soon as any writer failed.
async fn write_batches(
    mut writer: Option<Writer>,
    batches: Arc<tokio::sync::Mutex<mpsc::Receiver<WriteBatch>>>,
    ctx: Arc<ApplyCtx>,
    sleep: Duration,
) -> Result<WriteStats, Error> {
    let mut stats = WriteStats::default();
    loop {
        // On failure elsewhere or on shutdown, take no more batches: the queue is dropped, the
        // diff and the reader stop, and what was committed is recorded.
        if ctx.failed.load(Ordering::Relaxed) || ctx.shutting_down() {
            return Ok(stats);
        }
        let Some(batch) = batches.lock().await.recv().await else {
            return Ok(stats);
        };
        let Some(w) = writer.as_mut() else {
            continue; // dry run: nothing is written
        };
        apply(w, Work::Rows(&batch), &ctx, &mut stats).await?;
        drop(batch);
        pause(sleep).await;
    }
}

/// Finds the snapshot entries not seen in this read and deletes them from the destination in
/// batches (when `apply_deletes`), each committed batch recorded. Returns sample keys.
async fn delete_removed(
    dest: &ConnInfo,
    reader: &Arc<Reader>,
    outcome: &DiffOutcome,
    ctx: &ApplyCtx,
    apply_deletes: bool,
    samples: usize,
    stats: &mut WriteStats,
) -> Result<Vec<Vec<u8>>, Error> {
    let per_batch = ctx.sizer.rows().clamp(1000, 50_000);
    let (tx, mut rx) = mpsc::channel::<KeyBatch>(2);
    let scan = {
        let reader = reader.clone();
        let seen = outcome.seen.clone();
        tokio::task::spawn_blocking(move || {
            let mut cur = KeyBatch::default();
            let scan = reader.scan(|key, e| {
                if !seen.contains(e.slot) {
                    cur.push(key);
                    if cur.len() >= per_batch && tx.blocking_send(std::mem::take(&mut cur)).is_err()
                    {
                        return false;
                    }
                }
                true
            });
            if !cur.is_empty() {
                let _ = tx.blocking_send(cur);
            }
            scan
        })
    };
    let mut writer = if apply_deletes {
        Some(Writer::connect(dest, &ctx.plan, Strategy::Upsert).await?)
    } else {
        None
    };
    let mut sample = Vec::new();
    while let Some(keys) = rx.recv().await {
        for i in 0..keys.len().min(samples.saturating_sub(sample.len())) {
            sample.push(keys.key(i).to_vec());
        }
        let Some(w) = writer.as_mut() else {
            continue;
        };
        if ctx.shutdown.as_ref().is_some_and(|s| *s.borrow()) {
            return Err(Error::Interrupted {
                sync: ctx.sync.clone(),
                message: "stopped while deleting removed rows; deletes committed so far are recorded, the next run deletes the rest".into(),
            });
        }
        apply(w, Work::Deletes(&Arc::new(keys)), ctx, stats).await?;
    }
    scan.await.map_err(join_err)??;
    Ok(sample)
}

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("a pipeline task failed: {e}"))
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
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

/// Where the state file goes by default.
pub fn default_state_path() -> PathBuf {
    PathBuf::from("pgdelta.redb")
}
