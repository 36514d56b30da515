//! `pgdelta bench`: end-to-end benchmarks against a real PostgreSQL, with baselines measured in
//! the same run on the same data, so results read as ratios that hold across machines.
//!
//! Works on a throwaway local cluster (server defaults, fsync on) or, with `--source` and
//! `--destination`, on staging databases, where it touches nothing outside its own schema
//! `pgdelta_bench` and drops that schema at the end. Each sync runs as a child process of this
//! binary, so its peak RSS and CPU time are its own.
//!
//! Scenarios: `initial` (empty destination; baseline: a raw `COPY TO | COPY FROM` pipe into an
//! empty copy of the target), `nochange`, `churn` (1% updates, 0.1% inserts and deletes),
//! `churn10` (10%), `timeouts` (1% churn under a destination statement_timeout low enough to
//! force the batch size down); the last four against a plain binary COPY read. `nowrite`
//! (opt-in) is the 1% churn re-sync through the null destination (`--dry-run`): read, hash and
//! diff without writing, the cost of everything but the destination. `verify` (opt-in) runs
//! `pgdelta verify` on a synced table against reading both tables with binary COPY; `rebuild`
//! (opt-in) re-syncs an unchanged table after its state file was lost, against the same two
//! reads (the snapshot is rebuilt from the target, and nothing is written).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::pgserver::{Durability, TempPostgres};
use super::workload::{admin, churn_sql, copy_read, exec, orders_ddl, seed_sql, KeyType};
use crate::error::{pg_message, Error};
use crate::spec::ReadSessions;

const SCHEMA: &str = "pgdelta_bench";

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Rows in the benchmark table.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Scenarios to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "initial,nochange,churn,churn10,timeouts"
    )]
    pub scenarios: Vec<Scenario>,
    /// Repetitions per scenario (the median is reported), after one warm-up read.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Source database for a capacity test (default: a throwaway local cluster).
    #[arg(
        long,
        env = "PGDELTA_BENCH_SOURCE_URL",
        hide_env_values = true,
        requires = "destination"
    )]
    pub source: Option<String>,
    /// Destination database for a capacity test.
    #[arg(
        long,
        env = "PGDELTA_BENCH_DESTINATION_URL",
        hide_env_values = true,
        requires = "source"
    )]
    pub destination: Option<String>,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Compare ratios with an earlier `--json` result; exit 1 on a regression. A scenario over
    /// the limit is measured once more, and fails only if it is over the limit again.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Allowed growth of a scenario's ratio over the baseline's, in percent (0 or more).
    #[arg(long, default_value_t = 25.0, value_parser = percent)]
    pub max_regression: f64,
    /// Write a self-contained HTML report with charts.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Destination sessions per sync (default: pgdelta's default).
    #[arg(long)]
    pub writers: Option<usize>,
    /// Source sessions per read, comma-separated: every scenario runs once per value (`1,2,4`;
    /// `auto` is pgdelta's default). Without it, pgdelta's default.
    #[arg(long, value_delimiter = ',', value_name = "N|auto")]
    pub read_sessions: Vec<ReadSessions>,
    /// The table's key: `bigint` (rows in key order) or `uuid` (keys in no order).
    #[arg(long, value_enum, default_value_t = KeyType::Bigint)]
    pub key_type: KeyType,
}

/// A growth allowance in percent: a finite number, 0 or more (a negative one would fail
/// every scenario, however fast).
fn percent(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(p) if p.is_finite() && p >= 0.0 => Ok(p),
        _ => Err(format!("'{v}' is not a percentage of 0 or more (e.g. 30)")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Initial,
    Nochange,
    Churn,
    Churn10,
    Timeouts,
    Nowrite,
    Verify,
    Rebuild,
    /// Change-aware reads (the default for table models); the scenarios above read in full.
    #[serde(rename = "delta-nochange")]
    #[value(name = "delta-nochange")]
    DeltaNochange,
    #[serde(rename = "delta-churn")]
    #[value(name = "delta-churn")]
    DeltaChurn,
    #[serde(rename = "delta-churn10")]
    #[value(name = "delta-churn10")]
    DeltaChurn10,
}

impl ScenarioResult {
    /// The scenario's name, with its read sessions when the bench varied them.
    pub fn label(&self) -> String {
        label(self.scenario, self.read_sessions.as_deref())
    }
}

fn label(scenario: Scenario, read_sessions: Option<&str>) -> String {
    match read_sessions {
        Some(n) => format!("{} ({n} read sessions)", scenario.name()),
        None => scenario.name().into(),
    }
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Initial => "initial",
            Scenario::Nochange => "nochange",
            Scenario::Churn => "churn",
            Scenario::Churn10 => "churn10",
            Scenario::Timeouts => "timeouts",
            Scenario::Nowrite => "nowrite",
            Scenario::Verify => "verify",
            Scenario::Rebuild => "rebuild",
            Scenario::DeltaNochange => "delta-nochange",
            Scenario::DeltaChurn => "delta-churn",
            Scenario::DeltaChurn10 => "delta-churn10",
        }
    }
    /// Whether the run may read only what changed (otherwise `--full-read`).
    pub fn delta(&self) -> bool {
        matches!(
            self,
            Scenario::DeltaNochange | Scenario::DeltaChurn | Scenario::DeltaChurn10
        )
    }
    /// The baseline this scenario is held to, and the design's target ratio (if any).
    pub fn baseline(&self) -> (&'static str, Option<f64>) {
        match self {
            Scenario::Initial => ("raw COPY TO | COPY FROM pipe", Some(1.15)),
            Scenario::Nochange => ("plain binary COPY read", Some(1.15)),
            Scenario::Churn => ("plain binary COPY read", Some(1.4)),
            Scenario::Churn10 | Scenario::Timeouts | Scenario::Nowrite => {
                ("plain binary COPY read", None)
            }
            Scenario::Verify => ("binary COPY reads of the source and the target", Some(1.2)),
            Scenario::Rebuild => ("binary COPY reads of the source and the target", None),
            Scenario::DeltaNochange => ("plain binary COPY read", Some(0.10)),
            Scenario::DeltaChurn => ("plain binary COPY read", Some(0.35)),
            Scenario::DeltaChurn10 => ("plain binary COPY read", None),
        }
    }
}

/// One repetition of one scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rep {
    pub wall_s: f64,
    pub baseline_s: f64,
    pub ratio: f64,
    pub rows_per_s: f64,
    pub mb_per_s: f64,
    pub peak_rss_bytes: u64,
    pub cpu_s: f64,
    pub batches: u64,
    pub written: u64,
    pub deleted: u64,
    pub timeouts: u64,
    pub batch_latency_ms: [f64; 3],
    /// The sync's own JSON summary (timelines included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    /// `--read-sessions` of the runs (`None`: pgdelta's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_sessions: Option<String>,
    pub baseline: String,
    pub target_ratio: Option<f64>,
    /// Medians over the repetitions.
    pub wall_s: f64,
    pub baseline_s: f64,
    pub ratio: f64,
    pub peak_rss_bytes: u64,
    pub cpu_s: f64,
    pub meets_target: Option<bool>,
    pub reps: Vec<Rep>,
}

impl ScenarioResult {
    /// The lowest ratio of its repetitions (the median when it has none).
    pub fn best_ratio(&self) -> f64 {
        self.reps
            .iter()
            .map(|r| r.ratio)
            .reduce(f64::min)
            .unwrap_or(self.ratio)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub pgdelta_version: String,
    pub rows: u64,
    /// The table's key (`--key-type`); results before it had a bigint key.
    #[serde(default)]
    pub key_type: KeyType,
    pub bytes: u64,
    pub reps: usize,
    pub machine: String,
    pub server: String,
    pub scenarios: Vec<ScenarioResult>,
    /// The regression gate's second measurement of the scenarios its first found over the
    /// limit (see `--baseline`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confirmations: Vec<ScenarioResult>,
}

/// Peak RSS target from the design, bytes.
pub const RSS_TARGET: u64 = 256 << 20;

struct Setup {
    src_url: String,
    dst_url: String,
    src: Client,
    dst: Client,
    _server: Option<TempPostgres>,
    /// Scratch directory for the state file, removed on drop.
    dir: tempfile::TempDir,
}

pub async fn run(args: BenchArgs) -> Result<i32, Error> {
    // Read the baseline first: a wrong path fails before the long measurement, not after.
    let base = args.baseline.as_deref().map(load_baseline).transpose()?;
    if let (Some(b), Some(p)) = (&base, &args.baseline) {
        if b.key_type != args.key_type {
            return Err(Error::Config(format!(
                "baseline {} was measured with --key-type {}, this run uses {}: give a baseline measured with the same key type",
                p.display(),
                b.key_type.name(),
                args.key_type.name()
            )));
        }
    }
    let setup = setup(&args).await?;
    let result = measure(&args, &setup, base.as_ref()).await;
    // Clean up: our schema only.
    for c in [&setup.src, &setup.dst] {
        let _ = exec(c, &format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")).await;
    }
    let (report, regressions) = result?;
    if let Some(p) = &args.json {
        let json =
            serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(p, json)
            .map_err(|e| Error::Config(format!("cannot write {}: {e}", p.display())))?;
    }
    if let Some(p) = &args.report {
        let html = super::report::html(&report);
        std::fs::write(p, html)
            .map_err(|e| Error::Config(format!("cannot write {}: {e}", p.display())))?;
        eprintln!("pgdelta bench: report written to {}", p.display());
    }
    let Some(p) = &args.baseline else {
        return Ok(0);
    };
    for r in &regressions {
        eprintln!("pgdelta bench: REGRESSION: {r}");
    }
    if regressions.is_empty() {
        eprintln!(
            "pgdelta bench: no scenario regressed more than {}% against {}",
            args.max_regression,
            p.display()
        );
        return Ok(0);
    }
    Ok(1)
}

/// Runs the scenarios and, with `--baseline`, the regression gate: a scenario over its limit
/// is measured once more (all its repetitions again, after a fresh untimed sync) and counts as
/// a regression only when that second measurement is over the limit too, in its median and in
/// its best repetition (against the baseline's best). A busy minute on a shared machine then
/// fails neither; a real regression slows every repetition of both.
async fn measure(
    args: &BenchArgs,
    s: &Setup,
    base: Option<&BenchReport>,
) -> Result<(BenchReport, Vec<String>), Error> {
    let mut round = 0;
    let mut report = scenarios(args, s, &mut round).await?;
    print_table(&report);
    let Some(base) = base else {
        return Ok((report, Vec::new()));
    };
    let first = compare(&report, base, args.max_regression);
    if first.is_empty() {
        return Ok((report, Vec::new()));
    }
    for r in &first {
        eprintln!(
            "pgdelta bench: over the limit, measuring again to confirm: {}",
            r.message
        );
    }
    let mut again = args.clone();
    again.scenarios = report
        .scenarios
        .iter()
        .filter(|c| first.iter().any(|r| r.label == c.label()))
        .map(|c| c.scenario)
        .collect();
    again.scenarios.dedup();
    let second = scenarios(&again, s, &mut round).await?;
    print_table(&second);
    let best = compare_best(&second, base, args.max_regression);
    let confirmed: Vec<String> = compare(&second, base, args.max_regression)
        .into_iter()
        .filter_map(|r| {
            let before = first.iter().find(|f| f.label == r.label)?;
            let Some(b) = best.iter().find(|b| b.label == r.label) else {
                eprintln!(
                    "pgdelta bench: {}: over the limit again, but its best repetition is \
                     within it: a busy machine, not counted as a regression",
                    r.message
                );
                return None;
            };
            Some(format!(
                "{}; {} (first measurement {:.3})",
                r.message, b.message, before.ratio
            ))
        })
        .collect();
    report.confirmations = second.scenarios;
    Ok((report, confirmed))
}

fn load_baseline(p: &Path) -> Result<BenchReport, Error> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| Error::Config(format!("cannot read baseline {}: {e}", p.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Config(format!(
            "baseline {} is not a bench result: {e}",
            p.display()
        ))
    })
}

/// A scenario whose ratio grew more than the gate allows.
#[derive(Debug)]
pub struct Regression {
    pub label: String,
    pub ratio: f64,
    pub message: String,
}

/// Scenario ratios (medians) that grew more than `max_pct` percent over the baseline's.
pub fn compare(cur: &BenchReport, base: &BenchReport, max_pct: f64) -> Vec<Regression> {
    compare_by(cur, base, max_pct, "ratio", |s| s.ratio)
}

/// Scenarios whose best repetition's ratio grew more than `max_pct` percent over the
/// baseline's best: a regression of the code slows every repetition, a busy machine seldom
/// does (the CI run of 58af9ee measured nochange 1.75x and 2.10x, medians, against 1.27x,
/// with repetitions at 1.25x and 1.05x among them; see bench/README.md).
pub fn compare_best(cur: &BenchReport, base: &BenchReport, max_pct: f64) -> Vec<Regression> {
    compare_by(cur, base, max_pct, "best repetition's ratio", |s| {
        s.best_ratio()
    })
}

fn compare_by(
    cur: &BenchReport,
    base: &BenchReport,
    max_pct: f64,
    what: &str,
    ratio: impl Fn(&ScenarioResult) -> f64,
) -> Vec<Regression> {
    let mut out = Vec::new();
    for c in &cur.scenarios {
        let same =
            |b: &&ScenarioResult| b.scenario == c.scenario && b.read_sessions == c.read_sessions;
        let Some(b) = base.scenarios.iter().find(same) else {
            continue;
        };
        let (now, then) = (ratio(c), ratio(b));
        if now > then * (1.0 + max_pct / 100.0) {
            out.push(Regression {
                label: c.label(),
                ratio: now,
                message: format!(
                    "{}: {what} to the {} is {now:.3}, baseline {then:.3} (+{:.0}%, allowed +{:.0}%)",
                    c.label(),
                    c.baseline,
                    100.0 * (now / then - 1.0),
                    max_pct
                ),
            });
        }
    }
    out
}

async fn setup(args: &BenchArgs) -> Result<Setup, Error> {
    let (src_url, dst_url, server) = match (&args.source, &args.destination) {
        (Some(s), Some(d)) => (s.clone(), d.clone(), None),
        _ => {
            eprintln!(
                "pgdelta bench: starting a throwaway PostgreSQL (server defaults, fsync on) ..."
            );
            let pg = tokio::task::spawn_blocking(|| TempPostgres::start(Durability::Default))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
            let root = admin(&pg.url("postgres")).await?;
            exec(&root, "CREATE DATABASE bench_source").await?;
            exec(&root, "CREATE DATABASE bench_destination").await?;
            (
                pg.url("bench_source"),
                pg.url("bench_destination"),
                Some(pg),
            )
        }
    };
    let src = admin(&src_url).await?;
    let dst = admin(&dst_url).await?;
    for (c, which) in [(&src, "source"), (&dst, "destination")] {
        claim_schema(c, which).await?;
        exec(c, &format!("SET search_path = {SCHEMA}")).await?;
        exec(c, &orders_ddl(args.key_type)).await?;
    }
    exec(&dst, "CREATE TABLE orders_pipe (LIKE orders INCLUDING ALL)").await?;
    eprintln!("pgdelta bench: seeding {} rows ...", args.rows);
    let t0 = Instant::now();
    exec(&src, &seed_sql(args.rows, args.key_type)).await?;
    exec(&src, "VACUUM ANALYZE orders").await?;
    eprintln!(
        "pgdelta bench: seeded in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let dir = tempfile::Builder::new()
        .prefix("pgdelta-bench-")
        .tempdir()
        .map_err(|e| Error::Internal(format!("cannot create a scratch directory: {e}")))?;
    Ok(Setup {
        src_url,
        dst_url,
        src,
        dst,
        _server: server,
        dir,
    })
}

/// Creates our schema, or takes back one a crashed bench left behind; refuses a schema of
/// that name holding anything else.
async fn claim_schema(c: &Client, which: &str) -> Result<(), Error> {
    let others: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace \
             WHERE n.nspname = $1 AND cl.relkind IN ('r','v','m','p','f') \
               AND cl.relname NOT IN ('orders', 'orders_pipe')",
            &[&SCHEMA],
        )
        .await
        .map_err(|e| Error::Server(pg_message(&e)))?
        .get(0);
    if others > 0 {
        return Err(Error::Config(format!(
            "the {which} database has a schema {SCHEMA} with objects pgdelta bench did not create; pgdelta bench only works in a schema of its own: drop or rename it first"
        )));
    }
    exec(c, &format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")).await?;
    exec(c, &format!("CREATE SCHEMA {SCHEMA}")).await
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

async fn scenarios(args: &BenchArgs, s: &Setup, round: &mut u32) -> Result<BenchReport, Error> {
    let select = "SELECT * FROM orders";
    eprintln!("pgdelta bench: warm-up read ...");
    let (bytes, _) = copy_read(&s.src, select).await?;
    let state = s.dir.path().join("bench.redb");
    let mut synced = false;
    let mut results = Vec::new();
    let mut churn_p50 = None;
    let sessions: Vec<Option<ReadSessions>> = match args.read_sessions.is_empty() {
        true => vec![None],
        false => args.read_sessions.iter().copied().map(Some).collect(),
    };
    let runs = args
        .scenarios
        .iter()
        .flat_map(|sc| sessions.iter().map(move |n| (sc, *n)));
    for (sc, read_sessions) in runs {
        let (baseline, target) = sc.baseline();
        let mut reps = Vec::new();
        for rep in 0..args.reps.max(1) {
            if *sc != Scenario::Initial && !synced {
                eprintln!("pgdelta bench: untimed initial sync for {} ...", sc.name());
                let _ = std::fs::remove_file(&state);
                exec(&s.dst, "TRUNCATE orders").await?;
                child_sync(s, &state, args, &[], None).await?;
            }
            let n = read_sessions.map(|n| n.to_string());
            let mut extra: Vec<&str> = Vec::new();
            if let Some(n) = &n {
                extra.extend(["--read-sessions", n]);
            }
            // Verify reads in full by itself; `verify` must come first.
            if !sc.delta() && *sc != Scenario::Verify {
                extra.push("--full-read");
            }
            let mut timeout = None;
            let baseline_s = match sc {
                Scenario::Initial => {
                    let _ = std::fs::remove_file(&state);
                    exec(&s.dst, "TRUNCATE orders").await?;
                    exec(&s.dst, "TRUNCATE orders_pipe").await?;
                    exec(&s.dst, "CHECKPOINT").await.ok();
                    let t = copy_pipe(&s.src, &s.dst, select, "orders_pipe").await?;
                    exec(&s.dst, "TRUNCATE orders_pipe").await?;
                    exec(&s.dst, "CHECKPOINT").await.ok();
                    t
                }
                Scenario::Nochange | Scenario::DeltaNochange => copy_read(&s.src, select).await?.1,
                Scenario::Verify => {
                    extra.push("verify");
                    copy_read(&s.src, select).await?.1 + copy_read(&s.dst, select).await?.1
                }
                Scenario::Rebuild => {
                    let _ = std::fs::remove_file(&state);
                    copy_read(&s.src, select).await?.1 + copy_read(&s.dst, select).await?.1
                }
                Scenario::Nowrite => {
                    *round += 1;
                    exec(&s.src, &churn_sql(args.rows, 0.01, *round, args.key_type)).await?;
                    extra.push("--dry-run");
                    copy_read(&s.src, select).await?.1
                }
                Scenario::Churn
                | Scenario::Churn10
                | Scenario::Timeouts
                | Scenario::DeltaChurn
                | Scenario::DeltaChurn10 => {
                    *round += 1;
                    let share = match sc {
                        Scenario::Churn10 | Scenario::DeltaChurn10 => 0.10,
                        _ => 0.01,
                    };
                    exec(&s.src, &churn_sql(args.rows, share, *round, args.key_type)).await?;
                    extra.push("--delete");
                    if *sc == Scenario::Timeouts {
                        // Low enough that the adaptive first batches time out.
                        let ms = churn_p50.map(|p: f64| (p / 4.0).max(5.0)).unwrap_or(20.0);
                        timeout = Some(ms.round() as u64);
                    }
                    copy_read(&s.src, select).await?.1
                }
            };
            let (wall, summary) = child_sync(s, &state, args, &extra, timeout).await?;
            if *sc == Scenario::Nowrite {
                // Untimed: write the churn the dry run left, so later scenarios start in step.
                child_sync(s, &state, args, &["--delete"], None).await?;
            }
            synced = true;
            let get = |k: &str| summary[k].as_f64().unwrap_or(0.0);
            let r = Rep {
                wall_s: wall.as_secs_f64(),
                baseline_s: baseline_s.as_secs_f64(),
                ratio: wall.as_secs_f64() / baseline_s.as_secs_f64().max(1e-9),
                rows_per_s: get("rows_read") / wall.as_secs_f64().max(1e-9),
                mb_per_s: get("bytes_read") / 1e6 / wall.as_secs_f64().max(1e-9),
                peak_rss_bytes: get("peak_rss_bytes") as u64,
                cpu_s: get("cpu_s"),
                batches: get("batches") as u64,
                written: get("written") as u64,
                deleted: get("deleted") as u64,
                timeouts: get("timeouts") as u64,
                batch_latency_ms: [
                    get("batch_latency_ms_p50"),
                    get("batch_latency_ms_p95"),
                    get("batch_latency_ms_p99"),
                ],
                summary: Some(summary),
            };
            eprintln!(
                "pgdelta bench: {} rep {}: {:.2}s vs {} {:.2}s = {:.3}x, peak RSS {} MiB, {} written, {} deleted, {} timeouts",
                label(*sc, n.as_deref()),
                rep + 1,
                r.wall_s,
                baseline,
                r.baseline_s,
                r.ratio,
                r.peak_rss_bytes >> 20,
                r.written,
                r.deleted,
                r.timeouts
            );
            reps.push(r);
        }
        if *sc == Scenario::Churn {
            churn_p50 = Some(median(reps.iter().map(|r| r.batch_latency_ms[0]).collect()));
        }
        let ratio = median(reps.iter().map(|r| r.ratio).collect());
        let peak = reps.iter().map(|r| r.peak_rss_bytes).max().unwrap_or(0);
        // Keep timelines only for the median repetition, to keep the JSON small.
        let mid = reps
            .iter()
            .enumerate()
            .min_by(|a, b| {
                (a.1.ratio - ratio)
                    .abs()
                    .total_cmp(&(b.1.ratio - ratio).abs())
            })
            .map(|(i, _)| i)
            .unwrap_or(0);
        for (i, r) in reps.iter_mut().enumerate() {
            if i != mid {
                r.summary = None;
            }
        }
        results.push(ScenarioResult {
            scenario: *sc,
            read_sessions: read_sessions.map(|n| n.to_string()),
            baseline: baseline.into(),
            target_ratio: target,
            wall_s: median(reps.iter().map(|r| r.wall_s).collect()),
            baseline_s: median(reps.iter().map(|r| r.baseline_s).collect()),
            ratio,
            peak_rss_bytes: peak,
            cpu_s: median(reps.iter().map(|r| r.cpu_s).collect()),
            meets_target: target.map(|t| ratio <= t && peak < RSS_TARGET),
            reps,
        });
    }
    let server: String = s
        .src
        .query_one("SELECT version()", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or_default();
    Ok(BenchReport {
        pgdelta_version: env!("CARGO_PKG_VERSION").into(),
        rows: args.rows,
        key_type: args.key_type,
        bytes,
        reps: args.reps,
        machine: machine(s.dir.path()),
        server,
        scenarios: results,
        confirmations: Vec::new(),
    })
}

/// Cores, memory, and the median time of an fsync'd 4 KiB write in `dir` (where the state file
/// is): every run pays a few (docs/performance.md, "Fewer fsyncs per run"), so on a disk where
/// one takes tens of milliseconds they are a large part of a small table's sync.
fn machine(dir: &Path) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0);
    let fsync = match fsync_ms(dir) {
        Ok(ms) => format!("{ms:.1} ms"),
        Err(e) => format!("not measured ({e})"),
    };
    format!("{cores} cores, {} GiB, fsync {fsync}", mem >> 20)
}

fn fsync_ms(dir: &Path) -> std::io::Result<f64> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let mut times = Vec::new();
    for _ in 0..8 {
        let start = Instant::now();
        f.write_all(&[0u8; 4096])?;
        f.sync_data()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(median(times))
}

/// Runs `pgdelta sync` (or `verify`) on the bench table as a child process; returns its wall
/// time and its last JSON record's data.
async fn child_sync(
    s: &Setup,
    state: &Path,
    args: &BenchArgs,
    extra: &[&str],
    statement_timeout_ms: Option<u64>,
) -> Result<(Duration, serde_json::Value), Error> {
    let exe = std::env::current_exe().map_err(|e| Error::Internal(e.to_string()))?;
    let dst = match statement_timeout_ms {
        Some(ms) => with_option(&s.dst_url, &format!("-c statement_timeout={ms}")),
        None => s.dst_url.clone(),
    };
    // `verify` in `extra` runs `pgdelta verify` instead of `pgdelta sync`.
    let verify = extra.first() == Some(&"verify");
    let (command, extra, want) = match verify {
        true => ("verify", &extra[1..], "verify"),
        false => ("sync", extra, "summary"),
    };
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args([
        command,
        "--table",
        "pgdelta_bench.orders",
        "--target",
        "pgdelta_bench.orders",
    ])
    .args(["--key", "id", "--json", "--timeline", "--state"])
    .arg(state)
    .args(extra)
    .env("PGDELTA_SOURCE_URL", &s.src_url)
    .env("PGDELTA_DESTINATION_URL", &dst)
    .env("PGDELTA_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(w) = args.writers {
        cmd.args(["--writers", &w.to_string()]);
    }
    let t0 = Instant::now();
    let out = cmd
        .output()
        .await
        .map_err(|e| Error::Internal(format!("cannot run pgdelta sync: {e}")))?;
    let wall = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_default();
    if !out.status.success() || v["type"] != want {
        return Err(Error::Internal(format!(
            "the benchmarked sync failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok((wall, v["data"].clone()))
}

/// Adds a server option to a connection URL or key=value string.
fn with_option(url: &str, option: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let enc: String = option
            .chars()
            .map(|c| match c {
                ' ' => "%20".to_string(),
                '=' => "%3D".to_string(),
                c => c.to_string(),
            })
            .collect();
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options={enc}")
    } else {
        format!("{url} options='{option}'")
    }
}

/// The raw pipe baseline: binary `COPY (select) TO STDOUT` streamed into `COPY target FROM STDIN`.
async fn copy_pipe(
    src: &Client,
    dst: &Client,
    select: &str,
    target: &str,
) -> Result<Duration, Error> {
    let err = |e: tokio_postgres::Error| Error::Server(pg_message(&e));
    let t0 = Instant::now();
    let out = src
        .copy_out(&format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
        .await
        .map_err(err)?;
    let sink = dst
        .copy_in::<_, bytes::Bytes>(&format!("COPY {target} FROM STDIN (FORMAT binary)"))
        .await
        .map_err(err)?;
    futures_util::pin_mut!(out);
    futures_util::pin_mut!(sink);
    while let Some(chunk) = out.next().await {
        sink.feed(chunk.map_err(err)?).await.map_err(err)?;
    }
    sink.as_mut().finish().await.map_err(err)?;
    Ok(t0.elapsed())
}

fn print_table(r: &BenchReport) {
    crate::outln!(
        "\npgdelta bench: {} rows ({} key, {} MiB of binary COPY), {} reps, medians; {}",
        r.rows,
        r.key_type.name(),
        r.bytes >> 20,
        r.reps,
        r.machine
    );
    crate::outln!(
        "| scenario | pgdelta | baseline | baseline time | ratio | target | peak RSS | CPU |"
    );
    crate::outln!("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    for s in &r.scenarios {
        crate::outln!(
            "| {} | {:.2}s | {} | {:.2}s | {:.3}x | {} | {} MiB | {:.1}s |",
            s.label(),
            s.wall_s,
            s.baseline,
            s.baseline_s,
            s.ratio,
            match (s.target_ratio, s.meets_target) {
                (Some(t), Some(true)) => format!("<= {t}x: met"),
                (Some(t), _) => format!("<= {t}x: MISSED"),
                _ => "-".into(),
            },
            s.peak_rss_bytes >> 20,
            s.cpu_s
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_in_urls() {
        assert_eq!(
            with_option("postgres://u@h/db", "-c statement_timeout=50"),
            "postgres://u@h/db?options=-c%20statement_timeout%3D50"
        );
        assert_eq!(
            with_option("postgres://u@h/db?sslmode=disable", "-c a=b"),
            "postgres://u@h/db?sslmode=disable&options=-c%20a%3Db"
        );
    }

    fn report(ratios: &[(Scenario, f64)]) -> BenchReport {
        BenchReport {
            pgdelta_version: "0".into(),
            rows: 1,
            key_type: KeyType::Bigint,
            bytes: 1,
            reps: 1,
            machine: String::new(),
            server: String::new(),
            scenarios: ratios
                .iter()
                .map(|(s, r)| ScenarioResult {
                    scenario: *s,
                    read_sessions: None,
                    baseline: "b".into(),
                    target_ratio: None,
                    wall_s: 1.0,
                    baseline_s: 1.0,
                    ratio: *r,
                    peak_rss_bytes: 0,
                    cpu_s: 0.0,
                    meets_target: None,
                    reps: vec![],
                })
                .collect(),
            confirmations: vec![],
        }
    }

    /// The confirmation's second test: the best repetitions against the baseline's best.
    #[test]
    fn regression_gate_compares_best_repetitions() {
        let with_reps = |ratios: &[f64]| {
            let mut r = report(&[(Scenario::Nochange, ratios[ratios.len() / 2])]);
            r.scenarios[0].reps = ratios
                .iter()
                .map(|&ratio| Rep {
                    wall_s: ratio,
                    baseline_s: 1.0,
                    ratio,
                    rows_per_s: 0.0,
                    mb_per_s: 0.0,
                    peak_rss_bytes: 0,
                    cpu_s: 0.0,
                    batches: 0,
                    written: 0,
                    deleted: 0,
                    timeouts: 0,
                    batch_latency_ms: [0.0; 3],
                    summary: None,
                })
                .collect();
            r
        };
        let base = with_reps(&[1.0, 1.1, 1.3]);
        // The CI run's second measurement: a busy machine, one repetition as fast as ever.
        let busy = with_reps(&[1.05, 2.1, 2.4]);
        assert_eq!(compare(&busy, &base, 30.0).len(), 1);
        assert!(compare_best(&busy, &base, 30.0).is_empty());
        // Every repetition slower by half: a regression by both tests.
        let slower = with_reps(&[1.5, 1.65, 1.95]);
        assert_eq!(compare(&slower, &base, 30.0).len(), 1);
        let r = compare_best(&slower, &base, 30.0);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].ratio, 1.5);
        assert!(r[0].message.contains("best repetition's ratio"), "{r:?}");
        // Without repetitions, the median stands for the best.
        let plain = report(&[(Scenario::Nochange, 1.5)]);
        assert_eq!(
            compare_best(&plain, &report(&[(Scenario::Nochange, 1.0)]), 30.0).len(),
            1
        );
    }

    #[test]
    fn regression_gate_compares_ratios() {
        let base = report(&[(Scenario::Nochange, 1.0), (Scenario::Churn, 1.2)]);
        let ok = report(&[(Scenario::Nochange, 1.2), (Scenario::Churn, 1.1)]);
        assert!(compare(&ok, &base, 25.0).is_empty());
        let bad = report(&[(Scenario::Nochange, 1.3), (Scenario::Churn, 1.1)]);
        let r = compare(&bad, &base, 25.0);
        assert_eq!(r.len(), 1);
        assert!(r[0].message.starts_with("nochange: ratio"), "{r:?}");
        assert_eq!((r[0].label.as_str(), r[0].ratio), ("nochange", 1.3));
    }
}
