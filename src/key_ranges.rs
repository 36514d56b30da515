//! Rows that left the model, found from counts per key range instead of a read of every key.
//!
//! A delta read learns from one count that rows left the model, not which. Reading every key
//! answers that, and at 10M rows it is most of a 1% churn run. For a single integer key,
//! pgdelta cuts the key space into ranges of `2^shift` values (about [`PER_RANGE`] entries
//! each) and compares, per range, three [`Tally`]s (how many keys, and the sum of their
//! offsets in the range):
//!
//! - `now`: the model's rows in the range, from one grouped query on the source in the read's
//!   snapshot;
//! - `entries`: the snapshot's entries in the range, kept in the state file as entries are
//!   added and removed;
//! - `added`: the rows this run's delta read found with keys not in the snapshot.
//!
//! With a unique key, and rows that enter the model only by being written (the premise of the
//! delta read), `now = entries - removed + added` in every range, for the counts and for the
//! sums alike. So a range lost rows exactly when `now < entries + added`. A range that lost
//! one row names it: its offset is the difference of the sums. Only the ranges that lost more
//! are read, through the key's index, with the named keys beside them, so every key deleted is
//! one the source was seen not to hold. A range with `now > entries + added` breaks the premise:
//! the run reads every key, as before, which reports it.

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::copy;
use crate::error::Error;
use crate::plan::{Plan, SourceTable};

/// Entries per range aimed at: a range that lost a row costs a read of this many keys.
pub(crate) const PER_RANGE: f64 = 32.0;

/// Whether reading the entries (or the source's keys) of `ranges` key ranges, about
/// [`PER_RANGE`] each, costs less than reading all `entries`: up to a quarter of them.
pub(crate) fn cheaper_than_all(ranges: u64, entries: u64) -> bool {
    ranges as f64 * PER_RANGE <= entries as f64 / 4.0
}

/// Whether `left` rows gone from `entries`, at random, likely leave few enough ranges to read
/// for [`cheaper_than_all`]: a range that lost one row is named by its sums and not read, so
/// what counts is the ranges expected to lose two or more. At 10M entries that is 1% gone
/// (100k rows: about 4% of the ranges to read, as a 10% churn deletes) but not 5%. Rows gone
/// in runs of keys (old rows purged by key) fill fewer ranges than random ones.
pub(crate) fn likely_cheaper(left: u64, entries: u64) -> bool {
    if entries == 0 {
        return false;
    }
    let p = (left as f64 / entries as f64).min(1.0);
    let n = PER_RANGE;
    let two_or_more = 1.0 - (1.0 - p).powf(n) - n * p * (1.0 - p).powf(n - 1.0);
    let ranges = (entries as f64 / n * two_or_more).ceil() as u64;
    cheaper_than_all(ranges, entries)
}

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

    /// The first and last value of range `r`.
    pub(crate) fn bounds(&self, r: i64) -> (i64, i64) {
        let lo = r << self.shift;
        (lo, lo | self.mask())
    }

    /// The offsets within a range: `value & mask`.
    fn mask(&self) -> i64 {
        (1i64 << self.shift) - 1
    }

    /// The range of `v` and its tally as one key there.
    pub(crate) fn tally_of(&self, v: i64) -> (i64, Tally) {
        let sum = (v & self.mask()) as u64;
        (v >> self.shift, Tally { n: 1, sum })
    }

    /// True when `v` is a value of the key's type.
    fn fits(&self, v: i64) -> bool {
        let drop = 64 - 8 * u32::from(self.width);
        (i64::MIN >> drop..=i64::MAX >> drop).contains(&v)
    }

    /// The raw keys bounding range `r` in the snapshot's byte order (clamped to the type).
    pub(crate) fn raw_bounds(&self, r: i64) -> (Vec<u8>, Vec<u8>) {
        let (lo, hi) = self.bounds(r);
        (self.raw(lo), self.raw(hi))
    }

    /// The raw key of value `v` (clamped to the type).
    pub(crate) fn raw(&self, v: i64) -> Vec<u8> {
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

    /// `SELECT range, count(*), sum(offset)` over the model (or one part of a split read),
    /// grouped: its rows per range now. The sum is taken modulo 2^63 (it fits an int8).
    ///
    /// Ranges of up to 2^30 values (every key range of a table with more than about one row
    /// per 2^25 values) sum their offsets as `int4`, whose `sum` is a plain `int8` (exact: at
    /// most 2^30 unique keys below 2^30 add up to less than 2^60); wider ones sum `int8`
    /// offsets, whose `sum` is a `numeric`, taken modulo 2^63 (about 4% slower per part,
    /// server-side, on 10M rows in 12 parts).
    pub(crate) fn count_sql(
        &self,
        table: &SourceTable,
        part: Option<&crate::split::Part>,
    ) -> String {
        let (e, shift, mask) = (&self.expr, self.spec.shift, self.spec.mask());
        let (offset, sum) = match shift <= 30 {
            true => ("::int4", "sum(o)::int8"),
            false => ("", "(sum(o) % 9223372036854775808)::int8"),
        };
        let inner = table.select_part(
            &format!("({e})::int8 >> {shift} AS r, (({e})::int8 & {mask}){offset} AS o"),
            None,
            part,
        );
        format!("SELECT r, count(*)::int8, {sum} FROM ({inner}) AS k GROUP BY r")
    }

    /// The model's keys in the given ranges, each range read through the key's index, and
    /// which of the given `keys` it holds.
    pub(crate) fn keys_sql(&self, table: &SourceTable, ranges: &[i64], keys: &[i64]) -> String {
        let e = &self.expr;
        let list = |v: &mut dyn Iterator<Item = i64>| {
            let v: Vec<String> = v.map(|x| x.to_string()).collect();
            format!("'{{{}}}'::int8[]", v.join(","))
        };
        let mut parts = Vec::new();
        if !ranges.is_empty() {
            let los = list(&mut ranges.iter().map(|&r| self.spec.bounds(r).0));
            let conds: Vec<String> = table.filter.iter().map(|f| format!("({f})")).collect();
            parts.push(format!(
                "SELECT {e} FROM {t} AS src JOIN unnest({los}) AS pgdelta_range(lo) ON {e} BETWEEN pgdelta_range.lo AND pgdelta_range.lo + {mask}{w}",
                t = table.quoted,
                mask = self.spec.mask(),
                w = crate::plan::where_clause(&conds),
            ));
        }
        if !keys.is_empty() {
            let cond = format!("{e} = ANY({})", list(&mut keys.iter().copied()));
            parts.push(table.select_part(e, Some(&cond), None));
        }
        parts.join(" UNION ALL ")
    }
}

/// The keys of one range: how many, and the sum of their offsets in the range (wrapping).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) n: u64,
    pub(crate) sum: u64,
}

impl Tally {
    /// Both fields wrap, so tallies also carry changes: a removed key is a [`Tally::neg`].
    pub(crate) fn add(self, o: Tally) -> Tally {
        Tally {
            n: self.n.wrapping_add(o.n),
            sum: self.sum.wrapping_add(o.sum),
        }
    }

    /// The change that takes `self` away again.
    pub(crate) fn neg(self) -> Tally {
        Tally {
            n: self.n.wrapping_neg(),
            sum: self.sum.wrapping_neg(),
        }
    }

    /// `self` less `o`, the sum wrapping (`n` must be at least `o.n`).
    pub(crate) fn sub(self, o: Tally) -> Tally {
        Tally {
            n: self.n - o.n,
            sum: self.sum.wrapping_sub(o.sum),
        }
    }
}

/// Sums are compared modulo 2^63: the source's come modulo 2^63.
const SUM_BITS: u64 = u64::MAX >> 1;

/// Per-range tallies, sorted by range.
pub(crate) type Counts = Vec<(i64, Tally)>;

/// Runs one grouped count in the client's transaction, with room to hash every range in
/// memory; `None` when a key was NULL.
///
/// A count of the `whole` model is left to the server's JIT settings: its cost is far above
/// the thresholds at any size where it matters, and compiled it ran 2.13-2.21 s against
/// 2.44-2.46 s interpreted at 10M rows, compile time (65 ms) included (docs/performance.md,
/// "The tail of a delta read"). The count of one part of a split read is too short to repay
/// a compile per part: no JIT.
pub(crate) async fn count(
    client: &Client,
    sql: &str,
    whole: bool,
    sync: &str,
) -> Result<Option<Counts>, Error> {
    let fail = |e| Error::source_read(sync, "counting the model's rows per key range", &e);
    let settings = match whole {
        true => "SET LOCAL work_mem = '64MB'",
        false => "SET LOCAL work_mem = '64MB'; SET LOCAL jit = off",
    };
    client.batch_execute(settings).await.map_err(fail)?;
    let stream = client
        .copy_out(&format!("COPY ({sql}) TO STDOUT (FORMAT binary)"))
        .await
        .map_err(fail)?;
    futures_util::pin_mut!(stream);
    // Framed a block at a time: the counts of one part of a split read can be hundreds of
    // thousands of rows, and several parts are counted at once.
    let framing = |e| Error::Internal(format!("framing the counts per key range: {e}"));
    let mut framer = copy::Framer::new(3, 1, 256 << 10);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        framer.push(&chunk.map_err(fail)?).map_err(framing)?;
        while let Some(block) = framer.take_block() {
            if !tallies_of(&block, &mut out)? {
                return Ok(None);
            }
        }
    }
    let last = framer.finish().map_err(framing)?;
    Ok(tallies_of(&last, &mut out)?.then_some(out))
}

/// Appends the tallies of a block of count rows (range, count, offset sum) to `out`; false
/// when one is NULL (a NULL key).
fn tallies_of(block: &copy::Block, out: &mut Counts) -> Result<bool, Error> {
    for row in &block.rows {
        let mut f = copy::fields(&row.tuple(&block.data)[2..]);
        let (Some(Some(r)), Some(Some(n)), Some(Some(sum))) = (f.next(), f.next(), f.next()) else {
            return Ok(false);
        };
        let int8 = |v: &[u8]| <[u8; 8]>::try_from(v).map(i64::from_be_bytes);
        let (Ok(r), Ok(n), Ok(sum)) = (int8(r), int8(n), int8(sum)) else {
            return Err(Error::Internal(
                "a count per key range is not three int8".into(),
            ));
        };
        let (n, sum) = (n as u64, sum as u64);
        out.push((r, Tally { n, sum }));
    }
    Ok(true)
}

/// Sorted tallies of the given key values.
pub(crate) fn tally(spec: &RangeSpec, values: &[i64]) -> Counts {
    merge(values.iter().map(|&v| spec.tally_of(v)).collect())
}

/// Counts in any order, with a range met more than once, as sorted counts with one total per
/// range. In place: no second vector of the counts' size.
pub(crate) fn merge(mut counts: Counts) -> Counts {
    compact(&mut counts);
    counts
}

/// Adds `more` (in any order) to `counts`, which then holds one sorted total per range. The
/// counts of a split read's parts come one part at a time, and a range's rows are in several
/// parts once updates have moved rows to the end of the heap: appending every part before
/// merging held up to one tally per range and part (76 MB at a peak measured after rounds of
/// 10% churn), where merging each part as it comes holds about one per range.
pub(crate) fn absorb(counts: &mut Counts, mut more: Counts) {
    if !counts.is_sorted_by_key(|c| c.0) {
        compact(counts);
    }
    compact(&mut more);
    if counts.is_empty() {
        *counts = more;
        return;
    }
    let mut out: Counts = Vec::with_capacity(counts.len() + more.len());
    {
        let (mut a, mut b) = (counts.drain(..).peekable(), more.into_iter().peekable());
        while let Some((r, t)) = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.0 <= y.0 => a.next(),
            (Some(_), None) => a.next(),
            _ => b.next(),
        } {
            match out.last_mut() {
                Some((last, sum)) if *last == r => *sum = sum.add(t),
                _ => out.push((r, t)),
            }
        }
    }
    *counts = out;
}

/// Sorts `counts` by range and sums each range's tallies into one, in place.
fn compact(counts: &mut Counts) {
    counts.sort_unstable_by_key(|c| c.0);
    // `later` is dropped once added to `kept`, the range's first.
    counts.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 = kept.1.add(later.1);
        }
        same
    });
}

/// Tallies at or below this many are never compacted while gathered ([`bump`]).
const COMPACT_FROM: usize = 1 << 16;

/// Adds `t` to range `r` of tallies that arrive mostly in order (a walk in byte order, a
/// read in heap order), which every reader merges ([`merge`]) before use. When the vector is
/// full, its tallies are first compacted in place ([`compact`]), and it grows only when that
/// freed less than a quarter of it: rows that come out of key order (updated rows at the end of a
/// heap, a few sessions' parts interleaved) each start a tally of their own, and a 10M-row full
/// read after rounds of churn doubled its vector at the end of the read, beside everything
/// else the end of a read holds.
pub(crate) fn bump(counts: &mut Counts, r: i64, t: Tally) {
    match counts.last_mut() {
        Some((last, c)) if *last == r => *c = c.add(t),
        _ => {
            if counts.len() == counts.capacity() && counts.len() >= COMPACT_FROM {
                compact(counts);
                if counts.len() > counts.capacity() / 4 * 3 {
                    counts.reserve(counts.len());
                }
            }
            counts.push((r, t))
        }
    }
}

/// What comparing the counts found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Compared {
    /// How many rows the ranges lost in all: the keys named by the ranges that lost one row,
    /// and the ranges that lost more (their keys are to be read).
    Lost {
        ranges: Vec<i64>,
        keys: Vec<i64>,
        rows: u64,
    },
    /// A range holds more rows than the snapshot's entries plus the added rows: rows entered
    /// the model without being written.
    Excess { range: i64 },
}

/// Compares the model's rows per range `now` with `entries + added` (each sorted or not).
pub(crate) fn compare(
    spec: &RangeSpec,
    now: Counts,
    mut entries: Counts,
    added: Counts,
) -> Compared {
    let now = merge(now);
    // What each range should hold: the snapshot's entries and the added rows.
    entries.extend(added);
    let expected = merge(entries);
    let (mut lost, mut keys, mut rows) = (Vec::new(), Vec::new(), 0u64);
    let none = Tally::default();
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
                ((r, n), none)
            }
            (Some(&(r, n)), None) => {
                i += 1;
                ((r, n), none)
            }
            (_, Some(&(e, m))) => {
                j += 1;
                ((e, none), m)
            }
        };
        let ((r, n), m) = (have, want);
        if n.n > m.n {
            return Compared::Excess { range: r };
        }
        if n.n == m.n {
            continue;
        }
        let gone = m.sub(n);
        rows += gone.n;
        // One row gone: its offset is what the sums lack.
        let named =
            (gone.n == 1).then(|| spec.bounds(r).0.wrapping_add((gone.sum & SUM_BITS) as i64));
        match named {
            Some(v) if gone.sum & SUM_BITS <= spec.mask() as u64 && spec.fits(v) => keys.push(v),
            _ => lost.push(r),
        }
    }
    Compared::Lost {
        ranges: lost,
        keys,
        rows,
    }
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
    fn ranges_are_counted_for_a_tenth_of_a_percent_to_a_percent_gone_not_five() {
        let entries = 10_000_000;
        // A 1% churn deletes 0.1%, a 10% churn 1%: both read a few ranges (the 10% churn's
        // runs measured 12,477 ranges that lost two rows or more, about 4% of 312k).
        assert!(likely_cheaper(10_000, entries));
        assert!(likely_cheaper(100_000, entries));
        assert!(likely_cheaper(200_000, entries));
        // 5% gone at random: about half the ranges lose two or more.
        assert!(!likely_cheaper(500_000, entries));
        assert!(!likely_cheaper(entries, entries));
        assert!(!likely_cheaper(1, 0));
    }

    #[test]
    fn ranges_follow_the_keys_byte_order_within_a_sign() {
        for width in [2, 4, 8] {
            let k = kr(width, 3);
            for v in [-300i64, -9, -8, -1, 0, 7, 8, 300] {
                let key = raw(width, v);
                assert_eq!(k.value(&key), Some(v));
                let r = k.tally_of(k.value(&key).unwrap()).0;
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

    /// Tallies gathered with compaction along the way (past [`COMPACT_FROM`], in key order
    /// with runs of scattered keys, as a churned heap gives) merge to what a plain sum per
    /// range gives, and the vector stays near the number of ranges.
    #[test]
    fn tallies_compacted_while_gathered_merge_to_the_same_totals() {
        let spec = kr(8, 5);
        let mut values: Vec<i64> = (0..3_000_000).collect();
        // Every 50th key again, out of order, at the end and in runs in the middle.
        let scattered: Vec<i64> = (0..3_000_000)
            .step_by(50)
            .map(|v| (v * 7919) % 3_000_000)
            .collect();
        values.splice(1_000_000..1_000_000, scattered[..20_000].iter().copied());
        values.extend(&scattered[20_000..]);
        let mut gathered = Counts::new();
        let mut want = std::collections::BTreeMap::<i64, Tally>::new();
        for &v in &values {
            let (r, t) = spec.tally_of(v);
            bump(&mut gathered, r, t);
            let e = want.entry(r).or_default();
            *e = e.add(t);
        }
        let ranges = want.len();
        assert!(
            gathered.capacity() < 2 * ranges,
            "{} tallies held for {ranges} ranges",
            gathered.capacity()
        );
        assert_eq!(merge(gathered), want.into_iter().collect::<Counts>());
    }

    #[test]
    fn parts_absorbed_one_by_one_hold_one_tally_per_range() {
        // Twelve parts of a heap whose rows of every range are spread over all of them (as
        // updates leave them): each part counts some of every range's rows.
        let spec = kr(8, 5);
        let mut want = std::collections::BTreeMap::<i64, Tally>::new();
        let mut counts = Counts::new();
        for part in 0..12i64 {
            let mut tallies = std::collections::HashMap::<i64, Tally>::new();
            for v in (part..100_000).step_by(12) {
                let (r, t) = spec.tally_of((v * 7919) % 100_000);
                let e = tallies.entry(r).or_default();
                *e = e.add(t);
                let w = want.entry(r).or_default();
                *w = w.add(t);
            }
            // In the server's hash order, not sorted.
            absorb(&mut counts, tallies.into_iter().collect());
            assert!(counts.is_sorted_by_key(|c| c.0));
            assert!(
                counts.windows(2).all(|w| w[0].0 < w[1].0),
                "one tally per range"
            );
        }
        assert_eq!(counts, want.into_iter().collect::<Counts>());
        // An unsorted accumulator with a range twice is merged too.
        let mut unsorted = vec![
            (5, Tally { n: 1, sum: 3 }),
            (1, Tally { n: 2, sum: 1 }),
            (5, Tally { n: 1, sum: 4 }),
        ];
        absorb(
            &mut unsorted,
            vec![(3, Tally { n: 1, sum: 0 }), (5, Tally { n: 1, sum: 1 })],
        );
        assert_eq!(
            unsorted,
            vec![
                (1, Tally { n: 2, sum: 1 }),
                (3, Tally { n: 1, sum: 0 }),
                (5, Tally { n: 3, sum: 8 })
            ]
        );
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
    fn compare_names_lone_losses_and_finds_the_ranges_that_lost_more() {
        let spec = kr(8, 3);
        // Ranges of 8 values. The source lost -6 (range -1) and 3 (range 0), one each; 17 and
        // 18 (both range 2); and 40 (range 5, which gained 41 as a new row). -20 is new, in a
        // range of its own.
        let entries: Vec<i64> = vec![-7, -6, 1, 2, 3, 16, 17, 18, 19, 40];
        let added: Vec<i64> = vec![-20, 41];
        let gone = [-6, 3, 17, 18, 40];
        let now: Vec<i64> = entries
            .iter()
            .chain(&added)
            .copied()
            .filter(|v| !gone.contains(v))
            .collect();
        let (now, entries, added) = (
            tally(&spec, &now),
            tally(&spec, &entries),
            tally(&spec, &added),
        );
        assert_eq!(
            compare(&spec, now.clone(), entries.clone(), added.clone()),
            Compared::Lost {
                ranges: vec![2],
                keys: vec![-6, 3, 40],
                rows: 5
            }
        );
        // The source's sums come modulo 2^63.
        let modded: Counts = now
            .iter()
            .map(|&(r, t)| {
                (
                    r,
                    Tally {
                        sum: t.sum & SUM_BITS,
                        ..t
                    },
                )
            })
            .collect();
        assert_eq!(
            compare(&spec, modded, entries.clone(), added.clone()),
            compare(&spec, now, entries.clone(), added.clone())
        );
        // A range holding more than it should breaks the premise.
        assert_eq!(
            compare(
                &spec,
                tally(&spec, &[1, 2, 4]),
                tally(&spec, &[1, 2]),
                Vec::new()
            ),
            Compared::Excess { range: 0 }
        );
        // Equal tallies, in any order: nothing lost.
        let t = tally(&spec, &[-9, 9]);
        let mut rev = t.clone();
        rev.reverse();
        assert_eq!(
            compare(&spec, t, rev, Vec::new()),
            Compared::Lost {
                ranges: Vec::new(),
                keys: Vec::new(),
                rows: 0
            }
        );
        // A sum that names no value of the range (the premise broke): the range is read.
        let odd = vec![(0, Tally { n: 1, sum: 100 })];
        assert_eq!(
            compare(&spec, Vec::new(), odd, Vec::new()),
            Compared::Lost {
                ranges: vec![0],
                keys: Vec::new(),
                rows: 1
            }
        );
        // A named value outside the key's type is not taken either.
        let wide = kr(2, 20);
        let odd = vec![(0, Tally { n: 1, sum: 40_000 })];
        assert_eq!(
            compare(&wide, Vec::new(), odd, Vec::new()),
            Compared::Lost {
                ranges: vec![0],
                keys: Vec::new(),
                rows: 1
            }
        );
    }
}
