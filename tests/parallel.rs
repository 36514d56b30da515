//! Parallel reads: a table model read as `ctid` ranges by several source sessions that share
//! one exported snapshot. The parts must form one consistent read: every row once, deletes
//! derived only from a complete read, and a write that commits during the read not seen by
//! any part. And shards: several processes syncing one table together, each its share of the
//! keys.

use std::time::Duration;

use pgdelta::conn::ConnInfo;
use pgdelta::snapshot::Snapshot;
use pgdelta::spec::{FullReadEvery, Model, ReadSessions, Shard, SyncSpec};
use pgdelta::sync::{RunOptions, Summary};

use crate::support::{connect, Env};

/// A table of `rows` rows, about 400 blocks at 10,000 rows.
async fn seeded(rows: i32) -> (Env, SyncSpec) {
    let env = Env::new().await;
    env.both("CREATE TABLE items (id int PRIMARY KEY, name text, qty int)")
        .await;
    env.src
        .batch_execute(&format!(
            "INSERT INTO items SELECT i, repeat('x', 200) || i, i % 7 FROM generate_series(1, {rows}) i; \
             ANALYZE items"
        ))
        .await
        .unwrap();
    let mut spec = env.spec("items", &["id"]);
    spec.delete = true;
    spec.read_sessions = ReadSessions::Fixed(3);
    (env, spec)
}

async fn synced(env: &Env, spec: &SyncSpec) -> Summary {
    let s = env.sync(spec).await.unwrap();
    env.assert_same(
        "SELECT * FROM items ORDER BY id",
        "SELECT * FROM items ORDER BY id",
    )
    .await;
    s
}

/// The summary's first note containing `needle`, or "".
fn note<'a>(s: &'a Summary, needle: &str) -> &'a str {
    s.notes
        .iter()
        .find(|n| n.contains(needle))
        .map(String::as_str)
        .unwrap_or("")
}

fn split_note(s: &Summary) -> &str {
    note(s, "sessions in")
}

#[tokio::test]
async fn a_split_read_reads_every_row_once_and_derives_deletes() {
    let (env, mut spec) = seeded(10_000).await;
    spec.full_read_every = FullReadEvery::Always;
    let s = synced(&env, &spec).await;
    assert_eq!(
        (s.rows_read, s.added, s.read_sessions),
        (10_000, 10_000, 3),
        "{:?}",
        s.notes
    );
    assert!(
        split_note(&s).contains("read by 3 sessions in 12 parts"),
        "{:?}",
        s.notes
    );
    env.src
        .batch_execute(
            "UPDATE items SET qty = -1 WHERE id % 1000 = 0; \
             DELETE FROM items WHERE id BETWEEN 4001 AND 4010; \
             INSERT INTO items SELECT i, 'new', 0 FROM generate_series(20001, 20005) i",
        )
        .await
        .unwrap();
    let s = synced(&env, &spec).await;
    assert_eq!(
        (s.read_strategy.as_str(), s.read_sessions, s.rows_read),
        ("full", 3, 9_995)
    );
    assert_eq!((s.changed, s.added, s.removed, s.deleted), (10, 5, 10, 10));
    assert_eq!(s.written, 15);
}

/// The part that reads the end of the heap is taken second, not last, so the changed rows it
/// holds are written while the rest of the table is read; but the read's key order (which
/// decides whether its rows are sorted on disk) is still judged from the start of the heap.
/// Here half the rows were updated one at a time in random key order, so their new versions
/// fill the end of the heap out of order, and the last part holds only those: the read is not
/// sorted on disk, and every count is exact. The model's `where` condition holds each session
/// back half a second at the first row it meets that was never updated (`qty < 100`), which
/// every part but the heap's end holds: without the wait, the end of the heap would reach the
/// diff first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_the_heap_is_read_early_but_does_not_judge_the_key_order() {
    let (env, mut spec) = seeded(10_000).await;
    env.src
        .batch_execute(
            "CREATE FUNCTION slow_first(q int) RETURNS bool LANGUAGE plpgsql AS $$ BEGIN \
               IF q < 100 AND current_setting('test.slept', true) IS DISTINCT FROM 'yes' THEN \
                 PERFORM set_config('test.slept', 'yes', true); \
                 PERFORM pg_sleep(0.5); \
               END IF; \
               RETURN true; \
             END $$",
        )
        .await
        .unwrap();
    spec.filter = Some("slow_first(qty)".into());
    spec.full_read_every = FullReadEvery::Always;
    let sorted = |s: &Summary| s.notes.iter().any(|n| n.contains("were sorted in"));
    let s = env
        .sync_sorted_in_blocks(&spec, 1_000, 64 << 10, 64 << 10)
        .await
        .unwrap();
    assert_eq!(s.added, 10_000);
    env.src
        .batch_execute(
            "DO $$ DECLARE k int; BEGIN \
               FOR k IN SELECT id FROM items WHERE id % 2 = 0 ORDER BY hashint4(id) LOOP \
                 UPDATE items SET qty = qty + 100 WHERE id = k; \
               END LOOP; \
             END $$; \
             ANALYZE items",
        )
        .await
        .unwrap();
    let s = env
        .sync_sorted_in_blocks(&spec, 1_000, 64 << 10, 64 << 10)
        .await
        .unwrap();
    assert!(
        split_note(&s).contains("read by 3 sessions in 12 parts"),
        "{:?}",
        s.notes
    );
    assert!(!sorted(&s), "{:?}", s.notes);
    assert_eq!(
        (s.rows_read, s.changed, s.unchanged, s.written),
        (10_000, 5_000, 5_000, 5_000),
        "{:?}",
        s.notes
    );
    env.assert_same(
        "SELECT * FROM items ORDER BY id",
        "SELECT * FROM items ORDER BY id",
    )
    .await;
}

/// A full read deletes the rows that left beside the writers still committing: when the
/// delete guard refuses them, the run fails without deleting, and the rows it wrote are
/// recorded all the same (the next run writes none of them again).
#[tokio::test]
async fn a_full_read_refused_by_the_delete_guard_keeps_what_it_wrote() {
    let (env, mut spec) = seeded(2_000).await;
    spec.full_read_every = FullReadEvery::Always;
    synced(&env, &spec).await;
    env.src
        .batch_execute(
            "UPDATE items SET qty = -2 WHERE id % 100 = 0; \
             DELETE FROM items WHERE id > 900",
        )
        .await
        .unwrap();
    let e = env.sync(&spec).await.unwrap_err();
    assert!(matches!(e, pgdelta::Error::DeleteGuard { .. }), "{e}");
    assert!(e.to_string().contains("would delete 1100 of 2000"), "{e}");
    // Nothing deleted; the nine updated rows that remain in the model were written.
    assert_eq!(Env::count(&env.dst, "items").await, 2_000);
    let updated = Env::rows(&env.dst, "SELECT id FROM items WHERE qty = -2 ORDER BY id").await;
    let want: Vec<String> = (1..=9).map(|i| format!("({})", i * 100)).collect();
    assert_eq!(updated, want);
    spec.max_delete_ratio = 0.6;
    let s = synced(&env, &spec).await;
    assert_eq!((s.written, s.changed, s.deleted), (0, 0, 1_100));
}

/// A full read finds the rows that left in the key ranges that lost entries (the diff tallies
/// the keys of the entries it meets per range, against the snapshot's tallies): one named by
/// its range's key sum, a run of them read from their ranges. Rows gone from every part of
/// the table are found by a scan of every entry, as before.
#[tokio::test]
async fn a_full_read_finds_removed_rows_in_the_key_ranges_that_lost_them() {
    let (env, mut spec) = seeded(10_000).await;
    spec.full_read_every = FullReadEvery::Always;
    synced(&env, &spec).await;
    env.src
        .batch_execute(
            "UPDATE items SET qty = -1 WHERE id % 1000 = 0; \
             DELETE FROM items WHERE id = 777 OR id BETWEEN 4001 AND 4100",
        )
        .await
        .unwrap();
    let s = synced(&env, &spec).await;
    assert_eq!(s.read_strategy, "full");
    assert_eq!((s.changed, s.removed, s.deleted), (10, 101, 101));
    let found = note(&s, "found in the key ranges that lost entries");
    assert!(found.contains(", 1 named by"), "{:?}", s.notes);
    assert!(found.contains("100 in the"), "{:?}", s.notes);
    // A third of the rows, from every range: more ranges than a scan of every entry costs.
    let before = Env::count(&env.src, "items").await;
    env.src
        .batch_execute("DELETE FROM items WHERE id % 3 = 0")
        .await
        .unwrap();
    let gone = before - Env::count(&env.src, "items").await;
    let s = synced(&env, &spec).await;
    assert_eq!((s.removed, s.deleted), (gone as u64, gone as u64));
    assert_eq!(note(&s, "key ranges"), "", "{:?}", s.notes);
}

/// Counts per key range already taken beside a split read are compared however many rows
/// left: a tenth of the rows gone as one run of keys (old rows purged by key) empties a few
/// ranges, which are read, where a tenth gone at random would leave most ranges to read (and
/// is not counted for when no count was taken yet).
#[tokio::test]
async fn counts_taken_beside_the_read_find_a_purged_run_of_keys_by_their_ranges() {
    let (env, mut spec) = seeded(10_000).await;
    spec.full_read_every = FullReadEvery::Never;
    synced(&env, &spec).await;
    written(
        &env,
        "DELETE FROM items WHERE id BETWEEN 2001 AND 3000",
        1000,
    )
    .await;
    let s = synced(&env, &spec).await;
    assert!(counted_per_range_beside(&s), "{:?}", s.notes);
    assert_eq!(
        (s.read_strategy.as_str(), s.removed, s.deleted),
        ("delta", 1000, 1000)
    );
    let keys = s.keys_read.unwrap();
    assert!(
        note(&s, "per key range (").contains("instead of every key") && keys < 2_000,
        "{keys} keys read: {:?}",
        s.notes
    );
}

/// The count by key ranges of a delta read scans the heap once more than 0.5% of the rows
/// were written since the last run. After a VACUUM the planner counts through the key's
/// index-only scan (it trusts the visibility it last counted), and the writes since then cost
/// a heap fetch per row on every page they touched. The index's tuple counter tells the plans
/// apart: counted through the index, every key of it is read; otherwise only the key read's few
/// ranges. Beside a split read, the count runs on a session of its own.
#[tokio::test]
async fn the_count_beside_a_delta_read_scans_the_heap_after_writes() {
    let s = delta_counted_by_heap(ReadSessions::Fixed(3), 2).await;
    assert!(counted_per_range_beside(&s), "{:?}", s.notes);
}

/// As above, on one session: the rows are counted before the read, and by key range after it,
/// on the read's session, whose key read that follows still reads through the index.
#[tokio::test]
async fn the_count_after_a_delta_read_scans_the_heap_after_writes() {
    let s = delta_counted_by_heap(ReadSessions::Fixed(1), 3).await;
    assert_eq!(counted_beside(&s), "", "{:?}", s.notes);
    assert!(
        note(&s, "per key range (").contains("by reading the keys of the 1 range "),
        "{:?}",
        s.notes
    );
}

/// Syncs `items` (rows of about 1 KiB, vacuumed) with `sessions`, writes 2% of its rows and
/// deletes four, then syncs again and checks, by the source's scan counters, that the delta
/// made `seq_scans` sequential scans and read few of the key index's tuples.
async fn delta_counted_by_heap(sessions: ReadSessions, seq_scans: i64) -> Summary {
    let (env, mut spec) = seeded(10_000).await;
    spec.read_sessions = sessions;
    // Rows of about 1 KiB: the heap is many times the key's index.
    for sql in [
        "UPDATE items SET name = repeat(md5(id::text), 30)",
        "VACUUM FULL items",
        "ANALYZE items",
    ] {
        env.src.batch_execute(sql).await.unwrap();
    }
    spec.full_read_every = FullReadEvery::Never;
    synced(&env, &spec).await;
    env.src.batch_execute("VACUUM ANALYZE items").await.unwrap();
    // What the server would choose for a count by key ranges, as it stands.
    let plan: Vec<String> = env
        .src
        .query(
            "EXPLAIN SELECT id::int8 >> 5, count(*), sum((id::int8 & 31)::int4) FROM items GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("Index Only Scan")),
        "{plan:?}"
    );
    // 2% of the rows written, deletes among them.
    written(
        &env,
        "UPDATE items SET qty = -1 WHERE id % 50 = 0; \
         DELETE FROM items WHERE id IN (7, 8, 9, 5001)",
        204,
    )
    .await;
    // The scans so far, this session's included (its statistics are flushed when it goes idle
    // after `pg_stat_force_next_flush`, PostgreSQL 15+; a finished session's at its end).
    let scans = |c: &tokio_postgres::Row| (c.get::<_, i64>(0), c.get::<_, i64>(1));
    let stats = "SELECT s.seq_scan, i.idx_tup_read FROM pg_stat_user_tables s \
                 JOIN pg_stat_user_indexes i USING (relid) WHERE s.relname = 'items'";
    let flush = env.src.batch_execute("SELECT pg_stat_force_next_flush()");
    let flushed = flush.await;
    let (seq_before, keys_before) = scans(&env.src.query_one(stats, &[]).await.unwrap());
    // Not `synced`: its comparison reads the source by key, through the index.
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(
        (s.read_strategy.as_str(), s.removed, s.deleted),
        ("delta", 4, 4)
    );
    if let Err(e) = flushed {
        eprintln!("scans not checked: the source cannot flush its statistics on demand: {e}");
    } else {
        // The sessions' statistics are flushed when they end, a moment after the run.
        let read = || async { scans(&env.src.query_one(stats, &[]).await.unwrap()) };
        let seen = crate::support::poll(stats, read, |s| s.0 >= seq_before + seq_scans).await;
        assert!(
            seen.0 >= seq_before + seq_scans && seen.1 - keys_before < 1_000,
            "sequential scans {seq_before} -> {}, index tuples read {keys_before} -> {}",
            seen.0,
            seen.1
        );
    }
    env.assert_same(
        "SELECT * FROM items ORDER BY id",
        "SELECT * FROM items ORDER BY id",
    )
    .await;
    s
}

/// Runs `sql` on the source and waits until the statistics count its `n` writes to `items`
/// (they lag the commit by up to a second), so the run that follows counts beside its read.
async fn written(env: &Env, sql: &str, n: i64) {
    let sum = |(i, u, d): (i64, i64, i64)| i + u + d;
    let before = sum(Env::counters(&env.src, "items").await);
    env.src.batch_execute(sql).await.unwrap();
    Env::wait_counters_on(&env.src, "items", |c| sum(c) >= before + n).await;
}

fn counted_beside(s: &Summary) -> &str {
    note(s, "beside the read, on a session of its own")
}

/// Whether the model's rows were counted per key range beside the read.
fn counted_per_range_beside(s: &Summary) -> bool {
    counted_beside(s).contains("per key range")
}

/// A delta read, on a table whose full reads are split, is one statement on the run's session
/// (the rows per key range counted beside it, on a session of its own); its key read too.
#[tokio::test]
async fn a_delta_read_is_one_statement_with_the_count_beside_it() {
    let (env, mut spec) = seeded(10_000).await;
    spec.full_read_every = FullReadEvery::Never;
    synced(&env, &spec).await;
    written(
        &env,
        "UPDATE items SET qty = -1 WHERE id % 500 = 0; \
         DELETE FROM items WHERE id IN (7, 8, 9, 5001)",
        24,
    )
    .await;
    let s = synced(&env, &spec).await;
    // The statistics count writes: no count before the read; the rows per key range are
    // counted beside it (deletes among the writes).
    assert!(counted_per_range_beside(&s), "{:?}", s.notes);
    assert_eq!(
        (s.read_strategy.as_str(), s.read_sessions, s.rows_read),
        ("delta", 1, 20)
    );
    assert_eq!(split_note(&s), "", "{:?}", s.notes);
    assert_eq!((s.changed, s.removed, s.deleted, s.written), (20, 4, 4, 20));
    // The rows per key range, counted beside the read: 5001 alone left its range and is
    // named by the range's sum; 7, 8 and 9 are found by reading their range.
    assert!(
        s.notes.iter().any(
            |n| n.contains("1 named by") && n.contains("3 by reading the keys of the 1 range ")
        ),
        "{:?}",
        s.notes
    );
    // No change: one counting scan, no COPY, so no helper session is opened.
    let s = synced(&env, &spec).await;
    assert_eq!(
        (s.read_strategy.as_str(), s.read_sessions, s.rows_read),
        ("delta", 1, 0)
    );
    assert_eq!(counted_beside(&s), "");
    // Updates only: the model's rows are counted beside the read, in all (no row left).
    written(&env, "UPDATE items SET qty = -2 WHERE id % 1000 = 0", 10).await;
    let s = synced(&env, &spec).await;
    assert_eq!(
        (s.read_strategy.as_str(), s.rows_read, s.changed, s.removed),
        ("delta", 10, 10, 0)
    );
    let note = counted_beside(&s);
    assert!(
        !note.is_empty() && !note.contains("per key range"),
        "{:?}",
        s.notes
    );
    // An update and a delete the statistics count only as updates (the delete lags: the
    // statistics are a hint): the count beside the read says no more than the model's rows;
    // the removed row is still found, after the read.
    written(&env, "UPDATE items SET qty = -3 WHERE id = 4000", 1).await;
    env.src
        .batch_execute("DELETE FROM items WHERE id = 4001")
        .await
        .unwrap();
    let s = synced(&env, &spec).await;
    assert_eq!(
        (s.read_strategy.as_str(), s.changed, s.removed, s.deleted),
        ("delta", 1, 1, 1),
        "{:?}",
        s.notes
    );
}

/// Rows that enter the model without being written (a `where` condition reading another
/// table), found by the count beside the read: the run reads in full instead, in the same
/// transaction, and the destination ends equal to the model.
#[tokio::test]
async fn rows_entering_unwritten_are_caught_by_the_count_beside_the_read() {
    let (env, mut spec) = seeded(10_000).await;
    env.src
        .batch_execute("CREATE TABLE lim (n int); INSERT INTO lim VALUES (9000)")
        .await
        .unwrap();
    spec.filter = Some("id <= (SELECT n FROM lim)".into());
    spec.full_read_every = FullReadEvery::Never;
    let model = "SELECT * FROM items WHERE id <= (SELECT n FROM lim) ORDER BY id";
    let target = "SELECT * FROM items ORDER BY id";
    env.sync(&spec).await.unwrap();
    env.assert_same(model, target).await;
    env.src
        .batch_execute("UPDATE lim SET n = 9500")
        .await
        .unwrap();
    written(&env, "UPDATE items SET qty = -1 WHERE id % 1000 = 0", 10).await;
    let s = env.sync(&spec).await.unwrap();
    env.assert_same(model, target).await;
    assert!(
        counted_per_range_beside(&s),
        "{:?} {}",
        s.notes,
        s.read_strategy_reason
    );
    assert_eq!(s.read_strategy, "full", "{}", s.read_strategy_reason);
    assert!(
        s.read_strategy_reason
            .contains("rows entered it without being written"),
        "{}",
        s.read_strategy_reason
    );
    assert_eq!((s.added, s.changed), (500, 9));
}

/// Helper sessions open after the run's snapshot was taken (in a delta run, the session that
/// counts beside the read): a helper that did not import the run's snapshot would see rows
/// committed in between. Here the count waits a second (the `where` condition sleeps, during
/// the count only: before the read, or on the session counting beside it), every row is deleted
/// and committed meanwhile, and the delta read must still read the 200 rows updated before the
/// run, spread over the heap (HOT updates keep them on their pages), and the count must still
/// find every row (else the run would delete them).
#[tokio::test]
async fn rows_committed_after_the_run_snapshot_are_neither_read_nor_counted() {
    let (env, mut spec) = seeded(10_000).await;
    env.src
        .batch_execute(
            "ALTER TABLE items SET (fillfactor = 50); \
             CREATE FUNCTION gate(int) RETURNS bool LANGUAGE sql AS \
             'SELECT CASE WHEN $1 = 300 AND current_query() LIKE ''%count(*)%'' \
                          THEN pg_sleep(1) IS NOT NULL ELSE true END'",
        )
        .await
        .unwrap();
    env.src.batch_execute("VACUUM FULL items").await.unwrap();
    spec.filter = Some("gate(id)".into());
    spec.full_read_every = FullReadEvery::Never;
    // The statistics may not yet count the seed when the first run records them.
    spec.delta_max_share = 1.0;
    synced(&env, &spec).await;
    env.src
        .batch_execute("UPDATE items SET qty = 100 WHERE id % 50 = 0")
        .await
        .unwrap();
    let writer = connect(&env.src_url).await;
    let meddle = async {
        let mut sleeping = false;
        for _ in 0..200 {
            let n: i64 = env
                .src
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = 'pgdelta' AND wait_event = 'PgSleep' \
                     AND datname = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                sleeping = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(sleeping, "the run's count never reached its first row");
        writer.batch_execute("DELETE FROM items").await.unwrap();
    };
    let (s, ()) = tokio::join!(env.sync(&spec), meddle);
    let s = s.unwrap();
    assert_eq!(
        (s.read_strategy.as_str(), s.read_sessions),
        ("delta", 1),
        "{}",
        s.read_strategy_reason
    );
    assert_eq!((s.rows_read, s.changed, s.removed), (200, 200, 0));
    assert_eq!(
        Env::count(&env.dst, "items").await,
        10_000,
        "the run missed rows deleted after its snapshot"
    );
    spec.max_delete_ratio = 1.0;
    let s = synced(&env, &spec).await;
    assert_eq!(s.deleted, 10_000);
}

#[tokio::test]
async fn a_partitioned_table_is_split_per_partition() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text) PARTITION BY RANGE (id); \
             CREATE TABLE items_a PARTITION OF items FOR VALUES FROM (0) TO (3000); \
             CREATE TABLE items_b PARTITION OF items FOR VALUES FROM (3000) TO (6000); \
             CREATE TABLE items_c PARTITION OF items FOR VALUES FROM (6000) TO (100000); \
             INSERT INTO items SELECT i, repeat('y', 300) FROM generate_series(1, 9000) i",
        )
        .await
        .unwrap();
    env.dst
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let mut spec = env.spec("items", &["id"]);
    spec.delete = true;
    spec.read_sessions = ReadSessions::Fixed(2);
    spec.full_read_every = FullReadEvery::Always;
    let s = synced(&env, &spec).await;
    assert_eq!((s.rows_read, s.read_sessions), (9_000, 2));
    env.src
        .batch_execute("DELETE FROM items WHERE id % 3000 = 1")
        .await
        .unwrap();
    let s = synced(&env, &spec).await;
    assert_eq!((s.rows_read, s.removed, s.deleted), (8_997, 3, 3));
}

/// One part failing ends the whole read: the error names the sync, and no row is deleted.
#[tokio::test]
async fn a_part_that_fails_fails_the_read_and_deletes_nothing() {
    let (env, mut spec) = seeded(10_000).await;
    spec.full_read_every = FullReadEvery::Always;
    synced(&env, &spec).await;
    env.src
        .batch_execute("DELETE FROM items WHERE id <= 100")
        .await
        .unwrap();
    spec.filter = Some("100 / (id - 9000) <> 1000".into());
    spec.name = "items".into();
    let e = env.sync(&spec).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("division by zero") && msg.contains("'items'"),
        "{msg}"
    );
    assert_eq!(Env::count(&env.dst, "items").await, 10_000);
}

#[tokio::test]
async fn one_session_when_asked_or_when_the_table_cannot_be_split() {
    let (env, mut spec) = seeded(2_000).await;
    spec.read_sessions = ReadSessions::Fixed(1);
    let s = synced(&env, &spec).await;
    assert_eq!((s.read_sessions, split_note(&s)), (1, ""));
    env.both("CREATE VIEW items_v AS SELECT * FROM items").await;
    let mut view = env.spec("items_v", &["id"]);
    view.target = "items".into();
    view.read_sessions = ReadSessions::Fixed(2);
    let s = env.sync(&view).await.unwrap();
    assert_eq!(s.read_sessions, 1);
    assert!(
        s.notes
            .iter()
            .any(|n| n.contains("read by one session: a view")),
        "{:?}",
        s.notes
    );
}

/// Runs shard `i` of `n` of `spec`, with its own state file, as one of several processes would.
async fn shard_run(env: &Env, spec: &SyncSpec, i: u32, n: u32) -> Summary {
    let shard = Shard { index: i, count: n };
    let mut spec = spec.clone();
    spec.name = shard.name(&spec.name);
    spec.shard = Some(shard);
    let snap = Snapshot::open(&env.dir.path().join(format!("shard-{i}.redb")), 8 << 20).unwrap();
    pgdelta::sync::run(
        &ConnInfo::parse(&env.src_url).unwrap(),
        &ConnInfo::parse(&env.dst_url).unwrap(),
        &spec,
        &RunOptions::default(),
        &snap,
    )
    .await
    .unwrap_or_else(|e| panic!("shard {i}/{n}: {e}"))
}

/// All `n` shards at once; returns their summaries.
async fn all_shards(env: &Env, spec: &SyncSpec, n: u32) -> Vec<Summary> {
    let runs = (0..n).map(|i| shard_run(env, spec, i, n));
    let out = futures_util::future::join_all(runs).await;
    env.assert_same(
        "SELECT * FROM items ORDER BY id",
        "SELECT * FROM items ORDER BY id",
    )
    .await;
    out
}

fn total(s: &[Summary], f: impl Fn(&Summary) -> u64) -> u64 {
    s.iter().map(f).sum()
}

/// Three processes sync one table together, each its own share of the keys, its own state and
/// its own deletes; then the shards are re-cut to two, which is noticed: each new shard
/// rebuilds its snapshot from its share of the target and writes nothing that is already there.
#[tokio::test]
async fn shards_sync_one_table_together_and_a_reshard_rewrites_nothing() {
    let (env, mut spec) = seeded(3_000).await;
    spec.read_sessions = ReadSessions::Fixed(1);
    let s = all_shards(&env, &spec, 3).await;
    assert_eq!(total(&s, |s| s.rows_read), 3_000);
    assert_eq!(total(&s, |s| s.written), 3_000);
    assert!(s.iter().all(|s| s.rows_read > 700), "uneven shards");
    assert_eq!(s[1].sync, "items#1/3");
    env.src
        .batch_execute(
            "UPDATE items SET qty = -1 WHERE id % 100 = 0; \
             DELETE FROM items WHERE id % 250 = 1; \
             INSERT INTO items SELECT i, 'new', 0 FROM generate_series(5001, 5030) i",
        )
        .await
        .unwrap();
    let s = all_shards(&env, &spec, 3).await;
    assert_eq!(total(&s, |s| s.changed), 30);
    assert_eq!(total(&s, |s| s.added), 30);
    assert_eq!(total(&s, |s| s.deleted), 12);
    // Re-cut into two shards; shard files 0 and 1 are reused, as a re-sized Job would.
    let s = all_shards(&env, &spec, 2).await;
    assert_eq!(total(&s, |s| s.written + s.deleted), 0);
    assert_eq!(total(&s, |s| s.rebuilt_from_target), 3_018);
    assert!(
        s.iter().all(|s| s
            .notes
            .iter()
            .any(|n| n.contains("re-shard: this state file synced 'items' as shard(s)"))),
        "{:?}",
        s[0].notes
    );
    env.src
        .batch_execute("DELETE FROM items WHERE id <= 10")
        .await
        .unwrap();
    let s = all_shards(&env, &spec, 2).await;
    // Ids 2..=10: id 1 was deleted above.
    assert_eq!(total(&s, |s| s.deleted), 9);
}

/// A query model (a join) split by value ranges of a column (`split_by`), cut at its table's
/// histogram bounds: every row once (NULLs in the first part), deletes derived from the
/// complete read, and errors that say what to split by instead.
#[tokio::test]
async fn a_query_model_splits_by_value_ranges_of_its_split_by_column() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "CREATE TABLE customers (id int PRIMARY KEY, name text);
             INSERT INTO customers SELECT i, 'customer ' || i FROM generate_series(1, 100) i;
             CREATE TABLE orders (id bigint PRIMARY KEY, customer int, amount numeric, placed date);
             INSERT INTO orders SELECT i, 1 + i % 100, i / 100.0,
                    CASE WHEN i % 50 = 0 THEN NULL ELSE date '2024-01-01' + (i % 700) END
               FROM generate_series(1, 30000) i;
             ANALYZE customers, orders;",
        )
        .await
        .unwrap();
    env.dst
        .batch_execute(
            "CREATE TABLE orders_wide (id bigint PRIMARY KEY, amount numeric, placed date, name text)",
        )
        .await
        .unwrap();
    let mut spec = env.spec("orders_wide", &["id"]);
    spec.model = Model::Query(
        "SELECT o.id, o.amount, o.placed, c.name FROM orders o JOIN customers c ON c.id = o.customer"
            .into(),
    );
    spec.delete = true;
    spec.split_by = Some("placed".into());
    spec.read_sessions = ReadSessions::Fixed(3);
    let same = || {
        env.assert_same(
            "SELECT o.id, o.amount, o.placed, c.name FROM orders o JOIN customers c ON c.id = o.customer ORDER BY 1",
            "SELECT * FROM orders_wide ORDER BY id",
        )
    };
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(
        (s.rows_read, s.added, s.read_sessions),
        (30_000, 30_000, 3),
        "{:?}",
        s.notes
    );
    // No index leads with `placed`: split as read_sessions asks, and the note says what it costs.
    assert_eq!(
        split_note(&s),
        "the query (split by placed) is read by 3 sessions in 12 parts under one snapshot, as read_sessions asks, though no index leads with orders.placed: each part scans all of orders",
    );
    same().await;
    env.src
        .batch_execute(
            "UPDATE orders SET amount = -amount WHERE id % 97 = 0;
             UPDATE orders SET placed = NULL WHERE id % 89 = 0;
             DELETE FROM orders WHERE id % 101 = 0;
             UPDATE customers SET name = 'renamed' WHERE id = 7;",
        )
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    let gone: i64 = env
        .src
        .query_one(
            "SELECT count(*) FROM generate_series(1, 30000) i WHERE i % 101 = 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!((s.read_sessions, s.removed), (3, gone as u64));
    assert_eq!(s.rows_read, 30_000 - gone as u64);
    same().await;
    // With an index on it, each part reads its range: no caveat.
    env.src
        .batch_execute("CREATE INDEX ON orders (placed); UPDATE orders SET amount = 0 WHERE id = 5")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.read_sessions, s.changed), (3, 1));
    assert_eq!(
        split_note(&s),
        "the query (split by placed) is read by 3 sessions in 12 parts under one snapshot"
    );
    same().await;
    // Nor for a table partitioned by the column (its index leads with another column).
    env.src
        .batch_execute(
            "CREATE TABLE events (id bigint, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
             CREATE TABLE events_a PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2024-07-01');
             CREATE TABLE events_b PARTITION OF events FOR VALUES FROM ('2024-07-01') TO ('2025-01-01');
             INSERT INTO events SELECT i, date '2024-01-01' + (i % 360) FROM generate_series(1, 3000) i;
             ANALYZE events;",
        )
        .await
        .unwrap();
    env.dst
        .batch_execute("CREATE TABLE events (id bigint PRIMARY KEY, at date)")
        .await
        .unwrap();
    let mut events = env.spec("events", &["id"]);
    events.model = Model::Query("SELECT id, at FROM events".into());
    events.split_by = Some("at".into());
    events.read_sessions = ReadSessions::Fixed(2);
    let s = env.sync(&events).await.unwrap();
    assert_eq!((s.read_sessions, s.written), (2, 3000));
    assert_eq!(
        split_note(&s),
        "the query (split by at) is read by 2 sessions in 8 parts under one snapshot"
    );
    env.assert_same(
        "SELECT id, at FROM events ORDER BY id",
        "SELECT id, at FROM events ORDER BY id",
    )
    .await;

    // What split_by cannot use, said plainly.
    for (col, want) in [
        ("nope", "is not a column of the query"),
        ("name", "is of type text"),
    ] {
        spec.split_by = Some(col.into());
        let e = env.sync(&spec).await.unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    spec.model = Model::Query("SELECT o.id, o.amount, o.placed + 1 AS placed, c.name FROM orders o JOIN customers c ON c.id = o.customer".into());
    spec.split_by = Some("placed".into());
    let e = env.sync(&spec).await.unwrap_err().to_string();
    assert!(e.contains("is computed by the query"), "{e}");

    // A column without statistics: one session, and the note says to ANALYZE.
    env.both("CREATE TABLE fresh (id bigint PRIMARY KEY, v int)")
        .await;
    env.src
        .batch_execute("INSERT INTO fresh SELECT i, i FROM generate_series(1, 1000) i")
        .await
        .unwrap();
    let mut fresh = env.spec("fresh", &["id"]);
    fresh.model = Model::Query("SELECT id, v FROM fresh".into());
    fresh.split_by = Some("id".into());
    fresh.read_sessions = ReadSessions::Fixed(2);
    let s = env.sync(&fresh).await.unwrap();
    assert_eq!((s.read_sessions, s.written), (1, 1000));
    assert!(
        s.notes
            .iter()
            .any(|n| n.contains("fresh.id has no statistics") && n.contains("(ANALYZE fresh)")),
        "{:?}",
        s.notes
    );
}
