//! The Postgres destination: one session that applies batches of changes.
//!
//! - First load into an empty target (upsert mode, empty snapshot): binary `COPY target FROM STDIN`.
//! - Upsert: binary COPY into a temporary staging table, then
//!   `INSERT INTO target SELECT ... FROM staging ON CONFLICT (key) DO UPDATE`, in one transaction.
//! - Insert: binary COPY into the target; if a key already exists (an earlier run wrote it but
//!   crashed before recording it), the batch is re-applied through staging with
//!   `ON CONFLICT DO NOTHING`, so a re-run converges instead of failing.
//! - Deletes: `DELETE ... WHERE key = ANY($1)` with the keys as one binary array parameter
//!   (composite keys: a join against `unnest` of one array per key column).
//!
//! Tuples go to COPY exactly as the source sent them. Delivery is at-least-once: a batch whose
//! commit was not acknowledged may have landed, and re-applying it is harmless (upserts and
//! deletes are idempotent; inserts fall back to `ON CONFLICT DO NOTHING`).
//! A COPY abandoned half-way (an error, a dropped future) is aborted by tokio-postgres, never
//! half-committed.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::types::{to_sql_checked, IsNull, Kind, ToSql, Type};
use tokio_postgres::{Client, Statement};

use crate::batch::{KeyBatch, WriteBatch};
use crate::conn::ConnInfo;
use crate::copy::{fields, HEADER, TRAILER};
use crate::error::Error;
use crate::plan::{quote_ident, Plan};
use crate::spec::Mode;

use super::destination::{Destination, WriteFailure, Written};

/// How rows reach the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// Plain COPY into the target (first load into an empty table).
    Copy,
    /// COPY into staging, then INSERT ... ON CONFLICT DO UPDATE.
    Upsert,
    /// COPY into the target; ON CONFLICT DO NOTHING through staging when a key already exists.
    Insert,
}

impl Strategy {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Strategy::Copy => "copy",
            Strategy::Upsert => "upsert",
            Strategy::Insert => "insert",
        }
    }

    pub(crate) fn choose(mode: Mode, target_empty: bool, snapshot_empty: bool) -> Strategy {
        match mode {
            Mode::Insert => Strategy::Insert,
            Mode::Upsert if target_empty && snapshot_empty => Strategy::Copy,
            Mode::Upsert => Strategy::Upsert,
        }
    }
}

/// Session settings for writer connections.
pub(crate) fn session_settings() -> Vec<(&'static str, String)> {
    // The planner's JIT costs the staged upsert dearly and never pays off for it.
    vec![("jit", "off".into())]
}

pub(crate) struct PgDestination {
    client: Client,
    dest: ConnInfo,
    statement_timeout: Option<std::time::Duration>,
    strategy: Strategy,
    sql: WriterSql,
    staging_ready: bool,
    delete_stmt: Option<Statement>,
}

struct WriterSql {
    copy_target: String,
    create_staging: String,
    copy_staging: String,
    upsert: String,
    insert_missing: String,
    delete: String,
    /// Counts the rows of given keys, as `delete` finds them, reading each row's heap tuple
    /// (`xmin`: never from an index-only scan): see [`PgDestination::warm`].
    find: String,
}

const STAGING: &str = "pgdelta_staging";

impl WriterSql {
    fn new(plan: &Plan) -> WriterSql {
        let cols = plan.column_list();
        let keys = plan
            .key_columns()
            .iter()
            .map(|c| quote_ident(&c.dest))
            .collect::<Vec<_>>()
            .join(", ");
        let sets: Vec<String> = plan.columns[plan.nkey..]
            .iter()
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.dest)))
            .collect();
        let on_conflict = if sets.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", sets.join(", "))
        };
        let target = &plan.target;
        let (delete, find) = if plan.nkey == 1 {
            let k = &plan.columns[0];
            let cond = format!("{} = ANY($1::{}[])", quote_ident(&k.dest), k.dest_type);
            (
                format!("DELETE FROM {target} WHERE {cond}"),
                format!("SELECT count(xmin) FROM {target} WHERE {cond}"),
            )
        } else {
            let arrays: Vec<String> = plan
                .key_columns()
                .iter()
                .enumerate()
                .map(|(i, c)| format!("${}::{}[]", i + 1, c.dest_type))
                .collect();
            let names: Vec<String> = (0..plan.nkey).map(|i| format!("k{i}")).collect();
            let conds: Vec<String> = plan
                .key_columns()
                .iter()
                .enumerate()
                .map(|(i, c)| format!("t.{} = d.k{i}", quote_ident(&c.dest)))
                .collect();
            let (keys, conds) = (
                format!("unnest({}) AS d({})", arrays.join(", "), names.join(", ")),
                conds.join(" AND "),
            );
            (
                format!("DELETE FROM {target} AS t USING {keys} WHERE {conds}"),
                format!("SELECT count(t.xmin) FROM {target} AS t, {keys} WHERE {conds}"),
            )
        };
        WriterSql {
            copy_target: format!("COPY {target} ({cols}) FROM STDIN (FORMAT binary)"),
            create_staging: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {STAGING} ON COMMIT DELETE ROWS AS SELECT {cols} FROM {target} WITH NO DATA"
            ),
            copy_staging: format!("COPY {STAGING} ({cols}) FROM STDIN (FORMAT binary)"),
            upsert: format!(
                "INSERT INTO {target} ({cols}) SELECT {cols} FROM {STAGING} ON CONFLICT ({keys}) {on_conflict}"
            ),
            insert_missing: format!(
                "INSERT INTO {target} ({cols}) SELECT {cols} FROM {STAGING} ON CONFLICT ({keys}) DO NOTHING"
            ),
            delete,
            find,
        }
    }
}

impl PgDestination {
    pub(crate) async fn connect(
        dest: &ConnInfo,
        plan: &Plan,
        strategy: Strategy,
    ) -> Result<PgDestination, Error> {
        let (client, statement_timeout) = open_session(dest).await?;
        Ok(PgDestination {
            client,
            dest: dest.clone(),
            statement_timeout,
            strategy,
            sql: WriterSql::new(plan),
            staging_ready: false,
            delete_stmt: None,
        })
    }

    /// Replaces a broken session with a new one (staging and prepared statements are redone).
    async fn reconnect_session(&mut self) -> Result<(), Error> {
        let (client, statement_timeout) = open_session(&self.dest).await?;
        self.client = client;
        self.statement_timeout = statement_timeout;
        self.staging_ready = false;
        self.delete_stmt = None;
        Ok(())
    }

    /// Writes rows `rows` of `batch`, committed when this returns Ok.
    async fn write_rows(
        &mut self,
        batch: &WriteBatch,
        rows: Range<usize>,
    ) -> Result<Written, tokio_postgres::Error> {
        let n = rows.len() as u64;
        let tuples = batch.tuples(rows);
        let (copy_first, staged_sql) = match self.strategy {
            Strategy::Copy => (true, self.sql.upsert.clone()),
            Strategy::Upsert => (false, self.sql.upsert.clone()),
            Strategy::Insert => (true, self.sql.insert_missing.clone()),
        };
        if copy_first {
            match copy(&mut self.client, &self.sql.copy_target, tuples.clone()).await {
                Ok(copied) => {
                    return Ok(Written {
                        rows: copied,
                        already_present: 0,
                    })
                }
                // A key that is already there (written by a run that crashed before recording
                // it, or a duplicate key in the model) makes COPY fail: redo the batch through
                // staging.
                Err(e) if e.code().map(|c| c.code()) == Some("23505") => {}
                Err(e) => return Err(e),
            }
        }
        let done = self.staged(&staged_sql, tuples).await?;
        Ok(Written {
            rows: done,
            // Insert mode's ON CONFLICT DO NOTHING skips the rows that exist already.
            already_present: if self.strategy == Strategy::Insert {
                n - done
            } else {
                0
            },
        })
    }

    /// COPY into staging and apply `apply_sql`, in one transaction. Returns rows affected.
    async fn staged(
        &mut self,
        apply_sql: &str,
        tuples: Bytes,
    ) -> Result<u64, tokio_postgres::Error> {
        if !self.staging_ready {
            self.client.batch_execute(&self.sql.create_staging).await?;
            self.staging_ready = true;
        }
        let tx = self.client.transaction().await?;
        copy_in(&tx, &self.sql.copy_staging, tuples).await?;
        let n = tx.execute(apply_sql, &[]).await?;
        crate::conn::commit(tx).await?;
        Ok(n)
    }

    /// Deletes keys `rows` of `keys`; returns how many rows the destination deleted.
    async fn delete_keys(
        &mut self,
        keys: &KeyBatch,
        rows: Range<usize>,
    ) -> Result<u64, tokio_postgres::Error> {
        if self.delete_stmt.is_none() {
            self.delete_stmt = Some(self.client.prepare(&self.sql.delete).await?);
        }
        let stmt = self.delete_stmt.as_ref().expect("prepared above");
        let columns = key_arrays(stmt.params().len(), keys, rows);
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        // In an explicit transaction for the reason given at `copy`.
        let tx = self.client.transaction().await?;
        let n = tx.execute(stmt, &params).await?;
        crate::conn::commit(tx).await?;
        Ok(n)
    }

    /// Finds the rows of `keys` as their delete would (the key's index, then each row's heap
    /// page), changing nothing: the pages their delete reads are then in the server's buffers.
    /// A run about to delete keys known before their last check on the source ends does this
    /// meanwhile, so the delete that follows the check only writes. Returns the rows found.
    pub(crate) async fn warm(&mut self, keys: &KeyBatch) -> Result<u64, tokio_postgres::Error> {
        let stmt = self.client.prepare(&self.sql.find).await?;
        let columns = key_arrays(stmt.params().len(), keys, 0..keys.len());
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let row = self.client.query_one(&stmt, &params).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}

/// The key columns of rows `rows` of `keys`, one array parameter per column.
fn key_arrays(nkey: usize, keys: &KeyBatch, rows: Range<usize>) -> Vec<RawArray<'_>> {
    let mut columns: Vec<RawArray> = (0..nkey)
        .map(|_| RawArray {
            values: Vec::with_capacity(rows.len()),
        })
        .collect();
    for i in rows {
        for (col, f) in columns.iter_mut().zip(fields(keys.key(i))) {
            col.values.push(f.unwrap_or_default());
        }
    }
    columns
}

impl Destination for PgDestination {
    async fn write(
        &mut self,
        batch: &WriteBatch,
        rows: Range<usize>,
    ) -> Result<Written, WriteFailure> {
        self.write_rows(batch, rows)
            .await
            .map_err(|e| WriteFailure::from_pg(&e))
    }

    async fn delete(&mut self, keys: &KeyBatch, rows: Range<usize>) -> Result<u64, WriteFailure> {
        self.delete_keys(keys, rows)
            .await
            .map_err(|e| WriteFailure::from_pg(&e))
    }

    async fn reconnect(&mut self) -> Result<(), Error> {
        self.reconnect_session().await
    }

    /// The session's effective `statement_timeout` (a role or database setting may impose one).
    fn statement_timeout(&self) -> Option<std::time::Duration> {
        self.statement_timeout
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

async fn open_session(dest: &ConnInfo) -> Result<(Client, Option<std::time::Duration>), Error> {
    let client = dest.connect("destination", &session_settings()).await?;
    let timeout = crate::conn::show(&client, "statement_timeout")
        .await
        .ok()
        .and_then(|v| crate::conn::parse_pg_duration(&v));
    Ok((client, timeout))
}

/// COPY `tuples` into `sql`'s table in a transaction of its own.
///
/// Never in autocommit: tokio-postgres runs COPY over the extended protocol and `finish()`
/// returns at CommandComplete, but an implicit transaction only commits when the server then
/// processes Sync. A session killed in between rolls the COPY back after we were told it
/// succeeded (found by the test that kills writer sessions mid-run). The reply to COMMIT, a
/// simple query, comes only after the commit.
async fn copy(client: &mut Client, sql: &str, tuples: Bytes) -> Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let n = copy_in(&tx, sql, tuples).await?;
    crate::conn::commit(tx).await?;
    Ok(n)
}

async fn copy_in(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    tuples: Bytes,
) -> Result<u64, tokio_postgres::Error> {
    let sink = tx.copy_in::<_, Bytes>(sql).await?;
    send_tuples(sink, tuples).await
}

/// COPY data goes to the server in messages of up to this many bytes. tokio-postgres copies
/// each message into its session's write buffer, which keeps the size it grew to for the
/// session's life: a batch sent as one message left every writer holding a second copy of the
/// largest batch it wrote (up to 8 MiB each).
const COPY_PIECE: usize = 256 * 1024;

/// Feeds `data` to a COPY in messages of at most [`COPY_PIECE`] bytes.
pub(crate) async fn feed_in_pieces(
    mut sink: std::pin::Pin<&mut tokio_postgres::CopyInSink<Bytes>>,
    mut data: Bytes,
) -> Result<(), tokio_postgres::Error> {
    while !data.is_empty() {
        let piece = data.split_to(data.len().min(COPY_PIECE));
        sink.feed(piece).await?;
    }
    Ok(())
}

async fn send_tuples(
    sink: tokio_postgres::CopyInSink<Bytes>,
    tuples: Bytes,
) -> Result<u64, tokio_postgres::Error> {
    futures_util::pin_mut!(sink);
    sink.feed(Bytes::from_static(HEADER)).await?;
    feed_in_pieces(sink.as_mut(), tuples).await?;
    sink.feed(Bytes::from_static(TRAILER)).await?;
    sink.as_mut().finish().await
}

/// A one-dimensional array parameter whose elements are raw binary values, sent as they came
/// from the source; the element type comes from the prepared statement.
struct RawArray<'a> {
    values: Vec<&'a [u8]>,
}

impl std::fmt::Debug for RawArray<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawArray({} values)", self.values.len())
    }
}

impl ToSql for RawArray<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let Kind::Array(elem) = ty.kind() else {
            return Err(format!("parameter type {ty} is not an array").into());
        };
        out.put_i32(1); // dimensions
        out.put_i32(0); // no NULLs
        out.put_u32(elem.oid());
        out.put_i32(self.values.len() as i32);
        out.put_i32(1); // lower bound
        for v in &self.values {
            out.put_i32(v.len() as i32);
            out.put_slice(v);
        }
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(ty.kind(), Kind::Array(_))
    }

    to_sql_checked!();
}
