//! The snapshot is a cache of the destination: a lost state file, a target filled by another
//! tool, or `--rebuild-state` rebuild it from the target, and the run writes only what differs.

use pgdelta::spec::Mode;
use pgdelta::sync::RunOptions;

use crate::support::Env;

/// numeric and text[] columns: their binary forms must agree between the two databases.
const ITEMS: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text, qty int, price numeric(10,2), tags text[])";

fn fill(rows: std::ops::RangeInclusive<i64>) -> String {
    format!(
        "INSERT INTO items SELECT i, 'item ' || i, i % 7, i * 1.5, ARRAY['a' || i % 3, NULL] FROM generate_series({}, {}) i",
        rows.start(),
        rows.end()
    )
}

async fn seeded(rows: i64) -> Env {
    let env = Env::new().await;
    env.both(ITEMS).await;
    env.src.batch_execute(&fill(1..=rows)).await.unwrap();
    env
}

async fn assert_items_same(env: &Env) {
    env.assert_same(
        "SELECT * FROM items ORDER BY id",
        "SELECT * FROM items ORDER BY id",
    )
    .await;
}

/// Counters settle asynchronously; give them time, then read them.
async fn settled_counters(env: &Env) -> (i64, i64, i64) {
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    env.dst_counters("items").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_state_file_is_rebuilt_from_the_target_and_writes_nothing() {
    let env = seeded(5000).await;
    let spec = env.spec("items", &["id"]);
    env.sync(&spec).await.unwrap();
    env.wait_counters("items", |c| c.0 == 5000).await;

    std::fs::remove_file(env.state()).unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.rebuilt_from_target, 5000);
    assert_eq!(
        s.strategy, "upsert",
        "a non-empty target is never blindly COPYed into"
    );
    assert_eq!(
        (
            s.unchanged,
            s.added,
            s.changed,
            s.removed,
            s.written,
            s.batches
        ),
        (5000, 0, 0, 0, 0, 0)
    );
    assert!(
        s.notes
            .iter()
            .any(|n| n.contains("rebuilt from the target")),
        "{:?}",
        s.notes
    );
    assert_eq!(
        settled_counters(&env).await,
        (5000, 0, 0),
        "not a row was rewritten"
    );

    // The rebuilt snapshot is used like any other: the next run rebuilds nothing.
    env.src
        .batch_execute("UPDATE items SET qty = 99 WHERE id = 7")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.rebuilt_from_target, s.changed, s.written), (0, 1, 1));
    assert_items_same(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefilled_target_is_adopted_and_only_differences_are_written() {
    let env = seeded(5000).await;
    // Another tool loaded the target: 3 rows differ, 2 are missing, 1 is extra.
    env.dst
        .batch_execute(&format!(
            "{}; UPDATE items SET qty = -1 WHERE id IN (10, 20, 30); DELETE FROM items WHERE id IN (40, 50);
             INSERT INTO items VALUES (9999, 'extra', 1, 1, NULL)",
            fill(1..=5000)
        ))
        .await
        .unwrap();
    env.wait_counters("items", |c| c.0 == 5001).await;
    let before = settled_counters(&env).await;

    let mut spec = env.spec("items", &["id"]);
    spec.delete = true;
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.rebuilt_from_target, 4999);
    assert_eq!(s.strategy, "upsert");
    assert_eq!(
        (
            s.added,
            s.changed,
            s.removed,
            s.unchanged,
            s.written,
            s.deleted
        ),
        (2, 3, 1, 4995, 5, 1)
    );
    assert_items_same(&env).await;
    let after = settled_counters(&env).await;
    // The staged upsert inserts the 2 missing rows and updates the 3 that differ.
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2 - before.2),
        (2, 3, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_state_finds_rows_changed_in_the_target_by_hand() {
    let env = seeded(1000).await;
    let spec = env.spec("items", &["id"]);
    env.sync(&spec).await.unwrap();
    env.dst
        .batch_execute("UPDATE items SET name = 'edited by hand' WHERE id = 10")
        .await
        .unwrap();

    // The snapshot describes what pgdelta wrote: a normal run cannot see the edit.
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.written, 0);

    // Rebuilt from the target, it can.
    let opts = RunOptions {
        rebuild_state: true,
        ..Default::default()
    };
    let s = env.sync_opts(&spec, &opts).await.unwrap();
    assert_eq!(s.rebuilt_from_target, 1000);
    assert_eq!((s.changed, s.written, s.unchanged), (1, 1, 999));
    assert_items_same(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_mode_adopts_a_prefilled_target() {
    let env = seeded(150).await;
    env.dst.batch_execute(&fill(1..=100)).await.unwrap();
    let mut spec = env.spec("items", &["id"]);
    spec.mode = Mode::Insert;
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.rebuilt_from_target, 100);
    assert_eq!(
        (s.added, s.unchanged, s.written, s.already_present),
        (50, 100, 50, 0)
    );
    assert_items_same(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_over_a_lost_state_file_plans_only_the_real_difference() {
    let env = seeded(2000).await;
    let spec = env.spec("items", &["id"]);
    env.sync(&spec).await.unwrap();
    std::fs::remove_file(env.state()).unwrap();
    env.src
        .batch_execute("UPDATE items SET price = 0 WHERE id = 3")
        .await
        .unwrap();
    let opts = RunOptions {
        dry_run: true,
        ..Default::default()
    };
    let s = env.sync_opts(&spec, &opts).await.unwrap();
    assert_eq!(
        (
            s.rebuilt_from_target,
            s.changed,
            s.added,
            s.removed,
            s.written
        ),
        (2000, 1, 0, 0, 0)
    );
    assert_eq!(s.sample_changed, vec!["id=3".to_string()]);
    assert!(
        s.notes.iter().any(|n| n.contains("scratch file")),
        "{:?}",
        s.notes
    );
    // The rebuild went to a scratch file, now gone: the state file holds no entries.
    let (syncs, others) = env.state_contents();
    assert!(syncs.iter().all(|(_, _, n)| *n == 0), "{syncs:?}");
    assert!(others.is_empty(), "{others:?}");
    let price: String = env
        .dst
        .query_one("SELECT price::text FROM items WHERE id = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(price, "4.50", "a dry run writes nothing to the target");

    // The real run rebuilds, then writes one row.
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.rebuilt_from_target, s.changed, s.written), (2000, 1, 1));
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.rebuilt_from_target, s.written), (0, 0));
    assert_items_same(&env).await;
}

/// `--rebuild-state --dry-run` previews the rebuild without doing it: the state file (its
/// entries, and metadata such as the basis of the next delta read) is left exactly as it was,
/// and the next real run uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_that_would_rebuild_leaves_the_state_file_as_it_was() {
    let env = seeded(3000).await;
    let mut spec = env.spec("items", &["id"]);
    spec.delete = true;
    env.sync(&spec).await.unwrap();
    env.src
        .batch_execute(
            "UPDATE items SET qty = -1 WHERE id IN (7, 8); DELETE FROM items WHERE id = 9",
        )
        .await
        .unwrap();
    let before = env.state_contents();
    assert_eq!(before.0.len(), 1);
    assert_eq!(before.0[0].2, 3000);
    let opts = RunOptions {
        dry_run: true,
        rebuild_state: true,
        ..Default::default()
    };
    let s = env.sync_opts(&spec, &opts).await.unwrap();
    assert_eq!(
        (
            s.rebuilt_from_target,
            s.changed,
            s.removed,
            s.written,
            s.deleted
        ),
        (3000, 2, 1, 0, 0)
    );
    assert_eq!(s.read_strategy, "full", "{}", s.read_strategy_reason);
    assert_eq!(env.state_contents(), before, "a dry run writes nothing");

    // The real run finds the entries and the basis as they were: a delta read, 3 rows.
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(
        (s.rebuilt_from_target, s.changed, s.deleted, s.written),
        (0, 2, 1, 2)
    );
    assert_eq!(s.read_strategy, "delta", "{}", s.read_strategy_reason);
    assert_items_same(&env).await;
}

/// A scratch state file left by a killed dry run is removed by the next command that opens the
/// state file; another state file's scratch directory beside it is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runs_scratch_file_is_removed_when_the_state_file_is_next_opened() {
    let env = seeded(100).await;
    let spec = env.spec("items", &["id"]);
    let stale = env.dir.path().join(".state.redb.scratch-AbC123");
    let other = env.dir.path().join(".other.redb.scratch-XyZ789");
    for d in [&stale, &other] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("state.redb"), b"left by a killed run").unwrap();
    }
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.written, 100);
    assert!(
        !stale.exists(),
        "the stale scratch directory is still there"
    );
    assert_eq!(env.state_contents().1, [".other.redb.scratch-XyZ789"]);
}

/// The hash files beside the state file (a changed row's hash is kept there, by slot).
fn hash_files(env: &Env) -> Vec<std::path::PathBuf> {
    let state = env.state();
    let prefix = format!("{}.", state.file_name().unwrap().to_string_lossy());
    let mut found: Vec<_> = std::fs::read_dir(state.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".hashes")
        })
        .collect();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_hash_file_rebuilds_the_entries_from_the_target() {
    let env = seeded(5000).await;
    let mut spec = env.spec("items", &["id"]);
    spec.delete = true;
    env.sync(&spec).await.unwrap();
    assert!(hash_files(&env).is_empty(), "a load changes no known row");
    env.src
        .batch_execute("UPDATE items SET qty = 1000 + qty WHERE id <= 100")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.changed, s.written), (100, 100));
    let files = hash_files(&env);
    assert_eq!(files.len(), 1, "{files:?}");

    // The rows change back. The entries' own hashes are those of the first run, which the
    // hash file superseded: trusted without it, these rows would look unchanged and the
    // target would keep the values of the second run.
    env.src
        .batch_execute("UPDATE items SET qty = qty - 1000 WHERE id <= 100")
        .await
        .unwrap();
    std::fs::remove_file(&files[0]).unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert!(
        s.notes
            .iter()
            .any(|n| n.contains("row hashes file") && n.contains("rebuilt from the target")),
        "{:?}",
        s.notes
    );
    assert_eq!(s.rebuilt_from_target, 5000);
    assert_eq!(
        (s.changed, s.unchanged, s.added, s.removed, s.written),
        (100, 4900, 0, 0, 100)
    );
    assert_items_same(&env).await;

    // The next change is recorded in a new hash file, and the old one is not made again.
    env.src
        .batch_execute("UPDATE items SET name = 'again' WHERE id BETWEEN 200 AND 209")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.rebuilt_from_target, s.changed, s.written), (0, 10, 10));
    let now = hash_files(&env);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], files[0]);
    assert_items_same(&env).await;
}
