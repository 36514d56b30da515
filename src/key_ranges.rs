//! Rows that left the model, found from counts per key range instead of a read of every key.
//!
//! A delta read learns from one count that rows left the model, not which. Reading every key
//! answers that, and at 10M rows it is most of a 1% churn run. For a single integer key,
//! pgdelta cuts the key space into ranges of `2^shift` values (about [`PER_RANGE`] entries
//! each) and compares, per range, three numbers:
//!
//! - `now`: the model's rows in the range, from one grouped count on the source in the read's
//!   snapshot;
//! - `entries`: the snapshot's entries in the range, counted in the state file as entries are
//!   added and removed;
//! - `added`: the rows this run's delta read found with keys not in the snapshot.
//!
//! With a unique key, and rows that enter the model only by being written (the premise of the
//! delta read), `now = entries - removed + added` in every range. So a range lost rows exactly
//! when `now < entries + added`, and only those ranges' keys are read, through the key's index.
//! A range with `now > entries + added` breaks the premise: the run reads every key, as before,
//! which reports it.

use std::sync::Arc;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::copy;
use crate::error::Error;
use crate::plan::{Plan, SourceTable};

/// Entries per range aimed at: a range that lost a row costs a read of this many keys.
pub(crate) const PER_RANGE: f64 = 32.0;

/// How an integer key is cut into ranges: what the state file records with the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RangeSpec {
    /// Bytes of the integer: 2, 4 or 8.
    pub(crate) width: u8,
    /// A range holds the values with the same `value >> shift`.
    pub(crate) shift: u32,
}

impl RangeSpec {
    /// The spec for keys of `width` bytes spread over `min..=max` with about `rows` of them.
    pub(crate) fn for_spread(width: u8, min: i64, max: i64, rows: u64) -> RangeSpec {
        let spread = (i128::from(max) - i128::from(min)).unsigned_abs() as f64 + 1.0;
        let per_value = (rows.max(1) as f64 / spread).min(1.0);
        RangeSpec {
            width,
            shift: shift_for(PER_RANGE / per_value),
        }
    }

    /// The integer of a raw key (length prefix and big-endian bytes), if it is one.
    pub(crate) fn value(&self, key: &[u8]) -> Option<i64> {
        let mut fields = copy::fields(key);
        let field = fields.next()??;
        if fields.next().is_some() || field.len() != usize::from(self.width) {
            return None;
        }
        Some(match self.width {
            2 => i64::from(i16::from_be_bytes(field.try_into().ok()?)),
            4 => i64::from(i32::from_be_bytes(field.try_into().ok()?)),
            8 => i64::from_be_bytes(field.try_into().ok()?),
            _ => return None,
        })
    }

    /// The range a raw key falls in.
    #[inline]
    pub(crate) fn range_of(&self, key: &[u8]) -> Option<i64> {
        self.value(key).map(|v| v >> self.shift)
    }

    /// The first and last value of range `r`.
    pub(crate) fn bounds(&self, r: i64) -> (i64, i64) {
        let lo = r << self.shift;
        (lo, lo | ((1i64 << self.shift) - 1))
    }

    /// The raw keys bounding range `r` in the snapshot's byte order (clamped to the type).
    pub(crate) fn raw_bounds(&self, r: i64) -> (Vec<u8>, Vec<u8>) {
        let (lo, hi) = self.bounds(r);
        (self.raw(lo), self.raw(hi))
    }

    fn raw(&self, v: i64) -> Vec<u8> {
        let width = usize::from(self.width);
        let drop = 64 - 8 * width as u32;
        let (min, max) = (i64::MIN >> drop, i64::MAX >> drop);
        let v = v.clamp(min, max);
        let mut out = (width as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&v.to_be_bytes()[8 - width..]);
        out
    }
}

/// The shift of ranges about `width` values wide.
fn shift_for(width: f64) -> u32 {
    width.log2().round().clamp(0.0, 62.0) as u32
}

/// The integer width of a model whose key ranges can be counted: one integer key, read from a
/// column with a unique index (so the key reads of a range use it).
pub(crate) fn key_width(plan: &Plan, table: &SourceTable) -> Option<u8> {
    let width = match plan.columns.first().map(|c| c.dest_oid)? {
        21 => 2,
        23 => 4,
        20 => 8,
        _ => return None,
    };
    let expr = table.exprs.first()?;
    // A cast (a mapped key of another type) is not what the source's index orders.
    (table.unique_key && plan.nkey == 1 && !expr.contains("::")).then_some(width)
}

/// The ranges to count a sync's entries by, should the state file need new counts: from the
/// spread of the source's keys (the ends of their index) over the table's estimated `rows`
/// (unknown or 0: as many as the spread). `None` when the model's key is not one integer with a
/// unique index, or the source cannot say (the counts are then not kept).
pub(crate) async fn propose(client: &Client, plan: &Plan, rows: Option<u64>) -> Option<RangeSpec> {
    let table = plan.table.as_ref()?;
    let width = key_width(plan, table)?;
    let e = &table.exprs[0];
    let sql = format!(
        "SELECT min({e})::int8, max({e})::int8 FROM {} AS src",
        table.quoted
    );
    let row = match client.query_one(&sql, &[]).await {
        Ok(row) => row,
        Err(e) => {
            tracing::debug!("no key ranges: {e}");
            return None;
        }
    };
    let (min, max): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
    let (min, max) = (min.unwrap_or(0), max.unwrap_or(0));
    let spread = (i128::from(max) - i128::from(min)).unsigned_abs() + 1;
    // No estimate, or a stale one (0 for a table with rows): as many rows as values.
    let rows = rows
        .filter(|&n| n > 0)
        .unwrap_or(spread.min(u128::from(u64::MAX)) as u64);
    Some(RangeSpec::for_spread(width, min, max, rows))
}

/// A model's key cut into ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyRanges {
    /// The key's expression in the model's select list (a bare column of the source table).
    pub(crate) expr: String,
    pub(crate) spec: RangeSpec,
}

impl KeyRanges {
    /// The ranges the snapshot counts its entries by, when they fit this model's key.
    pub(crate) fn new(plan: &Plan, table: &SourceTable, spec: RangeSpec) -> Option<KeyRanges> {
        (key_width(plan, table)? == spec.width).then(|| KeyRanges {
            expr: table.exprs[0].clone(),
            spec,
        })
    }

    /// `SELECT range, count(*)` over the model (or one part of a split read), grouped: its rows
    /// per range now.
    pub(crate) fn count_sql(
        &self,
        table: &SourceTable,
        part: Option<&crate::split::Part>,
    ) -> String {
        let inner = table.select_part(
            &format!("({})::int8 >> {} AS r", self.expr, self.spec.shift),
            None,
            part,
        );
        format!("SELECT r, count(*)::int8 FROM ({inner}) AS k GROUP BY r")
    }

    /// The model's keys in the given ranges, each range read through the key's index.
    pub(crate) fn keys_sql(&self, table: &SourceTable, ranges: &[i64]) -> String {
        let los: Vec<String> = ranges
            .iter()
            .map(|&r| self.spec.bounds(r).0.to_string())
            .collect();
        let mask = (1i64 << self.spec.shift) - 1;
        let conds: Vec<String> = table.filter.iter().map(|f| format!("({f})")).collect();
        format!(
            "SELECT {e} FROM {t} AS src JOIN unnest('{{{}}}'::int8[]) AS pgdelta_range(lo) ON {e} BETWEEN pgdelta_range.lo AND pgdelta_range.lo + {mask}{w}",
            los.join(","),
            e = self.expr,
            t = table.quoted,
            w = crate::plan::where_clause(&conds),
        )
    }
}

/// Per-range counts, sorted by range.
pub(crate) type Counts = Vec<(i64, u64)>;

/// Runs the grouped counts of [`KeyRanges::count_sql`], one per statement, on the given
/// sessions (all in transactions under the same snapshot), each taking the next statement when
/// it is free: the model's rows per range, summed, or `None` when a key was NULL.
pub(crate) async fn count_all(
    clients: &[Arc<Client>],
    sqls: Vec<String>,
    sync: &str,
) -> Result<Option<Counts>, Error> {
    let queue = std::sync::Mutex::new(sqls);
    let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let work = clients.iter().map(|c| async {
        let mut all: Vec<Counts> = Vec::new();
        while let Some(sql) = next() {
            match count(c, &sql, sync).await? {
                Some(counts) => all.push(counts),
                None => return Ok(None),
            }
        }
        Ok::<_, Error>(Some(all))
    });
    let mut parts: Vec<(i64, u64)> = Vec::new();
    for r in futures_util::future::join_all(work).await {
        match r? {
            Some(all) => parts.extend(all.into_iter().flatten()),
            None => return Ok(None),
        }
    }
    Ok(Some(merge(parts)))
}

/// Runs one grouped count in the client's transaction (with room to hash every range in
/// memory, and no JIT for a query this short); `None` when a key was NULL.
async fn count(client: &Client, sql: &str, sync: &str) -> Result<Option<Counts>, Error> {
    let fail = |e| Error::source_read(sync, "counting the model's rows per key range", &e);
    client
        .batch_execute("SET LOCAL work_mem = '64MB'; SET LOCAL jit = off")
        .await
        .map_err(fail)?;
    let stream = client
        .copy_out(&format!("COPY ({sql}) TO STDOUT (FORMAT binary)"))
        .await
        .map_err(fail)?;
    futures_util::pin_mut!(stream);
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(&chunk.map_err(fail)?);
    }
    let block = copy::frame_all(&data, 2, 1)
        .map_err(|e| Error::Internal(format!("framing the counts per key range: {e}")))?;
    let mut out = Vec::with_capacity(block.rows.len());
    for row in &block.rows {
        let mut f = copy::fields(&row.tuple(&block.data)[2..]);
        let (Some(Some(r)), Some(Some(n))) = (f.next(), f.next()) else {
            return Ok(None);
        };
        let (Ok(r), Ok(n)) = (<[u8; 8]>::try_from(r), <[u8; 8]>::try_from(n)) else {
            return Err(Error::Internal(
                "a count per key range is not two int8".into(),
            ));
        };
        out.push((i64::from_be_bytes(r), i64::from_be_bytes(n) as u64));
    }
    Ok(Some(out))
}

/// Sorted counts of the given ranges (one per row).
pub(crate) fn tally(ranges: Vec<i64>) -> Counts {
    merge(ranges.into_iter().map(|r| (r, 1)).collect())
}

/// Counts in any order, with a range met more than once, as sorted counts with one total per
/// range.
pub(crate) fn merge(mut counts: Counts) -> Counts {
    counts.sort_unstable_by_key(|c| c.0);
    let mut out: Counts = Vec::with_capacity(counts.len());
    for (r, n) in counts {
        bump(&mut out, r, n);
    }
    out
}

/// Adds `n` to range `r` of counts that arrive mostly in order (a walk in byte order).
pub(crate) fn bump(counts: &mut Counts, r: i64, n: u64) {
    match counts.last_mut() {
        Some((last, c)) if *last == r => *c += n,
        _ => counts.push((r, n)),
    }
}

/// What comparing the counts found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Compared {
    /// The ranges that lost rows, and how many rows they lost in all.
    Lost { ranges: Vec<i64>, rows: u64 },
    /// A range holds more rows than the snapshot's entries plus the added rows: rows entered
    /// the model without being written.
    Excess { range: i64 },
}

/// Compares the model's rows per range `now` with `entries + added` (each sorted or not).
pub(crate) fn compare(now: Counts, mut entries: Counts, added: Counts) -> Compared {
    let now = merge(now);
    // What each range should hold: the snapshot's entries and the added rows.
    entries.extend(added);
    let expected = merge(entries);
    let (mut lost, mut rows) = (Vec::new(), 0u64);
    let (mut i, mut j) = (0, 0);
    loop {
        let (have, want) = match (now.get(i), expected.get(j)) {
            (None, None) => break,
            (Some(&(r, n)), Some(&(e, m))) if r == e => {
                i += 1;
                j += 1;
                ((r, n), m)
            }
            (Some(&(r, n)), Some(&(e, _))) if r < e => {
                i += 1;
                ((r, n), 0)
            }
            (Some(&(r, n)), None) => {
                i += 1;
                ((r, n), 0)
            }
            (_, Some(&(e, m))) => {
                j += 1;
                ((e, 0), m)
            }
        };
        let ((r, n), m) = (have, want);
        if n > m {
            return Compared::Excess { range: r };
        }
        if n < m {
            lost.push(r);
            rows += m - n;
        }
    }
    Compared::Lost { ranges: lost, rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kr(width: u8, shift: u32) -> RangeSpec {
        RangeSpec { width, shift }
    }

    fn raw(width: u8, v: i64) -> Vec<u8> {
        kr(width, 0).raw(v)
    }

    #[test]
    fn ranges_follow_the_keys_byte_order_within_a_sign() {
        for width in [2, 4, 8] {
            let k = kr(width, 3);
            for v in [-300i64, -9, -8, -1, 0, 7, 8, 300] {
                let key = raw(width, v);
                assert_eq!(k.value(&key), Some(v));
                let r = k.range_of(&key).unwrap();
                let (lo, hi) = k.raw_bounds(r);
                assert!(lo <= key && key <= hi, "{width} {v}");
                let (a, b) = k.bounds(r);
                assert!(a <= v && v <= b && b - a == 7);
            }
        }
        // A range wider than the type is clamped to it.
        let (lo, hi) = kr(2, 20).raw_bounds(0);
        assert_eq!((lo, hi), (raw(2, 0), raw(2, i64::from(i16::MAX))));
        assert_eq!(kr(4, 0).value(&raw(8, 1)), None);
    }

    #[test]
    fn specs_aim_at_the_entries_per_range() {
        // 10M dense keys: ranges of 32 values.
        assert_eq!(RangeSpec::for_spread(8, 1, 10_000_000, 10_000_000).shift, 5);
        // One key in 1024 values used: ranges of 32k values.
        assert_eq!(RangeSpec::for_spread(8, 0, 1 << 30, 1 << 20).shift, 15);
        // More rows than values (a stale estimate): never below one value per range.
        assert_eq!(RangeSpec::for_spread(4, 0, 9, 1000).shift, 5);
    }

    #[test]
    fn compare_finds_the_ranges_that_lost_rows() {
        let now = vec![(0, 30), (2, 32), (5, 1)];
        let entries = vec![(0, 32), (1, 4), (2, 32)];
        let added = tally(vec![5, 0]);
        assert_eq!(
            compare(now, entries, added),
            Compared::Lost {
                ranges: vec![0, 1],
                rows: 7
            }
        );
        assert_eq!(
            compare(vec![(3, 2)], vec![(3, 1)], Vec::new()),
            Compared::Excess { range: 3 }
        );
        assert_eq!(
            compare(vec![(-1, 2), (1, 1)], vec![(1, 1), (-1, 2)], Vec::new()),
            Compared::Lost {
                ranges: Vec::new(),
                rows: 0
            }
        );
    }
}
