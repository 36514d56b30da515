//! Change-aware reads of table models: only rows written since the last run are read, every
//! change (deletes included) still reaches the destination, and whatever could hide a change
//! falls back to the full read with its reason. Real concurrent transactions on a real server.

use pgdelta::spec::{FullReadEvery, SyncSpec};
use pgdelta::sync::{RunOptions, Summary};

use crate::support::{connect, flush_stats, Env};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int)";

async fn seeded(rows: i32) -> (Env, SyncSpec) {
    let env = Env::new().await;
    env.both(ITEMS).await;
    env.src
        .batch_execute(&format!(
            "INSERT INTO items SELECT i, 'item ' || i, i % 7 FROM generate_series(1, {rows}) i"
        ))
        .await
        .unwrap();
    let mut spec = env.spec("items", &["id"]);
    spec.delete = true;
    spec.full_read_every = FullReadEvery::Never;
    (env, spec)
}

/// Runs a sync, checks how it read, and that the destination equals the source.
async fn synced(env: &Env, spec: &SyncSpec, strategy: &str, reason: &str) -> Summary {
    let s = env.sync(spec).await.unwrap();
    assert_eq!(
        (
            s.read_strategy.as_str(),
            s.read_strategy_reason.contains(reason)
        ),
        (strategy, true),
        "read: {} ({})",
        s.read_strategy,
        s.read_strategy_reason
    );
    env.assert_same(
        "SELECT * FROM items ORDER BY id",
        "SELECT * FROM items ORDER BY id",
    )
    .await;
    s
}

#[tokio::test]
async fn a_delta_reads_only_what_was_written_and_still_deletes() {
    let (env, spec) = seeded(2000).await;
    let s = synced(&env, &spec, "full", "no completed read").await;
    assert_eq!((s.rows_read, s.written), (2000, 2000));
    let s = synced(&env, &spec, "delta", "only rows written").await;
    assert_eq!((s.rows_read, s.written, s.removed), (0, 0, 0));
    env.src
        .batch_execute(
            "UPDATE items SET name = 'changed' WHERE id IN (5, 6, 7); \
             UPDATE items SET name = name WHERE id = 8; \
             INSERT INTO items VALUES (3001, 'new', 1), (3002, 'new', 2); \
             DELETE FROM items WHERE id IN (10, 11)",
        )
        .await
        .unwrap();
    let s = synced(&env, &spec, "delta", "only rows written").await;
    // Rows 5-8 and the two new ones are read; row 8 was rewritten with the same values.
    assert_eq!((s.rows_read, s.changed, s.unchanged, s.added), (6, 3, 1, 2));
    assert_eq!((s.written, s.removed, s.deleted), (5, 2, 2));
    let s = synced(&env, &spec, "delta", "").await;
    assert_eq!((s.rows_read, s.written), (0, 0));
}

#[tokio::test]
async fn transactions_open_during_a_run_savepoints_and_aborts() {
    let (env, spec) = seeded(500).await;
    synced(&env, &spec, "full", "").await;
    // A transaction that writes (and has its xid) before the run and commits after it.
    let open = connect(&env.src_url).await;
    open.batch_execute(
        "BEGIN; UPDATE items SET name = 'slow' WHERE id = 1; \
         SAVEPOINT a; INSERT INTO items VALUES (9001, 'sub', 0); RELEASE a; \
         SAVEPOINT b; INSERT INTO items VALUES (9002, 'rolled back', 0); ROLLBACK TO b",
    )
    .await
    .unwrap();
    env.src
        .batch_execute("BEGIN; UPDATE items SET name = 'aborted' WHERE id = 2; ROLLBACK")
        .await
        .unwrap();
    env.src
        .batch_execute("UPDATE items SET name = 'quick' WHERE id = 3")
        .await
        .unwrap();
    let s = synced(&env, &spec, "delta", "").await;
    assert_eq!(s.written, 1, "only the committed update");
    // A subtransaction of a transaction that began after the run, committed too.
    open.batch_execute("COMMIT").await.unwrap();
    let s = synced(&env, &spec, "delta", "").await;
    assert_eq!((s.added, s.changed), (1, 1));
    let n: i64 = env
        .dst
        .query_one("SELECT count(*) FROM items WHERE id IN (9001, 9002)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn hot_updates_and_freezing_are_seen_and_cost_nothing() {
    let (env, spec) = seeded(1000).await;
    synced(&env, &spec, "full", "").await;
    env.src
        .batch_execute("UPDATE items SET qty = qty + 100 WHERE id <= 3")
        .await
        .unwrap();
    env.src
        .batch_execute("VACUUM (FREEZE) items")
        .await
        .unwrap();
    // Freezing keeps the raw xmin: the three rows are still read, nothing else is.
    let s = synced(&env, &spec, "delta", "").await;
    assert_eq!((s.rows_read, s.changed), (3, 3));
    env.src
        .batch_execute("VACUUM (FREEZE) items")
        .await
        .unwrap();
    let s = synced(&env, &spec, "delta", "").await;
    assert_eq!(s.rows_read, 0);
}

#[tokio::test]
async fn rewritten_truncated_or_recreated_tables_are_read_in_full() {
    let (env, spec) = seeded(300).await;
    synced(&env, &spec, "full", "").await;
    let cases = [
        "VACUUM FULL items",
        "CLUSTER items USING items_pkey",
        "ALTER TABLE items SET UNLOGGED",
        "BEGIN; TRUNCATE items; INSERT INTO items SELECT i, 'reloaded ' || i, i FROM generate_series(1, 250) i; COMMIT",
        "DROP TABLE items; CREATE TABLE items (id int PRIMARY KEY, name text, qty int); \
         INSERT INTO items SELECT i, 'recreated ' || i, i FROM generate_series(1, 200) i",
    ];
    for sql in cases {
        env.src.batch_execute(sql).await.unwrap();
        eprintln!("after {sql}");
        let s = synced(&env, &spec, "full", "storage changed").await;
        assert!(s.rows_read > 0, "{sql}");
        synced(&env, &spec, "delta", "").await;
    }
}

#[tokio::test]
async fn partitions_attached_or_detached_are_read_in_full() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text, qty int) PARTITION BY RANGE (id); \
             CREATE TABLE items_a PARTITION OF items FOR VALUES FROM (0) TO (1000); \
             CREATE TABLE items_b PARTITION OF items FOR VALUES FROM (1000) TO (2000); \
             INSERT INTO items SELECT i, 'p', i FROM generate_series(1, 1999) i; \
             CREATE TABLE items_c (id int PRIMARY KEY, name text, qty int); \
             INSERT INTO items_c SELECT i, 'c', i FROM generate_series(2000, 2099) i",
        )
        .await
        .unwrap();
    env.dst.batch_execute(ITEMS).await.unwrap();
    let mut spec = env.spec("items", &["id"]);
    spec.delete = true;
    spec.max_delete_ratio = 1.0;
    synced(&env, &spec, "full", "").await;
    env.src
        .batch_execute("UPDATE items SET name = 'b' WHERE id = 1500")
        .await
        .unwrap();
    let s = synced(&env, &spec, "delta", "").await;
    assert_eq!(s.changed, 1);
    env.src
        .batch_execute(
            "ALTER TABLE items ATTACH PARTITION items_c FOR VALUES FROM (2000) TO (3000)",
        )
        .await
        .unwrap();
    let s = synced(&env, &spec, "full", "partitions attached or detached").await;
    assert_eq!(s.added, 100);
    env.src
        .batch_execute("ALTER TABLE items DETACH PARTITION items_a")
        .await
        .unwrap();
    let s = synced(&env, &spec, "full", "storage changed").await;
    assert_eq!(s.deleted, 999);
}

#[tokio::test]
async fn rows_moving_in_and_out_of_a_where_filter() {
    let (env, mut spec) = seeded(100).await;
    spec.filter = Some("qty < 5".into());
    let model = "SELECT * FROM items WHERE qty < 5 ORDER BY id";
    let s = env.sync(&spec).await.unwrap();
    env.assert_same(model, "SELECT * FROM items ORDER BY id")
        .await;
    assert_eq!(s.read_strategy, "full");
    env.src
        .batch_execute(
            "UPDATE items SET qty = 6 WHERE id = 1; UPDATE items SET qty = 0 WHERE id = 6",
        )
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    env.assert_same(model, "SELECT * FROM items ORDER BY id")
        .await;
    assert_eq!(s.read_strategy, "delta", "{}", s.read_strategy_reason);
    assert_eq!((s.added, s.deleted), (1, 1));
}

/// A `where` condition that reads another table lets rows enter the model without being
/// written: the delta path notices (more rows than it can account for) and reads in full, and
/// the periodic full read names the rows a delta would have missed.
#[tokio::test]
async fn a_full_read_names_changes_a_delta_would_have_missed() {
    let (env, mut spec) = seeded(100).await;
    env.src
        .batch_execute(
            "CREATE TABLE allowed (id int PRIMARY KEY); \
             INSERT INTO allowed SELECT generate_series(1, 50)",
        )
        .await
        .unwrap();
    spec.filter = Some("id IN (SELECT id FROM allowed)".into());
    let model = "SELECT * FROM items WHERE id IN (SELECT id FROM allowed) ORDER BY id";
    let mut periodic = spec.clone();
    periodic.full_read_every = FullReadEvery::Runs(0);
    let missed = |s: &Summary| {
        s.notes
            .iter()
            .find(|n| n.contains("would have missed"))
            .cloned()
    };
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.read_strategy.as_str(), s.added), ("full", 50));
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.read_strategy.as_str(), s.rows_read), ("delta", 0));
    // Rows 60 and 61 join the model; nothing of theirs was written.
    env.src
        .batch_execute(
            "INSERT INTO allowed VALUES (60), (61); UPDATE items SET qty = 9 WHERE id = 3",
        )
        .await
        .unwrap();
    let s = env.sync(&periodic).await.unwrap();
    env.assert_same(model, "SELECT * FROM items ORDER BY id")
        .await;
    assert_eq!(
        (s.read_strategy.as_str(), s.added, s.changed),
        ("full", 2, 1)
    );
    assert!(
        s.read_strategy_reason.contains("periodic"),
        "{}",
        s.read_strategy_reason
    );
    let note = missed(&s).expect("a warning about the missed rows");
    assert!(note.contains("missed 2 changes"), "{note}");
    assert!(note.contains("60") && note.contains("61"), "{note}");
    // A full read that finds only written rows says nothing.
    env.src
        .batch_execute("UPDATE items SET qty = 8 WHERE id = 4")
        .await
        .unwrap();
    let s = env.sync(&periodic).await.unwrap();
    assert_eq!(
        (s.read_strategy.as_str(), s.changed, missed(&s)),
        ("full", 1, None)
    );
    // The delta path cannot account for a row that entered unwritten: it reads in full.
    env.src
        .batch_execute("INSERT INTO allowed VALUES (62)")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    env.assert_same(model, "SELECT * FROM items ORDER BY id")
        .await;
    assert_eq!((s.read_strategy.as_str(), s.added), ("full", 1));
    assert!(
        s.read_strategy_reason.contains("without being written"),
        "{}",
        s.read_strategy_reason
    );
}

#[tokio::test]
async fn rejected_rows_are_retried_by_key_although_unchanged() {
    let (env, spec) = seeded(200).await;
    env.dst
        .batch_execute("ALTER TABLE items ADD CONSTRAINT no_seven CHECK (id <> 7)")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.rejected, 1);
    // The row did not change on the source; the destination accepts it now.
    env.dst
        .batch_execute("ALTER TABLE items DROP CONSTRAINT no_seven")
        .await
        .unwrap();
    let s = synced(&env, &spec, "delta", "").await;
    assert_eq!((s.rows_read, s.added, s.rejected), (1, 1, 0));
    let s = synced(&env, &spec, "delta", "").await;
    assert_eq!(s.rows_read, 0);
}

/// Keys spread far apart make key ranges wider than 2^30 values, whose offsets are summed as
/// `int8` (a `numeric` sum on the server) rather than `int4`: removed rows are still named by
/// their range's sums, or read by key where a range lost two.
#[tokio::test]
async fn removed_rows_are_found_from_counts_per_key_range_with_far_apart_keys() {
    let env = Env::new().await;
    env.both("CREATE TABLE items (id bigint PRIMARY KEY, name text)")
        .await;
    // 4000 keys 2^40 apart (and counted by ANALYZE): ranges of 2^45 values, 32 rows each.
    env.src
        .batch_execute(
            "INSERT INTO items SELECT i * 1099511627776, 'item ' || i FROM generate_series(-2000, 1999) i; \
             ANALYZE items",
        )
        .await
        .unwrap();
    let mut spec = env.spec("items", &["id"]);
    spec.delete = true;
    spec.full_read_every = FullReadEvery::Never;
    synced(&env, &spec, "full", "").await;
    env.src
        .batch_execute(
            "DELETE FROM items WHERE id IN (-2000 * 1099511627776::int8, 7 * 1099511627776::int8, \
             8 * 1099511627776::int8, 1999 * 1099511627776::int8)",
        )
        .await
        .unwrap();
    let s = synced(&env, &spec, "delta", "").await;
    assert_eq!((s.removed, s.deleted), (4, 4));
    // The ranges of the first and last keys lost one row each, named by their sums; the
    // range of 7 and 8 lost two, and its keys are read. Not the 3,996 keys.
    let keys = s.keys_read.unwrap();
    assert!(keys < 100, "{keys} keys read");
    assert!(
        s.notes
            .iter()
            .any(|n| n.contains("(35184372088832 values each), 2 named by")),
        "{:?}",
        s.notes
    );
}

/// Rows that left the model are found from counts per key range: only the keys of the ranges
/// that lost rows are read. Smallint, integer and bigint keys, negative and far-apart ones; an
/// insert and a delete in the same range; a new row the destination rejects (it has no entry,
/// and is read again every run) next to a removed one.
#[tokio::test]
async fn removed_rows_are_found_from_counts_per_key_range() {
    for (ty, far) in [
        ("smallint", "30000"),
        ("int", "2000000000"),
        ("bigint", "1099511627776"),
    ] {
        let env = Env::new().await;
        env.both(&format!(
            "CREATE TABLE items (id {ty} PRIMARY KEY, name text, qty int)"
        ))
        .await;
        env.dst
            .batch_execute("ALTER TABLE items ADD CONSTRAINT no_refused CHECK (name <> 'refused')")
            .await
            .unwrap();
        env.src
            .batch_execute(&format!(
                "INSERT INTO items SELECT i, 'item ' || i, i % 7 FROM generate_series(-3000, 3000) i; \
                 INSERT INTO items VALUES ({far}, 'far', 1), (-{far}, 'far', 1)"
            ))
            .await
            .unwrap();
        let mut spec = env.spec("items", &["id"]);
        spec.delete = true;
        spec.full_read_every = FullReadEvery::Never;
        let accepted = "SELECT * FROM items WHERE name <> 'refused' ORDER BY id";
        let target = "SELECT * FROM items ORDER BY id";
        synced(&env, &spec, "full", "").await;
        // Nothing changed: the counts are cut to the keys (this run's start), nothing is read.
        let s = synced(&env, &spec, "delta", "").await;
        assert_eq!((s.rows_read, s.keys_read), (0, None), "{ty}");
        env.src
            .batch_execute(&format!(
                "DELETE FROM items WHERE id IN (-2999, 5, 6, 2500, 3000, {far}); \
                 INSERT INTO items VALUES (3001, 'new', 1), (3006, 'refused', 1)"
            ))
            .await
            .unwrap();
        let s = env.sync(&spec).await.unwrap();
        env.assert_same(accepted, target).await;
        assert_eq!(s.read_strategy, "delta", "{ty}: {}", s.read_strategy_reason);
        assert_eq!(
            (s.added, s.removed, s.deleted, s.rejected),
            (2, 6, 6, 1),
            "{ty}"
        );
        // Ranges of 32 keys: four lost one row each, named by their sums and checked by key
        // (-2999, 2500, 3000 next to the new 3001, the far one); one lost 5 and 6, and its
        // keys are read. Not the 6,000 keys.
        let keys = s.keys_read.unwrap();
        assert!(keys < 100, "{ty}: {keys} keys read");
        assert!(
            s.notes
                .iter()
                .any(|n| n.contains("per key range") && n.contains("4 named by")),
            "{ty}: {:?}",
            s.notes
        );
        // The refused row is read again (an added row with no entry) in the range that loses 3001.
        env.src
            .batch_execute("DELETE FROM items WHERE id = 3001")
            .await
            .unwrap();
        let s = env.sync(&spec).await.unwrap();
        env.assert_same(accepted, target).await;
        assert_eq!(
            (s.added, s.removed, s.deleted, s.rejected),
            (1, 1, 1, 1),
            "{ty}"
        );
        // 3001 is named by its range's sum and checked by key: the source returns no key.
        assert_eq!(s.keys_read, Some(0), "{ty}: {:?}", s.notes);
    }
}

/// Whether the counts per key range are taken is decided from how many rows left: 1% gone at
/// random (as a 10% churn deletes) leaves few ranges that lost two rows or more, so they are
/// counted and only those are read; 6% gone leaves most ranges to read, so every key is read.
#[tokio::test]
async fn one_percent_gone_is_found_by_key_ranges_six_percent_by_every_key() {
    let (env, spec) = seeded(20_000).await;
    synced(&env, &spec, "full", "").await;
    let mut left = 20_000;
    for (cut, by_ranges) in [(10, true), (61, false)] {
        let gone = env
            .src
            .execute(
                &format!("DELETE FROM items WHERE (hashint4(id * 3 + {cut}) & 1023) < {cut}"),
                &[],
            )
            .await
            .unwrap();
        left -= gone;
        let s = synced(&env, &spec, "delta", "").await;
        assert_eq!((s.removed, s.deleted), (gone, gone), "{cut}");
        let keys = s.keys_read.unwrap();
        let ranged = s.notes.iter().any(|n| n.contains("per key range ("));
        assert_eq!(ranged, by_ranges, "{cut}: {keys} keys read, {:?}", s.notes);
        match by_ranges {
            // About 4% of 625 ranges lost two rows or more: their keys, and the named ones.
            true => assert!(gone > 150 && keys < 2_000, "{gone} gone, {keys} keys read"),
            false => assert_eq!(keys, left),
        }
    }
}

/// Rows that left the model are deleted through as many destination sessions as the sync has
/// writers, each deleting a share of the keys.
#[tokio::test]
async fn removed_rows_are_deleted_by_every_writer_session() {
    let (env, spec) = seeded(20_000).await;
    synced(&env, &spec, "full", "").await;
    // Each delete statement on the destination logs its session and its rows.
    env.dst
        .batch_execute(
            "CREATE TABLE deletes_log (pid int, n bigint); \
             CREATE FUNCTION log_deletes() RETURNS trigger LANGUAGE plpgsql AS $$ \
               BEGIN INSERT INTO deletes_log SELECT pg_backend_pid(), count(*) FROM old_rows; \
               RETURN NULL; END $$; \
             CREATE TRIGGER log_deletes AFTER DELETE ON items REFERENCING OLD TABLE AS old_rows \
               FOR EACH STATEMENT EXECUTE FUNCTION log_deletes()",
        )
        .await
        .unwrap();
    // Every range of keys loses rows: every key is read, and 2,500 rows are deleted.
    let gone = env
        .src
        .execute("DELETE FROM items WHERE id % 8 = 0", &[])
        .await
        .unwrap();
    let s = synced(&env, &spec, "delta", "").await;
    assert_eq!((s.removed, s.deleted, gone), (2500, 2500, 2500));
    // Two sessions (the default writers), 1,250 rows each.
    let per_session = Env::rows(
        &env.dst,
        "SELECT sum(n) FROM deletes_log GROUP BY pid ORDER BY 1",
    )
    .await;
    assert_eq!(per_session, ["(1250)", "(1250)"]);
}

/// The keys a delta names by their range's key sums are deleted once the key read has checked
/// them on the source; meanwhile the destination finds their rows, so the delete that follows
/// finds its pages in the server's buffers. Seen in the destination's statistics (every scan
/// through the key's index): each row deleted is fetched twice when it was named, once when
/// its range's keys were read.
#[tokio::test]
async fn rows_named_by_their_range_are_found_on_the_destination_before_the_check_ends() {
    let (env, spec) = seeded(20_000).await;
    synced(&env, &spec, "full", "").await;
    env.dst
        .batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET enable_seqscan = off', current_database()); \
             EXECUTE format('ALTER DATABASE %I SET enable_bitmapscan = off', current_database()); END $$",
        )
        .await
        .unwrap();
    let fetched = "SELECT idx_tup_fetch FROM pg_stat_user_tables WHERE relname = 'items'";
    flush_stats(&env.dst).await;
    let before = Env::wait_value_on(&env.dst, fetched, |_| true).await;
    // About 1% of the rows, at random: most ranges that lose one lose only that one.
    let gone = env
        .src
        .execute(
            "DELETE FROM items WHERE (hashint4(id * 3 + 10) & 1023) < 10",
            &[],
        )
        .await
        .unwrap();
    // Not `synced`: its comparison reads the destination by key, through the index.
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(
        (s.read_strategy.as_str(), s.removed, s.deleted),
        ("delta", gone, gone)
    );
    let note = s
        .notes
        .iter()
        .find(|n| n.contains("named by their range's key sums"))
        .unwrap_or_else(|| panic!("{:?}", s.notes));
    let named: u64 = note
        .split(" named by")
        .next()
        .and_then(|h| h.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{note}"));
    assert!(named > gone / 2, "{note}");
    // And one row more: the run's check whether the target is empty (`NOT EXISTS`).
    let want = before + (gone + named) as i64 + 1;
    let seen = Env::wait_value_on(&env.dst, fetched, |v| v >= want).await;
    assert_eq!(
        seen, want,
        "rows fetched through the index: {before} before the run"
    );
    env.assert_same(
        "SELECT * FROM items ORDER BY id",
        "SELECT * FROM items ORDER BY id",
    )
    .await;
}

#[tokio::test]
async fn a_large_delta_a_flag_a_period_and_a_query_read_in_full() {
    let (env, mut spec) = seeded(400).await;
    synced(&env, &spec, "full", "").await;
    env.src
        .batch_execute("UPDATE items SET qty = qty + 1 WHERE id <= 300")
        .await
        .unwrap();
    let s = synced(&env, &spec, "full", "delta_max_share").await;
    assert_eq!(s.changed, 300);
    let forced = RunOptions {
        full_read: true,
        ..Default::default()
    };
    let s = env.sync_opts(&spec, &forced).await.unwrap();
    assert_eq!((s.read_strategy.as_str(), s.written), ("full", 0));
    spec.full_read_every = FullReadEvery::Runs(2);
    synced(&env, &spec, "delta", "").await;
    synced(&env, &spec, "delta", "").await;
    synced(&env, &spec, "full", "2 delta runs").await;
    synced(&env, &spec, "delta", "").await;
    let mut query = env.spec("items", &["id"]);
    query.model = pgdelta::spec::Model::Query("SELECT * FROM items".into());
    query.name = "items_query".into();
    synced(&env, &query, "full", "query model").await;
    synced(&env, &query, "full", "query model").await;
}

#[tokio::test]
async fn a_source_key_without_a_unique_index_reads_the_keys_every_run() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "CREATE TABLE items (id int, name text, qty int); \
             INSERT INTO items SELECT i, 'x', i FROM generate_series(1, 300) i",
        )
        .await
        .unwrap();
    env.dst.batch_execute(ITEMS).await.unwrap();
    let mut spec = env.spec("items", &["id"]);
    spec.delete = true;
    synced(&env, &spec, "full", "").await;
    env.src
        .batch_execute("DELETE FROM items WHERE id = 4; INSERT INTO items VALUES (301, 'y', 1)")
        .await
        .unwrap();
    let s = synced(&env, &spec, "delta", "").await;
    assert_eq!((s.added, s.deleted), (1, 1));
}

/// Random writers, transactions left open across runs, aborts, savepoints, freezes, rewrites
/// and truncates, with a run after each step: the destination always equals what the run's
/// snapshot saw (open transactions are invisible to both sides until they commit).
#[tokio::test]
async fn random_interleavings_keep_the_destination_equal_to_the_source() {
    let (env, spec) = seeded(300).await;
    let mut spec = spec;
    spec.max_delete_ratio = 1.0;
    let open = connect(&env.src_url).await;
    let mut open_tx = false;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut strategies = std::collections::BTreeMap::new();
    for step in 0..40 {
        let id = next(400) as i32 + 1;
        let sql = match next(10) {
            0..=2 => format!(
                "INSERT INTO items SELECT i, 'ins {step}', i % 9 FROM generate_series({id}, {id} + 5) i ON CONFLICT (id) DO UPDATE SET name = excluded.name"
            ),
            3 => format!("UPDATE items SET qty = qty + 1 WHERE id % 17 = {}", id % 17),
            4 => format!("DELETE FROM items WHERE id BETWEEN {id} AND {id} + 3"),
            5 => format!(
                "BEGIN; SAVEPOINT s; UPDATE items SET name = 'sp {step}' WHERE id = {id}; ROLLBACK TO s; \
                 UPDATE items SET name = 'kept {step}' WHERE id = {id} + 1; COMMIT"
            ),
            6 => format!("BEGIN; DELETE FROM items WHERE id < {id}; ROLLBACK"),
            7 => ["VACUUM (FREEZE) items", "VACUUM FULL items", "VACUUM items"][next(3) as usize]
                .to_string(),
            8 if next(4) == 0 => {
                "BEGIN; TRUNCATE items; INSERT INTO items SELECT i, 'reload', i FROM generate_series(1, 250) i; COMMIT".into()
            }
            _ => {
                // Open or close the long transaction.
                if open_tx {
                    open.batch_execute("COMMIT").await.unwrap();
                } else {
                    open.batch_execute(&format!(
                        "BEGIN; INSERT INTO items VALUES ({}, 'long {step}', 1) ON CONFLICT (id) DO UPDATE SET name = 'long {step}'",
                        1000 + step
                    ))
                    .await
                    .unwrap();
                }
                open_tx = !open_tx;
                String::new()
            }
        };
        if !sql.is_empty() {
            env.src.batch_execute(&sql).await.unwrap();
        }
        let s = env.sync(&spec).await.unwrap();
        *strategies.entry(s.read_strategy.clone()).or_insert(0) += 1;
        env.assert_same(
            "SELECT * FROM items ORDER BY id",
            "SELECT * FROM items ORDER BY id",
        )
        .await;
    }
    if open_tx {
        open.batch_execute("COMMIT").await.unwrap();
        synced(&env, &spec, "delta", "").await;
    }
    assert!(
        strategies.get("delta").copied().unwrap_or(0) >= 15,
        "{strategies:?}"
    );
}

/// Transaction ids wrap around 2^32: a server set just below the wrap (`pg_resetwal -x`), rows
/// written before and after it, runs on both sides of it. The recorded 64-bit ids and the
/// 32-bit `xmin` window still select exactly the rows written since the last run, whether the
/// window is matched as a list of ids (short windows) or compared as numbers (long ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_reads_across_the_transaction_id_wraparound() {
    use pgdelta::tools::pgserver::{Durability, TempPostgres};

    use crate::support::{assert_rows_equal, create_src_dst, summary, sync_t_between, t_on};

    let mut pg = TempPostgres::start(Durability::Fast).unwrap();
    create_src_dst(&pg).await;
    // 3,000 ids below the wrap.
    pg.set_next_xid(u32::MAX - 3000).unwrap();
    let (src, dst) = t_on(&pg, 1000).await;
    let current = |sql: &'static str| {
        let src = &src;
        async move { src.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let next = current("SELECT pg_current_xact_id()::text::int8").await;
    assert!(next < 1 << 32, "not yet wrapped: {next}");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.redb");
    let run = || {
        let out = sync_t_between(
            dir.path(),
            &pg.url("src"),
            &pg.url("dst"),
            &state,
            &["--delete", "--json"],
        )
        .output()
        .unwrap();
        summary(out)
    };
    /// (read strategy, rows read, written, deleted) of a run's summary.
    fn outcome(s: &serde_json::Value) -> (&str, Option<i64>, Option<i64>, Option<i64>) {
        let n = |k: &str| s[k].as_i64();
        let strategy = s["read_strategy"].as_str().unwrap_or("");
        (strategy, n("rows_read"), n("written"), n("deleted"))
    }
    let check = || async {
        let a = Env::rows(&src, "SELECT * FROM t ORDER BY id").await;
        let b = Env::rows(&dst, "SELECT * FROM t ORDER BY id").await;
        assert_rows_equal(&a, &b);
    };
    // The test session's table statistics reach the server at most once a second: flushed
    // before each run, so no run counts this session's earlier writes as written since it
    // (see `Env::flush_stats`).
    let flushed = || crate::support::flush_stats(&src);
    flushed().await;
    let s = run();
    assert_eq!(
        (s["read_strategy"].as_str(), s["written"].as_i64()),
        (Some("full"), Some(1000)),
        "{s}"
    );
    // Changes just below the wrap, then a run that records a basis there.
    src.batch_execute("UPDATE t SET v = -v WHERE id <= 10")
        .await
        .unwrap();
    flushed().await;
    let s = run();
    assert_eq!(
        (s["read_strategy"].as_str(), s["written"].as_i64()),
        (Some("delta"), Some(10)),
        "{s}"
    );
    // Cross the wrap: 4,000 transactions, one write among them on each side of it.
    for i in 0..4000 {
        let sql = match i {
            1000 => "UPDATE t SET v = -111 WHERE id = 111",
            3500 => "UPDATE t SET v = -222 WHERE id = 222",
            _ => "SELECT pg_current_xact_id()",
        };
        src.batch_execute(sql).await.unwrap();
    }
    let after = current("SELECT pg_current_xact_id()::text::int8").await;
    assert!(after > 1 << 32, "the ids did not wrap: {after}");
    let low: i64 = current("SELECT xmin::text::int8 FROM t WHERE id = 222").await;
    assert!(
        low < 3000,
        "a row written after the wrap has a small xmin: {low}"
    );
    src.batch_execute("DELETE FROM t WHERE id BETWEEN 900 AND 904; INSERT INTO t VALUES (5000, 5)")
        .await
        .unwrap();
    flushed().await;
    let s = run();
    assert_eq!(outcome(&s), ("delta", Some(3), Some(3), Some(5)), "{s}");
    check().await;
    // A run entirely after the wrap.
    src.batch_execute("UPDATE t SET v = 0 WHERE id = 7")
        .await
        .unwrap();
    flushed().await;
    let s = run();
    // Only the row written since: the rows written before the wrap have larger raw ids.
    assert_eq!(outcome(&s), ("delta", Some(1), Some(1), Some(0)), "{s}");
    check().await;
    // A window longer than pgdelta matches as a list of ids (20,000 transactions): compared
    // as numbers instead, with the same rows selected.
    src.batch_execute(
        "DO $$ BEGIN FOR i IN 1..20000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$",
    )
    .await
    .unwrap();
    src.batch_execute("UPDATE t SET v = 0 WHERE id = 8; DELETE FROM t WHERE id = 9")
        .await
        .unwrap();
    flushed().await;
    let s = run();
    assert_eq!(outcome(&s), ("delta", Some(1), Some(1), Some(1)), "{s}");
    check().await;
    drop((src, dst));
    pg.stop();
}
