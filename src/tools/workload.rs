//! The workload the demo and the benchmark share: the `orders` table, seeding and churn SQL,
//! a content checksum, and the plain binary COPY read every re-sync is held to.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_postgres::Client;

use crate::conn::ConnInfo;
use crate::error::{pg_message, Error};

/// The type of the `orders` table's key.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// `id bigint`, 1..=rows: rows loaded in key order (the heap in key order).
    #[default]
    Bigint,
    /// `id uuid`, an MD5 of the row's number (`n`): keys in no order, as random UUIDs are, so a
    /// read's keys come scattered and the snapshot's random-key paths run (lookup windows, sorts
    /// and staged records on disk).
    Uuid,
}

impl KeyType {
    /// The name `--key-type` takes.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Bigint => "bigint",
            KeyType::Uuid => "uuid",
        }
    }

    /// The key of row number `n` (an SQL expression), and for a uuid key the `n` column too.
    fn key_of(self, n: &str) -> String {
        match self {
            KeyType::Bigint => n.to_string(),
            KeyType::Uuid => format!("md5({n}::text)::uuid, {n}"),
        }
    }

    /// The column that numbers the rows.
    fn number(self) -> &'static str {
        match self {
            KeyType::Bigint => "id",
            KeyType::Uuid => "n",
        }
    }
}

/// The demo and benchmark table: a key of `key` type and the column types of a typical model.
pub fn orders_ddl(key: KeyType) -> String {
    let key = match key {
        KeyType::Bigint => "id bigint PRIMARY KEY,",
        KeyType::Uuid => "id uuid PRIMARY KEY,\n    n bigint NOT NULL,",
    };
    format!(
        "CREATE TABLE orders (
    {key}
    customer_id integer NOT NULL,
    status text NOT NULL,
    amount numeric(12,2),
    paid boolean NOT NULL,
    tags text[],
    attrs jsonb,
    note text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz
)"
    )
}

/// Seeds `rows` deterministic rows (numbered 1..=rows).
pub fn seed_sql(rows: u64, key: KeyType) -> String {
    format!(
        "INSERT INTO orders
         SELECT {},
                ((i * 7919) % 100000)::int,
                (ARRAY['new','paid','shipped','delivered','returned'])[1 + i % 5],
                ((i * 31) % 100000) / 100.0,
                i % 3 = 0,
                ARRAY['tag' || (i % 10), 'tag' || (i % 7)],
                jsonb_build_object('source', 'web', 'score', i % 100, 'flags', jsonb_build_array(i % 2 = 0, i % 3 = 0)),
                CASE WHEN i % 4 = 0 THEN NULL ELSE repeat(md5(i::text), 2) END,
                timestamptz '2024-01-01' + (i % 100000) * interval '1 minute',
                CASE WHEN i % 2 = 0 THEN timestamptz '2024-06-01' + (i % 5000) * interval '1 second' END
         FROM generate_series(1::bigint, {rows}) AS i",
        key.key_of("i")
    )
}

/// Updates about `share` of the rows, and deletes and inserts a tenth of that each. Rows are
/// picked by a hash of (row number, round), so they are scattered over the table and every
/// round picks afresh (no round undoes another's changes).
pub fn churn_sql(rows: u64, share: f64, round: u32, key: KeyType) -> String {
    let buckets = 1u64 << 16;
    let upd = ((buckets as f64 * share).round() as u64).max(1);
    let del = (upd / 10).max(1);
    let new_rows = (rows as f64 * share / 10.0).ceil() as u64;
    let pick = |salt: u64| {
        format!(
            "(hashint8({} * 7919 + {}) & {})",
            key.number(),
            round as u64 * 1000 + salt,
            buckets - 1
        )
    };
    format!(
        "UPDATE orders SET status = 'changed{round}', updated_at = now() WHERE {} < {upd};
         DELETE FROM orders WHERE {} < {del};
         INSERT INTO orders SELECT {}, 1, 'new', 1.00, false, NULL, '{{}}', 'inserted', now(), NULL
           FROM generate_series({start}::bigint, {end}) AS i;",
        pick(1),
        pick(2),
        key.key_of("i"),
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
