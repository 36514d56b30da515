//! Change-aware reads of table models: read only the rows written since the last run, and
//! prove that nothing else changed.
//!
//! Every run of a table model reads the source in one `REPEATABLE READ READ ONLY` transaction
//! and records, with the snapshot, a [`Basis`]: the transaction's snapshot
//! (`pg_current_snapshot()`), the server's identity (system identifier, timeline) and the
//! table's storage (oid and relfilenode of the table and of each partition). The next run reads
//! only the row versions whose `xmin` is at or after the recorded snapshot's `xmin`:
//!
//! - A row version visible now was written by a transaction that committed. If that
//!   transaction's id is below the recorded `xmin`, it had committed (or aborted) before the
//!   recorded snapshot was taken, so the last run saw this very row version. Every other
//!   visible row version (written by a transaction in progress then, a subtransaction of one,
//!   or a later one) has an `xmin` at or above the recorded `xmin` and is read again. This is
//!   conservative: a few versions the last run already saw are read again, and the diff finds
//!   them unchanged.
//! - Removed rows leave no version behind. One count in the same transaction settles them: with
//!   a unique, non-null key in the source, the model holds exactly the snapshot's entries plus
//!   the new keys unless a row left it. When the count says one did, a key-only read finds which.
//! - Whatever could break the argument falls back to the full read, with the reason: another
//!   server or timeline, a table rewritten (VACUUM FULL, CLUSTER, TRUNCATE, ALTER TABLE), dropped
//!   and recreated, partitions attached or detached, transaction ids that went backwards or a
//!   recorded snapshot too old to compare (more than [`MAX_AGE`] transactions), a standby, a
//!   server older than 13, and a periodic full read that verifies the deltas.
//!
//! `VACUUM FREEZE` keeps a tuple's raw `xmin` (PostgreSQL 9.4 and later set hint bits instead),
//! so freezing changes nothing here; `xmin` is compared modulo 2^32 against a window shorter
//! than 2^31, which is how the server itself compares transaction ids.

use serde::{Deserialize, Serialize};
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use tokio_postgres::Client;

use crate::copy::{self, Block};
use crate::error::Error;
use crate::plan::{hex, Plan, SourceTable};
use crate::spec::FullReadEvery;

/// A recorded snapshot older than this many transactions is not compared against: a full read.
pub(crate) const MAX_AGE: u64 = 1_000_000_000;

/// More rejected rows than this to re-read by key: read in full instead.
const MAX_RETRY_KEYS: usize = 10_000;

/// What a completed read of a table model leaves for the next run to start from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Basis {
    /// `pg_current_snapshot()` of the read, as text (`xmin:xmax:xip,...`), for reports.
    pub(crate) snapshot: String,
    /// Every row version the read did not see has an `xmin` at or above this (64-bit): the
    /// read's [`SourceState::since`]. And the snapshot's xmax.
    pub(crate) xmin: u64,
    pub(crate) xmax: u64,
    /// System identifier and timeline of the server read.
    pub(crate) server: String,
    /// (oid, relfilenode) of the table and each of its partitions, by oid.
    pub(crate) relations: Vec<(u32, u32)>,
    /// The model fingerprint the read was made under.
    pub(crate) row_fp: String,
    /// Unix seconds of the last full read, and delta runs since.
    pub(crate) full_read_at: u64,
    pub(crate) delta_runs: u32,
    /// Raw keys (hex) of rows the destination rejected: re-read by key on every run.
    pub(crate) retry: Vec<String>,
    /// Rows inserted, updated or deleted in the table per the statistics when read, if known.
    pub(crate) writes: Option<i64>,
    /// Rows deleted from the table per the statistics when read, if known.
    #[serde(default)]
    pub(crate) deletes: Option<i64>,
}

impl Basis {
    /// The raw keys of the rejected rows to re-read, or `None` when one is not a whole key of
    /// `nkey` fields (a damaged state file).
    pub(crate) fn retry_keys(&self, nkey: usize) -> Option<Vec<Vec<u8>>> {
        self.retry
            .iter()
            .map(|k| unhex(k).filter(|k| key_fields(k, nkey).is_some()))
            .collect()
    }
}

/// The source as the read's transaction sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SourceState {
    pub(crate) snapshot: String,
    /// No transaction of this database in progress when the snapshot was taken has an id
    /// below this: the ids of this database's writing transactions just before it, and the
    /// next id. Tighter than the snapshot's xmin, which a writer in another database of the
    /// same server holds back.
    pub(crate) since: u64,
    pub(crate) xmin: u64,
    pub(crate) xmax: u64,
    /// The server hashes `= ANY(constant array)` (PostgreSQL 14 and later): a short window
    /// of ids is matched as a list (see [`xmin_condition`]).
    pub(crate) hashes_lists: bool,
    pub(crate) in_recovery: bool,
    pub(crate) server: String,
    pub(crate) relations: Vec<(u32, u32)>,
    pub(crate) writes: Option<i64>,
    pub(crate) deletes: Option<i64>,
}

impl SourceState {
    /// Whether rows may have been deleted from the table since `basis` was read, by the
    /// table's statistics: a hint, not a proof (they lag up to a second, and a reset changes
    /// them too, which counts as "may"). With a where condition an update can take a row out
    /// of the model without a delete, so it is always "may".
    pub(crate) fn may_have_deleted(&self, basis: &Basis, table: &SourceTable) -> bool {
        match (basis.deletes, self.deletes) {
            (Some(then), Some(now)) if table.filter.is_none() => now != then,
            _ => true,
        }
    }

    /// Rows inserted, updated or deleted in the table since `basis` was read, by the table's
    /// statistics (a hint, as above: updates of one row count each time, and they lag).
    /// `None` when unknown or when the statistics went backwards (a reset).
    pub(crate) fn written_since(&self, basis: &Basis) -> Option<u64> {
        let (then, now) = (basis.writes?, self.writes?);
        u64::try_from(now - then).ok()
    }
}

/// How this run reads the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadStrategy {
    Full,
    /// Rows with `xmin` at or after `since` (64-bit), plus a count.
    Delta {
        since: u64,
    },
}

impl ReadStrategy {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            ReadStrategy::Full => "full",
            ReadStrategy::Delta { .. } => "delta",
        }
    }
}

/// The strategy and, in words, why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    pub(crate) strategy: ReadStrategy,
    pub(crate) reason: String,
    /// A full read chosen by policy (`--full-read`, `full_read_every`, a large delta) where a
    /// delta from this `since` was provable: the full read checks that every row it finds
    /// changed was written since, which is what the delta would have relied on.
    pub(crate) check_since: Option<u64>,
}

impl Decision {
    pub(crate) fn full(reason: impl Into<String>) -> Decision {
        Decision {
            strategy: ReadStrategy::Full,
            reason: reason.into(),
            check_since: None,
        }
    }
}

/// What [`decide`] looks at.
pub(crate) struct Inputs<'a> {
    pub(crate) table: Option<&'a SourceTable>,
    /// `None`: the server is older than PostgreSQL 13.
    pub(crate) state: Option<&'a SourceState>,
    pub(crate) basis: Option<&'a Basis>,
    pub(crate) row_fp: &'a str,
    /// Key columns of the model (the recorded keys of rejected rows must have as many).
    pub(crate) nkey: usize,
    /// Entries in the snapshot.
    pub(crate) entries: u64,
    /// Why every row is read and rewritten anyway (`--full-resync`, a new model, a rebuild).
    pub(crate) must_read_all: Option<&'a str>,
    pub(crate) forced: bool,
    pub(crate) every: FullReadEvery,
    pub(crate) max_share: f64,
    pub(crate) now: u64,
}

/// Decides how to read, before reading: a pure function of what the last run recorded and
/// what the source looks like now. First whether a delta could be proven complete, then
/// whether policy wants a full read anyway.
pub(crate) fn decide(i: &Inputs<'_>) -> Decision {
    let b = match provable(i) {
        Ok(b) => b,
        Err(reason) => return Decision::full(reason),
    };
    match policy(i, b) {
        Some((reason, check)) => Decision {
            check_since: check.then_some(b.xmin),
            ..Decision::full(reason)
        },
        None => Decision {
            strategy: ReadStrategy::Delta { since: b.xmin },
            reason: format!(
                "only rows written since the recorded read (transaction {} on), a count, and the keys when rows left",
                b.xmin
            ),
            check_since: None,
        },
    }
}

/// The recorded read a delta would start from, or why a delta cannot be proven complete.
fn provable<'a>(i: &Inputs<'a>) -> Result<&'a Basis, String> {
    let Some(table) = i.table else {
        return Err("a query model is read in full (delta reads need a table model)".into());
    };
    if !table.has_row_versions() {
        return Err(format!(
            "{} is a view: it has no row versions to read the changes of",
            table.quoted
        ));
    }
    let Some(state) = i.state else {
        return Err("the source server is older than PostgreSQL 13".into());
    };
    if state.in_recovery {
        return Err(
            "the source is a hot standby: a failover could reuse transaction ids, so it is read in full".into(),
        );
    }
    if let Some(why) = i.must_read_all {
        return Err(why.into());
    }
    let Some(b) = i.basis else {
        return Err(
            "no completed read of this table is recorded (first run, or the last full read failed)"
                .into(),
        );
    };
    if b.row_fp != i.row_fp {
        return Err("the model changed since the recorded read".into());
    }
    if b.server != state.server {
        return Err(
            "the source server changed since the recorded read (another system identifier or timeline: a restore, a failover, another server)".into(),
        );
    }
    if b.relations != state.relations {
        return Err(format!(
            "{}'s storage changed since the recorded read (rewritten by VACUUM FULL, CLUSTER, TRUNCATE or ALTER TABLE, recreated, or partitions attached or detached)",
            table.quoted
        ));
    }
    if state.xmax < b.xmax {
        return Err(
            "the source's transaction ids went backwards since the recorded read (a restored server?)".into(),
        );
    }
    let age = state.xmax - b.xmin;
    if age > MAX_AGE {
        return Err(format!(
            "the recorded read is {age} transactions old, more than {MAX_AGE}"
        ));
    }
    if b.retry.len() > MAX_RETRY_KEYS {
        return Err(format!(
            "{} rejected rows are waiting to be retried, more than {MAX_RETRY_KEYS} to re-read by key",
            b.retry.len()
        ));
    }
    if b.retry_keys(i.nkey).is_none() {
        return Err(
            "the recorded keys of rejected rows are unreadable (a damaged state file?)".into(),
        );
    }
    if i.entries == 0 {
        return Err("the snapshot has no entries".into());
    }
    Ok(b)
}

/// Why the user's settings or the table's statistics want a full read of a provable delta, and
/// whether it checks the delta's premise: the periodic full read does (one more counting scan,
/// only when it found changes); a read asked for by flag or chosen for speed does not.
fn policy(i: &Inputs<'_>, b: &Basis) -> Option<(String, bool)> {
    if i.forced {
        return Some(("--full-read".into(), false));
    }
    match i.every {
        FullReadEvery::Always => return Some(("full_read_every = \"always\"".into(), false)),
        FullReadEvery::Elapsed(d) if i.now.saturating_sub(b.full_read_at) >= d.as_secs() => {
            return Some((format!(
                "periodic full read (full_read_every = {}): checks what delta reads rely on, and catches rows that entered or left the where filter unwritten",
                humantime::format_duration(d)
            ), true));
        }
        FullReadEvery::Runs(n) if b.delta_runs >= n => {
            return Some((
                format!("periodic full read after {n} delta runs (full_read_every = \"{n} runs\")"),
                true,
            ));
        }
        _ => {}
    }
    let written = i.state?.written_since(b)?;
    (written as f64 > i.max_share * i.entries as f64).then(|| (format!(
        "the table's statistics count about {written} rows written since the last run, more than delta_max_share ({}) of {} rows: a full read is as fast",
        i.max_share, i.entries
    ), false))
}

/// Windows of at most this many ids are matched as a list of ids (about 11 bytes each in the
/// statement's text).
const XID_LIST_MAX: u64 = 16_384;

/// The shortest constant list the server matches by hashing (`MIN_ARRAY_SIZE_FOR_HASHED_SAOP`).
const HASHED_LIST_MIN: usize = 9;

/// The condition "this row version's `xmin` is at or after `since`", for a transaction whose
/// snapshot's xmax is `xmax` (every visible row version has an `xmin` below it). `xmin` is
/// 32 bits; `xmax - since` is below 2^31 (checked by [`decide`]), so the values in the window
/// `[since, xmax)` are distinct modulo 2^32. Special ids (0-2, frozen by servers before 9.4)
/// are old.
///
/// A short window, on a server that hashes constant arrays (`hashes_lists`), is the list of
/// its ids: `xmin = ANY('{...}'::xid[])` is one hash probe per row, where the comparison
/// below formats every row's `xmin` as text and parses it back (0.7-1.1 s per 10M rows,
/// measured). Otherwise both ends are bounded: after a wraparound, rows written before it
/// (frozen or not, they keep their raw `xmin`) have numerically larger ids than the window
/// and must not match.
pub(crate) fn xmin_condition(since: u64, xmax: u64, hashes_lists: bool) -> String {
    let window = xmax.saturating_sub(since);
    if hashes_lists && window <= XID_LIST_MAX {
        let mut ids: Vec<String> = (since..xmax)
            .map(|x| x % (1 << 32))
            .filter(|&x| x > 2)
            .map(|x| x.to_string())
            .collect();
        // The server hashes a list of at least 9 elements, duplicates counted; a shorter one
        // is compared an element at a time, row by row. Repeating the last id changes no
        // match: at 10M rows, 3 ids took 1.10 s and the same 3 padded to 9 took 0.99-1.00 s; 8
        // ids 1.23-1.25 s, padded 1.03-1.04 s.
        if let Some(last) = ids.last().cloned() {
            ids.resize(ids.len().max(HASHED_LIST_MIN), last);
        }
        return format!("src.xmin = ANY('{{{}}}'::xid[])", ids.join(","));
    }
    let lo = since % (1 << 32);
    let hi = lo + window;
    let x = "src.xmin::text::int8";
    if hi <= 1 << 32 {
        format!("({x} >= {lo} AND {x} < {hi})")
    } else {
        format!("({x} >= {lo} OR {x} BETWEEN 3 AND {})", hi - (1 << 32) - 1)
    }
}

/// Starts the read's transaction on the source: `REPEATABLE READ READ ONLY`, the table locked
/// (`ACCESS SHARE`, as the read itself would) before the snapshot is taken, so a TRUNCATE
/// cannot empty the table under it. Returns what the snapshot shows, or `None` on a server
/// older than 13 (or a query model, which records nothing).
pub(crate) async fn begin(
    client: &Client,
    table: Option<&SourceTable>,
    sync: &str,
) -> Result<Option<SourceState>, Error> {
    let fail = |what: &str, e| source_err(sync, what, e);
    // Only tables have row versions to read the changes of; a query model just begins.
    let table = table.filter(|t| t.has_row_versions());
    let version: i32 = match table {
        None => 0,
        Some(_) => client
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await
            .map_err(|e| fail("cannot read the server version", e))?
            .get(0),
    };
    // Before the snapshot: the next transaction id, and the ids of this database's writing
    // transactions (prepared ones too). See `SourceState::since`.
    let writers = match version >= 130000 {
        false => None,
        true => Some(
            client
                .query_one(
                    "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8, \
                            ARRAY(SELECT backend_xid::text::int8 FROM pg_stat_activity \
                                   WHERE datname = current_database() AND backend_xid IS NOT NULL \
                                  UNION ALL \
                                  SELECT transaction::text::int8 FROM pg_prepared_xacts \
                                   WHERE database = current_database())",
                    &[],
                )
                .await
                .map_err(|e| fail("cannot read the source's running transactions", e))?,
        ),
    };
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| fail("cannot begin the read's transaction", e))?;
    let (Some(table), Some(writers)) = (table, writers) else {
        return Ok(None);
    };
    client
        .batch_execute(&format!("LOCK TABLE {} IN ACCESS SHARE MODE", table.quoted))
        .await
        .map_err(|e| fail(&format!("cannot lock {}", table.quoted), e))?;
    // The first query of the transaction: it takes the snapshot every later statement uses.
    let row = client
        .query_one(
            "SELECT pg_current_snapshot()::text, \
                    pg_snapshot_xmin(pg_current_snapshot())::text::int8, \
                    pg_snapshot_xmax(pg_current_snapshot())::text::int8, \
                    pg_is_in_recovery(), \
                    (SELECT system_identifier::text FROM pg_control_system()) || ':' || \
                      CASE WHEN pg_is_in_recovery() THEN 'standby' \
                           ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END",
            &[],
        )
        .await
        .map_err(|e| fail("cannot read the source's snapshot", e))?;
    let rels = client
        .query(
            "SELECT c.oid::int8, c.relfilenode::int8, \
                    (s.n_tup_ins + s.n_tup_upd + s.n_tup_del)::int8, s.n_tup_del::int8 \
             FROM pg_class c LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid \
             WHERE c.oid = $1::int8::oid \
                OR c.oid IN (SELECT relid FROM pg_partition_tree($1::int8::oid::regclass)) \
             ORDER BY c.oid",
            &[&(table.oid as i64)],
        )
        .await
        .map_err(|e| fail("cannot read the table's partitions", e))?;
    let stat = |i: usize| -> Option<i64> {
        rels.iter()
            .map(|r| r.get::<_, Option<i64>>(i))
            .try_fold(0i64, |acc, w| w.map(|w| acc + w))
    };
    let (writes, deletes) = (stat(2), stat(3));
    let next = writers.get::<_, i64>(0) as u64;
    let since = writers
        .get::<_, Vec<i64>>(1)
        .into_iter()
        .map(|x| widen(x as u32, next))
        .fold(next, u64::min);
    Ok(Some(SourceState {
        snapshot: row.get(0),
        since,
        xmin: row.get::<_, i64>(1) as u64,
        xmax: row.get::<_, i64>(2) as u64,
        hashes_lists: version >= 140000,
        in_recovery: row.get(3),
        server: row.get(4),
        relations: rels
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u32, r.get::<_, i64>(1) as u32))
            .collect(),
        writes,
        deletes,
    }))
}

/// An error of the source's read transaction, naming the sync and what was being done.
fn source_err(sync: &str, what: &str, e: tokio_postgres::Error) -> Error {
    Error::source_read(sync, what, &e)
}

/// The 64-bit id of the 32-bit `xid`, given the next 64-bit id (`xid` is at most 2^31 older).
/// An id assigned after `next` was read counts as `next`.
fn widen(xid: u32, next: u64) -> u64 {
    match (next as u32).wrapping_sub(xid) {
        d if d > 1 << 31 => next,
        d => next.saturating_sub(u64::from(d)),
    }
}

/// Rows the delta would read, and rows in the model, counted in one scan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counts {
    pub(crate) changed: u64,
    pub(crate) total: u64,
}

pub(crate) async fn count(
    client: &Client,
    table: &SourceTable,
    condition: &str,
    sync: &str,
) -> Result<Counts, Error> {
    let sql = table.select(
        &format!("count(*) FILTER (WHERE {condition})::int8, count(*)::int8"),
        None,
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .map_err(|e| source_err(sync, "counting the model's rows", e))?;
    Ok(Counts {
        changed: row.get::<_, i64>(0) as u64,
        total: row.get::<_, i64>(1) as u64,
    })
}

/// The fields of a raw key, when it is exactly `nkey` length-prefixed fields.
fn key_fields(key: &[u8], nkey: usize) -> Option<Vec<Option<&[u8]>>> {
    let fields: Vec<Option<&[u8]>> = copy::fields(key).collect();
    let size: usize = fields.iter().map(|f| 4 + f.map_or(0, <[u8]>::len)).sum();
    (fields.len() == nkey && size == key.len()).then_some(fields)
}

/// A parameter sent as the raw bytes of its binary form (a key field as COPY gave it).
#[derive(Debug)]
struct RawParam<'a>(&'a [u8]);

impl ToSql for RawParam<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    tokio_postgres::types::to_sql_checked!();
}

/// A result field as the raw bytes of its binary form.
struct RawField<'a>(Option<&'a [u8]>);

impl<'a> FromSql<'a> for RawField<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawField(Some(raw)))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawField(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Reads the model's rows with the given raw keys (and, with `condition`, only those it does
/// not match), as one framed block of tuples in the plan's column order, exactly as the COPY
/// read frames them. Used to retry rows the destination rejected (which may not have changed),
/// and to name the rows a periodic full read found changed but not written since.
pub(crate) async fn read_by_key(
    client: &Client,
    plan: &Plan,
    table: &SourceTable,
    keys: &[Vec<u8>],
    not_condition: Option<&str>,
    sync: &str,
) -> Result<Block, Error> {
    let fail = |e| source_err(sync, "reading rows by key", e);
    let mut conds: Vec<String> = table.exprs[..plan.nkey]
        .iter()
        .enumerate()
        .map(|(i, e)| format!("{e} = ${}", i + 1))
        .collect();
    if let Some(c) = not_condition {
        conds.push(format!("NOT ({c})"));
    }
    let sql = table.select(&table.list(), Some(&conds.join(" AND ")));
    let stmt = client.prepare(&sql).await.map_err(fail)?;
    let mut tuples: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
    for key in keys {
        let Some(fields) = key_fields(key, plan.nkey) else {
            return Err(Error::Internal(format!(
                "sync '{sync}': a key to read by is not {} key field(s); run once with --full-read",
                plan.nkey
            )));
        };
        let fields: Vec<&[u8]> = fields.into_iter().map(|f| f.unwrap_or_default()).collect();
        let params: Vec<RawParam<'_>> = fields.iter().map(|f| RawParam(f)).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        for row in client.query(&stmt, &refs).await.map_err(fail)? {
            let tuple = (0..row.len())
                .map(|i| {
                    row.try_get::<_, RawField<'_>>(i)
                        .map(|f| f.0.map(<[u8]>::to_vec))
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(fail)?;
            tuples.push(tuple);
        }
    }
    frame_rows(&tuples, plan)
}

fn frame_rows(tuples: &[Vec<Option<Vec<u8>>>], plan: &Plan) -> Result<Block, Error> {
    let stream = copy::encode(
        tuples
            .iter()
            .map(|t| t.iter().map(|f| f.as_deref()).collect::<Vec<_>>()),
    );
    copy::frame_all(&stream, plan.columns.len() as u16, plan.nkey as u16)
        .map_err(|e| Error::Internal(format!("framing rows read by key: {e}")))
}

/// The raw key bytes of [`hex`] (the basis keeps keys as hex strings).
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// The basis a completed read leaves, given the source state it read under.
pub(crate) fn next_basis(
    state: &SourceState,
    row_fp: &str,
    previous: Option<&Basis>,
    strategy: ReadStrategy,
    retry: Vec<Vec<u8>>,
    now: u64,
) -> Basis {
    let (full_read_at, delta_runs) = match (strategy, previous) {
        (ReadStrategy::Delta { .. }, Some(b)) => (b.full_read_at, b.delta_runs + 1),
        _ => (now, 0),
    };
    Basis {
        snapshot: state.snapshot.clone(),
        xmin: state.since,
        xmax: state.xmax,
        server: state.server.clone(),
        relations: state.relations.clone(),
        row_fp: row_fp.into(),
        full_read_at,
        delta_runs,
        retry: retry.iter().map(|k| hex(k)).collect(),
        writes: state.writes,
        deletes: state.deletes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn table() -> SourceTable {
        SourceTable {
            oid: 1,
            quoted: "\"public\".\"t\"".into(),
            kind: "r".into(),
            exprs: vec!["src.\"id\"".into()],
            filter: None,
            unique_key: true,
        }
    }

    fn state() -> SourceState {
        SourceState {
            snapshot: "900:950:".into(),
            since: 900,
            xmin: 900,
            xmax: 950,
            hashes_lists: true,
            in_recovery: false,
            server: "42:00000001".into(),
            relations: vec![(1, 1)],
            writes: Some(1000),
            deletes: Some(10),
        }
    }

    fn basis() -> Basis {
        Basis {
            snapshot: "800:850:".into(),
            xmin: 800,
            xmax: 850,
            server: "42:00000001".into(),
            relations: vec![(1, 1)],
            row_fp: "fp".into(),
            full_read_at: 1000,
            delta_runs: 0,
            retry: Vec::new(),
            writes: Some(990),
            deletes: Some(10),
        }
    }

    fn decide_with<'a>(f: impl FnOnce(&mut Inputs<'a>)) -> Decision {
        // Leaked: a test's overrides borrow for as long as these defaults.
        let t: &'a SourceTable = Box::leak(Box::new(table()));
        let s: &'a SourceState = Box::leak(Box::new(state()));
        let b: &'a Basis = Box::leak(Box::new(basis()));
        let mut i = Inputs {
            table: Some(t),
            state: Some(s),
            basis: Some(b),
            row_fp: "fp",
            nkey: 1,
            entries: 100,
            must_read_all: None,
            forced: false,
            every: FullReadEvery::Elapsed(Duration::from_secs(3600)),
            max_share: 0.5,
            now: 2000,
        };
        f(&mut i);
        decide(&i)
    }

    #[test]
    fn delta_when_everything_matches() {
        let d = decide_with(|_| {});
        assert_eq!(d.strategy, ReadStrategy::Delta { since: 800 });
    }

    #[test]
    fn every_reason_for_a_full_read() {
        let (s_standby, s_server, s_rel, s_back, s_old) = {
            let mut a = state();
            a.in_recovery = true;
            let mut b = state();
            b.server = "42:00000002".into();
            let mut c = state();
            c.relations = vec![(1, 2)];
            let mut d = state();
            d.xmax = 849;
            let mut e = state();
            e.xmax = 800 + MAX_AGE + 1;
            (a, b, c, d, e)
        };
        let many = {
            let mut b = basis();
            b.writes = Some(0);
            b
        };
        let cases: Vec<(Decision, &str)> = vec![
            (decide_with(|i| i.table = None), "query model"),
            (decide_with(|i| i.state = None), "older than PostgreSQL 13"),
            (decide_with(|i| i.state = Some(&s_standby)), "hot standby"),
            (decide_with(|i| i.forced = true), "--full-read"),
            (decide_with(|i| i.every = FullReadEvery::Always), "always"),
            (
                decide_with(|i| i.must_read_all = Some("--full-resync")),
                "--full-resync",
            ),
            (decide_with(|i| i.basis = None), "no completed read"),
            (decide_with(|i| i.row_fp = "other"), "model changed"),
            (decide_with(|i| i.state = Some(&s_server)), "server changed"),
            (decide_with(|i| i.state = Some(&s_rel)), "storage changed"),
            (decide_with(|i| i.state = Some(&s_back)), "went backwards"),
            (decide_with(|i| i.state = Some(&s_old)), "transactions old"),
            (decide_with(|i| i.now = 1000 + 3600), "periodic"),
            (
                decide_with(|i| i.every = FullReadEvery::Runs(0)),
                "delta runs",
            ),
            (decide_with(|i| i.entries = 0), "no entries"),
            (decide_with(|i| i.basis = Some(&many)), "statistics"),
        ];
        for (d, want) in cases {
            assert_eq!(d.strategy, ReadStrategy::Full, "{want}: {d:?}");
            assert!(d.reason.contains(want), "{want}: {}", d.reason);
            // Only the periodic full read checks what a delta would have relied on.
            let periodic = want == "periodic" || want == "delta runs";
            assert_eq!(d.check_since, periodic.then_some(800), "{want}");
        }
        let mut bad = basis();
        bad.retry = vec!["zz".into()];
        let d = decide_with(|i| i.basis = Some(&bad));
        assert!(d.reason.contains("unreadable"), "{}", d.reason);
        let mut short = basis();
        short.retry = vec![hex(&[0, 0, 0, 1, 7])];
        assert_eq!(short.retry_keys(1), Some(vec![vec![0, 0, 0, 1, 7]]));
        let d = decide_with(|i| {
            i.basis = Some(&short);
            i.nkey = 2;
        });
        assert!(d.reason.contains("unreadable"), "{}", d.reason);
    }

    #[test]
    fn xmin_window_wraps_modulo_2_32() {
        let xmin_condition = |since, xmax| xmin_condition(since, xmax, false);
        assert_eq!(
            xmin_condition(800, 950),
            "(src.xmin::text::int8 >= 800 AND src.xmin::text::int8 < 950)"
        );
        // After a wraparound: rows written before it have larger raw ids and stay out.
        assert_eq!(
            xmin_condition((1 << 32) + 100, (1 << 32) + 150),
            "(src.xmin::text::int8 >= 100 AND src.xmin::text::int8 < 150)"
        );
        let since = (3u64 << 32) - 10;
        assert_eq!(
            xmin_condition(since, since + 20),
            format!(
                "(src.xmin::text::int8 >= {} OR src.xmin::text::int8 BETWEEN 3 AND 9)",
                (1u64 << 32) - 10
            )
        );
    }

    #[test]
    fn deletes_since_the_basis_come_from_the_statistics_as_a_hint() {
        let (t, b) = (table(), basis());
        assert!(!state().may_have_deleted(&b, &t));
        let with = |deletes| SourceState { deletes, ..state() };
        assert!(with(Some(11)).may_have_deleted(&b, &t));
        // Statistics reset: any difference counts.
        assert!(with(Some(0)).may_have_deleted(&b, &t));
        assert!(with(None).may_have_deleted(&b, &t));
        // A basis from before the field: unknown.
        let old = Basis {
            deletes: None,
            ..basis()
        };
        assert!(state().may_have_deleted(&old, &t));
        // An update can take a row out of a filtered model without a delete.
        let filtered = SourceTable {
            filter: Some("v > 0".into()),
            ..table()
        };
        assert!(!with(Some(10)).may_have_deleted(&b, &t));
        assert!(with(Some(10)).may_have_deleted(&b, &filtered));
    }

    #[test]
    fn a_short_window_is_a_list_of_ids_without_the_special_ones() {
        assert_eq!(
            xmin_condition(800, 803, true),
            "src.xmin = ANY('{800,801,802,802,802,802,802,802,802}'::xid[])"
        );
        // Nine ids or more are not padded.
        assert_eq!(
            xmin_condition(800, 810, true),
            "src.xmin = ANY('{800,801,802,803,804,805,806,807,808,809}'::xid[])"
        );
        // No id written since: nothing matches.
        assert_eq!(
            xmin_condition(900, 900, true),
            "src.xmin = ANY('{}'::xid[])"
        );
        // Across a wraparound: ids modulo 2^32, 0-2 left out (never assigned).
        let since = (3u64 << 32) - 2;
        assert_eq!(
            xmin_condition(since, since + 6, true),
            format!(
                "src.xmin = ANY('{{{},{},3,3,3,3,3,3,3}}'::xid[])",
                (1u64 << 32) - 2,
                (1u64 << 32) - 1
            )
        );
        // A long window, or a server without hashed lists, compares numbers.
        assert!(xmin_condition(800, 800 + XID_LIST_MAX + 1, true).contains(">= 800"));
        assert!(xmin_condition(800, 803, false).contains(">= 800"));
    }

    #[test]
    fn widens_32_bit_ids() {
        assert_eq!(widen(5, (7 << 32) + 10), (7 << 32) + 5);
        assert_eq!(widen(u32::MAX - 1, (7 << 32) + 10), (7 << 32) - 2);
        assert_eq!(widen(10, (7 << 32) + 10), (7 << 32) + 10);
        assert_eq!(widen(12, (7 << 32) + 10), (7 << 32) + 10);
    }

    #[test]
    fn recorded_keys_must_be_whole() {
        let key = [0, 0, 0, 2, 7, 7, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(key_fields(&key, 2), Some(vec![Some(&[7u8, 7][..]), None]));
        assert_eq!(key_fields(&key, 1), None);
        assert_eq!(key_fields(&key[..5], 1), None);
        assert_eq!(key_fields(&[key.as_slice(), &[0]].concat(), 2), None);
    }

    #[test]
    fn hex_roundtrip() {
        let k = vec![0, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&k)), Some(k));
        assert_eq!(unhex("zz"), None);
    }
}
