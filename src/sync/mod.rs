//! One sync run, end to end. It reads like the architecture:
//!
//! ```text
//! prepare   connect, plan, begin the snapshot run, open the writers
//! pipeline  source COPY (tokio) --blocks--> diff (thread + rayon) --batches--> writers (tokio)
//!                                                                   | each commit -> recorder
//! settle    the read completed: forget duplicate keys, collect model errors
//! remove    snapshot entries not seen -> delete guard -> deletes (when asked)
//! finish    trust the stored hashes under this model; summary; run log
//! ```
//! Each step is a function returning a typed value. One [`Stop`] token carries every reason to
//! stop early (a signal, a writer that failed); what was committed is recorded either way, and
//! removed rows are only derived from a read that completed.

mod read;
mod status;
pub(crate) mod stop;
mod summary;
pub use status::LogWriter;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, AuditSettings, ChangeLog};
use crate::batch::{KeyBatch, WriteBatch};
use crate::conn::ConnInfo;
use crate::copy::Block;
use crate::delta::{self, Decision, SourceState};
use crate::diff::{self, Bitset, DiffConfig, DiffOutcome, SortSettings};
use crate::error::{join_err, Error};
use crate::key_ranges;
use crate::plan::{plan, Plan};
use crate::sink::BatchSettings;
use crate::sink::{
    self, AnyDestination, ApplyCtx, Destination, NullDestination, PgDestination, Sizer, Strategy,
    WriteStats,
};
use crate::snapshot::{Begin, BeginOptions, Reader, Recorder, Scratch, Snapshot};
use crate::source::{Read, ReadEnd, ReadOf, ReadStats, SourceRead};
use crate::spec::{Mode, Shard, SyncSpec};
use crate::split;
use crate::split::Split;
use stop::{Stop, StopReason};
use summary::Parts;
pub use summary::{
    cpu_seconds, peak_rss_bytes, BatchTimeline, FailedRun, Phases, Progress, ReadTimeline,
    RunRecord, SoFar, Summary,
};

/// Options of one invocation, shared by every sync it runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub dry_run: bool,
    pub full_resync: bool,
    /// Print progress lines on stderr while running.
    pub progress: bool,
    /// Cancelled on SIGINT/SIGTERM: stop reading, finish the queued batches, record them.
    pub shutdown: CancellationToken,
    /// Put the batch and read timelines in the summary (benchmarks, reports).
    pub timeline: bool,
    /// Read the whole model even where a delta would do (`--full-read`).
    pub full_read: bool,
    /// Clear the snapshot and rebuild it from the target (`--rebuild-state`).
    pub rebuild_state: bool,
    /// Write sync logs as tables in this schema of the destination (`--audit-schema`).
    pub audit: Option<AuditSettings>,
    /// This run's place among the syncs of an ordered invocation (`--jobs`).
    pub order: Option<crate::jobs::RunOrder>,
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
    /// Bytes of keys a key-only read looks up at a time, or writes to disk sorted when the
    /// keys come scattered (`read::scan`).
    pub key_window_bytes: usize,
    /// A read whose keys come scattered, against a snapshot of more entries than this, is
    /// sorted on disk before its rows are looked up (`diff::sort`).
    pub sort_above_entries: u64,
    /// Bytes of such a read's rows sorted in memory at a time, each a run on disk.
    pub sort_run_bytes: usize,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            block_bytes: 512 << 10,
            block_queue: 8,
            batch_queue: 2,
            key_window_bytes: read::KEY_WINDOW_BYTES,
            sort_above_entries: 500_000,
            sort_run_bytes: 32 << 20,
        }
    }
}

/// How the next run of `spec` would read its source, and why (`check` reports it): the
/// strategy (`full` or `delta`) and the reason, as the run's summary would give them. Reads
/// the catalogs, the source's transaction state (in a read-only transaction it rolls back) and
/// the state file; writes nothing.
pub async fn next_read(
    src: &tokio_postgres::Client,
    dst: &tokio_postgres::Client,
    spec: &SyncSpec,
    snapshot: &Snapshot,
) -> Result<(&'static str, String), Error> {
    let plan = plan(src, dst, spec).await?;
    let state = delta::begin(src, plan.table.as_ref(), &spec.name).await;
    let split = match &state {
        Ok(_) => split::model_layout(src, &plan, spec.read_sessions, &spec.name)
            .await
            .map(|l| l.map(|(_, note)| note)),
        Err(_) => Ok(None),
    };
    let _ = src.batch_execute("ROLLBACK").await;
    let (state, split) = (state?, split?);
    let meta = snapshot
        .syncs()?
        .into_iter()
        .find(|(n, ..)| n == &spec.name);
    // What `Snapshot::begin` would decide, read without beginning a run.
    let (basis, entries, rebuild, rewrite_all) = match &meta {
        Some((_, m, n)) if m.key_fp == plan.key_fp => {
            // A writing mark clears the entries (see `SyncMeta::writing`).
            let entries = if m.writing { 0 } else { *n };
            (
                m.basis.as_ref(),
                entries,
                (entries == 0 || m.rebuild_pending) && !plan.target_empty,
                m.row_fp.as_deref() != Some(plan.row_fp.as_str()),
            )
        }
        _ => (None, 0, !plan.target_empty, false),
    };
    let d = decide_read(
        &plan,
        spec,
        state.as_ref(),
        basis,
        entries,
        (rebuild, rewrite_all),
        false,
    );
    let reason = match split {
        Some(how) => format!("{}; {how}", d.reason),
        None => d.reason,
    };
    Ok((d.strategy.as_str(), reason))
}

/// How many times a run cancelled by a recovery conflict on a hot standby source starts over
/// (after 2, 4, 8, 16 and 32 s).
const RECOVERY_RETRIES: u32 = 5;

/// Runs one sync; a failed run is recorded in the run log too. The caller opens the snapshot
/// (holding its lock for the whole invocation).
pub async fn run(
    source: &ConnInfo,
    dest: &ConnInfo,
    spec: &SyncSpec,
    opts: &RunOptions,
    snapshot: &Snapshot,
) -> Result<Summary, Error> {
    run_counted(source, dest, spec, opts, snapshot)
        .await
        .map_err(|(e, _)| e)
}

/// [`run`], and a failure comes with what the run had done by then.
pub async fn run_counted(
    source: &ConnInfo,
    dest: &ConnInfo,
    spec: &SyncSpec,
    opts: &RunOptions,
    snapshot: &Snapshot,
) -> Result<Summary, (Error, SoFar)> {
    let started = Instant::now();
    let audit = match (&opts.audit, opts.dry_run) {
        (Some(a), false) => match Audit::start(dest, a, spec).await {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!("sync '{}': {e}; the run goes on without the audit log (the state file records it)", spec.name);
                None
            }
        },
        _ => None,
    };
    let changes = audit.as_ref().and_then(Audit::change_log);
    let pipe = PipelineSettings::default();
    let progress = Arc::new(Progress::default());
    let mut attempt = 0;
    let result = loop {
        let result = run_inner(
            source,
            dest,
            spec,
            opts,
            snapshot,
            &pipe,
            changes.clone(),
            &progress,
        )
        .await;
        match result {
            // A hot standby cancelled the read: nothing was deleted and every committed row is
            // recorded, so the run starts over, after a pause that lets replay catch up.
            Err(e) if e.is_recovery_conflict() && attempt < RECOVERY_RETRIES => {
                attempt += 1;
                let pause = Duration::from_secs(1 << attempt);
                tracing::warn!(
                    "sync '{}': {e}; running the sync again in {}s (retry {attempt} of {RECOVERY_RETRIES})",
                    spec.name,
                    pause.as_secs()
                );
                tokio::select! {
                    _ = opts.shutdown.cancelled() => break Err(e),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            result => break result,
        }
    };
    // The change log's writer ends when its last sender is gone: before the audit waits on it.
    drop(changes);
    if let Some(a) = audit {
        a.finish(&result, &progress).await;
    }
    if let (Err(e), false) = (&result, opts.dry_run) {
        let record = RunRecord::Failed(FailedRun {
            sync: spec.name.clone(),
            error: e.to_string(),
            duration_s: started.elapsed().as_secs_f64(),
        });
        if let Err(e) = snapshot.log_run(&record).await {
            tracing::warn!("sync '{}': cannot log the failed run: {e}", spec.name);
        }
    }
    result.map_err(|e| (e, progress.so_far()))
}

/// [`run`] with explicit pipeline settings, without logging a failed run or the audit log.
pub async fn run_with(
    source: &ConnInfo,
    dest: &ConnInfo,
    spec: &SyncSpec,
    opts: &RunOptions,
    snapshot: &Snapshot,
    pipe: &PipelineSettings,
) -> Result<Summary, Error> {
    run_inner(
        source,
        dest,
        spec,
        opts,
        snapshot,
        pipe,
        None,
        &Default::default(),
    )
    .await
}

async fn run_inner(
    source: &ConnInfo,
    dest: &ConnInfo,
    spec: &SyncSpec,
    opts: &RunOptions,
    snapshot: &Snapshot,
    pipe: &PipelineSettings,
    changes: Option<ChangeLog>,
    progress: &Arc<Progress>,
) -> Result<Summary, Error> {
    let env = RunEnv {
        source,
        dest,
        spec,
        opts,
        pipe,
        started: Instant::now(),
    };
    let p = prepare(&env, snapshot).await?;
    let ctx = Arc::new(ApplyCtx {
        sync: spec.name.clone(),
        plan: p.info.plan.clone(),
        recorder: (!opts.dry_run).then(|| p.recorder.clone()),
        sizer: p.info.sizer.clone(),
        policy: spec.retry,
        max_rejected: spec.max_rejected,
        rejections: Default::default(),
        stop: Stop::child_of(&opts.shutdown),
        changes,
        progress: progress.clone(),
    });
    let result = stages(&env, snapshot, p, &ctx).await;
    if let (Some(r), Err(_)) = (&ctx.recorder, &result) {
        // Every writer has stopped: the run's end tells whether its writes are all recorded.
        if let Err(e) = r.close().await {
            tracing::warn!("sync '{}': {e}", spec.name);
        }
    }
    let rejections = ctx.rejections();
    if !opts.dry_run && (result.is_ok() || rejections.count > 0) {
        // The rows rejected in this run replace the last run's list (`pgdelta log --rejected`).
        if let Err(e) = snapshot.set_rejections(&spec.name, &rejections.rows).await {
            tracing::warn!("sync '{}': cannot save the rejected rows: {e}", spec.name);
        }
    }
    let (summary, model_errors) = result?;
    if !opts.dry_run {
        let record = RunRecord::Finished(Box::new(summary.clone()));
        snapshot.log_run(&record).await?;
    }
    if !model_errors.is_empty() {
        return Err(Error::Model {
            sync: spec.name.clone(),
            message: format!(
                "{}; no rows were deleted in this run",
                model_errors.join(". ")
            ),
        });
    }
    Ok(summary)
}

/// What every step of a run reads.
#[derive(Clone, Copy)]
struct RunEnv<'a> {
    source: &'a ConnInfo,
    dest: &'a ConnInfo,
    spec: &'a SyncSpec,
    opts: &'a RunOptions,
    pipe: &'a PipelineSettings,
    started: Instant,
}

/// The stages after `prepare`, in order. Returns the summary and the model errors found.
async fn stages(
    env: &RunEnv<'_>,
    snapshot: &Snapshot,
    p: Prepared,
    ctx: &Arc<ApplyCtx>,
) -> Result<(Summary, Vec<String>), Error> {
    let Prepared {
        mut info,
        src,
        recorder,
        reader,
        writers,
        rebuild,
        split,
        scratch,
    } = p;
    let snapshot = scratch.as_ref().map_or(snapshot, |s| &s.snapshot);
    let dry_run = env.opts.dry_run;
    let (reader, rebuilt) = match rebuild {
        true => rebuild_from_target(env, snapshot, &info, &recorder, ctx, reader).await?,
        false => (reader, None),
    };
    let diff_cfg = DiffConfig {
        mode: env.spec.mode,
        rewrite_all: info.begin.rewrite_all,
        dry_run,
        slots: info.begin.next_slot.max(reader.len() as u32),
        seed: random_seed(),
        samples: if dry_run { 10 } else { 5 },
        max_batch_age: Duration::from_secs(1),
        ranges: None,
        seen_ranges: None,
        sort: Some(SortSettings {
            above: env.pipe.sort_above_entries,
            run_bytes: env.pipe.sort_run_bytes,
            block_bytes: env.pipe.block_bytes,
            dir: snapshot.dir(),
            max_disk: u64::MAX,
            path: snapshot.path().to_string(),
        }),
    };
    let read = read::Inputs {
        env,
        snapshot,
        recorder: &recorder,
        ctx,
        session: src,
        split: split.as_ref(),
    };
    let mut read = read
        .run(&mut info, reader.clone(), writers, diff_cfg)
        .await?;
    let model_errors = std::mem::take(&mut read.model_errors);
    let deletes_done_s = env.started.elapsed().as_secs_f64();
    drop(reader);
    // The read completed and every write committed: every stored hash is now computed under
    // this model (keys with model errors were forgotten above, rejected rows are stale).
    let trusted = (!dry_run).then(|| info.plan.row_fp.clone());
    let basis = match (
        &info.source_state,
        dry_run,
        model_errors.is_empty(),
        read::retry_keys(ctx),
    ) {
        (Some(state), false, true, Some(retry)) => Some(delta::next_basis(
            state,
            &info.plan.row_fp,
            info.begin.basis.as_ref(),
            info.decision.strategy,
            retry,
            unix_now(),
        )),
        _ => None,
    };
    let rec = recorder.finish(trusted, basis).await?;
    tracing::debug!(?rec, "snapshot recorded");
    let outcome = Outcome {
        read,
        rebuilt,
        deletes_done_s,
        read_sessions: split.as_ref().map_or(1, Split::used) as u32,
        parts_read: split.as_ref().is_none_or(Split::parts_read),
    };
    Ok((summarize(env, &info, outcome, ctx), model_errors))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a run found and did, stage by stage.
struct Outcome {
    /// The read stage's outcome (its model errors taken out: the run returns them).
    read: read::ReadOutcome,
    /// Rows of the target recorded into an empty snapshot before the read.
    rebuilt: Option<u64>,
    deletes_done_s: f64,
    /// Source sessions that read (the run's own, and the helpers of a split read).
    read_sessions: u32,
    /// The split read's parts were read (or the read is not split): its note applies.
    parts_read: bool,
}

/// The snapshot has no entries but the target has rows (a new or lost state file, a target
/// filled by another tool or restored from a dump, `--rebuild-state`): the snapshot is a cache
/// of what the destination holds, so it is rebuilt from the destination. The same stages run
/// with the target as the read (its synced columns, in the order and with the types of the
/// generated source query, so equal rows hash alike) and the null destination as the sink,
/// recording every row as committed, which it is. The run then writes only the rows that differ.
/// Returns the rebuilt view of the snapshot and how many rows it holds.
async fn rebuild_from_target(
    env: &RunEnv<'_>,
    snapshot: &Snapshot,
    info: &RunInfo,
    recorder: &Recorder,
    ctx: &Arc<ApplyCtx>,
    empty: Arc<Reader>,
) -> Result<(Arc<Reader>, Option<u64>), Error> {
    let name = &env.spec.name;
    tracing::info!(
        "sync '{name}': the snapshot has no entries and {} is not empty: rebuilding the snapshot from the target",
        info.plan.target
    );
    let settings = crate::source::session_settings(env.spec.read_timeout);
    let read = Read {
        conn: env.dest.clone(),
        clients: vec![Arc::new(
            env.dest.connect_reader("destination", &settings).await?,
        )],
        prelude: Vec::new(),
        copies: vec![info.plan.target_copy_sql()],
        newest_last: false,
        of: ReadOf::Target,
    };
    // No pause between batches and no user batch size: nothing is written.
    let mut spec = env.spec.clone();
    spec.batch = BatchSettings::default();
    let env = RunEnv {
        spec: &spec,
        ..*env
    };
    let rctx = Arc::new(ApplyCtx {
        sync: name.clone(),
        plan: info.plan.clone(),
        recorder: Some(recorder.clone()),
        sizer: Arc::new(Sizer::new(spec.batch)),
        policy: spec.retry,
        max_rejected: 0,
        rejections: Default::default(),
        stop: ctx.stop.clone(),
        changes: None,
        // The target's rows are not the run's reads or writes.
        progress: Default::default(),
    });
    let cfg = DiffConfig {
        mode: Mode::Upsert,
        rewrite_all: false,
        dry_run: false,
        slots: 0,
        seed: random_seed(),
        samples: 0,
        max_batch_age: Duration::from_secs(1),
        ranges: None,
        seen_ranges: None,
        sort: None,
    };
    let null = vec![AnyDestination::Null(NullDestination)];
    let piped = pipeline(&env, read, null, &empty, cfg, &rctx, None).await?;
    completed(&ctx.stop, &piped, name)?;
    // Apply what was recorded (staged records too) before reading it back.
    recorder.settle(Vec::new()).await?;
    Ok((
        Arc::new(snapshot.reader(name)?),
        Some(piped.diff.counts.added),
    ))
}

fn summarize(env: &RunEnv<'_>, info: &RunInfo, o: Outcome, ctx: &ApplyCtx) -> Summary {
    let plan = &info.plan;
    let r = &o.read;
    let describe = |keys: &[Vec<u8>]| keys.iter().map(|k| plan.describe_key(k)).collect();
    let mut notes: Vec<String> = plan
        .notes
        .iter()
        .chain(&info.begin.notes)
        .chain(info.split_note.iter().filter(|_| o.parts_read))
        .cloned()
        .collect();
    if let Some(n) = o.rebuilt {
        notes.push(format!(
            "the state file held no entries for this sync and {} was not empty: the snapshot was rebuilt from the target ({n} rows), so only rows that differ were written",
            plan.target
        ));
    }
    if let Some((runs, bytes)) = r.piped.diff.sorted {
        notes.push(format!(
            "the read's rows came with their keys scattered: {} MiB of them were sorted in {runs} runs in a temporary file beside the state file, then looked up in key order",
            bytes.div_ceil(1 << 20)
        ));
    }
    notes.extend(r.count_note.clone());
    notes.extend(r.keys_note.clone());
    notes.extend(r.removal.note.clone());
    notes.extend(r.missed.clone());
    let written = match env.opts.dry_run {
        true => WriteStats::default(),
        false => r.piped.written + r.removal.stats,
    };
    let sizer = &info.sizer;
    let timelines = env.opts.timeline.then(|| {
        let mut read = r.piped.read_timeline.clone();
        read.push((r.piped.read_s as f32, r.piped.read.rows));
        (sizer.log(), read)
    });
    Summary::build(Parts {
        sync: &env.spec.name,
        plan,
        mode: env.spec.mode.as_str(),
        strategy: info.strategy.as_str(),
        read_strategy: info.decision.strategy.as_str(),
        read_strategy_reason: &info.decision.reason,
        read_sessions: o.read_sessions,
        dry_run: env.opts.dry_run,
        rewrite_all: info.begin.rewrite_all,
        read: r.piped.read,
        counts: r.piped.diff.counts,
        duplicates: r.duplicates,
        removed: r.removal.removed,
        rebuilt: o.rebuilt.unwrap_or(0),
        written,
        rejections: ctx.rejections(),
        batches: sizer.stats(),
        latency_ms: sizer.latency_percentiles(),
        timeouts: info.timeouts.clone(),
        phases: Phases {
            read_s: r.piped.read_s,
            writes_done_s: r.piped.writes_done_s,
            deletes_done_s: o.deletes_done_s,
            counted_s: r.counted_s,
            keys_read_s: r.keys_read_s,
        },
        keys_read: r.keys_read,
        timelines,
        notes,
        samples: [
            describe(&r.piped.diff.sample_added),
            describe(&r.piped.diff.sample_changed),
            describe(&r.removal.samples),
        ],
    })
}

/// What a run decided before the first row moved.
struct RunInfo {
    plan: Arc<Plan>,
    begin: Begin,
    /// The source as the read's transaction sees it (table models on PostgreSQL 13+).
    source_state: Option<SourceState>,
    /// How the model is read, and why.
    decision: Decision,
    strategy: Strategy,
    sizer: Arc<Sizer>,
    /// Effective statement timeouts: the source read's (as shown), the writers' (ms).
    timeouts: (Option<String>, Option<u64>),
    /// How the table model's reads are split across sessions, or why they are not.
    split_note: Option<String>,
    /// The rows a full read returns, from the table's statistics (progress and its ETA).
    estimated_rows: Option<u64>,
}

/// How a run reads its source ([`delta::decide`]), from the plan, the source's state and what
/// the snapshot's start decided: `rebuild` (entries rebuilt from the target) and `rewrite_all`
/// (every row rewritten) both mean every row is read.
fn decide_read(
    plan: &Plan,
    spec: &SyncSpec,
    state: Option<&SourceState>,
    basis: Option<&delta::Basis>,
    entries: u64,
    (rebuild, rewrite_all): (bool, bool),
    forced: bool,
) -> Decision {
    let must_read_all = if rebuild {
        Some("the snapshot is rebuilt from the target")
    } else if rewrite_all {
        Some("every row is rewritten (--full-resync or a new model)")
    } else {
        None
    };
    delta::decide(&delta::Inputs {
        table: plan.table.as_ref(),
        state,
        basis,
        row_fp: &plan.row_fp,
        nkey: plan.nkey,
        entries,
        must_read_all,
        forced,
        every: spec.full_read_every,
        max_share: spec.delta_max_share,
        now: unix_now(),
    })
}

/// Everything a run sets up before the first row moves.
struct Prepared {
    info: RunInfo,
    /// The source session the read runs on, in the read's transaction.
    src: Arc<crate::tap::Session>,
    recorder: Recorder,
    /// The snapshot as it was when the run began.
    reader: Arc<Reader>,
    writers: Vec<AnyDestination>,
    /// The snapshot has no entries and the target has rows: rebuild it from the target first.
    rebuild: bool,
    /// The table model's reads split across sessions.
    split: Option<Split>,
    /// A dry run's scratch state file (see [`Begin::scratch`]): the stages use it, not the
    /// state file.
    scratch: Option<Scratch>,
}

/// Connects, plans, begins the snapshot run and opens the writers. Writers connect before the
/// read starts, so a destination that refuses sessions fails the run before the long read.
async fn prepare(env: &RunEnv<'_>, snapshot: &Snapshot) -> Result<Prepared, Error> {
    let (spec, name) = (env.spec, &env.spec.name);
    let read_settings = crate::source::session_settings(spec.read_timeout);
    let src = env.source.connect_reader("source", &read_settings).await?;
    let control = env
        .dest
        .connect("destination", &sink::session_settings())
        .await?;
    let plan = Arc::new(plan(&src, &control, spec).await?);
    drop(control);
    if !env.opts.dry_run {
        plan.writable(name)?;
    }
    for n in &plan.notes {
        tracing::info!("sync '{name}': {n}");
    }
    let source_timeout = crate::conn::show(&src, "statement_timeout").await.ok();
    let source_state = delta::begin(&src, plan.table.as_ref(), name).await?;
    let (split, split_note) = split::plan(
        &src,
        env.source,
        read_settings,
        &plan,
        spec.read_sessions,
        name,
    )
    .await?;
    // Why the read is not split; how it is, once its parts are read (a delta read is one
    // statement).
    if let (None, Some(n)) = (&split, &split_note) {
        tracing::info!("sync '{name}': {n}");
    }
    let estimated_rows = match (&plan.table, &spec.filter) {
        (Some(t), None) => estimate_rows(&src, t.oid)
            .await
            .map(|n| n / spec.shard.map_or(1, |s| u64::from(s.count))),
        _ => None,
    };
    let ranges = match (&plan.table, source_state.is_some()) {
        (Some(t), true) => {
            let rows = match estimated_rows {
                Some(n) => Some(n),
                None => estimate_rows(&src, t.oid).await,
            };
            key_ranges::propose(&src, &plan, rows).await
        }
        _ => None,
    };
    let how = BeginOptions {
        full_resync: env.opts.full_resync,
        clear: env.opts.rebuild_state,
        target_has_rows: !plan.target_empty,
        ranges,
        // A dry run writes no state file but a scratch one.
        dry_run: env.opts.dry_run && !snapshot.is_scratch(),
    };
    let (mut begin, mut recorder) = snapshot
        .begin(name, &plan.key_fp, &plan.row_fp, how)
        .await?;
    if let (Some(sh), true) = (spec.shard, begin.rebuild) {
        begin.notes.extend(reshard_note(snapshot, name, sh)?);
    }
    let scratch = match begin.scratch {
        true => {
            let (scratch, b, r) = scratch_begin(snapshot, name, &plan, how, begin).await?;
            (begin, recorder) = (b, r);
            Some(scratch)
        }
        false => None,
    };
    for n in &begin.notes {
        tracing::warn!("sync '{name}': {n}");
    }
    let snapshot = scratch.as_ref().map_or(snapshot, |s| &s.snapshot);
    let reader = Arc::new(snapshot.reader(name)?);
    let rebuild = begin.rebuild;
    let decision = decide_read(
        &plan,
        spec,
        source_state.as_ref(),
        begin.basis.as_ref(),
        reader.len(),
        (begin.rebuild, begin.rewrite_all),
        env.opts.full_read,
    );
    tracing::info!(
        "sync '{name}': {} read: {}",
        decision.strategy.as_str(),
        decision.reason
    );
    if decision.strategy == delta::ReadStrategy::Full && begin.basis.is_some() && !env.opts.dry_run
    {
        // Until this full read completes, the next run reads in full too.
        recorder.drop_basis().await?;
    }
    let strategy = Strategy::choose(spec.mode, plan.target_empty, reader.is_empty());
    let sizer = Arc::new(Sizer::new(spec.batch));
    let n = spec.batch.writers;
    let writers = sink::open_writers(env.dest, &plan, strategy, n, env.opts.dry_run).await?;
    let dest_timeout = writers.iter().filter_map(|w| w.statement_timeout()).min();
    if let Some(t) = dest_timeout {
        sizer.limit_latency(t);
    }
    let timeouts = (source_timeout, dest_timeout.map(|t| t.as_millis() as u64));
    Ok(Prepared {
        info: RunInfo {
            split_note,
            estimated_rows,
            plan,
            begin,
            source_state,
            decision,
            strategy,
            sizer,
            timeouts,
        },
        src: Arc::new(src),
        recorder,
        reader,
        writers,
        rebuild,
        split,
        scratch,
    })
}

/// A dry run whose real run would clear the snapshot's entries or rebuild them from the target
/// ([`Begin::scratch`]): it begins again on a scratch state file, where the rebuild goes, so the
/// state file is left as it was. `real` is what the state file's start decided: its notes, its
/// basis and whether every row is rewritten stand, so the dry run reports what the real run
/// would do.
async fn scratch_begin(
    snapshot: &Snapshot,
    name: &str,
    plan: &Plan,
    how: BeginOptions,
    real: Begin,
) -> Result<(Scratch, Begin, Recorder), Error> {
    let scratch = snapshot.scratch()?;
    let how = BeginOptions {
        dry_run: false,
        clear: false,
        ..how
    };
    let (begin, recorder) = scratch
        .snapshot
        .begin(name, &plan.key_fp, &plan.row_fp, how)
        .await?;
    let mut notes = real.notes;
    notes.push(format!(
        "dry run: the state file is left as it is; the snapshot is {} in a scratch file beside it, removed at the end",
        if begin.rebuild { "rebuilt from the target" } else { "started empty" }
    ));
    let begin = Begin {
        notes,
        basis: real.basis,
        rewrite_all: real.rewrite_all,
        ..begin
    };
    Ok((scratch, begin, recorder))
}

/// The rows of a table (every leaf of a partitioned one) by the planner's statistics; `None`
/// when a relation was never analyzed or the server cannot say (before PostgreSQL 12).
async fn estimate_rows(src: &tokio_postgres::Client, oid: u32) -> Option<u64> {
    let sql = format!(
        "SELECT sum(c.reltuples)::float8, bool_and(c.reltuples >= 0) FROM pg_class c WHERE {}",
        split::LEAVES_OF_1
    );
    let row = src.query_one(&sql, &[&(oid as i64)]).await.ok()?;
    let (n, known): (Option<f64>, Option<bool>) = (row.get(0), row.get(1));
    (known == Some(true)).then(|| n.unwrap_or(0.0).max(0.0) as u64)
}

/// A shard whose snapshot is empty, in a state file that holds snapshots of the same sync
/// under another shard count: the shards were re-cut. Each new shard rebuilds its snapshot from
/// its share of the target (nothing is rewritten that is already there); the old snapshots are
/// left as they are.
fn reshard_note(snapshot: &Snapshot, name: &str, shard: Shard) -> Result<Option<String>, Error> {
    let base = name.rsplit_once('#').map_or(name, |(b, _)| b);
    let mut before: Vec<String> = snapshot
        .syncs()?
        .into_iter()
        .filter_map(|(n, ..)| {
            let (b, sh) = n.rsplit_once('#')?;
            let old: Shard = sh.parse().ok()?;
            (b == base && old.count != shard.count).then(|| old.to_string())
        })
        .collect();
    before.sort();
    before.dedup();
    Ok((!before.is_empty()).then(|| {
        format!(
            "re-shard: this state file synced '{base}' as shard(s) {} before, now as shard {shard}: this shard's snapshot is rebuilt from its share of the target, so only rows that differ are written (the old shards' snapshots are no longer used)",
            before.join(", ")
        )
    }))
}

/// What the pipeline did.
struct Piped {
    read: ReadStats,
    diff: DiffOutcome,
    written: WriteStats,
    read_s: f64,
    writes_done_s: f64,
    read_timeline: Vec<(f32, u64)>,
}

/// Runs the source read, the diff and the writers, connected by bounded channels, until the
/// read ends and every batch is applied (or the run stops). Errors, most specific first: a
/// writer's failure stops the diff, which stops the reader, so the writer's error is the one.
/// `diffed`, when given, gets the added rows and the entries seen as soon as the read and the
/// diff have ended (the writers may still be busy): a delta read starts its key read then, a
/// full read its deletes. The diff's outcome then no longer holds the entries seen.
async fn pipeline(
    env: &RunEnv<'_>,
    read: Read,
    writers: Vec<AnyDestination>,
    reader: &Arc<Reader>,
    cfg: DiffConfig,
    ctx: &Arc<ApplyCtx>,
    diffed: Option<tokio::sync::oneshot::Sender<Diffed>>,
) -> Result<Piped, Error> {
    let (spec, opts, pipe) = (env.spec, env.opts, env.pipe);
    let (block_tx, block_rx) = mpsc::channel::<Block>(pipe.block_queue);
    let (batch_tx, batch_rx) = mpsc::channel::<WriteBatch>(pipe.batch_queue);
    let read_task = tokio::spawn(
        SourceRead {
            read,
            plan: ctx.plan.clone(),
            out: block_tx,
            progress: ctx.progress.clone(),
            block_bytes: pipe.block_bytes,
            sync: spec.name.clone(),
            stop: ctx.stop.clone(),
        }
        .run(),
    );
    // The diff learns whether the read completed before it writes rows it sorted on disk.
    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    let diff_task = {
        let (reader, sizer) = (reader.clone(), ctx.sizer.clone());
        tokio::task::spawn_blocking(move || {
            diff::run(block_rx, end_rx, batch_tx, reader, sizer, cfg)
        })
    };
    let batches = Arc::new(tokio::sync::Mutex::new(batch_rx));
    let write_tasks: Vec<_> = writers
        .into_iter()
        .map(|w| {
            let write = sink::write_batches(w, batches.clone(), ctx.clone(), spec.batch.sleep);
            tokio::spawn(write)
        })
        .collect();
    drop(batches);
    let timeline = Arc::new(Mutex::new(Vec::new()));
    let progress = (opts.progress || opts.timeline).then(|| {
        let name = spec.name.clone();
        let task = progress(
            ctx.progress.clone(),
            name,
            timeline.clone(),
            opts.progress,
            env.started,
        );
        tokio::spawn(task)
    });

    let read_result = read_task.await.map_err(join_err)?;
    let read_s = env.started.elapsed().as_secs_f64();
    let complete = matches!(&read_result, Ok(r) if r.end == ReadEnd::Complete);
    let _ = end_tx.send(complete && !ctx.stop.is_stopped());
    let mut diff_result = diff_task.await.map_err(join_err)?;
    if let (Some(tx), Ok(o)) = (diffed, &mut diff_result) {
        let c = &o.counts;
        let rows = c.rows();
        // A row read and not classified makes the read incomplete (`completed` says so).
        let all = matches!(&read_result, Ok(r) if r.rows == rows);
        let _ = tx.send(Diffed {
            rows,
            added: c.added,
            keys: o.added_keys.take(),
            complete: complete && all && !ctx.stop.is_stopped(),
            error_free: error_free(&ctx.plan, o),
            seen: Seen {
                slots: std::mem::take(&mut o.seen),
                entries: o.seen_entries,
                ranges: o.seen_counts.take(),
            },
        });
    }
    let mut written = Ok(WriteStats::default());
    for t in write_tasks {
        let r = t.await.map_err(join_err)?;
        written = match (written, r) {
            (Ok(a), Ok(b)) => Ok(a + b),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        };
    }
    if let Some(p) = progress {
        p.abort();
    }
    let writes_done_s = env.started.elapsed().as_secs_f64();
    let written = written?;
    let diff = diff_result?;
    let read = read_result?;
    let read_timeline = std::mem::take(&mut *timeline.lock().expect("not poisoned"));
    Ok(Piped {
        read,
        diff,
        written,
        read_s,
        writes_done_s,
        read_timeline,
    })
}

/// Samples rows read every 500 ms (the read timeline) and, when asked, shows progress on
/// stderr: a status line redrawn in place on a terminal, a plain line every 10 s otherwise.
async fn progress(
    p: Arc<Progress>,
    name: String,
    timeline: Arc<Mutex<Vec<(f32, u64)>>>,
    print: bool,
    started: Instant,
) {
    use std::io::IsTerminal;
    // On a terminal, this sync's status line (erased when the task ends: it is aborted when
    // the pipeline ends).
    let line = (print && std::io::stderr().is_terminal()).then(status::StatusLine::new);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for i in 1u64.. {
        tick.tick().await;
        let n = Progress::get(&p.rows_read);
        let t = started.elapsed().as_secs_f64();
        timeline.lock().expect("not poisoned").push((t as f32, n));
        if let Some(line) = &line {
            line.set(progress_line(&name, &p, t, true));
        } else if print && i % 20 == 0 {
            crate::errln!("{}", progress_line(&name, &p, t, false));
        }
    }
}

/// `pgdelta: sync 'x': [#####.....] read 4,500,000 of ~10,000,000 rows (45%, 750,000 rows/s,
/// about 7s left); written 1,200; deleted 0`.
fn progress_line(name: &str, p: &Progress, elapsed_s: f64, bar: bool) -> String {
    let read = Progress::get(&p.rows_read);
    let expected = Progress::get(&p.expected_rows);
    let rate = read as f64 / elapsed_s.max(0.001);
    let mut line = format!("pgdelta: sync '{name}': ");
    if expected > 0 {
        let share = (read as f64 / expected as f64).min(1.0);
        if bar {
            let full = (share * 20.0).round() as usize;
            line += &format!("[{}{}] ", "#".repeat(full), ".".repeat(20 - full));
        }
        let left = expected.saturating_sub(read) as f64 / rate.max(1.0);
        line += &format!(
            "read {} of ~{} rows ({:.0}%, {} rows/s, about {} left)",
            thousands(read),
            thousands(expected),
            share * 100.0,
            thousands(rate as u64),
            humantime::format_duration(Duration::from_secs(left.ceil() as u64))
        );
    } else {
        line += &format!(
            "read {} rows ({} rows/s)",
            thousands(read),
            thousands(rate as u64)
        );
    }
    line += &format!(
        "; written {}; deleted {}",
        thousands(Progress::get(&p.written)),
        thousands(Progress::get(&p.deleted))
    );
    line
}

/// 1234567 -> "1,234,567".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The read must have completed for the run to go on to settle and remove.
fn completed(stop: &Stop, piped: &Piped, sync: &str) -> Result<(), Error> {
    let interrupted = |what: &str| {
        Error::Interrupted {
        sync: sync.into(),
        message: format!(
            "{what} {} rows; {} rows written and recorded, no deletes applied; the next run resumes",
            piped.read.rows, piped.written.rows
        ),
    }
    };
    match (stop.reason(), piped.read.end) {
        (Some(StopReason::Interrupted), ReadEnd::Complete) => {
            Err(interrupted("stopped after reading"))
        }
        (Some(StopReason::Interrupted), _) => Err(interrupted("stopped reading after")),
        (Some(StopReason::WriterFailed), _) => Err(Error::Internal(
            "a writer failed without reporting its error".into(),
        )),
        (None, ReadEnd::Complete) => {
            // Every row read must have been classified: an entry whose row went missing on the
            // way would be taken for a removed row and deleted.
            let diffed = piped.diff.counts.rows();
            match diffed == piped.read.rows {
                true => Ok(()),
                false => Err(Error::Internal(format!(
                    "sync '{sync}': the source read {} rows but the diff classified {diffed}; no deletes applied, {} rows written and recorded",
                    piped.read.rows, piped.written.rows
                ))),
            }
        }
        (None, _) => Err(Error::Internal(
            "the source read stopped early without an error".into(),
        )),
    }
}

/// Duplicate keys (found by the diff, and new keys the snapshot recorded twice) are forgotten
/// by the snapshot, so the next run re-checks them; with NULL keys they are model errors.
/// Returns the number of duplicate keys and the model errors.
async fn settle(
    recorder: &Recorder,
    diffed: &mut DiffOutcome,
    plan: &Plan,
    dry_run: bool,
) -> Result<(u64, Vec<String>), Error> {
    let mut duplicates = diffed.counts.duplicates;
    let mut names: Vec<String> = diffed
        .duplicate_keys
        .iter()
        .map(|k| plan.describe_key(k))
        .collect();
    if dry_run {
        // Nothing was recorded: count duplicates among the new keys by their hashes.
        duplicates += diff::duplicate_hashes(&mut diffed.added_hashes).len() as u64;
    } else {
        let settled = recorder
            .settle(std::mem::take(&mut diffed.duplicate_keys))
            .await?;
        duplicates += settled.duplicates;
        names.extend(settled.duplicate_keys.iter().map(|k| plan.describe_key(k)));
    }
    let mut errors = Vec::new();
    if duplicates > 0 {
        names.sort();
        names.dedup();
        errors.push(format!(
            "{duplicates} key(s) appear more than once in the source model: {}{}; the key must be unique in the model (fix the query or the key); these keys were left out of the snapshot and are re-checked next run",
            names.iter().take(10).cloned().collect::<Vec<_>>().join("; "),
            if names.len() > 10 { "; ..." } else { "" }
        ));
    }
    if diffed.counts.null_keys > 0 {
        let samples: Vec<String> = diffed
            .null_key_samples
            .iter()
            .map(|k| plan.describe_key(k))
            .collect();
        errors.push(format!(
            "{} row(s) have a NULL key ({}); they were not written: filter them out of the model or choose non-null key columns",
            diffed.counts.null_keys,
            samples.join("; ")
        ));
    }
    Ok((duplicates, errors))
}

/// The snapshot entries a complete read met: the rest left the model.
struct Seen {
    slots: Bitset,
    entries: u64,
    /// The keys of the entries met, tallied per key range of the snapshot's spec (in the
    /// order met), when the diff kept them ([`DiffConfig::seen_ranges`]).
    ranges: Option<key_ranges::Counts>,
}

/// The added rows of a diff that has seen every row.
struct Diffed {
    /// Rows the diff saw, and how many of them were added.
    rows: u64,
    added: u64,
    /// Their keys as integers, when the diff noted them (for the key ranges).
    keys: Option<Vec<i64>>,
    /// The read completed (every part to its end, no stop); the model cannot have errors
    /// ([`error_free`]).
    complete: bool,
    error_free: bool,
    /// The snapshot entries the diff met (a full read's removed rows are the others).
    seen: Seen,
}

/// A table model whose key is unique and NOT NULL in the source, read with no duplicate or
/// NULL key met by the diff, cannot have model errors: settling cannot find any.
fn error_free(plan: &Plan, diff: &DiffOutcome) -> bool {
    let c = &diff.counts;
    plan.table.as_ref().is_some_and(|t| t.unique_key)
        && c.duplicates == 0
        && c.null_keys == 0
        && diff.duplicate_keys.is_empty()
}

/// What a complete read found out about the rows that left the model.
enum Gone {
    /// The entries it saw: the others left.
    Unseen(Seen),
    /// The keys that left (found by key ranges).
    Keys(KeyBatch),
}

/// What happened to the rows that left the model.
#[derive(Default)]
struct Removal {
    removed: u64,
    stats: WriteStats,
    samples: Vec<Vec<u8>>,
    note: Option<String>,
}

/// Destination sessions for deleting `rows` removed rows: as many as the sync's writers, but
/// one per 1,000 rows at most (the smallest delete batch), connected at once.
async fn delete_sessions(
    env: &RunEnv<'_>,
    ctx: &ApplyCtx,
    rows: u64,
) -> Result<Vec<AnyDestination>, Error> {
    let n = (env.spec.batch.writers.max(1) as u64).min(rows.div_ceil(1000).max(1));
    let connect = (0..n).map(|_| PgDestination::connect(env.dest, &ctx.plan, Strategy::Upsert));
    let sessions = futures_util::future::try_join_all(connect).await?;
    Ok(sessions
        .into_iter()
        .map(|d| AnyDestination::Postgres(Box::new(d)))
        .collect())
}

/// Has `sessions` find the rows of `keys` about to be deleted through them (each a share of
/// the keys, side by side; see [`PgDestination::warm`]). Only a head start: a failure is
/// logged, and the deletes then read the pages themselves.
async fn warm(sessions: &mut [AnyDestination], keys: &[Vec<u8>], sync: &str) {
    let per = keys.len().div_ceil(sessions.len().max(1)).max(1);
    let work = sessions
        .iter_mut()
        .zip(keys.chunks(per))
        .map(|(s, chunk)| async move {
            let AnyDestination::Postgres(pg) = s else {
                return;
            };
            let mut batch = crate::batch::KeyBatch::default();
            for k in chunk {
                batch.push(k);
            }
            if let Err(e) = pg.warm(&batch).await {
                tracing::debug!("sync '{sync}': finding the rows to delete ahead failed: {e}");
            }
        });
    futures_util::future::join_all(work).await;
}

/// Removed rows are the snapshot entries this complete read did not see (or the keys it found
/// gone). They are deleted (deletes on, under the delete guard), sampled (dry run), or kept
/// with a note; never when the model had errors. The deletes go through `sessions` when they
/// were opened ahead ([`delete_sessions`]), else through sessions opened now.
async fn remove(
    env: &RunEnv<'_>,
    reader: &Arc<Reader>,
    gone: Gone,
    ctx: &ApplyCtx,
    model_ok: bool,
    sessions: Option<Vec<AnyDestination>>,
) -> Result<Removal, Error> {
    let (spec, opts) = (env.spec, env.opts);
    if let Some(o) = &opts.order {
        o.writes_done();
    }
    let synced = reader.len();
    let removed = match &gone {
        Gone::Unseen(seen) => synced.saturating_sub(seen.entries),
        Gone::Keys(keys) => keys.len() as u64,
    };
    let mut out = Removal {
        removed,
        ..Default::default()
    };
    if removed == 0 || !model_ok {
        return Ok(out);
    }
    if spec.delete && removed as f64 > spec.max_delete_ratio * synced as f64 {
        let share = removed as f64 / synced as f64;
        return Err(Error::DeleteGuard {
            sync: spec.name.clone(),
            message: format!(
                "this run would delete {removed} of {synced} synced rows ({:.1}%), more than the delete guard allows ({:.0}%); nothing was deleted. If the source really lost those rows, run again with --max-delete-ratio {:.2} (or max_delete_ratio in the config)",
                100.0 * share,
                100.0 * spec.max_delete_ratio,
                (share + 0.01).min(1.0)
            ),
        });
    }
    let dests = match (opts.dry_run, spec.delete) {
        (true, _) => vec![AnyDestination::Null(NullDestination)],
        (false, true) => {
            // Rows of other syncs' targets that reference these go first.
            if let Some(o) = &opts.order {
                o.before_deletes().await;
            }
            match sessions {
                Some(sessions) => sessions,
                None => delete_sessions(env, ctx, removed).await?,
            }
        }
        (false, false) => {
            out.note = Some(format!(
                "{removed} row(s) left the model and were kept in the destination (deletes are off; use --delete to propagate them)"
            ));
            return Ok(out);
        }
    };
    let samples = if opts.dry_run { 10 } else { 0 };
    let gone_keys = match gone {
        Gone::Unseen(seen) => sink::Removed::Unseen {
            reader: reader.clone(),
            seen: seen.slots,
        },
        Gone::Keys(keys) => sink::Removed::Keys(keys),
    };
    let deleted = sink::delete_removed(dests, gone_keys, out.removed, ctx, samples).await?;
    out.stats = deleted.stats;
    out.samples = deleted.samples;
    Ok(out)
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn progress_lines_say_how_far_and_how_long() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        let p = Progress::default();
        p.rows_read.store(4_500_000, Ordering::Relaxed);
        p.written.store(1200, Ordering::Relaxed);
        assert_eq!(
            progress_line("orders", &p, 6.0, false),
            "pgdelta: sync 'orders': read 4,500,000 rows (750,000 rows/s); written 1,200; deleted 0"
        );
        p.expected_rows.store(10_000_000, Ordering::Relaxed);
        assert_eq!(
            progress_line("orders", &p, 6.0, true),
            "pgdelta: sync 'orders': [#########...........] read 4,500,000 of ~10,000,000 rows (45%, 750,000 rows/s, about 8s left); written 1,200; deleted 0"
        );
        // More rows than the statistics said: full, nothing left.
        p.rows_read.store(11_000_000, Ordering::Relaxed);
        assert!(progress_line("orders", &p, 10.0, true)
            .contains("[####################] read 11,000,000 of ~10,000,000 rows (100%"));
    }
}
