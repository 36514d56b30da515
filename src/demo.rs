//! `pgdelta demo`: the main job on an embedded default.
//!
//! Starts a throwaway PostgreSQL, seeds a realistic `orders` table in a source database, creates
//! the same table in a destination database, and runs: an initial sync, a no-change re-sync,
//! churn (updates, inserts, deletes) and a re-sync with deletes. It measures a plain binary COPY
//! read of the same table in the same run, so the re-sync times read as ratios, and checks that
//! the destination equals the source at the end.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_postgres::Client;

use crate::conn::ConnInfo;
use crate::error::{pg_message, Error};
use crate::model::{Mode, Model, SyncSpec};
use crate::pgserver::{Durability, TempPostgres};
use crate::snapshot::Snapshot;
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

/// The demo and benchmark table: a bigint key and the column types of a typical model.
pub const ORDERS_DDL: &str = "CREATE TABLE orders (
    id bigint PRIMARY KEY,
    customer_id integer NOT NULL,
    status text NOT NULL,
    amount numeric(12,2),
    paid boolean NOT NULL,
    tags text[],
    attrs jsonb,
    note text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz
)";

/// Seeds `rows` deterministic rows (ids 1..=rows).
pub fn seed_sql(rows: u64) -> String {
    format!(
        "INSERT INTO orders
         SELECT i,
                ((i * 7919) % 100000)::int,
                (ARRAY['new','paid','shipped','delivered','returned'])[1 + i % 5],
                ((i * 31) % 100000) / 100.0,
                i % 3 = 0,
                ARRAY['tag' || (i % 10), 'tag' || (i % 7)],
                jsonb_build_object('source', 'web', 'score', i % 100, 'flags', jsonb_build_array(i % 2 = 0, i % 3 = 0)),
                CASE WHEN i % 4 = 0 THEN NULL ELSE repeat(md5(i::text), 2) END,
                timestamptz '2024-01-01' + (i % 100000) * interval '1 minute',
                CASE WHEN i % 2 = 0 THEN timestamptz '2024-06-01' + (i % 5000) * interval '1 second' END
         FROM generate_series(1::bigint, {rows}) AS i"
    )
}

/// Updates about `share` of the rows, and deletes and inserts a tenth of that each. Rows are
/// picked by a hash of (id, round), so they are scattered over the table and every round picks
/// afresh (no round undoes another's changes).
pub fn churn_sql(rows: u64, share: f64, round: u32) -> String {
    let buckets = 1u64 << 16;
    let upd = ((buckets as f64 * share).round() as u64).max(1);
    let del = (upd / 10).max(1);
    let new_rows = (rows as f64 * share / 10.0).ceil() as u64;
    let pick = |salt: u64| {
        format!(
            "(hashint8(id * 7919 + {}) & {})",
            round as u64 * 1000 + salt,
            buckets - 1
        )
    };
    format!(
        "UPDATE orders SET status = 'changed{round}', updated_at = now() WHERE {} < {upd};
         DELETE FROM orders WHERE {} < {del};
         INSERT INTO orders SELECT i, 1, 'new', 1.00, false, NULL, '{{}}', 'inserted', now(), NULL
           FROM generate_series({start}, {end}) AS i;",
        pick(1),
        pick(2),
        start = rows * (round as u64 + 1) + 1,
        end = rows * (round as u64 + 1) + new_rows
    )
}

/// A content checksum of a table: (row count, sum of per-row hashes).
pub async fn table_checksum(client: &Client, table: &str) -> Result<(i64, i64), Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(hashtext(t::text)::bigint), 0)::int8 FROM {table} t"
            ),
            &[],
        )
        .await
        .map_err(|e| Error::Server(pg_message(&e)))?;
    Ok((row.get(0), row.get(1)))
}

/// Reads a whole query with binary COPY and discards it: the baseline every re-sync is held to.
/// The stream is consumed on a runtime worker, as the sync's reader is, so both are scheduled
/// alike.
pub async fn copy_read(client: &Client, select: &str) -> Result<(u64, Duration), Error> {
    let t0 = Instant::now();
    let stream = client
        .copy_out(&format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
        .await
        .map_err(|e| Error::Server(pg_message(&e)))?;
    let bytes = tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        let mut bytes = 0u64;
        while let Some(chunk) = stream.next().await {
            bytes += chunk.map_err(|e| Error::Server(pg_message(&e)))?.len() as u64;
        }
        Ok::<u64, Error>(bytes)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    Ok((bytes, t0.elapsed()))
}

/// Resets the kernel's peak-RSS counter for this process, so each phase reports its own peak.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub async fn admin(url: &str) -> Result<Client, Error> {
    ConnInfo::parse(url)?.connect("admin", &[]).await
}

pub async fn exec(client: &Client, sql: &str) -> Result<(), Error> {
    client
        .batch_execute(sql)
        .await
        .map_err(|e| Error::Server(format!("{}: {}", first_line(sql), pg_message(&e))))
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or("")
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
    exec(&src, ORDERS_DDL).await?;
    exec(&dst, ORDERS_DDL).await?;
    eprintln!(
        "pgdelta demo: seeding {} rows into demo_source.orders ...",
        args.rows
    );
    let t0 = Instant::now();
    exec(&src, &seed_sql(args.rows)).await?;
    exec(&src, "VACUUM ANALYZE orders").await?;
    eprintln!("pgdelta demo: seeded in {:.1}s", t0.elapsed().as_secs_f64());

    let dir = std::env::temp_dir().join(format!("pgdelta-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::Internal(e.to_string()))?;
    let snapshot = Snapshot::open(&dir.join("demo.redb"), crate::snapshot::DEFAULT_CACHE_BYTES)?;
    let source = ConnInfo::parse(&src_url)?;
    let destination = ConnInfo::parse(&dst_url)?;
    let spec = SyncSpec {
        name: "orders".into(),
        model: Model::Table("public.orders".into()),
        target: "public.orders".into(),
        key: vec!["id".into()],
        columns: Default::default(),
        mode: Mode::Upsert,
        delete: true,
        batch: Default::default(),
        max_delete_ratio: 0.5,
        read_timeout: None,
        max_rejected: crate::config::DEFAULT_MAX_REJECTED,
        retry: Default::default(),
    };
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

    exec(&src, &churn_sql(args.rows, args.churn, 1)).await?;
    reset_peak_rss();
    step(
        "re-sync after churn",
        crate::sync::run(&source, &destination, &spec, &opts, &snapshot).await?,
    );

    let a = table_checksum(&src, "orders").await?;
    let b = table_checksum(&dst, "orders").await?;
    let _ = std::fs::remove_dir_all(&dir);

    crate::outln!();
    crate::outln!("| step | time | rows read | added | changed | removed | written | vs COPY read | peak RSS |");
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
