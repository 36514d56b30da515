//! The `pgdelta` command: thin glue over the library. Exit codes: 0 synced, 1 failed,
//! 2 usage or configuration error, 3 finished but some rows were rejected.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use pgdelta::config::{default_name, split_list, ConfigFile, DEFAULT_MAX_DELETE_RATIO};
use pgdelta::conn::ConnInfo;
use pgdelta::model::{Mode, Model, SyncSpec};
use pgdelta::snapshot::Snapshot;
use pgdelta::sync::{RunOptions, Summary};
use pgdelta::Error;

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
    /// Show the history of sync runs recorded in a state file.
    Log(LogArgs),
    /// Run the main job on a throwaway local PostgreSQL: seed, sync, churn, re-sync.
    Demo(pgdelta::demo::DemoArgs),
    /// Read a table or query with binary COPY and discard it: the baseline a re-sync is held to.
    Read(ReadArgs),
    /// End-to-end benchmark against same-run baselines, on a throwaway Postgres or staging URLs.
    Bench(pgdelta::bench::BenchArgs),
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
    /// Print the plan (rows to add, change, remove) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Rewrite every row, as if the snapshot were empty (removed rows are still detected).
    #[arg(long)]
    full_resync: bool,
    /// JSON Lines on stdout; the last line is {"type":"summary",...}.
    #[arg(long)]
    json: bool,
    /// Include batch and read timelines in the JSON summary (used by `pgdelta bench`).
    #[arg(long, hide = true)]
    timeline: bool,
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgdelta: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Sync(a) => run_sync(a, false).await,
            Command::Check(a) => run_sync(a, true).await,
            Command::Log(a) => run_log(a),
            Command::Read(a) => run_read(a).await,
            Command::Bench(a) => match pgdelta::bench::run(a).await {
                Ok(code) => code,
                Err(e) => report_error(&e, false, None),
            },
            Command::Demo(a) => match pgdelta::demo::run(a).await {
                Ok(()) => 0,
                Err(e) => report_error(&e, false, None),
            },
        }
    });
    ExitCode::from(code as u8)
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PGDELTA_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .try_init();
}

/// Everything a sync invocation needs, resolved from config, flags and environment.
struct Invocation {
    source: ConnInfo,
    destination: ConnInfo,
    state: PathBuf,
    specs: Vec<SyncSpec>,
}

fn resolve(a: &SyncArgs) -> Result<Invocation, Error> {
    let file = match &a.config {
        Some(p) => Some((ConfigFile::load(p)?, p.clone())),
        None => None,
    };
    let from_file = |pick: fn(&ConfigFile) -> Option<&pgdelta::config::Endpoint>,
                     which: &str|
     -> Result<Option<String>, Error> {
        match &file {
            Some((f, _)) => match pick(f) {
                Some(e) => e.resolve(which),
                None => Ok(None),
            },
            None => Ok(None),
        }
    };
    let source = a
        .source
        .clone()
        .or(from_file(|f| f.source.as_ref(), "source")?)
        .ok_or_else(|| {
            Error::Config(
                "no source: give --source URL, PGDELTA_SOURCE_URL, or [source] in the config"
                    .into(),
            )
        })?;
    let destination = a
        .destination
        .clone()
        .or(from_file(|f| f.destination.as_ref(), "destination")?)
        .ok_or_else(|| Error::Config("no destination: give --destination URL, PGDELTA_DESTINATION_URL, or [destination] in the config".into()))?;
    let state = a
        .state
        .clone()
        .or_else(|| {
            file.as_ref().and_then(|(f, p)| {
                f.state
                    .as_ref()
                    .map(|s| p.parent().unwrap_or(std::path::Path::new(".")).join(s))
            })
        })
        .unwrap_or_else(pgdelta::sync::default_state_path);

    let model_flags =
        a.table.is_some() || a.query.is_some() || a.target.is_some() || a.key.is_some();
    let mut specs = Vec::new();
    if model_flags || file.is_none() {
        let model = match (&a.table, &a.query) {
            (Some(t), None) => Model::Table(t.clone()),
            (None, Some(q)) => Model::Query(q.clone()),
            _ => {
                return Err(Error::Config(
                    "give the model: --table SCHEMA.TABLE or --query SQL".into(),
                ))
            }
        };
        let target = a
            .target
            .clone()
            .ok_or_else(|| Error::Config("give --target SCHEMA.TABLE".into()))?;
        let key = split_list(a.key.as_deref().unwrap_or(""));
        if key.is_empty() {
            return Err(Error::Config(
                "give --key COL[,COL...]: the target's PRIMARY KEY or UNIQUE columns".into(),
            ));
        }
        let mut columns = std::collections::BTreeMap::new();
        for m in &a.map {
            let (d, s) = m
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("--map takes TARGET=SOURCE, got '{m}'")))?;
            columns.insert(d.trim().to_string(), s.trim().to_string());
        }
        let ratio = a.max_delete_ratio.unwrap_or(DEFAULT_MAX_DELETE_RATIO);
        if !(0.0..=1.0).contains(&ratio) {
            return Err(Error::Config(
                "--max-delete-ratio must be between 0 and 1".into(),
            ));
        }
        if a.batch_size == Some(0) {
            return Err(Error::Config("--batch-size must be at least 1".into()));
        }
        specs.push(SyncSpec {
            name: a.name.clone().unwrap_or_else(|| default_name(&target)),
            model,
            target,
            key,
            columns,
            mode: a.mode.unwrap_or(Mode::Upsert),
            delete: a.delete,
            batch: pgdelta::batch::BatchSettings {
                fixed_rows: a.batch_size,
                sleep: std::time::Duration::from_millis(a.sleep_ms.unwrap_or(0)),
                writers: a.writers.unwrap_or(2) as usize,
                ..Default::default()
            },
            max_delete_ratio: ratio,
            read_timeout: a.read_timeout_ms.map(std::time::Duration::from_millis),
            max_rejected: a
                .max_rejected
                .unwrap_or(pgdelta::config::DEFAULT_MAX_REJECTED),
            retry: Default::default(),
        });
    } else if let Some((f, path)) = &file {
        for entry in &f.syncs {
            let mut spec = entry.to_spec()?;
            // Flags override the file for every selected sync.
            if let Some(m) = a.mode {
                spec.mode = m;
            }
            if a.delete {
                spec.delete = true;
            }
            if let Some(b) = a.batch_size {
                spec.batch.fixed_rows = Some(b);
            }
            if let Some(w) = a.writers {
                spec.batch.writers = w as usize;
            }
            if let Some(s) = a.sleep_ms {
                spec.batch.sleep = std::time::Duration::from_millis(s);
            }
            if let Some(r) = a.max_delete_ratio {
                spec.max_delete_ratio = r;
            }
            if let Some(t) = a.read_timeout_ms {
                spec.read_timeout = Some(std::time::Duration::from_millis(t));
            }
            if let Some(m) = a.max_rejected {
                spec.max_rejected = m;
            }
            specs.push(spec);
        }
        if specs.is_empty() {
            return Err(Error::Config(format!(
                "config file {} has no [[sync]] entries",
                path.display()
            )));
        }
        let mut names = std::collections::HashSet::new();
        for s in &specs {
            if !names.insert(s.name.clone()) {
                return Err(Error::Config(format!(
                    "two syncs are named '{}'; give each a unique name",
                    s.name
                )));
            }
        }
        if let Some(only) = &a.only {
            specs.retain(|s| &s.name == only);
            if specs.is_empty() {
                return Err(Error::Config(format!(
                    "no sync named '{only}' in {}",
                    path.display()
                )));
            }
        }
    }
    for spec in &mut specs {
        if let Some(r) = a.max_retries {
            spec.retry.max_attempts = r + 1;
        }
        if let Some(t) = a.retry_timeout_s {
            spec.retry.max_elapsed = std::time::Duration::from_secs(t);
        }
    }
    Ok(Invocation {
        source: ConnInfo::parse(&source)?,
        destination: ConnInfo::parse(&destination)?,
        state,
        specs,
    })
}

async fn run_sync(a: SyncArgs, check_only: bool) -> i32 {
    let inv = match resolve(&a) {
        Ok(i) => i,
        Err(e) => return report_error(&e, a.json, None),
    };
    if check_only {
        return run_check(&inv, a.json).await;
    }
    let snapshot = match Snapshot::open(&inv.state, pgdelta::snapshot::DEFAULT_CACHE_BYTES) {
        Ok(s) => s,
        Err(e) => return report_error(&e.into(), a.json, None),
    };
    let opts = RunOptions {
        dry_run: a.dry_run,
        full_resync: a.full_resync,
        progress: true,
        shutdown: Some(shutdown_signal()),
        timeline: a.timeline,
    };
    let mut code = 0;
    for spec in &inv.specs {
        if opts.shutdown.as_ref().is_some_and(|s| *s.borrow()) {
            break;
        }
        match pgdelta::sync::run(&inv.source, &inv.destination, spec, &opts, &snapshot).await {
            Ok(s) => {
                print_summary(&s, a.json);
                if s.rejected > 0 {
                    code = code.max(3);
                }
            }
            Err(e) => code = code.max(report_error(&e, a.json, Some(&spec.name))),
        }
    }
    code
}

/// A flag that turns true on the first SIGINT or SIGTERM. The run then stops reading, finishes
/// the batches in flight and records them; a second signal exits at once (still safe: the
/// snapshot only ever holds committed rows).
fn shutdown_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
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
                eprintln!("pgdelta: stopping: finishing the batches in flight and recording them (signal again to exit at once)");
                let _ = tx.send(true);
            } else {
                eprintln!("pgdelta: exiting now; the next run resumes from what was recorded");
                std::process::exit(130);
            }
        }
    });
    rx
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
            eprintln!(
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
    if let (Ok(src), Ok(dst)) = (&src, &dst) {
        for spec in &inv.specs {
            match pgdelta::model::plan(src, dst, spec).await {
                Ok(p) => line(
                    true,
                    format!(
                        "sync '{}': model readable, target {} writable, key ({}) is unique on the target, {} column(s) match{}",
                        spec.name,
                        p.target,
                        spec.key.join(", "),
                        p.columns.len(),
                        if p.notes.is_empty() { String::new() } else { format!(" ({})", p.notes.join("; ")) }
                    ),
                    None,
                ),
                Err(e) => line(false, format!("sync '{}'", spec.name), Some(e.to_string())),
            }
        }
    }
    match Snapshot::open(&inv.state, 1 << 20) {
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
        pgdelta::demo::copy_read(&client, &select).await
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
            eprintln!(
                "pgdelta: read {} MiB with binary COPY in {:.2}s",
                bytes >> 20,
                took.as_secs_f64()
            );
            0
        }
        Err(e) => report_error(&e, a.json, None),
    }
}

fn run_log(a: LogArgs) -> i32 {
    let run = || -> anyhow::Result<()> {
        let snap =
            Snapshot::open(&a.state, 1 << 20).with_context(|| "cannot open the state file")?;
        if a.rejected {
            for (sync, json) in snap.rejected()? {
                if a.only.as_ref().is_some_and(|o| o != &sync) {
                    continue;
                }
                let rows: Vec<serde_json::Value> = serde_json::from_str(&json)?;
                for r in rows {
                    if a.json {
                        pgdelta::outln!(
                            "{}",
                            serde_json::json!({"type": "rejected", "data": {"sync": sync, "row": r}})
                        );
                    } else {
                        pgdelta::outln!(
                            "{sync}: {} {} [{}] {}",
                            r["operation"].as_str().unwrap_or(""),
                            r["key"].as_str().unwrap_or(""),
                            r["sqlstate"].as_str().unwrap_or(""),
                            r["message"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            return Ok(());
        }
        let runs = snap.runs(usize::MAX)?;
        let mut shown: Vec<(u64, serde_json::Value)> = runs
            .into_iter()
            .filter_map(|(id, json)| {
                serde_json::from_str::<serde_json::Value>(&json)
                    .ok()
                    .map(|v| (id, v))
            })
            .filter(|(_, v)| {
                a.only
                    .as_ref()
                    .is_none_or(|o| v["sync"].as_str() == Some(o))
            })
            .collect();
        let skip = shown.len().saturating_sub(a.limit);
        shown.drain(..skip);
        for (id, v) in shown {
            if a.json {
                pgdelta::outln!(
                    "{}",
                    serde_json::json!({"type": "run", "data": {"id": id, "summary": v}})
                );
            } else {
                let n = |k: &str| v[k].as_u64().unwrap_or(0);
                let when = format_unix(id / 1_000_000);
                let sync = v["sync"].as_str().unwrap_or("?");
                match v["error"].as_str() {
                    Some(err) => pgdelta::outln!("{when} {sync:<20} FAILED after {:.1}s: {err}", v["duration_s"].as_f64().unwrap_or(0.0)),
                    None => pgdelta::outln!(
                        "{when} {sync:<20} read {:>10}  added {:>8}  changed {:>8}  removed {:>8}  deleted {:>8}  written {:>8}  rejected {:>5}  {:>8.1}s",
                        n("rows_read"),
                        n("added"),
                        n("changed"),
                        n("removed"),
                        n("deleted"),
                        n("written"),
                        n("rejected"),
                        v["duration_s"].as_f64().unwrap_or(0.0)
                    ),
                }
            }
        }
        if !a.json {
            for (name, _meta, len) in snap.syncs()? {
                eprintln!("sync '{name}': {len} rows in the snapshot");
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pgdelta: {e:#}");
            1
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) from unix seconds, without a date crate.
fn format_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn print_summary(s: &Summary, json: bool) {
    if json {
        pgdelta::outln!("{}", serde_json::json!({"type": "summary", "data": s}));
    }
    let verb = if s.dry_run { "would write" } else { "wrote" };
    eprintln!(
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
    for n in &s.notes {
        eprintln!("  note: {n}");
    }
    for r in s.rejected_rows.iter().take(20) {
        eprintln!(
            "  rejected {}: {} [{}] {}",
            r.operation, r.key, r.sqlstate, r.message
        );
    }
    if s.rejected > 20 {
        eprintln!(
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
                eprintln!("  sample {what}: {}", keys.join(" | "));
            }
        }
    }
}

fn report_error(e: &Error, json: bool, sync: Option<&str>) -> i32 {
    let code = e.exit_code();
    if json {
        pgdelta::outln!(
            "{}",
            serde_json::json!({"type": "error", "data": {"sync": sync, "message": e.to_string(), "exit_code": code}})
        );
    }
    eprintln!("pgdelta: error: {e}");
    code
}
