//! `pgdelta demo`: the main job on an embedded default.
//!
//! Starts a throwaway PostgreSQL, seeds a realistic `orders` table in a source database, creates
//! the same table in a destination database, and runs: an initial sync, a no-change re-sync,
//! churn (updates, inserts, deletes) and a re-sync with deletes. It measures a plain binary COPY
//! read of the same table in the same run, so the re-sync times read as ratios, and checks that
//! the destination equals the source at the end.

use std::time::Instant;

use super::pgserver::{Durability, TempPostgres};
use super::workload::{
    admin, churn_sql, copy_read, exec, orders_ddl, reset_peak_rss, seed_sql, table_checksum,
    KeyType,
};
use crate::conn::ConnInfo;
use crate::error::Error;
use crate::snapshot::Snapshot;
use crate::spec::{Model, SyncSpec};
use crate::sync::{RunOptions, Summary};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Rows in the seeded source table.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Share of rows updated by the churn step (inserts and deletes are a tenth of it each).
    #[arg(long, default_value_t = 0.01)]
    pub churn: f64,
}

pub async fn run(args: DemoArgs) -> Result<(), Error> {
    eprintln!("pgdelta demo: starting a throwaway PostgreSQL ...");
    let pg = tokio::task::spawn_blocking(|| TempPostgres::start(Durability::Fast))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let result = demo(&pg, &args).await;
    drop(pg);
    result
}

async fn demo(pg: &TempPostgres, args: &DemoArgs) -> Result<(), Error> {
    let root = admin(&pg.url("postgres")).await?;
    exec(&root, "CREATE DATABASE demo_source").await?;
    exec(&root, "CREATE DATABASE demo_destination").await?;
    let src_url = pg.url("demo_source");
    let dst_url = pg.url("demo_destination");
    let src = admin(&src_url).await?;
    let dst = admin(&dst_url).await?;
    exec(&src, &orders_ddl(KeyType::Bigint)).await?;
    exec(&dst, &orders_ddl(KeyType::Bigint)).await?;
    eprintln!(
        "pgdelta demo: seeding {} rows into demo_source.orders ...",
        args.rows
    );
    let t0 = Instant::now();
    exec(&src, &seed_sql(args.rows, KeyType::Bigint)).await?;
    exec(&src, "VACUUM ANALYZE orders").await?;
    eprintln!("pgdelta demo: seeded in {:.1}s", t0.elapsed().as_secs_f64());

    let dir = tempfile::Builder::new()
        .prefix("pgdelta-demo-")
        .tempdir()
        .map_err(|e| Error::Internal(format!("cannot create a scratch directory: {e}")))?;
    let state = dir.path().join("demo.redb");
    let snapshot = Snapshot::open(&state, crate::snapshot::DEFAULT_CACHE_BYTES)?;
    let source = ConnInfo::parse(&src_url)?;
    let destination = ConnInfo::parse(&dst_url)?;
    let mut spec = SyncSpec::new(
        "orders",
        Model::Table("public.orders".into()),
        "public.orders",
        &["id"],
    );
    spec.delete = true;
    let opts = RunOptions::default();
    let mut lines: Vec<(String, Summary)> = Vec::new();

    let mut step = |label: &str, s: Summary| {
        eprintln!(
            "pgdelta demo: {label}: {:.2}s, read {} rows, added {}, changed {}, removed {}, wrote {}, deleted {}, peak RSS {} MiB",
            s.duration_s, s.rows_read, s.added, s.changed, s.removed, s.written, s.deleted,
            s.peak_rss_bytes >> 20
        );
        lines.push((label.to_string(), s));
    };

    reset_peak_rss();
    step(
        "initial sync",
        crate::sync::run(&source, &destination, &spec, &opts, &snapshot).await?,
    );

    let (bytes, read_time) = copy_read(&src, "SELECT * FROM orders").await?;
    eprintln!(
        "pgdelta demo: baseline: plain binary COPY read of the source: {:.2}s ({} MiB)",
        read_time.as_secs_f64(),
        bytes >> 20
    );
    reset_peak_rss();
    step(
        "no-change re-sync",
        crate::sync::run(&source, &destination, &spec, &opts, &snapshot).await?,
    );

    exec(&src, &churn_sql(args.rows, args.churn, 1, KeyType::Bigint)).await?;
    reset_peak_rss();
    step(
        "re-sync after churn",
        crate::sync::run(&source, &destination, &spec, &opts, &snapshot).await?,
    );

    let a = table_checksum(&src, "orders").await?;
    let b = table_checksum(&dst, "orders").await?;
    drop(snapshot);
    drop(dir);

    crate::outln!();
    crate::outln!("| step | time | rows read | added | changed | removed | written + deleted | vs COPY read | peak RSS |");
    crate::outln!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    crate::outln!(
        "| plain binary COPY read (baseline) | {:.2}s | {} | | | | | 1.00x | |",
        read_time.as_secs_f64(),
        lines[0].1.rows_read
    );
    for (label, s) in &lines {
        crate::outln!(
            "| {label} | {:.2}s | {} | {} | {} | {} | {} | {:.2}x | {} MiB |",
            s.duration_s,
            s.rows_read,
            s.added,
            s.changed,
            s.removed,
            s.written + s.deleted,
            s.duration_s / read_time.as_secs_f64(),
            s.peak_rss_bytes >> 20
        );
    }
    crate::outln!();
    if a == b {
        crate::outln!("destination equals source: {} rows, checksum {}", a.0, a.1);
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "demo check failed: source has {} rows (checksum {}), destination {} rows (checksum {})",
            a.0, a.1, b.0, b.1
        )))
    }
}
