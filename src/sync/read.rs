//! The read stage of a run: the whole model, or (table models, when it can be proven
//! complete) only the rows written since the last run; then settle and removals.
//!
//! ```text
//! full    COPY (model)                      -> diff -> writers; removed = entries not seen
//! delta   count(changed), count(*)          one scan, in the read's transaction (or, on a
//!                                           table whose reads split and the statistics say
//!                                           was written, count(*) beside the read instead)
//!         rejected rows re-read by key  \
//!         COPY (model WHERE xmin >= since)  -> diff -> writers   (one statement, never split)
//!         count = entries + added?          yes: no row left the model
//!                                           no:  COPY (keys) -> removed = entries not seen
//! ```
//! A delta that turns out unprovable (too many changes, rows that entered the model without
//! being written) becomes a full read in the same transaction, after what it already wrote.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{
    completed, error_free, pipeline, remove, settle, Diffed, Gone, Piped, Removal, RunEnv, RunInfo,
    Seen, StopReason,
};
use crate::batch::KeyBatch;
use crate::copy::{has_null, Block};
use crate::delta::{self, Decision, ReadStrategy};
use crate::diff::{Bitset, DiffConfig};
use crate::error::Error;
use crate::key_ranges::{self, KeyRanges, RangeSpec};
use crate::plan::{Plan, SourceTable};
use crate::sink::{self, AnyDestination, ApplyCtx, Operation};
use crate::snapshot::spill::Spill;
use crate::snapshot::{Committed, Entry, Reader, Recorder, Snapshot, SnapshotError};
use crate::source::{Read, ReadEnd, ReadOf};
use crate::split::Split;

/// What the read stage needs besides the run's plan.
pub(super) struct Inputs<'a> {
    pub(super) env: &'a RunEnv<'a>,
    pub(super) snapshot: &'a Snapshot,
    pub(super) recorder: &'a Recorder,
    pub(super) ctx: &'a Arc<ApplyCtx>,
    /// The source session, in the read's `REPEATABLE READ` transaction.
    pub(super) session: Arc<crate::tap::Session>,
    /// Table models read by several sessions: the parts and the helper sessions.
    pub(super) split: Option<&'a Split>,
}

/// `COPY (<select>) TO STDOUT (FORMAT binary)`.
fn copy(select: &str) -> String {
    format!("COPY ({select}) TO STDOUT (FORMAT binary)")
}

/// What the read stage did.
pub(super) struct ReadOutcome {
    pub(super) piped: Piped,
    pub(super) duplicates: u64,
    pub(super) model_errors: Vec<String>,
    pub(super) removal: Removal,
    /// Delta reads: when the count ended, and the key read (seconds since the run began).
    pub(super) counted_s: Option<f64>,
    pub(super) keys_read_s: Option<f64>,
    /// Delta reads that looked for removed rows: the keys read to find them, and how.
    pub(super) keys_read: Option<u64>,
    pub(super) keys_note: Option<String>,
    /// Delta reads that counted the model's rows beside the read: how.
    pub(super) count_note: Option<String>,
    /// A full read found changed rows a delta read would have missed (a bug signal).
    pub(super) missed: Option<String>,
}

/// How a delta read ended.
enum DeltaEnd {
    Done(ReadOutcome),
    /// Read in full instead: why, what the delta already did, the writers if unused, and how
    /// the delta counted the model's rows.
    Full {
        reason: String,
        first: Option<Piped>,
        writers: Option<Vec<AnyDestination>>,
        note: Option<String>,
    },
}

impl Inputs<'_> {
    pub(super) async fn run(
        self,
        info: &mut RunInfo,
        reader: Arc<Reader>,
        writers: Vec<AnyDestination>,
        cfg: DiffConfig,
    ) -> Result<ReadOutcome, Error> {
        let out = match info.decision.strategy {
            ReadStrategy::Full => self.full(info, reader, writers, cfg).await?,
            ReadStrategy::Delta { since } => {
                match self
                    .delta(info, since, &reader, writers, cfg.clone())
                    .await?
                {
                    DeltaEnd::Done(o) => o,
                    DeltaEnd::Full {
                        reason,
                        first,
                        writers,
                        note,
                    } => {
                        let mut out = self
                            .instead(info, reason, first, writers, reader, cfg)
                            .await?;
                        out.count_note = note;
                        out
                    }
                }
            }
        };
        // Read only: ending the transaction cannot lose anything.
        let _ = self.session.batch_execute("COMMIT").await;
        Ok(out)
    }

    /// The delta could not be proven complete: read in full, in the same transaction.
    async fn instead(
        &self,
        info: &mut RunInfo,
        reason: String,
        first: Option<Piped>,
        writers: Option<Vec<AnyDestination>>,
        reader: Arc<Reader>,
        cfg: DiffConfig,
    ) -> Result<ReadOutcome, Error> {
        let (env, name) = (self.env, &self.env.spec.name);
        tracing::warn!("sync '{name}': reading in full instead of the delta: {reason}");
        info.decision = Decision::full(reason);
        if !env.opts.dry_run {
            self.recorder.drop_basis().await?;
        }
        // What the delta pass recorded is committed: read the snapshot again, so those rows
        // are found unchanged rather than added twice.
        let (reader, first) = match (first, env.opts.dry_run) {
            (Some(p), false) => (Arc::new(self.snapshot.reader(name)?), Some(p)),
            _ => (reader, None),
        };
        let writers = match writers {
            Some(w) => w,
            None => {
                let n = env.spec.batch.writers;
                sink::open_writers(env.dest, &info.plan, info.strategy, n, env.opts.dry_run).await?
            }
        };
        let mut out = self.full(info, reader, writers, cfg).await?;
        if let Some(p) = first {
            let (a, b) = (&mut out.piped, p);
            a.read.rows += b.read.rows;
            a.read.bytes += b.read.bytes;
            a.written = a.written + b.written;
            let c = &mut a.diff.counts;
            c.unchanged = c
                .unchanged
                .saturating_sub(b.diff.counts.added + b.diff.counts.changed);
            c.added += b.diff.counts.added;
            c.changed += b.diff.counts.changed;
        }
        Ok(out)
    }

    /// A read of the model on the run's session: `sql` (none: the prelude is the read).
    fn read(&self, sql: Option<String>, prelude: Vec<Block>) -> Read {
        Read {
            conn: self.env.source.clone(),
            clients: vec![self.session.clone()],
            prelude,
            copies: sql.into_iter().map(|q| copy(&q)).collect(),
            newest_last: false,
            of: ReadOf::Source,
        }
    }

    /// A read of `list` from the table model (with the `extra` condition): one statement, or
    /// one per part on the run's session and its helpers when the run splits its reads.
    async fn read_table(
        &self,
        table: &SourceTable,
        list: &str,
        extra: Option<&str>,
        prelude: Vec<Block>,
    ) -> Result<Read, Error> {
        match self.split {
            None => Ok(self.read(Some(table.select(list, extra)), prelude)),
            Some(split) => {
                let parts = split
                    .parts
                    .iter()
                    .map(|p| table.select_part(list, extra, Some(p)));
                // `ctid` ranges in block order: the last reads the end of the heap.
                let mut read = self.read_parts(split, parts.collect(), prelude).await?;
                read.newest_last = true;
                Ok(read)
            }
        }
    }

    /// The parts' statements on the run's session and the split's helpers.
    async fn read_parts(
        &self,
        split: &Split,
        selects: Vec<String>,
        prelude: Vec<Block>,
    ) -> Result<Read, Error> {
        split.reading_parts();
        let mut read = self.read(None, prelude);
        read.clients.extend(split.helpers().await?.iter().cloned());
        read.copies = selects.iter().map(|q| copy(q)).collect();
        Ok(read)
    }

    /// The whole model's read.
    async fn read_model(&self, plan: &Plan) -> Result<Read, Error> {
        match (&plan.table, &plan.query, self.split) {
            (Some(t), _, _) => self.read_table(t, &t.list(), None, Vec::new()).await,
            // A query split by value ranges of its `split_by` column.
            (None, Some(q), Some(split)) => {
                let parts = split.parts.iter().map(|p| q.select(p.range.as_deref()));
                self.read_parts(split, parts.collect(), Vec::new()).await
            }
            _ => Ok(self.read(Some(plan.select.clone()), Vec::new())),
        }
    }

    async fn full(
        &self,
        info: &RunInfo,
        reader: Arc<Reader>,
        writers: Vec<AnyDestination>,
        cfg: DiffConfig,
    ) -> Result<ReadOutcome, Error> {
        let (env, ctx) = (self.env, self.ctx);
        let expected = info.estimated_rows.unwrap_or(0);
        ctx.progress
            .expected_rows
            .store(expected, Ordering::Relaxed);
        let read = self.read_model(&info.plan).await?;
        // The diff tallies the keys of the entries it meets per key range, so that the rows
        // that left are looked for in the ranges that lost entries only ([`narrow`]).
        let cfg = DiffConfig {
            seen_ranges: reader.range_spec().filter(|_| env.spec.delete),
            ..cfg
        };
        // The rows that left are the entries the diff did not meet. They are deleted as soon as
        // the diff has seen every row, beside the writers still committing, when nothing can
        // hold them back (as a delta read's, see `delta`), and the written rows are settled
        // beside the deletes once the writers are done; otherwise both follow the writers.
        let (diffed, diffed_rx) = tokio::sync::oneshot::channel::<Diffed>();
        let (early_tx, early_rx) = tokio::sync::oneshot::channel::<bool>();
        let early = async {
            let Ok(d) = diffed_rx.await else {
                // The diff failed: the pipeline says why.
                return Ok(Err(None));
            };
            let (o, spec) = (env.opts, env.spec);
            let now = d.complete && d.error_free && spec.delete && !o.dry_run && o.order.is_none();
            let _ = early_tx.send(now);
            if !now {
                return Ok(Err(Some(d.seen)));
            }
            let (gone, note) = {
                let reader = reader.clone();
                tokio::task::spawn_blocking(move || narrow(&reader, d.seen))
                    .await
                    .map_err(crate::error::join_err)??
            };
            let mut removal = remove(env, &reader, gone, ctx, true, None).await?;
            removal.note = removal.note.or(note);
            Ok(Ok(removal))
        };
        let piped = async {
            let mut piped = pipeline(env, read, writers, &reader, cfg, ctx, Some(diffed)).await?;
            completed(&ctx.stop, &piped, &env.spec.name)?;
            let settled = match early_rx.await {
                Ok(true) => {
                    let dry_run = env.opts.dry_run;
                    Some(settle(self.recorder, &mut piped.diff, &info.plan, dry_run).await?)
                }
                _ => None,
            };
            Ok::<_, Error>((piped, settled))
        };
        let (piped, early) = tokio::join!(piped, early);
        let (mut piped, settled) = piped?;
        let (duplicates, model_errors, removal) = match (early, settled) {
            (Ok(Ok(removal)), Some((duplicates, errors))) => (duplicates, errors, removal),
            (Ok(Err(Some(seen))), None) => {
                self.settle_and_remove(&info.plan, &reader, &mut piped, Some(Gone::Unseen(seen)))
                    .await?
            }
            (Err(e), settled) => {
                // The deletes beside the writers failed (a refused delete guard among them):
                // what was written is still settled before the run fails.
                if settled.is_none() {
                    settle(self.recorder, &mut piped.diff, &info.plan, env.opts.dry_run).await?;
                }
                return Err(e);
            }
            _ => {
                return Err(Error::Internal(
                    "the diff ended without saying which rows it saw".into(),
                ))
            }
        };
        let missed = match info.decision.check_since {
            Some(since) => self.check_premise(info, since, &piped).await?,
            None => None,
        };
        Ok(ReadOutcome {
            piped,
            duplicates,
            model_errors,
            removal,
            counted_s: None,
            keys_read_s: None,
            keys_read: None,
            keys_note: None,
            count_note: None,
            missed,
        })
    }

    /// The periodic full read, where a delta was provable, checks the delta's premise:
    /// every row it found added or changed was written since the recorded read (or is a
    /// rejected row, re-read by key). More rows than that is a bug signal, or a `where`
    /// condition that reads other tables: a warning with the keys of sampled rows not written
    /// since.
    async fn check_premise(
        &self,
        info: &RunInfo,
        since: u64,
        piped: &Piped,
    ) -> Result<Option<String>, Error> {
        let (plan, name) = (&info.plan, &self.env.spec.name);
        let (Some(table), Some(state)) = (&plan.table, &info.source_state) else {
            return Ok(None);
        };
        let c = &piped.diff.counts;
        if c.added + c.changed == 0 {
            return Ok(None);
        }
        let cond = delta::xmin_condition(since, state.xmax, state.hashes_lists);
        let written = delta::count(&self.session, table, &cond, name)
            .await?
            .changed;
        let retried = info.begin.basis.as_ref().map_or(0, |b| b.retry.len()) as u64;
        if c.added + c.changed <= written + retried {
            return Ok(None);
        }
        let d = &piped.diff;
        let samples: Vec<Vec<u8>> = d
            .sample_added
            .iter()
            .chain(&d.sample_changed)
            .cloned()
            .collect();
        let block =
            delta::read_by_key(&self.session, plan, table, &samples, Some(&cond), name).await?;
        let keys: Vec<String> = block
            .rows
            .iter()
            .map(|r| plan.describe_key(r.key(&block.data)))
            .collect();
        let msg = format!(
            "this full read found {} rows added or changed, but only {written} rows of {} were written since the last read (and {retried} rejected rows retried): a delta read would have missed {} changes. Sampled keys not written since: [{}]. If the where condition reads other tables, set full_read_every = \"always\"; otherwise please report this as a pgdelta bug",
            c.added + c.changed,
            table.quoted,
            c.added + c.changed - written - retried,
            keys.join(", ")
        );
        tracing::warn!("sync '{name}': {msg}");
        Ok(Some(msg))
    }

    async fn delta(
        &self,
        info: &RunInfo,
        since: u64,
        reader: &Arc<Reader>,
        writers: Vec<AnyDestination>,
        cfg: DiffConfig,
    ) -> Result<DeltaEnd, Error> {
        let (env, ctx, name) = (self.env, self.ctx, &self.env.spec.name);
        let plan = &info.plan;
        let (Some(table), Some(state)) = (&plan.table, &info.source_state) else {
            return Err(Error::Internal("a delta read without a table".into()));
        };
        let cond = delta::xmin_condition(since, state.xmax, state.hashes_lists);
        let entries = reader.len();
        // `decide` chose the delta only with a basis whose retry keys are whole.
        let basis = info.begin.basis.as_ref();
        let retry = basis
            .and_then(|b| b.retry_keys(plan.nkey))
            .ok_or_else(|| Error::Internal("a delta read without readable retry keys".into()))?;
        let ranges = reader
            .range_spec()
            .and_then(|spec| KeyRanges::new(plan, table, spec));
        let cfg = DiffConfig {
            ranges: ranges.as_ref().map(|k| k.spec),
            ..cfg
        };
        // Rows may have left when, by the table's statistics, rows were deleted (or, with a
        // where condition, written at all): their rows per key range are then counted.
        let may_have_left = basis.is_none_or(|b| state.may_have_deleted(b, table));
        // When the statistics say rows were written and the table's reads split, the model's
        // rows are counted beside the read, on a session of their own (per key range when rows
        // may have left), instead of in a scan before it: the read starts at once. Otherwise (a
        // quiet table: most runs find nothing) one scan before the read counts the rows
        // written and the model's rows, and an empty delta is that scan alone.
        let written = basis
            .and_then(|b| state.written_since(b))
            .filter(|&w| w > 0);
        let mut side = match (self.split, written) {
            (Some(split), Some(w)) => {
                let kr = ranges.as_ref().filter(|_| may_have_left);
                self.side_count(split, kr, table, visibility_lost(w, entries))
                    .await
            }
            _ => None,
        };
        let count_note = side.as_ref().map(|side| {
            format!(
                "the table's statistics count about {} rows written since the last run: the model's rows were counted {}beside the read, on a session of its own",
                written.unwrap_or(0),
                if side.per_range { "per key range " } else { "" }
            )
        });
        let counts = match side {
            Some(_) => None,
            None => Some(delta::count(&self.session, table, &cond, name).await?),
        };
        let counted_s = counts.map(|_| env.started.elapsed().as_secs_f64());
        if let Some(counts) = counts {
            let share = env.spec.delta_max_share;
            let entered = entered(table, counts.total, entries, counts.changed, retry.len());
            let reason = match counts.changed as f64 > share * counts.total.max(1) as f64 {
                true => Some(format!(
                    "{} of the model's {} rows were written since the last run, more than delta_max_share ({share}): a full read is as fast",
                    counts.changed, counts.total
                )),
                false => entered,
            };
            if let Some(reason) = reason {
                return Ok(DeltaEnd::Full {
                    reason,
                    first: None,
                    writers: Some(writers),
                    note: None,
                });
            }
            // Rows may have left: the model holds fewer rows than the entries plus every row
            // written (updates included). On a split read their rows per key range are
            // counted beside the read, so they are ready when the diff is; otherwise, if rows
            // left after all, they are counted after the read.
            let fewer = counts.total < entries + counts.changed + retry.len() as u64;
            side = match (&ranges, self.split) {
                (Some(kr), Some(split)) if fewer && may_have_left => {
                    let heap = visibility_lost(counts.changed, entries);
                    self.side_count(split, Some(kr), table, heap).await
                }
                _ => None,
            };
        }
        let expected = counts.map_or(written.unwrap_or(0), |c| c.changed);
        ctx.progress
            .expected_rows
            .store(expected + retry.len() as u64, Ordering::Relaxed);
        let prelude = match retry.is_empty() {
            true => Vec::new(),
            false => vec![
                delta::read_by_key(&self.session, plan, table, &retry, Some(&cond), name).await?,
            ],
        };
        let retried: u64 = prelude.iter().map(|b| b.rows.len() as u64).sum();
        // A count in the read's snapshot that found no written row means an empty COPY: skipped.
        // Otherwise one statement on this session, also when the run splits its full reads: a
        // delta read's cost is the server's scan, which a plain scan makes cheapest. The
        // parts of a split read are `ctid` ranges, and a TID range scan does not read through
        // the small ring of buffers a sequential scan of a large table uses: each part's pages
        // go through (and evict from) the whole buffer pool. At 10M rows, alone, `count(*)`
        // took 1.11 s through one range against 0.91-0.97 s plain; a 1% churn delta's source
        // CPU fell from 5.1-5.5 s (read and count in parts) to 3.7-4.0 s (each one statement;
        // docs/performance.md, "Delta reads in one statement").
        let read = match counts.is_none_or(|c| c.changed > 0) {
            true => self.read(Some(table.select(&table.list(), Some(&cond))), prelude),
            false => self.read(None, prelude),
        };
        // The keys named by their range's sums, once known, for the deletes' sessions.
        let (named_tx, named_rx) = tokio::sync::oneshot::channel::<Vec<Vec<u8>>>();
        let mut named_tx = Some(named_tx);
        // Finding the removed rows, when rows may have left the model, runs on this session as
        // soon as the diff has seen every row (the COPY above has ended), while the writers
        // finish: by key ranges where the key allows, else by reading every key.
        let (diffed, added_rx) = tokio::sync::oneshot::channel::<Diffed>();
        let keys = async {
            let Ok(added) = added_rx.await else {
                // The diff failed: the pipeline says why.
                return Ok(Left::Unknown);
            };
            // The snapshot's entries per key range, read while the source's count ends (not
            // from the run's start: they would add to the read's peak memory).
            let mut per_range = ranges.as_ref().filter(|_| may_have_left).map(|_| {
                let reader = reader.clone();
                tokio::task::spawn_blocking(move || reader.range_counts())
            });
            // The model's rows: counted before the read, or beside it (then checked as the
            // count before the read would have been, the rows written being the rows read).
            let (total, mut counted, counted_s) = match counts {
                Some(c) => (c.total, None, None),
                None => {
                    let (total, counted) = self.total_beside(side.take(), table, &cond).await?;
                    let at = env.started.elapsed().as_secs_f64();
                    let changed = added.rows.saturating_sub(retried);
                    if let Some(reason) = entered(table, total, entries, changed, retry.len()) {
                        return Ok(Left::Unprovable(reason));
                    }
                    (total, counted, Some(at))
                }
            };
            if table.unique_key && total == entries + added.added {
                return Ok(Left::None(counted_s));
            }
            // With a unique key, the count says how many rows left. Counts per range already
            // taken beside the read are always compared (the comparison then decides); else
            // they are taken only when the ranges likely to be read, those losing two rows or
            // more, hold fewer keys than a read of every key would return.
            let left = (entries + added.added).saturating_sub(total);
            let have = matches!(counted, Some(Counted::Ranges(Some(_))));
            let few = have || key_ranges::likely_cheaper(left, entries);
            // Dropped when the scan ends, however it ends: the connect below stops waiting.
            let named_tx = named_tx.take();
            let scan = async {
                let named_tx = named_tx;
                let scan = match (&ranges, added.keys) {
                    (Some(kr), Some(a)) if few && left > 0 => {
                        let counted = match (counted.take(), side.take()) {
                            (Some(c), _) => Some(c),
                            (None, Some(side)) => Some(side.join().await?),
                            (None, None) => None,
                        };
                        let known = (a, left, expected);
                        let ahead = Ahead {
                            entries: per_range.take(),
                            named: named_tx,
                        };
                        self.removed_by_ranges(plan, table, reader, kr, counted, ahead, known)
                            .await?
                    }
                    _ => None,
                };
                match scan {
                    Some(scan) => Ok::<_, Error>(scan),
                    None => self.scan_keys(plan, table, reader).await,
                }
            };
            // The rows that left are deleted now, beside the writers still committing, when
            // nothing can hold them back: the read completed, the model cannot have errors
            // (a unique, NOT NULL key, and the diff met no duplicate nor NULL key), the key
            // read found nothing unaccounted for, and no other sync orders this one's deletes.
            // The sessions for those deletes connect while the keys are read.
            let (o, spec) = (env.opts, env.spec);
            let may = added.complete
                && added.error_free
                && spec.delete
                && !o.dry_run
                && o.order.is_none();
            let connect = async {
                if !(may && left > 0) {
                    return None;
                }
                let mut sessions = super::delete_sessions(env, ctx, left).await;
                // The keys named by their range's sums are deleted once the key read has
                // checked them: their rows are found meanwhile.
                if let (Ok(sessions), Ok(named)) = (&mut sessions, named_rx.await) {
                    super::warm(sessions, &named, name).await;
                }
                Some(sessions)
            };
            let (scan, sessions) = tokio::join!(scan, connect);
            let scan = scan?;
            let at = env.started.elapsed().as_secs_f64();
            let early = may && scan.problem.is_none() && scan.unknown <= added.added;
            if early {
                let sessions = sessions.transpose()?;
                let removal = remove(env, reader, scan.gone, ctx, true, sessions).await?;
                return Ok(Left::Removed {
                    removal,
                    at,
                    counted_s,
                    keys: scan.keys,
                    note: scan.note,
                });
            }
            Ok::<_, Error>(Left::Found {
                scan,
                at,
                counted_s,
            })
        };
        let (piped, keys) = tokio::join!(
            pipeline(env, read, writers, reader, cfg, ctx, Some(diffed)),
            keys
        );
        if let Some(side) = side {
            // Not needed after all (no row left, or the read failed).
            side.stop(env.source).await;
        }
        let mut piped = piped?;
        completed(&ctx.stop, &piped, name)?;
        let added = piped.diff.counts.added;
        let mut early = None;
        let keys = match keys {
            Ok(keys) => keys,
            Err(e) => {
                // The key read or the deletes beside the writers failed (a refused delete
                // guard among them): what was written is still settled before the run fails.
                settle(self.recorder, &mut piped.diff, plan, env.opts.dry_run).await?;
                return Err(e);
            }
        };
        let (gone, counted_s, keys_read_s, keys_read, keys_note, full) = match keys {
            Left::Unknown => (None, counted_s, None, None, None, None),
            Left::Removed {
                removal,
                at,
                counted_s: beside,
                keys,
                note,
            } => {
                early = Some(removal);
                (None, counted_s.or(beside), Some(at), Some(keys), note, None)
            }
            Left::Unprovable(reason) => (None, counted_s, None, None, None, Some(reason)),
            // No row left the model: the count equals the entries plus the added rows.
            Left::None(at) => (None, counted_s.or(at), None, None, None, None),
            Left::Found {
                scan,
                at,
                counted_s: beside,
            } => {
                let problem = scan.problem.clone().or_else(|| {
                    (scan.unknown > added).then(|| format!(
                        "the key read found {} keys neither in the snapshot nor among the {added} new rows read: rows entered the model without being written (a where condition on something other than the row's own columns?)",
                        scan.unknown
                    ))
                });
                let counted_s = counted_s.or(beside);
                (
                    Some(scan.gone),
                    counted_s,
                    Some(at),
                    Some(scan.keys),
                    scan.note,
                    problem,
                )
            }
        };
        if let Some(reason) = full {
            // The full read that follows takes a new view of the snapshot: it must hold
            // every row this pass wrote.
            settle(self.recorder, &mut piped.diff, plan, env.opts.dry_run).await?;
            return Ok(DeltaEnd::Full {
                reason,
                first: Some(piped),
                writers: None,
                note: count_note,
            });
        }
        let (duplicates, model_errors, removal) = self
            .settle_and_remove(plan, reader, &mut piped, gone)
            .await?;
        let removal = early.unwrap_or(removal);
        Ok(DeltaEnd::Done(ReadOutcome {
            piped,
            duplicates,
            model_errors,
            removal,
            counted_s,
            keys_read_s,
            keys_read,
            keys_note,
            count_note,
            missed: None,
        }))
    }

    /// Settles the diff with the snapshot (duplicate keys, NULL keys: the model's errors) and
    /// removes the rows that left (`gone`), unless the model had errors. When it cannot have
    /// any ([`error_free`]), its deletes do not wait for the snapshot thread to record every
    /// row written (it lags the destination's commits): both run at once.
    async fn settle_and_remove(
        &self,
        plan: &Plan,
        reader: &Arc<Reader>,
        piped: &mut Piped,
        gone: Option<Gone>,
    ) -> Result<(u64, Vec<String>, Removal), Error> {
        let (env, ctx) = (self.env, self.ctx);
        let dry_run = env.opts.dry_run;
        let clean = error_free(plan, &piped.diff);
        let Some(gone) = gone else {
            let (duplicates, errors) =
                settle(self.recorder, &mut piped.diff, plan, dry_run).await?;
            return Ok((duplicates, errors, Removal::default()));
        };
        if clean {
            let (settled, removal) = tokio::join!(
                settle(self.recorder, &mut piped.diff, plan, dry_run),
                remove(env, reader, gone, ctx, true, None)
            );
            let (duplicates, errors) = settled?;
            return Ok((duplicates, errors, removal?));
        }
        let (duplicates, errors) = settle(self.recorder, &mut piped.diff, plan, dry_run).await?;
        let removal = remove(env, reader, gone, ctx, errors.is_empty(), None).await?;
        Ok((duplicates, errors, removal))
    }

    /// The read's sessions: this one, and the helpers of a split read.
    async fn sessions(&self) -> Result<Vec<Arc<crate::tap::Session>>, Error> {
        let mut clients = vec![self.session.clone()];
        if let Some(split) = self.split {
            clients.extend(split.helpers().await?.iter().cloned());
        }
        Ok(clients)
    }

    /// The model's rows, counted beside the read (per key range, or in all; counted now on
    /// the read's session when the count per range met a NULL key), and the counts per range.
    async fn total_beside(
        &self,
        side: Option<SideCount>,
        table: &SourceTable,
        cond: &str,
    ) -> Result<(u64, Option<Counted>), Error> {
        let counted = match side {
            Some(side) => Some(side.join().await?),
            None => None,
        };
        match counted.as_ref().and_then(Counted::total) {
            Some(total) => Ok((total, counted)),
            None => {
                let name = &self.env.spec.name;
                let total = delta::count(&self.session, table, cond, name).await?.total;
                Ok((total, counted))
            }
        }
    }

    /// Reads the model's keys only, in the read's transaction, and marks the snapshot entries
    /// they match: the entries left unmarked are the removed rows.
    async fn scan_keys(
        &self,
        plan: &Arc<Plan>,
        table: &SourceTable,
        reader: &Arc<Reader>,
    ) -> Result<KeyScan, Error> {
        let list = table.exprs[..plan.nkey].join(", ");
        let read = self.read_table(table, &list, None, Vec::new()).await?;
        let k = self.read_keys(read, plan, reader).await?;
        Ok(KeyScan {
            gone: match k.gone {
                Some(keys) => Gone::Keys(keys),
                None => Gone::Unseen(k.seen),
            },
            keys: k.keys,
            unknown: k.unknown,
            problem: k.problem,
            note: None,
        })
    }

    /// Runs a key-only `read` (the plan's key columns) and marks the snapshot entries its keys
    /// match.
    async fn read_keys(
        &self,
        read: Read,
        plan: &Arc<Plan>,
        reader: &Arc<Reader>,
    ) -> Result<KeysRead, Error> {
        let (env, ctx, name) = (self.env, self.ctx, &self.env.spec.name);
        // A key read by index over thousands of ranges is estimated far above its cost, and
        // the server compiled it (106 ms of JIT, inlining and optimisation, for a read of
        // 209 ms at 10M rows); a read of every key gains nothing from it either. Off for the
        // rest of the read's transaction (a full read that may follow in it runs without JIT).
        for client in &read.clients {
            client
                .batch_execute("SET LOCAL jit = off")
                .await
                .map_err(|e| Error::source_read(name, "reading the model's keys", &e))?;
        }
        let mut keys_only = (**plan).clone();
        keys_only.columns.truncate(plan.nkey);
        let reader = reader.clone();
        let (dir, path) = (self.snapshot.dir(), self.snapshot.path().to_string());
        let window = env.pipe.key_window_bytes;
        let (stats, scan) = crate::source::read_into(
            read,
            Arc::new(keys_only),
            (env.pipe.block_queue, env.pipe.block_bytes),
            name.clone(),
            ctx.stop.clone(),
            move |rx| scan(rx, &reader, &dir, &path, window),
        )
        .await?;
        let stats = stats?;
        if stats.end != ReadEnd::Complete {
            return Err(match ctx.stop.reason() {
                Some(StopReason::Interrupted) => Error::Interrupted {
                    sync: name.clone(),
                    message: "stopped during the key read; the rows written are recorded, no deletes applied; the next run resumes".into(),
                },
                _ => Error::Internal("the key read stopped early".into()),
            });
        }
        let k = scan?;
        if k.spilled > 0 {
            tracing::debug!(
                "sync '{name}': the key read merged {} windows of keys back from disk",
                k.spilled
            );
        }
        Ok(k)
    }

    /// Finds the `left` rows that left the model from tallies per key range (see
    /// [`crate::key_ranges`]): the model's rows per range on the source against the snapshot's
    /// entries per range (kept in the state file) plus the rows added. A range that lost one row
    /// names its key; the keys of the ranges that lost more are read, with the named keys
    /// beside them (a named key the source still holds, or no entry holds, fails the check
    /// below). `None` when the tallies do not settle it (a range holds more rows than it should,
    /// the ranges lost other than `left` rows, too many ranges lost rows): read every key
    /// instead. Counted now (not beside the read), the heap is scanned once `written` rows
    /// (written since the last run) make that cheaper ([`visibility_lost`]).
    async fn removed_by_ranges(
        &self,
        plan: &Arc<Plan>,
        table: &SourceTable,
        reader: &Arc<Reader>,
        kr: &KeyRanges,
        counted: Option<Counted>,
        ahead: Ahead,
        (added, left, written): (Vec<i64>, u64, u64),
    ) -> Result<Option<KeyScan>, Error> {
        let name = &self.env.spec.name;
        let t0 = std::time::Instant::now();
        let now = match counted {
            Some(Counted::Ranges(now)) => now,
            _ => {
                // On every session of a split read, a part at a time; else one statement.
                let heap = visibility_lost(written, reader.len());
                let queue = CountQueue::new(Some(kr), table, self.split, heap);
                queue.run(&self.sessions().await?, name).await?;
                match queue.take() {
                    Counted::Ranges(now) => now,
                    Counted::Total(_) => None,
                }
            }
        };
        let entries = match ahead.entries {
            Some(task) => task.await.map_err(crate::error::join_err)??,
            None => reader.range_counts()?,
        };
        tracing::debug!(
            "sync '{name}': rows per key range ready {:.2}s after the diff",
            t0.elapsed().as_secs_f64()
        );
        let (Some(now), Some(entries)) = (now, entries) else {
            tracing::debug!(
                "sync '{name}': a NULL key in the counts per key range: reading every key"
            );
            return Ok(None);
        };
        let added = key_ranges::tally(&kr.spec, &added);
        let (ranges, named, rows) = match key_ranges::compare(&kr.spec, now, entries, added) {
            key_ranges::Compared::Lost { ranges, keys, rows } => (ranges, keys, rows),
            key_ranges::Compared::Excess { range } => {
                tracing::debug!("sync '{name}': key range {range} holds more rows than recorded: reading every key");
                return Ok(None);
            }
        };
        if rows != left || rows == 0 {
            tracing::debug!(
                "sync '{name}': the key ranges lost {rows} rows where the count says {left}: reading every key"
            );
            return Ok(None);
        }
        if !key_ranges::cheaper_than_all(ranges.len() as u64, reader.len()) {
            tracing::debug!(
                "sync '{name}': {} key ranges lost rows: reading every key is cheaper",
                ranges.len()
            );
            return Ok(None);
        }
        if let Some(tx) = ahead.named {
            let _ = tx.send(named.iter().map(|&v| kr.spec.raw(v)).collect());
        }
        let KeysRead {
            seen,
            keys,
            unknown,
            problem,
            ..
        } = {
            let read = self.read(Some(kr.keys_sql(table, &ranges, &named)), Vec::new());
            self.read_keys(read, plan, reader).await?
        };
        let gone = {
            let (reader, kr, ranges) = (reader.clone(), kr.clone(), ranges.clone());
            let named = named.clone();
            tokio::task::spawn_blocking(move || {
                unseen_in(&reader, &kr.spec, &ranges, &named, &seen.slots)
            })
            .await
            .map_err(crate::error::join_err)??
        };
        if gone.len() as u64 != rows {
            tracing::debug!(
                "sync '{name}': the key ranges lost {rows} rows but {} of their entries were not read: reading every key",
                gone.len()
            );
            return Ok(None);
        }
        tracing::debug!(
            "sync '{name}': {rows} removed rows found in {} key ranges of 2^{} values ({} named by their range's sums)",
            ranges.len() + named.len(),
            kr.spec.shift,
            named.len()
        );
        let note = format!(
            "rows left the model: found from the rows per key range ({} values each), {} named by their range's key sums and checked by key, {} by reading the keys of the {} range{} that lost more; {keys} keys read instead of every key",
            1u64 << kr.spec.shift,
            named.len(),
            rows - named.len() as u64,
            ranges.len(),
            if ranges.len() == 1 { "" } else { "s" },
        );
        Ok(Some(KeyScan {
            gone: Gone::Keys(gone),
            keys,
            unknown,
            problem,
            note: Some(note),
        }))
    }
}

/// The snapshot's entries per key range, read on a blocking thread ([`Reader::range_counts`]).
type EntriesPerRange = tokio::task::JoinHandle<Result<Option<key_ranges::Counts>, SnapshotError>>;

/// What finding the removed rows by key range works with before the count ends: the
/// snapshot's entries per range, read meanwhile, and where to send the keys named by their
/// range's sums (raw keys), for the deletes' sessions to find their rows while those keys are
/// checked on the source.
struct Ahead {
    entries: Option<EntriesPerRange>,
    named: Option<tokio::sync::oneshot::Sender<Vec<Vec<u8>>>>,
}

/// The model's rows, counted in one statement on a session of its own beside the read.
struct SideCount {
    task: tokio::task::JoinHandle<Result<Counted, Error>>,
    cancel: crate::conn::Canceller,
    /// Per key range, else in all.
    per_range: bool,
}

/// What was counted.
enum Counted {
    /// The model's rows.
    Total(u64),
    /// The model's rows per key range; `None` when a key was NULL.
    Ranges(Option<key_ranges::Counts>),
}

impl Counted {
    fn total(&self) -> Option<u64> {
        match self {
            Counted::Total(n) => Some(*n),
            Counted::Ranges(Some(c)) => Some(c.iter().map(|(_, t)| t.n).sum()),
            Counted::Ranges(None) => None,
        }
    }

    /// Both counts together (the tallies per range merged: sorted, one per range).
    fn and(self, other: Counted) -> Counted {
        match (self, other) {
            (Counted::Total(a), Counted::Total(b)) => Counted::Total(a + b),
            (Counted::Ranges(Some(mut a)), Counted::Ranges(Some(b))) => {
                key_ranges::absorb(&mut a, b);
                Counted::Ranges(Some(a))
            }
            _ => Counted::Ranges(None),
        }
    }
}

/// Counting statements, one per part of the model, each taken by whichever session is free,
/// and what they counted so far, in one total: each part is added to it as it ends (with
/// several sessions counting after rounds of churn, a total per session held up to 7.5 MB of
/// tallies each at 10M rows).
struct CountQueue {
    sqls: std::sync::Mutex<Vec<String>>,
    counted: std::sync::Mutex<Counted>,
    /// Grouped counts per key range, else `count(*)`.
    per_range: bool,
    /// Never through an index ([`visibility_lost`]).
    heap: bool,
    /// One statement over the whole model, not parts of a split read.
    whole: bool,
}

impl CountQueue {
    /// The model's rows per key range of `kr` (its grouped counts), or in all (`count(*)`):
    /// one statement per part of a split read, else one; with `heap`, scanning the heap.
    fn new(
        kr: Option<&KeyRanges>,
        table: &SourceTable,
        split: Option<&Split>,
        heap: bool,
    ) -> CountQueue {
        let sql = |part| match kr {
            Some(kr) => kr.count_sql(table, part),
            None => table.select_part("count(*)::int8", None, part),
        };
        let sqls = match split {
            Some(split) => split.parts.iter().map(|p| sql(Some(p))).collect(),
            None => vec![sql(None)],
        };
        CountQueue {
            sqls: std::sync::Mutex::new(sqls),
            counted: std::sync::Mutex::new(Self::none(kr.is_some())),
            per_range: kr.is_some(),
            heap,
            whole: split.is_none(),
        }
    }

    fn none(per_range: bool) -> Counted {
        match per_range {
            true => Counted::Ranges(Some(Vec::new())),
            false => Counted::Total(0),
        }
    }

    /// What every part counted so far (the queue then holds none).
    fn take(&self) -> Counted {
        let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *counted, Self::none(self.per_range))
    }

    fn add(&self, part: Counted) {
        let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        let so_far = std::mem::replace(&mut *counted, Self::none(self.per_range));
        *counted = so_far.and(part);
    }

    /// Runs the statements left on the given sessions (all in transactions under the read's
    /// snapshot) until none is left, adding what each counted to the queue's total. With
    /// `heap`, index scans are off on each session while it counts (then as they were: the
    /// key read that may follow on it reads through the index).
    async fn run(&self, clients: &[Arc<crate::tap::Session>], sync: &str) -> Result<(), Error> {
        let next = || self.sqls.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let work = clients.iter().map(|c| async {
            if self.heap {
                index_scans(c, "off", sync).await?;
            }
            while let Some(sql) = next() {
                let part = match self.per_range {
                    true => Counted::Ranges(key_ranges::count(c, &sql, self.whole, sync).await?),
                    false => {
                        let row = c.query_one(&sql, &[]).await.map_err(|e| {
                            Error::source_read(sync, "counting the model's rows", &e)
                        })?;
                        Counted::Total(row.get::<_, i64>(0) as u64)
                    }
                };
                self.add(part);
            }
            if self.heap {
                index_scans(c, "DEFAULT", sync).await?;
            }
            Ok::<_, Error>(())
        });
        futures_util::future::join_all(work)
            .await
            .into_iter()
            .collect()
    }
}

/// Sets the index scans of `client`'s transaction to `to` (`off`, or `DEFAULT`: as if never set).
async fn index_scans(client: &tokio_postgres::Client, to: &str, sync: &str) -> Result<(), Error> {
    let sql = format!(
        "SET LOCAL enable_indexonlyscan TO {to}; SET LOCAL enable_indexscan TO {to}; \
         SET LOCAL enable_bitmapscan TO {to}"
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| Error::source_read(sync, "counting the model's rows", &e))
}

impl SideCount {
    /// What the side session counted.
    async fn join(self) -> Result<Counted, Error> {
        self.task.await.map_err(crate::error::join_err)?
    }

    /// Cancels the count if it still runs (the server would finish it otherwise).
    async fn stop(self, source: &crate::conn::ConnInfo) {
        if !self.task.is_finished() {
            let _ = source.cancel(&self.cancel).await;
        }
        self.task.abort();
    }
}

/// What a delta read found out about the rows that left the model.
enum Left {
    /// Nothing: the diff failed (the pipeline says why).
    Unknown,
    /// No row left (and when the rows were counted beside the read).
    None(Option<f64>),
    /// The counts beside the read do not prove the delta complete: why.
    Unprovable(String),
    /// The rows that left, when they were known, and when the rows were counted beside the read.
    Found {
        scan: KeyScan,
        at: f64,
        counted_s: Option<f64>,
    },
    /// As `Found`, and already removed, beside the writers: how many keys were read, and how.
    Removed {
        removal: Removal,
        at: f64,
        counted_s: Option<f64>,
        keys: u64,
        note: Option<String>,
    },
}

/// Whether `written` rows (updated, inserted or deleted since the last run) have likely
/// cleared the visibility map of enough of a table of about `entries` rows that counting its
/// rows through the key's index-only scan, with a heap fetch per row on every page no longer
/// all-visible, costs more than scanning the heap. The planner cannot tell: it judges by
/// `pg_class.relallvisible`, which only VACUUM and ANALYZE update, so a table vacuumed once
/// and churned since still looks all-visible to it. Measured alone at 10M rows (the bench's
/// table, docs/performance.md, "Delta reads in one statement"): freshly vacuumed, the index-only
/// count took 1.75-1.97 s against 2.45 s scanning the heap; after one round of 1% churn, 2.43-2.64
/// s against 2.41 s; after two, 2.90-3.03 s against 2.48 s. Above 0.5% written the heap is
/// scanned (a vacuum since the writes makes that the slower choice, by up to those 0.7 s).
fn visibility_lost(written: u64, entries: u64) -> bool {
    written as f64 > entries as f64 * 0.005
}

/// Why a model of `total` rows cannot be the snapshot's entries less the rows that left plus
/// the rows written: more rows than that entered it without being written.
fn entered(
    table: &SourceTable,
    total: u64,
    entries: u64,
    changed: u64,
    retry: usize,
) -> Option<String> {
    (table.unique_key && total > entries + changed + retry as u64).then(|| format!(
        "the model has {total} rows, more than the snapshot's {entries} entries plus {changed} rows written since the last run: rows entered it without being written (a where condition on something other than the row's own columns?)"
    ))
}

impl Inputs<'_> {
    /// Starts counting the model's rows (per key range, with `kr`) on a new session in the
    /// read's snapshot, in one statement, as the delta read is (see [`Inputs::delta`]); with
    /// `heap`, never through an index ([`visibility_lost`]). `None` when no session can be
    /// opened (the rows are then counted on the read's sessions).
    async fn side_count(
        &self,
        split: &Split,
        kr: Option<&KeyRanges>,
        table: &SourceTable,
        heap: bool,
    ) -> Option<SideCount> {
        let name = self.env.spec.name.clone();
        let client = match split.open_helper().await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::debug!("sync '{name}': no session to count the rows beside the read: {e}");
                return None;
            }
        };
        let cancel = client.canceller();
        let queue = CountQueue::new(kr, table, None, heap);
        let task = tokio::spawn(async move {
            queue.run(&[client], &name).await?;
            Ok(queue.take())
        });
        Some(SideCount {
            task,
            cancel,
            per_range: kr.is_some(),
        })
    }
}

/// The rows a complete full read left out, found in the key ranges whose entries the diff did
/// not all meet (its tallies against the snapshot's), instead of by a scan of every entry:
/// `Gone::Keys` and a note saying so when those ranges hold exactly the entries not met, else
/// the slots met as they are (`Gone::Unseen`: every entry is scanned).
fn narrow(reader: &Reader, mut seen: Seen) -> Result<(Gone, Option<String>), SnapshotError> {
    let removed = reader.len().saturating_sub(seen.entries);
    let now = seen.ranges.take();
    let (Some(spec), Some(now), true) = (reader.range_spec(), now, removed > 0) else {
        return Ok((Gone::Unseen(seen), None));
    };
    // The snapshot's tallies are read only when entries were not met (24 bytes a range: 7.5 MB
    // for the 312k ranges of 10M keys).
    let Some(entries) = reader.range_counts()? else {
        return Ok((Gone::Unseen(seen), None));
    };
    let key_ranges::Compared::Lost { ranges, keys, rows } =
        key_ranges::compare(&spec, now, entries, Vec::new())
    else {
        return Ok((Gone::Unseen(seen), None));
    };
    if rows != removed || !key_ranges::cheaper_than_all(ranges.len() as u64, reader.len()) {
        return Ok((Gone::Unseen(seen), None));
    }
    let gone = unseen_in(reader, &spec, &ranges, &keys, &seen.slots)?;
    if gone.len() as u64 != removed {
        tracing::debug!(
            "the key ranges that lost entries hold {} unseen entries where {removed} were not met: scanning every entry",
            gone.len()
        );
        return Ok((Gone::Unseen(seen), None));
    }
    let note = format!(
        "rows left the model: found in the key ranges that lost entries ({} values each), {} named by their range's key sums, {} in the {} range{} that lost more; no scan of every entry",
        1u64 << spec.shift,
        keys.len(),
        removed - keys.len() as u64,
        ranges.len(),
        if ranges.len() == 1 { "" } else { "s" },
    );
    Ok((Gone::Keys(gone), Some(note)))
}

/// The keys of the entries in `ranges`, and of the entries of the `named` keys, whose slots
/// are not in `seen`.
fn unseen_in(
    reader: &Reader,
    spec: &RangeSpec,
    ranges: &[i64],
    named: &[i64],
    seen: &Bitset,
) -> Result<KeyBatch, SnapshotError> {
    let mut gone = KeyBatch::default();
    let mut unseen = |key: &[u8], e: Entry| {
        if !seen.contains(e.slot) {
            gone.push(key);
        }
    };
    for &r in ranges {
        let (lo, hi) = spec.raw_bounds(r);
        reader.scan_range(&lo, &hi, &mut unseen)?;
    }
    for &v in named {
        let key = spec.raw(v);
        reader.scan_range(&key, &key, &mut unseen)?;
    }
    Ok(gone)
}

/// The raw keys of the rows the destination rejected this run (to re-read by key next run),
/// or `None` when the run kept fewer than it rejected.
pub(super) fn retry_keys(ctx: &ApplyCtx) -> Option<Vec<Vec<u8>>> {
    let rej = ctx.rejections();
    let keys: Vec<Vec<u8>> = rej
        .rows
        .iter()
        .filter(|r| r.operation == Operation::Write)
        .map(|r| r.raw_key.clone())
        .collect();
    (keys.len() as u64 == rej.added + rej.changed).then_some(keys)
}

/// What a key-only read found.
struct KeyScan {
    gone: Gone,
    /// Keys read.
    keys: u64,
    /// How the removed rows were found, when not by reading every key.
    note: Option<String>,
    /// Keys not in the snapshot.
    unknown: u64,
    /// A key met twice or a NULL key: the model needs the full read's checks.
    problem: Option<String>,
}

/// What a key-only read saw.
struct KeysRead {
    seen: Seen,
    /// Keys read.
    keys: u64,
    /// Keys not in the snapshot.
    unknown: u64,
    /// A key met twice or a NULL key: the model needs the full read's checks.
    problem: Option<String>,
    /// Windows of keys that went to disk, to be merged.
    spilled: u64,
    /// The entries no key matched (the removed rows), when the merge met every entry.
    gone: Option<KeyBatch>,
}

/// Looks the keys of a key-only read up in the snapshot and marks the entries they match. Keys
/// are gathered in windows of `window_bytes` ([`KEY_WINDOW_BYTES`] in a run) and looked up
/// sorted. Windows of scattered
/// keys (random UUIDs) from a read larger than one window go to disk instead, sorted, and are
/// merged at the end into one stream in key order that meets the entries in one forward walk:
/// a window looked up on its own touches nearly every leaf of a large snapshot, so the whole
/// read would cost windows x leaves page reads (see docs/performance.md, "Random keys").
fn scan(
    mut rx: mpsc::Receiver<Block>,
    reader: &Reader,
    dir: &Path,
    path: &str,
    window_bytes: usize,
) -> Result<KeysRead, SnapshotError> {
    let mut out = KeysRead {
        seen: Seen {
            slots: Bitset::with_len(reader.len() as usize),
            entries: 0,
            ranges: None,
        },
        keys: 0,
        unknown: 0,
        problem: None,
        spilled: 0,
        gone: None,
    };
    let mut found = Vec::new();
    // The keys are copied out: a block's bytes may share a larger buffer.
    let mut window = Committed::default();
    let mut spill: Option<Spill> = None;
    // Set when no spill file can be written: every window is looked up on its own.
    let mut no_spill = false;
    // Some keys were looked up on their own, outside the merge.
    let mut direct = false;
    let mut open = true;
    while open {
        match rx.blocking_recv() {
            Some(block) => {
                for r in &block.rows {
                    window.keys.push(r.key(&block.data[..]));
                }
                if window.keys.data.len() + 4 * window.keys.ends.len() < window_bytes {
                    continue;
                }
            }
            None => open = false,
        }
        let keys = &window.keys;
        // Once windows spill, every later one joins them (the last, however small, too).
        let spills = !no_spill
            && (spill.is_some()
                || open
                    && reader.len() > keys.len() as u64
                    && crate::batch::scattered(keys.len(), |i| keys.key(i)));
        if spills {
            let pushed = match spill.as_mut() {
                Some(s) => s.push(&window),
                None => Spill::create(dir, false).and_then(|mut s| {
                    s.push(&window)?;
                    spill = Some(s);
                    Ok(())
                }),
            };
            match pushed {
                Ok(()) => {
                    out.spilled += 1;
                    window.keys.clear();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(
                        "state file {path}: the key read cannot spill keys to {} ({e}): it looks them up a window at a time, which costs more for random keys",
                        dir.display()
                    );
                    no_spill = true;
                }
            }
        }
        let keys: Vec<&[u8]> = (0..window.keys.len()).map(|i| window.keys.key(i)).collect();
        direct |= !keys.is_empty();
        reader.get_many(&keys, &mut found, true)?;
        mark(&mut out, &keys, &found);
        drop(keys);
        window.keys.clear();
    }
    if let Some(spill) = spill {
        // When every key went through the merge, the walk meets every entry, and the entries
        // no key matched are the removed rows: kept (up to [`GONE_KEYS`]) so that the deletes
        // need no second walk of the snapshot.
        let mut gone = (!direct).then(KeyBatch::default);
        let mut unmatched = |key: &[u8]| {
            if let Some(g) = &mut gone {
                match g.len() < GONE_KEYS {
                    true => g.push(key),
                    false => gone = None,
                }
            }
        };
        // The read's server work is done by now: the merge and the walk share the cores.
        let marked = |keys: &[&[u8]], _: &[_], found: &[Option<Entry>]| {
            mark(&mut out, keys, found);
            true
        };
        spill.walk(reader, true, marked, &mut unmatched)?;
        out.gone = gone;
    }
    Ok(out)
}

/// Marks the entries `found` for `keys` (a NULL key, or a key met twice, is a problem).
fn mark(out: &mut KeysRead, keys: &[&[u8]], found: &[Option<Entry>]) {
    out.keys += keys.len() as u64;
    for (key, entry) in keys.iter().zip(found) {
        match entry {
            _ if has_null(key) => {
                out.problem = Some("the key read met a NULL key".into());
            }
            Some(e) if !out.seen.slots.insert(e.slot) => {
                out.problem = Some("the key read met a key twice".into());
            }
            Some(_) => out.seen.entries += 1,
            None => out.unknown += 1,
        }
    }
}

/// The key read looks up this many bytes of keys at once, sorted: keys that come
/// in no order (random UUIDs) then share the snapshot's pages, where a block's worth lands on
/// a page of its own per key (docs/performance.md, "Random keys").
pub(super) const KEY_WINDOW_BYTES: usize = 4 << 20;

/// Removed rows a merged key read names itself, at most (24 MiB of uuid keys); past that the
/// deletes find them by a walk of the snapshot, as after a key read that did not merge.
const GONE_KEYS: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::{encode, frame_all};
    use crate::snapshot::testing::{ended_read, seeded};

    /// The count beside a delta read scans the heap once more than 0.5% of the rows were
    /// written since the last run (a 1% churn of 10M rows: 1.2% written), and leaves the plan
    /// to the server below that (a few rows written clear few pages' visibility).
    #[test]
    fn the_count_scans_the_heap_once_writes_cleared_the_visibility_map() {
        assert!(visibility_lost(120_000, 10_000_000));
        assert!(visibility_lost(50_001, 10_000_000));
        assert!(!visibility_lost(50_000, 10_000_000));
        assert!(!visibility_lost(1_000, 10_000_000));
        assert!(visibility_lost(1, 0));
    }

    /// A uuid-like key field (4-byte length, 16 bytes), scattered by `i`.
    fn key(i: u64) -> Vec<u8> {
        let mut k = 16u32.to_be_bytes().to_vec();
        k.extend_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
        k.extend_from_slice(&i.to_be_bytes());
        k
    }

    /// Blocks of 100 one-column tuples holding the keys `ids` name.
    fn blocks(ids: &[u64]) -> Vec<Block> {
        let keys: Vec<Vec<u8>> = ids.iter().map(|&i| key(i)).collect();
        keys.chunks(100)
            .map(|c| frame_all(&encode(c.iter().map(|k| vec![Some(&k[4..])])), 1, 1).unwrap())
            .collect()
    }

    fn scan_blocks(reader: &Reader, dir: &Path, ids: &[u64], window: usize) -> KeysRead {
        scan(ended_read(blocks(ids)), reader, dir, "k.redb", window).unwrap()
    }

    /// A key read whose windows go to disk and come back merged marks the same entries, counts
    /// the same unknown keys and finds a key read twice, as one looked up a window at a time;
    /// and it names the entries no key matched (the removed rows).
    #[test]
    fn spilled_keys_mark_the_same_entries_as_windows() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Committed::default();
        for i in 0..5_000 {
            c.keys.push(&key(i));
            c.entries.push(([1; 16], None));
        }
        let snap = seeded(&dir.path().join("k.redb"), "k", c);
        let reader = snap.reader("k").unwrap();
        // 4,000 of the entries (1,000 left the model) and 300 keys the snapshot does not hold.
        let read: Vec<u64> = (1_000..5_000).chain(10_000..10_300).collect();
        let spilled = scan_blocks(&reader, dir.path(), &read, 2 << 10);
        let windows = scan_blocks(&reader, dir.path(), &read, usize::MAX);
        assert!(spilled.spilled > 10, "{} windows spilled", spilled.spilled);
        assert_eq!(windows.spilled, 0);
        for r in [&spilled, &windows] {
            assert_eq!((r.keys, r.seen.entries, r.unknown), (4_300, 4_000, 300));
            assert_eq!(r.problem, None);
        }
        let marked = |r: &KeysRead| -> Vec<u32> {
            (0..5_000).filter(|&s| r.seen.slots.contains(s)).collect()
        };
        assert_eq!(marked(&spilled), marked(&windows));
        assert_eq!(marked(&spilled).len(), 4_000);
        // Every key went through the merge: it names the 1,000 entries no key matched.
        let gone = spilled.gone.as_ref().expect("the merge met every entry");
        let mut gone: Vec<Vec<u8>> = (0..gone.len()).map(|i| gone.key(i).to_vec()).collect();
        let mut want: Vec<Vec<u8>> = (0..1_000).map(key).collect();
        gone.sort();
        want.sort();
        assert_eq!(gone, want);
        assert!(windows.gone.is_none());
        let mut twice = read.clone();
        twice.insert(2_000, 4_321);
        let r = scan_blocks(&reader, dir.path(), &twice, 2 << 10);
        assert!(r.spilled > 0);
        assert_eq!(r.problem.as_deref(), Some("the key read met a key twice"));
        assert_eq!(
            r.gone.map(|g| g.len()),
            Some(1_000),
            "a key met twice is matched once"
        );
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "only the state file is left");
    }
}
