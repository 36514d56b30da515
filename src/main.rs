//! The `pgdelta` command: thin glue over the library. Exit codes: 0 synced, 1 failed,
//! 2 usage or configuration error, 3 finished but some rows were rejected, 4 `verify` found
//! drift.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use pgdelta::config::{FlagModel, Invocation, Overrides, Request};
use pgdelta::conn::ConnInfo;
use pgdelta::snapshot::{Opened, Snapshot};
use pgdelta::spec::Mode;
use pgdelta::sync::{RunOptions, RunRecord, Summary};
use pgdelta::{Error, Rejection};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "pgdelta",
    version,
    about = "Keep a PostgreSQL table in step with a query on another PostgreSQL database, writing only what changed."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sync one model (flags) or the syncs of a config file.
    Sync(SyncArgs),
    /// Check connections, the model, the target, the key and privileges without writing.
    Check(SyncArgs),
    /// Compare the target with the model and the snapshot with the target; --repair fixes drift.
    Verify(VerifyArgs),
    /// Show the history of sync runs recorded in a state file.
    Log(LogArgs),
    /// Shrink a state file to its live pages (no run may hold it meanwhile).
    Compact(CompactArgs),
    /// Run the main job on a throwaway local PostgreSQL: seed, sync, churn, re-sync.
    Demo(pgdelta::tools::demo::DemoArgs),
    /// Read a table or query with binary COPY and discard it: the baseline a re-sync is held to.
    Read(ReadArgs),
    /// End-to-end benchmark against same-run baselines, on a throwaway Postgres or staging URLs.
    Bench(pgdelta::tools::bench::BenchArgs),
}

#[derive(Args)]
struct ReadArgs {
    /// Source connection string.
    #[arg(long, env = "PGDELTA_SOURCE_URL", hide_env_values = true)]
    source: String,
    /// Table to read (schema.table).
    #[arg(long, conflicts_with = "query")]
    table: Option<String>,
    /// Query to read.
    #[arg(long)]
    query: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct SyncArgs {
    /// TOML config file with [source], [destination], state and [[sync]] entries.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Run only the named sync of the config file.
    #[arg(long = "sync")]
    only: Option<String>,
    /// Source connection string (URL or key=value).
    #[arg(long, env = "PGDELTA_SOURCE_URL", hide_env_values = true)]
    source: Option<String>,
    /// Destination connection string (URL or key=value).
    #[arg(long, env = "PGDELTA_DESTINATION_URL", hide_env_values = true)]
    destination: Option<String>,
    /// Reach the source through this SSH bastion: USER@HOST[:PORT] (config: [source.ssh]).
    #[arg(long, env = "PGDELTA_SOURCE_SSH", value_name = "USER@HOST[:PORT]")]
    source_ssh: Option<String>,
    /// Reach the destination through this SSH bastion (config: [destination.ssh]).
    #[arg(long, env = "PGDELTA_DESTINATION_SSH", value_name = "USER@HOST[:PORT]")]
    destination_ssh: Option<String>,
    /// Private key for the SSH bastions (default: the SSH agent's keys, then ~/.ssh/id_*);
    /// an encrypted key's passphrase comes from PGDELTA_SSH_KEY_PASSPHRASE.
    #[arg(long, env = "PGDELTA_SSH_KEY", value_name = "FILE")]
    ssh_key: Option<PathBuf>,
    /// known_hosts file the bastions' host keys are checked against (default ~/.ssh/known_hosts).
    #[arg(long, env = "PGDELTA_SSH_KNOWN_HOSTS", value_name = "FILE")]
    ssh_known_hosts: Option<PathBuf>,
    /// Source table (schema.table).
    #[arg(long, conflicts_with = "query")]
    table: Option<String>,
    /// Source query (any SELECT).
    #[arg(long)]
    query: Option<String>,
    /// Destination table (schema.table).
    #[arg(long)]
    target: Option<String>,
    /// Key column(s), comma-separated: a PRIMARY KEY or UNIQUE constraint of the target.
    #[arg(long)]
    key: Option<String>,
    /// upsert (insert and update) or insert (new keys only).
    #[arg(long)]
    mode: Option<Mode>,
    /// Delete destination rows that left the model.
    #[arg(long)]
    delete: bool,
    /// State (snapshot) file.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Sync name inside the state file (default: the target table name).
    #[arg(long)]
    name: Option<String>,
    /// Field mapping, repeatable: TARGET_COLUMN=SOURCE_COLUMN. Without it, columns map by name.
    #[arg(long = "map", value_name = "TARGET=SOURCE")]
    map: Vec<String>,
    /// Pin the batch size in rows (default: adaptive).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Sleep between batches, in milliseconds.
    #[arg(long)]
    sleep_ms: Option<u64>,
    /// Destination sessions writing concurrently (default 2).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    writers: Option<u64>,
    /// Refuse to delete more than this share of the synced rows (0..1, default 0.5).
    #[arg(long)]
    max_delete_ratio: Option<f64>,
    /// statement_timeout for the source read, in milliseconds (default: none).
    #[arg(long)]
    read_timeout_ms: Option<u64>,
    /// Fail the run once the destination rejected more rows than this (default 100).
    #[arg(long)]
    max_rejected: Option<u64>,
    /// Retries of a write after connection loss, deadlocks or lock timeouts (default 9).
    #[arg(long)]
    max_retries: Option<u32>,
    /// Stop retrying a write after this many seconds (default 300).
    #[arg(long)]
    retry_timeout_s: Option<u64>,
    /// Write sync logs as tables (sync_runs, sync_rejections, sync_changes) in this schema of
    /// the destination, created on first use.
    #[arg(long, env = "PGDELTA_AUDIT_SCHEMA")]
    audit_schema: Option<String>,
    /// none (default) or all: also log every row written, deleted or rejected in sync_changes.
    #[arg(long)]
    audit_changes: Option<pgdelta::audit::Changes>,
    /// Write Prometheus metrics of every sync in the state file here after each run
    /// (atomically; for node_exporter's textfile collector).
    #[arg(long, env = "PGDELTA_METRICS_FILE")]
    metrics_file: Option<PathBuf>,
    /// Schedule mode: serve Prometheus metrics on http://HOST:PORT/metrics.
    #[arg(long, env = "PGDELTA_METRICS_ADDR", value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Print the plan (rows to add, change, remove) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Rewrite every row, as if the snapshot were empty (removed rows are still detected).
    #[arg(long)]
    full_resync: bool,
    /// Table models: only rows matching this SQL condition on the table's columns.
    #[arg(long = "where", value_name = "CONDITION")]
    filter: Option<String>,
    /// Read the whole model this run, even where only the changed rows would do.
    #[arg(long)]
    full_read: bool,
    /// Table models: read in full this often: 7d, 12h, "24 runs", always, never (default 7d).
    #[arg(long, value_name = "WHEN")]
    full_read_every: Option<String>,
    /// Table models: source sessions reading the table at once, under one snapshot: a number
    /// (1 = one stream) or auto (default: from the table's size and the source's settings).
    #[arg(long, value_name = "N|auto")]
    read_sessions: Option<pgdelta::spec::ReadSessions>,
    /// Syncs of a config file run at once, in dependency order (foreign keys between the
    /// targets, `after`); default 1 (config: jobs).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    jobs: Option<u64>,
    /// Query models: split the read across sessions by value ranges of this output column
    /// (an integer, numeric, date/time or uuid column read from a table, with statistics).
    #[arg(long, value_name = "COLUMN")]
    split_by: Option<String>,
    /// Sync only shard I of N (0-based): the rows whose key hashes to I, with this shard's own
    /// snapshot (sync name NAME#I/N) and deletes; N processes together sync the whole model.
    #[arg(long, value_name = "I/N", env = "PGDELTA_SHARD")]
    shard: Option<String>,
    /// Keep running and run every sync this often (15m, 1h, 1d), starting now; a failed run
    /// does not stop the schedule. SIGINT/SIGTERM finish the batch in flight and exit.
    #[arg(long, value_name = "DURATION", conflicts_with = "schedule")]
    every: Option<String>,
    /// Keep running and run every sync on this cron schedule (five fields, UTC), e.g.
    /// "0 2 * * *" for 02:00 daily.
    #[arg(long, value_name = "CRON")]
    schedule: Option<String>,
    /// Rebuild the snapshot from the target before the run (it is a cache of the target):
    /// costs one read of the target, and the run then writes only rows that differ.
    #[arg(long, conflicts_with = "full_resync")]
    rebuild_state: bool,
    /// JSON Lines on stdout; the last line is {"type":"summary",...}.
    #[arg(long)]
    json: bool,
    /// Include batch and read timelines in the JSON summary (used by `pgdelta bench`).
    #[arg(long, hide = true)]
    timeline: bool,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    sync: SyncArgs,
    /// Write the fixes: missing and different rows upserted, extra rows deleted (under the
    /// delete guard), and the snapshot rebuilt from the target.
    #[arg(long)]
    repair: bool,
}

#[derive(Args)]
struct LogArgs {
    /// State (snapshot) file.
    #[arg(long, default_value = "pgdelta.redb")]
    state: PathBuf,
    /// How many runs to show.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Only runs of this sync.
    #[arg(long = "sync")]
    only: Option<String>,
    /// Show the rows the destination rejected in each sync's last run instead.
    #[arg(long)]
    rejected: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompactArgs {
    /// State (snapshot) file.
    #[arg(long, default_value = "pgdelta.redb")]
    state: PathBuf,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    pgdelta::tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_tracing();
    let workers = match worker_threads(
        std::env::var("PGDELTA_WORKER_THREADS").ok().as_deref(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    ) {
        // `bench` times its baseline reads on this runtime: they keep the two workers they
        // were always measured with, whatever the syncs it starts are given.
        Ok(_) if matches!(cli.command, Command::Bench(_)) => BENCH_WORKERS,
        Ok(n) => n,
        Err(e) => {
            pgdelta::errln!("pgdelta: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            pgdelta::errln!("pgdelta: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Sync(a) => run_sync(a, false).await,
            Command::Check(a) => run_sync(a, true).await,
            Command::Verify(a) => run_verify(a).await,
            Command::Log(a) => run_log(a),
            Command::Compact(a) => run_compact(a),
            Command::Read(a) => run_read(a).await,
            Command::Bench(a) => match pgdelta::tools::bench::run(a).await {
                Ok(code) => code,
                Err(e) => report_error(&e, false, None),
            },
            Command::Demo(a) => match pgdelta::tools::demo::run(a).await {
                Ok(()) => 0,
                Err(e) => report_error(&e, false, None),
            },
        }
    });
    ExitCode::from(code as u8)
}

/// The runtime workers of `pgdelta bench` itself (the syncs it starts get [`worker_threads`]).
const BENCH_WORKERS: usize = 2;

/// The runtime's worker threads: `PGDELTA_WORKER_THREADS` when set, else 1 on a machine of two
/// cores or fewer and 2 above. The async side (sockets, framing rows, the writers' COPY) is
/// light work that wakes for every few KiB the source sends; with a second worker the two
/// keep waking each other to share it, which on two cores took CPU the source server needs (a
/// 10M-row no-change full read: 5.9-6.1 s of pgdelta CPU with one worker, 7.1-7.5 s with two;
/// docs/performance.md). The diff, the hashing and the snapshot have threads of their own.
fn worker_threads(var: Option<&str>, cores: usize) -> Result<usize, String> {
    match var.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(if cores <= 2 { 1 } else { 2 }),
        Some(v) => match v.parse::<usize>() {
            Ok(n @ 1..=256) => Ok(n),
            _ => Err(format!(
                "PGDELTA_WORKER_THREADS={v} is not a number of threads from 1 to 256; set it to one (or unset it for the default: 1 on two cores or fewer, else 2)"
            )),
        },
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PGDELTA_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| pgdelta::sync::LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .try_init();
}

impl SyncArgs {
    /// The flags as a configuration request: the model flags, and the settings that override
    /// the config file. Validation and defaults happen in one place, `config`.
    fn request(&self) -> Request {
        Request {
            config: self.config.clone(),
            only: self.only.clone(),
            source: self.source.clone(),
            destination: self.destination.clone(),
            source_ssh: self.source_ssh.clone(),
            destination_ssh: self.destination_ssh.clone(),
            ssh_key: self.ssh_key.clone(),
            ssh_known_hosts: self.ssh_known_hosts.clone(),
            state: self.state.clone(),
            audit_schema: self.audit_schema.clone(),
            audit_changes: self.audit_changes,
            metrics_file: self.metrics_file.clone(),
            metrics_addr: self.metrics_addr.clone(),
            jobs: self.jobs.map(|j| j as usize),
            model: FlagModel {
                table: self.table.clone(),
                query: self.query.clone(),
                target: self.target.clone(),
                key: self.key.clone(),
                name: self.name.clone(),
                map: self.map.clone(),
            },
            overrides: Overrides {
                mode: self.mode,
                delete: self.delete,
                batch_size: self.batch_size,
                sleep_ms: self.sleep_ms,
                writers: self.writers.map(|w| w as usize),
                max_delete_ratio: self.max_delete_ratio,
                read_timeout_ms: self.read_timeout_ms,
                max_rejected: self.max_rejected,
                max_retries: self.max_retries,
                retry_timeout_s: self.retry_timeout_s,
                filter: self.filter.clone(),
                full_read_every: self.full_read_every.clone(),
                read_sessions: self.read_sessions,
                shard: self.shard.clone(),
                split_by: self.split_by.clone(),
                every: self.every.clone(),
                schedule: self.schedule.clone(),
            },
        }
    }
}

async fn run_sync(a: SyncArgs, check_only: bool) -> i32 {
    let inv = match a.request().resolve() {
        Ok(i) => i,
        Err(e) => return report_error(&e, a.json, None),
    };
    if check_only {
        return run_check(&inv, a.json).await;
    }
    // A dry run leaves no state file where there was none.
    let opened = if a.dry_run {
        Snapshot::open_existing(&inv.state, pgdelta::snapshot::DEFAULT_CACHE_BYTES)
    } else {
        Snapshot::open(&inv.state, pgdelta::snapshot::DEFAULT_CACHE_BYTES).map(Opened::from)
    };
    let opened = match opened {
        Ok(s) => s,
        Err(e) => return report_error(&e.into(), a.json, None),
    };
    if opened.is_stand_in() && !a.json {
        pgdelta::errln!(
            "pgdelta: dry run: no state file at {} yet; the run is planned as the first one, and none is created",
            inv.state.display()
        );
    }
    let snapshot: &Snapshot = &opened;
    let opts = RunOptions {
        dry_run: a.dry_run,
        full_resync: a.full_resync,
        full_read: a.full_read,
        rebuild_state: a.rebuild_state,
        audit: inv.audit.clone(),
        // Progress goes to stderr; with --json, nothing but the JSON lines and errors.
        progress: !a.json,
        shutdown: shutdown_signal(),
        timeline: a.timeline,
        order: None,
    };
    if inv.specs.iter().any(|s| s.schedule.is_some()) {
        let Some(addr) = &inv.metrics_addr else {
            return run_scheduled(&inv, &opts, snapshot, a.json).await;
        };
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                let e = Error::Config(format!(
                    "cannot serve metrics on {addr}: {e}; give a free HOST:PORT to --metrics-addr"
                ));
                return report_error(&e, a.json, None);
            }
        };
        pgdelta::errln!("pgdelta: serving metrics on http://{addr}/metrics");
        return tokio::select! {
            code = run_scheduled(&inv, &opts, snapshot, a.json) => code,
            () = pgdelta::metrics::serve(listener, snapshot) => 0,
        };
    }
    if inv.metrics_addr.is_some() {
        let e = Error::Config(
            "--metrics-addr serves metrics while pgdelta keeps running: use it with --every or --schedule (for single runs, --metrics-file)".into(),
        );
        return report_error(&e, a.json, None);
    }
    if inv.specs.len() == 1 {
        return run_one(&inv, &inv.specs[0], &opts, snapshot, a.json).await;
    }
    run_ordered(&inv, &inv.specs, &opts, snapshot, a.json).await
}

/// Several syncs: up to `jobs` at once, in dependency order (`pgdelta::jobs`): foreign keys
/// between the targets (a child starts once its parent's writes are done; the parent's deletes
/// wait for the child) and `after` lists.
async fn run_ordered(
    inv: &Invocation,
    specs: &[pgdelta::spec::SyncSpec],
    opts: &RunOptions,
    snapshot: &Snapshot,
    json: bool,
) -> i32 {
    use pgdelta::jobs::{Order, Phase, RunOrder};
    use std::sync::Arc;
    let order = async {
        let dst = inv.destination.connect("destination", &[]).await?;
        let fks = pgdelta::jobs::foreign_keys(&dst, specs).await?;
        Order::new(specs, &fks)
    };
    let order = match order.await {
        Ok(o) => o,
        Err(e) => return report_error(&e, json, None),
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(inv.jobs));
    let phases: Vec<_> = specs
        .iter()
        .map(|_| Arc::new(tokio::sync::watch::channel(Phase::Waiting).0))
        .collect();
    let runs = specs.iter().enumerate().map(|(i, spec)| {
        let (order, phases, slots) = (&order, &phases, &slots);
        async move {
            for &p in &order.parents[i] {
                let _ = phases[p]
                    .subscribe()
                    .wait_for(|p| *p >= Phase::WritesDone)
                    .await;
            }
            for &p in &order.after[i] {
                let _ = phases[p]
                    .subscribe()
                    .wait_for(|p| *p == Phase::Finished)
                    .await;
            }
            let code = match (
                opts.shutdown.is_cancelled(),
                slots.clone().acquire_owned().await,
            ) {
                (false, Ok(slot)) => {
                    phases[i].send_replace(Phase::Running);
                    let mine = RunOptions {
                        order: Some(RunOrder {
                            phase: phases[i].clone(),
                            children: order
                                .children(i)
                                .iter()
                                .map(|&c| phases[c].subscribe())
                                .collect(),
                            slots: slots.clone(),
                            slot: Arc::new(tokio::sync::Mutex::new(Some(slot))),
                        }),
                        ..opts.clone()
                    };
                    run_one(inv, spec, &mine, snapshot, json).await
                }
                // Stopped before it started: nothing to report.
                _ => 0,
            };
            phases[i].send_replace(Phase::Finished);
            code
        }
    });
    futures_util::future::join_all(runs)
        .await
        .into_iter()
        .max()
        .unwrap_or(0)
}

/// Runs one sync and reports it (summary or error, metrics file); returns its exit code.
async fn run_one(
    inv: &Invocation,
    spec: &pgdelta::spec::SyncSpec,
    opts: &RunOptions,
    snapshot: &Snapshot,
    json: bool,
) -> i32 {
    let code = match pgdelta::sync::run_counted(&inv.source, &inv.destination, spec, opts, snapshot)
        .await
    {
        Ok(s) => {
            print_summary(&s, json);
            if s.rejected > 0 {
                3
            } else {
                0
            }
        }
        Err((e, so_far)) => report_failure(&e, json, Some(&spec.name), Some(so_far)),
    };
    if let Some(path) = &inv.metrics_file {
        // The run is recorded in the state file whatever happens here.
        if let Err(e) = pgdelta::metrics::write_file(path, snapshot) {
            tracing::warn!("{e}");
        }
    }
    code
}

/// Schedule mode (`every` / `schedule`): runs each sync when it is due, one batch at a time
/// (syncs due together run as one, in dependency order, up to `jobs` at once), until SIGINT/SIGTERM, which finish the batch in flight; a failed run is reported and the
/// schedule goes on; occurrences missed while a run went on are skipped with a warning.
/// Exits 0 once stopped: every run's outcome is in its own report, the run log and the metrics.
async fn run_scheduled(
    inv: &Invocation,
    opts: &RunOptions,
    snapshot: &Snapshot,
    json: bool,
) -> i32 {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let shown = |t: u64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
    };
    let mut schedules = Vec::new();
    for spec in &inv.specs {
        let Some(s) = &spec.schedule else {
            let e = Error::Config(format!(
                "sync '{}' has no every or schedule while other syncs of this config do: give each one (or --every / --schedule for all), or run it from another invocation",
                spec.name
            ));
            return report_error(&e, json, Some(&spec.name));
        };
        let first = s.first(now());
        pgdelta::errln!(
            "pgdelta: sync '{}' runs {s}; first run at {}",
            spec.name,
            shown(first)
        );
        schedules.push((spec, s, first));
    }
    loop {
        let Some(due) = schedules.iter().map(|s| s.2).min() else {
            return 0;
        };
        let batch: Vec<usize> = (0..schedules.len())
            .filter(|&i| schedules[i].2 == due)
            .collect();
        let wait = std::time::Duration::from_secs(due.saturating_sub(now()));
        tokio::select! {
            _ = opts.shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        if let [i] = batch[..] {
            run_one(inv, schedules[i].0, opts, snapshot, json).await;
        } else {
            // Syncs due at the same time run as one batch: in dependency order (foreign keys,
            // `after` among them), up to `jobs` at once.
            let names: Vec<&str> = batch
                .iter()
                .map(|&i| schedules[i].0.name.as_str())
                .collect();
            let specs: Vec<_> = batch
                .iter()
                .map(|&i| {
                    let mut spec = schedules[i].0.clone();
                    spec.after.retain(|a| names.contains(&a.as_str()));
                    spec
                })
                .collect();
            run_ordered(inv, &specs, opts, snapshot, json).await;
        }
        if opts.shutdown.is_cancelled() {
            break;
        }
        for i in batch {
            let (spec, schedule, due) = schedules[i];
            let (next, missed) = schedule.next(due, now());
            if missed > 0 {
                tracing::warn!(
                    "sync '{}': the run due at {} ended after its next {missed} occurrence(s): skipped them; next run at {}",
                    spec.name,
                    shown(due),
                    shown(next)
                );
            }
            schedules[i].2 = next;
        }
    }
    pgdelta::errln!("pgdelta: stopped; the next start resumes from what was recorded");
    0
}

/// Exit code of `verify` when the target or the snapshot drifted (and `--repair` was not given).
const EXIT_DRIFT: i32 = 4;

async fn run_verify(a: VerifyArgs) -> i32 {
    let json = a.sync.json;
    let inv = match a.sync.request().resolve() {
        Ok(i) => i,
        Err(e) => return report_error(&e, json, None),
    };
    // Without --repair, verify writes nothing: no state file where there was none.
    let opened = if a.repair {
        Snapshot::open(&inv.state, pgdelta::snapshot::DEFAULT_CACHE_BYTES).map(Opened::from)
    } else {
        Snapshot::open_existing(&inv.state, pgdelta::snapshot::DEFAULT_CACHE_BYTES)
    };
    let opened = match opened {
        Ok(s) => s,
        Err(e) => return report_error(&e.into(), json, None),
    };
    let snapshot: &Snapshot = &opened;
    let opts = RunOptions {
        progress: !json,
        shutdown: shutdown_signal(),
        audit: inv.audit.clone(),
        ..Default::default()
    };
    let mut code = 0;
    for spec in &inv.specs {
        let r = pgdelta::verify::verify(
            &inv.source,
            &inv.destination,
            spec,
            &opts,
            snapshot,
            a.repair,
        )
        .await;
        match r {
            Ok(r) => {
                print_verify(&r, json);
                let c = match (&r.repair, r.equal) {
                    (_, true) => 0,
                    (None, false) => EXIT_DRIFT,
                    (Some(s), false) if s.rejected > 0 => 3,
                    (Some(_), false) => 0,
                };
                code = code.max(c);
            }
            Err(e) => code = code.max(report_error(&e, json, Some(&spec.name))),
        }
    }
    code
}

fn print_verify(r: &pgdelta::verify::VerifyReport, json: bool) {
    if json {
        pgdelta::outln!("{}", serde_json::json!({"type": "verify", "data": r}));
    }
    let s = &r.snapshot;
    pgdelta::errln!(
        "pgdelta: verify '{}' -> {}: {} source rows, {} target rows: {} missing, {} different, {} extra; snapshot: {} entries, {} match, {} differ, {} gone from the target, {} target rows unknown to it, {} stale (rejected, to retry) ({:.2}s)",
        r.sync, r.target, r.source_rows, r.target_rows, r.missing, r.different, r.extra,
        s.entries, s.matching, s.differing, s.gone_from_target, s.unknown_to_snapshot, s.stale,
        r.duration_s
    );
    match &r.note {
        Some(why) => pgdelta::errln!("  compared by a rebuild of the target's snapshot: {why}"),
        None => pgdelta::errln!("  compared by the sync's snapshot: both tables read at once"),
    }
    for (what, keys) in [
        ("missing", &r.sample_missing),
        ("different", &r.sample_different),
        ("extra", &r.sample_extra),
        ("snapshot differs", &s.sample_differing),
        ("gone from the target", &s.sample_gone),
        ("unknown to the snapshot", &s.sample_unknown),
    ] {
        if !keys.is_empty() {
            pgdelta::errln!("  sample {what}: {}", keys.join(" | "));
        }
    }
    match (&r.repair, r.equal) {
        (_, true) => pgdelta::errln!("  the target equals the model, and the snapshot describes it"),
        (None, false) => pgdelta::errln!("  drift found: run again with --repair to write the fixes"),
        (Some(fix), false) => pgdelta::errln!(
            "  repaired: wrote {} rows, deleted {}, {} rejected; the snapshot was rebuilt from the target",
            fix.written, fix.deleted, fix.rejected
        ),
    }
}

/// A token cancelled on the first SIGINT or SIGTERM. The run then stops reading, finishes the
/// batches in flight and records them; a second signal exits at once (still safe: the snapshot
/// only ever holds committed rows).
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let tx = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        for n in 0.. {
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
            if n == 0 {
                pgdelta::errln!("pgdelta: stopping: finishing the batches in flight and recording them (signal again to exit at once)");
                tx.cancel();
            } else {
                pgdelta::errln!(
                    "pgdelta: exiting now; the next run resumes from what was recorded"
                );
                std::process::exit(130);
            }
        }
    });
    token
}

async fn run_check(inv: &Invocation, json: bool) -> i32 {
    let mut code = 0;
    let mut line = |ok: bool, what: String, fix: Option<String>| {
        if json {
            pgdelta::outln!(
                "{}",
                serde_json::json!({"type": "check", "data": {"ok": ok, "check": what, "fix": fix}})
            );
        } else {
            pgdelta::errln!(
                "{} {what}{}",
                if ok { "ok  " } else { "FAIL" },
                fix.map(|f| format!(": {f}")).unwrap_or_default()
            );
        }
        if !ok {
            code = 1;
        }
    };
    let src = inv.source.connect("source", &[]).await;
    let dst = inv.destination.connect("destination", &[]).await;
    match &src {
        Ok(_) => line(true, format!("connect to source {}", inv.source), None),
        Err(e) => line(
            false,
            format!("connect to source {}", inv.source),
            Some(e.to_string()),
        ),
    }
    match &dst {
        Ok(_) => line(
            true,
            format!("connect to destination {}", inv.destination),
            None,
        ),
        Err(e) => line(
            false,
            format!("connect to destination {}", inv.destination),
            Some(e.to_string()),
        ),
    }
    // A check creates no state file: where none exists, it checks that the first sync can.
    let snapshot = Snapshot::open_existing(&inv.state, 1 << 20);
    match &snapshot {
        Ok(s) if s.is_stand_in() => match state_file_creatable(&inv.state) {
            Ok(dir) => line(
                true,
                format!(
                    "state file {} does not exist yet; the first sync creates it ({dir} is writable)",
                    inv.state.display()
                ),
                None,
            ),
            Err(e) => line(false, format!("state file {}", inv.state.display()), Some(e)),
        },
        Ok(_) => line(
            true,
            format!("state file {} can be opened", inv.state.display()),
            None,
        ),
        Err(e) => line(
            false,
            format!("state file {}", inv.state.display()),
            Some(e.to_string()),
        ),
    }
    if let (Ok(src), Ok(dst)) = (&src, &dst) {
        for spec in &inv.specs {
            match pgdelta::check_plan(src, dst, spec).await {
                Ok(p) => line(
                    true,
                    format!(
                        "sync '{}': model readable, target {} writable, key ({}) is unique on the target, {} column(s) match{}",
                        spec.name,
                        p.target,
                        spec.key.join(", "),
                        p.columns,
                        if p.notes.is_empty() { String::new() } else { format!(" ({})", p.notes.join("; ")) }
                    ),
                    None,
                ),
                Err(e) => line(false, format!("sync '{}'", spec.name), Some(e.to_string())),
            }
            if let Ok(snapshot) = &snapshot {
                match pgdelta::sync::next_read(src, dst, spec, snapshot).await {
                    Ok((how, why)) => line(
                        true,
                        format!("sync '{}': the next run reads {how}: {why}", spec.name),
                        None,
                    ),
                    Err(e) => line(
                        false,
                        format!("sync '{}': how the next run reads", spec.name),
                        Some(e.to_string()),
                    ),
                }
            }
        }
        if let Some(audit) = &inv.audit {
            match pgdelta::audit::check_privileges(dst, audit).await {
                Ok(what) => line(true, what, None),
                Err(fix) => line(false, format!("audit schema {}", audit.schema), Some(fix)),
            }
        }
    }
    code
}

async fn run_read(a: ReadArgs) -> i32 {
    let run = async {
        let select = match (&a.table, &a.query) {
            (Some(t), None) => format!("SELECT * FROM {t}"),
            (None, Some(q)) => q.clone(),
            _ => return Err(Error::Config("give --table or --query".into())),
        };
        let client = ConnInfo::parse(&a.source)?
            .connect("source", &[("statement_timeout", "0".into())])
            .await?;
        pgdelta::tools::workload::copy_read(&client, &select).await
    };
    match run.await {
        Ok((bytes, took)) => {
            let data = serde_json::json!({
                "bytes": bytes,
                "duration_s": took.as_secs_f64(),
                "peak_rss_bytes": pgdelta::sync::peak_rss_bytes(),
            });
            if a.json {
                pgdelta::outln!("{}", serde_json::json!({"type": "read", "data": data}));
            }
            pgdelta::errln!(
                "pgdelta: read {} MiB with binary COPY in {:.2}s",
                bytes >> 20,
                took.as_secs_f64()
            );
            0
        }
        Err(e) => report_error(&e, a.json, None),
    }
}

fn run_compact(a: CompactArgs) -> i32 {
    match pgdelta::snapshot::compact(&a.state) {
        Ok(c) => {
            if a.json {
                pgdelta::outln!("{}", serde_json::json!({"type": "compact", "data": c}));
            }
            pgdelta::errln!(
                "pgdelta: compacted {} from {} MiB to {} MiB in {:.1}s",
                c.path,
                c.bytes_before >> 20,
                c.bytes_after >> 20,
                c.duration_s
            );
            0
        }
        Err(e) => report_error(&e.into(), a.json, None),
    }
}

/// Whether a sync could create the state file `path` that does not exist yet: the nearest
/// existing directory on its way takes a new file. Ok names that directory.
fn state_file_creatable(path: &std::path::Path) -> Result<String, String> {
    let mut dir = path.parent();
    while let Some(d) = dir {
        let d = if d.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            d
        };
        if d.exists() {
            let shown = d.display().to_string();
            return tempfile::NamedTempFile::new_in(d).map(|_| shown.clone()).map_err(|e| {
                format!(
                    "cannot create a file in {shown}: {e}; give --state a path in a writable directory"
                )
            });
        }
        dir = d.parent();
    }
    Err("no directory on its path exists; give --state a path in a writable directory".into())
}

fn run_log(a: LogArgs) -> i32 {
    let run = || -> anyhow::Result<()> {
        if !a.state.exists() {
            anyhow::bail!(
                "no state file at {}: no run is recorded there; give the --state (or `state` in the config) the syncs use",
                a.state.display()
            );
        }
        let snap =
            Snapshot::open(&a.state, 1 << 20).with_context(|| "cannot open the state file")?;
        if a.rejected {
            for (sync, rows) in snap.rejections::<Rejection>()? {
                if a.only.as_ref().is_some_and(|o| o != &sync) {
                    continue;
                }
                for r in rows {
                    print_rejection(&sync, &r, a.json);
                }
            }
            return Ok(());
        }
        let mut runs: Vec<(u64, RunRecord)> = snap.runs(usize::MAX)?;
        runs.retain(|(_, r)| a.only.as_ref().is_none_or(|o| r.sync() == o));
        let skip = runs.len().saturating_sub(a.limit);
        for (id, r) in runs.into_iter().skip(skip) {
            print_run(id, &r, a.json);
        }
        if !a.json {
            for (name, _meta, len) in snap.syncs()? {
                pgdelta::errln!("sync '{name}': {len} rows in the snapshot");
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => 0,
        Err(e) => {
            pgdelta::errln!("pgdelta: {e:#}");
            1
        }
    }
}

fn print_rejection(sync: &str, r: &Rejection, json: bool) {
    if json {
        pgdelta::outln!(
            "{}",
            serde_json::json!({"type": "rejected", "data": {"sync": sync, "row": r}})
        );
        return;
    }
    pgdelta::outln!(
        "{sync}: {} {} [{}] {}",
        r.operation,
        r.key,
        r.sqlstate,
        r.message
    );
}

fn print_run(id: u64, r: &RunRecord, json: bool) {
    if json {
        pgdelta::outln!(
            "{}",
            serde_json::json!({"type": "run", "data": {"id": id, "summary": r}})
        );
        return;
    }
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_micros(id);
    let when = humantime::format_rfc3339_seconds(when);
    match r {
        RunRecord::Failed(f) => pgdelta::outln!(
            "{when} {:<20} FAILED after {:.1}s: {}",
            f.sync,
            f.duration_s,
            f.error
        ),
        RunRecord::Finished(s) => pgdelta::outln!(
            "{when} {:<20} read {:>10}  added {:>8}  changed {:>8}  removed {:>8}  deleted {:>8}  written {:>8}  rejected {:>5}  {:>8.1}s",
            s.sync,
            s.rows_read,
            s.added,
            s.changed,
            s.removed,
            s.deleted,
            s.written,
            s.rejected,
            s.duration_s
        ),
    }
}

fn print_summary(s: &Summary, json: bool) {
    if json {
        pgdelta::outln!("{}", serde_json::json!({"type": "summary", "data": s}));
    }
    let verb = if s.dry_run { "would write" } else { "wrote" };
    pgdelta::errln!(
        "pgdelta: sync '{}' -> {}: read {} rows in {:.2}s ({:.0} rows/s); added {}, changed {}, removed {}{}, unchanged {}; {verb} {} rows{}{}",
        s.sync,
        s.target,
        s.rows_read,
        s.duration_s,
        s.rows_per_s,
        s.added,
        s.changed,
        s.removed,
        if s.deleted > 0 { format!(" (deleted {})", s.deleted) } else { String::new() },
        s.unchanged,
        if s.dry_run { s.added + s.changed } else { s.written },
        if s.dry_run { String::new() } else { format!(" in {} batches", s.batches) },
        if s.rejected > 0 { format!("; {} rows rejected", s.rejected) } else { String::new() },
    );
    if !s.read_strategy.is_empty() {
        let sessions = match s.read_sessions {
            0 | 1 => String::new(),
            n => format!(", {n} sessions"),
        };
        pgdelta::errln!(
            "  read: {}{sessions} ({})",
            s.read_strategy,
            s.read_strategy_reason
        );
    }
    for n in &s.notes {
        pgdelta::errln!("  note: {n}");
    }
    for r in s.rejected_rows.iter().take(20) {
        pgdelta::errln!(
            "  rejected {}: {} [{}] {}",
            r.operation,
            r.key,
            r.sqlstate,
            r.message
        );
    }
    if s.rejected > 20 {
        pgdelta::errln!(
            "  ... {} rejected rows in all: pgdelta log --rejected lists them",
            s.rejected
        );
    }
    if s.dry_run {
        for (what, keys) in [
            ("added", &s.sample_added),
            ("changed", &s.sample_changed),
            ("removed", &s.sample_removed),
        ] {
            if !keys.is_empty() {
                pgdelta::errln!("  sample {what}: {}", keys.join(" | "));
            }
        }
    }
}

fn report_error(e: &Error, json: bool, sync: Option<&str>) -> i32 {
    report_failure(e, json, sync, None)
}

/// The error on stderr; with `--json`, also an error line on stdout with the error's kind (a
/// stable name: `source_read`, `write_timeout`, `config`, ...) and, for a run that started, its
/// counts so far.
fn report_failure(
    e: &Error,
    json: bool,
    sync: Option<&str>,
    so_far: Option<pgdelta::sync::SoFar>,
) -> i32 {
    let code = e.exit_code();
    if json {
        let mut data = serde_json::json!({
            "sync": sync,
            "kind": e.kind(),
            "message": e.to_string(),
            "exit_code": code,
        });
        if let (Some(n), Some(obj)) = (so_far, data.as_object_mut()) {
            obj.insert("rows_read".into(), n.rows_read.into());
            obj.insert("written".into(), n.written.into());
            obj.insert("deleted".into(), n.deleted.into());
            obj.insert("rejected".into(), n.rejected.into());
        }
        pgdelta::outln!("{}", serde_json::json!({"type": "error", "data": data}));
    }
    pgdelta::errln!("pgdelta: error: {e}");
    code
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn one_worker_on_two_cores_unless_told() {
        assert_eq!(worker_threads(None, 1), Ok(1));
        assert_eq!(worker_threads(None, 2), Ok(1));
        assert_eq!(worker_threads(None, 16), Ok(2));
        assert_eq!(worker_threads(Some(" "), 2), Ok(1));
        assert_eq!(worker_threads(Some("4"), 2), Ok(4));
        for bad in ["0", "x", "-1", "257"] {
            let e = worker_threads(Some(bad), 2).unwrap_err();
            assert!(e.contains(&format!("PGDELTA_WORKER_THREADS={bad}")), "{e}");
        }
    }
}
