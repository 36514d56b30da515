//! Parallel reads: a table model's scan split into parts (`ctid` ranges of each leaf
//! relation) that several source sessions read at once, all under the read's snapshot.
//!
//! The run's own session exports its `REPEATABLE READ` snapshot (`pg_export_snapshot()`); each
//! helper session begins a `REPEATABLE READ READ ONLY` transaction and imports it with
//! `SET TRANSACTION SNAPSHOT`, so every part sees exactly the rows the run's session sees and the
//! parts form one consistent read. Helpers open on the first read that uses them (a delta run
//! that counted no change opens none), while the run's transaction keeps the snapshot alive.
//!
//! Parts come from the catalog, never from counting rows: each leaf relation (the table, or
//! every leaf partition of a partitioned table) is cut into block ranges of its current size
//! (`ctid >= '(lo,0)' AND ctid < '(hi,0)'`, TID range scans, PostgreSQL 14+). The first range
//! of a relation has no lower bound and the last no upper bound, so rows on pages added after
//! the size was read are still covered (those rows are newer than the snapshot anyway: a
//! row version the snapshot sees stays on its page, and a rewrite of the table waits for the
//! run's lock). Parts go to whichever session is free next, which balances uneven ranges.
//!
//! No split (one session, as before) for views, inheritance parents, servers older than 14,
//! leaves the role cannot read directly, or small tables when the count is automatic. A hot
//! standby splits: it exports the snapshot and its helpers import it, on the standby.

use std::sync::Arc;

use tokio::sync::OnceCell;
use tokio_postgres::Client;

use crate::conn::ConnInfo;
use crate::error::Error;
use crate::plan::{Plan, SourceTable, SplitBy};
use crate::tap::Session;

/// With an automatic count, parts of a relation are at least this many 8 KiB blocks (64 MiB),
/// so each part's COPY costs far more than starting it. A count the user pins splits even a
/// small table, into parts of at least [`MIN_PINNED_PART_BLOCKS`].
const MIN_PART_BLOCKS: i64 = 8192;
const MIN_PINNED_PART_BLOCKS: i64 = 16;
/// With an automatic count: one session per this many blocks (256 MiB) of the table.
const BLOCKS_PER_SESSION: i64 = 32768;
/// Parts per session: a free session takes the next part, so an uneven part delays the end
/// by at most its own length.
const PARTS_PER_SESSION: i64 = 4;
/// The most sessions an automatic count opens.
const MAX_AUTO_SESSIONS: usize = 8;

/// How many source sessions read a table model (`read_sessions`, `--read-sessions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "SessionsValue")]
pub enum ReadSessions {
    /// From the table's size and the source's settings: one session per 256 MiB, at most
    /// `max_parallel_workers_per_gather + 1` (the parallelism the source grants one query), the
    /// source's free connections / 2, and 8.
    #[default]
    Auto,
    /// Exactly this many (fewer when the table has fewer parts, or sessions cannot connect).
    Fixed(usize),
}

impl std::str::FromStr for ReadSessions {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(ReadSessions::Auto),
            n => match n.parse::<usize>() {
                Ok(n @ 1..=64) => Ok(ReadSessions::Fixed(n)),
                _ => Err(format!(
                    "must be \"auto\" or a number from 1 to 64, got '{s}'"
                )),
            },
        }
    }
}

impl std::fmt::Display for ReadSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadSessions::Auto => f.write_str("auto"),
            ReadSessions::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// `read_sessions` as written in the config: `4` or `"auto"`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SessionsValue {
    Number(i64),
    Text(String),
}

impl TryFrom<SessionsValue> for ReadSessions {
    type Error = String;
    fn try_from(v: SessionsValue) -> Result<Self, String> {
        match v {
            SessionsValue::Number(n) => n.to_string().parse(),
            SessionsValue::Text(t) => t.parse(),
        }
    }
}

/// One part of a split read: a leaf relation and, where it is cut, a `ctid` range of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    /// `ONLY <relation>`, quoted (empty for a query model's part).
    pub(crate) from: String,
    /// `src.ctid >= '(lo,0)' AND src.ctid < '(hi,0)'` (a query model's: a value range of its
    /// `split_by` column), or `None` for the whole relation.
    pub(crate) range: Option<String>,
}

/// A read split into parts, and the sessions that read them.
pub(crate) struct Split {
    pub(crate) parts: Vec<Part>,
    /// Sessions to open besides the run's own.
    helpers: usize,
    /// The run's exported snapshot.
    snapshot_id: String,
    conn: ConnInfo,
    settings: Vec<(&'static str, String)>,
    sync: String,
    opened: OnceCell<Vec<Arc<Session>>>,
    /// How the read is split, said once its parts are read ([`Split::reading_parts`]).
    note: String,
    /// The parts were read: a delta read, one statement, leaves them unread.
    parts_read: std::sync::atomic::AtomicBool,
}

impl Split {
    /// Notes that the model's parts are being read (logging how, the first time).
    pub(crate) fn reading_parts(&self) {
        if !self
            .parts_read
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!("sync '{}': {}", self.sync, self.note);
        }
    }

    /// Whether the model's parts were read (see [`Split::reading_parts`]).
    pub(crate) fn parts_read(&self) -> bool {
        self.parts_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many sessions read (the run's own included): 1 until the helpers opened.
    pub(crate) fn used(&self) -> usize {
        1 + self.opened.get().map_or(0, Vec::len)
    }

    /// The helper sessions, opened on first use, each in a transaction on the run's snapshot.
    /// A helper that cannot connect (the source is out of connections) is left out with a
    /// warning: the parts are shared, so fewer sessions read them all the same.
    pub(crate) async fn helpers(&self) -> Result<&[Arc<Session>], Error> {
        let opened = self
            .opened
            .get_or_try_init(|| async {
                let tries = (0..self.helpers).map(|_| self.open_helper());
                let mut out = Vec::new();
                for r in futures_util::future::join_all(tries).await {
                    match r {
                        Ok(c) => out.push(Arc::new(c)),
                        Err(Error::Connect { message, .. }) => tracing::warn!(
                            "sync '{}': a parallel read session could not connect, reading with fewer: {message}",
                            self.sync
                        ),
                        Err(e) => return Err(e),
                    }
                }
                Ok::<_, Error>(out)
            })
            .await?;
        Ok(opened)
    }

    /// A new session in a transaction on the run's snapshot: a helper of the read, or one for
    /// work beside it.
    pub(crate) async fn open_helper(&self) -> Result<Session, Error> {
        let client = self.conn.connect_reader("source", &self.settings).await?;
        let sql = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            self.snapshot_id
        );
        client.batch_execute(&sql).await.map_err(|e| {
            Error::source_read(
                &self.sync,
                "a parallel read session cannot take the read's snapshot",
                &e,
            )
        })?;
        Ok(client)
    }
}

/// A leaf relation of the table, as the catalog describes it.
#[derive(Debug, Clone)]
pub(crate) struct Leaf {
    pub(crate) name: String,
    pub(crate) kind: char,
    pub(crate) blocks: i64,
}

/// Cuts the leaves into parts for `sessions` sessions: each leaf into ranges of about
/// `total / (sessions * PARTS_PER_SESSION)` blocks, at least `min_blocks`, in block order. Only
/// plain tables and materialized views have `ctid` ranges; a foreign leaf is one part.
pub(crate) fn cut(leaves: &[Leaf], sessions: usize, min_blocks: i64) -> Vec<Part> {
    let total: i64 = leaves.iter().map(|l| l.blocks.max(0)).sum();
    let want = (sessions as i64 * PARTS_PER_SESSION).max(1);
    let size = ((total + want - 1) / want).max(min_blocks.max(1));
    leaves.iter().flat_map(|l| cut_leaf(l, size)).collect()
}

/// One leaf's ranges, in block order, for parts of about `size` blocks.
fn cut_leaf(leaf: &Leaf, size: i64) -> Vec<Part> {
    let from = format!("ONLY {}", leaf.name);
    let blocks = leaf.blocks.max(0);
    let k = match leaf.kind {
        'r' | 'm' => ((blocks + size - 1) / size).max(1),
        _ => 1,
    };
    (0..k)
        .map(|j| {
            let (lo, hi) = (j * blocks / k, (j + 1) * blocks / k);
            let range = match (j == 0, j == k - 1) {
                (true, true) => None,
                (true, false) => Some(format!("src.ctid < '({hi},0)'::tid")),
                (false, true) => Some(format!("src.ctid >= '({lo},0)'::tid")),
                (false, false) => Some(format!(
                    "src.ctid >= '({lo},0)'::tid AND src.ctid < '({hi},0)'::tid"
                )),
            };
            Part {
                from: from.clone(),
                range,
            }
        })
        .collect()
}

/// What the catalog says about splitting the table's read.
struct Facts {
    version: i32,
    has_children: bool,
    leaves: Vec<Leaf>,
    /// Leaves the role cannot read directly (only through the parent).
    unreadable: Vec<String>,
    /// `max_parallel_workers_per_gather`, and free connections for this role's kind.
    per_gather: i64,
    free_connections: i64,
}

/// `pg_class c` rows that hold the rows of the relation `$1` (an oid as int8): the relation
/// itself unless it is partitioned, and every leaf partition.
pub(crate) const LEAVES_OF_1: &str = "c.relkind <> 'p' AND (c.oid = $1::int8::oid OR c.oid IN \
     (SELECT relid FROM pg_partition_tree($1::int8::oid::regclass) WHERE isleaf))";

/// `max_parallel_workers_per_gather`, then the connections left for client sessions.
const PARALLEL_AND_FREE: &str = "current_setting('max_parallel_workers_per_gather')::int8, \
     current_setting('max_connections')::int8 \
       - current_setting('superuser_reserved_connections')::int8 \
       - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')";

/// The sessions to read with: the pinned count, or (`auto`) one per [`BLOCKS_PER_SESSION`]
/// of `blocks`, at most `max_parallel_workers_per_gather + 1`, half the free connections and
/// [`MAX_AUTO_SESSIONS`].
fn sessions(want: ReadSessions, blocks: i64, per_gather: i64, free: i64) -> usize {
    match want {
        ReadSessions::Fixed(n) => n,
        ReadSessions::Auto => ((blocks.max(0) + BLOCKS_PER_SESSION - 1) / BLOCKS_PER_SESSION)
            .max(1)
            .min(per_gather.max(0) + 1)
            .min((free / 2).max(0))
            .min(MAX_AUTO_SESSIONS as i64)
            .max(1) as usize,
    }
}

/// Why an automatic count gave one session.
const TOO_SMALL: &str = "is under 256 MiB, or the source grants no parallelism (max_parallel_workers_per_gather, free connections)";

async fn facts(client: &Client, table: &SourceTable) -> Result<Facts, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT current_setting('server_version_num')::int4, \
                        EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                                 WHERE i.inhparent = $1::int8::oid AND p.relkind <> 'p'), \
                        {PARALLEL_AND_FREE}"
            ),
            &[&(table.oid as i64)],
        )
        .await?;
    let rows = client
        .query(
            &format!(
                "SELECT c.oid::regclass::text, c.relkind::text, \
                        (pg_relation_size(c.oid) / current_setting('block_size')::int8)::int8, \
                        has_table_privilege(c.oid, 'SELECT') \
                 FROM pg_class c WHERE {LEAVES_OF_1} ORDER BY c.oid"
            ),
            &[&(table.oid as i64)],
        )
        .await?;
    let mut leaves = Vec::new();
    let mut unreadable = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        if !r.get::<_, bool>(3) {
            unreadable.push(name.clone());
        }
        leaves.push(Leaf {
            name,
            kind: r.get::<_, String>(1).chars().next().unwrap_or('?'),
            blocks: r.get(2),
        });
    }
    Ok(Facts {
        version: row.get(0),
        has_children: row.get(1),
        leaves,
        unreadable,
        per_gather: row.get(2),
        free_connections: row.get(3),
    })
}

/// How a table model's read would be split: the sessions and the parts, or why it is read by
/// one session. Reads the catalog in `client`'s transaction; changes nothing.
pub(crate) async fn layout(
    client: &Client,
    table: &SourceTable,
    want: ReadSessions,
    sync: &str,
) -> Result<Result<(usize, Vec<Part>), String>, Error> {
    let one = |why: &str| Ok(Err(why.to_string()));
    if want == ReadSessions::Fixed(1) {
        return one("read_sessions = 1");
    }
    if !table.has_row_versions() {
        return one("a view has no ctid ranges to split");
    }
    let f = facts(client, table).await.map_err(|e| {
        let what = format!(
            "cannot read the catalog to split the read of {}",
            table.quoted
        );
        Error::source_read(sync, &what, &e)
    })?;
    let total: i64 = f.leaves.iter().map(|l| l.blocks.max(0)).sum();
    let sessions = sessions(want, total, f.per_gather, f.free_connections);
    if sessions < 2 {
        return one(&format!("the table {TOO_SMALL}"));
    }
    if f.version < 140000 {
        return one("splitting a read by ctid ranges needs PostgreSQL 14 or later");
    }
    if f.has_children {
        return one("the table has inheritance children");
    }
    if !f.unreadable.is_empty() {
        return one(&format!(
            "the role cannot read the partitions {} directly (GRANT SELECT on them to split the read)",
            f.unreadable.join(", ")
        ));
    }
    if f.leaves.iter().any(|l| !matches!(l.kind, 'r' | 'm' | 'f')) {
        return one("a partition is neither a table nor a foreign table");
    }
    let min_blocks = match want {
        ReadSessions::Auto => MIN_PART_BLOCKS,
        ReadSessions::Fixed(_) => MIN_PINNED_PART_BLOCKS,
    };
    let parts = cut(&f.leaves, sessions, min_blocks);
    if parts.len() < 2 {
        return one("the table is too small to split");
    }
    Ok(Ok((sessions.min(parts.len()), parts)))
}

/// The note that says how a read is split, or why not.
/// `subject` is the table's name, or the query and its `split_by` column.
pub(crate) fn describe(subject: &str, layout: &Layout) -> String {
    match layout {
        Ok((n, parts)) => format!(
            "{subject} is read by {n} sessions in {} parts under one snapshot",
            parts.len()
        ),
        Err(why) => format!("{subject} is read by one session: {why}"),
    }
}

/// How a read splits: the sessions and the parts, or why it is read by one session.
pub(crate) type Layout = Result<(usize, Vec<Part>), String>;

/// How the model's read would split, and the note that says so: a table's `ctid` ranges, or
/// a query's value ranges of its `split_by` column; `None` for a query without `split_by`.
/// Reads the catalog in `client`'s transaction; changes nothing.
pub(crate) async fn model_layout(
    client: &Client,
    model: &Plan,
    want: ReadSessions,
    sync: &str,
) -> Result<Option<(Layout, String)>, Error> {
    if let Some(table) = &model.table {
        let layout = layout(client, table, want, sync).await?;
        let note = describe(&table.quoted, &layout);
        return Ok(Some((layout, note)));
    }
    let Some(by) = model.query.as_ref().and_then(|q| q.split_by.as_ref()) else {
        return Ok(None);
    };
    let (layout, caveat) = query_layout(client, by, want).await.map_err(|e| {
        Error::source_read(
            sync,
            "cannot read the statistics to split the query's read",
            &e,
        )
    })?;
    let mut note = describe(&format!("the query (split by {})", by.column), &layout);
    if let Some(caveat) = caveat {
        note = format!("{note}, as read_sessions asks, though {caveat}");
    }
    Ok(Some((layout, note)))
}

/// Plans the split read of the model ([`model_layout`]), in the run's read transaction (begun,
/// snapshot taken) on `client`, and exports the snapshot for the helpers. Returns the split
/// and a note saying how the read is split, or `None` and why not (a note only when the user
/// asked for more than one session).
pub(crate) async fn plan(
    client: &Client,
    conn: &ConnInfo,
    settings: Vec<(&'static str, String)>,
    model: &Plan,
    want: ReadSessions,
    sync: &str,
) -> Result<(Option<Split>, Option<String>), Error> {
    match model_layout(client, model, want, sync).await? {
        Some((layout, note)) => start(client, conn, settings, layout, note, want, sync).await,
        None => Ok((None, None)),
    }
}

/// Exports the run's snapshot for the helpers of a split layout.
async fn start(
    client: &Client,
    conn: &ConnInfo,
    settings: Vec<(&'static str, String)>,
    layout: Layout,
    note: String,
    want: ReadSessions,
    sync: &str,
) -> Result<(Option<Split>, Option<String>), Error> {
    let (sessions, parts) = match layout {
        Ok(l) => l,
        Err(_) => {
            let asked = matches!(want, ReadSessions::Fixed(n) if n > 1);
            return Ok((None, asked.then_some(note)));
        }
    };
    let snapshot_id: String = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(|e| Error::source_read(sync, "cannot export the read's snapshot", &e))?
        .get(0);
    let split = Split {
        parts,
        helpers: sessions - 1,
        snapshot_id,
        conn: conn.clone(),
        settings,
        sync: sync.into(),
        opened: OnceCell::new(),
        note: note.clone(),
        parts_read: Default::default(),
    };
    Ok((Some(split), Some(note)))
}

/// The layout of a query model's read split by `by`: the sessions as for a table (from the
/// size of the column's table), parts cut at histogram bounds of the column. The first part
/// also holds the NULLs. With the layout, what the user should know about it (see
/// [`unindexed`]).
async fn query_layout(
    client: &Client,
    by: &SplitBy,
    want: ReadSessions,
) -> Result<(Layout, Option<String>), tokio_postgres::Error> {
    let one = |why: String| Ok((Err(why), None));
    if want == ReadSessions::Fixed(1) {
        return one("read_sessions = 1".into());
    }
    // A part reads only its range when an index leads with the column (a b-tree, or a BRIN
    // for a column in step with the table's order) or the table is partitioned by it. Of a
    // view or a foreign table, the catalog cannot say: taken as indexed.
    let row = client
        .query_one(
            &format!(
                "SELECT c.oid::regclass::text, c.relpages::int8, \
                        (SELECT s.histogram_bounds::text FROM pg_stats s \
                          WHERE s.schemaname = n.nspname AND s.tablename = c.relname \
                            AND s.attname = a.attname ORDER BY s.inherited DESC LIMIT 1), \
                        {PARALLEL_AND_FREE}, a.attname::text, \
                        EXISTS (SELECT 1 FROM pg_index i \
                                  JOIN pg_class ic ON ic.oid = i.indexrelid \
                                  JOIN pg_am am ON am.oid = ic.relam \
                                 WHERE i.indrelid = c.oid AND i.indkey[0] = a.attnum \
                                   AND i.indisvalid AND i.indpred IS NULL \
                                   AND am.amname IN ('btree', 'brin')) \
                        OR EXISTS (SELECT 1 FROM pg_partitioned_table p \
                                    WHERE p.partrelid = c.oid \
                                      AND a.attnum = ANY (p.partattrs::int2[])) \
                        OR c.relkind NOT IN ('r', 'p', 'm') \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = $2 \
                 WHERE c.oid = $1::int8::oid"
            ),
            &[&(by.table_oid as i64), &by.attnum],
        )
        .await?;
    let (table, pages, hist): (String, i64, Option<String>) = (row.get(0), row.get(1), row.get(2));
    let (per_gather, free, attname): (i64, i64, String) = (row.get(3), row.get(4), row.get(5));
    let indexed: bool = row.get(6);
    let Some(hist) = hist else {
        return one(format!(
            "{table}.{attname} has no statistics to cut ranges from (ANALYZE {table})"
        ));
    };
    let sessions = sessions(want, pages, per_gather, free);
    if sessions < 2 {
        return one(format!("{table} {TOO_SMALL}"));
    }
    let caveat = match indexed {
        true => None,
        false => match unindexed(want, &table, &attname) {
            Ok(caveat) => Some(caveat),
            Err(why) => return one(why),
        },
    };
    let bounds: Vec<String> = client
        .query(
            &format!("SELECT b::text FROM unnest($1::text::{}[]) b", by.type_name),
            &[&hist],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let cuts = cut_points(&bounds, sessions * PARTS_PER_SESSION as usize);
    if cuts.is_empty() {
        return one(format!(
            "{table}.{attname} has too few distinct values to split"
        ));
    }
    let lit = |v: &str| format!("'{}'::{}", v.replace('\'', "''"), by.type_name);
    let e = &by.expr;
    let mut parts = Vec::with_capacity(cuts.len() + 1);
    parts.push(format!("({e} < {} OR {e} IS NULL)", lit(&cuts[0])));
    for w in cuts.windows(2) {
        parts.push(format!("{e} >= {} AND {e} < {}", lit(&w[0]), lit(&w[1])));
    }
    parts.push(format!("{e} >= {}", lit(cuts.last().expect("not empty"))));
    let parts: Vec<Part> = parts
        .into_iter()
        .map(|range| Part {
            from: String::new(),
            range: Some(range),
        })
        .collect();
    Ok((Ok((sessions.min(parts.len()), parts)), caveat))
}

/// A `split_by` column that no index leads with (nor the table's partitioning): every part's
/// range condition is a filter over a scan of the whole table, so N parts scan it N times.
/// An automatic split does not do that (`Err`: why the read takes one session); a split the
/// user pinned goes ahead, with the caveat said (`Ok`).
fn unindexed(want: ReadSessions, table: &str, column: &str) -> Result<String, String> {
    match want {
        ReadSessions::Auto => Err(format!(
            "no index leads with {table}.{column}, so each part would scan all of {table} \
             (create an index on {table} ({column}), or set read_sessions to split anyway)"
        )),
        ReadSessions::Fixed(_) => Ok(format!(
            "no index leads with {table}.{column}: each part scans all of {table}"
        )),
    }
}

/// Up to `parts - 1` cut points from histogram bounds (in order), evenly spaced, each
/// different from the one before; none at the ends (the first and last parts are open).
fn cut_points(bounds: &[String], parts: usize) -> Vec<String> {
    let n = bounds.len();
    if n < 3 || parts < 2 {
        return Vec::new();
    }
    let mut cuts: Vec<String> = Vec::new();
    for at in (1..parts).map(|i| i * (n - 1) / parts).filter(|&at| at > 0) {
        if cuts.last() != Some(&bounds[at]) {
            cuts.push(bounds[at].clone());
        }
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(name: &str, kind: char, blocks: i64) -> Leaf {
        Leaf {
            name: name.into(),
            kind,
            blocks,
        }
    }

    #[test]
    fn an_unindexed_split_by_column_splits_only_when_asked_to() {
        let why = unindexed(ReadSessions::Auto, "orders", "placed").unwrap_err();
        assert_eq!(why, "no index leads with orders.placed, so each part would scan all of orders (create an index on orders (placed), or set read_sessions to split anyway)");
        let caveat = unindexed(ReadSessions::Fixed(3), "orders", "placed").unwrap();
        assert_eq!(
            caveat,
            "no index leads with orders.placed: each part scans all of orders"
        );
    }

    #[test]
    fn histogram_cut_points_are_distinct_and_inside() {
        let b: Vec<String> = (0..=100).map(|i| (i * 10).to_string()).collect();
        assert_eq!(cut_points(&b, 4), ["250", "500", "750"]);
        // Repeated bounds (a skewed column) give fewer, distinct cuts.
        let skew: Vec<String> = ["1", "1", "1", "1", "2", "9"].map(String::from).to_vec();
        assert_eq!(cut_points(&skew, 4), ["1"]);
        assert!(cut_points(&b[..2], 4).is_empty());
    }

    #[test]
    fn ranges_cover_every_block_once_and_leave_the_ends_open() {
        let parts = cut(&[leaf("t", 'r', 100_000)], 3, MIN_PART_BLOCKS);
        assert_eq!(parts.len(), 12);
        assert_eq!(
            parts[0].range.as_deref(),
            Some("src.ctid < '(8333,0)'::tid")
        );
        assert_eq!(
            parts[1].range.as_deref(),
            Some("src.ctid >= '(8333,0)'::tid AND src.ctid < '(16666,0)'::tid")
        );
        assert_eq!(
            parts[11].range.as_deref(),
            Some("src.ctid >= '(91666,0)'::tid")
        );
        // Never more parts than asked for, whatever the rounding.
        assert_eq!(cut(&[leaf("t", 'r', 100_001)], 3, 16).len(), 12);
        assert!(parts.iter().all(|p| p.from == "ONLY t"));
    }

    #[test]
    fn small_leaves_and_foreign_leaves_are_whole_parts() {
        let parts = cut(
            &[
                leaf("p1", 'r', 10),
                leaf("p2", 'f', 0),
                leaf("p3", 'r', 3 * MIN_PART_BLOCKS),
            ],
            2,
            MIN_PART_BLOCKS,
        );
        let summary: Vec<(&str, bool)> = parts
            .iter()
            .map(|p| (p.from.as_str(), p.range.is_some()))
            .collect();
        assert_eq!(
            summary,
            [
                ("ONLY p1", false),
                ("ONLY p2", false),
                ("ONLY p3", true),
                ("ONLY p3", true),
                ("ONLY p3", true)
            ]
        );
        assert_eq!(
            parts[4].range.as_deref(),
            Some("src.ctid >= '(16384,0)'::tid")
        );
    }
}
